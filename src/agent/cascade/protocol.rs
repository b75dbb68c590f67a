//! The cascade's conversation, sans-IO: the history, the replies, Deepgram Flux's
//! speculation, barge-in, tool calls, the keypad and what the caller heard, decided without
//! a socket, a channel or a clock.
//!
//! The protocol is fed with what happened, each time with `now` passed in:
//!
//! | input | from |
//! |---|---|
//! | [`CascadeProtocol::start`] | the call's start (greeting) |
//! | [`CascadeProtocol::handle_input`] | an [`AgentInput`] of the call |
//! | [`CascadeProtocol::handle_stt`] | an [`SttEvent`] of the STT session |
//! | [`CascadeProtocol::handle_llm`] | an [`LlmEvent`] of LLM request [`LlmId`] |
//! | [`CascadeProtocol::handle_tts`] | a [`TtsEvent`] of the TTS stream of a [`ReplyId`] |
//! | [`CascadeProtocol::handle_timeout`] | [`CascadeProtocol::poll_timeout`] came (keypad) |
//!
//! and answers with [`CascadeOut`]s, in order: audio or a finalize request for the STT, an
//! LLM request to start (with its messages) or drop, a reply's TTS stream to open, feed,
//! finish or drop, an [`AgentEvent`] for the call, or the failure that ends the session. The
//! driver (`super::driver`) carries them out. The protocol never panics on input; a stream
//! event for a request or reply it has dropped is ignored.

use super::config::CascadeConfig;
use super::llm::{LlmEvent, ToolCallRequest};
use super::reply::{Marks, Reply, sentence_end};
use super::stt::SttEvent;
use super::tts::TtsEvent;
use crate::agent::keypad::Keypad;
use crate::agent::{AgentError, AgentEvent, AgentInput, CallInfo, Speaker, TurnLatency};
use crate::audio::bargein::BargeInConfig;
use crate::audio::vad::{Vad, VadEvent};
use crate::audio::{ReplyId, slin_from_le_bytes};
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info};

/// Caller frames kept while the STT is fed silence (echo only), sent when speech starts
/// (25 × 20 ms = 500 ms).
const PREROLL_FRAMES: usize = 25;

/// Zeros the STT gets instead of echo (one frame of up to 48 kHz slin).
static ZEROS: [u8; 1_920] = [0; 1_920];

/// The STT's interim words confirm a barge-in only if the VAD heard the caller this
/// recently (the echo gate).
const VOICED_RECENTLY: Duration = Duration::from_millis(1_500);

/// A turn's end of speech older than this is not trusted for its latency marks.
const SPEECH_END_MAX_AGE: Duration = Duration::from_secs(10);

/// The `tool` message that stands in for a result that never came.
const NO_RESULT: &str = "{\"error\":\"no result: the caller spoke again before it came\"}";

/// One LLM request of a call, numbered by the protocol from 1 (a speculative request has
/// no reply yet, so requests have their own numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LlmId(u64);

/// What the protocol asks its driver to do, in order.
#[derive(Debug)]
pub(crate) enum CascadeOut {
    /// Caller audio for the STT: slin LE bytes at the call rate (zeros while only echo can
    /// be on the line). Dropped and counted when the STT's queue is full.
    SttAudio(Bytes),
    /// The caller stopped `trailing_silence_ms` ago: vendors that can finalize on request
    /// end the turn now.
    SttFinalize {
        /// Silence already sent after the last voiced frame, ms.
        trailing_silence_ms: u32,
    },
    /// Open the call's TTS socket ahead of the first reply (`ws` mode).
    TtsConnect,
    /// Start streaming a Chat Completions request of `messages`.
    LlmStart {
        /// The request's number.
        llm: LlmId,
        /// The whole conversation, system prompt first.
        messages: Vec<Value>,
    },
    /// Forget request `llm`, cancelling it if it still runs (nothing if already gone).
    LlmDrop {
        /// The request.
        llm: LlmId,
    },
    /// Open the TTS stream of `reply`.
    TtsOpen {
        /// The reply.
        reply: ReplyId,
    },
    /// One sentence (or the tail) of `reply` for its TTS stream.
    TtsText {
        /// The reply.
        reply: ReplyId,
        /// The text, trimmed.
        text: String,
    },
    /// No more text for `reply`'s TTS stream.
    TtsFinish {
        /// The reply.
        reply: ReplyId,
    },
    /// Close `reply`'s TTS stream, cancelling it unless it is done.
    TtsDrop {
        /// The reply.
        reply: ReplyId,
    },
    /// Give the call this event.
    Event(AgentEvent),
    /// A provider failed: [`AgentEvent::Failed`] goes to the call and the session ends.
    Fail(AgentError),
}

/// An LLM request started on Deepgram Flux's `EagerEndOfTurn`, before the caller's turn is
/// final (developers.deepgram.com `docs/flux/voice-agent-eager-eot`): dropped (which
/// cancels it) on `TurnResumed`; on `EndOfTurn` it becomes the reply if it answers the same
/// words with the same history, else a fresh request is made. Nothing of it reaches the TTS
/// before then: its events wait here.
#[derive(Debug)]
struct Speculation {
    /// The caller's words it answers.
    text: String,
    /// The messages it sent.
    messages: Vec<Value>,
    llm: LlmId,
    /// Its events so far, up to and including its last (`Done` or `Failed`).
    early: Vec<LlmEvent>,
}

impl Speculation {
    /// The request has said its last word.
    fn ended(&self) -> bool {
        matches!(
            self.early.last(),
            Some(LlmEvent::Done { .. } | LlmEvent::Failed(_))
        )
    }
}

/// One call's conversation; see the module docs.
#[derive(Debug)]
pub(crate) struct CascadeProtocol {
    rate_hz: u32,
    barge_in: BargeInConfig,
    /// `[agent.vad] hang_ms`: the silence the STT has had when the VAD says speech ended.
    hang_ms: u32,
    /// The greeting, placeholders filled, until [`CascadeProtocol::start`] speaks it.
    greeting: Option<String>,
    vad: Vad,
    history: Vec<Value>,
    next_reply: u64,
    next_llm: u64,
    reply: Option<Reply>,
    /// Tool calls asked for and not yet answered.
    outstanding_tools: Vec<String>,
    /// Ask the LLM again once all tool results are in.
    continue_after_tools: bool,
    last_voice: Option<Instant>,
    suppressing: bool,
    preroll: VecDeque<Bytes>,
    samples: Vec<i16>,
    /// Keypad digits typed and not yet sent as a caller turn.
    keypad: Keypad,
    /// A reply's LLM request started early on `EagerEndOfTurn`.
    speculation: Option<Speculation>,
    /// A [`CascadeOut::Fail`] went out: the session is over, input is ignored.
    failed: bool,
}

impl CascadeProtocol {
    /// The conversation of `call` under `cfg`, the history holding `system_prompt` with the
    /// call's `{placeholders}` filled (caller number, called number, custom variables).
    pub(crate) fn new(cfg: &CascadeConfig, system_prompt: &str, call: &CallInfo) -> Self {
        let prompt = crate::agent::fill_placeholders(system_prompt, &call.variables);
        let greeting = cfg
            .greeting
            .as_deref()
            .map(|g| crate::agent::fill_placeholders(g, &call.variables));
        CascadeProtocol {
            rate_hz: call.rate_hz,
            barge_in: cfg.barge_in.clone(),
            hang_ms: cfg.vad.hang_ms,
            greeting,
            vad: Vad::new(cfg.vad.clone()),
            history: vec![json!({"role": "system", "content": prompt})],
            next_reply: 1,
            next_llm: 1,
            reply: None,
            outstanding_tools: Vec::new(),
            continue_after_tools: false,
            last_voice: None,
            suppressing: false,
            preroll: VecDeque::with_capacity(PREROLL_FRAMES),
            samples: Vec::with_capacity(960),
            keypad: Keypad::default(),
            speculation: None,
            failed: false,
        }
    }

    /// The call starts: the TTS socket opens now, while the caller is still speaking, so
    /// that the first reply does not wait for a handshake; the greeting, if any, is spoken
    /// and enters the history.
    pub(crate) fn start(&mut self, now: Instant, out: &mut Vec<CascadeOut>) {
        let _ = now;
        out.push(CascadeOut::TtsConnect);
        let Some(greeting) = self.greeting.take() else {
            return;
        };
        self.history
            .push(json!({"role": "assistant", "content": greeting}));
        let mut r = self.new_reply(false, out);
        r.history_index = Some(self.history.len() - 1);
        r.text = greeting.clone();
        r.sent = format!("{} ", greeting.trim());
        out.push(CascadeOut::TtsText {
            reply: r.id,
            text: greeting,
        });
        out.push(CascadeOut::TtsFinish { reply: r.id });
        self.reply = Some(r);
    }

    /// An input from the call.
    pub(crate) fn handle_input(
        &mut self,
        now: Instant,
        input: AgentInput,
        out: &mut Vec<CascadeOut>,
    ) {
        if self.failed {
            return;
        }
        match input {
            AgentInput::Audio(bytes) => self.on_caller_audio(now, bytes, out),
            AgentInput::Playout(frame) => self.on_playout(&frame),
            AgentInput::Dtmf(d) => self.on_dtmf(now, d, out),
            AgentInput::Interrupted { reply, heard_ms } => {
                if self.reply.as_ref().is_some_and(|r| r.id == reply) {
                    self.finish_interrupted(heard_ms, out);
                }
            }
            AgentInput::PlayedOut { reply } => {
                if self
                    .reply
                    .as_ref()
                    .is_some_and(|r| r.id == reply && r.streamed)
                {
                    self.finish_played(out);
                    self.maybe_continue(out);
                }
            }
            AgentInput::ToolResult { call_id, output } => self.on_tool_result(call_id, output, out),
        }
    }

    /// An event of the STT session.
    pub(crate) fn handle_stt(&mut self, now: Instant, ev: SttEvent, out: &mut Vec<CascadeOut>) {
        if self.failed {
            return;
        }
        match ev {
            SttEvent::Interim(text) => self.on_interim(now, text, out),
            SttEvent::EndOfTurn(text) => self.on_end_of_turn(now, text, out),
            SttEvent::EagerEndOfTurn(text) => self.on_eager_end_of_turn(text, out),
            SttEvent::TurnResumed => {
                if let Some(s) = self.speculation.take() {
                    info!("caller went on: speculative reply cancelled");
                    out.push(CascadeOut::LlmDrop { llm: s.llm });
                }
            }
            SttEvent::Failed(e) => self.fail(e, out),
        }
    }

    /// An event of LLM request `llm` (the driver turns the end of its stream without `Done`
    /// or `Failed` into a `Failed`).
    pub(crate) fn handle_llm(
        &mut self,
        now: Instant,
        llm: LlmId,
        ev: LlmEvent,
        out: &mut Vec<CascadeOut>,
    ) {
        if self.failed {
            return;
        }
        if let Some(s) = self.speculation.as_mut().filter(|s| s.llm == llm) {
            if !s.ended() {
                s.early.push(ev);
            }
            return;
        }
        let Some(r) = self.reply.as_mut().filter(|r| r.llm == Some(llm)) else {
            debug!(llm = llm.0, "event of a dropped llm request ignored");
            return;
        };
        match ev {
            LlmEvent::Text(delta) => {
                if let Some(m) = r.marks.as_mut() {
                    m.llm_first.get_or_insert(now);
                }
                r.text.push_str(&delta);
                r.pending.push_str(&delta);
                while let Some(end) = sentence_end(&r.pending) {
                    let sentence: String = r.pending.drain(..end).collect();
                    send_sentence(r, sentence, out);
                }
            }
            LlmEvent::ToolCalls(calls) => self.on_tool_calls(now, calls, out),
            LlmEvent::Done { finish_reason } => {
                debug!(?finish_reason, "llm done");
                r.llm = None;
                out.push(CascadeOut::LlmDrop { llm });
                let rest = std::mem::take(&mut r.pending);
                send_sentence(r, rest, out);
                if r.tts {
                    out.push(CascadeOut::TtsFinish { reply: r.id });
                }
                if r.history_index.is_none() {
                    self.history
                        .push(json!({"role": "assistant", "content": r.text}));
                    r.history_index = Some(self.history.len() - 1);
                }
            }
            LlmEvent::Failed(e) => self.fail(e, out),
        }
    }

    /// An event of the TTS stream of `reply` (the driver turns the end of its stream
    /// without `Done` or `Failed` into a `Failed`).
    pub(crate) fn handle_tts(
        &mut self,
        now: Instant,
        reply: ReplyId,
        ev: TtsEvent,
        out: &mut Vec<CascadeOut>,
    ) {
        if self.failed {
            return;
        }
        let Some(r) = self.reply.as_mut().filter(|r| r.id == reply && r.tts) else {
            debug!(reply = reply.0, "event of a dropped tts stream ignored");
            return;
        };
        match ev {
            TtsEvent::Audio(samples) => {
                if r.tts_first.is_none() {
                    r.tts_first = Some(now);
                    if let Some(lat) = r.marks.map(|m| latency(r.id, m, now)) {
                        info!(
                            reply = reply.0,
                            stt_final_ms = ?lat.stt_final_ms,
                            llm_first_token_ms = ?lat.llm_first_token_ms,
                            tts_first_audio_ms = ?lat.tts_first_audio_ms,
                            "turn latency (from end of caller speech)"
                        );
                        out.push(CascadeOut::Event(AgentEvent::TurnLatency(lat)));
                    }
                }
                r.audio_samples += samples.len() as u64;
                out.push(CascadeOut::Event(AgentEvent::Audio { reply, samples }));
            }
            TtsEvent::Chars(chars) => r.chars.extend(chars),
            TtsEvent::Done => {
                r.tts = false;
                r.streamed = true;
                out.push(CascadeOut::TtsDrop { reply });
                out.push(CascadeOut::Event(AgentEvent::ReplyDone { reply }));
                self.maybe_continue(out);
            }
            TtsEvent::Failed(e) => self.fail(e, out),
        }
    }

    /// [`CascadeProtocol::poll_timeout`] has come: typed digits become the caller's turn.
    pub(crate) fn handle_timeout(&mut self, now: Instant, out: &mut Vec<CascadeOut>) {
        if self.failed || self.keypad.deadline().is_none_or(|d| d > now) {
            return;
        }
        if let Some(text) = self.keypad.take() {
            self.on_end_of_turn(now, text, out);
        }
    }

    /// When [`CascadeProtocol::handle_timeout`] is next due: the keypad's turn, if digits
    /// are waiting.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.keypad.deadline()
    }

    fn fail(&mut self, e: AgentError, out: &mut Vec<CascadeOut>) {
        self.failed = true;
        out.push(CascadeOut::Fail(e));
    }

    fn emit(out: &mut Vec<CascadeOut>, ev: AgentEvent) {
        out.push(CascadeOut::Event(ev));
    }

    /// One frame the call played: the VAD's echo reference, and the reply's played time.
    fn on_playout(&mut self, frame: &[i16]) {
        self.vad.reference(frame);
        if let Some(r) = self.reply.as_mut() {
            if r.audio_samples > 0 && frame.iter().any(|&s| s != 0) {
                r.played_ms += (frame.len() as u64 * 1000) / self.rate_hz as u64;
            }
        }
    }

    fn on_tool_result(&mut self, call_id: String, output: String, out: &mut Vec<CascadeOut>) {
        if let Some(i) = self.outstanding_tools.iter().position(|id| *id == call_id) {
            self.outstanding_tools.remove(i);
            self.history.push(json!({
                "role": "tool", "tool_call_id": call_id, "content": output,
            }));
            self.maybe_continue(out);
        } else {
            debug!(call_id = %call_id, "result for an unknown tool call ignored");
        }
    }

    /// A keypad digit: the first one stops the agent talking (like a barge-in); the digits
    /// become one caller turn (see [`Keypad`]).
    fn on_dtmf(&mut self, now: Instant, digit: char, out: &mut Vec<CascadeOut>) {
        debug!(digit = %digit, "dtmf");
        if self.keypad.is_empty() && self.agent_talking() {
            self.barge_in(out);
        }
        if let Some(text) = self.keypad.push_at(digit, now) {
            self.on_end_of_turn(now, text, out);
        }
    }

    fn on_caller_audio(&mut self, now: Instant, bytes: Bytes, out: &mut Vec<CascadeOut>) {
        self.samples.clear();
        slin_from_le_bytes(&bytes, &mut self.samples);
        let verdict = self.vad.process(&self.samples);
        if verdict.speech {
            self.last_voice = Some(now);
        }
        if verdict.event == Some(VadEvent::SpeechStarted)
            && self.agent_talking()
            && !self.words_decide()
        {
            self.barge_in(out);
        }
        // The caller stopped: vendors that can finalize on request end the turn now.
        if verdict.event == Some(VadEvent::SpeechEnded) {
            out.push(CascadeOut::SttFinalize {
                trailing_silence_ms: self.hang_ms,
            });
        }
        // While only the agent's echo can be on the line, the STT hears silence.
        let suppress = verdict.echo_possible && !self.vad.in_speech();
        if suppress {
            if self.preroll.len() == PREROLL_FRAMES {
                self.preroll.pop_front();
            }
            self.preroll.push_back(bytes.clone());
            let zeros = if bytes.len() <= ZEROS.len() {
                Bytes::from_static(&ZEROS[..bytes.len()])
            } else {
                Bytes::from(vec![0u8; bytes.len()])
            };
            out.push(CascadeOut::SttAudio(zeros));
        } else {
            // The caller started speaking over the agent: the STT gets the frames it missed.
            // (When the echo merely faded, they are echo and are dropped.)
            if self.suppressing && self.vad.in_speech() {
                out.extend(self.preroll.drain(..).map(CascadeOut::SttAudio));
            }
            self.preroll.clear();
            out.push(CascadeOut::SttAudio(bytes));
        }
        self.suppressing = suppress;
    }

    /// With local barge-in on (`[agent.barge_in]`) the call pauses playout on the caller's
    /// voice at once and the STT's words confirm the barge-in; off, the VAD alone does.
    fn words_decide(&self) -> bool {
        self.barge_in.enabled
    }

    /// The STT's first words while the agent talks confirm a barge-in (when
    /// [`Self::words_decide`]): words the VAD heard as the caller's speech within the last
    /// 1.5 s (the echo gate), that are not a configured backchannel.
    fn on_interim(&mut self, now: Instant, text: String, out: &mut Vec<CascadeOut>) {
        debug!(text = %text, "stt interim");
        let voiced = self
            .last_voice
            .is_some_and(|t| now.duration_since(t) < VOICED_RECENTLY);
        if self.words_decide()
            && self.agent_talking()
            && voiced
            && !text.trim().is_empty()
            && !self.barge_in.is_backchannel(&text)
        {
            info!(text = %text, "barge-in: the caller's words over the reply");
            self.barge_in(out);
        }
    }

    /// A reply is being heard (its audio has started and it has not been played out or
    /// interrupted). While the LLM is still thinking, caller speech is not a barge-in: the
    /// STT's next end of turn supersedes the reply instead.
    fn agent_talking(&self) -> bool {
        self.reply
            .as_ref()
            .is_some_and(|r| !r.interrupted && r.audio_samples > 0)
    }

    /// Starts an LLM request of `messages`.
    fn start_llm(&mut self, messages: Vec<Value>, out: &mut Vec<CascadeOut>) -> LlmId {
        let llm = LlmId(self.next_llm);
        self.next_llm += 1;
        out.push(CascadeOut::LlmStart { llm, messages });
        llm
    }

    /// The next reply, its TTS stream open; `with_llm`: its LLM request answers the history.
    fn new_reply(&mut self, with_llm: bool, out: &mut Vec<CascadeOut>) -> Reply {
        let id = ReplyId(self.next_reply);
        self.next_reply += 1;
        let llm = with_llm.then(|| self.start_llm(self.history.clone(), out));
        out.push(CascadeOut::TtsOpen { reply: id });
        Reply::new(id, llm)
    }

    /// The history a caller turn of `text` is answered with: placeholder results for tool
    /// calls still unanswered (Chat Completions refuses a history whose assistant
    /// `tool_calls` are not each followed by a `tool` message: 400 "An assistant message
    /// with 'tool_calls' must be followed by tool messages responding to each
    /// 'tool_call_id'"; their late results are ignored), then the caller's words.
    fn turn_messages(&self, text: &str) -> Vec<Value> {
        let mut m = self.history.clone();
        for id in &self.outstanding_tools {
            m.push(json!({"role": "tool", "tool_call_id": id, "content": NO_RESULT}));
        }
        m.push(json!({"role": "user", "content": text}));
        m
    }

    /// Flux's `EagerEndOfTurn`: the reply's LLM request starts now (a newer one replaces
    /// it). Only while no reply runs: superseding one changes the history the request
    /// would have to carry.
    fn on_eager_end_of_turn(&mut self, text: String, out: &mut Vec<CascadeOut>) {
        let text = text.trim().to_owned();
        if text.is_empty() || self.reply.is_some() {
            return;
        }
        let messages = self.turn_messages(&text);
        info!(text = %text, "eager end of turn: speculative reply started");
        let llm = self.start_llm(messages.clone(), out);
        let next = Speculation {
            text,
            messages,
            llm,
            early: Vec::new(),
        };
        if let Some(old) = self.speculation.replace(next) {
            out.push(CascadeOut::LlmDrop { llm: old.llm });
        }
    }

    /// The caller's turn is over (the STT's end of turn, or the keypad's digits).
    fn on_end_of_turn(&mut self, now: Instant, text: String, out: &mut Vec<CascadeOut>) {
        let speculation = self.speculation.take();
        let text = text.trim().to_owned();
        // A backchannel ("uh-huh") while the agent talks is not a turn: the call resumes
        // the reply it paused, and the reply goes on.
        let backchannel = self.agent_talking() && self.barge_in.is_backchannel(&text);
        if text.is_empty() || backchannel {
            if backchannel {
                info!(text = %text, "backchannel while the agent talks; not a turn");
                Self::emit(out, caller_transcript(text));
            }
            if let Some(s) = speculation {
                out.push(CascadeOut::LlmDrop { llm: s.llm });
            }
            return;
        }
        let speech_end = self
            .last_voice
            .filter(|t| now.duration_since(*t) < SPEECH_END_MAX_AGE)
            .unwrap_or(now);
        self.supersede_reply(out);
        info!(text = %text, "caller turn");
        Self::emit(out, caller_transcript(text.clone()));
        self.history = self.turn_messages(&text);
        self.outstanding_tools.clear();
        self.continue_after_tools = false;
        let early = match speculation {
            Some(s) if s.text == text && s.messages == self.history => {
                info!("end of turn confirms the eager one: speculative reply used");
                Some(s)
            }
            Some(s) => {
                info!("end of turn differs from the eager one: speculative reply replaced");
                out.push(CascadeOut::LlmDrop { llm: s.llm });
                None
            }
            None => None,
        };
        let mut r = self.new_reply(early.is_none(), out);
        r.marks = Some(Marks {
            speech_end,
            stt_final: now,
            llm_first: None,
        });
        if let Some(s) = early {
            r.llm = Some(s.llm);
            self.reply = Some(r);
            // What the request said while it waited goes on as if it came now.
            for ev in s.early {
                self.handle_llm(now, s.llm, ev, out);
            }
        } else {
            self.reply = Some(r);
        }
    }

    /// A reply still running is superseded by the caller's new turn.
    fn supersede_reply(&mut self, out: &mut Vec<CascadeOut>) {
        let Some(r) = self.reply.as_ref() else {
            return;
        };
        if r.streamed && !r.interrupted {
            self.finish_played(out);
        } else {
            if !r.interrupted {
                self.barge_in(out);
            }
            let heard = self.reply.as_ref().map_or(0, |r| r.played_ms);
            self.finish_interrupted(heard, out);
        }
    }

    /// The reply's tool calls: they enter the history and go to the call; the LLM is asked
    /// again once every result is in.
    fn on_tool_calls(
        &mut self,
        now: Instant,
        calls: Vec<ToolCallRequest>,
        out: &mut Vec<CascadeOut>,
    ) {
        let Some(r) = self.reply.as_mut() else {
            return;
        };
        if let Some(m) = r.marks.as_mut() {
            m.llm_first.get_or_insert(now);
        }
        let content = (!r.text.trim().is_empty()).then(|| r.text.clone());
        self.history.push(assistant_with_tools(content, &calls));
        r.history_index = Some(self.history.len() - 1);
        self.continue_after_tools = true;
        let id = r.id;
        for c in calls {
            info!(tool = %c.name, call_id = %c.id, "tool call");
            self.outstanding_tools.push(c.id.clone());
            Self::emit(
                out,
                AgentEvent::ToolCall {
                    call_id: c.id,
                    name: c.name,
                    arguments: c.arguments,
                    reply: Some(id),
                },
            );
        }
    }

    /// The caller spoke over the reply: flush, cancel the LLM and the TTS.
    fn barge_in(&mut self, out: &mut Vec<CascadeOut>) {
        let Some(r) = self.reply.as_mut() else {
            return;
        };
        info!(reply = r.id.0, "barge-in: cancelling llm and tts");
        r.interrupted = true;
        release(r, out);
        self.continue_after_tools = false;
        let nothing_played = r.audio_samples == 0;
        Self::emit(out, AgentEvent::SpeechStarted);
        if nothing_played {
            // The call has nothing to flush and will not answer.
            self.finish_interrupted(0, out);
        }
    }

    /// Keeps the heard part of the interrupted reply in the history.
    fn finish_interrupted(&mut self, heard_ms: u64, out: &mut Vec<CascadeOut>) {
        let Some(mut r) = self.reply.take() else {
            return;
        };
        let heard = r.heard_text(heard_ms, self.rate_hz);
        info!(reply = r.id.0, heard_ms, heard = %heard, "reply interrupted");
        match r.history_index {
            Some(i) => {
                let has_tools = self.history[i].get("tool_calls").is_some();
                if heard.is_empty() && !has_tools {
                    self.history.remove(i);
                } else {
                    self.history[i]["content"] = if heard.is_empty() {
                        Value::Null
                    } else {
                        heard.clone().into()
                    };
                }
            }
            None if !heard.is_empty() => self
                .history
                .push(json!({"role": "assistant", "content": heard})),
            None => {}
        }
        if !heard.is_empty() {
            Self::emit(
                out,
                AgentEvent::Transcript {
                    speaker: Speaker::Agent,
                    text: heard,
                },
            );
        }
        release(&mut r, out);
    }

    /// The reply was played out: its words go to the call's transcript.
    fn finish_played(&mut self, out: &mut Vec<CascadeOut>) {
        let Some(mut r) = self.reply.take() else {
            return;
        };
        let text = r.text.trim().to_owned();
        if !text.is_empty() {
            Self::emit(
                out,
                AgentEvent::Transcript {
                    speaker: Speaker::Agent,
                    text,
                },
            );
        }
        release(&mut r, out);
    }

    /// After tool results: ask the LLM again once every result is in and the reply that
    /// asked has finished streaming.
    fn maybe_continue(&mut self, out: &mut Vec<CascadeOut>) {
        if !self.continue_after_tools || !self.outstanding_tools.is_empty() {
            return;
        }
        if let Some(r) = &self.reply {
            if !r.streamed {
                return;
            }
            self.finish_played(out);
        }
        self.continue_after_tools = false;
        let r = self.new_reply(true, out);
        self.reply = Some(r);
    }
}

/// Drops the reply's LLM request and TTS stream, if they still run.
fn release(r: &mut Reply, out: &mut Vec<CascadeOut>) {
    if let Some(llm) = r.llm.take() {
        out.push(CascadeOut::LlmDrop { llm });
    }
    if std::mem::take(&mut r.tts) {
        out.push(CascadeOut::TtsDrop { reply: r.id });
    }
}

/// The latency marks of reply `id`'s turn, its first audio at `now`, ms from the end of the
/// caller's speech.
fn latency(id: ReplyId, m: Marks, now: Instant) -> TurnLatency {
    let ms = |t: Instant| t.duration_since(m.speech_end).as_millis() as u64;
    TurnLatency {
        reply: id.0,
        stt_final_ms: Some(ms(m.stt_final)),
        llm_first_token_ms: m.llm_first.map(ms),
        tts_first_audio_ms: Some(ms(now)),
        first_frame_ms: None,
    }
}

fn caller_transcript(text: String) -> AgentEvent {
    AgentEvent::Transcript {
        speaker: Speaker::Caller,
        text,
    }
}

/// Sends one sentence to the reply's TTS; `sent` records exactly the text the TTS gets
/// (trimmed, one space after each sentence), so character alignment maps onto it 1:1.
fn send_sentence(r: &mut Reply, sentence: String, out: &mut Vec<CascadeOut>) {
    let t = sentence.trim();
    if t.is_empty() || !r.tts {
        return;
    }
    r.sent.push_str(t);
    r.sent.push(' ');
    out.push(CascadeOut::TtsText {
        reply: r.id,
        text: t.to_owned(),
    });
}

fn assistant_with_tools(content: Option<String>, calls: &[ToolCallRequest]) -> Value {
    json!({
        "role": "assistant",
        "content": content,
        "tool_calls": calls.iter().map(|c| json!({
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
