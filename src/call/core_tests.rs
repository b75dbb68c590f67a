//! The call core on virtual time: every instant is `t0 + n ms`, passed in, so each timing
//! assertion is exact and independent of machine load (no runtime, no sleeps).

use super::*;
use crate::agent::Speaker;
use crate::tools::ToolRegistry;
use std::sync::Arc;
use uuid::Uuid;

const R1: ReplyId = ReplyId(1);

/// A call under test: the core, the start instant and the agent's input channel.
struct Call {
    core: CallCore,
    t0: Instant,
    agent: Option<mpsc::Receiver<AgentInput>>,
    started: usize,
    /// Frames written, with the time each tick ran.
    frames: Vec<(u64, Vec<u8>)>,
}

fn info() -> CallInfo {
    CallInfo {
        call_id: Uuid::from_u128(7),
        rate_hz: 0,
        caller_number: None,
        caller_name: None,
        tools: Vec::new(),
        variables: Default::default(),
    }
}

fn params(edit: impl FnOnce(&mut SessionParams)) -> SessionParams {
    let mut p = SessionParams::default();
    edit(&mut p);
    p
}

/// 20 ms of 8 kHz slin: silence, or a square wave well above the voiced threshold.
fn audio(voiced: bool) -> MediaEvent {
    let v: i16 = if voiced { 3000 } else { 0 };
    let bytes: Vec<u8> = (0..160)
        .flat_map(|i| (if i % 2 == 0 { v } else { -v }).to_le_bytes())
        .collect();
    MediaEvent::Audio {
        rate: SlinRate::Hz8000,
        payload: Bytes::from(bytes),
    }
}

impl Call {
    fn new(p: SessionParams) -> Self {
        Call::with_agent(p, false, false)
    }

    fn with_agent(p: SessionParams, reference: bool, live: bool) -> Self {
        let t0 = Instant::now();
        Call {
            core: CallCore::new(t0, info(), "test", reference, live, p),
            t0,
            agent: None,
            started: 0,
            frames: Vec::new(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// What the driver does after each event: start the agent when asked.
    fn start_agent_if_asked(&mut self) {
        if let Some(info) = self.core.poll_start_agent() {
            assert_ne!(info.rate_hz, 0, "the agent starts with the call's rate");
            let (tx, rx) = mpsc::channel(crate::agent::INPUT_CAPACITY_FRAMES);
            self.core.agent_started(tx);
            self.agent = Some(rx);
            self.started += 1;
        }
    }

    fn caller(&mut self, ms: u64, m: MediaEvent) {
        self.core.handle_caller(self.at(ms), Ok(Some(m)));
        self.start_agent_if_asked();
    }

    fn agent(&mut self, ms: u64, ev: AgentEvent) {
        self.core.handle_agent(self.at(ms), Some(ev));
    }

    /// Runs every tick due up to `until_ms` at its exact deadline, feeding a caller frame
    /// (voiced or not) at each tick when `talk` says so; stops when the call ends.
    fn run(&mut self, until_ms: u64, mut talk: impl FnMut(u64) -> Option<bool>) {
        loop {
            let due = self.core.poll_timeout();
            if due > self.at(until_ms) || self.core.outcome().is_some() {
                return;
            }
            let ms = (due - self.t0).as_millis() as u64;
            let rate = self.core.rate();
            if let Some(frame) = self.core.poll_tick(due) {
                self.frames.push((ms, encoded(rate, frame)));
            }
            if self.core.outcome().is_some() {
                return;
            }
            if let Some(voiced) = talk(ms) {
                self.caller(ms, audio(voiced));
            }
        }
    }

    /// Ticks only, no caller audio.
    fn tick_to(&mut self, until_ms: u64) {
        self.run(until_ms, |_| None);
    }

    fn inputs(&mut self) -> Vec<AgentInput> {
        let rx = self.agent.as_mut().expect("agent started");
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    fn finish(self, ms: u64) -> CallSummary {
        let at = self.at(ms);
        self.core.finish(at)
    }

    fn end_ms(&self) -> u64 {
        self.frames.last().map_or(0, |f| f.0)
    }
}

/// A frame as the AudioSocket port writes it (header and slin), so the assertions read the
/// wire.
fn encoded(rate: SlinRate, samples: &[i16]) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    crate::audiosocket::codec::encode_audio_samples(rate, samples, &mut out);
    out.to_vec()
}

fn is_silence(frame: &[u8]) -> bool {
    frame[3..].iter().all(|&b| b == 0)
}

#[test]
fn before_audio_silence_goes_out_at_8khz_after_exactly_the_keepalive() {
    let mut c = Call::new(params(|_| {}));
    assert!(
        c.core.poll_tick(c.at(499)).is_none(),
        "nothing before 500 ms"
    );
    assert_eq!(c.core.poll_timeout(), c.at(500));
    let rate = c.core.rate();
    let f = encoded(rate, c.core.poll_tick(c.at(500)).expect("keepalive frame"));
    assert_eq!(&f[..3], &[0x10, 0x01, 0x40], "8 kHz, 320 bytes");
    assert!(is_silence(&f));
    assert_eq!(c.core.poll_timeout(), c.at(520), "then every 20 ms");
    assert_eq!(c.started, 0, "no agent before the first audio frame");
}

#[test]
fn the_first_audio_frame_starts_the_agent_once_at_the_call_rate_and_the_grid() {
    let mut c = Call::new(params(|_| {}));
    let payload = Bytes::from(vec![1u8; 640]);
    c.core.handle_caller(
        c.at(130),
        Ok(Some(MediaEvent::Audio {
            rate: SlinRate::Hz16000,
            payload: payload.clone(),
        })),
    );
    assert_eq!(
        c.core.poll_timeout(),
        c.at(130),
        "the 20 ms grid starts at the first frame"
    );
    c.start_agent_if_asked();
    assert_eq!(c.core.info().rate_hz, 16_000);
    assert!(matches!(&c.inputs()[..], [AgentInput::Audio(p)] if *p == payload));
    c.caller(150, audio(false)); // 8 kHz: another rate, ignored
    c.tick_to(190);
    assert_eq!(c.started, 1);
    assert_eq!(c.core.summary().frames_in, 2);
    assert!(
        c.inputs().is_empty(),
        "the frame at another rate does not reach the agent"
    );
    let times: Vec<u64> = c.frames.iter().map(|f| f.0).collect();
    assert_eq!(times, [130, 150, 170, 190]);
    assert!(
        c.frames
            .iter()
            .all(|f| f.1[0] == 0x12 && f.1.len() == 3 + 640)
    );
}

#[test]
fn max_duration_ends_the_call_at_exactly_the_limit() {
    let mut c = Call::new(params(|p| {
        p.max_duration = Some(Duration::from_millis(1_000))
    }));
    c.caller(0, audio(false));
    c.run(5_000, |_| Some(false));
    assert_eq!(c.core.outcome(), Some(&Outcome::MaxDuration));
    assert_eq!(
        c.core.poll_timeout(),
        c.at(1_000),
        "decided on the tick at 1000 ms"
    );
    assert_eq!(
        c.frames.len(),
        50,
        "ticks 0..=980 ms wrote a frame, 1000 ms none"
    );
    assert!(c.core.says_goodbye());
    let s = c.finish(1_000);
    assert_eq!(s.duration, Duration::from_millis(1_000));
    assert_eq!(s.agent_time, Duration::from_millis(1_000));
    assert_eq!(s.frames_out, 50);
}

#[test]
fn idle_timeout_ends_on_the_first_tick_past_it() {
    let mut c = Call::new(params(|p| p.idle_timeout = Duration::from_millis(1_000)));
    // Ten frames (0..=180 ms), then nothing: a half-open peer.
    c.caller(0, audio(false));
    c.run(10_000, |ms| (20..=180).contains(&ms).then_some(false));
    assert_eq!(c.core.outcome(), Some(&Outcome::IdleTimeout));
    // Last input at 180 ms; 1180 - 180 = 1000 is not past the limit, 1200 is.
    assert_eq!(c.end_ms(), 1_200, "the frame of that tick still went out");
    assert!(c.core.says_goodbye(), "0x00 before the close");
    let s = c.finish(1_200);
    assert_eq!(s.frames_in, 10);
    assert_eq!(s.frames_out, 61);
    assert_eq!(
        s.idle_frames, 61,
        "every frame out was silence with no reply streaming"
    );
    assert_eq!(s.underruns, 0);
}

#[test]
fn agent_silence_hands_over_at_exactly_the_limit_and_caller_speech_resets_it() {
    let p = params(|p| p.agent_silence = Some(Duration::from_millis(2_000)));
    let mut c = Call::new(p.clone());
    c.caller(0, audio(false));
    c.run(10_000, |_| Some(false));
    assert_eq!(
        c.core.outcome(),
        Some(&Outcome::Fallback(FallbackReason::AgentSilent.to_string()))
    );
    assert_eq!(c.core.poll_timeout(), c.at(2_000));
    assert_eq!(c.frames.len(), 100, "ticks 0..=1980 ms");
    assert_eq!(c.core.fallback(), Some(&FallbackReason::AgentSilent));

    let mut c = Call::new(p.clone());
    c.caller(0, audio(false));
    c.run(10_000, |ms| Some(ms == 1_500));
    assert_eq!(
        c.core.poll_timeout(),
        c.at(3_500),
        "speech at 1500 ms moved it"
    );

    let mut c = Call::new(p);
    c.caller(0, audio(false));
    c.agent(
        1_900,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![500; 160],
        },
    );
    c.run(10_000, |_| Some(false));
    // Agent audio at 1900 ms; its frame plays at 1900 ms, the buffer is empty after.
    assert_eq!(c.core.poll_timeout(), c.at(3_900), "agent audio reset it");
}

#[test]
fn agent_audio_idle_frames_and_underruns_are_counted_per_frame() {
    for done in [false, true] {
        let mut c = Call::new(params(|_| {}));
        c.caller(0, audio(false));
        let samples = vec![900; 3 * 160 + 80];
        c.agent(0, AgentEvent::Audio { reply: R1, samples });
        if done {
            c.agent(0, AgentEvent::ReplyDone { reply: R1 });
        }
        c.run(180, |_| Some(false));
        let s = c.core.summary();
        assert_eq!(s.frames_out, 10);
        assert_eq!(
            s.agent_frames_out, 4,
            "three full frames and half of a fourth"
        );
        if done {
            // The reply was complete: its end is not late audio, the rest is listening.
            assert_eq!((s.underruns, s.idle_frames), (0, 6));
        } else {
            // Still streaming: the short fourth frame and the six empty ones are underruns.
            assert_eq!((s.underruns, s.idle_frames), (7, 0));
        }
        assert!(!is_silence(&c.frames[0].1) && is_silence(&c.frames[4].1));
    }
}

#[test]
fn turn_latency_is_caller_speech_end_to_the_replys_first_audio() {
    let mut c = Call::new(params(|_| {}));
    c.caller(0, audio(false));
    c.caller(100, audio(true));
    c.caller(120, audio(true));
    c.caller(140, audio(false));
    c.agent(
        470,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![1; 160],
        },
    );
    c.agent(
        490,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![1; 160],
        },
    );
    assert_eq!(c.core.summary().turn_latencies_ms, [350]);
    // For the console's live waterfall: a speech-to-speech turn, once.
    let turn = TurnLatency {
        reply: R1.0,
        first_frame_ms: Some(350),
        ..TurnLatency::default()
    };
    assert_eq!(c.core.take_observed_turns(), [turn]);
    assert!(c.core.take_observed_turns().is_empty());
}

/// The cascade reports its own turn (STT final → LLM → TTS first audio); the call adds the
/// first frame on the wire and hands the whole turn to an observer once that frame is out,
/// with no speech-to-speech turn beside it.
#[test]
fn an_agents_turn_is_observed_with_its_first_frame_on_the_wire() {
    let mut c = Call::new(params(|_| {}));
    c.caller(0, audio(false));
    c.caller(100, audio(true));
    c.caller(120, audio(false));
    let reported = TurnLatency {
        reply: R1.0,
        stt_final_ms: Some(200),
        llm_first_token_ms: Some(300),
        tts_first_audio_ms: Some(400),
        first_frame_ms: None,
    };
    c.agent(540, AgentEvent::TurnLatency(reported.clone()));
    c.agent(
        540,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![1; 160],
        },
    );
    assert!(
        c.core.take_observed_turns().is_empty(),
        "not on the wire yet"
    );
    c.tick_to(560);
    let observed = c.core.take_observed_turns();
    assert_eq!(observed.len(), 1, "{observed:?}");
    assert_eq!(observed[0].stt_final_ms, reported.stt_final_ms);
    let wire = observed[0].first_frame_ms.expect("first frame on the wire");
    assert!(
        (400..=420).contains(&wire),
        "TTS first audio + up to one tick: {wire}"
    );
}

#[test]
fn barge_in_flushes_before_the_next_tick_and_reports_what_was_heard() {
    let mut c = Call::new(params(|_| {}));
    c.caller(0, audio(false));
    c.agent(
        0,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![700; 8_000],
        },
    );
    c.tick_to(80); // five frames: 100 ms heard
    c.inputs();
    c.agent(90, AgentEvent::SpeechStarted);
    assert!(matches!(
        &c.inputs()[..],
        [AgentInput::Interrupted {
            reply: R1,
            heard_ms: 100
        }]
    ));
    c.tick_to(100);
    assert!(
        is_silence(&c.frames.last().unwrap().1),
        "nothing of R1 after the flush"
    );
    assert_eq!(c.core.summary().barge_ins, 1);
    c.agent(110, AgentEvent::SpeechStarted);
    assert_eq!(
        c.core.summary().barge_ins,
        1,
        "nothing playing: not a barge-in"
    );
}

#[test]
fn played_out_is_sent_on_the_tick_that_empties_the_buffer() {
    let mut c = Call::new(params(|_| {}));
    c.caller(0, audio(false));
    c.agent(
        0,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![5; 320],
        },
    );
    c.agent(0, AgentEvent::ReplyDone { reply: R1 });
    c.inputs();
    c.tick_to(0);
    assert!(c.inputs().is_empty(), "one frame still queued");
    c.tick_to(20);
    assert!(matches!(
        &c.inputs()[..],
        [AgentInput::PlayedOut { reply: R1 }]
    ));
}

#[test]
fn an_ending_agent_is_heard_to_the_end_first() {
    let mut c = Call::new(params(|_| {}));
    c.caller(0, audio(false));
    c.agent(
        0,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![5; 5 * 160],
        },
    );
    c.agent(
        0,
        AgentEvent::Ended {
            reason: "bye".into(),
        },
    );
    c.core.handle_agent(c.at(1), None); // its task finished: not a failure now
    c.run(1_000, |_| Some(false));
    assert_eq!(c.core.outcome(), Some(&Outcome::AgentEnded("bye".into())));
    assert_eq!(c.end_ms(), 80, "after the fifth and last frame");
    assert_eq!(c.core.summary().agent_frames_out, 5);
    assert!(c.core.fallback().is_none());
}

#[test]
fn a_failed_or_vanished_agent_goes_to_the_fallback_at_once() {
    let mut c = Call::new(params(|_| {}));
    c.caller(0, audio(false));
    c.agent(
        40,
        AgentEvent::Failed(crate::agent::AgentError::Provider {
            provider: "x",
            detail: "boom".into(),
        }),
    );
    assert!(matches!(c.core.outcome(), Some(Outcome::Fallback(e)) if e.contains("boom")));
    assert!(c.core.says_goodbye());
    assert!(
        c.core.poll_tick(c.at(40)).is_none(),
        "no frame after the end"
    );

    let mut c = Call::new(params(|_| {}));
    c.caller(0, audio(false));
    c.core.handle_agent(c.at(20), None);
    assert_eq!(
        c.core.outcome(),
        Some(&Outcome::Fallback("agent task ended".into()))
    );
    assert_eq!(
        c.core.fallback(),
        Some(&FallbackReason::AgentFailed("agent task ended".into()))
    );
}

#[test]
fn dtmf_copies_within_the_window_count_once() {
    let mut c = Call::new(params(|_| {}));
    c.caller(0, audio(false));
    c.core.handle_extra_input(c.at(100), AgentInput::Dtmf('5'));
    c.caller(1_100, MediaEvent::Dtmf('5')); // exactly the window later: the bridge's copy
    c.core
        .handle_extra_input(c.at(3_000), AgentInput::Dtmf('7'));
    c.caller(4_001, MediaEvent::Dtmf('7')); // 1 ms past the window: a second press
    assert_eq!(c.core.summary().dtmf, "577");
    let digits: Vec<char> = c
        .inputs()
        .into_iter()
        .filter_map(|i| match i {
            AgentInput::Dtmf(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(digits, ['5', '7', '7']);
}

#[test]
fn dtmf_before_the_agent_is_counted_but_not_sent() {
    let mut c = Call::new(params(|_| {}));
    c.caller(0, MediaEvent::Dtmf('1'));
    c.caller(10, audio(false));
    assert_eq!(c.core.summary().dtmf, "1");
    assert!(c.inputs().iter().all(|i| !matches!(i, AgentInput::Dtmf(_))));
}

#[test]
fn caller_hangup_and_errors_end_the_call_with_or_without_goodbye() {
    let mut c = Call::new(params(|_| {}));
    c.core.handle_caller(c.at(10), Ok(None));
    assert_eq!(c.core.outcome(), Some(&Outcome::CallerHungUp));
    assert!(!c.core.says_goodbye(), "Asterisk closed: no 0x00");

    let mut c = Call::new(params(|_| {}));
    let read =
        crate::call::media::from_audiosocket(Ok(Some(crate::audiosocket::Message::Error(3))));
    c.core.handle_caller(c.at(10), read);
    assert!(matches!(c.core.outcome(), Some(Outcome::ProtocolError(e)) if e.contains("code 3")));
    assert!(c.core.says_goodbye());

    let mut c = Call::new(params(|_| {}));
    let second = crate::audiosocket::Message::CallId(Uuid::from_u128(9));
    let read = crate::call::media::from_audiosocket(Ok(Some(second)));
    c.core.handle_caller(c.at(10), read);
    assert!(
        matches!(c.core.outcome(), Some(Outcome::ProtocolError(e)) if e.contains("second call id"))
    );

    let mut c = Call::new(params(|_| {}));
    c.core.handle_shutdown();
    assert_eq!(c.core.outcome(), Some(&Outcome::Shutdown));
}

#[test]
fn a_failed_write_is_not_counted_and_ends_the_call_without_goodbye() {
    let mut c = Call::new(params(|_| {}));
    c.caller(0, audio(false));
    assert!(c.core.poll_tick(c.at(0)).is_some());
    c.core.handle_write_error("broken pipe".into());
    assert_eq!(
        c.core.outcome(),
        Some(&Outcome::WriteFailed("broken pipe".into()))
    );
    assert!(!c.core.says_goodbye());
    assert_eq!(c.finish(0).frames_out, 0);
}

#[test]
fn a_write_broken_by_the_callers_hangup_ends_the_call_as_that_hangup() {
    // The driver hands the core what arrived before the failed write: the caller's hangup
    // (or close) is what broke it, so the record says `completed`, not `write_failed`.
    for gone in [Ok(Some(MediaEvent::Hangup)), Ok(None)] {
        let mut c = Call::new(params(|_| {}));
        c.caller(0, audio(false));
        assert!(c.core.poll_tick(c.at(0)).is_some());
        c.core.handle_caller(c.at(1), gone);
        c.core
            .handle_write_error("Broken pipe (os error 32)".into());
        assert_eq!(c.core.outcome(), Some(&Outcome::CallerHungUp));
        assert_eq!(c.finish(1).frames_out, 0, "the failed frame is not counted");
    }
}

#[test]
fn a_late_driver_skips_ticks_and_a_live_agent_loses_their_audio() {
    for live in [false, true] {
        let mut c = Call::with_agent(params(|_| {}), false, live);
        c.caller(0, audio(false));
        c.agent(
            0,
            AgentEvent::Audio {
                reply: R1,
                samples: vec![3; 50 * 160],
            },
        );
        c.tick_to(0);
        // The driver wakes 200 ms late: more than three frames behind.
        assert!(c.core.poll_tick(c.at(220)).is_some());
        assert_eq!(c.core.poll_timeout(), c.at(240), "re-anchored, no burst");
        let s = c.core.summary();
        assert_eq!(s.frames_out, 2);
        let left = 50 - 2 - if live { 9 } else { 0 };
        c.tick_to(240 + 20 * 60);
        assert_eq!(c.core.summary().agent_frames_out, 2 + left, "live={live}");
        assert_eq!(c.finish(2_000).late_skipped_frames, 9, "(220 - 40) / 20");
    }
}

/// A live stream (the echo) whose frames 5 and 6 come two ticks late, together with frame
/// 7: the two ticks without audio are underruns either way, but a live agent's stream is
/// back on its slots at once (5 and 6 are dropped, tick 7 plays frame 7), while a reply
/// (not live) plays everything, two frames later for the rest of the call.
#[test]
fn a_live_stream_keeps_its_slots_after_late_frames() {
    for live in [false, true] {
        let mut c = Call::with_agent(params(|_| {}), false, live);
        c.caller(0, audio(false));
        let frame = |n: u64| AgentEvent::Audio {
            reply: R1,
            samples: vec![n as i16 + 1; 160],
        };
        let mut played = Vec::new();
        for k in 0..12u64 {
            let ms = 20 * k;
            match k {
                5 | 6 => {}
                7 => (5..=7).for_each(|n| c.agent(ms, frame(n))),
                _ => c.agent(ms, frame(k)),
            }
            let out = c.core.poll_tick(c.at(ms)).expect("a tick is due").to_vec();
            assert!(
                out.iter().all(|s| *s == out[0]),
                "one frame's audio at a time"
            );
            played.push(out[0] - 1);
        }
        let expected: Vec<i16> = if live {
            vec![0, 1, 2, 3, 4, -1, -1, 7, 8, 9, 10, 11]
        } else {
            vec![0, 1, 2, 3, 4, -1, -1, 5, 6, 7, 8, 9]
        };
        assert_eq!(played, expected, "live={live}");
        assert_eq!(c.core.summary().underruns, 2, "live={live}");
    }
}

#[test]
fn playout_reference_agents_get_every_frame_written() {
    let mut c = Call::with_agent(params(|_| {}), true, false);
    c.caller(0, audio(false));
    c.inputs();
    c.agent(
        0,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![8; 160],
        },
    );
    c.tick_to(20);
    let frames: Vec<Vec<i16>> = c
        .inputs()
        .into_iter()
        .filter_map(|i| match i {
            AgentInput::Playout(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(frames, [vec![8; 160], vec![0; 160]]);
}

#[test]
fn a_full_agent_input_drops_caller_audio_and_counts_it() {
    let mut c = Call::new(params(|p| p.input_allowance = Duration::from_secs(10)));
    let cap = crate::agent::INPUT_CAPACITY_FRAMES as u64;
    for i in 0..cap + 5 {
        c.caller(i, audio(false));
    }
    assert_eq!(c.core.summary().frames_dropped_in, 5);
}

#[test]
fn caller_audio_beyond_the_allowance_is_dropped_before_the_agent() {
    let mut c = Call::new(params(|p| p.input_allowance = Duration::from_millis(200)));
    for _ in 0..30 {
        c.caller(0, audio(false));
    }
    let s = c.core.summary();
    assert_eq!(s.frames_in, 30);
    assert_eq!(
        s.input_overrun_frames, 20,
        "10 frames of 20 ms fit in 200 ms"
    );
    assert_eq!(c.inputs().len(), 10);
}

#[test]
fn transcripts_and_tool_calls_are_kept_in_order() {
    let mut c = Call::new(params(|_| {}));
    c.caller(0, audio(false));
    c.agent(
        10,
        AgentEvent::Transcript {
            speaker: Speaker::Caller,
            text: "hi".into(),
        },
    );
    c.agent(
        20,
        AgentEvent::ToolCall {
            call_id: "c1".into(),
            name: "nope".into(),
            arguments: "{}".into(),
            reply: None,
        },
    );
    let s = c.core.summary();
    assert_eq!(s.transcript, [(Speaker::Caller, "hi".to_owned())]);
    assert_eq!(s.tool_calls[0].name, "nope");
    assert!(
        matches!(&c.inputs()[..], [_, AgentInput::ToolResult { call_id, output }] if call_id == "c1" && output.contains("unknown tool")),
        "an unknown tool is answered at once"
    );
}

fn hangup_tool() -> SessionParams {
    #[derive(serde::Deserialize)]
    struct Tools {
        tools: Vec<crate::tools::ToolConfig>,
    }
    let config: Tools = toml::from_str("[[tools]]\nkind = \"hangup\"\n").unwrap();
    let tools = ToolRegistry::from_config(&config.tools).unwrap();
    params(|p| p.tools = Arc::new(tools))
}

fn hangup_call(reply: Option<ReplyId>) -> AgentEvent {
    AgentEvent::ToolCall {
        call_id: "h".into(),
        name: "hangup".into(),
        arguments: "{}".into(),
        reply,
    }
}

#[test]
fn the_hangup_tool_waits_for_the_goodbye_then_the_quiet_time() {
    let mut c = Call::new(hangup_tool());
    assert_eq!(c.core.info().tools.len(), 1, "declared to the agent");
    c.caller(0, audio(false));
    // Without ReplyDone: the goodbye plays (0..=80 ms), then 800 ms of agent quiet.
    c.agent(
        0,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![4; 5 * 160],
        },
    );
    c.agent(0, hangup_call(None));
    c.run(5_000, |_| Some(false));
    let ended = Outcome::AgentEnded("agent hung up (hangup tool)".into());
    assert_eq!(c.core.outcome(), Some(&ended));
    assert_eq!(c.end_ms(), 800, "last agent audio at 0 ms + TERMINAL_QUIET");

    // With ReplyDone for its reply: as soon as the buffer is empty.
    let mut c = Call::new(hangup_tool());
    c.caller(0, audio(false));
    c.agent(
        0,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![4; 5 * 160],
        },
    );
    c.agent(0, hangup_call(Some(R1)));
    c.agent(0, AgentEvent::ReplyDone { reply: R1 });
    c.run(5_000, |_| Some(false));
    assert_eq!(c.core.outcome(), Some(&ended));
    assert_eq!(c.end_ms(), 80, "the tick that played the last frame");
}

#[test]
fn a_barge_in_cancels_a_pending_hangup() {
    let mut c = Call::new(hangup_tool());
    c.caller(0, audio(false));
    c.agent(
        0,
        AgentEvent::Audio {
            reply: R1,
            samples: vec![4; 50 * 160],
        },
    );
    c.agent(0, hangup_call(Some(R1)));
    c.tick_to(100);
    c.agent(110, AgentEvent::SpeechStarted);
    c.run(3_000, |_| Some(false));
    assert!(
        c.core.outcome().is_none(),
        "the caller goes on: {:?}",
        c.core.outcome()
    );
    assert!(c.inputs().iter().any(|i| matches!(i, AgentInput::ToolResult { call_id, output } if call_id == "h" && output.contains("interrupted"))));
}
