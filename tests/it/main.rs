//! Confab's integration tests: one binary (one link step), each module a
//! behaviour, all against the real server over real loopback sockets.

mod common;
mod signaling;
