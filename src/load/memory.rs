//! Server legs and client endpoints wired together in memory: the SFU's
//! per-subscriber send path (forwarder, `rtc` interceptors, SRTP) can be
//! measured after a real ICE + DTLS handshake, without sockets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};

use super::client::{Endpoint, SrtpChoice};
use crate::media::leg::Leg;
use crate::signaling::protocol::LegState;

/// The server address the legs pretend to have.
pub const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7882);

fn tagged(now: Instant, local: SocketAddr, peer: SocketAddr, data: &[u8]) -> TaggedBytesMut {
    TaggedBytesMut {
        now,
        transport: TransportContext {
            local_addr: local,
            peer_addr: peer,
            ecn: None,
            transport_protocol: TransportProtocol::UDP,
        },
        message: BytesMut::from(data),
    }
}

/// `n` subscriber legs, each receiving `publisher`'s audio and video, and
/// their clients, connected over memory.
pub struct MemoryRoom {
    /// The server's legs, one per subscriber.
    pub legs: Vec<Leg>,
    /// The subscribers' endpoints, in the same order.
    pub clients: Vec<Endpoint>,
}

impl std::fmt::Debug for MemoryRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRoom")
            .field("legs", &self.legs.len())
            .finish()
    }
}

impl MemoryRoom {
    /// Builds, negotiates and connects `n` legs (ICE, DTLS, SRTP with
    /// `srtp`); fails if they are not all connected within `within`.
    pub fn connect(
        n: usize,
        publisher: &str,
        srtp: SrtpChoice,
        within: Duration,
    ) -> Result<MemoryRoom, String> {
        let now = Instant::now();
        let mut legs = Vec::with_capacity(n);
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            let mut leg = Leg::new(&format!("sub{i}"), SERVER, false, now)?;
            leg.add_downtracks(publisher)?;
            let offer = leg.negotiate(now)?.ok_or("no offer")?;
            let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 20_000 + i as u16);
            let mut client = Endpoint::new(&format!("sub{i}"), local, [false, false], srtp, now)?;
            let answer = client.answer(offer, now)?;
            leg.apply_answer(answer, now)?;
            legs.push(leg);
            clients.push(client);
        }
        let mut room = MemoryRoom { legs, clients };
        let deadline = now + within;
        let mut up = vec![[false, false]; n];
        while up.iter().any(|u| !(u[0] && u[1])) {
            let now = Instant::now();
            if now > deadline {
                return Err(format!(
                    "{} of {n} pairs connected in {within:?}",
                    up.iter().filter(|u| u[0] && u[1]).count()
                ));
            }
            let moved = room.pump(now);
            for (i, (leg, client)) in room.legs.iter_mut().zip(&mut room.clients).enumerate() {
                while let Some(e) = leg.pc().poll_event() {
                    if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = e {
                        up[i][0] = s == RTCPeerConnectionState::Connected;
                    }
                }
                while let Some(e) = client.pc().poll_event() {
                    if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = e {
                        up[i][1] = s == RTCPeerConnectionState::Connected;
                    }
                }
                while leg.pc().poll_read().is_some() {}
                while client.pc().poll_read().is_some() {}
            }
            if moved == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for leg in &mut room.legs {
            leg.state = LegState::Connected;
        }
        Ok(room)
    }

    /// Runs due timers and moves every pending datagram once in each
    /// direction; returns how many moved.
    pub fn pump(&mut self, now: Instant) -> usize {
        let mut moved = 0;
        for (leg, client) in self.legs.iter_mut().zip(&mut self.clients) {
            let local = client.local_addr();
            if leg.pc().poll_timeout().is_some_and(|t| t <= now) {
                let _ = leg.pc().handle_timeout(now);
            }
            if client.pc().poll_timeout().is_some_and(|t| t <= now) {
                let _ = client.pc().handle_timeout(now);
            }
            while let Some(out) = leg.pc().poll_write() {
                let _ = client
                    .pc()
                    .handle_read(tagged(now, local, SERVER, &out.message));
                moved += 1;
            }
            while let Some(out) = client.pc().poll_write() {
                let _ = leg
                    .pc()
                    .handle_read(tagged(now, SERVER, local, &out.message));
                moved += 1;
            }
        }
        moved
    }
}
