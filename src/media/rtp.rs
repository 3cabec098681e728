//! A zero-copy view of an RTP header (RFC 3550 §5.1), checked against
//! every length field before anything is read, and in-place rewriting of the
//! fields a forwarder changes.
//!
//! Packets come from the network, so nothing here trusts them: a CSRC
//! count, extension length or padding length that points past the end is an
//! error, never a panic.

/// Why bytes are not an RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtpError {
    /// Shorter than the 12-byte fixed header.
    TooShort,
    /// The version field is not 2.
    BadVersion,
    /// CSRC list or header extension runs past the end.
    HeaderOverrun,
    /// Padding length is zero or larger than the payload.
    BadPadding,
}

/// The parsed fixed header plus where the payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    /// Marker bit (end of a video frame).
    pub marker: bool,
    /// Payload type.
    pub payload_type: u8,
    /// Sequence number.
    pub sequence: u16,
    /// Media timestamp.
    pub timestamp: u32,
    /// Synchronisation source.
    pub ssrc: u32,
    /// Offset of the payload in the packet.
    pub payload_offset: usize,
    /// Length of the payload (padding excluded).
    pub payload_len: usize,
}

/// The fixed header's length.
pub const FIXED_HEADER_LEN: usize = 12;

/// Parses and checks an RTP header.
pub fn parse(packet: &[u8]) -> Result<RtpHeader, RtpError> {
    if packet.len() < FIXED_HEADER_LEN {
        return Err(RtpError::TooShort);
    }
    let b0 = packet[0];
    if b0 >> 6 != 2 {
        return Err(RtpError::BadVersion);
    }
    let padding = b0 & 0x20 != 0;
    let extension = b0 & 0x10 != 0;
    let csrc_count = usize::from(b0 & 0x0f);
    let mut offset = FIXED_HEADER_LEN + 4 * csrc_count;
    if extension {
        // 4-byte extension header: profile (2) + length in 32-bit words (2).
        let ext_header = packet
            .get(offset..offset + 4)
            .ok_or(RtpError::HeaderOverrun)?;
        let words = usize::from(u16::from_be_bytes([ext_header[2], ext_header[3]]));
        offset += 4 + 4 * words;
    }
    if offset > packet.len() {
        return Err(RtpError::HeaderOverrun);
    }
    let mut end = packet.len();
    if padding {
        let pad = usize::from(packet[end - 1]);
        if pad == 0 || pad > end - offset {
            return Err(RtpError::BadPadding);
        }
        end -= pad;
    }
    Ok(RtpHeader {
        marker: packet[1] & 0x80 != 0,
        payload_type: packet[1] & 0x7f,
        sequence: u16::from_be_bytes([packet[2], packet[3]]),
        timestamp: u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]),
        ssrc: u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]),
        payload_offset: offset,
        payload_len: end - offset,
    })
}

/// Overwrites payload type, sequence number, timestamp and SSRC of a
/// packet that [`parse`] accepted (so it has at least 12 bytes).
pub fn rewrite(packet: &mut [u8], payload_type: u8, sequence: u16, timestamp: u32, ssrc: u32) {
    packet[1] = (packet[1] & 0x80) | (payload_type & 0x7f);
    packet[2..4].copy_from_slice(&sequence.to_be_bytes());
    packet[4..8].copy_from_slice(&timestamp.to_be_bytes());
    packet[8..12].copy_from_slice(&ssrc.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(b0: u8, extra: &[u8]) -> Vec<u8> {
        let mut p = vec![
            b0,
            0x80 | 96,
            0x12,
            0x34,
            0,
            0,
            0x10,
            0,
            0xde,
            0xad,
            0xbe,
            0xef,
        ];
        p.extend_from_slice(extra);
        p
    }

    #[test]
    fn parses_plain_packet() {
        let h = parse(&packet(0x80, b"hello")).unwrap();
        assert!(h.marker);
        assert_eq!(h.payload_type, 96);
        assert_eq!(h.sequence, 0x1234);
        assert_eq!(h.timestamp, 0x1000);
        assert_eq!(h.ssrc, 0xdeadbeef);
        assert_eq!((h.payload_offset, h.payload_len), (12, 5));
    }

    #[test]
    fn csrc_extension_and_padding() {
        // 1 CSRC, an extension of 1 word, payload "ab", 2 bytes of padding.
        let mut extra = vec![1, 2, 3, 4, 0xbe, 0xde, 0, 1, 9, 9, 9, 9];
        extra.extend_from_slice(b"ab");
        extra.extend_from_slice(&[0, 2]);
        let h = parse(&packet(0x80 | 0x20 | 0x10 | 1, &extra)).unwrap();
        assert_eq!(h.payload_offset, 12 + 4 + 8);
        assert_eq!(h.payload_len, 2);
    }

    #[test]
    fn hostile_lengths_are_errors() {
        assert_eq!(parse(&[0x80; 11]), Err(RtpError::TooShort));
        assert_eq!(parse(&packet(0x40, b"")), Err(RtpError::BadVersion));
        assert_eq!(parse(&packet(0x8f, b"")), Err(RtpError::HeaderOverrun));
        assert_eq!(
            parse(&packet(0x90, &[0xbe, 0xde])),
            Err(RtpError::HeaderOverrun)
        );
        assert_eq!(
            parse(&packet(0x90, &[0xbe, 0xde, 0xff, 0xff])),
            Err(RtpError::HeaderOverrun)
        );
        assert_eq!(parse(&packet(0xa0, &[1, 0])), Err(RtpError::BadPadding));
        assert_eq!(parse(&packet(0xa0, &[1, 9])), Err(RtpError::BadPadding));
    }

    #[test]
    fn never_panics_on_any_short_input() {
        // Every header byte pattern that matters, over every length to 40.
        let mut seen_ok = 0;
        for b0 in 0..=255u8 {
            for len in 0..40 {
                let mut p = vec![0xffu8; len];
                if len > 0 {
                    p[0] = b0;
                }
                if parse(&p).is_ok() {
                    seen_ok += 1;
                }
            }
        }
        assert!(seen_ok > 0, "some inputs are valid");
    }

    #[test]
    fn rewrite_keeps_marker_and_payload() {
        let mut p = packet(0x80, b"xyz");
        rewrite(&mut p, 111, 7, 9000, 42);
        let h = parse(&p).unwrap();
        assert!(h.marker);
        assert_eq!(
            (h.payload_type, h.sequence, h.timestamp, h.ssrc),
            (111, 7, 9000, 42)
        );
        assert_eq!(&p[12..], b"xyz");
    }
}
