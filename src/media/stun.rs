//! Just enough STUN (RFC 8489) to route a datagram to its peer connection:
//! the local ICE username fragment of a Binding request. Integrity is
//! checked later by the ICE agent of the connection it is routed to.

/// The STUN magic cookie.
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// The message type of a Binding request.
const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
/// The USERNAME attribute type.
const ATTR_USERNAME: u16 = 0x0006;
/// Fixed STUN header length.
const HEADER_LEN: usize = 20;

/// Whether `datagram` looks like STUN (RFC 7983 demultiplexing: first byte
/// 0..=3, plus the magic cookie).
pub fn is_stun(datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN && datagram[0] < 4 && datagram[4..8] == MAGIC_COOKIE
}

/// The local ufrag (the part before `:`) of the USERNAME attribute of a
/// STUN Binding request that fills the datagram, if it has one. Nothing
/// else is routed by username: ICE connectivity checks and consent
/// freshness are Binding requests, and only they carry the ufrag pair.
pub fn local_ufrag(datagram: &[u8]) -> Option<&str> {
    if !is_stun(datagram) || datagram[..2] != BINDING_REQUEST {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    if len % 4 != 0 || HEADER_LEN + len != datagram.len() {
        return None;
    }
    let body = &datagram[HEADER_LEN..];
    let mut at = 0;
    while at + 4 <= body.len() {
        let kind = u16::from_be_bytes([body[at], body[at + 1]]);
        let vlen = usize::from(u16::from_be_bytes([body[at + 2], body[at + 3]]));
        let value = body.get(at + 4..at + 4 + vlen)?;
        if kind == ATTR_USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next();
        }
        // Attribute values are padded to 4 bytes.
        at += 4 + vlen.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &[u8]) -> Vec<u8> {
        let padded = username.len().div_ceil(4) * 4;
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&((4 + padded + 8) as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        // An unknown attribute first, to exercise skipping.
        m.extend_from_slice(&[0x80, 0x22, 0x00, 0x03, b'a', b'b', b'c', 0]);
        m.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        m.extend_from_slice(&(username.len() as u16).to_be_bytes());
        m.extend_from_slice(username);
        m.resize(m.len() + padded - username.len(), 0);
        m
    }

    #[test]
    fn finds_the_local_ufrag() {
        let m = binding_request(b"srvufrag:cli");
        assert!(is_stun(&m));
        assert_eq!(local_ufrag(&m), Some("srvufrag"));
    }

    #[test]
    fn rejects_non_stun_and_truncated_input() {
        assert_eq!(local_ufrag(&[0x80; 40]), None, "RTP");
        assert_eq!(local_ufrag(&[22; 40]), None, "DTLS");
        let m = binding_request(b"srv:cli");
        for cut in 0..m.len() {
            // Never panics; a cut message is not parsed past its end.
            let _ = local_ufrag(&m[..cut]);
        }
        let mut lying = m;
        lying[3] = 0xff; // message length past the end
        assert_eq!(local_ufrag(&lying), None);
    }

    #[test]
    fn only_whole_binding_requests_are_routed_by_ufrag() {
        let m = binding_request(b"srv:cli");
        let mut indication = m.clone();
        indication[1] = 0x11;
        assert_eq!(local_ufrag(&indication), None, "Binding indication");
        let mut response = m.clone();
        response[0] = 0x01;
        assert_eq!(local_ufrag(&response), None, "Binding success response");
        let mut trailing = m.clone();
        trailing.extend_from_slice(&[0; 4]);
        assert_eq!(local_ufrag(&trailing), None, "bytes after the message");
        let mut short = m;
        short[3] -= 4;
        assert_eq!(
            local_ufrag(&short),
            None,
            "message shorter than the datagram"
        );
    }
}
