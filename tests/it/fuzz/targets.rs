//! The fuzz targets: one function per parser Confab owns, bytes in, a panic
//! on any broken property. The stable-toolchain driver (`super`) feeds them
//! seeded mutations; the corpus replay feeds them `tests/corpus/<target>/`;
//! a cargo-fuzz harness can call them unchanged.
//!
//! Each target checks what its parser promises, not only that it returns:
//! header arithmetic against the bytes, error classification, signatures,
//! and for the forwarder a model of the downtrack's output stream.

use std::time::{Duration, UNIX_EPOCH};

use arbitrary::Unstructured;
use base64::Engine as _;

use confab::auth;
use confab::media::forwarder::{DownTrackParams, Drop, Forwarder, Verdict};
use confab::media::{rtp, stun as ice, vp8};
use confab::signaling::protocol::{self, ClientMessage, ErrorCode, MediaMode};
use confab::turn_server::credentials;
use confab::turn_server::{GateCheck, PeerPolicy, TurnSettings, Verdict as GateVerdict};
use stun::message::Message as StunMessage;

/// A target: panics when a property does not hold.
pub type Target = fn(&[u8]);

/// Every target by name (its corpus directory under `tests/corpus/`).
pub const TARGETS: &[(&str, Target)] = &[
    ("rtp_header", rtp_header),
    ("vp8_keyframe", vp8_keyframe),
    ("stun_ufrag", stun_ufrag),
    ("signaling", signaling),
    ("join_token", join_token),
    ("turn_username", turn_username),
    ("forwarder", forwarder),
    ("rtp_forward", rtp_forward),
    ("turn_gate", turn_gate),
];

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `rtp::parse` and `rtp::rewrite`: the header it reports is the one in the
/// bytes, every error is the right one, the payload lies inside the packet,
/// and a rewrite changes the four rewritten fields and nothing else.
pub fn rtp_header(data: &[u8]) {
    let parsed = rtp::parse(data);
    check_rtp(data, parsed);
    if let Ok(h) = parsed {
        // Rewrite with values taken from the packet itself.
        let (pt, seq, ts, ssrc) = (
            data[data.len() - 1],
            h.sequence.rotate_left(3) ^ 0x5a5a,
            !h.timestamp,
            h.ssrc.wrapping_mul(2_654_435_761),
        );
        let mut out = data.to_vec();
        rtp::rewrite(&mut out, pt, seq, ts, ssrc);
        let r = rtp::parse(&out).expect("a rewritten packet still parses");
        assert_eq!(
            (r.marker, r.payload_offset, r.payload_len),
            (h.marker, h.payload_offset, h.payload_len),
            "rewrite keeps marker and payload position"
        );
        assert_eq!(
            (r.payload_type, r.sequence, r.timestamp, r.ssrc),
            (pt & 0x7f, seq, ts, ssrc)
        );
        assert_eq!(out[0], data[0]);
        assert_eq!(out[12..], data[12..], "CSRCs, extension, payload, padding");
    }
}

/// The properties of one `rtp::parse` result against the bytes.
fn check_rtp(data: &[u8], parsed: Result<rtp::RtpHeader, rtp::RtpError>) {
    use rtp::RtpError::*;
    if data.len() < 12 {
        assert_eq!(parsed, Err(TooShort));
        return;
    }
    if data[0] >> 6 != 2 {
        assert_eq!(parsed, Err(BadVersion));
        return;
    }
    let (padding, extension, cc) = (data[0] & 0x20 != 0, data[0] & 0x10 != 0, data[0] & 0x0f);
    let mut header = 12 + 4 * usize::from(cc);
    if extension {
        if data.len() < header + 4 {
            assert_eq!(parsed, Err(HeaderOverrun), "extension header cut off");
            return;
        }
        header += 4 + 4 * usize::from(be16(data, header + 2));
    }
    match parsed {
        Err(HeaderOverrun) => assert!(header > data.len(), "overrun claimed at {header}"),
        Err(BadPadding) => {
            assert!(header <= data.len() && padding);
            let pad = usize::from(data[data.len() - 1]);
            assert!(
                pad == 0 || pad > data.len() - header,
                "padding {pad} is fine"
            );
        }
        Err(e) => panic!("{e:?} for a long enough version-2 packet"),
        Ok(h) => {
            assert_eq!(h.payload_offset, header);
            let end = h.payload_offset + h.payload_len;
            assert!(end <= data.len(), "payload past the end");
            if padding {
                let pad = usize::from(data[data.len() - 1]);
                assert!(pad >= 1 && end + pad == data.len(), "padding {pad}");
            } else {
                assert_eq!(end, data.len());
            }
            assert_eq!(h.marker, data[1] & 0x80 != 0);
            assert_eq!(h.payload_type, data[1] & 0x7f);
            assert_eq!(h.sequence, be16(data, 2));
            assert_eq!(h.timestamp, be32(data, 4));
            assert_eq!(h.ssrc, be32(data, 8));
        }
    }
}

/// `vp8::is_keyframe`: only the first packet of partition 0 of a frame can
/// start a keyframe; the verdict depends on at most the first 7 bytes (the
/// longest payload descriptor plus the payload header), so nothing past
/// them is read, and a longer payload never turns a verdict around.
pub fn vp8_keyframe(data: &[u8]) {
    let key = vp8::is_keyframe(data);
    if key {
        assert!(data[0] & 0x10 != 0 && data[0] & 0x07 == 0, "S=1, PID=0");
        // Payload descriptor length, RFC 7741 §4.2.
        let mut at = 1;
        if data[0] & 0x80 != 0 {
            let x = data[1];
            at += 1;
            if x & 0x80 != 0 {
                at += if data[at] & 0x80 != 0 { 2 } else { 1 };
            }
            at += usize::from(x & 0x40 != 0) + usize::from(x & 0x30 != 0);
        }
        assert_eq!(data[at] & 0x01, 0, "P bit of the VP8 payload header");
    }
    assert_eq!(key, vp8::is_keyframe(&data[..data.len().min(7)]));
    let mut seen = false;
    for k in 0..=data.len().min(7) {
        let prefix = vp8::is_keyframe(&data[..k]);
        assert!(!seen || prefix, "verdict flipped back at {k} bytes");
        seen |= prefix;
    }
}

/// `stun::is_stun` and `stun::local_ufrag`, the SFU's routing of STUN: the
/// first is RFC 7983's test, the second answers only for a whole Binding
/// request and returns the part before `:` of its first USERNAME; whatever
/// the `stun` crate (what the ICE agent decodes with) finds, it finds too.
pub fn stun_ufrag(data: &[u8]) {
    let stun = data.len() >= 20 && data[0] < 4 && data[4..8] == [0x21, 0x12, 0xa4, 0x42];
    assert_eq!(ice::is_stun(data), stun);
    let ufrag = ice::local_ufrag(data);
    if let Some(u) = ufrag {
        assert!(stun, "ufrag from a non-STUN datagram");
        assert_eq!(be16(data, 0), 0x0001, "ufrag from a non-Binding-request");
        let len = usize::from(be16(data, 2));
        assert!(len % 4 == 0 && 20 + len == data.len(), "message length");
        assert!(!u.contains(':'));
        // The first USERNAME attribute, walked independently.
        let mut at = 20;
        let username = loop {
            assert!(at + 4 <= data.len(), "no USERNAME, yet {u:?}");
            let (kind, vlen) = (be16(data, at), usize::from(be16(data, at + 2)));
            if kind == 0x0006 {
                break &data[at + 4..at + 4 + vlen];
            }
            at += 4 + vlen.div_ceil(4) * 4;
        };
        let username = std::str::from_utf8(username).expect("USERNAME is UTF-8");
        assert_eq!(username.split(':').next(), Some(u));
    }
    // Differential: a Binding request the `stun` crate decodes, with a
    // UTF-8 USERNAME, is routed by that username's local part.
    if stun && be16(data, 0) == 0x0001 && usize::from(be16(data, 2)) + 20 == data.len() {
        let mut m = ::stun::message::Message::new();
        m.raw = data.to_vec();
        if m.decode().is_ok() {
            if let Ok(v) = m.get(::stun::attributes::ATTR_USERNAME) {
                if let Ok(s) = std::str::from_utf8(&v) {
                    assert_eq!(ufrag, s.split(':').next(), "stun crate disagrees");
                }
            }
        }
    }
}

/// `protocol::parse_client_message` on any text frame: a typed message of
/// the type the frame names, or exactly one of the three parse error codes
/// as `docs/protocol.md` assigns them, with a bounded detail.
pub fn signaling(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let result = protocol::parse_client_message(&text);
    let value = serde_json::from_str::<serde_json::Value>(&text).ok();
    let object = value.as_ref().and_then(|v| v.as_object());
    let ty = object.and_then(|o| o.get("type")).and_then(|t| t.as_str());
    match result {
        Ok(m) => {
            let name = match &m {
                ClientMessage::Join { .. } => "join",
                ClientMessage::Offer { sdp, .. } | ClientMessage::Answer { sdp, .. } => {
                    assert!(sdp.lines().count() <= protocol::MAX_SDP_LINES);
                    if matches!(m, ClientMessage::Offer { .. }) {
                        "offer"
                    } else {
                        "answer"
                    }
                }
                ClientMessage::Candidate { .. } => "candidate",
                ClientMessage::MediaState { .. } => "media_state",
                ClientMessage::MediaReady { .. } => "media_ready",
                ClientMessage::P2pFailed => "p2p_failed",
                ClientMessage::SwitchReport { to, gap_ms, .. } => {
                    assert!(matches!(to, MediaMode::Sfu | MediaMode::P2p), "{to:?}");
                    assert!((0.0..=protocol::MAX_SWITCH_GAP_MS).contains(gap_ms));
                    "switch_report"
                }
                ClientMessage::Chat { text, .. } => {
                    assert!(!text.trim().is_empty(), "blank chat accepted");
                    assert!(text.chars().count() <= protocol::MAX_CHAT_CHARS);
                    "chat"
                }
                ClientMessage::Ping { .. } => "ping",
                ClientMessage::Leave => "leave",
            };
            assert_eq!(ty, Some(name), "message of another type than named");
        }
        Err(e) => {
            let expected = if object.is_none() {
                ErrorCode::BadJson
            } else if !ty.is_some_and(|t| protocol::CLIENT_MESSAGE_TYPES.contains(&t)) {
                ErrorCode::UnknownType
            } else {
                ErrorCode::BadMessage
            };
            assert_eq!(e.code, expected, "{}", e.detail);
            assert!(
                e.detail.len() <= protocol::MAX_ERROR_DETAIL,
                "detail of {} bytes echoed back",
                e.detail.len()
            );
        }
    }
}

/// The secret the join-token target's tokens are signed with.
pub const TOKEN_SECRET: &str = "fuzz-secret-0123456789";
/// The room the join-token target joins.
pub const TOKEN_ROOM: &str = "r1";

/// `auth::verify` on any token: no token reaches the claim checks
/// (expiry, room) or is accepted without an HS256 signature over its exact
/// header and payload; the algorithm error only for a header naming
/// another algorithm; an accepted token is for the room and is current.
pub fn join_token(data: &[u8]) {
    let token = String::from_utf8_lossy(data);
    let result = auth::verify(TOKEN_SECRET, &token, TOKEN_ROOM);
    let signed = || {
        let Some((message, signature)) = token.rsplit_once('.') else {
            return false;
        };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, TOKEN_SECRET.as_bytes());
        let tag = ring::hmac::sign(&key, message.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag) == signature
    };
    match result {
        Ok(claims) => {
            assert!(signed(), "accepted without a valid signature");
            assert_eq!(claims.room, TOKEN_ROOM);
            let now = auth::now_secs();
            assert!(
                claims.exp > now.saturating_sub(5),
                "expired claims accepted"
            );
            assert!(claims.nbf.is_none_or(|nbf| nbf <= now + 5));
            assert!(claims.grants.join, "accepted without the join grant");
        }
        Err(
            auth::TokenError::Expired | auth::TokenError::WrongRoom | auth::TokenError::NoJoinGrant,
        ) => {
            assert!(signed(), "claims judged before the signature");
        }
        Err(auth::TokenError::Algorithm) => {
            let header = token.split('.').next().unwrap_or_default();
            let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(header)
                .expect("a readable header");
            let header: serde_json::Value = serde_json::from_slice(&header).expect("JSON header");
            let alg = header["alg"].as_str().expect("alg is a string");
            assert_ne!(alg, "HS256");
        }
        Err(auth::TokenError::Invalid) => {}
    }
}

/// `credentials::check_username`, the TURN username `<expiry>:<id>`:
/// accepted exactly when the expiry is plain decimal digits that fit in
/// 64 bits and lie in the future and the id is not empty; and whatever id
/// an issued credential carries, it checks until it expires.
pub fn turn_username(data: &[u8]) {
    const NOW: u64 = 1_700_000_000;
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let username = String::from_utf8_lossy(data);
    let expected = match username.split_once(':') {
        Some((e, id))
            if !e.is_empty() && !id.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) =>
        {
            match e.parse::<u64>() {
                Ok(e) if e > NOW => Ok(()),
                Ok(_) => Err(credentials::Refusal::Expired),
                Err(_) => Err(credentials::Refusal::Malformed),
            }
        }
        _ => Err(credentials::Refusal::Malformed),
    };
    assert_eq!(credentials::check_username(&username, now), expected);
    // Issue one for an id taken from the input.
    let id = if username.is_empty() { "p" } else { &username };
    let ttl = Duration::from_secs(1 + u64::from(data.first().copied().unwrap_or(0)));
    let c = credentials::issue(b"k", id, ttl, now);
    assert_eq!(credentials::check_username(&c.username, now), Ok(()));
    assert_eq!(
        credentials::check_username(&c.username, now + ttl),
        Err(credentials::Refusal::Expired)
    );
    assert_eq!(c.password, credentials::password(b"k", &c.username));
}

/// The secret the TURN gate target's credentials are signed with.
pub const TURN_SECRET: &[u8] = b"fuzz-turn-secret";
/// The realm of the TURN gate target.
pub const TURN_REALM: &str = "confab.test";
/// The SFU media address the gate's policy admits although it is private.
pub const TURN_SFU: &str = "10.0.0.5:7882";

/// The gate under test: the default policy (public peers only) plus the
/// SFU's address, the default quotas.
pub fn turn_gate_check() -> &'static GateCheck {
    static GATE: std::sync::OnceLock<GateCheck> = std::sync::OnceLock::new();
    GATE.get_or_init(|| {
        let settings = TurnSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            relay_bind: "127.0.0.1".parse().unwrap(),
            relay_public: "127.0.0.1".parse().unwrap(),
            relay_ports: (49_152, 65_535),
            realm: TURN_REALM.into(),
            secret: TURN_SECRET.to_vec(),
            user_quota: 10,
            total_quota: 1000,
            policy: PeerPolicy {
                allow_loopback: false,
                exceptions: vec![TURN_SFU.parse().unwrap()],
            },
        };
        GateCheck::new(
            settings,
            std::sync::Arc::new(confab::metrics::Metrics::new()),
        )
    })
}

/// The long-term key of a request's credentials if they are good: realm,
/// a nonce, an unexpired `<expiry>:<id>` username, and MESSAGE-INTEGRITY
/// under the coturn REST password `base64(HMAC-SHA1(secret, username))`,
/// all worked out here from the specification, not with Confab's code.
fn turn_valid_key(m: &StunMessage) -> Option<Vec<u8>> {
    let text = |a| {
        stun::textattrs::TextAttribute::get_from_as(m, a)
            .ok()
            .map(|t| t.text)
    };
    let username = text(stun::attributes::ATTR_USERNAME)?;
    let realm = text(stun::attributes::ATTR_REALM)?;
    text(stun::attributes::ATTR_NONCE)?;
    let (expiry, id) = username.split_once(':')?;
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()?
        .as_secs();
    let current = !id.is_empty()
        && !expiry.is_empty()
        && expiry.bytes().all(|b| b.is_ascii_digit())
        && expiry.parse::<u64>().is_ok_and(|e| e > now);
    if realm != TURN_REALM || !current {
        return None;
    }
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, TURN_SECRET);
    let password = base64::engine::general_purpose::STANDARD
        .encode(ring::hmac::sign(&key, username.as_bytes()));
    let integrity =
        stun::integrity::MessageIntegrity::new_long_term_integrity(username, realm, password);
    let mut copy = StunMessage::new();
    copy.raw = m.raw.clone();
    copy.decode().ok()?;
    integrity.check(&mut copy).ok()?;
    Some(integrity.0)
}

/// Special-purpose IPv4 ranges (RFC 6890 and successors) the relay must
/// never reach, as (network, prefix length): written from the registry,
/// independently of `PeerPolicy`.
pub const REFUSED_V4: &[([u8; 4], u8)] = &[
    ([0, 0, 0, 0], 8),       // "this network"
    ([10, 0, 0, 0], 8),      // private
    ([100, 64, 0, 0], 10),   // shared address space (CGN)
    ([127, 0, 0, 0], 8),     // loopback
    ([169, 254, 0, 0], 16),  // link local (cloud metadata)
    ([172, 16, 0, 0], 12),   // private
    ([192, 0, 0, 0], 24),    // IETF protocol assignments
    ([192, 0, 2, 0], 24),    // documentation
    ([192, 168, 0, 0], 16),  // private
    ([198, 18, 0, 0], 15),   // benchmarking
    ([198, 51, 100, 0], 24), // documentation
    ([203, 0, 113, 0], 24),  // documentation
    ([224, 0, 0, 0], 4),     // multicast
    ([240, 0, 0, 0], 4),     // reserved, broadcast
];

/// The same for IPv6 (IPv4-mapped addresses are judged as IPv4).
pub const REFUSED_V6: &[([u16; 8], u8)] = &[
    ([0, 0, 0, 0, 0, 0, 0, 0], 96), // unspecified, loopback, IPv4-compatible
    ([0x64, 0, 0, 0, 0, 0, 0, 0], 16), // NAT64 (64:ff9b::/96, 64:ff9b:1::/48) and around
    ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
    ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), // unique local
    ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), // link local
    ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), // site local (deprecated)
    ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), // multicast
];

/// Whether `ip` is outside every refused range.
fn public_ip(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    let in_v4 = |v4: std::net::Ipv4Addr| {
        let bits = u32::from(v4);
        REFUSED_V4.iter().any(|(net, len)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
            bits & mask == u32::from_be_bytes(*net) & mask
        })
    };
    match ip {
        IpAddr::V4(v4) => !in_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => !in_v4(v4),
            None => {
                let bits = u128::from(v6);
                !REFUSED_V6.iter().any(|(net, len)| {
                    let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                    bits & mask == u128::from(std::net::Ipv6Addr::from(*net)) & mask
                })
            }
        },
    }
}

/// Whether the relay may reach the request's first XOR-PEER-ADDRESS, from
/// [`public_ip`] and the one exception (the SFU's exact address; a
/// permission names an IP only); `None` without one.
fn turn_peer_allowed(m: &StunMessage) -> Option<bool> {
    use stun::message::Getter as _;
    let mut peer = turn::proto::peeraddr::PeerAddress::default();
    peer.get_from(m).ok()?;
    let sfu: std::net::SocketAddr = TURN_SFU.parse().unwrap();
    let canonical = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    let is_sfu_ip = canonical(peer.ip) == sfu.ip();
    Some(if m.typ.method == stun::message::METHOD_CREATE_PERMISSION {
        public_ip(peer.ip) || is_sfu_ip
    } else {
        public_ip(peer.ip) || (is_sfu_ip && peer.port == sfu.port())
    })
}

/// `turn_server::GateCheck::inspect`, what the TURN listening socket
/// decides before the `turn` crate sees a datagram: channel data passes;
/// anything that is not a whole STUN message is dropped as malformed; a
/// TURN request carrying MESSAGE-INTEGRITY passes only with credentials
/// that verify under the shared secret (else a 401 challenge) and, for a
/// permission or channel, a peer the policy admits (else a signed 403); a
/// Send indication to a refused peer is dropped; responses are dropped.
/// Every reply is a STUN error response to the same transaction.
pub fn turn_gate(data: &[u8]) {
    use stun::message::{
        CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST, METHOD_ALLOCATE,
        METHOD_CHANNEL_BIND, METHOD_CREATE_PERMISSION, METHOD_REFRESH, METHOD_SEND,
    };
    let verdict = turn_gate_check().inspect(data);
    if turn::proto::chandata::ChannelData::is_channel_data(data) {
        assert_eq!(verdict, GateVerdict::Pass, "channel data is the crate's");
        return;
    }
    let mut m = StunMessage::new();
    m.raw = data.to_vec();
    if !stun::message::is_message(data) || m.decode().is_err() {
        assert_eq!(verdict, GateVerdict::Drop("malformed"));
        return;
    }
    let method = m.typ.method;
    let turn_request = m.typ.class == CLASS_REQUEST
        && [
            METHOD_ALLOCATE,
            METHOD_REFRESH,
            METHOD_CREATE_PERMISSION,
            METHOD_CHANNEL_BIND,
        ]
        .contains(&method)
        && m.contains(stun::attributes::ATTR_MESSAGE_INTEGRITY);
    let peer_rule = method == METHOD_CREATE_PERMISSION || method == METHOD_CHANNEL_BIND;
    match verdict {
        GateVerdict::Pass => {
            assert!(
                m.typ.class == CLASS_REQUEST || m.typ.class == CLASS_INDICATION,
                "a {:?} passed",
                m.typ
            );
            if turn_request {
                assert!(turn_valid_key(&m).is_some(), "bad credentials passed");
                if peer_rule {
                    assert_ne!(turn_peer_allowed(&m), Some(false), "a refused peer passed");
                }
            }
            if m.typ.class == CLASS_INDICATION && method == METHOD_SEND {
                assert_ne!(turn_peer_allowed(&m), Some(false), "Send to a refused peer");
            }
        }
        GateVerdict::Reply(bytes) => {
            assert!(turn_request, "a reply to {:?}", m.typ);
            let mut r = StunMessage::new();
            r.raw = bytes;
            r.decode().expect("the reply decodes");
            assert_eq!(r.transaction_id, m.transaction_id);
            assert_eq!(
                r.typ,
                stun::message::MessageType::new(method, CLASS_ERROR_RESPONSE)
            );
            let mut code = stun::error_code::ErrorCodeAttribute::default();
            use stun::message::Getter as _;
            code.get_from(&r).expect("an ERROR-CODE");
            let key = turn_valid_key(&m);
            match code.code.0 {
                401 => {
                    assert!(key.is_none(), "401 to good credentials");
                    assert!(r.contains(stun::attributes::ATTR_REALM));
                }
                403 => {
                    let key = key.expect("403 only after the credentials verified");
                    assert!(peer_rule && turn_peer_allowed(&m) == Some(false));
                    let mut signed = StunMessage::new();
                    signed.raw = r.raw.clone();
                    signed.decode().unwrap();
                    stun::integrity::MessageIntegrity(key)
                        .check(&mut signed)
                        .expect("the 403 is signed with the client's key");
                }
                // No allocation is ever made here, so no quota is reached.
                other => panic!("unexpected error code {other}"),
            }
        }
        GateVerdict::Drop(reason) => match reason {
            "forbidden_peer" => {
                assert!(m.typ.class == CLASS_INDICATION && method == METHOD_SEND);
                assert_eq!(turn_peer_allowed(&m), Some(false));
            }
            "unexpected_class" => {
                assert!(m.typ.class != CLASS_REQUEST && m.typ.class != CLASS_INDICATION);
            }
            other => panic!("dropped as {other:?}: {:?}", m.typ),
        },
    }
}

/// One packet offered to a forwarder.
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    /// Header fields.
    pub ssrc: u32,
    /// Sequence number.
    pub sequence: u16,
    /// Timestamp.
    pub timestamp: u32,
    /// Starts a keyframe.
    pub keyframe: bool,
    /// Clock reading, microseconds.
    pub now: u64,
}

/// The current source as the downtrack's output shows it.
#[derive(Debug, Clone, Copy)]
struct Source {
    ssrc: u32,
    seq_offset: u16,
    ts_offset: u32,
    /// Extended input sequence numbers (first and newest of the source).
    first: i64,
    newest: i64,
}

/// Checks a forwarder's verdicts against what its output stream must look
/// like to a subscriber: one SSRC whose sequence numbers never go back or
/// repeat for new packets and have no holes the publisher did not make;
/// timestamps that move forward across every source change; video that
/// starts every source on a keyframe; nothing placeable dropped.
pub struct StreamChecker {
    params: DownTrackParams,
    source: Option<Source>,
    /// Output sequence number, timestamp and time of the newest packet.
    newest: Option<(u16, u32, u64)>,
    /// The current source's last packet was dropped as unplaceable: the
    /// forwarder may restart it (RFC 3550 A.1 re-synchronisation).
    may_resync: bool,
    sent: u64,
}

fn extend(reference: i64, seq: u16) -> i64 {
    reference + i64::from(seq.wrapping_sub(reference as u16) as i16)
}

impl StreamChecker {
    /// A checker for a new forwarder with `params`.
    pub fn new(params: DownTrackParams) -> Self {
        StreamChecker {
            params,
            source: None,
            newest: None,
            may_resync: false,
            sent: 0,
        }
    }

    /// The forwarder was paused.
    pub fn pause(&mut self) {
        self.source = None;
        self.may_resync = false;
    }

    /// Packets that must have been forwarded.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Checks one verdict.
    pub fn observe(&mut self, o: Offer, verdict: Verdict) {
        let video = self.params.video;
        let same = self.source.filter(|s| s.ssrc == o.ssrc);
        let placeable = same.map(|s| {
            let ext = extend(s.newest, o.sequence);
            (ext, ext >= s.first && s.newest - ext < 1 << 15)
        });
        match verdict {
            Verdict::Send {
                sequence,
                timestamp,
            } => {
                self.sent += 1;
                let continues = same.filter(|s| {
                    sequence == o.sequence.wrapping_add(s.seq_offset)
                        && timestamp == o.timestamp.wrapping_add(s.ts_offset)
                });
                if let (Some(mut s), Some((ext, ok))) = (continues, placeable) {
                    assert!(ok, "unplaceable packet sent: {o:?} {s:?}");
                    if ext > s.newest {
                        s.newest = ext;
                        self.source = Some(s);
                        self.newest = Some((sequence, timestamp, o.now));
                    }
                    self.may_resync = false;
                    return;
                }
                // A source (re)starts here.
                assert!(
                    same.is_none() || self.may_resync,
                    "offsets changed mid-source: {o:?} -> {sequence} {timestamp}"
                );
                assert!(!video || o.keyframe, "video source started off a keyframe");
                match self.newest {
                    None => assert_eq!((sequence, timestamp), (o.sequence, o.timestamp)),
                    Some((seq, ts, at)) => {
                        assert_eq!(sequence, seq.wrapping_add(1), "hole or repeat at a switch");
                        let elapsed = u128::from(o.now.saturating_sub(at));
                        let ticks = (elapsed * u128::from(self.params.clock_rate) / 1_000_000)
                            .clamp(1, u128::from(u32::MAX / 2))
                            as u32;
                        assert_eq!(timestamp, ts.wrapping_add(ticks), "timestamp at a switch");
                    }
                }
                let ext = i64::from(o.sequence) + (1 << 32);
                self.source = Some(Source {
                    ssrc: o.ssrc,
                    seq_offset: sequence.wrapping_sub(o.sequence),
                    ts_offset: timestamp.wrapping_sub(o.timestamp),
                    first: ext,
                    newest: ext,
                });
                self.newest = Some((sequence, timestamp, o.now));
                self.may_resync = false;
            }
            Verdict::Drop(Drop::WaitingForKeyframe) => {
                assert!(video && !o.keyframe, "dropped a packet that can start");
                if same.is_some() {
                    // Only a restart of the current source waits here.
                    assert!(self.may_resync, "current source waits for a keyframe");
                    self.source = None;
                    self.may_resync = false;
                }
            }
            Verdict::Drop(Drop::TooOld) => {
                let (_, ok) = placeable.expect("too old for another source");
                assert!(!ok, "placeable packet dropped: {o:?}");
                self.may_resync = true;
            }
        }
        // Packets of a new source that can start it are never dropped.
        if same.is_none() && (!video || o.keyframe) {
            assert!(
                matches!(verdict, Verdict::Send { .. }),
                "{o:?}: {verdict:?}"
            );
        }
    }
}

/// Reads a downtrack's parameters from fuzz input.
fn params(u: &mut Unstructured<'_>) -> arbitrary::Result<DownTrackParams> {
    Ok(DownTrackParams {
        ssrc: u.arbitrary()?,
        payload_type: u.int_in_range(0..=127)?,
        clock_rate: *u.choose(&[90_000, 48_000, 8_000, 1, u32::MAX])?,
        video: u.arbitrary()?,
    })
}

/// The forwarder on any stream of packets, pauses and clock jumps (see
/// [`StreamChecker`]). The input is a publisher's stream described as
/// steps from its current position, so that mutations give nearby streams:
/// losses, duplicates, reordering, sequence and timestamp jumps and wraps,
/// SSRC changes and unknown SSRCs.
pub fn forwarder(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(p) = params(&mut u) else { return };
    let mut f = Forwarder::new(p);
    let mut check = StreamChecker::new(p);
    let ssrcs: [u32; 3] = u.arbitrary().unwrap_or([1, 2, 3]);
    let mut pos: [(u16, u32); 3] = u.arbitrary().unwrap_or_default();
    let mut now = u64::from(u.arbitrary::<u32>().unwrap_or(0));
    for _ in 0..2048 {
        if u.is_empty() {
            break;
        }
        let Ok(op) = u.int_in_range(0u8..=31) else {
            break;
        };
        match op {
            0 => {
                f.pause();
                check.pause();
                continue;
            }
            1 => {
                now += u64::from(u.arbitrary::<u32>().unwrap_or(0));
                continue;
            }
            _ => {}
        }
        let which = usize::from(op % 4);
        let (ssrc, (seq, ts)) = match which {
            3 => (
                u.arbitrary().unwrap_or(0),
                (u.arbitrary().unwrap_or(0), u.arbitrary().unwrap_or(0)),
            ),
            i => {
                let (s, t) = &mut pos[i];
                let step: i16 = match u.int_in_range(0u8..=7).unwrap_or(0) {
                    0..=3 => 1,
                    4 => 0,
                    5 => u.int_in_range(-20..=20).unwrap_or(-1),
                    _ => u.arbitrary().unwrap_or(0),
                };
                let tstep: i32 = match u.int_in_range(0u8..=3).unwrap_or(0) {
                    0 | 1 => 960 * i32::from(step),
                    2 => 0,
                    _ => u.arbitrary().unwrap_or(0),
                };
                *s = s.wrapping_add_signed(step);
                *t = t.wrapping_add_signed(tstep);
                (ssrcs[i], (*s, *t))
            }
        };
        now += u64::from(u.int_in_range(0u16..=40_000).unwrap_or(0));
        let o = Offer {
            ssrc,
            sequence: seq,
            timestamp: ts,
            keyframe: u.ratio(1, 8).unwrap_or(false),
            now,
        };
        let v = f.forward(o.ssrc, o.sequence, o.timestamp, o.keyframe, o.now);
        check.observe(o, v);
    }
    assert_eq!(f.forwarded(), check.sent());
}

/// Confab's own RTP path end to end on a stream of datagrams from one
/// publisher: parse (bad padding and extension lengths are refused),
/// VP8 keyframe detection, the forwarder and its [`StreamChecker`], and
/// the rewrite, which leaves extension and payload bytes as they were.
/// The input is length-prefixed datagrams, each with a clock step.
pub fn rtp_forward(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(p) = params(&mut u) else { return };
    let mut f = Forwarder::new(p);
    let mut check = StreamChecker::new(p);
    let mut now = 0u64;
    let mut out = Vec::new();
    while !u.is_empty() {
        let Ok(len) = u.int_in_range(0u16..=1500) else {
            break;
        };
        let Ok(packet) = u.bytes(usize::from(len).min(u.len())) else {
            break;
        };
        now += u64::from(u.int_in_range(0u16..=40_000).unwrap_or(0));
        let parsed = rtp::parse(packet);
        check_rtp(packet, parsed);
        let Ok(h) = parsed else { continue };
        let payload = &packet[h.payload_offset..h.payload_offset + h.payload_len];
        let o = Offer {
            ssrc: h.ssrc,
            sequence: h.sequence,
            timestamp: h.timestamp,
            keyframe: p.video && vp8::is_keyframe(payload),
            now,
        };
        let v = f.forward(o.ssrc, o.sequence, o.timestamp, o.keyframe, o.now);
        check.observe(o, v);
        if let Verdict::Send {
            sequence,
            timestamp,
        } = v
        {
            out.clear();
            out.extend_from_slice(packet);
            rtp::rewrite(&mut out, p.payload_type, sequence, timestamp, p.ssrc);
            let r = rtp::parse(&out).expect("rewritten packet parses");
            assert_eq!(
                (r.sequence, r.timestamp, r.ssrc),
                (sequence, timestamp, p.ssrc)
            );
            assert_eq!(
                &out[r.payload_offset..r.payload_offset + r.payload_len],
                payload
            );
            assert_eq!(out[12..], packet[12..]);
        }
    }
    assert_eq!(f.forwarded(), check.sent());
}
