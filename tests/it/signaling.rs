//! The signaling protocol end to end: join, relay, leave, room lifetime,
//! every error code in docs/protocol.md, auth, and limits.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use confab::auth::{self, Claims, Grants};
use confab::config::Config;

use crate::common::*;

const QUIET: Duration = Duration::from_millis(300);
const SECRET: &str = "test-secret-0123456789";

/// Asserts that `c` receives nothing for a while (others are unaffected).
async fn assert_quiet(c: &mut WsClient) {
    if let Some(v) = c.try_recv_json(QUIET).await {
        panic!("expected silence, got {v}");
    }
}

/// Asserts that the socket still answers pings (it was left open).
async fn assert_open(c: &mut WsClient) {
    c.send_json(json!({"type": "ping", "id": "still-open"}))
        .await;
    // Earlier pings may still be answered first.
    while c.recv_type("pong").await["id"] != "still-open" {}
}

#[tokio::test]
async fn join_pair_relay_and_leave() {
    let server = start_server().await;
    let room = room_name("pair");
    let (mut a, ja) = join(server.addr, &room, "Ada").await;
    assert_eq!(ja["v"], 2);
    assert_eq!(ja["room"], room.as_str());
    assert_eq!(ja["members"], json!([]));
    assert_eq!(ja["mode"]["mode"], "p2p");
    assert_eq!(ja["mode"]["peer"], json!(null));
    assert!(ja["ice_servers"].is_array());
    let a_id = ja["participant_id"].as_str().unwrap().to_owned();

    let (mut b, jb) = join(server.addr, &room, "Grace").await;
    let b_id = jb["participant_id"].as_str().unwrap().to_owned();
    assert_ne!(a_id, b_id);
    assert_eq!(jb["members"][0]["id"], a_id.as_str());
    assert_eq!(jb["members"][0]["name"], "Ada");
    assert_eq!(jb["mode"]["peer"], a_id.as_str());
    assert_eq!(jb["mode"]["polite"], false, "the later joiner is impolite");

    let pj = a.recv_json().await;
    assert_eq!(pj["type"], "participant_joined");
    assert_eq!(pj["participant"]["id"], b_id.as_str());
    assert_eq!(pj["participant"]["name"], "Grace");
    let mode = a.recv_json().await;
    assert_eq!(mode["type"], "mode");
    assert_eq!(mode["peer"], b_id.as_str());
    assert_eq!(mode["polite"], true);
    assert_eq!(mode["epoch"], jb["mode"]["epoch"]);

    // Offer, answer and candidate are relayed with `from`, unchanged.
    let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\n";
    b.send_json(json!({"type": "offer", "to": a_id, "sdp": sdp}))
        .await;
    let offer = a.recv_json().await;
    assert_eq!(offer, json!({"type": "offer", "from": b_id, "sdp": sdp}));
    a.send_json(json!({"type": "answer", "to": b_id, "sdp": "v=0\r\n"}))
        .await;
    let answer = b.recv_json().await;
    assert_eq!(
        answer,
        json!({"type": "answer", "from": a_id, "sdp": "v=0\r\n"})
    );
    let cand = json!({"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host",
                      "sdp_mid": "0", "sdp_mline_index": 0, "username_fragment": "uf"});
    a.send_json(json!({"type": "candidate", "to": b_id, "candidate": cand}))
        .await;
    let got = b.recv_json().await;
    assert_eq!(
        got,
        json!({"type": "candidate", "from": a_id, "candidate": cand})
    );

    // Mute state reaches the other member.
    a.send_json(json!({"type": "media_state", "audio_muted": true, "video_muted": false}))
        .await;
    let upd = b.recv_json().await;
    assert_eq!(
        upd,
        json!({"type": "participant_updated", "id": a_id, "audio_muted": true, "video_muted": false, "screen": false})
    );

    // Leave: closed with 1000, the other is told, the mode drops the pair.
    b.send_json(json!({"type": "leave"})).await;
    b.expect_close(1000).await;
    let left = a.recv_json().await;
    assert_eq!(
        left,
        json!({"type": "participant_left", "id": b_id, "reason": "left"})
    );
    let mode = a.recv_json().await;
    assert_eq!(mode["type"], "mode");
    assert_eq!(mode["peer"], json!(null));
    assert!(mode["epoch"].as_u64() > jb["mode"]["epoch"].as_u64());
    server.shutdown().await;
}

#[tokio::test]
async fn ping_pong_echoes_id() {
    let server = start_server().await;
    let (mut a, _) = join(server.addr, &room_name("ping"), "Ada").await;
    a.send_json(json!({"type": "ping", "id": 42})).await;
    assert_eq!(a.recv_json().await, json!({"type": "pong", "id": 42}));
    a.send_json(json!({"type": "ping"})).await;
    assert_eq!(a.recv_json().await, json!({"type": "pong", "id": null}));
}

#[tokio::test]
async fn empty_room_is_removed_after_timeout_and_kept_on_quick_rejoin() {
    let cfg = Config {
        empty_room_timeout: Duration::from_millis(300),
        ..test_config()
    };
    let server = start_server_with(cfg).await;
    let room = room_name("cleanup");
    let (mut a, _) = join(server.addr, &room, "Ada").await;
    assert!(server.rooms.contains(&room));
    a.send_json(json!({"type": "leave"})).await;
    a.expect_close(1000).await;
    // A rejoin within the timeout finds the same room alive.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut a2, _) = join(server.addr, &room, "Ada").await;
    assert!(server.rooms.contains(&room));
    a2.send_json(json!({"type": "leave"})).await;
    a2.expect_close(1000).await;
    assert!(
        eventually(Duration::from_secs(3), || !server.rooms.contains(&room)).await,
        "empty room removed"
    );
    assert_eq!(server.metrics.rooms.get(), 0);
    assert_eq!(server.metrics.participants.get(), 0);
    // And the id can be used again.
    let (_a3, j) = join(server.addr, &room, "Ada").await;
    assert_eq!(j["members"], json!([]));
}

#[tokio::test]
async fn abrupt_disconnect_is_noticed_within_a_second() {
    let server = start_server().await;
    let room = room_name("abrupt");
    let (mut a, _) = join(server.addr, &room, "Ada").await;
    let (b, jb) = join(server.addr, &room, "Grace").await;
    let b_id = jb["participant_id"].clone();
    a.recv_type("mode").await;
    // Drop the TCP connection without a close frame.
    drop(b);
    let started = tokio::time::Instant::now();
    let left = a.recv_type("participant_left").await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "told within 1 s"
    );
    assert_eq!(left["id"], b_id);
    assert_eq!(left["reason"], "disconnected");
}

#[tokio::test]
async fn bad_messages_after_join_get_errors_and_keep_socket_open() {
    let server = start_server().await;
    let room = room_name("bad");
    let (mut a, ja) = join(server.addr, &room, "Ada").await;
    let a_id = ja["participant_id"].as_str().unwrap().to_owned();
    let (mut b, jb) = join(server.addr, &room, "Grace").await;
    let b_id = jb["participant_id"].as_str().unwrap().to_owned();
    a.recv_type("mode").await;

    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("{not json".into()), "bad_json"),
        (Message::Text("[1,2,3]".into()), "bad_json"),
        (Message::Text(r#"{"no_type":1}"#.into()), "unknown_type"),
        (
            Message::Text(r#"{"type":"teleport"}"#.into()),
            "unknown_type",
        ),
        (Message::Text(r#"{"type":7}"#.into()), "unknown_type"),
        (
            Message::Text(r#"{"type":"offer","to":"x"}"#.into()),
            "bad_message",
        ),
        (
            Message::Text(r#"{"type":"offer","to":1,"sdp":"v=0"}"#.into()),
            "bad_message",
        ),
        (
            Message::Text(r#"{"type":"candidate","to":"x","candidate":"c"}"#.into()),
            "bad_message",
        ),
        (
            Message::Text(
                r#"{"type":"media_state","audio_muted":"yes","video_muted":false}"#.into(),
            ),
            "bad_message",
        ),
        (
            Message::Binary(vec![1u8, 2, 3].into()),
            "binary_unsupported",
        ),
        (
            Message::Text(
                json!({"type":"join","v":2,"room":room,"name":"again"})
                    .to_string()
                    .into(),
            ),
            "already_joined",
        ),
        (
            Message::Text(
                json!({"type":"offer","to":"p-nobody","sdp":"v=0"})
                    .to_string()
                    .into(),
            ),
            "not_a_member",
        ),
        (
            Message::Text(
                json!({"type":"offer","to":b_id,"sdp":"v=0"})
                    .to_string()
                    .into(),
            ),
            "not_a_member",
        ),
        (
            Message::Text(
                json!({"type":"offer","to":"p-x","sdp":"a=x\n".repeat(10_001)})
                    .to_string()
                    .into(),
            ),
            "bad_message",
        ),
        (
            Message::Text(
                json!({"type":"offer","to":"sfu","sdp":"v=0"})
                    .to_string()
                    .into(),
            ),
            "bad_message",
        ),
        (
            // No offer is outstanding on a leg whose offer was already
            // answered... or the SDP is not an answer at all: refused either way.
            Message::Text(
                json!({"type":"answer","to":"sfu","sdp":"v=0"})
                    .to_string()
                    .into(),
            ),
            "bad_message",
        ),
    ];
    for (msg, code) in cases {
        b.send_raw(msg.clone()).await.unwrap();
        let v = b.recv_type("error").await;
        assert_eq!(v["code"], code, "for {msg:?}: {v}");
    }
    assert_open(&mut b).await;
    // The other member noticed none of it.
    assert_quiet(&mut a).await;
    // And the pair still relays.
    b.send_json(json!({"type": "offer", "to": a_id, "sdp": "v=0"}))
        .await;
    assert_eq!(a.recv_json().await["type"], "offer");
    assert!(server.metrics.errors.with_label_values(&["bad_json"]).get() >= 2);
}

#[tokio::test]
async fn bad_messages_before_join_close_the_socket() {
    let server = start_server().await;
    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("nope".into()), "bad_json"),
        (Message::Text(r#"{"type":"warp"}"#.into()), "unknown_type"),
        (
            Message::Text(r#"{"type":"join","v":2}"#.into()),
            "bad_message",
        ),
        (Message::Binary(vec![0u8; 4].into()), "binary_unsupported"),
        (
            Message::Text(r#"{"type":"offer","to":"p-1","sdp":"v=0"}"#.into()),
            "not_joined",
        ),
        (Message::Text(r#"{"type":"ping"}"#.into()), "not_joined"),
        (
            Message::Text(r#"{"type":"join","v":1,"room":"r","name":"n"}"#.into()),
            "unsupported_version",
        ),
        (
            Message::Text(r#"{"type":"join","v":2,"room":"a b","name":"n"}"#.into()),
            "invalid_room",
        ),
        (
            Message::Text(r#"{"type":"join","v":2,"room":"","name":"n"}"#.into()),
            "invalid_room",
        ),
        (
            Message::Text(
                json!({"type":"join","v":2,"room":"x".repeat(65),"name":"n"})
                    .to_string()
                    .into(),
            ),
            "invalid_room",
        ),
        (
            Message::Text(r#"{"type":"join","v":2,"room":"r","name":"  "}"#.into()),
            "invalid_name",
        ),
        (
            Message::Text(
                json!({"type":"join","v":2,"room":"r","name":"a\u{0}b"})
                    .to_string()
                    .into(),
            ),
            "invalid_name",
        ),
        (
            Message::Text(
                json!({"type":"join","v":2,"room":"r","name":"n".repeat(65)})
                    .to_string()
                    .into(),
            ),
            "invalid_name",
        ),
    ];
    for (msg, code) in cases {
        let mut c = WsClient::connect(server.addr).await;
        c.send_raw(msg.clone()).await.unwrap();
        let v = c.recv_json().await;
        assert_eq!(v["type"], "error", "for {msg:?}");
        assert_eq!(v["code"], code, "for {msg:?}: {v}");
        c.expect_close(1008).await;
    }
    assert_eq!(server.metrics.participants.get(), 0);
}

#[tokio::test]
async fn join_beyond_the_room_limit_is_refused_with_room_full() {
    let mut cfg = test_config();
    cfg.limits.max_participants = 2;
    let server = start_server_with(cfg).await;
    let room = room_name("full");
    let (mut a, _) = join(server.addr, &room, "A").await;
    let (mut b, _) = join(server.addr, &room, "B").await;
    a.recv_type("mode").await;
    let mut c = WsClient::connect(server.addr).await;
    c.send_json(json!({"type": "join", "v": 2, "room": room, "name": "C"}))
        .await;
    c.expect_error("room_full", Some(1008)).await;
    assert_quiet(&mut a).await;
    assert_quiet(&mut b).await;
}

#[tokio::test]
async fn join_deadline_closes_silent_sockets() {
    let mut cfg = test_config();
    cfg.limits.join_timeout = Duration::from_millis(300);
    let server = start_server_with(cfg).await;
    let mut c = WsClient::connect(server.addr).await;
    let started = tokio::time::Instant::now();
    c.expect_error("join_timeout", Some(1008)).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test]
async fn oversized_message_closes_with_1009_and_harms_nobody() {
    let server = start_server().await;
    let room = room_name("big");
    let (mut a, ja) = join(server.addr, &room, "A").await;
    let (mut b, _) = join(server.addr, &room, "B").await;
    a.recv_type("mode").await;
    let a_id = ja["participant_id"].as_str().unwrap();
    let huge = json!({"type": "offer", "to": a_id, "sdp": "x".repeat(70 * 1024)});
    // The server may close before the whole frame is written.
    let _ = b.send_raw(Message::Text(huge.to_string().into())).await;
    b.expect_close(1009).await;
    let left = a.recv_type("participant_left").await;
    assert_eq!(left["reason"], "disconnected");
    assert_open(&mut a).await;
    // The room survives: someone else can join and pair with A.
    let (_c, jc) = join(server.addr, &room, "C").await;
    assert_eq!(jc["mode"]["peer"], a_id);
}

#[tokio::test]
async fn message_rate_is_limited_then_flooder_is_closed() {
    let mut cfg = test_config();
    cfg.limits.rate_per_sec = 5.0;
    cfg.limits.rate_burst = 5.0;
    cfg.limits.max_rate_drops = 30;
    let server = start_server_with(cfg).await;
    let room = room_name("rate");
    let (mut a, _) = join(server.addr, &room, "A").await;
    let (mut b, _) = join(server.addr, &room, "B").await;
    a.recv_type("mode").await;

    // A burst of 20: five pass, then `rate_limited` (once per second).
    for i in 0..20 {
        b.send_json(json!({"type": "ping", "id": i})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    while let Some(v) = b.try_recv_json(QUIET).await {
        match v["type"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") => {
                assert_eq!(v["code"], "rate_limited");
                limited += 1;
            }
            _ => panic!("unexpected {v}"),
        }
    }
    assert!(
        (5..=6).contains(&pongs),
        "burst of 5 (+refill) answered, got {pongs}"
    );
    assert_eq!(limited, 1, "one rate_limited error per second");

    // Keep flooding (bounded): after 30 drops the socket is closed with 1008.
    for i in 0..100 {
        if b.send_raw(Message::Text(
            json!({"type":"ping","id":i}).to_string().into(),
        ))
        .await
        .is_err()
        {
            break;
        }
    }
    b.expect_close(1008).await;
    let left = a.recv_type("participant_left").await;
    assert_eq!(left["reason"], "kicked");
    assert_open(&mut a).await;
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_and_others_are_fine() {
    let mut cfg = test_config();
    cfg.limits.outbound_queue = 8;
    cfg.limits.rate_per_sec = 100_000.0;
    cfg.limits.rate_burst = 100_000.0;
    let server = start_server_with(cfg).await;
    let room = room_name("slow");
    // A joins and then never reads again.
    let (mut a, ja) = join(server.addr, &room, "A").await;
    let a_id = ja["participant_id"].as_str().unwrap().to_owned();
    let (mut b, _) = join(server.addr, &room, "B").await;
    let _ = &mut a; // keep A's socket open, never read
                    // B relays large offers to A in lockstep (each followed by a ping whose
                    // pong B awaits, so B itself is never behind) until the server gives up
                    // on A. Bounded: 400 × 60 KiB = 24 MiB, far beyond socket buffers.
    let sdp = "x".repeat(60 * 1024);
    let mut left = None;
    'outer: for i in 0..400 {
        b.send_json(json!({"type": "offer", "to": a_id, "sdp": sdp}))
            .await;
        b.send_json(json!({"type": "ping", "id": i})).await;
        loop {
            let v = b.recv_json().await;
            match v["type"].as_str() {
                Some("pong") if v["id"] == i => break,
                Some("participant_left") => {
                    left = Some(v);
                    break 'outer;
                }
                _ => {}
            }
        }
    }
    let left = left.expect("the non-reading client was removed");
    assert_eq!(left["id"], a_id.as_str());
    assert_eq!(left["reason"], "kicked");
    assert_open(&mut b).await;
    assert_eq!(
        server.metrics.participants.get(),
        1,
        "B is still in the room"
    );
    // A reads at last (within the server's 2 s close grace): behind the
    // backlog it finds why it was dropped, then the close.
    let mut code = None;
    let close = loop {
        match a.next_event(STEP).await {
            Some(Event::Json(v)) if v["type"] == "error" => code = Some(v["code"].clone()),
            Some(Event::Json(_)) => {}
            Some(Event::Close(c)) => break c,
            other => panic!("expected the backlog and a close, got {other:?}"),
        }
    };
    assert_eq!(code, Some(json!("slow_consumer")));
    assert_eq!(close, Some(1008));
}

#[tokio::test]
async fn connection_cap_refuses_upgrades() {
    let mut cfg = test_config();
    cfg.limits.max_connections = 2;
    let server = start_server_with(cfg).await;
    let _a = WsClient::connect(server.addr).await;
    let _b = WsClient::connect(server.addr).await;
    let third = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr)).await;
    let err = third.expect_err("third connection refused").to_string();
    assert!(err.contains("503"), "{err}");
    assert_eq!(server.metrics.connections_refused.get(), 1);
}

#[tokio::test]
async fn shutdown_tells_every_client() {
    let server = start_server().await;
    let (mut a, _) = join(server.addr, &room_name("down"), "A").await;
    let shutdown = tokio::spawn(server.shutdown());
    a.expect_error("server_shutdown", Some(1001)).await;
    shutdown.await.unwrap();
}

// ---- auth ----------------------------------------------------------------

fn secret_config() -> Config {
    Config {
        jwt_secret: Some(SECRET.into()),
        ..test_config()
    }
}

fn join_msg(room: &str, token: Option<String>) -> serde_json::Value {
    json!({"type": "join", "v": 2, "room": room, "name": "N", "token": token})
}

#[tokio::test]
async fn tokens_are_checked() {
    let server = start_server_with(secret_config()).await;
    let room = room_name("auth");
    let good = auth::issue(SECRET, &room, "ada", Some("Ada L."), 60, Grants::default());
    let (_a, ja) = join_with(server.addr, join_msg(&room, Some(good.clone()))).await;
    assert!(ja["participant_id"].is_string());

    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let claims = |exp: u64, nbf: Option<u64>, room: &str| Claims {
        sub: "x".into(),
        room: room.into(),
        exp,
        nbf,
        name: None,
        grants: Grants::default(),
    };
    let now = auth::now_secs();
    let payload = format!(r#"{{"sub":"x","room":"{room}","exp":{}}}"#, now + 60);
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "token_required"),
        (Some("not.a.jwt".into()), "token_invalid"),
        (
            Some(auth::issue(
                "another-secret-0123456",
                &room,
                "x",
                None,
                60,
                Grants::default(),
            )),
            "token_invalid",
        ),
        (
            Some(format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&payload)
            )),
            "token_algorithm",
        ),
        (
            Some(format!(
                "{}.{}.c2ln",
                b64(r#"{"alg":"HS384","typ":"JWT"}"#),
                b64(&payload)
            )),
            "token_algorithm",
        ),
        (
            Some(auth::encode_claims(SECRET, &claims(now - 5, None, &room))),
            "token_expired",
        ),
        (
            Some(auth::encode_claims(
                SECRET,
                &claims(now + 60, Some(now + 600), &room),
            )),
            "token_expired",
        ),
        (
            Some(auth::issue(
                SECRET,
                "other-room",
                "x",
                None,
                60,
                Grants::default(),
            )),
            "token_wrong_room",
        ),
        (
            Some(auth::issue(
                SECRET,
                &room,
                "x",
                None,
                60,
                Grants {
                    join: false,
                    ..Grants::default()
                },
            )),
            "token_no_join",
        ),
    ];
    for (token, code) in cases {
        let mut c = WsClient::connect(server.addr).await;
        c.send_json(join_msg(&room, token.clone())).await;
        let v = c.recv_json().await;
        assert_eq!(v["code"], code, "token {token:?}: {v}");
        c.expect_close(1008).await;
    }
}

#[tokio::test]
async fn token_name_wins_and_same_identity_replaces_old_socket() {
    let server = start_server_with(secret_config()).await;
    let room = room_name("replace");
    let ada = auth::issue(SECRET, &room, "ada", Some("Ada L."), 60, Grants::default());
    let bob = auth::issue(SECRET, &room, "bob", None, 60, Grants::default());
    let (mut a1, ja1) = join_with(server.addr, join_msg(&room, Some(ada.clone()))).await;
    let (mut b, jb) = join_with(server.addr, join_msg(&room, Some(bob))).await;
    assert_eq!(jb["members"][0]["name"], "Ada L.", "the token's name wins");
    a1.recv_type("mode").await;
    // Ada again, from a second tab: the first socket is replaced.
    let (_a2, ja2) = join_with(server.addr, join_msg(&room, Some(ada))).await;
    a1.expect_error("replaced", Some(1008)).await;
    let left = b.recv_type("participant_left").await;
    assert_eq!(left["id"], ja1["participant_id"]);
    assert_eq!(left["reason"], "replaced");
    let joined = b.recv_type("participant_joined").await;
    assert_eq!(joined["participant"]["id"], ja2["participant_id"]);
    assert_eq!(ja2["members"].as_array().unwrap().len(), 1);
}

// ---- HTTP -------------------------------------------------------------------

#[tokio::test]
async fn serves_client_health_and_metrics() {
    let server = start_server().await;
    let (status, body) = http_get(server.addr, "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("<html") || body.contains("<!doctype") || body.contains("<!DOCTYPE"));
    assert!(body.contains("app.js"));
    let (status, body) = http_get(server.addr, "/app.js").await;
    assert_eq!(status, 200);
    assert!(body.contains("WebSocket"));
    assert_eq!(http_get(server.addr, "/style.css").await.0, 200);
    assert_eq!(
        http_get(server.addr, "/healthz").await,
        (200, "ok\n".into())
    );
    assert_eq!(
        http_get(server.addr, "/readyz").await,
        (200, "ready\n".into())
    );
    let (mut a, _) = join(server.addr, &room_name("metrics"), "A").await;
    // A client's report of a switch gap feeds the histogram; messages are
    // counted by type, bad ones as `invalid`.
    a.send_json(json!({"type": "switch_report", "epoch": 1, "to": "sfu", "gap_ms": 140}))
        .await;
    a.send_text("{oops".into()).await;
    a.expect_error("bad_json", None).await;
    a.send_json(json!({"type": "ping", "id": 1})).await;
    a.recv_type("pong").await;
    let (status, body) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("confab_participants 1"), "{body}");
    assert!(body.contains("confab_rooms 1"), "{body}");
    for line in [
        "confab_signaling_messages_total{type=\"join\"} 1",
        "confab_signaling_messages_total{type=\"switch_report\"} 1",
        "confab_signaling_messages_total{type=\"invalid\"} 1",
        "confab_errors_total{code=\"bad_json\"} 1",
        "confab_mode_switch_gap_seconds_count{to=\"sfu\"} 1",
        "confab_mode_switch_gap_seconds_bucket{to=\"sfu\",le=\"0.2\"} 1",
        "confab_mode_switch_gap_seconds_bucket{to=\"sfu\",le=\"0.1\"} 0",
        "confab_draining 0",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
    ] {
        assert!(body.contains(line), "missing {line}: {body}");
    }
    assert_eq!(http_get(server.addr, "/nope").await.0, 404);
}

#[tokio::test]
async fn never_p2p_rooms_start_and_stay_server_routed() {
    let mut cfg = test_config();
    cfg.never_p2p_rooms = vec!["hall-*".into()];
    let server = start_server_with(cfg).await;
    let hall = room_name("hall");
    let (mut a, ja) = join(server.addr, &hall, "A").await;
    assert_eq!(ja["mode"]["mode"], "sfu");
    let (_b, jb) = join(server.addr, &hall, "B").await;
    assert_eq!(
        jb["mode"]["mode"], "sfu",
        "two members, still server-routed"
    );
    assert_eq!(jb["mode"]["peer"], json!(null));
    // A sees B arrive but no mode change: the room never pairs.
    a.recv_type("participant_joined").await;
    assert_quiet(&mut a).await;
    // Other rooms keep the default policy.
    let (_c, jc) = join(server.addr, &room_name("standup"), "C").await;
    assert_eq!(jc["mode"]["mode"], "p2p");
}

#[tokio::test]
async fn joins_are_limited_per_client_address() {
    let mut cfg = test_config();
    cfg.limits.join_rate_per_ip = 0.5;
    cfg.limits.join_burst_per_ip = 3.0;
    cfg.limits.join_rate_exempt_loopback = false;
    let server = start_server_with(cfg).await;
    let room = room_name("joinrate");
    let first: std::net::IpAddr = "127.0.0.3".parse().unwrap();
    let mut kept = Vec::new();
    for i in 0..3 {
        let mut c = WsClient::connect_from(server.addr, first).await;
        c.send_json(
            json!({"type": "join", "v": PROTOCOL_VERSION, "room": room, "name": format!("m{i}")}),
        )
        .await;
        assert_eq!(c.recv_json().await["type"], "joined");
        kept.push(c);
    }
    // The burst is spent: the next join from that address is refused ...
    let mut c = WsClient::connect_from(server.addr, first).await;
    c.send_json(json!({"type": "join", "v": PROTOCOL_VERSION, "room": room, "name": "m3"}))
        .await;
    c.expect_error("too_many_joins", Some(1008)).await;
    // ... another address is not affected, and neither are the members.
    let other: std::net::IpAddr = "127.0.0.4".parse().unwrap();
    let mut d = WsClient::connect_from(server.addr, other).await;
    d.send_json(json!({"type": "join", "v": PROTOCOL_VERSION, "room": room, "name": "other"}))
        .await;
    assert_eq!(d.recv_json().await["type"], "joined");
    kept[0].send_json(json!({"type": "ping", "id": 9})).await;
    assert_eq!(kept[0].recv_type("pong").await["id"], 9);
    assert_eq!(server.metrics.participants.get(), 4);
    assert_eq!(
        server
            .metrics
            .errors
            .with_label_values(&["too_many_joins"])
            .get(),
        1
    );
}

#[tokio::test]
async fn behind_a_proxy_the_join_limit_uses_x_forwarded_for() {
    let mut cfg = test_config();
    cfg.limits.join_rate_per_ip = 0.1;
    cfg.limits.join_burst_per_ip = 1.0;
    cfg.limits.trust_forwarded_for = true;
    let server = start_server_with(cfg).await;
    let room = room_name("xff");
    let join_as =
        |name: &str| json!({"type": "join", "v": PROTOCOL_VERSION, "room": room, "name": name});
    // Loopback is exempt, but the forwarded address is not.
    let mut a = WsClient::connect_forwarded(server.addr, "198.51.100.7, 203.0.113.9").await;
    a.send_json(join_as("a")).await;
    assert_eq!(a.recv_json().await["type"], "joined");
    let mut b = WsClient::connect_forwarded(server.addr, "203.0.113.9").await;
    b.send_json(join_as("b")).await;
    b.expect_error("too_many_joins", Some(1008)).await;
    let mut c = WsClient::connect_forwarded(server.addr, "203.0.113.10").await;
    c.send_json(join_as("c")).await;
    assert_eq!(c.recv_json().await["type"], "joined");
    // Without the header: the peer address (loopback, exempt).
    let (_d, _) = join(server.addr, &room, "d").await;
}

#[tokio::test]
async fn the_room_after_the_last_allowed_one_is_refused() {
    let mut cfg = test_config();
    cfg.limits.max_rooms = 3;
    let server = start_server_with(cfg).await;
    let rooms: Vec<String> = (0..3).map(|i| room_name(&format!("cap{i}"))).collect();
    let mut members = Vec::new();
    for r in &rooms {
        members.push(join(server.addr, r, "m").await.0);
    }
    let mut extra = WsClient::connect(server.addr).await;
    extra
        .send_json(
            json!({"type": "join", "v": PROTOCOL_VERSION, "room": room_name("cap3"), "name": "x"}),
        )
        .await;
    extra.expect_error("too_many_rooms", Some(1008)).await;
    // Existing rooms still admit members.
    let (_more, joined) = join(server.addr, &rooms[0], "second").await;
    assert_eq!(joined["members"].as_array().unwrap().len(), 1);
    assert_eq!(server.metrics.rooms.get(), 3);
}

#[tokio::test]
async fn signaling_never_crosses_rooms() {
    let server = start_server().await;
    let (mut a, _) = join(server.addr, &room_name("cross-a"), "A").await;
    let (mut b, jb) = join(server.addr, &room_name("cross-b"), "B").await;
    let b_id = jb["participant_id"].as_str().unwrap().to_owned();
    // A knows (or guesses) B's participant id: it is still not A's peer.
    for ty in ["offer", "answer"] {
        a.send_json(json!({"type": ty, "to": b_id, "sdp": "v=0"}))
            .await;
        a.expect_error("not_a_member", None).await;
    }
    a.send_json(json!({"type": "candidate", "to": b_id, "candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host"}}))
        .await;
    a.expect_error("not_a_member", None).await;
    a.send_json(json!({"type": "media_state", "audio_muted": true, "video_muted": true}))
        .await;
    // B got none of it.
    b.send_json(json!({"type": "ping", "id": "b"})).await;
    let next = b.recv_json().await;
    assert_eq!(
        next["type"], "pong",
        "B saw something from another room: {next}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooder_is_closed_while_others_keep_a_low_round_trip_time() {
    let server = start_server().await;
    let room = room_name("flood");
    let (mut a, _) = join(server.addr, &room, "A").await;
    let (flooder, _) = join(server.addr, &room, "F").await;
    a.recv_type("participant_joined").await;
    let (mut f_tx, mut f_rx) = flooder.into_split();
    // Bounded: at most 20,000 messages or until the server closes it.
    let flood = tokio::spawn(async move {
        let mut sent = 0u32;
        for i in 0..20_000u32 {
            if f_tx
                .try_send_json(json!({"type": "ping", "id": i}))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        sent
    });
    let drain = tokio::spawn(async move { while f_rx.recv_json().await.is_some() {} });
    let mut rtts = Vec::new();
    let mut left = None;
    for i in 0..20 {
        let t0 = std::time::Instant::now();
        a.send_json(json!({"type": "ping", "id": i})).await;
        loop {
            let v = a.recv_json().await;
            if v["type"] == "pong" && v["id"] == i {
                break;
            }
            if v["type"] == "participant_left" {
                left = Some(v);
            }
        }
        rtts.push(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = tokio::time::timeout(STEP, flood).await.unwrap().unwrap();
    let _ = tokio::time::timeout(STEP, drain).await;
    let left = match left {
        Some(v) => v,
        None => a.recv_type("participant_left").await,
    };
    assert_eq!(left["reason"], "kicked", "the flooder was removed");
    rtts.sort();
    let (median, max) = (rtts[rtts.len() / 2], rtts[rtts.len() - 1]);
    println!(
        "flood: the flooder got {sent} messages out before it was closed; \
         the other member's ping RTT median {median:?}, max {max:?}"
    );
    assert!(
        max < Duration::from_millis(500),
        "RTT {max:?} during a flood"
    );
    assert!(
        server
            .metrics
            .errors
            .with_label_values(&["rate_limited"])
            .get()
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_reaches_the_room_or_one_member_and_nobody_else() {
    let server = start_server().await;
    let room = room_name("chat");
    let (mut a, ja) = join(server.addr, &room, "Ada").await;
    let (mut b, jb) = join(server.addr, &room, "Bob").await;
    let (mut c, _) = join(server.addr, &room, "Cy").await;
    let (mut stranger, js) = join(server.addr, &room_name("chat-other"), "S").await;
    let stranger_id = js["participant_id"].as_str().unwrap().to_owned();
    let a_id = ja["participant_id"].as_str().unwrap().to_owned();
    let b_id = jb["participant_id"].as_str().unwrap().to_owned();
    a.recv_type("participant_joined").await;
    a.recv_type("participant_joined").await;
    b.recv_type("participant_joined").await;

    // To the room: everyone else, with the sender's id and name; not echoed.
    let text = "héllo <b>world</b>\nsecond line";
    a.send_json(json!({"type": "chat", "text": text})).await;
    for rx in [&mut b, &mut c] {
        let m = rx.recv_type("chat").await;
        assert_eq!(m["from"], a_id.as_str());
        assert_eq!(m["name"], "Ada");
        assert_eq!(m["text"], text, "the text arrives unchanged");
        assert_eq!(m["private"], false);
        let at = m["at"].as_u64().expect("a timestamp");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(at <= now && now - at < 10_000, "at {at}, now {now}");
    }
    // To one member: only that one, marked private.
    a.send_json(json!({"type": "chat", "text": "just you", "to": b_id}))
        .await;
    let m = b.recv_type("chat").await;
    assert_eq!(
        (m["text"].as_str(), m["private"].as_bool()),
        (Some("just you"), Some(true))
    );
    // No chat reached c, a or the other room before the answer to a ping
    // (other news, such as mode changes, may).
    for rx in [&mut c, &mut a, &mut stranger] {
        rx.send_json(json!({"type": "ping", "id": "x"})).await;
        loop {
            let next = rx.recv_json().await;
            assert_ne!(next["type"], "chat", "unexpected: {next}");
            if next["type"] == "pong" {
                break;
            }
        }
    }

    // Bad chats: errors to the sender, the socket stays open.
    for bad in [
        json!({"type": "chat", "text": ""}),
        json!({"type": "chat", "text": "  \n\t "}),
        json!({"type": "chat", "text": "x".repeat(2_001)}),
        json!({"type": "chat"}),
        json!({"type": "chat", "text": 5}),
    ] {
        a.send_json(bad).await;
        a.expect_error("bad_message", None).await;
    }
    // 2,000 characters (multi-byte) are fine.
    a.send_json(json!({"type": "chat", "text": "é".repeat(2_000)}))
        .await;
    assert_eq!(
        b.recv_type("chat").await["text"]
            .as_str()
            .unwrap()
            .chars()
            .count(),
        2_000
    );
    // To oneself, to a member of another room, to nobody known.
    for to in [a_id.as_str(), stranger_id.as_str(), "p-ffffffff", "sfu"] {
        a.send_json(json!({"type": "chat", "text": "hi", "to": to}))
            .await;
        a.expect_error("not_a_member", None).await;
    }
    stranger.send_json(json!({"type": "ping", "id": "s"})).await;
    let next = stranger.recv_json().await;
    assert_eq!(next["type"], "pong", "a chat crossed rooms: {next}");

    // The chat rate: a burst of 10, then refusals (the socket stays open),
    // and delivery again once the bucket refills (2/s).
    let (mut d, _) = join(server.addr, &room, "Dee").await;
    for rx in [&mut a, &mut b, &mut c] {
        rx.recv_type("participant_joined").await;
    }
    for i in 0..15 {
        d.send_json(json!({"type": "chat", "text": format!("m{i}")}))
            .await;
    }
    let mut refused = 0;
    for _ in 0..5 {
        let e = d.recv_type("error").await;
        assert_eq!(e["code"], "rate_limited");
        refused += 1;
    }
    let mut delivered = Vec::new();
    while let Some(m) = b.try_recv_json(Duration::from_millis(300)).await {
        if m["type"] == "chat" {
            delivered.push(m["text"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(delivered.len(), 10, "{delivered:?}");
    assert_eq!(refused, 5);
    tokio::time::sleep(Duration::from_millis(600)).await;
    d.send_json(json!({"type": "chat", "text": "later"})).await;
    assert_eq!(b.recv_type("chat").await["text"], "later");
}

#[tokio::test]
async fn screen_sharing_reaches_members_and_newcomers() {
    let server = start_server().await;
    let room = room_name("screen");
    let (mut a, ja) = join(server.addr, &room, "Ada").await;
    let a_id = ja["participant_id"].as_str().unwrap().to_owned();
    // `screen` is optional: absent means false.
    a.send_json(
        json!({"type": "media_state", "audio_muted": false, "video_muted": true, "screen": true}),
    )
    .await;
    // A newcomer learns it from `joined`...
    let (mut b, jb) = join(server.addr, &room, "Bob").await;
    assert_eq!(
        jb["members"],
        json!([{"id": a_id, "name": "Ada", "audio_muted": false, "video_muted": true, "screen": true}])
    );
    // ...the others from `participant_joined`, with the newcomer's state.
    let joined = a.recv_type("participant_joined").await;
    assert_eq!(joined["participant"]["screen"], false);
    // Stopping is announced too.
    a.send_json(json!({"type": "media_state", "audio_muted": false, "video_muted": true}))
        .await;
    let upd = b.recv_type("participant_updated").await;
    assert_eq!(
        upd,
        json!({"type": "participant_updated", "id": a_id, "audio_muted": false, "video_muted": true, "screen": false})
    );
    server.shutdown().await;
}
