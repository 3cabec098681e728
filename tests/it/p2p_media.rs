//! Two webrtc-rs clients negotiate a direct connection through Confab's
//! signaling and exchange numbered RTP packets over it.

use std::time::{Duration, Instant};

use crate::common::{join, room_name, start_server};
use crate::rtc_peer::{PeerConfig, RtcPeer};

/// Packets each side sends.
const PACKETS: u32 = 100;
/// Pause between two packets.
const INTERVAL: Duration = Duration::from_millis(10);
/// RTP payload size: well below a loopback MTU, large enough that corruption
/// anywhere in a realistic packet would show.
const PAYLOAD_LEN: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_exchange_numbered_rtp_peer_to_peer() {
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

    let (a, b) = tokio::join!(
        alice.wait_connected(Duration::from_secs(10)),
        bob.wait_connected(Duration::from_secs(10)),
    );
    if a.is_err() || b.is_err() {
        panic!(
            "not connected: alice {a:?}, bob {b:?}\n{}",
            timelines(&alice, &bob, negotiation_start)
        );
    }
    let alice_connected = alice.connected_at().unwrap() - negotiation_start;
    let bob_connected = bob.connected_at().unwrap() - negotiation_start;

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
    let alice_pair = alice
        .selected_pair()
        .await
        .expect("alice's ICE transport")
        .expect("alice has a selected candidate pair");
    let bob_pair = bob
        .selected_pair()
        .await
        .expect("bob's ICE transport")
        .expect("bob has a selected candidate pair");
    assert_eq!(alice_pair.remote, bob_pair.local, "alice -> bob path");
    assert_eq!(bob_pair.remote, alice_pair.local, "bob -> alice path");
    assert_ne!(alice_pair.local, bob_pair.local);
    for pair in [&alice_pair, &bob_pair] {
        assert!(pair.remote.ip().is_loopback(), "{pair:?}");
        assert_ne!(pair.remote, server.addr, "media must not go via the server");
        assert_ne!(pair.remote.port(), server.addr.port(), "{pair:?}");
        // `prflx` when the other side's connectivity check arrives before its
        // trickled candidate does: same socket, learned from the check.
        assert!(
            matches!(pair.remote_type.as_str(), "host" | "prflx"),
            "{pair:?}"
        );
    }

    // Both send at once.
    let (alice_sent, bob_sent) = tokio::join!(
        alice.send_numbered(PACKETS, INTERVAL, PAYLOAD_LEN),
        bob.send_numbered(PACKETS, INTERVAL, PAYLOAD_LEN),
    );
    let alice_sent = alice_sent.expect("alice sends");
    let bob_sent = bob_sent.expect("bob sends");
    assert_eq!(alice_sent.count, PACKETS);
    assert_eq!(bob_sent.count, PACKETS);

    let alice_tag = alice.video().unwrap().tag;
    let bob_tag = bob.video().unwrap().tag;
    let wait = Duration::from_secs(5);
    let at_bob = bob
        .wait_for_packets(alice_tag, PACKETS as usize, wait)
        .await;
    let at_alice = alice
        .wait_for_packets(bob_tag, PACKETS as usize, wait)
        .await;
    // Late or duplicate packets would show up here.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let at_bob = at_bob.and_then(|_| only_track(&bob));
    let at_alice = at_alice.and_then(|_| only_track(&alice));
    let history = || timelines(&alice, &bob, negotiation_start);
    let at_bob = at_bob.unwrap_or_else(|e| panic!("bob receiving alice: {e}\n{}", history()));
    let at_alice = at_alice.unwrap_or_else(|e| panic!("alice receiving bob: {e}\n{}", history()));

    if let Err(e) = at_bob.check_exact(alice_tag, alice_sent.counters()) {
        panic!("alice -> bob: {e}\n{}", history());
    }
    if let Err(e) = at_alice.check_exact(bob_tag, bob_sent.counters()) {
        panic!("bob -> alice: {e}\n{}", history());
    }
    let alice_video = alice.video().unwrap();
    let bob_video = bob.video().unwrap();
    assert_eq!(at_bob.track_id, alice_video.track_id);
    assert_eq!(at_alice.track_id, bob_video.track_id);
    assert_eq!(at_bob.mime_type.as_deref(), Some("video/VP8"));
    for (record, sender) in [(&at_bob, alice_video), (&at_alice, bob_video)] {
        assert!(
            record.packets.iter().all(|p| p.ssrc == sender.ssrc
                && p.payload_type == sender.payload_type
                && p.payload_len == PAYLOAD_LEN),
            "{}: SSRC, payload type or size changed in transit",
            record.track_id
        );
    }

    println!(
        "p2p media: connected after {:?} (alice) / {:?} (bob) from bob's join; \
         selected pairs alice {} -> {}, bob {} -> {} (server {}); \
         sent {}+{} packets of {} bytes over {:?}/{:?}; received {} at bob, {} at alice, \
         0 lost, 0 malformed; trickled candidates {}/{}",
        alice_connected,
        bob_connected,
        alice_pair.local,
        alice_pair.remote,
        bob_pair.local,
        bob_pair.remote,
        server.addr,
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

/// The single remote track a two-member call delivers.
fn only_track(peer: &RtcPeer) -> Result<crate::rtc_peer::RemoteTrackRecord, String> {
    let mut tracks = peer.received();
    match tracks.len() {
        1 => Ok(tracks.remove(0)),
        n => Err(format!(
            "[{}] expected exactly 1 remote track, got {n}: {:?}",
            peer.name,
            tracks.iter().map(|t| &t.track_id).collect::<Vec<_>>()
        )),
    }
}
