//! The `confab` command line: `serve` runs the server, `token` prints a join
//! token. Every `serve` flag can also be set from a `CONFAB_*` variable.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::{self, Grants};
use crate::config::{
    Config, Limits, TurnConfig, DEFAULT_LISTEN, DEFAULT_MEDIA_PORT, DEFAULT_TURN_PORT,
};
use crate::room::ModePolicy;
use crate::server::Server;
use crate::signaling::protocol::IceServer;

/// Confab: video calls, peer-to-peer for two, through the server for more.
#[derive(Debug, Parser)]
#[command(name = "confab", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the server (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Print a join token for a room and identity.
    Token(TokenArgs),
    /// Load-test a server on loopback with simulated WebRTC participants
    /// (bounded; see docs/benchmarks.md).
    Load(Box<crate::load::LoadArgs>),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address for HTTP, the WebSocket and the web client.
    #[arg(long, env = "CONFAB_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// HS256 secret for join tokens (at least 16 bytes). Without one the
    /// server runs in dev mode and admits everyone.
    #[arg(long, env = "CONFAB_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Allow dev mode (no secret) on a non-loopback address.
    #[arg(long, env = "CONFAB_INSECURE")]
    insecure: bool,
    /// An ICE server URL handed to clients (repeatable), e.g.
    /// `stun:stun.example.org:3478`.
    #[arg(long = "ice-server", env = "CONFAB_ICE_SERVERS", value_delimiter = ',')]
    ice_servers: Vec<String>,
    /// Seconds an empty room is kept before it is removed.
    #[arg(long, env = "CONFAB_EMPTY_ROOM_SECS", default_value_t = 5)]
    empty_room_secs: u64,
    /// Largest signaling message in bytes; larger closes the socket (1009).
    #[arg(long, env = "CONFAB_MAX_MESSAGE_BYTES", default_value_t = Limits::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Seconds a new socket has to send `join`.
    #[arg(long, env = "CONFAB_JOIN_TIMEOUT_SECS", default_value_t = 10)]
    join_timeout_secs: u64,
    /// Sustained signaling messages per second per socket.
    #[arg(long, env = "CONFAB_RATE_PER_SEC", default_value_t = Limits::default().rate_per_sec)]
    rate_per_sec: f64,
    /// Message burst per socket.
    #[arg(long, env = "CONFAB_RATE_BURST", default_value_t = Limits::default().rate_burst)]
    rate_burst: f64,
    /// Members per room.
    #[arg(long, env = "CONFAB_MAX_PARTICIPANTS", default_value_t = Limits::default().max_participants)]
    max_participants: usize,
    /// Simultaneous WebSocket connections.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// UDP port of the SFU, shared by every participant (0: any free port).
    #[arg(long, env = "CONFAB_MEDIA_PORT", default_value_t = DEFAULT_MEDIA_PORT)]
    media_port: u16,
    /// IP the media socket binds to (default: the --listen IP).
    #[arg(long, env = "CONFAB_MEDIA_BIND")]
    media_bind: Option<IpAddr>,
    /// IP announced in the SFU's ICE candidates, when clients reach the
    /// server at another address than it binds (1:1 NAT, cloud VMs).
    #[arg(long, env = "CONFAB_PUBLIC_IP")]
    public_ip: Option<IpAddr>,
    /// Members from which media goes through the server.
    #[arg(long, env = "CONFAB_SFU_THRESHOLD", default_value_t = ModePolicy::default().sfu_threshold)]
    sfu_threshold: usize,
    /// Milliseconds a room must have two members before it returns to
    /// peer-to-peer.
    #[arg(long, env = "CONFAB_P2P_RETURN_DELAY_MS", default_value_t = 5000)]
    p2p_return_delay_ms: u64,
    /// Milliseconds a switch waits for clients' readiness before it
    /// completes (to the server) or is abandoned (back to the server).
    #[arg(long, env = "CONFAB_SWITCH_TIMEOUT_MS", default_value_t = 8000)]
    switch_timeout_ms: u64,
    /// Always route media through the server, even for two.
    #[arg(long, env = "CONFAB_NEVER_P2P")]
    never_p2p: bool,
    /// Route these rooms through the server even for two: a room id, or a
    /// prefix ending in `*` (repeatable; comma-separated in the variable).
    #[arg(
        long = "never-p2p-room",
        env = "CONFAB_NEVER_P2P_ROOMS",
        value_delimiter = ','
    )]
    never_p2p_rooms: Vec<String>,
    /// Accept only AEAD_AES_128_GCM for SRTP on server legs (cheaper per
    /// packet; every current browser supports it).
    #[arg(long, env = "CONFAB_SRTP_GCM_ONLY")]
    srtp_gcm_only: bool,
    /// Do not run the embedded STUN/TURN server (e.g. with --turn-external).
    #[arg(long, env = "CONFAB_NO_TURN")]
    no_turn: bool,
    /// UDP port of the embedded STUN/TURN server (0: any free port).
    #[arg(long, env = "CONFAB_TURN_PORT", default_value_t = DEFAULT_TURN_PORT)]
    turn_port: u16,
    /// IP the TURN server and its relay sockets bind (default: the media
    /// socket's IP).
    #[arg(long, env = "CONFAB_TURN_BIND")]
    turn_bind: Option<IpAddr>,
    /// IP clients reach the TURN server at, also announced as the relayed
    /// address (1:1 NAT; default: --public-ip, else the bind IP).
    #[arg(long, env = "CONFAB_TURN_PUBLIC_IP")]
    turn_public_ip: Option<IpAddr>,
    /// Relay port range, LOW-HIGH inclusive: one port per allocation.
    #[arg(long, env = "CONFAB_TURN_RELAY_PORTS", default_value = "49152-65535", value_parser = parse_port_range)]
    turn_relay_ports: (u16, u16),
    /// Realm of the TURN credentials.
    #[arg(long, env = "CONFAB_TURN_REALM", default_value = "confab")]
    turn_realm: String,
    /// Shared secret of the TURN credentials (coturn's static-auth-secret,
    /// at least 16 bytes). Without one, a random secret per start.
    #[arg(long, env = "CONFAB_TURN_SECRET", hide_env_values = true)]
    turn_secret: Option<String>,
    /// Seconds a handed-out TURN credential stays valid.
    #[arg(long, env = "CONFAB_TURN_CREDENTIAL_TTL_SECS", default_value_t = TurnConfig::default().credential_ttl.as_secs())]
    turn_credential_ttl_secs: u64,
    /// TURN allocations one participant may hold at once (more get 486).
    #[arg(long, env = "CONFAB_TURN_USER_QUOTA", default_value_t = TurnConfig::default().user_quota)]
    turn_user_quota: usize,
    /// TURN allocations the server holds at once (more get 486).
    #[arg(long, env = "CONFAB_TURN_TOTAL_QUOTA", default_value_t = TurnConfig::default().total_quota)]
    turn_total_quota: usize,
    /// Development only: let the relay reach loopback peers (local demos,
    /// tests). Private and link-local peers stay refused.
    #[arg(long, env = "CONFAB_TURN_ALLOW_LOOPBACK")]
    turn_allow_loopback: bool,
    /// An external STUN/TURN URL handed to clients with a time-limited
    /// credential (repeatable), e.g. `turn:turn.example.org:3478?transport=udp`.
    #[arg(
        long = "turn-external",
        env = "CONFAB_TURN_EXTERNAL",
        value_delimiter = ','
    )]
    turn_external: Vec<String>,
    /// Shared secret of the external TURN servers (default: --turn-secret).
    #[arg(long, env = "CONFAB_TURN_EXTERNAL_SECRET", hide_env_values = true)]
    turn_external_secret: Option<String>,
}

/// `LOW-HIGH` → `(LOW, HIGH)`.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("`{s}`: expected LOW-HIGH"))?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("`{s}`: {e}"));
    Ok((port(lo)?, port(hi)?))
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// The room the token admits to.
    #[arg(long)]
    room: String,
    /// The participant's identity (token subject).
    #[arg(long)]
    identity: String,
    /// Display name carried in the token.
    #[arg(long)]
    name: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// Deny publishing media.
    #[arg(long)]
    no_publish: bool,
    /// Deny receiving media.
    #[arg(long)]
    no_subscribe: bool,
    /// The server's secret.
    #[arg(long, env = "CONFAB_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
}

impl ServeArgs {
    fn into_config(self) -> Config {
        let limits = Limits {
            max_message_bytes: self.max_message_bytes,
            join_timeout: Duration::from_secs(self.join_timeout_secs),
            rate_per_sec: self.rate_per_sec,
            rate_burst: self.rate_burst,
            max_participants: self.max_participants,
            max_connections: self.max_connections,
            ..Limits::default()
        };
        Config {
            listen: self.listen,
            jwt_secret: self.jwt_secret.filter(|s| !s.is_empty()),
            insecure: self.insecure,
            ice_servers: self
                .ice_servers
                .into_iter()
                .filter(|u| !u.is_empty())
                .map(|url| IceServer {
                    urls: vec![url],
                    username: None,
                    credential: None,
                })
                .collect(),
            empty_room_timeout: Duration::from_secs(self.empty_room_secs),
            limits,
            media_port: self.media_port,
            media_bind: self.media_bind,
            public_ip: self.public_ip,
            mode_policy: ModePolicy {
                sfu_threshold: self.sfu_threshold,
                p2p_return_delay: Duration::from_millis(self.p2p_return_delay_ms),
                switch_timeout: Duration::from_millis(self.switch_timeout_ms),
                never_p2p: self.never_p2p,
            },
            never_p2p_rooms: self
                .never_p2p_rooms
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect(),
            srtp_gcm_only: self.srtp_gcm_only,
            turn: TurnConfig {
                enabled: !self.no_turn,
                port: self.turn_port,
                bind: self.turn_bind,
                public_ip: self.turn_public_ip,
                relay_ports: self.turn_relay_ports,
                realm: self.turn_realm,
                secret: self.turn_secret.filter(|s| !s.is_empty()),
                credential_ttl: Duration::from_secs(self.turn_credential_ttl_secs),
                user_quota: self.turn_user_quota,
                total_quota: self.turn_total_quota,
                allow_loopback: self.turn_allow_loopback,
                external_urls: self
                    .turn_external
                    .into_iter()
                    .filter(|u| !u.is_empty())
                    .collect(),
                external_secret: self.turn_external_secret.filter(|s| !s.is_empty()),
            },
        }
    }
}

/// Parses the command line and runs the chosen command; returns the process
/// exit code.
pub fn run() -> i32 {
    let cli = Cli::parse();
    // No subcommand means `serve` with its defaults (and CONFAB_* variables).
    let command =
        cli.command
            .unwrap_or_else(|| match Cli::parse_from(["confab", "serve"]).command {
                Some(c) => c,
                None => unreachable!("`serve` was given"),
            });
    match command {
        Cmd::Token(args) => {
            if args.jwt_secret.len() < 16 {
                eprintln!("confab: --jwt-secret must be at least 16 bytes");
                return 2;
            }
            let grants = Grants {
                publish: !args.no_publish,
                subscribe: !args.no_subscribe,
            };
            let token = auth::issue(
                &args.jwt_secret,
                &args.room,
                &args.identity,
                args.name.as_deref(),
                args.ttl,
                grants,
            );
            println!("{token}");
            0
        }
        Cmd::Serve(args) => serve((*args).into_config()),
        Cmd::Load(args) => crate::load::run(*args),
    }
}

fn serve(config: Config) -> i32 {
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("confab: cannot start the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async move {
        let dev = config.dev_mode();
        let server = match Server::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("confab: {e}");
                return 1;
            }
        };
        let addr = server.local_addr();
        let media = server.media_addr();
        let turn = server.turn_addr();
        if dev {
            tracing::warn!(
                "DEV MODE: no --jwt-secret set, anyone who can reach {addr} can join any room"
            );
        }
        // Not println!: a closed stdout (a supervisor that stopped reading)
        // must not take the server down.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "Confab is running. Open http://{addr}/ in two browser windows to start a call."
        );
        let _ = writeln!(out, "Media (UDP) on {media}.");
        if let Some(turn) = turn {
            let _ = writeln!(out, "STUN/TURN (UDP) on {turn}.");
        }
        let _ = out.flush();
        drop(out);
        let stop = server.shutdown_handle();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            stop.shutdown();
        });
        match server.run().await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("confab: server error: {e}");
                1
            }
        }
    })
}

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM (what Kubernetes and
/// systemd send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CONFAB_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
