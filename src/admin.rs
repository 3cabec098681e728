//! The admin API: HTTP routes operators use to see rooms and remove
//! participants, behind a bearer token.
//!
//! Off unless `--admin-token` is set; then served on the metrics listener
//! when there is one (keep it private), else on the main listener.
//!
//! - `GET /admin/rooms`: every room (id, mode, epoch, members).
//! - `GET /admin/rooms/{room}`: one room; 404 if it does not exist.
//! - `DELETE /admin/rooms/{room}/participants/{id}`: removes a member, who
//!   gets `error removed` and close 1008; the others see
//!   `participant_left` with reason `kicked`. 404 if unknown.
//! - `DELETE /admin/rooms/{room}`: removes every member the same way.
//!
//! Every request needs `Authorization: Bearer <admin token>`; anything else
//! gets 401, compared in constant time.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::room::Rooms;

/// What the admin routes need.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// The room registry.
    pub rooms: Arc<Rooms>,
    /// The bearer token.
    pub token: Arc<str>,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/admin/rooms", get(list))
        .route("/admin/rooms/{room}", get(show).delete(close_room))
        .route(
            "/admin/rooms/{room}/participants/{id}",
            axum::routing::delete(remove_participant),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// Lets a request through to the admin routes only with the token.
async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if authorized(&state, request.headers()) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

/// Whether the request carries the admin token.
fn authorized(state: &AdminState, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Compare HMACs of both, so that the time taken does not depend on
    // where the strings differ.
    let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &ring::rand::SystemRandom::new());
    let Ok(key) = key else {
        return false;
    };
    let expected = ring::hmac::sign(&key, state.token.as_bytes());
    ring::hmac::verify(&key, given.as_bytes(), expected.as_ref()).is_ok()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "admin token required\n",
    )
        .into_response()
}

async fn list(State(state): State<AdminState>) -> Response {
    let rooms = state.rooms.list().await;
    Json(serde_json::json!({ "rooms": rooms })).into_response()
}

async fn show(State(state): State<AdminState>, Path(room): Path<String>) -> Response {
    match state.rooms.inspect(&room).await {
        Some(view) => Json(view).into_response(),
        None => (StatusCode::NOT_FOUND, "no such room\n").into_response(),
    }
}

async fn close_room(State(state): State<AdminState>, Path(room): Path<String>) -> Response {
    match state.rooms.remove(&room, None).await {
        Some(n) => Json(serde_json::json!({ "removed": n })).into_response(),
        None => (StatusCode::NOT_FOUND, "no such room\n").into_response(),
    }
}

async fn remove_participant(
    State(state): State<AdminState>,
    Path((room, id)): Path<(String, String)>,
) -> Response {
    match state.rooms.remove(&room, Some(id)).await {
        Some(1) => StatusCode::NO_CONTENT.into_response(),
        Some(_) => (StatusCode::NOT_FOUND, "no such participant\n").into_response(),
        None => (StatusCode::NOT_FOUND, "no such room\n").into_response(),
    }
}
