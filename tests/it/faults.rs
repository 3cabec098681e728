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

use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use confab::auth::Grants;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use webrtc::media_stream::track_remote::TrackRemote;

use crate::common::{
    http_get, join, metric_value, room_name, serve_command, start_server_with, test_config, Event,
    TestServer, WsClient, PROTOCOL_VERSION, STEP,
};
use crate::harness::{
    close_all, finish, join_member, join_member_with, join_members, join_publishing,
    join_with_grants, offer_counts, server_only_config, stream_pairs, wait_all_mode,
    wait_all_via_server, wait_left, wait_offer_answered, with_tokens, Member, SETTLE,
};
use crate::lossy_proxy::{LossyProxy, Towards};
use crate::rtc_peer::{Path, PeerConfig, RtcPeer, SdpRewrite, VIDEO_PAYLOAD_TYPE};

/// The longest tolerated pause in a surviving stream.
const MAX_GAP: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// Runs a media scenario alone (see `media_test_lock`) within 90 s.
async fn run_scenario(what: &str, scenario: impl std::future::Future<Output = ()>) {
    crate::harness::run_scenario(what, Duration::from_secs(90), scenario).await;
}

/// A relay for the server's media that passes everything until told to
/// drop (see `LossyProxy::blackhole`); it keeps what it relays.
async fn relay(server: &TestServer) -> LossyProxy {
    LossyProxy::start_towards(
        server.media_addr,
        0.0,
        1,
        VIDEO_PAYLOAD_TYPE,
        Towards::Client,
    )
    .await
}

/// a, b and c (each with `configure` applied to a video-only client) in
/// `room`, c's server media through `c_via` when given; returned once
/// they all render each other through the server.
async fn join_abc(
    server: &TestServer,
    room: &str,
    configure: impl Fn(PeerConfig) -> PeerConfig,
    c_via: Option<&LossyProxy>,
) -> Vec<Member> {
    let mut c = configure(PeerConfig::video("c"));
    if let Some(proxy) = c_via {
        c = c.server_media_via(server.media_addr, proxy.addr);
    }
    let members = join_members(
        server.addr,
        room,
        [
            configure(PeerConfig::video("a")),
            configure(PeerConfig::video("b")),
            c,
        ],
    )
    .await;
    wait_all_via_server(&members.iter().collect::<Vec<_>>()).await;
    members
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
    for (r, s, tag) in stream_pairs(receivers, senders) {
        let stream = r
            .peer
            .stream(tag)
            .unwrap_or_else(|| panic!("{} never got {}'s {tag:#x}", r.name(), s.name()));
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
                worst = (gap, format!("{} <- {} {tag:#x}", r.name(), s.name()));
            }
            last = at;
        }
    }
    worst
}

/// A `confab serve` process on loopback with ephemeral ports, every room
/// server-routed; killed when dropped.
struct Spawned {
    child: Child,
    http: SocketAddr,
}

impl Spawned {
    fn start(extra: &[&str]) -> Spawned {
        let mut child = serve_command(&["--never-p2p"])
            .args(extra)
            .env("CONFAB_LOG", "warn")
            .env_remove("CONFAB_JWT_SECRET")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("confab starts");
        let http = confab::load::probe::read_http_addr(&mut child)
            .expect("the server printed its address");
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
    let (status, body) = http_get(http, "/metrics").await;
    assert_eq!(status, 200, "/metrics answers");
    body
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
    let server = start_server_with(server_only_config()).await;
    let proxy = relay(&server).await;
    let room = room_name("fault-silent");
    let members = join_abc(&server, &room, PeerConfig::with_audio, Some(&proxy)).await;
    let all: Vec<&Member> = members.iter().collect();
    let (a, b, c) = (all[0], all[1], all[2]);
    let offers_before = offer_counts(&[a, b]);
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
                    m.name(),
                    l.server_legs
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
        wait_offer_answered(m, *before, "c's leg failed").await;
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
            c_sections,
            0,
            "{}: c's sections still active:\n{sdp}",
            m.name()
        );
    }
    // c is still a member: its signaling is alive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for m in [a, b] {
        let log = m.sig().log();
        assert!(
            !log.participants_left.iter().any(|(id, _, _)| *id == c.id),
            "{}: c was removed from the room",
            m.name()
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
    finish(members, server).await;
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
    let server = start_server_with(server_only_config()).await;
    let room = room_name("fault-panic");
    let mut members = join_abc(&server, &room, |c| c, None).await;
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
    finish(members, server).await;
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
    let mut members = join_members(
        server.http,
        &room,
        ["a", "b", "c"].map(|name| PeerConfig::video(name).with_audio()),
    )
    .await;
    wait_all_via_server(&members.iter().collect::<Vec<_>>()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = resources(&scrape(server.http).await);
    members.push(join_member(server.http, &room, PeerConfig::video("d").with_audio()).await);
    wait_all_via_server(&members.iter().collect::<Vec<_>>()).await;
    let with_d = resources(&scrape(server.http).await);
    assert_eq!(with_d.legs, baseline.legs + 1);

    let mut d = members.pop().unwrap();
    let d_id = d.id.clone();
    let kill_at = Instant::now();
    d.kill().await;

    let mut left_after = Vec::new();
    for m in &members {
        let (_, at) = wait_left(m, &d_id, "d").await;
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
    close_all(members).await;
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
/// participants, routes); then 1000 signaling join/leave cycles and 100
/// cycles whose server leg connects. Afterwards RSS must be within 10 % of
/// the baseline and everything else back at it.
async fn churn() {
    let server = Spawned::start(&["--empty-room-secs", "1", "--max-connections", "1000"]);
    let idle = resources(&scrape(server.http).await);
    let rss_start = server.rss();
    // Warm-up: allocator arenas, the first rooms and legs, lazy statics.
    // Over 400 leg cycles RSS reaches a plateau within the first 50 and
    // stays there, but where on it a settled reading lands depends on which
    // allocator arenas the runtime's threads used (20-26 MiB for the debug
    // binary, run to run): the warm baseline is the highest settled reading
    // of three warm-up rounds shaped like the soak.
    let mut warm_readings = Vec::new();
    for round in 0..3 {
        signaling_churn(server.http, 200, &format!("warm{round}")).await;
        leg_churn(server.http, 100, &format!("churn-legs-warm{round}")).await;
        wait_resources(server.http, idle, Duration::from_secs(5))
            .await
            .unwrap_or_else(|now| panic!("warm-up left {now:?}, idle was {idle:?}"));
        warm_readings.push(server.rss());
    }
    let baseline = resources(&scrape(server.http).await);
    let rss_warm = *warm_readings.iter().max().unwrap();

    let started = Instant::now();
    signaling_churn(server.http, 1000, "soak").await;
    let signaling_took = started.elapsed();
    let rss_after_signaling = server.rss();
    let legs_started = Instant::now();
    leg_churn(server.http, 100, "churn-legs").await;
    let legs_took = legs_started.elapsed();
    let settled = wait_resources(server.http, baseline, Duration::from_secs(5))
        .await
        .unwrap_or_else(|now| panic!("after the churn {now:?}, baseline {baseline:?}"));
    let after = resources(&scrape(server.http).await);
    let rss_end = server.rss();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "churn: 1000 signaling join/leave cycles in {signaling_took:?}, 100 with a connected \
         server leg in {legs_took:?}; RSS {:.1} MiB at start, {:.1} MiB warm (baseline), \
         {:.1} MiB after the signaling churn, {:.1} MiB at the end ({:+.1} % of the baseline); \
         resources back {settled:?} after: baseline {baseline:?}, end {after:?} (warm-up \
         readings {:?} MiB)",
        mib(rss_start),
        mib(rss_warm),
        mib(rss_after_signaling),
        mib(rss_end),
        100.0 * (rss_end as f64 / rss_warm as f64 - 1.0),
        warm_readings
            .iter()
            .map(|b| (mib(*b) * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
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

// ---------------------------------------------------------------------------
// 5. RTCP abuse from a subscriber
// ---------------------------------------------------------------------------

/// `peer`'s server-leg track that carries `member`'s media of `kind`.
async fn remote_track(
    peer: &RtcPeer,
    member: &str,
    kind: RtpCodecKind,
) -> std::sync::Arc<dyn TrackRemote> {
    for r in peer.server_leg().pc().get_receivers().await {
        let t = r.track();
        if t.stream_id().await == member && t.kind().await == kind {
            return t.clone();
        }
    }
    panic!("{}: no {kind:?} track of {member}", peer.name)
}

/// RTCP packets a storm sends per second, and how long.
const STORM_RATE: u32 = 1000;
const STORM: Duration = Duration::from_secs(5);

/// Calls `make(i)` for `STORM_RATE` packets per second for `STORM` and
/// writes each on `track`; returns how many were written.
async fn storm(
    track: &std::sync::Arc<dyn TrackRemote>,
    mut make: impl FnMut(u32) -> Box<dyn rtc::rtcp::Packet>,
) -> u32 {
    let per_tick = STORM_RATE / 100;
    let mut ticker = tokio::time::interval(Duration::from_millis(10));
    let start = Instant::now();
    let mut written = 0;
    while start.elapsed() < STORM {
        ticker.tick().await;
        for _ in 0..per_tick {
            if track.write_rtcp(vec![make(written)]).await.is_ok() {
                written += 1;
            }
        }
    }
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_and_pli_storms_from_a_subscriber_are_bounded() {
    run_scenario("RTCP abuse scenario", rtcp_abuse()).await;
}

/// a, b and c stream through the server. a sends 1000 NACKs per second
/// for 5 s on its downtrack of c's video (a third for c's video SSRC, each
/// asking for 17 recent packets, a third for an unknown SSRC, a third for
/// c's audio): retransmissions must stay within the budget (half the media
/// packets plus a burst of 64) and nobody's media may pause. Then a sends
/// 1000 PLIs per second for 5 s: c must get at most one keyframe request
/// per 500 ms.
async fn rtcp_abuse() {
    use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};

    let server = start_server_with(server_only_config()).await;
    let room = room_name("fault-rtcp");
    let members = join_abc(&server, &room, PeerConfig::with_audio, None).await;
    let all: Vec<&Member> = members.iter().collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a, c) = (all[0], all[2]);
    let video = remote_track(&a.peer, &c.id, RtpCodecKind::Video).await;
    let audio = remote_track(&a.peer, &c.id, RtpCodecKind::Audio).await;
    let video_ssrc = video.ssrcs().await[0];
    let audio_ssrc = audio.ssrcs().await[0];
    let c_video_tag = c.peer.video().unwrap().tag;
    let last_sequence = || {
        a.peer
            .records_of(c_video_tag, Path::Server)
            .first()
            .and_then(|r| r.packets.last().map(|p| p.sequence_number))
            .unwrap_or(0)
    };
    let received_in = |from: Instant, to: Instant| {
        a.peer
            .records_of(c_video_tag, Path::Server)
            .iter()
            .flat_map(|r| r.packets.iter())
            .filter(|p| p.at >= from && p.at <= to)
            .count()
    };

    // NACK storm.
    let m = &server.metrics;
    let (nack0, rtx0, rtx_dropped0) = (
        m.nack.get(),
        m.retransmitted.get(),
        m.retransmissions_dropped.get(),
    );
    let started = Instant::now();
    let mut newest = last_sequence();
    let mut refreshed = Instant::now();
    let sent = storm(&video, |i| {
        if refreshed.elapsed() > Duration::from_millis(100) {
            newest = last_sequence();
            refreshed = Instant::now();
        }
        let media_ssrc = match i % 3 {
            0 => video_ssrc,
            1 => 0x0bad_cafe,
            _ => audio_ssrc,
        };
        Box::new(TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc,
            nacks: vec![NackPair {
                packet_id: newest.wrapping_sub(17),
                lost_packets: 0xffff,
            }],
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ended = Instant::now();
    let nacks = m.nack.get() - nack0;
    let rtx = m.retransmitted.get() - rtx0;
    let rtx_dropped = m.retransmissions_dropped.get() - rtx_dropped0;
    let media = received_in(started, ended) as u64;
    let budget = (media as f64 * confab::media::leg::RETRANSMIT_SHARE
        + confab::media::leg::RETRANSMIT_BURST) as u64;
    let (gap, pair) = max_gap(&all, &all, started, ended);
    println!(
        "NACK storm: a sent {sent} NACKs in {:?} ({} per s; 1/3 for c's video asking 17 packets \
         each, 1/3 unknown SSRC, 1/3 c's audio); the server counted {nacks} \
         (confab_nack_total); retransmitted {rtx} packets to a (confab_retransmitted_packets_total; \
         {:.2} per media packet of c's video, {media} media packets), {rtx_dropped} over budget \
         not sent (asked for: about {}); longest media gap of anyone {gap:?} ({pair})",
        STORM,
        sent as f64 / STORM.as_secs_f64(),
        rtx as f64 / media.max(1) as f64,
        (sent as u64 / 3) * 17,
    );
    assert!(sent >= STORM_RATE * 4, "only {sent} NACKs written");
    assert!(
        nacks >= u64::from(sent) * 9 / 10,
        "{nacks} of {sent} NACKs reached the server"
    );
    assert!(
        rtx <= budget,
        "{rtx} retransmissions for {media} media packets (budget {budget})"
    );
    assert!(rtx > 0, "the NACKs for c's video were answered");
    assert!(
        gap <= MAX_GAP,
        "{gap:?} without media ({pair}) during the NACK storm"
    );

    // PLI storm.
    let pli0 = m.pli.get();
    let started = Instant::now();
    let sent = storm(&video, |_| {
        Box::new(PictureLossIndication {
            sender_ssrc: 1,
            media_ssrc: video_ssrc,
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ended = Instant::now();
    let requests = c
        .peer
        .keyframe_requests()
        .iter()
        .filter(|r| r.path == Path::Server && r.at >= started && r.at <= ended)
        .count();
    let plis = m.pli.get() - pli0;
    let seconds = (ended - started).as_secs_f64();
    let (gap, pair) = max_gap(&all, &all, started, ended);
    println!(
        "PLI storm: a sent {sent} PLIs for c's video in {STORM:?}; c received {requests} \
         keyframe requests from the server ({:.2} per s; confab_pli_total +{plis}); longest \
         media gap of anyone {gap:?} ({pair})",
        requests as f64 / seconds
    );
    assert!(sent >= STORM_RATE * 4, "only {sent} PLIs written");
    // One per 500 ms, plus one at each end of the window.
    let most = (seconds / 0.5).ceil() as usize + 1;
    assert!(
        requests <= most,
        "{requests} keyframe requests in {seconds:.1} s (at most {most})"
    );
    assert!(
        requests >= 4,
        "the storm's PLIs were not passed on at all ({requests})"
    );
    assert!(
        gap <= MAX_GAP,
        "{gap:?} without media ({pair}) during the PLI storm"
    );
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// 6. Replayed, plain and unvalidated RTP
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_plain_and_unvalidated_rtp_is_never_forwarded() {
    run_scenario("replay scenario", replay_and_plain()).await;
}

/// a, b and c stream through the server, c through a relay that keeps c's
/// last video datagrams. Everyone stops sending; then, from c's validated
/// address, c's last SRTP datagram is sent again 20 times (a replay), and
/// 20 plain RTP packets with c's SSRC and new sequence numbers; from a
/// socket ICE never validated, the same 40 datagrams. Nothing may be
/// forwarded: the replays and the plain packets are refused by SRTP
/// (replay protection, authentication) and counted `srtp`, the rest
/// `unroutable` (dropped before any leg, so before any decryption).
async fn replay_and_plain() {
    let server = start_server_with(server_only_config()).await;
    let proxy = relay(&server).await;
    let room = room_name("fault-replay");
    let mut members = join_abc(&server, &room, |c| c, Some(&proxy)).await;
    for m in members.iter_mut() {
        m.stop_streaming().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c_tag = members[2].peer.video().unwrap().tag;
    let received = |m: &Member| {
        m.peer
            .records_of(c_tag, Path::Server)
            .iter()
            .map(|r| r.packets.len())
            .sum::<usize>()
    };
    let forwarded =
        || metric_value(&server.metrics.render(), "confab_forwarded_packets_total").unwrap_or(0.0);
    let dropped = |reason: &str| {
        server
            .metrics
            .media_dropped
            .with_label_values(&[reason])
            .get()
    };
    let before = (
        forwarded(),
        received(&members[0]),
        received(&members[1]),
        dropped("srtp"),
        dropped("unroutable"),
    );
    let captured = proxy.captured();
    let replay = captured
        .last()
        .expect("c's video went through the relay")
        .clone();
    let sequence = u16::from_be_bytes([replay[2], replay[3]]);
    let timestamp = u32::from_be_bytes([replay[4], replay[5], replay[6], replay[7]]);
    let plain: Vec<Vec<u8>> = (1..=20u16)
        .map(|i| {
            let mut p = vec![0x80, 0x80 | VIDEO_PAYLOAD_TYPE];
            p.extend_from_slice(&sequence.wrapping_add(i).to_be_bytes());
            p.extend_from_slice(&timestamp.wrapping_add(u32::from(i) * 3000).to_be_bytes());
            p.extend_from_slice(&replay[8..12]); // c's SSRC
                                                 // A VP8 key frame's descriptor and header, then filler.
            p.extend_from_slice(&[0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a]);
            p.resize(1000, 0x55);
            p
        })
        .collect();
    for _ in 0..20 {
        proxy.inject(&replay).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for p in &plain {
        proxy.inject(p).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for d in std::iter::repeat_n(&replay, 20).chain(plain.iter()) {
        stranger.send_to(d, server.media_addr).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = (
        forwarded(),
        received(&members[0]),
        received(&members[1]),
        dropped("srtp"),
        dropped("unroutable"),
    );
    println!(
        "replay: 20 replays of c's last SRTP datagram and 20 plain RTP packets from c's \
         address, the same 40 from an unvalidated one: forwarded +{}, a received +{}, b +{}; \
         dropped by SRTP +{} (before: {} during the whole call), unroutable +{}",
        after.0 - before.0,
        after.1 - before.1,
        after.2 - before.2,
        after.3 - before.3,
        before.3,
        after.4 - before.4
    );
    assert_eq!(after.0, before.0, "nothing forwarded");
    assert_eq!((after.1, after.2), (before.1, before.2), "nothing received");
    assert_eq!(
        after.3 - before.3,
        40,
        "replays and plain RTP refused by SRTP"
    );
    assert!(
        after.4 - before.4 >= 40,
        "unvalidated source dropped before any leg"
    );
    assert_eq!(server.metrics.legs.get(), 3, "c's leg survives");
    drop(proxy);
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// 7. The publish grant
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_the_publish_grant_costs_the_others_no_renegotiation() {
    run_scenario("viewer cost scenario", viewer_cost()).await;
}

/// A webinar: two publishers, then a viewer (subscribe only) joins and
/// leaves. It receives both; the publishers' legs are never renegotiated
/// for it and their SDPs never name it.
async fn viewer_cost() {
    let server = start_server_with(with_tokens(server_only_config())).await;
    let room = room_name("fault-viewer");
    let msg = |name: &str, publish: bool| join_publishing(&room, name, publish);
    let a = join_member_with(server.addr, msg("a", true), PeerConfig::video("a")).await;
    let b = join_member_with(server.addr, msg("b", true), PeerConfig::video("b")).await;
    wait_all_via_server(&[&a, &b]).await;
    let offers = offer_counts(&[&a, &b]);
    let v = join_member_with(server.addr, msg("v", false), PeerConfig::video("v")).await;
    for p in [&a, &b] {
        v.peer
            .wait_rendering(&p.tags(), Path::Server, SETTLE)
            .await
            .unwrap_or_else(|e| panic!("the viewer does not receive {}: {e}", p.name()));
    }
    let v_offer = v.sig().log().server_offers.last().unwrap().1.clone();
    let v_id = v.id.clone();
    v.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        offer_counts(&[&a, &b]),
        offers,
        "a viewer's join and departure renegotiate no publisher"
    );
    for p in [&a, &b] {
        let log = p.sig().log();
        assert!(
            log.server_offers
                .iter()
                .all(|(_, sdp)| !sdp.contains(&v_id)),
            "{}'s SDP names the viewer",
            p.name()
        );
    }
    // The viewer's own leg has the publishers' sections (and its publish
    // slots): 2 + 2 × 2 media sections.
    assert_eq!(v_offer.matches("\r\nm=").count(), 6, "{v_offer}");
    eprintln!("viewer: offers at the publishers {offers:?} before and after its visit");
    finish(vec![a, b], server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_publish_grant_nothing_is_forwarded() {
    run_scenario("publish grant scenario", publish_grant()).await;
}

/// With tokens: a and b may publish, x and y may not, and both stream on
/// their server legs anyway. Nothing of x or y may reach a or b, while
/// they all receive a and b. (x also rewrites the server's offer as a
/// hostile client might, turning `inactive` publish slots into `recvonly`;
/// the server offers them `recvonly` today, so that is a no-op kept for
/// the day it offers them `inactive`.)
async fn publish_grant() {
    let server = start_server_with(with_tokens(server_only_config())).await;
    let room = room_name("fault-grant");
    let msg = |name: &str, publish: bool| join_publishing(&room, name, publish);
    // The first two media sections (the publish slots) become recvonly.
    let mut hostile = PeerConfig::video("x").with_audio();
    hostile.server_offer_rewrite = Some(SdpRewrite(std::sync::Arc::new(|sdp: &str| {
        let mut sections: Vec<String> = sdp.split("\r\nm=").map(str::to_owned).collect();
        for s in sections.iter_mut().skip(1).take(2) {
            *s = s.replace("a=inactive", "a=recvonly");
        }
        sections.join("\r\nm=")
    })));
    let members = vec![
        join_member_with(server.addr, msg("a", true), PeerConfig::video("a")).await,
        join_member_with(server.addr, msg("b", true), PeerConfig::video("b")).await,
        join_member_with(
            server.addr,
            msg("y", false),
            PeerConfig::video("y").with_audio(),
        )
        .await,
        join_member_with(server.addr, msg("x", false), hostile).await,
    ];
    let (a, b, y, x) = (&members[0], &members[1], &members[2], &members[3]);
    wait_all_via_server(&[a, b]).await;
    // y, honest without the grant, still receives.
    for r in [a, b] {
        y.peer
            .wait_rendering(&r.tags(), Path::Server, SETTLE)
            .await
            .unwrap_or_else(|e| {
                let log = y.sig().log();
                panic!(
                    "y does not receive {}: {e}\nerrors {:?}\nlegs {:?}\n{}",
                    r.name(),
                    log.errors,
                    log.server_legs,
                    y.peer.timeline(log.joined_at.unwrap()).join("\n")
                )
            });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = |m: &Member| {
        m.peer
            .server_leg()
            .track(RtpCodecKind::Video)
            .map(|t| t.written())
            .unwrap_or(0)
    };
    for r in [a, b] {
        for s in [x, y] {
            for tag in s.tags() {
                let got = r.peer.stream(tag).map(|s| s.server.packets).unwrap_or(0);
                assert_eq!(
                    got,
                    0,
                    "{} received {got} packets of {}",
                    r.name(),
                    s.name()
                );
            }
        }
    }
    let x_log = x.sig().log();
    let x_receives = [a, b].iter().all(|r| {
        r.tags()
            .iter()
            .all(|t| x.peer.stream(*t).is_some_and(|s| s.server.packets > 0))
    });
    println!(
        "publish grant: y and x (no publish grant) wrote {} and {} video packets on their \
         server legs (x's leg: {:?}, errors {:?}, receives a and b: {x_receives}); y receives \
         a and b; a and b received 0 packets of x and y; confab_forwarded_packets_total \
         {:?} (a and b only)",
        written(y),
        written(x),
        x_log
            .server_legs
            .iter()
            .filter(|(id, _, _)| *id == x.id)
            .map(|(_, s, _)| s.clone())
            .collect::<Vec<_>>(),
        x_log.errors,
        metric_value(&server.metrics.render(), "confab_forwarded_packets_total"),
    );
    assert!(written(y) > 50 && written(x) > 50, "x and y did stream");
    assert!(x_receives, "x receives a and b");
    finish(members, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_subscribe_grant_nothing_is_forwarded_to_it_and_the_pair_stays_on_the_server() {
    run_scenario("subscribe grant scenario", subscribe_grant()).await;
}

/// Two members, one without the subscribe grant, on a server that would
/// otherwise pair two members directly: the room stays on the server (a
/// direct path would bypass the grant), the restricted member's media
/// reaches the other, and nothing reaches the restricted member.
async fn subscribe_grant() {
    let server = start_server_with(with_tokens(test_config())).await;
    let room = room_name("fault-subscribe");
    let msg = |name: &str, subscribe: bool| {
        let grants = Grants {
            subscribe,
            ..Grants::default()
        };
        join_with_grants(&room, name, grants)
    };
    let members = vec![
        join_member_with(server.addr, msg("a", true), PeerConfig::video("a")).await,
        join_member_with(
            server.addr,
            msg("s", false),
            PeerConfig::video("s").with_audio(),
        )
        .await,
    ];
    let (a, s) = (&members[0], &members[1]);
    wait_all_mode(&[a, s], "sfu", a.joined_at).await;
    a.peer
        .wait_rendering(&s.tags(), Path::Server, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("a does not receive s: {e}"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Never a direct pair: no mode naming a peer (a alone was in `p2p`
    // without one).
    for m in [a, s] {
        let log = m.sig().log();
        assert!(
            log.modes
                .iter()
                .all(|x| x.peer.is_none() && x.mode != "to_p2p"),
            "{}: a direct path was set up: {:?}",
            m.name(),
            log.modes
                .iter()
                .map(|x| (x.mode.clone(), x.peer.clone()))
                .collect::<Vec<_>>()
        );
    }
    let to_s: usize = a
        .tags()
        .iter()
        .map(|t| {
            s.peer
                .stream(*t)
                .map_or(0, |v| v.server.packets + v.direct.packets)
        })
        .sum();
    let from_s: usize = s
        .tags()
        .iter()
        .map(|t| a.peer.stream(*t).map_or(0, |v| v.server.packets))
        .sum();
    println!(
        "subscribe grant: s (no subscribe grant) received {to_s} packets of a; a received \
         {from_s} packets of s; modes {:?}",
        s.sig().log().mode_names()
    );
    assert_eq!(
        to_s, 0,
        "media reached a member without the subscribe grant"
    );
    assert!(from_s > 50, "s still publishes to a");
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// A subscriber on a bad network, then a blackout
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impaired_subscriber_recovers_and_harms_nobody() {
    run_scenario("impaired network scenario", impaired_network()).await;
}

/// c receives through a seeded relay that, towards c, loses 5 % of the
/// video packets independently plus bursts of up to 6, duplicates 2 % and
/// holds back 20 % by up to 40 ms (reordering). NACK/RTX must recover most
/// losses, a and b must not notice; then c's network goes dark for 3 s and
/// c must render both a and b again within 2 s of its return.
async fn impaired_network() {
    use crate::lossy_proxy::Network;
    let server = start_server_with(server_only_config()).await;
    let network = Network {
        burst_start: 0.01,
        burst_max: 6,
        duplicate: 0.02,
        jitter_fraction: 0.2,
        jitter_max: Duration::from_millis(40),
    };
    let proxy = LossyProxy::start_impaired(
        server.media_addr,
        0.05,
        network,
        0x5eed_0bad,
        VIDEO_PAYLOAD_TYPE,
        Towards::Client,
    )
    .await;
    let room = room_name("fault-impaired");
    let members = join_abc(&server, &room, PeerConfig::with_audio, Some(&proxy)).await;
    let all: Vec<&Member> = members.iter().collect();
    let (a, b, c) = (all[0], all[1], all[2]);
    let started = Instant::now();

    // 1. Five seconds of a bad network towards c.
    let counters = |m: &Member| m.peer.video().map(|s| s.next_counter()).unwrap();
    let from = [counters(a), counters(b)];
    proxy.arm(true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.arm(false);
    let to = [counters(a), counters(b)];
    // Late retransmissions.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stats = proxy.stats();
    let mut delivered = Vec::new();
    for (i, s) in [a, b].iter().enumerate() {
        let tag = s.peer.video().unwrap().tag;
        let got: std::collections::BTreeSet<u32> = c
            .peer
            .records_of(tag, Path::Server)
            .iter()
            .flat_map(|r| r.counters())
            .filter(|n| (from[i]..to[i]).contains(n))
            .collect();
        delivered.push((got.len(), (to[i] - from[i]) as usize));
    }
    let impaired_end = Instant::now();

    // 2. Three seconds with no network at all for c, both ways.
    proxy.blackhole(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let back = [counters(a), counters(b)];
    let back_at = Instant::now();
    proxy.blackhole(false);
    let mut recovered = Vec::new();
    for (i, s) in [a, b].iter().enumerate() {
        let tag = s.peer.video().unwrap().tag;
        let when = loop {
            let rendered = c.peer.stream(tag).and_then(|v| {
                v.rendered
                    .iter()
                    .find(|r| r.counter >= back[i] && r.at >= back_at)
                    .map(|r| r.at)
            });
            if let Some(at) = rendered {
                break Some(at - back_at);
            }
            if back_at.elapsed() > Duration::from_secs(10) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        recovered.push(when);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (others_gap, on) = max_gap(&[a, b], &[a, b], started, Instant::now());
    println!(
        "impaired network towards c: relay dropped {} video packets ({} in bursts), duplicated {}, \
         held back {} of {}; c got {:?} (unique/sent) of a's and b's video in the 5 s; after a 3 s \
         blackout c renders a and b again after {:?}; longest gap between a and b meanwhile {:?} \
         ({on}); impaired phase ended {:?} after the start",
        stats.dropped.len(),
        stats.burst_dropped,
        stats.duplicated,
        stats.delayed,
        stats.rtp_armed,
        delivered,
        recovered,
        others_gap,
        impaired_end - started,
    );
    assert!(
        stats.dropped.len() >= 10 && stats.burst_dropped >= 2,
        "the relay impaired the stream"
    );
    assert!(
        stats.duplicated >= 1 && stats.delayed >= 10,
        "duplicates and reordering happened"
    );
    for (got, sent) in &delivered {
        assert!(
            *got as f64 >= 0.95 * *sent as f64,
            "NACK/RTX recovered most losses: {got} of {sent}"
        );
    }
    for r in &recovered {
        let r = r.expect("c renders again after the blackout");
        assert!(r < Duration::from_secs(2), "recovery took {r:?}");
    }
    assert!(
        others_gap < MAX_GAP,
        "a and b saw a gap of {others_gap:?} ({on})"
    );
    finish(members, server).await;
}
