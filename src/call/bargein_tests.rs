//! Local barge-in measured on virtual time: real recordings, the agent's echo mixed into the
//! caller leg, and each provider's own barge-in event as late as it comes on a real line.
//!
//! The call core runs exactly as in production (`poll_tick` every 20 ms, caller frames
//! through `handle_caller`, agent events through `handle_agent`); only time is simulated.
//! The agent says `invalid.wav` (4.1 s, the Asterisk prompt); the caller says `hello-world`,
//! `auth-thankyou` or `vm-goodbye` over it (tests/fixtures, Asterisk core sounds, CC BY-SA
//! 3.0). The caller leg carries the frames voicegate played, delayed 100–200 ms and scaled by
//! 0.2–0.5 (a G.711 line's hybrid echo), plus line noise (RMS 60), plus the caller's voice.
//! A caller frame reaches the core 20 ms after its first sample (it is recorded first), and
//! the driver runs the tick before caller input due at the same instant.
//!
//! Latency is measured at the caller: from the voice's true onset (its first 10 ms above
//! RMS 100, about −50 dBFS) to the first frame written with no agent audio in it.
//!
//! Provider models (when each provider's own barge-in event reaches the call):
//! - OpenAI Realtime: `input_audio_buffer.speech_started` at onset + 300 ms (`server_vad`
//!   `prefix_padding_ms` default) + 50 ms network; audio arrives as one burst per reply.
//! - ElevenLabs Agents: `interruption` at onset + 300 ms + 50 ms network; audio arrives in
//!   250 ms chunks, each 200 ms after the last.
//! - Cascade: without local detection its own echo-gated [`Vad`] (`[agent.vad]` defaults,
//!   200 ms of speech) flushes; with it, the STT's first words (onset + 400 ms, a streaming
//!   STT's first interim) confirm.
//!
//! Run `cargo test --lib bargein_tests -- --nocapture` to see the figures.

use super::*;
use crate::agent::Speaker;
use crate::audio::bargein::BargeInConfig;
use crate::audio::vad::{Vad, VadConfig, VadEvent};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provider {
    OpenAi,
    ElevenLabs,
    Cascade,
}

fn fixture(name: &str) -> Vec<i16> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    crate::wavfile::open(&path).expect("fixture").samples
}

/// Deterministic line noise (xorshift), RMS about `level`.
fn noise(n: usize, level: f32, seed: u32) -> Vec<i16> {
    let mut s = seed.max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            ((s as f32 / u32::MAX as f32 - 0.5) * level * 3.4) as i16
        })
        .collect()
}

/// The sample where `voice` starts: its first 10 ms above RMS 100.
fn onset_of(voice: &[i16]) -> usize {
    voice
        .chunks(80)
        .position(|c| crate::audio::rms(c) > 100.0)
        .expect("voice has an onset")
        * 80
}

/// A cough-like burst: 150 ms of noise under a fast attack and decay, peak RMS ~4000.
fn cough() -> Vec<i16> {
    let n = noise(1_200, 4_000.0, 99);
    n.iter()
        .enumerate()
        .map(|(i, &s)| {
            let t = i as f32 / 1_200.0;
            let env = if t < 0.1 { t / 0.1 } else { (1.0 - t) / 0.9 };
            (s as f32 * env) as i16
        })
        .collect()
}

struct Trial<'a> {
    provider: Provider,
    local: bool,
    agent: &'a [i16],
    /// The caller's sound and where its first sample falls, ms into the call.
    voice: Option<(&'a [i16], u64)>,
    /// The provider hears speech in `voice` (false: a cough, a noise).
    speech: bool,
    delay_ms: u64,
    gain: f32,
    seed: u32,
}

#[derive(Debug, Default)]
struct Outcome {
    /// Onset → first frame without agent audio, ms (None: never went silent).
    latency_ms: Option<u64>,
    /// Ticks on which playout was paused.
    paused_ticks: u64,
    /// Agent samples written to the caller.
    agent_samples_out: usize,
    heard_ms: Option<u64>,
    /// The tick that wrote the reply's first frame, ms.
    first_agent_ms: Option<u64>,
    summary: Option<CallSummary>,
}

fn run(t: &Trial) -> Outcome {
    let mut sim = Sim::new(t);
    let mut ms = 0u64;
    while ms <= sim.total_ms {
        let now = sim.at(ms);
        // The driver's order: the tick first, then the agent, then the caller's frame.
        sim.tick(ms, now);
        sim.agent_audio(now);
        sim.provider_event(ms, now);
        if ms >= 20 {
            sim.caller_frame(ms, now);
        }
        sim.drain_inputs();
        ms += 20;
    }
    let end = sim.at(ms);
    let mut out = sim.out;
    out.agent_samples_out = sim.core.s.agent_frames_out as usize * 160;
    out.summary = Some(sim.core.finish(end));
    out
}

/// One trial's simulation state: the call core, the line, what was played.
struct Sim<'a> {
    t: &'a Trial<'a>,
    t0: Instant,
    core: CallCore,
    cascade_vad: Vad,
    total_ms: u64,
    line: Vec<i16>,
    voice: &'a [i16],
    voice_at: u64,
    onset_ms: u64,
    provider_event_ms: u64,
    played: Vec<i16>,
    rx: Option<mpsc::Receiver<AgentInput>>,
    out: Outcome,
    pushed: usize,
    event_sent: bool,
}

impl<'a> Sim<'a> {
    fn new(t: &'a Trial<'a>) -> Self {
        let t0 = Instant::now();
        let info = CallInfo {
            call_id: Uuid::from_u128(17),
            rate_hz: 0,
            caller_number: None,
            caller_name: None,
            tools: Vec::new(),
            variables: Default::default(),
        };
        let mut core = CallCore::new(
            t0,
            info,
            "sim",
            false,
            false,
            SessionParams {
                idle_timeout: Duration::from_secs(60),
                ..SessionParams::default()
            },
        );
        if t.local {
            core.set_barge_in(BargeInConfig::default());
        }
        let total_ms = 100 + t.agent.len() as u64 / 8 + 1_500;
        let (voice, voice_at) = t.voice.unwrap_or((&[], 0));
        let onset_ms = voice_at + onset_of_or_zero(voice) as u64 / 8;
        let provider_event_ms = match t.provider {
            Provider::OpenAi | Provider::ElevenLabs => onset_ms + 350,
            Provider::Cascade => onset_ms + 400,
        };
        Sim {
            t,
            t0,
            core,
            cascade_vad: Vad::new(VadConfig::default()),
            total_ms,
            line: noise(total_ms as usize * 8 + 160, 60.0, t.seed),
            voice,
            voice_at,
            onset_ms,
            provider_event_ms,
            played: Vec::with_capacity(total_ms as usize * 8),
            rx: None,
            out: Outcome::default(),
            pushed: 0,
            event_sent: false,
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// The playout tick, if due: what the caller hears, and the latency once it is silent.
    fn tick(&mut self, ms: u64, now: Instant) {
        if self.core.poll_timeout() > now {
            return;
        }
        let t = self.t;
        let before = self.core.s.agent_frames_out;
        let frame = self.core.poll_tick(now).expect("a frame each tick");
        self.played.extend_from_slice(frame);
        if t.provider == Provider::Cascade && !t.local {
            self.cascade_vad
                .reference(&self.played[self.played.len() - 160..]);
        }
        let agent_frame = self.core.s.agent_frames_out > before;
        if agent_frame && self.out.first_agent_ms.is_none() {
            self.out.first_agent_ms = Some(ms);
        }
        if self.core.playout.is_paused() {
            self.out.paused_ticks += 1;
        }
        if t.voice.is_some()
            && ms >= self.onset_ms
            && !agent_frame
            && self.out.latency_ms.is_none()
            && self.pushed > 0
        {
            self.out.latency_ms = Some(ms - self.onset_ms);
        }
    }

    /// The agent's audio: all at once, or ElevenLabs' 250 ms every 200 ms.
    fn agent_audio(&mut self, now: Instant) {
        if self.rx.is_none() {
            return;
        }
        let t = self.t;
        let ms = (now - self.t0).as_millis() as u64;
        let chunk = match t.provider {
            Provider::ElevenLabs => 2_000, // 250 ms every 200 ms
            _ => t.agent.len(),
        };
        let due = match t.provider {
            Provider::ElevenLabs => ms % 200 == 0 || self.pushed == 0,
            _ => true,
        };
        // After a barge-in the provider cancels the reply: no more audio.
        if due && self.pushed < t.agent.len() && self.core.s.barge_ins == 0 {
            let end = (self.pushed + chunk).min(t.agent.len());
            self.core.handle_agent(
                now,
                Some(AgentEvent::Audio {
                    reply: ReplyId(1),
                    samples: t.agent[self.pushed..end].to_vec(),
                }),
            );
            self.pushed = end;
            if self.pushed == t.agent.len() {
                let done = AgentEvent::ReplyDone { reply: ReplyId(1) };
                self.core.handle_agent(now, Some(done));
            }
        }
    }

    /// The provider's barge-in event (the cascade without local detection: its VAD, in
    /// [`Self::caller_frame`]).
    fn provider_event(&mut self, ms: u64, now: Instant) {
        let t = self.t;
        if !(t.speech && t.voice.is_some()) || self.event_sent {
            return;
        }
        let fire = match (t.provider, t.local) {
            (Provider::Cascade, false) => false,
            _ => ms >= self.provider_event_ms,
        };
        if fire {
            self.event_sent = true;
            self.core.handle_agent(now, Some(AgentEvent::SpeechStarted));
        }
    }

    /// The caller frame recorded over [ms − 20, ms): the agent's echo, the voice, the line.
    fn caller_frame(&mut self, ms: u64, now: Instant) {
        let t = self.t;
        let start = (ms - 20) as usize * 8;
        let mut frame = [0i16; 160];
        for (k, f) in frame.iter_mut().enumerate() {
            let i = start + k;
            let echo = (i as u64)
                .checked_sub(t.delay_ms * 8)
                .and_then(|j| self.played.get(j as usize))
                .map_or(0.0, |&s| s as f32 * t.gain);
            let v = (i as u64)
                .checked_sub(self.voice_at * 8)
                .and_then(|j| self.voice.get(j as usize))
                .map_or(0.0, |&s| s as f32);
            *f = (echo + v + self.line[i] as f32).clamp(-32768.0, 32767.0) as i16;
        }
        if t.provider == Provider::Cascade && !t.local {
            let ev = self.cascade_vad.process(&frame).event;
            if ev == Some(VadEvent::SpeechStarted) && !self.event_sent && self.pushed > 0 {
                self.event_sent = true;
                self.core.handle_agent(now, Some(AgentEvent::SpeechStarted));
            }
        }
        let mut bytes = Vec::with_capacity(320);
        crate::audio::slin_to_le_bytes(&frame, &mut bytes);
        self.core.handle_caller(
            now,
            Ok(Some(super::super::media::MediaEvent::Audio {
                rate: SlinRate::Hz8000,
                payload: Bytes::from(bytes),
            })),
        );
        if self.core.poll_start_agent().is_some() {
            let (tx, r) = mpsc::channel(100_000);
            self.core.agent_started(tx);
            self.rx = Some(r);
        }
    }

    /// What the core told the agent: the heard ms of a barge-in.
    fn drain_inputs(&mut self) {
        if let Some(r) = self.rx.as_mut() {
            while let Ok(i) = r.try_recv() {
                if let AgentInput::Interrupted { heard_ms, .. } = i {
                    self.out.heard_ms = Some(heard_ms);
                }
            }
        }
    }
}

fn onset_of_or_zero(voice: &[i16]) -> usize {
    if voice.is_empty() { 0 } else { onset_of(voice) }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Every combination of caller voice, echo delay, echo gain and onset.
fn latencies(provider: Provider, local: bool) -> (Vec<u64>, usize) {
    let agent = fixture("invalid.wav");
    let voices = [
        fixture("hello-world.wav"),
        fixture("auth-thankyou.wav"),
        fixture("vm-goodbye.wav"),
    ];
    let mut all = Vec::new();
    let mut missed = 0;
    let mut seed = 1;
    for voice in &voices {
        for delay_ms in [100, 133, 166, 200] {
            for gain in [0.2, 0.3, 0.4, 0.5] {
                for voice_at in [1_000, 1_730, 2_410] {
                    seed += 1;
                    let o = run(&Trial {
                        provider,
                        local,
                        agent: &agent,
                        voice: Some((voice, voice_at)),
                        speech: true,
                        delay_ms,
                        gain,
                        seed,
                    });
                    match o.latency_ms {
                        Some(l) => all.push(l),
                        None => missed += 1,
                    }
                }
            }
        }
    }
    all.sort_unstable();
    (all, missed)
}

/// Prints and checks one provider's figures: local detection against the provider alone.
fn compare(provider: Provider) {
    let (with, missed_with) = latencies(provider, true);
    let (without, missed_without) = latencies(provider, false);
    assert_eq!(missed_with, 0, "{provider:?}: a barge-in was missed");
    let (p50, p99) = (percentile(&with, 0.5), percentile(&with, 0.99));
    let (b50, b99) = (percentile(&without, 0.5), percentile(&without, 0.99));
    eprintln!(
        "{provider:?}: {} barge-ins; onset → agent silent at the caller: local p50 {p50} ms \
         p99 {p99} ms (max {}); provider only p50 {b50} ms p99 {b99} ms ({missed_without} never)",
        with.len(),
        with.last().unwrap(),
    );
    assert!(
        p50 <= 120 && p99 <= 200,
        "{provider:?} local: p50 {p50} p99 {p99}"
    );
    if provider != Provider::Cascade {
        assert_eq!(missed_without, 0);
        assert!(b50 >= 350, "{provider:?} provider only: p50 {b50}");
    }
}

#[test]
fn openai_barge_in_latency_with_and_without_local_detection() {
    compare(Provider::OpenAi);
}

#[test]
fn elevenlabs_barge_in_latency_with_and_without_local_detection() {
    compare(Provider::ElevenLabs);
}

#[test]
fn cascade_barge_in_latency_with_and_without_local_detection() {
    compare(Provider::Cascade);
}

#[test]
fn the_agents_own_echo_never_pauses_playback() {
    let agent = fixture("invalid.wav");
    let mut paused = Vec::new();
    for i in 0..100u32 {
        let delay_ms = 100 + (i as u64 * 37) % 101;
        let gain = 0.2 + (i as f32 * 0.013) % 0.3;
        let provider = [Provider::OpenAi, Provider::ElevenLabs, Provider::Cascade][i as usize % 3];
        let o = run(&Trial {
            provider,
            local: true,
            agent: &agent,
            voice: None,
            speech: false,
            delay_ms,
            gain,
            seed: 1_000 + i,
        });
        let s = o.summary.unwrap();
        if o.paused_ticks > 0 || s.false_barge_ins > 0 || s.barge_ins > 0 {
            paused.push((i, delay_ms, gain, o.paused_ticks));
        }
        assert_eq!(o.agent_samples_out.div_ceil(160), agent.len().div_ceil(160));
    }
    assert!(
        paused.is_empty(),
        "{} of 100 echo-only replies paused: {paused:?}",
        paused.len()
    );
}

#[test]
fn a_cough_pauses_then_resumes_with_nothing_lost() {
    let agent = fixture("invalid.wav");
    let burst = cough();
    for provider in [Provider::OpenAi, Provider::ElevenLabs, Provider::Cascade] {
        let o = run(&Trial {
            provider,
            local: true,
            agent: &agent,
            voice: Some((&burst, 1_500)),
            speech: false,
            delay_ms: 150,
            gain: 0.4,
            seed: 5,
        });
        let s = o.summary.unwrap();
        // Paused at once, held for the confirm window (700 ms = 35 ticks), then resumed.
        assert!(
            o.latency_ms.is_some_and(|l| l <= 120),
            "{provider:?}: {:?}",
            o.latency_ms
        );
        assert!(
            (34..=36).contains(&o.paused_ticks),
            "{provider:?}: {}",
            o.paused_ticks
        );
        assert_eq!((s.false_barge_ins, s.barge_ins), (1, 0), "{provider:?}");
        assert!(s.resumed_audio_ms > 1_000, "{}", s.resumed_audio_ms);
        // Nothing lost: every frame of the reply reached the caller.
        assert_eq!(
            o.agent_samples_out.div_ceil(160),
            agent.len().div_ceil(160),
            "{provider:?}"
        );
        assert!(s.transcript.is_empty());
        assert!(
            s.barge_in_latencies_ms.is_empty(),
            "a false barge-in is not a latency"
        );
    }
}

#[test]
fn a_confirmed_barge_in_tells_the_provider_what_was_heard_before_the_pause() {
    let agent = fixture("invalid.wav");
    let voice = fixture("hello-world.wav");
    let o = run(&Trial {
        provider: Provider::OpenAi,
        local: true,
        agent: &agent,
        voice: Some((&voice, 1_730)),
        speech: true,
        delay_ms: 150,
        gain: 0.3,
        seed: 3,
    });
    let s = o.summary.unwrap();
    let latency = o.latency_ms.unwrap();
    let onset = 1_730 + onset_of(&voice) as u64 / 8;
    // Heard: from the reply's first frame to the pause, not to the flush.
    let heard = o.heard_ms.expect("Interrupted sent");
    let first = o.first_agent_ms.unwrap();
    assert_eq!(heard, onset + latency - first, "latency {latency}");
    assert_eq!((s.barge_ins, s.false_barge_ins), (1, 0));
    assert_eq!(s.barge_in_latencies_ms.len(), 1);
    // The core's own figure counts from the first frame its detector took for speech: never
    // more than the truth, and short of it by the voice's quiet rise (at most 60 ms here).
    let est = s.barge_in_latencies_ms[0] as u64;
    assert!(
        est <= latency && est + 60 >= latency,
        "estimate {est} vs {latency}"
    );
}

/// A call core with local barge-in `cfg`, its agent started by a quiet first frame at 0 ms;
/// returns the core, `t0` and the agent's input.
fn quiet_call(cfg: BargeInConfig) -> (CallCore, Instant, mpsc::Receiver<AgentInput>) {
    let t0 = Instant::now();
    let info = CallInfo {
        call_id: Uuid::from_u128(18),
        rate_hz: 0,
        caller_number: None,
        caller_name: None,
        tools: Vec::new(),
        variables: Default::default(),
    };
    let mut core = CallCore::new(t0, info, "sim", false, false, SessionParams::default());
    core.set_barge_in(cfg);
    core.handle_caller(t0, Ok(Some(frame_of(0))));
    core.poll_start_agent().expect("agent asked for");
    let (tx, rx) = mpsc::channel(10_000);
    core.agent_started(tx);
    (core, t0, rx)
}

/// 20 ms at 8 kHz: a square wave of `level`.
fn frame_of(level: i16) -> super::super::media::MediaEvent {
    let mut bytes = Vec::with_capacity(320);
    for i in 0..160 {
        let v = if i % 2 == 0 { level } else { -level };
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    super::super::media::MediaEvent::Audio {
        rate: SlinRate::Hz8000,
        payload: Bytes::from(bytes),
    }
}

/// Ticks and caller frames (`level` each) from `from` to `to` ms; returns the ticks that
/// wrote agent audio.
fn talk(core: &mut CallCore, t0: Instant, from: u64, to: u64, level: i16) -> u64 {
    let mut agent = 0;
    for ms in (from..to).step_by(20) {
        let now = t0 + Duration::from_millis(ms);
        let before = core.s.agent_frames_out;
        core.poll_tick(now);
        agent += (core.s.agent_frames_out > before) as u64;
        core.handle_caller(now, Ok(Some(frame_of(level))));
    }
    agent
}

#[test]
fn with_backchannels_the_callers_words_decide_after_the_providers_event() {
    let cfg = BargeInConfig {
        backchannels: vec!["uh-huh".into(), "ага".into()],
        ..BargeInConfig::default()
    };
    let (mut core, t0, mut rx) = quiet_call(cfg);
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // A quiet agent (RMS 500) on an echo-free line; 6 s of it.
    let reply: Vec<i16> = (0..48_000)
        .map(|i| if i % 2 == 0 { 500 } else { -500 })
        .collect();
    core.handle_agent(
        at(0),
        Some(AgentEvent::Audio {
            reply: ReplyId(1),
            samples: reply,
        }),
    );
    core.handle_agent(at(0), Some(AgentEvent::ReplyDone { reply: ReplyId(1) }));
    assert_eq!(talk(&mut core, t0, 0, 1_000, 0), 50);
    // "Uh-huh" (RMS 3000): paused after 60 ms of it.
    talk(&mut core, t0, 1_000, 1_100, 3_000);
    assert!(core.playout.is_paused());
    // The provider's event alone does not flush: the words decide.
    core.handle_agent(at(1_400), Some(AgentEvent::SpeechStarted));
    assert!(core.playout.is_paused());
    assert_eq!(core.s.barge_ins, 0);
    core.handle_agent(
        at(1_500),
        Some(AgentEvent::Transcript {
            speaker: Speaker::Caller,
            text: "Ага.".into(),
        }),
    );
    assert!(!core.playout.is_paused(), "a backchannel resumes");
    assert_eq!((core.s.backchannels, core.s.false_barge_ins), (1, 0));
    // Quiet again for a while, then real words over the reply: flushed at once.
    talk(&mut core, t0, 1_100, 2_500, 0);
    talk(&mut core, t0, 2_500, 2_600, 3_000);
    assert!(core.playout.is_paused());
    let queued = core.playout.len();
    core.handle_agent(at(2_700), Some(AgentEvent::SpeechStarted));
    core.handle_agent(
        at(2_900),
        Some(AgentEvent::Transcript {
            speaker: Speaker::Caller,
            text: "No, wait".into(),
        }),
    );
    assert!(core.playout.is_empty() && queued > 0);
    assert_eq!(core.s.barge_ins, 1);
    let heard: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
        .filter_map(|i| match i {
            AgentInput::Interrupted { heard_ms, .. } => Some(heard_ms),
            _ => None,
        })
        .collect();
    // Heard: 1 s before the first pause, then 1.4 s from the resume to the second pause
    // (each pause within a frame of 60 ms of speech, arriving 20 ms after it began).
    assert_eq!(heard.len(), 1);
    assert!((2_400..=2_520).contains(&heard[0]), "heard {heard:?}");
}

#[test]
fn disabled_local_barge_in_leaves_it_to_the_provider() {
    let (mut core, t0, _rx) = quiet_call(BargeInConfig {
        enabled: false,
        ..BargeInConfig::default()
    });
    let reply: Vec<i16> = (0..16_000)
        .map(|i| if i % 2 == 0 { 500 } else { -500 })
        .collect();
    core.handle_agent(
        t0,
        Some(AgentEvent::Audio {
            reply: ReplyId(1),
            samples: reply,
        }),
    );
    talk(&mut core, t0, 0, 500, 0);
    assert_eq!(talk(&mut core, t0, 500, 1_000, 3_000), 25, "no pause");
    core.handle_agent(
        t0 + Duration::from_millis(1_000),
        Some(AgentEvent::SpeechStarted),
    );
    assert!(core.playout.is_empty());
    assert_eq!(core.s.barge_ins, 1);
}
