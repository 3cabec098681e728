//! The room's media mode as a pure state machine: membership changes,
//! client readiness reports and clock ticks in; per-member mode views and
//! "forward or not" out. No I/O and no clock of its own (callers pass
//! `now`), so every transition is unit tested.
//!
//! ```text
//!          3rd member joins                 every old-pair member decodes
//!   p2p ───────────────────▶ to_sfu ──────────via the server (or deadline)──▶ sfu
//!    ▲                                                                         │
//!    │ both decode directly                 two members left for           │
//!    └──────────────────────── to_p2p ◀──────── `p2p_return_delay` ───────────┘
//!                                │  a 3rd joins, or the direct path fails
//!                                └──────────────────────────────────────▶ sfu
//! ```
//!
//! Make-before-break: in `to_sfu` the server already forwards while the
//! clients still render their direct leg; the room enters `sfu` (and clients
//! close the direct leg) only after each member of the old pair reported
//! `media_ready` for the server path. In `to_p2p` the server keeps
//! forwarding until both members reported that the direct path decodes.
//!
//! Every announced change bumps the epoch; a `media_ready` for an older
//! epoch is ignored.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use crate::signaling::protocol::{MediaMode, ModeInfo};

/// When a room uses which path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModePolicy {
    /// Members from which media goes through the server (default 3).
    pub sfu_threshold: usize,
    /// How long a room must have two members before it returns to
    /// peer-to-peer, so that a quick leave-and-rejoin does not switch twice.
    pub p2p_return_delay: Duration,
    /// Longest a switch may wait for clients' readiness reports before it is
    /// completed (to `sfu`) or abandoned (back to `sfu` from `to_p2p`).
    pub switch_timeout: Duration,
    /// Always route through the server, even for two.
    pub never_p2p: bool,
}

impl Default for ModePolicy {
    fn default() -> Self {
        ModePolicy {
            sfu_threshold: 3,
            p2p_return_delay: Duration::from_secs(5),
            switch_timeout: Duration::from_secs(8),
            never_p2p: false,
        }
    }
}

/// A participant as the mode machine sees it: an id and its join order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeMember {
    /// Participant id.
    pub id: String,
    /// Join sequence number; larger joined later.
    pub seq: u64,
    /// Its grants are limited (no publish or no subscribe): only the server
    /// can enforce them, so a room with such a member never uses a direct
    /// path.
    pub restricted: bool,
}

/// What happened to the mode after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing to announce.
    None,
    /// A new epoch: announce every member's view.
    Announce,
}

/// The mode of one room.
#[derive(Debug, Clone)]
pub struct ModeState {
    policy: ModePolicy,
    mode: MediaMode,
    epoch: u64,
    /// The direct pair (earlier joiner first) in `p2p`, `to_sfu` (the pair
    /// being moved off) and `to_p2p` (the pair being built).
    pair: Option<(String, String)>,
    /// Members whose `media_ready` the current switch waits for.
    awaiting: BTreeSet<String>,
    /// When the current switch is completed or abandoned regardless.
    switch_deadline: Option<Instant>,
    /// In `sfu` with two members: when to start returning to `p2p`.
    return_at: Option<Instant>,
    members: Vec<ModeMember>,
}

impl ModeState {
    /// A new, empty room's mode.
    pub fn new(policy: ModePolicy) -> Self {
        ModeState {
            policy,
            mode: if policy.never_p2p {
                MediaMode::Sfu
            } else {
                MediaMode::P2p
            },
            epoch: 0,
            pair: None,
            awaiting: BTreeSet::new(),
            switch_deadline: None,
            return_at: None,
            members: Vec::new(),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> MediaMode {
        self.mode
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the server forwards media now. It does in every mode but
    /// `p2p`: during both switches the server path carries media until the
    /// other path is proven.
    pub fn forwarding(&self) -> bool {
        self.mode != MediaMode::P2p
    }

    /// The next instant at which [`ModeState::tick`] may change something.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.switch_deadline, self.return_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn ordered_pair(&self) -> Option<(String, String)> {
        match self.members.as_slice() {
            [a, b] => {
                let (first, second) = if a.seq <= b.seq { (a, b) } else { (b, a) };
                Some((first.id.clone(), second.id.clone()))
            }
            _ => None,
        }
    }

    fn enter(&mut self, mode: MediaMode, now: Instant) -> Change {
        self.mode = mode;
        self.epoch += 1;
        self.return_at = None;
        match mode {
            MediaMode::P2p | MediaMode::Sfu => {
                self.awaiting.clear();
                self.switch_deadline = None;
                if mode == MediaMode::Sfu {
                    self.pair = None;
                    self.schedule_return(now);
                }
            }
            MediaMode::ToSfu | MediaMode::ToP2p => {
                self.awaiting = self
                    .pair
                    .iter()
                    .flat_map(|(a, b)| [a.clone(), b.clone()])
                    .collect();
                self.switch_deadline = Some(now + self.policy.switch_timeout);
            }
        }
        Change::Announce
    }

    /// Whether a direct path is allowed at all: not by policy, and not
    /// with a member whose grants only the server can enforce.
    fn direct_allowed(&self) -> bool {
        !self.policy.never_p2p && !self.members.iter().any(|m| m.restricted)
    }

    fn wants_p2p(&self) -> bool {
        self.direct_allowed() && self.members.len() == 2
    }

    fn schedule_return(&mut self, now: Instant) {
        if self.mode == MediaMode::Sfu && self.wants_p2p() {
            if self.return_at.is_none() {
                self.return_at = Some(now + self.policy.p2p_return_delay);
            }
        } else {
            self.return_at = None;
        }
    }

    /// Recomputes the mode after a membership change.
    pub fn update(&mut self, members: &[ModeMember], now: Instant) -> Change {
        self.members = members.to_vec();
        let n = members.len();
        self.awaiting
            .retain(|id| members.iter().any(|m| &m.id == id));
        let first = self.epoch == 0;
        match self.mode {
            MediaMode::P2p => {
                if !self.direct_allowed() || n >= self.policy.sfu_threshold {
                    if self.pair.is_some() {
                        // Move the direct pair off make-before-break.
                        return self.enter(MediaMode::ToSfu, now);
                    }
                    return self.enter(MediaMode::Sfu, now);
                }
                let pair = self.ordered_pair();
                if pair != self.pair || first {
                    self.pair = pair;
                    return self.enter(MediaMode::P2p, now);
                }
                Change::None
            }
            MediaMode::ToSfu => {
                if self.awaiting.is_empty() {
                    return self.enter(MediaMode::Sfu, now);
                }
                Change::None
            }
            MediaMode::Sfu => {
                if n <= 1 && !self.policy.never_p2p {
                    // Alone: nothing flows anywhere; the next pair starts
                    // directly.
                    self.pair = None;
                    return self.enter(MediaMode::P2p, now);
                }
                self.schedule_return(now);
                if first {
                    return self.enter(MediaMode::Sfu, now);
                }
                Change::None
            }
            MediaMode::ToP2p => {
                let pair = self.ordered_pair();
                if pair.is_none() || pair != self.pair {
                    // A third joined, or one of the pair left: the direct
                    // path being built is no longer wanted.
                    self.pair = None;
                    if n <= 1 {
                        return self.enter(MediaMode::P2p, now);
                    }
                    return self.enter(MediaMode::Sfu, now);
                }
                Change::None
            }
        }
    }

    /// A client reports that the path the current switch moves to decodes.
    pub fn media_ready(&mut self, id: &str, epoch: u64, now: Instant) -> Change {
        if epoch != self.epoch || !self.awaiting.remove(id) || !self.awaiting.is_empty() {
            return Change::None;
        }
        match self.mode {
            MediaMode::ToSfu => self.enter(MediaMode::Sfu, now),
            MediaMode::ToP2p => self.enter(MediaMode::P2p, now),
            _ => Change::None,
        }
    }

    /// A client reports that its direct path failed: fall back to the
    /// server, and stay there until membership changes.
    pub fn p2p_failed(&mut self, id: &str, now: Instant) -> Change {
        let in_pair = self.pair.as_ref().is_some_and(|(a, b)| a == id || b == id);
        if !in_pair || !matches!(self.mode, MediaMode::P2p | MediaMode::ToP2p) {
            return Change::None;
        }
        self.pair = None;
        let change = self.enter(MediaMode::Sfu, now);
        // Do not retry the direct path on a timer; a membership change will.
        self.return_at = None;
        change
    }

    /// Advances timers.
    pub fn tick(&mut self, now: Instant) -> Change {
        if self.switch_deadline.is_some_and(|d| now >= d) {
            return match self.mode {
                // Clients that never reported still have the server path.
                MediaMode::ToSfu => self.enter(MediaMode::Sfu, now),
                // The direct path did not come up in time: stay on the server.
                MediaMode::ToP2p => {
                    self.pair = None;
                    let change = self.enter(MediaMode::Sfu, now);
                    self.return_at = None;
                    change
                }
                _ => {
                    self.switch_deadline = None;
                    Change::None
                }
            };
        }
        if self.return_at.is_some_and(|r| now >= r) {
            self.return_at = None;
            if self.mode == MediaMode::Sfu && self.wants_p2p() {
                self.pair = self.ordered_pair();
                return self.enter(MediaMode::ToP2p, now);
            }
        }
        Change::None
    }

    /// What `member` is told.
    pub fn view(&self, member: &str) -> ModeInfo {
        let (peer, polite) = match &self.pair {
            Some((first, second)) if first == member => (Some(second.clone()), true),
            Some((first, second)) if second == member => (Some(first.clone()), false),
            _ => (None, false),
        };
        ModeInfo {
            mode: self.mode,
            peer,
            polite,
            epoch: self.epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, seq: u64) -> ModeMember {
        ModeMember {
            id: id.into(),
            seq,
            restricted: false,
        }
    }

    #[test]
    fn a_member_with_limited_grants_keeps_the_room_on_the_server() {
        let t0 = Instant::now();
        let mut s = ModeState::new(policy());
        let viewer = ModeMember {
            restricted: true,
            ..m("v", 2)
        };
        s.update(&[m("a", 1)], t0);
        assert_eq!(s.mode(), MediaMode::P2p);
        // Two members, one of them restricted: straight to the server.
        s.update(&[m("a", 1), viewer], t0);
        assert_eq!(s.mode(), MediaMode::Sfu);
        // And no return to a direct path while it is there.
        assert_eq!(s.tick(t0 + Duration::from_secs(3600)), Change::None);
        assert_eq!(s.mode(), MediaMode::Sfu);
        // Once it has left, two unrestricted members pair again.
        s.update(&[m("a", 1), m("b", 3)], t0);
        s.tick(t0 + Duration::from_secs(3600));
        assert_eq!(s.mode(), MediaMode::ToP2p);
    }

    fn policy() -> ModePolicy {
        ModePolicy {
            sfu_threshold: 3,
            p2p_return_delay: Duration::from_secs(5),
            switch_timeout: Duration::from_secs(8),
            never_p2p: false,
        }
    }

    #[test]
    fn pairs_two_and_later_joiner_is_impolite() {
        let t = Instant::now();
        let mut s = ModeState::new(policy());
        assert_eq!(s.update(&[m("a", 1)], t), Change::Announce);
        assert_eq!(s.view("a").peer, None);
        assert!(!s.forwarding());
        let e1 = s.epoch();
        assert_eq!(s.update(&[m("a", 1), m("b", 2)], t), Change::Announce);
        assert_eq!(s.epoch(), e1 + 1);
        let (va, vb) = (s.view("a"), s.view("b"));
        assert_eq!(va.peer.as_deref(), Some("b"));
        assert_eq!(vb.peer.as_deref(), Some("a"));
        assert!(va.polite && !vb.polite, "earlier joiner is polite");
        assert_eq!(s.update(&[m("b", 2), m("a", 1)], t), Change::None);
        assert_eq!(s.update(&[m("a", 1)], t), Change::Announce);
        assert_eq!(s.view("a").peer, None);
        assert_eq!(s.update(&[m("a", 1), m("c", 3)], t), Change::Announce);
        assert!(s.view("a").polite && !s.view("c").polite);
    }

    #[test]
    fn third_join_moves_the_pair_to_the_server_make_before_break() {
        let t = Instant::now();
        let mut s = ModeState::new(policy());
        s.update(&[m("a", 1), m("b", 2)], t);
        assert_eq!(
            s.update(&[m("a", 1), m("b", 2), m("c", 3)], t),
            Change::Announce
        );
        assert_eq!(s.mode(), MediaMode::ToSfu);
        assert!(s.forwarding(), "server forwards while the switch runs");
        // The old pair still sees its peer (it keeps rendering it).
        assert_eq!(s.view("a").peer.as_deref(), Some("b"));
        assert_eq!(s.view("c").peer, None);
        let e = s.epoch();
        assert_eq!(s.media_ready("a", e - 1, t), Change::None, "stale epoch");
        assert_eq!(s.media_ready("c", e, t), Change::None, "not awaited");
        assert_eq!(s.media_ready("a", e, t), Change::None);
        assert_eq!(s.mode(), MediaMode::ToSfu);
        assert_eq!(s.media_ready("b", e, t), Change::Announce);
        assert_eq!(s.mode(), MediaMode::Sfu);
        assert_eq!(s.view("a").peer, None);
    }

    #[test]
    fn switch_to_server_completes_at_the_deadline() {
        let t = Instant::now();
        let mut s = ModeState::new(policy());
        s.update(&[m("a", 1), m("b", 2)], t);
        s.update(&[m("a", 1), m("b", 2), m("c", 3)], t);
        assert_eq!(s.next_deadline(), Some(t + Duration::from_secs(8)));
        assert_eq!(s.tick(t + Duration::from_secs(7)), Change::None);
        assert_eq!(s.tick(t + Duration::from_secs(8)), Change::Announce);
        assert_eq!(s.mode(), MediaMode::Sfu);
    }

    #[test]
    fn returns_to_p2p_after_the_delay_and_only_when_both_decode() {
        let t = Instant::now();
        let mut s = ModeState::new(policy());
        s.update(&[m("a", 1), m("b", 2), m("c", 3)], t);
        assert_eq!(s.mode(), MediaMode::Sfu, "three from the start: no pair");
        // c leaves: still sfu until the delay has passed.
        assert_eq!(s.update(&[m("a", 1), m("b", 2)], t), Change::None);
        assert_eq!(s.next_deadline(), Some(t + Duration::from_secs(5)));
        assert_eq!(s.tick(t + Duration::from_secs(4)), Change::None);
        let t5 = t + Duration::from_secs(5);
        assert_eq!(s.tick(t5), Change::Announce);
        assert_eq!(s.mode(), MediaMode::ToP2p);
        assert!(
            s.forwarding(),
            "server keeps forwarding until P2P is proven"
        );
        assert_eq!(s.view("a").peer.as_deref(), Some("b"));
        assert!(s.view("a").polite);
        let e = s.epoch();
        assert_eq!(s.media_ready("b", e, t5), Change::None);
        assert_eq!(s.media_ready("a", e, t5), Change::Announce);
        assert_eq!(s.mode(), MediaMode::P2p);
        assert!(!s.forwarding());
        assert_eq!(s.view("b").peer.as_deref(), Some("a"));
    }

    #[test]
    fn quick_rejoin_cancels_the_return() {
        let t = Instant::now();
        let mut s = ModeState::new(policy());
        s.update(&[m("a", 1), m("b", 2), m("c", 3)], t);
        s.update(&[m("a", 1), m("b", 2)], t);
        s.update(
            &[m("a", 1), m("b", 2), m("d", 4)],
            t + Duration::from_secs(2),
        );
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.tick(t + Duration::from_secs(10)), Change::None);
        assert_eq!(s.mode(), MediaMode::Sfu);
    }

    #[test]
    fn failed_direct_path_falls_back_to_the_server() {
        let t = Instant::now();
        let mut s = ModeState::new(policy());
        s.update(&[m("a", 1), m("b", 2), m("c", 3)], t);
        s.update(&[m("a", 1), m("b", 2)], t);
        s.tick(t + Duration::from_secs(5));
        assert_eq!(s.mode(), MediaMode::ToP2p);
        // Nobody reports: after the switch timeout, stay on the server and
        // do not retry on a timer.
        assert_eq!(s.tick(t + Duration::from_secs(13)), Change::Announce);
        assert_eq!(s.mode(), MediaMode::Sfu);
        assert_eq!(s.next_deadline(), None);
        // An explicit failure report in p2p also falls back.
        let mut s = ModeState::new(policy());
        s.update(&[m("a", 1), m("b", 2)], t);
        assert_eq!(s.p2p_failed("c", t), Change::None, "not in the pair");
        assert_eq!(s.p2p_failed("a", t), Change::Announce);
        assert_eq!(s.mode(), MediaMode::Sfu);
        assert!(s.forwarding());
    }

    #[test]
    fn third_join_during_return_goes_back_to_server() {
        let t = Instant::now();
        let mut s = ModeState::new(policy());
        s.update(&[m("a", 1), m("b", 2), m("c", 3)], t);
        s.update(&[m("a", 1), m("b", 2)], t);
        s.tick(t + Duration::from_secs(5));
        assert_eq!(s.mode(), MediaMode::ToP2p);
        let ch = s.update(
            &[m("a", 1), m("b", 2), m("e", 5)],
            t + Duration::from_secs(6),
        );
        assert_eq!(ch, Change::Announce);
        assert_eq!(s.mode(), MediaMode::Sfu);
        assert_eq!(s.view("a").peer, None);
    }

    #[test]
    fn never_p2p_policy_routes_two_through_the_server() {
        let t = Instant::now();
        let mut s = ModeState::new(ModePolicy {
            never_p2p: true,
            ..policy()
        });
        assert_eq!(s.update(&[m("a", 1)], t), Change::Announce);
        assert_eq!(s.mode(), MediaMode::Sfu);
        s.update(&[m("a", 1), m("b", 2)], t);
        assert_eq!(s.mode(), MediaMode::Sfu);
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.tick(t + Duration::from_secs(60)), Change::None);
    }

    #[test]
    fn a_leaver_of_the_old_pair_does_not_block_the_switch() {
        let t = Instant::now();
        let mut s = ModeState::new(policy());
        s.update(&[m("a", 1), m("b", 2)], t);
        s.update(&[m("a", 1), m("b", 2), m("c", 3), m("d", 4)], t);
        let e = s.epoch();
        s.media_ready("a", e, t);
        assert_eq!(
            s.update(&[m("a", 1), m("c", 3), m("d", 4)], t),
            Change::Announce,
            "b left: nobody else awaited"
        );
        assert_eq!(s.mode(), MediaMode::Sfu);
    }
}
