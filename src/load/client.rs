//! One load-test participant's WebRTC endpoint: a sans-IO `rtc` peer
//! connection (the same engine as the server's legs) that answers the
//! server's offers on its server leg, publishes up to one audio and one
//! video track, and hands back every decrypted RTP packet.
//!
//! The endpoint does no I/O: the caller feeds it datagrams and timeouts and
//! sends what [`Endpoint::pc`]'s `poll_write` yields. The load generator
//! drives it over UDP sockets, the benchmarks over memory.
//!
//! ## Payload layout
//!
//! ```text
//! [VP8 descriptor + frame header | nothing for audio][b"CFLD"][tag u32][seq u32][sent_us u64][filler]
//! ```
//!
//! `tag` names the publishing track, `seq` counts its packets from 0, and
//! `sent_us` is the sender's clock (microseconds since the generator's
//! epoch), so that a receiver in the same process measures the one-way
//! delay. The VP8 prefix marks the first packet of a keyframe the way the
//! SFU's parser expects (`media::vp8`), so downtracks start on it.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::interceptor::{Registry, Slot};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{
    MediaEngine, MIME_TYPE_OPUS, MIME_TYPE_VP8,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use rtc::rtp_transceiver::RTCRtpSenderId;

use crate::media::leg::{
    default_interceptors, DeliverRtcp, Kind, DELIVER_RTCP_SLOT, RTC_NACK_BUFFER,
};

/// Magic after the codec prefix of every load payload.
pub const MAGIC: [u8; 4] = *b"CFLD";
/// Bytes of magic, tag, sequence number and send time.
pub const STAMP_LEN: usize = 20;

/// VP8 payload descriptor (S=1, partition 0) and a keyframe header (P=0,
/// start code 9d 01 2a, 320x180).
pub const VP8_KEYFRAME: [u8; 11] = [
    0x10, 0x10, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x40, 0x01, 0xb4, 0x00,
];
/// VP8 payload descriptor (S=1) and an interframe header (P=1).
pub const VP8_DELTA_START: [u8; 11] = [
    0x10, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];
/// VP8 payload descriptor of a packet inside a frame (S=0).
pub const VP8_CONTINUATION: [u8; 1] = [0x00];

/// What a video packet is within its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramePart {
    /// First packet of a keyframe.
    KeyframeStart,
    /// First packet of an interframe.
    DeltaStart,
    /// Any later packet of a frame.
    Continuation,
    /// Audio: no codec prefix.
    Audio,
}

impl FramePart {
    fn prefix(self) -> &'static [u8] {
        match self {
            FramePart::KeyframeStart => &VP8_KEYFRAME,
            FramePart::DeltaStart => &VP8_DELTA_START,
            FramePart::Continuation => &VP8_CONTINUATION,
            FramePart::Audio => &[],
        }
    }
}

/// The stamp a receiver reads back from a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The publishing track.
    pub tag: u32,
    /// Its packet count.
    pub seq: u32,
    /// Send time, microseconds since the generator's epoch.
    pub sent_us: u64,
}

/// Builds a payload of `len` bytes (at least prefix + [`STAMP_LEN`]).
pub fn encode_payload(part: FramePart, stamp: Stamp, len: usize) -> Bytes {
    let prefix = part.prefix();
    let len = len.max(prefix.len() + STAMP_LEN);
    let mut buf = BytesMut::with_capacity(len);
    buf.put_slice(prefix);
    buf.put_slice(&MAGIC);
    buf.put_u32(stamp.tag);
    buf.put_u32(stamp.seq);
    buf.put_u64(stamp.sent_us);
    buf.resize(len, 0x5a);
    buf.freeze()
}

/// Finds the stamp in a payload written by [`encode_payload`].
pub fn decode_payload(payload: &[u8]) -> Option<Stamp> {
    // The prefix is 0, 1 or 11 bytes; the magic says which.
    for at in [0usize, 1, 11] {
        let Some(rest) = payload.get(at..at + STAMP_LEN) else {
            continue;
        };
        if rest[..4] == MAGIC {
            let tag = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]);
            let seq = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&rest[12..20]);
            return Some(Stamp {
                tag,
                seq,
                sent_us: u64::from_be_bytes(sent),
            });
        }
    }
    None
}

/// Which SRTP profile the endpoint offers in its DTLS handshake (as the
/// DTLS client, its choice wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SrtpChoice {
    /// AEAD_AES_128_GCM (what `--srtp-gcm-only` enforces).
    Gcm,
    /// AES_CM_128_HMAC_SHA1_80 (what Chromium picks when offered both).
    AesCm,
}

impl std::str::FromStr for SrtpChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gcm" => Ok(SrtpChoice::Gcm),
            "aes-cm" => Ok(SrtpChoice::AesCm),
            _ => Err(format!("unknown SRTP profile {s:?} (gcm or aes-cm)")),
        }
    }
}

struct Track {
    sender: RTCRtpSenderId,
    ssrc: u32,
    seq: u16,
}

/// A participant's end of its server leg. See the module docs.
pub struct Endpoint {
    pc: RTCPeerConnection,
    local: SocketAddr,
    tracks: [Option<Track>; 2],
    answered: u32,
    candidate_added: bool,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("local", &self.local)
            .field("answered", &self.answered)
            .finish_non_exhaustive()
    }
}

fn codec(kind: Kind) -> RTCRtpCodec {
    match kind {
        Kind::Audio => RTCRtpCodec {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: vec![],
        },
        Kind::Video => RTCRtpCodec {
            mime_type: MIME_TYPE_VP8.to_owned(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![],
        },
    }
}

fn rtc_kind(kind: Kind) -> RtpCodecKind {
    match kind {
        Kind::Audio => RtpCodecKind::Audio,
        Kind::Video => RtpCodecKind::Video,
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Endpoint {
    /// An endpoint whose host candidate is `local`, publishing the kinds
    /// in `publish` (`[audio, video]`), with `rtc`'s default interceptors.
    pub fn new(
        name: &str,
        local: SocketAddr,
        publish: [bool; 2],
        srtp: SrtpChoice,
        now: Instant,
    ) -> Result<Endpoint, String> {
        Endpoint::with_nack(name, local, publish, srtp, true, now)
    }

    /// As [`Endpoint::new`]; without `nack` the endpoint never asks for
    /// retransmissions (for a receiver that decrypts only some packets:
    /// the skipped ones would look lost).
    pub fn with_nack(
        name: &str,
        local: SocketAddr,
        publish: [bool; 2],
        srtp: SrtpChoice,
        nack: bool,
        now: Instant,
    ) -> Result<Endpoint, String> {
        let profile = match srtp {
            SrtpChoice::Gcm => SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
            SrtpChoice::AesCm => SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
        };
        let setting_engine = SettingEngineBuilder::new()
            .with_srtp_protection_profiles(vec![profile])
            .build();
        let mut media_engine = MediaEngine::default();
        for kind in Kind::ALL {
            media_engine
                .register_codec(
                    RTCRtpCodecParameters {
                        rtp_codec: codec(kind),
                        payload_type: kind.payload_type(),
                    },
                    rtc_kind(kind),
                )
                .map_err(err)?;
        }
        let registry = Registry::new().with(
            Slot::from(DELIVER_RTCP_SLOT as usize),
            DeliverRtcp::default(),
        );
        // rtc's defaults; without `nack`, less the NACK generator: NACK is
        // still negotiated (so the server buffers for retransmission as it
        // does for a browser), it is just never asked for.
        let registry = default_interceptors(registry, &mut media_engine, RTC_NACK_BUFFER, nack)?;
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(setting_engine)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .build(now)
            .map_err(err)?;
        // Tracks added before the first offer is applied take its first
        // audio and video sections: the leg's publish slots.
        let mut tracks: [Option<Track>; 2] = [None, None];
        for kind in Kind::ALL {
            if !publish[kind as usize] {
                continue;
            }
            let ssrc = rand::random::<u32>() | 1;
            let id = format!("{name}-{}", kind.as_str());
            let track = MediaStreamTrack::new(
                name.to_owned(),
                id.clone(),
                id,
                rtc_kind(kind),
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: codec(kind),
                    ..Default::default()
                }],
            );
            let sender = pc.add_track(track).map_err(err)?;
            tracks[kind as usize] = Some(Track {
                sender,
                ssrc,
                seq: rand::random(),
            });
        }
        Ok(Endpoint {
            pc,
            local,
            tracks,
            answered: 0,
            candidate_added: false,
        })
    }

    /// The engine, for feeding and draining.
    pub fn pc(&mut self) -> &mut RTCPeerConnection {
        &mut self.pc
    }

    /// The endpoint's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    fn add_host_candidate(&mut self) -> Result<(), String> {
        if self.candidate_added {
            return Ok(());
        }
        self.candidate_added = true;
        let host = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: self.local.ip().to_string(),
                port: self.local.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()
        .map_err(err)?;
        self.pc
            .add_local_candidate(RTCIceCandidate::from(&host).to_json().map_err(err)?)
            .map_err(err)?;
        self.pc
            .add_local_candidate(RTCIceCandidateInit::default())
            .map_err(err)?;
        Ok(())
    }

    /// Creates an offer (for a server that answers, as Janus does for
    /// publishers) and returns its SDP, with this endpoint's candidate.
    pub fn offer(&mut self, now: Instant) -> Result<String, String> {
        self.add_host_candidate()?;
        let offer = self.pc.create_offer(None).map_err(err)?;
        self.pc.set_local_description(now, offer).map_err(err)?;
        self.pc
            .local_description()
            .map(|d| d.sdp)
            .ok_or_else(|| "no local description after offer".to_owned())
    }

    /// Applies the answer to [`Endpoint::offer`].
    pub fn accept_answer(&mut self, sdp: String, now: Instant) -> Result<(), String> {
        let answer = RTCSessionDescription::answer(sdp).map_err(err)?;
        self.pc.set_remote_description(now, answer).map_err(err)
    }

    /// Adds a trickled candidate of the remote end.
    pub fn add_remote_candidate(&mut self, init: RTCIceCandidateInit) -> Result<(), String> {
        self.pc.add_remote_candidate(init).map_err(err)
    }

    /// Applies an offer from the server and returns the answer's SDP.
    pub fn answer(&mut self, offer_sdp: String, now: Instant) -> Result<String, String> {
        let offer = RTCSessionDescription::offer(offer_sdp).map_err(err)?;
        self.pc.set_remote_description(now, offer).map_err(err)?;
        self.add_host_candidate()?;
        let answer = self.pc.create_answer(None).map_err(err)?;
        self.pc.set_local_description(now, answer).map_err(err)?;
        self.answered += 1;
        self.pc
            .local_description()
            .map(|d| d.sdp)
            .ok_or_else(|| "no local description after answer".to_owned())
    }

    /// Whether this endpoint publishes `kind`.
    pub fn publishes(&self, kind: Kind) -> bool {
        self.tracks[kind as usize].is_some()
    }

    /// Sends one RTP packet of `kind` (which must be published) with
    /// `payload`, RTP timestamp `timestamp` and marker bit `marker`.
    pub fn send(
        &mut self,
        kind: Kind,
        payload: Bytes,
        timestamp: u32,
        marker: bool,
        now: Instant,
    ) -> Result<(), String> {
        let Some(track) = self.tracks[kind as usize].as_mut() else {
            return Err(format!("no {} track", kind.as_str()));
        };
        track.seq = track.seq.wrapping_add(1);
        let packet = rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                marker,
                payload_type: kind.payload_type(),
                sequence_number: track.seq,
                timestamp,
                ssrc: track.ssrc,
                ..Default::default()
            },
            payload,
        };
        let sender = track.sender;
        let mut s = self
            .pc
            .rtp_sender(sender)
            .ok_or_else(|| "sender is gone".to_owned())?;
        s.write_rtp(now, packet).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip_and_keyframe_marking() {
        let stamp = Stamp {
            tag: 7,
            seq: 42,
            sent_us: 123_456_789,
        };
        for part in [
            FramePart::KeyframeStart,
            FramePart::DeltaStart,
            FramePart::Continuation,
            FramePart::Audio,
        ] {
            let p = encode_payload(part, stamp, 1188);
            assert_eq!(p.len(), 1188);
            assert_eq!(decode_payload(&p), Some(stamp), "{part:?}");
            assert_eq!(
                crate::media::vp8::is_keyframe(&p),
                part == FramePart::KeyframeStart,
                "{part:?}"
            );
        }
        // Too short for the stamp: grows to the minimum.
        assert_eq!(encode_payload(FramePart::Audio, stamp, 3).len(), STAMP_LEN);
        assert_eq!(decode_payload(b"short"), None);
    }
}
