//! One room's task: the only owner of its member list and mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use super::{Command, JoinReply, Kick, ModeMember, ModeState, NewParticipant, Outgoing};
use super::{RoomHandle, RoomSettings};
use crate::metrics::Metrics;
use crate::signaling::protocol::{
    ErrorCode, LeaveReason, MemberInfo, ServerMessage, PROTOCOL_VERSION,
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
    outbox: mpsc::Sender<Outgoing>,
    kick: Option<oneshot::Sender<Kick>>,
}

impl Member {
    fn info(&self) -> MemberInfo {
        MemberInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            audio_muted: self.audio_muted,
            video_muted: self.video_muted,
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
    pending: Vec<Removal>,
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
        Room {
            id,
            generation,
            settings,
            registry,
            metrics,
            next_seq,
            members: Vec::new(),
            mode: ModeState::new(),
            pending: Vec::new(),
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        tracing::debug!(room = %self.id, "room created");
        let mut empty_since = Some(Instant::now());
        loop {
            let deadline = empty_since.map(|t| t + self.settings.empty_room_timeout);
            let command = tokio::select! {
                command = rx.recv() => command,
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    break;
                }
            };
            let Some(command) = command else { break };
            self.handle(command);
            self.apply_removals();
            empty_since = match (self.members.is_empty(), empty_since) {
                (true, None) => Some(Instant::now()),
                (true, since) => since,
                (false, _) => None,
            };
        }
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
            Command::MediaState {
                id,
                audio_muted,
                video_muted,
            } => {
                if let Some(m) = self.members.iter_mut().find(|m| m.id == id) {
                    m.audio_muted = audio_muted;
                    m.video_muted = video_muted;
                    let msg = ServerMessage::ParticipantUpdated {
                        id: id.clone(),
                        audio_muted,
                        video_muted,
                    };
                    self.broadcast(&msg, Some(&id));
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
        let member = Member {
            id: id.clone(),
            seq,
            name: p.name,
            identity: p.identity,
            audio_muted: false,
            video_muted: false,
            outbox: p.outbox,
            kick: Some(p.kick),
        };
        let info = member.info();
        let others: Vec<MemberInfo> = self.members.iter().map(Member::info).collect();
        self.members.push(member);
        self.metrics.participants.inc();
        self.metrics.joins.inc();

        self.mode.update(&self.mode_members());
        let joined = ServerMessage::Joined {
            v: PROTOCOL_VERSION,
            room: self.id.clone(),
            participant_id: id.clone(),
            members: others,
            ice_servers: self.settings.ice_servers.clone(),
            mode: self.mode.view(&id),
        };
        self.send_to(&id, &joined);
        self.broadcast(
            &ServerMessage::ParticipantJoined { participant: info },
            Some(&id),
        );
        self.announce_mode(Some(&id));
        tracing::info!(room = %self.id, participant = %id, members = self.members.len(), "joined");
        JoinReply::Accepted(id)
    }

    fn relay(&mut self, from: &str, to: &str, message: ServerMessage) {
        if !self.members.iter().any(|m| m.id == from) {
            return; // the sender was removed meanwhile
        }
        if to != from && self.members.iter().any(|m| m.id == to) {
            self.send_to(to, &message);
            self.metrics.relayed.inc();
        } else {
            let shown: String = to.chars().take(64).collect();
            let err = ServerMessage::error(
                ErrorCode::NotAMember,
                format!("no other participant `{shown}` in this room"),
            );
            self.send_to(from, &err);
        }
    }

    fn mode_members(&self) -> Vec<ModeMember> {
        self.members
            .iter()
            .map(|m| ModeMember {
                id: m.id.clone(),
                seq: m.seq,
            })
            .collect()
    }

    /// Sends every member (but `except`, who already has it in `joined`)
    /// its view of the current mode.
    fn announce_mode(&mut self, except: Option<&str>) {
        let views: Vec<(String, ServerMessage)> = self
            .members
            .iter()
            .filter(|m| Some(m.id.as_str()) != except)
            .map(|m| (m.id.clone(), ServerMessage::Mode(self.mode.view(&m.id))))
            .collect();
        for (id, msg) in views {
            self.send_to(&id, &msg);
        }
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
        tracing::info!(room = %self.id, participant = %id, ?reason, "left");
        self.broadcast(
            &ServerMessage::ParticipantLeft {
                id: id.to_owned(),
                reason,
            },
            None,
        );
        if self.mode.update(&self.mode_members()) {
            self.announce_mode(None);
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.metrics.rooms.dec();
        self.metrics.participants.sub(self.members.len() as i64);
    }
}
