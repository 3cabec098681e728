//! The selective forwarding unit: one task that owns one UDP socket and
//! every server leg, routes each datagram to its leg, and forwards each
//! publisher's RTP to the other legs of its router.
//!
//! Why one task: forwarding is a function call from the publisher's leg to
//! each subscriber's leg, with no channel or lock per packet, and the
//! socket is shared by every participant (one media port). Rooms talk to it
//! with [`MediaCommand`]s and hear back through [`MediaEvent`]s.
//!
//! Routing of a datagram: a STUN request carries our ICE ufrag, which names
//! its leg; anything else (DTLS, SRTP, STUN responses) is routed by its
//! source address, learned only when the leg itself sends to that address
//! (so only after the leg's ICE agent accepted a check from it).
//!
//! A router is the set of legs of one room, and whether it forwards now
//! (not in peer-to-peer mode).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use prometheus::local::LocalHistogram;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::last_n::LastN;
use super::leg::{Forwarded, Kind, Leg, LegCounters};
use super::speaker::{Speaker, SpeakerDetector};
use super::{stun, vp8};
use crate::metrics::Metrics;
use crate::signaling::protocol::{IceCandidate, LegState};

/// Largest datagram accepted (an Ethernet MTU); larger ones are dropped.
pub const MAX_DATAGRAM: usize = 1500;
/// Bound of the command queue from rooms.
const COMMAND_QUEUE: usize = 4096;
/// Bound of each router's event queue to its room.
pub const EVENT_QUEUE: usize = 1024;
/// At most one keyframe request per publisher this often (LiveKit uses
/// 500 ms-1 s); more would only make the publisher waste bitrate.
const PLI_INTERVAL: Duration = Duration::from_millis(500);
/// The longest the task sleeps without checking its legs' timers.
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// SRTP/SRTCP datagrams read from the socket per turn (those already
/// queued) before the legs are drained and flushed: every subscriber leg
/// then has one datagram per publisher packet read, which go out together.
const RECV_BATCH: usize = 32;
/// A leg that was connected and has heard nothing valid from its client
/// (no STUN check, DTLS record or SRTP/SRTCP packet its engine accepted)
/// for this long is closed as failed. Media and RTCP flow all the time in
/// server-routed modes; a warm leg in `p2p` still gets consent checks
/// every 4-6 s (RFC 7675; browsers and webrtc-rs check every 2-2.5 s), so
/// this tolerates one lost check at the slowest pace. The engine's own
/// ICE timers count STUN only and fail a leg after 30 s (consent expiry),
/// too late for the others, who would see a frozen member meanwhile.
pub const LEG_SILENCE_TIMEOUT: Duration = Duration::from_secs(12);
/// How often the SFU looks for silent legs and closes a window of the
/// speaker detectors.
const SWEEP_INTERVAL: Duration = super::speaker::INTERVAL;
/// Most datagrams in one UDP GSO send (the kernel's limit is 64).
const GSO_MAX_SEGMENTS: usize = 32;

/// Socket buffer size asked for (the kernel caps it at `net.core.rmem_max`
/// / `wmem_max`). Every participant shares this one socket, so the default
/// (about 200 KiB, some 90 full-size datagrams) overflows under a burst and
/// the kernel drops honest packets with the junk.
const SOCKET_BUFFER: usize = 4 << 20;

/// Whether a datagram is SRTP or SRTCP (RFC 7983: first byte 128-191),
/// not STUN or DTLS.
fn is_srtp(data: &[u8]) -> bool {
    data.first().is_some_and(|b| (128..=191).contains(b))
}

/// Binds the shared UDP socket with large buffers.
fn bind_media_socket(bind: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&bind.into())?;
    UdpSocket::from_std(socket.into())
}

/// Identifies a router (one room's legs); unique for the server's life.
pub type RouterId = u64;

/// What rooms ask of the SFU.
#[derive(Debug)]
pub enum MediaCommand {
    /// Create a router that reports to `events`.
    OpenRouter {
        /// The router.
        router: RouterId,
        /// Where its events go.
        events: mpsc::Sender<MediaEvent>,
        /// Videos each subscriber receives (Last-N); 0: all.
        last_n: usize,
    },
    /// Drop a router and all its legs.
    CloseRouter {
        /// The router.
        router: RouterId,
    },
    /// Create the server leg of `participant` and offer it.
    AddLeg {
        /// The router.
        router: RouterId,
        /// The participant.
        participant: String,
        /// It holds the publish grant (else its media is never forwarded).
        publish: bool,
        /// It holds the subscribe grant (else nothing is forwarded to it).
        subscribe: bool,
    },
    /// Close the leg of `participant` and stop forwarding it to others.
    RemoveLeg {
        /// The router.
        router: RouterId,
        /// The participant.
        participant: String,
    },
    /// The client's answer on its leg.
    Answer {
        /// The router.
        router: RouterId,
        /// The participant.
        participant: String,
        /// The SDP.
        sdp: String,
    },
    /// A trickled candidate of the client.
    Candidate {
        /// The router.
        router: RouterId,
        /// The participant.
        participant: String,
        /// The candidate.
        candidate: IceCandidate,
    },
    /// Forward (server-routed modes) or not (peer-to-peer).
    SetForwarding {
        /// The router.
        router: RouterId,
        /// Forward or not.
        on: bool,
    },
    /// Always select (`on`) the video of `participant` under Last-N: it
    /// shares its screen.
    Pin {
        /// The router.
        router: RouterId,
        /// The participant.
        participant: String,
        /// Pinned or not.
        on: bool,
    },
}

/// What the SFU tells a room.
#[derive(Debug, Clone, PartialEq)]
pub enum MediaEvent {
    /// An offer to send to `participant` (`from: "sfu"`).
    Offer {
        /// The participant.
        participant: String,
        /// The SDP.
        sdp: String,
    },
    /// The leg's state changed.
    LegState {
        /// The participant.
        participant: String,
        /// The new state.
        state: LegState,
    },
    /// The room's speakers changed (see [`super::speaker`]): loudest
    /// first, the first is the dominant speaker; empty when nobody speaks.
    Speakers {
        /// The new list.
        speakers: Vec<Speaker>,
    },
    /// Under Last-N, the members whose video `participant` now receives
    /// (best first) changed.
    ForwardedVideo {
        /// The subscriber.
        participant: String,
        /// The publishers whose video it receives.
        ids: Vec<String>,
    },
    /// Something the client sent for its leg was refused.
    Refused {
        /// The participant.
        participant: String,
        /// Why.
        message: String,
    },
}

/// How rooms reach the SFU.
#[derive(Debug, Clone)]
pub struct SfuHandle {
    tx: mpsc::Sender<MediaCommand>,
    addr: SocketAddr,
}

impl SfuHandle {
    /// Sends a command (waits if the queue is full; fails only when the SFU
    /// has stopped).
    pub async fn send(&self, command: MediaCommand) -> bool {
        self.tx.send(command).await.is_ok()
    }

    /// The UDP address the SFU advertises in its candidates.
    pub fn advertised_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// A leg's key in the SFU's tables.
type LegKey = u64;

#[derive(Debug)]
struct Router {
    events: mpsc::Sender<MediaEvent>,
    forwarding: bool,
    /// Participant id → leg, in join order.
    legs: Vec<(String, LegKey)>,
    /// Last keyframe request per publisher.
    last_pli: HashMap<String, Instant>,
    /// Who is talking, from the publishers' audio levels.
    speakers: SpeakerDetector,
    /// Which videos each subscriber receives.
    last_n: LastN,
}

struct LegEntry {
    router: RouterId,
    leg: Leg,
    /// When its engine last accepted a datagram from its client.
    last_heard: Instant,
    /// Under Last-N, the videos its participant was last told it receives.
    forwarded_video: Option<Vec<String>>,
}

/// Why a leg was closed as failed (the `reason` of
/// `confab_server_legs_failed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LegFailure {
    /// Nothing heard for [`LEG_SILENCE_TIMEOUT`].
    Silent,
    /// The engine declared ICE failed.
    IceFailed,
    /// The engine panicked while handling this leg.
    Panic,
}

impl LegFailure {
    fn as_str(self) -> &'static str {
        match self {
            LegFailure::Silent => "silent",
            LegFailure::IceFailed => "ice_failed",
            LegFailure::Panic => "panic",
        }
    }
}

/// Test-only fault injection, compiled into debug builds only and inert
/// until a test arms it: a release build has no trace of it, and a debug
/// `confab` binary never arms it.
#[cfg(debug_assertions)]
#[doc(hidden)]
pub mod test_hooks {
    use std::sync::atomic::{AtomicBool, Ordering};

    static ARMED: AtomicBool = AtomicBool::new(false);

    /// An RTP payload starting with this makes the SFU panic while it
    /// processes the publishing leg.
    pub const PANIC_PAYLOAD: &[u8] = b"CONFAB-TEST-HOOK-PANIC";

    /// Arms the hooks for this process.
    pub fn arm() {
        ARMED.store(true, Ordering::Relaxed);
    }

    pub(super) fn panic_on(payload: &[u8]) {
        if ARMED.load(Ordering::Relaxed) && payload.starts_with(PANIC_PAYLOAD) {
            panic!("test hook: forced panic while processing a leg");
        }
    }
}

/// One packet to fan out.
struct Forward {
    router: RouterId,
    publisher: String,
    kind: Kind,
    keyframe: bool,
    packet: rtc::rtp::Packet,
}

/// The SFU task's state.
pub struct Sfu {
    socket: UdpSocket,
    local_addr: SocketAddr,
    advertised: SocketAddr,
    srtp_gcm_only: bool,
    commands: mpsc::Receiver<MediaCommand>,
    metrics: Arc<Metrics>,
    routers: HashMap<RouterId, Router>,
    legs: HashMap<LegKey, LegEntry>,
    by_ufrag: HashMap<String, LegKey>,
    by_addr: HashMap<SocketAddr, LegKey>,
    next_key: LegKey,
    /// Legs with work to drain after the current input.
    dirty: HashSet<LegKey>,
    /// Each leg's next timer as its engine last reported it. A deadline
    /// moves only when the leg is fed or drained, and every leg that is
    /// becomes dirty and is re-read in `flush`, so the loop never asks all
    /// legs (each engine walks all its streams to answer).
    timeouts: HashMap<LegKey, Instant>,
    /// Send runs of datagrams with UDP GSO (off after the kernel refused).
    gso: bool,
    gso_buf: Vec<u8>,
    started: Instant,
    /// Receive → send time of forwarded packets, gathered without atomics
    /// and flushed into the shared histogram once per loop turn.
    forward_latency: LocalHistogram,
    /// Received packets forwarded (to at least one subscriber) in this
    /// loop turn.
    turn_forwarded: u32,
    latency_flushed: Instant,
    /// Next look for silent legs.
    next_sweep: Instant,
    /// Legs whose engine panicked during a drain or flush, closed after it.
    broken: Vec<LegKey>,
}

/// How often the loop publishes its latency observations (a flush is a
/// dozen atomic additions; a loop turn can be a single packet).
const LATENCY_FLUSH: Duration = Duration::from_millis(250);

impl std::fmt::Debug for Sfu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sfu")
            .field("local_addr", &self.local_addr)
            .field("legs", &self.legs.len())
            .finish_non_exhaustive()
    }
}

impl Sfu {
    /// Binds the media socket. `advertised` is the address put into
    /// candidates (the public IP for 1:1 NAT, else the bound address).
    pub async fn bind(
        bind: SocketAddr,
        public_ip: Option<std::net::IpAddr>,
        srtp_gcm_only: bool,
        metrics: Arc<Metrics>,
    ) -> Result<(Sfu, SfuHandle), String> {
        let socket = bind_media_socket(bind)
            .map_err(|e| format!("cannot bind the media port {bind}: {e}"))?;
        let local_addr = socket
            .local_addr()
            .map_err(|e| format!("media socket: {e}"))?;
        let ip = match public_ip {
            Some(ip) => ip,
            None if local_addr.ip().is_unspecified() => {
                return Err(format!(
                    "the media socket is bound to {local_addr}: set --public-ip to the address clients reach"
                ))
            }
            None => local_addr.ip(),
        };
        let advertised = SocketAddr::new(ip, local_addr.port());
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let sfu = Sfu {
            socket,
            local_addr,
            advertised,
            srtp_gcm_only,
            commands,
            routers: HashMap::new(),
            legs: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            next_key: 1,
            dirty: HashSet::new(),
            timeouts: HashMap::new(),
            gso: true,
            gso_buf: Vec::with_capacity(GSO_MAX_SEGMENTS * (MAX_DATAGRAM + 16)),
            started: Instant::now(),
            forward_latency: metrics.forward_latency.local(),
            turn_forwarded: 0,
            latency_flushed: Instant::now(),
            metrics,
            next_sweep: Instant::now() + SWEEP_INTERVAL,
            broken: Vec::new(),
        };
        Ok((
            sfu,
            SfuHandle {
                tx,
                addr: advertised,
            },
        ))
    }

    /// Runs until every [`SfuHandle`] is dropped.
    pub async fn run(mut self) {
        // One byte more than the largest accepted datagram: a datagram
        // that fills the buffer was larger and is dropped.
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        loop {
            let now = Instant::now();
            let next = self
                .timeouts
                .values()
                .min()
                .copied()
                .unwrap_or(now + MAX_SLEEP)
                .min(now + MAX_SLEEP);
            tokio::select! {
                received = self.socket.recv_from(&mut buf) => {
                    match received {
                        Ok((len, from)) => {
                            let mut media = is_srtp(&buf[..len]);
                            self.on_datagram(&buf[..len], len > MAX_DATAGRAM, from);
                            // Whatever SRTP/SRTCP is queued joins this turn.
                            // STUN and DTLS are handled one per turn, as
                            // before batching: legs in their handshakes
                            // failed when a turn fed them several.
                            for _ in 1..RECV_BATCH {
                                if !media {
                                    break;
                                }
                                match self.socket.try_recv_from(&mut buf) {
                                    Ok((len, from)) => {
                                        media = is_srtp(&buf[..len]);
                                        self.on_datagram(&buf[..len], len > MAX_DATAGRAM, from)
                                    }
                                    Err(_) => break,
                                }
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "media socket receive error"),
                    }
                }
                command = self.commands.recv() => {
                    let Some(command) = command else { break };
                    self.on_command(command);
                }
                _ = tokio::time::sleep_until(next.into()) => self.on_timers(),
            }
            // Packets read in this turn leave in it: from here to the end
            // of `drain` (which sends) is their time inside the server.
            let woke = Instant::now();
            if Instant::now() >= self.next_sweep {
                self.sweep();
            }
            self.drain().await;
            if self.turn_forwarded > 0 {
                let secs = woke.elapsed().as_secs_f64();
                for _ in 0..self.turn_forwarded {
                    self.forward_latency.observe(secs);
                }
                self.turn_forwarded = 0;
            }
            if woke.duration_since(self.latency_flushed) >= LATENCY_FLUSH {
                self.forward_latency.flush();
                self.latency_flushed = woke;
            }
        }
        for (_, mut entry) in self.legs.drain() {
            let _ = entry.leg.pc().close();
        }
    }

    fn on_datagram(&mut self, data: &[u8], oversize: bool, from: SocketAddr) {
        if oversize {
            self.metrics
                .media_dropped
                .with_label_values(&["oversize"])
                .inc();
            return;
        }
        let key = match stun::local_ufrag(data) {
            Some(ufrag) => self.by_ufrag.get(ufrag).copied(),
            None => self.by_addr.get(&from).copied(),
        };
        let Some(key) = key else {
            self.metrics
                .media_dropped
                .with_label_values(&["unroutable"])
                .inc();
            return;
        };
        let Some(entry) = self.legs.get_mut(&key) else {
            return;
        };
        let message = TaggedBytesMut {
            now: Instant::now(),
            transport: TransportContext {
                local_addr: self.local_addr,
                peer_addr: from,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: BytesMut::from(data),
        };
        // The engine logs and drops what SRTP refuses (a failed
        // authentication, such as plain RTP; a replay; no keys yet) without
        // an error: it shows as a datagram that no packet came out of.
        let srtp = is_srtp(data);
        let read_before = entry.leg.packets_read();
        // A bug in the engine triggered by one client's bytes must cost that
        // client its leg, not everyone their media.
        let result = catch_unwind(AssertUnwindSafe(|| entry.leg.pc().handle_read(message)));
        match result {
            Ok(Ok(())) if srtp && entry.leg.packets_read() == read_before => {
                self.metrics
                    .media_dropped
                    .with_label_values(&["srtp"])
                    .inc();
            }
            Ok(Ok(())) => entry.last_heard = Instant::now(),
            Ok(Err(e)) => {
                self.metrics
                    .media_dropped
                    .with_label_values(&["rejected"])
                    .inc();
                tracing::trace!(error = %e, "datagram rejected by its leg");
            }
            Err(_) => {
                self.fail_leg(key, LegFailure::Panic);
                return;
            }
        }
        self.dirty.insert(key);
    }

    /// Closes a leg that failed (its engine panicked, ICE failed, or its
    /// client went silent): the other members' downtracks of it are
    /// retired by a new offer, and the room hears `failed`. The participant
    /// stays in the room (its signaling may well be alive); its leg is not
    /// reused.
    fn fail_leg(&mut self, key: LegKey, why: LegFailure) {
        let Some(entry) = self.legs.get(&key) else {
            return;
        };
        let (router, participant) = (entry.router, entry.leg.participant.clone());
        match why {
            LegFailure::Panic => {
                tracing::error!(%participant, "server leg panicked; closed")
            }
            _ => tracing::warn!(%participant, reason = why.as_str(), "server leg failed; closed"),
        }
        self.metrics
            .legs_failed
            .with_label_values(&[why.as_str()])
            .inc();
        self.remove_leg(router, &participant, Instant::now());
        // Not in its router's list (should not happen): drop it anyway.
        self.drop_leg(key);
        self.emit(
            router,
            MediaEvent::LegState {
                participant,
                state: LegState::Failed,
            },
        );
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        let mut panicked = Vec::new();
        let due: Vec<LegKey> = self
            .timeouts
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            self.timeouts.remove(&key);
            let Some(entry) = self.legs.get_mut(&key) else {
                continue;
            };
            let pc = entry.leg.pc();
            match catch_unwind(AssertUnwindSafe(|| pc.handle_timeout(now))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "leg timer error"),
                Err(_) => panicked.push(key),
            }
            self.dirty.insert(key);
        }
        for key in panicked {
            self.fail_leg(key, LegFailure::Panic);
        }
    }

    /// Closes legs that went silent (see [`LEG_SILENCE_TIMEOUT`]) and
    /// publishes the size of the routing tables.
    fn sweep(&mut self) {
        let now = Instant::now();
        self.next_sweep = now + SWEEP_INTERVAL;
        let silent: Vec<LegKey> = self
            .legs
            .iter()
            .filter(|(_, e)| {
                e.leg.ever_connected()
                    && now.saturating_duration_since(e.last_heard) >= LEG_SILENCE_TIMEOUT
            })
            .map(|(k, _)| *k)
            .collect();
        for key in silent {
            self.fail_leg(key, LegFailure::Silent);
        }
        self.detect_speakers();
        // Pin changes that waited for their cooldown.
        let settled: Vec<RouterId> = self
            .routers
            .iter_mut()
            .filter_map(|(id, r)| r.last_n.settle(now).then_some(*id))
            .collect();
        for router in settled {
            self.apply_last_n(router, now);
        }
        self.metrics
            .media_routes
            .set((self.by_ufrag.len() + self.by_addr.len()) as i64);
    }

    /// Closes a window of every room's speaker detector and tells the
    /// rooms whose speakers changed.
    fn detect_speakers(&mut self) {
        let mut changed = Vec::new();
        for (id, router) in &mut self.routers {
            let legs = &mut self.legs;
            let windows = router.legs.iter().map(|(participant, key)| {
                let score = legs.get_mut(key).map_or(0.0, |e| e.leg.audio_levels.take());
                (participant.as_str(), score)
            });
            if let Some(speakers) = router.speakers.update(windows) {
                let ids: Vec<String> = speakers.iter().map(|s| s.id.clone()).collect();
                let reranked = router.last_n.spoke(&ids);
                changed.push((*id, speakers, reranked));
            }
        }
        let now = Instant::now();
        for (router, speakers, reranked) in changed {
            self.emit(router, MediaEvent::Speakers { speakers });
            if reranked {
                self.apply_last_n(router, now);
            }
        }
    }

    /// Closes the legs that panicked during the last drain or flush.
    fn reap(&mut self) {
        while let Some(key) = self.broken.pop() {
            self.fail_leg(key, LegFailure::Panic);
        }
    }

    fn leg_key(&self, router: RouterId, participant: &str) -> Option<LegKey> {
        self.routers
            .get(&router)?
            .legs
            .iter()
            .find(|(p, _)| p == participant)
            .map(|(_, k)| *k)
    }

    /// Sends an event to the room of `router` (dropped, with a warning, if
    /// the room is not reading).
    fn emit(&self, router: RouterId, event: MediaEvent) {
        self.try_emit(router, event);
    }

    /// [`Sfu::emit`], telling whether the event was queued.
    fn try_emit(&self, router: RouterId, event: MediaEvent) -> bool {
        let Some(r) = self.routers.get(&router) else {
            return false;
        };
        if r.events.try_send(event).is_err() {
            tracing::warn!(router, "room is not reading media events; one dropped");
            return false;
        }
        true
    }

    fn on_command(&mut self, command: MediaCommand) {
        let now = Instant::now();
        match command {
            MediaCommand::OpenRouter {
                router,
                events,
                last_n,
            } => {
                self.routers.insert(
                    router,
                    Router {
                        events,
                        forwarding: false,
                        legs: Vec::new(),
                        last_pli: HashMap::new(),
                        speakers: SpeakerDetector::default(),
                        last_n: LastN::new(last_n),
                    },
                );
            }
            MediaCommand::CloseRouter { router } => {
                if let Some(r) = self.routers.remove(&router) {
                    for (_, key) in r.legs {
                        self.drop_leg(key);
                    }
                }
            }
            MediaCommand::AddLeg {
                router,
                participant,
                publish,
                subscribe,
            } => self.add_leg(router, participant, publish, subscribe, now),
            MediaCommand::RemoveLeg {
                router,
                participant,
            } => self.remove_leg(router, &participant, now),
            MediaCommand::Answer {
                router,
                participant,
                sdp,
            } => {
                let Some(key) = self.leg_key(router, &participant) else {
                    return;
                };
                let Some(entry) = self.legs.get_mut(&key) else {
                    return;
                };
                match entry.leg.apply_answer(sdp, now) {
                    Ok(next) => {
                        if let Some(sdp) = next {
                            self.emit(router, MediaEvent::Offer { participant, sdp });
                        }
                    }
                    Err(message) => self.emit(
                        router,
                        MediaEvent::Refused {
                            participant,
                            message: format!("answer refused: {message}"),
                        },
                    ),
                }
                self.dirty.insert(key);
            }
            MediaCommand::Candidate {
                router,
                participant,
                candidate,
            } => {
                if candidate.candidate.is_empty() {
                    return;
                }
                if let Some(key) = self.leg_key(router, &participant) {
                    if let Some(entry) = self.legs.get_mut(&key) {
                        entry.leg.add_remote_candidate(RTCIceCandidateInit {
                            candidate: candidate.candidate,
                            sdp_mid: candidate.sdp_mid,
                            sdp_mline_index: candidate.sdp_mline_index,
                            username_fragment: candidate.username_fragment,
                            ..Default::default()
                        });
                        self.dirty.insert(key);
                    }
                }
            }
            MediaCommand::Pin {
                router,
                participant,
                on,
            } => {
                // Only a member whose media can be forwarded may take a slot.
                let publishes = self
                    .leg_key(router, &participant)
                    .and_then(|k| self.legs.get(&k))
                    .is_some_and(|e| e.leg.may_publish);
                let changed = publishes
                    && self
                        .routers
                        .get_mut(&router)
                        .is_some_and(|r| r.last_n.pin(&participant, on, now));
                if changed {
                    self.apply_last_n(router, now);
                }
            }
            MediaCommand::SetForwarding { router, on } => {
                let Some(r) = self.routers.get_mut(&router) else {
                    return;
                };
                if r.forwarding == on {
                    return;
                }
                r.forwarding = on;
                let legs: Vec<(String, LegKey)> = r.legs.clone();
                for (publisher, key) in legs {
                    if on {
                        // Every downtrack (re)starts on a keyframe: ask now.
                        self.request_keyframe(router, &publisher, now, true);
                    } else if let Some(entry) = self.legs.get_mut(&key) {
                        // Nothing is forwarded until `on` again; resuming
                        // must not leave sequence holes.
                        entry.leg.pause_downtracks();
                    }
                }
            }
        }
    }

    fn add_leg(
        &mut self,
        router: RouterId,
        participant: String,
        publish: bool,
        subscribe: bool,
        now: Instant,
    ) {
        let Some(r) = self.routers.get(&router) else {
            return;
        };
        if r.legs.iter().any(|(p, _)| *p == participant) {
            return;
        }
        let counters = LegCounters {
            nack: self.metrics.nack.clone(),
            retransmitted: self.metrics.retransmitted.clone(),
            retransmissions_dropped: self.metrics.retransmissions_dropped.clone(),
        };
        let leg = Leg::with_counters(
            &participant,
            self.advertised,
            self.srtp_gcm_only,
            publish,
            counters,
            now,
        );
        let mut leg = match leg {
            Ok(mut leg) => {
                leg.may_subscribe = subscribe;
                leg
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot create a server leg");
                self.emit(
                    router,
                    MediaEvent::LegState {
                        participant,
                        state: LegState::Failed,
                    },
                );
                return;
            }
        };
        let others: Vec<(String, LegKey)> = r.legs.clone();
        let key = self.next_key;
        self.next_key += 1;
        // The newcomer receives every existing member that may publish;
        // every existing member receives the newcomer if it may publish.
        // A member without the publish grant (a webinar's viewer) adds no
        // section to anyone's SDP: its join and departure renegotiate
        // nobody else.
        for (other, other_key) in &others {
            let Some(entry) = self.legs.get_mut(other_key) else {
                continue;
            };
            if entry.leg.may_publish {
                if let Err(e) = leg.add_downtracks(other) {
                    tracing::error!(error = %e, "cannot add downtracks");
                }
            }
            if publish {
                if let Err(e) = entry.leg.add_downtracks(&participant) {
                    tracing::error!(error = %e, "cannot add downtracks");
                }
                self.renegotiate(router, *other_key, now);
            }
        }
        self.by_ufrag.insert(leg.ufrag.clone(), key);
        self.legs.insert(
            key,
            LegEntry {
                router,
                leg,
                last_heard: now,
                forwarded_video: None,
            },
        );
        if let Some(r) = self.routers.get_mut(&router) {
            r.legs.push((participant.clone(), key));
        }
        self.metrics.legs.inc();
        self.emit(
            router,
            MediaEvent::LegState {
                participant,
                state: LegState::Connecting,
            },
        );
        self.renegotiate(router, key, now);
        self.apply_last_n(router, now);
    }

    /// Holds and releases video downtracks so that every subscriber of
    /// `router` receives the videos Last-N selects for it, and tells the
    /// subscribers whose selection changed. Released videos get a
    /// keyframe request.
    fn apply_last_n(&mut self, router: RouterId, now: Instant) {
        let Some(r) = self.routers.get(&router) else {
            return;
        };
        if !r.last_n.enabled() {
            return;
        }
        // Members without the publish grant send nothing that is forwarded:
        // they never take a slot (and have no downtracks to hold).
        let publishers: Vec<&str> = r
            .legs
            .iter()
            .filter(|(_, k)| self.legs.get(k).is_some_and(|e| e.leg.may_publish))
            .map(|(p, _)| p.as_str())
            .collect();
        let ranking = r.last_n.ranking(&publishers);
        let mut events = Vec::new();
        let mut released: Vec<String> = Vec::new();
        for (subscriber, key) in &r.legs {
            let Some(entry) = self.legs.get_mut(key) else {
                continue;
            };
            let selection = r.last_n.select(&ranking, subscriber);
            for publisher in &publishers {
                if *publisher != subscriber
                    && entry
                        .leg
                        .hold_video(publisher, !selection.iter().any(|s| s == publisher))
                    && !released.iter().any(|p| p == publisher)
                {
                    released.push((*publisher).to_owned());
                }
            }
            if entry.forwarded_video.as_ref() != Some(&selection) {
                entry.forwarded_video = Some(selection.clone());
                events.push((
                    *key,
                    MediaEvent::ForwardedVideo {
                        participant: subscriber.clone(),
                        ids: selection,
                    },
                ));
            }
        }
        for (key, event) in events {
            if !self.try_emit(router, event) {
                // Told nothing: tell it at the next change.
                if let Some(entry) = self.legs.get_mut(&key) {
                    entry.forwarded_video = None;
                }
            }
        }
        for publisher in released {
            self.request_keyframe(router, &publisher, now, false);
        }
    }

    fn renegotiate(&mut self, router: RouterId, key: LegKey, now: Instant) {
        let Some(entry) = self.legs.get_mut(&key) else {
            return;
        };
        let participant = entry.leg.participant.clone();
        match entry.leg.negotiate(now) {
            Ok(Some(sdp)) => self.emit(router, MediaEvent::Offer { participant, sdp }),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, %participant, "cannot create an offer"),
        }
        self.dirty.insert(key);
    }

    fn remove_leg(&mut self, router: RouterId, participant: &str, now: Instant) {
        if let Some(r) = self.routers.get_mut(&router) {
            r.last_n.forget(participant);
        }
        let Some(key) = self.leg_key(router, participant) else {
            return;
        };
        let others: Vec<LegKey> = match self.routers.get_mut(&router) {
            Some(r) => {
                r.legs.retain(|(p, _)| p != participant);
                r.last_pli.remove(participant);
                r.legs.iter().map(|(_, k)| *k).collect()
            }
            None => Vec::new(),
        };
        self.drop_leg(key);
        for other in others {
            let removed = self
                .legs
                .get_mut(&other)
                .is_some_and(|entry| entry.leg.remove_downtracks(participant));
            if removed {
                self.renegotiate(router, other, now);
            }
        }
        self.apply_last_n(router, now);
    }

    fn drop_leg(&mut self, key: LegKey) {
        if let Some(mut entry) = self.legs.remove(&key) {
            let _ = entry.leg.pc().close();
            self.by_ufrag.remove(&entry.leg.ufrag);
            self.by_addr.retain(|_, k| *k != key);
            self.dirty.remove(&key);
            self.timeouts.remove(&key);
            self.metrics.legs.dec();
        }
    }

    /// Asks `publisher` for a keyframe, at most once per [`PLI_INTERVAL`]
    /// unless `force`d.
    fn request_keyframe(&mut self, router: RouterId, publisher: &str, now: Instant, force: bool) {
        let Some(r) = self.routers.get_mut(&router) else {
            return;
        };
        // Nothing is forwarded in peer-to-peer mode; forwarding asks anew
        // when it starts.
        if !r.forwarding {
            return;
        }
        if !force
            && r.last_pli
                .get(publisher)
                .is_some_and(|t| now.duration_since(*t) < PLI_INTERVAL)
        {
            return;
        }
        let Some(key) = r.legs.iter().find(|(p, _)| p == publisher).map(|(_, k)| *k) else {
            return;
        };
        r.last_pli.insert(publisher.to_owned(), now);
        if let Some(entry) = self.legs.get_mut(&key) {
            entry.leg.request_keyframe(now);
            self.metrics.pli.inc();
            self.dirty.insert(key);
        }
    }

    /// Drains every leg with pending work: events, media (forwarded to
    /// other legs, which then have work too), and datagrams to send.
    async fn drain(&mut self) {
        let now = Instant::now();
        let mut forwards: Vec<Forward> = Vec::new();
        let mut keyframe_requests: Vec<(RouterId, String)> = Vec::new();
        let mut forced_keyframes: Vec<(RouterId, String)> = Vec::new();
        let mut state_events: Vec<(RouterId, MediaEvent)> = Vec::new();
        let mut ice_failed: Vec<LegKey> = Vec::new();
        let keys: Vec<LegKey> = self.dirty.iter().copied().collect();
        for key in &keys {
            let Some(entry) = self.legs.get_mut(key) else {
                continue;
            };
            let router = entry.router;
            let forwarding = self.routers.get(&router).is_some_and(|r| r.forwarding);
            let leg = &mut entry.leg;
            // A panic of the engine (or of Confab's handling) on one leg
            // costs that leg, not the SFU task and everyone's media.
            let result = catch_unwind(AssertUnwindSafe(|| {
                let mut tracks: Vec<(String, Kind)> = Vec::new();
                while let Some(event) = leg.pc().poll_event() {
                    match event {
                        RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) => {
                            if let Some(state) = Leg::leg_state(s) {
                                if state == LegState::Failed {
                                    // Final: the leg is closed after this pass.
                                    ice_failed.push(*key);
                                } else if state != leg.state {
                                    leg.set_state(state);
                                    state_events.push((
                                        router,
                                        MediaEvent::LegState {
                                            participant: leg.participant.clone(),
                                            state,
                                        },
                                    ));
                                    if state == LegState::Connected {
                                        // Its downtracks start now: they need
                                        // keyframes, whatever the throttle says.
                                        for publisher in leg.downtracks.keys() {
                                            forced_keyframes.push((router, publisher.clone()));
                                        }
                                    }
                                }
                            }
                        }
                        RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                            if let Some(kind) = leg.publish_kind(init.receiver_id) {
                                tracks.push((init.track_id, kind));
                            }
                        }
                        _ => {}
                    }
                }
                for (track_id, kind) in tracks {
                    leg.note_inbound(track_id, kind);
                }
                while let Some(TaggedRTCMessage { message, .. }) = leg.pc().poll_read() {
                    match message {
                        RTCMessage::RtpPacket(track_id, mut packet) => {
                            #[cfg(debug_assertions)]
                            test_hooks::panic_on(&packet.payload);
                            if !forwarding || !leg.may_publish {
                                continue;
                            }
                            let Some(kind) = leg.inbound_kind(&track_id) else {
                                continue;
                            };
                            if kind == Kind::Audio {
                                leg.observe_audio_level(&packet.header);
                            }
                            // Header extensions are negotiated per leg; none is
                            // meaningful on another leg.
                            packet.header.extension = false;
                            packet.header.extensions.clear();
                            packet.header.extension_profile = 0;
                            let keyframe = kind == Kind::Video && vp8::is_keyframe(&packet.payload);
                            forwards.push(Forward {
                                router,
                                publisher: leg.participant.clone(),
                                kind,
                                keyframe,
                                packet,
                            });
                        }
                        RTCMessage::RtcpPacket(track_id, packets) => {
                            // From a subscriber about one of its downtracks.
                            let asks_keyframe = packets.iter().any(|p| {
                                p.as_any().downcast_ref::<PictureLossIndication>().is_some()
                                    || p.as_any().downcast_ref::<FullIntraRequest>().is_some()
                            });
                            if asks_keyframe {
                                if let Some(publisher) = leg
                                    .downtracks
                                    .iter()
                                    .find(|(_, t)| t.iter().any(|d| d.track_id == track_id))
                                    .map(|(p, _)| p.clone())
                                {
                                    keyframe_requests.push((router, publisher));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }));
            if result.is_err() {
                self.broken.push(*key);
            }
        }
        for (router, event) in state_events {
            self.emit(router, event);
        }
        self.reap();
        for key in ice_failed {
            self.fail_leg(key, LegFailure::IceFailed);
        }
        let micros = now.duration_since(self.started).as_micros() as u64;
        for f in forwards {
            self.fan_out(f, now, micros, &mut keyframe_requests);
        }
        self.reap();
        for (router, publisher) in forced_keyframes {
            self.request_keyframe(router, &publisher, now, true);
        }
        for (router, publisher) in keyframe_requests {
            self.request_keyframe(router, &publisher, now, false);
        }
        self.flush().await;
        self.reap();
    }

    fn fan_out(
        &mut self,
        f: Forward,
        now: Instant,
        micros: u64,
        keyframe_requests: &mut Vec<(RouterId, String)>,
    ) {
        let Some(router) = self.routers.get(&f.router) else {
            return;
        };
        let bytes = f.packet.payload.len() as u64;
        let mut sent = 0u64;
        for (subscriber, key) in &router.legs {
            if *subscriber == f.publisher {
                continue;
            }
            let Some(entry) = self.legs.get_mut(key) else {
                continue;
            };
            let leg = &mut entry.leg;
            if !leg.may_subscribe {
                continue;
            }
            let Ok(forwarded) = catch_unwind(AssertUnwindSafe(|| {
                leg.forward(&f.publisher, f.kind, &f.packet, f.keyframe, now, micros)
            })) else {
                self.broken.push(*key);
                continue;
            };
            match forwarded {
                Forwarded::Sent => {
                    sent += 1;
                    self.dirty.insert(*key);
                }
                Forwarded::WaitingForKeyframe => {
                    keyframe_requests.push((f.router, f.publisher.clone()));
                }
                Forwarded::Dropped => {
                    self.dirty.insert(*key);
                }
                Forwarded::NotReady | Forwarded::Held => {}
            }
        }
        if sent > 0 {
            self.turn_forwarded += 1;
            let kind = f.kind.as_str();
            self.metrics
                .forwarded_packets
                .with_label_values(&[kind])
                .inc_by(sent);
            self.metrics
                .forwarded_bytes
                .with_label_values(&[kind])
                .inc_by(sent * bytes);
        }
    }

    /// Sends every datagram the dirty legs produced. A leg's datagrams
    /// (all to its client's address) go out as UDP GSO sends where runs of
    /// equal size allow (one system call for up to [`GSO_MAX_SEGMENTS`]).
    async fn flush(&mut self) {
        let keys: Vec<LegKey> = self.dirty.drain().collect();
        let mut out: Vec<(SocketAddr, BytesMut)> = Vec::new();
        for key in keys {
            let Some(entry) = self.legs.get_mut(&key) else {
                continue;
            };
            let pc = entry.leg.pc();
            let polled = catch_unwind(AssertUnwindSafe(|| {
                while let Some(o) = pc.poll_write() {
                    out.push((o.transport.peer_addr, o.message));
                }
                pc.poll_timeout()
            }));
            match polled {
                Ok(Some(t)) => {
                    self.timeouts.insert(key, t);
                }
                Ok(None) => {
                    self.timeouts.remove(&key);
                }
                Err(_) => {
                    self.broken.push(key);
                    out.clear();
                    continue;
                }
            }
            let mut i = 0;
            while i < out.len() {
                let (to, ref first) = out[i];
                // The leg chose to talk to `to` (its ICE agent accepted a
                // check from there): route that address's traffic to it.
                self.by_addr.entry(to).or_insert(key);
                // A run: same destination, same size; the last may be
                // shorter.
                let size = first.len();
                let mut end = i + 1;
                while end < out.len()
                    && end - i < GSO_MAX_SEGMENTS
                    && out[end].0 == to
                    && out[end - 1].1.len() == size
                    && out[end].1.len() <= size
                {
                    end += 1;
                }
                if end - i > 1 && self.gso && self.send_gso(&out[i..end], size) {
                    i = end;
                    continue;
                }
                for (to, message) in &out[i..end] {
                    if let Err(e) = self.socket.send_to(message, *to).await {
                        tracing::trace!(error = %e, %to, "media send failed");
                    }
                }
                i = end;
            }
            out.clear();
        }
    }

    /// One UDP GSO send of `run` (same destination, segments of `size`,
    /// the last possibly shorter). False if it did not go out (the socket
    /// is full, or the kernel refuses GSO, which turns it off for good);
    /// the caller then sends the datagrams one by one.
    #[cfg(target_os = "linux")]
    fn send_gso(&mut self, run: &[(SocketAddr, BytesMut)], size: usize) -> bool {
        use std::os::fd::AsRawFd;

        use nix::errno::Errno;
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};

        let to = SockaddrStorage::from(run[0].0);
        self.gso_buf.clear();
        for (_, m) in run {
            self.gso_buf.extend_from_slice(m);
        }
        let Ok(segment) = u16::try_from(size) else {
            return false;
        };
        let iov = [std::io::IoSlice::new(&self.gso_buf)];
        let cmsg = [ControlMessage::UdpGsoSegments(&segment)];
        match sendmsg(
            self.socket.as_raw_fd(),
            &iov,
            &cmsg,
            MsgFlags::empty(),
            Some(&to),
        ) {
            Ok(_) => true,
            Err(Errno::EAGAIN) => false,
            Err(e) => {
                tracing::info!(error = %e, "UDP GSO refused; sending datagrams one by one");
                self.gso = false;
                false
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn send_gso(&mut self, _run: &[(SocketAddr, BytesMut)], _size: usize) -> bool {
        self.gso = false;
        false
    }
}
