//! Fuzzes the sans-IO call core (`voicegate::call::core::CallCore`) through its live
//! handlers: arbitrary caller messages (audio at any rate and length, DTMF, hangup, error
//! frames, a second call id, read errors), arbitrary agent events (audio for any reply,
//! barge-in, reply ends, latencies, tool calls, end, failure, a vanished agent), ARI input
//! and arbitrary time steps. It must never panic, and it must keep its promises:
//! - every frame out is one well-formed AudioSocket audio frame of 20 ms at the call's rate
//!   (8 kHz before the first audio);
//! - no frame after the end, and the end is final;
//! - `agent_frames_out <= frames_out`, and the duration is exactly the time passed in.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use voicegate::agent::{AgentError, AgentEvent, AgentInput, CallInfo, Speaker, TurnLatency};
use voicegate::audio::ReplyId;
use voicegate::audiosocket::codec::{self, Message, SlinRate};
use voicegate::audiosocket::ReadError;
use voicegate::call::SessionParams;
use voicegate::call::core::CallCore;

/// Reads the fuzz input as a tape of small numbers.
struct Tape<'a>(&'a [u8]);

impl Tape<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

fn caller_message(t: &mut Tape) -> Option<Result<Option<Message>, ReadError>> {
    Some(match t.byte()? % 8 {
        0..=2 => {
            let rate = SlinRate::ALL[t.byte()? as usize % SlinRate::ALL.len()];
            let len = (t.byte()? as usize * 8) & !1;
            let payload = t.bytes(len).to_vec();
            let payload = Bytes::from(payload[..payload.len() & !1].to_vec());
            Ok(Some(Message::Audio { rate, payload }))
        }
        3 => Ok(Some(Message::Dtmf(b"0123456789*#ABCD"[t.byte()? as usize % 16] as char))),
        4 => Ok(Some(Message::Error(t.byte()?))),
        5 => Ok(Some(Message::CallId(uuid::Uuid::from_u128(t.byte()? as u128)))),
        6 => Ok(None),
        _ => Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into())),
    })
}

fn agent_event(t: &mut Tape) -> Option<Option<AgentEvent>> {
    let reply = ReplyId(u64::from(t.byte()? % 4));
    Some(Some(match t.byte()? % 10 {
        0..=2 => {
            let n = t.byte()? as usize * 20;
            let v = i16::from(t.byte()?) * 100;
            AgentEvent::Audio { reply, samples: vec![v; n] }
        }
        3 => AgentEvent::ReplyDone { reply },
        4 => AgentEvent::SpeechStarted,
        5 => AgentEvent::TurnLatency(TurnLatency {
            reply: reply.0,
            stt_final_ms: None,
            llm_first_token_ms: None,
            tts_first_audio_ms: Some(u64::from(t.byte()?)),
            first_frame_ms: None,
        }),
        6 => AgentEvent::Transcript { speaker: Speaker::Agent, text: "x".into() },
        7 => AgentEvent::ToolCall {
            call_id: "c".into(),
            name: ["hangup", "lookup"][t.byte()? as usize % 2].into(),
            arguments: "{}".into(),
            reply: Some(reply),
        },
        8 => AgentEvent::Ended { reason: "bye".into() },
        _ => match t.byte()? % 2 {
            0 => AgentEvent::Failed(AgentError::Provider { provider: "fuzz", detail: "x".into() }),
            _ => return Some(None),
        },
    }))
}

/// Checks one frame out: a whole audio frame of 20 ms at `rate`.
fn check_frame(frame: &[i16], rate: SlinRate) {
    // As the AudioSocket port writes it.
    let mut buf = BytesMut::new();
    codec::encode_audio_samples(rate, frame, &mut buf);
    match codec::decode(&mut buf) {
        Ok(Some(Message::Audio { rate: r, payload })) => {
            assert_eq!(r, rate);
            assert_eq!(payload.len(), rate.bytes_per_frame());
            assert!(buf.is_empty(), "one frame per tick");
        }
        other => panic!("not an audio frame: {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut t = Tape(data);
    let t0 = Instant::now();
    let mut now = t0;
    let info = CallInfo {
        call_id: uuid::Uuid::from_u128(1),
        rate_hz: 0,
        caller_number: None,
        caller_name: None,
        tools: Vec::new(),
        variables: Default::default(),
    };
    let params = SessionParams {
        max_duration: Some(Duration::from_secs(600)),
        agent_silence: Some(Duration::from_secs(3)),
        ..SessionParams::default()
    };
    let flags = t.byte().unwrap_or(0);
    let mut core = CallCore::new(t0, info, "fuzz", flags & 1 != 0, flags & 2 != 0, params);
    let mut agent: Option<mpsc::Receiver<AgentInput>> = None;
    let mut rate: Option<SlinRate> = None;
    let mut ended = None;
    while let Some(op) = t.byte() {
        match op % 6 {
            0 => {
                let Some(m) = caller_message(&mut t) else { break };
                if let Ok(Some(Message::Audio { rate: r, .. })) = &m {
                    rate.get_or_insert(*r);
                }
                core.handle_caller(now, voicegate::call::media::from_audiosocket(m));
            }
            1 => {
                let Some(ev) = agent_event(&mut t) else { break };
                core.handle_agent(now, ev);
            }
            2 => {
                let d = b"0123456789"[t.byte().unwrap_or(0) as usize % 10] as char;
                core.handle_extra_input(now, AgentInput::Dtmf(d));
            }
            3 | 4 => {
                // Time moves on by 0..=255 ms or, rarely, by seconds; then the driver ticks.
                let step = t.byte().unwrap_or(0) as u64;
                now += if op % 6 == 4 { Duration::from_millis(step) } else { Duration::from_secs(step % 8) };
                while core.poll_timeout() <= now {
                    let due = core.poll_timeout();
                    let at = if t.byte().unwrap_or(0) % 4 == 0 { now } else { due };
                    let r = rate.unwrap_or(SlinRate::Hz8000);
                    assert_eq!(core.rate(), r);
                    match core.poll_tick(at) {
                        Some(frame) => check_frame(frame, r),
                        None => break,
                    }
                    if core.outcome().is_some() {
                        break;
                    }
                }
            }
            _ => {
                if let Some(rx) = agent.as_mut() {
                    while rx.try_recv().is_ok() {}
                }
            }
        }
        if let Some(info) = core.poll_start_agent() {
            assert_eq!(Some(info.rate_hz), rate.map(SlinRate::hz));
            let (tx, rx) = mpsc::channel(4);
            core.agent_started(tx);
            agent = Some(rx);
        }
        match (&ended, core.outcome()) {
            (Some(e), Some(o)) => assert_eq!(e, o, "the end is final"),
            (Some(_), None) => panic!("an ended call came back"),
            (None, o) => ended = o.cloned(),
        }
        if ended.is_some() {
            assert!(core.poll_tick(now + Duration::from_secs(1)).is_none());
        }
    }
    let s = core.summary();
    assert!(s.agent_frames_out <= s.frames_out);
    let s = core.finish(now);
    assert_eq!(s.duration, now - t0);
});
