//! The embedded STUN/TURN server (RFC 5389/5766 over UDP), so that calls
//! connect from networks that allow no direct path.
//!
//! The protocol is webrtc-rs's `turn` crate (its `server` module, version
//! pinned). Confab wraps the two kinds of socket the crate is given:
//!
//! - **the listening socket** (`Gate`): every datagram is inspected before
//!   the crate sees it. Undecodable datagrams are dropped. Requests with
//!   credentials are checked first: expired or wrongly signed credentials
//!   get 401, an allocation over the per-user or total quota gets 486, a
//!   permission or channel for a peer address the [`PeerPolicy`] refuses
//!   gets 403. Everything else goes to the crate unchanged.
//! - **each relay socket** (`RelayConn`, one per allocation, from the
//!   port range): counts relayed packets and bytes, drops traffic to and
//!   from refused peers (a second line behind the gate), and holds the
//!   allocation's quota slot until the allocation is gone.
//!
//! Credentials are the coturn REST scheme ([`credentials`]): nothing is
//! stored per user, and an external coturn with the same secret accepts the
//! same credentials.

pub mod credentials;
pub mod policy;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use stun::attributes::{
    ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM, ATTR_USERNAME, ATTR_XOR_PEER_ADDRESS,
};
use stun::error_code::{
    ErrorCode, ErrorCodeAttribute, CODE_ALLOC_QUOTA_REACHED, CODE_FORBIDDEN, CODE_UNAUTHORIZED,
};
use stun::integrity::MessageIntegrity;
use stun::message::{
    Getter as _, Message, MessageType, Setter, CLASS_ERROR_RESPONSE, CLASS_INDICATION,
    CLASS_REQUEST, METHOD_ALLOCATE, METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_REFRESH,
    METHOD_SEND,
};
use stun::textattrs::TextAttribute;
use tokio::net::UdpSocket;
use turn::proto::chandata::ChannelData;
use turn::proto::peeraddr::PeerAddress;
use webrtc_util::Conn;

use crate::metrics::Metrics;
use crate::signaling::protocol::IceServer;
pub use policy::PeerPolicy;

/// What `joined.ice_servers` holds: fixed entries (plain STUN URLs), and
/// TURN URLs that get a fresh time-limited credential per participant.
#[derive(Debug, Clone, Default)]
pub struct IceServerList {
    /// Handed out as they are.
    pub fixed: Vec<IceServer>,
    /// URLs and the secret their credentials are signed with.
    pub signed: Vec<(Vec<String>, Vec<u8>)>,
    /// Validity of the credentials.
    pub ttl: Duration,
}

impl IceServerList {
    /// The list for `participant`, with credentials valid from now.
    pub fn for_participant(&self, participant: &str) -> Vec<IceServer> {
        let now = SystemTime::now();
        let mut out = self.fixed.clone();
        for (urls, secret) in &self.signed {
            let c = credentials::issue(secret, participant, self.ttl, now);
            out.push(IceServer {
                urls: urls.clone(),
                username: Some(c.username),
                credential: Some(c.password),
            });
        }
        out
    }
}

/// Settings of the embedded server.
#[derive(Debug, Clone)]
pub struct TurnSettings {
    /// Address the listening socket binds (port 0: any free port).
    pub listen: SocketAddr,
    /// Address the relay sockets bind (their port comes from `relay_ports`).
    pub relay_bind: IpAddr,
    /// Address announced as the relayed address (1:1 NAT: the public IP).
    pub relay_public: IpAddr,
    /// Relay ports, inclusive.
    pub relay_ports: (u16, u16),
    /// The long-term credential realm.
    pub realm: String,
    /// Shared secret of the credentials.
    pub secret: Vec<u8>,
    /// Allocations one username may hold at once.
    pub user_quota: usize,
    /// Allocations the server holds at once.
    pub total_quota: usize,
    /// Which peers the relay may reach.
    pub policy: PeerPolicy,
}

/// State shared by the gate and the relay sockets.
struct Shared {
    settings: TurnSettings,
    metrics: Arc<Metrics>,
    /// Live allocations by username, and their total.
    allocations: Mutex<Quota>,
    /// The username of the Allocate request the crate is processing now.
    /// The crate handles the datagrams of one listening socket one at a
    /// time, in order (`turn` 0.17 `Server::read_loop`): the relay socket it
    /// asks for next belongs to the request the gate let through last.
    pending_user: Mutex<Option<String>>,
}

#[derive(Default)]
struct Quota {
    by_user: HashMap<String, usize>,
    total: usize,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("listen", &self.settings.listen)
            .finish_non_exhaustive()
    }
}

/// A running embedded STUN/TURN server.
pub struct TurnServer {
    server: turn::server::Server,
    local_addr: SocketAddr,
}

impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl TurnServer {
    /// Binds the listening socket and starts serving.
    pub async fn start(settings: TurnSettings, metrics: Arc<Metrics>) -> Result<Self, String> {
        let (lo, hi) = settings.relay_ports;
        if lo == 0 || hi < lo {
            return Err(format!("invalid TURN relay port range {lo}-{hi}"));
        }
        let socket = UdpSocket::bind(settings.listen)
            .await
            .map_err(|e| format!("cannot bind the TURN socket {}: {e}", settings.listen))?;
        let local_addr = socket
            .local_addr()
            .map_err(|e| format!("TURN socket address: {e}"))?;
        let realm = settings.realm.clone();
        let check = GateCheck::new(settings, metrics);
        let shared = Arc::clone(&check.shared);
        let auth = Arc::new(SecretAuth {
            secret: shared.settings.secret.clone(),
            realm: shared.settings.realm.clone(),
        });
        let gate = Arc::new(Gate { socket, check });
        let server = turn::server::Server::new(turn::server::config::ServerConfig {
            conn_configs: vec![turn::server::config::ConnConfig {
                conn: gate,
                relay_addr_generator: Box::new(RelayPorts { shared }),
            }],
            realm,
            auth_handler: auth,
            channel_bind_timeout: Duration::ZERO,
            alloc_close_notify: None,
        })
        .await
        .map_err(|e| format!("cannot start the TURN server: {e}"))?;
        Ok(TurnServer { server, local_addr })
    }

    /// The bound listening address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Closes every allocation and the listening socket.
    pub async fn close(&self) {
        let _ = self.server.close().await;
    }
}

/// The crate's key lookup: the long-term key of a username is derived
/// from the shared secret, nothing is stored. The gate has already answered
/// requests whose credentials fail (the crate would answer 400 where the
/// RFC and coturn say 401); this refuses them again all the same.
struct SecretAuth {
    secret: Vec<u8>,
    realm: String,
}

impl turn::auth::AuthHandler for SecretAuth {
    fn auth_handle(
        &self,
        username: &str,
        realm: &str,
        _src: SocketAddr,
    ) -> Result<Vec<u8>, turn::Error> {
        if realm != self.realm {
            return Err(turn::Error::Other("wrong realm".into()));
        }
        credentials::check_username(username, SystemTime::now())
            .map_err(|r| turn::Error::Other(format!("username refused: {r:?}")))?;
        let password = credentials::password(&self.secret, username);
        Ok(turn::auth::generate_auth_key(username, realm, &password))
    }
}

/// What the gate does with one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the crate.
    Pass,
    /// Answer it ourselves with these bytes (a STUN error response).
    Reply(Vec<u8>),
    /// Ignore it; the reason labels `confab_turn_dropped_datagrams_total`.
    Drop(&'static str),
}

/// The listening socket as the crate sees it.
struct Gate {
    socket: UdpSocket,
    check: GateCheck,
}

/// The gate's judgement of one datagram, without a socket: what the
/// listening socket decides before the `turn` crate sees anything
/// (public so that the fuzz targets drive exactly this code).
#[derive(Debug, Clone)]
pub struct GateCheck {
    shared: Arc<Shared>,
}

impl GateCheck {
    /// A gate with no allocations yet.
    pub fn new(settings: TurnSettings, metrics: Arc<Metrics>) -> GateCheck {
        GateCheck {
            shared: Arc::new(Shared {
                settings,
                metrics,
                allocations: Mutex::new(Quota::default()),
                pending_user: Mutex::new(None),
            }),
        }
    }

    /// Judges one datagram from a client (see the module documentation).
    pub fn inspect(&self, data: &[u8]) -> Verdict {
        if ChannelData::is_channel_data(data) {
            return Verdict::Pass;
        }
        if !stun::message::is_message(data) {
            return Verdict::Drop("malformed");
        }
        let mut m = Message::new();
        m.raw = data.to_vec();
        if m.decode().is_err() {
            return Verdict::Drop("malformed");
        }
        let method = m.typ.method;
        if m.typ.class == CLASS_INDICATION {
            if method == METHOD_SEND && !self.peer_allowed(&m) {
                return Verdict::Drop("forbidden_peer");
            }
            return Verdict::Pass;
        }
        if m.typ.class != CLASS_REQUEST {
            return Verdict::Drop("unexpected_class");
        }
        let authenticated = [
            METHOD_ALLOCATE,
            METHOD_REFRESH,
            METHOD_CREATE_PERMISSION,
            METHOD_CHANNEL_BIND,
        ]
        .contains(&method);
        if !authenticated || !m.contains(ATTR_MESSAGE_INTEGRITY) {
            // Binding requests (STUN), and the first, credential-less try of
            // a TURN request: the crate answers 401 with a nonce.
            return Verdict::Pass;
        }
        let key = match self.verify(&m) {
            Ok(key) => key,
            Err(reason) => {
                self.refused(reason);
                return self.reply(&m, CODE_UNAUTHORIZED, None, true);
            }
        };
        if method == METHOD_ALLOCATE {
            let username = text(&m, ATTR_USERNAME).unwrap_or_default();
            let over = {
                let q = lock(&self.shared.allocations);
                q.total >= self.shared.settings.total_quota
                    || q.by_user.get(&username).copied().unwrap_or(0)
                        >= self.shared.settings.user_quota
            };
            if over {
                self.refused("quota");
                return self.reply(&m, CODE_ALLOC_QUOTA_REACHED, Some(key), false);
            }
            *lock(&self.shared.pending_user) = Some(username);
        }
        if (method == METHOD_CREATE_PERMISSION || method == METHOD_CHANNEL_BIND)
            && !self.peer_allowed(&m)
        {
            self.refused("forbidden_peer");
            return self.reply(&m, CODE_FORBIDDEN, Some(key), false);
        }
        Verdict::Pass
    }

    /// Checks realm, username expiry and message integrity; returns the
    /// long-term key.
    fn verify(&self, m: &Message) -> Result<Vec<u8>, &'static str> {
        let settings = &self.shared.settings;
        let username = text(m, ATTR_USERNAME).ok_or("unauthorized")?;
        let realm = text(m, ATTR_REALM).ok_or("unauthorized")?;
        if text(m, ATTR_NONCE).is_none() || realm != settings.realm {
            return Err("unauthorized");
        }
        credentials::check_username(&username, SystemTime::now()).map_err(|r| match r {
            credentials::Refusal::Expired => "expired",
            credentials::Refusal::Malformed => "unauthorized",
        })?;
        let password = credentials::password(&settings.secret, &username);
        let integrity = MessageIntegrity::new_long_term_integrity(username, realm, password);
        let mut copy = Message::new();
        copy.raw = m.raw.clone();
        copy.decode().map_err(|_| "unauthorized")?;
        integrity.check(&mut copy).map_err(|_| "unauthorized")?;
        Ok(integrity.0)
    }

    /// Whether the message's peer address (the first XOR-PEER-ADDRESS,
    /// the one `turn` 0.17 acts on) is one the relay may reach: for a
    /// permission its IP, otherwise IP and port.
    fn peer_allowed(&self, m: &Message) -> bool {
        if !m.contains(ATTR_XOR_PEER_ADDRESS) {
            return true; // the crate refuses it
        }
        let mut peer = PeerAddress::default();
        match peer.get_from(m) {
            Ok(()) if m.typ.method == METHOD_CREATE_PERMISSION => {
                self.shared.settings.policy.allows_permission(peer.ip)
            }
            Ok(()) => self
                .shared
                .settings
                .policy
                .allows_addr(SocketAddr::new(peer.ip, peer.port)),
            Err(_) => true, // the crate refuses it
        }
    }

    fn refused(&self, reason: &str) {
        self.shared
            .metrics
            .turn_refused
            .with_label_values(&[reason])
            .inc();
    }

    /// An error response to `m`. A 401 carries the realm and the client's
    /// nonce; the others are signed with the client's key.
    fn reply(
        &self,
        m: &Message,
        code: ErrorCode,
        key: Option<Vec<u8>>,
        challenge: bool,
    ) -> Verdict {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(Message {
                transaction_id: m.transaction_id,
                ..Default::default()
            }),
            Box::new(MessageType::new(m.typ.method, CLASS_ERROR_RESPONSE)),
            Box::new(ErrorCodeAttribute {
                code,
                reason: Vec::new(),
            }),
        ];
        if challenge {
            setters.push(Box::new(TextAttribute::new(
                ATTR_REALM,
                self.shared.settings.realm.clone(),
            )));
            if let Some(nonce) = text(m, ATTR_NONCE) {
                setters.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce)));
            }
        }
        if let Some(key) = key {
            setters.push(Box::new(MessageIntegrity(key)));
        }
        let mut out = Message::new();
        match out.build(&setters) {
            Ok(()) => Verdict::Reply(out.raw),
            Err(_) => Verdict::Drop("unanswerable"),
        }
    }
}

fn text(m: &Message, attr: stun::attributes::AttrType) -> Option<String> {
    TextAttribute::get_from_as(m, attr).ok().map(|t| t.text)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait]
impl Conn for Gate {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(std::io::Error::other("the TURN socket is not connected").into())
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(std::io::Error::other("the TURN socket is not connected").into())
    }

    /// The next datagram for the crate; everything the gate answers or drops
    /// itself is consumed here. Errors are never returned: the crate's read
    /// loop ends on the first one, and nothing a client sends may end it.
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = match self.socket.recv_from(buf).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!("TURN socket receive error: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            match self.check.inspect(&buf[..n]) {
                Verdict::Pass => return Ok((n, from)),
                Verdict::Reply(bytes) => {
                    let _ = self.socket.send_to(&bytes, from).await;
                }
                Verdict::Drop(reason) => {
                    self.check
                        .shared
                        .metrics
                        .turn_dropped
                        .with_label_values(&[reason])
                        .inc();
                }
            }
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(std::io::Error::other("the TURN socket is not connected").into())
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// A no-op: the crate calls it on the listening socket whenever an
    /// allocation closes.
    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// Hands the crate one relay socket per allocation, from the port range.
struct RelayPorts {
    shared: Arc<Shared>,
}

#[async_trait]
impl turn::relay::RelayAddressGenerator for RelayPorts {
    fn validate(&self) -> Result<(), turn::Error> {
        Ok(())
    }

    async fn allocate_conn(
        &self,
        use_ipv4: bool,
        requested_port: u16,
    ) -> Result<(Arc<dyn Conn + Send + Sync>, SocketAddr), turn::Error> {
        let settings = &self.shared.settings;
        if use_ipv4 != settings.relay_bind.is_ipv4() {
            return Err(turn::Error::Other("address family not served".into()));
        }
        let (lo, hi) = settings.relay_ports;
        let span = u32::from(hi - lo) + 1;
        // Random start, then every port of the range once at most.
        let start = rand::random::<u32>() % span;
        let candidates: Box<dyn Iterator<Item = u16> + Send> = if requested_port != 0 {
            Box::new(std::iter::once(requested_port).filter(|p| (lo..=hi).contains(p)))
        } else {
            Box::new((0..span).map(move |i| lo + ((start + i) % span) as u16))
        };
        let mut socket = None;
        for port in candidates {
            if let Ok(s) = UdpSocket::bind(SocketAddr::new(settings.relay_bind, port)).await {
                socket = Some(s);
                break;
            }
        }
        let socket =
            socket.ok_or_else(|| turn::Error::Other("no free port in the relay range".into()))?;
        let port = socket.local_addr()?.port();
        let user = lock(&self.shared.pending_user).take().unwrap_or_default();
        {
            let mut q = lock(&self.shared.allocations);
            *q.by_user.entry(user.clone()).or_default() += 1;
            q.total += 1;
        }
        self.shared.metrics.turn_allocations.inc();
        self.shared.metrics.turn_allocations_total.inc();
        let conn = RelayConn {
            socket,
            shared: Arc::clone(&self.shared),
            slot: Mutex::new(Some(user)),
        };
        Ok((Arc::new(conn), SocketAddr::new(settings.relay_public, port)))
    }
}

/// One allocation's relay socket.
struct RelayConn {
    socket: UdpSocket,
    shared: Arc<Shared>,
    /// The username whose quota slot this allocation holds, until released.
    slot: Mutex<Option<String>>,
}

impl RelayConn {
    fn release(&self) {
        let Some(user) = lock(&self.slot).take() else {
            return;
        };
        let mut q = lock(&self.shared.allocations);
        if let Some(n) = q.by_user.get_mut(&user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                q.by_user.remove(&user);
            }
        }
        q.total = q.total.saturating_sub(1);
        self.shared.metrics.turn_allocations.dec();
    }

    fn count(&self, direction: &str, bytes: usize) {
        let m = &self.shared.metrics;
        m.turn_relayed_packets.with_label_values(&[direction]).inc();
        m.turn_relayed_bytes
            .with_label_values(&[direction])
            .inc_by(bytes as u64);
    }
}

impl Drop for RelayConn {
    fn drop(&mut self) {
        self.release();
    }
}

#[async_trait]
impl Conn for RelayConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(std::io::Error::other("relay sockets are not connected").into())
    }

    async fn recv(&self, _buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Err(std::io::Error::other("relay sockets are not connected").into())
    }

    /// The next datagram from a peer the policy admits. The crate drops the
    /// allocation on an error, so a closed allocation's socket is the only
    /// error returned.
    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            if lock(&self.slot).is_none() {
                return Err(std::io::Error::other("allocation closed").into());
            }
            match self.socket.recv_from(buf).await {
                Ok((n, from)) if self.shared.settings.policy.allows_addr(from) => {
                    self.count("from_peer", n);
                    return Ok((n, from));
                }
                Ok(_) => self
                    .shared
                    .metrics
                    .turn_dropped
                    .with_label_values(&["forbidden_peer"])
                    .inc(),
                Err(e) => {
                    tracing::debug!("TURN relay receive error: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn send(&self, _buf: &[u8]) -> webrtc_util::Result<usize> {
        Err(std::io::Error::other("relay sockets are not connected").into())
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if !self.shared.settings.policy.allows_addr(target) {
            self.shared
                .metrics
                .turn_dropped
                .with_label_values(&["forbidden_peer"])
                .inc();
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "peer address refused",
            )
            .into());
        }
        let n = self.socket.send_to(buf, target).await?;
        self.count("to_peer", n);
        Ok(n)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.release();
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}
