//! A webrtc-rs participant for media tests.
//!
//! [`RtcPeer`] is one conference member as a real WebRTC endpoint speaking
//! protocol version 2 (docs/protocol.md). It holds up to two webrtc-rs
//! `PeerConnection`s, each a [`Leg`]:
//!
//! * the **server leg**, built in [`RtcPeer::new`] and kept for the whole stay.
//!   The server (`sfu`) makes every offer on it; the local tracks are added
//!   before the first offer is applied, so they take its first audio and video
//!   sections (the publish slots). Incoming tracks are mapped to members by
//!   their msid stream id, which the server sets to the member's participant id.
//! * the **direct leg**, built when a `mode` names a peer, with the
//!   polite/impolite roles the server assigns (perfect negotiation), and closed
//!   when the room goes to `sfu` or the peer goes away.
//!
//! [`RtcPeer::start_signaling`] drives both legs through the protocol and follows
//! the room's mode:
//!
//! | mode | writes on the direct leg | writes on the server leg | renders | reports |
//! |---|---|---|---|---|
//! | `p2p` | yes | no (warm, silent) | direct | — |
//! | `to_sfu` | yes, while it exists | yes | direct until the server path decodes | `media_ready` once every other member decodes via the server |
//! | `sfu` | closed | yes | server | — |
//! | `to_p2p` | yes, once built | yes | server until the direct path decodes | `media_ready` once the peer decodes directly |
//!
//! The direct leg keeps carrying media during `to_sfu` and `to_p2p`: the peer
//! renders it until the other path decodes (make-before-break). For this
//! client "decodes" means: at least one packet of that member arrived on that
//! path since the mode was announced.
//!
//! ## Rendering
//!
//! Every remote stream (one per sending track, identified by the tag in its
//! payloads) has a render path. A receiver renders packets from that path
//! only; when the mode moves a stream to the other path, the new path is
//! spliced in at the first counter it delivers, and the old path stays
//! rendered until it has delivered the counter just before. The rendered
//! counters of a stream must therefore be gapless across switches
//! ([`StreamView::check_continuous`]); a gap means a path was dropped before the
//! next one delivered.
//!
//! ## Payload layout
//!
//! Every packet written by the sender (see [`RtcPeer::start_streaming`]):
//!
//! ```text
//! [codec prefix][b"CFB1"][tag: u32 BE][counter: u32 BE][pattern ...]
//! ```
//!
//! * codec prefix: for VP8, a payload descriptor plus either a key-frame header
//!   (every packet with [`KeyframePolicy::Always`]) or an inter-frame header;
//!   a forwarder that parses VP8 starts a stream on a key frame. Empty for Opus.
//! * tag: identifies the sending track, the same on both legs, so a receiver can
//!   attribute streams and follow one stream across paths.
//! * counter: 0, 1, 2, ... per track, one sequence for both legs (a packet sent
//!   on both legs carries the same counter on each).
//! * pattern: `pattern_byte(tag, counter, i)` for the i-th byte, which catches
//!   truncation, corruption and packets of one stream showing up in another.
//!
//! Each leg has its own SSRC and RTP sequence numbers per track, as a browser's
//! two senders would; the RTP timestamp follows the counter.
//!
//! ## Network notes (webrtc 0.21.1)
//! * Each connection binds one UDP socket on `127.0.0.1:0`; a concrete bind
//!   address becomes the host candidate as is (wildcard binds skip loopback
//!   interfaces, which would leave a loopback-only namespace with nothing).
//! * mDNS is disabled: it would bind the multicast port 5353, and `.local`
//!   candidates are useless here.
//! * A remote track only surfaces (`on_track`) when its first RTP packet
//!   arrives, and `write_rtp` on a bound track returns `Ok` even when the core
//!   drops the packet because DTLS/SRTP is not up yet.
//! * Inbound RTCP ends in the interceptor chain unless an interceptor marks it
//!   for the application: [`KeyframeRequestTap`] marks PLI and FIR, which then
//!   surface on the sending track (`TrackLocal::poll`) and are recorded as
//!   [`KeyframeRequest`]s.
//! * Time to `Connected` on loopback is quantised by the 200 ms ICE check
//!   interval: about 200-450 ms. When one side's connectivity check arrives
//!   before its trickled candidate, the other side learns that address as
//!   peer-reflexive and nominates it only after the 1 s prflx acceptance wait
//!   (about 1.25 s in all). Both are defaults of the ICE agent, kept here so
//!   the clients behave like ordinary webrtc-rs clients.
//! * `PeerConnection::close` is the only way to stop a connection's driver on
//!   the tokio runtime (dropping it leaves the driver running).

#![allow(dead_code)] // a toolbox shared by several test modules; each uses a subset

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{Attribute, Interceptor, Packet, Slot, StreamInfo, TaggedPacket};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    register_default_interceptors, MediaEngine, PeerConnection, PeerConnectionBuilder,
    PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceCandidateInit,
    RTCIceConnectionState, RTCIceGatheringState, RTCIceServer, RTCIceTransportPolicy,
    RTCPeerConnectionIceEvent, RTCPeerConnectionState, RTCSessionDescription, Registry,
    SettingEngineBuilder,
};

use crate::common::{WsReceiver, WsSender};

/// Payload type the test media engine registers for VP8.
pub(crate) const VIDEO_PAYLOAD_TYPE: u8 = 96;
/// Payload type the test media engine registers for Opus.
pub(crate) const AUDIO_PAYLOAD_TYPE: u8 = 111;
/// The reserved participant id of the server's end of the server leg.
pub(crate) const SFU: &str = "sfu";

const MAGIC: [u8; 4] = *b"CFB1";
const HEADER_LEN: usize = 12; // magic + tag + counter

/// VP8 payload descriptor (S=1, partition 0) followed by a key-frame header
/// (P=0, show_frame=1, start code 9d 01 2a, 320x180).
const VP8_KEYFRAME_PREFIX: [u8; 11] = [
    0x10, 0x10, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xb4, 0x00,
];
/// VP8 payload descriptor (S=1, partition 0) followed by an inter-frame header
/// (P=1, show_frame=1) and compressed-looking bytes: no start code.
const VP8_DELTA_PREFIX: [u8; 11] = [
    0x10, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

// ---------------------------------------------------------------------------
// Payload format
// ---------------------------------------------------------------------------

fn codec_prefix(kind: RtpCodecKind, keyframe: bool) -> &'static [u8] {
    match kind {
        RtpCodecKind::Video if keyframe => &VP8_KEYFRAME_PREFIX,
        RtpCodecKind::Video => &VP8_DELTA_PREFIX,
        _ => &[],
    }
}

/// Smallest payload a track of this kind writes.
pub(crate) fn min_payload_len(kind: RtpCodecKind) -> usize {
    codec_prefix(kind, true).len() + HEADER_LEN
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
/// `keyframe` only matters for video.
pub(crate) fn encode_payload(
    kind: RtpCodecKind,
    keyframe: bool,
    tag: u32,
    counter: u32,
    len: usize,
) -> Bytes {
    let prefix = codec_prefix(kind, keyframe);
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

/// What [`decode_payload`] read from a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decoded {
    /// Sender tag.
    pub(crate) tag: u32,
    /// Packet counter.
    pub(crate) counter: u32,
    /// Carried a VP8 key-frame header (always false for audio).
    pub(crate) keyframe: bool,
}

/// Checks a payload built by [`encode_payload`].
pub(crate) fn decode_payload(kind: RtpCodecKind, payload: &[u8]) -> Result<Decoded, String> {
    let keyframe = kind == RtpCodecKind::Video && payload.starts_with(&VP8_KEYFRAME_PREFIX);
    let prefix = codec_prefix(kind, keyframe);
    if payload.len() < prefix.len() + HEADER_LEN {
        return Err(format!("payload of {} bytes is too short", payload.len()));
    }
    if &payload[..prefix.len()] != prefix {
        return Err(format!(
            "codec prefix {:02x?} is neither a key-frame nor an inter-frame prefix",
            &payload[..prefix.len()]
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
    Ok(Decoded {
        tag,
        counter,
        keyframe,
    })
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// Which video packets carry a key-frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyframePolicy {
    /// Every packet: a forwarder can start a stream anywhere.
    Always,
    /// The first packet on each leg, and the next packet after each PLI/FIR
    /// received on any leg, as a real encoder does.
    OnRequest,
}

/// What an [`RtcPeer`] sends and how it connects.
#[derive(Clone, Debug)]
pub(crate) struct PeerConfig {
    /// Display name, also used in track ids and log lines.
    pub(crate) name: String,
    /// Send a VP8 video track.
    pub(crate) video: bool,
    /// Send an Opus audio track.
    pub(crate) audio: bool,
    /// ICE servers; empty means host candidates only.
    pub(crate) ice_servers: Vec<RTCIceServer>,
    /// Address each connection's UDP socket binds (port 0 = ephemeral).
    pub(crate) bind: SocketAddr,
    /// When video packets are key frames.
    pub(crate) keyframes: KeyframePolicy,
    /// Applied to every offer from `sfu` before it is used (the log keeps
    /// the original): a test can point the server's candidates elsewhere,
    /// e.g. at an impairment proxy.
    pub(crate) server_offer_rewrite: Option<SdpRewrite>,
    /// Gather and use relay candidates only (`iceTransportPolicy: relay`).
    pub(crate) relay_only: bool,
}

/// A rewrite of an SDP (see [`PeerConfig::server_offer_rewrite`]).
#[derive(Clone)]
pub(crate) struct SdpRewrite(pub(crate) Arc<dyn Fn(&str) -> String + Send + Sync>);

impl std::fmt::Debug for SdpRewrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SdpRewrite(..)")
    }
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
            keyframes: KeyframePolicy::Always,
            server_offer_rewrite: None,
            relay_only: false,
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

    /// Use the TURN servers of `ice_servers` (e.g. from
    /// [`ice_servers_from_joined`]) and nothing but relay candidates.
    pub(crate) fn relay_only(mut self, ice_servers: Vec<RTCIceServer>) -> PeerConfig {
        self.ice_servers = ice_servers;
        self.relay_only = true;
        self
    }

    /// Key frames only at the start and on request.
    pub(crate) fn keyframes_on_request(mut self) -> PeerConfig {
        self.keyframes = KeyframePolicy::OnRequest;
        self
    }

    /// Reach the server's media socket at `via` instead: every offer from
    /// `sfu` gets its host candidates for `server` rewritten to `via`.
    pub(crate) fn server_media_via(mut self, server: SocketAddr, via: SocketAddr) -> PeerConfig {
        let from = format!(" {} {} typ host", server.ip(), server.port());
        let to = format!(" {} {} typ host", via.ip(), via.port());
        self.server_offer_rewrite = Some(SdpRewrite(Arc::new(move |sdp: &str| {
            sdp.replace(&from, &to)
        })));
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
// Keyframe requests
// ---------------------------------------------------------------------------

/// Marks inbound PLI and FIR for the application (they then surface on the
/// sending track) and drops the rest of the inbound RTCP, which the
/// interceptors before it have already acted on. Registered last in the chain.
#[derive(Default)]
struct KeyframeRequestTap {
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

fn is_keyframe_request(packet: &dyn rtc::rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            let requests: Vec<Box<dyn rtc::rtcp::Packet>> = packets
                .iter()
                .filter(|p| is_keyframe_request(p.as_ref()))
                .cloned()
                .collect();
            if requests.is_empty() {
                return Ok(());
            }
            msg.message.packet = Packet::Rtcp(requests);
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for KeyframeRequestTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// A PLI or FIR that arrived for one of our sending tracks.
#[derive(Clone, Debug)]
pub(crate) struct KeyframeRequest {
    /// Arrival time at the application.
    pub(crate) at: Instant,
    /// The leg it arrived on.
    pub(crate) path: Path,
    /// Id of that leg.
    pub(crate) leg: u64,
    /// Kind of the track it arrived on.
    pub(crate) kind: RtpCodecKind,
    /// Our SSRC of that track on that leg.
    pub(crate) track_ssrc: u32,
    /// The media SSRC the request names.
    pub(crate) media_ssrc: u32,
    /// FIR rather than PLI.
    pub(crate) fir: bool,
}

// ---------------------------------------------------------------------------
// Local sources and their per-leg tracks
// ---------------------------------------------------------------------------

/// One packet as the sender wrote it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SentRecord {
    /// Payload counter.
    pub(crate) counter: u32,
    /// When it was written.
    pub(crate) at: Instant,
    /// Written on the server leg (`write_rtp` returned `Ok`).
    pub(crate) server: bool,
    /// Written on the direct leg.
    pub(crate) direct: bool,
}

struct SourceState {
    counter: u32,
    timestamp: u32,
}

/// One media source (camera or microphone): the tag and the counter sequence
/// shared by its tracks on both legs.
pub(crate) struct LocalSource {
    /// Audio or video.
    pub(crate) kind: RtpCodecKind,
    /// Payload type written in every packet.
    pub(crate) payload_type: u8,
    /// RTP clock rate of the codec.
    pub(crate) clock_rate: u32,
    /// Written into every payload; identifies this source at the receivers.
    pub(crate) tag: u32,
    /// Track id announced in the SDP (`a=msid`), the same on both legs.
    pub(crate) track_id: String,
    /// Stream id announced in the SDP (`a=msid`).
    pub(crate) stream_id: String,
    codec: RTCRtpCodec,
    keyframes: KeyframePolicy,
    keyframe_requested: AtomicBool,
    /// RFC 6464 level (-dBov, 0-127) written in each audio packet's header
    /// extension; [`NO_AUDIO_LEVEL`] writes none.
    audio_level: std::sync::atomic::AtomicU8,
    state: Mutex<SourceState>,
    sent: Mutex<Vec<SentRecord>>,
}

/// [`LocalSource::set_audio_level`] value that sends no level.
pub(crate) const NO_AUDIO_LEVEL: u8 = u8::MAX;

impl LocalSource {
    fn new(name: &str, kind: RtpCodecKind, keyframes: KeyframePolicy) -> LocalSource {
        let (codec, payload_type, clock_rate, kind_name) = match kind {
            RtpCodecKind::Video => (vp8_codec(), VIDEO_PAYLOAD_TYPE, 90_000, "video"),
            _ => (opus_codec(), AUDIO_PAYLOAD_TYPE, 48_000, "audio"),
        };
        LocalSource {
            kind,
            payload_type,
            clock_rate,
            tag: rand::random::<u32>(),
            track_id: format!("{name}-{kind_name}"),
            stream_id: format!("{name}-stream"),
            codec,
            keyframes,
            keyframe_requested: AtomicBool::new(false),
            audio_level: std::sync::atomic::AtomicU8::new(NO_AUDIO_LEVEL),
            state: Mutex::new(SourceState {
                counter: 0,
                timestamp: rand::random::<u32>(),
            }),
            sent: Mutex::new(Vec::new()),
        }
    }

    /// From now on, audio packets carry this level (RFC 6464: -dBov,
    /// 0 loudest, 127 silence), or none with [`NO_AUDIO_LEVEL`].
    pub(crate) fn set_audio_level(&self, level: u8) {
        self.audio_level.store(level, Ordering::Relaxed);
    }

    /// Counter the next packet will carry.
    pub(crate) fn next_counter(&self) -> u32 {
        self.state.lock().unwrap().counter
    }

    /// Every packet written so far, in order.
    pub(crate) fn sent(&self) -> Vec<SentRecord> {
        self.sent.lock().unwrap().clone()
    }

    /// Takes the next counter and its timestamp.
    fn advance(&self, ticks: u32) -> (u32, u32) {
        let mut state = self.state.lock().unwrap();
        let out = (state.counter, state.timestamp);
        state.counter += 1;
        state.timestamp = state.timestamp.wrapping_add(ticks);
        out
    }
}

/// A source's track on one leg: its own SSRC and sequence numbers.
pub(crate) struct LegTrack {
    /// The source it carries.
    pub(crate) source: Arc<LocalSource>,
    /// SSRC announced on this leg and written in every packet.
    pub(crate) ssrc: u32,
    track: Arc<TrackLocalStaticRTP>,
    sequence: Mutex<u16>,
    /// The next packet on this leg is a key frame regardless of policy.
    first: AtomicBool,
    written: AtomicU64,
}

impl LegTrack {
    fn new(source: Arc<LocalSource>) -> LegTrack {
        let ssrc = rand::random::<u32>();
        let kind_name = if source.kind == RtpCodecKind::Video {
            "video"
        } else {
            "audio"
        };
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            source.stream_id.clone(),
            source.track_id.clone(),
            format!("{} {kind_name}", source.stream_id),
            source.kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: source.codec.clone(),
                ..Default::default()
            }],
        )));
        LegTrack {
            source,
            ssrc,
            track,
            sequence: Mutex::new(rand::random::<u16>()),
            first: AtomicBool::new(true),
            written: AtomicU64::new(0),
        }
    }

    /// Writes one packet carrying `payload` as is (not a numbered packet:
    /// receivers record it as malformed), next in this leg's sequence.
    pub(crate) async fn write_raw(&self, payload: &[u8]) -> Result<(), String> {
        self.write_packet(true, 0, Bytes::copy_from_slice(payload), &[])
            .await
            .map_err(|e| format!("{} raw write_rtp: {e}", self.source.track_id))
    }

    /// Writes `payload` with the source's payload type and this leg's SSRC,
    /// next in this leg's sequence, with header `extensions` (those the
    /// leg negotiated).
    async fn write_packet(
        &self,
        marker: bool,
        timestamp: u32,
        payload: Bytes,
        extensions: &[rtp::extension::HeaderExtension],
    ) -> Result<(), webrtc::error::Error> {
        let sequence_number = {
            let mut seq = self.sequence.lock().unwrap();
            let out = *seq;
            *seq = seq.wrapping_add(1);
            out
        };
        let packet = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                marker,
                payload_type: self.source.payload_type,
                sequence_number,
                timestamp,
                ssrc: self.ssrc,
                ..Default::default()
            },
            payload,
        };
        if extensions.is_empty() {
            self.track.write_rtp(packet).await.map(|_| ())
        } else {
            self.track
                .write_rtp_with_extensions(packet, extensions)
                .await
        }
    }

    /// Packets written on this leg (`write_rtp` returned `Ok`).
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    async fn write(
        &self,
        counter: u32,
        timestamp: u32,
        requested: bool,
        len: usize,
    ) -> Result<(), String> {
        let source = &self.source;
        let keyframe = source.keyframes == KeyframePolicy::Always
            || self.first.swap(false, Ordering::Relaxed)
            || requested;
        // One packet per frame: every video packet ends its frame.
        let marker = source.kind == RtpCodecKind::Video;
        let payload = encode_payload(source.kind, keyframe, source.tag, counter, len);
        let level = source.audio_level.load(Ordering::Relaxed);
        let extensions: &[rtp::extension::HeaderExtension] =
            if source.kind == RtpCodecKind::Audio && level != NO_AUDIO_LEVEL {
                &[rtp::extension::HeaderExtension::AudioLevel(
                    rtp::extension::audio_level_extension::AudioLevelExtension {
                        level: level & 0x7f,
                        voice: level < 127,
                    },
                )]
            } else {
                &[]
            };
        self.write_packet(marker, timestamp, payload, extensions)
            .await
            .map_err(|e| format!("{} write_rtp of counter {counter}: {e}", source.track_id))?;
        self.written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Outcome of sending on one source ([`RtcPeer::send_numbered`],
/// [`Streamer::stop`]).
#[derive(Clone, Debug)]
pub(crate) struct SendReport {
    /// Tag of the source.
    pub(crate) tag: u32,
    /// Counter of the first packet.
    pub(crate) first_counter: u32,
    /// Packets produced (counters used).
    pub(crate) count: u32,
    /// Of those, written on the server leg.
    pub(crate) on_server: u32,
    /// Of those, written on a direct leg.
    pub(crate) on_direct: u32,
    /// `write_rtp` errors, described (at most 20 kept).
    pub(crate) errors: Vec<String>,
    /// When the first packet was written.
    pub(crate) started: Instant,
    /// Time from the first to the last write.
    pub(crate) elapsed: Duration,
}

impl SendReport {
    /// The counters produced.
    pub(crate) fn counters(&self) -> Range<u32> {
        self.first_counter..self.first_counter + self.count
    }

    /// Counter after the last one produced.
    pub(crate) fn end(&self) -> u32 {
        self.first_counter + self.count
    }
}

// ---------------------------------------------------------------------------
// Remote tracks and rendering
// ---------------------------------------------------------------------------

/// Which of a participant's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Path {
    /// The direct (peer-to-peer) leg.
    Direct,
    /// The server leg.
    Server,
}

/// One packet received on a remote track.
#[derive(Clone, Debug)]
pub(crate) struct ReceivedPacket {
    /// Counter from the payload.
    pub(crate) counter: u32,
    /// Sender tag from the payload.
    pub(crate) tag: u32,
    /// The payload had a VP8 key-frame header.
    pub(crate) keyframe: bool,
    /// RTP sequence number as received.
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

/// Everything received on one remote track of one leg.
#[derive(Clone, Debug)]
pub(crate) struct RemoteTrackRecord {
    /// The leg's path.
    pub(crate) path: Path,
    /// The leg's id (a new direct leg gets a new id).
    pub(crate) leg: u64,
    /// The member it belongs to: the stream id on the server leg, the peer on
    /// a direct leg.
    pub(crate) member: Option<String>,
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
        self.check_clean(tag)?;
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

    /// Nothing malformed, only `tag`, counters strictly increasing (no
    /// duplicates, no reordering) and consecutive: whatever the path
    /// delivered, it delivered from its first packet on without loss.
    pub(crate) fn check_clean(&self, tag: u32) -> Result<(), String> {
        if !self.malformed.is_empty() {
            return Err(format!(
                "{} ({:?}): {} malformed payloads, first: {}",
                self.track_id,
                self.path,
                self.malformed.len(),
                self.malformed[0]
            ));
        }
        if let Some(p) = self.packets.iter().find(|p| p.tag != tag) {
            return Err(format!(
                "{} ({:?}): packet with tag {:#010x} (counter {}) on a track expected to carry {tag:#010x}",
                self.track_id, self.path, p.tag, p.counter
            ));
        }
        let got = self.counters();
        if let Some(w) = got.windows(2).find(|w| w[1] <= w[0]) {
            return Err(format!(
                "{} ({:?}): counter {} after {}: reordered or duplicated",
                self.track_id, self.path, w[1], w[0]
            ));
        }
        Ok(())
    }

    /// Runs of missing counters between the first and the last packet.
    pub(crate) fn holes(&self) -> Vec<Range<u32>> {
        self.packets
            .windows(2)
            .filter(|w| w[1].counter > w[0].counter + 1)
            .map(|w| w[0].counter + 1..w[1].counter)
            .collect()
    }
}

/// What one path delivered of one remote stream.
#[derive(Clone, Debug, Default)]
pub(crate) struct PathStats {
    /// Packets received.
    pub(crate) packets: usize,
    /// First packet: counter and arrival.
    pub(crate) first: Option<(u32, Instant)>,
    /// Latest packet: counter and arrival.
    pub(crate) last: Option<(u32, Instant)>,
    /// Packets whose counter was not above the previous one on this path.
    pub(crate) reordered: usize,
}

impl PathStats {
    fn on_packet(&mut self, counter: u32, at: Instant) {
        if self.last.is_some_and(|(c, _)| counter <= c) {
            self.reordered += 1;
        }
        self.packets += 1;
        self.first.get_or_insert((counter, at));
        self.last = Some((counter, at));
    }
}

/// One rendered packet.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rendered {
    /// Its counter.
    pub(crate) counter: u32,
    /// The path it came from.
    pub(crate) path: Path,
    /// When it arrived.
    pub(crate) at: Instant,
}

/// A change of render path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RenderSwitch {
    /// The path rendered before.
    pub(crate) from: Path,
    /// The path rendered after.
    pub(crate) to: Path,
    /// When.
    pub(crate) at: Instant,
    /// First counter expected from the new path.
    pub(crate) next_counter: Option<u32>,
    /// Forced: the old path went away before the new one caught up.
    pub(crate) forced: bool,
}

/// A discontinuity in what was rendered: counters `missing` never shown.
#[derive(Clone, Debug)]
pub(crate) struct Gap {
    /// Counters skipped.
    pub(crate) missing: Range<u32>,
    /// The path that delivered the packet after the gap.
    pub(crate) path: Path,
    /// When that packet arrived.
    pub(crate) at: Instant,
}

/// One remote stream as this participant renders it (see the module docs).
#[derive(Clone, Debug)]
pub(crate) struct StreamView {
    /// Sender tag.
    pub(crate) tag: u32,
    /// Audio or video.
    pub(crate) kind: RtpCodecKind,
    /// The member it belongs to (participant id), if known.
    pub(crate) member: Option<String>,
    /// The path rendered now (`None` before the first rendered packet).
    pub(crate) render: Option<Path>,
    /// The path the mode wants rendered.
    pub(crate) target: Path,
    /// Every rendered packet, in order.
    pub(crate) rendered: Vec<Rendered>,
    /// Discontinuities among the rendered counters.
    pub(crate) gaps: Vec<Gap>,
    /// Packets not rendered because a later counter had been rendered
    /// already (the lagging path after a splice).
    pub(crate) late: usize,
    /// Render path changes.
    pub(crate) switches: Vec<RenderSwitch>,
    /// What the direct path delivered.
    pub(crate) direct: PathStats,
    /// What the server path delivered.
    pub(crate) server: PathStats,
    splice_at: Option<u32>,
    pending: Vec<(u32, Instant)>,
}

impl StreamView {
    fn new(tag: u32, kind: RtpCodecKind, member: Option<String>, target: Path) -> StreamView {
        StreamView {
            tag,
            kind,
            member,
            render: None,
            target,
            rendered: Vec::new(),
            gaps: Vec::new(),
            late: 0,
            switches: Vec::new(),
            direct: PathStats::default(),
            server: PathStats::default(),
            splice_at: None,
            pending: Vec::new(),
        }
    }

    /// What `path` delivered.
    pub(crate) fn stats(&self, path: Path) -> &PathStats {
        match path {
            Path::Direct => &self.direct,
            Path::Server => &self.server,
        }
    }

    /// Last rendered counter.
    pub(crate) fn last_rendered(&self) -> Option<u32> {
        self.rendered.last().map(|r| r.counter)
    }

    /// First rendered counter.
    pub(crate) fn first_rendered(&self) -> Option<u32> {
        self.rendered.first().map(|r| r.counter)
    }

    /// Rendered packets that came from `path`.
    pub(crate) fn rendered_from(&self, path: Path) -> usize {
        self.rendered.iter().filter(|r| r.path == path).count()
    }

    /// The rendered counters are gapless from the first one on, the first is
    /// at or before `window.start`, and the last is `window.end - 1`: every
    /// counter of `window` was shown, once, in order.
    pub(crate) fn check_continuous(&self, window: Range<u32>) -> Result<(), String> {
        if let Some(gap) = self.gaps.first() {
            return Err(format!(
                "stream {:#010x} of {:?}: {} gap(s) in what was rendered, first: counters {:?} \
                 missing before a packet from the {:?} path; switches {:?}",
                self.tag,
                self.member,
                self.gaps.len(),
                gap.missing,
                gap.path,
                self.switches
                    .iter()
                    .map(|s| (s.from, s.to, s.next_counter, s.forced))
                    .collect::<Vec<_>>()
            ));
        }
        let (Some(first), Some(last)) = (self.first_rendered(), self.last_rendered()) else {
            return Err(format!(
                "stream {:#010x} of {:?}: nothing rendered",
                self.tag, self.member
            ));
        };
        if first > window.start || last + 1 != window.end {
            return Err(format!(
                "stream {:#010x} of {:?}: rendered counters {first}..={last}, expected to cover \
                 {window:?}; direct path {:?}, server path {:?}",
                self.tag, self.member, self.direct, self.server
            ));
        }
        Ok(())
    }

    fn stats_mut(&mut self, path: Path) -> &mut PathStats {
        match path {
            Path::Direct => &mut self.direct,
            Path::Server => &mut self.server,
        }
    }

    fn on_packet(&mut self, path: Path, counter: u32, at: Instant) {
        self.stats_mut(path).on_packet(counter, at);
        let Some(render) = self.render else {
            if path == self.target {
                self.render = Some(path);
                self.emit(counter, path, at);
            }
            return;
        };
        if path == render {
            if render != self.target {
                if let Some(splice) = self.splice_at {
                    if counter < splice {
                        self.emit(counter, path, at);
                        if counter + 1 >= splice {
                            self.switch(at, false);
                        }
                    } else {
                        // The old path caught up with the new one: the new
                        // path's packets from `splice` on are pending.
                        self.switch(at, false);
                    }
                    return;
                }
            }
            self.emit(counter, path, at);
        } else if path == self.target {
            self.pending.push((counter, at));
            if self.splice_at.is_none() {
                self.splice_at = Some(counter);
                let behind_or_level = self
                    .rendered
                    .last()
                    .is_none_or(|r| counter <= r.counter + 1);
                if behind_or_level {
                    self.switch(at, false);
                }
            }
        }
    }

    fn switch(&mut self, at: Instant, forced: bool) {
        let Some(from) = self.render else {
            return;
        };
        let to = self.target;
        if from == to {
            return;
        }
        self.render = Some(to);
        self.switches.push(RenderSwitch {
            from,
            to,
            at,
            next_counter: self.last_rendered().map(|c| c + 1),
            forced,
        });
        self.splice_at = None;
        for (counter, at) in std::mem::take(&mut self.pending) {
            self.emit(counter, to, at);
        }
    }

    fn emit(&mut self, counter: u32, path: Path, at: Instant) {
        if let Some(last) = self.last_rendered() {
            if counter <= last {
                self.late += 1;
                return;
            }
            if counter > last + 1 {
                self.gaps.push(Gap {
                    missing: last + 1..counter,
                    path,
                    at,
                });
            }
        }
        self.rendered.push(Rendered { counter, path, at });
    }

    fn set_target(&mut self, target: Path) {
        if self.target != target {
            self.target = target;
            self.splice_at = None;
            self.pending.clear();
        }
    }
}

#[derive(Default)]
struct InboxState {
    tracks: Vec<RemoteTrackRecord>,
    streams: BTreeMap<u32, StreamView>,
    /// The member whose streams the mode wants rendered from the direct leg.
    direct_member: Option<String>,
    /// A `media_ready` report is pending: poke the driver on packets.
    watch_ready: bool,
}

impl InboxState {
    fn target_for(&self, member: Option<&str>) -> Path {
        match (member, self.direct_member.as_deref()) {
            (Some(m), Some(d)) if m == d => Path::Direct,
            _ => Path::Server,
        }
    }

    fn set_direct_member(&mut self, member: Option<String>) {
        self.direct_member = member;
        let targets: Vec<(u32, Path)> = self
            .streams
            .values()
            .map(|s| (s.tag, self.target_for(s.member.as_deref())))
            .collect();
        for (tag, target) in targets {
            if let Some(s) = self.streams.get_mut(&tag) {
                s.set_target(target);
            }
        }
    }

    /// The direct leg is gone: streams still rendered from it move to their
    /// target now, with whatever the target path has delivered.
    fn direct_closed(&mut self, at: Instant) {
        for s in self.streams.values_mut() {
            if s.render == Some(Path::Direct) && s.target != Path::Direct {
                s.switch(at, true);
            }
        }
    }

    /// Whether `member` decodes via `path`: at least one of its packets
    /// arrived on that path at or after `since`.
    fn decodes(&self, member: &str, path: Path, since: Instant) -> bool {
        self.streams.values().any(|s| {
            s.member.as_deref() == Some(member)
                && s.stats(path).last.is_some_and(|(_, at)| at >= since)
        })
    }

    fn on_rtp(&mut self, index: usize, packet: &rtp::Packet, at: Instant) {
        let record = &mut self.tracks[index];
        match decode_payload(record.kind, &packet.payload) {
            Ok(d) => {
                record.packets.push(ReceivedPacket {
                    counter: d.counter,
                    tag: d.tag,
                    keyframe: d.keyframe,
                    sequence_number: packet.header.sequence_number,
                    timestamp: packet.header.timestamp,
                    ssrc: packet.header.ssrc,
                    payload_type: packet.header.payload_type,
                    payload_len: packet.payload.len(),
                    at,
                });
                let (path, kind, member) = (record.path, record.kind, record.member.clone());
                if !self.streams.contains_key(&d.tag) {
                    let target = self.target_for(member.as_deref());
                    self.streams
                        .insert(d.tag, StreamView::new(d.tag, kind, member.clone(), target));
                }
                let stream = self.streams.get_mut(&d.tag).unwrap();
                if stream.member.is_none() {
                    stream.member = member;
                }
                stream.on_packet(path, d.counter, at);
            }
            Err(e) => record.malformed.push(format!(
                "seq {} ({} bytes): {e}",
                packet.header.sequence_number,
                packet.payload.len()
            )),
        }
    }
}

/// Everything received, on every leg.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    /// Any change (tests wait on it).
    changed: Notify,
    /// A packet arrived while a `media_ready` report is pending (the
    /// signaling driver waits on it; `notify_one` keeps a permit).
    ready_poke: Notify,
}

impl Inbox {
    /// Waits until `done` holds for the streams, or `timeout` passes.
    async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&InboxState) -> Option<T>,
    ) -> Result<T, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = self.state.lock().unwrap();
                if let Some(out) = done(&state) {
                    return Ok(out);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let state = self.state.lock().unwrap();
                return done(&state).ok_or_else(|| describe_streams(&state));
            }
        }
    }
}

fn describe_streams(state: &InboxState) -> String {
    if state.streams.is_empty() {
        return "no remote streams".to_owned();
    }
    state
        .streams
        .values()
        .map(|s| {
            format!(
                "{:#010x} of {:?} ({}): render {:?} target {:?}, rendered {} (last {:?}), \
                 direct {} pkts, server {} pkts, {} gaps, {} late",
                s.tag,
                s.member,
                s.kind,
                s.render,
                s.target,
                s.rendered.len(),
                s.last_rendered(),
                s.direct.packets,
                s.server.packets,
                s.gaps.len(),
                s.late
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

async fn read_remote_track(track: Arc<dyn TrackRemote>, index: usize, inbox: Arc<Inbox>) {
    while let Some(event) = track.poll().await {
        match event {
            TrackRemoteEvent::OnRtpPacket(packet) => {
                let at = Instant::now();
                let poke = {
                    let mut state = inbox.state.lock().unwrap();
                    state.on_rtp(index, &packet, at);
                    state.watch_ready
                };
                if poke {
                    inbox.ready_poke.notify_one();
                }
                inbox.changed.notify_waiters();
            }
            TrackRemoteEvent::OnEnded => break,
            _ => {}
        }
    }
    inbox.state.lock().unwrap().tracks[index].ended = true;
    inbox.changed.notify_waiters();
}

// ---------------------------------------------------------------------------
// Legs
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
    leg: u64,
    path: Path,
    peer: Option<String>,
    label: String,
    state_tx: watch::Sender<RTCPeerConnectionState>,
    connected_at: Arc<Mutex<Option<Instant>>>,
    state_log: Arc<Mutex<Vec<(Instant, RTCPeerConnectionState)>>>,
    ice_tx: mpsc::UnboundedSender<(u64, LocalIce)>,
    inbox: Arc<Inbox>,
    timeline: Timeline,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        match event.candidate.to_json() {
            Ok(init) => {
                note(
                    &self.timeline,
                    format!("{} local candidate {}", self.label, init.candidate),
                );
                let _ = self.ice_tx.send((self.leg, LocalIce::Candidate(init)));
            }
            Err(e) => eprintln!("{} cannot serialise local candidate: {e}", self.label),
        }
    }

    async fn on_ice_connection_state_change(&self, state: RTCIceConnectionState) {
        note(&self.timeline, format!("{} ICE {state}", self.label));
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        note(&self.timeline, format!("{} gathering {state}", self.label));
        if state == RTCIceGatheringState::Complete {
            let _ = self.ice_tx.send((self.leg, LocalIce::GatheringComplete));
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        note(&self.timeline, format!("{} connection {state}", self.label));
        self.state_log.lock().unwrap().push((Instant::now(), state));
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
        let stream_id = track.stream_id().await;
        let member = match self.path {
            Path::Server => Some(stream_id.clone()),
            Path::Direct => self.peer.clone(),
        };
        let record = RemoteTrackRecord {
            path: self.path,
            leg: self.leg,
            member,
            track_id: track.track_id().await,
            stream_id,
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
            format!(
                "{} remote track {} stream {} ({})",
                self.label, record.track_id, record.stream_id, record.kind
            ),
        );
        let index = {
            let mut state = self.inbox.state.lock().unwrap();
            state.tracks.push(record);
            state.tracks.len() - 1
        };
        self.inbox.changed.notify_waiters();
        // The handler runs on the connection's driver: read on a task of our own.
        tokio::spawn(read_remote_track(track, index, self.inbox.clone()));
    }
}

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

/// What a leg needs from its participant.
struct LegContext {
    name: String,
    config: PeerConfig,
    sources: Vec<Arc<LocalSource>>,
    inbox: Arc<Inbox>,
    keyframe_requests: Arc<Mutex<Vec<KeyframeRequest>>>,
    ice_tx: mpsc::UnboundedSender<(u64, LocalIce)>,
    timeline: Timeline,
}

/// One peer connection of a participant: the server leg or a direct leg.
pub(crate) struct Leg {
    /// Unique within the participant; a new direct leg gets a new id.
    pub(crate) id: u64,
    /// Server or direct.
    pub(crate) path: Path,
    /// The peer of a direct leg.
    pub(crate) peer: Option<String>,
    label: String,
    pc: Arc<dyn PeerConnection>,
    /// Our video track on this leg.
    pub(crate) video: Option<Arc<LegTrack>>,
    /// Our audio track on this leg.
    pub(crate) audio: Option<Arc<LegTrack>>,
    /// When the connection was built.
    pub(crate) created: Instant,
    state_rx: watch::Receiver<RTCPeerConnectionState>,
    connected_at: Arc<Mutex<Option<Instant>>>,
    state_log: Arc<Mutex<Vec<(Instant, RTCPeerConnectionState)>>>,
    closed: AtomicBool,
    local_ufrag: Mutex<Option<String>>,
    local_first_mid: Mutex<Option<String>>,
}

impl Leg {
    async fn build(
        ctx: &LegContext,
        id: u64,
        path: Path,
        peer: Option<String>,
    ) -> Result<Arc<Leg>, String> {
        let label = match (&path, &peer) {
            (Path::Server, _) => "[server]".to_owned(),
            (Path::Direct, Some(p)) => format!("[direct#{id} {p}]"),
            (Path::Direct, None) => format!("[direct#{id}]"),
        };
        let err =
            |what: &str, e: webrtc::error::Error| format!("[{}] {label} {what}: {e}", ctx.name);

        let mut media_engine = MediaEngine::default();
        let mut register = |rtp_codec, payload_type, kind, what| {
            let codec = RTCRtpCodecParameters {
                rtp_codec,
                payload_type,
            };
            media_engine
                .register_codec(codec, kind)
                .map_err(|e| err(what, e))
        };
        register(
            vp8_codec(),
            VIDEO_PAYLOAD_TYPE,
            RtpCodecKind::Video,
            "register VP8",
        )?;
        register(
            opus_codec(),
            AUDIO_PAYLOAD_TYPE,
            RtpCodecKind::Audio,
            "register Opus",
        )?;
        // Audio levels for the server's speaker detection (browsers send
        // them too).
        media_engine
            .register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: "urn:ietf:params:rtp-hdrext:ssrc-audio-level".to_owned(),
                },
                RtpCodecKind::Audio,
                None,
            )
            .map_err(|e| err("register the audio-level extension", e))?;
        let registry = register_default_interceptors(Registry::new(), &mut media_engine)
            .map_err(|e| err("register interceptors", e))?
            // Last in the chain, so every interceptor has seen the RTCP first.
            .with(Slot::from(14_000), KeyframeRequestTap::default());

        let setting_engine = SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            // Not consulted by webrtc 0.21.1 (the bind address alone decides the
            // host candidate); set for versions that filter loopback candidates.
            .with_include_loopback_candidate(true)
            .build();
        let mut configuration =
            RTCConfigurationBuilder::new().with_ice_servers(ctx.config.ice_servers.clone());
        if ctx.config.relay_only {
            configuration = configuration.with_ice_transport_policy(RTCIceTransportPolicy::Relay);
        }
        let configuration = configuration.build();

        let (state_tx, state_rx) = watch::channel(RTCPeerConnectionState::New);
        let connected_at = Arc::new(Mutex::new(None));
        let state_log = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Handler {
            leg: id,
            path,
            peer: peer.clone(),
            label: label.clone(),
            state_tx,
            connected_at: connected_at.clone(),
            state_log: state_log.clone(),
            ice_tx: ctx.ice_tx.clone(),
            inbox: ctx.inbox.clone(),
            timeline: ctx.timeline.clone(),
        });

        let created = Instant::now();
        let pc = PeerConnectionBuilder::new()
            .with_configuration(configuration)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .with_setting_engine(setting_engine)
            .with_handler(handler)
            .with_udp_addrs(vec![ctx.config.bind])
            .build()
            .await
            .map_err(|e| err("build peer connection", e))?;
        let pc: Arc<dyn PeerConnection> = Arc::new(pc);

        let mut video = None;
        let mut audio = None;
        for source in &ctx.sources {
            let track = Arc::new(LegTrack::new(source.clone()));
            pc.add_track(track.track.clone() as Arc<dyn TrackLocal>)
                .await
                .map_err(|e| err("add_track", e))?;
            tokio::spawn(read_local_rtcp(
                track.clone(),
                id,
                path,
                ctx.keyframe_requests.clone(),
                ctx.timeline.clone(),
                label.clone(),
            ));
            match source.kind {
                RtpCodecKind::Video => video = Some(track),
                _ => audio = Some(track),
            }
        }
        note(&ctx.timeline, format!("{label} built"));

        Ok(Arc::new(Leg {
            id,
            path,
            peer,
            label,
            pc,
            video,
            audio,
            created,
            state_rx,
            connected_at,
            state_log,
            closed: AtomicBool::new(false),
            local_ufrag: Mutex::new(None),
            local_first_mid: Mutex::new(None),
        }))
    }

    /// The underlying connection.
    pub(crate) fn pc(&self) -> &Arc<dyn PeerConnection> {
        &self.pc
    }

    /// Our track of `kind` on this leg.
    pub(crate) fn track(&self, kind: RtpCodecKind) -> Option<&Arc<LegTrack>> {
        match kind {
            RtpCodecKind::Video => self.video.as_ref(),
            _ => self.audio.as_ref(),
        }
    }

    /// Current connection state.
    pub(crate) fn state(&self) -> RTCPeerConnectionState {
        *self.state_rx.borrow()
    }

    /// Connection states with their times, in order.
    pub(crate) fn state_log(&self) -> Vec<(Instant, RTCPeerConnectionState)> {
        self.state_log.lock().unwrap().clone()
    }

    /// When the connection first reached `Connected`.
    pub(crate) fn connected_at(&self) -> Option<Instant> {
        *self.connected_at.lock().unwrap()
    }

    /// Closed by [`Leg::close`].
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
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
        let states = || {
            self.state_log()
                .iter()
                .map(|(at, s)| format!("{s} at +{:?}", at.duration_since(self.created)))
                .collect::<Vec<_>>()
        };
        match outcome {
            Ok(Ok(RTCPeerConnectionState::Connected)) => Ok(()),
            Ok(Ok(state)) => Err(format!(
                "{} connection went {state} (states: {:?})",
                self.label,
                states()
            )),
            Ok(Err(_)) => Err(format!("{} connection state channel closed", self.label)),
            Err(_) => Err(format!(
                "{} not connected after {timeout:?}; states so far: {:?}",
                self.label,
                states()
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
                None => return Err(format!("{} has no senders or receivers", self.label)),
            },
        }
        .map_err(|e| format!("{} transport(): {e}", self.label))?;
        let Some(dtls) = dtls else {
            return Ok(None);
        };
        let pair = dtls
            .ice_transport()
            .get_selected_candidate_pair()
            .await
            .map_err(|e| format!("{} get_selected_candidate_pair: {e}", self.label))?;
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

    /// Closes the connection (idempotent).
    pub(crate) async fn close(&self) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.pc.close().await {
            eprintln!("{} close: {e}", self.label);
        }
    }
}

async fn read_local_rtcp(
    track: Arc<LegTrack>,
    leg: u64,
    path: Path,
    requests: Arc<Mutex<Vec<KeyframeRequest>>>,
    timeline: Timeline,
    label: String,
) {
    while let Some(event) = track.track.poll().await {
        let TrackLocalEvent::OnRtcpPacket(packets) = event else {
            continue;
        };
        let at = Instant::now();
        for packet in &packets {
            let any = packet.as_any();
            let (media_ssrc, fir) = if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                (pli.media_ssrc, false)
            } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                (fir.fir.first().map_or(fir.media_ssrc, |e| e.ssrc), true)
            } else {
                continue;
            };
            track
                .source
                .keyframe_requested
                .store(true, Ordering::Relaxed);
            note(
                &timeline,
                format!(
                    "{label} {} for {media_ssrc:#010x} on our {} track {:#010x}",
                    if fir { "FIR" } else { "PLI" },
                    track.source.kind,
                    track.ssrc
                ),
            );
            requests.lock().unwrap().push(KeyframeRequest {
                at,
                path,
                leg,
                kind: track.source.kind,
                track_ssrc: track.ssrc,
                media_ssrc,
                fir,
            });
        }
    }
}

// ---------------------------------------------------------------------------
// The participant
// ---------------------------------------------------------------------------

/// The room's mode as this participant last heard it.
#[derive(Clone, Debug)]
pub(crate) struct ModeView {
    /// `p2p`, `to_sfu`, `sfu`, `to_p2p`, or empty before any.
    pub(crate) mode: String,
    /// Its epoch.
    pub(crate) epoch: u64,
    /// The peer it names.
    pub(crate) peer: Option<String>,
    /// Our role towards that peer.
    pub(crate) polite: bool,
    /// When we received it.
    pub(crate) since: Instant,
}

struct Shared {
    name: String,
    ctx: LegContext,
    video: Option<Arc<LocalSource>>,
    audio: Option<Arc<LocalSource>>,
    server: Arc<Leg>,
    direct: Mutex<Option<Arc<Leg>>>,
    next_leg_id: AtomicU64,
    mode_tx: watch::Sender<ModeView>,
}

impl Shared {
    fn direct(&self) -> Option<Arc<Leg>> {
        self.direct.lock().unwrap().clone()
    }

    fn sources(&self) -> impl Iterator<Item = &Arc<LocalSource>> {
        self.video.iter().chain(self.audio.iter())
    }

    /// Produces the next packet of every source and writes it on the legs the
    /// mode calls for.
    async fn send_once(&self, interval: Duration, len: usize, reports: &mut [SendReport]) {
        let mode = self.mode_tx.borrow().mode.clone();
        let on_server = matches!(mode.as_str(), "to_sfu" | "sfu" | "to_p2p");
        let direct = if matches!(mode.as_str(), "p2p" | "to_sfu" | "to_p2p") {
            self.direct().filter(|leg| !leg.is_closed())
        } else {
            None
        };
        for (source, report) in self.sources().zip(reports.iter_mut()) {
            let ticks = if interval.is_zero() {
                source.clock_rate / 100
            } else {
                (interval.as_micros() as u64 * source.clock_rate as u64 / 1_000_000) as u32
            };
            let (counter, timestamp) = source.advance(ticks);
            let requested = source.keyframe_requested.swap(false, Ordering::Relaxed);
            let mut record = SentRecord {
                counter,
                at: Instant::now(),
                server: false,
                direct: false,
            };
            let mut legs: Vec<(&Arc<Leg>, &mut bool)> = Vec::new();
            if on_server {
                legs.push((&self.server, &mut record.server));
            }
            if let Some(leg) = &direct {
                legs.push((leg, &mut record.direct));
            }
            for (leg, written) in legs {
                let Some(track) = leg.track(source.kind) else {
                    continue;
                };
                match track.write(counter, timestamp, requested, len).await {
                    Ok(()) => *written = true,
                    Err(e) => {
                        if report.errors.len() < 20 {
                            report.errors.push(format!("{} {e}", leg.label));
                        }
                    }
                }
            }
            if report.count == 0 {
                report.first_counter = counter;
                report.started = record.at;
            }
            report.count += 1;
            report.on_server += u32::from(record.server);
            report.on_direct += u32::from(record.direct);
            report.elapsed = report.started.elapsed();
            source.sent.lock().unwrap().push(record);
        }
    }

    fn empty_reports(&self) -> Vec<SendReport> {
        self.sources()
            .map(|s| SendReport {
                tag: s.tag,
                first_counter: s.next_counter(),
                count: 0,
                on_server: 0,
                on_direct: 0,
                errors: Vec::new(),
                started: Instant::now(),
                elapsed: Duration::ZERO,
            })
            .collect()
    }
}

/// A running [`RtcPeer::start_streaming`].
pub(crate) struct Streamer {
    stop: watch::Sender<bool>,
    task: JoinHandle<Vec<SendReport>>,
}

impl Streamer {
    /// Stops after the packet in progress; one report per source (video first).
    pub(crate) async fn stop(self) -> Vec<SendReport> {
        self.stop.send_replace(true);
        self.task.await.expect("the streaming task does not panic")
    }
}

/// One conference member with a server leg and, when the mode asks, a
/// direct leg.
pub(crate) struct RtcPeer {
    /// Display name.
    pub(crate) name: String,
    shared: Arc<Shared>,
    ice_rx: Mutex<Option<mpsc::UnboundedReceiver<(u64, LocalIce)>>>,
}

impl RtcPeer {
    /// Builds the server leg with the configured local tracks (before any
    /// offer, so they take the publish slots).
    pub(crate) async fn new(config: PeerConfig) -> Result<RtcPeer, String> {
        let name = config.name.clone();
        let video = config.video.then(|| {
            Arc::new(LocalSource::new(
                &name,
                RtpCodecKind::Video,
                config.keyframes,
            ))
        });
        let audio = config.audio.then(|| {
            Arc::new(LocalSource::new(
                &name,
                RtpCodecKind::Audio,
                config.keyframes,
            ))
        });
        let (ice_tx, ice_rx) = mpsc::unbounded_channel();
        let ctx = LegContext {
            name: name.clone(),
            config,
            sources: video.iter().chain(audio.iter()).cloned().collect(),
            inbox: Arc::new(Inbox::default()),
            keyframe_requests: Arc::new(Mutex::new(Vec::new())),
            ice_tx,
            timeline: Arc::new(Mutex::new(Vec::new())),
        };
        let server = Leg::build(&ctx, 0, Path::Server, None).await?;
        let (mode_tx, _) = watch::channel(ModeView {
            mode: String::new(),
            epoch: 0,
            peer: None,
            polite: false,
            since: Instant::now(),
        });
        Ok(RtcPeer {
            name,
            shared: Arc::new(Shared {
                name: ctx.name.clone(),
                ctx,
                video,
                audio,
                server,
                direct: Mutex::new(None),
                next_leg_id: AtomicU64::new(1),
                mode_tx,
            }),
            ice_rx: Mutex::new(Some(ice_rx)),
        })
    }

    /// The local video source, if configured.
    pub(crate) fn video(&self) -> Option<&Arc<LocalSource>> {
        self.shared.video.as_ref()
    }

    /// The local audio source, if configured.
    pub(crate) fn audio(&self) -> Option<&Arc<LocalSource>> {
        self.shared.audio.as_ref()
    }

    /// The server leg.
    pub(crate) fn server_leg(&self) -> &Arc<Leg> {
        &self.shared.server
    }

    /// The current direct leg, if any.
    pub(crate) fn direct_leg(&self) -> Option<Arc<Leg>> {
        self.shared.direct()
    }

    /// The mode as last received.
    pub(crate) fn mode(&self) -> ModeView {
        self.shared.mode_tx.borrow().clone()
    }

    /// Waits until the mode is `mode` (with an epoch above `after_epoch`).
    pub(crate) async fn wait_mode(
        &self,
        mode: &str,
        after_epoch: u64,
        timeout: Duration,
    ) -> Result<ModeView, String> {
        let mut rx = self.shared.mode_tx.subscribe();
        let outcome = tokio::time::timeout(
            timeout,
            rx.wait_for(|m| m.mode == mode && m.epoch > after_epoch),
        )
        .await
        .map(|r| r.map(|m| m.clone()));
        match outcome {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(_)) => Err(format!("[{}] mode channel closed", self.name)),
            Err(_) => Err(format!(
                "[{}] mode {mode:?} (epoch > {after_epoch}) not reached after {timeout:?}; now {:?}",
                self.name,
                self.mode()
            )),
        }
    }

    /// Waits until the direct leg exists and is connected.
    pub(crate) async fn wait_direct_connected(
        &self,
        timeout: Duration,
    ) -> Result<Arc<Leg>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let leg = loop {
            if let Some(leg) = self.direct_leg().filter(|l| !l.is_closed()) {
                break leg;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("[{}] no direct leg after {timeout:?}", self.name));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        leg.wait_connected(left)
            .await
            .map_err(|e| format!("[{}] {e}", self.name))?;
        Ok(leg)
    }

    /// Writes `count` packets per source, one every `interval`, on the legs
    /// the mode calls for. Counters continue where the previous call stopped.
    /// One report per source (video first).
    pub(crate) async fn send_numbered(
        &self,
        count: u32,
        interval: Duration,
        payload_len: usize,
    ) -> Vec<SendReport> {
        let mut reports = self.shared.empty_reports();
        let mut ticker = tokio::time::interval(interval.max(Duration::from_micros(1)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for _ in 0..count {
            if !interval.is_zero() {
                ticker.tick().await;
            }
            self.shared
                .send_once(interval, payload_len, &mut reports)
                .await;
        }
        reports
    }

    /// Sends one packet per source every `interval` until stopped, on the
    /// legs the mode calls for at each moment.
    pub(crate) fn start_streaming(&self, interval: Duration, payload_len: usize) -> Streamer {
        for source in self.shared.sources() {
            assert!(payload_len >= min_payload_len(source.kind));
        }
        let shared = self.shared.clone();
        let (stop, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut reports = shared.empty_reports();
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop_rx.wait_for(|s| *s) => break,
                }
                if *stop_rx.borrow() {
                    break;
                }
                shared.send_once(interval, payload_len, &mut reports).await;
            }
            reports
        });
        Streamer { stop, task }
    }

    /// What has been received so far (locked: keep it briefly).
    fn inbox(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.shared.ctx.inbox.state.lock().unwrap()
    }

    /// Every remote stream as rendered so far.
    pub(crate) fn streams(&self) -> Vec<StreamView> {
        self.inbox().streams.values().cloned().collect()
    }

    /// The remote stream tagged `tag`.
    pub(crate) fn stream(&self, tag: u32) -> Option<StreamView> {
        self.inbox().streams.get(&tag).cloned()
    }

    /// Every remote track of every leg and what arrived on it.
    pub(crate) fn received(&self) -> Vec<RemoteTrackRecord> {
        self.inbox().tracks.clone()
    }

    /// Remote tracks of `path` carrying `tag`.
    pub(crate) fn records_of(&self, tag: u32, path: Path) -> Vec<RemoteTrackRecord> {
        self.received()
            .into_iter()
            .filter(|r| r.path == path && r.packets.first().is_some_and(|p| p.tag == tag))
            .collect()
    }

    /// Waits until `done` holds for the remote streams (by tag).
    pub(crate) async fn wait_streams(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&BTreeMap<u32, StreamView>) -> bool,
    ) -> Result<(), String> {
        self.shared
            .ctx
            .inbox
            .wait_until(timeout, |state| done(&state.streams).then_some(()))
            .await
            .map_err(|streams| format!("[{}] after {timeout:?}: {streams}", self.name))
    }

    /// Waits until every stream in `tags` is rendered from `path` and its
    /// latest rendered packet came from there.
    pub(crate) async fn wait_rendering(
        &self,
        tags: &[u32],
        path: Path,
        timeout: Duration,
    ) -> Result<(), String> {
        self.wait_streams(timeout, |streams| {
            tags.iter().all(|tag| {
                streams.get(tag).is_some_and(|s| {
                    s.render == Some(path) && s.rendered.last().is_some_and(|r| r.path == path)
                })
            })
        })
        .await
    }

    /// Waits until the stream `tag` has rendered `counter`.
    pub(crate) async fn wait_rendered(
        &self,
        tag: u32,
        counter: u32,
        timeout: Duration,
    ) -> Result<(), String> {
        self.wait_streams(timeout, |streams| {
            streams
                .get(&tag)
                .and_then(StreamView::last_rendered)
                .is_some_and(|c| c >= counter)
        })
        .await
    }

    /// Every PLI/FIR received for our sending tracks.
    pub(crate) fn keyframe_requests(&self) -> Vec<KeyframeRequest> {
        self.shared.ctx.keyframe_requests.lock().unwrap().clone()
    }

    /// What happened so far (states, candidates, signaling), each line with
    /// its offset from `since`.
    pub(crate) fn timeline(&self, since: Instant) -> Vec<String> {
        self.shared
            .ctx
            .timeline
            .lock()
            .unwrap()
            .iter()
            .map(|(at, what)| format!("{:+9.1} ms  {what}", offset_ms(*at, since)))
            .collect()
    }

    /// Closes every leg.
    pub(crate) async fn close(&self) {
        let direct = self.shared.direct.lock().unwrap().take();
        if let Some(leg) = direct {
            leg.close().await;
        }
        self.shared.server.close().await;
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
        let members: Vec<String> = joined["members"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let log = Arc::new(Mutex::new(SignalingLog {
            participant_id: participant_id.clone(),
            joined_at: Some(Instant::now()),
            ..Default::default()
        }));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let driver = Driver {
            name: self.name.clone(),
            shared: self.shared.clone(),
            log: log.clone(),
            members,
            peer: None,
            polite: false,
            ignore_offer: false,
            pending_direct: VecDeque::new(),
            pending_server: VecDeque::new(),
            pending_ready: None,
            timeline: self.shared.ctx.timeline.clone(),
        };
        let initial_mode = joined.get("mode").cloned().filter(|m| !m.is_null());
        let task = tokio::spawn(run_signaling(
            driver,
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

fn offset_ms(at: Instant, since: Instant) -> f64 {
    if at >= since {
        (at - since).as_secs_f64() * 1e3
    } else {
        -((since - at).as_secs_f64() * 1e3)
    }
}

// ---------------------------------------------------------------------------
// Signaling driver
// ---------------------------------------------------------------------------

/// A `mode` as received.
#[derive(Clone, Debug)]
pub(crate) struct ModeEvent {
    /// `p2p`, `to_sfu`, `sfu` or `to_p2p`.
    pub(crate) mode: String,
    /// Its epoch.
    pub(crate) epoch: u64,
    /// The peer it names.
    pub(crate) peer: Option<String>,
    /// Our role.
    pub(crate) polite: Option<bool>,
    /// When it arrived.
    pub(crate) at: Instant,
}

/// What the signaling driver did and saw, for assertions and diagnostics.
#[derive(Clone, Debug, Default)]
pub(crate) struct SignalingLog {
    /// Our participant id.
    pub(crate) participant_id: String,
    /// When the driver started (right after `joined`).
    pub(crate) joined_at: Option<Instant>,
    /// Last media mode (`p2p`, ...).
    pub(crate) mode: Option<String>,
    /// The peer the last `mode` named.
    pub(crate) peer: Option<String>,
    /// Our role from the last `mode`.
    pub(crate) polite: Option<bool>,
    /// Epoch of the last `mode`.
    pub(crate) epoch: Option<u64>,
    /// Every `mode` (including the one in `joined`), in order.
    pub(crate) modes: Vec<ModeEvent>,
    /// `media_ready` reports sent: epoch and time.
    pub(crate) media_ready_sent: Vec<(u64, Instant)>,
    /// Direct leg: `offer` messages sent / received / ignored (impolite side
    /// of a collision).
    pub(crate) offers_sent: usize,
    /// See `offers_sent`.
    pub(crate) offers_received: usize,
    /// See `offers_sent`.
    pub(crate) offers_ignored: usize,
    /// Own direct offers rolled back (polite side of a collision).
    pub(crate) rollbacks: usize,
    /// Direct leg: `answer` messages sent.
    pub(crate) answers_sent: usize,
    /// Direct leg: `answer` messages received.
    pub(crate) answers_received: usize,
    /// Direct leg: trickled candidates sent (not counting end-of-candidates).
    pub(crate) candidates_sent: usize,
    /// Direct leg: trickled candidates received (not counting end-of-candidates).
    pub(crate) candidates_received: usize,
    /// Direct leg: end-of-candidates markers sent.
    pub(crate) end_of_candidates_sent: usize,
    /// Direct leg: end-of-candidates markers received.
    pub(crate) end_of_candidates_received: usize,
    /// Direct leg: when the first offer was sent or received.
    pub(crate) first_offer_at: Option<Instant>,
    /// Server leg: offers received from `sfu`, with arrival time and SDP.
    pub(crate) server_offers: Vec<(Instant, String)>,
    /// Server leg: answers sent to `sfu`.
    pub(crate) server_answers_sent: usize,
    /// Server leg: candidates sent to `sfu` (not counting end-of-candidates).
    pub(crate) server_candidates_sent: usize,
    /// Server leg: candidates received from `sfu` (the doc says it does not
    /// trickle).
    pub(crate) server_candidates_received: usize,
    /// `server_leg` messages: member id, state, arrival.
    pub(crate) server_legs: Vec<(String, String, Instant)>,
    /// `participant_joined`: member id, arrival.
    pub(crate) participants_joined: Vec<(String, Instant)>,
    /// `participant_left`: member id, reason, arrival.
    pub(crate) participants_left: Vec<(String, String, Instant)>,
    /// `active_speakers`: the ids listed, in order, and arrival.
    pub(crate) speakers: Vec<(Vec<String>, Instant)>,
    /// `forwarded_video` (Last-N): the ids, in order, and arrival.
    pub(crate) forwarded_video: Vec<(Vec<String>, Instant)>,
    /// Candidates from a member that is not our current peer (a leg that was
    /// already closed), ignored.
    pub(crate) stale_candidates: usize,
    /// Server `error` messages and local failures, described.
    pub(crate) errors: Vec<String>,
    /// Messages not handled by the driver (`participant_updated`, `pong`, ...).
    pub(crate) other: Vec<Value>,
    /// The socket closed.
    pub(crate) closed: bool,
}

impl SignalingLog {
    /// When `server_leg{id, state}` first arrived.
    pub(crate) fn server_leg_at(&self, id: &str, state: &str) -> Option<Instant> {
        self.server_legs
            .iter()
            .find(|(i, s, _)| i == id && s == state)
            .map(|(_, _, at)| *at)
    }

    /// The first `mode` of kind `mode`.
    pub(crate) fn first_mode(&self, mode: &str) -> Option<&ModeEvent> {
        self.modes.iter().find(|m| m.mode == mode)
    }

    /// The sequence of mode names received, consecutive repeats folded.
    pub(crate) fn mode_names(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in &self.modes {
            if out.last() != Some(&m.mode) {
                out.push(m.mode.clone());
            }
        }
        out
    }
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

    /// Drops the socket at once, without `leave` and without a close frame,
    /// as a crashed client would.
    pub(crate) async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Waits until the log satisfies `cond`.
    pub(crate) async fn wait_log(
        &self,
        timeout: Duration,
        mut cond: impl FnMut(&SignalingLog) -> bool,
    ) -> Result<SignalingLog, SignalingLog> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let log = self.log();
            if cond(&log) {
                return Ok(log);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(log);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A `media_ready` the driver still owes.
struct PendingReady {
    epoch: u64,
    path: Path,
    since: Instant,
    /// `Some(peer)`: only the peer (to_p2p); `None`: every other member.
    only: Option<String>,
}

struct Driver {
    name: String,
    shared: Arc<Shared>,
    log: Arc<Mutex<SignalingLog>>,
    /// Other members, in join order.
    members: Vec<String>,
    /// The peer of the current direct leg.
    peer: Option<String>,
    polite: bool,
    ignore_offer: bool,
    /// Direct-leg candidates that arrived before a remote description.
    pending_direct: VecDeque<RTCIceCandidateInit>,
    /// Server-leg candidates that arrived before the first offer.
    pending_server: VecDeque<RTCIceCandidateInit>,
    pending_ready: Option<PendingReady>,
    timeline: Timeline,
}

/// Aborts a task when dropped (also when the owning task is aborted).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn run_signaling(
    mut driver: Driver,
    initial_mode: Option<Value>,
    mut sender: WsSender,
    mut receiver: WsReceiver,
    mut ice_rx: mpsc::UnboundedReceiver<(u64, LocalIce)>,
    mut cmd_rx: mpsc::UnboundedReceiver<Command>,
) {
    // A reader task of its own, so the select below only waits on channels.
    // It owns half of the socket: abort it with this task.
    let (in_tx, mut in_rx) = mpsc::unbounded_channel();
    let _reader = AbortOnDrop(tokio::spawn(async move {
        while let Some(message) = receiver.recv_json().await {
            if in_tx.send(message).is_err() {
                break;
            }
        }
    }));
    let inbox = driver.shared.ctx.inbox.clone();

    if let Some(mode) = initial_mode {
        note(&driver.timeline, format!("joined with mode {mode}"));
        driver.on_mode(&mode, &mut sender).await;
    }
    loop {
        tokio::select! {
            message = in_rx.recv() => match message {
                Some(message) => driver.on_message(message, &mut sender).await,
                None => {
                    driver.log.lock().unwrap().closed = true;
                    note(&driver.timeline, "socket closed".to_owned());
                    break;
                }
            },
            Some((leg, ice)) = ice_rx.recv() => driver.on_local_ice(leg, ice, &mut sender).await,
            _ = inbox.ready_poke.notified() => driver.check_ready(&mut sender).await,
            command = cmd_rx.recv() => match command {
                Some(Command::Send(message)) => driver.send(&mut sender, message).await,
                Some(Command::Stop) | None => break,
            },
        }
    }
}

/// A signaling message in one line, SDP left out.
fn brief(message: &Value) -> String {
    let mut m = message.clone();
    if let Some(sdp) = m.get_mut("sdp") {
        *sdp = json!(format!("<{} bytes>", sdp.as_str().map_or(0, str::len)));
    }
    m.to_string()
}

/// The ICE ufrag and first mid of an SDP.
fn ufrag_and_first_mid(sdp: &str) -> (Option<String>, Option<String>) {
    let attribute = |name: &str| {
        sdp.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
    };
    (attribute("a=ice-ufrag:"), attribute("a=mid:"))
}

impl Driver {
    async fn send(&self, sender: &mut WsSender, message: Value) {
        note(&self.timeline, format!("send {}", brief(&message)));
        sender.send_json(message).await;
    }

    fn error(&self, what: String) {
        note(&self.timeline, format!("signaling error: {what}"));
        eprintln!("[{}] signaling: {what}", self.name);
        self.log.lock().unwrap().errors.push(what);
    }

    fn inbox(&self) -> &Inbox {
        &self.shared.ctx.inbox
    }

    async fn on_message(&mut self, message: Value, sender: &mut WsSender) {
        note(&self.timeline, format!("recv {}", brief(&message)));
        let now = Instant::now();
        match message["type"].as_str().unwrap_or("") {
            "mode" => self.on_mode(&message, sender).await,
            "offer" => self.on_offer(&message, sender).await,
            "answer" => self.on_answer(&message).await,
            "candidate" => self.on_candidate(&message).await,
            "server_leg" => {
                let id = message["id"].as_str().unwrap_or("").to_owned();
                let state = message["state"].as_str().unwrap_or("").to_owned();
                self.log.lock().unwrap().server_legs.push((id, state, now));
            }
            "participant_joined" => {
                let id = message["participant"]["id"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned();
                if !self.members.contains(&id) {
                    self.members.push(id.clone());
                }
                self.log.lock().unwrap().participants_joined.push((id, now));
                self.check_ready(sender).await;
            }
            "participant_left" => {
                let id = message["id"].as_str().unwrap_or("").to_owned();
                let reason = message["reason"].as_str().unwrap_or("").to_owned();
                self.members.retain(|m| *m != id);
                self.log
                    .lock()
                    .unwrap()
                    .participants_left
                    .push((id, reason, now));
                self.check_ready(sender).await;
            }
            "active_speakers" => {
                let ids = message["speakers"]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .map(|s| s["id"].as_str().unwrap_or("").to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                self.log.lock().unwrap().speakers.push((ids, now));
            }
            "forwarded_video" => {
                let ids = message["ids"]
                    .as_array()
                    .map(|list| {
                        list.iter()
                            .map(|id| id.as_str().unwrap_or("").to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                self.log.lock().unwrap().forwarded_video.push((ids, now));
            }
            "error" => self.error(format!("server error: {message}")),
            _ => self.log.lock().unwrap().other.push(message),
        }
    }

    async fn on_mode(&mut self, mode: &Value, sender: &mut WsSender) {
        let now = Instant::now();
        let kind = mode["mode"].as_str().unwrap_or("").to_owned();
        let peer = mode["peer"].as_str().map(str::to_owned);
        let polite = mode["polite"].as_bool();
        let epoch = mode["epoch"].as_u64().unwrap_or(0);
        {
            let mut log = self.log.lock().unwrap();
            log.mode = Some(kind.clone());
            log.peer = peer.clone();
            log.polite = polite;
            log.epoch = Some(epoch);
            log.modes.push(ModeEvent {
                mode: kind.clone(),
                epoch,
                peer: peer.clone(),
                polite,
                at: now,
            });
        }
        self.shared.mode_tx.send_replace(ModeView {
            mode: kind.clone(),
            epoch,
            peer: peer.clone(),
            polite: polite.unwrap_or(false),
            since: now,
        });
        self.pending_ready = None;
        match kind.as_str() {
            "p2p" => {
                self.set_direct_member(peer.clone());
                match peer {
                    Some(peer) => {
                        self.ensure_direct(peer, polite.unwrap_or(true), sender)
                            .await
                    }
                    // Alone in the room (or the peer left): nothing to negotiate.
                    None => self.close_direct(),
                }
            }
            "to_sfu" => {
                // The direct leg (if any) stays up and keeps carrying media until
                // the server path decodes at both ends.
                self.set_direct_member(None);
                self.pending_ready = Some(PendingReady {
                    epoch,
                    path: Path::Server,
                    since: now,
                    only: None,
                });
            }
            "sfu" => {
                self.set_direct_member(None);
                self.close_direct();
            }
            "to_p2p" => {
                let Some(peer) = peer else {
                    return self.error(format!("to_p2p without a peer: {mode}"));
                };
                self.set_direct_member(Some(peer.clone()));
                self.ensure_direct(peer.clone(), polite.unwrap_or(true), sender)
                    .await;
                self.pending_ready = Some(PendingReady {
                    epoch,
                    path: Path::Direct,
                    since: now,
                    only: Some(peer),
                });
            }
            other => self.error(format!("unknown mode {other:?}: {mode}")),
        }
        self.inbox().state.lock().unwrap().watch_ready = self.pending_ready.is_some();
        self.check_ready(sender).await;
    }

    fn set_direct_member(&self, member: Option<String>) {
        self.inbox().state.lock().unwrap().set_direct_member(member);
    }

    /// Sends the pending `media_ready` once the path it waits for decodes
    /// every member it expects.
    async fn check_ready(&mut self, sender: &mut WsSender) {
        let Some(pending) = &self.pending_ready else {
            return;
        };
        let expected: Vec<String> = match &pending.only {
            Some(peer) => vec![peer.clone()],
            None => self.members.clone(),
        };
        let ready = {
            let state = self.inbox().state.lock().unwrap();
            expected
                .iter()
                .all(|m| state.decodes(m, pending.path, pending.since))
        };
        if !ready {
            return;
        }
        let epoch = pending.epoch;
        self.pending_ready = None;
        self.inbox().state.lock().unwrap().watch_ready = false;
        self.send(sender, json!({"type": "media_ready", "epoch": epoch}))
            .await;
        self.log
            .lock()
            .unwrap()
            .media_ready_sent
            .push((epoch, Instant::now()));
    }

    /// Makes sure a direct leg to `peer` exists; the impolite side offers on
    /// a new one.
    async fn ensure_direct(&mut self, peer: String, polite: bool, sender: &mut WsSender) {
        if let Some(leg) = self.shared.direct() {
            if leg.peer.as_deref() == Some(peer.as_str()) && !leg.is_closed() {
                self.polite = polite;
                return;
            }
        }
        self.close_direct();
        let id = self.shared.next_leg_id.fetch_add(1, Ordering::Relaxed);
        let leg = match Leg::build(&self.shared.ctx, id, Path::Direct, Some(peer.clone())).await {
            Ok(leg) => leg,
            Err(e) => return self.error(e),
        };
        *self.shared.direct.lock().unwrap() = Some(leg);
        self.peer = Some(peer);
        self.polite = polite;
        self.ignore_offer = false;
        self.pending_direct.clear();
        // The impolite member (the later joiner) makes the first offer.
        if !polite {
            self.make_offer(sender).await;
        }
    }

    /// Closes the direct leg (in the background) and moves anything still
    /// rendered from it to its target path.
    fn close_direct(&mut self) {
        let leg = self.shared.direct.lock().unwrap().take();
        self.peer = None;
        self.pending_direct.clear();
        if let Some(leg) = leg {
            note(&self.timeline, format!("{} closing", leg.label));
            self.inbox()
                .state
                .lock()
                .unwrap()
                .direct_closed(Instant::now());
            tokio::spawn(async move { leg.close().await });
        }
    }

    async fn make_offer(&mut self, sender: &mut WsSender) {
        let (Some(peer), Some(leg)) = (self.peer.clone(), self.shared.direct()) else {
            return;
        };
        let Some(sdp) = self.set_local(&leg, SdpKind::Offer, "").await else {
            return;
        };
        self.send(sender, json!({"type": "offer", "to": peer, "sdp": sdp}))
            .await;
        let mut log = self.log.lock().unwrap();
        log.offers_sent += 1;
        log.first_offer_at.get_or_insert_with(Instant::now);
    }

    async fn on_offer(&mut self, message: &Value, sender: &mut WsSender) {
        let from = message["from"].as_str().unwrap_or("").to_owned();
        let Some(sdp) = message["sdp"].as_str() else {
            return self.error(format!("offer without sdp: {message}"));
        };
        if from == SFU {
            return self.on_server_offer(sdp, sender).await;
        }
        {
            let mut log = self.log.lock().unwrap();
            log.offers_received += 1;
            log.first_offer_at.get_or_insert_with(Instant::now);
        }
        let current = self.shared.direct().filter(|l| !l.is_closed());
        let leg = match current {
            Some(leg) if leg.peer.as_deref() == Some(from.as_str()) => leg,
            _ => {
                // A server that relays an offer before telling us our peer has its
                // ordering wrong; note it, then answer as the polite side would.
                self.error(format!(
                    "offer from {from}, but our peer is {:?}",
                    self.peer
                ));
                self.ensure_direct(from.clone(), true, sender).await;
                match self.shared.direct() {
                    Some(leg) => leg,
                    None => return,
                }
            }
        };
        // Perfect negotiation: an offer while ours is outstanding is a collision.
        let collision = leg.pc.pending_local_description().await.is_some();
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
            if let Err(e) = leg.pc.set_local_description(rollback).await {
                return self.error(format!("rollback: {e}"));
            }
            self.log.lock().unwrap().rollbacks += 1;
        }
        if !self
            .set_remote(&leg, SdpKind::Offer, sdp.to_owned(), "")
            .await
        {
            return;
        }
        self.flush_direct_candidates(&leg).await;
        let Some(sdp) = self.set_local(&leg, SdpKind::Answer, "").await else {
            return;
        };
        self.send(sender, json!({"type": "answer", "to": from, "sdp": sdp}))
            .await;
        self.log.lock().unwrap().answers_sent += 1;
    }

    async fn on_server_offer(&mut self, sdp: &str, sender: &mut WsSender) {
        self.log
            .lock()
            .unwrap()
            .server_offers
            .push((Instant::now(), sdp.to_owned()));
        let leg = self.shared.server.clone();
        let sdp = match &self.shared.ctx.config.server_offer_rewrite {
            Some(rewrite) => (rewrite.0)(sdp),
            None => sdp.to_owned(),
        };
        if !self
            .set_remote(&leg, SdpKind::Offer, sdp, "server leg: ")
            .await
        {
            return;
        }
        while let Some(init) = self.pending_server.pop_front() {
            self.add_candidate(&leg, init).await;
        }
        let Some(sdp) = self.set_local(&leg, SdpKind::Answer, "server leg: ").await else {
            return;
        };
        self.send(sender, json!({"type": "answer", "to": SFU, "sdp": sdp}))
            .await;
        self.log.lock().unwrap().server_answers_sent += 1;
    }

    async fn on_answer(&mut self, message: &Value) {
        let from = message["from"].as_str().unwrap_or("");
        let Some(sdp) = message["sdp"].as_str() else {
            return self.error(format!("answer without sdp: {message}"));
        };
        if from == SFU {
            return self.error(format!(
                "an answer from {SFU}: the server leg is always offered by the server"
            ));
        }
        self.log.lock().unwrap().answers_received += 1;
        let Some(leg) = self
            .shared
            .direct()
            .filter(|l| l.peer.as_deref() == Some(from))
        else {
            return self.error(format!(
                "answer from {from}, but our peer is {:?}",
                self.peer
            ));
        };
        if leg.pc.pending_local_description().await.is_none() {
            return self.error(format!("answer from {from} without an outstanding offer"));
        }
        if self
            .set_remote(&leg, SdpKind::Answer, sdp.to_owned(), "")
            .await
        {
            self.flush_direct_candidates(&leg).await;
        }
    }

    /// Parses `sdp` as `kind` and sets it as `leg`'s remote description;
    /// false, the error logged (prefixed `ctx`), if either fails.
    async fn set_remote(&self, leg: &Leg, kind: SdpKind, sdp: String, ctx: &str) -> bool {
        let name = kind.name();
        let parsed = match kind {
            SdpKind::Offer => RTCSessionDescription::offer(sdp),
            SdpKind::Answer => RTCSessionDescription::answer(sdp),
        };
        let description = match parsed {
            Ok(d) => d,
            Err(e) => {
                self.error(format!("{ctx}parse {name}: {e}"));
                return false;
            }
        };
        if let Err(e) = leg.pc.set_remote_description(description).await {
            self.error(format!("{ctx}set_remote_description({name}): {e}"));
            return false;
        }
        true
    }

    /// Creates our `kind` on `leg` and sets it as the local description;
    /// its SDP (see [`local_sdp_or`]), or `None` with the error logged
    /// (prefixed `ctx`).
    async fn set_local(&self, leg: &Leg, kind: SdpKind, ctx: &str) -> Option<String> {
        let name = kind.name();
        let created = match kind {
            SdpKind::Offer => leg.pc.create_offer(None).await,
            SdpKind::Answer => leg.pc.create_answer(None).await,
        };
        let description = match created {
            Ok(d) => d,
            Err(e) => {
                self.error(format!("{ctx}create_{name}: {e}"));
                return None;
            }
        };
        if let Err(e) = leg.pc.set_local_description(description.clone()).await {
            self.error(format!("{ctx}set_local_description({name}): {e}"));
            return None;
        }
        Some(local_sdp_or(leg, description).await)
    }

    async fn on_candidate(&mut self, message: &Value) {
        let from = message["from"].as_str().unwrap_or("");
        let c = &message["candidate"];
        let Some(candidate) = c["candidate"].as_str() else {
            return self.error(format!("candidate without candidate string: {message}"));
        };
        let init = RTCIceCandidateInit {
            candidate: candidate.to_owned(),
            sdp_mid: c["sdp_mid"].as_str().map(str::to_owned),
            sdp_mline_index: c["sdp_mline_index"].as_u64().map(|i| i as u16),
            username_fragment: c["username_fragment"].as_str().map(str::to_owned),
            url: None,
        };
        if from == SFU {
            if candidate.is_empty() {
                return;
            }
            self.log.lock().unwrap().server_candidates_received += 1;
            let leg = self.shared.server.clone();
            if leg.pc.remote_description().await.is_none() {
                self.pending_server.push_back(init);
            } else {
                self.add_candidate(&leg, init).await;
            }
            return;
        }
        let leg = self
            .shared
            .direct()
            .filter(|l| l.peer.as_deref() == Some(from) && !l.is_closed());
        let Some(leg) = leg else {
            // Trickled for a direct leg we already closed (or never had).
            self.log.lock().unwrap().stale_candidates += 1;
            return;
        };
        if candidate.is_empty() {
            self.log.lock().unwrap().end_of_candidates_received += 1;
            return;
        }
        self.log.lock().unwrap().candidates_received += 1;
        if leg.pc.remote_description().await.is_none() {
            self.pending_direct.push_back(init);
            return;
        }
        if self.ignore_offer {
            // Candidates for an offer we ignored would fail; drop them.
            return;
        }
        self.add_candidate(&leg, init).await;
    }

    async fn add_candidate(&self, leg: &Leg, init: RTCIceCandidateInit) {
        if let Err(e) = leg.pc.add_ice_candidate(init.clone()).await {
            self.error(format!(
                "{} add_ice_candidate({}): {e}",
                leg.label, init.candidate
            ));
        }
    }

    async fn flush_direct_candidates(&mut self, leg: &Leg) {
        while let Some(init) = self.pending_direct.pop_front() {
            self.add_candidate(leg, init).await;
        }
    }

    async fn on_local_ice(&mut self, leg_id: u64, ice: LocalIce, sender: &mut WsSender) {
        let (leg, to) = if leg_id == self.shared.server.id {
            (self.shared.server.clone(), SFU.to_owned())
        } else {
            match (self.shared.direct(), self.peer.clone()) {
                (Some(leg), Some(peer)) if leg.id == leg_id => (leg, peer),
                // From a direct leg that is gone.
                _ => return,
            }
        };
        let (ufrag, first_mid) = (
            leg.local_ufrag.lock().unwrap().clone(),
            leg.local_first_mid.lock().unwrap().clone(),
        );
        let is_server = leg.path == Path::Server;
        let candidate = match ice {
            LocalIce::Candidate(init) => {
                // webrtc-rs reports sdp_mid "" and index 0; name the first m-line
                // properly, as a browser would, and add our ICE ufrag.
                let mid = init.sdp_mid.filter(|m| !m.is_empty()).or(first_mid);
                {
                    let mut log = self.log.lock().unwrap();
                    if is_server {
                        log.server_candidates_sent += 1;
                    } else {
                        log.candidates_sent += 1;
                    }
                }
                json!({
                    "candidate": init.candidate,
                    "sdp_mid": mid,
                    "sdp_mline_index": init.sdp_mline_index.unwrap_or(0),
                    "username_fragment": init.username_fragment.or(ufrag),
                })
            }
            LocalIce::GatheringComplete => {
                if !is_server {
                    self.log.lock().unwrap().end_of_candidates_sent += 1;
                }
                json!({
                    "candidate": "",
                    "sdp_mid": null,
                    "sdp_mline_index": null,
                    "username_fragment": ufrag,
                })
            }
        };
        self.send(
            sender,
            json!({"type": "candidate", "to": to, "candidate": candidate}),
        )
        .await;
    }
}

/// An offer or an answer.
#[derive(Clone, Copy)]
enum SdpKind {
    Offer,
    Answer,
}

impl SdpKind {
    /// As SDP calls it (`create_offer`, `set_remote_description(answer)`).
    fn name(self) -> &'static str {
        match self {
            SdpKind::Offer => "offer",
            SdpKind::Answer => "answer",
        }
    }
}

/// The applied local description (remembering its ICE ufrag and first mid
/// for outgoing candidates), or `fallback` if there is none.
async fn local_sdp_or(leg: &Leg, fallback: RTCSessionDescription) -> String {
    let sdp = leg
        .pc
        .local_description()
        .await
        .map(|d| d.sdp)
        .unwrap_or(fallback.sdp);
    let (ufrag, mid) = ufrag_and_first_mid(&sdp);
    if ufrag.is_some() {
        *leg.local_ufrag.lock().unwrap() = ufrag;
    }
    if mid.is_some() {
        *leg.local_first_mid.lock().unwrap() = mid;
    }
    sdp
}

// ---------------------------------------------------------------------------
// SDP inspection
// ---------------------------------------------------------------------------

/// One media section of an SDP, as far as the tests look at it.
#[derive(Clone, Debug, Default)]
pub(crate) struct MediaSection {
    /// `audio` or `video`.
    pub(crate) kind: String,
    /// `a=mid`.
    pub(crate) mid: Option<String>,
    /// `sendrecv`, `sendonly`, `recvonly` or `inactive` (`sendrecv` if absent).
    pub(crate) direction: String,
    /// Stream id of `a=msid`.
    pub(crate) msid_stream: Option<String>,
    /// Payload types on the m-line.
    pub(crate) payload_types: Vec<u8>,
    /// `a=rtpmap` lines: payload type and encoding name.
    pub(crate) rtpmaps: Vec<(u8, String)>,
    /// SSRCs from `a=ssrc`.
    pub(crate) ssrcs: Vec<u32>,
    /// Port of the m-line (0 = rejected).
    pub(crate) port: u16,
}

/// Session-level facts and media sections of an SDP.
#[derive(Clone, Debug, Default)]
pub(crate) struct SdpSummary {
    /// `a=ice-lite` present.
    pub(crate) ice_lite: bool,
    /// `a=candidate` lines (anywhere).
    pub(crate) candidates: Vec<String>,
    /// `a=end-of-candidates` present (anywhere).
    pub(crate) end_of_candidates: bool,
    /// The media sections in order.
    pub(crate) sections: Vec<MediaSection>,
}

/// Parses what the tests check in an SDP.
pub(crate) fn summarize_sdp(sdp: &str) -> SdpSummary {
    let mut out = SdpSummary::default();
    let mut current: Option<MediaSection> = None;
    for line in sdp.lines().map(str::trim) {
        if let Some(m) = line.strip_prefix("m=") {
            if let Some(done) = current.take() {
                out.sections.push(done);
            }
            let mut parts = m.split_whitespace();
            let kind = parts.next().unwrap_or("").to_owned();
            let port = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            let _proto = parts.next();
            current = Some(MediaSection {
                kind,
                port,
                direction: "sendrecv".to_owned(),
                payload_types: parts.filter_map(|p| p.parse().ok()).collect(),
                ..Default::default()
            });
            continue;
        }
        if line == "a=ice-lite" {
            out.ice_lite = true;
        } else if line.starts_with("a=candidate:") {
            out.candidates.push(line.to_owned());
        } else if line == "a=end-of-candidates" {
            out.end_of_candidates = true;
        }
        let Some(section) = current.as_mut() else {
            continue;
        };
        if let Some(mid) = line.strip_prefix("a=mid:") {
            section.mid = Some(mid.to_owned());
        } else if matches!(
            line,
            "a=sendrecv" | "a=sendonly" | "a=recvonly" | "a=inactive"
        ) {
            section.direction = line[2..].to_owned();
        } else if let Some(msid) = line.strip_prefix("a=msid:") {
            section.msid_stream = msid.split_whitespace().next().map(str::to_owned);
        } else if let Some(rtpmap) = line.strip_prefix("a=rtpmap:") {
            let mut parts = rtpmap.splitn(2, ' ');
            if let (Some(pt), Some(enc)) = (parts.next(), parts.next()) {
                if let Ok(pt) = pt.parse() {
                    let name = enc.split('/').next().unwrap_or("").to_owned();
                    section.rtpmaps.push((pt, name));
                }
            }
        } else if let Some(ssrc) = line.strip_prefix("a=ssrc:") {
            if let Some(Ok(ssrc)) = ssrc.split_whitespace().next().map(str::parse::<u32>) {
                if !section.ssrcs.contains(&ssrc) {
                    section.ssrcs.push(ssrc);
                }
            }
        }
    }
    if let Some(done) = current.take() {
        out.sections.push(done);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_damage_is_caught() {
        for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
            for keyframe in [true, false] {
                let len = 300;
                let payload = encode_payload(kind, keyframe, 0xdead_beef, 41, len);
                assert_eq!(payload.len(), len);
                let want = Decoded {
                    tag: 0xdead_beef,
                    counter: 41,
                    keyframe: keyframe && kind == RtpCodecKind::Video,
                };
                assert_eq!(decode_payload(kind, &payload), Ok(want));

                let shortest = encode_payload(kind, keyframe, 7, 0, min_payload_len(kind));
                assert_eq!(decode_payload(kind, &shortest).map(|d| d.tag), Ok(7));

                let mut flipped = payload.to_vec();
                *flipped.last_mut().unwrap() ^= 0x01;
                assert!(decode_payload(kind, &flipped).is_err(), "{kind}: bit flip");

                // A counter rewritten without its pattern is caught too.
                let mut renumbered = payload.to_vec();
                let at = codec_prefix(kind, keyframe).len() + 8;
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
        }
        assert_eq!(
            &encode_payload(RtpCodecKind::Video, true, 1, 2, 40)[..11],
            &VP8_KEYFRAME_PREFIX
        );
        // A VP8 parser sees S=1, partition 0, and P=0 only on key frames.
        let delta = encode_payload(RtpCodecKind::Video, false, 1, 2, 40);
        assert_eq!(delta[0] & 0x17, 0x10);
        assert_eq!(delta[1] & 0x01, 1, "inter frame");
        assert_eq!(VP8_KEYFRAME_PREFIX[1] & 0x01, 0, "key frame");
    }

    #[test]
    fn check_exact_reports_loss_reordering_and_foreign_packets() {
        let packet = |tag, counter| ReceivedPacket {
            counter,
            tag,
            keyframe: true,
            sequence_number: counter as u16,
            timestamp: 0,
            ssrc: 1,
            payload_type: VIDEO_PAYLOAD_TYPE,
            payload_len: 100,
            at: Instant::now(),
        };
        let record = |packets: Vec<ReceivedPacket>| RemoteTrackRecord {
            path: Path::Direct,
            leg: 1,
            member: None,
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
        assert_eq!(gap.holes(), vec![2..3]);
        let swapped = record([0, 2, 1, 3, 4].map(|c| packet(9, c)).to_vec());
        assert!(swapped.check_exact(9, 0..5).is_err(), "reordered");
        assert!(swapped.check_clean(9).is_err(), "reordered");
        let foreign = record(
            [0, 1, 2, 3, 4]
                .map(|c| packet(if c == 2 { 8 } else { 9 }, c))
                .to_vec(),
        );
        assert!(foreign.check_exact(9, 0..5).is_err(), "foreign packet");
    }

    fn stream(target: Path) -> StreamView {
        StreamView::new(1, RtpCodecKind::Video, Some("m".into()), target)
    }

    #[test]
    fn splices_a_faster_path_in_without_a_gap() {
        // Server -> direct: the direct path is ahead.
        let t = Instant::now();
        let mut s = stream(Path::Server);
        for c in 0..5 {
            s.on_packet(Path::Server, c, t);
        }
        s.set_target(Path::Direct);
        s.on_packet(Path::Direct, 7, t); // ahead: wait for 5 and 6 on the server path
        assert_eq!(s.render, Some(Path::Server));
        s.on_packet(Path::Server, 5, t);
        s.on_packet(Path::Direct, 8, t);
        s.on_packet(Path::Server, 6, t); // 6 = splice - 1: switch, render 7, 8
        assert_eq!(s.render, Some(Path::Direct));
        s.on_packet(Path::Server, 7, t); // ignored now
        s.on_packet(Path::Direct, 9, t);
        assert!(s.gaps.is_empty(), "{:?}", s.gaps);
        assert_eq!(
            s.rendered.iter().map(|r| r.counter).collect::<Vec<_>>(),
            (0..10).collect::<Vec<_>>()
        );
        assert!(s.check_continuous(0..10).is_ok());
        assert_eq!(s.switches.len(), 1);
    }

    #[test]
    fn splices_a_lagging_path_in_and_skips_what_was_shown() {
        // Direct -> server: the server path lags.
        let t = Instant::now();
        let mut s = stream(Path::Direct);
        for c in 0..10 {
            s.on_packet(Path::Direct, c, t);
        }
        s.set_target(Path::Server);
        s.on_packet(Path::Server, 8, t); // behind: switch at once
        assert_eq!(s.render, Some(Path::Server));
        s.on_packet(Path::Direct, 10, t); // ignored now
        s.on_packet(Path::Server, 9, t); // late
        s.on_packet(Path::Server, 10, t);
        assert_eq!(s.late, 2);
        assert!(s.check_continuous(0..11).is_ok(), "{:?}", s.gaps);
    }

    #[test]
    fn a_path_dropped_before_the_next_delivers_is_a_gap() {
        let t = Instant::now();
        let mut s = stream(Path::Direct);
        for c in 0..5 {
            s.on_packet(Path::Direct, c, t);
        }
        s.set_target(Path::Server);
        // The direct leg closes; the server path's first packet is 8.
        s.switch(t, true);
        s.on_packet(Path::Server, 8, t);
        assert_eq!(s.gaps.len(), 1);
        assert_eq!(s.gaps[0].missing, 5..8);
        assert!(s.check_continuous(0..9).is_err());
        // Loss on a steady path is a gap too.
        let mut s = stream(Path::Server);
        for c in [0, 1, 3] {
            s.on_packet(Path::Server, c, t);
        }
        assert!(s.check_continuous(0..4).is_err());
    }

    #[test]
    fn summarizes_an_sdp() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=ice-lite\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=recvonly\r\na=rtpmap:111 opus/48000/2\r\n\
                   a=candidate:1 1 udp 1 127.0.0.1 5000 typ host\r\na=end-of-candidates\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\na=msid:p-1 t\r\n\
                   a=rtpmap:96 VP8/90000\r\na=ssrc:42 cname:x\r\n";
        let s = summarize_sdp(sdp);
        assert!(s.ice_lite && s.end_of_candidates);
        assert_eq!(s.candidates.len(), 1);
        assert_eq!(s.sections.len(), 2);
        assert_eq!(s.sections[0].direction, "recvonly");
        assert_eq!(s.sections[0].rtpmaps, vec![(111, "opus".to_owned())]);
        assert_eq!(s.sections[1].msid_stream.as_deref(), Some("p-1"));
        assert_eq!(s.sections[1].ssrcs, vec![42]);
    }
}
