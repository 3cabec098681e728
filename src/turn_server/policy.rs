//! Which peer addresses the relay may send to.
//!
//! A TURN server relays to any address a client names, from inside the
//! server's network. Without a rule it is an open door into that network
//! (its loopback services, the cloud metadata endpoint, private subnets).
//! The relay therefore refuses every address that is not a public unicast
//! address; `allow_loopback` admits 127.0.0.0/8 and ::1 for tests and local
//! demos, where both browsers and the server share one machine.
//!
//! One exception is always made: the server's own SFU media address (its
//! exact IP and port), which a relay-only client must reach for its server
//! leg even when that address is a private one (an on-premise deployment).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The relay's rule for peer addresses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerPolicy {
    /// Admit loopback peers (development only).
    pub allow_loopback: bool,
    /// Exact transport addresses admitted whatever their IP: the SFU's.
    pub exceptions: Vec<SocketAddr>,
}

impl PeerPolicy {
    /// Whether the relay may exchange packets with `addr`.
    pub fn allows_addr(&self, addr: SocketAddr) -> bool {
        self.allows(addr.ip())
            || self
                .exceptions
                .iter()
                .any(|e| e.port() == addr.port() && canonical(e.ip()) == canonical(addr.ip()))
    }

    /// Whether a permission (which names an IP only; the relay checks the
    /// port of every packet with [`PeerPolicy::allows_addr`]) may be
    /// installed for `ip`.
    pub fn allows_permission(&self, ip: IpAddr) -> bool {
        self.allows(ip)
            || self
                .exceptions
                .iter()
                .any(|e| canonical(e.ip()) == canonical(ip))
    }

    /// Whether the relay may exchange packets with `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if ip.is_loopback() {
            return self.allow_loopback;
        }
        match ip {
            IpAddr::V4(v4) => public_v4(v4),
            IpAddr::V6(v6) => public_v6(v6),
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are judged as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || a == 0 // "this network"
        || ip.is_private() // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local() // 169.254/16, cloud metadata
        || (a == 100 && (64..128).contains(&b)) // 100.64/10, carrier-grade NAT
        || (a == 192 && b == 0 && c == 0) // 192.0.0/24, IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // 198.18/15, benchmarking
        || ip.is_multicast()
        || a >= 240 // reserved and broadcast
        || ip.is_documentation())
}

fn public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // fc00::/7, unique local
        || (first & 0xffc0) == 0xfe80 // fe80::/10, link local
        || (first & 0xffc0) == 0xfec0 // fec0::/10, deprecated site local
        || ip.to_ipv4().is_some() // ::/96 IPv4-compatible (mapped ones are judged as IPv4)
        || (first == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        || first == 0x0064) // 64:ff9b::/96 NAT64 would reach IPv4 behind the server
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_refused_by_default() {
        let p = PeerPolicy::default();
        for a in [
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "::ffff:127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "::ffff:192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "fd00::1",
            "fc12::1",
            "fe80::1",
            "ff02::1",
            "198.18.0.1",
            "192.0.0.8",
            "64:ff9b::a00:1",
        ] {
            assert!(!p.allows(ip(a)), "{a} must be refused");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        let p = PeerPolicy::default();
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(p.allows(ip(a)), "{a} must be allowed");
        }
    }

    #[test]
    fn the_sfu_address_is_an_exact_exception() {
        let sfu: SocketAddr = "10.0.0.5:7882".parse().unwrap();
        let p = PeerPolicy {
            allow_loopback: false,
            exceptions: vec![sfu],
        };
        assert!(p.allows_addr(sfu));
        assert!(p.allows_addr("[::ffff:10.0.0.5]:7882".parse().unwrap()));
        assert!(!p.allows_addr("10.0.0.5:22".parse().unwrap()));
        assert!(!p.allows_addr("10.0.0.6:7882".parse().unwrap()));
        assert!(p.allows_permission(ip("10.0.0.5")));
        assert!(!p.allows_permission(ip("10.0.0.6")));
        assert!(!p.allows(ip("10.0.0.5")));
    }

    #[test]
    fn the_development_setting_admits_loopback_only() {
        let p = PeerPolicy {
            allow_loopback: true,
            exceptions: Vec::new(),
        };
        assert!(p.allows(ip("127.0.0.1")));
        assert!(p.allows(ip("::1")));
        assert!(p.allows(ip("::ffff:127.0.0.1")));
        assert!(!p.allows(ip("10.0.0.1")));
        assert!(!p.allows(ip("169.254.169.254")));
        assert!(!p.allows(ip("fe80::1")));
    }
}
