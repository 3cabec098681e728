//! The signaling protocol's wire types, version [`PROTOCOL_VERSION`].
//!
//! `docs/protocol.md` is the normative description; every type and error code
//! here appears there under the same name. Parsing is done in two steps so
//! that a client learns *what* was wrong: [`parse_client_message`] tells a
//! frame that is not JSON (`bad_json`) from an unknown `type`
//! (`unknown_type`) and from a known type with bad fields (`bad_message`).

use serde::{Deserialize, Serialize};

/// The protocol version this server speaks (`join.v`).
pub const PROTOCOL_VERSION: u32 = 2;

/// The reserved participant id of the server's own end of every server leg:
/// `offer` comes `from` it, `answer` and `candidate` go `to` it.
pub const SFU_ID: &str = "sfu";

/// Most lines an SDP may have (Janus uses the same bound against
/// pathological SDPs; real ones have a few hundred).
pub const MAX_SDP_LINES: usize = 10_000;

/// A trickled ICE candidate, the JSON form of `RTCIceCandidateInit` with
/// snake_case field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceCandidate {
    /// The `candidate:` attribute line; empty for end-of-candidates.
    pub candidate: String,
    /// The media stream identification tag, if known.
    #[serde(default)]
    pub sdp_mid: Option<String>,
    /// Index of the m-line, if known.
    #[serde(default)]
    pub sdp_mline_index: Option<u16>,
    /// ICE username fragment the candidate belongs to, if known.
    #[serde(default)]
    pub username_fragment: Option<String>,
}

/// Messages a client sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Enter a room; the first message on every socket.
    Join {
        /// Protocol version spoken by the client.
        v: u32,
        /// Room id.
        room: String,
        /// Display name.
        name: String,
        /// Join token (JWT), required when the server has a secret.
        #[serde(default)]
        token: Option<String>,
    },
    /// An SDP offer for another member.
    Offer {
        /// Target participant id.
        to: String,
        /// The SDP.
        sdp: String,
    },
    /// An SDP answer for another member.
    Answer {
        /// Target participant id.
        to: String,
        /// The SDP.
        sdp: String,
    },
    /// A trickled ICE candidate for another member.
    Candidate {
        /// Target participant id.
        to: String,
        /// The candidate.
        candidate: IceCandidate,
    },
    /// The sender's microphone and camera state.
    MediaState {
        /// Microphone muted.
        audio_muted: bool,
        /// Camera off.
        video_muted: bool,
        /// Sharing the screen (in place of the camera). Optional.
        #[serde(default)]
        screen: bool,
    },
    /// The path the current switch moves to decodes at this client.
    MediaReady {
        /// The epoch of the `mode` being acknowledged.
        epoch: u64,
    },
    /// The direct path to the peer failed (ICE failed and did not recover).
    P2pFailed,
    /// How long the sender went without a new frame across a switch: the
    /// time from the `mode` message of `epoch` to the first frame decoded
    /// on the new path (feeds `confab_mode_switch_gap_seconds`).
    SwitchReport {
        /// The epoch of the `mode` message that started the switch.
        epoch: u64,
        /// The mode switched to: `sfu` or `p2p`.
        to: MediaMode,
        /// Milliseconds, 0 to [`MAX_SWITCH_GAP_MS`].
        gap_ms: f64,
    },
    /// A chat message for the room, or for one member (`to`).
    Chat {
        /// The text: 1 to [`MAX_CHAT_CHARS`] characters, not only spaces.
        text: String,
        /// One member's participant id; `None` for everyone.
        #[serde(default)]
        to: Option<String>,
    },
    /// Application-level keep-alive.
    Ping {
        /// Echoed in the `pong`.
        #[serde(default)]
        id: Option<serde_json::Value>,
    },
    /// Leave the room and close the socket.
    Leave,
}

impl ClientMessage {
    /// The message's `type` on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientMessage::Join { .. } => "join",
            ClientMessage::Offer { .. } => "offer",
            ClientMessage::Answer { .. } => "answer",
            ClientMessage::Candidate { .. } => "candidate",
            ClientMessage::MediaState { .. } => "media_state",
            ClientMessage::MediaReady { .. } => "media_ready",
            ClientMessage::P2pFailed => "p2p_failed",
            ClientMessage::SwitchReport { .. } => "switch_report",
            ClientMessage::Chat { .. } => "chat",
            ClientMessage::Ping { .. } => "ping",
            ClientMessage::Leave => "leave",
        }
    }
}

/// The largest `switch_report.gap_ms` accepted (one minute).
pub const MAX_SWITCH_GAP_MS: f64 = 60_000.0;

/// The `type` values of [`ClientMessage`].
pub const CLIENT_MESSAGE_TYPES: &[&str] = &[
    "join",
    "offer",
    "answer",
    "candidate",
    "media_state",
    "media_ready",
    "p2p_failed",
    "switch_report",
    "chat",
    "ping",
    "leave",
];

/// The longest chat text, in characters.
pub const MAX_CHAT_CHARS: usize = 2_000;

/// A member of a room as other members see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Participant id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Microphone muted.
    pub audio_muted: bool,
    /// Camera off.
    pub video_muted: bool,
    /// Sharing the screen: the video shows a screen, not a camera.
    #[serde(default)]
    pub screen: bool,
}

/// An `RTCIceServer` entry handed to clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// STUN/TURN URLs.
    pub urls: Vec<String>,
    /// TURN username.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub credential: Option<String>,
}

/// The room's media mode as one member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeInfo {
    /// `"p2p"` in this protocol version.
    pub mode: MediaMode,
    /// The member to connect to directly; `None` while alone.
    pub peer: Option<String>,
    /// Role in perfect negotiation; the impolite member offers first.
    pub polite: bool,
    /// Increases at every change of mode or pair.
    pub epoch: u64,
}

/// How media flows in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaMode {
    /// Directly between the two members.
    P2p,
    /// Moving from the direct path to the server; both carry media.
    ToSfu,
    /// Through the server (selective forwarding).
    Sfu,
    /// Moving from the server back to a direct path; both carry media.
    ToP2p,
}

impl MediaMode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaMode::P2p => "p2p",
            MediaMode::ToSfu => "to_sfu",
            MediaMode::Sfu => "sfu",
            MediaMode::ToP2p => "to_p2p",
        }
    }
}

/// The state of a participant's server leg, as the server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LegState {
    /// Offered, not yet connected.
    Connecting,
    /// ICE and DTLS are up: media can flow at once.
    Connected,
    /// Connectivity lost for a while; may recover.
    Disconnected,
    /// ICE or DTLS failed.
    Failed,
}

/// Why a participant left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// Sent `leave` or closed the socket cleanly.
    Left,
    /// The socket broke or timed out.
    Disconnected,
    /// The same identity joined again.
    Replaced,
    /// Removed by the server (rate limit, queue overflow).
    Kicked,
}

/// One entry of `active_speakers`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpeakerInfo {
    /// Participant id.
    pub id: String,
    /// How loud, 0 to 1 (smoothed; hundredths).
    pub level: f32,
}

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to a successful `join`.
    Joined {
        /// Protocol version.
        v: u32,
        /// Room id.
        room: String,
        /// The joiner's own participant id.
        participant_id: String,
        /// Everyone else in the room, in join order.
        members: Vec<MemberInfo>,
        /// ICE servers for peer connections.
        ice_servers: Vec<IceServer>,
        /// Current media mode.
        mode: ModeInfo,
    },
    /// Someone entered the room.
    ParticipantJoined {
        /// The newcomer.
        participant: MemberInfo,
    },
    /// Someone left the room.
    ParticipantLeft {
        /// Who.
        id: String,
        /// Why.
        reason: LeaveReason,
    },
    /// A member's microphone/camera state changed.
    ParticipantUpdated {
        /// Who.
        id: String,
        /// Microphone muted.
        audio_muted: bool,
        /// Camera off.
        video_muted: bool,
        /// Sharing the screen.
        screen: bool,
    },
    /// The room's media mode changed.
    Mode(ModeInfo),
    /// The state of a member's server leg (the recipient's own included).
    ServerLeg {
        /// Whose leg.
        id: String,
        /// Its state.
        state: LegState,
    },
    /// Who is talking, loudest first (the first is the dominant speaker);
    /// sent when the list changes while media goes through the server.
    ActiveSpeakers {
        /// The speakers; empty when nobody speaks.
        speakers: Vec<SpeakerInfo>,
    },
    /// Under Last-N, the members whose video this member now receives
    /// through the server, best first.
    ForwardedVideo {
        /// Their participant ids.
        ids: Vec<String>,
    },
    /// A chat message from another member.
    Chat {
        /// Sender's participant id.
        from: String,
        /// Sender's display name at the time.
        name: String,
        /// The text.
        text: String,
        /// Sent to the recipient alone (`to`), not to the room.
        private: bool,
        /// When the server relayed it, milliseconds since the Unix epoch.
        at: u64,
    },
    /// A relayed SDP offer.
    Offer {
        /// Sender's participant id.
        from: String,
        /// The SDP.
        sdp: String,
    },
    /// A relayed SDP answer.
    Answer {
        /// Sender's participant id.
        from: String,
        /// The SDP.
        sdp: String,
    },
    /// A relayed ICE candidate.
    Candidate {
        /// Sender's participant id.
        from: String,
        /// The candidate.
        candidate: IceCandidate,
    },
    /// Answer to `ping`.
    Pong {
        /// The ping's id.
        id: Option<serde_json::Value>,
    },
    /// Something the client sent was refused.
    Error {
        /// Stable, machine-readable code.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

impl ServerMessage {
    /// Serialises the message to its JSON text.
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail: no maps with
        // non-string keys, no custom serialisers.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// Shorthand for an `error` message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
        }
    }
}

/// Error codes, as listed in `docs/protocol.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not a JSON object.
    BadJson,
    /// `type` missing or unknown.
    UnknownType,
    /// Known type, bad fields.
    BadMessage,
    /// A binary frame.
    BinaryUnsupported,
    /// A message before `join`.
    NotJoined,
    /// A second `join`.
    AlreadyJoined,
    /// `join.v` is not supported.
    UnsupportedVersion,
    /// Bad room id.
    InvalidRoom,
    /// Bad display name.
    InvalidName,
    /// The room is at capacity.
    RoomFull,
    /// A token is needed.
    TokenRequired,
    /// Malformed token or bad signature.
    TokenInvalid,
    /// The token's algorithm is not HS256.
    TokenAlgorithm,
    /// Expired or not yet valid.
    TokenExpired,
    /// The token is for another room.
    TokenWrongRoom,
    /// The token does not grant joining.
    TokenNoJoin,
    /// `to` is not another member of the room.
    NotAMember,
    /// Over the message rate.
    RateLimited,
    /// No `join` within the deadline.
    JoinTimeout,
    /// The client does not read its socket.
    SlowConsumer,
    /// A newer socket joined with the same identity.
    Replaced,
    /// The server is shutting down.
    ServerShutdown,
    /// The server is draining: it accepts no new rooms.
    Draining,
    /// Too many joins from the sender's address.
    TooManyJoins,
    /// The server holds its maximum number of rooms.
    TooManyRooms,
    /// An operator removed the participant (admin API).
    Removed,
}

impl ErrorCode {
    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::BinaryUnsupported => "binary_unsupported",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::TokenRequired => "token_required",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TokenAlgorithm => "token_algorithm",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenWrongRoom => "token_wrong_room",
            ErrorCode::TokenNoJoin => "token_no_join",
            ErrorCode::NotAMember => "not_a_member",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::JoinTimeout => "join_timeout",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::Replaced => "replaced",
            ErrorCode::ServerShutdown => "server_shutdown",
            ErrorCode::Draining => "draining",
            ErrorCode::TooManyJoins => "too_many_joins",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::Removed => "removed",
        }
    }
}

/// Longest `detail` of a [`ParseError`], in bytes: serde's messages quote
/// the offending value, which must not echo a large frame back.
pub const MAX_ERROR_DETAIL: usize = 200;

/// Why a text frame could not be turned into a [`ClientMessage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// `bad_json`, `unknown_type` or `bad_message`.
    pub code: ErrorCode,
    /// What was wrong, for people.
    pub detail: String,
}

/// Parses one text frame.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ParseError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| ParseError {
        code: ErrorCode::BadJson,
        detail: format!("not valid JSON: {e}"),
    })?;
    let Some(object) = value.as_object() else {
        return Err(ParseError {
            code: ErrorCode::BadJson,
            detail: "a message must be a JSON object".into(),
        });
    };
    let ty = match object.get("type") {
        Some(serde_json::Value::String(t)) => t.clone(),
        Some(_) => {
            return Err(ParseError {
                code: ErrorCode::UnknownType,
                detail: "`type` must be a string".into(),
            })
        }
        None => {
            return Err(ParseError {
                code: ErrorCode::UnknownType,
                detail: "missing `type`".into(),
            })
        }
    };
    if !CLIENT_MESSAGE_TYPES.contains(&ty.as_str()) {
        let shown: String = ty.chars().take(40).collect();
        return Err(ParseError {
            code: ErrorCode::UnknownType,
            detail: format!("unknown message type `{shown}`"),
        });
    }
    let message: ClientMessage = serde_json::from_value(value).map_err(|e| {
        let mut detail = format!("bad `{ty}` message: {e}");
        if detail.len() > MAX_ERROR_DETAIL {
            let mut cut = MAX_ERROR_DETAIL - 3;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push_str("...");
        }
        ParseError {
            code: ErrorCode::BadMessage,
            detail,
        }
    })?;
    if let ClientMessage::SwitchReport { to, gap_ms, .. } = &message {
        if !matches!(to, MediaMode::Sfu | MediaMode::P2p) {
            return Err(ParseError {
                code: ErrorCode::BadMessage,
                detail: "`switch_report.to` must be `sfu` or `p2p`".into(),
            });
        }
        if !(0.0..=MAX_SWITCH_GAP_MS).contains(gap_ms) {
            return Err(ParseError {
                code: ErrorCode::BadMessage,
                detail: format!("`switch_report.gap_ms` must be 0 to {MAX_SWITCH_GAP_MS}"),
            });
        }
    }
    if let ClientMessage::Chat { text, .. } = &message {
        if text.trim().is_empty() || text.chars().count() > MAX_CHAT_CHARS {
            return Err(ParseError {
                code: ErrorCode::BadMessage,
                detail: format!(
                    "`chat.text` must have 1 to {MAX_CHAT_CHARS} characters, not only spaces"
                ),
            });
        }
    }
    if let ClientMessage::Offer { sdp, .. } | ClientMessage::Answer { sdp, .. } = &message {
        if sdp.lines().count() > MAX_SDP_LINES {
            return Err(ParseError {
                code: ErrorCode::BadMessage,
                detail: format!("SDP has more than {MAX_SDP_LINES} lines"),
            });
        }
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_errors() {
        assert_eq!(
            parse_client_message("{nope").unwrap_err().code,
            ErrorCode::BadJson
        );
        assert_eq!(
            parse_client_message("[1,2]").unwrap_err().code,
            ErrorCode::BadJson
        );
        assert_eq!(
            parse_client_message(r#"{"x":1}"#).unwrap_err().code,
            ErrorCode::UnknownType
        );
        assert_eq!(
            parse_client_message(r#"{"type":"dance"}"#)
                .unwrap_err()
                .code,
            ErrorCode::UnknownType
        );
        assert_eq!(
            parse_client_message(r#"{"type":"offer","to":5,"sdp":"v=0"}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadMessage
        );
        for bad in [
            r#"{"type":"switch_report","epoch":1,"to":"to_sfu","gap_ms":10}"#,
            r#"{"type":"switch_report","epoch":1,"to":"sfu","gap_ms":-1}"#,
            r#"{"type":"switch_report","epoch":1,"to":"sfu","gap_ms":600000}"#,
            r#"{"type":"switch_report","epoch":1,"to":"sfu"}"#,
        ] {
            assert_eq!(
                parse_client_message(bad).unwrap_err().code,
                ErrorCode::BadMessage,
                "{bad}"
            );
        }
        assert!(matches!(
            parse_client_message(r#"{"type":"switch_report","epoch":1,"to":"p2p","gap_ms":120.5}"#),
            Ok(ClientMessage::SwitchReport {
                to: MediaMode::P2p,
                ..
            })
        ));
        let long = format!(
            r#"{{"type":"join","v":"{}","room":"r","name":"n"}}"#,
            "x".repeat(5000)
        );
        let e = parse_client_message(&long).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadMessage);
        assert!(e.detail.len() <= MAX_ERROR_DETAIL, "{}", e.detail);
        let long_sdp = "a=x\n".repeat(MAX_SDP_LINES + 1);
        let msg = serde_json::json!({"type":"offer","to":"p-1","sdp":long_sdp}).to_string();
        assert_eq!(
            parse_client_message(&msg).unwrap_err().code,
            ErrorCode::BadMessage
        );
    }

    #[test]
    fn parses_join_and_candidate() {
        let m = parse_client_message(r#"{"type":"join","v":1,"room":"r","name":"n"}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::Join {
                v: 1,
                room: "r".into(),
                name: "n".into(),
                token: None
            }
        );
        let m = parse_client_message(
            r#"{"type":"candidate","to":"p-1","candidate":{"candidate":"c","sdp_mid":"0"}}"#,
        )
        .unwrap();
        match m {
            ClientMessage::Candidate { to, candidate } => {
                assert_eq!(to, "p-1");
                assert_eq!(candidate.sdp_mid.as_deref(), Some("0"));
                assert_eq!(candidate.sdp_mline_index, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn error_codes_serialise_to_their_wire_names() {
        for code in [
            ErrorCode::BadJson,
            ErrorCode::TokenWrongRoom,
            ErrorCode::ServerShutdown,
        ] {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, serde_json::Value::String(code.as_str().into()));
        }
        let msg = ServerMessage::error(ErrorCode::NotAMember, "x").to_json();
        assert_eq!(
            msg,
            r#"{"type":"error","code":"not_a_member","message":"x"}"#
        );
    }
}
