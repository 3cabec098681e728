//! Active speakers: three webrtc-rs members in a server-routed room send
//! audio with RFC 6464 levels that the test sets; every member must be told
//! who talks (`active_speakers`), loudest first, and the list must follow
//! the conversation: a new talker appears, the floor passes, silence
//! empties the list. A member whose client sends no levels is never listed.
//! With Last-N, the same lists decide whose video each member receives.

use std::time::{Duration, Instant};

use crate::common::{room_name, start_server_with, test_config};
use crate::harness::{
    join_member_with, join_publishing, run_scenario, server_only_config, start_call, with_tokens,
    Member, SETTLE,
};
use crate::rtc_peer::{PeerConfig, SignalingLog, NO_AUDIO_LEVEL};

/// RFC 6464 levels (-dBov): a talker, a quieter talker, silence.
const LOUD: u8 = 10;
const QUIET: u8 = 25;
const SILENT: u8 = 127;

/// From now on `m`'s audio packets carry `level`.
fn set_level(m: &Member, level: u8) {
    m.peer
        .audio()
        .expect("an audio source")
        .set_audio_level(level);
}

/// Every `active_speakers` list `m` received, with its arrival.
fn lists(m: &Member) -> IdLists {
    m.sig().log().speakers
}

/// Lists of id lists with their arrival (`active_speakers`, `forwarded_video`).
type IdLists = Vec<(Vec<String>, Instant)>;

/// Waits until the latest entry of every member's `list` (a list of its
/// signaling log) arrived after `since` (if given) and satisfies
/// `ok(member index, ids)`; returns how long after `since` the slowest
/// member got it.
async fn wait_latest(
    members: &[Member],
    what: &str,
    list: fn(&SignalingLog) -> &IdLists,
    since: Option<Instant>,
    ok: impl Fn(usize, &[String]) -> bool,
) -> Duration {
    let deadline = Instant::now() + SETTLE;
    loop {
        let latest: Vec<Option<(Vec<String>, Instant)>> = members
            .iter()
            .map(|m| list(&m.sig().log()).last().cloned())
            .collect();
        let fresh = |at: &Instant| since.is_none_or(|s| *at >= s);
        if latest
            .iter()
            .enumerate()
            .all(|(i, l)| l.as_ref().is_some_and(|(ids, at)| fresh(at) && ok(i, ids)))
        {
            return latest
                .iter()
                .flatten()
                .map(|(_, at)| since.map_or(Duration::ZERO, |s| *at - s))
                .max()
                .unwrap_or_default();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {SETTLE:?}; latest lists: {:?}",
            latest
                .iter()
                .map(|l| l.as_ref().map(|(ids, _)| ids))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every member's latest `active_speakers` list, received
/// after `since`, satisfies `ok`; returns how long after `since` the
/// slowest member got it.
async fn wait_lists(
    members: &[Member],
    since: Instant,
    what: &str,
    ok: impl Fn(&[String]) -> bool,
) -> Duration {
    wait_latest(
        members,
        what,
        |l| &l.speakers,
        Some(since),
        |_, ids| ok(ids),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speakers_follow_the_conversation_and_the_loudest_leads() {
    run_scenario("speaker scenario", Duration::from_secs(60), conversation()).await;
}

async fn conversation() {
    let configs = ["a", "b", "c"].map(|n| PeerConfig::video(n).with_audio());
    let (server, _, _, members) = start_call(test_config(), "speakers", configs).await;
    // a and b send levels (silence for now); c's client sends none.
    set_level(&members[0], SILENT);
    set_level(&members[1], SILENT);
    set_level(&members[2], NO_AUDIO_LEVEL);
    for m in &members {
        m.peer
            .wait_mode("sfu", 0, SETTLE)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
        m.peer
            .server_leg()
            .wait_connected(SETTLE)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", m.name()));
    }
    let (a, b, c) = (
        members[0].id.clone(),
        members[1].id.clone(),
        members[2].id.clone(),
    );
    let started = Instant::now();

    // a talks, b is silent: a alone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    set_level(&members[0], LOUD);
    let a_listed = wait_lists(&members, t, "a listed", |l| l == [a.as_str()]).await;

    // b joins in, quieter: listed second, a keeps the floor.
    let t = Instant::now();
    set_level(&members[1], QUIET);
    let b_second = wait_lists(&members, t, "b second", |l| l == [a.as_str(), b.as_str()]).await;

    // a falls silent: b takes the floor, then is alone.
    let t = Instant::now();
    set_level(&members[0], SILENT);
    let b_first = wait_lists(&members, t, "b first", |l| l.first() == Some(&b)).await;
    let a_dropped = wait_lists(&members, t, "a dropped", |l| l == [b.as_str()]).await;

    // Everyone silent: an empty list.
    let t = Instant::now();
    set_level(&members[1], SILENT);
    let emptied = wait_lists(&members, t, "empty", |l| l.is_empty()).await;
    let elapsed = started.elapsed();

    for m in &members {
        let lists = lists(m);
        for (ids, _) in &lists {
            assert!(
                !ids.contains(&c),
                "{}: c sends no levels but was listed: {ids:?}",
                m.name()
            );
            assert!(
                ids.iter().all(|id| *id == a || *id == b),
                "{}: a list names a stranger: {ids:?}",
                m.name()
            );
        }
        // Lists change at most once per 250 ms window.
        let bound = elapsed.as_millis() / 250 + 2;
        assert!(
            lists.len() as u128 <= bound,
            "{}: {} lists in {elapsed:?}",
            m.name(),
            lists.len()
        );
        assert!(
            m.sig().log().errors.is_empty(),
            "{:?}",
            m.sig().log().errors
        );
    }
    eprintln!(
        "speakers: a listed after {a_listed:?}, b second after {b_second:?}; after a stopped: \
         b first {b_first:?}, a dropped {a_dropped:?}; empty {emptied:?} after b stopped; \
         {} lists at a in {elapsed:?}",
        lists(&members[0]).len()
    );

    for m in members {
        m.close().await;
    }
    server.shutdown().await;
}

/// Packets received through the server so far from each source of
/// `from`, `(video, audio)`.
fn received_from(at: &Member, from: &Member) -> (usize, usize) {
    let count = |tag: Option<u32>| {
        tag.and_then(|t| at.peer.stream(t))
            .map_or(0, |s| s.server.packets)
    };
    (
        count(from.peer.video().map(|s| s.tag)),
        count(from.peer.audio().map(|s| s.tag)),
    )
}

/// Waits until every member's latest `forwarded_video` is `expected(i)`.
async fn wait_forwarded(members: &[Member], what: &str, expected: impl Fn(usize) -> Vec<String>) {
    let is_expected = |i: usize, ids: &[String]| ids == expected(i).as_slice();
    wait_latest(members, what, |l| &l.forwarded_video, None, is_expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_n_forwards_the_video_of_recent_speakers_only() {
    run_scenario("Last-N scenario", Duration::from_secs(60), last_n()).await;
}

/// Four members, Last-N 1: each receives one video (the latest speaker's,
/// or the first to join before anyone spoke) and every audio.
async fn last_n() {
    let mut cfg = test_config();
    cfg.last_n = 1;
    let configs =
        ["a", "b", "c", "d"].map(|n| PeerConfig::video(n).with_audio().keyframes_on_request());
    let (server, _, _, members) = start_call(cfg, "last-n", configs).await;
    for m in &members {
        set_level(m, SILENT);
        m.peer.wait_mode("sfu", 0, SETTLE).await.unwrap();
        m.peer.server_leg().wait_connected(SETTLE).await.unwrap();
    }
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();

    // Nobody has spoken: the first to join is watched, and watches the second.
    wait_forwarded(&members, "join order", |i| {
        vec![ids[if i == 0 { 1 } else { 0 }].clone()]
    })
    .await;
    let (a, b, c, d) = (&members[0], &members[1], &members[2], &members[3]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = [
        received_from(c, a),
        received_from(c, b),
        received_from(c, d),
    ];
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = [
        received_from(c, a),
        received_from(c, b),
        received_from(c, d),
    ];
    let delta = |i: usize| (after[i].0 - before[i].0, after[i].1 - before[i].1);
    eprintln!(
        "last-n at c over 1 s, (video, audio) from a, b, d: {:?}",
        [delta(0), delta(1), delta(2)]
    );
    assert!(delta(0).0 > 20, "c receives a's video: {:?}", delta(0));
    assert_eq!(delta(1).0, 0, "c receives no video of b");
    assert_eq!(delta(2).0, 0, "c receives no video of d");
    for i in 0..3 {
        assert!(
            delta(i).1 > 20,
            "c receives every audio: {:?}",
            [delta(0), delta(1), delta(2)]
        );
    }

    // d speaks: everyone watches d, d watches a (the first to join).
    let spoke = Instant::now();
    set_level(d, LOUD);
    wait_forwarded(&members, "d speaks", |i| {
        vec![ids[if i == 3 { 0 } else { 3 }].clone()]
    })
    .await;
    let switched = spoke.elapsed();
    // d's video resumes at c from a keyframe it asked d for.
    let d_video_before = received_from(c, d).0;
    let listed = Instant::now();
    let deadline = listed + Duration::from_secs(3);
    while received_from(c, d).0 == d_video_before {
        assert!(Instant::now() < deadline, "d's video did not resume at c");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let resumed = listed.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a_before = received_from(c, a).0;
    let d_before = received_from(c, d).0;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        received_from(c, a).0,
        a_before,
        "a's video is held at c now"
    );
    assert!(
        received_from(c, d).0 - d_before > 20,
        "c receives d's video"
    );
    let asked: Vec<Duration> = d
        .peer
        .keyframe_requests()
        .iter()
        .filter(|k| k.at >= spoke)
        .map(|k| k.at - spoke)
        .collect();
    assert!(
        !asked.is_empty(),
        "d was asked for a keyframe when its video was released"
    );
    eprintln!(
        "last-n: lists changed {switched:?} after d started speaking; its video resumed at c \
         {resumed:?} after the list; keyframe requests at d after it spoke: {asked:?}"
    );

    // b shares its screen: pinned before the speaker, for everyone but b,
    // who keeps watching d.
    let screen = |on: bool| serde_json::json!({"type": "media_state", "audio_muted": false, "video_muted": false, "screen": on});
    b.sig().send(screen(true));
    let pinned = Instant::now();
    wait_forwarded(&members, "b pinned", |i| {
        vec![ids[if i == 1 { 3 } else { 1 }].clone()]
    })
    .await;
    // b toggles fast: the pin holds for its 2 s cooldown, then the last
    // wish (not sharing) applies.
    for on in [false, true, false, true, false] {
        b.sig().send(screen(on));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_c: Vec<(Vec<String>, Instant)> = c.sig().log().forwarded_video;
    assert_eq!(
        at_c.last().unwrap().0,
        vec![ids[1].clone()],
        "the pin changes at most once per cooldown"
    );
    wait_forwarded(&members, "b unpinned after the cooldown", |i| {
        vec![ids[if i == 3 { 0 } else { 3 }].clone()]
    })
    .await;
    let unpinned = pinned.elapsed();
    let flips = c
        .sig()
        .log()
        .forwarded_video
        .iter()
        .filter(|(_, at)| *at >= pinned)
        .count();
    assert_eq!(
        flips, 2,
        "c's selection changed twice (pin, unpin), not per toggle"
    );
    assert!(
        unpinned >= confab::media::last_n::PIN_COOLDOWN,
        "{unpinned:?}"
    );
    eprintln!("last-n: b pinned and, after 5 fast toggles, unpinned {unpinned:?} after the pin");

    for m in members {
        m.close().await;
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_n_never_gives_a_slot_to_a_member_without_the_publish_grant() {
    run_scenario(
        "Last-N viewer scenario",
        Duration::from_secs(60),
        last_n_viewer(),
    )
    .await;
}

/// Last-N 1 with a viewer (no publish grant) who joined first and claims to
/// share its screen: it is never selected, the publishers are.
async fn last_n_viewer() {
    let mut cfg = with_tokens(server_only_config());
    cfg.last_n = 1;
    let server = start_server_with(cfg).await;
    let room = room_name("last-n-viewer");
    let mut members = Vec::new();
    for (name, publish) in [("v", false), ("a", true), ("b", true)] {
        let msg = join_publishing(&room, name, publish);
        let config = PeerConfig::video(name).with_audio();
        members.push(join_member_with(server.addr, msg, config).await);
    }
    let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
    // v joined first, yet a (the first publisher) is selected for v and b,
    // and b for a.
    let expected = |i: usize| {
        vec![ids[if i == 2 {
            1
        } else if i == 1 {
            2
        } else {
            1
        }]
        .clone()]
    };
    wait_forwarded(&members, "publishers only", expected).await;
    // v claims a screen: not pinned, nobody's selection moves, and the
    // others are told it shares nothing.
    let lists_before: Vec<usize> = members
        .iter()
        .map(|m| m.sig().log().forwarded_video.len())
        .collect();
    members[0].sig().send(serde_json::json!(
        {"type": "media_state", "audio_muted": false, "video_muted": false, "screen": true}
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    wait_forwarded(&members, "v's claim changes nothing", expected).await;
    for (m, before) in members.iter().zip(&lists_before).skip(1) {
        let log = m.sig().log();
        assert_eq!(
            log.forwarded_video.len(),
            *before,
            "{}: {:?}",
            m.name(),
            log.forwarded_video
        );
        let update = log
            .other
            .iter()
            .find(|v| v["type"] == "participant_updated" && v["id"] == ids[0].as_str())
            .unwrap_or_else(|| panic!("{}: no participant_updated for v", m.name()));
        assert_eq!(update["screen"], false);
    }
    for m in members {
        m.close().await;
    }
    server.shutdown().await;
}
