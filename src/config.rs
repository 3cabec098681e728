//! Server configuration: every setting, its default and why.
//!
//! [`Config`] is built by the command line (`confab serve --help`, each flag
//! also readable from a `CONFAB_*` environment variable) or directly by tests.
//! [`Limits`] groups the bounds that protect the server from its clients;
//! `docs/protocol.md` lists the same values.

use std::net::SocketAddr;
use std::time::Duration;

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
    /// Dropped messages after which a flooding socket is closed (1008).
    pub max_rate_drops: u32,
    /// Members per room. 2 while only peer-to-peer exists.
    pub max_participants: usize,
    /// Outbound messages queued per socket before the client counts as not
    /// reading and is dropped.
    pub outbound_queue: usize,
    /// Simultaneous WebSocket connections; more get HTTP 503.
    pub max_connections: usize,
    /// Interval of server WebSocket pings.
    pub ping_interval: Duration,
    /// A socket silent this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024,
            join_timeout: Duration::from_secs(10),
            rate_per_sec: 50.0,
            rate_burst: 100.0,
            max_rate_drops: 200,
            max_participants: 2,
            outbound_queue: 256,
            max_connections: 1000,
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
        }
    }
}

/// The listen address when none is given.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7880";

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("constant address parses"),
            jwt_secret: None,
            insecure: false,
            ice_servers: Vec::new(),
            empty_room_timeout: Duration::from_secs(5),
            limits: Limits::default(),
        }
    }
}

impl Config {
    /// Dev mode: no secret, every join accepted.
    pub fn dev_mode(&self) -> bool {
        self.jwt_secret.is_none()
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
        if self.limits.max_message_bytes < 1024 {
            return Err("--max-message-bytes must be at least 1024".into());
        }
        if self.limits.max_participants < 2 {
            return Err("--max-participants must be at least 2".into());
        }
        if !(self.limits.rate_per_sec > 0.0 && self.limits.rate_burst >= 1.0) {
            return Err("--rate-per-sec must be > 0 and --rate-burst >= 1".into());
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
            ..Config::default()
        };
        assert!(c.validate().is_err());
        c.insecure = true;
        assert!(c.validate().is_ok());
        c.insecure = false;
        c.jwt_secret = Some("0123456789abcdef".into());
        assert!(c.validate().is_ok());
        assert!(Config::default().validate().is_ok());
    }
}
