//! The `confab` command line: `serve` runs the server, `token` prints a join
//! token, `load` load-tests a server.
//!
//! Every `serve` setting has one name, its long flag (`--media-port`), and
//! three sources, in increasing precedence: a TOML file given by `--config`
//! (keys are the flag names: `media-port = 7882`), a `CONFAB_*` environment
//! variable, and the flag itself. `docs/configuration.md` lists them all;
//! `confab serve --print-config` shows the result.

use std::ffi::OsString;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::auth::{self, Grants};
use crate::config::{
    Config, Limits, TurnConfig, DEFAULT_DRAIN_TIMEOUT_SECS, DEFAULT_LISTEN, DEFAULT_MEDIA_PORT,
    DEFAULT_TURN_PORT,
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

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

#[derive(Debug, Args, Serialize)]
#[serde(rename_all = "kebab-case")]
struct ServeArgs {
    /// A TOML file of settings; its keys are these flags' names without
    /// `--` (e.g. `media-port = 7882`). Environment variables and flags
    /// override it.
    #[arg(long, env = "CONFAB_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Print the resolved settings as TOML (secrets hidden) and exit.
    #[arg(long)]
    #[serde(skip)]
    print_config: bool,
    /// Log format.
    #[arg(long, env = "CONFAB_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or
    /// `confab=debug,info`.
    #[arg(long, env = "CONFAB_LOG", default_value = "info")]
    log: String,
    /// Put client IP addresses into logs (debugging only: off, logs carry
    /// no addresses and never any token).
    #[arg(long, env = "CONFAB_LOG_CLIENT_ADDRESSES")]
    log_client_addresses: bool,
    /// Address for HTTP, the WebSocket and the web client.
    #[arg(long, env = "CONFAB_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// A separate address for `/metrics` (also serving /healthz and
    /// /readyz); when set, /metrics is not on --listen.
    #[arg(long, env = "CONFAB_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Bearer token of the admin API (/admin/rooms...; at least 16 bytes),
    /// served on --metrics-listen when set. Without one the API is off.
    #[arg(long, env = "CONFAB_ADMIN_TOKEN", hide_env_values = true)]
    #[serde(serialize_with = "hidden")]
    admin_token: Option<String>,
    /// Seconds a drain (first SIGTERM or Ctrl-C) waits for rooms to empty
    /// before disconnecting the rest; a second signal stops at once.
    #[arg(long, env = "CONFAB_DRAIN_TIMEOUT_SECS", default_value_t = DEFAULT_DRAIN_TIMEOUT_SECS)]
    drain_timeout_secs: u64,
    /// HS256 secret for join tokens (at least 16 bytes). Without one the
    /// server runs in dev mode and admits everyone.
    #[arg(long, env = "CONFAB_JWT_SECRET", hide_env_values = true)]
    #[serde(serialize_with = "hidden")]
    jwt_secret: Option<String>,
    /// Allow dev mode (no secret) on a non-loopback address.
    #[arg(long, env = "CONFAB_INSECURE")]
    insecure: bool,
    /// An ICE server URL handed to clients (repeatable), e.g.
    /// `stun:stun.example.org:3478`.
    #[arg(long = "ice-server", env = "CONFAB_ICE_SERVERS", value_delimiter = ',')]
    #[serde(rename = "ice-server")]
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
    /// Sustained chat messages per second per member (each reaches the whole room).
    #[arg(long, env = "CONFAB_CHAT_RATE_PER_SEC", default_value_t = Limits::default().chat_rate_per_sec)]
    chat_rate_per_sec: f64,
    /// Chat message burst per member.
    #[arg(long, env = "CONFAB_CHAT_BURST", default_value_t = Limits::default().chat_burst)]
    chat_burst: f64,
    /// Members per room.
    #[arg(long, env = "CONFAB_MAX_PARTICIPANTS", default_value_t = Limits::default().max_participants)]
    max_participants: usize,
    /// Simultaneous WebSocket connections.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    max_connections: usize,
    /// Rooms on the server; a join that would create another gets
    /// `too_many_rooms`.
    #[arg(long, env = "CONFAB_MAX_ROOMS", default_value_t = Limits::default().max_rooms)]
    max_rooms: usize,
    /// Sustained joins per second from one client IP address (0: no
    /// limit); more get `too_many_joins`.
    #[arg(long, env = "CONFAB_JOIN_RATE_PER_IP", default_value_t = Limits::default().join_rate_per_ip)]
    join_rate_per_ip: f64,
    /// Join burst from one client IP address.
    #[arg(long, env = "CONFAB_JOIN_BURST_PER_IP", default_value_t = Limits::default().join_burst_per_ip)]
    join_burst_per_ip: f64,
    /// Apply the join limit to loopback clients too (by default they are
    /// exempt: a reverse proxy on the same host must limit joins itself).
    #[arg(long, env = "CONFAB_JOIN_RATE_LOOPBACK")]
    join_rate_loopback: bool,
    /// Take the client address (join limit, logs) from the last
    /// X-Forwarded-For entry. Only behind a reverse proxy or ingress that
    /// sets it: otherwise clients choose their own address.
    #[arg(long, env = "CONFAB_TRUST_FORWARDED_FOR")]
    trust_forwarded_for: bool,
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
    #[serde(rename = "never-p2p-room")]
    never_p2p_rooms: Vec<String>,
    /// Last-N: in server-routed rooms each member receives the video of at
    /// most this many others (screen sharers first, then the most recent
    /// speakers); audio from everyone. 0: every video.
    #[arg(long, env = "CONFAB_LAST_N", default_value_t = 0)]
    last_n: usize,
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
    #[serde(serialize_with = "port_range")]
    turn_relay_ports: (u16, u16),
    /// Realm of the TURN credentials.
    #[arg(long, env = "CONFAB_TURN_REALM", default_value = "confab")]
    turn_realm: String,
    /// Shared secret of the TURN credentials (coturn's static-auth-secret,
    /// at least 16 bytes). Without one, a random secret per start.
    #[arg(long, env = "CONFAB_TURN_SECRET", hide_env_values = true)]
    #[serde(serialize_with = "hidden")]
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
    #[serde(serialize_with = "hidden")]
    turn_external_secret: Option<String>,
}

/// Serialises a secret as `"<hidden>"` when set (and leaves it out when
/// not).
fn hidden<S: serde::Serializer>(secret: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => s.serialize_str("<hidden>"),
        None => s.serialize_none(),
    }
}

/// `(LOW, HIGH)` → `"LOW-HIGH"`, as the flag takes it.
fn port_range<S: serde::Serializer>(range: &(u16, u16), s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}-{}", range.0, range.1))
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
    /// Deny joining (a token for another purpose; refused by `join`).
    #[arg(long)]
    no_join: bool,
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
            chat_rate_per_sec: self.chat_rate_per_sec,
            chat_burst: self.chat_burst,
            max_participants: self.max_participants,
            max_connections: self.max_connections,
            max_rooms: self.max_rooms,
            join_rate_per_ip: self.join_rate_per_ip,
            join_burst_per_ip: self.join_burst_per_ip,
            join_rate_exempt_loopback: !self.join_rate_loopback,
            trust_forwarded_for: self.trust_forwarded_for,
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
            last_n: self.last_n,
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
            metrics_listen: self.metrics_listen,
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            log_client_addresses: self.log_client_addresses,
            admin_token: self.admin_token.filter(|t| !t.is_empty()),
        }
    }
}

/// Parses the command line and runs the chosen command; returns the process
/// exit code.
pub fn run() -> i32 {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    // No subcommand means `serve` with its defaults (and CONFAB_* variables).
    if args.len() == 1 {
        args.push("serve".into());
    }
    let args = match apply_config_file(args) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("confab: {message}");
            return 2;
        }
    };
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let Some(command) = cli.command else {
        unreachable!("`serve` is added when no subcommand is given")
    };
    match command {
        Cmd::Token(args) => {
            if args.jwt_secret.len() < 16 {
                eprintln!("confab: --jwt-secret must be at least 16 bytes");
                return 2;
            }
            let grants = Grants {
                join: !args.no_join,
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
        Cmd::Serve(args) => {
            if args.print_config {
                return match toml::to_string(&*args) {
                    Ok(text) => {
                        print!("{text}");
                        0
                    }
                    Err(e) => {
                        eprintln!("confab: cannot print the configuration: {e}");
                        1
                    }
                };
            }
            if let Err(e) = init_tracing(args.log_format, &args.log) {
                eprintln!("confab: --log {:?}: {e}", args.log);
                return 2;
            }
            serve((*args).into_config())
        }
        Cmd::Load(args) => crate::load::run(*args),
    }
}

/// Inserts the settings of `serve --config FILE` into the command line as
/// flags, except those already given by a flag or a `CONFAB_*` variable
/// (which take precedence). Errors name the file and the setting.
fn apply_config_file(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    // Bad flags are reported by the real parse, with clap's messages.
    let Ok(matches) = Cli::command().try_get_matches_from(&args) else {
        return Ok(args);
    };
    let Some(("serve", serve)) = matches.subcommand() else {
        return Ok(args);
    };
    let Some(path) = serve.get_one::<PathBuf>("config") else {
        return Ok(args);
    };
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the configuration file {shown}: {e}"))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("configuration file {shown}: {e}"))?;
    let command = ServeArgs::augment_args(clap::Command::new("serve"));
    let mut flags: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|_| !["config", "print-config", "help"].contains(&key.as_str()))
            .ok_or_else(|| {
                format!(
                    "configuration file {shown}: unknown setting `{key}` (see confab serve --help)"
                )
            })?;
        let is_flag = matches!(arg.get_action(), ArgAction::SetTrue);
        let values: Vec<String> = match value {
            toml::Value::Array(items) => items.iter().map(scalar).collect::<Option<_>>(),
            v => scalar(v).map(|s| vec![s]),
        }
        .ok_or_else(|| {
            format!("configuration file {shown}: setting `{key}`: expected a string, number, boolean or a list of them")
        })?;
        let mut these: Vec<OsString> = Vec::new();
        for v in values {
            if is_flag {
                match v.as_str() {
                    "true" => these.push(format!("--{key}").into()),
                    "false" => {}
                    _ => {
                        return Err(format!(
                            "configuration file {shown}: setting `{key}`: expected true or false"
                        ))
                    }
                }
            } else {
                these.push(format!("--{key}={v}").into());
            }
        }
        // Check the setting on its own, so that an error names it.
        let mut alone: Vec<OsString> = vec!["serve".into()];
        alone.extend(these.iter().cloned());
        if let Err(e) = command.clone().try_get_matches_from(alone) {
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            return Err(format!(
                "configuration file {shown}: setting `{key}`: {first}"
            ));
        }
        let overridden = matches!(
            serve.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !overridden {
            flags.extend(these);
        }
    }
    // `confab serve <file flags> <command-line flags>`.
    let serve_at = args
        .iter()
        .position(|a| a == "serve")
        .expect("the `serve` subcommand was parsed");
    let mut out = args[..=serve_at].to_vec();
    out.extend(flags);
    out.extend_from_slice(&args[serve_at + 1..]);
    Ok(out)
}

/// A TOML scalar as a flag value; `None` for tables and arrays.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn serve(config: Config) -> i32 {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("confab: cannot start the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(async move {
        let dev = config.dev_mode();
        let drain_timeout = config.drain_timeout;
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
        let metrics_addr = server.metrics_addr();
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
        if let Some(m) = metrics_addr {
            let _ = writeln!(out, "Metrics on http://{m}/metrics.");
        }
        let _ = out.flush();
        drop(out);
        let stop = server.shutdown_handle();
        tokio::spawn(async move {
            let mut signals = Signals::new();
            signals.next().await;
            tracing::info!(
                participants = stop.participants(),
                deadline_secs = drain_timeout.as_secs(),
                "draining: no new rooms; stopping when the rooms are empty \
                 or at the deadline (signal again to stop now)"
            );
            tokio::select! {
                emptied = stop.drain(drain_timeout) => {
                    if emptied {
                        tracing::info!("drained: no participant left; stopping");
                    } else {
                        tracing::warn!(participants = stop.participants(), "drain deadline passed; disconnecting the rest");
                    }
                }
                _ = signals.next() => {
                    tracing::warn!("second signal: stopping now");
                    stop.shutdown();
                    // Sessions close within a couple of seconds; do not wait
                    // on anything slower.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    std::process::exit(0);
                }
            }
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

/// SIGINT (Ctrl-C) and, on Unix, SIGTERM (what Kubernetes and systemd
/// send), registered once so that a second signal is never missed.
struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Signals {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Resolves at the next signal.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            let term = async {
                match self.term.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let int = async {
                match self.int.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term => {}
                _ = int => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_tracing(format: LogFormat, filter: &str) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
    Ok(())
}
