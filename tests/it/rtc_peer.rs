//! A webrtc-rs participant for media tests.
//!
//! [`RtcPeer`] is one conference member as a real WebRTC endpoint: a webrtc-rs
//! `PeerConnection` set up for the loopback-only test network, local tracks that
//! send numbered RTP packets ([`LocalTrack::send_numbered`]), and a record of
//! every packet that arrives on every remote track ([`RemoteTrackRecord`]).
//! [`RtcPeer::start_signaling`] drives the connection through Confab's signaling
//! protocol (docs/protocol.md): `mode`, `offer`, `answer` and trickled
//! `candidate` messages, with the polite/impolite roles the server assigns.
//!
//! Payload layout of every packet sent by [`LocalTrack::send_numbered`]:
//!
//! ```text
//! [codec prefix][b"CFB1"][tag: u32 BE][counter: u32 BE][pattern ...]
//! ```
//!
//! * codec prefix: for VP8, a payload descriptor plus a key-frame header, so a
//!   forwarder that parses VP8 sees every packet as a complete key frame (a
//!   decodable starting point); empty for Opus.
//! * tag: identifies the sending track, so a receiver that gets several remote
//!   tracks (SFU) can tell whose stream each one carries.
//! * counter: 0, 1, 2, ... per track, continued across `send_numbered` calls.
//! * pattern: `pattern_byte(tag, counter, i)` for the i-th byte, which catches
//!   truncation, corruption and packets of one stream showing up in another.
//!
//! Network notes (webrtc 0.21.1):
//! * Each connection binds one UDP socket on `127.0.0.1:0`; a concrete bind
//!   address becomes the host candidate as is (wildcard binds skip loopback
//!   interfaces, which would leave a loopback-only namespace with nothing).
//! * mDNS is disabled: it would bind the multicast port 5353, and `.local`
//!   candidates are useless here.
//! * A remote track only surfaces (`on_track`) when its first RTP packet
//!   arrives, and `write_rtp` on a bound track returns `Ok` even when the core
//!   drops the packet because DTLS/SRTP is not up yet. So: wait until *both*
//!   ends report `Connected` before sending.
//! * Time to `Connected` on loopback is quantised by the 200 ms ICE check
//!   interval: about 200-450 ms. When one side's connectivity check arrives
//!   before its trickled candidate, the other side learns that address as
//!   peer-reflexive and nominates it only after the 1 s prflx acceptance wait
//!   (about 1.25 s in all). Both are defaults of the ICE agent, kept here so
//!   the clients behave like ordinary webrtc-rs clients.

#![allow(dead_code)] // a toolbox shared by several test modules; each uses a subset

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder,
    PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceCandidateInit,
    RTCIceConnectionState, RTCIceGatheringState, RTCIceServer, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
};

use crate::common::{WsReceiver, WsSender};

/// Payload type the test media engine registers for VP8.
pub(crate) const VIDEO_PAYLOAD_TYPE: u8 = 96;
/// Payload type the test media engine registers for Opus.
pub(crate) const AUDIO_PAYLOAD_TYPE: u8 = 111;

const MAGIC: [u8; 4] = *b"CFB1";
const HEADER_LEN: usize = 12; // magic + tag + counter

/// VP8 payload descriptor (S=1, partition 0) followed by a key-frame header
/// (P=0, show_frame=1, start code 9d 01 2a, 320x180).
const VP8_KEYFRAME_PREFIX: [u8; 11] = [
    0x10, 0x10, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xb4, 0x00,
];

// ---------------------------------------------------------------------------
// Payload format
// ---------------------------------------------------------------------------

fn codec_prefix(kind: RtpCodecKind) -> &'static [u8] {
    match kind {
        RtpCodecKind::Video => &VP8_KEYFRAME_PREFIX,
        _ => &[],
    }
}

/// Smallest payload `send_numbered` accepts for a track of this kind.
pub(crate) fn min_payload_len(kind: RtpCodecKind) -> usize {
    codec_prefix(kind).len() + HEADER_LEN
}

/// The i-th pattern byte of packet `counter` of the track tagged `tag`.
pub(crate) fn pattern_byte(tag: u32, counter: u32, i: usize) -> u8 {
    (i as u32)
        .wrapping_mul(31)
        .wrapping_add(counter.wrapping_mul(7))
        .wrapping_add(tag)
        .to_le_bytes()[0]
}

/// Builds the payload of packet `counter` (see the module docs for the layout).
pub(crate) fn encode_payload(kind: RtpCodecKind, tag: u32, counter: u32, len: usize) -> Bytes {
    let prefix = codec_prefix(kind);
    assert!(
        len >= prefix.len() + HEADER_LEN,
        "payload_len {len} is below the minimum {} for {kind}",
        prefix.len() + HEADER_LEN
    );
    let mut buf = BytesMut::with_capacity(len);
    buf.put_slice(prefix);
    buf.put_slice(&MAGIC);
    buf.put_u32(tag);
    buf.put_u32(counter);
    let pattern_len = len - prefix.len() - HEADER_LEN;
    for i in 0..pattern_len {
        buf.put_u8(pattern_byte(tag, counter, i));
    }
    buf.freeze()
}

/// Checks a payload built by [`encode_payload`] and returns `(tag, counter)`.
pub(crate) fn decode_payload(kind: RtpCodecKind, payload: &[u8]) -> Result<(u32, u32), String> {
    let prefix = codec_prefix(kind);
    if payload.len() < prefix.len() + HEADER_LEN {
        return Err(format!("payload of {} bytes is too short", payload.len()));
    }
    if &payload[..prefix.len()] != prefix {
        return Err(format!(
            "codec prefix {:02x?} != {:02x?}",
            &payload[..prefix.len()],
            prefix
        ));
    }
    let rest = &payload[prefix.len()..];
    if rest[..4] != MAGIC {
        return Err(format!("magic {:02x?} != {:02x?}", &rest[..4], MAGIC));
    }
    let tag = u32::from_be_bytes(rest[4..8].try_into().unwrap());
    let counter = u32::from_be_bytes(rest[8..12].try_into().unwrap());
    for (i, byte) in rest[HEADER_LEN..].iter().enumerate() {
        let want = pattern_byte(tag, counter, i);
        if *byte != want {
            return Err(format!(
                "tag {tag:#010x} counter {counter}: pattern byte {i} is {byte:#04x}, expected {want:#04x}"
            ));
        }
    }
    Ok((tag, counter))
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// What an [`RtcPeer`] sends and how it connects.
#[derive(Clone, Debug)]
pub(crate) struct PeerConfig {
    /// Display name, also used in track ids and log lines.
    pub(crate) name: String,
    /// Add a local VP8 video track.
    pub(crate) video: bool,
    /// Add a local Opus audio track.
    pub(crate) audio: bool,
    /// ICE servers; empty means host candidates only.
    pub(crate) ice_servers: Vec<RTCIceServer>,
    /// Address the connection's UDP socket binds (port 0 = ephemeral).
    pub(crate) bind: SocketAddr,
}

impl PeerConfig {
    /// A participant sending one VP8 track, host candidates on 127.0.0.1 only.
    pub(crate) fn video(name: &str) -> PeerConfig {
        PeerConfig {
            name: name.to_owned(),
            video: true,
            audio: false,
            ice_servers: Vec::new(),
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        }
    }

    /// Also send an Opus audio track.
    pub(crate) fn with_audio(mut self) -> PeerConfig {
        self.audio = true;
        self
    }

    /// Send nothing (receive only).
    pub(crate) fn receive_only(mut self) -> PeerConfig {
        self.video = false;
        self.audio = false;
        self
    }
}

/// The `ice_servers` list of a `joined` message, for [`PeerConfig::ice_servers`].
pub(crate) fn ice_servers_from_joined(joined: &Value) -> Vec<RTCIceServer> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    joined["ice_servers"]
        .as_array()
        .map(|servers| {
            servers
                .iter()
                .map(|server| RTCIceServer {
                    urls: match &server["urls"] {
                        Value::Array(urls) => urls.iter().map(text).collect(),
                        url => vec![text(url)],
                    },
                    username: text(&server["username"]),
                    credential: text(&server["credential"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn vp8_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![],
    }
}

fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

// ---------------------------------------------------------------------------
// Local tracks
// ---------------------------------------------------------------------------

/// Outcome of one [`LocalTrack::send_numbered`] call.
#[derive(Clone, Debug)]
pub(crate) struct SendReport {
    /// Counter of the first packet written by this call.
    pub(crate) first_counter: u32,
    /// Packets written (every `write_rtp` returned `Ok`).
    pub(crate) count: u32,
    /// When the first packet was written.
    pub(crate) started: Instant,
    /// Time from the first to the last write.
    pub(crate) elapsed: Duration,
}

impl SendReport {
    /// The counters this call wrote.
    pub(crate) fn counters(&self) -> Range<u32> {
        self.first_counter..self.first_counter + self.count
    }
}

struct SendState {
    counter: u32,
    sequence_number: u16,
    timestamp: u32,
}

/// A local track that writes numbered RTP packets.
pub(crate) struct LocalTrack {
    /// Audio or video.
    pub(crate) kind: RtpCodecKind,
    /// SSRC announced in the SDP and written in every packet.
    pub(crate) ssrc: u32,
    /// Payload type written in every packet.
    pub(crate) payload_type: u8,
    /// RTP clock rate of the codec.
    pub(crate) clock_rate: u32,
    /// Written into every payload; identifies this track at the receivers.
    pub(crate) tag: u32,
    /// Track id announced in the SDP (`a=msid`).
    pub(crate) track_id: String,
    /// Stream id announced in the SDP (`a=msid`).
    pub(crate) stream_id: String,
    track: Arc<TrackLocalStaticRTP>,
    state: tokio::sync::Mutex<SendState>,
}

impl LocalTrack {
    fn new(name: &str, kind: RtpCodecKind) -> LocalTrack {
        let (codec, payload_type, clock_rate, kind_name) = match kind {
            RtpCodecKind::Video => (vp8_codec(), VIDEO_PAYLOAD_TYPE, 90_000, "video"),
            _ => (opus_codec(), AUDIO_PAYLOAD_TYPE, 48_000, "audio"),
        };
        let ssrc = rand::random::<u32>();
        let tag = rand::random::<u32>();
        let stream_id = format!("{name}-stream");
        let track_id = format!("{name}-{kind_name}");
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            stream_id.clone(),
            track_id.clone(),
            format!("{name} {kind_name}"),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec,
                ..Default::default()
            }],
        )));
        LocalTrack {
            kind,
            ssrc,
            payload_type,
            clock_rate,
            tag,
            track_id,
            stream_id,
            track,
            state: tokio::sync::Mutex::new(SendState {
                counter: 0,
                sequence_number: rand::random::<u16>(),
                timestamp: rand::random::<u32>(),
            }),
        }
    }

    /// Writes `count` packets of `payload_len` bytes, one every `interval`
    /// (back to back when zero). Counters continue where the previous call
    /// stopped. Fails on the first `write_rtp` error (e.g. the track is not
    /// bound to a negotiated sender yet).
    ///
    /// `Ok` from `write_rtp` only means the packet reached the connection's
    /// driver; whether it went out depends on DTLS/SRTP being up, so call this
    /// once the connection is `Connected` at both ends.
    pub(crate) async fn send_numbered(
        &self,
        count: u32,
        interval: Duration,
        payload_len: usize,
    ) -> Result<SendReport, String> {
        assert!(
            payload_len >= min_payload_len(self.kind),
            "payload_len {payload_len} below the minimum {}",
            min_payload_len(self.kind)
        );
        let mut state = self.state.lock().await;
        let first_counter = state.counter;
        let ticks_per_packet = if interval.is_zero() {
            self.clock_rate / 100
        } else {
            (interval.as_micros() as u64 * self.clock_rate as u64 / 1_000_000) as u32
        };
        let mut ticker = tokio::time::interval(interval.max(Duration::from_micros(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let started = Instant::now();
        for sent in 0..count {
            if !interval.is_zero() {
                ticker.tick().await;
            }
            let packet = rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    // One packet per frame: every video packet ends its frame.
                    marker: self.kind == RtpCodecKind::Video,
                    payload_type: self.payload_type,
                    sequence_number: state.sequence_number,
                    timestamp: state.timestamp,
                    ssrc: self.ssrc,
                    ..Default::default()
                },
                payload: encode_payload(self.kind, self.tag, state.counter, payload_len),
            };
            self.track.write_rtp(packet).await.map_err(|e| {
                format!(
                    "{} write_rtp of counter {} failed after {sent} packets: {e}",
                    self.track_id, state.counter
                )
            })?;
            state.counter += 1;
            state.sequence_number = state.sequence_number.wrapping_add(1);
            state.timestamp = state.timestamp.wrapping_add(ticks_per_packet);
        }
        Ok(SendReport {
            first_counter,
            count,
            started,
            elapsed: started.elapsed(),
        })
    }

    /// Counter the next packet will carry.
    pub(crate) async fn next_counter(&self) -> u32 {
        self.state.lock().await.counter
    }
}

// ---------------------------------------------------------------------------
// Remote tracks
// ---------------------------------------------------------------------------

/// One packet received on a remote track.
#[derive(Clone, Debug)]
pub(crate) struct ReceivedPacket {
    /// Counter from the payload.
    pub(crate) counter: u32,
    /// Sender tag from the payload.
    pub(crate) tag: u32,
    /// RTP header fields as received.
    pub(crate) sequence_number: u16,
    /// RTP timestamp as received.
    pub(crate) timestamp: u32,
    /// RTP SSRC as received.
    pub(crate) ssrc: u32,
    /// RTP payload type as received.
    pub(crate) payload_type: u8,
    /// Payload size in bytes.
    pub(crate) payload_len: usize,
    /// Arrival time at the application.
    pub(crate) at: Instant,
}

/// Everything received on one remote track.
#[derive(Clone, Debug)]
pub(crate) struct RemoteTrackRecord {
    /// Track id from the remote's `a=msid`.
    pub(crate) track_id: String,
    /// Stream id from the remote's `a=msid`.
    pub(crate) stream_id: String,
    /// Audio or video.
    pub(crate) kind: RtpCodecKind,
    /// SSRCs the track reported when it opened.
    pub(crate) ssrcs: Vec<u32>,
    /// Negotiated codec of the first SSRC, if known.
    pub(crate) mime_type: Option<String>,
    /// When `on_track` fired.
    pub(crate) opened_at: Instant,
    /// Packets whose payload passed [`decode_payload`], in arrival order.
    pub(crate) packets: Vec<ReceivedPacket>,
    /// Packets whose payload failed [`decode_payload`], described.
    pub(crate) malformed: Vec<String>,
    /// The track reported `OnEnded` (or its event stream closed).
    pub(crate) ended: bool,
}

impl RemoteTrackRecord {
    /// Counters in arrival order.
    pub(crate) fn counters(&self) -> Vec<u32> {
        self.packets.iter().map(|p| p.counter).collect()
    }

    /// Tags seen on this track (one, unless streams got mixed up).
    pub(crate) fn tags(&self) -> Vec<u32> {
        let mut tags: Vec<u32> = self.packets.iter().map(|p| p.tag).collect();
        tags.sort_unstable();
        tags.dedup();
        tags
    }

    /// Asserts that the track carried exactly the packets `expected` of the
    /// stream tagged `tag`: every counter once, in order, nothing malformed,
    /// nothing else. Returns a description of the first discrepancy.
    pub(crate) fn check_exact(&self, tag: u32, expected: Range<u32>) -> Result<(), String> {
        if !self.malformed.is_empty() {
            return Err(format!(
                "{}: {} malformed payloads, first: {}",
                self.track_id,
                self.malformed.len(),
                self.malformed[0]
            ));
        }
        if let Some(p) = self.packets.iter().find(|p| p.tag != tag) {
            return Err(format!(
                "{}: packet with tag {:#010x} (counter {}) on a track expected to carry {tag:#010x}",
                self.track_id, p.tag, p.counter
            ));
        }
        let got = self.counters();
        let want: Vec<u32> = expected.clone().collect();
        if got == want {
            return Ok(());
        }
        let missing: Vec<u32> = expected.clone().filter(|c| !got.contains(c)).collect();
        let out_of_order = got.windows(2).filter(|w| w[1] <= w[0]).count();
        Err(format!(
            "{}: received {} packets, expected counters {:?} ({} packets); missing {} {:?}; \
             out of order or duplicated {}; first received {:?}",
            self.track_id,
            got.len(),
            expected,
            want.len(),
            missing.len(),
            &missing[..missing.len().min(20)],
            out_of_order,
            &got[..got.len().min(20)],
        ))
    }
}

#[derive(Default)]
struct Received {
    tracks: Mutex<Vec<RemoteTrackRecord>>,
    changed: Notify,
}

impl Received {
    fn snapshot(&self) -> Vec<RemoteTrackRecord> {
        self.tracks.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the records, or `timeout` passes.
    async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[RemoteTrackRecord]) -> bool,
    ) -> Result<Vec<RemoteTrackRecord>, Vec<RemoteTrackRecord>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let tracks = self.tracks.lock().unwrap();
                if done(&tracks) {
                    return Ok(tracks.clone());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let tracks = self.tracks.lock().unwrap();
                return if done(&tracks) {
                    Ok(tracks.clone())
                } else {
                    Err(tracks.clone())
                };
            }
        }
    }
}

async fn read_remote_track(track: Arc<dyn TrackRemote>, index: usize, received: Arc<Received>) {
    let kind = {
        let tracks = received.tracks.lock().unwrap();
        tracks[index].kind
    };
    while let Some(event) = track.poll().await {
        match event {
            TrackRemoteEvent::OnRtpPacket(packet) => {
                let decoded = decode_payload(kind, &packet.payload);
                let mut tracks = received.tracks.lock().unwrap();
                let record = &mut tracks[index];
                match decoded {
                    Ok((tag, counter)) => record.packets.push(ReceivedPacket {
                        counter,
                        tag,
                        sequence_number: packet.header.sequence_number,
                        timestamp: packet.header.timestamp,
                        ssrc: packet.header.ssrc,
                        payload_type: packet.header.payload_type,
                        payload_len: packet.payload.len(),
                        at: Instant::now(),
                    }),
                    Err(e) => record.malformed.push(format!(
                        "seq {} ({} bytes): {e}",
                        packet.header.sequence_number,
                        packet.payload.len()
                    )),
                }
                drop(tracks);
                received.changed.notify_waiters();
            }
            TrackRemoteEvent::OnEnded => break,
            _ => {}
        }
    }
    received.tracks.lock().unwrap()[index].ended = true;
    received.changed.notify_waiters();
}

// ---------------------------------------------------------------------------
// Peer connection event handler
// ---------------------------------------------------------------------------

/// Timestamped notes of what a peer and its signaling driver did.
type Timeline = Arc<Mutex<Vec<(Instant, String)>>>;

fn note(timeline: &Timeline, what: String) {
    timeline.lock().unwrap().push((Instant::now(), what));
}

enum LocalIce {
    Candidate(RTCIceCandidateInit),
    GatheringComplete,
}

struct Handler {
    name: String,
    created: Instant,
    state_tx: watch::Sender<RTCPeerConnectionState>,
    connected_at: Arc<Mutex<Option<Instant>>>,
    state_log: Arc<Mutex<Vec<(Duration, RTCPeerConnectionState)>>>,
    ice_tx: mpsc::UnboundedSender<LocalIce>,
    received: Arc<Received>,
    timeline: Timeline,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        match event.candidate.to_json() {
            Ok(init) => {
                note(
                    &self.timeline,
                    format!("local candidate {}", init.candidate),
                );
                let _ = self.ice_tx.send(LocalIce::Candidate(init));
            }
            Err(e) => eprintln!("[{}] cannot serialise local candidate: {e}", self.name),
        }
    }

    async fn on_ice_connection_state_change(&self, state: RTCIceConnectionState) {
        note(&self.timeline, format!("ICE {state}"));
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        note(&self.timeline, format!("gathering {state}"));
        if state == RTCIceGatheringState::Complete {
            let _ = self.ice_tx.send(LocalIce::GatheringComplete);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        note(&self.timeline, format!("connection {state}"));
        self.state_log
            .lock()
            .unwrap()
            .push((self.created.elapsed(), state));
        if state == RTCPeerConnectionState::Connected {
            self.connected_at
                .lock()
                .unwrap()
                .get_or_insert_with(Instant::now);
        }
        self.state_tx.send_replace(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let ssrcs = track.ssrcs().await;
        let mime_type = match ssrcs.first() {
            Some(ssrc) => track.codec(*ssrc).await.map(|c| c.mime_type),
            None => None,
        };
        let record = RemoteTrackRecord {
            track_id: track.track_id().await,
            stream_id: track.stream_id().await,
            kind: track.kind().await,
            ssrcs,
            mime_type,
            opened_at: Instant::now(),
            packets: Vec::new(),
            malformed: Vec::new(),
            ended: false,
        };
        note(
            &self.timeline,
            format!("remote track {} ({})", record.track_id, record.kind),
        );
        let index = {
            let mut tracks = self.received.tracks.lock().unwrap();
            tracks.push(record);
            tracks.len() - 1
        };
        self.received.changed.notify_waiters();
        // The handler runs on the connection's driver: read on a task of our own.
        tokio::spawn(read_remote_track(track, index, self.received.clone()));
    }
}

// ---------------------------------------------------------------------------
// The participant
// ---------------------------------------------------------------------------

/// The ICE candidate pair a connection selected, as socket addresses.
#[derive(Clone, Debug)]
pub(crate) struct SelectedPair {
    /// Our end.
    pub(crate) local: SocketAddr,
    /// The remote end.
    pub(crate) remote: SocketAddr,
    /// Candidate type of our end (`host`, `srflx`, ...).
    pub(crate) local_type: String,
    /// Candidate type of the remote end.
    pub(crate) remote_type: String,
}

/// One conference member with a real WebRTC peer connection.
pub(crate) struct RtcPeer {
    /// Display name.
    pub(crate) name: String,
    pc: Arc<dyn PeerConnection>,
    video: Option<Arc<LocalTrack>>,
    audio: Option<Arc<LocalTrack>>,
    created: Instant,
    state_rx: watch::Receiver<RTCPeerConnectionState>,
    connected_at: Arc<Mutex<Option<Instant>>>,
    state_log: Arc<Mutex<Vec<(Duration, RTCPeerConnectionState)>>>,
    received: Arc<Received>,
    ice_rx: Mutex<Option<mpsc::UnboundedReceiver<LocalIce>>>,
    timeline: Timeline,
}

impl RtcPeer {
    /// Builds the peer connection and adds the configured local tracks.
    pub(crate) async fn new(config: PeerConfig) -> Result<RtcPeer, String> {
        let name = config.name.clone();
        let err = |what: &str, e: webrtc::error::Error| format!("[{name}] {what}: {e}");

        let mut media_engine = MediaEngine::default();
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: vp8_codec(),
                    payload_type: VIDEO_PAYLOAD_TYPE,
                },
                RtpCodecKind::Video,
            )
            .map_err(|e| err("register VP8", e))?;
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: opus_codec(),
                    payload_type: AUDIO_PAYLOAD_TYPE,
                },
                RtpCodecKind::Audio,
            )
            .map_err(|e| err("register Opus", e))?;
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)
            .map_err(|e| err("register interceptors", e))?;

        let setting_engine = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            // Not consulted by webrtc 0.21.1 (the bind address alone decides the
            // host candidate); set for versions that filter loopback candidates.
            .with_include_loopback_candidate(true)
            .build();
        let configuration = RTCConfigurationBuilder::new()
            .with_ice_servers(config.ice_servers.clone())
            .build();

        let created = Instant::now();
        let (state_tx, state_rx) = watch::channel(RTCPeerConnectionState::New);
        let (ice_tx, ice_rx) = mpsc::unbounded_channel();
        let connected_at = Arc::new(Mutex::new(None));
        let state_log = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(Received::default());
        let timeline: Timeline = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Handler {
            name: name.clone(),
            created,
            state_tx,
            connected_at: connected_at.clone(),
            state_log: state_log.clone(),
            ice_tx,
            received: received.clone(),
            timeline: timeline.clone(),
        });

        let pc = PeerConnectionBuilder::new()
            .with_configuration(configuration)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .with_setting_engine(setting_engine)
            .with_handler(handler)
            .with_udp_addrs(vec![config.bind])
            .build()
            .await
            .map_err(|e| err("build peer connection", e))?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);

        let mut video = None;
        let mut audio = None;
        for (wanted, kind, slot) in [
            (config.video, RtpCodecKind::Video, &mut video),
            (config.audio, RtpCodecKind::Audio, &mut audio),
        ] {
            if !wanted {
                continue;
            }
            let local = Arc::new(LocalTrack::new(&name, kind));
            pc.add_track(local.track.clone() as Arc<dyn TrackLocal>)
                .await
                .map_err(|e| err("add_track", e))?;
            *slot = Some(local);
        }

        Ok(RtcPeer {
            name,
            pc,
            video,
            audio,
            created,
            state_rx,
            connected_at,
            state_log,
            received,
            ice_rx: Mutex::new(Some(ice_rx)),
            timeline,
        })
    }

    /// The underlying connection.
    pub(crate) fn pc(&self) -> &Arc<dyn PeerConnection> {
        &self.pc
    }

    /// The local video track, if configured.
    pub(crate) fn video(&self) -> Option<&Arc<LocalTrack>> {
        self.video.as_ref()
    }

    /// The local audio track, if configured.
    pub(crate) fn audio(&self) -> Option<&Arc<LocalTrack>> {
        self.audio.as_ref()
    }

    /// Sends numbered packets on the video track (see [`LocalTrack::send_numbered`]).
    pub(crate) async fn send_numbered(
        &self,
        count: u32,
        interval: Duration,
        payload_len: usize,
    ) -> Result<SendReport, String> {
        let video = self
            .video
            .as_ref()
            .ok_or_else(|| format!("[{}] has no video track", self.name))?;
        video.send_numbered(count, interval, payload_len).await
    }

    /// Current connection state.
    pub(crate) fn state(&self) -> RTCPeerConnectionState {
        *self.state_rx.borrow()
    }

    /// Connection states with the time since construction, in order.
    pub(crate) fn state_log(&self) -> Vec<(Duration, RTCPeerConnectionState)> {
        self.state_log.lock().unwrap().clone()
    }

    /// What happened so far (states, candidates, signaling), each line with
    /// its offset from `since`.
    pub(crate) fn timeline(&self, since: Instant) -> Vec<String> {
        self.timeline
            .lock()
            .unwrap()
            .iter()
            .map(|(at, what)| {
                let ms = if *at >= since {
                    (*at - since).as_secs_f64() * 1e3
                } else {
                    -((since - *at).as_secs_f64() * 1e3)
                };
                format!("{ms:+9.1} ms  {what}")
            })
            .collect()
    }

    /// When the connection first reached `Connected`.
    pub(crate) fn connected_at(&self) -> Option<Instant> {
        *self.connected_at.lock().unwrap()
    }

    /// Waits for `Connected`; fails on `Failed`/`Closed` or after `timeout`.
    pub(crate) async fn wait_connected(&self, timeout: Duration) -> Result<(), String> {
        let mut rx = self.state_rx.clone();
        let wait = rx.wait_for(|s| {
            matches!(
                s,
                RTCPeerConnectionState::Connected
                    | RTCPeerConnectionState::Failed
                    | RTCPeerConnectionState::Closed
            )
        });
        let outcome = tokio::time::timeout(timeout, wait)
            .await
            .map(|r| r.map(|state| *state));
        match outcome {
            Ok(Ok(RTCPeerConnectionState::Connected)) => Ok(()),
            Ok(Ok(state)) => Err(format!(
                "[{}] connection went {state} (states: {:?})",
                self.name,
                self.state_log()
            )),
            Ok(Err(_)) => Err(format!("[{}] connection state channel closed", self.name)),
            Err(_) => Err(format!(
                "[{}] not connected after {timeout:?}; states so far: {:?}",
                self.name,
                self.state_log()
            )),
        }
    }

    /// Snapshot of every remote track and what arrived on it.
    pub(crate) fn received(&self) -> Vec<RemoteTrackRecord> {
        self.received.snapshot()
    }

    /// Waits until `count` remote tracks have opened.
    pub(crate) async fn wait_for_tracks(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<RemoteTrackRecord>, String> {
        self.received
            .wait_until(timeout, |tracks| tracks.len() >= count)
            .await
            .map_err(|tracks| {
                format!(
                    "[{}] {} remote tracks after {timeout:?}, expected {count}: {:?}",
                    self.name,
                    tracks.len(),
                    tracks.iter().map(|t| &t.track_id).collect::<Vec<_>>()
                )
            })
    }

    /// Waits until the remote track carrying the stream tagged `tag` has
    /// delivered at least `count` packets, and returns its record.
    pub(crate) async fn wait_for_packets(
        &self,
        tag: u32,
        count: usize,
        timeout: Duration,
    ) -> Result<RemoteTrackRecord, String> {
        let carries = |t: &RemoteTrackRecord| t.packets.first().is_some_and(|p| p.tag == tag);
        match self
            .received
            .wait_until(timeout, |tracks| {
                tracks
                    .iter()
                    .any(|t| carries(t) && t.packets.len() >= count)
            })
            .await
        {
            Ok(tracks) => Ok(tracks.into_iter().find(|t| carries(t)).unwrap()),
            Err(tracks) => Err(format!(
                "[{}] after {timeout:?}, wanted {count} packets tagged {tag:#010x}; tracks: {}",
                self.name,
                describe_tracks(&tracks)
            )),
        }
    }

    /// The candidate pair ICE selected, read from the transport of the first
    /// sender (or receiver). `None` before a pair is selected.
    pub(crate) async fn selected_pair(&self) -> Result<Option<SelectedPair>, String> {
        let dtls = match self.pc.get_senders().await.first() {
            Some(sender) => sender.transport().await,
            None => match self.pc.get_receivers().await.first() {
                Some(receiver) => receiver.transport().await,
                None => return Err(format!("[{}] has no senders or receivers", self.name)),
            },
        }
        .map_err(|e| format!("[{}] transport(): {e}", self.name))?;
        let Some(dtls) = dtls else {
            return Ok(None);
        };
        let pair = dtls
            .ice_transport()
            .get_selected_candidate_pair()
            .await
            .map_err(|e| format!("[{}] get_selected_candidate_pair: {e}", self.name))?;
        let Some(pair) = pair else {
            return Ok(None);
        };
        let addr = |c: &webrtc::peer_connection::RTCIceCandidate| -> Result<SocketAddr, String> {
            let ip: IpAddr = c
                .address
                .parse()
                .map_err(|e| format!("candidate address {:?}: {e}", c.address))?;
            Ok(SocketAddr::new(ip, c.port))
        };
        Ok(Some(SelectedPair {
            local: addr(pair.local())?,
            remote: addr(pair.remote())?,
            local_type: pair.local().typ.to_string(),
            remote_type: pair.remote().typ.to_string(),
        }))
    }

    /// Closes the peer connection.
    pub(crate) async fn close(&self) {
        if let Err(e) = self.pc.close().await {
            eprintln!("[{}] close: {e}", self.name);
        }
    }

    /// Starts the signaling driver on an already joined socket. `joined` is the
    /// server's `joined` message; its `mode` is applied at once. Can be called
    /// once per peer (the driver owns the local-candidate stream).
    pub(crate) fn start_signaling(
        &self,
        joined: &Value,
        sender: WsSender,
        receiver: WsReceiver,
    ) -> SignalingHandle {
        let ice_rx = self
            .ice_rx
            .lock()
            .unwrap()
            .take()
            .expect("start_signaling called twice");
        let participant_id = joined["participant_id"]
            .as_str()
            .unwrap_or_else(|| panic!("joined without participant_id: {joined}"))
            .to_owned();
        let log = Arc::new(Mutex::new(SignalingLog {
            participant_id: participant_id.clone(),
            ..Default::default()
        }));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let negotiator = Negotiator {
            name: self.name.clone(),
            pc: self.pc.clone(),
            log: log.clone(),
            peer: None,
            polite: false,
            offered_to: None,
            ignore_offer: false,
            pending_remote: VecDeque::new(),
            pending_local: VecDeque::new(),
            local_ufrag: None,
            local_first_mid: None,
            timeline: self.timeline.clone(),
        };
        let initial_mode = joined.get("mode").cloned().filter(|m| !m.is_null());
        let task = tokio::spawn(run_signaling(
            negotiator,
            initial_mode,
            sender,
            receiver,
            ice_rx,
            cmd_rx,
        ));
        SignalingHandle {
            participant_id,
            log,
            cmd_tx,
            task,
        }
    }
}

fn describe_tracks(tracks: &[RemoteTrackRecord]) -> String {
    if tracks.is_empty() {
        return "none".to_owned();
    }
    tracks
        .iter()
        .map(|t| {
            format!(
                "{} ({}, {} packets, tags {:x?}, {} malformed)",
                t.track_id,
                t.kind,
                t.packets.len(),
                t.tags(),
                t.malformed.len()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

// ---------------------------------------------------------------------------
// Signaling driver
// ---------------------------------------------------------------------------

/// What the signaling driver did and saw, for assertions and diagnostics.
#[derive(Clone, Debug, Default)]
pub(crate) struct SignalingLog {
    /// Our participant id.
    pub(crate) participant_id: String,
    /// Last media mode (`p2p`, ...).
    pub(crate) mode: Option<String>,
    /// The peer the last `mode` named.
    pub(crate) peer: Option<String>,
    /// Our role from the last `mode`.
    pub(crate) polite: Option<bool>,
    /// Epoch of the last `mode`.
    pub(crate) epoch: Option<u64>,
    /// `offer` messages sent / received / ignored (impolite side of a collision).
    pub(crate) offers_sent: usize,
    /// See `offers_sent`.
    pub(crate) offers_received: usize,
    /// See `offers_sent`.
    pub(crate) offers_ignored: usize,
    /// Own offers rolled back (polite side of a collision).
    pub(crate) rollbacks: usize,
    /// `answer` messages sent.
    pub(crate) answers_sent: usize,
    /// `answer` messages received.
    pub(crate) answers_received: usize,
    /// Trickled candidates sent (not counting the end-of-candidates marker).
    pub(crate) candidates_sent: usize,
    /// Trickled candidates received (not counting end-of-candidates).
    pub(crate) candidates_received: usize,
    /// End-of-candidates markers sent.
    pub(crate) end_of_candidates_sent: usize,
    /// End-of-candidates markers received.
    pub(crate) end_of_candidates_received: usize,
    /// When the first offer was sent or received.
    pub(crate) first_offer_at: Option<Instant>,
    /// Server `error` messages and local failures, described.
    pub(crate) errors: Vec<String>,
    /// Messages not handled by the driver (`participant_joined`, `pong`, ...).
    pub(crate) other: Vec<Value>,
    /// The socket closed.
    pub(crate) closed: bool,
}

enum Command {
    Send(Value),
    Stop,
}

/// Handle to a running signaling driver.
pub(crate) struct SignalingHandle {
    /// Our participant id (from `joined`).
    pub(crate) participant_id: String,
    log: Arc<Mutex<SignalingLog>>,
    cmd_tx: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl SignalingHandle {
    /// Snapshot of the driver's log.
    pub(crate) fn log(&self) -> SignalingLog {
        self.log.lock().unwrap().clone()
    }

    /// Sends an arbitrary message on the socket.
    pub(crate) fn send(&self, message: Value) {
        let _ = self.cmd_tx.send(Command::Send(message));
    }

    /// Sends `leave`; the server then closes the socket.
    pub(crate) fn leave(&self) {
        self.send(json!({"type": "leave"}));
    }

    /// Stops the driver (the socket is dropped).
    pub(crate) async fn stop(self) {
        let _ = self.cmd_tx.send(Command::Stop);
        let _ = self.task.await;
    }
}

struct Negotiator {
    name: String,
    pc: Arc<dyn PeerConnection>,
    log: Arc<Mutex<SignalingLog>>,
    peer: Option<String>,
    polite: bool,
    /// The peer our initial offer went to (so a repeated `mode` does not re-offer).
    offered_to: Option<String>,
    ignore_offer: bool,
    /// Remote candidates that arrived before a remote description.
    pending_remote: VecDeque<RTCIceCandidateInit>,
    /// Local candidates gathered before we knew whom to send them to.
    pending_local: VecDeque<LocalIce>,
    local_ufrag: Option<String>,
    local_first_mid: Option<String>,
    timeline: Timeline,
}

async fn run_signaling(
    mut neg: Negotiator,
    initial_mode: Option<Value>,
    mut sender: WsSender,
    mut receiver: WsReceiver,
    mut ice_rx: mpsc::UnboundedReceiver<LocalIce>,
    mut cmd_rx: mpsc::UnboundedReceiver<Command>,
) {
    // A reader task of its own, so the select below only waits on channels.
    let (in_tx, mut in_rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(message) = receiver.recv_json().await {
            if in_tx.send(message).is_err() {
                break;
            }
        }
    });

    if let Some(mode) = initial_mode {
        note(&neg.timeline, format!("joined with mode {mode}"));
        neg.on_mode(&mode, &mut sender).await;
    }
    loop {
        tokio::select! {
            message = in_rx.recv() => match message {
                Some(message) => neg.on_message(message, &mut sender).await,
                None => {
                    neg.log.lock().unwrap().closed = true;
                    break;
                }
            },
            Some(ice) = ice_rx.recv() => neg.on_local_ice(ice, &mut sender).await,
            command = cmd_rx.recv() => match command {
                Some(Command::Send(message)) => sender.send_json(message).await,
                Some(Command::Stop) | None => break,
            },
        }
    }
    reader.abort();
}

/// A signaling message in one line, SDP left out.
fn brief(message: &Value) -> String {
    let mut m = message.clone();
    if let Some(sdp) = m.get_mut("sdp") {
        *sdp = json!(format!("<{} bytes>", sdp.as_str().map_or(0, str::len)));
    }
    m.to_string()
}

impl Negotiator {
    async fn send(&self, sender: &mut WsSender, message: Value) {
        note(&self.timeline, format!("send {}", brief(&message)));
        sender.send_json(message).await;
    }

    fn error(&self, what: String) {
        note(&self.timeline, format!("signaling error: {what}"));
        eprintln!("[{}] signaling: {what}", self.name);
        self.log.lock().unwrap().errors.push(what);
    }

    async fn on_message(&mut self, message: Value, sender: &mut WsSender) {
        note(&self.timeline, format!("recv {}", brief(&message)));
        match message["type"].as_str().unwrap_or("") {
            "mode" => self.on_mode(&message, sender).await,
            "offer" => self.on_offer(&message, sender).await,
            "answer" => self.on_answer(&message).await,
            "candidate" => self.on_candidate(&message).await,
            "error" => self.error(format!("server error: {message}")),
            _ => self.log.lock().unwrap().other.push(message),
        }
    }

    async fn on_mode(&mut self, mode: &Value, sender: &mut WsSender) {
        let kind = mode["mode"].as_str().unwrap_or("").to_owned();
        let peer = mode["peer"].as_str().map(str::to_owned);
        let polite = mode["polite"].as_bool();
        {
            let mut log = self.log.lock().unwrap();
            log.mode = Some(kind.clone());
            log.peer = peer.clone();
            log.polite = polite;
            log.epoch = mode["epoch"].as_u64();
        }
        if kind != "p2p" {
            self.error(format!(
                "mode {kind:?} is not handled by this driver: {mode}"
            ));
            return;
        }
        let Some(peer) = peer else {
            // Alone in the room (or the peer left): nothing to negotiate.
            return;
        };
        if let Some(current) = &self.peer {
            if *current != peer {
                self.error(format!(
                    "peer changed from {current} to {peer}; an RtcPeer holds one connection"
                ));
                return;
            }
        }
        self.peer = Some(peer.clone());
        self.polite = polite.unwrap_or(true);
        while let Some(ice) = self.pending_local.pop_front() {
            self.on_local_ice(ice, sender).await;
        }
        // The impolite member (the later joiner) makes the first offer.
        if !self.polite && self.offered_to.as_deref() != Some(peer.as_str()) {
            self.offered_to = Some(peer.clone());
            self.make_offer(sender).await;
        }
    }

    async fn make_offer(&mut self, sender: &mut WsSender) {
        let Some(peer) = self.peer.clone() else {
            return;
        };
        let offer = match self.pc.create_offer(None).await {
            Ok(offer) => offer,
            Err(e) => return self.error(format!("create_offer: {e}")),
        };
        if let Err(e) = self.pc.set_local_description(offer.clone()).await {
            return self.error(format!("set_local_description(offer): {e}"));
        }
        let sdp = self.local_sdp_or(offer).await;
        self.send(sender, json!({"type": "offer", "to": peer, "sdp": sdp}))
            .await;
        let mut log = self.log.lock().unwrap();
        log.offers_sent += 1;
        log.first_offer_at.get_or_insert_with(Instant::now);
    }

    /// The applied local description (remembering its ICE ufrag and first mid
    /// for outgoing candidates), or `fallback` if there is none.
    async fn local_sdp_or(&mut self, fallback: RTCSessionDescription) -> String {
        let sdp = self
            .pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .unwrap_or(fallback.sdp);
        let attribute = |name: &str| {
            sdp.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        self.local_ufrag = attribute("a=ice-ufrag:").or(self.local_ufrag.take());
        self.local_first_mid = attribute("a=mid:").or(self.local_first_mid.take());
        sdp
    }

    async fn on_offer(&mut self, message: &Value, sender: &mut WsSender) {
        let from = message["from"].as_str().unwrap_or("").to_owned();
        let Some(sdp) = message["sdp"].as_str() else {
            return self.error(format!("offer without sdp: {message}"));
        };
        {
            let mut log = self.log.lock().unwrap();
            log.offers_received += 1;
            log.first_offer_at.get_or_insert_with(Instant::now);
        }
        match &self.peer {
            Some(peer) if *peer == from => {}
            Some(peer) => {
                return self.error(format!("offer from {from}, but our peer is {peer}"));
            }
            None => {
                // A server that relays an offer before telling us our peer has its
                // ordering wrong; note it, then answer as the polite side would.
                self.error(format!("offer from {from} before any mode named a peer"));
                self.peer = Some(from.clone());
                self.polite = true;
            }
        }
        // Perfect negotiation: an offer while ours is outstanding is a collision.
        let collision = self.pc.pending_local_description().await.is_some();
        self.ignore_offer = !self.polite && collision;
        if self.ignore_offer {
            self.log.lock().unwrap().offers_ignored += 1;
            return;
        }
        if collision {
            let rollback = match RTCSessionDescription::rollback(None) {
                Ok(d) => d,
                Err(e) => return self.error(format!("rollback description: {e}")),
            };
            if let Err(e) = self.pc.set_local_description(rollback).await {
                return self.error(format!("rollback: {e}"));
            }
            self.log.lock().unwrap().rollbacks += 1;
        }
        let offer = match RTCSessionDescription::offer(sdp.to_owned()) {
            Ok(d) => d,
            Err(e) => return self.error(format!("parse offer: {e}")),
        };
        if let Err(e) = self.pc.set_remote_description(offer).await {
            return self.error(format!("set_remote_description(offer): {e}"));
        }
        self.flush_remote_candidates().await;
        let answer = match self.pc.create_answer(None).await {
            Ok(d) => d,
            Err(e) => return self.error(format!("create_answer: {e}")),
        };
        if let Err(e) = self.pc.set_local_description(answer.clone()).await {
            return self.error(format!("set_local_description(answer): {e}"));
        }
        let sdp = self.local_sdp_or(answer).await;
        self.send(sender, json!({"type": "answer", "to": from, "sdp": sdp}))
            .await;
        self.log.lock().unwrap().answers_sent += 1;
    }

    async fn on_answer(&mut self, message: &Value) {
        let from = message["from"].as_str().unwrap_or("");
        let Some(sdp) = message["sdp"].as_str() else {
            return self.error(format!("answer without sdp: {message}"));
        };
        self.log.lock().unwrap().answers_received += 1;
        if self.peer.as_deref() != Some(from) {
            return self.error(format!(
                "answer from {from}, but our peer is {:?}",
                self.peer
            ));
        }
        if self.pc.pending_local_description().await.is_none() {
            return self.error(format!("answer from {from} without an outstanding offer"));
        }
        let answer = match RTCSessionDescription::answer(sdp.to_owned()) {
            Ok(d) => d,
            Err(e) => return self.error(format!("parse answer: {e}")),
        };
        if let Err(e) = self.pc.set_remote_description(answer).await {
            return self.error(format!("set_remote_description(answer): {e}"));
        }
        self.flush_remote_candidates().await;
    }

    async fn on_candidate(&mut self, message: &Value) {
        let from = message["from"].as_str().unwrap_or("");
        if self.peer.as_deref() != Some(from) {
            return self.error(format!(
                "candidate from {from}, but our peer is {:?}",
                self.peer
            ));
        }
        let c = &message["candidate"];
        let Some(candidate) = c["candidate"].as_str() else {
            return self.error(format!("candidate without candidate string: {message}"));
        };
        if candidate.is_empty() {
            self.log.lock().unwrap().end_of_candidates_received += 1;
            return;
        }
        self.log.lock().unwrap().candidates_received += 1;
        let init = RTCIceCandidateInit {
            candidate: candidate.to_owned(),
            sdp_mid: c["sdp_mid"].as_str().map(str::to_owned),
            sdp_mline_index: c["sdp_mline_index"].as_u64().map(|i| i as u16),
            username_fragment: c["username_fragment"].as_str().map(str::to_owned),
            url: None,
        };
        if self.pc.remote_description().await.is_none() {
            self.pending_remote.push_back(init);
            return;
        }
        self.add_remote_candidate(init).await;
    }

    async fn add_remote_candidate(&mut self, init: RTCIceCandidateInit) {
        if let Err(e) = self.pc.add_ice_candidate(init.clone()).await {
            // Candidates for an offer we ignored are expected to fail.
            if !self.ignore_offer {
                self.error(format!("add_ice_candidate({}): {e}", init.candidate));
            }
        }
    }

    async fn flush_remote_candidates(&mut self) {
        while let Some(init) = self.pending_remote.pop_front() {
            self.add_remote_candidate(init).await;
        }
    }

    async fn on_local_ice(&mut self, ice: LocalIce, sender: &mut WsSender) {
        let Some(peer) = self.peer.clone() else {
            self.pending_local.push_back(ice);
            return;
        };
        let candidate = match ice {
            LocalIce::Candidate(init) => {
                // webrtc-rs reports sdp_mid "" and index 0; name the first m-line
                // properly, as a browser would, and add our ICE ufrag.
                let mid = init
                    .sdp_mid
                    .filter(|m| !m.is_empty())
                    .or_else(|| self.local_first_mid.clone());
                self.log.lock().unwrap().candidates_sent += 1;
                json!({
                    "candidate": init.candidate,
                    "sdp_mid": mid,
                    "sdp_mline_index": init.sdp_mline_index.unwrap_or(0),
                    "username_fragment": init.username_fragment.or_else(|| self.local_ufrag.clone()),
                })
            }
            LocalIce::GatheringComplete => {
                self.log.lock().unwrap().end_of_candidates_sent += 1;
                json!({
                    "candidate": "",
                    "sdp_mid": null,
                    "sdp_mline_index": null,
                    "username_fragment": self.local_ufrag.clone(),
                })
            }
        };
        self.send(
            sender,
            json!({"type": "candidate", "to": peer, "candidate": candidate}),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_damage_is_caught() {
        for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
            let len = 300;
            let payload = encode_payload(kind, 0xdead_beef, 41, len);
            assert_eq!(payload.len(), len);
            assert_eq!(decode_payload(kind, &payload), Ok((0xdead_beef, 41)));

            let shortest = encode_payload(kind, 7, 0, min_payload_len(kind));
            assert_eq!(decode_payload(kind, &shortest), Ok((7, 0)));

            let mut flipped = payload.to_vec();
            *flipped.last_mut().unwrap() ^= 0x01;
            assert!(decode_payload(kind, &flipped).is_err(), "{kind}: bit flip");

            // A counter rewritten without its pattern is caught too.
            let mut renumbered = payload.to_vec();
            let at = codec_prefix(kind).len() + 8;
            renumbered[at..at + 4].copy_from_slice(&42u32.to_be_bytes());
            assert!(
                decode_payload(kind, &renumbered).is_err(),
                "{kind}: counter"
            );

            assert!(
                decode_payload(kind, &payload[..10]).is_err(),
                "{kind}: short"
            );
        }
        assert_eq!(
            &encode_payload(RtpCodecKind::Video, 1, 2, 40)[..11],
            &VP8_KEYFRAME_PREFIX
        );
    }

    #[test]
    fn check_exact_reports_loss_reordering_and_foreign_packets() {
        let packet = |tag, counter| ReceivedPacket {
            counter,
            tag,
            sequence_number: counter as u16,
            timestamp: 0,
            ssrc: 1,
            payload_type: VIDEO_PAYLOAD_TYPE,
            payload_len: 100,
            at: Instant::now(),
        };
        let record = |packets: Vec<ReceivedPacket>| RemoteTrackRecord {
            track_id: "t".into(),
            stream_id: "s".into(),
            kind: RtpCodecKind::Video,
            ssrcs: vec![1],
            mime_type: None,
            opened_at: Instant::now(),
            packets,
            malformed: Vec::new(),
            ended: false,
        };
        let all = record((0..5).map(|c| packet(9, c)).collect());
        assert_eq!(all.check_exact(9, 0..5), Ok(()));
        assert!(all.check_exact(9, 0..6).is_err(), "one missing at the end");
        assert!(all.check_exact(8, 0..5).is_err(), "wrong sender");
        let gap = record([0, 1, 3, 4].map(|c| packet(9, c)).to_vec());
        assert!(gap
            .check_exact(9, 0..5)
            .unwrap_err()
            .contains("missing 1 [2]"));
        let swapped = record([0, 2, 1, 3, 4].map(|c| packet(9, c)).to_vec());
        assert!(swapped.check_exact(9, 0..5).is_err(), "reordered");
        let foreign = record(
            [0, 1, 2, 3, 4]
                .map(|c| packet(if c == 2 { 8 } else { 9 }, c))
                .to_vec(),
        );
        assert!(foreign.check_exact(9, 0..5).is_err(), "foreign packet");
    }
}
