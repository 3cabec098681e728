//! Server-routed media (protocol version 2) with webrtc-rs clients: every
//! member's server leg, forwarding through the SFU to every other member,
//! keyframe requests for a late joiner, a crashed member, and the
//! 2 -> 3 -> 2 switch between peer-to-peer and the server.
//!
//! Every client streams numbered packets (see `rtc_peer`) from the moment it
//! joins, on the legs its mode calls for, and renders each remote stream
//! from one path at a time. The checks are exact: every rendered stream is
//! gapless from its first packet to the sender's last, across path switches
//! and renegotiations, and every path delivered its packets without loss,
//! reordering or corruption. Loss at the very start of a stream is expected
//! and excluded by construction (a stream is counted from its first
//! delivered packet): before a subscriber's downtrack exists, or before a
//! key frame, the server rightly forwards nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use webrtc::peer_connection::RTCPeerConnectionState;

use crate::common::{
    eventually, join, metric_value, room_name, start_server_with, test_config, TestServer, STEP,
};
use crate::harness::{
    finish, history, join_member, join_members, offer_counts, server_only_config, start_call,
    stream_pairs, wait_all_mode, wait_all_rendering_via_server, wait_all_via_server_since,
    wait_left, wait_offer_answered, Member, INTERVAL, PAYLOAD_LEN, SETTLE,
};
use crate::lossy_proxy::{LossyProxy, ProxyStats, Towards};
use crate::rtc_peer::{summarize_sdp, Path, PeerConfig, SignalingLog, VIDEO_PAYLOAD_TYPE};

/// How long a measured stretch of streaming lasts.
const MEASURE: Duration = Duration::from_secs(2);
/// Time for the last packets to arrive after the senders stop.
const DRAIN: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// Runs a media scenario alone (see `media_test_lock`) within 60 s.
async fn run_scenario(what: &str, scenario: impl std::future::Future<Output = ()>) {
    crate::harness::run_scenario(what, Duration::from_secs(60), scenario).await;
}

/// Lets every member stream for `duration` more, stops every sender and
/// waits [`DRAIN`] for the last packets.
async fn stream_then_stop(members: &mut [Member], duration: Duration) {
    tokio::time::sleep(duration).await;
    for m in members.iter_mut() {
        m.stop_streaming().await;
    }
    tokio::time::sleep(DRAIN).await;
}

/// The counters each sender will write next, by tag.
fn next_counters(members: &[&Member]) -> BTreeMap<u32, u32> {
    members
        .iter()
        .flat_map(|m| {
            m.peer
                .video()
                .iter()
                .chain(m.peer.audio().iter())
                .map(|s| (s.tag, s.next_counter()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Per-receiver, per-sender figures of one run.
#[derive(Default)]
struct Figures {
    pairs: usize,
    rendered: usize,
    via_server: usize,
    late: usize,
}

/// The exact checks for every (receiver, sender) pair among `members`:
/// the rendered stream covers `from[tag]..end` with no gap anywhere in its
/// history, and every track of every path delivered clean, consecutive
/// packets of that one sender with the negotiated payload type and size.
fn check_pairs(members: &[&Member], from: &BTreeMap<u32, u32>, since: Instant) -> Figures {
    check_streams(members, members, from, since)
}

/// [`check_pairs`] for the streams of `senders` at `receivers`.
fn check_streams(
    receivers: &[&Member],
    senders: &[&Member],
    from: &BTreeMap<u32, u32>,
    since: Instant,
) -> Figures {
    let members: Vec<&Member> = receivers
        .iter()
        .chain(
            senders
                .iter()
                .filter(|s| !receivers.iter().any(|r| r.id == s.id)),
        )
        .copied()
        .collect();
    let members = members.as_slice();
    let mut figures = Figures::default();
    for (r, s, tag) in stream_pairs(receivers, senders) {
        let stream = r.peer.stream(tag).unwrap_or_else(|| {
            panic!(
                "{} never received {}'s stream {tag:#010x}\n{}",
                r.name(),
                s.name(),
                history(members, since)
            )
        });
        assert_eq!(
            stream.member.as_deref(),
            Some(s.id.as_str()),
            "{}: {}'s stream is attributed to another member",
            r.name(),
            s.name()
        );
        let window = from[&tag]..s.end_of(tag);
        if let Err(e) = stream.check_continuous(window.clone()) {
            panic!(
                "{} <- {}: {e}\n{}",
                r.name(),
                s.name(),
                history(members, since)
            );
        }
        for record in r
            .peer
            .received()
            .iter()
            .filter(|t| t.packets.first().is_some_and(|p| p.tag == tag))
        {
            if let Err(e) = record.check_clean(tag) {
                panic!("{} <- {}: {e}", r.name(), s.name());
            }
            assert!(
                record.holes().is_empty(),
                "{} <- {} ({:?} path): lost {:?}",
                r.name(),
                s.name(),
                record.path,
                record.holes()
            );
            let source = if record.kind == RtpCodecKind::Video {
                s.peer.video().unwrap()
            } else {
                s.peer.audio().unwrap()
            };
            assert!(
                record
                    .packets
                    .iter()
                    .all(|p| p.payload_type == source.payload_type
                        && p.payload_len == PAYLOAD_LEN
                        && p.ssrc == record.packets[0].ssrc),
                "{} <- {} ({:?} path): payload type, size or SSRC changed in transit",
                r.name(),
                s.name(),
                record.path
            );
            if record.path == Path::Server {
                assert_eq!(
                    record.member.as_deref(),
                    Some(s.id.as_str()),
                    "{}: server track {} has msid stream {:?}, carries {}'s packets",
                    r.name(),
                    record.track_id,
                    record.stream_id,
                    s.name()
                );
            }
        }
        figures.pairs += 1;
        figures.rendered += window.len();
        figures.via_server += stream.server.packets;
        figures.late += stream.late;
    }
    figures
}

/// How one server offer departs from "The server leg" in its transport
/// rules: ICE-lite, the server's host candidates, and `a=end-of-candidates`
/// (the server does not trickle). Empty if it follows them.
fn offer_transport_problems(sdp: &str) -> Vec<String> {
    let s = summarize_sdp(sdp);
    let mut problems = Vec::new();
    if !s.ice_lite {
        problems.push("no a=ice-lite".to_owned());
    }
    if s.candidates.is_empty() {
        problems.push("no a=candidate".to_owned());
    }
    if let Some(c) = s.candidates.iter().find(|c| !c.contains(" typ host")) {
        problems.push(format!("a non-host candidate: {c}"));
    }
    if !s.end_of_candidates {
        problems.push("no a=end-of-candidates".to_owned());
    }
    problems
}

/// The server's last offer to `m` has the media sections "The server leg"
/// prescribes: the publish slots first (recvonly), then one sendonly audio
/// and one sendonly video section per other member with msid = its id,
/// `inactive` for members who left; Opus 111 and VP8 96. (The transport
/// rules of every offer are checked by
/// `sfu_every_server_offer_is_ice_lite_with_host_candidates_and_end_of_candidates`.)
fn check_server_offer(m: &Member, present: &[&Member], left: &[&str]) {
    let log = m.sig().log();
    let (_, sdp) = log
        .server_offers
        .last()
        .unwrap_or_else(|| panic!("{}: no offer from sfu", m.name()));
    let s = summarize_sdp(sdp);
    let ctx = || format!("{}'s server offer:\n{sdp}", m.name());
    assert!(s.ice_lite, "not ICE-lite; {}", ctx());
    assert!(
        !s.candidates.is_empty() && s.candidates.iter().all(|c| c.contains(" typ host")),
        "host candidates only; {}",
        ctx()
    );
    for (i, section) in s.sections.iter().enumerate() {
        let want = match section.kind.as_str() {
            "audio" => (111, "opus"),
            "video" => (96, "VP8"),
            other => panic!("unexpected m={other}; {}", ctx()),
        };
        if section.direction != "inactive" {
            assert!(
                section
                    .rtpmaps
                    .iter()
                    .any(|(pt, name)| *pt == want.0 && name.eq_ignore_ascii_case(want.1)),
                "section {i} lacks {}/{}; {}",
                want.1,
                want.0,
                ctx()
            );
        }
    }
    let first_audio = s.sections.iter().position(|x| x.kind == "audio");
    let first_video = s.sections.iter().position(|x| x.kind == "video");
    let (Some(fa), Some(fv)) = (first_audio, first_video) else {
        panic!("no audio or no video section; {}", ctx());
    };
    assert!(
        fa < 2 && fv < 2,
        "publish slots are not the first two; {}",
        ctx()
    );
    assert_eq!(s.sections[fa].direction, "recvonly", "{}", ctx());
    assert_eq!(s.sections[fv].direction, "recvonly", "{}", ctx());
    let rest = &s.sections[2..];
    for other in present.iter().filter(|o| o.id != m.id) {
        for kind in ["audio", "video"] {
            let n = rest
                .iter()
                .filter(|x| {
                    x.kind == kind
                        && x.msid_stream.as_deref() == Some(other.id.as_str())
                        && x.direction == "sendonly"
                })
                .count();
            assert_eq!(
                n,
                1,
                "{kind} sections (sendonly, msid {}) for {}; {}",
                other.id,
                other.name(),
                ctx()
            );
        }
    }
    for id in left {
        for x in rest
            .iter()
            .filter(|x| x.msid_stream.as_deref() == Some(*id))
        {
            assert!(
                x.direction == "inactive" || x.port == 0,
                "a section of {id}, who left, is {}; {}",
                x.direction,
                ctx()
            );
        }
    }
    let active = rest
        .iter()
        .filter(|x| x.direction != "inactive" && x.port != 0)
        .count();
    assert_eq!(
        active,
        2 * (present.len() - 1),
        "active subscriber sections; {}",
        ctx()
    );
}

/// `at - since` in milliseconds, negative if earlier.
fn offset_ms(at: Instant, since: Instant) -> f64 {
    match at.checked_duration_since(since) {
        Some(d) => d.as_secs_f64() * 1e3,
        None => -(since - at).as_secs_f64() * 1e3,
    }
}

/// When `log` last recorded `mode`.
fn last_mode_at(log: &SignalingLog, mode: &str) -> Instant {
    log.modes
        .iter()
        .rev()
        .find(|m| m.mode == mode)
        .unwrap_or_else(|| panic!("no mode {mode}"))
        .at
}

/// The selected candidate pair of `m`'s direct leg.
async fn direct_pair(m: &Member) -> crate::rtc_peer::SelectedPair {
    m.peer
        .direct_leg()
        .unwrap()
        .selected_pair()
        .await
        .unwrap()
        .unwrap()
}

/// `GET /metrics`, parsed by `prometheus-parse`.
async fn scrape_metrics(addr: std::net::SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = crate::common::http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("the exposition parses")
}

/// The value of the counter or gauge `name` with exactly `labels`.
fn sample_value(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .and_then(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// Observations of histogram `name` (its `+Inf` bucket), over all labels.
fn histogram_count(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map(|b| b.count),
            _ => None,
        })
        .sum()
}

/// Forwarded packets and keyframe requests the server counted.
fn server_counters(server: &TestServer) -> (Option<f64>, Option<f64>) {
    let text = server.metrics.render();
    (
        metric_value(&text, "confab_forwarded_packets_total"),
        metric_value(&text, "confab_pli_total"),
    )
}

// ---------------------------------------------------------------------------
// Every member receives every other member through the server
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_three_members_receive_every_stream_through_the_server() {
    run_scenario("3-member SFU scenario", mesh(3, true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_five_members_receive_every_stream_through_the_server() {
    run_scenario("5-member SFU scenario", mesh(5, false)).await;
}

/// `n` members join one room (the first two start peer-to-peer and move to
/// the server when the third arrives), then stream for [`MEASURE`]; with
/// `audio`, each also sends Opus.
async fn mesh(n: usize, audio: bool) {
    let configs = (0..n).map(|i| {
        let cfg = PeerConfig::video(&format!("m{i}"));
        if audio {
            cfg.with_audio()
        } else {
            cfg
        }
    });
    let (server, _, since, mut members) = start_call(test_config(), "sfu-mesh", configs).await;
    let all: Vec<&Member> = members.iter().collect();
    wait_all_mode(&all, "sfu", since).await;
    for m in &all {
        if let Err(e) = m.peer.server_leg().wait_connected(SETTLE).await {
            panic!("{}: {e}\n{}", m.name(), history(&all, since));
        }
    }
    wait_all_rendering_via_server(&all, since).await;
    let measured_from = next_counters(&all);
    let measure_start = Instant::now();
    stream_then_stop(&mut members, MEASURE).await;
    let all: Vec<&Member> = members.iter().collect();

    let figures = check_pairs(&all, &measured_from, since);
    for (i, m) in all.iter().enumerate() {
        let log = m.sig().log();
        assert!(log.errors.is_empty(), "{}: {:?}", m.name(), log.errors);
        assert_eq!(
            log.server_answers_sent,
            log.server_offers.len(),
            "{}: every server offer answered",
            m.name()
        );
        assert!(
            log.server_leg_at(&m.id, "connected").is_some(),
            "{}: no server_leg connected for itself: {:?}",
            m.name(),
            log.server_legs
        );
        for later in &all[i + 1..] {
            assert!(
                log.server_leg_at(&later.id, "connected").is_some(),
                "{}: no server_leg connected for {}: {:?}",
                m.name(),
                later.name(),
                log.server_legs
            );
        }
        assert_eq!(
            log.server_candidates_received, 0,
            "the server does not trickle"
        );
        check_server_offer(m, &all, &[]);
        for sent in &m.sent {
            assert!(sent.errors.is_empty(), "{}: {:?}", m.name(), sent.errors);
        }
    }
    // The first pair reported the server path before the room entered sfu.
    for m in &all[..2] {
        let log = m.sig().log();
        let to_sfu = log
            .first_mode("to_sfu")
            .unwrap_or_else(|| panic!("{}: no to_sfu: {:?}", m.name(), log.mode_names()));
        assert!(
            log.media_ready_sent.iter().any(|(e, _)| *e == to_sfu.epoch),
            "{}: no media_ready for epoch {}",
            m.name(),
            to_sfu.epoch
        );
        assert_eq!(log.mode_names(), ["p2p", "to_sfu", "sfu"], "{}", m.name());
    }

    let (forwarded, plis) = server_counters(&server);
    println!(
        "sfu mesh of {n} ({}): {} (receiver, sender) streams, each gapless over its whole \
         history; {} packets of {PAYLOAD_LEN} bytes rendered in the {:?} window ({:.0} packets/s \
         per stream, target {:.0}), 0 lost, \
         0 reordered, 0 malformed; {} packets arrived via the server in all ({} duplicates \
         across the p2p->sfu splice); server legs connected {:?} after each join; \
         server offers per member {:?}; confab_forwarded_packets_total {:?}, confab_pli_total {:?}",
        if audio { "VP8 + Opus" } else { "VP8" },
        figures.pairs,
        figures.rendered,
        measure_start.elapsed() - DRAIN,
        figures.rendered as f64
            / figures.pairs as f64
            / (measure_start.elapsed() - DRAIN).as_secs_f64(),
        1.0 / INTERVAL.as_secs_f64(),
        figures.via_server,
        figures.late,
        all.iter()
            .map(|m| m.peer.server_leg().connected_at().unwrap() - m.joined_at)
            .collect::<Vec<_>>(),
        all.iter()
            .map(|m| m.sig().log().server_offers.len())
            .collect::<Vec<_>>(),
        forwarded,
        plis,
    );
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// The transport rules of every server offer
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_every_server_offer_is_ice_lite_with_host_candidates_and_end_of_candidates() {
    run_scenario("server-offer scenario", every_offer()).await;
}

/// Three members join and one leaves, so every member gets a first offer
/// and re-offers for joins and a leave; each one must be ICE-lite with the
/// server's host candidates and `a=end-of-candidates` ("The server leg", 1).
async fn every_offer() {
    let (server, _, since, mut members) = start_call(
        test_config(),
        "sfu-offers",
        ["a", "b", "c"].map(PeerConfig::video),
    )
    .await;
    wait_all_mode(&members.iter().collect::<Vec<_>>(), "sfu", since).await;
    let mut c = members.pop().unwrap();
    c.stop_streaming().await;
    let offers_before = offer_counts(&members.iter().collect::<Vec<_>>());
    c.sig().leave();
    for (m, before) in members.iter().zip(&offers_before) {
        m.sig()
            .wait_log(STEP, |l| l.server_offers.len() > *before)
            .await
            .unwrap_or_else(|_| panic!("{}: no re-offer after c left", m.name()));
    }
    let mut problems = Vec::new();
    let mut checked = 0;
    for m in members.iter().chain([&c]) {
        for (i, (_, sdp)) in m.sig().log().server_offers.iter().enumerate() {
            checked += 1;
            let p = offer_transport_problems(sdp);
            if !p.is_empty() {
                problems.push(format!(
                    "{}'s offer #{} ({} m-lines): {}",
                    m.name(),
                    i + 1,
                    summarize_sdp(sdp).sections.len(),
                    p.join(", ")
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {checked} server offers break the transport rules of \"The server leg\":\n{}",
        problems.len(),
        problems.join("\n")
    );
    println!("server offers: {checked} checked (first offers and re-offers), all ICE-lite with host candidates and a=end-of-candidates");
    members.push(c);
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// A late joiner and keyframe requests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_late_joiner_gets_every_stream_after_a_keyframe_request() {
    run_scenario("late-joiner scenario", late_joiner()).await;
}

/// Three members stream with key frames only on request (as encoders do);
/// a fourth joins. The server must ask every publisher for a key frame
/// within 1 s of the newcomer's server leg connecting, the newcomer must
/// start every stream on that key frame, and nobody else's streams may
/// notice the renegotiation.
async fn late_joiner() {
    let (server, room, since, mut members) = start_call(
        test_config(),
        "sfu-late",
        ["a", "b", "c"].map(|name| PeerConfig::video(name).keyframes_on_request()),
    )
    .await;
    wait_all_via_server_since(&members.iter().collect::<Vec<_>>(), since).await;
    let before_join = next_counters(&members.iter().collect::<Vec<_>>());

    let join_at = Instant::now();
    members.push(
        join_member(
            server.addr,
            &room,
            PeerConfig::video("d").keyframes_on_request(),
        )
        .await,
    );
    let d = &members[3];
    if let Err(e) = d.peer.server_leg().wait_connected(SETTLE).await {
        panic!(
            "{e}\n{}",
            history(&members.iter().collect::<Vec<_>>(), since)
        );
    }
    let d_connected = d.peer.server_leg().connected_at().unwrap();
    let all: Vec<&Member> = members.iter().collect();
    wait_all_rendering_via_server(&all, since).await;
    let everyone_at_d = Instant::now();
    let measured_from = next_counters(&all);
    stream_then_stop(&mut members, MEASURE).await;
    let all: Vec<&Member> = members.iter().collect();
    let d = all[3];

    // Keyframe requests: every earlier publisher, on its server-leg video
    // track, naming that track's SSRC, within 1 s of d's leg connecting.
    let mut latencies = Vec::new();
    for p in &all[..3] {
        let track_ssrc = p.peer.server_leg().video.as_ref().unwrap().ssrc;
        let requests = p.peer.keyframe_requests();
        let first = requests
            .iter()
            .find(|r| r.at >= join_at && r.path == Path::Server)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no keyframe request after d joined; all requests: {:?}\n{}",
                    p.name(),
                    requests,
                    history(&all, since)
                )
            });
        assert_eq!(first.media_ssrc, track_ssrc, "{}: {first:?}", p.name());
        let latency = first.at.checked_duration_since(d_connected);
        let early = d_connected.checked_duration_since(first.at);
        assert!(
            first.at <= d_connected + Duration::from_secs(1),
            "{}: first keyframe request {:?} after d's server leg connected",
            p.name(),
            latency
        );
        latencies.push(match (latency, early) {
            (Some(l), _) => format!("+{l:?}"),
            (None, Some(e)) => format!("-{e:?}"),
            _ => "0".into(),
        });
    }

    // d starts every stream on a key frame; the others' streams did not
    // notice d's arrival (their whole history is gapless).
    for s in &all[..3] {
        for record in d.peer.records_of(s.video_tag(), Path::Server) {
            assert!(
                record.packets[0].keyframe,
                "d's first packet of {} (counter {}) is not a key frame",
                s.name(),
                record.packets[0].counter
            );
        }
    }
    // The earlier members: covered from before d joined; d's stream and the
    // streams at d: from the measurement start.
    let early: Vec<&Member> = all[..3].to_vec();
    let figures_early = check_pairs(&early, &before_join, since);
    let figures_all = check_pairs(&all, &measured_from, since);
    for m in &all {
        let log = m.sig().log();
        assert!(log.errors.is_empty(), "{}: {:?}", m.name(), log.errors);
        check_server_offer(m, &all, &[]);
    }
    let server_says = d
        .sig()
        .log()
        .server_leg_at(&d.id, "connected")
        .map(|at| offset_ms(at, d_connected));
    let (forwarded, plis) = server_counters(&server);
    println!(
        "sfu late joiner: d's server leg connected {:?} after its join (the server's \
         server_leg connected arrived {server_says:+.1?} ms after that); it rendered all 3 \
         streams via the server {:?} after connecting; keyframe requests to a, b, c at {:?} \
         relative to d's leg connecting (limit +1 s); a/b/c streams among themselves gapless \
         across d's join ({} packets rendered), all 12 streams gapless over the final {:?} \
         ({} packets); confab_forwarded_packets_total {:?}, confab_pli_total {:?}",
        d_connected - join_at,
        everyone_at_d.saturating_duration_since(d_connected),
        latencies,
        figures_early.rendered,
        MEASURE,
        figures_all.rendered,
        forwarded,
        plis,
    );
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// A member that crashes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_killed_member_leaves_and_the_rest_continue_without_loss() {
    run_scenario("killed-member scenario", killed_member()).await;
}

/// Four members stream through the server; one disappears without `leave`
/// (socket and peer connections dropped). The others must hear
/// `participant_left` within 1 s, get a renegotiation that retires its
/// sections, and keep receiving each other without a single lost packet.
async fn killed_member() {
    let (server, _, since, mut members) = start_call(
        test_config(),
        "sfu-kill",
        ["a", "b", "c", "d"].map(PeerConfig::video),
    )
    .await;
    wait_all_via_server_since(&members.iter().collect::<Vec<_>>(), since).await;
    let survivors_from = next_counters(&members[..3].iter().collect::<Vec<_>>());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Kill d: the socket goes without a close frame, the peer connections
    // close, nothing is said.
    let mut d = members.pop().unwrap();
    let d_id = d.id.clone();
    let offers_before = offer_counts(&members.iter().collect::<Vec<_>>());
    let kill_at = Instant::now();
    d.kill().await;

    let mut left_after = Vec::new();
    for m in &members {
        let (reason, at) = wait_left(m, &d_id, "d").await;
        let after = at - kill_at;
        assert!(
            after <= Duration::from_secs(1),
            "{}: participant_left {after:?} after the kill",
            m.name()
        );
        assert_eq!(
            reason,
            "disconnected",
            "{}: a socket dropped without a close frame is `disconnected`",
            m.name()
        );
        left_after.push(after);
    }
    // The server retires d's sections with a new offer to each survivor.
    for (m, before) in members.iter().zip(&offers_before) {
        wait_offer_answered(m, *before, "d left").await;
    }

    stream_then_stop(&mut members, MEASURE).await;
    let survivors: Vec<&Member> = members.iter().collect();
    let figures = check_pairs(&survivors, &survivors_from, since);
    for m in &survivors {
        let log = m.sig().log();
        assert!(log.errors.is_empty(), "{}: {:?}", m.name(), log.errors);
        check_server_offer(m, &survivors, &[d_id.as_str()]);
        assert_eq!(log.mode.as_deref(), Some("sfu"), "{}", m.name());
        // Nothing of d arrived after it was gone for a moment.
        if let Some(stream) = m.peer.stream(d.video_tag()) {
            let last = stream.server.last.map(|(_, at)| at);
            assert!(
                last.is_none_or(|at| at <= kill_at + Duration::from_millis(200)),
                "{}: d's packets still arrived {:?} after the kill",
                m.name(),
                last.map(|at| at - kill_at)
            );
        }
    }
    let (forwarded, plis) = server_counters(&server);
    println!(
        "sfu killed member: participant_left(d, disconnected) at a, b, c {:?} after the kill; \
         new offers retired d's sections; the 6 surviving streams gapless from before the \
         kill to the end ({} packets rendered, 0 lost); confab_forwarded_packets_total {:?}, \
         confab_pli_total {:?}",
        left_after, figures.rendered, forwarded, plis
    );
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// 2 -> 3 -> 2: peer-to-peer, the server, and back
// ---------------------------------------------------------------------------

/// A short return delay so the test does not wait 5 s.
const RETURN_DELAY: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_switch_two_three_two_is_seamless() {
    run_scenario("2-3-2 switch scenario", switch_two_three_two()).await;
}

/// A and B talk peer-to-peer; C joins (to_sfu, then sfu); C leaves; after
/// the return delay A and B go back to peer-to-peer (to_p2p, then p2p).
/// Every stream is rendered gapless across both switches.
async fn switch_two_three_two() {
    let mut cfg = test_config();
    cfg.mode_policy.p2p_return_delay = RETURN_DELAY;
    let (server, room, since, mut members) =
        start_call(cfg, "sfu-switch", ["a", "b"].map(PeerConfig::video)).await;

    // Phase 1: p2p. Direct legs up, each renders the other directly, and
    // nothing comes through the server.
    for m in &members {
        if let Err(e) = m.peer.wait_direct_connected(SETTLE).await {
            panic!(
                "{e}\n{}",
                history(&members.iter().collect::<Vec<_>>(), since)
            );
        }
    }
    let (a, b) = (&members[0], &members[1]);
    for (r, s) in [(a, b), (b, a)] {
        if let Err(e) = r
            .peer
            .wait_rendering(&[s.video_tag()], Path::Direct, SETTLE)
            .await
        {
            panic!("{e}\n{}", history(&[a, b], since));
        }
    }
    let p2p_from = next_counters(&[a, b]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (r, s) in [(a, b), (b, a)] {
        let stream = r.peer.stream(s.video_tag()).unwrap();
        assert_eq!(
            stream.server.packets,
            0,
            "{}: server path carried media in p2p",
            r.name()
        );
        assert_eq!(
            r.peer.server_leg().state(),
            RTCPeerConnectionState::Connected,
            "{}: the server leg stays warm in p2p",
            r.name()
        );
    }
    let p2p_epoch = a.peer.mode().epoch;

    // Phase 2: c joins; a and b move to the server make-before-break.
    let c_join_at = Instant::now();
    members.push(join_member(server.addr, &room, PeerConfig::video("c")).await);
    let all: Vec<&Member> = members.iter().collect();
    wait_all_via_server_since(&all, since).await;
    let (a, b, c) = (all[0], all[1], all[2]);
    for m in [a, b] {
        let log = m.sig().log();
        let to_sfu = log.first_mode("to_sfu").expect("to_sfu");
        let sfu = log.first_mode("sfu").expect("sfu");
        assert!(to_sfu.epoch > p2p_epoch && sfu.epoch > to_sfu.epoch);
        assert!(
            log.media_ready_sent.iter().any(|(e, _)| *e == to_sfu.epoch),
            "{}: no media_ready({})",
            m.name(),
            to_sfu.epoch
        );
        // Completed by the reports, not by the 8 s deadline.
        assert!(
            sfu.at - to_sfu.at < Duration::from_secs(4),
            "{}: to_sfu lasted {:?}",
            m.name(),
            sfu.at - to_sfu.at
        );
        // The log records `mode sfu` as it arrives; the client closes its
        // direct leg when it handles the message, a moment later.
        let closed = eventually(Duration::from_secs(2), || m.peer.direct_leg().is_none()).await;
        assert!(closed, "{}: direct leg kept in sfu", m.name());
    }
    let to_sfu_took = b.sig().log().first_mode("sfu").unwrap().at
        - b.sig().log().first_mode("to_sfu").unwrap().at;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Phase 3: c leaves; after the return delay a and b go back to p2p.
    let c_from = next_counters(&[a, b, c]);
    let mut c = members.pop().unwrap();
    let c_id = c.id.clone();
    c.stop_streaming().await;
    c.sig().leave();
    let all: Vec<&Member> = members.iter().collect();
    let (a, b) = (all[0], all[1]);
    for m in [a, b] {
        if let Err(e) = m
            .peer
            .wait_mode("p2p", p2p_epoch, RETURN_DELAY + SETTLE)
            .await
        {
            panic!(
                "{e}\nmodes {:?}\n{}",
                m.sig().log().mode_names(),
                history(&[a, b, &c], since)
            );
        }
    }
    for (r, s) in [(a, b), (b, a)] {
        if let Err(e) = r
            .peer
            .wait_rendering(&[s.video_tag()], Path::Direct, SETTLE)
            .await
        {
            panic!("{e}\n{}", history(&[a, b], since));
        }
    }
    stream_then_stop(&mut members, Duration::from_millis(500)).await;
    let all: Vec<&Member> = members.iter().collect();
    let (a, b) = (all[0], all[1]);

    // Continuity at each receiver across both switches, from the first
    // rendered packet to the sender's last, and the render paths taken.
    let mut switch_times = Vec::new();
    for (r, s) in [(a, b), (b, a)] {
        let stream = r.peer.stream(s.video_tag()).unwrap();
        if let Err(e) = stream.check_continuous(p2p_from[&s.video_tag()]..s.end_of(s.video_tag())) {
            panic!(
                "{} <- {}: {e}\n{}",
                r.name(),
                s.name(),
                history(&[a, b, &c], since)
            );
        }
        let paths: Vec<(Path, Path, bool)> = stream
            .switches
            .iter()
            .map(|x| (x.from, x.to, x.forced))
            .collect();
        assert_eq!(
            paths,
            [
                (Path::Direct, Path::Server, false),
                (Path::Server, Path::Direct, false)
            ],
            "{}: render switches for {}",
            r.name(),
            s.name()
        );
        assert_eq!(stream.render, Some(Path::Direct));
        for record in r
            .peer
            .received()
            .iter()
            .filter(|t| t.packets.first().is_some_and(|p| p.tag == s.video_tag()))
        {
            record
                .check_clean(s.video_tag())
                .unwrap_or_else(|e| panic!("{}: {e}", r.name()));
            assert!(
                record.holes().is_empty(),
                "{} ({:?}): lost {:?}",
                r.name(),
                record.path,
                record.holes()
            );
        }
        // Back in p2p the sender stopped using its server leg.
        let s_log = s.sig().log();
        let p2p_again = last_mode_at(&s_log, "p2p");
        let late_server = s
            .peer
            .video()
            .unwrap()
            .sent()
            .iter()
            .filter(|x| x.server && x.at > p2p_again)
            .count();
        assert_eq!(
            late_server,
            0,
            "{}: sent on the server leg in p2p",
            s.name()
        );
        let r_log = r.sig().log();
        assert_eq!(
            r_log.mode_names(),
            ["p2p", "to_sfu", "sfu", "to_p2p", "p2p"],
            "{}: modes",
            r.name()
        );
        let to_p2p = r_log.modes.iter().find(|m| m.mode == "to_p2p").unwrap();
        assert!(
            r_log
                .media_ready_sent
                .iter()
                .any(|(e, _)| *e == to_p2p.epoch),
            "{}: no media_ready({})",
            r.name(),
            to_p2p.epoch
        );
        let left_at = r_log
            .participants_left
            .iter()
            .find(|(id, _, _)| *id == c_id)
            .map(|(_, _, at)| *at)
            .expect("participant_left(c)");
        assert!(
            to_p2p.at - left_at >= RETURN_DELAY - Duration::from_millis(50),
            "{}: to_p2p {:?} after c left, before the return delay",
            r.name(),
            to_p2p.at - left_at
        );
        let p2p_at = last_mode_at(&r_log, "p2p");
        switch_times.push((to_p2p.at - left_at, p2p_at - to_p2p.at));
        assert!(r_log.errors.is_empty(), "{}: {:?}", r.name(), r_log.errors);
    }
    // c rendered a and b gapless while it was there, and they rendered c.
    for s in [a, b] {
        let stream = c.peer.stream(s.video_tag()).unwrap();
        assert!(
            stream.gaps.is_empty(),
            "c <- {}: {:?}",
            s.name(),
            stream.gaps
        );
        assert!(stream.last_rendered().unwrap() + 1 >= c_from[&s.video_tag()]);
        let of_c = s.peer.stream(c.video_tag()).unwrap();
        assert!(of_c.gaps.is_empty(), "{} <- c: {:?}", s.name(), of_c.gaps);
        assert!(of_c.last_rendered().unwrap() + 1 >= c_from[&c.video_tag()]);
    }
    let (pair_a, pair_b) = (direct_pair(a).await, direct_pair(b).await);
    assert_eq!(pair_a.remote, pair_b.local, "direct again");

    // What an operator sees: the server's /metrics, scraped over HTTP and
    // read with an independent parser of the Prometheus text format.
    let scrape = scrape_metrics(server.addr).await;
    let value = |name: &str, labels: &[(&str, &str)]| sample_value(&scrape, name, labels);
    assert_eq!(value("confab_participants", &[]), Some(2.0));
    assert_eq!(value("confab_rooms_by_mode", &[("mode", "p2p")]), Some(1.0));
    for (from, to, reasons) in [
        ("p2p", "to_sfu", &["join"][..]),
        ("to_sfu", "sfu", &["media_ready", "timeout"][..]),
        ("sfu", "to_p2p", &["return_delay"][..]),
        ("to_p2p", "p2p", &["media_ready", "timeout"][..]),
    ] {
        let n: f64 = reasons
            .iter()
            .filter_map(|r| {
                value(
                    "confab_mode_switches_total",
                    &[("from", from), ("to", to), ("reason", r)],
                )
            })
            .sum();
        assert_eq!(n, 1.0, "one switch {from} -> {to} ({reasons:?})");
    }
    let video = value("confab_forwarded_packets_total", &[("kind", "video")]).unwrap_or(0.0);
    assert!(video > 100.0, "forwarded video packets: {video}");
    let latency = histogram_count(&scrape, "confab_forward_latency_seconds");
    assert!(
        latency >= video / 2.0 / 2.0,
        "forward latency observed {latency} times"
    );
    assert!(histogram_count(&scrape, "confab_join_latency_seconds") >= 3.0);
    assert!(
        value(
            "confab_signaling_messages_total",
            &[("type", "media_ready")]
        )
        .unwrap_or(0.0)
            >= 4.0
    );

    let stream_at_a = a.peer.stream(b.video_tag()).unwrap();
    println!(
        "sfu switch 2->3->2: c joined {:?} after a; to_sfu -> sfu in {to_sfu_took:?}; after c \
         left: to_p2p after {:?} (return delay {RETURN_DELAY:?}), p2p {:?} later (a, b); \
         at a, b's stream: {} packets rendered gapless ({} direct, {} via server, {} duplicates \
         skipped at the splices), switches {:?}; direct pair again {} <-> {}",
        c_join_at - a.joined_at,
        switch_times.iter().map(|t| t.0).collect::<Vec<_>>(),
        switch_times.iter().map(|t| t.1).collect::<Vec<_>>(),
        stream_at_a.rendered.len(),
        stream_at_a.rendered_from(Path::Direct),
        stream_at_a.rendered_from(Path::Server),
        stream_at_a.late,
        stream_at_a
            .switches
            .iter()
            .map(|x| format!("{:?}->{:?} at counter {:?}", x.from, x.to, x.next_counter))
            .collect::<Vec<_>>(),
        pair_a.local,
        pair_a.remote,
    );
    members.push(c);
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// NACK: loss between the server and one subscriber
// ---------------------------------------------------------------------------

/// Fraction of the server's video packets the relay drops towards `c`.
const LOSS: f64 = 0.05;
/// Fixes which packets are dropped.
const SEED: u64 = 0x0c0f_fab5;

/// Members a, b and c in one room, server-routed and rendering, with c's
/// server leg through a seeded relay (armed later) that drops video going
/// `towards` one side.
async fn three_with_c_behind_a_relay(
    towards: Towards,
) -> (TestServer, LossyProxy, Vec<Member>, Instant) {
    let server = start_server_with(test_config()).await;
    let proxy =
        LossyProxy::start_towards(server.media_addr, LOSS, SEED, VIDEO_PAYLOAD_TYPE, towards).await;
    let room = room_name("sfu-nack");
    let since = Instant::now();
    let configs = [
        PeerConfig::video("a"),
        PeerConfig::video("b"),
        PeerConfig::video("c").server_media_via(server.media_addr, proxy.addr),
    ];
    let members = join_members(server.addr, &room, configs).await;
    wait_all_via_server_since(&members.iter().collect::<Vec<_>>(), since).await;
    (server, proxy, members, since)
}

/// Arms `proxy` for [`MEASURE`] and a second, then lets the last drops be
/// retransmitted and stops every sender (see [`stream_then_stop`]); the
/// relay must have dropped at least 5 packets.
async fn lossy_stretch(proxy: &LossyProxy, members: &mut [Member]) -> ProxyStats {
    proxy.arm(true);
    tokio::time::sleep(MEASURE + Duration::from_secs(1)).await;
    proxy.arm(false);
    // The last drops' retransmissions.
    stream_then_stop(members, Duration::from_millis(500)).await;
    let stats = proxy.stats();
    assert!(
        stats.dropped.len() >= 5,
        "the relay dropped only {} of {} packets",
        stats.dropped.len(),
        stats.rtp_armed
    );
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_nack_recovers_every_packet_lost_towards_a_subscriber() {
    run_scenario("NACK scenario", nack_recovery()).await;
}

/// `c`'s server leg runs through a relay that drops 5 % of the server's
/// video packets towards `c` (seeded, each packet once). `c`'s NACKs must
/// get every one of them retransmitted by the server, and the other
/// members must not notice.
async fn nack_recovery() {
    let (server, proxy, mut members, since) = three_with_c_behind_a_relay(Towards::Client).await;
    let all: Vec<&Member> = members.iter().collect();
    let c = all[2];
    let pair = c
        .peer
        .server_leg()
        .selected_pair()
        .await
        .unwrap()
        .expect("c's server leg has a selected pair");
    assert_eq!(
        pair.remote, proxy.addr,
        "c's server leg runs through the relay"
    );

    let from = next_counters(&all);
    let stats = lossy_stretch(&proxy, &mut members).await;
    let all: Vec<&Member> = members.iter().collect();
    let (a, b, c) = (all[0], all[1], all[2]);

    let mut recovery = Vec::new();
    let mut duplicates = 0;
    let mut late = 0;
    for s in [a, b] {
        let tag = s.video_tag();
        let records = c.peer.records_of(tag, Path::Server);
        assert_eq!(
            records.len(),
            1,
            "c: {}'s video tracks via the server",
            s.name()
        );
        let record = &records[0];
        assert!(
            record.malformed.is_empty(),
            "c <- {}: {:?}",
            s.name(),
            record.malformed
        );
        assert_eq!(
            record.tags(),
            vec![tag],
            "c <- {}: foreign packets",
            s.name()
        );
        let window = from[&tag]..s.end_of(tag);
        let got: std::collections::BTreeSet<u32> = record.counters().into_iter().collect();
        let missing: Vec<u32> = window.clone().filter(|n| !got.contains(n)).collect();
        let ssrc = record.packets[0].ssrc;
        let dropped: Vec<_> = stats.dropped.iter().filter(|d| d.ssrc == ssrc).collect();
        assert!(
            missing.is_empty(),
            "c <- {}: {} of {} counters never arrived: {:?}; the relay dropped sequence numbers {:?}",
            s.name(),
            missing.len(),
            window.len(),
            &missing[..missing.len().min(20)],
            dropped.iter().map(|d| d.sequence).collect::<Vec<_>>()
        );
        assert!(
            !dropped.is_empty(),
            "c <- {}: nothing of this stream was dropped",
            s.name()
        );
        for d in &dropped {
            let again = record
                .packets
                .iter()
                .find(|p| p.sequence_number == d.sequence && p.at >= d.at)
                .unwrap_or_else(|| {
                    panic!(
                        "c <- {}: sequence {} dropped, never retransmitted",
                        s.name(),
                        d.sequence
                    )
                });
            recovery.push(again.at - d.at);
        }
        let counters = record.counters();
        duplicates += counters.len() - got.len();
        let mut highest = 0;
        for (i, n) in counters.iter().enumerate() {
            if i > 0 && *n < highest {
                late += 1;
            }
            highest = highest.max(*n);
        }
    }
    // Nobody else noticed: a and b receive each other and c without loss.
    let figures = check_streams(&[a, b], &all, &from, since);
    recovery.sort();
    let (forwarded, plis) = server_counters(&server);
    println!(
        "sfu NACK: relay dropped {} of {} video packets towards c ({:.1} %, seed {SEED:#x}); \
         all {} recovered by retransmission, {} arrived out of order, {} duplicates; recovery \
         time min {:?} median {:?} max {:?}; a and b unaffected ({} packets rendered, gapless); \
         confab_forwarded_packets_total {:?}, confab_pli_total {:?}",
        stats.dropped.len(),
        stats.rtp_armed,
        100.0 * stats.dropped.len() as f64 / stats.rtp_armed.max(1) as f64,
        recovery.len(),
        late,
        duplicates,
        recovery.first().unwrap(),
        recovery[recovery.len() / 2],
        recovery.last().unwrap(),
        figures.rendered,
        forwarded,
        plis,
    );
    drop(proxy);
    finish(members, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_nack_recovers_every_packet_a_publisher_lost_towards_the_server() {
    run_scenario("upstream NACK scenario", upstream_nack_recovery()).await;
}

/// `c`'s server leg runs through a relay that drops 5 % of `c`'s video
/// packets towards the server (seeded, each packet once). The server must
/// NACK them from `c` and forward the retransmissions, so that `a` and `b`
/// render `c`'s stream without a hole.
async fn upstream_nack_recovery() {
    let (server, proxy, mut members, _) = three_with_c_behind_a_relay(Towards::Server).await;
    let all: Vec<&Member> = members.iter().collect();
    let from = next_counters(&all);
    let stats = lossy_stretch(&proxy, &mut members).await;
    let all: Vec<&Member> = members.iter().collect();
    let (a, b, c) = (all[0], all[1], all[2]);
    let tag = c.video_tag();
    let window = from[&tag]..c.end_of(tag);
    for r in [a, b] {
        let records = r.peer.records_of(tag, Path::Server);
        assert_eq!(records.len(), 1, "{}: c's video via the server", r.name());
        let got: std::collections::BTreeSet<u32> = records[0].counters().into_iter().collect();
        let missing: Vec<u32> = window.clone().filter(|n| !got.contains(n)).collect();
        assert!(
            missing.is_empty(),
            "{} <- c: {} of {} counters never arrived: {:?}; the relay dropped {} packets \
             on their way to the server",
            r.name(),
            missing.len(),
            window.len(),
            &missing[..missing.len().min(20)],
            stats.dropped.len()
        );
    }
    println!(
        "sfu upstream NACK: relay dropped {} of {} of c's video packets towards the server \
         ({:.1} %, seed {SEED:#x}); a and b both rendered all {} counters of the window",
        stats.dropped.len(),
        stats.rtp_armed,
        100.0 * stats.dropped.len() as f64 / stats.rtp_armed.max(1) as f64,
        window.len()
    );
    drop(proxy);
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// Hostile datagrams on the media port
// ---------------------------------------------------------------------------

/// A STUN Binding request naming `ufrag` (a live leg's), with a bogus
/// MESSAGE-INTEGRITY: routed to that leg, whose ICE agent must refuse it.
fn forged_binding(ufrag: &str, seed: u8) -> Vec<u8> {
    let username = format!("{ufrag}:evil");
    let padded = username.len().div_ceil(4) * 4;
    let attrs_len = 4 + padded + 4 + 20;
    let mut m = vec![0x00, 0x01];
    m.extend_from_slice(&(attrs_len as u16).to_be_bytes());
    m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    m.extend_from_slice(&[seed; 12]);
    m.extend_from_slice(&[0x00, 0x06]);
    m.extend_from_slice(&(username.len() as u16).to_be_bytes());
    m.extend_from_slice(username.as_bytes());
    m.resize(m.len() + padded - username.len(), 0);
    m.extend_from_slice(&[0x00, 0x08, 0x00, 0x14]);
    m.extend_from_slice(&[seed; 20]);
    m
}

/// Deterministic junk of `len` bytes whose first byte puts it in the RFC
/// 7983 range of `first` (RTP/RTCP 128-191, STUN 0-3, DTLS 20-63).
fn shaped_junk(first: u8, len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    if let Some(b) = v.first_mut() {
        *b = first;
    }
    if first == 0x80 && len > 1 {
        // Alternate RTCP packet types 200-207 with an RTP payload type.
        v[1] = if len % 2 == 0 {
            200 + (len % 8) as u8
        } else {
            96
        };
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_garbage_on_the_media_port_harms_nobody() {
    run_scenario("hostile-datagram scenario", garbage_on_the_media_port()).await;
}

/// Two members stream through the server while a third socket, never
/// validated by ICE, sends every length from 0 to 1600 bytes shaped as
/// RTP, RTCP, STUN and DTLS, plus STUN requests forged with a live leg's
/// ufrag. Both streams must stay gapless and the junk must be counted.
async fn garbage_on_the_media_port() {
    let (server, _, since, mut members) = start_call(
        server_only_config(),
        "sfu-hostile",
        ["a", "b"].map(PeerConfig::video),
    )
    .await;
    let all: Vec<&Member> = members.iter().collect();
    wait_all_via_server_since(&all, since).await;
    let measured_from = next_counters(&all);
    let victim_offer = all[0].sig().log().server_offers[0].1.clone();
    let victim_ufrag = victim_offer
        .lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .expect("the offer has an ufrag")
        .trim()
        .to_owned();

    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut sent = 0u32;
    for len in 0..=1600usize {
        for first in [0x80u8, 0x00, 0x16, 0xff] {
            if attacker
                .send_to(&shaped_junk(first, len, sent), server.media_addr)
                .await
                .is_ok()
            {
                sent += 1;
            }
        }
        if len % 8 == 0 {
            let forged = forged_binding(&victim_ufrag, len as u8);
            if attacker.send_to(&forged, server.media_addr).await.is_ok() {
                sent += 1;
            }
        }
        if len % 64 == 0 {
            // Spread the burst over the measured window.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stream_then_stop(&mut members, MEASURE).await;
    let all: Vec<&Member> = members.iter().collect();
    let figures = check_pairs(&all, &measured_from, since);
    for m in &all {
        assert_eq!(
            m.peer.server_leg().state(),
            RTCPeerConnectionState::Connected,
            "{}: the server leg survived",
            m.name()
        );
    }
    let dropped = |reason: &str| {
        server
            .metrics
            .media_dropped
            .with_label_values(&[reason])
            .get()
    };
    println!(
        "hostile datagrams: {sent} sent; dropped as unroutable {}, oversize {}, rejected by a \
         leg {}; {} packets rendered gapless across both streams meanwhile",
        dropped("unroutable"),
        dropped("oversize"),
        dropped("rejected"),
        figures.rendered
    );
    // 4 shapes × 100 lengths over 1500 bytes.
    assert_eq!(dropped("oversize"), 400, "datagrams over 1500 bytes");
    assert!(
        dropped("unroutable") >= 4 * 1501 - 100,
        "junk from an unvalidated address is dropped before any leg sees it"
    );
    assert_eq!(server.metrics.legs.get(), 2, "no leg was lost");
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// Rooms are isolated from each other
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_rooms_never_receive_each_others_media() {
    run_scenario("room isolation scenario", rooms_isolated()).await;
}

/// Two server-routed rooms of two members each on one server (one media
/// port, one SFU task): every member receives its room-mate's stream and
/// nothing with another room's tag, on any track of any leg.
async fn rooms_isolated() {
    let server = start_server_with(server_only_config()).await;
    let since = Instant::now();
    let (x, y) = (room_name("iso-x"), room_name("iso-y"));
    let members = vec![
        join_member(server.addr, &x, PeerConfig::video("x1").with_audio()).await,
        join_member(server.addr, &y, PeerConfig::video("y1").with_audio()).await,
        join_member(server.addr, &x, PeerConfig::video("x2").with_audio()).await,
        join_member(server.addr, &y, PeerConfig::video("y2").with_audio()).await,
    ];
    let (in_x, in_y): (Vec<&Member>, Vec<&Member>) =
        members.iter().partition(|m| m.name().starts_with('x'));
    for room in [&in_x, &in_y] {
        wait_all_via_server_since(room, since).await;
    }
    // Let media flow a while longer in both rooms.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut checked = 0usize;
    for (room, other) in [(&in_x, &in_y), (&in_y, &in_x)] {
        let foreign: BTreeSet<u32> = other.iter().flat_map(|m| m.tags()).collect();
        for r in room.iter() {
            let mate: BTreeSet<u32> = room
                .iter()
                .filter(|m| m.id != r.id)
                .flat_map(|m| m.tags())
                .collect();
            let mut seen = BTreeSet::new();
            for track in r.peer.received() {
                for p in &track.packets {
                    assert!(
                        !foreign.contains(&p.tag),
                        "{} received {:#010x} from the other room",
                        r.name(),
                        p.tag
                    );
                    assert!(
                        mate.contains(&p.tag),
                        "{} received an unknown stream {:#010x}",
                        r.name(),
                        p.tag
                    );
                    seen.insert(p.tag);
                    checked += 1;
                }
            }
            assert_eq!(
                seen,
                mate,
                "{} receives its room-mate's audio and video",
                r.name()
            );
        }
    }
    println!("room isolation: {checked} packets checked at 4 members in 2 rooms, none crossed");
    finish(members, server).await;
}

// ---------------------------------------------------------------------------
// A long-lived member while many others come and go
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sfu_long_lived_members_survive_many_departures() {
    run_scenario("departures scenario", many_departures()).await;
}

/// a and c stay, server-routed, streaming; 80 visitors join one after the
/// other, each staying until a's offer includes it, then leave. a's and
/// c's server legs must stay up and answered, and their offers bounded:
/// the sections of departed visitors are reused, not piled up (with 64 KiB
/// messages, about 45 departures would otherwise push a's answer over the
/// limit).
async fn many_departures() {
    let mut cfg = server_only_config();
    // 80 visitors in a few seconds make a and c answer far faster than any
    // real room would (two offers per visitor): lift the per-socket rate so
    // that the limit on signaling is not what this test measures.
    cfg.limits.rate_per_sec = 1000.0;
    cfg.limits.rate_burst = 1000.0;
    let (server, room, since, members) = start_call(
        cfg,
        "departures",
        ["a", "c"].map(|name| PeerConfig::video(name).with_audio()),
    )
    .await;
    let (a, c) = (&members[0], &members[1]);
    wait_all_via_server_since(&[a, c], since).await;
    let first_offer = a.sig().log().server_offers.last().unwrap().1.len();
    const VISITORS: usize = 80;
    for i in 0..VISITORS {
        let (mut v, joined) = join(server.addr, &room, &format!("v{i}")).await;
        let id = joined["participant_id"].as_str().unwrap().to_owned();
        // Until a has been offered the visitor's tracks (and answered).
        let offered = eventually(STEP, || {
            a.sig()
                .log()
                .server_offers
                .last()
                .is_some_and(|(_, sdp)| sdp.contains(&id))
        })
        .await;
        if !offered {
            let log = a.sig().log();
            for (_, sdp) in log.server_offers.iter().rev().take(3) {
                let keep: Vec<&str> = sdp
                    .lines()
                    .filter(|l| {
                        l.starts_with("a=mid")
                            || l.starts_with("a=msid:")
                            || l.ends_with("only")
                            || l.ends_with("inactive")
                            || l.starts_with("o=")
                    })
                    .collect();
                println!("--- offer\n{}", keep.join("\n"));
            }
            panic!(
                "visitor {i}: a was never offered {id}; errors {:?}",
                log.errors
            );
        }
        v.send_json(serde_json::json!({"type": "leave"})).await;
    }
    // Settle, then check that both still render each other and that no
    // answer was refused.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let from = next_counters(&[a, c]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (r, s) in [(a, c), (c, a)] {
        let log = r.sig().log();
        assert!(log.errors.is_empty(), "{}: {:?}", r.name(), log.errors);
        assert!(!log.closed, "{}: socket closed", r.name());
        for tag in s.tags() {
            let stream = r.peer.stream(tag).unwrap();
            assert!(
                stream.last_rendered().unwrap_or(0) >= from[&tag],
                "{} no longer renders {}",
                r.name(),
                s.name()
            );
        }
    }
    // One more visitor, with media: it gets reused sections at a and c,
    // and everyone renders everyone.
    let mut members = members;
    members.push(join_member(server.addr, &room, PeerConfig::video("w").with_audio()).await);
    let all: Vec<&Member> = members.iter().collect();
    wait_all_rendering_via_server(&all, since).await;
    let (a, c) = (all[0], all[1]);
    let log = a.sig().log();
    let largest = log
        .server_offers
        .iter()
        .map(|(_, s)| s.len())
        .max()
        .unwrap();
    let last = log.server_offers.last().unwrap().1.len();
    let sections = log
        .server_offers
        .last()
        .unwrap()
        .1
        .matches("\r\nm=")
        .count();
    println!(
        "departures: {VISITORS} visitors came and went; a's server offers: first {first_offer} B, \
         largest {largest} B, last {last} B with {sections} media sections; {} offers, {} answers; \
         a, c and a last visitor with media render each other",
        log.server_offers.len(),
        log.server_answers_sent
    );
    let _ = c;
    assert!(
        largest < 4 * first_offer,
        "a's offer grew from {first_offer} to {largest} bytes"
    );
    finish(members, server).await;
}
