//! Active-speaker detection: which members of a room are talking, loudest
//! first, from the audio level that clients put in every audio packet
//! (RFC 6464, `urn:ietf:params:rtp-hdrext:ssrc-audio-level`). Nothing is
//! decoded: the level is one byte of the RTP header extension.
//!
//! Two pieces, both pure and synchronous:
//! - a [`LevelMeter`] per publisher, fed one level per audio packet on the
//!   forwarding path (three integer additions, no allocation);
//! - a [`SpeakerDetector`] per room, which every [`INTERVAL`] turns each
//!   meter's window into a score, smooths it, and returns the ordered list
//!   of speakers when it changed.
//!
//! The thresholds follow what LiveKit and Jitsi Videobridge use in
//! practice: a packet counts as speech when louder than -40 dBov, a window
//! counts as speech when enough of its packets are, and the first place (the
//! dominant speaker) changes hands only to a clearly louder speaker, so two
//! people talking at once do not make the layout flicker.

use std::time::Duration;

/// How often the detector is consulted (and at most how often the list
/// can change): about 12 Opus packets per member at 20 ms each.
pub const INTERVAL: Duration = Duration::from_millis(250);
/// A packet is speech when its level is this loud or louder (RFC 6464
/// levels are -dBov: 0 is the loudest, 127 silence).
pub const ACTIVE_LEVEL: u8 = 40;
/// Weight of a new window in the smoothed score when the score rises.
const ATTACK: f32 = 0.6;
/// Weight of a new window when the score falls (speech pauses between
/// words should not end a turn).
const DECAY: f32 = 0.45;
/// A member starts speaking at this smoothed score...
const START: f32 = 0.12;
/// ...and stops below this one.
const STOP: f32 = 0.06;
/// A challenger takes the first place only when this much louder than the
/// member holding it (who keeps it while still speaking otherwise).
const TAKEOVER: f32 = 1.25;
/// At most this many speakers are listed.
pub const MAX_SPEAKERS: usize = 8;

/// Audio levels of one publisher's packets since the last window.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LevelMeter {
    packets: u32,
    active: u32,
    /// Sum over active packets of how far above the threshold they were.
    loudness: u32,
}

impl LevelMeter {
    /// Records one packet's level (RFC 6464: the low 7 bits of the
    /// extension's byte; the V bit is ignored, as many senders never set
    /// it).
    pub fn observe(&mut self, level_byte: u8) {
        let level = level_byte & 0x7f;
        self.packets = self.packets.saturating_add(1);
        if level <= ACTIVE_LEVEL {
            self.active = self.active.saturating_add(1);
            self.loudness = self
                .loudness
                .saturating_add(u32::from(ACTIVE_LEVEL - level) + 1);
        }
    }

    /// This window's score in 0..=1 (share of speech packets × their mean
    /// loudness above the threshold), and a fresh window.
    pub fn take(&mut self) -> f32 {
        let m = std::mem::take(self);
        if m.packets == 0 || m.active == 0 {
            return 0.0;
        }
        let share = m.active as f32 / m.packets as f32;
        let loudness = m.loudness as f32 / m.active as f32 / (f32::from(ACTIVE_LEVEL) + 1.0);
        share * loudness
    }
}

/// One entry of the speaker list.
#[derive(Debug, Clone, PartialEq)]
pub struct Speaker {
    /// Participant id.
    pub id: String,
    /// Smoothed score in 0..=1, rounded to hundredths.
    pub level: f32,
}

#[derive(Debug)]
struct Member {
    id: String,
    smoothed: f32,
    speaking: bool,
    /// Still among the room's legs at the last update.
    seen: bool,
}

/// A room's speakers over time.
#[derive(Debug, Default)]
pub struct SpeakerDetector {
    members: Vec<Member>,
    /// The ids last reported, in order.
    reported: Vec<String>,
}

impl SpeakerDetector {
    /// Feeds one window: each current member with its window score
    /// ([`LevelMeter::take`]). Members not named are forgotten. Returns the
    /// new list, loudest first (the first is the dominant speaker), when
    /// the set or the order of speakers changed.
    pub fn update<'a>(
        &mut self,
        windows: impl IntoIterator<Item = (&'a str, f32)>,
    ) -> Option<Vec<Speaker>> {
        for m in &mut self.members {
            m.seen = false;
        }
        for (id, score) in windows {
            let score = score.clamp(0.0, 1.0);
            let m = match self.members.iter_mut().position(|m| m.id == id) {
                Some(i) => &mut self.members[i],
                None => {
                    self.members.push(Member {
                        id: id.to_owned(),
                        smoothed: 0.0,
                        speaking: false,
                        seen: false,
                    });
                    self.members.last_mut().expect("just pushed")
                }
            };
            m.seen = true;
            let weight = if score > m.smoothed { ATTACK } else { DECAY };
            m.smoothed += (score - m.smoothed) * weight;
            m.speaking = if m.speaking {
                m.smoothed >= STOP
            } else {
                m.smoothed >= START
            };
        }
        self.members.retain(|m| m.seen);

        let mut speakers: Vec<&Member> = self.members.iter().filter(|m| m.speaking).collect();
        speakers.sort_by(|a, b| b.smoothed.total_cmp(&a.smoothed));
        // The dominant speaker keeps the first place unless clearly beaten.
        if let Some(holder) = self.reported.first() {
            if let Some(pos) = speakers.iter().position(|m| &m.id == holder) {
                if pos > 0 && speakers[0].smoothed < speakers[pos].smoothed * TAKEOVER {
                    let m = speakers.remove(pos);
                    speakers.insert(0, m);
                }
            }
        }
        speakers.truncate(MAX_SPEAKERS);
        let ids: Vec<&str> = speakers.iter().map(|m| m.id.as_str()).collect();
        if ids == self.reported {
            return None;
        }
        self.reported = ids.iter().map(|id| (*id).to_owned()).collect();
        Some(
            speakers
                .iter()
                .map(|m| Speaker {
                    id: m.id.clone(),
                    level: (m.smoothed * 100.0).round() / 100.0,
                })
                .collect(),
        )
    }

    /// The ids last reported, dominant speaker first.
    pub fn current(&self) -> &[String] {
        &self.reported
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window of `n` packets at `level`.
    fn window(level: u8, n: u32) -> f32 {
        let mut m = LevelMeter::default();
        for _ in 0..n {
            m.observe(level);
        }
        m.take()
    }

    fn ids(list: &[Speaker]) -> Vec<&str> {
        list.iter().map(|s| s.id.as_str()).collect()
    }

    #[test]
    fn silence_and_noise_score_zero_and_speech_scores_by_loudness() {
        assert_eq!(window(127, 12), 0.0);
        assert_eq!(window(ACTIVE_LEVEL + 1, 12), 0.0);
        assert_eq!(LevelMeter::default().take(), 0.0);
        let loud = window(10, 12);
        let quiet = window(35, 12);
        assert!(loud > quiet && quiet > 0.0, "{loud} {quiet}");
        assert!(window(0, 12) <= 1.0);
        // The V bit does not change the level.
        assert_eq!(window(0x80 | 10, 12), loud);
        // Half the packets speech: half the score.
        let mut m = LevelMeter::default();
        for i in 0..12 {
            m.observe(if i % 2 == 0 { 10 } else { 127 });
        }
        assert!((m.take() - loud / 2.0).abs() < 1e-6);
        // take() starts a new window.
        assert_eq!(m.take(), 0.0);
    }

    #[test]
    fn a_talker_is_listed_within_a_window_and_dropped_after_silence() {
        let mut d = SpeakerDetector::default();
        let list = d
            .update([("a", window(10, 12)), ("b", 0.0)])
            .expect("a speaks");
        assert_eq!(ids(&list), ["a"]);
        assert!(list[0].level > 0.0 && list[0].level <= 1.0);
        // Unchanged list: nothing to report.
        assert_eq!(d.update([("a", window(10, 12)), ("b", 0.0)]), None);
        // Silence: a decays out within a few windows (pauses between words
        // of up to one window do not end the turn).
        assert_eq!(d.update([("a", 0.0), ("b", 0.0)]), None);
        let mut windows = 1;
        loop {
            windows += 1;
            assert!(
                windows <= 6,
                "a still listed after {windows} silent windows"
            );
            if let Some(list) = d.update([("a", 0.0), ("b", 0.0)]) {
                assert!(list.is_empty());
                break;
            }
        }
    }

    #[test]
    fn the_first_place_changes_only_to_a_clearly_louder_speaker() {
        let mut d = SpeakerDetector::default();
        for _ in 0..4 {
            d.update([("a", window(20, 12)), ("b", 0.0)]);
        }
        assert_eq!(d.current(), ["a"]);
        // b joins in slightly louder: listed second, a keeps the floor.
        let list = d.update([("a", window(20, 12)), ("b", window(18, 12))]);
        assert_eq!(ids(&list.expect("b listed")), ["a", "b"]);
        for _ in 0..4 {
            d.update([("a", window(20, 12)), ("b", window(18, 12))]);
        }
        assert_eq!(d.current(), ["a", "b"]);
        // b much louder: takes the floor.
        let mut took = false;
        for _ in 0..4 {
            d.update([("a", window(20, 12)), ("b", window(2, 12))]);
            took |= d.current().first().map(String::as_str) == Some("b");
        }
        assert!(took, "{:?}", d.current());
        // a stops: b alone.
        for _ in 0..6 {
            d.update([("a", 0.0), ("b", window(2, 12))]);
        }
        assert_eq!(d.current(), ["b"]);
    }

    #[test]
    fn members_who_leave_are_forgotten_and_the_list_is_bounded() {
        let mut d = SpeakerDetector::default();
        let names: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
        let list = d
            .update(names.iter().map(|n| (n.as_str(), window(10, 12))))
            .expect("speakers");
        assert_eq!(list.len(), MAX_SPEAKERS);
        let list = d.update([("p3", window(10, 12))]).expect("only p3 left");
        assert_eq!(ids(&list), ["p3"]);
        assert_eq!(d.members.len(), 1);
        // Out-of-range scores are clamped.
        assert!(d.update([("p3", f32::INFINITY)]).is_none());
        assert!(d.members[0].smoothed <= 1.0);
    }
}
