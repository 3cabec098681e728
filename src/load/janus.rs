//! Janus (VideoRoom plugin) signaling for the side-by-side comparison:
//! the same simulated participants, joining a Janus room instead of a
//! Confab one. Janus's WebSocket API (`janus-protocol`): a session, a
//! `janus.plugin.videoroom` handle, then a publisher `join` and `publish`
//! with our offer, or a subscriber `join` to the publisher's feed, whose
//! offer we answer with `start`. Keepalives every 20 s.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The WebSocket to Janus.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How often a session is kept alive (Janus drops it after 60 s).
pub const KEEPALIVE: Duration = Duration::from_secs(20);

/// Connects to Janus's WebSocket transport at `addr` (`host:port`).
pub async fn connect(addr: &str) -> Result<Ws, String> {
    let mut request = format!("ws://{addr}/")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "janus-protocol".parse().map_err(|_| "header")?,
    );
    let (ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| format!("Janus WebSocket: {e}"))?;
    Ok(ws)
}

/// One session with one VideoRoom handle.
#[derive(Debug)]
pub struct Session {
    /// Session id.
    pub session: u64,
    /// Handle id.
    pub handle: u64,
    next: u64,
    /// Last keepalive (or request).
    pub last_sent: Instant,
}

/// Reads text frames until a JSON message with `transaction` and one of
/// `kinds` (`janus` field) arrives.
async fn wait_for(ws: &mut Ws, transaction: &str, kinds: &[&str]) -> Result<Value, String> {
    loop {
        let frame = ws
            .next()
            .await
            .ok_or("Janus closed the socket")?
            .map_err(|e| e.to_string())?;
        let Message::Text(text) = frame else { continue };
        let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        if v["transaction"] == transaction && kinds.iter().any(|k| v["janus"] == *k) {
            if v["janus"] == "error" {
                return Err(format!("Janus: {v}"));
            }
            return Ok(v);
        }
    }
}

async fn send(ws: &mut Ws, v: &Value) -> Result<(), String> {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .map_err(|e| e.to_string())
}

impl Session {
    /// Creates a session and attaches a VideoRoom handle.
    pub async fn open(ws: &mut Ws) -> Result<Session, String> {
        send(ws, &json!({"janus": "create", "transaction": "c"})).await?;
        let created = wait_for(ws, "c", &["success", "error"]).await?;
        let session = created["data"]["id"].as_u64().ok_or("no session id")?;
        send(
            ws,
            &json!({"janus": "attach", "session_id": session,
                    "plugin": "janus.plugin.videoroom", "transaction": "a"}),
        )
        .await?;
        let attached = wait_for(ws, "a", &["success", "error"]).await?;
        let handle = attached["data"]["id"].as_u64().ok_or("no handle id")?;
        Ok(Session {
            session,
            handle,
            next: 0,
            last_sent: Instant::now(),
        })
    }

    fn transaction(&mut self) -> String {
        self.next += 1;
        format!("t{}", self.next)
    }

    /// Sends a plugin message (with an optional JSEP); returns its
    /// transaction.
    pub async fn message(
        &mut self,
        ws: &mut Ws,
        body: Value,
        jsep: Option<Value>,
    ) -> Result<String, String> {
        let transaction = self.transaction();
        let mut v = json!({"janus": "message", "session_id": self.session,
                           "handle_id": self.handle, "transaction": transaction,
                           "body": body});
        if let Some(jsep) = jsep {
            v["jsep"] = jsep;
        }
        send(ws, &v).await?;
        self.last_sent = Instant::now();
        Ok(transaction)
    }

    /// Tells Janus our candidates are all in the SDP.
    pub async fn trickle_done(&mut self, ws: &mut Ws) -> Result<(), String> {
        let transaction = self.transaction();
        send(
            ws,
            &json!({"janus": "trickle", "session_id": self.session, "handle_id": self.handle,
                    "transaction": transaction, "candidate": {"completed": true}}),
        )
        .await
    }

    /// Sends a keepalive if one is due.
    pub async fn keepalive(&mut self, ws: &mut Ws) -> Result<(), String> {
        if self.last_sent.elapsed() < KEEPALIVE {
            return Ok(());
        }
        let transaction = self.transaction();
        self.last_sent = Instant::now();
        send(
            ws,
            &json!({"janus": "keepalive", "session_id": self.session,
                    "transaction": transaction}),
        )
        .await
    }

    /// Joins `room` as a publisher and waits for `joined`; returns our
    /// feed id.
    pub async fn join_publisher(
        &mut self,
        ws: &mut Ws,
        room: u64,
        name: &str,
    ) -> Result<u64, String> {
        let t = self
            .message(
                ws,
                json!({"request": "join", "ptype": "publisher", "room": room, "display": name}),
                None,
            )
            .await?;
        let joined = wait_for(ws, &t, &["event", "error"]).await?;
        let data = &joined["plugindata"]["data"];
        if data["videoroom"] != "joined" {
            return Err(format!("Janus join: {joined}"));
        }
        data["id"].as_u64().ok_or_else(|| "no feed id".to_owned())
    }
}
