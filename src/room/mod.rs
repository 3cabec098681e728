//! Rooms: membership, the media mode, and relaying between members.
//!
//! [`Rooms`] is the registry (a `DashMap` from room id to a [`RoomHandle`]).
//! Each room is a single task that owns its member list and mode state and
//! is driven by [`Command`]s, so no lock is ever held across two rooms or
//! across an await. Sessions talk to a room only through its handle; a room
//! talks to a participant only through that participant's bounded outbox.
//!
//! Lifecycle: a room is created by the first `join` for its id, and removes
//! itself from the registry once it has been empty for
//! `Config::empty_room_timeout`. A join racing with that removal finds the
//! command channel closed or its reply dropped, and retries on a fresh room.
//!
//! Draining (the first SIGTERM): [`Rooms::start_drain`] stops the creation
//! of rooms; joins to rooms that still exist (members reloading or
//! rejoining) are admitted, joins that would create a room are refused with
//! `draining`.

mod mode;
mod task;

pub use mode::{Change, ModeMember, ModePolicy, ModeState};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, oneshot};

use crate::auth::Grants;
use crate::media::sfu::SfuHandle;
use crate::metrics::Metrics;
use crate::signaling::protocol::{ErrorCode, LeaveReason, LegState, MediaMode, ServerMessage};
use crate::turn_server::IceServerList;

/// A serialised server message, shared between all recipients of a
/// broadcast.
pub type Outgoing = Arc<str>;

/// Why the room removed a participant on its own initiative. The session
/// sends `code` and closes the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kick {
    /// Error code sent to the kicked client.
    pub code: ErrorCode,
}

/// What a session hands to a room when it joins.
#[derive(Debug)]
pub struct NewParticipant {
    /// Display name (already validated).
    pub name: String,
    /// Token identity, when auth is on. At most one live member per identity.
    pub identity: Option<String>,
    /// Token grants.
    pub grants: Grants,
    /// The session's bounded outbound queue.
    pub outbox: mpsc::Sender<Outgoing>,
    /// Fired when the room removes the participant itself.
    pub kick: oneshot::Sender<Kick>,
}

/// Commands a room task obeys.
#[derive(Debug)]
pub enum Command {
    /// Admit a participant; the reply carries its id. The room sends
    /// `joined` into the participant's outbox before anything else.
    Join {
        /// The joiner.
        participant: NewParticipant,
        /// The outcome.
        reply: oneshot::Sender<JoinReply>,
    },
    /// A participant is gone.
    Leave {
        /// Who.
        id: String,
        /// Why.
        reason: LeaveReason,
    },
    /// Relay `message` (already carrying `from`) to member `to`.
    Relay {
        /// Sender id (gets `not_a_member` if `to` is unknown).
        from: String,
        /// Target id.
        to: String,
        /// The message to deliver.
        message: ServerMessage,
    },
    /// A member reports that the path of the current switch decodes.
    MediaReady {
        /// Who.
        id: String,
        /// The epoch it answers.
        epoch: u64,
    },
    /// A member's direct path failed.
    P2pFailed {
        /// Who.
        id: String,
    },
    /// Describe the room (admin API).
    Inspect {
        /// The answer.
        reply: oneshot::Sender<RoomView>,
    },
    /// Remove one member, or every member (`id: None`), with `error
    /// removed` (admin API). The reply carries how many were removed.
    Remove {
        /// Whom; `None` for everyone.
        id: Option<String>,
        /// The number removed.
        reply: oneshot::Sender<usize>,
    },
    /// A chat message from `from`, for the room or for `to`.
    Chat {
        /// The sender.
        from: String,
        /// One recipient; `None` for everyone else.
        to: Option<String>,
        /// The text (checked by the protocol layer).
        text: String,
    },
    /// A member's mute state.
    MediaState {
        /// Who.
        id: String,
        /// Microphone muted.
        audio_muted: bool,
        /// Camera off.
        video_muted: bool,
        /// Sharing the screen.
        screen: bool,
    },
}

/// A room as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoomView {
    /// Room id.
    pub id: String,
    /// Media mode.
    pub mode: MediaMode,
    /// Mode epoch.
    pub epoch: u64,
    /// Members in join order.
    pub participants: Vec<ParticipantView>,
}

/// A member as the admin API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParticipantView {
    /// Participant id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Token identity, when auth is on.
    pub identity: Option<String>,
    /// Microphone muted.
    pub audio_muted: bool,
    /// Camera off.
    pub video_muted: bool,
    /// Sharing the screen.
    pub screen: bool,
    /// Its server leg's state, once the SFU reported one.
    pub server_leg: Option<LegState>,
    /// Token grants.
    pub grants: Grants,
}

/// A room's answer to [`Command::Join`].
#[derive(Debug)]
pub enum JoinReply {
    /// Admitted with this participant id.
    Accepted(String),
    /// Refused.
    Refused(ErrorCode),
    /// The room was closing; join a fresh room with the same participant.
    Retry(NewParticipant),
}

/// A cheap, clonable way to reach a room task.
#[derive(Debug, Clone)]
pub struct RoomHandle {
    tx: mpsc::Sender<Command>,
    generation: u64,
}

impl RoomHandle {
    /// Sends a command; `false` if the room has ended.
    pub async fn send(&self, command: Command) -> bool {
        self.tx.send(command).await.is_ok()
    }
}

/// Settings rooms need.
#[derive(Debug, Clone)]
pub struct RoomSettings {
    /// Members per room.
    pub max_participants: usize,
    /// Rooms on the server; a join that would create one more is refused.
    pub max_rooms: usize,
    /// Delay before an empty room is removed.
    pub empty_room_timeout: Duration,
    /// ICE servers sent in `joined`, with per-participant TURN credentials.
    pub ice_servers: IceServerList,
    /// When rooms use which media path.
    pub mode_policy: ModePolicy,
    /// Room-id patterns whose rooms never use peer-to-peer (see
    /// [`room_matches`]).
    pub never_p2p_rooms: Vec<String>,
    /// Videos each member receives in server-routed modes (Last-N); 0: all.
    pub last_n: usize,
    /// The SFU, for server legs and forwarding.
    pub sfu: Option<SfuHandle>,
}

impl RoomSettings {
    /// The mode policy of room `room`: the server-wide one, made
    /// server-only when the id matches a `never_p2p_rooms` pattern.
    pub fn mode_policy_for(&self, room: &str) -> ModePolicy {
        let mut policy = self.mode_policy;
        if self.never_p2p_rooms.iter().any(|p| room_matches(p, room)) {
            policy.never_p2p = true;
        }
        policy
    }
}

/// Whether room id `room` matches `pattern`: the id itself, or a prefix
/// followed by `*` (`webinar-*`), or `*` alone for every room.
pub fn room_matches(pattern: &str, room: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => pattern == room,
    }
}

/// The registry of live rooms.
#[derive(Debug)]
pub struct Rooms {
    map: Arc<DashMap<String, RoomHandle>>,
    settings: Arc<RoomSettings>,
    metrics: Arc<Metrics>,
    next_generation: AtomicU64,
    /// Join order across the whole server; also makes participant ids unique.
    next_seq: Arc<AtomicU64>,
    /// No new rooms (see the module documentation).
    draining: AtomicBool,
}

/// How long an admin request waits for a room task.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(1);

async fn inspect(handle: &RoomHandle) -> Option<RoomView> {
    let (tx, rx) = oneshot::channel();
    if !handle.send(Command::Inspect { reply: tx }).await {
        return None;
    }
    tokio::time::timeout(ADMIN_TIMEOUT, rx).await.ok()?.ok()
}

/// Bound of a room's command queue. Senders wait when it is full, so a busy
/// room slows its own members down and nobody else.
const ROOM_COMMAND_QUEUE: usize = 1024;

impl Rooms {
    /// An empty registry.
    pub fn new(settings: RoomSettings, metrics: Arc<Metrics>) -> Self {
        Rooms {
            map: Arc::new(DashMap::new()),
            settings: Arc::new(settings),
            metrics,
            next_generation: AtomicU64::new(1),
            next_seq: Arc::new(AtomicU64::new(1)),
            draining: AtomicBool::new(false),
        }
    }

    /// Stops creating rooms: from now on only existing rooms admit joins.
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.draining.set(1);
    }

    /// Whether [`Rooms::start_drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Participants in every room.
    pub fn participants(&self) -> usize {
        usize::try_from(self.metrics.participants.get()).unwrap_or(0)
    }

    /// Number of live rooms.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// `true` when no room exists.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether a room with this id exists now.
    pub fn contains(&self, room: &str) -> bool {
        self.map.contains_key(room)
    }

    fn get_or_create(&self, room: &str) -> RoomHandle {
        if let Some(h) = self.map.get(room) {
            return h.clone();
        }
        self.map
            .entry(room.to_owned())
            .or_insert_with(|| {
                let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = mpsc::channel(ROOM_COMMAND_QUEUE);
                let task = task::Room::new(
                    room.to_owned(),
                    generation,
                    Arc::clone(&self.settings),
                    Arc::clone(&self.map),
                    Arc::clone(&self.metrics),
                    Arc::clone(&self.next_seq),
                );
                tokio::spawn(task.run(rx));
                RoomHandle { tx, generation }
            })
            .clone()
    }

    /// Joins `room`, creating it if needed. Returns the room's handle and the
    /// new participant id.
    pub async fn join(
        &self,
        room: &str,
        mut participant: NewParticipant,
    ) -> Result<(RoomHandle, String), ErrorCode> {
        // A closing room hands the participant back; retry on a fresh room.
        // One retry covers the race; the bound keeps a bug from spinning.
        for _ in 0..4 {
            let existing = self.map.get(room).map(|h| h.clone());
            let handle = match existing {
                Some(h) => h,
                None if self.is_draining() => return Err(ErrorCode::Draining),
                // Racy by at most the joins creating rooms at this instant:
                // a soft cap, which is what it is for.
                None if self.map.len() >= self.settings.max_rooms => {
                    return Err(ErrorCode::TooManyRooms)
                }
                None => self.get_or_create(room),
            };
            let (reply_tx, reply_rx) = oneshot::channel();
            let command = Command::Join {
                participant,
                reply: reply_tx,
            };
            participant = match handle.tx.send(command).await {
                Ok(()) => match reply_rx.await {
                    Ok(JoinReply::Accepted(id)) => return Ok((handle, id)),
                    Ok(JoinReply::Refused(code)) => return Err(code),
                    Ok(JoinReply::Retry(p)) => p,
                    // The room task is gone without answering (it panicked).
                    Err(_) => return Err(ErrorCode::ServerShutdown),
                },
                Err(mpsc::error::SendError(Command::Join { participant: p, .. })) => p,
                Err(_) => return Err(ErrorCode::ServerShutdown),
            };
            self.forget(room, handle.generation);
        }
        Err(ErrorCode::ServerShutdown)
    }

    /// Every room, described (admin API). Rooms that do not answer within
    /// a second (busy, or closing) are left out.
    pub async fn list(&self) -> Vec<RoomView> {
        let handles: Vec<RoomHandle> = self.map.iter().map(|e| e.value().clone()).collect();
        let mut rooms = Vec::with_capacity(handles.len());
        for h in handles {
            if let Some(view) = inspect(&h).await {
                rooms.push(view);
            }
        }
        rooms.sort_by(|a, b| a.id.cmp(&b.id));
        rooms
    }

    /// Room `room`, described; `None` if it does not exist.
    pub async fn inspect(&self, room: &str) -> Option<RoomView> {
        let handle = self.map.get(room).map(|h| h.clone())?;
        inspect(&handle).await
    }

    /// Removes member `id` of `room`, or all its members (`None`), with
    /// `error removed`; returns how many were removed, `None` if the room
    /// does not exist.
    pub async fn remove(&self, room: &str, id: Option<String>) -> Option<usize> {
        let handle = self.map.get(room).map(|h| h.clone())?;
        let (tx, rx) = oneshot::channel();
        if !handle.send(Command::Remove { id, reply: tx }).await {
            return None;
        }
        tokio::time::timeout(ADMIN_TIMEOUT, rx).await.ok()?.ok()
    }

    fn forget(&self, room: &str, generation: u64) {
        self.map.remove_if(room, |_, h| h.generation == generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_patterns() {
        assert!(room_matches("webinar-*", "webinar-42"));
        assert!(room_matches("webinar-*", "webinar-"));
        assert!(!room_matches("webinar-*", "standup"));
        assert!(room_matches("exact", "exact"));
        assert!(!room_matches("exact", "exactly"));
        assert!(room_matches("*", "anything"));
    }

    #[test]
    fn never_p2p_rooms_override_the_policy() {
        let settings = RoomSettings {
            max_participants: 16,
            max_rooms: 100,
            empty_room_timeout: Duration::from_secs(5),
            ice_servers: IceServerList::default(),
            mode_policy: ModePolicy::default(),
            never_p2p_rooms: vec!["town-hall-*".into()],
            last_n: 0,
            sfu: None,
        };
        assert!(settings.mode_policy_for("town-hall-1").never_p2p);
        assert!(!settings.mode_policy_for("standup").never_p2p);
    }
}
