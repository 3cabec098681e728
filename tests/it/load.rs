//! `confab load` as shipped: a few seconds against a server it starts
//! itself, checking that it works and reports non-zero, sane figures (no
//! timing thresholds: this is a smoke test, not a benchmark).

use std::process::Command;

use serde_json::Value;

/// Runs one short fan-out step (one publisher, two subscribers) with
/// `extra` arguments and returns its step report after the common checks.
fn smoke(extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args([
            "load",
            "--scenario",
            "fanout",
            "--steps",
            "2",
            "--duration-secs",
            "1",
            "--warmup-secs",
            "0.5",
            "--repeat",
            "2",
            "--no-pin",
            "--max-secs",
            "25",
            "--json",
            "-",
        ])
        .args(extra)
        .output()
        .expect("confab load runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "JSON report ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(report["failures"].as_array().map(Vec::len), Some(0));
    assert!(report["stopped"].is_null(), "{}", report["stopped"]);
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 1);
    let step = &steps[0];
    assert_eq!(step["participants"], 3, "one publisher, two subscribers");
    assert_eq!(step["windows"].as_array().map(Vec::len), Some(2));
    let median = |field: &str| {
        step[field]["median"]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} in {step}"))
    };
    // 1.5 Mbit/s of 1200 B packets is about 160 packets/s per subscriber.
    let delivered = median("delivered_pps");
    assert!(
        delivered > 50.0 && delivered < 2000.0,
        "delivered {delivered}"
    );
    let loss = median("loss_pct");
    assert!((0.0..5.0).contains(&loss), "loss {loss} %");
    let p50 = median("p50_ms");
    assert!((0.0..1000.0).contains(&p50), "p50 {p50} ms");
    let us = median("server_us_per_packet");
    assert!(us > 0.0 && us < 100_000.0, "server µs per packet {us}");
    assert!(step["server_rss_mib"].as_f64().is_some_and(|m| m > 1.0));
    assert!(step["join_ms_p50"].as_f64().is_some_and(|j| j > 0.0));
    step.clone()
}

#[test]
fn load_generator_smoke() {
    smoke(&[]);
}

/// With subscribe-only tokens the subscribers are viewers of a server
/// that checks tokens, and still receive everything.
#[test]
fn load_generator_smoke_with_viewer_tokens() {
    smoke(&["--viewer-tokens"]);
}
