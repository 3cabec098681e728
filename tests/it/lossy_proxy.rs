//! An in-process UDP relay between one client and the SFU that drops a
//! seeded, reproducible fraction of the RTP packets going one way (towards
//! the client or towards the server), each (SSRC, sequence number) at most
//! once, so that what is lost can be recovered by a single retransmission.
//!
//! The client reaches the relay because its copy of the server's offer names
//! the relay's address as the server's host candidate
//! (`PeerConfig::server_media_via`); the relay forwards from a socket of its
//! own, which the ICE-lite server learns from the client's checks like any
//! other client address. STUN, DTLS and RTCP pass untouched, and so does
//! everything while the relay is not armed. The RTP header (sequence number,
//! SSRC) is not encrypted by SRTP, so the relay can read it.
//!
//! Beyond independent loss, [`Network`] adds burst loss, duplication and
//! jitter (which reorders) to the impaired direction, all drawn from the
//! same seeded generator.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// One dropped RTP packet.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dropped {
    /// SSRC from its header.
    pub(crate) ssrc: u32,
    /// Sequence number from its header.
    pub(crate) sequence: u16,
    /// When it was dropped.
    pub(crate) at: Instant,
}

/// What the relay did.
#[derive(Clone, Debug, Default)]
pub(crate) struct ProxyStats {
    /// Datagrams client -> server.
    pub(crate) up: u64,
    /// Datagrams server -> client, forwarded.
    pub(crate) down: u64,
    /// RTP packets of the impaired payload type seen in the impaired direction while armed.
    pub(crate) rtp_armed: u64,
    /// Dropped packets, in order.
    pub(crate) dropped: Vec<Dropped>,
    /// Packets sent twice.
    pub(crate) duplicated: u64,
    /// Packets held back (jitter).
    pub(crate) delayed: u64,
    /// Losses that were part of a burst.
    pub(crate) burst_dropped: u64,
}

/// Which way the relay drops packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Towards {
    /// The server's RTP to the client (the server's NACK responder recovers).
    Client,
    /// The client's RTP to the server (the server's NACK generator asks the
    /// client, a publisher, to retransmit).
    Server,
}

/// Impairments beyond independent loss, applied to RTP of the impaired
/// payload type in the impaired direction while armed.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Network {
    /// Probability per packet that a burst of losses starts.
    pub(crate) burst_start: f64,
    /// Longest burst (packets); bursts are 2 to this long.
    pub(crate) burst_max: u32,
    /// Probability that a forwarded packet is sent twice.
    pub(crate) duplicate: f64,
    /// Probability that a forwarded packet is held back...
    pub(crate) jitter_fraction: f64,
    /// ...by up to this long (so later packets overtake it).
    pub(crate) jitter_max: std::time::Duration,
}

/// A running relay; stops when dropped.
pub(crate) struct LossyProxy {
    /// The address the client is pointed at.
    pub(crate) addr: SocketAddr,
    armed: Arc<AtomicBool>,
    blackhole: Arc<AtomicBool>,
    stats: Arc<Mutex<ProxyStats>>,
    /// The last client -> server RTP datagrams of the impaired payload type.
    captured: Arc<Mutex<VecDeque<Vec<u8>>>>,
    /// The socket the server knows as the client's.
    up: Arc<UdpSocket>,
    server: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// xorshift64*: a tiny generator whose sequence is fixed by its seed.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `(ssrc, sequence)` of an RTP packet with payload type `pt`, or `None`
/// for anything else (STUN, DTLS, RTCP, other payload types).
fn rtp_of_type(datagram: &[u8], pt: u8) -> Option<(u32, u16)> {
    if datagram.len() < 12 || datagram[0] >> 6 != 2 || datagram[1] & 0x7f != pt {
        return None;
    }
    let sequence = u16::from_be_bytes([datagram[2], datagram[3]]);
    let ssrc = u32::from_be_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]);
    Some((ssrc, sequence))
}

impl LossyProxy {
    /// Relays between one client and `server`, dropping a `loss` fraction
    /// of RTP packets with payload type `payload_type` going `towards` one
    /// side while armed.
    pub(crate) async fn start_towards(
        server: SocketAddr,
        loss: f64,
        seed: u64,
        payload_type: u8,
        towards: Towards,
    ) -> LossyProxy {
        Self::start_impaired(
            server,
            loss,
            Network::default(),
            seed,
            payload_type,
            towards,
        )
        .await
    }

    /// As [`LossyProxy::start_towards`], with burst loss, duplication and
    /// jitter as well.
    pub(crate) async fn start_impaired(
        server: SocketAddr,
        loss: f64,
        network: Network,
        seed: u64,
        payload_type: u8,
        towards: Towards,
    ) -> LossyProxy {
        let down = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay binds"));
        let up = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay binds"));
        let captured = Arc::new(Mutex::new(VecDeque::new()));
        let addr = down.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let blackhole = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(ProxyStats::default()));
        let task = tokio::spawn(relay(
            down,
            up.clone(),
            captured.clone(),
            server,
            Impairment {
                loss,
                network,
                burst_left: 0,
                rng: Rng(seed.max(1)),
                payload_type,
                towards,
            },
            armed.clone(),
            blackhole.clone(),
            stats.clone(),
        ));
        LossyProxy {
            addr,
            armed,
            blackhole,
            stats,
            captured,
            up,
            server,
            task,
        }
    }

    /// Starts or stops dropping.
    pub(crate) fn arm(&self, on: bool) {
        self.armed.store(on, Ordering::Relaxed);
    }

    /// Starts or stops dropping every datagram, both ways (the client's
    /// network dies; its signaling may live on).
    pub(crate) fn blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::Relaxed);
    }

    /// The last (up to 64) RTP datagrams of the impaired payload type the
    /// client sent to the server, oldest first, as they went (SRTP).
    pub(crate) fn captured(&self) -> Vec<Vec<u8>> {
        self.captured.lock().unwrap().iter().cloned().collect()
    }

    /// Sends `datagram` to the server from the client's address as the
    /// server knows it (the relay's socket).
    pub(crate) async fn inject(&self, datagram: &[u8]) {
        self.up
            .send_to(datagram, self.server)
            .await
            .expect("injected");
    }

    /// What happened so far.
    pub(crate) fn stats(&self) -> ProxyStats {
        self.stats.lock().unwrap().clone()
    }
}

/// What the relay drops.
struct Impairment {
    loss: f64,
    network: Network,
    /// Losses left in the current burst.
    burst_left: u32,
    rng: Rng,
    payload_type: u8,
    towards: Towards,
}

impl Impairment {
    /// Whether to drop `datagram` (going `towards`), recording it.
    fn drops(
        &mut self,
        datagram: &[u8],
        towards: Towards,
        seen: &mut HashSet<(u32, u16)>,
        stats: &Mutex<ProxyStats>,
    ) -> bool {
        if towards != self.towards {
            return false;
        }
        let Some(key) = rtp_of_type(datagram, self.payload_type) else {
            return false;
        };
        let mut s = stats.lock().unwrap();
        s.rtp_armed += 1;
        // Each packet is dropped at most once: its retransmission (same
        // SSRC and sequence) passes.
        if !seen.insert(key) {
            return false;
        }
        let n = self.network;
        if self.burst_left == 0 && n.burst_max >= 2 && self.rng.unit() < n.burst_start {
            self.burst_left = 2 + (self.rng.unit() * f64::from(n.burst_max - 1)) as u32;
        }
        let in_burst = self.burst_left > 0;
        if in_burst {
            self.burst_left -= 1;
            s.burst_dropped += 1;
        }
        if in_burst || self.rng.unit() < self.loss {
            s.dropped.push(Dropped {
                ssrc: key.0,
                sequence: key.1,
                at: Instant::now(),
            });
            return true;
        }
        false
    }

    /// How to deliver a packet that passed: `(copies, delay)`.
    fn delivery(&mut self, datagram: &[u8], towards: Towards) -> (u32, std::time::Duration) {
        if towards != self.towards || rtp_of_type(datagram, self.payload_type).is_none() {
            return (1, std::time::Duration::ZERO);
        }
        let n = self.network;
        let copies = if self.rng.unit() < n.duplicate { 2 } else { 1 };
        let delay = if self.rng.unit() < n.jitter_fraction {
            n.jitter_max.mul_f64(self.rng.unit())
        } else {
            std::time::Duration::ZERO
        };
        (copies, delay)
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    down: Arc<UdpSocket>,
    up: Arc<UdpSocket>,
    captured: Arc<Mutex<VecDeque<Vec<u8>>>>,
    server: SocketAddr,
    mut impairment: Impairment,
    armed: Arc<AtomicBool>,
    blackhole: Arc<AtomicBool>,
    stats: Arc<Mutex<ProxyStats>>,
) {
    let mut client: Option<SocketAddr> = None;
    let mut seen: HashSet<(u32, u16)> = HashSet::new();
    let mut from_client = vec![0u8; 2048];
    let mut from_server = vec![0u8; 2048];
    loop {
        tokio::select! {
            r = down.recv_from(&mut from_client) => {
                let Ok((n, src)) = r else { return };
                client = Some(src);
                if blackhole.load(Ordering::Relaxed) {
                    continue;
                }
                let datagram = &from_client[..n];
                if armed.load(Ordering::Relaxed)
                    && impairment.drops(datagram, Towards::Server, &mut seen, &stats)
                {
                    continue;
                }
                if rtp_of_type(datagram, impairment.payload_type).is_some() {
                    let mut c = captured.lock().unwrap();
                    if c.len() == 64 {
                        c.pop_front();
                    }
                    c.push_back(datagram.to_vec());
                }
                let _ = up.send_to(datagram, server).await;
                stats.lock().unwrap().up += 1;
            }
            r = up.recv_from(&mut from_server) => {
                let Ok((n, src)) = r else { return };
                let Some(client) = client else { continue };
                if src != server || blackhole.load(Ordering::Relaxed) {
                    continue;
                }
                let datagram = &from_server[..n];
                let is_armed = armed.load(Ordering::Relaxed);
                if is_armed && impairment.drops(datagram, Towards::Client, &mut seen, &stats) {
                    continue;
                }
                let (copies, delay) = if is_armed {
                    impairment.delivery(datagram, Towards::Client)
                } else {
                    (1, std::time::Duration::ZERO)
                };
                {
                    let mut s = stats.lock().unwrap();
                    s.down += 1;
                    s.duplicated += u64::from(copies - 1);
                    s.delayed += u64::from(!delay.is_zero());
                }
                if delay.is_zero() {
                    for _ in 0..copies {
                        let _ = down.send_to(datagram, client).await;
                    }
                } else {
                    // Held back while later packets go ahead: reordering.
                    let down = Arc::clone(&down);
                    let datagram = datagram.to_vec();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        for _ in 0..copies {
                            let _ = down.send_to(&datagram, client).await;
                        }
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_rtp_by_payload_type() {
        let mut rtp = [0u8; 20];
        rtp[0] = 0x80;
        rtp[1] = 0x80 | 96; // marker + PT 96
        rtp[2..4].copy_from_slice(&513u16.to_be_bytes());
        rtp[8..12].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(rtp_of_type(&rtp, 96), Some((7, 513)));
        assert_eq!(rtp_of_type(&rtp, 111), None);
        let mut rtcp = rtp;
        rtcp[1] = 200; // sender report: 200 & 0x7f = 72
        assert_eq!(rtp_of_type(&rtcp, 96), None);
        assert_eq!(rtp_of_type(&[0x00, 0x01, 0, 0], 96), None, "STUN");
        assert_eq!(rtp_of_type(&[22, 254, 253], 96), None, "DTLS");
    }

    #[test]
    fn the_generator_is_fixed_by_its_seed() {
        let draw = |seed| {
            let mut r = Rng(seed);
            (0..1000).map(|_| r.unit()).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let below = draw(42).iter().filter(|x| **x < 0.05).count();
        assert!((25..=75).contains(&below), "{below} of 1000 below 0.05");
    }
}
