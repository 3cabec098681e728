//! Last-N: in a large room, each subscriber receives the video of only the
//! N members most worth watching, and the audio of everyone (Jitsi
//! Videobridge's `lastN`). It bounds what a big meeting costs every
//! subscriber's downlink and the server's uplink: forwarding grows with
//! members × N instead of members².
//!
//! Who is worth watching, in order: members sharing their screen (pinned),
//! then the most recent speakers (from [`super::speaker`]), then everyone
//! else in join order. A subscriber never counts itself. Pure and
//! synchronous; the SFU applies the selection by holding the other video
//! downtracks (they resume on a keyframe).
//!
//! A pin is the member's own claim (`media_state.screen`), so a member
//! could toggle it to flip everyone's selection, and each flip costs the
//! displaced video a keyframe wait: a member's pin changes at most once
//! per [`PIN_COOLDOWN`]; a later change waits for [`LastN::settle`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The shortest time between two changes of one member's pin.
pub const PIN_COOLDOWN: Duration = Duration::from_secs(2);

/// The ranking of one room.
#[derive(Debug, Clone, Default)]
pub struct LastN {
    n: usize,
    /// Members who have spoken, most recent first.
    recent: Vec<String>,
    /// Members whose video is always selected (screen sharing), in the
    /// order they were pinned.
    pinned: Vec<String>,
    /// Pin changes asked for during a member's cooldown, applied by
    /// [`LastN::settle`].
    wanted: HashMap<String, bool>,
    /// When each member's pin last changed.
    changed_at: HashMap<String, Instant>,
}

impl LastN {
    /// `n` videos per subscriber; 0 turns Last-N off (everyone receives
    /// everyone).
    pub fn new(n: usize) -> LastN {
        LastN {
            n,
            ..LastN::default()
        }
    }

    /// Whether videos are selected at all.
    pub fn enabled(&self) -> bool {
        self.n > 0
    }

    /// A new list of current speakers, loudest first: they move to the
    /// front in that order. Returns whether the ranking changed.
    pub fn spoke(&mut self, speakers: &[String]) -> bool {
        let before = self.recent.clone();
        for id in speakers.iter().rev() {
            self.recent.retain(|r| r != id);
            self.recent.insert(0, id.clone());
        }
        self.recent != before
    }

    /// Pins (screen sharing) or unpins a member, at once unless its last
    /// change was less than [`PIN_COOLDOWN`] ago (then at a later
    /// [`LastN::settle`]). Returns whether the pins changed now.
    pub fn pin(&mut self, id: &str, on: bool, now: Instant) -> bool {
        let cooling = self
            .changed_at
            .get(id)
            .is_some_and(|t| now.saturating_duration_since(*t) < PIN_COOLDOWN);
        if cooling {
            self.wanted.insert(id.to_owned(), on);
            return false;
        }
        self.wanted.remove(id);
        let present = self.pinned.iter().any(|p| p == id);
        match (on, present) {
            (true, false) => self.pinned.push(id.to_owned()),
            (false, true) => self.pinned.retain(|p| p != id),
            _ => return false,
        }
        self.changed_at.insert(id.to_owned(), now);
        true
    }

    /// Applies the pin changes whose cooldown has passed. Returns whether
    /// the pins changed.
    pub fn settle(&mut self, now: Instant) -> bool {
        let due: Vec<(String, bool)> = self
            .wanted
            .iter()
            .filter(|(id, _)| {
                self.changed_at
                    .get(*id)
                    .is_none_or(|t| now.saturating_duration_since(*t) >= PIN_COOLDOWN)
            })
            .map(|(id, on)| (id.clone(), *on))
            .collect();
        let mut changed = false;
        for (id, on) in due {
            changed |= self.pin(&id, on, now);
        }
        changed
    }

    /// Forgets a member who left.
    pub fn forget(&mut self, id: &str) {
        self.recent.retain(|r| r != id);
        self.pinned.retain(|p| p != id);
        self.wanted.remove(id);
        self.changed_at.remove(id);
    }

    /// Every current member, most worth watching first: pinned, then
    /// recent speakers, then the rest of `members` (the room in join
    /// order).
    pub fn ranking(&self, members: &[&str]) -> Vec<String> {
        let current: std::collections::HashSet<&str> = members.iter().copied().collect();
        let mut seen = std::collections::HashSet::new();
        self.pinned
            .iter()
            .map(String::as_str)
            .chain(self.recent.iter().map(String::as_str))
            .chain(members.iter().copied())
            .filter(|id| current.contains(id) && seen.insert(*id))
            .map(str::to_owned)
            .collect()
    }

    /// The members whose video `subscriber` receives, best first: the
    /// first N of `ranking` that are not the subscriber (all of them when
    /// Last-N is off).
    pub fn select(&self, ranking: &[String], subscriber: &str) -> Vec<String> {
        let limit = if self.n == 0 { usize::MAX } else { self.n };
        ranking
            .iter()
            .filter(|id| *id != subscriber)
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl LastN {
        /// [`LastN::ranking`] and [`LastN::select`] in one.
        fn selection(&self, members: &[&str], subscriber: &str) -> Vec<String> {
            self.select(&self.ranking(members), subscriber)
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    const ROOM: [&str; 5] = ["a", "b", "c", "d", "e"];

    #[test]
    fn off_selects_everyone_else() {
        let l = LastN::new(0);
        assert!(!l.enabled());
        assert_eq!(l.selection(&ROOM, "c"), ids(&["a", "b", "d", "e"]));
    }

    #[test]
    fn without_speakers_the_first_to_join_are_selected() {
        let l = LastN::new(2);
        assert_eq!(l.selection(&ROOM, "e"), ids(&["a", "b"]));
        // A subscriber never counts itself.
        assert_eq!(l.selection(&ROOM, "a"), ids(&["b", "c"]));
    }

    #[test]
    fn recent_speakers_come_first_and_stay_until_others_speak() {
        let mut l = LastN::new(2);
        assert!(l.spoke(&ids(&["d"])));
        assert_eq!(l.selection(&ROOM, "a"), ids(&["d", "b"]));
        assert!(l.spoke(&ids(&["e", "c"])));
        assert_eq!(l.selection(&ROOM, "a"), ids(&["e", "c"]));
        // Silence changes nothing: the last speakers stay on screen.
        assert!(!l.spoke(&[]));
        assert_eq!(l.selection(&ROOM, "a"), ids(&["e", "c"]));
        // The speaker sees the one before.
        assert_eq!(l.selection(&ROOM, "e"), ids(&["c", "d"]));
        // Speaking again while first changes nothing.
        assert!(!l.spoke(&ids(&["e"])));
    }

    #[test]
    fn pinned_members_come_before_speakers_and_leavers_are_forgotten() {
        let t0 = Instant::now();
        let mut l = LastN::new(2);
        l.spoke(&ids(&["d", "e"]));
        assert!(l.pin("a", true, t0));
        assert!(!l.pin("a", true, t0 + PIN_COOLDOWN));
        assert_eq!(l.selection(&ROOM, "b"), ids(&["a", "d"]));
        assert!(l.pin("a", false, t0 + PIN_COOLDOWN));
        assert_eq!(l.selection(&ROOM, "b"), ids(&["d", "e"]));
        // d leaves: it is not selected even if still ranked.
        let remaining = ["a", "b", "c", "e"];
        assert_eq!(l.selection(&remaining, "b"), ids(&["e", "a"]));
        l.forget("d");
        assert_eq!(l.recent, ids(&["e"]));
    }

    #[test]
    fn a_pin_changes_at_most_once_per_cooldown() {
        let t0 = Instant::now();
        let mut l = LastN::new(1);
        assert!(l.pin("c", true, t0));
        // Toggling fast changes nothing until the cooldown passed...
        let mut t = t0;
        for i in 0..40 {
            t += Duration::from_millis(40);
            assert!(!l.pin("c", i % 2 == 1, t));
            assert!(!l.settle(t));
            assert_eq!(l.selection(&ROOM, "a"), ids(&["c"]));
        }
        // ...then the last wish applies (the loop ended on "pin").
        assert!(
            !l.settle(t0 + PIN_COOLDOWN),
            "still pinned, nothing changes"
        );
        assert!(!l.pin("c", false, t0 + PIN_COOLDOWN - Duration::from_millis(1)));
        assert!(l.settle(t0 + PIN_COOLDOWN));
        assert_eq!(l.selection(&ROOM, "a"), ids(&["b"]));
        // A member who leaves takes its pending wish with it.
        l.pin("c", true, t0 + PIN_COOLDOWN);
        l.forget("c");
        assert!(!l.settle(t0 + PIN_COOLDOWN * 3));
        assert!(l.wanted.is_empty() && l.changed_at.is_empty() && l.pinned.is_empty());
    }
}
