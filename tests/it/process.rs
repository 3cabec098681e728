//! The `confab` binary as a process: configuration from a file, the
//! environment and flags; structured logs without client data; and the
//! SIGTERM drain that Kubernetes rolling updates rely on.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

/// A running `confab serve`.
struct Proc {
    child: Child,
    addr: SocketAddr,
    /// The separate metrics listener, when started with one.
    metrics: Option<SocketAddr>,
    stderr: Arc<Mutex<String>>,
}

fn confab() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_confab"));
    c.env("CONFAB_LOG", "info");
    c
}

/// The address in the first `http://ADDR/...` word of `line`.
fn url_addr(line: &str) -> Option<SocketAddr> {
    let url = line.split_whitespace().find(|w| w.starts_with("http://"))?;
    let rest = url.trim_start_matches("http://");
    rest.split('/').next()?.parse().ok()
}

impl Proc {
    /// Starts `confab serve` on ephemeral loopback ports with `extra` flags
    /// and waits for its start-up lines.
    async fn start(extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = serve_command(extra);
        cmd.env("CONFAB_LOG", "info").stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("confab starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let want_metrics = extra.contains(&"--metrics-listen");
        let stdout = child.stdout.take().unwrap();
        let (addr, metrics) = tokio::task::spawn_blocking(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut addr = None;
            let mut metrics = None;
            for line in lines.by_ref() {
                let line = line.unwrap();
                if line.starts_with("Confab is running") {
                    addr = url_addr(&line);
                }
                if line.starts_with("Metrics on") {
                    metrics = url_addr(&line);
                }
                if addr.is_some() && (metrics.is_some() || !want_metrics) {
                    break;
                }
            }
            // Keep draining stdout so that the server never blocks on it.
            std::thread::spawn(move || for _ in lines {});
            (addr.expect("the URL line"), metrics)
        })
        .await
        .unwrap();
        Proc {
            child,
            addr,
            metrics,
            stderr,
        }
    }

    fn signal_term(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits up to `within` for the process to exit.
    async fn wait_exit(mut self, within: Duration) -> (Option<ExitStatus>, String) {
        let stderr = Arc::clone(&self.stderr);
        let status = tokio::task::spawn_blocking(move || {
            let end = Instant::now() + within;
            while Instant::now() < end {
                if let Some(s) = self.child.try_wait().unwrap() {
                    return Some(s);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            None
        })
        .await
        .unwrap();
        // Let the reader thread collect the last lines.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = stderr.lock().unwrap().clone();
        (status, text)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `GET path` every 5 ms until it answers `status`; returns how long
/// that took, or `None` after `within`.
async fn until_status(
    addr: SocketAddr,
    path: &str,
    status: u16,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if http_get(addr, path).await.0 == status {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

#[tokio::test]
async fn sigterm_drains_existing_rooms_refuses_new_ones_and_exits_zero_when_empty() {
    let p = Proc::start(&["--metrics-listen", "127.0.0.1:0"], &[]).await;
    let ops = p.metrics.expect("a metrics address is printed");
    assert_eq!(http_get(p.addr, "/readyz").await.0, 200);
    assert_eq!(http_get(ops, "/readyz").await.0, 200);
    // Metrics live on the separate listener only.
    assert_eq!(http_get(p.addr, "/metrics").await.0, 404);
    let (status, body) = http_get(ops, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("confab_draining 0"), "{body}");

    let room = room_name("drain");
    let (mut a, _) = join(p.addr, &room, "A").await;
    p.signal_term();
    let took = until_status(p.addr, "/readyz", 503, Duration::from_secs(2))
        .await
        .expect("/readyz fails after SIGTERM");
    println!("/readyz failed {} ms after SIGTERM", took.as_millis());
    assert!(took < Duration::from_millis(100), "/readyz took {took:?}");
    assert_eq!(http_get(ops, "/readyz").await.0, 503);
    assert_eq!(
        http_get(p.addr, "/healthz").await.0,
        200,
        "alive while draining"
    );
    assert!(http_get(ops, "/metrics")
        .await
        .1
        .contains("confab_draining 1"));

    // A new room is refused ...
    let mut c = WsClient::connect(p.addr).await;
    c.send_json(
        json!({"type": "join", "v": PROTOCOL_VERSION, "room": room_name("new"), "name": "C"}),
    )
    .await;
    c.expect_error("draining", Some(1008)).await;
    // ... the existing one admits a (re)joining member, and its members
    // carry on.
    let (mut b, joined) = join(p.addr, &room, "B").await;
    assert_eq!(joined["members"].as_array().unwrap().len(), 1);
    let left = a.recv_type("participant_joined").await;
    assert_eq!(left["participant"]["name"], "B");
    a.send_json(json!({"type": "ping", "id": 1})).await;
    assert_eq!(a.recv_type("pong").await["id"], 1);

    // The process waits for the room to empty, then exits 0.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        http_get(p.addr, "/healthz").await.0 == 200,
        "still running with members"
    );
    a.send_json(json!({"type": "leave"})).await;
    b.send_json(json!({"type": "leave"})).await;
    let (status, _) = p.wait_exit(Duration::from_secs(5)).await;
    let status = status.expect("exits once the rooms are empty");
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn a_second_sigterm_stops_at_once() {
    let p = Proc::start(&[], &[]).await;
    let (mut a, _) = join(p.addr, &room_name("term2"), "A").await;
    p.signal_term();
    until_status(p.addr, "/readyz", 503, Duration::from_secs(2))
        .await
        .expect("draining");
    let t0 = Instant::now();
    p.signal_term();
    a.expect_error("server_shutdown", Some(1001)).await;
    let (status, _) = p.wait_exit(Duration::from_secs(5)).await;
    let status = status.expect("exits after the second SIGTERM");
    println!("second SIGTERM to exit: {} ms", t0.elapsed().as_millis());
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn the_drain_deadline_disconnects_the_remaining_members() {
    let p = Proc::start(&["--drain-timeout-secs", "1"], &[]).await;
    let (mut a, _) = join(p.addr, &room_name("deadline"), "A").await;
    let t0 = Instant::now();
    p.signal_term();
    a.expect_error("server_shutdown", Some(1001)).await;
    let after = t0.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "not before the deadline: {after:?}"
    );
    let (status, stderr) = p.wait_exit(Duration::from_secs(5)).await;
    assert!(status.expect("exits").success());
    assert!(stderr.contains("drain deadline passed"), "{stderr}");
}

/// `confab serve --print-config` with `args`, `env` and an optional file.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = confab();
    cmd.arg("serve").args(args).arg("--print-config");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("confab-test-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn settings_come_from_file_then_environment_then_flags() {
    let file = temp_file(
        "confab.toml",
        r#"
media-port = 1111
turn-port = 2222
max-participants = 30
never-p2p-room = ["webinar-*", "town-hall"]
srtp-gcm-only = true
jwt-secret = "a-secret-of-enough-bytes"
"#,
    );
    let path = file.to_str().unwrap();
    let (ok, out, err) = print_config(
        &["--config", path, "--media-port", "4444"],
        &[("CONFAB_TURN_PORT", "3333"), ("CONFAB_MEDIA_PORT", "5555")],
    );
    assert!(ok, "{err}");
    let got: toml::Table = toml::from_str(&out).unwrap();
    // Flag beats environment beats file; the file beats the default.
    assert_eq!(got["media-port"].as_integer(), Some(4444), "{out}");
    assert_eq!(got["turn-port"].as_integer(), Some(3333), "{out}");
    assert_eq!(got["max-participants"].as_integer(), Some(30), "{out}");
    assert_eq!(got["srtp-gcm-only"].as_bool(), Some(true), "{out}");
    assert_eq!(
        got["never-p2p-room"].as_array().unwrap().len(),
        2,
        "lists come whole from the file: {out}"
    );
    // Secrets are never printed.
    assert_eq!(got["jwt-secret"].as_str(), Some("<hidden>"));
    assert!(!out.contains("a-secret-of-enough-bytes"));
    // The config file can also be named by the environment.
    let (ok, out, err) = print_config(&[], &[("CONFAB_CONFIG", path)]);
    assert!(ok, "{err}");
    let got: toml::Table = toml::from_str(&out).unwrap();
    assert_eq!(got["media-port"].as_integer(), Some(1111));
    // A flag list replaces the file's list.
    let (_, out, _) = print_config(&["--config", path, "--never-p2p-room", "solo"], &[]);
    let got: toml::Table = toml::from_str(&out).unwrap();
    assert_eq!(got["never-p2p-room"].as_array().unwrap().len(), 1);
}

#[test]
fn printed_settings_are_a_valid_config_file() {
    let (ok, first, err) = print_config(&["--media-port", "7000", "--never-p2p"], &[]);
    assert!(ok, "{err}");
    let file = temp_file("printed.toml", &first);
    let (ok, second, err) = print_config(&["--config", file.to_str().unwrap()], &[]);
    assert!(ok, "{err}");
    assert_eq!(first, second);
}

#[test]
fn invalid_settings_fail_at_start_naming_the_setting() {
    let cases: &[(&str, &str)] = &[
        ("medai-port = 1\n", "medai-port"),
        ("media-port = \"many\"\n", "media-port"),
        ("media-port = 70000\n", "media-port"),
        ("never-p2p = \"yes\"\n", "never-p2p"),
        ("listen = [1, 2]\n", "listen"),
        ("turn-relay-ports = \"9-\"\n", "turn-relay-ports"),
        ("[turn]\nport = 1\n", "turn"),
        ("media-port = \n", "media-port"),
        ("log-format = \"xml\"\n", "log-format"),
    ];
    for (text, setting) in cases {
        let file = temp_file("bad.toml", text);
        let (ok, _, err) = print_config(&["--config", file.to_str().unwrap()], &[]);
        assert!(!ok, "{text:?} was accepted");
        assert!(
            err.contains(setting),
            "{text:?}: the error names `{setting}`: {err}"
        );
        assert!(
            err.contains("bad.toml"),
            "{text:?}: the error names the file: {err}"
        );
    }
    let missing = print_config(&["--config", "/nonexistent/confab.toml"], &[]);
    assert!(!missing.0 && missing.2.contains("/nonexistent/confab.toml"));
    // Environment values are checked too, and name their flag.
    let (ok, _, err) = print_config(&[], &[("CONFAB_MEDIA_PORT", "x")]);
    assert!(!ok && err.contains("media-port"), "{err}");
    // Settings that parse but cannot work fail when the server starts.
    let out = confab()
        .args(["serve", "--listen", "127.0.0.1:0", "--sfu-threshold", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sfu-threshold"));
}

#[tokio::test]
async fn json_logs_carry_no_tokens_and_no_client_addresses() {
    let secret = "0123456789abcdef-log-test";
    let room = room_name("logs");
    let token = confab::auth::issue(secret, &room, "ada", Some("Ada"), 600, Default::default());
    let client_ip: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    for reveal in [false, true] {
        let mut args = vec!["--log-format", "json", "--jwt-secret", secret];
        if reveal {
            args.push("--log-client-addresses");
        }
        let p = Proc::start(&args, &[]).await;
        let mut a = WsClient::connect_from(p.addr, client_ip).await;
        a.send_json(json!({"type": "join", "v": PROTOCOL_VERSION, "room": room, "name": "x", "token": token}))
            .await;
        assert_eq!(a.recv_json().await["type"], "joined");
        // A refused join logs nothing secret either.
        let mut bad = WsClient::connect_from(p.addr, client_ip).await;
        bad.send_json(json!({"type": "join", "v": PROTOCOL_VERSION, "room": room, "name": "y", "token": format!("{token}x")}))
            .await;
        bad.expect_error("token_invalid", Some(1008)).await;
        a.send_json(json!({"type": "leave"})).await;
        let _ = a.expect_close(1000).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let logs = p.stderr();
        let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 2, "join and leave are logged: {logs}");
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        }
        assert!(
            !logs.contains(&token[..40]),
            "a token reached the logs: {logs}"
        );
        assert!(!logs.contains(secret));
        assert_eq!(
            logs.contains("127.0.0.2"),
            reveal,
            "client addresses are logged only with --log-client-addresses: {logs}"
        );
        p.signal_term();
        let (status, _) = p.wait_exit(Duration::from_secs(5)).await;
        assert!(status.expect("exits").success());
    }
}

#[test]
fn every_setting_is_documented() {
    let help = confab().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', '<']).next().unwrap())
        .filter(|f| *f != "help")
        .collect();
    assert!(flags.len() > 30, "{flags:?}");
    for flag in flags {
        assert!(
            doc.contains(&format!("| `{flag}` |")),
            "docs/configuration.md does not list `{flag}`"
        );
    }
}

#[test]
fn every_metric_is_documented() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let documented: std::collections::BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `confab_"))
        .map(|l| format!("confab_{}", l.split('`').next().unwrap()))
        .collect();
    let metrics = confab::metrics::Metrics::new();
    let exported: std::collections::BTreeSet<String> = metrics.names().iter().cloned().collect();
    assert!(exported.len() >= 25, "{exported:?}");
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&exported).collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/configuration.md: {undocumented:?}"
    );
    assert!(stale.is_empty(), "documented but not exported: {stale:?}");
}

#[test]
fn every_documented_error_code_is_exercised_by_a_test_and_exists() {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/docs/protocol.md")).unwrap();
    let errors = doc
        .split("\n## Errors")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("an Errors section");
    let codes: Vec<&str> = errors
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    assert!(codes.len() >= 24, "{codes:?}");
    let mut tests = String::new();
    for entry in std::fs::read_dir(format!("{root}/tests/it")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("process.rs") {
            tests.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    tests.push_str(
        std::fs::read_to_string(format!("{root}/tests/it/process.rs"))
            .unwrap()
            .split("fn every_documented_error_code")
            .next()
            .unwrap(),
    );
    let wire = std::fs::read_to_string(format!("{root}/src/signaling/protocol.rs")).unwrap();
    for code in codes {
        assert!(
            wire.contains(&format!("=> \"{code}\"")),
            "`{code}` is documented but the server has no such code"
        );
        assert!(
            tests.contains(&format!("\"{code}\"")),
            "no test expects the error `{code}`"
        );
    }
}
