//! VP8 keyframe detection from an RTP payload (RFC 7741 §4), so that a
//! downtrack starts or switches only on a frame the decoder can use.

/// Whether a VP8 RTP payload starts a keyframe: the first packet of a
/// frame (`S` set, partition 0) whose VP8 payload header has `P` = 0.
pub fn is_keyframe(payload: &[u8]) -> bool {
    let Some(&b0) = payload.first() else {
        return false;
    };
    let extended = b0 & 0x80 != 0;
    let start = b0 & 0x10 != 0;
    let partition = b0 & 0x07;
    if !start || partition != 0 {
        return false;
    }
    let mut at = 1;
    if extended {
        let Some(&x) = payload.get(at) else {
            return false;
        };
        at += 1;
        if x & 0x80 != 0 {
            // PictureID: 7 or 15 bits (M flag).
            let Some(&pid) = payload.get(at) else {
                return false;
            };
            at += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            at += 1; // TL0PICIDX
        }
        if x & 0x30 != 0 {
            at += 1; // TID/Y/KEYIDX
        }
    }
    payload.get(at).is_some_and(|h| h & 0x01 == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_descriptor() {
        assert!(is_keyframe(&[0x10, 0x00, 0x9d, 0x01, 0x2a]));
        assert!(!is_keyframe(&[0x10, 0x01]), "P bit set: interframe");
        assert!(!is_keyframe(&[0x00, 0x00]), "not the start of a frame");
        assert!(!is_keyframe(&[0x11, 0x00]), "partition 1");
    }

    #[test]
    fn extended_descriptor_with_picture_id() {
        // X, I with 15-bit picture id, then the payload header.
        assert!(is_keyframe(&[0x90, 0x80, 0x81, 0x23, 0x00]));
        assert!(!is_keyframe(&[0x90, 0x80, 0x81, 0x23, 0x01]));
        // X, I (7-bit), L, T.
        assert!(is_keyframe(&[0x90, 0xe0, 0x05, 0x01, 0x40, 0x00]));
    }

    #[test]
    fn truncated_payloads_are_not_keyframes() {
        for p in [
            &[][..],
            &[0x90],
            &[0x90, 0x80],
            &[0x90, 0x80, 0x81],
            &[0x10],
        ] {
            assert!(!is_keyframe(p), "{p:?}");
        }
    }
}
