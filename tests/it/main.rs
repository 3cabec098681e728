//! Confab's integration tests: one binary (one link step), each module a
//! behaviour, all against the real server over real loopback sockets.

// A test binary exports nothing; `pub` here only shares helpers between
// its modules.
#![allow(unreachable_pub)]

mod admin;
mod common;
mod faults;
mod fuzz;
mod harness;
mod load;
mod lossy_proxy;
mod p2p_media;
mod process;
mod rtc_peer;
mod sfu_media;
mod signaling;
mod speakers;
mod turn;
