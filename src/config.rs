//! Server configuration: every setting, its default and why.
//!
//! [`Config`] is built by the command line (`confab serve --help`, each flag
//! also readable from a `CONFAB_*` environment variable) or directly by tests.
//! [`Limits`] groups the bounds that protect the server from its clients;
//! `docs/protocol.md` lists the same values.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::room::ModePolicy;
use crate::signaling::protocol::IceServer;

/// Everything `confab serve` needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address for HTTP, the WebSocket and the web client.
    pub listen: SocketAddr,
    /// HS256 secret for join tokens; `None` is dev mode (open joins).
    pub jwt_secret: Option<String>,
    /// Allow dev mode on a non-loopback address.
    pub insecure: bool,
    /// ICE servers handed to clients in `joined`.
    pub ice_servers: Vec<IceServer>,
    /// How long an empty room is kept before it is removed, so that a quick
    /// reload does not lose the room (LiveKit uses 20 s for the same).
    pub empty_room_timeout: Duration,
    /// Bounds on what clients may do.
    pub limits: Limits,
    /// The SFU's UDP port for every participant (0: any free port).
    pub media_port: u16,
    /// The address the media socket binds to; `None` binds the listen
    /// address's IP.
    pub media_bind: Option<IpAddr>,
    /// The address put into the SFU's ICE candidates when it differs from
    /// the bound one (1:1 NAT, a cloud VM's public IP).
    pub public_ip: Option<IpAddr>,
    /// When rooms use peer-to-peer and when the server.
    pub mode_policy: ModePolicy,
    /// Rooms that never use peer-to-peer, by id or `prefix*` pattern
    /// (webinars, recorded rooms: anything where the server must see the
    /// media, or where a switch at the second join is unwanted).
    pub never_p2p_rooms: Vec<String>,
    /// Last-N: in server-routed rooms each member receives the video of
    /// at most this many others (screen sharers, then the most recent
    /// speakers); audio from everyone. 0: every video.
    pub last_n: usize,
    /// Accept only AEAD_AES_128_GCM for SRTP on server legs (about 4x
    /// cheaper per packet than AES-CM + HMAC-SHA1, which Chromium picks
    /// when offered both).
    pub srtp_gcm_only: bool,
    /// The embedded STUN/TURN server and the TURN servers handed to clients.
    pub turn: TurnConfig,
    /// A separate address for `/metrics` (with `/healthz` and `/readyz`);
    /// `None` serves `/metrics` on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// How long a drain (the first SIGTERM) waits for rooms to empty
    /// before the remaining members are disconnected.
    pub drain_timeout: Duration,
    /// Put client IP addresses into logs (debugging only; off by default
    /// so that logs hold no personal data).
    pub log_client_addresses: bool,
    /// Bearer token of the admin API (`src/admin.rs`); `None` disables it.
    pub admin_token: Option<String>,
}

/// STUN/TURN: the embedded server and external ones. Clients get
/// time-limited credentials (coturn's `use-auth-secret` scheme) for every
/// TURN server in `joined.ice_servers`.
#[derive(Debug, Clone)]
pub struct TurnConfig {
    /// Run the embedded STUN/TURN server.
    pub enabled: bool,
    /// Its UDP port (0: any free port).
    pub port: u16,
    /// The address it binds; `None` binds the media socket's IP.
    pub bind: Option<IpAddr>,
    /// The address clients reach it at and relayed addresses are announced
    /// with (1:1 NAT); `None` uses `Config::public_ip`, else the bind IP.
    pub public_ip: Option<IpAddr>,
    /// Relay ports, inclusive: one per allocation.
    pub relay_ports: (u16, u16),
    /// The long-term credential realm.
    pub realm: String,
    /// The shared secret credentials are signed with. `None`: a random
    /// secret per start (fine for the embedded server alone).
    pub secret: Option<String>,
    /// How long handed-out credentials stay valid. An allocation must be
    /// refreshed with a valid credential, so a relayed call longer than
    /// this needs a rejoin.
    pub credential_ttl: Duration,
    /// Allocations one username (one join) may hold at once; more get 486.
    /// A browser allocates per peer connection and TURN URL.
    pub user_quota: usize,
    /// Allocations the server holds at once; more get 486.
    pub total_quota: usize,
    /// Development only: let the relay reach loopback peers (tests, local
    /// demos). Private and link-local peers stay refused.
    pub allow_loopback: bool,
    /// External STUN/TURN URLs handed out with credentials signed by
    /// `external_secret` (an external coturn with `static-auth-secret`).
    pub external_urls: Vec<String>,
    /// Secret of the external servers; `None` uses `secret`.
    pub external_secret: Option<String>,
}

/// The embedded TURN server's port when none is given.
pub const DEFAULT_TURN_PORT: u16 = 3478;
/// The relay port range when none is given (coturn's default).
pub const DEFAULT_TURN_RELAY_PORTS: (u16, u16) = (49152, 65535);

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            enabled: true,
            port: DEFAULT_TURN_PORT,
            bind: None,
            public_ip: None,
            relay_ports: DEFAULT_TURN_RELAY_PORTS,
            realm: "confab".into(),
            secret: None,
            credential_ttl: Duration::from_secs(6 * 3600),
            user_quota: 10,
            total_quota: 1000,
            allow_loopback: false,
            external_urls: Vec::new(),
            external_secret: None,
        }
    }
}

/// Bounds on clients. Each one is documented in `docs/protocol.md` and has an
/// end-to-end test in `tests/it`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest WebSocket message (and frame) accepted; larger closes the
    /// socket with 1009. Kept far below axum's 64 MiB default: the largest
    /// honest message is an SDP of a few kilobytes.
    pub max_message_bytes: usize,
    /// Deadline for a socket's first message, the `join`.
    pub join_timeout: Duration,
    /// Sustained messages per second per socket (token bucket rate).
    pub rate_per_sec: f64,
    /// Burst size of the token bucket.
    pub rate_burst: f64,
    /// Sustained chat messages per second per member (a message beyond it
    /// is refused with `rate_limited`; the socket stays open).
    pub chat_rate_per_sec: f64,
    /// Burst of chat messages per member.
    pub chat_burst: f64,
    /// Dropped messages after which a flooding socket is closed (1008).
    pub max_rate_drops: u32,
    /// Members per room. Every member receives every other member, so the
    /// SFU's work grows with its square.
    pub max_participants: usize,
    /// Outbound messages queued per socket before the client counts as not
    /// reading and is dropped.
    pub outbound_queue: usize,
    /// Simultaneous WebSocket connections; more get HTTP 503.
    pub max_connections: usize,
    /// Rooms on the server; a join that would create another gets
    /// `too_many_rooms`.
    pub max_rooms: usize,
    /// Interval of server WebSocket pings.
    pub ping_interval: Duration,
    /// A socket silent this long is closed.
    pub idle_timeout: Duration,
    /// Sustained joins per second from one client IP address (0: no
    /// limit).
    pub join_rate_per_ip: f64,
    /// Join burst from one client IP address.
    pub join_burst_per_ip: f64,
    /// Exempt loopback clients from the join limit (a reverse proxy on the
    /// same host, local load tests).
    pub join_rate_exempt_loopback: bool,
    /// Take the client address from the last `X-Forwarded-For` entry
    /// (behind a reverse proxy or ingress that sets it); otherwise every
    /// client would share the proxy's address.
    pub trust_forwarded_for: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            join_timeout: Duration::from_secs(10),
            rate_per_sec: 50.0,
            rate_burst: 100.0,
            chat_rate_per_sec: 2.0,
            chat_burst: 10.0,
            max_rate_drops: 200,
            max_participants: 16,
            outbound_queue: 256,
            max_connections: 1000,
            max_rooms: 1000,
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            join_rate_per_ip: 5.0,
            join_burst_per_ip: 50.0,
            join_rate_exempt_loopback: true,
            trust_forwarded_for: false,
        }
    }
}

/// The listen address when none is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7880";
/// The SFU's UDP port when none is given.
pub const DEFAULT_MEDIA_PORT: u16 = 7882;
/// How long a drain waits for rooms to empty when not configured.
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 600;

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("constant address parses"),
            jwt_secret: None,
            insecure: false,
            ice_servers: Vec::new(),
            empty_room_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            media_port: DEFAULT_MEDIA_PORT,
            media_bind: None,
            public_ip: None,
            mode_policy: ModePolicy::default(),
            never_p2p_rooms: Vec::new(),
            last_n: 0,
            srtp_gcm_only: false,
            turn: TurnConfig::default(),
            metrics_listen: None,
            drain_timeout: Duration::from_secs(DEFAULT_DRAIN_TIMEOUT_SECS),
            log_client_addresses: false,
            admin_token: None,
        }
    }
}

impl Config {
    /// Dev mode: no secret, every join accepted.
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none()
    }

    /// The address the SFU's socket binds.
    pub fn media_addr(&self) -> SocketAddr {
        SocketAddr::new(self.media_bind.unwrap_or(self.listen.ip()), self.media_port)
    }

    /// The address the embedded TURN server binds.
    pub fn turn_addr(&self) -> SocketAddr {
        SocketAddr::new(
            self.turn.bind.unwrap_or(self.media_addr().ip()),
            self.turn.port,
        )
    }

    /// The address clients reach the embedded TURN server at, and relayed
    /// addresses are announced with.
    pub fn turn_public_ip(&self) -> IpAddr {
        self.turn
            .public_ip
            .or(self.public_ip)
            .unwrap_or(self.turn_addr().ip())
    }

    /// Refuses configurations that would be unsafe to run.
    pub fn validate(&self) -> Result<(), String> {
        if self.dev_mode() && !self.listen.ip().is_loopback() && !self.insecure {
            return Err(format!(
                "refusing to run in dev mode (no --jwt-secret) on non-loopback address {}; \
                 set a secret or pass --insecure",
                self.listen
            ));
        }
        if let Some(secret) = &self.jwt_secret {
            if secret.len() < 16 {
                return Err("--jwt-secret must be at least 16 bytes".into());
            }
        }
        if self.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err("--admin-token must be at least 16 bytes".into());
        }
        if self.limits.max_message_bytes < 1024 {
            return Err("--max-message-bytes must be at least 1024".into());
        }
        if self.limits.max_participants < 2 {
            return Err("--max-participants must be at least 2".into());
        }
        if self.mode_policy.sfu_threshold < 3 {
            return Err("--sfu-threshold must be at least 3 (use --never-p2p for two)".into());
        }
        if self.media_addr().ip().is_unspecified() && self.public_ip.is_none() {
            return Err(format!(
                "the media socket would bind {}: set --public-ip (the address clients reach) or --media-bind",
                self.media_addr()
            ));
        }
        if !(self.limits.rate_per_sec > 0.0 && self.limits.rate_burst >= 1.0) {
            return Err("--rate-per-sec must be > 0 and --rate-burst >= 1".into());
        }
        if !(self.limits.chat_rate_per_sec > 0.0 && self.limits.chat_burst >= 1.0) {
            return Err("--chat-rate-per-sec must be > 0 and --chat-burst >= 1".into());
        }
        let l = &self.limits;
        if !(l.join_rate_per_ip >= 0.0 && l.join_rate_per_ip.is_finite()) {
            return Err("--join-rate-per-ip must be 0 (no limit) or more".into());
        }
        if l.join_rate_per_ip > 0.0 && (l.join_burst_per_ip.is_nan() || l.join_burst_per_ip < 1.0) {
            return Err("--join-burst-per-ip must be at least 1".into());
        }
        if l.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if l.max_rooms == 0 {
            return Err("--max-rooms must be at least 1".into());
        }
        if self.metrics_listen == Some(self.listen) && self.listen.port() != 0 {
            return Err("--metrics-listen must differ from --listen".into());
        }
        self.validate_turn()
    }

    fn validate_turn(&self) -> Result<(), String> {
        let t = &self.turn;
        for secret in [&t.secret, &t.external_secret].into_iter().flatten() {
            if secret.len() < 16 {
                return Err("TURN secrets must be at least 16 bytes".into());
            }
        }
        if !t.external_urls.is_empty() && t.external_secret.is_none() && t.secret.is_none() {
            return Err("--turn-external needs --turn-external-secret or --turn-secret".into());
        }
        if let Some(bad) = t.external_urls.iter().find(|u| {
            !["stun:", "turn:", "turns:"]
                .iter()
                .any(|s| u.starts_with(s))
        }) {
            return Err(format!(
                "--turn-external {bad}: expected a stun:, turn: or turns: URL"
            ));
        }
        if t.credential_ttl < Duration::from_secs(60) {
            return Err("--turn-credential-ttl-secs must be at least 60".into());
        }
        if !t.enabled {
            return Ok(());
        }
        let (lo, hi) = t.relay_ports;
        if lo == 0 || hi < lo {
            return Err(format!(
                "--turn-relay-ports {lo}-{hi}: expected LOW-HIGH with 0 < LOW <= HIGH"
            ));
        }
        if t.user_quota == 0 || t.total_quota == 0 {
            return Err("--turn-user-quota and --turn-total-quota must be at least 1".into());
        }
        if t.realm.is_empty() || t.realm.len() > 127 {
            return Err("--turn-realm must be 1-127 bytes".into());
        }
        if self.turn_public_ip().is_unspecified() {
            return Err(format!(
                "the TURN server would bind {}: set --turn-public-ip or --public-ip (the address clients reach)",
                self.turn_addr()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_mode_refuses_public_address_without_insecure() {
        let mut c = Config {
            listen: "0.0.0.0:7880".parse().unwrap(),
            public_ip: Some("203.0.113.7".parse().unwrap()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("dev mode"));
        c.insecure = true;
        assert!(c.validate().is_ok());
        c.insecure = false;
        c.jwt_secret = Some("0123456789abcdef".into());
        assert!(c.validate().is_ok());
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn a_wildcard_media_bind_needs_a_public_ip() {
        let mut c = Config {
            listen: "0.0.0.0:7880".parse().unwrap(),
            jwt_secret: Some("0123456789abcdef".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("--public-ip"));
        c.public_ip = Some("203.0.113.7".parse().unwrap());
        assert!(c.validate().is_ok());
        c.mode_policy.sfu_threshold = 2;
        assert!(c.validate().unwrap_err().contains("--sfu-threshold"));
    }

    #[test]
    fn turn_settings_are_checked() {
        let ok = Config::default();
        assert_eq!(ok.turn_addr(), SocketAddr::from(([127, 0, 0, 1], 3478)));
        assert_eq!(ok.turn_public_ip(), ok.turn_addr().ip());
        let check = |f: &dyn Fn(&mut TurnConfig)| {
            let mut c = Config::default();
            f(&mut c.turn);
            c.validate()
        };
        assert!(check(&|t| t.relay_ports = (0, 10)).is_err());
        assert!(check(&|t| t.relay_ports = (50000, 40000)).is_err());
        assert!(check(&|t| t.user_quota = 0).is_err());
        assert!(check(&|t| t.secret = Some("short".into())).is_err());
        assert!(check(&|t| t.credential_ttl = Duration::from_secs(5)).is_err());
        assert!(check(&|t| t.external_urls = vec!["turn:turn.example.org".into()]).is_err());
        assert!(check(&|t| {
            t.external_urls = vec!["http://turn.example.org".into()];
            t.secret = Some("0123456789abcdef".into());
        })
        .is_err());
        assert!(check(&|t| {
            t.external_urls = vec!["turn:turn.example.org:3478?transport=udp".into()];
            t.external_secret = Some("0123456789abcdef".into());
        })
        .is_ok());
        // Disabled: its own settings do not matter.
        assert!(check(&|t| {
            t.enabled = false;
            t.relay_ports = (0, 0);
        })
        .is_ok());
    }
}
