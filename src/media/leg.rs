//! A server leg: the SFU's end of one participant's peer connection, a
//! sans-IO `rtc` peer connection that the SFU task feeds with datagrams and
//! drains of datagrams, events and media.
//!
//! Layout of every leg (the server always offers, see `docs/protocol.md`):
//! transceiver 0 receives the participant's audio, transceiver 1 its video
//! (the *publish* slots); then each other member of the room that holds the
//! publish grant has one audio and one video [`DownTrack`] (sendonly, msid
//! stream id = that member's participant id).
//!
//! Life: created → offered → (answer) connected ⇄ disconnected → closed.
//! A leg is never reused after it is closed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::interceptor::TaggedPacket;
use rtc::interceptor::{
    Attribute, Interceptor, NackGeneratorBuilder, NackResponderBuilder, Packet as IPacket,
    Registry, Slot, StreamInfo,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_rtcp_reports, configure_simulcast_extension_headers, configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::{
    MediaEngine, MIME_TYPE_OPUS, MIME_TYPE_VP8,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::rtp_transceiver::{
    RTCRtpReceiverId, RTCRtpSenderId, RTCRtpTransceiverDirection, RTCRtpTransceiverId,
    RTCRtpTransceiverInit,
};
use rtc::sansio::Protocol;

use super::forwarder::{DownTrackParams, Drop as FwdDrop, Forwarder, Verdict};
use super::speaker::LevelMeter;
use crate::signaling::protocol::LegState;

/// SRTP replay window (packets): as long as a publisher's NACK buffer
/// (browsers and rtc keep 1024 packets), so that its late retransmissions
/// are not refused as replays.
const SRTP_REPLAY_WINDOW: usize = 1024;
/// Packets each video downtrack keeps for retransmission (a power of two):
/// 3.3 s of 1.5 Mbit/s video, 0.8 s at 6 Mbit/s, far beyond what a NACK
/// can still repair in time. rtc's default is 1024, a slot array of about
/// 128 KiB per downtrack: most of a member's memory in a large room.
const NACK_BUFFER: u16 = 512;
/// rtc's own NACK buffer size (`NackResponderBuilder::default`).
pub(crate) const RTC_NACK_BUFFER: u16 = 1024;
/// SRTCP replay window (packets; the engine's default is 64).
const SRTCP_REPLAY_WINDOW: usize = 128;

/// Without STUN from the client for this long, a leg is `disconnected`.
const ICE_DISCONNECTED_AFTER: std::time::Duration = std::time::Duration::from_secs(15);
/// Without STUN for this long, a leg has `failed` (RFC 7675 consent: 30 s).
const ICE_FAILED_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// Payload type of Opus on every leg (the server offers, so it chooses).
pub const PT_OPUS: u8 = 111;
/// Payload type of VP8 on every leg.
pub const PT_VP8: u8 = 96;

/// Audio or video; indexes the publish slots and a member's downtracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Opus.
    Audio = 0,
    /// VP8.
    Video = 1,
}

impl Kind {
    /// Both kinds, in slot order.
    pub const ALL: [Kind; 2] = [Kind::Audio, Kind::Video];

    fn rtc(self) -> RtpCodecKind {
        match self {
            Kind::Audio => RtpCodecKind::Audio,
            Kind::Video => RtpCodecKind::Video,
        }
    }

    /// The payload type used for this kind.
    pub fn payload_type(self) -> u8 {
        match self {
            Kind::Audio => PT_OPUS,
            Kind::Video => PT_VP8,
        }
    }

    fn clock_rate(self) -> u32 {
        match self {
            Kind::Audio => 48_000,
            Kind::Video => 90_000,
        }
    }

    /// A label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Audio => "audio",
            Kind::Video => "video",
        }
    }
}

fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

fn vp8() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![RTCPFeedback {
            typ: "ccm".to_owned(),
            parameter: "fir".to_owned(),
        }],
    }
}

/// Marks inbound RTCP for delivery to the application: `rtc` keeps RTCP
/// to its interceptors unless one of them asks for it, and the SFU needs
/// subscribers' keyframe requests (and a load-test publisher its PLIs).
#[derive(Default)]
pub(crate) struct DeliverRtcp {
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for DeliverRtcp {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if matches!(msg.message.packet, IPacket::Rtcp(_)) {
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read.push_back(msg);
        Ok(())
    }
    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }
    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }
    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for DeliverRtcp {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

/// Slot of [`DeliverRtcp`] in the interceptor chain (after the built-in
/// ones, which keep seeing every RTCP packet).
pub(crate) const DELIVER_RTCP_SLOT: u32 = 14_000;

/// Slot of [`NackGuard`]: between the pacer (3 000) and the NACK responder
/// (4 000), so that it reads NACKs before the responder does and sees the
/// responder's retransmissions on their way to the wire.
const NACK_GUARD_SLOT: usize = 3_500;
/// Retransmission budget earned per original packet of a downtrack:
/// retransmissions stay at most half the media rate however many NACKs a
/// subscriber sends (5 % loss needs a tenth of it).
pub const RETRANSMIT_SHARE: f64 = 0.5;
/// The most retransmissions a downtrack may send at once (a burst loss of
/// 64 packets, about 0.4 s of 1.5 Mbit/s video, is recovered in one go).
pub const RETRANSMIT_BURST: f64 = 64.0;

/// Counters a leg's interceptors report into (clones of the server's
/// metrics; unregistered ones by default).
#[derive(Debug, Clone)]
pub struct LegCounters {
    /// NACK feedback packets received from the subscriber.
    pub nack: prometheus::IntCounter,
    /// Packets retransmitted in answer to NACKs.
    pub retransmitted: prometheus::IntCounter,
    /// Retransmissions dropped because the downtrack's budget was spent.
    pub retransmissions_dropped: prometheus::IntCounter,
}

impl Default for LegCounters {
    fn default() -> Self {
        let counter = |name: &str| prometheus::IntCounter::new(name, name).expect("valid name");
        LegCounters {
            nack: counter("nack"),
            retransmitted: counter("retransmitted"),
            retransmissions_dropped: counter("retransmissions_dropped"),
        }
    }
}

/// One outgoing SSRC as the guard sees it.
#[derive(Debug, Clone, Copy)]
struct GuardedStream {
    /// Highest sequence number sent (an older one is a retransmission).
    highest: u16,
    /// Retransmissions it may still send.
    tokens: f64,
}

/// Counts NACKs from the subscriber and bounds what the NACK responder
/// sends back: every outgoing RTP packet whose sequence number is not newer
/// than the highest one sent on its SSRC is a retransmission (the legs
/// negotiate no RTX), and passes only against the SSRC's budget
/// ([`RETRANSMIT_SHARE`] per original packet, at most [`RETRANSMIT_BURST`]
/// saved). NACKs for unknown SSRCs or audio never cost anything: the
/// responder keeps packets of NACK-capable (video) streams only.
///
/// The state is one entry per outgoing SSRC of the leg (two per other
/// member), removed when the engine unbinds the stream.
pub(crate) struct NackGuard {
    read: std::collections::VecDeque<TaggedPacket>,
    write: std::collections::VecDeque<TaggedPacket>,
    streams: HashMap<u32, GuardedStream>,
    counters: LegCounters,
    /// RTP and RTCP packets read (decrypted) so far; shared with the leg.
    reads: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl NackGuard {
    pub(crate) fn new(
        counters: LegCounters,
        reads: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> NackGuard {
        NackGuard {
            read: Default::default(),
            write: Default::default(),
            streams: HashMap::new(),
            counters,
            reads,
        }
    }

    /// Whether an outgoing RTP packet may go (and books it).
    fn admit(&mut self, ssrc: u32, sequence: u16) -> bool {
        let Some(s) = self.streams.get_mut(&ssrc) else {
            self.streams.insert(
                ssrc,
                GuardedStream {
                    highest: sequence,
                    tokens: RETRANSMIT_SHARE,
                },
            );
            return true;
        };
        let ahead = sequence.wrapping_sub(s.highest);
        if ahead != 0 && ahead < 0x8000 {
            s.highest = sequence;
            s.tokens = (s.tokens + RETRANSMIT_SHARE).min(RETRANSMIT_BURST);
            return true;
        }
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            self.counters.retransmitted.inc();
            true
        } else {
            self.counters.retransmissions_dropped.inc();
            false
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for NackGuard {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let IPacket::Rtcp(packets) = &msg.message.packet {
            let nacks = packets
                .iter()
                .filter(|p| {
                    p.as_any()
                        .downcast_ref::<rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack>()
                        .is_some()
                })
                .count();
            self.counters.nack.inc_by(nacks as u64);
        }
        self.read.push_back(msg);
        Ok(())
    }
    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let IPacket::Rtp(p) = &msg.message.packet {
            if !self.admit(p.header.ssrc, p.header.sequence_number) {
                return Ok(());
            }
        }
        self.write.push_back(msg);
        Ok(())
    }
    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }
    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for NackGuard {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.streams.remove(&info.ssrc);
    }
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

/// What became of one packet offered to one subscriber's downtrack
/// ([`Leg::forward`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// Rewritten and handed to the engine (interceptors, SRTP); its
    /// datagram is waiting in `poll_write`.
    Sent,
    /// This leg has no downtrack of that publisher, or it is not connected
    /// or not negotiated yet.
    NotReady,
    /// The downtrack waits for a keyframe: ask the publisher for one.
    WaitingForKeyframe,
    /// Held by Last-N: this subscriber does not receive this video now.
    Held,
    /// Dropped by the forwarder (too old) or refused by the engine.
    Dropped,
}

/// One publisher track as sent to this leg's participant.
#[derive(Debug)]
pub struct DownTrack {
    /// Sender on this leg.
    pub sender: RTCRtpSenderId,
    /// Track id (RTCP from the subscriber is tagged with it).
    pub track_id: String,
    /// Rewrites sequence numbers and timestamps.
    pub forwarder: Forwarder,
    /// Held by Last-N: nothing is forwarded until released (then from a
    /// keyframe, the numbering continuing).
    held: bool,
    /// Offer generation that first contained this downtrack.
    offered_in: u64,
}

/// The track a downtrack of `publisher`'s `kind` sends, with SSRC `ssrc`:
/// stream id = the publisher's participant id (what clients map tracks to
/// members by), track id `<publisher>-<kind>`. Returns the track id too.
fn downtrack_media(publisher: &str, kind: Kind, ssrc: u32) -> (String, MediaStreamTrack) {
    let track_id = format!("{publisher}-{}", kind.as_str());
    let codec = match kind {
        Kind::Audio => opus(),
        Kind::Video => vp8(),
    };
    let encodings = vec![RTCRtpEncodingParameters {
        rtp_coding_parameters: RTCRtpCodingParameters {
            ssrc: Some(ssrc),
            ..Default::default()
        },
        codec,
        ..Default::default()
    }];
    let track = MediaStreamTrack::new(
        publisher.to_owned(),
        track_id.clone(),
        track_id.clone(),
        kind.rtc(),
        encodings,
    );
    (track_id, track)
}

/// rtc's default interceptors (`register_default_interceptors`) with a
/// NACK buffer of `nack_buffer` packets per sender stream (a power of two;
/// rtc's default is [`RTC_NACK_BUFFER`], server legs use [`NACK_BUFFER`]):
/// the NACK responder, the NACK generator if `nack_generator` (NACK is
/// negotiated either way), the simulcast header extensions, TWCC feedback
/// to publishers, and RTCP reports.
pub(crate) fn default_interceptors(
    registry: Registry,
    media_engine: &mut MediaEngine,
    nack_buffer: u16,
    nack_generator: bool,
) -> Result<Registry, LegError> {
    for parameter in ["", "pli"] {
        media_engine.register_feedback(
            RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: parameter.to_owned(),
            },
            RtpCodecKind::Video,
        );
    }
    let mut registry = registry.with(
        Slot::NackResponder,
        NackResponderBuilder::new().with_size(nack_buffer).build(),
    );
    if nack_generator {
        registry = registry.with(Slot::NackGenerator, NackGeneratorBuilder::new().build());
    }
    configure_simulcast_extension_headers(media_engine).map_err(err)?;
    let registry = configure_twcc_receiver_only(registry, media_engine).map_err(err)?;
    Ok(configure_rtcp_reports(registry))
}

/// RFC 6464's header extension: the audio level of each packet.
pub const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// The id of the audio-level extension in the first audio section of a
/// client's answer (the publish slot: the server's offer puts it first and
/// offers the extension nowhere else). The answer repeats the offer's id
/// (RFC 8285), so this is what the client's packets carry.
fn audio_level_id(answer: &rtc::sdp::SessionDescription) -> Option<u8> {
    let audio = answer
        .media_descriptions
        .iter()
        .find(|m| m.media_name.media == "audio")?;
    audio
        .attributes
        .iter()
        .filter(|a| a.key == "extmap")
        .filter_map(|a| {
            let text = a.to_string();
            rtc::sdp::extmap::ExtMap::unmarshal(&mut text.as_bytes()).ok()
        })
        .find(|e| {
            e.uri
                .as_ref()
                .is_some_and(|u| u.as_str() == AUDIO_LEVEL_URI)
        })
        .and_then(|e| u8::try_from(e.value).ok())
        .filter(|id| (1..=14).contains(id))
}

/// A downtrack whose publisher left.
struct SpareTrack {
    kind: Kind,
    track: DownTrack,
    /// The offer generation that makes its section `inactive`; it is
    /// reused only once that offer has been answered.
    retired_in: u64,
}

/// The SFU's end of one participant's peer connection.
pub struct Leg {
    /// Whose leg.
    pub participant: String,
    /// Our ICE username fragment: routes STUN to this leg.
    pub ufrag: String,
    pc: RTCPeerConnection,
    publish: [RTCRtpTransceiverId; 2],
    /// The participant holds the publish grant: its media is forwarded.
    pub may_publish: bool,
    /// The participant holds the subscribe grant: without it nothing is
    /// forwarded to this leg (its downtracks stay silent).
    pub may_subscribe: bool,
    /// RTP and RTCP packets its engine decrypted (counted by [`NackGuard`]).
    reads: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Kinds of the participant's incoming tracks, by track id.
    inbound: HashMap<String, Kind>,
    /// Downtracks by publisher id, `[audio, video]`.
    pub downtracks: HashMap<String, [DownTrack; 2]>,
    /// Downtracks of departed publishers, their sections `inactive`,
    /// waiting to be reused for the next publisher of their kind (so that
    /// a long-lived member's offer does not grow with every departure).
    spare: Vec<SpareTrack>,
    /// Generation of the last offer sent; 0 before the first.
    offer_generation: u64,
    /// Generation of the last answer applied.
    answered_generation: u64,
    /// A membership change arrived while an offer was outstanding.
    renegotiate: bool,
    /// Current state, as reported to the room.
    pub state: LegState,
    /// Has been connected at least once (ICE and DTLS up, SRTP keys known).
    ever_connected: bool,
    /// The id under which the client's answer accepted the audio-level
    /// header extension on its audio (None: it sends no levels).
    audio_level_id: Option<u8>,
    /// Audio levels of the participant's packets since the speaker
    /// detector last looked.
    pub audio_levels: LevelMeter,
}

impl std::fmt::Debug for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leg")
            .field("participant", &self.participant)
            .field("ufrag", &self.ufrag)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Errors from the `rtc` engine, as text (they are reported, not matched).
pub type LegError = String;

fn err(e: impl std::fmt::Display) -> LegError {
    e.to_string()
}

fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    (0..len)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

impl Leg {
    /// Builds a leg for `participant` whose host candidate is `advertised`.
    /// With `gcm_only`, SRTP is AEAD_AES_128_GCM or nothing.
    pub fn new(
        participant: &str,
        advertised: SocketAddr,
        gcm_only: bool,
        now: Instant,
    ) -> Result<Leg, LegError> {
        Leg::with_counters(
            participant,
            advertised,
            gcm_only,
            true,
            LegCounters::default(),
            now,
        )
    }

    /// [`Leg::new`] whose interceptors count into `counters`; without
    /// `publish` (the participant's token lacks the publish grant) nothing
    /// the participant sends is taken as media. (The publish slots are
    /// still offered `recvonly`: offered `inactive`, the first section,
    /// which BUNDLE tags, left webrtc-rs clients unable to connect.)
    pub fn with_counters(
        participant: &str,
        advertised: SocketAddr,
        gcm_only: bool,
        publish: bool,
        counters: LegCounters,
        now: Instant,
    ) -> Result<Leg, LegError> {
        // The DTLS client's order decides among these (the browser is the
        // DTLS client here, and Chromium lists AES-CM first), so preferring
        // GCM is only possible by offering nothing else.
        let mut profiles = vec![SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm];
        if !gcm_only {
            profiles.push(SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80);
        }
        let ufrag = format!("cf{}", random_token(14));
        let setting_engine = SettingEngineBuilder::new()
            // The SFU answers checks and never gathers: ICE-lite.
            .with_lite(true)
            // We pick the ufrag, so STUN can be routed before any answer.
            .with_ice_credentials(ufrag.clone(), random_token(24))
            // GCM is about 4x cheaper per packet than AES-CM + SHA-1.
            .with_srtp_protection_profiles(profiles)
            // The engine declares a leg disconnected after this long without
            // STUN (media does not count), failed after the second. Clients
            // may space consent checks 4-6 s apart (RFC 7675) and consent
            // expires after 30 s: the defaults (5 s) flapped aiortc's legs.
            .with_ice_timeouts(Some(ICE_DISCONNECTED_AFTER), Some(ICE_FAILED_AFTER), None)
            // Replayed SRTP/SRTCP is refused within these windows. The
            // engine's default window is 64 packets (0.4 s of 1.5 Mbit/s
            // video): a publisher's retransmission answering the server's
            // NACK later than that would be refused as if replayed. The
            // SRTP window spans the NACK buffer instead.
            .with_srtp_replay_protection_window(SRTP_REPLAY_WINDOW)
            .with_srtcp_replay_protection_window(SRTCP_REPLAY_WINDOW)
            .build();
        let reads = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut media_engine = MediaEngine::default();
        for (kind, codec) in [(Kind::Audio, opus()), (Kind::Video, vp8())] {
            media_engine
                .register_codec(
                    RTCRtpCodecParameters {
                        rtp_codec: codec,
                        payload_type: kind.payload_type(),
                    },
                    kind.rtc(),
                )
                .map_err(err)?;
        }
        // Publishers' audio levels (RFC 6464) feed the speaker detector;
        // offered only where the server receives.
        media_engine
            .register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: AUDIO_LEVEL_URI.to_owned(),
                },
                RtpCodecKind::Audio,
                Some(RTCRtpTransceiverDirection::Recvonly),
            )
            .map_err(err)?;
        let registry = Registry::new()
            .with(
                Slot::from(DELIVER_RTCP_SLOT as usize),
                DeliverRtcp::default(),
            )
            .with(
                Slot::from(NACK_GUARD_SLOT),
                NackGuard::new(counters, reads.clone()),
            );
        let registry = default_interceptors(registry, &mut media_engine, NACK_BUFFER, true)?;
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(setting_engine)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .build(now)
            .map_err(err)?;
        let mut slots = [RTCRtpTransceiverId::default(); 2];
        for kind in Kind::ALL {
            slots[kind as usize] = pc
                .add_transceiver_from_kind(
                    kind.rtc(),
                    Some(RTCRtpTransceiverInit {
                        direction: RTCRtpTransceiverDirection::Recvonly,
                        streams: vec![],
                        send_encodings: vec![],
                    }),
                )
                .map_err(err)?;
        }
        let host = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: advertised.ip().to_string(),
                port: advertised.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()
        .map_err(err)?;
        pc.add_local_candidate(RTCIceCandidate::from(&host).to_json().map_err(err)?)
            .map_err(err)?;
        // An empty candidate ends gathering (and adds a=end-of-candidates).
        pc.add_local_candidate(RTCIceCandidateInit::default())
            .map_err(err)?;
        Ok(Leg {
            participant: participant.to_owned(),
            ufrag,
            pc,
            publish: slots,
            may_publish: publish,
            may_subscribe: true,
            reads,
            inbound: HashMap::new(),
            downtracks: HashMap::new(),
            spare: Vec::new(),
            offer_generation: 0,
            answered_generation: 0,
            renegotiate: false,
            state: LegState::Connecting,
            ever_connected: false,
            audio_level_id: None,
            audio_levels: LevelMeter::default(),
        })
    }

    /// The engine, for feeding and draining.
    pub fn pc(&mut self) -> &mut RTCPeerConnection {
        &mut self.pc
    }

    /// Which publish slot a receiver belongs to.
    pub fn publish_kind(&self, receiver: RTCRtpReceiverId) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| RTCRtpReceiverId::from(self.publish[*k as usize]) == receiver)
    }

    /// Records the kind of an incoming track (from its `OnTrack` event).
    pub fn note_inbound(&mut self, track_id: String, kind: Kind) {
        self.inbound.insert(track_id, kind);
    }

    /// The kind of an incoming track, if it is one of the publish slots.
    pub fn inbound_kind(&self, track_id: &str) -> Option<Kind> {
        self.inbound.get(track_id).copied()
    }

    /// Adds a sendonly audio and video downtrack for `publisher`.
    pub fn add_downtracks(&mut self, publisher: &str) -> Result<(), LegError> {
        if self.downtracks.contains_key(publisher) {
            return Ok(());
        }
        let make = |pc: &mut RTCPeerConnection, kind: Kind, generation: u64| {
            let ssrc = rand::random::<u32>() | 1;
            let (track_id, track) = downtrack_media(publisher, kind, ssrc);
            let encodings = track.codings().to_vec();
            let id = pc
                .add_transceiver_from_track(
                    track,
                    Some(RTCRtpTransceiverInit {
                        direction: RTCRtpTransceiverDirection::Sendonly,
                        streams: vec![publisher.to_owned()],
                        send_encodings: encodings,
                    }),
                )
                .map_err(err)?;
            Ok::<_, LegError>(DownTrack {
                sender: RTCRtpSenderId::from(id),
                track_id,
                held: false,
                forwarder: Forwarder::new(DownTrackParams {
                    ssrc,
                    payload_type: kind.payload_type(),
                    clock_rate: kind.clock_rate(),
                    video: kind == Kind::Video,
                }),
                offered_in: generation,
            })
        };
        let next = self.offer_generation + 1;
        let audio = match self.reuse(publisher, Kind::Audio, next)? {
            Some(t) => t,
            None => make(&mut self.pc, Kind::Audio, next)?,
        };
        let video = match self.reuse(publisher, Kind::Video, next)? {
            Some(t) => t,
            None => make(&mut self.pc, Kind::Video, next)?,
        };
        self.downtracks.insert(publisher.to_owned(), [audio, video]);
        Ok(())
    }

    /// Gives a spare downtrack of `kind` whose `inactive` state has been
    /// answered to `publisher`: same section (mid), sender and SSRC, a new
    /// track and stream id (`a=msid`), direction `sendonly` again. Its
    /// forwarder continues the sequence numbers and timestamps across the
    /// change of source and waits for the new publisher's keyframe.
    fn reuse(
        &mut self,
        publisher: &str,
        kind: Kind,
        generation: u64,
    ) -> Result<Option<DownTrack>, LegError> {
        let answered = self.answered_generation;
        let Some(i) = self
            .spare
            .iter()
            .position(|s| s.kind == kind && s.retired_in <= answered)
        else {
            return Ok(None);
        };
        let mut track = self.spare.swap_remove(i).track;
        let (track_id, media) = downtrack_media(publisher, kind, track.forwarder.params().ssrc);
        // Sending again first: rtc hands out a sender only for a
        // transceiver whose direction sends.
        if let Some(mut t) = self
            .pc
            .rtp_transceiver(RTCRtpTransceiverId::from(track.sender))
        {
            t.set_direction(RTCRtpTransceiverDirection::Sendonly);
        }
        let mut sender = self
            .pc
            .rtp_sender(track.sender)
            .ok_or_else(|| "a spare downtrack lost its sender".to_owned())?;
        sender.replace_track(media).map_err(err)?;
        sender.set_streams(vec![publisher.to_owned()]);
        track.track_id = track_id;
        track.offered_in = generation;
        track.held = false;
        // Nothing of the old publisher goes out meanwhile, and the first
        // packet of the new one continues the numbering.
        track.forwarder.pause();
        Ok(Some(track))
    }

    /// Stops the downtracks of `publisher`: their sections go `inactive` in
    /// the next offer and are kept for the next publisher (see `reuse`).
    /// Returns whether there were any (the leg then needs an offer).
    pub fn remove_downtracks(&mut self, publisher: &str) -> bool {
        let Some(tracks) = self.downtracks.remove(publisher) else {
            return false;
        };
        let retired_in = self.offer_generation + 1;
        for (kind, mut track) in [Kind::Audio, Kind::Video].into_iter().zip(tracks) {
            if let Some(mut t) = self
                .pc
                .rtp_transceiver(RTCRtpTransceiverId::from(track.sender))
            {
                t.set_direction(RTCRtpTransceiverDirection::Inactive);
            }
            track.forwarder.pause();
            self.spare.push(SpareTrack {
                kind,
                track,
                retired_in,
            });
        }
        true
    }

    /// Creates the next offer, unless one is outstanding (then the change
    /// is folded into the offer after the answer). Returns the SDP to send.
    pub fn negotiate(&mut self, now: Instant) -> Result<Option<String>, LegError> {
        if self.offer_generation > self.answered_generation {
            self.renegotiate = true;
            return Ok(None);
        }
        self.renegotiate = false;
        // Gathering is complete from the start (one host candidate); say so
        // again so that every offer, not just the first, carries
        // a=end-of-candidates.
        let _ = self.pc.add_local_candidate(RTCIceCandidateInit::default());
        let offer = self.pc.create_offer(None).map_err(err)?;
        self.pc.set_local_description(now, offer).map_err(err)?;
        self.offer_generation += 1;
        let sdp = self
            .pc
            .local_description()
            .map(|d| d.sdp)
            .ok_or_else(|| "no local description after offer".to_owned())?;
        Ok(Some(sdp))
    }

    /// Applies the client's answer. Returns a follow-up offer if changes
    /// arrived meanwhile.
    pub fn apply_answer(&mut self, sdp: String, now: Instant) -> Result<Option<String>, LegError> {
        if self.offer_generation == self.answered_generation {
            return Err("no offer is outstanding on this leg".to_owned());
        }
        let answer = RTCSessionDescription::answer(sdp).map_err(err)?;
        self.pc.set_remote_description(now, answer).map_err(err)?;
        self.answered_generation = self.offer_generation;
        self.audio_level_id = self
            .pc
            .remote_description()
            .and_then(|d| d.unmarshal().ok())
            .and_then(|d| audio_level_id(&d));
        if self.renegotiate {
            return self.negotiate(now);
        }
        Ok(None)
    }

    /// Records the audio level of one of the participant's audio packets,
    /// if it carries one.
    pub fn observe_audio_level(&mut self, header: &rtc::rtp::header::Header) {
        if let Some(level) = self
            .audio_level_id
            .and_then(|id| header.get_extension(id))
            .and_then(|b| b.first().copied())
        {
            self.audio_levels.observe(level);
        }
    }

    /// Adds a trickled candidate of the client (errors are harmless: ICE-lite
    /// learns the client's address from its checks anyway).
    pub fn add_remote_candidate(&mut self, init: RTCIceCandidateInit) {
        if let Err(e) = self.pc.add_remote_candidate(init) {
            tracing::debug!(participant = %self.participant, error = %e, "remote candidate ignored");
        }
    }

    /// Whether `downtrack` has been negotiated and can carry media.
    ///
    /// A leg that was connected and is now `disconnected` still gets media:
    /// its ICE agent counts only STUN as a sign of life, while a client may
    /// legitimately space its consent checks up to 6 s (RFC 7675) with
    /// media flowing all along; consent lasts 30 s.
    pub fn downtrack_ready(&self, downtrack: &DownTrack) -> bool {
        let reachable = match self.state {
            LegState::Connected => true,
            LegState::Disconnected => self.ever_connected,
            LegState::Connecting | LegState::Failed => false,
        };
        reachable && downtrack.offered_in <= self.answered_generation
    }

    /// RTP and RTCP packets read from the client so far (after SRTP): a
    /// datagram that leaves it unchanged produced nothing.
    pub fn packets_read(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the leg has been connected at least once.
    pub fn ever_connected(&self) -> bool {
        self.ever_connected
    }

    /// Records a new state reported by the engine.
    pub fn set_state(&mut self, state: LegState) {
        if state == LegState::Connected {
            self.ever_connected = true;
        }
        self.state = state;
    }

    /// Pauses every downtrack (forwarding stopped for the room): each
    /// resumes without a sequence hole.
    pub fn pause_downtracks(&mut self) {
        for tracks in self.downtracks.values_mut() {
            for t in tracks.iter_mut() {
                t.forwarder.pause();
            }
        }
    }

    /// Holds (Last-N) or releases the video of `publisher` on this leg.
    /// Returns whether it was released now (it then waits for a keyframe).
    pub fn hold_video(&mut self, publisher: &str, held: bool) -> bool {
        let Some(tracks) = self.downtracks.get_mut(publisher) else {
            return false;
        };
        let dt = &mut tracks[Kind::Video as usize];
        if dt.held == held {
            return false;
        }
        dt.held = held;
        // Held or released, the stream picks up from a keyframe with its
        // numbering continuous.
        dt.forwarder.pause();
        !held
    }

    /// The per-subscriber hot path: offers one of `publisher`'s packets to
    /// this leg's downtrack of that `kind`; on [`Verdict::Send`] rewrites
    /// SSRC, payload type, sequence number and timestamp in a clone of the
    /// packet (the payload is shared, not copied) and writes it to the
    /// sender, which runs the interceptors and SRTP. `micros` is a
    /// monotonic clock reading for the forwarder.
    pub fn forward(
        &mut self,
        publisher: &str,
        kind: Kind,
        packet: &rtc::rtp::Packet,
        keyframe: bool,
        now: Instant,
        micros: u64,
    ) -> Forwarded {
        let Some(tracks) = self.downtracks.get(publisher) else {
            return Forwarded::NotReady;
        };
        if !self.downtrack_ready(&tracks[kind as usize]) {
            // Whatever is skipped now must not become a hole later.
            if let Some(tracks) = self.downtracks.get_mut(publisher) {
                tracks[kind as usize].forwarder.pause();
            }
            return Forwarded::NotReady;
        }
        let Some(tracks) = self.downtracks.get_mut(publisher) else {
            return Forwarded::NotReady;
        };
        let dt = &mut tracks[kind as usize];
        if dt.held {
            return Forwarded::Held;
        }
        let h = &packet.header;
        match dt
            .forwarder
            .forward(h.ssrc, h.sequence_number, h.timestamp, keyframe, micros)
        {
            Verdict::Send {
                sequence,
                timestamp,
            } => {
                let params = dt.forwarder.params();
                let sender = dt.sender;
                let mut packet = packet.clone();
                packet.header.ssrc = params.ssrc;
                packet.header.payload_type = params.payload_type;
                packet.header.sequence_number = sequence;
                packet.header.timestamp = timestamp;
                let Some(mut s) = self.pc.rtp_sender(sender) else {
                    return Forwarded::Dropped;
                };
                match s.write_rtp(now, packet) {
                    Ok(()) => Forwarded::Sent,
                    Err(e) => {
                        tracing::trace!(error = %e, "write_rtp failed");
                        Forwarded::Dropped
                    }
                }
            }
            Verdict::Drop(FwdDrop::WaitingForKeyframe) => Forwarded::WaitingForKeyframe,
            Verdict::Drop(FwdDrop::TooOld) => Forwarded::Dropped,
        }
    }

    /// Asks the participant for a keyframe on its published video.
    pub fn request_keyframe(&mut self, now: Instant) {
        let receiver = RTCRtpReceiverId::from(self.publish[Kind::Video as usize]);
        if let Some(mut r) = self.pc.rtp_receiver(receiver) {
            let Some(media_ssrc) = r.track().ssrcs().last() else {
                return;
            };
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc,
            };
            if let Err(e) = r.write_rtcp(now, vec![Box::new(pli)]) {
                tracing::debug!(participant = %self.participant, error = %e, "PLI not sent");
            }
        }
    }

    /// Maps the engine's connection state to the protocol's leg state;
    /// `None` for states not reported.
    pub fn leg_state(state: RTCPeerConnectionState) -> Option<LegState> {
        match state {
            RTCPeerConnectionState::New | RTCPeerConnectionState::Connecting => {
                Some(LegState::Connecting)
            }
            RTCPeerConnectionState::Connected => Some(LegState::Connected),
            RTCPeerConnectionState::Disconnected => Some(LegState::Disconnected),
            RTCPeerConnectionState::Failed => Some(LegState::Failed),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interceptors_are_rtcs_defaults_with_a_smaller_nack_buffer() {
        use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
        // The same chain and the same negotiated feedback and extensions as
        // rtc's defaults: compare the registries and an offer of each.
        let offer = |custom: bool| {
            let mut me = MediaEngine::default();
            me.register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: vp8(),
                    payload_type: PT_VP8,
                },
                RtpCodecKind::Video,
            )
            .unwrap();
            let registry = if custom {
                default_interceptors(Registry::new(), &mut me, NACK_BUFFER, true).unwrap()
            } else {
                register_default_interceptors(Registry::new(), &mut me).unwrap()
            };
            let slots = registry.slots();
            let mut pc = RTCPeerConnectionBuilder::new()
                .with_media_engine(me)
                .with_interceptor_registry(registry)
                .build(Instant::now())
                .unwrap();
            pc.add_transceiver_from_kind(RtpCodecKind::Video, None)
                .unwrap();
            let sdp = pc.create_offer(None).unwrap().sdp;
            // (rtc writes the extensions in hash order.)
            let mut negotiated: Vec<String> = sdp
                .lines()
                .filter(|l| l.starts_with("a=rtcp-fb") || l.starts_with("a=extmap"))
                .map(str::to_owned)
                .collect();
            negotiated.sort();
            (slots, negotiated)
        };
        let (ours, theirs) = (offer(true), offer(false));
        assert_eq!(ours.0, theirs.0, "the same interceptors in the same order");
        assert_eq!(ours.1, theirs.1, "the same feedback and header extensions");
        assert!(ours.1.iter().any(|l| l.ends_with(" nack")), "{:?}", ours.1);
    }

    fn guard() -> NackGuard {
        NackGuard::new(LegCounters::default(), Default::default())
    }

    /// Sends `n` original packets on `ssrc` from `first`; returns the next
    /// sequence number.
    fn originals(g: &mut NackGuard, ssrc: u32, first: u16, n: u16) -> u16 {
        for i in 0..n {
            assert!(g.admit(ssrc, first.wrapping_add(i)), "original {i}");
        }
        first.wrapping_add(n)
    }

    #[test]
    fn retransmissions_are_capped_at_half_the_media_packets() {
        let mut g = guard();
        let next = originals(&mut g, 7, 1000, 100);
        // A storm asking for the same recent packets again and again.
        let passed = (0..1000)
            .filter(|i| g.admit(7, next - 1 - (i % 17) as u16))
            .count();
        assert_eq!(passed, 50, "0.5 per original packet");
        assert_eq!(g.counters.retransmitted.get(), 50);
        assert_eq!(g.counters.retransmissions_dropped.get(), 950);
        // The budget refills only with media.
        originals(&mut g, 7, next, 10);
        assert_eq!((0..100).filter(|_| g.admit(7, next)).count(), 5);
    }

    #[test]
    fn the_saved_budget_is_bounded_by_the_burst() {
        let mut g = guard();
        let next = originals(&mut g, 7, 0, 10_000);
        let passed = (0..1000).filter(|_| g.admit(7, next - 5)).count();
        assert_eq!(passed, RETRANSMIT_BURST as usize);
    }

    #[test]
    fn sequence_wrap_is_media_not_retransmission() {
        let mut g = guard();
        originals(&mut g, 7, 65_500, 100); // crosses 65535 -> 0
        assert_eq!(g.counters.retransmitted.get(), 0);
        assert_eq!(g.counters.retransmissions_dropped.get(), 0);
        assert_eq!(g.streams[&7].highest, 65_500u16.wrapping_add(99));
    }

    #[test]
    fn budgets_are_per_ssrc_and_state_is_one_entry_per_ssrc() {
        let mut g = guard();
        let next = originals(&mut g, 1, 0, 10);
        originals(&mut g, 2, 0, 1000);
        // SSRC 1's budget (5) is not SSRC 2's (64).
        assert_eq!((0..100).filter(|_| g.admit(1, next - 1)).count(), 5);
        assert_eq!(g.streams.len(), 2);
        g.unbind_local_stream(&StreamInfo {
            ssrc: 1,
            ..Default::default()
        });
        assert_eq!(g.streams.len(), 1);
    }

    #[test]
    fn nacks_are_counted_and_passed_on() {
        use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};
        let mut g = guard();
        let nack = |ssrc| -> Box<dyn rtc::rtcp::Packet> {
            Box::new(TransportLayerNack {
                sender_ssrc: 0,
                media_ssrc: ssrc,
                nacks: vec![NackPair {
                    packet_id: 1,
                    lost_packets: 0xffff,
                }],
            })
        };
        let msg = TaggedPacket {
            now: Instant::now(),
            transport: Default::default(),
            message: rtc::interceptor::AttributedPacket::new(IPacket::Rtcp(vec![
                nack(1),
                nack(2),
                Box::new(PictureLossIndication::default()),
            ])),
        };
        g.handle_read(msg).unwrap();
        assert_eq!(g.counters.nack.get(), 2);
        assert!(g.poll_read().is_some(), "the responder still sees them");
    }
}
