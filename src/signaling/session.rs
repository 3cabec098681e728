//! One signaling session: the life of one participant's WebSocket.
//!
//! The socket is split in two tasks, as in axum's chat example: this task
//! reads, validates and forwards to the room; a writer task owns the sink and
//! drains the participant's bounded outbox (fed by the room and by this
//! task), and sends keep-alive pings. Closing always goes through the writer
//! so that a final `error` message precedes the close frame.
//!
//! Life: connected → (first message within `join_timeout`) joined →
//! closed. Everything the client does wrong before `join` closes the socket;
//! after `join`, only the errors `docs/protocol.md` marks as closing do.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};

use super::protocol::{parse_client_message, ClientMessage, ErrorCode, LeaveReason};
use super::protocol::{ServerMessage, PROTOCOL_VERSION};
use super::ratelimit::{JoinLimiter, TokenBucket};
use super::{clean_name, valid_room_id};
use crate::auth;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::room::{Command, NewParticipant, Outgoing, RoomHandle, Rooms};

/// WebSocket close codes used by the protocol.
pub mod close {
    /// Normal closure (`leave`).
    pub const NORMAL: u16 = 1000;
    /// The server is going away.
    pub const GOING_AWAY: u16 = 1001;
    /// Policy violation: protocol misuse, auth failure, limits.
    pub const POLICY: u16 = 1008;
    /// A message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// An unexpected server condition.
    pub const INTERNAL: u16 = 1011;
}

/// What every session shares.
#[derive(Debug, Clone)]
pub struct SignalContext {
    /// Server configuration.
    pub config: Arc<Config>,
    /// The room registry.
    pub rooms: Arc<Rooms>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Becomes `true` when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Joins per client address.
    pub join_limiter: Arc<JoinLimiter>,
}

/// How the writer task should end the connection.
#[derive(Debug)]
struct CloseRequest {
    code: u16,
    reason: &'static str,
    last_message: Option<Outgoing>,
}

/// Upper bound for the writer to deliver its last message and the close
/// frame to a client that may not be reading.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Runs one session to its end. `client` is the peer's IP address, used for
/// the per-address join limit (and logged only when configured).
pub async fn run(socket: WebSocket, ctx: SignalContext, client: IpAddr) {
    ctx.metrics.connections.inc();
    let (sink, stream) = socket.split();
    let limits = &ctx.config.limits;
    let (out_tx, out_rx) = mpsc::channel::<Outgoing>(limits.outbound_queue);
    let (close_tx, close_rx) = oneshot::channel::<CloseRequest>();
    let mut writer = tokio::spawn(writer(sink, out_rx, close_rx, limits.ping_interval));

    let mut session = Session {
        ctx: ctx.clone(),
        client,
        out: out_tx,
        close: Some(close_tx),
        joined: None,
        new_kick: None,
        bucket: TokenBucket::new(limits.rate_per_sec, limits.rate_burst),
        chat_bucket: TokenBucket::new(limits.chat_rate_per_sec, limits.chat_burst),
        drops: 0,
        last_rate_error: None,
    };
    session.read_loop(stream).await;

    // Give the writer a bounded time to say goodbye, then cut it off.
    if tokio::time::timeout(CLOSE_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
    ctx.metrics.connections.dec();
}

struct Joined {
    room: RoomHandle,
    id: String,
}

struct Session {
    ctx: SignalContext,
    client: IpAddr,
    out: mpsc::Sender<Outgoing>,
    close: Option<oneshot::Sender<CloseRequest>>,
    joined: Option<Joined>,
    /// The kick receiver of a fresh join, picked up by the read loop.
    new_kick: Option<oneshot::Receiver<crate::room::Kick>>,
    bucket: TokenBucket,
    /// Chat messages have their own, lower rate: each one reaches every
    /// member of the room.
    chat_bucket: TokenBucket,
    drops: u32,
    last_rate_error: Option<Instant>,
}

/// What to do after one frame.
enum Flow {
    Continue,
    /// End the session; the leave reason for the room.
    End(LeaveReason),
}

impl Session {
    async fn read_loop(&mut self, mut stream: SplitStream<WebSocket>) {
        let limits = self.ctx.config.limits.clone();
        let join_deadline = Instant::now() + limits.join_timeout;
        let mut last_seen = Instant::now();
        let mut shutdown = self.ctx.shutdown.clone();
        let mut kick_rx: Option<oneshot::Receiver<crate::room::Kick>> = None;
        let reason = loop {
            if let Some(k) = self.new_kick.take() {
                kick_rx = Some(k);
            }
            let idle_deadline = if self.joined.is_some() {
                last_seen + limits.idle_timeout
            } else {
                join_deadline
            };
            let kick = async {
                match kick_rx.as_mut() {
                    Some(k) => k.await.ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                frame = stream.next() => {
                    last_seen = Instant::now();
                    match self.on_frame(frame).await {
                        Flow::Continue => {}
                        Flow::End(reason) => break reason,
                    }
                }
                kicked = kick => {
                    // The room has already removed us; just say why and close.
                    let code = kicked.map(|k| k.code).unwrap_or(ErrorCode::ServerShutdown);
                    self.joined = None;
                    self.close_with_error(code, "removed by the server", close::POLICY);
                    break LeaveReason::Kicked;
                }
                _ = sleep_until(idle_deadline) => {
                    if self.joined.is_some() {
                        self.close_plain(close::POLICY, "idle timeout");
                        break LeaveReason::Disconnected;
                    }
                    self.close_with_error(ErrorCode::JoinTimeout, "no join message in time", close::POLICY);
                    break LeaveReason::Disconnected;
                }
                _ = async { let _ = shutdown.wait_for(|down| *down).await; } => {
                    self.close_with_error(ErrorCode::ServerShutdown, "server is shutting down", close::GOING_AWAY);
                    break LeaveReason::Disconnected;
                }
            }
        };
        if let Some(j) = self.joined.take() {
            j.room.send(Command::Leave { id: j.id, reason }).await;
        }
    }

    async fn on_frame(&mut self, frame: Option<Result<Message, axum::Error>>) -> Flow {
        let message = match frame {
            None => return Flow::End(LeaveReason::Disconnected),
            Some(Err(e)) => {
                if is_capacity_error(&e) {
                    self.close_plain(close::TOO_BIG, "message too large");
                } else {
                    tracing::debug!(error = %e, "websocket read error");
                }
                return Flow::End(LeaveReason::Disconnected);
            }
            Some(Ok(m)) => m,
        };
        let text = match message {
            Message::Text(t) => t,
            Message::Binary(_) => {
                self.count_message("binary");
                return self.refuse(
                    ErrorCode::BinaryUnsupported,
                    "binary frames are not part of the protocol",
                );
            }
            Message::Ping(_) | Message::Pong(_) => return Flow::Continue,
            Message::Close(_) => {
                self.close_plain(close::NORMAL, "bye");
                return Flow::End(LeaveReason::Left);
            }
        };
        if self.joined.is_some() && !self.bucket.try_take() {
            self.count_message("rate_limited");
            return self.rate_limited();
        }
        match parse_client_message(&text) {
            Ok(msg) => {
                self.count_message(msg.type_name());
                self.on_message(msg).await
            }
            Err(e) => {
                self.count_message("invalid");
                self.refuse(e.code, e.detail)
            }
        }
    }

    async fn on_message(&mut self, msg: ClientMessage) -> Flow {
        let Some(joined) = &self.joined else {
            return match msg {
                ClientMessage::Join {
                    v,
                    room,
                    name,
                    token,
                } => self.join(v, room, name, token).await,
                _ => {
                    self.close_with_error(ErrorCode::NotJoined, "send `join` first", close::POLICY);
                    Flow::End(LeaveReason::Disconnected)
                }
            };
        };
        let from = joined.id.clone();
        let room = joined.room.clone();
        let command = match msg {
            ClientMessage::Join { .. } => {
                return self.refuse(ErrorCode::AlreadyJoined, "this socket has joined already");
            }
            ClientMessage::Leave => {
                self.close_plain(close::NORMAL, "left");
                return Flow::End(LeaveReason::Left);
            }
            ClientMessage::Ping { id } => {
                self.send(&ServerMessage::Pong { id });
                return Flow::Continue;
            }
            ClientMessage::SwitchReport { to, gap_ms, .. } => {
                self.ctx
                    .metrics
                    .mode_switch_gap
                    .with_label_values(&[to.as_str()])
                    .observe(gap_ms / 1e3);
                return Flow::Continue;
            }
            ClientMessage::Offer { to, sdp } => Command::Relay {
                message: ServerMessage::Offer {
                    from: from.clone(),
                    sdp,
                },
                from,
                to,
            },
            ClientMessage::Answer { to, sdp } => Command::Relay {
                message: ServerMessage::Answer {
                    from: from.clone(),
                    sdp,
                },
                from,
                to,
            },
            ClientMessage::Candidate { to, candidate } => Command::Relay {
                message: ServerMessage::Candidate {
                    from: from.clone(),
                    candidate,
                },
                from,
                to,
            },
            ClientMessage::Chat { text, to } => {
                if !self.chat_bucket.try_take() {
                    self.count_error(ErrorCode::RateLimited);
                    self.send(&ServerMessage::error(
                        ErrorCode::RateLimited,
                        "chat rate exceeded; message not delivered",
                    ));
                    return Flow::Continue;
                }
                Command::Chat { from, to, text }
            }
            ClientMessage::MediaReady { epoch } => Command::MediaReady { id: from, epoch },
            ClientMessage::P2pFailed => Command::P2pFailed { id: from },
            ClientMessage::MediaState {
                audio_muted,
                video_muted,
                screen,
            } => Command::MediaState {
                id: from,
                audio_muted,
                video_muted,
                screen,
            },
        };
        if room.send(command).await {
            Flow::Continue
        } else {
            self.close_with_error(
                ErrorCode::ServerShutdown,
                "the room has ended",
                close::INTERNAL,
            );
            self.joined = None;
            Flow::End(LeaveReason::Disconnected)
        }
    }

    async fn join(&mut self, v: u32, room: String, name: String, token: Option<String>) -> Flow {
        let refuse = |s: &mut Self, code: ErrorCode, message: String| {
            s.close_with_error(code, message, close::POLICY);
            Flow::End(LeaveReason::Disconnected)
        };
        if v != PROTOCOL_VERSION {
            return refuse(
                self,
                ErrorCode::UnsupportedVersion,
                format!("this server speaks protocol version {PROTOCOL_VERSION}"),
            );
        }
        if !valid_room_id(&room) {
            return refuse(
                self,
                ErrorCode::InvalidRoom,
                "room ids are 1-64 characters of A-Z a-z 0-9 _ - .".into(),
            );
        }
        if self.ctx.config.log_client_addresses {
            tracing::info!(client = %self.client, %room, "join request");
        }
        if !self.ctx.join_limiter.allow(self.client) {
            return refuse(
                self,
                ErrorCode::TooManyJoins,
                "too many joins from this address; retry later".into(),
            );
        }
        let (mut name, identity, grants) = match &self.ctx.config.jwt_secret {
            None => (name, None, auth::Grants::default()),
            Some(secret) => {
                let Some(token) = token else {
                    return refuse(
                        self,
                        ErrorCode::TokenRequired,
                        "this server requires a join token".into(),
                    );
                };
                match auth::verify(secret, &token, &room) {
                    Ok(claims) => (claims.name.unwrap_or(name), Some(claims.sub), claims.grants),
                    Err(e) => {
                        let code = e.code();
                        return refuse(
                            self,
                            code,
                            format!("join token refused: {}", code.as_str()),
                        );
                    }
                }
            }
        };
        match clean_name(&name) {
            Some(n) => name = n,
            None => {
                return refuse(
                    self,
                    ErrorCode::InvalidName,
                    "names are 1-64 characters without control characters".into(),
                )
            }
        }
        let (kick_tx, kick_rx) = oneshot::channel();
        let participant = NewParticipant {
            name,
            identity,
            grants,
            outbox: self.out.clone(),
            kick: kick_tx,
        };
        match self.ctx.rooms.join(&room, participant).await {
            Ok((handle, id)) => {
                self.joined = Some(Joined { room: handle, id });
                self.new_kick = Some(kick_rx);
                Flow::Continue
            }
            Err(code) => refuse(self, code, format!("cannot join room: {}", code.as_str())),
        }
    }

    fn rate_limited(&mut self) -> Flow {
        self.drops += 1;
        if self.drops >= self.ctx.config.limits.max_rate_drops {
            self.close_with_error(
                ErrorCode::RateLimited,
                "too many messages; closing",
                close::POLICY,
            );
            return Flow::End(LeaveReason::Kicked);
        }
        let now = Instant::now();
        let due = self
            .last_rate_error
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            self.last_rate_error = Some(now);
            self.count_error(ErrorCode::RateLimited);
            self.send(&ServerMessage::error(
                ErrorCode::RateLimited,
                "message rate exceeded; message dropped",
            ));
        }
        Flow::Continue
    }

    /// Answers a bad message: an `error`, and before `join` a close.
    fn refuse(&mut self, code: ErrorCode, message: impl Into<String>) -> Flow {
        if self.joined.is_none() {
            self.close_with_error(code, message, close::POLICY);
            return Flow::End(LeaveReason::Disconnected);
        }
        self.count_error(code);
        self.send(&ServerMessage::error(code, message));
        Flow::Continue
    }

    fn count_message(&self, ty: &str) {
        self.ctx.metrics.messages_in.with_label_values(&[ty]).inc();
    }

    fn count_error(&self, code: ErrorCode) {
        self.ctx
            .metrics
            .errors
            .with_label_values(&[code.as_str()])
            .inc();
    }

    fn send(&mut self, msg: &ServerMessage) {
        // A full outbox means the client is not reading; the room notices
        // that too and removes it, so dropping this reply is harmless.
        let _ = self.out.try_send(msg.to_json().into());
    }

    fn close_with_error(&mut self, code: ErrorCode, message: impl Into<String>, close_code: u16) {
        self.count_error(code);
        let text = ServerMessage::error(code, message).to_json();
        self.request_close(close_code, code.as_str(), Some(text.into()));
    }

    fn close_plain(&mut self, close_code: u16, reason: &'static str) {
        self.request_close(close_code, reason, None);
    }

    fn request_close(&mut self, code: u16, reason: &'static str, last_message: Option<Outgoing>) {
        if let Some(tx) = self.close.take() {
            let _ = tx.send(CloseRequest {
                code,
                reason,
                last_message,
            });
        }
    }
}

/// Owns the sink: sends queued messages and pings, and on request the last
/// message and the close frame.
async fn writer(
    mut sink: SplitSink<WebSocket, Message>,
    mut out: mpsc::Receiver<Outgoing>,
    mut close: oneshot::Receiver<CloseRequest>,
    ping_interval: Duration,
) {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    loop {
        tokio::select! {
            // Closing wins over queued messages: a kicked client's queue is
            // full of messages it will never read.
            biased;
            request = &mut close => {
                if let Ok(req) = request {
                    if let Some(text) = req.last_message {
                        let _ = sink.send(Message::Text(Utf8Bytes::from(&*text))).await;
                    }
                    let frame = CloseFrame { code: req.code, reason: Utf8Bytes::from_static(req.reason) };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                }
                let _ = sink.close().await;
                return;
            }
            msg = out.recv() => {
                let Some(text) = msg else { return };
                if sink.send(Message::Text(Utf8Bytes::from(&*text))).await.is_err() {
                    return;
                }
            }
            _ = ping.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Whether a read error is tungstenite's "message or frame too long".
fn is_capacity_error(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(tungstenite::Error::Capacity(_)) = err.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = err.source();
    }
    false
}
