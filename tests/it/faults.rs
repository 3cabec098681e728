//! Faults and resources: what happens to a call, and to the server, when a
//! participant's network dies under a live signaling socket, when the
//! server panics while handling one participant, when a participant is
//! killed, and after many joins and leaves. Each test prints the figure it
//! measured.
//!
//! The media scenarios use the webrtc-rs clients of `rtc_peer` (one packet
//! every 20 ms per source); a "gap" is the longest time between two packets
//! a receiver rendered of one stream. Resource figures come from the
//! server's `/metrics` (`confab_tasks`, `confab_server_legs`,
//! `confab_media_routes`, ...) and, for a spawned `confab` process, from
//! `/proc/<pid>`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{
    join, media_test_lock, metric_value, room_name, start_server_with, test_config, Event,
    WsClient, PROTOCOL_VERSION, STEP,
};
use crate::lossy_proxy::{LossyProxy, Towards};
use crate::rtc_peer::{Path, PeerConfig, RtcPeer, SignalingHandle, Streamer, VIDEO_PAYLOAD_TYPE};

/// One packet per source this often.
const INTERVAL: Duration = Duration::from_millis(20);
/// RTP payload size.
const PAYLOAD_LEN: usize = 1000;
/// Bound on reaching a mode or a rendering state.
const SETTLE: Duration = Duration::from_secs(10);
/// The longest tolerated pause in a surviving stream.
const MAX_GAP: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A member of the call.
struct Member {
    peer: RtcPeer,
    sig: Option<SignalingHandle>,
    id: String,
    streamer: Option<Streamer>,
}

impl Member {
    fn sig(&self) -> &SignalingHandle {
        self.sig.as_ref().expect("signaling running")
    }

    fn tags(&self) -> Vec<u32> {
        self.peer
            .video()
            .iter()
            .chain(self.peer.audio().iter())
            .map(|s| s.tag)
            .collect()
    }

    async fn close(mut self) {
        if let Some(s) = self.streamer.take() {
            s.stop().await;
        }
        if let Some(sig) = self.sig.take() {
            sig.stop().await;
        }
        self.peer.close().await;
    }
}

/// Builds the client, joins `room` on the server at `addr`, starts
/// signaling and streaming.
async fn join_member(addr: SocketAddr, room: &str, config: PeerConfig) -> Member {
    let name = config.name.clone();
    let peer = RtcPeer::new(config)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let (ws, joined) = join(addr, room, &name).await;
    let id = joined["participant_id"].as_str().unwrap().to_owned();
    let (tx, rx) = ws.into_split();
    let sig = peer.start_signaling(&joined, tx, rx);
    let streamer = Some(peer.start_streaming(INTERVAL, PAYLOAD_LEN));
    Member {
        peer,
        sig: Some(sig),
        id,
        streamer,
    }
}

/// Waits until every member of `members` is in `sfu` and renders every
/// other member's streams from the server.
async fn wait_all_via_server(members: &[&Member]) {
    for m in members {
        m.peer
            .wait_mode("sfu", 0, SETTLE)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", m.peer.name));
    }
    for r in members {
        let tags: Vec<u32> = members
            .iter()
            .filter(|s| s.id != r.id)
            .flat_map(|s| s.tags())
            .collect();
        r.peer
            .wait_rendering(&tags, Path::Server, SETTLE)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", r.peer.name));
    }
}

/// The longest pause between two packets rendered at any of `receivers`
/// of any stream of `senders` in `from..to` (also from `from` to the first
/// and from the last to `to`), with the pair it happened on.
fn max_gap(
    receivers: &[&Member],
    senders: &[&Member],
    from: Instant,
    to: Instant,
) -> (Duration, String) {
    let mut worst = (Duration::ZERO, String::new());
    for r in receivers {
        for s in senders.iter().filter(|s| s.id != r.id) {
            for tag in s.tags() {
                let stream = r.peer.stream(tag).unwrap_or_else(|| {
                    panic!("{} never got {}'s {tag:#x}", r.peer.name, s.peer.name)
                });
                let mut last = from;
                for at in stream
                    .rendered
                    .iter()
                    .map(|x| x.at)
                    .filter(|at| *at >= from && *at <= to)
                    .chain(std::iter::once(to))
                {
                    let gap = at.saturating_duration_since(last);
                    if gap > worst.0 {
                        worst = (gap, format!("{} <- {} {tag:#x}", r.peer.name, s.peer.name));
                    }
                    last = at;
                }
            }
        }
    }
    worst
}

/// Runs a media scenario alone (see `media_test_lock`) within 90 s.
async fn run_scenario(what: &str, scenario: impl std::future::Future<Output = ()>) {
    let _serial = media_test_lock().await;
    tokio::time::timeout(Duration::from_secs(90), scenario)
        .await
        .unwrap_or_else(|_| panic!("the {what} did not finish within 90 s"));
}

/// A `confab serve` process on loopback with ephemeral ports, every room
/// server-routed; killed when dropped.
struct Spawned {
    child: Child,
    http: SocketAddr,
}

impl Spawned {
    fn start(extra: &[&str]) -> Spawned {
        let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--media-port",
                "0",
                "--turn-port",
                "0",
                "--never-p2p",
            ])
            .args(extra)
            .env("CONFAB_LOG", "warn")
            .env_remove("CONFAB_JWT_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("confab starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut http = None;
        for line in lines.by_ref().take(10) {
            let line = line.unwrap();
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                http = url
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .parse()
                    .ok();
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let http = http.expect("the server printed its address");
        Spawned { child, http }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn rss(&self) -> u64 {
        confab::load::probe::rss_bytes(self.pid()).expect("RSS readable")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server's `/metrics` text.
async fn scrape(http: SocketAddr) -> String {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(STEP, fetch)
        .await
        .ok()
        .flatten()
        .expect("/metrics answers")
}

/// The resource gauges compared against a baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Resources {
    tasks: i64,
    legs: i64,
    participants: i64,
    rooms: i64,
    routes: i64,
}

fn resources(text: &str) -> Resources {
    let g = |name: &str| {
        metric_value(text, name).unwrap_or_else(|| panic!("no {name} in /metrics")) as i64
    };
    Resources {
        tasks: g("confab_tasks"),
        legs: g("confab_server_legs"),
        participants: g("confab_participants"),
        rooms: g("confab_rooms"),
        routes: g("confab_media_routes"),
    }
}

/// Polls `/metrics` until the resources equal `want` (the task count may
/// also be lower); returns when, or the last reading after `within`.
async fn wait_resources(
    http: SocketAddr,
    want: Resources,
    within: Duration,
) -> Result<Duration, Resources> {
    let start = Instant::now();
    loop {
        let now = resources(&scrape(http).await);
        let tasks_ok = now.tasks <= want.tasks;
        if tasks_ok
            && (Resources {
                tasks: want.tasks,
                ..now
            }) == want
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= within {
            return Err(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. Media-only death
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_only_death_fails_the_leg_within_15_s_and_keeps_the_member() {
    run_scenario("media-only death scenario", media_only_death()).await;
}

/// a, b and c stream through the server; c's server leg runs through a
/// relay that then drops everything both ways while c's WebSocket stays
/// open. The server must close c's leg as failed within 15 s, tell the
/// room (`server_leg` failed, to c too), retire c's tracks at a and b with
/// a new offer, keep c in the room, and a and b must not notice.
async fn media_only_death() {
    let mut cfg = test_config();
    cfg.mode_policy.never_p2p = true;
    let server = start_server_with(cfg).await;
    let proxy = LossyProxy::start_towards(
        server.media_addr,
        0.0,
        1,
        VIDEO_PAYLOAD_TYPE,
        Towards::Client,
    )
    .await;
    let room = room_name("fault-silent");
    let members = vec![
        join_member(server.addr, &room, PeerConfig::video("a").with_audio()).await,
        join_member(server.addr, &room, PeerConfig::video("b").with_audio()).await,
        join_member(
            server.addr,
            &room,
            PeerConfig::video("c")
                .with_audio()
                .server_media_via(server.media_addr, proxy.addr),
        )
        .await,
    ];
    let all: Vec<&Member> = members.iter().collect();
    wait_all_via_server(&all).await;
    let (a, b, c) = (all[0], all[1], all[2]);
    let offers_before: Vec<usize> = [a, b]
        .iter()
        .map(|m| m.sig().log().server_offers.len())
        .collect();
    assert_eq!(server.metrics.legs.get(), 3);

    let dead_at = Instant::now();
    proxy.blackhole(true);
    let mut detected = Vec::new();
    for m in [a, b, c] {
        let log = m
            .sig()
            .wait_log(Duration::from_secs(20), |l| {
                l.server_leg_at(&c.id, "failed").is_some()
            })
            .await
            .unwrap_or_else(|l| {
                panic!(
                    "{}: no server_leg failed for c within 20 s: {:?}",
                    m.peer.name, l.server_legs
                )
            });
        detected.push(log.server_leg_at(&c.id, "failed").unwrap() - dead_at);
    }
    let detection = *detected.iter().max().unwrap();
    assert!(
        detection <= Duration::from_secs(15),
        "c's leg failed {detection:?} after its network died"
    );
    assert_eq!(server.metrics.legs.get(), 2, "c's leg is closed");
    assert_eq!(
        server
            .metrics
            .legs_failed
            .with_label_values(&["silent"])
            .get(),
        1
    );
    // a and b get an offer that retires c's sections, and answer it.
    for (m, before) in [a, b].iter().zip(&offers_before) {
        m.sig()
            .wait_log(STEP, |l| {
                l.server_offers.len() > *before && l.server_answers_sent == l.server_offers.len()
            })
            .await
            .unwrap_or_else(|_| panic!("{}: no offer after c's leg failed", m.peer.name));
        let log = m.sig().log();
        let sdp = &log.server_offers.last().unwrap().1;
        let c_sections = sdp
            .split("\r\nm=")
            .filter(|s| s.contains(&format!("a=msid:{} ", c.id)))
            .filter(|s| {
                !s.contains("a=inactive") && !s.starts_with("audio 0") && !s.starts_with("video 0")
            })
            .count();
        assert_eq!(
            c_sections, 0,
            "{}: c's sections still active:\n{sdp}",
            m.peer.name
        );
    }
    // c is still a member: its signaling is alive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for m in [a, b] {
        let log = m.sig().log();
        assert!(
            !log.participants_left.iter().any(|(id, _, _)| *id == c.id),
            "{}: c was removed from the room",
            m.peer.name
        );
    }
    assert_eq!(server.metrics.participants.get(), 3);
    let end = Instant::now();
    let (gap, pair) = max_gap(&[a, b], &[a, b], dead_at, end);
    assert!(gap <= MAX_GAP, "a and b: {gap:?} without media ({pair})");
    println!(
        "media-only death: c's server leg closed as failed and announced {:?} after its UDP \
         went dark (a, b, c: {:?}); c stays in the room; a and b got an offer retiring c's \
         tracks; their longest media gap meanwhile {gap:?} ({pair})",
        detection, detected
    );
    drop(proxy);
    for m in members {
        m.close().await;
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 2. A panic while handling one participant
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_one_legs_processing_ends_only_that_leg() {
    run_scenario("forced panic scenario", panic_in_one_leg()).await;
}

/// a, b and c stream through the server; c sends one RTP packet whose
/// payload trips the SFU's test hook (debug builds only, armed by the
/// test), which panics while the SFU processes c's leg. Only c's leg may
/// go: a and b keep their media without a gap over 200 ms, the room lives
/// on, and a new member d joins and gets everyone's media.
async fn panic_in_one_leg() {
    confab::media::sfu::test_hooks::arm();
    let mut cfg = test_config();
    cfg.mode_policy.never_p2p = true;
    let server = start_server_with(cfg).await;
    let room = room_name("fault-panic");
    let mut members = vec![
        join_member(server.addr, &room, PeerConfig::video("a")).await,
        join_member(server.addr, &room, PeerConfig::video("b")).await,
        join_member(server.addr, &room, PeerConfig::video("c")).await,
    ];
    {
        let all: Vec<&Member> = members.iter().collect();
        wait_all_via_server(&all).await;
    }
    // The measured window starts 500 ms before the panic: streams must be
    // flowing by then.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c_id = members[2].id.clone();
    let panic_at = Instant::now();
    members[2]
        .peer
        .server_leg()
        .track(RtpCodecKind::Video)
        .expect("c's video track")
        .write_raw(confab::media::sfu::test_hooks::PANIC_PAYLOAD)
        .await
        .expect("written");
    let log = members[0]
        .sig()
        .wait_log(STEP, |l| l.server_leg_at(&c_id, "failed").is_some())
        .await
        .unwrap_or_else(|l| panic!("a: no server_leg failed for c: {:?}", l.server_legs));
    let failed_after = log.server_leg_at(&c_id, "failed").unwrap() - panic_at;
    assert_eq!(
        server
            .metrics
            .legs_failed
            .with_label_values(&["panic"])
            .get(),
        1
    );
    assert_eq!(server.metrics.legs.get(), 2);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let measured_to = Instant::now();
    {
        let ab: Vec<&Member> = members[..2].iter().collect();
        let (gap, pair) = max_gap(&ab, &ab, panic_at - Duration::from_millis(500), measured_to);
        assert!(gap <= MAX_GAP, "a and b: {gap:?} without media ({pair})");
        println!(
            "forced panic: c's leg closed as failed {failed_after:?} after the packet; a and b's \
             longest media gap around it {gap:?} ({pair})"
        );
    }
    // The room and the server go on: d joins, a, b and d see each other.
    let joined_at = Instant::now();
    members.push(join_member(server.addr, &room, PeerConfig::video("d")).await);
    {
        let abd: Vec<&Member> = [0, 1, 3].iter().map(|i| &members[*i]).collect();
        wait_all_via_server(&abd).await;
        let d = &members[3];
        let connected = d
            .sig()
            .log()
            .server_leg_at(&d.id, "connected")
            .expect("d's leg connected");
        println!(
            "forced panic: a new member d joined, its leg connected {:?} after it started \
             joining, and a, b and d rendered each other {:?} after",
            connected - joined_at,
            joined_at.elapsed()
        );
    }
    assert_eq!(server.metrics.legs.get(), 3);
    for m in members {
        m.close().await;
    }
    server.shutdown().await;
}

// ---------------------------------------------------------------------------
// 3. A participant killed mid-call
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_participant_is_gone_within_1_s_and_resources_return_within_5_s() {
    run_scenario("killed participant scenario", killed_participant()).await;
}

/// a, b and c stream through a spawned `confab`; the resources with the
/// three of them are the baseline. d joins, streams, and is killed (socket
/// dropped without a close frame, its peer connection gone). a, b and c
/// must get `participant_left` within 1 s and no media gap over 200 ms,
/// and the server's tasks, legs, participants and routing entries must be
/// back at the baseline within 5 s.
async fn killed_participant() {
    let server = Spawned::start(&[]);
    let room = room_name("fault-kill");
    let mut members = Vec::new();
    for name in ["a", "b", "c"] {
        members.push(join_member(server.http, &room, PeerConfig::video(name).with_audio()).await);
    }
    {
        let all: Vec<&Member> = members.iter().collect();
        wait_all_via_server(&all).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = resources(&scrape(server.http).await);
    members.push(join_member(server.http, &room, PeerConfig::video("d").with_audio()).await);
    {
        let all: Vec<&Member> = members.iter().collect();
        wait_all_via_server(&all).await;
    }
    let with_d = resources(&scrape(server.http).await);
    assert_eq!(with_d.legs, baseline.legs + 1);

    let mut d = members.pop().unwrap();
    let d_id = d.id.clone();
    let kill_at = Instant::now();
    drop(d.streamer.take());
    d.sig.take().unwrap().kill().await;
    d.peer.close().await;

    let mut left_after = Vec::new();
    for m in &members {
        let log = m
            .sig()
            .wait_log(STEP, |l| {
                l.participants_left.iter().any(|(id, _, _)| *id == d_id)
            })
            .await
            .unwrap_or_else(|_| panic!("{}: no participant_left for d", m.peer.name));
        let at = log
            .participants_left
            .iter()
            .find(|(id, _, _)| *id == d_id)
            .unwrap()
            .2;
        left_after.push(at - kill_at);
    }
    let worst_left = *left_after.iter().max().unwrap();
    assert!(
        worst_left <= Duration::from_secs(1),
        "participant_left {worst_left:?} after the kill"
    );
    let back = wait_resources(server.http, baseline, Duration::from_secs(5))
        .await
        .unwrap_or_else(|now| {
            panic!("not back at the baseline {baseline:?} 5 s after the kill: {now:?}")
        });
    let after = resources(&scrape(server.http).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = Instant::now();
    let all: Vec<&Member> = members.iter().collect();
    let (gap, pair) = max_gap(&all, &all, kill_at - Duration::from_millis(500), end);
    assert!(gap <= MAX_GAP, "{gap:?} without media ({pair})");
    println!(
        "killed participant: participant_left at a, b, c {left_after:?} after the kill; \
         resources back at the 3-member baseline {back:?} after it (baseline {baseline:?}, \
         with d {with_d:?}, after {after:?}); longest media gap of the others {gap:?} ({pair})"
    );
    for m in members {
        m.close().await;
    }
}

// ---------------------------------------------------------------------------
// 4. Churn
// ---------------------------------------------------------------------------

/// Signaling-only join/leave cycles run at once.
const CHURN_CONCURRENCY: usize = 8;

/// `cycles` joins and leaves (each on a new socket: `join`, `joined`,
/// `leave`, the server closes) spread over a few rooms.
async fn signaling_churn(http: SocketAddr, cycles: usize, tag: &str) {
    let mut tasks = Vec::new();
    for t in 0..CHURN_CONCURRENCY {
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in (t..cycles).step_by(CHURN_CONCURRENCY) {
                let mut c = WsClient::connect(http).await;
                c.send_json(serde_json::json!({
                    "type": "join", "v": PROTOCOL_VERSION,
                    "room": format!("churn-{tag}-{}", i % 16), "name": "churner"
                }))
                .await;
                let joined = c.recv_json().await;
                assert_eq!(joined["type"], "joined", "{joined}");
                c.send_json(serde_json::json!({"type": "leave"})).await;
                loop {
                    match c.next_event(STEP).await {
                        Some(Event::Json(_)) => continue,
                        Some(Event::Close(_) | Event::Ended) => break,
                        None => panic!("the server did not close after leave"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("churn task");
    }
}

/// `cycles` joins whose server leg connects (a webrtc-rs client that
/// publishes nothing), then leaves; five at a time in one room, so every
/// join and leave also renegotiates the others' legs.
async fn leg_churn(http: SocketAddr, cycles: usize, room: &str) {
    let mut tasks = Vec::new();
    for t in 0..5 {
        let room = room.to_owned();
        tasks.push(tokio::spawn(async move {
            for i in (t..cycles).step_by(5) {
                let peer = RtcPeer::new(PeerConfig::video(&format!("leg{i}")).receive_only())
                    .await
                    .expect("client");
                let (ws, joined) = join(http, &room, &format!("leg{i}")).await;
                let id = joined["participant_id"].as_str().unwrap().to_owned();
                let (tx, rx) = ws.into_split();
                let sig = peer.start_signaling(&joined, tx, rx);
                sig.wait_log(SETTLE, |l| l.server_leg_at(&id, "connected").is_some())
                    .await
                    .unwrap_or_else(|l| panic!("leg{i}: leg never connected: {:?}", l.server_legs));
                // Dropping the socket is a leave (`disconnected`); a
                // `leave` would race the driver's answers to the server's
                // closing of the socket.
                sig.stop().await;
                peer.close().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("leg churn task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_1000_joins_and_leaves_returns_memory_and_tasks_to_baseline() {
    run_scenario("churn soak", churn()).await;
}

/// Against a spawned `confab` (rooms removed 1 s after their last member
/// leaves): a warm-up, then the baseline (RSS, tasks, legs, rooms,
/// participants, routes); then 1000 signaling join/leave cycles and 50
/// cycles whose server leg connects. Afterwards RSS must be within 10 % of
/// the baseline and everything else back at it.
async fn churn() {
    let server = Spawned::start(&["--empty-room-secs", "1", "--max-connections", "1000"]);
    let idle = resources(&scrape(server.http).await);
    let rss_start = server.rss();
    // Warm-up: allocator arenas, the first rooms and legs, lazy statics.
    signaling_churn(server.http, 100, "warm").await;
    leg_churn(server.http, 10, "churn-legs-warm").await;
    wait_resources(server.http, idle, Duration::from_secs(5))
        .await
        .unwrap_or_else(|now| panic!("warm-up left {now:?}, idle was {idle:?}"));
    let baseline = resources(&scrape(server.http).await);
    let rss_warm = server.rss();

    let started = Instant::now();
    signaling_churn(server.http, 1000, "soak").await;
    let signaling_took = started.elapsed();
    let rss_after_signaling = server.rss();
    let legs_started = Instant::now();
    leg_churn(server.http, 50, "churn-legs").await;
    let legs_took = legs_started.elapsed();
    let settled = wait_resources(server.http, baseline, Duration::from_secs(5))
        .await
        .unwrap_or_else(|now| panic!("after the churn {now:?}, baseline {baseline:?}"));
    let after = resources(&scrape(server.http).await);
    let rss_end = server.rss();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "churn: 1000 signaling join/leave cycles in {signaling_took:?}, 50 with a connected \
         server leg in {legs_took:?}; RSS {:.1} MiB at start, {:.1} MiB warm (baseline), \
         {:.1} MiB after the signaling churn, {:.1} MiB at the end ({:+.1} % of the baseline); \
         resources back {settled:?} after: baseline {baseline:?}, end {after:?}",
        mib(rss_start),
        mib(rss_warm),
        mib(rss_after_signaling),
        mib(rss_end),
        100.0 * (rss_end as f64 / rss_warm as f64 - 1.0)
    );
    assert!(
        rss_end as f64 <= rss_warm as f64 * 1.10,
        "RSS grew from {:.1} to {:.1} MiB",
        mib(rss_warm),
        mib(rss_end)
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the soak took {:?}",
        started.elapsed()
    );
}
