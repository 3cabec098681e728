//! The server under test as seen from outside: the process the generator
//! starts (or is told the pid of), its CPU time and memory from `/proc`,
//! and its forwarded-packet counter from `/metrics`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server process the generator started; killed when dropped.
#[derive(Debug)]
pub struct SpawnedServer {
    child: Child,
    /// Its HTTP (signaling) address.
    pub http: SocketAddr,
}

impl SpawnedServer {
    /// Starts `exe serve` on loopback with ephemeral ports, every room
    /// server-routed and the limits raised for a load test; pinned to `cpu`
    /// with `taskset` when given.
    pub fn start(
        exe: &std::path::Path,
        cpu: Option<usize>,
        gcm_only: bool,
        max_participants: usize,
        jwt_secret: Option<&str>,
    ) -> Result<SpawnedServer, String> {
        let mut args: Vec<String> = Vec::new();
        let program = match cpu {
            Some(cpu) => {
                args.extend(["-c".into(), cpu.to_string(), exe.display().to_string()]);
                "taskset".to_owned()
            }
            None => exe.display().to_string(),
        };
        args.extend(
            [
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--media-port",
                "0",
                "--never-p2p",
                "--max-participants",
                &max_participants.to_string(),
                "--max-connections",
                &(max_participants + 64).to_string(),
                // Offers and answers grow with the room (two sections per
                // member).
                "--max-message-bytes",
                "4194304",
                "--rate-per-sec",
                "1000",
                "--rate-burst",
                "1000",
            ]
            .map(String::from),
        );
        if gcm_only {
            args.push("--srtp-gcm-only".into());
        }
        if let Some(secret) = jwt_secret {
            args.extend(["--jwt-secret".into(), secret.to_owned()]);
        }
        let mut child = Command::new(&program)
            .args(&args)
            .env("CONFAB_LOG", "warn")
            .env_remove("CONFAB_JWT_SECRET")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let Some(http) = read_http_addr(&mut child) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the server did not print its address".into());
        };
        Ok(SpawnedServer { child, http })
    }

    /// The server's pid (with `taskset`, the same process after exec).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the HTTP address a spawned `confab serve` prints on its piped
/// stdout (`Confab is running. Open http://ADDR/ …`, within its first ten
/// lines), then keeps draining stdout on a thread so that the server never
/// blocks on it. `None` if no address came.
pub fn read_http_addr(child: &mut Child) -> Option<SocketAddr> {
    let stdout = child.stdout.take()?;
    let mut lines = BufReader::new(stdout).lines();
    let mut http = None;
    for line in lines.by_ref().take(10) {
        let Ok(line) = line else { break };
        if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
            http = url
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .parse()
                .ok();
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    http
}

/// CPU time of every thread of `pid` in nanoseconds (from
/// `/proc/PID/task/*/schedstat`; `/proc/PID/stat` ticks as a fallback).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    let mut any = false;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let path = t.path().join("schedstat");
            if let Some(ns) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            {
                total += ns;
                any = true;
            }
        }
    }
    if any {
        return Some(total);
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks * 10_000_000)
}

/// Resident set size of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The sum of `name` over its label sets in a Prometheus exposition.
pub fn metric_sum(exposition: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in exposition.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Packets the server forwarded so far (`confab_forwarded_packets_total`).
pub async fn forwarded_packets(http: SocketAddr) -> Option<u64> {
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.ok()?;
        let text = String::from_utf8_lossy(&body);
        metric_sum(&text, "confab_forwarded_packets_total").map(|v| v as u64)
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

/// A reading of the server and the generator at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Server CPU time, ns.
    pub server_cpu_ns: u64,
    /// Server forwarded packets.
    pub forwarded: u64,
    /// Server RSS, bytes.
    pub server_rss: u64,
    /// Generator CPU time, ns.
    pub generator_cpu_ns: u64,
}

/// Reads a [`Snapshot`]; fields that cannot be read are 0.
pub async fn snapshot(pid: Option<u32>, http: SocketAddr) -> Snapshot {
    let forwarded = forwarded_packets(http).await.unwrap_or(0);
    Snapshot {
        server_cpu_ns: pid.and_then(cpu_ns).unwrap_or(0),
        forwarded,
        server_rss: pid.and_then(rss_bytes).unwrap_or(0),
        generator_cpu_ns: cpu_ns(std::process::id()).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_a_counter_over_labels() {
        let text = "# HELP x\nconfab_forwarded_packets_total{kind=\"audio\"} 5\n\
                    confab_forwarded_packets_total{kind=\"video\"} 7\n\
                    confab_forwarded_packets_total_other 9\n";
        assert_eq!(
            metric_sum(text, "confab_forwarded_packets_total"),
            Some(12.0)
        );
        assert_eq!(metric_sum(text, "nothing"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(cpu_ns(me).is_some_and(|ns| ns > 0));
        assert!(rss_bytes(me).is_some_and(|b| b > 0));
    }
}
