//! Fuzzing on the stable toolchain: every parser Confab owns gets
//! `CONFAB_FUZZ_CASES` inputs (100 000 by default) from a seeded mutation
//! engine, deterministic for a given `CONFAB_FUZZ_SEED`, and checks the
//! properties of its target in [`targets`]. Inputs are a mix of valid
//! structured ones (RTP packets, VP8 descriptors, STUN Binding requests,
//! signaling messages, join tokens, TURN usernames, publisher streams),
//! those mutated (bit flips, interesting bytes, length-field lies,
//! truncation, insertion, duplication, splicing with another input), the
//! checked-in corpus mutated, and raw bytes.
//!
//! A failing input is written to `target/tmp/fuzz-failures/` with the seed
//! and case number in the panic message; once fixed, it goes into
//! `tests/corpus/<target>/`, which [`corpus_replays`] runs on every test
//! run. Longer runs: `CONFAB_FUZZ_CASES=10000000 CONFAB_FUZZ_SEED=$RANDOM
//! cargo test --test it fuzz::`.

pub mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;

use confab::auth::{self, Claims, Grants};
use targets::{Target, TARGETS};

/// Inputs per target and run unless `CONFAB_FUZZ_CASES` says otherwise.
const DEFAULT_CASES: u64 = 100_000;
/// The seed unless `CONFAB_FUZZ_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0xc0f4_b5ee_d000_0008;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target)
}

/// The files of a corpus directory, sorted by name.
fn corpus_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.expect("corpus directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("corpus file");
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Builds a valid (or deliberately borderline) input for one target.
type Generator = fn(&mut StdRng) -> Vec<u8>;

/// Runs `target` on `cases` inputs; panics with a reproducible report on
/// the first failure.
fn fuzz(name: &str, generate: Generator) {
    let target = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .expect("a registered target");
    let cases = env_u64("CONFAB_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    let seed = env_u64("CONFAB_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let mut rng = StdRng::seed_from_u64(seed ^ fnv1a(name));
    let started = Instant::now();
    // Splice partners and mutation bases: the corpus, then generated
    // inputs; a slot is replaced by a recent input now and then.
    let mut pool: Vec<Vec<u8>> = corpus_files(&corpus_dir(name))
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    let corpus_len = pool.len();
    pool.extend((0..64).map(|_| generate(&mut rng)));
    for case in 0..cases {
        let input = match rng.random_range(0..100u32) {
            0..10 => generate(&mut rng),
            10..20 => random_bytes(&mut rng),
            20..35 => {
                let base = pool[rng.random_range(0..pool.len())].clone();
                mutate(&mut rng, base, &pool)
            }
            _ => {
                let base = generate(&mut rng);
                mutate(&mut rng, base, &pool)
            }
        };
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(&input))) {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("?");
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
            let file = dir.join(format!("{name}-{seed:x}-{case}.bin"));
            let saved = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(&file, &input))
                .map_or_else(
                    |e| format!("not saved: {e}"),
                    |()| file.display().to_string(),
                );
            panic!(
                "fuzz target {name}: {what}\n  CONFAB_FUZZ_SEED={seed:#x}, case {case}\n  \
                 input ({} bytes, {saved}): {}",
                input.len(),
                hex(&input[..input.len().min(256)])
            );
        }
        if case % 257 == 0 {
            let slot = corpus_len + rng.random_range(0..pool.len() - corpus_len);
            pool[slot] = input;
        }
    }
    eprintln!(
        "fuzz target {name}: {cases} inputs, seed {seed:#x}, {:.2} s",
        started.elapsed().as_secs_f64()
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_bytes(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.random_range(0..4u32) {
        0 => rng.random_range(0..16),
        1 => rng.random_range(0..64),
        2 => rng.random_range(0..300),
        _ => rng.random_range(0..1600),
    };
    let mut v = vec![0; len];
    rng.fill_bytes(&mut v);
    v
}

/// Values that sit on edges of length and count fields.
const INTERESTING_8: [u8; 9] = [0, 1, 2, 3, 4, 0x7f, 0x80, 0xfe, 0xff];
const INTERESTING_16: [u16; 10] = [0, 1, 3, 4, 0x7fff, 0x8000, 0xfffe, 0xffff, 20, 1500];

/// Applies one to eight random mutations.
fn mutate(rng: &mut StdRng, mut v: Vec<u8>, pool: &[Vec<u8>]) -> Vec<u8> {
    let n = 1 + rng.random_range(0..8u32).trailing_zeros().min(7);
    for _ in 0..n {
        let len = v.len();
        match rng.random_range(0..12u32) {
            0 | 1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            2 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = rng.random();
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = INTERESTING_8[rng.random_range(0..INTERESTING_8.len())];
            }
            4 if len > 1 => {
                // A 16-bit length or count field that lies, or one derived
                // from the real length.
                let i = rng.random_range(0..len - 1);
                let x = match rng.random_range(0..3u32) {
                    0 => INTERESTING_16[rng.random_range(0..INTERESTING_16.len())],
                    1 => (len as u16)
                        .wrapping_add(rng.random_range(0..8))
                        .wrapping_sub(4),
                    _ => ((len as u16) / 4)
                        .wrapping_add(rng.random_range(0..3))
                        .wrapping_sub(1),
                };
                v[i..i + 2].copy_from_slice(&x.to_be_bytes());
            }
            5 if len > 0 => v.truncate(rng.random_range(0..len)),
            6 => {
                let extra = rng.random_range(1..64);
                let mut tail = vec![0; extra];
                rng.fill_bytes(&mut tail);
                let at = rng.random_range(0..=len);
                v.splice(at..at, tail);
            }
            7 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len.min(a + 64));
                v.drain(a..b);
            }
            8 if len > 0 => {
                // Duplicate a range (repeated attributes, fields, packets).
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len.min(a + 64));
                let chunk = v[a..b].to_vec();
                let at = rng.random_range(0..=len);
                v.splice(at..at, chunk);
            }
            9 => {
                // Splice: this input's head with another's tail.
                let other = &pool[rng.random_range(0..pool.len())];
                let cut = rng.random_range(0..=len);
                let from = rng.random_range(0..=other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            10 if len > 0 => {
                let i = rng.random_range(0..len);
                let d: u8 = rng.random_range(1..=16);
                v[i] = if rng.random() {
                    v[i].wrapping_add(d)
                } else {
                    v[i].wrapping_sub(d)
                };
            }
            11 if len > 1 => {
                let (a, b) = (rng.random_range(0..len), rng.random_range(0..len));
                v.swap(a, b);
            }
            _ => v.push(rng.random()),
        }
    }
    v
}

// --- Generators -----------------------------------------------------------

/// A VP8 payload: a payload descriptor with random optional fields, the
/// payload header, a few bytes.
fn gen_vp8(rng: &mut StdRng) -> Vec<u8> {
    let mut p = Vec::new();
    let extended = rng.random_bool(0.5);
    let start = rng.random_bool(0.7);
    let pid = if rng.random_bool(0.8) {
        0
    } else {
        rng.random_range(0..8)
    };
    p.push(u8::from(extended) << 7 | u8::from(start) << 4 | pid);
    if extended {
        let x: u8 = rng.random::<u8>() & 0xf0;
        p.push(x);
        if x & 0x80 != 0 {
            if rng.random() {
                p.extend_from_slice(&(0x8000 | rng.random::<u16>()).to_be_bytes());
            } else {
                p.push(rng.random::<u8>() & 0x7f);
            }
        }
        if x & 0x40 != 0 {
            p.push(rng.random());
        }
        if x & 0x30 != 0 {
            p.push(rng.random());
        }
    }
    // Payload header: P bit clear for a keyframe, then the start code.
    let key = rng.random_bool(0.5);
    p.push(if key { 0x10 } else { 0x11 });
    if rng.random() {
        p.extend_from_slice(&[0x02, 0x00, 0x9d, 0x01, 0x2a]);
    }
    let extra = rng.random_range(0..20);
    p.extend((0..extra).map(|_| rng.random::<u8>()));
    p
}

/// An RTP packet: random CSRCs, a one- or two-byte header extension,
/// a VP8 or opaque payload, padding; sometimes with a length that lies.
fn gen_rtp(rng: &mut StdRng) -> Vec<u8> {
    let cc = if rng.random_bool(0.8) {
        0
    } else {
        rng.random_range(0..16u8)
    };
    let extension = rng.random_bool(0.5);
    let padding = rng.random_bool(0.3);
    let shape = RtpShape {
        cc,
        extension,
        padding,
        seq: rng.random(),
        ts: rng.random(),
        ssrc: rng.random(),
        lie: rng.random_bool(0.1),
    };
    gen_rtp_with(rng, shape)
}

#[derive(Clone, Copy)]
struct RtpShape {
    cc: u8,
    extension: bool,
    padding: bool,
    seq: u16,
    ts: u32,
    ssrc: u32,
    lie: bool,
}

fn gen_rtp_with(rng: &mut StdRng, s: RtpShape) -> Vec<u8> {
    let mut p = vec![
        0x80 | u8::from(s.padding) << 5 | u8::from(s.extension) << 4 | s.cc,
        u8::from(rng.random_bool(0.2)) << 7 | rng.random_range(96..128u8),
    ];
    p.extend_from_slice(&s.seq.to_be_bytes());
    p.extend_from_slice(&s.ts.to_be_bytes());
    p.extend_from_slice(&s.ssrc.to_be_bytes());
    for _ in 0..s.cc {
        p.extend_from_slice(&rng.random::<u32>().to_be_bytes());
    }
    if s.extension {
        let words: u16 = rng.random_range(0..5);
        let profile: u16 = if rng.random() { 0xbede } else { 0x1000 };
        p.extend_from_slice(&profile.to_be_bytes());
        let declared = if s.lie {
            words + rng.random_range(1..300)
        } else {
            words
        };
        p.extend_from_slice(&declared.to_be_bytes());
        // One-byte elements (id 1: 3 bytes, e.g. abs-send-time), padded.
        for _ in 0..words {
            p.extend_from_slice(&[0x12, rng.random(), rng.random(), rng.random()]);
        }
    }
    if rng.random_bool(0.7) {
        p.extend(gen_vp8(rng));
    } else {
        let n = rng.random_range(0..200);
        p.extend((0..n).map(|_| rng.random::<u8>()));
    }
    if s.padding {
        let pad: u8 = rng.random_range(1..=32);
        p.extend(std::iter::repeat_n(0, usize::from(pad) - 1));
        let last = if s.lie {
            // Zero, or more than the payload.
            if rng.random() {
                0
            } else {
                pad.saturating_add(rng.random_range(1..=255))
            }
        } else {
            pad
        };
        p.push(last);
    }
    p
}

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

fn stun_attr(m: &mut Vec<u8>, kind: u16, value: &[u8]) {
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&(value.len() as u16).to_be_bytes());
    m.extend_from_slice(value);
    m.resize(m.len().div_ceil(4) * 4, 0);
}

fn ice_chars(rng: &mut StdRng, n: usize) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/";
    (0..n)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect()
}

/// A STUN message the way ICE sends them: mostly Binding requests with
/// USERNAME, PRIORITY, ICE-CONTROLLING, MESSAGE-INTEGRITY and FINGERPRINT
/// in varied order, sometimes other methods and classes.
fn gen_stun(rng: &mut StdRng) -> Vec<u8> {
    let typ: u16 = match rng.random_range(0..10u32) {
        0..7 => 0x0001,
        7 => 0x0101, // success response
        8 => 0x0011, // indication
        _ => rng.random::<u16>() & 0x3fff,
    };
    let mut m = typ.to_be_bytes().to_vec();
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&MAGIC_COOKIE);
    m.extend((0..12).map(|_| rng.random::<u8>()));
    let mut attrs: Vec<(u16, Vec<u8>)> = Vec::new();
    if rng.random_bool(0.9) {
        let local = rng.random_range(0..12);
        let remote = rng.random_range(0..12);
        let sep = if rng.random_bool(0.9) { ":" } else { "" };
        let username = format!("{}{sep}{}", ice_chars(rng, local), ice_chars(rng, remote));
        attrs.push((0x0006, username.into_bytes()));
    }
    attrs.push((0x0024, rng.random::<u32>().to_be_bytes().to_vec()));
    attrs.push((
        if rng.random() { 0x802a } else { 0x8029 },
        rng.random::<u64>().to_be_bytes().to_vec(),
    ));
    if rng.random_bool(0.3) {
        attrs.push((0x0025, Vec::new())); // USE-CANDIDATE
    }
    let shift = rng.random_range(0..attrs.len());
    attrs.rotate_left(shift);
    for (kind, value) in &attrs {
        stun_attr(&mut m, *kind, value);
    }
    stun_attr(&mut m, 0x0008, &rng.random::<[u8; 20]>());
    stun_attr(&mut m, 0x8028, &rng.random::<u32>().to_be_bytes());
    let len = (m.len() - 20) as u16;
    m[2..4].copy_from_slice(&len.to_be_bytes());
    m
}

fn gen_string(rng: &mut StdRng) -> serde_json::Value {
    let s = match rng.random_range(0..8u32) {
        0 => String::new(),
        1 => "p-1".into(),
        2 => "\u{0}\u{1f}\"\\".into(),
        3 => "é🎥\u{202e}".into(),
        4 => "x".repeat(rng.random_range(100..600)),
        _ => {
            let n = rng.random_range(1..12);
            ice_chars(rng, n)
        }
    };
    json!(s)
}

fn gen_value(rng: &mut StdRng) -> serde_json::Value {
    match rng.random_range(0..10u32) {
        0 => json!(null),
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random::<u32>()),
        3 => json!(-1),
        4 => json!(1e300),
        5 => json!(u64::MAX),
        6 => json!([]),
        7 => json!({}),
        _ => gen_string(rng),
    }
}

fn gen_sdp(rng: &mut StdRng) -> serde_json::Value {
    match rng.random_range(0..6u32) {
        0 => json!("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"),
        1 => json!("a=x\n".repeat(rng.random_range(9_990..10_010))),
        2 => json!("\r".repeat(rng.random_range(0..50))),
        _ => gen_string(rng),
    }
}

/// A client message of every type, with valid fields or a field of
/// another type, missing or extra.
fn gen_signaling(rng: &mut StdRng) -> Vec<u8> {
    let mut m = match rng.random_range(0..12u32) {
        0 => json!({"type": "join", "v": 2, "room": gen_string(rng), "name": gen_string(rng),
                    "token": gen_string(rng)}),
        1 => json!({"type": "offer", "to": "p-2", "sdp": gen_sdp(rng)}),
        2 => json!({"type": "answer", "to": "sfu", "sdp": gen_sdp(rng)}),
        3 => json!({"type": "candidate", "to": "p-2", "candidate": {
                "candidate": "candidate:1 1 udp 2122260223 192.0.2.1 5000 typ host",
                "sdp_mid": "0", "sdp_mline_index": 0, "username_fragment": gen_string(rng)}}),
        4 => json!({"type": "media_state", "audio_muted": true, "video_muted": false}),
        5 => json!({"type": "media_ready", "epoch": rng.random::<u64>()}),
        6 => json!({"type": "p2p_failed"}),
        7 => json!({"type": "ping", "id": gen_value(rng)}),
        8 => json!({"type": "leave"}),
        9 => {
            let to = ["sfu", "p2p", "to_sfu", "x"][rng.random_range(0..4usize)];
            let gap = [0.0, 180.5, -1.0, 60_000.0, 60_000.5, 1e300][rng.random_range(0..6usize)];
            json!({"type": "switch_report", "epoch": rng.random::<u64>(), "to": to, "gap_ms": gap})
        }
        10 => {
            // Around the length limit, blank, or any string.
            let text = match rng.random_range(0..4u32) {
                0 => json!("é".repeat(rng.random_range(1_995..2_005))),
                1 => json!(" \n\t".repeat(rng.random_range(0..5))),
                _ => gen_string(rng),
            };
            json!({"type": "chat", "text": text, "to": gen_value(rng)})
        }
        _ => json!({"type": gen_string(rng)}),
    };
    let object = m.as_object_mut().expect("an object");
    match rng.random_range(0..6u32) {
        0 => {
            let keys: Vec<String> = object.keys().cloned().collect();
            let key = &keys[rng.random_range(0..keys.len())];
            object.insert(key.clone(), gen_value(rng));
        }
        1 => {
            let keys: Vec<String> = object.keys().cloned().collect();
            object.remove(&keys[rng.random_range(0..keys.len())]);
        }
        2 => {
            object.insert("extra".into(), gen_value(rng));
        }
        _ => {}
    }
    let text = m.to_string();
    match rng.random_range(0..20u32) {
        // Deep nesting, under and over serde_json's recursion limit.
        0 => {
            let depth = rng.random_range(100..200);
            format!(
                "{{\"type\":\"ping\",\"id\":{}{}}}",
                "[".repeat(depth),
                "]".repeat(depth)
            )
            .into_bytes()
        }
        // A duplicate key, appended.
        1 => format!("{},\"type\":\"leave\"}}", &text[..text.len() - 1]).into_bytes(),
        // Escapes: lone surrogates, unicode.
        2 => text.replace("p-2", "\\ud800p\\u00e9").into_bytes(),
        _ => text.into_bytes(),
    }
}

/// A join token: valid, expired, not yet valid, for another room,
/// without a required claim, signed with another secret, or with a header
/// naming another algorithm or none.
fn gen_token(rng: &mut StdRng) -> Vec<u8> {
    let now = auth::now_secs();
    let claims = Claims {
        sub: if rng.random_bool(0.1) {
            String::new()
        } else {
            "ada".into()
        },
        room: if rng.random_bool(0.8) {
            targets::TOKEN_ROOM.into()
        } else {
            "r2".into()
        },
        exp: match rng.random_range(0..5u32) {
            0 => now - 10,
            1 => u64::MAX,
            _ => now + 600,
        },
        nbf: match rng.random_range(0..5u32) {
            0 => Some(now + 600),
            1 => Some(now - 10),
            _ => None,
        },
        name: rng.random_bool(0.3).then(|| "Ada".into()),
        grants: Grants {
            join: rng.random_bool(0.9),
            publish: rng.random(),
            subscribe: rng.random(),
        },
    };
    let secret = if rng.random_bool(0.9) {
        targets::TOKEN_SECRET
    } else {
        "another-secret-0123456789"
    };
    let token = auth::encode_claims(secret, &claims);
    let b64 = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    match rng.random_range(0..8u32) {
        0 => parts[0] = b64(r#"{"alg":"none","typ":"JWT"}"#),
        1 => parts[0] = b64(r#"{"alg":"HS512","typ":"JWT"}"#),
        2 => parts[0] = b64(r#"{"typ":"JWT"}"#),
        3 => parts[0] = b64(r#"{"alg":7}"#),
        4 => parts[2].clear(),
        _ => {}
    }
    parts.join(".").into_bytes()
}

fn gen_turn_username(rng: &mut StdRng) -> Vec<u8> {
    let expiry = match rng.random_range(0..8u32) {
        0 => String::new(),
        1 => "0001700000001".into(),
        2 => u64::MAX.to_string(),
        3 => "18446744073709551616".into(),
        4 => format!("+{}", rng.random::<u32>()),
        5 => "1700000000".into(),
        _ => (1_700_000_000 + rng.random_range(-1000i64..100_000)).to_string(),
    };
    let id = match rng.random_range(0..4u32) {
        0 => String::new(),
        1 => "p-1:x".into(),
        _ => format!("p-{}", rng.random::<u16>()),
    };
    let sep = if rng.random_bool(0.95) { ":" } else { "" };
    format!("{expiry}{sep}{id}").into_bytes()
}

/// A datagram to the TURN port: requests of every TURN method with good,
/// expired, forged, realm-less or nonce-less credentials, peers that are
/// public, private, loopback or the SFU's exception, Send indications,
/// Binding requests, responses, and channel data.
fn gen_turn(rng: &mut StdRng) -> Vec<u8> {
    use stun::message::*;
    use turn::proto::peeraddr::PeerAddress;
    if rng.random_bool(0.05) {
        // ChannelData: channel number 0x4000-0x7fff, length, payload.
        let mut d = (0x4000u16 + rng.random_range(0..0x4000u16))
            .to_be_bytes()
            .to_vec();
        let len = rng.random_range(0..40u16);
        d.extend(len.to_be_bytes());
        d.extend((0..len).map(|_| rng.random::<u8>()));
        return d;
    }
    let (method, class) = match rng.random_range(0..12u32) {
        0..3 => (METHOD_ALLOCATE, CLASS_REQUEST),
        3 | 4 => (METHOD_CREATE_PERMISSION, CLASS_REQUEST),
        5 | 6 => (METHOD_CHANNEL_BIND, CLASS_REQUEST),
        7 => (METHOD_REFRESH, CLASS_REQUEST),
        8 => (METHOD_SEND, CLASS_INDICATION),
        9 => (METHOD_BINDING, CLASS_REQUEST),
        10 => (METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE),
        _ => (METHOD_ALLOCATE, CLASS_ERROR_RESPONSE),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let username = match rng.random_range(0..6u32) {
        0 => format!("{}:p-1", now - 10), // expired
        1 => "p-1".to_owned(),            // no expiry
        _ => format!("{}:p-{}", now + 3600, rng.random::<u16>()),
    };
    let secret: &[u8] = if rng.random_bool(0.8) {
        targets::TURN_SECRET
    } else {
        b"someone else's secret"
    };
    let realm = if rng.random_bool(0.9) {
        targets::TURN_REALM
    } else {
        "elsewhere"
    };
    let peer: std::net::SocketAddr = match rng.random_range(0..12u32) {
        // Inside a refused range, or at either edge of one.
        9 | 10 => {
            let (net, len) = targets::REFUSED_V4[rng.random_range(0..targets::REFUSED_V4.len())];
            let host_bits = u32::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            let base = u32::from_be_bytes(net);
            let ip = match rng.random_range(0..4u32) {
                0 => base.wrapping_sub(1),
                1 => base | host_bits,
                2 => (base | host_bits).wrapping_add(1),
                _ => base | (rng.random::<u32>() & host_bits),
            };
            (std::net::Ipv4Addr::from(ip), rng.random::<u16>()).into()
        }
        11 => {
            let (net, len) = targets::REFUSED_V6[rng.random_range(0..targets::REFUSED_V6.len())];
            let host_bits = u128::MAX.checked_shr(u32::from(len)).unwrap_or(0);
            let base = u128::from(std::net::Ipv6Addr::from(net));
            let ip = match rng.random_range(0..3u32) {
                0 => base.wrapping_sub(1),
                1 => (base | host_bits).wrapping_add(1),
                _ => base | (rng.random::<u128>() & host_bits),
            };
            (std::net::Ipv6Addr::from(ip), rng.random::<u16>()).into()
        }
        6 => (
            std::net::Ipv4Addr::from(rng.random::<u32>()),
            rng.random::<u16>(),
        )
            .into(),
        7 => (
            std::net::Ipv6Addr::from(rng.random::<u128>()),
            rng.random::<u16>(),
        )
            .into(),
        8 => "8.8.8.8:4000".parse().unwrap(),
        0 => "198.51.100.7:4000".parse().unwrap(),
        1 => "10.1.2.3:4000".parse().unwrap(),
        2 => "127.0.0.1:7882".parse().unwrap(),
        3 => targets::TURN_SFU.parse().unwrap(),
        4 => "10.0.0.5:9".parse().unwrap(), // the SFU's IP, another port
        _ => "[2001:db8::1]:4000".parse().unwrap(),
    };
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(stun::agent::TransactionId::new()),
        Box::new(MessageType::new(method, class)),
    ];
    if method == METHOD_ALLOCATE && class == CLASS_REQUEST {
        setters.push(Box::new(turn::proto::reqtrans::RequestedTransport {
            protocol: turn::proto::PROTO_UDP,
        }));
    }
    if method == METHOD_CREATE_PERMISSION || method == METHOD_CHANNEL_BIND || method == METHOD_SEND
    {
        setters.push(Box::new(PeerAddress {
            ip: peer.ip(),
            port: peer.port(),
        }));
    }
    if method == METHOD_CHANNEL_BIND {
        setters.push(Box::new(turn::proto::channum::ChannelNumber(
            0x4000 + rng.random_range(0..0x10u16),
        )));
    }
    if method == METHOD_SEND {
        setters.push(Box::new(turn::proto::data::Data(vec![1, 2, 3])));
    }
    let signed = class == CLASS_REQUEST && method != METHOD_BINDING && rng.random_bool(0.85);
    if signed {
        setters.push(Box::new(stun::textattrs::TextAttribute::new(
            stun::attributes::ATTR_USERNAME,
            username.clone(),
        )));
        setters.push(Box::new(stun::textattrs::TextAttribute::new(
            stun::attributes::ATTR_REALM,
            realm.to_owned(),
        )));
        if rng.random_bool(0.95) {
            setters.push(Box::new(stun::textattrs::TextAttribute::new(
                stun::attributes::ATTR_NONCE,
                "nonce-1".to_owned(),
            )));
        }
        let password = confab::turn_server::credentials::password(secret, &username);
        setters.push(Box::new(
            stun::integrity::MessageIntegrity::new_long_term_integrity(
                username,
                realm.to_owned(),
                password,
            ),
        ));
    }
    if rng.random_bool(0.3) {
        setters.push(Box::new(stun::fingerprint::FINGERPRINT));
    }
    let mut m = Message::new();
    m.build(&setters).expect("a buildable message");
    m.raw
}

/// The downtrack-parameter prefix of the forwarder targets' input.
fn gen_params(rng: &mut StdRng, video: bool) -> Vec<u8> {
    // ssrc (4), payload type (1), clock rate choice (1), video (1).
    let mut v = rng.random::<u32>().to_le_bytes().to_vec();
    v.push(rng.random());
    v.push(if video { 0 } else { 1 });
    v.push(u8::from(video));
    v
}

/// A publisher stream for [`targets::forwarder`]: mostly in order, with
/// the faults drawn in from time to time.
fn gen_forwarder(rng: &mut StdRng) -> Vec<u8> {
    let video = rng.random();
    let mut v = gen_params(rng, video);
    // Three SSRCs, their starting positions, the clock.
    v.extend((0..12 + 18 + 4).map(|_| rng.random::<u8>()));
    let events = rng.random_range(1..48);
    for _ in 0..events {
        // Mostly the first SSRC (op 2, 6, 10...) in order with 20 ms steps.
        // op % 4 picks the SSRC (3: an unknown one); 0 pauses, 1 jumps the
        // clock.
        let op: u8 = match rng.random_range(0..40u32) {
            0 => 0,
            1 => 1,
            2..4 => 3 + 4 * rng.random_range(0..8),
            4..6 => 1 + 4 * rng.random_range(1..8),
            6..7 => 2 + 4 * rng.random_range(0..8),
            _ => 4 * rng.random_range(1..8),
        };
        v.push(op);
        match op {
            0 => continue,
            1 => {
                v.extend(rng.random::<u32>().to_le_bytes());
                continue;
            }
            _ if op % 4 == 3 => v.extend((0..10).map(|_| rng.random::<u8>())),
            _ => {
                // Sequence step kind, then maybe its value; timestamp step.
                let kind: u8 = match rng.random_range(0..20u32) {
                    0 => 4,
                    1 => 5,
                    2 => 6,
                    _ => 0,
                };
                v.push(kind);
                if kind == 5 {
                    v.push(rng.random());
                } else if kind >= 6 {
                    v.extend(rng.random::<u16>().to_le_bytes());
                }
                let tkind: u8 = if rng.random_bool(0.05) { 3 } else { 0 };
                v.push(tkind);
                if tkind == 3 {
                    v.extend(rng.random::<u32>().to_le_bytes());
                }
            }
        }
        // Clock step (~20 ms) and the keyframe flag (1 in 8).
        v.extend(rng.random_range(15_000..25_000u16).to_be_bytes());
        v.push(if rng.random_bool(0.15) { 0 } else { 0xff });
    }
    v
}

/// A publisher's datagrams for [`targets::rtp_forward`], with the faults
/// the hardening promise lists: padding of 0 or past the payload,
/// an extension longer than the packet, sequence wrap, timestamp jumps,
/// an SSRC change mid-stream, unknown SSRCs.
fn gen_rtp_forward(rng: &mut StdRng) -> Vec<u8> {
    let video = rng.random_bool(0.7);
    let mut v = gen_params(rng, video);
    let mut ssrc: u32 = rng.random();
    let mut seq: u16 = if rng.random() { 65_500 } else { rng.random() };
    let mut ts: u32 = if rng.random() {
        u32::MAX - 100_000
    } else {
        rng.random()
    };
    for _ in 0..rng.random_range(1..12) {
        match rng.random_range(0..10u32) {
            0 => ssrc = rng.random(),
            1 => ts = ts.wrapping_add(rng.random_range(0..u32::MAX)),
            2 => seq = seq.wrapping_add(rng.random()),
            _ => {}
        }
        let s = if rng.random_bool(0.05) {
            rng.random()
        } else {
            ssrc
        };
        seq = seq.wrapping_add(1);
        ts = ts.wrapping_add(3000);
        let shape = RtpShape {
            cc: 0,
            extension: rng.random_bool(0.3),
            padding: rng.random_bool(0.1),
            seq,
            ts,
            ssrc: s,
            lie: rng.random_bool(0.05),
        };
        let packet = gen_rtp_with(rng, shape);
        // `Unstructured::int_in_range` reads big-endian bytes.
        v.extend((packet.len() as u16).to_be_bytes());
        v.extend(&packet);
        v.extend(rng.random_range(15_000..25_000u16).to_be_bytes());
    }
    v
}

/// Every target's generator.
const GENERATORS: &[(&str, Generator)] = &[
    ("rtp_header", gen_rtp),
    ("vp8_keyframe", gen_vp8),
    ("stun_ufrag", gen_stun),
    ("signaling", gen_signaling),
    ("join_token", gen_token),
    ("turn_username", gen_turn_username),
    ("forwarder", gen_forwarder),
    ("rtp_forward", gen_rtp_forward),
    ("turn_gate", gen_turn),
];

// --- Tests ------------------------------------------------------------------

/// Writes seed inputs for every target into `tests/corpus/` (for a new
/// target, or to start a cargo-fuzz corpus):
/// `cargo test --test it fuzz_write_seeds -- --ignored`.
#[test]
#[ignore = "writes into the source tree"]
fn fuzz_write_seeds() {
    let mut rng = StdRng::seed_from_u64(DEFAULT_SEED);
    for (name, generate) in GENERATORS {
        let dir = corpus_dir(name);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for i in 0..3 {
            std::fs::write(dir.join(format!("seed-{i}.bin")), generate(&mut rng)).expect("seed");
        }
    }
    for (what, packets) in bad_rtp_cases() {
        for video in [true, false] {
            let kind = if video { "video" } else { "audio" };
            let file = format!(
                "{}-{kind}.bin",
                what.replace([' ', '>'], "-").replace("--", "-")
            );
            std::fs::write(
                corpus_dir("rtp_forward").join(file),
                rtp_stream(video, &packets),
            )
            .expect("scenario");
        }
    }
}

#[test]
fn fuzz_every_target_has_a_generator() {
    for ((t, _), (g, _)) in TARGETS.iter().zip(GENERATORS) {
        assert_eq!(t, g);
    }
    assert_eq!(TARGETS.len(), GENERATORS.len());
}

#[test]
fn fuzz_rtp_header() {
    fuzz("rtp_header", gen_rtp);
}

#[test]
fn fuzz_vp8_keyframe() {
    fuzz("vp8_keyframe", gen_vp8);
}

#[test]
fn fuzz_stun_ufrag() {
    fuzz("stun_ufrag", gen_stun);
}

#[test]
fn fuzz_signaling() {
    fuzz("signaling", gen_signaling);
}

#[test]
fn fuzz_join_token() {
    fuzz("join_token", gen_token);
}

#[test]
fn fuzz_turn_username() {
    fuzz("turn_username", gen_turn_username);
}

#[test]
fn fuzz_forwarder() {
    fuzz("forwarder", gen_forwarder);
}

#[test]
fn fuzz_rtp_forward() {
    fuzz("rtp_forward", gen_rtp_forward);
}

#[test]
fn fuzz_turn_gate() {
    fuzz("turn_gate", gen_turn);
}

/// Builds a [`targets::rtp_forward`] input from whole datagrams.
fn rtp_stream(video: bool, packets: &[Vec<u8>]) -> Vec<u8> {
    // Payload type 96, 90 kHz (choice 0) or 48 kHz (choice 1).
    let mut v = vec![0, 0, 0x2b, 0x67, 96, u8::from(!video), u8::from(video)];
    for p in packets {
        v.extend((p.len() as u16).to_be_bytes());
        v.extend(p);
        v.extend(20_000u16.to_be_bytes());
    }
    v
}

/// An RTP packet with a VP8 payload (`key`: a keyframe's first packet),
/// `tail` appended after the payload.
fn rtp_packet(b0: u8, ssrc: u32, seq: u16, ts: u32, key: bool, tail: &[u8]) -> Vec<u8> {
    let mut p = vec![b0, 96];
    p.extend(seq.to_be_bytes());
    p.extend(ts.to_be_bytes());
    p.extend(ssrc.to_be_bytes());
    if b0 & 0x10 != 0 {
        p.extend([0xbe, 0xde, 0, 1, 0x10, 0xaa, 0, 0]);
    }
    p.extend([0x10, if key { 0x00 } else { 0x01 }, 0x9d, 0x01, 0x2a]);
    p.extend(tail);
    p
}

/// The semantically bad RTP the hardening promise lists, as streams from
/// one publisher that end with a keyframe.
fn bad_rtp_cases() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let a = 0x1111_1111;
    let good = |seq: u16, ts: u32, key: bool| rtp_packet(0x80, a, seq, ts, key, b"");
    let mut cases: Vec<(&str, Vec<Vec<u8>>)> = Vec::new();
    let start = vec![good(100, 1000, true), good(101, 4000, false)];
    let with = |bad: Vec<Vec<u8>>| {
        let mut v = start.clone();
        v.extend(bad);
        v.push(good(104, 13_000, false));
        v.push(good(105, 16_000, true));
        v
    };
    cases.push((
        "padding length 0",
        with(vec![rtp_packet(0xa0, a, 102, 7000, false, &[0, 0])]),
    ));
    cases.push((
        "padding past the payload",
        with(vec![rtp_packet(0xa0, a, 102, 7000, false, &[0, 200])]),
    ));
    let mut overrun = rtp_packet(0x90, a, 103, 10_000, false, b"");
    overrun[15] = 0xff; // extension length 255 words
    cases.push(("extension length past the end", with(vec![overrun])));
    cases.push((
        "sequence wrap 65535 -> 0",
        vec![
            good(65_534, 0, true),
            good(65_535, 3000, false),
            good(0, 6000, false),
            good(1, 9000, false),
        ],
    ));
    cases.push((
        "timestamp jumps",
        with(vec![good(102, 4_000_000_000, false), good(103, 5, false)]),
    ));
    cases.push((
        "SSRC change mid-stream",
        with(vec![
            rtp_packet(0x80, 0x2222, 7, 77, false, b""),
            rtp_packet(0x80, 0x2222, 8, 3077, true, b""),
            rtp_packet(0x80, 0x2222, 9, 6077, false, b""),
        ]),
    ));
    cases.push((
        "unknown SSRCs",
        with(vec![
            rtp_packet(0x80, 0xdead, 50_000, 9, true, b""),
            rtp_packet(0x80, 0xbeef, 1, 9, false, b""),
        ]),
    ));
    cases.push(("sequence renumbered", {
        // Renumbered for good: the old numbers never come back.
        let mut v = start.clone();
        v.extend((0..4).map(|i| good(40_000 + i, 7000 + 3000 * u32::from(i), i == 3)));
        v
    }));
    cases
}

/// The semantically bad RTP the hardening promise lists, each through
/// parse, keyframe detection, the forwarder and the rewrite with the
/// [`targets::StreamChecker`] watching the downtrack's output; and the
/// stream still flows after each.
#[test]
fn fuzz_bad_rtp_from_a_publisher() {
    use confab::media::forwarder::{DownTrackParams, Forwarder, Verdict};
    use confab::media::rtp::{self, RtpError};
    let cases = bad_rtp_cases();
    for (what, packets) in &cases {
        for video in [true, false] {
            let input = rtp_stream(video, packets);
            if catch_unwind(|| targets::rtp_forward(&input)).is_err() {
                panic!("{what} (video {video})");
            }
            // The last packet (a keyframe) is forwarded, whatever came before.
            let params = DownTrackParams {
                ssrc: 9,
                payload_type: 96,
                clock_rate: 90_000,
                video,
            };
            let mut f = Forwarder::new(params);
            let mut last = None;
            for p in packets {
                if let Ok(h) = rtp::parse(p) {
                    let key = confab::media::vp8::is_keyframe(&p[h.payload_offset..]);
                    last = Some(f.forward(h.ssrc, h.sequence, h.timestamp, key, 0));
                }
            }
            assert!(
                matches!(last, Some(Verdict::Send { .. })),
                "{what} (video {video}): stream stopped: {last:?}"
            );
        }
    }
    assert_eq!(
        rtp::parse(&cases[0].1[2]).unwrap_err(),
        RtpError::BadPadding
    );
    assert_eq!(
        rtp::parse(&cases[1].1[2]).unwrap_err(),
        RtpError::BadPadding
    );
    assert_eq!(
        rtp::parse(&cases[2].1[2]).unwrap_err(),
        RtpError::HeaderOverrun
    );
}

/// Every file under `tests/corpus/<target>/` through its target: seeds
/// and every input that once failed.
#[test]
fn corpus_replays() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut replayed = 0;
    for dir in std::fs::read_dir(&root).expect("tests/corpus") {
        let dir = dir.expect("corpus entry").path();
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let target: Target = TARGETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("{} is no fuzz target", dir.display()));
        for (path, bytes) in corpus_files(&dir) {
            if catch_unwind(|| target(&bytes)).is_err() {
                panic!("corpus input {} fails", path.display());
            }
            replayed += 1;
        }
    }
    assert!(replayed >= TARGETS.len(), "a seed per target at least");
    eprintln!("corpus: {replayed} inputs replayed");
}

/// The generators produce inputs their targets accept as valid often
/// enough to reach the deep checks (not only the error paths).
#[test]
fn fuzz_generators_reach_valid_inputs() {
    let mut rng = StdRng::seed_from_u64(7);
    let n = 2000;
    let ok = |f: &dyn Fn(&[u8]) -> bool, g: Generator, rng: &mut StdRng| {
        (0..n).filter(|_| f(&g(rng))).count()
    };
    let rtp_ok = ok(&|p| confab::media::rtp::parse(p).is_ok(), gen_rtp, &mut rng);
    let key = ok(&confab::media::vp8::is_keyframe, gen_vp8, &mut rng);
    let ufrag = ok(
        &|p| confab::media::stun::local_ufrag(p).is_some(),
        gen_stun,
        &mut rng,
    );
    let msg = ok(
        &|p| {
            let text = String::from_utf8_lossy(p);
            confab::signaling::protocol::parse_client_message(&text).is_ok()
        },
        gen_signaling,
        &mut rng,
    );
    let token = ok(
        &|p| {
            let t = String::from_utf8_lossy(p);
            auth::verify(targets::TOKEN_SECRET, &t, targets::TOKEN_ROOM).is_ok()
        },
        gen_token,
        &mut rng,
    );
    for (what, count) in [
        ("rtp", rtp_ok),
        ("keyframe", key),
        ("ufrag", ufrag),
        ("message", msg),
        ("token", token),
    ] {
        assert!(count > n / 10, "{what}: {count} of {n} valid");
    }
    // The TURN generator reaches every decision of the gate.
    let gate = targets::turn_gate_check();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let input = gen_turn(&mut rng);
        let kind = match gate.inspect(&input) {
            confab::turn_server::Verdict::Pass => {
                let mut m = stun::message::Message::new();
                m.raw = input;
                let signed =
                    m.decode().is_ok() && m.contains(stun::attributes::ATTR_MESSAGE_INTEGRITY);
                if signed {
                    "pass signed"
                } else {
                    "pass"
                }
            }
            confab::turn_server::Verdict::Reply(r) => {
                let mut m = stun::message::Message::new();
                m.raw = r;
                m.decode().unwrap();
                let mut code = stun::error_code::ErrorCodeAttribute::default();
                stun::message::Getter::get_from(&mut code, &m).unwrap();
                if code.code.0 == 401 {
                    "401"
                } else {
                    "403"
                }
            }
            confab::turn_server::Verdict::Drop(reason) => reason,
        };
        *seen.entry(kind).or_insert(0) += 1;
    }
    for (kind, at_least) in [
        ("pass signed", n / 10),
        ("pass", n / 20),
        ("401", n / 20),
        ("403", n / 50),
        ("forbidden_peer", n / 100),
        ("unexpected_class", n / 50),
    ] {
        let count = seen.get(kind).copied().unwrap_or(0);
        assert!(
            count >= at_least,
            "TURN gate {kind}: {count} of {n}: {seen:?}"
        );
    }
}
