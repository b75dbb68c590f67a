//! The echo-gated local voice activity detector (the cascade agent's barge-in detector):
//! frame energy (RMS) against an adaptive noise floor, gated by an echo reference.
//!
//! On a phone line the caller leg carries an echo of what voicegate itself plays (the hybrid
//! and the handset return it, attenuated by the echo return loss, 6 dB or more on a line
//! that meets G.168, and delayed by the round trip). Without a gate the agent would
//! interrupt itself. The gate keeps the RMS envelope of every frame that went out on the wire
//! (the played reference, one value per 20 ms frame) and of the caller leg, and measures the
//! echo path from them: the delay (0 to `echo_window_ms`) at which the caller envelope best
//! follows the reference, and the echo's gain there (least squares), both updated only while
//! the caller is not speaking and the match is clear (envelope correlation ≥ 0.7). The delay
//! is counted in stream frames: caller frame `n` is compared with the played frame `n − d`
//! (both streams are continuous, one frame per 20 ms), never by arrival order, which jitters
//! by a frame whenever Asterisk's frames and voicegate's ticks interleave unevenly. A caller
//! frame counts as speech only if it is above the noise floor and louder than the echo
//! could be: the measured gain times the loudest reference within a frame of the measured
//! delay, times a margin, or, until the path is measured, `echo_return_max` times the
//! loudest reference in the whole window. The margin is learnt with the path: the worst
//! echo frame seen over its prediction, plus 10 %, between 1.2 (1.6 dB; a clean line) and
//! 2 (6 dB; an echo that smears and wavers), rising at once and decaying slowly. The noise
//! floor adapts only while no echo can be present, so the agent's own voice never raises it.
//!
//! Sans-IO: samples in, events out, no clock (time is counted in 20 ms frames). Units: RMS in
//! slin units (0–32768), durations in ms.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use tracing::trace;

/// The detector's settings, `[agent.vad]` in the configuration (the cascade's barge-in
/// detector).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VadConfig {
    /// A frame is speech only if its RMS exceeds the noise floor by this factor (default 3.0).
    pub onset_ratio: f32,
    /// ... and this absolute RMS, slin units 0–32768 (default 400).
    pub min_rms: f32,
    /// The echo level assumed until the echo path has been measured, as a fraction of the
    /// played amplitude (default 0.5, i.e. 6 dB echo return loss, the G.168 minimum for a
    /// hybrid). Until then a caller frame no louder than this times the loudest played frame
    /// in the echo window is treated as echo; after ~0.5 s of agent speech the measured gain
    /// and delay take over.
    pub echo_return_max: f32,
    /// How late the echo may come back, ms (default 400): the played reference is searched
    /// over this window.
    pub echo_window_ms: u32,
    /// Speech needed to declare a barge-in, ms (default 200).
    pub min_speech_ms: u32,
    /// Silence that ends a speech segment, ms (default 400).
    pub hang_ms: u32,
}

impl Default for VadConfig {
    fn default() -> Self {
        VadConfig {
            onset_ratio: 3.0,
            min_rms: 400.0,
            echo_return_max: 0.5,
            echo_window_ms: 400,
            min_speech_ms: 200,
            hang_ms: 400,
        }
    }
}

/// Length of one frame, ms (callers feed 20 ms frames; shorter ones count as a frame).
const FRAME_MS: u32 = 20;

/// The noise floor never drops below this RMS, so digital silence does not make every
/// click look like speech.
const FLOOR_MIN: f32 = 20.0;

/// Frames of envelope compared when measuring the echo path (25 × 20 ms = 500 ms).
const MATCH_FRAMES: usize = 25;

/// Envelope correlation above which the caller leg is taken to be echo only.
const MATCH_CORRELATION: f32 = 0.7;

/// The bound's margin over the measured echo: at least this (1.6 dB) …
const MARGIN_MIN: f32 = 1.2;

/// … at most this (6 dB), and otherwise the worst echo frame seen over its prediction,
/// times [`MARGIN_HEADROOM`].
const MARGIN_MAX: f32 = 2.0;

/// Headroom over the worst echo frame seen, for the frames not seen yet.
const MARGIN_HEADROOM: f32 = 1.1;

/// Echo frames count towards the margin only when the predicted echo is this many times the
/// noise floor (quieter ones are mostly line noise).
const MARGIN_OVER_FLOOR: f32 = 4.0;

/// Agreeing measurements needed before the measured echo path replaces the assumed one.
const CONFIRMATIONS: u32 = 5;

/// Frames either side of the measured delay searched for the loudest reference: an echo
/// delay that is not a whole number of frames spreads over two.
const LAG_SLACK: usize = 1;

/// Played frames kept beyond the echo window, for caller frames that reach the detector late
/// (Asterisk's frames arrive in bursts on a busy line): 25 × 20 ms = 500 ms.
const LATE_FRAMES: usize = 25;

/// What one caller frame was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameVerdict {
    /// The frame is louder than the noise floor threshold and than the echo bound.
    pub(crate) speech: bool,
    /// Echo of the agent's voice may be present in this frame (the reference window holds
    /// audio loud enough to come back above the noise floor).
    pub(crate) echo_possible: bool,
    /// A state change this frame caused, if any.
    pub(crate) event: Option<VadEvent>,
}

/// A change of the detector's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VadEvent {
    /// `min_speech_ms` of caller speech accumulated: a barge-in if the agent is talking.
    SpeechStarted,
    /// `hang_ms` without speech after a start.
    SpeechEnded,
}

/// The echo path as measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct EchoPath {
    /// Delay, frames (see [`Vad::paired`]).
    lag: usize,
    /// Echo RMS over played RMS (amplitude ratio, least squares).
    gain: f32,
    /// How far above `gain` × the played RMS an echo frame may come: the worst seen over
    /// its prediction, with headroom, in [`MARGIN_MIN`, `MARGIN_MAX`].
    margin: f32,
}

/// The detector. One per call.
#[derive(Debug)]
pub(crate) struct Vad {
    cfg: VadConfig,
    floor: f32,
    /// RMS of the most recent played frames, newest last (frame number `played - 1`).
    reference: VecDeque<f32>,
    /// Played frames recorded so far.
    played: u64,
    /// RMS of the most recent caller frames, newest last; at most [`MATCH_FRAMES`].
    caller: VecDeque<f32>,
    /// Caller frames classified so far.
    heard: u64,
    /// `played` when the first caller frame came. Caller frame `c` is paired with played
    /// frame `c + base - delay`: frames are matched by their place in each stream, not by
    /// when they reached the detector, so the delay stays put while the two streams'
    /// frames interleave unevenly.
    base: u64,
    /// Largest echo delay considered, frames.
    window: usize,
    /// The measured echo path.
    path: Option<EchoPath>,
    /// The latest measurement and how many times in a row it agreed with the one before.
    candidate: Option<(EchoPath, u32)>,
    /// Leaky speech accumulator, ms: +20 per speech frame, −10 per other frame.
    score_ms: u32,
    silence_ms: u32,
    in_speech: bool,
}

impl Vad {
    /// A detector with `cfg`'s thresholds.
    pub(crate) fn new(cfg: VadConfig) -> Self {
        let window = (cfg.echo_window_ms / FRAME_MS) as usize + 1;
        Vad {
            floor: (cfg.min_rms / cfg.onset_ratio.max(1.0)).max(FLOOR_MIN),
            cfg,
            reference: VecDeque::with_capacity(Self::kept(window) + 1),
            played: 0,
            caller: VecDeque::with_capacity(MATCH_FRAMES + 1),
            heard: 0,
            base: 0,
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
    pub(crate) fn reference(&mut self, played: &[i16]) {
        if self.reference.len() == Self::kept(self.window) {
            self.reference.pop_front();
        }
        self.reference.push_back(crate::audio::rms(played));
        self.played += 1;
    }

    /// Played frames kept for an echo window of `window` frames.
    fn kept(window: usize) -> usize {
        window + MATCH_FRAMES + LAG_SLACK + LATE_FRAMES
    }

    /// The measured echo path, if any: (delay in ms, gain as an amplitude ratio). The delay
    /// counts from the played frame that was newest when the first caller frame arrived, so
    /// it includes that first frame's lateness (0–2 frames).
    #[cfg(test)]
    pub(crate) fn echo_path(&self) -> Option<(u32, f32)> {
        self.path.map(|p| (p.lag as u32 * FRAME_MS, p.gain))
    }

    /// RMS of played frame number `frame`: `None` if it is not played yet, 0 if it is older
    /// than what is kept (or before the call).
    fn played_rms(&self, frame: i64) -> Option<f32> {
        if frame >= self.played as i64 {
            return None;
        }
        Some(if frame < self.oldest() {
            0.0
        } else {
            self.reference[(frame - self.oldest()) as usize]
        })
    }

    /// Number of the oldest played frame kept in `reference`.
    fn oldest(&self) -> i64 {
        self.played as i64 - self.reference.len() as i64
    }

    /// The played frame paired with caller frame number `caller` at a delay of `lag` frames.
    fn paired(&self, caller: u64, lag: usize) -> i64 {
        (caller + self.base) as i64 - lag as i64
    }

    /// The loudest played frame among `frames` (those not played yet count as the newest
    /// one: the caller's stream is ahead, so the pairing is about to be re-measured).
    fn loudest(&self, frames: std::ops::RangeInclusive<i64>) -> f32 {
        frames
            .map(|f| {
                self.played_rms(f)
                    .unwrap_or_else(|| self.reference.back().copied().unwrap_or(0.0))
            })
            .fold(0.0, f32::max)
    }

    /// The loudest echo the line could be carrying now, RMS.
    pub(crate) fn echo_bound(&self) -> f32 {
        let Some(newest) = self.heard.checked_sub(1) else {
            return 0.0;
        };
        match self.path {
            Some(p) => self.echo_near(newest, p.lag) * (p.gain * p.margin).clamp(0.05, 1.0),
            None => {
                let window = self.paired(newest, self.window)..=self.paired(newest, 0);
                self.loudest(window) * self.cfg.echo_return_max
            }
        }
    }

    /// The loudest played frame within [`LAG_SLACK`] of caller frame `caller`'s pair at
    /// `lag`, RMS.
    fn echo_near(&self, caller: u64, lag: usize) -> f32 {
        self.loudest(
            self.paired(caller, lag + LAG_SLACK)
                ..=self.paired(caller, lag.saturating_sub(LAG_SLACK)),
        )
    }

    /// The correlation of the caller window (frames `first`…) with the played frames `lag`
    /// before them; `None` when some of those are not known or the reference is flat
    /// (silence says nothing about the path).
    fn correlation_at(&self, first: u64, lag: usize, oldest: i64) -> Option<f32> {
        let m = self.caller.len();
        // Every paired played frame must be known (played and still kept).
        let (lo, hi) = (
            self.paired(first, lag),
            self.paired(first, lag) + m as i64 - 1,
        );
        if hi >= self.played as i64 || lo < oldest {
            return None;
        }
        let r = |j: usize| self.reference[(lo - oldest) as usize + j];
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
        if var_r <= (self.floor * self.floor) * k || var_c <= 0.0 {
            return None;
        }
        Some(cov / (var_r * var_c).sqrt())
    }

    /// Re-measures the echo path from the last [`MATCH_FRAMES`] frames, if the caller leg
    /// clearly follows the reference at some delay.
    fn measure_echo_path(&mut self) {
        let m = self.caller.len();
        if m < MATCH_FRAMES {
            return;
        }
        // Caller frame numbers of the window: heard - m ..= heard - 1.
        let first = self.heard - m as u64;
        let oldest = self.oldest();
        let mut best: Option<(usize, f32)> = None;
        for lag in 0..=self.window {
            let Some(corr) = self.correlation_at(first, lag, oldest) else {
                continue;
            };
            if corr >= MATCH_CORRELATION && best.is_none_or(|(_, c)| corr > c) {
                best = Some((lag, corr));
            }
        }
        if let Some((lag, _)) = best {
            let lo = (self.paired(first, lag) - oldest) as usize;
            let (mut src, mut srr) = (0.0f32, 0.0f32);
            for j in 0..m {
                let x = self.reference[lo + j];
                src += x * self.caller[j];
                srr += x * x;
            }
            let g = (src / srr.max(1.0)).clamp(0.0, 1.0);
            // The worst echo frame over its prediction, where the echo stands out of the noise.
            let worst = (0..m)
                .filter_map(|j| {
                    let predicted = g * self.echo_near(first + j as u64, lag);
                    (predicted > MARGIN_OVER_FLOOR * self.floor).then(|| self.caller[j] / predicted)
                })
                .fold(None, |w: Option<f32>, q| Some(w.map_or(q, |w| w.max(q))));
            let margin = worst.map(|w| (w * MARGIN_HEADROOM).clamp(MARGIN_MIN, MARGIN_MAX));
            // Trust a measurement only once it has repeated: the start of a reply or a
            // burst of noise can fake one clear match.
            self.candidate = match self.candidate {
                Some((old, count))
                    if old.lag.abs_diff(lag) <= 1
                        && (g - old.gain).abs() <= 0.3 * old.gain.max(0.01) =>
                {
                    // The margin rises at once and comes down slowly.
                    let margin = margin.map_or(old.margin, |m| m.max(0.95 * old.margin + 0.05 * m));
                    let gain = 0.7 * old.gain + 0.3 * g;
                    Some((EchoPath { lag, gain, margin }, count.saturating_add(1)))
                }
                _ => Some((
                    EchoPath {
                        lag,
                        gain: g,
                        margin: margin.unwrap_or(MARGIN_MAX),
                    },
                    1,
                )),
            };
            if let Some((path, count)) = self.candidate {
                if count >= CONFIRMATIONS {
                    self.path = Some(path);
                }
            }
        }
    }

    /// The current noise floor, RMS.
    #[cfg(test)]
    pub(crate) fn noise_floor(&self) -> f32 {
        self.floor
    }

    /// The caller is speaking (between [`VadEvent::SpeechStarted`] and
    /// [`VadEvent::SpeechEnded`]).
    pub(crate) fn in_speech(&self) -> bool {
        self.in_speech
    }

    /// Classifies one caller frame (slin at the call rate, normally 20 ms).
    pub(crate) fn process(&mut self, caller: &[i16]) -> FrameVerdict {
        let level = crate::audio::rms(caller);
        if self.caller.len() == MATCH_FRAMES {
            self.caller.pop_front();
        }
        self.caller.push_back(level);
        if self.heard == 0 {
            self.base = self.played;
        }
        self.heard += 1;
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
        trace!(
            level,
            echo,
            threshold,
            floor = self.floor,
            speech,
            path = ?self.path,
            "vad frame"
        );
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

    fn fixture(name: &str) -> Vec<i16> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let r = crate::wavfile::open(&path).expect("fixture");
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
        let (starts, path, _) = run_jittered(played, gain, delay_ms, voice, voice_at_ms, None);
        (starts, path)
    }

    /// [`run`], with the caller's frames reaching the detector `jitter` late: each one
    /// 0–30 ms after the played frame of the same tick, in order, as they do when Asterisk's
    /// frames and voicegate's ticks interleave on a busy box (`jitter` seeds the delays).
    /// Also returns every echo delay the detector settled on, ms.
    fn run_jittered(
        played: &[i16],
        gain: f32,
        delay_ms: usize,
        voice: &[i16],
        voice_at_ms: usize,
        jitter: Option<u32>,
    ) -> (Vec<usize>, Option<(u32, f32)>, Vec<u32>) {
        let echo = |t: usize| {
            t.checked_sub(delay_ms * 8)
                .and_then(|j| played.get(j))
                .map_or(0.0, |&s| s as f32 * gain)
        };
        run_with(played, &echo, voice, voice_at_ms, jitter)
    }

    /// [`run_jittered`] with any echo: `echo(t)` is the echo in the caller leg at sample `t`.
    fn run_with(
        played: &[i16],
        echo: &dyn Fn(usize) -> f32,
        voice: &[i16],
        voice_at_ms: usize,
        jitter: Option<u32>,
    ) -> (Vec<usize>, Option<(u32, f32)>, Vec<u32>) {
        let mut vad = Vad::new(VadConfig::default());
        let total = played.len().max(voice_at_ms * 8 + voice.len()) + 8 * 600;
        let mut seed = 7u32;
        let line = noise(total, 60.0, &mut seed);
        let mut jitter_seed = jitter.unwrap_or(1);
        // (time in ms, 0 = played frame / 1 = caller frame, frame index, samples)
        let mut events: Vec<(u64, u8, usize, [i16; 160])> = Vec::new();
        let mut last_caller_at = 0u64;
        for (i, start) in (0..total).step_by(160).enumerate() {
            let mut out = [0i16; 160];
            let mut caller = [0i16; 160];
            for k in 0..160 {
                let t = start + k;
                out[k] = played.get(t).copied().unwrap_or(0);
                let echo = echo(t);
                let v = t
                    .checked_sub(voice_at_ms * 8)
                    .and_then(|j| voice.get(j))
                    .map_or(0.0, |&s| s as f32);
                caller[k] = (echo + v + line.get(t).copied().unwrap_or(0) as f32)
                    .clamp(-32768.0, 32767.0) as i16;
            }
            let tick = i as u64 * 20;
            let late = if jitter.is_some() {
                jitter_seed ^= jitter_seed << 13;
                jitter_seed ^= jitter_seed >> 17;
                jitter_seed ^= jitter_seed << 5;
                (jitter_seed % 31) as u64
            } else {
                1
            };
            last_caller_at = (tick + late).max(last_caller_at);
            events.push((tick, 0, i, out));
            events.push((last_caller_at, 1, i, caller));
        }
        events.sort_by_key(|&(at, kind, i, _)| (at, kind, i));
        let mut starts = Vec::new();
        let mut delays = Vec::new();
        for (_, kind, i, samples) in &events {
            if *kind == 0 {
                vad.reference(samples);
                continue;
            }
            if vad.process(samples).event == Some(VadEvent::SpeechStarted) {
                starts.push(*i);
            }
            if let Some((d, _)) = vad.echo_path() {
                if delays.last() != Some(&d) {
                    delays.push(d);
                }
            }
            if played.len() > i * 160 {
                // The agent's own voice never raises the floor.
                assert!(vad.noise_floor() < 300.0, "floor {}", vad.noise_floor());
            }
        }
        (starts, vad.echo_path(), delays)
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

    #[test]
    fn barge_in_over_the_echo_survives_frame_jitter() {
        // The caller's frames and the played frames interleave unevenly (0–30 ms), and the
        // echo delay is not a whole number of frames: the caller is still heard, every time.
        let played = fixture("invalid.wav");
        let voice = fixture("auth-thankyou.wav");
        // The caller starts 1 s after the first audible frame of the reply.
        let first = played
            .chunks(160)
            .position(|f| crate::audio::rms(f) > 64.0)
            .unwrap();
        let mut missed = Vec::new();
        for jitter in 1..=12u32 {
            for delay in [100, 110] {
                for phase in [0, 5, 10, 15] {
                    let at = first * 20 + 1000 + phase;
                    let (starts, ..) = run_jittered(&played, 0.3, delay, &voice, at, Some(jitter));
                    if starts.len() != 1 || !(at / 20..at / 20 + 30).contains(&starts[0]) {
                        missed.push((jitter, delay, at, starts));
                    }
                }
            }
        }
        assert!(
            missed.is_empty(),
            "{} of 96 missed: {missed:?}",
            missed.len()
        );
    }

    #[test]
    fn echo_with_frame_jitter_is_not_speech() {
        let played = fixture("invalid.wav");
        for jitter in 1..=12u32 {
            for (gain, delay) in [(0.35, 150), (0.3, 110), (0.5, 60)] {
                let (starts, ..) = run_jittered(&played, gain, delay, &[], 0, Some(jitter));
                assert!(
                    starts.is_empty(),
                    "jitter {jitter} gain {gain} delay {delay}: {starts:?}"
                );
            }
        }
    }

    #[test]
    fn echo_delay_follows_the_streams_not_the_arrival_order() {
        // The echo is 100 ms (5 frames) late in the streams; the caller's frames reach the
        // detector 0–30 ms after the played frame of their tick. The measured delay must not
        // flip between 5 and 6 frames with each arrival.
        let played = fixture("invalid.wav");
        for jitter in 1..=12u32 {
            let (_, path, delays) = run_jittered(&played, 0.3, 100, &[], 0, Some(jitter));
            let (d, g) = path.expect("echo path measured");
            assert_eq!(delays.len(), 1, "jitter {jitter}: settled on {delays:?} ms");
            // The pairing is anchored on the first caller frame's arrival, 0–30 ms late.
            assert!((100..=140).contains(&d), "jitter {jitter}: delay {d} ms");
            assert!((g - 0.3).abs() < 0.03, "jitter {jitter}: gain {g}");
        }
    }

    #[test]
    fn a_smeared_wavering_echo_is_not_speech() {
        // Not a clean copy: the echo is spread over 30 ms (three taps) and its gain wavers
        // by ±45 % every 0.4 s (a handset's level control pumping), so the envelope only
        // roughly follows the played one. The margin widens to fit it (a fixed 1.2 × the
        // measured echo lets this echo through as speech).
        let played = fixture("invalid.wav");
        let taps = [(90usize, 0.2f32), (105, 0.15), (120, 0.1)];
        let echo = |t: usize| {
            let wobble = 1.0 + 0.45 * (t as f32 / 8_000.0 * std::f32::consts::TAU / 0.4).sin();
            taps.iter()
                .filter_map(|&(d, g)| {
                    t.checked_sub(d * 8)
                        .and_then(|j| played.get(j))
                        .map(|&s| s as f32 * g)
                })
                .sum::<f32>()
                * wobble
        };
        for jitter in 1..=6u32 {
            let (starts, path, _) = run_with(&played, &echo, &[], 0, Some(jitter));
            assert!(starts.is_empty(), "jitter {jitter}: {starts:?} ({path:?})");
        }
        // And a caller talking over it is still heard.
        let voice = fixture("hello-world.wav");
        let (starts, ..) = run_with(&played, &echo, &voice, 1500, Some(1));
        assert_eq!(starts.len(), 1, "{starts:?}");
        assert!((75..75 + 30).contains(&starts[0]), "{starts:?}");
    }
}
