//! The embedded STUN/TURN server: an independent TURN client (coturn's
//! `turnutils_uclient`) allocates with valid credentials and is refused
//! with expired or forged ones; refusals carry the RFC codes (401, 486,
//! 403); a webrtc-rs pair forced to relay-only exchanges RTP through it; a
//! sweep of malformed datagrams neither stops it nor disturbs a relayed call.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use confab::turn_server::credentials;
use rand::{Rng, SeedableRng};
use stun::attributes::{ATTR_NONCE, ATTR_REALM, ATTR_USERNAME};
use stun::error_code::ErrorCodeAttribute;
use stun::integrity::MessageIntegrity;
use stun::message::{
    Getter as _, Message, MessageType, Setter, BINDING_REQUEST, CLASS_ERROR_RESPONSE,
    CLASS_INDICATION, CLASS_REQUEST, CLASS_SUCCESS_RESPONSE, METHOD_ALLOCATE, METHOD_CHANNEL_BIND,
    METHOD_CREATE_PERMISSION, METHOD_REFRESH, METHOD_SEND,
};
use stun::textattrs::TextAttribute;
use tokio::net::UdpSocket;
use turn::proto::chandata::ChannelData;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::PROTO_UDP;

use crate::common::{
    join, media_test_lock, metric_value, room_name, start_server_with, test_config, TestServer,
};
use crate::rtc_peer::{ice_servers_from_joined, Path, PeerConfig, RtcPeer};

const SECRET: &str = "turn-test-secret-0123456789";

fn config_with_secret() -> confab::config::Config {
    let mut cfg = test_config();
    cfg.turn.secret = Some(SECRET.into());
    cfg
}

fn metric(server: &TestServer, name: &str) -> f64 {
    metric_value(&server.metrics.render(), name).unwrap_or(0.0)
}

fn metric_labelled(server: &TestServer, name: &str, label: &str) -> f64 {
    let text = server.metrics.render();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------
// coturn's turnutils_uclient
// ---------------------------------------------------------------------------

/// A UDP echo peer on loopback for `count` datagrams at most, 30 s at most.
async fn echo_peer() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for _ in 0..10_000 {
            match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) => {
                    let _ = socket.send_to(&buf[..n], from).await;
                }
                _ => break,
            }
        }
    });
    addr
}

/// Runs `turnutils_uclient` against `turn` with `auth` arguments, sending
/// `messages` datagrams to the echo `peer` through the relay; returns its
/// output.
async fn uclient(turn: SocketAddr, peer: SocketAddr, auth: &[String], messages: u32) -> String {
    let mut args: Vec<String> = vec![
        "10".into(), // timeout(1)'s limit in seconds
        "turnutils_uclient".into(),
        "-c".into(), // no RTCP companion allocation
        "-m".into(),
        "1".into(),
        "-n".into(),
        messages.to_string(),
        "-z".into(),
        "5".into(),
        "-e".into(),
        peer.ip().to_string(),
        "-r".into(),
        peer.port().to_string(),
        "-p".into(),
        turn.port().to_string(),
    ];
    args.extend(auth.iter().cloned());
    args.push(turn.ip().to_string());
    let out = tokio::task::spawn_blocking(move || Command::new("timeout").args(&args).output())
        .await
        .unwrap()
        .unwrap_or_else(|e| {
            panic!("cannot run turnutils_uclient ({e}); run scripts/install-test-deps.sh")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("not found") || text.contains("uclient"),
        "turnutils_uclient is missing (scripts/install-test-deps.sh installs Debian's coturn): {text}"
    );
    text
}

/// The uclient relayed `n` messages to the echo peer and got all back.
fn relayed_all(output: &str, n: u32) -> bool {
    output.contains(&format!("tot_send_msgs={n}, tot_recv_msgs={n}"))
        && output.contains("Total lost packets 0 ")
}

#[tokio::test]
async fn an_independent_turn_client_allocates_only_with_valid_credentials() {
    let server = start_server_with(config_with_secret()).await;
    let turn = server.turn_addr.expect("the embedded TURN server runs");
    let peer = echo_peer().await;

    // coturn's own implementation of the REST scheme (`-W secret`): it makes
    // the time-limited username and its password itself.
    let out = uclient(
        turn,
        peer,
        &["-W".into(), SECRET.into(), "-u".into(), "p-uclient".into()],
        5,
    )
    .await;
    assert!(relayed_all(&out, 5), "valid REST credentials: {out}");
    assert!(metric(&server, "confab_turn_allocations_total") >= 1.0);
    assert!(
        metric_labelled(&server, "confab_turn_relayed_packets_total", "to_peer") >= 5.0,
        "{}",
        server.metrics.render()
    );

    // The credentials a join hands out work as they are.
    let (_ws, joined) = join(server.addr, &room_name("turn-cred"), "ada").await;
    let id = joined["participant_id"].as_str().unwrap();
    let entry = joined["ice_servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["urls"]
                .as_array()
                .is_some_and(|u| u.iter().any(|u| u.as_str().unwrap().starts_with("turn:")))
        })
        .unwrap_or_else(|| panic!("no TURN entry in {joined}"))
        .clone();
    let urls: Vec<&str> = entry["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert!(
        urls.contains(&format!("turn:{turn}?transport=udp").as_str()),
        "{urls:?}"
    );
    assert!(urls.contains(&format!("stun:{turn}").as_str()), "{urls:?}");
    let username = entry["username"].as_str().unwrap();
    let password = entry["credential"].as_str().unwrap();
    let (expiry, who) = username.split_once(':').unwrap();
    assert_eq!(who, id, "the username names the participant");
    let expiry: u64 = expiry.parse().unwrap();
    let ttl = expiry as i64 - unix_now() as i64;
    assert!(
        (6 * 3600 - 60..=6 * 3600 + 1).contains(&ttl),
        "expires in {ttl} s"
    );
    assert_eq!(password, credentials::password(SECRET.as_bytes(), username));
    let out = uclient(
        turn,
        peer,
        &["-u".into(), username.into(), "-w".into(), password.into()],
        3,
    )
    .await;
    assert!(relayed_all(&out, 3), "credentials from `joined`: {out}");

    // Expired: a correctly signed username whose time has passed.
    let old = format!("{}:{id}", unix_now() - 10);
    let expired_before = metric_labelled(&server, "confab_turn_refused_total", "expired");
    let out = uclient(
        turn,
        peer,
        &[
            "-u".into(),
            old.clone(),
            "-w".into(),
            credentials::password(SECRET.as_bytes(), &old),
        ],
        3,
    )
    .await;
    assert!(out.contains("Cannot complete Allocation"), "expired: {out}");
    assert!(!out.contains("tot_recv_msgs=3"), "expired: {out}");
    assert!(metric_labelled(&server, "confab_turn_refused_total", "expired") > expired_before);

    // Forged: a valid-looking username with a password of another secret.
    let forged = format!("{}:{id}", unix_now() + 3600);
    let unauthorized_before = metric_labelled(&server, "confab_turn_refused_total", "unauthorized");
    let out = uclient(
        turn,
        peer,
        &[
            "-u".into(),
            forged.clone(),
            "-w".into(),
            credentials::password(b"some-other-secret-0123", &forged),
        ],
        3,
    )
    .await;
    assert!(out.contains("Cannot complete Allocation"), "forged: {out}");
    assert!(!out.contains("tot_recv_msgs=3"), "forged: {out}");
    assert!(
        metric_labelled(&server, "confab_turn_refused_total", "unauthorized") > unauthorized_before
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// A minimal TURN client (webrtc-rs's stun/turn message types) for the codes
// ---------------------------------------------------------------------------

/// One client transport address talking to the TURN server.
struct TurnClient {
    socket: UdpSocket,
    server: SocketAddr,
    username: String,
    password: String,
    realm: String,
    nonce: Option<String>,
}

/// What came back for a request.
#[derive(Debug)]
struct Reply {
    class_error: bool,
    code: Option<u16>,
    message: Message,
}

impl TurnClient {
    async fn new(server: SocketAddr, username: &str, password: &str) -> TurnClient {
        TurnClient {
            socket: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
            username: username.into(),
            password: password.into(),
            realm: String::new(),
            nonce: None,
        }
    }

    fn signed(username: &str, secret: &str) -> (String, String) {
        (
            username.to_owned(),
            credentials::password(secret.as_bytes(), username),
        )
    }

    async fn send_raw(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.server).await.unwrap();
    }

    async fn recv(&self, within: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        match tokio::time::timeout(within, self.socket.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    /// Sends `method` with `attrs`, authenticated once the server gave a
    /// nonce (the first try of the session gets 401 and a nonce, and is
    /// repeated with credentials).
    async fn request(
        &mut self,
        method: stun::message::Method,
        attrs: Vec<Box<dyn Setter>>,
    ) -> Reply {
        let attrs: Vec<std::sync::Arc<dyn Setter>> =
            attrs.into_iter().map(std::sync::Arc::from).collect();
        for _ in 0..2 {
            let mut m = Message::new();
            let mut setters: Vec<Box<dyn Setter>> = vec![
                Box::new(stun::agent::TransactionId::new()),
                Box::new(MessageType::new(method, CLASS_REQUEST)),
            ];
            for a in &attrs {
                setters.push(Box::new(Shared(a.clone())));
            }
            if let Some(nonce) = &self.nonce {
                setters.push(Box::new(TextAttribute::new(
                    ATTR_USERNAME,
                    self.username.clone(),
                )));
                setters.push(Box::new(TextAttribute::new(ATTR_REALM, self.realm.clone())));
                setters.push(Box::new(TextAttribute::new(ATTR_NONCE, nonce.clone())));
                setters.push(Box::new(MessageIntegrity::new_long_term_integrity(
                    self.username.clone(),
                    self.realm.clone(),
                    self.password.clone(),
                )));
            }
            m.build(&setters).unwrap();
            self.send_raw(&m.raw).await;
            let reply = self
                .recv(Duration::from_secs(2))
                .await
                .expect("the TURN server answers");
            let mut r = Message::new();
            r.raw = reply;
            r.decode().expect("a well-formed reply");
            assert_eq!(r.transaction_id, m.transaction_id);
            let mut code = ErrorCodeAttribute::default();
            let code = code.get_from(&r).ok().map(|()| code.code.0);
            let first_try = self.nonce.is_none();
            if code == Some(401) && first_try {
                let nonce = TextAttribute::get_from_as(&r, ATTR_NONCE).expect("401 has a nonce");
                let realm = TextAttribute::get_from_as(&r, ATTR_REALM).expect("401 has a realm");
                self.nonce = Some(nonce.text);
                self.realm = realm.text;
                continue;
            }
            return Reply {
                class_error: r.typ.class == CLASS_ERROR_RESPONSE,
                code,
                message: r,
            };
        }
        unreachable!("two tries at most")
    }

    async fn allocate(&mut self) -> Reply {
        self.request(
            METHOD_ALLOCATE,
            vec![Box::new(RequestedTransport {
                protocol: PROTO_UDP,
            })],
        )
        .await
    }

    async fn create_permission(&mut self, peer: SocketAddr) -> Reply {
        self.request(
            METHOD_CREATE_PERMISSION,
            vec![Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            })],
        )
        .await
    }

    async fn release(&mut self) -> Reply {
        self.request(METHOD_REFRESH, vec![Box::new(Lifetime(Duration::ZERO))])
            .await
    }
}

/// A setter shared between the two tries of a request.
struct Shared(std::sync::Arc<dyn Setter>);

impl Setter for Shared {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        self.0.add_to(m)
    }
}

fn assert_success(r: &Reply, what: &str) {
    assert!(
        !r.class_error && r.message.typ.class == CLASS_SUCCESS_RESPONSE,
        "{what}: expected success, got code {:?}",
        r.code
    );
}

fn assert_code(r: &Reply, code: u16, what: &str) {
    assert!(r.class_error, "{what}: expected error {code}, got success");
    assert_eq!(r.code, Some(code), "{what}");
}

#[tokio::test]
async fn refusals_carry_401_486_and_403() {
    let mut cfg = config_with_secret();
    cfg.turn.user_quota = 2;
    cfg.turn.total_quota = 3;
    cfg.turn.allow_loopback = false; // production default
    let server = start_server_with(cfg).await;
    let turn = server.turn_addr.unwrap();
    let future = unix_now() + 600;

    // 401: expired, forged, wrong realm; each after the nonce round trip.
    let (user, pass) = TurnClient::signed(&format!("{}:p-old", unix_now() - 1), SECRET);
    let r = TurnClient::new(turn, &user, &pass).await.allocate().await;
    assert_code(&r, 401, "expired credential");
    let (user, _) = TurnClient::signed(&format!("{future}:p-forged"), SECRET);
    let r = TurnClient::new(turn, &user, "Zm9yZ2VkIHBhc3N3b3Jk")
        .await
        .allocate()
        .await;
    assert_code(&r, 401, "forged password");
    let (user, pass) = TurnClient::signed(&format!("{future}:p-nouser"), "another-secret-0123456");
    let r = TurnClient::new(turn, &user, &pass).await.allocate().await;
    assert_code(&r, 401, "signed with another secret");
    assert_eq!(metric(&server, "confab_turn_allocations"), 0.0);

    // 486: two allocations per user, three in all.
    let (a, a_pass) = TurnClient::signed(&format!("{future}:p-a"), SECRET);
    let (b, b_pass) = TurnClient::signed(&format!("{future}:p-b"), SECRET);
    let (c, c_pass) = TurnClient::signed(&format!("{future}:p-c"), SECRET);
    let mut a1 = TurnClient::new(turn, &a, &a_pass).await;
    let mut a2 = TurnClient::new(turn, &a, &a_pass).await;
    let mut a3 = TurnClient::new(turn, &a, &a_pass).await;
    assert_success(&a1.allocate().await, "a1");
    assert_success(&a2.allocate().await, "a2");
    assert_code(
        &a3.allocate().await,
        486,
        "a's third allocation (user quota)",
    );
    let mut b1 = TurnClient::new(turn, &b, &b_pass).await;
    assert_success(&b1.allocate().await, "b1");
    let mut c1 = TurnClient::new(turn, &c, &c_pass).await;
    assert_code(&c1.allocate().await, 486, "c's allocation (total quota)");
    assert_eq!(metric(&server, "confab_turn_allocations"), 3.0);
    assert_eq!(
        metric_labelled(&server, "confab_turn_refused_total", "quota"),
        2.0
    );

    // Releasing an allocation frees its slot.
    assert_success(&a1.release().await, "a1 refresh lifetime 0");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(metric(&server, "confab_turn_allocations"), 2.0);
    assert_success(&a3.allocate().await, "a3 after a1 released");

    // 403: internal peers, loopback included without the development setting.
    for peer in [
        "127.0.0.2:9",
        "10.0.0.7:5000",
        "169.254.169.254:80",
        "192.168.1.1:5000",
        "[::ffff:127.0.0.2]:9",
    ] {
        let r = a2.create_permission(peer.parse().unwrap()).await;
        assert_code(&r, 403, peer);
    }
    let mut channel = 0x4000;
    let mut bind = |peer: SocketAddr| {
        channel += 1;
        let attrs: Vec<Box<dyn Setter>> = vec![
            Box::new(ChannelNumber(channel)),
            Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            }),
        ];
        attrs
    };
    let r = a2
        .request(METHOD_CHANNEL_BIND, bind("10.1.1.1:1".parse().unwrap()))
        .await;
    assert_code(&r, 403, "channel bind to a private peer");
    // The one exception: the server's own SFU address, exactly (here on
    // loopback), which relay-only clients need for their server leg.
    let r = a2
        .request(METHOD_CHANNEL_BIND, bind(server.media_addr))
        .await;
    assert_success(&r, "channel bind to the SFU's media address");
    let other_port = SocketAddr::new(server.media_addr.ip(), 9);
    let r = a2.request(METHOD_CHANNEL_BIND, bind(other_port)).await;
    assert_code(&r, 403, "channel bind to another port of the SFU's IP");
    // A public peer is fine (a permission sends nothing).
    assert_success(
        &a2.create_permission("192.0.43.10:5000".parse().unwrap())
            .await,
        "public peer",
    );
    assert_eq!(
        metric_labelled(&server, "confab_turn_refused_total", "forbidden_peer"),
        7.0
    );

    // A Send indication to an internal address is dropped: nothing relayed,
    // although the channel to the SFU installed a permission for its IP.
    let mut send = Message::new();
    let setters: Vec<Box<dyn Setter>> = vec![
        Box::new(stun::agent::TransactionId::new()),
        Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
        Box::new(PeerAddress {
            ip: other_port.ip(),
            port: other_port.port(),
        }),
        Box::new(Data(b"hello".to_vec())),
    ];
    send.build(&setters).unwrap();
    a2.send_raw(&send.raw).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        metric_labelled(&server, "confab_turn_relayed_packets_total", "to_peer"),
        0.0
    );

    // STUN: a binding request is answered with the mapped address.
    let mut bind = Message::new();
    let setters: Vec<Box<dyn Setter>> = vec![
        Box::new(stun::agent::TransactionId::new()),
        Box::new(BINDING_REQUEST),
    ];
    bind.build(&setters).unwrap();
    a2.send_raw(&bind.raw).await;
    let reply = a2
        .recv(Duration::from_secs(2))
        .await
        .expect("binding response");
    let mut m = Message::new();
    m.raw = reply;
    m.decode().unwrap();
    let mut mapped = stun::xoraddr::XorMappedAddress::default();
    mapped.get_from(&m).unwrap();
    assert_eq!(
        SocketAddr::new(mapped.ip, mapped.port),
        a2.socket.local_addr().unwrap()
    );
    server.shutdown().await;
}

/// Round trips to a UDP echo peer, direct and through a TURN allocation
/// (ChannelData both ways): what the relay adds on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_round_trips_measure_the_added_delay() {
    let _serial = media_test_lock().await;
    let server = start_server_with(config_with_secret()).await;
    let turn = server.turn_addr.unwrap();
    let peer = echo_peer().await;
    let (user, pass) = TurnClient::signed(&format!("{}:p-rtt", unix_now() + 600), SECRET);
    let mut client = TurnClient::new(turn, &user, &pass).await;
    let r = client.allocate().await;
    assert_success(&r, "allocate");
    let mut relayed = turn::proto::relayaddr::RelayedAddress::default();
    relayed.get_from(&r.message).unwrap();
    assert_eq!(relayed.ip, turn.ip());
    let channel = ChannelNumber(0x4000);
    let r = client
        .request(
            METHOD_CHANNEL_BIND,
            vec![
                Box::new(channel),
                Box::new(PeerAddress {
                    ip: peer.ip(),
                    port: peer.port(),
                }),
            ],
        )
        .await;
    assert_success(&r, "channel bind");

    const ROUNDS: usize = 300;
    let payload = vec![0x5a; 1000];
    let direct = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut via_host = Vec::with_capacity(ROUNDS);
    let mut via_relay = Vec::with_capacity(ROUNDS);
    let mut buf = vec![0u8; 2048];
    for _ in 0..ROUNDS {
        let t = Instant::now();
        direct.send_to(&payload, peer).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(1), direct.recv_from(&mut buf))
            .await
            .expect("direct echo")
            .unwrap();
        via_host.push(t.elapsed());
        assert_eq!(n, payload.len());

        let mut cd = ChannelData {
            data: payload.clone(),
            number: channel,
            raw: vec![],
        };
        cd.encode();
        let t = Instant::now();
        client.send_raw(&cd.raw).await;
        let back = client
            .recv(Duration::from_secs(1))
            .await
            .expect("the echo comes back through the relay");
        via_relay.push(t.elapsed());
        let mut got = ChannelData {
            raw: back,
            ..Default::default()
        };
        got.decode().expect("ChannelData from the relay");
        assert_eq!(
            (got.number, got.data.as_slice()),
            (channel, payload.as_slice())
        );
    }
    via_host.sort();
    via_relay.sort();
    let (h50, r50) = (percentile(&via_host, 0.5), percentile(&via_relay, 0.5));
    let (h99, r99) = (percentile(&via_host, 0.99), percentile(&via_relay, 0.99));
    println!(
        "relay round trips ({ROUNDS} x {} B, ChannelData): median {r50:?} p99 {r99:?}; direct: \
         median {h50:?} p99 {h99:?}; added per round trip (two relay passes): median {:?}, \
         i.e. about {:?} per relayed packet",
        payload.len(),
        r50.saturating_sub(h50),
        r50.saturating_sub(h50) / 2
    );
    assert!(
        metric_labelled(&server, "confab_turn_relayed_packets_total", "to_peer") >= ROUNDS as f64
    );
    assert!(
        r50 < Duration::from_millis(20),
        "median relayed round trip {r50:?}"
    );
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// webrtc-rs clients forced to relay
// ---------------------------------------------------------------------------

/// Packets per side in a relayed exchange.
const PACKETS: u32 = 200;
const INTERVAL: Duration = Duration::from_millis(10);
const PAYLOAD_LEN: usize = 1000;

/// Two members in a room; with `relay`, both use only relay candidates
/// from the credentials of their `joined`.
struct Pair {
    alice: RtcPeer,
    bob: RtcPeer,
    signaling: Vec<crate::rtc_peer::SignalingHandle>,
}

async fn pair(server: &TestServer, relay: bool, prefix: &str) -> Pair {
    let room = room_name(prefix);
    let (alice_ws, alice_joined) = join(server.addr, &room, "alice").await;
    let mut config = PeerConfig::video("alice");
    if relay {
        config = config.relay_only(ice_servers_from_joined(&alice_joined));
    }
    let alice = RtcPeer::new(config).await.expect("alice's peer connection");
    let (tx, rx) = alice_ws.into_split();
    let alice_sig = alice.start_signaling(&alice_joined, tx, rx);

    let (bob_ws, bob_joined) = join(server.addr, &room, "bob").await;
    let mut config = PeerConfig::video("bob");
    if relay {
        config = config.relay_only(ice_servers_from_joined(&bob_joined));
    }
    let bob = RtcPeer::new(config).await.expect("bob's peer connection");
    let (tx, rx) = bob_ws.into_split();
    let bob_sig = bob.start_signaling(&bob_joined, tx, rx);
    Pair {
        alice,
        bob,
        signaling: vec![alice_sig, bob_sig],
    }
}

impl Pair {
    async fn close(self) {
        for s in self.signaling {
            s.stop().await;
        }
        self.alice.close().await;
        self.bob.close().await;
    }

    /// Both direct legs connected; their selected pairs (alice's, bob's).
    async fn connected(&self) -> (crate::rtc_peer::SelectedPair, crate::rtc_peer::SelectedPair) {
        let (a, b) = tokio::join!(
            self.alice.wait_direct_connected(Duration::from_secs(15)),
            self.bob.wait_direct_connected(Duration::from_secs(15)),
        );
        let (a, b) = match (a, b) {
            (Ok(a), Ok(b)) => (a, b),
            (a, b) => panic!(
                "direct legs not connected: alice {:?}, bob {:?}\n{}",
                a.err(),
                b.err(),
                self.timelines()
            ),
        };
        let a = a
            .selected_pair()
            .await
            .unwrap()
            .expect("alice's selected pair");
        let b = b
            .selected_pair()
            .await
            .unwrap()
            .expect("bob's selected pair");
        (a, b)
    }

    fn timelines(&self) -> String {
        let since = Instant::now() - Duration::from_secs(60);
        let mut out = String::new();
        for p in [&self.alice, &self.bob] {
            out.push_str(&format!("--- {} ---\n", p.name));
            for line in p.timeline(since) {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }

    /// Sends one packet each way and waits until it surfaced the remote track
    /// on the other side. Through a TURN relay, webrtc-rs 0.21.1 opens the
    /// remote track on the first RTP packet but does not hand that packet to
    /// the track's reader (the relay did deliver it: its counters show the
    /// datagram relayed both ways); on host candidates it does. The
    /// measured packets come after this one.
    async fn warm_up(&self) {
        let (a, b) = tokio::join!(
            self.alice.send_numbered(1, INTERVAL, PAYLOAD_LEN),
            self.bob.send_numbered(1, INTERVAL, PAYLOAD_LEN),
        );
        assert_eq!((a[0].on_direct, b[0].on_direct), (1, 1));
        for peer in [&self.alice, &self.bob] {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !peer.received().iter().any(|t| t.path == Path::Direct) {
                assert!(
                    Instant::now() < deadline,
                    "{}: no remote track on the direct leg\n{}",
                    peer.name,
                    self.timelines()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Sends `PACKETS` each way at once and checks that every one arrived,
    /// in order, on the direct leg; returns the one-way delays (both ways).
    async fn exchange(&self) -> Vec<Duration> {
        let (a_sent, b_sent) = tokio::join!(
            self.alice.send_numbered(PACKETS, INTERVAL, PAYLOAD_LEN),
            self.bob.send_numbered(PACKETS, INTERVAL, PAYLOAD_LEN),
        );
        let mut delays = Vec::new();
        for (from, to, sent) in [
            (&self.alice, &self.bob, &a_sent[0]),
            (&self.bob, &self.alice, &b_sent[0]),
        ] {
            assert!(sent.errors.is_empty(), "{:?}", sent.errors);
            assert_eq!(sent.on_direct, PACKETS);
            let tag = from.video().unwrap().tag;
            if let Err(e) = to
                .wait_rendered(tag, sent.end() - 1, Duration::from_secs(5))
                .await
            {
                panic!("{} -> {}: {e}\n{}", from.name, to.name, self.timelines());
            }
            let mut track = to
                .received()
                .into_iter()
                .find(|t| t.path == Path::Direct && t.tags() == vec![tag])
                .expect("a direct track");
            // The warm-up packet, if the path delivered it.
            track.packets.retain(|p| p.counter >= sent.first_counter);
            track
                .check_exact(tag, sent.counters())
                .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.name, to.name));
            let sent_at: std::collections::HashMap<u32, Instant> = from
                .video()
                .unwrap()
                .sent()
                .into_iter()
                .map(|r| (r.counter, r.at))
                .collect();
            for p in &track.packets {
                if let Some(at) = sent_at.get(&p.counter) {
                    delays.push(p.at.saturating_duration_since(*at));
                }
            }
        }
        delays
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_webrtc_peers_exchange_rtp_through_the_embedded_turn() {
    let _serial = media_test_lock().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let server = start_server_with(test_config()).await;
        let turn = server.turn_addr.unwrap();
        let (lo, hi) = confab::config::DEFAULT_TURN_RELAY_PORTS;

        let relayed = pair(&server, true, "turn-relay").await;
        let (a, b) = relayed.connected().await;
        for (name, p) in [("alice", &a), ("bob", &b)] {
            assert_eq!(p.local_type, "relay", "{name}: {p:?}");
            assert_eq!(p.remote_type, "relay", "{name}: {p:?}");
            assert!((lo..=hi).contains(&p.local.port()), "{name}: relayed port {p:?}");
            assert_eq!(p.local.ip(), turn.ip());
        }
        assert_eq!(a.remote, b.local, "alice sends to bob's relayed address");
        assert_eq!(b.remote, a.local, "bob sends to alice's relayed address");
        // Both server legs came up through the relay too.
        for peer in [&relayed.alice, &relayed.bob] {
            peer.server_leg()
                .wait_connected(Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("{}: server leg: {e}", peer.name));
            let s = peer.server_leg().selected_pair().await.unwrap().unwrap();
            assert_eq!(s.local_type, "relay", "{}'s server leg: {s:?}", peer.name);
            assert_eq!(s.remote, server.media_addr, "{}'s server leg: {s:?}", peer.name);
        }
        relayed.warm_up().await;
        let relayed_before = metric(&server, "confab_turn_relayed_packets_total");
        let mut via_relay = relayed.exchange().await;
        let relayed_packets = metric(&server, "confab_turn_relayed_packets_total") - relayed_before;
        // Each RTP packet crosses the server twice (alice's allocation to
        // bob's relayed address, then bob's allocation to bob).
        assert!(
            relayed_packets >= f64::from(4 * PACKETS),
            "the relay counted {relayed_packets} datagrams for {} RTP packets",
            2 * PACKETS
        );
        relayed.close().await;

        // The same exchange on host candidates, for the relay's added delay.
        let direct = pair(&server, false, "turn-direct").await;
        let (a, _) = direct.connected().await;
        assert_eq!(a.local_type, "host");
        direct.warm_up().await;
        let mut via_host = direct.exchange().await;
        direct.close().await;

        via_relay.sort();
        via_host.sort();
        let (r50, r95) = (percentile(&via_relay, 0.5), percentile(&via_relay, 0.95));
        let (h50, h95) = (percentile(&via_host, 0.5), percentile(&via_host, 0.95));
        println!(
            "relay-only webrtc-rs call through the embedded TURN ({turn}): {} RTP packets each way, \
             {relayed_packets} datagrams relayed; one-way delay median {r50:?} p95 {r95:?} \
             (host candidates: median {h50:?} p95 {h95:?}); added by the relay: median {:?}",
            PACKETS,
            r50.saturating_sub(h50)
        );
        assert!(
            r50 < Duration::from_millis(50),
            "relayed median one-way delay {r50:?} on loopback"
        );
        server.shutdown().await;
    })
    .await
    .expect("the relay scenario finished within 60 s");
}

// ---------------------------------------------------------------------------
// Malformed datagrams
// ---------------------------------------------------------------------------

/// Valid TURN messages of every kind the sweep mangles.
fn sample_messages() -> Vec<Vec<u8>> {
    let future = unix_now() + 600;
    let (user, pass) = TurnClient::signed(&format!("{future}:p-sweep"), SECRET);
    let auth = |m: &mut Vec<Box<dyn Setter>>| {
        m.push(Box::new(TextAttribute::new(ATTR_USERNAME, user.clone())));
        m.push(Box::new(TextAttribute::new(ATTR_REALM, "confab".into())));
        m.push(Box::new(TextAttribute::new(
            ATTR_NONCE,
            "0123456789abcdef".into(),
        )));
        m.push(Box::new(MessageIntegrity::new_long_term_integrity(
            user.clone(),
            "confab".into(),
            pass.clone(),
        )));
    };
    let peer = PeerAddress {
        ip: "127.0.0.1".parse().unwrap(),
        port: 9,
    };
    let mut out = Vec::new();
    for (method, class) in [
        (METHOD_ALLOCATE, CLASS_REQUEST),
        (METHOD_REFRESH, CLASS_REQUEST),
        (METHOD_CREATE_PERMISSION, CLASS_REQUEST),
        (METHOD_CHANNEL_BIND, CLASS_REQUEST),
        (METHOD_SEND, CLASS_INDICATION),
        (stun::message::METHOD_BINDING, CLASS_REQUEST),
    ] {
        let mut setters: Vec<Box<dyn Setter>> = vec![
            Box::new(stun::agent::TransactionId::new()),
            Box::new(MessageType::new(method, class)),
            Box::new(RequestedTransport {
                protocol: PROTO_UDP,
            }),
            Box::new(PeerAddress {
                ip: peer.ip,
                port: peer.port,
            }),
            Box::new(ChannelNumber(0x4000)),
            Box::new(Data(vec![7; 40])),
        ];
        if class == CLASS_REQUEST {
            auth(&mut setters);
        }
        let mut m = Message::new();
        m.build(&setters).unwrap();
        out.push(m.raw);
    }
    let mut cd = ChannelData {
        data: vec![1; 60],
        number: ChannelNumber(0x4000),
        raw: vec![],
    };
    cd.encode();
    out.push(cd.raw);
    out
}

/// `count` hostile datagrams: random bytes, every truncation of every
/// sample message, samples with flipped bits and with a forged length or
/// attribute length. Deterministic (seeded).
fn hostile_datagrams(count: usize) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7475726e);
    let samples = sample_messages();
    let mut out = Vec::with_capacity(count);
    for s in &samples {
        for len in 0..s.len() {
            out.push(s[..len].to_vec());
        }
    }
    while out.len() < count {
        let s = &samples[rng.random_range(0..samples.len())];
        let mut d = s.clone();
        match rng.random_range(0..5) {
            0 => {
                let len = rng.random_range(0..1600);
                d = (0..len).map(|_| rng.random()).collect();
            }
            1 => {
                for _ in 0..rng.random_range(1..8) {
                    let i = rng.random_range(0..d.len());
                    d[i] ^= 1 << rng.random_range(0..8);
                }
            }
            2 if d.len() >= 4 => {
                // The message (or channel data) length field.
                let v: u16 = rng.random();
                d[2..4].copy_from_slice(&v.to_be_bytes());
            }
            3 if d.len() > 24 => {
                // An attribute length somewhere in the body.
                let i = 20 + 4 * rng.random_range(0..(d.len() - 20) / 4);
                if i + 4 <= d.len() {
                    let v: u16 = rng.random();
                    d[i + 2..i + 4].copy_from_slice(&v.to_be_bytes());
                }
            }
            _ => {
                // A valid header in front of random attributes.
                d.truncate(20);
                let body: Vec<u8> = (0..rng.random_range(0..200))
                    .map(|_| rng.random())
                    .collect();
                d[2..4].copy_from_slice(&(body.len() as u16).to_be_bytes());
                d.extend(body);
            }
        }
        out.push(d);
    }
    out.truncate(count);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_datagrams_neither_crash_the_server_nor_disturb_a_relayed_call() {
    let _serial = media_test_lock().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        let server = start_server_with(config_with_secret()).await;
        let turn = server.turn_addr.unwrap();
        let relayed = pair(&server, true, "turn-sweep").await;
        let (a, b) = relayed.connected().await;
        assert_eq!(
            (a.local_type.as_str(), b.local_type.as_str()),
            ("relay", "relay")
        );

        // The call streams while the sweep runs.
        relayed.warm_up().await;
        let alice_stream = relayed.alice.start_streaming(INTERVAL, PAYLOAD_LEN);
        let bob_stream = relayed.bob.start_streaming(INTERVAL, PAYLOAD_LEN);
        tokio::time::sleep(Duration::from_millis(300)).await;

        let datagrams = hostile_datagrams(5_000);
        let senders = [
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        ];
        let started = Instant::now();
        for (i, d) in datagrams.iter().enumerate() {
            let s = &senders[i % senders.len()];
            // Most to the TURN port; some at the relayed addresses, as an
            // outside peer without permission would.
            let target = match i % 10 {
                0 => a.local,
                1 => b.local,
                _ => turn,
            };
            s.send_to(d, target).await.unwrap();
            if i % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let sweep = started.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let a_sent = alice_stream.stop().await;
        let b_sent = bob_stream.stop().await;

        for (from, to, sent) in [
            (&relayed.alice, &relayed.bob, &a_sent[0]),
            (&relayed.bob, &relayed.alice, &b_sent[0]),
        ] {
            let tag = from.video().unwrap().tag;
            to.wait_rendered(tag, sent.end() - 1, Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| panic!("{} -> {}: {e}", from.name, to.name));
            let stream = to.stream(tag).unwrap();
            stream
                .check_continuous(sent.counters())
                .unwrap_or_else(|e| panic!("{} -> {} during the sweep: {e}", from.name, to.name));
        }
        let dropped = metric(&server, "confab_turn_dropped_datagrams_total");
        println!(
            "malformed sweep: {} datagrams in {sweep:?} ({} dropped as malformed or unexpected); \
             the relayed call delivered {} + {} packets without a gap",
            datagrams.len(),
            dropped,
            a_sent[0].count,
            b_sent[0].count
        );
        assert!(dropped > 0.0, "the gate saw the malformed datagrams");

        // The server still serves: a fresh allocation works.
        let (user, pass) = TurnClient::signed(&format!("{}:p-after", unix_now() + 600), SECRET);
        assert_success(
            &TurnClient::new(turn, &user, &pass).await.allocate().await,
            "after the sweep",
        );
        relayed.close().await;
        server.shutdown().await;
    })
    .await
    .expect("the sweep scenario finished within 60 s");
}
