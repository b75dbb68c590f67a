//! The cascade's local voice activity detector for barge-in: frame energy (RMS) against an
//! adaptive noise floor, gated by an echo reference.
//!
//! On a phone line the caller leg carries an echo of what voicegate itself plays (the hybrid
//! and the handset return it, attenuated by the echo return loss, 6 dB or more on a line
//! that meets G.168, and delayed by the round trip). Without a gate the agent would
//! interrupt itself. The gate keeps the RMS envelope of every frame that went out on the wire
//! (the played reference, one value per 20 ms frame) and of the caller leg, and measures the
//! echo path from them: the delay (0 to `echo_window_ms`) at which the caller envelope best
//! follows the reference, and the echo's gain there (least squares), both updated only while
//! the caller is not speaking and the match is clear (envelope correlation ≥ 0.7). A caller
//! frame counts as speech only if it is above the noise floor and louder than the echo
//! could be: 1.5 × the measured gain times the reference around the measured delay, or,
//! until the path is measured, `echo_return_max` times the loudest reference in the whole
//! window. The noise floor adapts only while no echo can be present, so the agent's own
//! voice never raises it.
//!
//! Sans-IO: samples in, events out, no clock (time is counted in 20 ms frames). Units: RMS in
//! slin units (0–32768), durations in ms.

use super::config::VadConfig;
use std::collections::VecDeque;

/// Length of one frame, ms (callers feed 20 ms frames; shorter ones count as a frame).
const FRAME_MS: u32 = 20;

/// The noise floor never drops below this RMS, so digital silence does not make every
/// click look like speech.
const FLOOR_MIN: f32 = 20.0;

/// Frames of envelope compared when measuring the echo path (25 × 20 ms = 500 ms).
const MATCH_FRAMES: usize = 25;

/// Envelope correlation above which the caller leg is taken to be echo only.
const MATCH_CORRELATION: f32 = 0.7;

/// The measured echo gain is multiplied by this for the bound (3.5 dB of margin).
const GAIN_MARGIN: f32 = 1.5;

/// Agreeing measurements needed before the measured echo path replaces the assumed one.
const CONFIRMATIONS: u32 = 5;

/// Frames either side of the measured delay searched for the loudest reference (jitter).
const LAG_SLACK: usize = 1;

/// What one caller frame was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameVerdict {
    /// The frame is louder than the noise floor threshold and than the echo bound.
    pub speech: bool,
    /// Echo of the agent's voice may be present in this frame (the reference window holds
    /// audio loud enough to come back above the noise floor).
    pub echo_possible: bool,
    /// A state change this frame caused, if any.
    pub event: Option<VadEvent>,
}

/// A change of the detector's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VadEvent {
    /// `min_speech_ms` of caller speech accumulated: a barge-in if the agent is talking.
    SpeechStarted,
    /// `hang_ms` without speech after a start.
    SpeechEnded,
}

/// The detector. One per call.
#[derive(Debug)]
pub struct Vad {
    cfg: VadConfig,
    floor: f32,
    /// RMS of the most recent played frames, newest last.
    reference: VecDeque<f32>,
    /// RMS of the most recent caller frames, newest last; at most [`MATCH_FRAMES`].
    caller: VecDeque<f32>,
    /// Largest echo delay considered, frames.
    window: usize,
    /// The measured echo path: (delay in frames, gain).
    path: Option<(usize, f32)>,
    /// The latest measurement and how many times in a row it agreed with the one before.
    candidate: Option<(usize, f32, u32)>,
    /// Leaky speech accumulator, ms: +20 per speech frame, −10 per other frame.
    score_ms: u32,
    silence_ms: u32,
    in_speech: bool,
}

impl Vad {
    /// A detector with `cfg`'s thresholds.
    pub fn new(cfg: VadConfig) -> Self {
        let window = (cfg.echo_window_ms / FRAME_MS) as usize + 1;
        Vad {
            floor: (cfg.min_rms / cfg.onset_ratio.max(1.0)).max(FLOOR_MIN),
            cfg,
            reference: VecDeque::with_capacity(window + MATCH_FRAMES + LAG_SLACK + 1),
            caller: VecDeque::with_capacity(MATCH_FRAMES + 1),
            window,
            path: None,
            candidate: None,
            score_ms: 0,
            silence_ms: 0,
            in_speech: false,
        }
    }

    /// Records one frame as it went out on the wire (slin at the call rate, silence included,
    /// in order, one call per 20 ms frame).
    pub fn reference(&mut self, played: &[i16]) {
        if self.reference.len() == self.window + MATCH_FRAMES + LAG_SLACK {
            self.reference.pop_front();
        }
        self.reference.push_back(crate::audio::rms(played));
    }

    /// The measured echo path, if any: (delay in ms, gain as an amplitude ratio).
    pub fn echo_path(&self) -> Option<(u32, f32)> {
        self.path.map(|(lag, g)| (lag as u32 * FRAME_MS, g))
    }

    /// Reference RMS `lag` frames before the newest one (0 if unknown).
    fn reference_at(&self, lag: usize) -> f32 {
        let n = self.reference.len();
        if lag < n {
            self.reference[n - 1 - lag]
        } else {
            0.0
        }
    }

    /// The loudest echo the line could be carrying now, RMS.
    pub fn echo_bound(&self) -> f32 {
        match self.path {
            Some((lag, gain)) => {
                let near = (lag.saturating_sub(LAG_SLACK)..=lag + LAG_SLACK)
                    .map(|l| self.reference_at(l))
                    .fold(0.0, f32::max);
                near * (gain * GAIN_MARGIN).clamp(0.05, 1.0)
            }
            None => {
                (0..=self.window)
                    .map(|l| self.reference_at(l))
                    .fold(0.0, f32::max)
                    * self.cfg.echo_return_max
            }
        }
    }

    /// Re-measures the echo path from the last [`MATCH_FRAMES`] frames, if the caller leg
    /// clearly follows the reference at some delay.
    fn measure_echo_path(&mut self) {
        let m = self.caller.len();
        if m < MATCH_FRAMES {
            return;
        }
        let n = self.reference.len();
        let mut best: Option<(usize, f32)> = None;
        for lag in 0..=self.window {
            if n < m + lag {
                break;
            }
            let r = |j: usize| self.reference[n - m - lag + j];
            let (mut sr, mut sc, mut srr, mut scc, mut src) = (0.0f32, 0.0, 0.0, 0.0, 0.0);
            for j in 0..m {
                let (x, y) = (r(j), self.caller[j]);
                sr += x;
                sc += y;
                srr += x * x;
                scc += y * y;
                src += x * y;
            }
            let k = m as f32;
            let cov = src - sr * sc / k;
            let var_r = srr - sr * sr / k;
            let var_c = scc - sc * sc / k;
            // A flat reference (silence) says nothing about the path.
            if var_r <= (self.floor * self.floor) * k || var_c <= 0.0 {
                continue;
            }
            let corr = cov / (var_r * var_c).sqrt();
            if corr >= MATCH_CORRELATION && best.is_none_or(|(_, c)| corr > c) {
                best = Some((lag, corr));
            }
        }
        if let Some((lag, _)) = best {
            let (mut src, mut srr) = (0.0f32, 0.0f32);
            for j in 0..m {
                let x = self.reference[n - m - lag + j];
                src += x * self.caller[j];
                srr += x * x;
            }
            let g = (src / srr.max(1.0)).clamp(0.0, 1.0);
            // Trust a measurement only once it has repeated: the start of a reply or a
            // burst of noise can fake one clear match.
            self.candidate = match self.candidate {
                Some((l, old, count))
                    if l.abs_diff(lag) <= 1 && (g - old).abs() <= 0.3 * old.max(0.01) =>
                {
                    Some((lag, 0.7 * old + 0.3 * g, count.saturating_add(1)))
                }
                _ => Some((lag, g, 1)),
            };
            if let Some((l, gain, count)) = self.candidate {
                if count >= CONFIRMATIONS {
                    self.path = Some((l, gain));
                }
            }
        }
    }

    /// The current noise floor, RMS.
    pub fn noise_floor(&self) -> f32 {
        self.floor
    }

    /// The caller is speaking (between [`VadEvent::SpeechStarted`] and
    /// [`VadEvent::SpeechEnded`]).
    pub fn in_speech(&self) -> bool {
        self.in_speech
    }

    /// Classifies one caller frame (slin at the call rate, normally 20 ms).
    pub fn process(&mut self, caller: &[i16]) -> FrameVerdict {
        let level = crate::audio::rms(caller);
        if self.caller.len() == MATCH_FRAMES {
            self.caller.pop_front();
        }
        self.caller.push_back(level);
        let echo = self.echo_bound();
        let threshold = (self.floor * self.cfg.onset_ratio).max(self.cfg.min_rms);
        let speech = level > threshold && level > echo;
        let echo_possible = echo > self.floor;
        if !speech && !echo_possible {
            // Track the floor: down quickly, up slowly; never from frames that may hold echo.
            let a = if level < self.floor { 0.2 } else { 0.005 };
            self.floor = (self.floor * (1.0 - a) + level * a).max(FLOOR_MIN);
        }
        // Measure only while the caller is quiet: their voice would inflate the gain.
        if !speech && !self.in_speech && self.score_ms == 0 && echo_possible {
            self.measure_echo_path();
        }
        let mut event = None;
        if speech {
            self.score_ms = (self.score_ms + FRAME_MS).min(self.cfg.min_speech_ms.max(FRAME_MS));
            self.silence_ms = 0;
        } else {
            self.score_ms = self.score_ms.saturating_sub(FRAME_MS / 2);
            self.silence_ms += FRAME_MS;
        }
        if !self.in_speech && speech && self.score_ms >= self.cfg.min_speech_ms {
            self.in_speech = true;
            event = Some(VadEvent::SpeechStarted);
        } else if self.in_speech && self.silence_ms >= self.cfg.hang_ms {
            self.in_speech = false;
            self.score_ms = 0;
            event = Some(VadEvent::SpeechEnded);
        }
        FrameVerdict {
            speech,
            echo_possible,
            event,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::wav::Recording;

    fn fixture(name: &str) -> Vec<i16> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let r = Recording::open(&path).expect("fixture");
        assert_eq!(r.rate_hz, 8_000);
        r.samples
    }

    /// Deterministic low-level line noise (xorshift), RMS about `level`.
    fn noise(n: usize, level: f32, seed: &mut u32) -> Vec<i16> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 17;
                *seed ^= *seed << 5;
                ((*seed as f32 / u32::MAX as f32 - 0.5) * level * 3.4) as i16
            })
            .collect()
    }

    /// Runs a call: `played` goes out, the caller leg carries `gain` × `played` delayed by
    /// `delay_ms`, plus `voice` starting at `voice_at_ms`, plus noise. Returns the frame
    /// index of each SpeechStarted.
    fn run(
        played: &[i16],
        gain: f32,
        delay_ms: usize,
        voice: &[i16],
        voice_at_ms: usize,
    ) -> (Vec<usize>, Option<(u32, f32)>) {
        let mut vad = Vad::new(VadConfig::default());
        let total = played.len().max(voice_at_ms * 8 + voice.len()) + 8 * 600;
        let mut seed = 7u32;
        let line = noise(total, 60.0, &mut seed);
        let mut starts = Vec::new();
        for (i, start) in (0..total).step_by(160).enumerate() {
            let mut out = [0i16; 160];
            let mut caller = [0i16; 160];
            for k in 0..160 {
                let t = start + k;
                out[k] = played.get(t).copied().unwrap_or(0);
                let echo = t
                    .checked_sub(delay_ms * 8)
                    .and_then(|j| played.get(j))
                    .map_or(0.0, |&s| s as f32 * gain);
                let v = t
                    .checked_sub(voice_at_ms * 8)
                    .and_then(|j| voice.get(j))
                    .map_or(0.0, |&s| s as f32);
                caller[k] = (echo + v + line.get(t).copied().unwrap_or(0) as f32)
                    .clamp(-32768.0, 32767.0) as i16;
            }
            vad.reference(&out);
            if vad.process(&caller).event == Some(VadEvent::SpeechStarted) {
                starts.push(i);
            }
            if played.len() > start {
                // The agent's own voice never raises the floor.
                assert!(vad.noise_floor() < 300.0, "floor {}", vad.noise_floor());
            }
        }
        (starts, vad.echo_path())
    }

    #[test]
    fn caller_speech_in_line_noise_starts_speech() {
        let (starts, _) = run(&[], 0.0, 0, &fixture("hello-world.wav"), 300);
        assert_eq!(starts.len(), 1, "{starts:?}");
        // Within the first half second of the recording.
        assert!((15..15 + 25).contains(&starts[0]), "{starts:?}");
    }

    #[test]
    fn echo_of_the_agents_voice_is_not_speech() {
        let played = fixture("invalid.wav");
        for (gain, delay) in [(0.3, 120), (0.5, 60), (0.4, 300), (0.2, 0)] {
            let (starts, path) = run(&played, gain, delay, &[], 0);
            assert!(starts.is_empty(), "gain {gain} delay {delay}: {starts:?}");
            // The echo path was measured: delay within a frame, gain within 30 %.
            let (d, g) = path.expect("echo path measured");
            assert!(
                (d as i64 - delay as i64).abs() <= 20,
                "delay {d} for {delay}"
            );
            assert!((g - gain).abs() <= gain * 0.3, "gain {g} for {gain}");
        }
    }

    #[test]
    fn caller_talking_over_the_echo_is_speech() {
        let played = fixture("invalid.wav");
        let voice = fixture("hello-world.wav");
        let (starts, _) = run(&played, 0.3, 120, &voice, 1500);
        assert_eq!(starts.len(), 1, "{starts:?}");
        // 1500 ms = frame 75; detected within 600 ms of the caller starting.
        assert!((75..75 + 30).contains(&starts[0]), "{starts:?}");
    }

    #[test]
    fn speech_ends_after_hang_time() {
        let mut vad = Vad::new(VadConfig::default());
        let loud = [3000i16, -3000].repeat(80);
        let mut events = Vec::new();
        for _ in 0..20 {
            events.extend(vad.process(&loud).event);
        }
        for _ in 0..30 {
            events.extend(vad.process(&[0; 160]).event);
        }
        assert_eq!(events, vec![VadEvent::SpeechStarted, VadEvent::SpeechEnded]);
    }

    #[test]
    fn quiet_caller_over_a_measured_echo_is_speech() {
        // "Thank you." is quieter than the agent's prompt; once the echo path is measured
        // the gate is tight enough to let it through.
        let played = fixture("invalid.wav");
        let voice = fixture("auth-thankyou.wav");
        let (starts, _) = run(&played, 0.3, 100, &voice, 1000);
        assert_eq!(starts.len(), 1, "{starts:?}");
        assert!((50..50 + 30).contains(&starts[0]), "{starts:?}");
    }
}
