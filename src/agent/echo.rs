//! The `echo` agent: plays the caller's own voice back after a fixed delay, like the echo
//! test extension PBX installers use. A diagnostic for the whole audio path with no cloud.
//!
//! The delay is kept on the **stream's** clock, not on the arrival of each frame: Asterisk's
//! frames arrive unevenly on a busy box (gaps p99 27 ms, max 47 ms: `docs/asterisk.md` in
//! shared/), so releasing each frame exactly `delay` after it arrived turned every late frame
//! into a playout underrun and a permanent +20 ms of lag. [`DelayLine`] schedules sample `n`
//! of the stream at `anchor + n / rate + delay` (the anchor is the earliest arrival less its
//! stream time: the stream's true start) and
//! hands it to the playout [`CUSHION`] early, so the playout buffer holds a little audio to
//! ride out the echo task's own scheduling jitter. A frame more than [`MAX_LATENESS`] later
//! than its slot (Asterisk sent nothing for a while, e.g. during DTMF) moves the anchor by
//! the lateness: the echo of what
//! follows keeps the configured delay.

use super::{Agent, AgentEndpoint, AgentEvent, AgentInput, AgentSession, CallInfo};
use crate::audio::{ReplyId, slin_from_le_bytes};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::{Instant, sleep_until};
use tracing::debug;

/// How much earlier than its slot a frame is handed to the playout buffer, which paces it.
pub(crate) const CUSHION: Duration = Duration::from_millis(40);

/// A frame this much later than its slot is a gap in the input (Asterisk sends no frames
/// while the caller presses keys), not jitter (at most 47 ms observed): the schedule moves.
pub(crate) const MAX_LATENESS: Duration = Duration::from_millis(120);

/// Audio held beyond the delay before the oldest is dropped (a caller sending faster than
/// real time cannot grow the line without bound).
pub(crate) const MAX_EXCESS: Duration = Duration::from_secs(1);

/// Echoes caller audio back after `delay`.
#[derive(Debug, Clone)]
pub struct EchoAgent {
    delay: Duration,
}

impl EchoAgent {
    /// An echo agent with the given delay (the default config uses 500 ms).
    pub fn new(delay: Duration) -> Self {
        EchoAgent { delay }
    }
}

impl Agent for EchoAgent {
    fn name(&self) -> &'static str {
        "echo"
    }

    /// The echo is the caller's own stream: after a stall it catches up rather than lag.
    fn live_playout(&self) -> bool {
        true
    }

    fn start(&self, call: CallInfo) -> AgentSession {
        let (session, endpoint) = super::session_channel();
        let line = DelayLine::new(self.delay, call.rate_hz);
        // Inside the call's span: its log lines carry the call id.
        super::task::spawn(run(line, endpoint));
        session
    }
}

/// A sans-IO delay line on the stream's clock (see the module docs). Time is passed in.
#[derive(Debug)]
pub(crate) struct DelayLine {
    delay: Duration,
    rate_hz: u32,
    /// Time of stream sample 0: the earliest arrival less its stream time, moved forward by
    /// gaps.
    anchor: Option<Instant>,
    /// Samples pushed so far (the stream position of the next frame).
    position: u64,
    /// Frames waiting for their release time, oldest first: (release, samples).
    queue: VecDeque<(Instant, Vec<i16>)>,
    queued_samples: usize,
    /// Samples dropped because the line was over [`MAX_EXCESS`] past its delay.
    dropped_samples: u64,
    /// Times the anchor moved because a frame came later than its slot.
    reanchors: u64,
}

impl DelayLine {
    /// A line delaying by `delay` at `rate_hz` (8000 when 0: not yet known).
    pub(crate) fn new(delay: Duration, rate_hz: u32) -> Self {
        DelayLine {
            delay,
            rate_hz: if rate_hz == 0 { 8_000 } else { rate_hz },
            anchor: None,
            position: 0,
            queue: VecDeque::new(),
            queued_samples: 0,
            dropped_samples: 0,
            reanchors: 0,
        }
    }

    fn stream_time(&self, samples: u64) -> Duration {
        Duration::from_micros(samples * 1_000_000 / u64::from(self.rate_hz))
    }

    /// Takes one caller frame that arrived at `now`.
    pub(crate) fn push(&mut self, now: Instant, samples: Vec<i16>) {
        let mut anchor = *self.anchor.get_or_insert(now);
        let slot = anchor + self.stream_time(self.position);
        if now < slot {
            // Earlier than its slot: the first frames were late. The anchor is the earliest
            // arrival less its stream time, the stream's true start.
            anchor -= slot - now;
            self.anchor = Some(anchor);
        } else if now > slot + MAX_LATENESS {
            // Too late for jitter: nothing came for a while. Keep the delay for
            // what follows rather than echoing it at once.
            let late = now - slot;
            self.anchor = Some(anchor + late);
            self.reanchors += 1;
            debug!(
                late_ms = late.as_millis() as u64,
                "echo: input gap, re-anchored"
            );
        }
        let slot = self.anchor.unwrap_or(now) + self.stream_time(self.position);
        let release = (slot + self.delay).checked_sub(CUSHION).unwrap_or(slot);
        self.position += samples.len() as u64;
        self.queued_samples += samples.len();
        self.queue.push_back((release, samples));
        let max = self.rate_hz as usize * (self.delay + MAX_EXCESS).as_millis() as usize / 1000;
        while self.queued_samples > max {
            // Faster than real time: drop the oldest, counted.
            let Some((_, old)) = self.queue.pop_front() else {
                break;
            };
            self.queued_samples -= old.len();
            self.dropped_samples += old.len() as u64;
        }
    }

    /// When the next frame is due, if any is queued.
    pub(crate) fn next_release(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t)
    }

    /// The oldest frame if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Vec<i16>> {
        if self.queue.front().is_some_and(|(t, _)| *t <= now) {
            let (_, samples) = self.queue.pop_front()?;
            self.queued_samples -= samples.len();
            return Some(samples);
        }
        None
    }

    /// Samples dropped because input came faster than real time.
    pub(crate) fn dropped_samples(&self) -> u64 {
        self.dropped_samples
    }

    /// Times a late frame moved the schedule.
    pub(crate) fn reanchors(&self) -> u64 {
        self.reanchors
    }
}

async fn run(mut line: DelayLine, mut io: AgentEndpoint) {
    let reply = ReplyId(0);
    loop {
        let next = line.next_release();
        tokio::select! {
            input = io.input.recv() => match input {
                Some(AgentInput::Audio(bytes)) => {
                    let mut samples = Vec::with_capacity(bytes.len() / 2);
                    slin_from_le_bytes(&bytes, &mut samples);
                    line.push(Instant::now(), samples);
                }
                Some(_) => {}
                None => break,
            },
            () = async { sleep_until(next.unwrap_or_else(Instant::now)).await }, if next.is_some() => {
                let now = Instant::now();
                while let Some(samples) = line.pop_due(now) {
                    if io.events.send(AgentEvent::Audio { reply, samples }).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    debug!(
        dropped_samples = line.dropped_samples(),
        reanchors = line.reanchors(),
        "echo agent done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: usize = 160; // 20 ms at 8 kHz

    fn frame(n: i16) -> Vec<i16> {
        vec![n; FRAME]
    }

    /// Frames arriving up to 47 ms late (a busy Asterisk) are released on the stream's
    /// schedule: every release is exactly `delay - CUSHION` after its slot.
    #[test]
    fn jittery_input_keeps_the_schedule() {
        let t0 = Instant::now();
        let delay = Duration::from_millis(300);
        let mut line = DelayLine::new(delay, 8_000);
        let jitter = [0u64, 7, 27, 3, 47, 0, 12, 25, 1, 40];
        for (n, j) in jitter.iter().enumerate() {
            let arrival = t0 + Duration::from_millis(20 * n as u64 + j);
            line.push(arrival, frame(n as i16));
        }
        for n in 0..jitter.len() {
            let due = t0 + Duration::from_millis(20 * n as u64) + delay - CUSHION;
            assert_eq!(line.next_release(), Some(due), "frame {n}");
            assert!(line.pop_due(due - Duration::from_millis(1)).is_none());
            assert_eq!(line.pop_due(due), Some(frame(n as i16)));
        }
        assert_eq!(line.reanchors(), 0);
    }

    /// A late first frame does not lengthen the delay: the next on-time frame pulls the
    /// anchor back to the stream's true start.
    #[test]
    fn a_late_first_frame_does_not_add_to_the_delay() {
        let t0 = Instant::now();
        let delay = Duration::from_millis(300);
        let mut line = DelayLine::new(delay, 8_000);
        line.push(t0 + Duration::from_millis(30), frame(0));
        line.push(t0 + Duration::from_millis(20), frame(1));
        line.push(t0 + Duration::from_millis(40), frame(2));
        assert!(
            line.pop_due(t0 + Duration::from_millis(30) + delay - CUSHION)
                .is_some()
        );
        assert_eq!(
            line.next_release(),
            Some(t0 + Duration::from_millis(20) + delay - CUSHION)
        );
        assert!(
            line.pop_due(t0 + Duration::from_millis(20) + delay - CUSHION)
                .is_some()
        );
        assert_eq!(
            line.next_release(),
            Some(t0 + Duration::from_millis(40) + delay - CUSHION)
        );
    }

    /// The old behaviour (release = arrival + delay) would have put frame 4 47 ms late; here
    /// a gap longer than [`MAX_LATENESS`] (DTMF: no frames for 1.4 s) moves the schedule instead,
    /// so what follows is echoed after the full delay, not at once.
    #[test]
    fn a_long_input_gap_reanchors() {
        let t0 = Instant::now();
        let delay = Duration::from_millis(500);
        let mut line = DelayLine::new(delay, 8_000);
        line.push(t0, frame(1));
        let after_gap = t0 + Duration::from_millis(1_420);
        line.push(after_gap, frame(2));
        assert_eq!(line.reanchors(), 1);
        assert_eq!(line.pop_due(t0 + delay - CUSHION), Some(frame(1)));
        assert_eq!(line.next_release(), Some(after_gap + delay - CUSHION));
    }

    /// A caller sending far faster than real time cannot grow the line past delay + 1 s.
    #[test]
    fn faster_than_real_time_is_bounded() {
        let t0 = Instant::now();
        let mut line = DelayLine::new(Duration::from_millis(500), 8_000);
        for n in 0..10_000 {
            line.push(t0, frame(n as i16));
        }
        let max = 8_000 * 1_500 / 1_000;
        assert!(line.queued_samples <= max, "{}", line.queued_samples);
        assert_eq!(
            line.dropped_samples(),
            (10_000 * FRAME - line.queued_samples) as u64
        );
    }
}
