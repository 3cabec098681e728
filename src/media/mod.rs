//! The media plane's pure building blocks: RTP header parsing and
//! rewriting ([`rtp`]), the per-downtrack [`forwarder`] and active-speaker
//! detection ([`speaker`]).
//!
//! This module knows nothing about rooms or signaling; the selective
//! forwarding unit that feeds it from server-side peer connections is built
//! on these pieces. Everything here is synchronous, allocation-free and
//! tested without sockets.

pub mod forwarder;
pub mod leg;
pub mod rtp;
pub mod sfu;
pub mod speaker;
pub mod stun;
pub mod vp8;
