//! Shared harness: a real server on an ephemeral loopback port, and a
//! WebSocket client speaking the protocol.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use confab::config::Config;
use confab::server::{Server, ShutdownHandle};

/// How long any single expected message may take.
pub const STEP: Duration = Duration::from_secs(5);

/// The protocol version the tests speak (`join.v`).
pub const PROTOCOL_VERSION: u64 = 2;

/// A running server; shuts down when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The SFU's UDP address.
    pub media_addr: SocketAddr,
    /// The embedded STUN/TURN server's UDP address, when enabled.
    pub turn_addr: Option<SocketAddr>,
    pub rooms: std::sync::Arc<confab::room::Rooms>,
    pub metrics: std::sync::Arc<confab::metrics::Metrics>,
    stop: ShutdownHandle,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Stops the server and waits (bounded) for it to finish.
    pub async fn shutdown(mut self) {
        self.stop.shutdown();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(STEP, task).await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.shutdown();
    }
}

/// A dev-mode server with default limits on 127.0.0.1:0.
pub async fn start_server() -> TestServer {
    start_server_with(test_config()).await
}

/// The default test configuration: loopback, ephemeral ports, dev mode;
/// the embedded TURN server on any free port, allowed to relay to loopback.
pub fn test_config() -> Config {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        media_port: 0,
        ..Config::default()
    };
    cfg.turn.port = 0;
    cfg.turn.allow_loopback = true;
    cfg
}

/// A server with `cfg` (its listen address is used as given).
pub async fn start_server_with(cfg: Config) -> TestServer {
    let server = Server::bind(cfg).await.expect("server binds");
    let addr = server.local_addr();
    let media_addr = server.media_addr();
    let turn_addr = server.turn_addr();
    let stop = server.shutdown_handle();
    let rooms = server.rooms();
    let metrics = server.metrics();
    let task = tokio::spawn(async move {
        server.run().await.expect("server runs");
    });
    TestServer {
        addr,
        media_addr,
        turn_addr,
        rooms,
        metrics,
        stop,
        task: Some(task),
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a client observed when reading.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A JSON text message.
    Json(Value),
    /// A close frame with its code.
    Close(Option<u16>),
    /// The stream ended or failed without a close frame.
    Ended,
}

/// A protocol client over a real WebSocket.
pub struct WsClient {
    ws: Ws,
    /// Hide the server-leg traffic (`offer` from `sfu`, `server_leg`,
    /// `active_speakers`) from `next_event` and everything built on it:
    /// signaling tests do not negotiate media.
    pub skip_media: bool,
}

/// Whether `v` is server-leg traffic (or news derived from media) that
/// signaling-only tests ignore.
pub fn is_media_message(v: &Value) -> bool {
    (v["type"] == "offer" && v["from"] == "sfu")
        || v["type"] == "server_leg"
        || v["type"] == "active_speakers"
}

impl WsClient {
    pub async fn connect(addr: SocketAddr) -> WsClient {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("websocket connects");
        WsClient {
            ws,
            skip_media: true,
        }
    }

    /// Connects with an `X-Forwarded-For` header, as through a proxy.
    pub async fn connect_forwarded(addr: SocketAddr, forwarded_for: &str) -> WsClient {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("x-forwarded-for", forwarded_for.parse().unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("websocket connects");
        WsClient {
            ws,
            skip_media: true,
        }
    }

    /// Connects from the local address `from` (any 127.x.y.z works on
    /// Linux loopback), to appear as another client address.
    pub async fn connect_from(addr: SocketAddr, from: std::net::IpAddr) -> WsClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from, 0)).unwrap();
        let stream = socket.connect(addr).await.expect("tcp connects");
        let (ws, _) = tokio_tungstenite::client_async(
            format!("ws://{addr}/ws"),
            MaybeTlsStream::Plain(stream),
        )
        .await
        .expect("websocket connects");
        WsClient {
            ws,
            skip_media: true,
        }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send_text(v.to_string()).await;
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send succeeds");
    }

    pub async fn send_raw(&mut self, msg: Message) -> Result<(), String> {
        self.ws.send(msg).await.map_err(|e| e.to_string())
    }

    /// The next event (JSON, close or end), skipping pings and pongs.
    pub async fn next_event(&mut self, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match frame {
                None | Some(Err(_)) => return Some(Event::Ended),
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).expect("server sends valid JSON");
                    if self.skip_media && is_media_message(&v) {
                        continue;
                    }
                    return Some(Event::Json(v));
                }
                Some(Ok(Message::Close(frame))) => {
                    return Some(Event::Close(frame.map(|f| u16::from(f.code))))
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next JSON message; panics on timeout or close.
    pub async fn recv_json(&mut self) -> Value {
        match self.next_event(STEP).await {
            Some(Event::Json(v)) => v,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Skips messages until one of type `ty` arrives (5 s).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(Event::Json(v)) if v["type"] == ty => return v,
                Some(Event::Json(_)) => continue,
                other => panic!("expected `{ty}`, got {other:?}"),
            }
        }
    }

    pub async fn try_recv_json(&mut self, within: Duration) -> Option<Value> {
        match self.next_event(within).await {
            Some(Event::Json(v)) => Some(v),
            _ => None,
        }
    }

    /// Expects an `error` with `code`, then (if `close` is some) a close
    /// frame with that code.
    pub async fn expect_error(&mut self, code: &str, close: Option<u16>) {
        let v = self.recv_type("error").await;
        assert_eq!(v["code"], code, "error message: {v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        if let Some(close_code) = close {
            self.expect_close(close_code).await;
        }
    }

    /// Expects the server's close frame with `code` (skipping messages).
    pub async fn expect_close(&mut self, code: u16) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await {
                Some(Event::Close(c)) => {
                    assert_eq!(c, Some(code), "close code");
                    return;
                }
                Some(Event::Json(_)) => continue,
                other => panic!("expected close {code}, got {other:?}"),
            }
        }
    }

    pub fn into_split(self) -> (WsSender, WsReceiver) {
        let (sink, stream) = self.ws.split();
        (WsSender { sink }, WsReceiver { stream })
    }
}

/// The sending half of a [`WsClient`].
pub struct WsSender {
    sink: SplitSink<Ws, Message>,
}

impl WsSender {
    pub async fn send_json(&mut self, v: Value) {
        self.sink
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("send succeeds");
    }

    /// Sends, reporting a closed socket instead of panicking.
    pub async fn try_send_json(&mut self, v: Value) -> Result<(), String> {
        self.sink
            .send(Message::Text(v.to_string().into()))
            .await
            .map_err(|e| e.to_string())
    }
}

/// The receiving half of a [`WsClient`].
pub struct WsReceiver {
    stream: SplitStream<Ws>,
}

impl WsReceiver {
    /// The next JSON message, `None` once the socket closes.
    pub async fn recv_json(&mut self) -> Option<Value> {
        loop {
            match self.stream.next().await? {
                Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }
}

/// Connects and joins `room` as `name`; returns the client and `joined`.
pub async fn join(addr: SocketAddr, room: &str, name: &str) -> (WsClient, Value) {
    join_with(
        addr,
        serde_json::json!({"type": "join", "v": PROTOCOL_VERSION, "room": room, "name": name}),
    )
    .await
}

/// Connects and sends `join_msg`; expects `joined`.
pub async fn join_with(addr: SocketAddr, join_msg: Value) -> (WsClient, Value) {
    let mut c = WsClient::connect(addr).await;
    c.send_json(join_msg).await;
    let joined = c.recv_json().await;
    assert_eq!(joined["type"], "joined", "join answer: {joined}");
    (c, joined)
}

/// `GET path` over HTTP/1.1; returns the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[]).await
}

/// `method path` with extra header lines over HTTP/1.1; returns the status
/// and the body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `confab serve` on 127.0.0.1 with ephemeral HTTP, media and TURN ports,
/// then `extra`; its stdout (where it prints its address) piped.
pub fn serve_command(extra: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_confab"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--media-port",
        "0",
        "--turn-port",
        "0",
    ])
    .args(extra)
    .stdout(std::process::Stdio::piped());
    cmd
}

/// A room id unique to the calling test.
pub fn room_name(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// Polls `cond` every 20 ms for up to `within`.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Serialises the media tests: each runs several WebRTC stacks and a media
/// plane, and their timing assertions (sub-second) would measure each other
/// on a small machine. Hold the guard for the whole test.
pub async fn media_test_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The value of metric `name` in a Prometheus text exposition, summed over
/// its label sets; `None` if it is absent (the load tool's parser).
pub use confab::load::probe::metric_sum as metric_value;
