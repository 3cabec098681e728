//! `confab load`: a bounded load generator shipped with the server.
//!
//! It starts a Confab server on loopback (or attaches to a running one),
//! joins simulated participants through the real signaling (protocol v2:
//! `join`, the server leg's offer from `sfu`, an answer), each a real
//! WebRTC endpoint (ICE, DTLS, SRTP) built on the same sans-IO `rtc`
//! engine as the server, and has publishers send video-like and
//! audio-like RTP. Every payload carries its publisher's tag, sequence
//! number and send time, so subscribers measure delivery, loss,
//! reordering and one-way delay; `/proc` and `/metrics` give the server's
//! CPU time per forwarded packet and memory.
//!
//! The whole generator is one thread (a single-threaded tokio runtime, one
//! task and one UDP socket per participant), pinned to one core while the
//! server is pinned to another, so the two do not share a core.
//!
//! Scenarios (each a ladder of steps; a step adds participants to the
//! same room and measures `--repeat` windows):
//!
//! | scenario | publishers | steps are |
//! |---|---|---|
//! | `fanout` | 1 (video) | subscribers |
//! | `meeting` | everyone (video + audio) | members |
//! | `audio` | `--publishers` (audio only) | listeners |
//!
//! The knee is the last step with loss under 0.1 % and p99 delay under
//! 20 ms. Everything is bounded: steps, durations, joins and the whole run
//! (`--max-secs`).

pub mod ceiling;
pub mod client;
pub mod janus;
pub mod memory;
pub mod participant;
pub mod probe;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::sync::watch;

use self::ceiling::Ceiling;
use self::client::SrtpChoice;
use self::participant::{JoinSpec, MediaPlan, Stats, Window};

/// The load scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One video publisher, a ladder of subscribers.
    Fanout,
    /// Everyone publishes video and audio, a ladder of room sizes.
    Meeting,
    /// A few audio-only speakers, a ladder of listeners.
    Audio,
}

/// `confab load` options.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Scenario to run.
    #[arg(long, value_enum, default_value_t = Scenario::Fanout)]
    pub scenario: Scenario,
    /// Ladder steps, comma-separated: subscribers (fanout), members
    /// (meeting) or listeners (audio). Default: 10,25,50,100 / 4,8,16 /
    /// 10,50,100; with `--ladder`, a longer climb: 10,25,50,100,150,200 /
    /// 4,8,12,16,20,24,28,32 / 10,25,50,100,150,200.
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// Publishers in the audio scenario.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Find the knee: climb the steps and stop at the first one past it
    /// (loss >= 0.1 % or p99 >= 20 ms).
    #[arg(long)]
    pub ladder: bool,
    /// Seconds of each measurement window.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Seconds of media before the first window of a step.
    #[arg(long, default_value_t = 3.0)]
    pub warmup_secs: f64,
    /// Windows per step (medians and spreads are over these).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Video bitrate per publisher, kbit/s.
    #[arg(long, default_value_t = 1500)]
    pub bitrate_kbps: u64,
    /// Video frames per second.
    #[arg(long, default_value_t = 30)]
    pub fps: u32,
    /// Size of full video RTP packets (header + payload), bytes.
    #[arg(long, default_value_t = 1200)]
    pub packet_bytes: usize,
    /// Seconds between keyframes (also sent on a keyframe request).
    #[arg(long, default_value_t = 2.0)]
    pub keyframe_interval_secs: f64,
    /// A keyframe is this many times an interframe.
    #[arg(long, default_value_t = 4)]
    pub keyframe_factor: u32,
    /// Video packets leave at this multiple of the bitrate, as a browser's
    /// pacer sends them (0: each frame in one burst).
    #[arg(long, default_value_t = 2.5)]
    pub pacing_factor: f64,
    /// Publishers also send audio (always on in `meeting`).
    #[arg(long)]
    pub audio: bool,
    /// SRTP profile the simulated clients negotiate (`gcm` or `aes-cm`).
    #[arg(long, default_value = "gcm")]
    pub srtp: SrtpChoice,
    /// Subscribers join with subscribe-only tokens (a webinar's viewers):
    /// the started server gets a random secret, publishers get every grant.
    /// Not with --server or --janus.
    #[arg(long)]
    pub viewer_tokens: bool,
    /// Attach to a running server (its HTTP address) instead of starting
    /// one; it must route every room through the server (`--never-p2p`)
    /// and allow the room sizes used.
    #[arg(long)]
    pub server: Option<SocketAddr>,
    /// The attached server's pid, for its CPU time and memory.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Compare with Janus: join this Janus WebSocket (`host:port`,
    /// VideoRoom plugin) instead of a Confab server (fanout only; give
    /// its pid with --server-pid; forwarded packets are counted at the
    /// subscribers). See docs/benchmarks.md for starting Janus on loopback.
    #[arg(long)]
    pub janus: Option<String>,
    /// The Janus VideoRoom room.
    #[arg(long, default_value_t = 1234)]
    pub janus_room: u64,
    /// Core the started server is pinned to (taskset).
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// Core the generator pins itself to.
    #[arg(long, default_value_t = 1)]
    pub generator_cpu: usize,
    /// Do not pin anything.
    #[arg(long)]
    pub no_pin: bool,
    /// Measure the loopback UDP and SRTP ceiling first, and report each
    /// step as a share of it.
    #[arg(long)]
    pub ceiling: bool,
    /// Only measure the ceiling.
    #[arg(long)]
    pub ceiling_only: bool,
    /// Receivers hand only every n-th RTP datagram to their engine for
    /// SRTP decryption and count the rest from the clear RTP header
    /// (sequence numbers per stream), with retransmission requests off: a
    /// cheaper generator for loads beyond what one core decrypts. Delay
    /// percentiles then come from the decrypted sample.
    #[arg(long, default_value_t = 1)]
    pub decrypt_every: u32,
    /// Participants joining at once.
    #[arg(long, default_value_t = 25)]
    pub join_concurrency: usize,
    /// Seconds a participant may take from join to a connected leg.
    #[arg(long, default_value_t = 60)]
    pub join_timeout_secs: u64,
    /// Hard bound on the whole run, seconds.
    #[arg(long, default_value_t = 1800)]
    pub max_secs: u64,
    /// Write the report as JSON to this file (`-`: stdout, instead of the
    /// table).
    #[arg(long)]
    pub json: Option<String>,
}

/// A median and its spread over the windows of a step.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// One window's figures.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WindowReport {
    /// Packets sent by publishers per second.
    pub sent_pps: f64,
    /// Packets delivered to subscribers per second.
    pub delivered_pps: f64,
    /// Bits per second delivered (RTP header + payload).
    pub delivered_bps: f64,
    /// Share of expected deliveries that did not arrive, percent.
    pub loss_pct: f64,
    /// Share of deliveries that came after a later packet, percent.
    pub reorder_pct: f64,
    /// One-way delay percentiles, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
    /// Packets the server forwarded per second (its own counter).
    pub server_forwarded_pps: f64,
    /// Server CPU, percent of one core.
    pub server_cpu_pct: f64,
    /// Server CPU µs per forwarded packet.
    pub server_us_per_packet: f64,
    /// Generator CPU, percent of one core.
    pub generator_cpu_pct: f64,
}

/// One step of the ladder.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Members of the room.
    pub participants: usize,
    /// Of which publish.
    pub publishers: usize,
    /// (publisher track, receiver) pairs.
    pub streams: usize,
    /// Its windows.
    pub windows: Vec<WindowReport>,
    /// Delivered packets/s.
    pub delivered_pps: Spread,
    /// Delivered Mbit/s.
    pub delivered_mbps: Spread,
    /// Loss, percent.
    pub loss_pct: Spread,
    /// Reordering, percent.
    pub reorder_pct: Spread,
    /// Delay p50, ms.
    pub p50_ms: Spread,
    /// Delay p99, ms.
    pub p99_ms: Spread,
    /// Delay p99.9, ms.
    pub p999_ms: Spread,
    /// Server CPU µs per forwarded packet.
    pub server_us_per_packet: Spread,
    /// Forwarded packets per second per core of server CPU.
    pub forwarded_pps_per_core: Spread,
    /// Share of the ceiling (`forward_pps` of the negotiated profile),
    /// percent.
    pub ceiling_pct: Option<f64>,
    /// Server CPU, percent of one core.
    pub server_cpu_pct: Spread,
    /// Generator CPU, percent of one core.
    pub generator_cpu_pct: Spread,
    /// Join → connected of the participants that joined in this step, ms.
    pub join_ms_p50: f64,
    /// Slowest of those.
    pub join_ms_max: f64,
    /// Server RSS, MiB.
    pub server_rss_mib: f64,
    /// Server RSS growth since before the first join, per participant, KiB.
    pub rss_per_participant_kib: f64,
    /// Meets the knee criteria (loss < 0.1 %, p99 < 20 ms).
    pub ok: bool,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario.
    pub scenario: Scenario,
    /// SRTP profile.
    pub srtp: SrtpChoice,
    /// Video kbit/s per publisher.
    pub bitrate_kbps: u64,
    /// Video pacing factor (0: bursts).
    pub pacing_factor: f64,
    /// Receivers decrypt every n-th RTP datagram (1: all).
    pub decrypt_every: u32,
    /// Video packet size.
    pub packet_bytes: usize,
    /// Publishers send audio.
    pub audio: bool,
    /// Window length, s.
    pub duration_secs: f64,
    /// Cores: server, generator (`None`: not pinned).
    pub pinned: Option<(usize, usize)>,
    /// The ceiling, if measured.
    pub ceiling: Option<Ceiling>,
    /// Steps.
    pub steps: Vec<StepReport>,
    /// Participants of the last step that reached the criteria.
    pub knee: Option<usize>,
    /// Why the ladder stopped before its last step, if it did.
    pub stopped: Option<String>,
    /// Failures (participants that did not join or broke).
    pub failures: Vec<String>,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

/// Runs `confab load`; returns the exit code.
/// Exit code 3: the report was printed, but the ladder stopped early or
/// participants failed.
pub fn run(args: LoadArgs) -> i32 {
    match run_inner(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("confab load: {e}");
            1
        }
    }
}

fn run_inner(mut args: LoadArgs) -> Result<i32, String> {
    if args.steps.is_empty() {
        args.steps = match (args.scenario, args.ladder) {
            (Scenario::Fanout, false) => vec![10, 25, 50, 100],
            (Scenario::Meeting, false) => vec![4, 8, 16],
            (Scenario::Audio, false) => vec![10, 50, 100],
            (Scenario::Fanout | Scenario::Audio, true) => vec![10, 25, 50, 100, 150, 200],
            (Scenario::Meeting, true) => vec![4, 8, 12, 16, 20, 24, 28, 32],
        };
    }
    if args.steps.windows(2).any(|w| w[1] < w[0]) || args.steps.contains(&0) {
        return Err("--steps must be positive and non-decreasing".into());
    }
    if args.repeat == 0 || args.duration_secs <= 0.0 || args.fps == 0 {
        return Err("--repeat, --duration-secs and --fps must be positive".into());
    }
    let pinned = (!args.no_pin).then_some((args.server_cpu, args.generator_cpu));
    let ceiling = if args.ceiling || args.ceiling_only {
        let (cpu, drain) = match pinned {
            Some((s, g)) => (Some(s), Some(g)),
            None => (None, None),
        };
        let c = std::thread::spawn(move || ceiling::measure(cpu, drain, Duration::from_secs(1)))
            .join()
            .map_err(|_| "the ceiling measurement panicked")??;
        Some(c)
    } else {
        None
    };
    if args.ceiling_only {
        let c = ceiling.ok_or("no ceiling")?;
        match args.json.as_deref() {
            Some(path) => write_json(path, &c)?,
            None => print_ceiling(&c),
        }
        return Ok(0);
    }
    // Threads spawned from here on (the runtime's) inherit the pinning.
    if let Some((_, g)) = pinned {
        if !ceiling::pin_current_thread(g) {
            eprintln!("confab load: could not pin the generator to core {g}");
        }
    }
    let max_room = match args.scenario {
        Scenario::Fanout => 1,
        Scenario::Meeting => 0,
        Scenario::Audio => args.publishers,
    } + args.steps.last().copied().unwrap_or(0);
    if args.janus.is_some() && args.scenario != Scenario::Fanout {
        return Err("--janus supports the fanout scenario only".into());
    }
    if args.viewer_tokens && (args.server.is_some() || args.janus.is_some()) {
        return Err("--viewer-tokens needs the server this tool starts".into());
    }
    // The secret of the started server's tokens, with --viewer-tokens.
    let secret = args.viewer_tokens.then(|| {
        (0..32)
            .map(|_| format!("{:x}", rand::random::<u8>() & 0xf))
            .collect::<String>()
    });
    let (server, http, pid) = match args.server {
        _ if args.janus.is_some() => (None, SocketAddr::from(([127, 0, 0, 1], 1)), args.server_pid),
        Some(http) => (None, http, args.server_pid),
        None => {
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let s = probe::SpawnedServer::start(
                &exe,
                pinned.map(|(s, _)| s),
                false,
                max_room.max(16),
                secret.as_deref(),
            )?;
            let (http, pid) = (s.http, s.pid());
            (Some(s), http, Some(pid))
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let local = tokio::task::LocalSet::new();
    let report = local.block_on(
        &runtime,
        orchestrate(&args, http, pid, ceiling, pinned, secret.as_deref()),
    );
    drop(server);
    let report = report?;
    match args.json.as_deref() {
        Some("-") => write_json("-", &report)?,
        Some(path) => {
            print_report(&report);
            write_json(path, &report)?;
        }
        None => print_report(&report),
    }
    let clean = report.stopped.is_none() && report.failures.is_empty();
    Ok(if clean { 0 } else { 3 })
}

fn write_json<T: Serialize>(path: &str, value: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    if path == "-" {
        println!("{text}");
        Ok(())
    } else {
        std::fs::write(path, text + "\n").map_err(|e| format!("{path}: {e}"))
    }
}

async fn orchestrate(
    args: &LoadArgs,
    http: SocketAddr,
    pid: Option<u32>,
    ceiling: Option<Ceiling>,
    pinned: Option<(usize, usize)>,
    secret: Option<&str>,
) -> Result<Report, String> {
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let stats = Rc::new(RefCell::new(Stats::new()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let room = format!("load-{:08x}", rand::random::<u32>());
    let video = MediaPlan {
        video_bps: args.bitrate_kbps * 1000,
        fps: args.fps,
        packet_bytes: args.packet_bytes.clamp(64, 1400),
        keyframe_interval: Duration::from_secs_f64(args.keyframe_interval_secs.max(0.1)),
        keyframe_factor: args.keyframe_factor,
        pacing_factor: args.pacing_factor.max(0.0),
        audio: args.audio || args.scenario == Scenario::Meeting,
        audio_bytes: 100,
    };
    let audio_only = MediaPlan {
        video_bps: 0,
        audio: true,
        ..video
    };
    let rss0 = pid.and_then(probe::rss_bytes).unwrap_or(0);
    let mut joined = 0usize;
    let mut publishers = 0usize;
    let mut steps = Vec::new();
    let mut knee = None;
    let join_timeout = Duration::from_secs(args.join_timeout_secs);
    let mut stopped = None;
    'ladder: for &step in &args.steps {
        // Who is in the room at this step: (total, publishers).
        let (total, pubs) = match args.scenario {
            Scenario::Fanout => (1 + step, 1),
            Scenario::Meeting => (step, step),
            Scenario::Audio => (args.publishers + step, args.publishers),
        };
        let joins_before = stats.borrow().join_times.len();
        while joined < total {
            if Instant::now() > deadline {
                stopped = Some("--max-secs reached while joining".to_owned());
                break 'ladder;
            }
            let batch = (total - joined).min(args.join_concurrency.max(1));
            let target = stats.borrow().connected + batch;
            for _ in 0..batch {
                let media = if publishers < pubs {
                    publishers += 1;
                    Some(if args.scenario == Scenario::Audio {
                        audio_only
                    } else {
                        video
                    })
                } else {
                    None
                };
                let name = format!("load{joined}");
                // Publishers hold every grant, the others only watch.
                let token = secret.map(|secret| {
                    let grants = crate::auth::Grants {
                        publish: media.is_some(),
                        ..crate::auth::Grants::default()
                    };
                    crate::auth::issue(secret, &room, &name, None, 3600, grants)
                });
                let spec = JoinSpec {
                    http,
                    room: room.clone(),
                    name,
                    token,
                    media,
                    srtp: args.srtp,
                    join_timeout,
                    decrypt_every: args.decrypt_every.max(1),
                    janus: args.janus.clone().map(|a| (a, args.janus_room)),
                };
                joined += 1;
                tokio::task::spawn_local(participant::run(spec, stats.clone(), stop_rx.clone()));
            }
            let wait_until = Instant::now() + join_timeout + Duration::from_secs(1);
            loop {
                {
                    let s = stats.borrow();
                    if s.connected >= target {
                        break;
                    }
                    if !s.failures.is_empty() {
                        stopped = Some(format!("joining {total} members: a participant failed"));
                        break 'ladder;
                    }
                }
                if Instant::now() > wait_until {
                    stopped = Some(format!(
                        "joining {total} members: only {} of {target} connected",
                        stats.borrow().connected
                    ));
                    break 'ladder;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        stats.borrow_mut().members = total as u64;
        let join_ms: Vec<u32> = {
            let s = stats.borrow();
            let mut v: Vec<u32> = s.join_times[joins_before..]
                .iter()
                .map(|d| d.as_micros() as u32)
                .collect();
            v.sort_unstable();
            v
        };
        // Joins renegotiate every leg, and those offers go on after the
        // newcomers connect: wait for one quiet second (bounded).
        let quiet_by = Instant::now() + join_timeout;
        while Instant::now() < quiet_by
            && stats
                .borrow()
                .last_offer
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs_f64(args.warmup_secs)).await;
        let mut windows = Vec::new();
        for _ in 0..args.repeat {
            if Instant::now() > deadline {
                stopped = Some("--max-secs reached".to_owned());
                break 'ladder;
            }
            windows.push(measure_window(&stats, args.duration_secs, http, pid).await);
        }
        let rss = pid.and_then(probe::rss_bytes).unwrap_or(0);
        let streams = match args.scenario {
            Scenario::Fanout => (total - 1) * (1 + usize::from(video.audio)),
            Scenario::Meeting => total * (total - 1) * 2,
            Scenario::Audio => pubs * (total - 1),
        };
        let mut report = step_report(total, pubs, streams, windows, &join_ms);
        report.server_rss_mib = rss as f64 / (1 << 20) as f64;
        report.rss_per_participant_kib = rss.saturating_sub(rss0) as f64 / 1024.0 / total as f64;
        report.ceiling_pct = ceiling.map(|c| {
            100.0 * report.forwarded_pps_per_core.median
                / c.forward_pps(args.srtp == SrtpChoice::Gcm)
        });
        if report.ok {
            knee = Some(total);
        }
        let ok = report.ok;
        eprintln!("{}", step_line(&report));
        steps.push(report);
        if args.ladder && !ok {
            break;
        }
    }
    let _ = stop_tx.send(true);
    // Let the participants say `leave` (bounded).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failures = stats.borrow().failures.clone();
    Ok(Report {
        scenario: args.scenario,
        srtp: args.srtp,
        bitrate_kbps: args.bitrate_kbps,
        pacing_factor: args.pacing_factor,
        decrypt_every: args.decrypt_every.max(1),
        packet_bytes: args.packet_bytes,
        audio: video.audio,
        duration_secs: args.duration_secs,
        pinned,
        ceiling,
        steps,
        knee,
        stopped,
        failures,
    })
}

async fn measure_window(
    stats: &Rc<RefCell<Stats>>,
    secs: f64,
    http: SocketAddr,
    pid: Option<u32>,
) -> WindowReport {
    let before = probe::snapshot(pid, http).await;
    let start = Instant::now();
    let headers0 = stats.borrow().headers;
    {
        let mut s = stats.borrow_mut();
        let start_us = start.duration_since(s.epoch).as_micros() as u64;
        s.window = Some(Window {
            start_us,
            end_us: u64::MAX,
            ..Window::default()
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let end = Instant::now();
    let headers1 = stats.borrow().headers;
    if let Some(w) = stats.borrow_mut().window.as_mut() {
        w.end_us = end.duration_since(start).as_micros() as u64 + w.start_us;
    }
    let after = probe::snapshot(pid, http).await;
    let elapsed = end.duration_since(start).as_secs_f64();
    // Packets sent near the end are still in flight: wait for them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut w = stats.borrow_mut().window.take().unwrap_or_default();
    w.latencies_us.sort_unstable();
    if headers1.received > headers0.received {
        // Sampled decryption: delivery, loss and reordering from headers.
        w.received = headers1.received - headers0.received;
        w.expected = headers1.expected - headers0.expected;
        w.reordered = headers1.reordered - headers0.reordered;
        // SRTP datagrams carry a 16-byte tag (GCM) or 10 (AES-CM).
        w.received_bytes = headers1.bytes - headers0.bytes;
    }
    let server_cpu = after.server_cpu_ns.saturating_sub(before.server_cpu_ns) as f64;
    let forwarded = match after.forwarded.saturating_sub(before.forwarded) {
        // No server counter (Janus): what the subscribers received.
        0 => w.received as f64,
        n => n as f64,
    };
    let snap_elapsed = elapsed.max(1e-9);
    WindowReport {
        sent_pps: w.sent as f64 / elapsed,
        delivered_pps: w.received as f64 / elapsed,
        delivered_bps: w.received_bytes as f64 * 8.0 / elapsed,
        loss_pct: if w.expected == 0 {
            f64::NAN
        } else {
            100.0 * (w.expected.saturating_sub(w.received)) as f64 / w.expected as f64
        },
        reorder_pct: 100.0 * w.reordered as f64 / w.received.max(1) as f64,
        p50_ms: percentile(&w.latencies_us, 0.50),
        p99_ms: percentile(&w.latencies_us, 0.99),
        p999_ms: percentile(&w.latencies_us, 0.999),
        server_forwarded_pps: forwarded / snap_elapsed,
        server_cpu_pct: server_cpu / 1e7 / snap_elapsed,
        server_us_per_packet: if forwarded > 0.0 && server_cpu > 0.0 {
            server_cpu / 1e3 / forwarded
        } else {
            f64::NAN
        },
        generator_cpu_pct: after
            .generator_cpu_ns
            .saturating_sub(before.generator_cpu_ns) as f64
            / 1e7
            / snap_elapsed,
    }
}

fn step_report(
    participants: usize,
    publishers: usize,
    streams: usize,
    windows: Vec<WindowReport>,
    join_us: &[u32],
) -> StepReport {
    let of = |f: fn(&WindowReport) -> f64| Spread::of(&windows.iter().map(f).collect::<Vec<_>>());
    let loss_pct = of(|w| w.loss_pct);
    let p99_ms = of(|w| w.p99_ms);
    let ok = loss_pct.median < 0.1 && p99_ms.median < 20.0;
    StepReport {
        participants,
        publishers,
        streams,
        delivered_pps: of(|w| w.delivered_pps),
        delivered_mbps: of(|w| w.delivered_bps / 1e6),
        loss_pct,
        reorder_pct: of(|w| w.reorder_pct),
        p50_ms: of(|w| w.p50_ms),
        p99_ms,
        p999_ms: of(|w| w.p999_ms),
        server_us_per_packet: of(|w| w.server_us_per_packet),
        forwarded_pps_per_core: of(|w| 1e6 / w.server_us_per_packet),
        ceiling_pct: None,
        server_cpu_pct: of(|w| w.server_cpu_pct),
        generator_cpu_pct: of(|w| w.generator_cpu_pct),
        join_ms_p50: percentile(join_us, 0.5),
        join_ms_max: percentile(join_us, 1.0),
        server_rss_mib: 0.0,
        rss_per_participant_kib: 0.0,
        ok,
        windows,
    }
}

fn step_line(s: &StepReport) -> String {
    format!(
        "step {:>4} members: {:>8.0} pkt/s delivered, loss {:.3} %, p99 {:.1} ms, server {:.2} µs/pkt ({:.0} pkt/s per core){}",
        s.participants,
        s.delivered_pps.median,
        s.loss_pct.median,
        s.p99_ms.median,
        s.server_us_per_packet.median,
        s.forwarded_pps_per_core.median,
        s.ceiling_pct
            .map(|p| format!(", {p:.0} % of ceiling"))
            .unwrap_or_default()
    )
}

fn print_ceiling(c: &Ceiling) {
    println!(
        "ceiling (loopback UDP, {} B, fan-out {}), datagrams/s per core:",
        c.packet_bytes, c.fan_out
    );
    println!("  sendto    {:>9.0}", c.sendto_pps);
    println!("  sendmmsg  {:>9.0}", c.sendmmsg_pps);
    match c.gso_pps {
        Some(g) => println!("  UDP GSO   {g:>9.0}  ({} segments)", ceiling::GSO_SEGMENTS),
        None => println!("  UDP GSO   refused by the kernel"),
    }
    println!(
        "SRTP encrypt per packet: AEAD_AES_128_GCM {:.2} µs, AES_CM_128_HMAC_SHA1_80 {:.2} µs",
        c.srtp_gcm_us, c.srtp_aes_cm_us
    );
    println!(
        "forwarding ceiling (sendto + encrypt): {:.0} pkt/s per core with GCM, {:.0} with AES-CM",
        c.forward_pps(true),
        c.forward_pps(false)
    );
}

/// Prints the human-readable report.
pub fn print_report(r: &Report) {
    println!(
        "confab load: scenario {:?}, video {} kbit/s in {} B packets (paced at {}x){}, SRTP {:?}, {} s windows",
        r.scenario,
        r.bitrate_kbps,
        r.packet_bytes,
        r.pacing_factor,
        if r.audio { " + audio" } else { "" },
        r.srtp,
        r.duration_secs
    );
    match r.pinned {
        Some((s, g)) => println!("pinned: server on core {s}, generator on core {g} (taskset)"),
        None => println!("not pinned"),
    }
    if let Some(c) = &r.ceiling {
        print_ceiling(c);
    }
    if r.decrypt_every > 1 {
        println!(
            "receivers decrypt every {}th RTP datagram; delivery, loss and reordering from clear RTP headers",
            r.decrypt_every
        );
    }
    println!(
        "{:>7} {:>4} {:>6} {:>9} {:>7} {:>7} {:>6} {:>7} {:>7} {:>7} {:>8} {:>15} {:>9} {:>6} {:>6} {:>6} {:>6} {:>7} {:>3}",
        "members", "pubs", "strms", "dlv pkt/s", "Mbit/s", "loss%", "reord%", "p50 ms", "p99 ms",
        "p99.9", "µs/pkt", "(min-max)", "pkt/s/core", "%ceil", "srvCPU", "genCPU", "join ms", "KiB/mbr", "ok"
    );
    for s in &r.steps {
        println!(
            "{:>7} {:>4} {:>6} {:>9.0} {:>7.1} {:>7.3} {:>6.3} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>15} {:>9.0} {:>6} {:>5.0}% {:>5.0}% {:>6.0} {:>7.0} {:>3}",
            s.participants,
            s.publishers,
            s.streams,
            s.delivered_pps.median,
            s.delivered_mbps.median,
            s.loss_pct.median,
            s.reorder_pct.median,
            s.p50_ms.median,
            s.p99_ms.median,
            s.p999_ms.median,
            s.server_us_per_packet.median,
            format!(
                "({:.2}-{:.2})",
                s.server_us_per_packet.min, s.server_us_per_packet.max
            ),
            s.forwarded_pps_per_core.median,
            s.ceiling_pct
                .map(|p| format!("{p:.0}%"))
                .unwrap_or_else(|| "-".into()),
            s.server_cpu_pct.median,
            s.generator_cpu_pct.median,
            s.join_ms_p50,
            s.rss_per_participant_kib,
            if s.ok { "yes" } else { "no" },
        );
    }
    match r.knee {
        Some(k) => println!("knee: {k} members (last step with loss < 0.1 % and p99 < 20 ms)"),
        None => println!("knee: none of the steps met loss < 0.1 % and p99 < 20 ms"),
    }
    if let Some(why) = &r.stopped {
        println!("stopped early: {why}");
    }
    for f in &r.failures {
        println!("failure: {f}");
    }
}
