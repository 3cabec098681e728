//! `cargo +nightly fuzz run signaling`: see tests/it/fuzz/targets.rs.
#![no_main]

#[allow(dead_code)]
#[path = "../../tests/it/fuzz/targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::signaling(data));
