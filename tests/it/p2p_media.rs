//! Two webrtc-rs clients negotiate a direct connection through Confab's
//! signaling and exchange numbered RTP packets over it, while their server
//! legs stay connected and silent (protocol version 2, mode `p2p`).

use std::time::{Duration, Instant};

use crate::common::{join, media_test_lock, room_name, start_server, PROTOCOL_VERSION, STEP};
use crate::rtc_peer::{Leg, Path, PeerConfig, RemoteTrackRecord, RtcPeer};

/// Packets each side sends.
const PACKETS: u32 = 100;
/// Pause between two packets.
const INTERVAL: Duration = Duration::from_millis(10);
/// RTP payload size: well below a loopback MTU, large enough that corruption
/// anywhere in a realistic packet would show.
const PAYLOAD_LEN: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_exchange_numbered_rtp_peer_to_peer() {
    let _serial = media_test_lock().await;
    tokio::time::timeout(Duration::from_secs(30), scenario())
        .await
        .expect("the p2p media scenario did not finish within 30 s");
}

async fn scenario() {
    let server = start_server().await;
    let room = room_name("p2p-media");

    let alice = RtcPeer::new(PeerConfig::video("alice"))
        .await
        .expect("alice's peer connection");
    let bob = RtcPeer::new(PeerConfig::video("bob"))
        .await
        .expect("bob's peer connection");

    // Alice joins first: alone, then polite once Bob arrives.
    let (alice_ws, alice_joined) = join(server.addr, &room, "alice").await;
    assert_eq!(alice_joined["type"], "joined", "{alice_joined}");
    assert_eq!(alice_joined["v"], PROTOCOL_VERSION, "{alice_joined}");
    assert_eq!(alice_joined["mode"]["mode"], "p2p", "{alice_joined}");
    assert!(
        alice_joined["mode"]["peer"].is_null(),
        "alone in the room, yet a peer is named: {alice_joined}"
    );
    let alice_id = alice_joined["participant_id"].as_str().unwrap().to_owned();
    let (tx, rx) = alice_ws.into_split();
    let alice_sig = alice.start_signaling(&alice_joined, tx, rx);

    // Bob joins second: impolite, so he offers first.
    let negotiation_start = Instant::now();
    let (bob_ws, bob_joined) = join(server.addr, &room, "bob").await;
    assert_eq!(bob_joined["mode"]["mode"], "p2p", "{bob_joined}");
    assert_eq!(
        bob_joined["mode"]["peer"],
        alice_id.as_str(),
        "{bob_joined}"
    );
    assert_eq!(bob_joined["mode"]["polite"], false, "{bob_joined}");
    let bob_id = bob_joined["participant_id"].as_str().unwrap().to_owned();
    let (tx, rx) = bob_ws.into_split();
    let bob_sig = bob.start_signaling(&bob_joined, tx, rx);

    let history = || timelines(&alice, &bob, negotiation_start);
    let (a, b) = tokio::join!(
        alice.wait_direct_connected(Duration::from_secs(10)),
        bob.wait_direct_connected(Duration::from_secs(10)),
    );
    let (alice_direct, bob_direct) = match (a, b) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => panic!(
            "direct leg not connected: alice {:?}, bob {:?}\n{}",
            a.err(),
            b.err(),
            history()
        ),
    };
    let alice_connected = alice_direct.connected_at().unwrap() - negotiation_start;
    let bob_connected = bob_direct.connected_at().unwrap() - negotiation_start;

    // Every member also has a server leg, warm in p2p: offered by the server,
    // answered, connected.
    let (a, b) = tokio::join!(
        alice.server_leg().wait_connected(Duration::from_secs(10)),
        bob.server_leg().wait_connected(Duration::from_secs(10)),
    );
    if a.is_err() || b.is_err() {
        panic!(
            "server leg not connected: alice {a:?}, bob {b:?}\n{}",
            history()
        );
    }
    for (sig, own, other) in [
        (&alice_sig, &alice_id, &bob_id),
        (&bob_sig, &bob_id, &alice_id),
    ] {
        let log = sig
            .wait_log(STEP, |l| {
                l.server_leg_at(own, "connected").is_some()
                    && l.server_leg_at(other, "connected").is_some()
            })
            .await
            .unwrap_or_else(|l| {
                panic!(
                    "{own}: no `server_leg connected` for itself and {other}: {:?}\n{}",
                    l.server_legs,
                    history()
                )
            });
        assert!(
            !log.server_offers.is_empty() && log.server_answers_sent == log.server_offers.len(),
            "{own}: server offers {}, answers {}",
            log.server_offers.len(),
            log.server_answers_sent
        );
    }

    // Roles and message flow as the protocol prescribes.
    let alice_log = alice_sig.log();
    let bob_log = bob_sig.log();
    assert!(alice_log.errors.is_empty(), "alice: {:?}", alice_log.errors);
    assert!(bob_log.errors.is_empty(), "bob: {:?}", bob_log.errors);
    assert_eq!(alice_log.peer.as_deref(), Some(bob_id.as_str()));
    assert_eq!(alice_log.polite, Some(true), "the earlier member is polite");
    assert_eq!(bob_log.peer.as_deref(), Some(alice_id.as_str()));
    assert_eq!(bob_log.polite, Some(false), "the later member is impolite");
    assert_eq!(alice_log.epoch, bob_log.epoch, "both see the same epoch");
    assert_eq!((bob_log.offers_sent, alice_log.offers_received), (1, 1));
    assert_eq!(alice_log.offers_sent, 0, "the polite member must not offer");
    assert_eq!((alice_log.answers_sent, bob_log.answers_received), (1, 1));
    assert!(
        alice_log.candidates_received >= 1 && bob_log.candidates_received >= 1,
        "candidates trickled both ways: alice got {}, bob got {}",
        alice_log.candidates_received,
        bob_log.candidates_received
    );

    // The media path is direct: each side's selected pair ends at the other
    // client's UDP socket, not at the server.
    let pair = |leg: std::sync::Arc<Leg>| async move {
        leg.selected_pair()
            .await
            .expect("ICE transport")
            .expect("a selected candidate pair")
    };
    let alice_pair = pair(alice_direct.clone()).await;
    let bob_pair = pair(bob_direct.clone()).await;
    let alice_server_pair = pair(alice.server_leg().clone()).await;
    let bob_server_pair = pair(bob.server_leg().clone()).await;
    assert_eq!(alice_pair.remote, bob_pair.local, "alice -> bob path");
    assert_eq!(bob_pair.remote, alice_pair.local, "bob -> alice path");
    assert_ne!(alice_pair.local, bob_pair.local);
    for p in [&alice_pair, &bob_pair] {
        assert!(p.remote.ip().is_loopback(), "{p:?}");
        assert_ne!(p.remote, server.addr, "media must not go via the server");
        assert_ne!(p.remote.port(), server.addr.port(), "{p:?}");
        assert_ne!(
            p.remote, alice_server_pair.remote,
            "{p:?}: the server's media socket"
        );
        assert_ne!(
            p.remote, bob_server_pair.remote,
            "{p:?}: the server's media socket"
        );
        // `prflx` when the other side's connectivity check arrives before its
        // trickled candidate does: same socket, learned from the check.
        assert!(matches!(p.remote_type.as_str(), "host" | "prflx"), "{p:?}");
    }

    // Both send at once; in p2p only on the direct leg.
    let (alice_sent, bob_sent) = tokio::join!(
        alice.send_numbered(PACKETS, INTERVAL, PAYLOAD_LEN),
        bob.send_numbered(PACKETS, INTERVAL, PAYLOAD_LEN),
    );
    let alice_sent = &alice_sent[0];
    let bob_sent = &bob_sent[0];
    for sent in [alice_sent, bob_sent] {
        assert!(sent.errors.is_empty(), "{:?}", sent.errors);
        assert_eq!(sent.count, PACKETS);
        assert_eq!(sent.on_direct, PACKETS, "p2p sends on the direct leg");
        assert_eq!(sent.on_server, 0, "p2p sends nothing on the server leg");
    }

    let alice_tag = alice.video().unwrap().tag;
    let bob_tag = bob.video().unwrap().tag;
    let wait = Duration::from_secs(5);
    let at_bob = bob
        .wait_rendered(alice_tag, alice_sent.end() - 1, wait)
        .await;
    let at_alice = alice.wait_rendered(bob_tag, bob_sent.end() - 1, wait).await;
    // Late or duplicate packets would show up here.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Err(e) = at_bob.and(at_alice) {
        panic!("{e}\n{}", history());
    }
    let at_bob = only_direct_track(&bob).unwrap_or_else(|e| panic!("{e}\n{}", history()));
    let at_alice = only_direct_track(&alice).unwrap_or_else(|e| panic!("{e}\n{}", history()));

    if let Err(e) = at_bob.check_exact(alice_tag, alice_sent.counters()) {
        panic!("alice -> bob: {e}\n{}", history());
    }
    if let Err(e) = at_alice.check_exact(bob_tag, bob_sent.counters()) {
        panic!("bob -> alice: {e}\n{}", history());
    }
    for (peer, tag, sent) in [(&bob, alice_tag, alice_sent), (&alice, bob_tag, bob_sent)] {
        let stream = peer.stream(tag).expect("a rendered stream");
        assert_eq!(stream.render, Some(Path::Direct));
        stream
            .check_continuous(sent.counters())
            .unwrap_or_else(|e| panic!("{}: {e}", peer.name));
        // Warm but silent: nothing comes through the server in p2p.
        let via_server: Vec<_> = peer
            .received()
            .into_iter()
            .filter(|r| r.path == Path::Server)
            .collect();
        assert!(
            via_server.is_empty(),
            "{}: {} tracks arrived through the server in p2p",
            peer.name,
            via_server.len()
        );
    }
    let alice_video = alice.video().unwrap();
    let bob_video = bob.video().unwrap();
    assert_eq!(at_bob.track_id, alice_video.track_id);
    assert_eq!(at_alice.track_id, bob_video.track_id);
    assert_eq!(at_bob.mime_type.as_deref(), Some("video/VP8"));
    for (record, leg) in [(&at_bob, &alice_direct), (&at_alice, &bob_direct)] {
        let track = leg.video.as_ref().unwrap();
        assert!(
            record.packets.iter().all(|p| p.ssrc == track.ssrc
                && p.payload_type == track.source.payload_type
                && p.payload_len == PAYLOAD_LEN),
            "{}: SSRC, payload type or size changed in transit",
            record.track_id
        );
    }

    println!(
        "p2p media: direct leg connected after {:?} (alice) / {:?} (bob) from bob's join; \
         server legs connected after {:?} / {:?} from their construction; \
         selected pairs alice {} -> {}, bob {} -> {} (server signaling {}, media {}); \
         sent {}+{} packets of {} bytes over {:?}/{:?}; received {} at bob, {} at alice, \
         0 lost, 0 malformed, 0 through the server; trickled candidates {}/{}",
        alice_connected,
        bob_connected,
        alice.server_leg().connected_at().unwrap() - alice.server_leg().created,
        bob.server_leg().connected_at().unwrap() - bob.server_leg().created,
        alice_pair.local,
        alice_pair.remote,
        bob_pair.local,
        bob_pair.remote,
        server.addr,
        alice_server_pair.remote,
        alice_sent.count,
        bob_sent.count,
        PAYLOAD_LEN,
        alice_sent.elapsed,
        bob_sent.elapsed,
        at_bob.packets.len(),
        at_alice.packets.len(),
        alice_log.candidates_sent,
        bob_log.candidates_sent,
    );
    println!("{}", history());

    alice_sig.stop().await;
    bob_sig.stop().await;
    alice.close().await;
    bob.close().await;
}

/// Both peers' timelines (from `since`), for failure messages and `--nocapture`.
fn timelines(alice: &RtcPeer, bob: &RtcPeer, since: Instant) -> String {
    let mut out = String::new();
    for peer in [alice, bob] {
        out.push_str(&format!("--- {} ---\n", peer.name));
        for line in peer.timeline(since) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// The single remote track a two-member call delivers on the direct leg.
fn only_direct_track(peer: &RtcPeer) -> Result<RemoteTrackRecord, String> {
    let mut tracks: Vec<_> = peer
        .received()
        .into_iter()
        .filter(|t| t.path == Path::Direct)
        .collect();
    match tracks.len() {
        1 => Ok(tracks.remove(0)),
        n => Err(format!(
            "[{}] expected exactly 1 remote track on the direct leg, got {n}: {:?}",
            peer.name,
            tracks.iter().map(|t| &t.track_id).collect::<Vec<_>>()
        )),
    }
}
