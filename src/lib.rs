//! # Confab
//!
//! A video-conference server: two people in a room talk peer-to-peer, with
//! the server relaying only signaling. (Server-routed media for three or
//! more, a selective forwarding unit, builds on this structure.)
//!
//! ## Layout
//!
//! Dependencies point one way: `server` → `signaling` → `room`.
//!
//! - [`cli`]: the `confab` command line (`serve`, `token`).
//! - [`config`]: every setting and limit, with its default and reason.
//! - [`server`]: binds the listener, routes HTTP, runs until shutdown.
//! - [`signaling`]: the JSON protocol ([`signaling::protocol`]) and one task
//!   per WebSocket ([`signaling::session`]).
//! - [`room`]: the room registry, one task per room owning its members and
//!   its media mode ([`room::ModeState`]).
//! - [`auth`]: HS256 join tokens with pinned algorithm and grants.
//! - [`media`]: RTP parsing and the per-subscriber forwarder (pure logic,
//!   the base of server-routed media).
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
//!    token) and hands a [`room::NewParticipant`] to the room task.
//! 3. The room task sends `joined`, tells the others, and recomputes the
//!    mode: with two members it pairs them and tells each its peer and its
//!    role in perfect negotiation.
//! 4. Offers, answers and ICE candidates go session → room task → the other
//!    member's bounded outbox → its writer task → its socket.
//! 5. Media flows directly between the browsers.
//!
//! ## Errors and panics
//!
//! Nothing a client sends can panic the server: every message is parsed
//! into typed values first, and every refusal is an `error` message with a
//! code from `docs/protocol.md`. A client harms only its own session: queues
//! are bounded, rates are limited, and a slow reader is dropped rather than
//! allowed to hold memory. `expect` is used only on invariants that hold by
//! construction (constant addresses, metric names).

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
