//! Signaling: the JSON protocol over one WebSocket per participant.
//!
//! - [`protocol`]: the wire types and error codes (`docs/protocol.md`).
//! - [`session`]: one task per socket: join, limits, relaying to the room.
//! - [`ratelimit`]: the per-socket token bucket and the per-address join
//!   limit.

pub mod protocol;
pub mod ratelimit;
pub mod session;

/// Longest room id, in characters.
pub const MAX_ROOM_LEN: usize = 64;
/// Longest display name, in characters.
pub const MAX_NAME_LEN: usize = 64;

/// Room ids: 1-64 characters of `A-Z a-z 0-9 _ - .`.
pub fn valid_room_id(room: &str) -> bool {
    !room.is_empty()
        && room.len() <= MAX_ROOM_LEN
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Trims a display name and checks it: 1-64 characters, no control
/// characters. Returns the trimmed name.
pub fn clean_name(name: &str) -> Option<String> {
    let name = name.trim();
    let len = name.chars().count();
    if len == 0 || len > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return None;
    }
    Some(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_ids() {
        assert!(valid_room_id("standup-2026.11_a"));
        assert!(!valid_room_id(""));
        assert!(!valid_room_id("a b"));
        assert!(!valid_room_id("ümlaut"));
        assert!(!valid_room_id(&"x".repeat(65)));
        assert!(valid_room_id(&"x".repeat(64)));
    }

    #[test]
    fn names() {
        assert_eq!(clean_name("  Ada  ").as_deref(), Some("Ada"));
        assert_eq!(clean_name("Zoë 🎥").as_deref(), Some("Zoë 🎥"));
        assert_eq!(clean_name("   "), None);
        assert_eq!(clean_name("a\u{0007}b"), None);
        assert_eq!(clean_name(&"é".repeat(65)), None);
        assert!(clean_name(&"é".repeat(64)).is_some());
    }
}
