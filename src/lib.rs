//! # Confab
//!
//! A video-conference server: two people in a room talk peer-to-peer, with
//! the server relaying only signaling; from three on, every member's media
//! goes through the server's selective forwarding unit (SFU), and back to
//! peer-to-peer when the room returns to two. Switches are make-before-break.
//!
//! ## Layout
//!
//! Dependencies point one way: `server` → `signaling` → `room` → `media`.
//!
//! - [`cli`]: the `confab` command line (`serve`, `token`, `load`) and the
//!   configuration file.
//! - [`config`]: every setting and limit, with its default and reason.
//! - [`server`]: binds the listeners, routes HTTP, drains and shuts down.
//! - [`signaling`]: the JSON protocol ([`signaling::protocol`]) and one task
//!   per WebSocket ([`signaling::session`]).
//! - [`room`]: the room registry, one task per room owning its members and
//!   its media mode ([`room::ModeState`]).
//! - [`media`]: the SFU: one UDP socket, a server leg per member (webrtc-rs's
//!   sans-IO engine), and the per-subscriber forwarders.
//! - [`auth`]: HS256 join tokens with pinned algorithm and grants.
//! - [`admin`]: the operators' HTTP API (rooms, removing participants).
//! - [`turn_server`]: the embedded STUN/TURN server and the time-limited
//!   TURN credentials handed out in `joined`.
//! - [`metrics`]: Prometheus metrics.
//! - [`load`]: `confab load`, the load generator, and the in-memory leg
//!   pairs the forwarding benchmarks drive.
//! - [`web`]: the embedded browser client.
//!
//! ## Life of a call
//!
//! 1. A browser opens `/?room=R&name=N` and connects a WebSocket to `/ws`.
//! 2. Its session task reads `join`, checks it (version, room id, name,
//!    token, join rate) and hands a [`room::NewParticipant`] to the room
//!    task.
//! 3. The room task sends `joined`, tells the others, asks the SFU for the
//!    member's server leg (offered by the server, kept warm), and recomputes
//!    the mode: with two members it pairs them for a direct connection.
//! 4. Offers, answers and ICE candidates go session → room task → the other
//!    member's bounded outbox → its writer task → its socket.
//! 5. With two members media flows directly between the browsers; from
//!    three on, each publisher's RTP reaches the SFU on its server leg and
//!    is forwarded, unchanged but for SSRC, sequence and timestamp, to every
//!    other member's leg.
//!
//! ## Errors and panics
//!
//! Nothing a client sends can panic the server: every message is parsed
//! into typed values first, and every refusal is an `error` message with a
//! code from `docs/protocol.md`. A client harms only its own session: queues
//! are bounded, rates are limited, and a slow reader is dropped rather than
//! allowed to hold memory. `expect` is used only on invariants that hold by
//! construction (constant addresses, metric names).

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod load;
pub mod media;
pub mod metrics;
pub mod room;
pub mod server;
pub mod signaling;
pub mod turn_server;
pub mod web;
