//! Forwarding hot path, pure logic only: for one incoming 1200-byte video
//! RTP packet, parse its header once, then for each of N subscribers run the
//! downtrack's forwarder and produce the rewritten packet in a reused
//! per-subscriber buffer (copy + header rewrite). No sockets and no SRTP:
//! this is the part Confab owns on top of the kernel and crypto costs (see
//! the ceiling figures in docs/architecture.md).
//!
//! Throughput is reported in forwarded packets (elements) per second.
//! Run: `cargo bench --bench forward`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use confab::media::forwarder::{DownTrackParams, Forwarder, Verdict};
use confab::media::rtp;

const PACKET_LEN: usize = 1200;
/// Packets per measured iteration, so that per-iteration overhead vanishes.
const BATCH: u16 = 64;

fn packet(seq: u16, ts: u32) -> Vec<u8> {
    let mut p = vec![0u8; PACKET_LEN];
    p[0] = 0x80;
    p[1] = 96;
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p[4..8].copy_from_slice(&ts.to_be_bytes());
    p[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    p
}

fn fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward_1200B");
    for subscribers in [1usize, 10, 50] {
        group.throughput(Throughput::Elements(u64::from(BATCH) * subscribers as u64));
        group.bench_with_input(
            BenchmarkId::new("fan_out", subscribers),
            &subscribers,
            |b, &n| {
                let mut forwarders: Vec<Forwarder> = (0..n)
                    .map(|i| {
                        Forwarder::new(DownTrackParams {
                            ssrc: 1000 + i as u32,
                            payload_type: 96,
                            clock_rate: 90_000,
                            video: true,
                        })
                    })
                    .collect();
                let mut out: Vec<Vec<u8>> = vec![Vec::with_capacity(1500); n];
                let packets: Vec<Vec<u8>> =
                    (0..BATCH).map(|i| packet(i, u32::from(i) * 3000)).collect();
                let mut round: u16 = 0;
                let mut now = 0u64;
                b.iter(|| {
                    round = round.wrapping_add(BATCH);
                    for (i, p) in packets.iter().enumerate() {
                        // Advance the sequence numbers each round so the
                        // forwarders see a live, moving stream.
                        let seq = round.wrapping_add(i as u16);
                        let header = rtp::parse(black_box(p)).expect("valid packet");
                        now += 1_000;
                        for (f, buf) in forwarders.iter_mut().zip(out.iter_mut()) {
                            let verdict = f.forward(header.ssrc, seq, header.timestamp, true, now);
                            if let Verdict::Send {
                                sequence,
                                timestamp,
                            } = verdict
                            {
                                buf.clear();
                                buf.extend_from_slice(p);
                                let params = f.params();
                                rtp::rewrite(
                                    buf,
                                    params.payload_type,
                                    sequence,
                                    timestamp,
                                    params.ssrc,
                                );
                            }
                            black_box(&buf);
                        }
                    }
                });
            },
        );
    }
    group.finish();
}

/// What active-speaker detection adds: per incoming audio packet, finding
/// the audio-level extension among the header's (rtc has parsed them
/// already) and feeding the publisher's meter; per room and 250 ms window,
/// the detector's update.
fn speakers(c: &mut Criterion) {
    use confab::media::speaker::{LevelMeter, SpeakerDetector};
    let mut group = c.benchmark_group("speakers");
    let mut header = rtc::rtp::header::Header {
        version: 2,
        payload_type: 111,
        ssrc: 0x1234_5678,
        ..Default::default()
    };
    // As browsers send audio: transport-cc and the audio level.
    header
        .set_extension(3, bytes::Bytes::from_static(&[0, 1]))
        .unwrap();
    header
        .set_extension(1, bytes::Bytes::from_static(&[0x80 | 30]))
        .unwrap();
    group.throughput(Throughput::Elements(u64::from(BATCH)));
    group.bench_function("observe_audio_packet", |b| {
        let mut meter = LevelMeter::default();
        let id = Some(1u8);
        b.iter(|| {
            for _ in 0..BATCH {
                if let Some(level) = black_box(id)
                    .and_then(|id| black_box(&header).get_extension(id))
                    .and_then(|b| b.first().copied())
                {
                    meter.observe(level);
                }
            }
            black_box(meter.take())
        });
    });
    for members in [3usize, 50] {
        group.throughput(Throughput::Elements(members as u64));
        group.bench_with_input(
            BenchmarkId::new("room_window", members),
            &members,
            |b, &n| {
                let names: Vec<String> = (0..n).map(|i| format!("p-{i:08x}")).collect();
                let mut detector = SpeakerDetector::default();
                let mut round = 0usize;
                b.iter(|| {
                    round += 1;
                    // A few talkers whose loudness moves, the rest silent.
                    let windows = names.iter().enumerate().map(|(i, id)| {
                        let score = if i < 3 {
                            ((i + round) % 5) as f32 / 5.0
                        } else {
                            0.0
                        };
                        (id.as_str(), score)
                    });
                    black_box(detector.update(windows))
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, fan_out, speakers);
criterion_main!(benches);
