//! The SFU's per-subscriber send path, end to end in one process: for one
//! publisher's 1200-byte VP8 packet, each of N subscriber legs runs
//! `Leg::forward` (the forwarder's decision, the header rewrite on a clone
//! whose payload is shared, `rtc`'s `write_rtp`: interceptors and SRTP
//! encryption) and is drained of its encrypted datagram (`poll_write`).
//! Only the socket is missing: the legs were connected to `rtc` client
//! endpoints over memory first (real ICE, DTLS and SRTP keys).
//!
//! Reported in forwarded packets (elements) per second, at fan-out 1, 4
//! and 16 with AEAD_AES_128_GCM, and at 16 with AES_CM_128_HMAC_SHA1_80.
//!
//! After the timings, a counting global allocator reports heap
//! allocations per forwarded packet in steady state, split into Confab's
//! own part (forwarder, clone, rewrite) and the whole path.
//!
//! Run: `cargo bench --bench rtc_forward` (add `-- --quick` for a short run).

use std::alloc::System;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use rtc::sansio::Protocol;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

use confab::load::client::{encode_payload, FramePart, SrtpChoice, Stamp};
use confab::load::memory::MemoryRoom;
use confab::media::forwarder::{DownTrackParams, Forwarder, Verdict};
use confab::media::leg::{Forwarded, Kind, PT_VP8};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const PUBLISHER: &str = "pub";
const PAYLOAD_LEN: usize = 1188; // + 12-byte RTP header = 1200 B

struct Source {
    seq: u16,
    ts: u32,
    payload: Bytes,
    started: Instant,
    first: bool,
}

impl Source {
    fn new() -> Source {
        let stamp = Stamp {
            tag: 1,
            seq: 0,
            sent_us: 0,
        };
        Source {
            seq: 1000,
            ts: 90_000,
            payload: encode_payload(FramePart::KeyframeStart, stamp, PAYLOAD_LEN),
            started: Instant::now(),
            first: true,
        }
    }

    /// The next packet as the publisher's leg would hand it over.
    fn next(&mut self) -> (rtc::rtp::Packet, bool) {
        self.seq = self.seq.wrapping_add(1);
        self.ts = self.ts.wrapping_add(3000);
        let keyframe = std::mem::replace(&mut self.first, false);
        let packet = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                payload_type: PT_VP8,
                sequence_number: self.seq,
                timestamp: self.ts,
                ssrc: 0x1234_5678,
                ..Default::default()
            },
            payload: self.payload.clone(),
        };
        (packet, keyframe)
    }
}

/// Forwards one packet to every leg and drains their datagrams; returns
/// how many were sent.
fn forward_one(room: &mut MemoryRoom, source: &mut Source) -> usize {
    let (packet, keyframe) = source.next();
    let now = Instant::now();
    let micros = now.duration_since(source.started).as_micros() as u64;
    let mut sent = 0;
    for leg in &mut room.legs {
        if leg.forward(PUBLISHER, Kind::Video, &packet, keyframe, now, micros) == Forwarded::Sent {
            sent += 1;
        }
        while let Some(out) = leg.pc().poll_write() {
            black_box(&out.message);
        }
    }
    sent
}

fn connect(n: usize, srtp: SrtpChoice) -> MemoryRoom {
    MemoryRoom::connect(n, PUBLISHER, srtp, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("legs connect in memory: {e}"))
}

fn send_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("leg_send_1200B");
    for (srtp, name, fan_outs) in [
        (SrtpChoice::Gcm, "gcm", &[1usize, 4, 16][..]),
        (SrtpChoice::AesCm, "aes-cm", &[16usize][..]),
    ] {
        for &n in fan_outs {
            let mut room = connect(n, srtp);
            let mut source = Source::new();
            // Past the keyframe and into steady state (the NACK responder's
            // buffer of 1024 packets full).
            for _ in 0..2000 {
                forward_one(&mut room, &mut source);
            }
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| forward_one(&mut room, &mut source));
            });
        }
    }
    group.finish();
}

/// Allocations per forwarded packet, Confab's part alone and the whole
/// path, printed as a table (criterion does not measure memory).
fn allocations() {
    const PACKETS: usize = 5000;
    println!("\nheap allocations per forwarded 1200 B packet (steady state, {PACKETS} packets):");
    println!(
        "{:<8} {:>8} {:>14} {:>14} {:>16}",
        "srtp", "fan-out", "confab allocs", "total allocs", "total bytes"
    );
    for (srtp, name) in [(SrtpChoice::Gcm, "gcm"), (SrtpChoice::AesCm, "aes-cm")] {
        for n in [1usize, 4, 16] {
            // Confab's own part: the forwarder's decision, the clone that
            // shares the payload, and the header rewrite.
            let mut forwarders: Vec<Forwarder> = (0..n)
                .map(|i| {
                    Forwarder::new(DownTrackParams {
                        ssrc: 1000 + i as u32,
                        payload_type: PT_VP8,
                        clock_rate: 90_000,
                        video: true,
                    })
                })
                .collect();
            let mut source = Source::new();
            let own = |forwarders: &mut [Forwarder], source: &mut Source| {
                let (packet, keyframe) = source.next();
                for f in forwarders.iter_mut() {
                    let h = &packet.header;
                    if let Verdict::Send {
                        sequence,
                        timestamp,
                    } = f.forward(h.ssrc, h.sequence_number, h.timestamp, keyframe, 0)
                    {
                        let mut p = packet.clone();
                        p.header.ssrc = f.params().ssrc;
                        p.header.sequence_number = sequence;
                        p.header.timestamp = timestamp;
                        black_box(&p);
                    }
                }
            };
            for _ in 0..100 {
                own(&mut forwarders, &mut source);
            }
            let region = Region::new(GLOBAL);
            for _ in 0..PACKETS {
                own(&mut forwarders, &mut source);
            }
            let confab = region.change();

            let mut room = connect(n, srtp);
            let mut source = Source::new();
            for _ in 0..2000 {
                forward_one(&mut room, &mut source);
            }
            let region = Region::new(GLOBAL);
            let mut sent = 0;
            for _ in 0..PACKETS {
                sent += forward_one(&mut room, &mut source);
            }
            let total = region.change();
            let per = |x: usize| x as f64 / sent.max(1) as f64;
            println!(
                "{:<8} {:>8} {:>14.2} {:>14.2} {:>16.0}",
                name,
                n,
                confab.allocations as f64 / (PACKETS * n) as f64,
                per(total.allocations + total.reallocations),
                per(total.bytes_allocated),
            );
        }
    }
}

criterion_group!(benches, send_path);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    allocations();
}
