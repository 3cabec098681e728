//! One room's task: the only owner of its member list, its mode and its
//! router in the SFU.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use super::mode::Change;
use super::{Command, JoinReply, Kick, ModeMember, ModeState, NewParticipant, Outgoing};
use super::{ParticipantView, RoomHandle, RoomSettings, RoomView};
use crate::auth::Grants;
use crate::media::sfu::{MediaCommand, MediaEvent, RouterId, EVENT_QUEUE};
use crate::metrics::Metrics;
use crate::signaling::protocol::{
    ErrorCode, LeaveReason, LegState, MediaMode, MemberInfo, ServerMessage, SpeakerInfo,
    PROTOCOL_VERSION, SFU_ID,
};

/// A member as the room keeps it.
#[derive(Debug)]
struct Member {
    id: String,
    seq: u64,
    name: String,
    identity: Option<String>,
    audio_muted: bool,
    video_muted: bool,
    /// Shares its screen in place of its camera.
    screen: bool,
    outbox: mpsc::Sender<Outgoing>,
    kick: Option<oneshot::Sender<Kick>>,
    /// Its server leg's state, as the SFU last reported it.
    leg: Option<LegState>,
    /// When it joined, until its server leg first connects (join latency).
    joined_at: Option<Instant>,
    /// Lacks the publish or the subscribe grant: only the server can
    /// enforce that, so the room keeps such a member on the server.
    restricted: bool,
    /// Its token's grants.
    grants: Grants,
}

impl Member {
    fn info(&self) -> MemberInfo {
        MemberInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            audio_muted: self.audio_muted,
            video_muted: self.video_muted,
            screen: self.screen,
        }
    }
}

/// A removal decided while delivering messages, carried out afterwards so
/// that the member list is never changed mid-iteration.
struct Removal {
    id: String,
    reason: LeaveReason,
    kick: Option<ErrorCode>,
}

pub(super) struct Room {
    id: String,
    generation: u64,
    settings: Arc<RoomSettings>,
    registry: Arc<DashMap<String, RoomHandle>>,
    metrics: Arc<Metrics>,
    next_seq: Arc<AtomicU64>,
    /// In join order. Rooms are small, so a Vec beats a map.
    members: Vec<Member>,
    mode: ModeState,
    /// The mode counted in `rooms_by_mode`.
    counted_mode: MediaMode,
    pending: Vec<Removal>,
    /// Commands for the SFU, sent after each step (sending may wait).
    media_out: Vec<MediaCommand>,
}

impl Room {
    pub(super) fn new(
        id: String,
        generation: u64,
        settings: Arc<RoomSettings>,
        registry: Arc<DashMap<String, RoomHandle>>,
        metrics: Arc<Metrics>,
        next_seq: Arc<AtomicU64>,
    ) -> Self {
        metrics.rooms.inc();
        let mode = ModeState::new(settings.mode_policy_for(&id));
        let counted_mode = mode.mode();
        metrics
            .rooms_by_mode
            .with_label_values(&[counted_mode.as_str()])
            .inc();
        Room {
            id,
            generation,
            settings,
            registry,
            metrics,
            next_seq,
            members: Vec::new(),
            mode,
            counted_mode,
            pending: Vec::new(),
            media_out: Vec::new(),
        }
    }

    fn router(&self) -> RouterId {
        self.generation
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        tracing::debug!(room = %self.id, "room created");
        let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
        self.media_out.push(MediaCommand::OpenRouter {
            router: self.router(),
            events: events_tx,
            last_n: self.settings.last_n,
        });
        self.flush_media().await;
        let mut empty_since = Some(Instant::now());
        loop {
            let empty_deadline = empty_since.map(|t| t + self.settings.empty_room_timeout);
            let mode_deadline = self.mode.next_deadline();
            tokio::select! {
                command = rx.recv() => {
                    let Some(command) = command else { break };
                    self.handle(command);
                }
                Some(event) = events.recv() => self.on_media_event(event),
                _ = sleep_until(mode_deadline.unwrap_or_else(Instant::now)), if mode_deadline.is_some() => {
                    let before = self.mode.mode();
                    let change = self.mode.tick(Instant::now());
                    // A switch that ran out of time, or the delay before
                    // returning to peer-to-peer.
                    let reason = if matches!(before, MediaMode::ToSfu | MediaMode::ToP2p) {
                        "timeout"
                    } else {
                        "return_delay"
                    };
                    self.after_mode_change(change, None, reason);
                }
                _ = sleep_until(empty_deadline.unwrap_or_else(Instant::now)), if empty_deadline.is_some() => {
                    break;
                }
            }
            self.apply_removals();
            self.flush_media().await;
            empty_since = match (self.members.is_empty(), empty_since) {
                (true, None) => Some(Instant::now()),
                (true, since) => since,
                (false, _) => None,
            };
        }
        self.media_out.push(MediaCommand::CloseRouter {
            router: self.router(),
        });
        self.flush_media().await;
        // Leave the registry first, so new joins create a fresh room, then
        // hand every queued join back to be retried there.
        let generation = self.generation;
        self.registry
            .remove_if(&self.id, |_, h| h.generation == generation);
        rx.close();
        while let Ok(command) = rx.try_recv() {
            if let Command::Join { participant, reply } = command {
                let _ = reply.send(JoinReply::Retry(participant));
            }
        }
        tracing::debug!(room = %self.id, "room removed");
    }

    async fn flush_media(&mut self) {
        let Some(sfu) = self.settings.sfu.clone() else {
            self.media_out.clear();
            return;
        };
        for command in self.media_out.drain(..) {
            if !sfu.send(command).await {
                tracing::error!("the SFU has stopped");
                break;
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Join { participant, reply } => {
                let _ = reply.send(self.join(participant));
            }
            Command::Leave { id, reason } => self.pending.push(Removal {
                id,
                reason,
                kick: None,
            }),
            Command::Relay { from, to, message } => self.relay(&from, &to, message),
            Command::Chat { from, to, text } => self.chat(&from, to.as_deref(), text),
            Command::MediaState {
                id,
                audio_muted,
                video_muted,
                screen,
            } => {
                if let Some(m) = self.members.iter_mut().find(|m| m.id == id) {
                    // Without the publish grant nothing it sends is shown.
                    let screen = screen && m.grants.publish;
                    m.audio_muted = audio_muted;
                    m.video_muted = video_muted;
                    if m.screen != screen {
                        self.media_out.push(MediaCommand::Pin {
                            router: self.generation,
                            participant: id.clone(),
                            on: screen,
                        });
                    }
                    m.screen = screen;
                    let msg = ServerMessage::ParticipantUpdated {
                        id: id.clone(),
                        audio_muted,
                        video_muted,
                        screen,
                    };
                    self.broadcast(&msg, Some(&id));
                }
            }
            Command::MediaReady { id, epoch } => {
                let change = self.mode.media_ready(&id, epoch, Instant::now());
                self.after_mode_change(change, None, "media_ready");
            }
            Command::P2pFailed { id } => {
                let change = self.mode.p2p_failed(&id, Instant::now());
                self.after_mode_change(change, None, "p2p_failed");
            }
            Command::Inspect { reply } => {
                let _ = reply.send(RoomView {
                    id: self.id.clone(),
                    mode: self.mode.mode(),
                    epoch: self.mode.epoch(),
                    participants: self
                        .members
                        .iter()
                        .map(|m| ParticipantView {
                            id: m.id.clone(),
                            name: m.name.clone(),
                            identity: m.identity.clone(),
                            audio_muted: m.audio_muted,
                            video_muted: m.video_muted,
                            screen: m.screen,
                            server_leg: m.leg,
                            grants: m.grants,
                        })
                        .collect(),
                });
            }
            Command::Remove { id, reply } => {
                let ids: Vec<String> = self
                    .members
                    .iter()
                    .filter(|m| id.as_ref().is_none_or(|id| *id == m.id))
                    .map(|m| m.id.clone())
                    .collect();
                let _ = reply.send(ids.len());
                for id in ids {
                    tracing::info!(room = %self.id, participant = %id, "removed by an operator");
                    self.pending.push(Removal {
                        id,
                        reason: LeaveReason::Kicked,
                        kick: Some(ErrorCode::Removed),
                    });
                }
            }
        }
    }

    fn join(&mut self, p: NewParticipant) -> JoinReply {
        // The same identity again replaces the old socket (a reload, or a
        // second tab): evict the old one first so that it does not count
        // against the room's capacity.
        if let Some(identity) = &p.identity {
            if let Some(old) = self
                .members
                .iter()
                .find(|m| m.identity.as_ref() == Some(identity))
            {
                let old_id = old.id.clone();
                self.remove(&old_id, LeaveReason::Replaced, Some(ErrorCode::Replaced));
            }
        }
        if self.members.len() >= self.settings.max_participants {
            return JoinReply::Refused(ErrorCode::RoomFull);
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("p-{seq:x}{:08x}", rand::random::<u32>());
        let (publish, subscribe) = (p.grants.publish, p.grants.subscribe);
        let member = Member {
            id: id.clone(),
            seq,
            name: p.name,
            identity: p.identity,
            audio_muted: false,
            video_muted: false,
            screen: false,
            outbox: p.outbox,
            kick: Some(p.kick),
            leg: None,
            joined_at: Some(Instant::now()),
            restricted: !(publish && subscribe),
            grants: p.grants,
        };
        let info = member.info();
        let others: Vec<MemberInfo> = self.members.iter().map(Member::info).collect();
        let leg_states: Vec<ServerMessage> = self
            .members
            .iter()
            .filter_map(|m| {
                m.leg.map(|state| ServerMessage::ServerLeg {
                    id: m.id.clone(),
                    state,
                })
            })
            .collect();
        self.members.push(member);
        self.metrics.participants.inc();
        self.metrics.joins.inc();

        let change = self.mode.update(&self.mode_members(), Instant::now());
        let joined = ServerMessage::Joined {
            v: PROTOCOL_VERSION,
            room: self.id.clone(),
            participant_id: id.clone(),
            members: others,
            ice_servers: self.settings.ice_servers.for_participant(&id),
            mode: self.mode.view(&id),
        };
        self.send_to(&id, &joined);
        for msg in &leg_states {
            self.send_to(&id, msg);
        }
        self.broadcast(
            &ServerMessage::ParticipantJoined { participant: info },
            Some(&id),
        );
        self.media_out.push(MediaCommand::AddLeg {
            router: self.router(),
            participant: id.clone(),
            publish,
            subscribe,
        });
        self.after_mode_change(change, Some(&id), "join");
        tracing::info!(room = %self.id, participant = %id, members = self.members.len(), "joined");
        JoinReply::Accepted(id)
    }

    fn relay(&mut self, from: &str, to: &str, message: ServerMessage) {
        if !self.members.iter().any(|m| m.id == from) {
            return; // the sender was removed meanwhile
        }
        if to == SFU_ID {
            self.relay_to_sfu(from, message);
        } else if to != from && self.members.iter().any(|m| m.id == to) {
            self.send_to(to, &message);
            self.metrics.relayed.inc();
        } else {
            let shown: String = to.chars().take(64).collect();
            self.refuse(
                from,
                ErrorCode::NotAMember,
                format!("no other participant `{shown}` in this room"),
            );
        }
    }

    /// Delivers a chat message to the room (all but the sender) or to one
    /// member.
    fn chat(&mut self, from: &str, to: Option<&str>, text: String) {
        let Some(sender) = self.members.iter().find(|m| m.id == from) else {
            return; // the sender was removed meanwhile
        };
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let message = ServerMessage::Chat {
            from: from.to_owned(),
            name: sender.name.clone(),
            text,
            private: to.is_some(),
            at,
        };
        match to {
            None => self.broadcast(&message, Some(from)),
            Some(to) if to != from && self.members.iter().any(|m| m.id == to) => {
                self.send_to(to, &message);
            }
            Some(to) => {
                let shown: String = to.chars().take(64).collect();
                self.refuse(
                    from,
                    ErrorCode::NotAMember,
                    format!("no other participant `{shown}` in this room"),
                );
            }
        }
    }

    fn relay_to_sfu(&mut self, from: &str, message: ServerMessage) {
        let router = self.router();
        let participant = from.to_owned();
        match message {
            ServerMessage::Answer { sdp, .. } => self.media_out.push(MediaCommand::Answer {
                router,
                participant,
                sdp,
            }),
            ServerMessage::Candidate { candidate, .. } => {
                self.media_out.push(MediaCommand::Candidate {
                    router,
                    participant,
                    candidate,
                })
            }
            _ => self.refuse(
                from,
                ErrorCode::BadMessage,
                "the server leg is negotiated by the server: only `answer` and `candidate` go to `sfu`",
            ),
        }
    }

    fn refuse(&mut self, to: &str, code: ErrorCode, message: impl Into<String>) {
        self.metrics
            .errors
            .with_label_values(&[code.as_str()])
            .inc();
        self.send_to(to, &ServerMessage::error(code, message));
    }

    fn on_media_event(&mut self, event: MediaEvent) {
        match event {
            MediaEvent::Offer { participant, sdp } => {
                let msg = ServerMessage::Offer {
                    from: SFU_ID.to_owned(),
                    sdp,
                };
                self.send_to(&participant, &msg);
            }
            MediaEvent::LegState { participant, state } => {
                let Some(m) = self.members.iter_mut().find(|m| m.id == participant) else {
                    return;
                };
                m.leg = Some(state);
                if state == LegState::Connected {
                    if let Some(t) = m.joined_at.take() {
                        self.metrics.join_latency.observe(t.elapsed().as_secs_f64());
                    }
                }
                self.broadcast(
                    &ServerMessage::ServerLeg {
                        id: participant,
                        state,
                    },
                    None,
                );
            }
            MediaEvent::Speakers { speakers } => {
                let speakers = speakers
                    .into_iter()
                    .map(|s| SpeakerInfo {
                        id: s.id,
                        level: s.level,
                    })
                    .collect();
                self.broadcast(&ServerMessage::ActiveSpeakers { speakers }, None);
            }
            MediaEvent::ForwardedVideo { participant, ids } => {
                self.send_to(&participant, &ServerMessage::ForwardedVideo { ids });
            }
            MediaEvent::Refused {
                participant,
                message,
            } => self.refuse(&participant, ErrorCode::BadMessage, message),
        }
    }

    /// Announces a mode change to everyone (but `joiner`, who has it in
    /// `joined`) and tells the SFU whether to forward. `reason` labels the
    /// switch metric: `join`, `leave`, `media_ready`, `timeout`,
    /// `return_delay` or `p2p_failed`.
    fn after_mode_change(&mut self, change: Change, joiner: Option<&str>, reason: &'static str) {
        if change == Change::None {
            return;
        }
        let mode = self.mode.mode();
        if mode != self.counted_mode {
            self.metrics
                .rooms_by_mode
                .with_label_values(&[self.counted_mode.as_str()])
                .dec();
            self.metrics
                .rooms_by_mode
                .with_label_values(&[mode.as_str()])
                .inc();
            self.metrics
                .mode_switches
                .with_label_values(&[self.counted_mode.as_str(), mode.as_str(), reason])
                .inc();
            self.counted_mode = mode;
            tracing::info!(room = %self.id, mode = mode.as_str(), epoch = self.mode.epoch(), "mode");
        }
        self.media_out.push(MediaCommand::SetForwarding {
            router: self.router(),
            on: self.mode.forwarding(),
        });
        let views: Vec<(String, ServerMessage)> = self
            .members
            .iter()
            .filter(|m| Some(m.id.as_str()) != joiner)
            .map(|m| (m.id.clone(), ServerMessage::Mode(self.mode.view(&m.id))))
            .collect();
        for (id, msg) in views {
            self.send_to(&id, &msg);
        }
    }

    fn mode_members(&self) -> Vec<ModeMember> {
        self.members
            .iter()
            .map(|m| ModeMember {
                id: m.id.clone(),
                seq: m.seq,
                restricted: m.restricted,
            })
            .collect()
    }

    fn send_to(&mut self, id: &str, msg: &ServerMessage) {
        let text: Outgoing = msg.to_json().into();
        if let Some(m) = self.members.iter().find(|m| m.id == id) {
            Self::deliver(m, text, &mut self.pending);
        }
    }

    fn broadcast(&mut self, msg: &ServerMessage, except: Option<&str>) {
        let text: Outgoing = msg.to_json().into();
        for m in self
            .members
            .iter()
            .filter(|m| Some(m.id.as_str()) != except)
        {
            Self::deliver(m, Arc::clone(&text), &mut self.pending);
        }
    }

    /// Queues `text` for `m`. A full queue means the client is not reading:
    /// it is removed rather than allowed to hold the room's memory.
    fn deliver(m: &Member, text: Outgoing, pending: &mut Vec<Removal>) {
        match m.outbox.try_send(text) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => pending.push(Removal {
                id: m.id.clone(),
                reason: LeaveReason::Kicked,
                kick: Some(ErrorCode::SlowConsumer),
            }),
            Err(mpsc::error::TrySendError::Closed(_)) => pending.push(Removal {
                id: m.id.clone(),
                reason: LeaveReason::Disconnected,
                kick: None,
            }),
        }
    }

    fn apply_removals(&mut self) {
        // Each removal notifies the others, which may queue more removals;
        // each pass removes at least one member, so this ends.
        while let Some(r) = self.pending.pop() {
            self.remove(&r.id, r.reason, r.kick);
        }
    }

    fn remove(&mut self, id: &str, reason: LeaveReason, kick: Option<ErrorCode>) {
        let Some(index) = self.members.iter().position(|m| m.id == id) else {
            return;
        };
        let mut member = self.members.remove(index);
        self.metrics.participants.dec();
        if let (Some(code), Some(k)) = (kick, member.kick.take()) {
            let _ = k.send(Kick { code });
        }
        self.media_out.push(MediaCommand::RemoveLeg {
            router: self.router(),
            participant: id.to_owned(),
        });
        tracing::info!(room = %self.id, participant = %id, ?reason, "left");
        self.broadcast(
            &ServerMessage::ParticipantLeft {
                id: id.to_owned(),
                reason,
            },
            None,
        );
        let change = self.mode.update(&self.mode_members(), Instant::now());
        self.after_mode_change(change, None, "leave");
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.metrics.rooms.dec();
        self.metrics
            .rooms_by_mode
            .with_label_values(&[self.counted_mode.as_str()])
            .dec();
        self.metrics.participants.sub(self.members.len() as i64);
    }
}
