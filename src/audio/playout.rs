//! The playout buffer and the playout clock: agent audio arrives faster than real time and
//! leaves one 20 ms frame every 20 ms.
//!
//! Both are sans-IO. [`PlayoutBuffer`] holds slin samples at the call's sample rate, tagged by
//! the agent reply they belong to, so that on barge-in it can be flushed at once and say how
//! much of the interrupted reply the caller actually heard. [`PlayoutClock`] is a deadline
//! clock: deadlines are `start + n × 20 ms`, so lateness in one tick never accumulates into
//! drift; when the driver falls more than [`PlayoutClock::MAX_LAG_FRAMES`] behind it skips
//! ahead instead of bursting (Asterisk does not buffer: a burst would be dropped or garbled).

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Length of one frame on the wire.
pub const FRAME: Duration = Duration::from_millis(20);

/// Identifies one agent reply (one assistant turn) for heard-time accounting. Assigned by
/// the agent; the OpenAI agent maps it to the Realtime `item_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyId(pub u64);

#[derive(Debug, Clone, Copy)]
struct Segment {
    reply: ReplyId,
    /// Samples of this reply still in the buffer.
    queued: usize,
}

/// What [`PlayoutBuffer::flush`] threw away and what had been heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flushed {
    /// The reply that was playing (the oldest in the buffer), if any audio was queued or it
    /// had started playing.
    pub(crate) reply: Option<ReplyId>,
    /// How much of that reply the caller heard before the flush, ms.
    pub(crate) heard_ms: u64,
    /// Samples discarded.
    pub(crate) dropped_samples: usize,
}

/// What one popped frame held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoppedFrame {
    /// Agent samples written at the front of the frame; the rest is silence.
    pub(crate) agent_samples: usize,
    /// The frame was cut short (some but not all samples) while a reply was still streaming.
    pub(crate) underrun: bool,
}

/// A bounded FIFO of slin samples at one sample rate, tagged by reply.
#[derive(Debug)]
pub struct PlayoutBuffer {
    rate_hz: u32,
    samples: VecDeque<i16>,
    segments: VecDeque<Segment>,
    max_samples: usize,
    /// The reply heard most recently and how many of its samples were played.
    last_played: Option<(ReplyId, u64)>,
    /// The newest reply pushed has not been marked complete.
    streaming: bool,
    /// Samples dropped because the buffer was full (oldest first).
    overflow_samples: u64,
    /// Held by a local barge-in: frames are silence and nothing is consumed.
    paused: bool,
}

impl PlayoutBuffer {
    /// A buffer for audio at `rate_hz` holding at most `max` of audio (older audio is
    /// dropped beyond that). Memory grows only with what is queued.
    pub(crate) fn new(rate_hz: u32, max: Duration) -> Self {
        PlayoutBuffer {
            rate_hz,
            samples: VecDeque::with_capacity(rate_hz as usize / 5),
            segments: VecDeque::with_capacity(4),
            max_samples: (rate_hz as u128 * max.as_millis() / 1000) as usize,
            last_played: None,
            streaming: false,
            overflow_samples: 0,
            paused: false,
        }
    }

    /// Holds playout (a local barge-in): [`Self::pop_frame`] gives silence and keeps
    /// everything queued, and pushes still queue, until [`Self::resume`] or [`Self::flush`].
    pub(crate) fn pause(&mut self) {
        self.paused = true;
    }

    /// Plays on from where [`Self::pause`] held it; nothing queued was lost.
    pub(crate) fn resume(&mut self) {
        self.paused = false;
    }

    /// Playout is held by [`Self::pause`].
    pub(crate) fn is_paused(&self) -> bool {
        self.paused
    }

    /// Sample rate, Hz.
    pub(crate) fn rate_hz(&self) -> u32 {
        self.rate_hz
    }

    /// Samples in one 20 ms frame.
    pub(crate) fn samples_per_frame(&self) -> usize {
        self.rate_hz as usize / 50
    }

    /// Queued audio, in samples.
    pub(crate) fn len(&self) -> usize {
        self.samples.len()
    }

    /// Nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Queued audio as a duration.
    pub(crate) fn queued(&self) -> Duration {
        Duration::from_micros(self.samples.len() as u64 * 1_000_000 / self.rate_hz as u64)
    }

    /// Samples dropped so far because the buffer was full.
    pub(crate) fn overflow_samples(&self) -> u64 {
        self.overflow_samples
    }

    /// Appends agent audio of `reply`. If the buffer would exceed its bound the oldest
    /// samples are dropped and counted in [`Self::overflow_samples`].
    pub(crate) fn push(&mut self, reply: ReplyId, audio: &[i16]) {
        if audio.is_empty() {
            return;
        }
        match self.segments.back_mut() {
            Some(seg) if seg.reply == reply => seg.queued += audio.len(),
            _ => self.segments.push_back(Segment {
                reply,
                queued: audio.len(),
            }),
        }
        self.samples.extend(audio.iter().copied());
        self.streaming = true;
        let excess = self.samples.len().saturating_sub(self.max_samples);
        if excess > 0 {
            self.samples.drain(..excess);
            self.overflow_samples += excess as u64;
            self.consume_segments(excess, false);
        }
    }

    /// Drops up to `n` of the oldest queued samples without playing them (a live stream
    /// catching up after the clock skipped ticks); returns how many were dropped.
    pub(crate) fn discard(&mut self, n: usize) -> usize {
        let n = n.min(self.samples.len());
        self.samples.drain(..n);
        self.consume_segments(n, false);
        n
    }

    /// Marks the newest reply as complete: a short last frame is then not an underrun.
    pub(crate) fn mark_reply_complete(&mut self) {
        self.streaming = false;
    }

    /// Fills `out` (one frame, normally [`Self::samples_per_frame`] samples) with the next
    /// queued samples and silence after them; all silence while paused ([`Self::pause`]).
    pub(crate) fn pop_frame(&mut self, out: &mut [i16]) -> PoppedFrame {
        if self.paused {
            out.fill(0);
            return PoppedFrame {
                agent_samples: 0,
                underrun: false,
            };
        }
        let n = out.len().min(self.samples.len());
        for (o, s) in out.iter_mut().zip(self.samples.drain(..n)) {
            *o = s;
        }
        out[n..].fill(0);
        self.consume_segments(n, true);
        PoppedFrame {
            agent_samples: n,
            underrun: self.streaming && n < out.len() && (n > 0 || self.last_played.is_some()),
        }
    }

    fn consume_segments(&mut self, mut n: usize, played: bool) {
        while n > 0 {
            let Some(seg) = self.segments.front_mut() else {
                break;
            };
            let take = n.min(seg.queued);
            seg.queued -= take;
            n -= take;
            if played {
                match &mut self.last_played {
                    Some((r, count)) if *r == seg.reply => *count += take as u64,
                    other => *other = Some((seg.reply, take as u64)),
                }
            }
            if seg.queued == 0 {
                self.segments.pop_front();
            }
        }
    }

    /// How much of `reply` the caller has heard so far, ms (0 if it has not started).
    pub(crate) fn heard_ms(&self, reply: ReplyId) -> u64 {
        match self.last_played {
            Some((r, samples)) if r == reply => samples * 1000 / self.rate_hz as u64,
            _ => 0,
        }
    }

    /// Drops everything queued at once (barge-in), ends a pause, and reports what the caller
    /// heard of the reply that was playing.
    ///
    /// A reply counts as interrupted only while it is still playing: audio is queued, or its
    /// agent has not marked it complete. Speech after a reply was heard in full reports
    /// `reply: None`.
    pub(crate) fn flush(&mut self) -> Flushed {
        let playing = !self.segments.is_empty() || self.streaming;
        let reply = self
            .last_played
            .map(|(r, _)| r)
            .filter(|r| self.segments.front().is_none_or(|s| s.reply == *r))
            .or(self.segments.front().map(|s| s.reply))
            .filter(|_| playing);
        let heard_ms = reply.map_or(0, |r| self.heard_ms(r));
        let dropped_samples = self.samples.len();
        self.samples.clear();
        self.segments.clear();
        self.streaming = false;
        self.paused = false;
        Flushed {
            reply,
            heard_ms,
            dropped_samples,
        }
    }
}

/// Deadline clock for sending one frame every 20 ms without drift.
#[derive(Debug, Clone)]
pub struct PlayoutClock {
    next: Instant,
    skipped_frames: u64,
}

impl PlayoutClock {
    /// How many frames late the driver may be before the clock skips ahead.
    pub const MAX_LAG_FRAMES: u32 = 3;

    /// A clock whose first deadline is `start`.
    pub(crate) fn new(start: Instant) -> Self {
        PlayoutClock {
            next: start,
            skipped_frames: 0,
        }
    }

    /// When the next frame is due.
    pub(crate) fn deadline(&self) -> Instant {
        self.next
    }

    /// Frames skipped so far because the driver fell behind.
    pub(crate) fn skipped_frames(&self) -> u64 {
        self.skipped_frames
    }

    /// Call after sending the frame due at [`Self::deadline`], with the current time; moves
    /// the deadline 20 ms on, or re-anchors it to `now` if the driver is more than
    /// [`Self::MAX_LAG_FRAMES`] frames late (the missed frames are counted, not sent).
    pub(crate) fn advance(&mut self, now: Instant) {
        self.next += FRAME;
        if now > self.next + FRAME * Self::MAX_LAG_FRAMES {
            let behind = (now - self.next).as_micros() / FRAME.as_micros();
            self.skipped_frames += behind as u64;
            self.next = now + FRAME;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R1: ReplyId = ReplyId(1);
    const R2: ReplyId = ReplyId(2);

    #[test]
    fn discard_drops_the_oldest_unheard() {
        let mut b = PlayoutBuffer::new(8_000, Duration::from_secs(10));
        b.push(R1, &[1; 160]);
        b.push(R1, &[2; 160]);
        assert_eq!(b.discard(160), 160);
        let mut frame = [0i16; 160];
        assert_eq!(b.pop_frame(&mut frame).agent_samples, 160);
        assert_eq!(frame, [2; 160]);
        assert_eq!(b.heard_ms(R1), 20, "discarded audio was not heard");
        assert_eq!(b.discard(160), 0);
    }

    #[test]
    fn meters_out_frames_and_pads_with_silence() {
        let mut b = PlayoutBuffer::new(8_000, Duration::from_secs(10));
        b.push(R1, &[7; 400]);
        let mut frame = [1i16; 160];
        assert_eq!(b.pop_frame(&mut frame).agent_samples, 160);
        assert_eq!(b.pop_frame(&mut frame).agent_samples, 160);
        let last = b.pop_frame(&mut frame);
        assert_eq!(last.agent_samples, 80);
        assert!(
            last.underrun,
            "reply not marked complete, so a short frame is an underrun"
        );
        assert!(frame[..80].iter().all(|&s| s == 7) && frame[80..].iter().all(|&s| s == 0));
        assert_eq!(b.heard_ms(R1), 50);
        let silent = b.pop_frame(&mut frame);
        assert_eq!(silent.agent_samples, 0);
        assert!(frame.iter().all(|&s| s == 0));
    }

    #[test]
    fn complete_reply_has_no_underrun() {
        let mut b = PlayoutBuffer::new(8_000, Duration::from_secs(10));
        b.push(R1, &[7; 200]);
        b.mark_reply_complete();
        let mut frame = [0i16; 160];
        b.pop_frame(&mut frame);
        assert!(!b.pop_frame(&mut frame).underrun);
    }

    #[test]
    fn flush_reports_heard_time_of_the_playing_reply() {
        let mut b = PlayoutBuffer::new(16_000, Duration::from_secs(10));
        b.push(R1, &[1; 16_000]);
        b.push(R2, &[2; 1_600]);
        let mut frame = [0i16; 320];
        for _ in 0..10 {
            b.pop_frame(&mut frame);
        }
        let f = b.flush();
        assert_eq!(f.reply, Some(R1));
        assert_eq!(f.heard_ms, 200);
        assert_eq!(f.dropped_samples, 16_000 - 3_200 + 1_600);
        assert!(b.is_empty());
        assert_eq!(b.pop_frame(&mut frame).agent_samples, 0);
    }

    #[test]
    fn heard_time_moves_to_the_next_reply() {
        let mut b = PlayoutBuffer::new(8_000, Duration::from_secs(10));
        b.push(R1, &[1; 240]);
        b.push(R2, &[2; 800]);
        let mut frame = [0i16; 160];
        b.pop_frame(&mut frame);
        b.pop_frame(&mut frame); // 80 of R1, 80 of R2
        assert_eq!(&frame[78..82], &[1, 1, 2, 2]);
        assert_eq!(b.heard_ms(R1), 0, "R1 is no longer the reply being heard");
        assert_eq!(b.heard_ms(R2), 10);
        assert_eq!(b.flush().reply, Some(R2));
    }

    #[test]
    fn speech_after_a_reply_heard_in_full_is_not_an_interruption() {
        let mut b = PlayoutBuffer::new(8_000, Duration::from_secs(10));
        b.push(R1, &[1; 320]);
        b.mark_reply_complete();
        let mut frame = [0i16; 160];
        b.pop_frame(&mut frame);
        b.pop_frame(&mut frame);
        b.pop_frame(&mut frame);
        assert_eq!(b.flush().reply, None);
        // While a reply is still streaming (not complete), an empty buffer is a gap, and
        // speech then does interrupt it.
        b.push(R2, &[2; 160]);
        b.pop_frame(&mut frame);
        let f = b.flush();
        assert_eq!((f.reply, f.heard_ms), (Some(R2), 20));
    }

    #[test]
    fn pause_holds_everything_and_resume_plays_on_from_there() {
        let mut b = PlayoutBuffer::new(8_000, Duration::from_secs(60));
        let audio: Vec<i16> = (1..=480).map(|i| i as i16).collect();
        b.push(ReplyId(1), &audio);
        let mut frame = [0i16; 160];
        b.pop_frame(&mut frame);
        b.pause();
        b.push(ReplyId(1), &[7; 160]);
        for _ in 0..5 {
            let p = b.pop_frame(&mut frame);
            assert_eq!(p.agent_samples, 0);
            assert!(!p.underrun);
            assert!(frame.iter().all(|&s| s == 0));
        }
        assert_eq!(b.heard_ms(ReplyId(1)), 20);
        assert_eq!(b.len(), 320 + 160);
        b.resume();
        b.pop_frame(&mut frame);
        assert_eq!(frame[0], 161, "plays on from the sample after the pause");
        assert_eq!(b.heard_ms(ReplyId(1)), 40);
        b.pause();
        let f = b.flush();
        assert_eq!((f.heard_ms, f.dropped_samples), (40, 320));
        assert!(!b.is_paused(), "a flush ends the pause");
    }

    #[test]
    fn overflow_drops_oldest_and_counts() {
        let mut b = PlayoutBuffer::new(8_000, Duration::from_millis(100));
        b.push(R1, &[1; 600]);
        b.push(R1, &[2; 600]);
        assert_eq!(b.len(), 800);
        assert_eq!(b.overflow_samples(), 400);
        let mut frame = [0i16; 160];
        b.pop_frame(&mut frame);
        assert_eq!(frame[0], 1);
    }

    #[test]
    fn clock_does_not_drift_and_skips_when_far_behind() {
        let t0 = Instant::now();
        let mut c = PlayoutClock::new(t0);
        // Each tick handled 3 ms late: deadlines stay on the 20 ms grid.
        for n in 1..=100u32 {
            let due = c.deadline();
            c.advance(due + Duration::from_millis(3));
            assert_eq!(c.deadline(), t0 + FRAME * n);
        }
        // A 200 ms stall: re-anchor rather than burst ten frames.
        let due = c.deadline();
        c.advance(due + Duration::from_millis(200));
        assert_eq!(c.deadline(), due + Duration::from_millis(220));
        assert!(c.skipped_frames() >= 8);
    }
}
