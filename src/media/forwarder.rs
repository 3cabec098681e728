//! The per-downtrack forwarder: decides whether a publisher's RTP packet
//! goes to one subscriber and rewrites its SSRC, payload type, sequence
//! number and timestamp so that the subscriber sees one clean stream.
//!
//! Pure logic: header fields and a clock reading in, a verdict out. No
//! sockets, no allocation, no locks; the media plane calls it once per
//! packet per subscriber.
//!
//! ## Stream continuity
//!
//! The subscriber's stream keeps its own SSRC and its own sequence and
//! timestamp spaces. Whenever the *source* changes (the publisher restarts
//! with a new SSRC today; a simulcast layer switch later), the forwarder
//! picks new offsets so that the output continues where it left off:
//! sequence number `last + 1`, timestamp `last + elapsed × clock rate`
//! (at least 1). Packets of the same source keep their relative order and
//! gaps, so retransmissions and reordering still line up. For video a new
//! source starts only on a keyframe; until then its packets are dropped and
//! the caller should ask the publisher for one ([`Drop::WaitingForKeyframe`]).
//!
//! A publisher that renumbers its stream without changing SSRC (its
//! sequence jumps back, or more than half the sequence space ahead) would
//! otherwise have every later packet dropped as old: two such packets in a
//! row restart the source as a switch does (RFC 3550 appendix A.1).

/// What the forwarder writes into each outgoing packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownTrackParams {
    /// SSRC of the subscriber's stream.
    pub ssrc: u32,
    /// Payload type negotiated on the subscriber's connection.
    pub payload_type: u8,
    /// RTP clock rate (90 000 for video, 48 000 for Opus).
    pub clock_rate: u32,
    /// Video streams only switch sources on keyframes.
    pub video: bool,
}

/// Why a packet is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// A new video source has not sent a keyframe yet: request one.
    WaitingForKeyframe,
    /// Older than the point where the current source started, or so old
    /// (more than half the sequence space) that it cannot be placed.
    TooOld,
}

/// The forwarder's verdict for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send with these header fields.
    Send {
        /// Output sequence number.
        sequence: u16,
        /// Output timestamp.
        timestamp: u32,
    },
    /// Do not send.
    Drop(Drop),
}

#[derive(Debug, Clone, Copy)]
struct Source {
    ssrc: u32,
    seq_offset: u16,
    ts_offset: u32,
    /// First extended input sequence number of this source.
    start: u64,
    /// Highest extended input sequence number seen.
    highest: u64,
}

#[derive(Debug, Clone, Copy)]
struct LastOut {
    sequence: u16,
    timestamp: u32,
    at_micros: u64,
}

/// Rewrites one publisher track for one subscriber. See the module docs.
#[derive(Debug, Clone)]
pub struct Forwarder {
    params: DownTrackParams,
    source: Option<Source>,
    last: Option<LastOut>,
    /// The sequence number that would confirm a renumbered source.
    resync: Option<u16>,
    forwarded: u64,
}

/// Extends a 16-bit sequence number to 64 bits relative to `reference`
/// (RFC 3550 appendix A.1: the nearest value modulo 2^16).
fn extend(reference: u64, seq: u16) -> u64 {
    let delta = seq.wrapping_sub(reference as u16) as i16;
    // Start extended numbers at 2^32 so that a step back never underflows.
    (reference as i64 + i64::from(delta)) as u64
}

/// Base for extended sequence numbers (room to go back without underflow).
const EXT_BASE: u64 = 1 << 32;

/// How far behind the newest packet a packet may arrive and still count as
/// reordered rather than as a renumbered stream (RFC 3550 appendix A.1).
const MAX_MISORDER: u64 = 100;

impl Forwarder {
    /// A forwarder that has not forwarded anything yet.
    pub fn new(params: DownTrackParams) -> Self {
        Forwarder {
            params,
            source: None,
            last: None,
            resync: None,
            forwarded: 0,
        }
    }

    /// The output parameters.
    pub fn params(&self) -> DownTrackParams {
        self.params
    }

    /// Packets forwarded so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded
    }

    /// Stops forwarding the current source without forgetting where the
    /// output stands: the next packet restarts the stream as a source
    /// switch does (video on a keyframe), continuing sequence numbers and
    /// timestamps, so that packets deliberately not sent while paused leave
    /// no hole a receiver would wait for or NACK in vain.
    pub fn pause(&mut self) {
        self.source = None;
    }

    /// Decides about one packet: `ssrc`, `sequence`, `timestamp` from its
    /// header, `keyframe` from the publisher's codec parser, `now_micros`
    /// from a monotonic clock.
    pub fn forward(
        &mut self,
        ssrc: u32,
        sequence: u16,
        timestamp: u32,
        keyframe: bool,
        now_micros: u64,
    ) -> Verdict {
        let current = match self.source {
            Some(s) if s.ssrc == ssrc => {
                let ext = extend(s.highest, sequence);
                if ext >= s.start && s.highest.saturating_sub(ext) < 1 << 15 {
                    Some(s)
                } else if self.restarted(s, ext, sequence) {
                    // The publisher renumbered its stream: start it anew,
                    // as after a pause.
                    self.source = None;
                    None
                } else {
                    return Verdict::Drop(Drop::TooOld);
                }
            }
            _ => None,
        };
        let source = match current {
            Some(s) => s,
            None => {
                if self.params.video && !keyframe {
                    return Verdict::Drop(Drop::WaitingForKeyframe);
                }
                self.switch_to(ssrc, sequence, timestamp, now_micros)
            }
        };
        self.resync = None;
        let ext = extend(source.highest, sequence);
        let out_seq = sequence.wrapping_add(source.seq_offset);
        let out_ts = timestamp.wrapping_add(source.ts_offset);
        if ext > source.highest {
            if let Some(s) = self.source.as_mut() {
                s.highest = ext;
            }
            self.last = Some(LastOut {
                sequence: out_seq,
                timestamp: out_ts,
                at_micros: now_micros,
            });
        }
        self.forwarded += 1;
        Verdict::Send {
            sequence: out_seq,
            timestamp: out_ts,
        }
    }

    /// A packet of the current source that cannot be placed (`ext`, from
    /// before the source started or half the sequence space away): whether
    /// it confirms that the publisher restarted its sequence numbers. As in
    /// RFC 3550 appendix A.1, a packet far from the stream (more than
    /// [`MAX_MISORDER`] behind) is dropped, and if the next one follows it
    /// in order, the stream is taken as renumbered rather than as old.
    fn restarted(&mut self, s: Source, ext: u64, sequence: u16) -> bool {
        let far = s.highest.saturating_sub(ext) > MAX_MISORDER;
        if far && self.resync == Some(sequence) {
            self.resync = None;
            return true;
        }
        self.resync = far.then(|| sequence.wrapping_add(1));
        false
    }

    /// Starts forwarding a new source so that the output continues the
    /// previous one.
    fn switch_to(&mut self, ssrc: u32, sequence: u16, timestamp: u32, now: u64) -> Source {
        let (seq_offset, ts_offset) = match self.last {
            None => (0, 0),
            Some(last) => {
                let next_seq = last.sequence.wrapping_add(1);
                let elapsed = now.saturating_sub(last.at_micros);
                let ticks = (u128::from(elapsed) * u128::from(self.params.clock_rate) / 1_000_000)
                    .clamp(1, u128::from(u32::MAX / 2)) as u32;
                let next_ts = last.timestamp.wrapping_add(ticks);
                (
                    next_seq.wrapping_sub(sequence),
                    next_ts.wrapping_sub(timestamp),
                )
            }
        };
        let start = EXT_BASE + u64::from(sequence);
        self.resync = None;
        let source = Source {
            ssrc,
            seq_offset,
            ts_offset,
            start,
            // One below the start, so the first packet counts as newest.
            highest: start - 1,
        };
        self.source = Some(source);
        source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIDEO: DownTrackParams = DownTrackParams {
        ssrc: 1111,
        payload_type: 96,
        clock_rate: 90_000,
        video: true,
    };
    const AUDIO: DownTrackParams = DownTrackParams {
        ssrc: 2222,
        payload_type: 111,
        clock_rate: 48_000,
        video: false,
    };

    fn send(v: Verdict) -> (u16, u32) {
        match v {
            Verdict::Send {
                sequence,
                timestamp,
            } => (sequence, timestamp),
            Verdict::Drop(d) => panic!("dropped: {d:?}"),
        }
    }

    #[test]
    fn first_source_passes_through_unchanged() {
        let mut f = Forwarder::new(AUDIO);
        assert_eq!(send(f.forward(7, 100, 5000, false, 0)), (100, 5000));
        assert_eq!(send(f.forward(7, 101, 5960, false, 20_000)), (101, 5960));
        assert_eq!(f.forwarded(), 2);
    }

    #[test]
    fn video_waits_for_a_keyframe() {
        let mut f = Forwarder::new(VIDEO);
        assert_eq!(
            f.forward(7, 1, 0, false, 0),
            Verdict::Drop(Drop::WaitingForKeyframe)
        );
        assert_eq!(send(f.forward(7, 2, 3000, true, 0)), (2, 3000));
        // Later delta frames of the same source pass.
        assert_eq!(send(f.forward(7, 3, 6000, false, 33_000)), (3, 6000));
    }

    #[test]
    fn sequence_wraps_and_reordering_keeps_gaps() {
        let mut f = Forwarder::new(AUDIO);
        send(f.forward(7, 65534, 0, false, 0));
        assert_eq!(send(f.forward(7, 0, 1920, false, 0)).0, 0);
        // 65535 arrives late: still placed right, one before 0.
        assert_eq!(send(f.forward(7, 65535, 960, false, 0)).0, 65535);
        assert_eq!(send(f.forward(7, 1, 2880, false, 0)).0, 1);
    }

    #[test]
    fn packets_from_before_the_source_started_are_dropped() {
        let mut f = Forwarder::new(AUDIO);
        send(f.forward(7, 500, 0, false, 0));
        assert_eq!(f.forward(7, 499, 0, false, 0), Verdict::Drop(Drop::TooOld));
        // Far behind (but nearer behind than ahead) is also before the start.
        for s in 501..=600u16 {
            send(f.forward(7, s, 0, false, 0));
        }
        assert_eq!(
            f.forward(7, 600u16.wrapping_sub(20_000), 0, false, 0),
            Verdict::Drop(Drop::TooOld)
        );
    }

    #[test]
    fn source_switch_continues_sequence_and_timestamp() {
        let mut f = Forwarder::new(VIDEO);
        send(f.forward(7, 1000, 90_000, true, 1_000_000));
        let (s, t) = send(f.forward(7, 1001, 93_000, false, 1_033_000));
        // New SSRC with unrelated numbers, 100 ms later.
        assert_eq!(
            f.forward(9, 40, 7, false, 1_133_000),
            Verdict::Drop(Drop::WaitingForKeyframe)
        );
        let (s2, t2) = send(f.forward(9, 41, 3007, true, 1_133_000));
        assert_eq!(s2, s.wrapping_add(1), "sequence continues");
        assert_eq!(
            t2,
            t.wrapping_add(9000),
            "timestamp advances by 100 ms of 90 kHz"
        );
        let (s3, t3) = send(f.forward(9, 42, 6007, false, 1_166_000));
        assert_eq!((s3, t3), (s2 + 1, t2 + 3000));
        // The old source's stragglers are no longer forwarded... they belong
        // to another SSRC, which would be a switch back: needs a keyframe.
        assert_eq!(
            f.forward(7, 1002, 96_000, false, 1_170_000),
            Verdict::Drop(Drop::WaitingForKeyframe)
        );
    }

    #[test]
    fn a_pause_leaves_no_hole_and_waits_for_a_keyframe() {
        let mut f = Forwarder::new(VIDEO);
        send(f.forward(7, 10, 0, true, 0));
        let (s, t) = send(f.forward(7, 11, 3000, false, 33_000));
        f.pause();
        // Packets 12..=40 are not offered while paused (the subscriber was
        // unreachable); the stream resumes at a keyframe.
        assert_eq!(
            f.forward(7, 41, 90_000, false, 1_000_000),
            Verdict::Drop(Drop::WaitingForKeyframe)
        );
        let (s2, t2) = send(f.forward(7, 42, 93_000, true, 1_033_000));
        assert_eq!(s2, s.wrapping_add(1), "no sequence hole");
        assert_eq!(
            t2,
            t.wrapping_add(90_000),
            "timestamp advanced by the 1 s paused"
        );
        // Audio resumes at once.
        let mut a = Forwarder::new(AUDIO);
        let (s, _) = send(a.forward(9, 100, 0, false, 0));
        a.pause();
        assert_eq!(send(a.forward(9, 150, 48_000, false, 1_000_000)).0, s + 1);
    }

    #[test]
    fn a_renumbered_source_restarts_after_two_packets_in_order() {
        let mut a = Forwarder::new(AUDIO);
        for s in 1000..1200u16 {
            send(a.forward(7, s, u32::from(s) * 960, false, 0));
        }
        // A lone stray far back is only dropped.
        assert_eq!(a.forward(7, 500, 0, false, 0), Verdict::Drop(Drop::TooOld));
        assert_eq!(send(a.forward(7, 1200, 0, false, 0)).0, 1200);
        // Renumbered from 40: one drop, then the stream goes on at 1201.
        assert_eq!(a.forward(7, 40, 5, false, 0), Verdict::Drop(Drop::TooOld));
        assert_eq!(send(a.forward(7, 41, 965, false, 20_000)).0, 1201);
        assert_eq!(send(a.forward(7, 42, 1925, false, 40_000)).0, 1202);
        // Video restarts on the next keyframe.
        let mut v = Forwarder::new(VIDEO);
        send(v.forward(7, 30_000, 0, true, 0));
        for s in 30_001..30_300u16 {
            send(v.forward(7, s, 0, false, 0));
        }
        assert_eq!(v.forward(7, 5, 0, false, 0), Verdict::Drop(Drop::TooOld));
        assert_eq!(
            v.forward(7, 6, 0, false, 0),
            Verdict::Drop(Drop::WaitingForKeyframe)
        );
        assert_eq!(
            v.forward(7, 7, 0, false, 0),
            Verdict::Drop(Drop::WaitingForKeyframe)
        );
        assert_eq!(send(v.forward(7, 8, 0, true, 0)).0, 30_300);
    }

    #[test]
    fn output_is_monotonic_across_many_switches() {
        let mut f = Forwarder::new(AUDIO);
        let mut last: Option<(u16, u32)> = None;
        let mut now = 0u64;
        for round in 0..50u32 {
            let ssrc = 100 + round % 3;
            let base_seq = (round as u16).wrapping_mul(7919);
            let base_ts = round.wrapping_mul(104_729);
            for i in 0..20u16 {
                now += 20_000;
                let (s, t) = send(f.forward(
                    ssrc,
                    base_seq.wrapping_add(i),
                    base_ts.wrapping_add(u32::from(i) * 960),
                    false,
                    now,
                ));
                if let Some((ls, lt)) = last {
                    assert_eq!(s, ls.wrapping_add(1), "no gap, no repeat");
                    let dt = t.wrapping_sub(lt);
                    assert!(dt > 0 && dt < 48_000, "timestamp moves forward: {dt}");
                }
                last = Some((s, t));
            }
        }
    }
}
