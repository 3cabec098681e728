//! The room's media mode as a pure state machine: members in, per-member
//! mode announcements out. No I/O, no clocks, so every transition is unit
//! tested.
//!
//! In this version a room holds at most two members and media always flows
//! peer-to-peer; the pair changes when members come and go. Each change of
//! pair bumps the epoch, and each member learns its peer and its role in
//! perfect negotiation: the member that joined later is impolite and makes
//! the first offer.

use crate::signaling::protocol::{MediaMode, ModeInfo};

/// A participant as the mode machine sees it: an id and its join order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeMember {
    /// Participant id.
    pub id: String,
    /// Join sequence number; larger joined later.
    pub seq: u64,
}

/// The mode of one room.
#[derive(Debug, Clone, Default)]
pub struct ModeState {
    epoch: u64,
    pair: Option<(String, String)>,
}

impl ModeState {
    /// A new room's mode (epoch 0, nobody paired).
    pub fn new() -> Self {
        ModeState::default()
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Recomputes the mode after a membership change. Returns `true` when it
    /// changed, i.e. when every member must be sent a new `mode`.
    pub fn update(&mut self, members: &[ModeMember]) -> bool {
        let pair = match members {
            [a, b] => {
                // Order the pair (earlier joiner first) so that the same two
                // members always form the same pair.
                let (first, second) = if a.seq <= b.seq { (a, b) } else { (b, a) };
                Some((first.id.clone(), second.id.clone()))
            }
            _ => None,
        };
        if pair == self.pair && self.epoch > 0 {
            return false;
        }
        self.pair = pair;
        self.epoch += 1;
        true
    }

    /// What `member` is told.
    pub fn view(&self, member: &str) -> ModeInfo {
        let (peer, polite) = match &self.pair {
            Some((first, second)) if first == member => (Some(second.clone()), true),
            Some((first, second)) if second == member => (Some(first.clone()), false),
            _ => (None, false),
        };
        ModeInfo {
            mode: MediaMode::P2p,
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
        ModeMember { id: id.into(), seq }
    }

    #[test]
    fn pairs_two_and_later_joiner_is_impolite() {
        let mut s = ModeState::new();
        assert!(s.update(&[m("a", 1)]));
        assert_eq!(s.view("a").peer, None);
        let e1 = s.epoch();
        assert!(s.update(&[m("a", 1), m("b", 2)]));
        assert_eq!(s.epoch(), e1 + 1);
        let va = s.view("a");
        let vb = s.view("b");
        assert_eq!(va.peer.as_deref(), Some("b"));
        assert_eq!(vb.peer.as_deref(), Some("a"));
        assert!(va.polite && !vb.polite, "earlier joiner is polite");
        // Same members in another order: no change.
        assert!(!s.update(&[m("b", 2), m("a", 1)]));
        // b leaves: a is alone again, new epoch.
        assert!(s.update(&[m("a", 1)]));
        assert_eq!(s.view("a").peer, None);
        assert_eq!(s.epoch(), e1 + 2);
        // c joins: new pair, c impolite.
        assert!(s.update(&[m("a", 1), m("c", 3)]));
        assert!(s.view("a").polite);
        assert!(!s.view("c").polite);
    }

    #[test]
    fn exactly_one_side_is_polite() {
        let mut s = ModeState::new();
        s.update(&[m("x", 7), m("y", 3)]);
        assert_ne!(s.view("x").polite, s.view("y").polite);
        assert!(s.view("y").polite);
    }
}
