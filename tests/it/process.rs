//! The `confab` binary as a process: it prints the URL to open, and on
//! SIGTERM (what Kubernetes sends) tells every client `server_shutdown`
//! and exits cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

#[tokio::test]
async fn sigterm_closes_sessions_gracefully_and_exits_zero() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_confab"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--media-port",
            "0",
            "--turn-port",
            "0",
        ])
        .env("CONFAB_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("confab starts");
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"));
    let addr: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();

    let (mut a, _) = join(addr, &room_name("term"), "A").await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    a.expect_error("server_shutdown", Some(1001)).await;

    let exited = tokio::task::spawn_blocking(move || {
        for _ in 0..50 {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        None
    })
    .await
    .unwrap();
    let status = exited.expect("exited within 5 s");
    assert!(status.success(), "exit status {status:?}");
}
