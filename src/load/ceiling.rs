//! The user-space ceiling on this machine, measured in the same run as the
//! load test: how many 1200-byte datagrams per second one core pushes
//! through loopback UDP at fan-out 16 (`sendto`, `sendmmsg`, UDP GSO), and
//! what SRTP encryption of one such packet costs (`rtc`'s SRTP with ring,
//! AEAD_AES_128_GCM and AES_CM_128_HMAC_SHA1_80).
//!
//! An SFU must at least encrypt and send every forwarded packet, so
//! `1 / (send + encrypt)` bounds any forwarder built on these pieces;
//! the report prints the SFU's measured rate as a share of that.
//!
//! Per-core figures divide packets by the sending thread's own CPU time
//! (`/proc/thread-self/schedstat`), which on loopback includes the
//! kernel's delivery to the receiving socket. Receivers are drained by a
//! thread on another core.

use std::io::IoSlice;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmmsg, sendmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrIn};
use rtc::crypto::providers::RingCrypto;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

/// Datagram size of the ceiling runs.
pub const PACKET_BYTES: usize = 1200;
/// Destinations per packet.
pub const FAN_OUT: usize = 16;
/// Datagrams per destination in one GSO send.
pub const GSO_SEGMENTS: usize = 8;

/// The ceiling figures.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Ceiling {
    /// Datagram size.
    pub packet_bytes: usize,
    /// Destinations.
    pub fan_out: usize,
    /// `sendto` datagrams per second per core.
    pub sendto_pps: f64,
    /// `sendmmsg` (one call per fan-out) datagrams per second per core.
    pub sendmmsg_pps: f64,
    /// UDP GSO (8 segments per destination) datagrams per second per
    /// core; `None` if the kernel refused.
    pub gso_pps: Option<f64>,
    /// µs to SRTP-encrypt one packet with AEAD_AES_128_GCM.
    pub srtp_gcm_us: f64,
    /// µs with AES_CM_128_HMAC_SHA1_80.
    pub srtp_aes_cm_us: f64,
}

impl Ceiling {
    /// Packets per second per core for one `sendto` and one encryption per
    /// packet, the plain ceiling of a forwarder.
    pub fn forward_pps(&self, gcm: bool) -> f64 {
        let crypto = if gcm {
            self.srtp_gcm_us
        } else {
            self.srtp_aes_cm_us
        };
        1e6 / (1e6 / self.sendto_pps + crypto)
    }
}

/// CPU time of the calling thread in ns.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Pins the calling thread to `cpu` (best effort).
pub fn pin_current_thread(cpu: usize) -> bool {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    let mut set = CpuSet::new();
    set.set(cpu).is_ok() && sched_setaffinity(Pid::from_raw(0), &set).is_ok()
}

struct Sink {
    addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    drain: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn open(n: usize, drain_cpu: Option<usize>) -> std::io::Result<Sink> {
        let sockets: Vec<UdpSocket> = (0..n)
            .map(|_| UdpSocket::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let addrs = sockets
            .iter()
            .map(|s| s.local_addr())
            .collect::<Result<_, _>>()?;
        for s in &sockets {
            s.set_nonblocking(true)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let drain = std::thread::spawn(move || {
            if let Some(cpu) = drain_cpu {
                pin_current_thread(cpu);
            }
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                let mut got = false;
                for s in &sockets {
                    while s.recv_from(&mut buf).is_ok() {
                        got = true;
                    }
                }
                if !got {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        });
        Ok(Sink {
            addrs,
            stop,
            drain: Some(drain),
        })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(d) = self.drain.take() {
            let _ = d.join();
        }
    }
}

/// Runs `batch` (which returns datagrams sent) for `time`; datagrams per
/// second of this thread's CPU time.
fn per_core(time: Duration, mut batch: impl FnMut() -> usize) -> f64 {
    let start = Instant::now();
    let cpu0 = thread_cpu_ns();
    let mut sent = 0usize;
    while start.elapsed() < time {
        for _ in 0..16 {
            sent += batch();
        }
    }
    let cpu = thread_cpu_ns().saturating_sub(cpu0).max(1);
    sent as f64 * 1e9 / cpu as f64
}

fn srtp_us(profile: ProtectionProfile, time: Duration) -> Result<f64, String> {
    let key = [7u8; 16];
    let salt = vec![9u8; profile.salt_len()];
    let mut ctx =
        Context::new(&key, &salt, profile, None, None, &RingCrypto).map_err(|e| e.to_string())?;
    let mut packet = vec![0u8; PACKET_BYTES];
    packet[0] = 0x80;
    packet[1] = 96;
    packet[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    let start = Instant::now();
    let mut n = 0u64;
    let mut seq = 0u16;
    while start.elapsed() < time {
        for _ in 0..64 {
            seq = seq.wrapping_add(1);
            packet[2..4].copy_from_slice(&seq.to_be_bytes());
            let out = ctx.encrypt_rtp(&packet).map_err(|e| e.to_string())?;
            std::hint::black_box(out);
            n += 1;
        }
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / n as f64)
}

/// Measures the ceiling on the calling thread (pinned to `cpu` if given),
/// `time` per method; receivers are drained on `drain_cpu`.
pub fn measure(
    cpu: Option<usize>,
    drain_cpu: Option<usize>,
    time: Duration,
) -> Result<Ceiling, String> {
    if let Some(cpu) = cpu {
        pin_current_thread(cpu);
    }
    let io = |e: std::io::Error| e.to_string();
    let sink = Sink::open(FAN_OUT, drain_cpu).map_err(io)?;
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(io)?;
    let packet = vec![0xa5u8; PACKET_BYTES];

    let sendto_pps = per_core(time, || {
        sink.addrs
            .iter()
            .filter(|a| socket.send_to(&packet, a).is_ok())
            .count()
    });

    let fd = socket.as_raw_fd();
    let addrs: Vec<Option<SockaddrIn>> = sink
        .addrs
        .iter()
        .map(|a| match a {
            SocketAddr::V4(v4) => Some(SockaddrIn::from(*v4)),
            SocketAddr::V6(_) => None,
        })
        .collect();
    let iovs: Vec<[IoSlice<'_>; 1]> = (0..FAN_OUT).map(|_| [IoSlice::new(&packet)]).collect();
    let mut headers = MultiHeaders::<SockaddrIn>::preallocate(FAN_OUT, None);
    let sendmmsg_pps = per_core(time, || {
        match sendmmsg(fd, &mut headers, &iovs, &addrs, [], MsgFlags::empty()) {
            Ok(results) => results.count(),
            Err(_) => 0,
        }
    });

    let burst = vec![0xa5u8; PACKET_BYTES * GSO_SEGMENTS];
    let segment = PACKET_BYTES as u16;
    let gso_once = |addr: &SockaddrIn| {
        sendmsg(
            fd,
            &[IoSlice::new(&burst)],
            &[ControlMessage::UdpGsoSegments(&segment)],
            MsgFlags::empty(),
            Some(addr),
        )
    };
    let gso_pps = match addrs.first().and_then(|a| a.as_ref()).map(gso_once) {
        Some(Ok(_)) => Some(per_core(time, || {
            addrs
                .iter()
                .flatten()
                .filter(|a| gso_once(a).is_ok())
                .count()
                * GSO_SEGMENTS
        })),
        _ => None,
    };
    drop(sink);

    Ok(Ceiling {
        packet_bytes: PACKET_BYTES,
        fan_out: FAN_OUT,
        sendto_pps,
        sendmmsg_pps,
        gso_pps,
        srtp_gcm_us: srtp_us(ProtectionProfile::AeadAes128Gcm, time)?,
        srtp_aes_cm_us: srtp_us(ProtectionProfile::Aes128CmHmacSha1_80, time)?,
    })
}
