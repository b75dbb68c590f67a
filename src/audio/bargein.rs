//! Local barge-in: pause at once on the caller's voice, then confirm or resume.
//!
//! A speech-to-speech provider hears the caller late: OpenAI's server VAD needs
//! `prefix_padding_ms` of speech (300 ms by default) before `input_audio_buffer.speech_started`
//! comes back, ElevenLabs' `interruption` is as late. [`BargeIn`] runs the echo-gated
//! [`Vad`] on the caller leg of every call whose agent speaks, with the frames that went out
//! on the wire as its echo reference, and says [`Action::Pause`] after `detect_ms` of caller
//! speech over the agent's voice: the call holds its playout (nothing is thrown away). Then:
//!
//! - the provider confirms ([`BargeIn::provider_started`]: its own barge-in event; or
//!   [`BargeIn::caller_text`]: words of the caller that are not a backchannel) within
//!   `confirm_ms` → [`Action::Flush`]: the call flushes and tells the provider what was heard;
//! - nothing confirms by then (a cough, a door, a "mm-hm") → [`Action::Resume`]: playback goes
//!   on where it paused, and the call counts a false barge-in.
//!
//! When backchannels are configured, the provider's event alone does not flush a pause: the
//! caller's words decide (a backchannel resumes, anything else flushes), and if no words
//! come within the window the provider's event flushes at its end.
//!
//! Sans-IO: samples and `now` (a value) in, actions out.

use crate::audio::vad::{Vad, VadConfig, VadEvent};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::time::Instant;

/// `[agent.barge_in]`: local barge-in for the agent (OpenAI Realtime, ElevenLabs Agents, the
/// cascade). Defaults work on a G.711 line with an echo of 6 dB return loss or more.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BargeInConfig {
    /// Pause the agent locally on the caller's voice (default true). Off: only the
    /// provider's own barge-in event stops playback, as before.
    pub enabled: bool,
    /// Caller speech over the agent needed to pause, ms (default 60; the sensitivity in
    /// time: lower pauses sooner and on shorter noises, which then resume).
    pub detect_ms: u32,
    /// A frame is speech only above this RMS, slin units 0–32768 (default 300; the
    /// sensitivity in level: about −40 dBFS).
    pub min_rms: f32,
    /// ... and this factor over the line's noise floor (default 3.0).
    pub onset_ratio: f32,
    /// The echo margin: until the echo path is measured (about 0.5 s of agent speech), a
    /// caller frame no louder than this times the loudest frame played in the echo window
    /// is taken for echo (default 0.6, i.e. 4.4 dB return loss: a G.168 hybrid's 6 dB with
    /// headroom). After that the measured echo path with its own learnt margin decides.
    pub echo_return_max: f32,
    /// How late the echo may come back, ms (default 400).
    pub echo_window_ms: u32,
    /// How long a pause waits for the provider's confirmation, ms (default 700); then
    /// playback resumes and a false barge-in is counted.
    pub confirm_ms: u32,
    /// Caller words that never interrupt (default none; e.g. `["uh-huh", "mm-hm", "ok",
    /// "так", "ага"]`). Compared case-blind on the whole transcript without punctuation; a
    /// transcript made only of these words resumes a pause.
    pub backchannels: Vec<String>,
}

impl Default for BargeInConfig {
    fn default() -> Self {
        BargeInConfig {
            enabled: true,
            detect_ms: 60,
            min_rms: 300.0,
            onset_ratio: 3.0,
            echo_return_max: 0.6,
            echo_window_ms: 400,
            confirm_ms: 700,
            backchannels: Vec::new(),
        }
    }
}

impl BargeInConfig {
    /// Checks ranges; `key` is the table's dotted key (`agent.barge_in`).
    ///
    /// # Errors
    /// [`crate::error::ConfigError::Invalid`] naming the bad key.
    pub(crate) fn validate(&self, key: &str) -> Result<(), crate::error::ConfigError> {
        let bad =
            |k: &str, m: &str| Err(crate::error::ConfigError::invalid(&format!("{key}.{k}"), m));
        if !(20..=1_000).contains(&self.detect_ms) {
            return bad("detect_ms", "must be 20 to 1000");
        }
        if self.min_rms.is_nan() || self.min_rms <= 0.0 || self.min_rms >= 32_768.0 {
            return bad("min_rms", "must be above 0 and below 32768");
        }
        if self.onset_ratio.is_nan() || self.onset_ratio < 1.0 {
            return bad("onset_ratio", "must be at least 1.0");
        }
        if !(0.0..=1.0).contains(&self.echo_return_max) {
            return bad("echo_return_max", "must be 0.0 to 1.0");
        }
        if self.echo_window_ms > 2_000 {
            return bad("echo_window_ms", "must be at most 2000");
        }
        if !(100..=5_000).contains(&self.confirm_ms) {
            return bad("confirm_ms", "must be 100 to 5000");
        }
        Ok(())
    }

    /// [`Self::confirm_ms`] as a duration.
    pub(crate) fn confirm(&self) -> Duration {
        Duration::from_millis(self.confirm_ms.into())
    }

    /// Whether `text` is only backchannel words ([`Self::backchannels`]); empty text is not.
    pub fn is_backchannel(&self, text: &str) -> bool {
        let norm = normalize(text);
        if norm.is_empty() || self.backchannels.is_empty() {
            return false;
        }
        let phrases: Vec<String> = self.backchannels.iter().map(|b| normalize(b)).collect();
        if phrases.contains(&norm) {
            return true;
        }
        norm.split(' ').all(|w| phrases.iter().any(|p| p == w))
    }

    fn vad(&self) -> VadConfig {
        VadConfig {
            onset_ratio: self.onset_ratio,
            min_rms: self.min_rms,
            echo_return_max: self.echo_return_max,
            echo_window_ms: self.echo_window_ms,
            min_speech_ms: self.detect_ms,
            hang_ms: 300,
        }
    }
}

/// Lower case, letters, digits and inner hyphens/apostrophes only, one space between words.
fn normalize(text: &str) -> String {
    text.to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '\''))
        .map(|w| w.trim_matches(|c| c == '-' || c == '\''))
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// What the call does with its playout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Hold playout now (silence from the next frame on, nothing thrown away).
    Pause,
    /// Confirmed: flush the playout and tell the provider what was heard.
    Flush,
    /// Not confirmed: play on from where it paused. `backchannel`: the caller's words were a
    /// backchannel (not counted as a false barge-in).
    Resume {
        /// The pause ended on a backchannel, not on the window running out.
        backchannel: bool,
    },
}

#[derive(Debug, Clone, Copy)]
enum State {
    Idle,
    Paused {
        deadline: Instant,
        /// The provider's barge-in event came (backchannels configured: waiting for words).
        provider: bool,
    },
}

/// One call's local barge-in detector and its pause; see the module docs.
#[derive(Debug)]
pub(crate) struct BargeIn {
    cfg: BargeInConfig,
    vad: Vad,
    state: State,
    /// When the current run of caller speech began (the start of its first speech frame).
    onset: Option<Instant>,
    /// Caller frames since the last speech frame.
    quiet_frames: u32,
}

/// Non-speech frames that end a run of speech for the onset estimate (100 ms).
const ONSET_RESET_FRAMES: u32 = 5;

impl BargeIn {
    /// A detector with `cfg`'s settings.
    pub(crate) fn new(cfg: BargeInConfig) -> Self {
        BargeIn {
            vad: Vad::new(cfg.vad()),
            cfg,
            state: State::Idle,
            onset: None,
            quiet_frames: ONSET_RESET_FRAMES,
        }
    }

    /// Records one frame as it went out on the wire (slin at the call rate, silence
    /// included, one per 20 ms tick): the echo reference.
    pub(crate) fn reference(&mut self, played: &[i16]) {
        self.vad.reference(played);
    }

    /// A caller frame (slin at the call rate, normally 20 ms) that arrived at `now` and was
    /// recorded from `began`; `agent_audible`: the agent's audio is playing (queued and not
    /// paused). Says [`Action::Pause`] when the caller has spoken `detect_ms` over it.
    pub(crate) fn caller(
        &mut self,
        now: Instant,
        began: Instant,
        samples: &[i16],
        agent_audible: bool,
    ) -> Option<Action> {
        let v = self.vad.process(samples);
        if v.speech {
            if self.quiet_frames >= ONSET_RESET_FRAMES {
                self.onset = Some(began);
            }
            self.quiet_frames = 0;
        } else {
            self.quiet_frames = self.quiet_frames.saturating_add(1);
        }
        if v.event == Some(VadEvent::SpeechStarted)
            && agent_audible
            && matches!(self.state, State::Idle)
        {
            self.state = State::Paused {
                deadline: now + self.cfg.confirm(),
                provider: false,
            };
            return Some(Action::Pause);
        }
        None
    }

    /// When the current run of caller speech began (the start of its first speech frame), if the caller is speaking or spoke within the last 100 ms.
    pub(crate) fn onset(&self) -> Option<Instant> {
        self.onset
            .filter(|_| self.quiet_frames < ONSET_RESET_FRAMES || self.vad.in_speech())
    }

    /// Playout is held, waiting for confirmation.
    pub(crate) fn is_paused(&self) -> bool {
        matches!(self.state, State::Paused { .. })
    }

    /// The provider's own barge-in event (OpenAI `input_audio_buffer.speech_started`,
    /// ElevenLabs `interruption`, the cascade's STT words). [`Action::Flush`], except while
    /// paused with backchannels configured: then `None`, and the caller's words (or the end
    /// of the window) decide.
    pub(crate) fn provider_started(&mut self) -> Option<Action> {
        match &mut self.state {
            State::Paused { provider, .. } if !self.cfg.backchannels.is_empty() => {
                *provider = true;
                None
            }
            _ => {
                self.state = State::Idle;
                Some(Action::Flush)
            }
        }
    }

    /// The caller's transcript `text`: while paused, a backchannel resumes and other words
    /// flush. `None` when not paused (the provider decides) or the text is empty.
    pub(crate) fn caller_text(&mut self, text: &str) -> Option<Action> {
        if !self.is_paused() || normalize(text).is_empty() {
            return None;
        }
        self.state = State::Idle;
        Some(if self.cfg.is_backchannel(text) {
            Action::Resume { backchannel: true }
        } else {
            Action::Flush
        })
    }

    /// The playout was flushed for another reason (a keypad digit, the provider's event
    /// while not paused): no pause is pending any more.
    pub(crate) fn flushed(&mut self) {
        self.state = State::Idle;
    }

    /// Checked on each tick at `now`: the window ran out. Without confirmation →
    /// [`Action::Resume`]; with the provider's event waiting on words → [`Action::Flush`].
    pub(crate) fn poll(&mut self, now: Instant) -> Option<Action> {
        match self.state {
            State::Paused { deadline, provider } if now >= deadline => {
                self.state = State::Idle;
                Some(if provider {
                    Action::Flush
                } else {
                    Action::Resume { backchannel: false }
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backchannels_match_whole_words_case_blind() {
        let cfg = BargeInConfig {
            backchannels: vec!["uh-huh".into(), "OK".into(), "так".into(), "ага".into()],
            ..BargeInConfig::default()
        };
        for t in ["Uh-huh.", "ok", "OK, ok!", "Так", "ага, так", " uh-huh "] {
            assert!(cfg.is_backchannel(t), "{t}");
        }
        for t in ["", "okay then, stop", "no", "так нет", "wait"] {
            assert!(!cfg.is_backchannel(t), "{t}");
        }
        assert!(!BargeInConfig::default().is_backchannel("ok"));
    }

    #[test]
    fn defaults_validate_and_bad_values_name_their_key() {
        BargeInConfig::default().validate("agent.barge_in").unwrap();
        let bad = BargeInConfig {
            confirm_ms: 50,
            ..BargeInConfig::default()
        };
        let e = bad.validate("agent.barge_in").unwrap_err().to_string();
        assert!(e.contains("agent.barge_in.confirm_ms"), "{e}");
    }

    fn tone(level: i16) -> Vec<i16> {
        (0..160)
            .map(|i| if i % 2 == 0 { level } else { -level })
            .collect()
    }

    #[test]
    fn pause_then_confirm_or_resume() {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut b = BargeIn::new(BargeInConfig::default());
        // Quiet line, nothing played: the detector learns the floor.
        for i in 0..10 {
            b.reference(&[0; 160]);
            assert_eq!(b.caller(ms(i * 20), ms(i * 20), &[0; 160], true), None);
        }
        // The caller speaks: paused on the third speech frame (60 ms).
        let mut paused_at = None;
        for i in 10..20 {
            b.reference(&[0; 160]);
            if b.caller(ms(i * 20), ms(i * 20), &tone(3000), true) == Some(Action::Pause) {
                paused_at = Some(i);
                break;
            }
        }
        assert_eq!(paused_at, Some(12));
        assert_eq!(b.onset(), Some(ms(200)));
        assert!(b.is_paused());
        // No confirmation: resumes when the window ends, not before.
        assert_eq!(b.poll(ms(240 + 699)), None);
        assert_eq!(
            b.poll(ms(240 + 700)),
            Some(Action::Resume { backchannel: false })
        );
        assert!(!b.is_paused());
        // The provider's event when not paused flushes at once.
        assert_eq!(b.provider_started(), Some(Action::Flush));
    }

    #[test]
    fn with_backchannels_the_words_decide() {
        let t0 = Instant::now();
        let cfg = BargeInConfig {
            backchannels: vec!["uh-huh".into()],
            ..BargeInConfig::default()
        };
        let mut b = BargeIn::new(cfg);
        let mut i = 0;
        let mut pause = |b: &mut BargeIn| loop {
            i += 1;
            b.reference(&[0; 160]);
            let level = if i % 40 < 20 { 0 } else { 3000 };
            let now = t0 + Duration::from_millis(i * 20);
            if b.caller(now, now, &tone(level), true).is_some() {
                break t0 + Duration::from_millis(i * 20);
            }
        };
        let at = pause(&mut b);
        assert_eq!(b.provider_started(), None, "waits for the words");
        assert_eq!(
            b.caller_text("Uh-huh."),
            Some(Action::Resume { backchannel: true })
        );
        // Later: the event came and no words did: the window's end flushes.
        let at2 = pause(&mut b);
        assert!(at2 > at);
        assert_eq!(b.provider_started(), None);
        assert_eq!(
            b.poll(at2 + Duration::from_millis(700)),
            Some(Action::Flush)
        );
        // Words that are not a backchannel flush at once.
        pause(&mut b);
        assert_eq!(b.caller_text("wait, no"), Some(Action::Flush));
    }
}
