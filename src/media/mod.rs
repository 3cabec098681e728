//! The media plane's pure building blocks: RTP header parsing and
//! rewriting ([`rtp`]), the per-downtrack [`forwarder`], active-speaker
//! detection ([`speaker`]) and the Last-N video selection ([`last_n`]).
//!
//! This module knows nothing about rooms or signaling; the selective
//! forwarding unit that feeds it from server-side peer connections is built
//! on these pieces. Everything here is synchronous, allocation-free and
//! tested without sockets.

pub mod forwarder;
pub mod last_n;
pub mod leg;
pub mod rtp;
pub mod sfu;
pub mod speaker;
pub mod stun;
pub mod vp8;
