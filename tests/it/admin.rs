//! The admin API (`src/admin.rs`): bearer token, listing rooms, removing
//! participants, and where it is served.

use serde_json::{json, Value};

use crate::common::*;

const TOKEN: &str = "admin-token-for-tests-0123";

async fn admin(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http_request(addr, method, path, &headers).await
}

#[tokio::test]
async fn without_a_token_the_admin_api_does_not_exist() {
    let server = start_server().await;
    assert_eq!(
        admin(server.addr, "GET", "/admin/rooms", Some(TOKEN))
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn operators_list_rooms_and_remove_participants() {
    let mut cfg = test_config();
    cfg.admin_token = Some(TOKEN.into());
    let server = start_server_with(cfg).await;
    let room = room_name("admin");
    let (mut a, ja) = join(server.addr, &room, "Ada").await;
    let (mut b, jb) = join(server.addr, &room, "Bob").await;
    let (mut c, _) = join(server.addr, &room, "Cy").await;
    let (a_id, b_id) = (
        ja["participant_id"].as_str().unwrap().to_owned(),
        jb["participant_id"].as_str().unwrap().to_owned(),
    );

    // The token is required, and must be the right one.
    for token in [None, Some("wrong-token-wrong-token"), Some("")] {
        let (status, _) = admin(server.addr, "GET", "/admin/rooms", token).await;
        assert_eq!(status, 401, "token {token:?}");
    }
    let (status, _) = admin(
        server.addr,
        "DELETE",
        &format!("/admin/rooms/{room}"),
        Some("wrong-token-wrong-token"),
    )
    .await;
    assert_eq!(status, 401);

    let (status, body) = admin(server.addr, "GET", "/admin/rooms", Some(TOKEN)).await;
    assert_eq!(status, 200);
    let rooms: Value = serde_json::from_str(&body).unwrap();
    let listed = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == room.as_str())
        .unwrap_or_else(|| panic!("{room} not in {body}"))
        .clone();
    assert_eq!(
        listed["mode"], "to_sfu",
        "three members: moving to the server"
    );
    assert_eq!(listed["participants"].as_array().unwrap().len(), 3);

    let (status, body) = admin(
        server.addr,
        "GET",
        &format!("/admin/rooms/{room}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    let view: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = view["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Ada", "Bob", "Cy"]);
    assert_eq!(view["participants"][0]["id"], a_id.as_str());
    assert_eq!(view["participants"][0]["grants"]["publish"], true);
    assert_eq!(
        admin(server.addr, "GET", "/admin/rooms/nope", Some(TOKEN))
            .await
            .0,
        404
    );

    // Remove Bob: he is told why and closed; the others see him leave.
    let (status, _) = admin(
        server.addr,
        "DELETE",
        &format!("/admin/rooms/{room}/participants/{b_id}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 204);
    b.expect_error("removed", Some(1008)).await;
    for m in [&mut a, &mut c] {
        let left = m.recv_type("participant_left").await;
        assert_eq!(left["id"], b_id.as_str());
        assert_eq!(left["reason"], "kicked");
    }
    assert_eq!(
        admin(
            server.addr,
            "DELETE",
            &format!("/admin/rooms/{room}/participants/{b_id}"),
            Some(TOKEN),
        )
        .await
        .0,
        404,
        "already gone"
    );

    // Close the room: everyone is removed.
    let (status, body) = admin(
        server.addr,
        "DELETE",
        &format!("/admin/rooms/{room}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"removed": 2})
    );
    a.expect_error("removed", Some(1008)).await;
    c.expect_error("removed", Some(1008)).await;
    assert!(eventually(STEP, || server.metrics.participants.get() == 0).await);
}

#[tokio::test]
async fn with_a_metrics_listener_the_admin_api_lives_there_only() {
    let mut cfg = test_config();
    cfg.admin_token = Some(TOKEN.into());
    cfg.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = confab::server::Server::bind(cfg).await.unwrap();
    let main = server.local_addr();
    let ops = server.metrics_addr().unwrap();
    let stop = server.shutdown_handle();
    let task = tokio::spawn(server.run());
    assert_eq!(admin(main, "GET", "/admin/rooms", Some(TOKEN)).await.0, 404);
    let (status, body) = admin(ops, "GET", "/admin/rooms", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"rooms": []})
    );
    stop.shutdown();
    let _ = tokio::time::timeout(STEP, task).await;
}
