//! Per-call limits and detectors the call core applies, each a small sans-IO type with `now`
//! passed in: the DTMF de-duplication between ARI and AudioSocket, the DTMF rate gate, the
//! caller-audio meter against real time, and the voiced-frame test.

use super::session::{CallSummary, DTMF_BURST, DTMF_RATE_PER_S, MAX_DTMF_KEPT};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Mean absolute slin amplitude above which a caller frame counts as speech (about
/// -40 dBFS), for the agent-silence timer and turn latencies.
const VOICED_MEAN_ABS: u32 = 330;

/// Whether a slin little-endian frame holds speech rather than silence or line noise.
pub(crate) fn is_voiced(payload: &[u8]) -> bool {
    let n = payload.len() / 2;
    if n == 0 {
        return false;
    }
    let sum: u32 = payload
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]).unsigned_abs() as u32)
        .sum();
    sum / n as u32 > VOICED_MEAN_ABS
}

/// Drops the second copy of a DTMF digit that arrives from both sources of a Stasis call:
/// ARI `ChannelDtmfReceived` and AudioSocket `0x03` through the bridge (the same key press
/// seen twice). A digit repeated from the same source is a new key press and always passes.
#[derive(Debug, Default)]
pub(crate) struct DtmfDedup {
    /// Last digit, whether it came from ARI, when.
    last: Option<(char, bool, Instant)>,
}

impl DtmfDedup {
    /// Two copies of one key press arrive within this of each other.
    pub(crate) const WINDOW: Duration = Duration::from_millis(1_000);

    /// True if `digit` from this source, arriving at `now`, is the other source's copy of
    /// the last digit.
    pub(crate) fn duplicate(&mut self, digit: char, from_ari: bool, now: Instant) -> bool {
        if let Some((d, src, at)) = self.last {
            if d == digit && src != from_ari && now.duration_since(at) <= Self::WINDOW {
                self.last = None;
                return true;
            }
        }
        self.last = Some((digit, from_ari, now));
        false
    }
}

/// Lets a digit through [`DtmfGate`] and keeps it in the summary (up to [`MAX_DTMF_KEPT`]);
/// false when it is dropped for the rate. Digits are logged at debug; floods as one WARN
/// line at the first drop and a count in the summary and `voicegate_dtmf_dropped_total`.
pub(crate) fn keep_dtmf(gate: &mut DtmfGate, s: &mut CallSummary, d: char, now: Instant) -> bool {
    let reason = if !gate.admit(now) {
        "rate"
    } else if s.dtmf.len() >= MAX_DTMF_KEPT {
        "per_call"
    } else {
        debug!(digit = %d, "dtmf");
        s.dtmf.push(d);
        return true;
    };
    if s.dtmf_dropped == 0 {
        warn!(
            reason,
            "DTMF beyond the per-call bounds; further digits are only counted"
        );
    }
    s.dtmf_dropped += 1;
    metrics::counter!(crate::health::metrics::DTMF_DROPPED, "reason" => reason).increment(1);
    // Past the per-call limit a digit still reaches the agent; past the rate it does not.
    reason == "per_call"
}

/// Token bucket for DTMF digits: [`DTMF_BURST`] at once, then [`DTMF_RATE_PER_S`].
#[derive(Debug)]
pub(crate) struct DtmfGate {
    /// Tokens in thousandths of a digit.
    milli_tokens: u64,
    at: Instant,
}

impl DtmfGate {
    pub(crate) fn new(now: Instant) -> Self {
        DtmfGate {
            milli_tokens: DTMF_BURST as u64 * 1000,
            at: now,
        }
    }

    pub(crate) fn admit(&mut self, now: Instant) -> bool {
        let elapsed_ms = now.saturating_duration_since(self.at).as_millis() as u64;
        self.at = now;
        self.milli_tokens =
            (self.milli_tokens + elapsed_ms * DTMF_RATE_PER_S as u64).min(DTMF_BURST as u64 * 1000);
        if self.milli_tokens >= 1000 {
            self.milli_tokens -= 1000;
            true
        } else {
            false
        }
    }
}

/// Meters caller audio against real time: a token bucket of audio time, refilled by wall
/// time and holding at most the allowance. A frame that would overdraw it is dropped.
#[derive(Debug)]
pub(crate) struct InputMeter {
    /// Audio time that may still arrive ahead of real time, µs.
    credit_us: u64,
    cap_us: u64,
    at: Instant,
}

impl InputMeter {
    pub(crate) fn new(allowance: Duration, now: Instant) -> Self {
        let cap_us = allowance.as_micros() as u64;
        InputMeter {
            credit_us: cap_us,
            cap_us,
            at: now,
        }
    }

    /// Whether a frame of `samples` at `rate_hz` arriving at `now` is within real time plus
    /// the allowance; it is charged when it is.
    pub(crate) fn admit(&mut self, samples: usize, rate_hz: u32, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_micros() as u64;
        self.at = now;
        self.credit_us = (self.credit_us + elapsed).min(self.cap_us);
        let cost = samples as u64 * 1_000_000 / rate_hz.max(1) as u64;
        if cost > self.credit_us {
            return false;
        }
        self.credit_us -= cost;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_faster_than_real_time_is_cut_to_the_allowance() {
        let t = Instant::now();
        let mut m = InputMeter::new(Duration::from_millis(200), t);
        // Real time (a 20 ms frame every 20 ms) always passes, for an hour.
        for i in 1..=180_000u64 {
            assert!(m.admit(160, 8000, t + Duration::from_millis(20 * i)));
        }
        // A burst after a stall: the allowance (10 frames), then nothing until time passes.
        let t2 = t + Duration::from_secs(4_000);
        let passed = (0..1000).filter(|_| m.admit(160, 8000, t2)).count();
        assert_eq!(passed, 10);
        assert!(m.admit(160, 8000, t2 + Duration::from_millis(20)));
        assert!(!m.admit(160, 8000, t2 + Duration::from_millis(20)));
        // The cost is audio time, not frames: one 1 s frame at 192 kHz costs 1 s.
        let mut m = InputMeter::new(Duration::from_millis(1000), t);
        assert!(m.admit(192_000, 192_000, t));
        assert!(!m.admit(192, 192_000, t));
    }

    #[test]
    fn dtmf_gate_allows_a_keypad_and_cuts_a_flood() {
        let t = Instant::now();
        let mut g = DtmfGate::new(t);
        // A fast human: 10 digits per second for a minute.
        for i in 0..600u64 {
            assert!(g.admit(t + Duration::from_millis(100 * i)));
        }
        // A flood: 10 000 digits in one second pass at most burst + rate.
        let t2 = t + Duration::from_secs(100);
        let passed = (0..10_000u64)
            .filter(|i| g.admit(t2 + Duration::from_micros(100 * i)))
            .count() as u32;
        assert!(passed <= DTMF_BURST + DTMF_RATE_PER_S, "{passed}");
        assert!(passed >= DTMF_BURST, "{passed}");
    }

    #[test]
    fn dtmf_seen_by_both_sources_counts_once() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut d = DtmfDedup::default();
        assert!(!d.duplicate('5', true, ms(0)));
        assert!(
            d.duplicate('5', false, ms(300)),
            "0x03 copy of an ARI digit"
        );
        assert!(
            !d.duplicate('5', false, ms(900)),
            "a second press of the same key"
        );
        assert!(
            !d.duplicate('5', false, ms(1_200)),
            "same source again: a new press"
        );
        assert!(!d.duplicate('5', true, ms(2_500)), "too late to be a copy");
        assert!(!d.duplicate('6', false, ms(2_600)), "another key");
    }
}
