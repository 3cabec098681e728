//! Simulated participants for load tests and benchmarks: an `rtc` client
//! endpoint that answers the server's offers, and server legs wired to
//! such endpoints in memory.

pub mod client;
pub mod memory;
