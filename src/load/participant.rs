//! One simulated participant: a WebSocket speaking protocol v2, a UDP
//! socket, and an [`Endpoint`] answering the server's offers; publishes
//! paced video-like and audio-like RTP, and records what it receives into
//! the generator's shared [`Stats`].
//!
//! Every participant is a task on the generator's single-threaded runtime,
//! so the stats are shared through an `Rc<RefCell<_>>` without locks.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use rtc::peer_connection::transport::RTCIceCandidateInit;

use super::client::{decode_payload, encode_payload, Endpoint, FramePart, SrtpChoice, Stamp};
use super::janus;
use crate::media::leg::Kind;

/// What a publisher sends.
#[derive(Debug, Clone, Copy)]
pub struct MediaPlan {
    /// Video bitrate in bits per second (0: no video).
    pub video_bps: u64,
    /// Video frames per second.
    pub fps: u32,
    /// RTP packet size (header + payload) of full video packets.
    pub packet_bytes: usize,
    /// A keyframe this often (and on a keyframe request, at most every
    /// 300 ms).
    pub keyframe_interval: Duration,
    /// A keyframe is this many times an interframe's size.
    pub keyframe_factor: u32,
    /// Packets of a frame leave at this multiple of the video bitrate, as
    /// a browser's pacer spreads them (libwebrtc uses 2.5); 0 sends each
    /// frame as one burst.
    pub pacing_factor: f64,
    /// Send audio: one packet of `audio_bytes` every 20 ms.
    pub audio: bool,
    /// RTP packet size of audio packets.
    pub audio_bytes: usize,
}

const RTP_HEADER: usize = 12;
const AUDIO_INTERVAL: Duration = Duration::from_millis(20);
const MIN_KEYFRAME_GAP: Duration = Duration::from_millis(300);

/// One measurement window's receive-side counters.
#[derive(Debug, Default)]
pub struct Window {
    /// Start, µs since the epoch (packets sent at or after count).
    pub start_us: u64,
    /// End, µs since the epoch (packets sent before count); `u64::MAX`
    /// while open.
    pub end_us: u64,
    /// Deliveries expected: each packet sent in the window times its
    /// receivers.
    pub expected: u64,
    /// Packets sent by publishers in the window.
    pub sent: u64,
    /// Packets received that were sent in the window.
    pub received: u64,
    /// RTP bytes (header + payload) of those.
    pub received_bytes: u64,
    /// Received after a later packet of the same stream.
    pub reordered: u64,
    /// One-way delays in µs.
    pub latencies_us: Vec<u32>,
}

impl Window {
    fn contains(&self, sent_us: u64) -> bool {
        sent_us >= self.start_us && sent_us < self.end_us
    }
}

/// Most latency samples kept per window (bounds memory: 4 bytes each).
const MAX_SAMPLES: usize = 20_000_000;

/// Receive counters from clear SRTP headers (sequence numbers per
/// subscriber stream), kept when receivers decrypt only a sample: running
/// totals, read at the start and end of a window.
#[derive(Debug, Default, Clone, Copy)]
pub struct HeaderCounts {
    /// Datagrams received.
    pub received: u64,
    /// Datagrams expected: the advance of each stream's highest extended
    /// sequence number (plus its first packet).
    pub expected: u64,
    /// Received below their stream's highest sequence number.
    pub reordered: u64,
    /// Bytes received (SRTP datagrams).
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct SeqState {
    highest: u64,
}

/// The generator's shared state.
#[derive(Debug)]
pub struct Stats {
    /// Clock origin of every payload stamp.
    pub epoch: Instant,
    /// Members of the room (every published packet goes to all but its
    /// publisher).
    pub members: u64,
    /// The open or last window.
    pub window: Option<Window>,
    /// Participants whose server leg is connected.
    pub connected: usize,
    /// Join → connected times of participants, in join order.
    pub join_times: Vec<Duration>,
    /// Participants that failed, with why.
    pub failures: Vec<String>,
    /// When the last offer from the server arrived (renegotiations after
    /// joins go on for a while after the legs connect).
    pub last_offer: Option<Instant>,
    /// The Janus publisher's feed, once it publishes (subscribers wait).
    pub janus_feed: Option<u64>,
    /// Header-based receive totals (sampled decryption only).
    pub headers: HeaderCounts,
    streams: HashMap<(u32, u32), SeqState>,
    /// Next publisher tag.
    next_tag: u32,
    next_participant: u32,
}

impl Stats {
    /// Empty stats with the epoch now.
    pub fn new() -> Stats {
        Stats {
            epoch: Instant::now(),
            members: 0,
            window: None,
            connected: 0,
            join_times: Vec::new(),
            failures: Vec::new(),
            last_offer: None,
            janus_feed: None,
            headers: HeaderCounts::default(),
            streams: HashMap::new(),
            next_tag: 1,
            next_participant: 0,
        }
    }

    fn us(&self, t: Instant) -> u64 {
        t.duration_since(self.epoch).as_micros() as u64
    }

    /// Counts one RTP datagram of `participant` by its clear header.
    fn count_header(&mut self, participant: u32, ssrc: u32, seq: u16, bytes: usize) {
        let h = &mut self.headers;
        h.received += 1;
        h.bytes += bytes as u64;
        match self.streams.get_mut(&(participant, ssrc)) {
            None => {
                h.expected += 1;
                self.streams.insert(
                    (participant, ssrc),
                    SeqState {
                        highest: (1 << 32) + u64::from(seq),
                    },
                );
            }
            Some(s) => {
                let delta = seq.wrapping_sub(s.highest as u16) as i16;
                let ext = (s.highest as i64 + i64::from(delta)) as u64;
                if ext > s.highest {
                    h.expected += ext - s.highest;
                    s.highest = ext;
                } else {
                    h.reordered += 1;
                }
            }
        }
    }
}

/// SSRC and sequence number of an SRTP datagram (RTP header in clear);
/// `None` for STUN, DTLS and RTCP (RFC 7983, RFC 5761).
fn rtp_header(data: &[u8]) -> Option<(u32, u16)> {
    if data.len() < 12 || data[0] >> 6 != 2 || (192..=223).contains(&data[1]) {
        return None;
    }
    Some((
        u32::from_be_bytes([data[8], data[9], data[10], data[11]]),
        u16::from_be_bytes([data[2], data[3]]),
    ))
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

/// Where and how a participant joins.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    /// Server HTTP address.
    pub http: SocketAddr,
    /// Room id.
    pub room: String,
    /// Display name.
    pub name: String,
    /// Join token, when the server checks them.
    pub token: Option<String>,
    /// What it publishes (`None`: subscribes only).
    pub media: Option<MediaPlan>,
    /// SRTP profile the endpoint offers.
    pub srtp: SrtpChoice,
    /// Give up joining after this long.
    pub join_timeout: Duration,
    /// Hand only every n-th incoming RTP datagram to the engine for
    /// decryption (1: all); the rest are counted from their clear RTP
    /// header (see [`HeaderCounts`]).
    pub decrypt_every: u32,
    /// Join a Janus VideoRoom instead (its WebSocket `host:port`, room).
    pub janus: Option<(String, u64)>,
}

struct Publisher {
    plan: MediaPlan,
    tags: [u32; 2],
    counters: [u32; 2],
    next_frame: Instant,
    next_audio: Instant,
    last_keyframe: Option<Instant>,
    keyframe_wanted: bool,
    credit: f64,
    started: Instant,
    /// Video packets of frames not yet sent (paced): part, marker, RTP ts.
    queue: VecDeque<(FramePart, bool, u32)>,
    next_packet: Instant,
}

impl Publisher {
    /// When something is next to send (`None`: nothing is ever sent).
    fn next_due(&self) -> Option<Instant> {
        let video = self.plan.video_bps > 0;
        let mut due: Option<Instant> = video.then_some(self.next_frame);
        if video && !self.queue.is_empty() {
            due = due.map(|d| d.min(self.next_packet));
        }
        if self.plan.audio {
            due = Some(due.map_or(self.next_audio, |d| d.min(self.next_audio)));
        }
        due
    }
}

/// Runs one participant until `stop` turns true (or it fails).
pub async fn run(spec: JoinSpec, stats: Rc<RefCell<Stats>>, mut stop: watch::Receiver<bool>) {
    if let Err(e) = run_inner(&spec, &stats, &mut stop).await {
        stats
            .borrow_mut()
            .failures
            .push(format!("{}: {e}", spec.name));
    }
}

async fn run_inner(
    spec: &JoinSpec,
    stats: &Rc<RefCell<Stats>>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let began = Instant::now();
    let socket = UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("bind: {e}"))?;
    let local = socket.local_addr().map_err(|e| e.to_string())?;
    let publish = match spec.media {
        Some(p) => [p.audio, p.video_bps > 0],
        None => [false, false],
    };
    let decrypt_every = spec.decrypt_every.max(1);
    let mut ep = Endpoint::with_nack(
        &spec.name,
        local,
        publish,
        spec.srtp,
        decrypt_every == 1,
        Instant::now(),
    )?;
    let me = {
        let mut s = stats.borrow_mut();
        s.next_participant += 1;
        s.next_participant
    };
    let mut rtp_seen = 0u32;
    let mut janus_session: Option<janus::Session> = None;
    let mut my_feed = None;
    let mut ws = match &spec.janus {
        None => {
            let (mut ws, _) = tokio::time::timeout(
                spec.join_timeout,
                tokio_tungstenite::connect_async(format!("ws://{}/ws", spec.http)),
            )
            .await
            .map_err(|_| "WebSocket connect timed out".to_owned())?
            .map_err(|e| format!("WebSocket: {e}"))?;
            let mut join = json!({"type": "join", "v": 2, "room": spec.room, "name": spec.name});
            if let Some(token) = &spec.token {
                join["token"] = json!(token);
            }
            ws.send(Message::Text(join.to_string().into()))
                .await
                .map_err(|e| e.to_string())?;
            ws
        }
        Some((addr, room)) => {
            let setup = async {
                let mut ws = janus::connect(addr).await?;
                let mut session = janus::Session::open(&mut ws).await?;
                if spec.media.is_some() {
                    my_feed = Some(session.join_publisher(&mut ws, *room, &spec.name).await?);
                    let offer = ep.offer(Instant::now())?;
                    let body =
                        json!({"request": "publish", "audio": publish[0], "video": publish[1]});
                    let jsep = json!({"type": "offer", "sdp": offer});
                    session.message(&mut ws, body, Some(jsep)).await?;
                } else {
                    let feed = loop {
                        if let Some(f) = stats.borrow().janus_feed {
                            break f;
                        }
                        if began.elapsed() > spec.join_timeout {
                            return Err("the Janus publisher never published".to_owned());
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    };
                    let body = json!({"request": "join", "ptype": "subscriber", "room": room,
                                      "streams": [{"feed": feed}]});
                    session.message(&mut ws, body, None).await?;
                }
                Ok::<_, String>((ws, session))
            };
            let (ws, session) = tokio::time::timeout(spec.join_timeout, setup)
                .await
                .map_err(|_| "Janus join timed out".to_owned())??;
            janus_session = Some(session);
            ws
        }
    };

    let mut publisher = spec.media.map(|plan| {
        let mut s = stats.borrow_mut();
        let tags = [s.next_tag, s.next_tag + 1];
        s.next_tag += 2;
        let now = Instant::now();
        Publisher {
            plan,
            tags,
            counters: [0, 0],
            next_frame: now,
            next_audio: now,
            last_keyframe: None,
            keyframe_wanted: true,
            credit: 0.0,
            started: now,
            queue: VecDeque::new(),
            next_packet: now,
        }
    });
    let mut connected = false;
    let mut highest: HashMap<u32, u32> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    let idle = Duration::from_millis(200);
    loop {
        // Output first: datagrams the engine produced.
        while let Some(out) = ep.pc().poll_write() {
            let _ = socket.send_to(&out.message, out.transport.peer_addr).await;
        }
        while let Some(event) = ep.pc().poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = event {
                match s {
                    RTCPeerConnectionState::Connected if !connected => {
                        connected = true;
                        let mut st = stats.borrow_mut();
                        st.connected += 1;
                        st.join_times.push(began.elapsed());
                        if let Some(p) = publisher.as_mut() {
                            let now = Instant::now();
                            p.next_frame = now;
                            p.next_audio = now;
                            p.keyframe_wanted = true;
                        }
                    }
                    RTCPeerConnectionState::Failed => return Err("leg failed".into()),
                    _ => {}
                }
            }
        }
        while let Some(TaggedRTCMessage { message, .. }) = ep.pc().poll_read() {
            match message {
                RTCMessage::RtpPacket(_, packet) => {
                    let Some(stamp) = decode_payload(&packet.payload) else {
                        continue;
                    };
                    let mut st = stats.borrow_mut();
                    let now_us = st.us(Instant::now());
                    let bytes = (RTP_HEADER + packet.payload.len()) as u64;
                    let last = highest.entry(stamp.tag).or_insert(stamp.seq);
                    let reordered = stamp.seq < *last;
                    *last = (*last).max(stamp.seq);
                    if let Some(w) = st.window.as_mut() {
                        if w.contains(stamp.sent_us) {
                            if decrypt_every == 1 {
                                w.received += 1;
                                w.received_bytes += bytes;
                                w.reordered += u64::from(reordered);
                            }
                            if w.latencies_us.len() < MAX_SAMPLES {
                                let d = now_us.saturating_sub(stamp.sent_us);
                                w.latencies_us.push(d.min(u64::from(u32::MAX)) as u32);
                            }
                        }
                    }
                }
                RTCMessage::RtcpPacket(_, packets) => {
                    let asks = packets.iter().any(|p| {
                        p.as_any().downcast_ref::<PictureLossIndication>().is_some()
                            || p.as_any().downcast_ref::<FullIntraRequest>().is_some()
                    });
                    if asks {
                        if let Some(p) = publisher.as_mut() {
                            p.keyframe_wanted = true;
                        }
                    }
                }
                _ => {}
            }
        }

        let now = Instant::now();
        let mut wake = ep.pc().poll_timeout().unwrap_or(now + idle).min(now + idle);
        if connected {
            if let Some(due) = publisher.as_ref().and_then(Publisher::next_due) {
                wake = wake.min(due);
            }
        }
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    let _ = ws.send(Message::Text(json!({"type": "leave"}).to_string().into())).await;
                    let _ = ep.pc().close();
                    return Ok(());
                }
            }
            received = socket.recv_from(&mut buf) => {
                if let Ok((len, from)) = received {
                    let mut take = |ep: &mut Endpoint, data: &[u8], from| {
                        if decrypt_every > 1 {
                            if let Some((ssrc, seq)) = rtp_header(data) {
                                stats.borrow_mut().count_header(me, ssrc, seq, data.len());
                                rtp_seen = rtp_seen.wrapping_add(1);
                                if rtp_seen % decrypt_every != 0 {
                                    return;
                                }
                            }
                        }
                        feed(ep, local, from, data);
                    };
                    take(&mut ep, &buf[..len], from);
                    // Drain what else is queued before the next turn.
                    for _ in 0..64 {
                        match socket.try_recv_from(&mut buf) {
                            Ok((len, from)) => take(&mut ep, &buf[..len], from),
                            Err(_) => break,
                        }
                    }
                }
            }
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(_))) | None => return Err("signaling closed".into()),
                    Some(Err(e)) => return Err(format!("signaling: {e}")),
                    Some(Ok(_)) => continue,
                };
                let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
                if let Some(session) = janus_session.as_mut() {
                    on_janus(&v, session, &mut ws, &mut ep, stats, my_feed).await?;
                    continue;
                }
                match v["type"].as_str() {
                    Some("offer") if v["from"] == "sfu" => {
                        stats.borrow_mut().last_offer = Some(Instant::now());
                        let sdp = v["sdp"].as_str().ok_or("offer without sdp")?.to_owned();
                        let answer = ep.answer(sdp, Instant::now())?;
                        let msg = json!({"type": "answer", "to": "sfu", "sdp": answer});
                        ws.send(Message::Text(msg.to_string().into()))
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Some("error") => return Err(format!("server error: {v}")),
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        if let Some(session) = janus_session.as_mut() {
            session.keepalive(&mut ws).await?;
        }
        let now = Instant::now();
        if ep.pc().poll_timeout().is_some_and(|t| t <= now) {
            let _ = ep.pc().handle_timeout(now);
        }
        if !connected && began.elapsed() > spec.join_timeout {
            return Err(format!("not connected after {:?}", spec.join_timeout));
        }
        if connected {
            if let Some(p) = publisher.as_mut() {
                publish_due(&mut ep, p, stats, now);
            }
        }
    }
}

/// Handles one message from Janus: the answer to our publisher offer,
/// the offer for a subscriber (answered with `start`), trickled
/// candidates.
async fn on_janus(
    v: &Value,
    session: &mut janus::Session,
    ws: &mut janus::Ws,
    ep: &mut Endpoint,
    stats: &Rc<RefCell<Stats>>,
    my_feed: Option<u64>,
) -> Result<(), String> {
    match v["janus"].as_str() {
        Some("event") => {
            let jsep = &v["jsep"];
            let Some(sdp) = jsep["sdp"].as_str() else {
                return Ok(());
            };
            match jsep["type"].as_str() {
                Some("answer") => {
                    ep.accept_answer(sdp.to_owned(), Instant::now())?;
                    session.trickle_done(ws).await?;
                    if let Some(feed) = my_feed {
                        stats.borrow_mut().janus_feed = Some(feed);
                    }
                }
                Some("offer") => {
                    let answer = ep.answer(sdp.to_owned(), Instant::now())?;
                    let jsep = json!({"type": "answer", "sdp": answer});
                    session
                        .message(ws, json!({"request": "start"}), Some(jsep))
                        .await?;
                    session.trickle_done(ws).await?;
                }
                _ => {}
            }
        }
        Some("trickle") => {
            let c = &v["candidate"];
            if let Some(candidate) = c["candidate"].as_str() {
                let _ = ep.add_remote_candidate(RTCIceCandidateInit {
                    candidate: candidate.to_owned(),
                    sdp_mid: c["sdpMid"].as_str().map(str::to_owned),
                    sdp_mline_index: c["sdpMLineIndex"].as_u64().map(|i| i as u16),
                    ..Default::default()
                });
            }
        }
        Some("hangup") | Some("detached") => return Err(format!("Janus: {v}")),
        Some("error") => return Err(format!("Janus: {v}")),
        _ => {}
    }
    Ok(())
}

fn feed(ep: &mut Endpoint, local: SocketAddr, from: SocketAddr, data: &[u8]) {
    let _ = ep.pc().handle_read(TaggedBytesMut {
        now: Instant::now(),
        transport: TransportContext {
            local_addr: local,
            peer_addr: from,
            ecn: None,
            transport_protocol: TransportProtocol::UDP,
        },
        message: bytes::BytesMut::from(data),
    });
}

/// Sends the frames and audio packets that are due.
fn publish_due(ep: &mut Endpoint, p: &mut Publisher, stats: &Rc<RefCell<Stats>>, now: Instant) {
    let frame_interval = Duration::from_secs(1) / p.plan.fps.max(1);
    if p.plan.video_bps > 0 && p.next_frame <= now {
        // Fell far behind (a stalled runtime): skip, do not burst.
        if now.duration_since(p.next_frame) > frame_interval * 4 {
            p.next_frame = now;
        }
        p.next_frame += frame_interval;
        let keyframe = p.keyframe_wanted
            && p.last_keyframe
                .is_none_or(|t| now.duration_since(t) >= MIN_KEYFRAME_GAP)
            || p.last_keyframe
                .is_none_or(|t| now.duration_since(t) >= p.plan.keyframe_interval);
        p.credit += p.plan.video_bps as f64
            / 8.0
            / f64::from(p.plan.fps.max(1))
            / p.plan.packet_bytes as f64;
        let mut packets = p.credit.floor().max(1.0) as u32;
        p.credit = (p.credit - f64::from(packets)).max(-4.0);
        if keyframe {
            packets *= p.plan.keyframe_factor.max(1);
            p.last_keyframe = Some(now);
            p.keyframe_wanted = false;
        }
        let ts = (now.duration_since(p.started).as_micros() as u64 * 9 / 100) as u32;
        if p.queue.is_empty() {
            p.next_packet = now;
        }
        for i in 0..packets {
            let part = match (i, keyframe) {
                (0, true) => FramePart::KeyframeStart,
                (0, false) => FramePart::DeltaStart,
                _ => FramePart::Continuation,
            };
            p.queue.push_back((part, i + 1 == packets, ts));
        }
    }
    if p.plan.video_bps > 0 {
        let payload_len = p.plan.packet_bytes.saturating_sub(RTP_HEADER).max(64);
        let gap = if p.plan.pacing_factor > 0.0 {
            Duration::from_secs_f64(
                p.plan.packet_bytes as f64 * 8.0 / (p.plan.video_bps as f64 * p.plan.pacing_factor),
            )
        } else {
            Duration::ZERO
        };
        while p.next_packet <= now {
            let Some((part, marker, ts)) = p.queue.pop_front() else {
                break;
            };
            send_one(ep, p, stats, Kind::Video, part, payload_len, ts, marker);
            p.next_packet += gap;
        }
    }
    if p.plan.audio && p.next_audio <= now {
        if now.duration_since(p.next_audio) > AUDIO_INTERVAL * 4 {
            p.next_audio = now;
        }
        p.next_audio += AUDIO_INTERVAL;
        let ts = (now.duration_since(p.started).as_micros() as u64 * 48 / 1000) as u32;
        let len = p.plan.audio_bytes.saturating_sub(RTP_HEADER);
        send_one(ep, p, stats, Kind::Audio, FramePart::Audio, len, ts, false);
    }
}

#[allow(clippy::too_many_arguments)]
fn send_one(
    ep: &mut Endpoint,
    p: &mut Publisher,
    stats: &Rc<RefCell<Stats>>,
    kind: Kind,
    part: FramePart,
    len: usize,
    ts: u32,
    marker: bool,
) {
    let k = kind as usize;
    let now = Instant::now();
    let mut st = stats.borrow_mut();
    let sent_us = st.us(now);
    let stamp = Stamp {
        tag: p.tags[k],
        seq: p.counters[k],
        sent_us,
    };
    p.counters[k] = p.counters[k].wrapping_add(1);
    let receivers = st.members.saturating_sub(1);
    if let Some(w) = st.window.as_mut() {
        if w.contains(sent_us) {
            w.sent += 1;
            w.expected += receivers;
        }
    }
    drop(st);
    let _ = ep.send(kind, encode_payload(part, stamp, len), ts, marker, now);
}
