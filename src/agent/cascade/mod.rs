//! The cascade agent: streaming STT → OpenAI-compatible LLM → streaming TTS, for vendors
//! without a speech-to-speech model.
//!
//! One task per call owns the conversation:
//!
//! ```text
//! caller slin ─▶ VAD (echo-gated) ─▶ STT (Soniox | Deepgram | ElevenLabs) ─end of turn─▶
//!   history + user text ─▶ Chat Completions (SSE) ─text deltas─▶ sentence splitter ─▶
//!   ElevenLabs TTS (WS stream-input | HTTP) ─audio (call format)─▶ AgentEvent::Audio
//! ```
//!
//! - **Latency.** The TTS connection opens while the LLM request is in flight; each sentence
//!   goes to the TTS as soon as the LLM has finished it, so the caller hears the first words
//!   before the LLM is done. Per turn the agent measures end of caller speech (the local
//!   VAD's last voiced frame) → STT end of turn → first LLM token → first TTS audio, and
//!   sends them as [`AgentEvent::TurnLatency`]; the call adds the first frame on the wire.
//! - **Barge-in.** The call sends every frame it plays ([`AgentInput::Playout`], opted in by
//!   [`Agent::wants_playout_reference`]); the [`crate::audio::vad::Vad`] compares the caller leg against it,
//!   so the agent's own voice coming back down the line is not taken for the caller. While
//!   only echo can be present the STT receives silence instead of the echo (the frames are
//!   kept and sent once the caller really speaks). With `[agent.barge_in]` on (the default)
//!   the call pauses playout on the caller's voice at once ([`crate::audio::bargein`]) and
//!   the STT's first words (heard by the VAD as speech, not a configured backchannel)
//!   confirm the barge-in; a backchannel turn while the agent talks is not a turn. With it
//!   off the VAD alone decides. On a confirmed barge-in:
//!   [`AgentEvent::SpeechStarted`] (the call flushes playout and answers
//!   [`AgentInput::Interrupted`] with the heard time), the LLM request and the TTS stream are
//!   cancelled, and the history keeps only the words the caller heard (ElevenLabs' character
//!   alignment, else proportionally).
//! - **Tools.** Tool calls from the LLM become [`AgentEvent::ToolCall`]s; the results come
//!   back as [`AgentInput::ToolResult`] and go into the next request as `tool` messages.
//! - **Keypad.** DTMF digits become a caller turn the LLM reads ("(The caller typed 1234 on
//!   the phone keypad.)"), sent 1 s after the last digit or at once on `#`; the first digit
//!   stops the agent talking, as a barge-in does.
//! - **Failures.** Any provider failing mid-call ends the session with
//!   [`AgentEvent::Failed`] naming the provider.

pub mod config;
pub mod llm;
pub mod stt;
pub mod tts;

pub use config::CascadeConfig;
pub use llm::ToolSpec;

use super::{
    Agent, AgentEndpoint, AgentError, AgentEvent, AgentInput, AgentSession, CallInfo, Speaker,
    TurnLatency,
};
use crate::agent::keypad::Keypad;
use crate::audio::vad::{Vad, VadEvent};
use crate::audio::{ReplyId, slin_from_le_bytes};
use crate::error::ConfigError;
use bytes::Bytes;
use llm::{LlmClient, LlmEvent, LlmSettings, LlmStream, ToolCallRequest};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use stt::{SttEvent, SttHandle};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use tts::{TtsCall, TtsCommand, TtsEvent, TtsSettings, TtsStream};

/// Caller frames kept while the STT is fed silence (echo only), sent when speech starts
/// (25 × 20 ms = 500 ms).
const PREROLL_FRAMES: usize = 25;

/// A sentence longer than this is cut at a comma or space rather than waiting for its end.
const MAX_SENTENCE_CHARS: usize = 200;

/// Zeros the STT gets instead of echo (one frame of up to 48 kHz slin).
static ZEROS: [u8; 1_920] = [0; 1_920];

/// The cascade agent provider: the clients shared by all calls.
#[derive(Debug, Clone)]
pub struct CascadeAgent {
    shared: Arc<Shared>,
}

#[derive(Debug, Clone)]
struct Shared {
    cfg: CascadeConfig,
    stt_key: crate::secret::Secret,
    llm: LlmClient,
    tts: TtsSettings,
    system_prompt: String,
}

impl CascadeAgent {
    /// Builds the provider from `[agent]` (`kind = "cascade"`), offering `tools` to the LLM.
    ///
    /// # Errors
    /// [`ConfigError`] naming the key whose secret, file or header cannot be used.
    pub fn new(cfg: &CascadeConfig, tools: Vec<ToolSpec>) -> Result<Self, ConfigError> {
        let stt_key = cfg
            .stt
            .api_key()
            .resolve()
            .map_err(|e| ConfigError::invalid("agent.stt.api_key", e.to_string()))?;
        let llm_key = cfg
            .llm
            .api_key
            .resolve()
            .map_err(|e| ConfigError::invalid("agent.llm.api_key", e.to_string()))?;
        let tts_key = cfg
            .tts
            .api_key
            .resolve()
            .map_err(|e| ConfigError::invalid("agent.tts.api_key", e.to_string()))?;
        if let Some(lang) = &cfg.tts.language_code {
            if !tts::accepts_language_code(&cfg.tts.model_id) {
                warn!(
                    language_code = lang.as_str(),
                    model_id = cfg.tts.model_id.as_str(),
                    "agent.tts.language_code is not sent: this model does not take one (only eleven_flash_v2_5, eleven_turbo_v2_5 and eleven_v3 do)"
                );
            }
        }
        let system_prompt = cfg.llm.load_system_prompt()?;
        let llm = LlmClient::new(
            LlmSettings {
                url: cfg.llm.url.clone(),
                api_key: llm_key,
                model: cfg.llm.model.clone(),
                temperature: cfg.llm.temperature,
                max_completion_tokens: cfg.llm.max_completion_tokens,
                extra_headers: cfg.llm.extra_headers.clone(),
                timeout: Duration::from_millis(cfg.llm.timeout_ms),
                retries: cfg.llm.retries,
                retry_delay: Duration::from_millis(cfg.llm.retry_delay_ms),
            },
            &tools,
        )
        .map_err(|e| ConfigError::invalid("agent.llm.extra_headers", e.to_string()))?;
        Ok(CascadeAgent {
            shared: Arc::new(Shared {
                cfg: cfg.clone(),
                stt_key,
                llm,
                tts: TtsSettings {
                    cfg: cfg.tts.clone(),
                    key: tts_key,
                },
                system_prompt,
            }),
        })
    }
}

impl Agent for CascadeAgent {
    fn name(&self) -> &'static str {
        "cascade"
    }

    fn wants_playout_reference(&self) -> bool {
        true
    }

    fn barge_in(&self) -> Option<crate::audio::bargein::BargeInConfig> {
        let b = &self.shared.cfg.barge_in;
        b.enabled.then(|| b.clone())
    }

    fn start(&self, call: CallInfo) -> AgentSession {
        let (session, endpoint) = super::session_channel();
        let shared = self.shared.clone();
        let span = tracing::info_span!("cascade", call_id = %call.call_id, rate_hz = call.rate_hz);
        let task = async move {
            let proto = stt::protocol(&shared.cfg.stt, shared.stt_key.clone(), call.rate_hz);
            let stt = stt::spawn(proto, call.rate_hz, shared.cfg.stt.connect_timeout());
            // A call's `[[tools]]` are offered besides those given at construction.
            let shared = if call.tools.is_empty() {
                shared
            } else {
                let mut per_call = (*shared).clone();
                per_call.llm = shared.llm.with_more_tools(&call.tools);
                Arc::new(per_call)
            };
            let mut c = Conversation::new(shared, call, endpoint, stt);
            if let Err(e) = c.run().await {
                warn!(error = %e, "cascade failed");
                let _ = c.io.events.send(AgentEvent::Failed(e)).await;
            }
        };
        let _enter = span.enter();
        super::task::spawn(task);
        session
    }
}

/// When the moments of one turn happened.
#[derive(Debug, Clone, Copy)]
struct Marks {
    speech_end: Instant,
    stt_final: Instant,
    llm_first: Option<Instant>,
}

/// An LLM request started on Deepgram Flux's `EagerEndOfTurn`, before the caller's turn is
/// final (developers.deepgram.com `docs/flux/voice-agent-eager-eot`): dropped (which
/// cancels it) on `TurnResumed`; on `EndOfTurn` it becomes the reply if it answers the same
/// words with the same history, else a fresh request is made. Nothing of it reaches the TTS
/// before then.
#[derive(Debug)]
struct Speculation {
    /// The caller's words it answers.
    text: String,
    /// The messages it sent.
    messages: Vec<serde_json::Value>,
    llm: LlmStream,
}

/// One agent reply, from its LLM request to the end of its playout.
#[derive(Debug)]
struct Reply {
    id: ReplyId,
    llm: Option<LlmStream>,
    tts: Option<TtsStream>,
    /// Everything the LLM said.
    text: String,
    /// LLM text not yet sent to the TTS.
    pending: String,
    /// Text sent to the TTS.
    sent: String,
    /// TTS character timings, ms from the start of the reply's audio.
    chars: Vec<(u64, char)>,
    audio_samples: u64,
    /// Agent-audio frames played (from the playout reference) since the first audio.
    played_ms: u64,
    marks: Option<Marks>,
    tts_first: Option<Instant>,
    /// Index of this reply's assistant message in the history.
    history_index: Option<usize>,
    /// TTS done and `ReplyDone` sent; waiting for `PlayedOut`.
    streamed: bool,
    /// Barged in; waiting for `Interrupted`.
    interrupted: bool,
}

impl Reply {
    /// What the caller heard of this reply after `heard_ms` of its audio.
    fn heard_text(&self, heard_ms: u64, rate_hz: u32) -> String {
        let total_ms = self.audio_samples * 1000 / rate_hz.max(1) as u64;
        if heard_ms >= total_ms && self.streamed {
            return self.text.trim().to_owned();
        }
        let heard: String = if !self.chars.is_empty() {
            // Count the characters whose audio started before the cut and take that much of
            // the text as sent (the LLM's own wording; the TTS got exactly this text).
            let n = self.chars.iter().filter(|(t, _)| *t < heard_ms).count();
            self.sent.chars().take(n).collect()
        } else {
            let n = (self.sent.chars().count() as u64 * heard_ms.min(total_ms))
                .checked_div(total_ms)
                .unwrap_or(0);
            self.sent.chars().take(n as usize).collect()
        };
        cut_to_words(&heard, &self.sent)
    }
}

/// `heard` cut back to its last whole word (unless it is all of `full`).
fn cut_to_words(heard: &str, full: &str) -> String {
    if heard.trim() == full.trim() {
        return heard.trim().to_owned();
    }
    let ends_at_space = heard.ends_with(char::is_whitespace);
    let t = heard.trim_end();
    if ends_at_space || t.ends_with(['.', ',', '!', '?', ';', ':']) {
        return t.to_owned();
    }
    match t.rfind(char::is_whitespace) {
        Some(i) => t[..i].trim_end().to_owned(),
        None => String::new(),
    }
}

/// The byte index after the first complete sentence of `text`, if any.
fn sentence_end(text: &str) -> Option<usize> {
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let terminal = matches!(c, '.' | '!' | '?' | '…' | ';' | '\n');
        if terminal {
            match chars.peek() {
                Some((_, next)) if next.is_whitespace() => return Some(i + c.len_utf8()),
                _ => {}
            }
        }
    }
    if text.len() > MAX_SENTENCE_CHARS {
        let head = &text[..text.floor_char_boundary_compat(MAX_SENTENCE_CHARS)];
        return head
            .rfind(',')
            .map(|i| i + 1)
            .or_else(|| head.rfind(' '))
            .filter(|&i| i > 0);
    }
    None
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        i = i.min(self.len());
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

struct Conversation {
    shared: Arc<Shared>,
    call: CallInfo,
    io: AgentEndpoint,
    stt: SttHandle,
    vad: Vad,
    history: Vec<serde_json::Value>,
    next_reply: u64,
    reply: Option<Reply>,
    /// Tool calls asked for and not yet answered.
    outstanding_tools: Vec<String>,
    /// Ask the LLM again once all tool results are in.
    continue_after_tools: bool,
    last_voice: Option<Instant>,
    suppressing: bool,
    preroll: VecDeque<Bytes>,
    samples: Vec<i16>,
    stt_dropped: u64,
    /// Keypad digits typed and not yet sent as a caller turn.
    keypad: Keypad,
    /// The call's TTS (one WebSocket for all replies in `ws` mode).
    tts: TtsCall,
    /// A reply's LLM request started early on `EagerEndOfTurn`.
    speculation: Option<Speculation>,
}

impl Conversation {
    fn new(shared: Arc<Shared>, call: CallInfo, io: AgentEndpoint, stt: SttHandle) -> Self {
        // The profile's `{placeholders}` (caller number, called number, custom variables).
        let prompt = crate::agent::fill_placeholders(&shared.system_prompt, &call.variables);
        let history = vec![serde_json::json!({"role": "system", "content": prompt})];
        // Opened now, while the caller is still speaking, so that the first reply does not
        // wait for a handshake.
        let mut tts = shared.tts.call(call.rate_hz);
        tts.connect();
        Conversation {
            tts,
            vad: Vad::new(shared.cfg.vad.clone()),
            shared,
            call,
            io,
            stt,
            history,
            next_reply: 1,
            reply: None,
            outstanding_tools: Vec::new(),
            continue_after_tools: false,
            last_voice: None,
            suppressing: false,
            preroll: VecDeque::with_capacity(PREROLL_FRAMES),
            samples: Vec::with_capacity(960),
            stt_dropped: 0,
            keypad: Keypad::default(),
            speculation: None,
        }
    }

    async fn emit(&self, ev: AgentEvent) -> Result<(), Gone> {
        self.io.events.send(ev).await.map_err(|_| Gone)
    }

    async fn run(&mut self) -> Result<(), AgentError> {
        match self.run_inner().await {
            Ok(()) | Err(Stop::Gone) => Ok(()),
            Err(Stop::Failed(e)) => Err(e),
        }
    }

    async fn run_inner(&mut self) -> Result<(), Stop> {
        if let Some(greeting) = self.shared.cfg.greeting.as_deref() {
            let greeting = crate::agent::fill_placeholders(greeting, &self.call.variables);
            self.history
                .push(serde_json::json!({"role": "assistant", "content": greeting}));
            let mut r = self.new_reply(false);
            r.history_index = Some(self.history.len() - 1);
            r.text = greeting.clone();
            if let Some(tts) = &r.tts {
                r.sent = format!("{} ", greeting.trim());
                let _ = tts.text.send(TtsCommand::Text(greeting));
                let _ = tts.text.send(TtsCommand::Finish);
            }
            self.reply = Some(r);
        }
        loop {
            tokio::select! {
                input = self.io.input.recv() => match input {
                    None => {
                        debug!(stt_frames_dropped = self.stt_dropped, "call over");
                        return Ok(());
                    }
                    Some(i) => self.on_input(i).await?,
                },
                ev = self.stt.events.recv() => match ev {
                    Some(SttEvent::Interim(text)) => self.on_interim(text).await?,
                    Some(SttEvent::EndOfTurn(text)) => self.on_end_of_turn(text).await?,
                    Some(SttEvent::EagerEndOfTurn(text)) => self.on_eager_end_of_turn(text),
                    Some(SttEvent::TurnResumed) => {
                        if self.speculation.take().is_some() {
                            info!("caller went on: speculative reply cancelled");
                        }
                    }
                    Some(SttEvent::Failed(e)) => return Err(Stop::Failed(e)),
                    None => return Err(Stop::Failed(AgentError::Provider {
                        provider: self.shared.cfg.stt.provider.name(),
                        detail: "stt task ended".into(),
                    })),
                },
                () = tokio::time::sleep_until(self.keypad.deadline().unwrap_or_else(Instant::now)),
                    if self.keypad.deadline().is_some() => {
                        if let Some(text) = self.keypad.take() {
                            self.on_end_of_turn(text).await?;
                        }
                    }
                ev = next_reply_event(&mut self.reply) => match ev {
                    ReplyEv::Llm(ev) => self.on_llm(ev).await?,
                    ReplyEv::Tts(ev) => self.on_tts(ev).await?,
                },
            }
        }
    }

    async fn on_input(&mut self, input: AgentInput) -> Result<(), Stop> {
        match input {
            AgentInput::Audio(bytes) => self.on_caller_audio(bytes).await?,
            AgentInput::Playout(frame) => {
                self.vad.reference(&frame);
                if let Some(r) = self.reply.as_mut() {
                    if r.audio_samples > 0 && frame.iter().any(|&s| s != 0) {
                        r.played_ms += (frame.len() as u64 * 1000) / self.call.rate_hz as u64;
                    }
                }
            }
            AgentInput::Dtmf(d) => self.on_dtmf(d).await?,
            AgentInput::Interrupted { reply, heard_ms } => {
                if self.reply.as_ref().is_some_and(|r| r.id == reply) {
                    self.finish_interrupted(heard_ms).await?;
                }
            }
            AgentInput::PlayedOut { reply } => {
                if self
                    .reply
                    .as_ref()
                    .is_some_and(|r| r.id == reply && r.streamed)
                {
                    self.finish_played().await?;
                    self.maybe_continue().await?;
                }
            }
            AgentInput::ToolResult { call_id, output } => {
                if let Some(i) = self.outstanding_tools.iter().position(|id| *id == call_id) {
                    self.outstanding_tools.remove(i);
                    self.history.push(serde_json::json!({
                        "role": "tool", "tool_call_id": call_id, "content": output,
                    }));
                    self.maybe_continue().await?;
                } else {
                    debug!(call_id = %call_id, "result for an unknown tool call ignored");
                }
            }
        }
        Ok(())
    }

    /// A keypad digit: the first one stops the agent talking (like a barge-in); the digits
    /// become one caller turn (see [`Keypad`]).
    async fn on_dtmf(&mut self, digit: char) -> Result<(), Stop> {
        debug!(digit = %digit, "dtmf");
        if self.keypad.is_empty() && self.agent_talking() {
            self.barge_in().await?;
        }
        if let Some(text) = self.keypad.push(digit) {
            self.on_end_of_turn(text).await?;
        }
        Ok(())
    }

    async fn on_caller_audio(&mut self, bytes: Bytes) -> Result<(), Stop> {
        self.samples.clear();
        slin_from_le_bytes(&bytes, &mut self.samples);
        let verdict = self.vad.process(&self.samples);
        if verdict.speech {
            self.last_voice = Some(Instant::now());
        }
        if verdict.event == Some(VadEvent::SpeechStarted)
            && self.agent_talking()
            && !self.words_decide()
        {
            self.barge_in().await?;
        }
        // The caller stopped: vendors that can finalize on request end the turn now.
        if verdict.event == Some(VadEvent::SpeechEnded) {
            self.stt.finalize(self.shared.cfg.vad.hang_ms);
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
            self.send_to_stt(zeros);
        } else {
            // The caller started speaking over the agent: the STT gets the frames it missed.
            // (When the echo merely faded, they are echo and are dropped.)
            if self.suppressing && self.vad.in_speech() {
                while let Some(f) = self.preroll.pop_front() {
                    self.send_to_stt(f);
                }
            }
            self.preroll.clear();
            self.send_to_stt(bytes);
        }
        self.suppressing = suppress;
        Ok(())
    }

    /// With local barge-in on (`[agent.barge_in]`) the call pauses playout on the caller's
    /// voice at once and the STT's words confirm the barge-in; off, the VAD alone does.
    fn words_decide(&self) -> bool {
        self.shared.cfg.barge_in.enabled
    }

    /// The STT's first words while the agent talks confirm a barge-in (when
    /// [`Self::words_decide`]): words the VAD heard as the caller's speech within the last
    /// 1.5 s (the echo gate), that are not a configured backchannel.
    async fn on_interim(&mut self, text: String) -> Result<(), Stop> {
        debug!(text = %text, "stt interim");
        let voiced = self
            .last_voice
            .is_some_and(|t| t.elapsed() < Duration::from_millis(1_500));
        if self.words_decide()
            && self.agent_talking()
            && voiced
            && !text.trim().is_empty()
            && !self.shared.cfg.barge_in.is_backchannel(&text)
        {
            info!(text = %text, "barge-in: the caller's words over the reply");
            self.barge_in().await?;
        }
        Ok(())
    }

    fn send_to_stt(&mut self, frame: Bytes) {
        if self.stt.audio.try_send(frame).is_err() {
            self.stt_dropped += 1;
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

    fn new_reply(&mut self, with_llm: bool) -> Reply {
        let id = ReplyId(self.next_reply);
        self.next_reply += 1;
        Reply {
            id,
            llm: with_llm.then(|| self.shared.llm.stream(&self.history)),
            tts: Some(self.tts.start()),
            text: String::new(),
            pending: String::new(),
            sent: String::new(),
            chars: Vec::new(),
            audio_samples: 0,
            played_ms: 0,
            marks: None,
            tts_first: None,
            history_index: None,
            streamed: false,
            interrupted: false,
        }
    }

    /// The history a caller turn of `text` is answered with: placeholder results for tool
    /// calls still unanswered (Chat Completions refuses a history whose assistant
    /// `tool_calls` are not each followed by a `tool` message: 400 "An assistant message
    /// with 'tool_calls' must be followed by tool messages responding to each
    /// 'tool_call_id'"; their late results are ignored), then the caller's words.
    fn turn_messages(&self, text: &str) -> Vec<serde_json::Value> {
        let mut m = self.history.clone();
        for id in &self.outstanding_tools {
            m.push(serde_json::json!({
                "role": "tool", "tool_call_id": id,
                "content": "{\"error\":\"no result: the caller spoke again before it came\"}",
            }));
        }
        m.push(serde_json::json!({"role": "user", "content": text}));
        m
    }

    /// Flux's `EagerEndOfTurn`: the reply's LLM request starts now (a newer one replaces
    /// it). Only while no reply runs: superseding one changes the history the request
    /// would have to carry.
    fn on_eager_end_of_turn(&mut self, text: String) {
        let text = text.trim().to_owned();
        if text.is_empty() || self.reply.is_some() {
            return;
        }
        let messages = self.turn_messages(&text);
        info!(text = %text, "eager end of turn: speculative reply started");
        let llm = self.shared.llm.stream(&messages);
        self.speculation = Some(Speculation {
            text,
            messages,
            llm,
        });
    }

    async fn on_end_of_turn(&mut self, text: String) -> Result<(), Stop> {
        let speculation = self.speculation.take();
        let text = text.trim().to_owned();
        if text.is_empty() {
            return Ok(());
        }
        // A backchannel ("uh-huh") while the agent talks is not a turn: the call resumes
        // the reply it paused, and the reply goes on.
        if self.agent_talking() && self.shared.cfg.barge_in.is_backchannel(&text) {
            info!(text = %text, "backchannel while the agent talks; not a turn");
            self.emit(AgentEvent::Transcript {
                speaker: Speaker::Caller,
                text,
            })
            .await?;
            return Ok(());
        }
        let now = Instant::now();
        let speech_end = self
            .last_voice
            .filter(|t| now.duration_since(*t) < Duration::from_secs(10))
            .unwrap_or(now);
        // A reply still running is superseded by the caller's new turn.
        if let Some(r) = self.reply.as_ref() {
            if r.streamed && !r.interrupted {
                self.finish_played().await?;
            } else {
                if !r.interrupted {
                    self.barge_in().await?;
                }
                let heard = self.reply.as_ref().map_or(0, |r| r.played_ms);
                self.finish_interrupted(heard).await?;
            }
        }
        info!(text = %text, "caller turn");
        self.emit(AgentEvent::Transcript {
            speaker: Speaker::Caller,
            text: text.clone(),
        })
        .await?;
        self.history = self.turn_messages(&text);
        self.outstanding_tools.clear();
        self.continue_after_tools = false;
        let early = match speculation {
            Some(s) if s.text == text && s.messages == self.history => {
                info!("end of turn confirms the eager one: speculative reply used");
                Some(s.llm)
            }
            Some(_) => {
                info!("end of turn differs from the eager one: speculative reply replaced");
                None
            }
            None => None,
        };
        let mut r = self.new_reply(early.is_none());
        if early.is_some() {
            r.llm = early;
        }
        r.marks = Some(Marks {
            speech_end,
            stt_final: now,
            llm_first: None,
        });
        self.reply = Some(r);
        Ok(())
    }

    async fn on_llm(&mut self, ev: Option<LlmEvent>) -> Result<(), Stop> {
        let Some(r) = self.reply.as_mut() else {
            return Ok(());
        };
        let ev = ev.unwrap_or(LlmEvent::Failed(AgentError::Provider {
            provider: "chat_completions",
            detail: "llm task ended".into(),
        }));
        match ev {
            LlmEvent::Text(delta) => {
                if let Some(m) = r.marks.as_mut() {
                    m.llm_first.get_or_insert_with(Instant::now);
                }
                r.text.push_str(&delta);
                r.pending.push_str(&delta);
                while let Some(end) = sentence_end(&r.pending) {
                    let sentence: String = r.pending.drain(..end).collect();
                    send_sentence(r, sentence);
                }
            }
            LlmEvent::ToolCalls(calls) => {
                if let Some(m) = r.marks.as_mut() {
                    m.llm_first.get_or_insert_with(Instant::now);
                }
                let id = r.id;
                let content = (!r.text.trim().is_empty()).then(|| r.text.clone());
                self.history.push(assistant_with_tools(content, &calls));
                r.history_index = Some(self.history.len() - 1);
                self.continue_after_tools = true;
                for c in calls {
                    info!(tool = %c.name, call_id = %c.id, "tool call");
                    self.outstanding_tools.push(c.id.clone());
                    self.emit(AgentEvent::ToolCall {
                        call_id: c.id,
                        name: c.name,
                        arguments: c.arguments,
                        reply: Some(id),
                    })
                    .await?;
                }
            }
            LlmEvent::Done { finish_reason } => {
                debug!(?finish_reason, "llm done");
                r.llm = None;
                let rest = std::mem::take(&mut r.pending);
                send_sentence(r, rest);
                if let Some(tts) = &r.tts {
                    let _ = tts.text.send(TtsCommand::Finish);
                }
                if r.history_index.is_none() {
                    self.history
                        .push(serde_json::json!({"role": "assistant", "content": r.text}));
                    r.history_index = Some(self.history.len() - 1);
                }
            }
            LlmEvent::Failed(e) => return Err(Stop::Failed(e)),
        }
        Ok(())
    }

    async fn on_tts(&mut self, ev: Option<TtsEvent>) -> Result<(), Stop> {
        let rate = self.call.rate_hz;
        let Some(r) = self.reply.as_mut() else {
            return Ok(());
        };
        let ev = ev.unwrap_or(TtsEvent::Failed(AgentError::Provider {
            provider: "elevenlabs_tts",
            detail: "tts task ended".into(),
        }));
        match ev {
            TtsEvent::Audio(samples) => {
                let id = r.id;
                if r.tts_first.is_none() {
                    let now = Instant::now();
                    r.tts_first = Some(now);
                    if let Some(m) = r.marks {
                        let ms = |t: Instant| t.duration_since(m.speech_end).as_millis() as u64;
                        let lat = TurnLatency {
                            reply: id.0,
                            stt_final_ms: Some(ms(m.stt_final)),
                            llm_first_token_ms: m.llm_first.map(ms),
                            tts_first_audio_ms: Some(ms(now)),
                            first_frame_ms: None,
                        };
                        info!(
                            reply = id.0,
                            stt_final_ms = ?lat.stt_final_ms,
                            llm_first_token_ms = ?lat.llm_first_token_ms,
                            tts_first_audio_ms = ?lat.tts_first_audio_ms,
                            "turn latency (from end of caller speech)"
                        );
                        self.emit(AgentEvent::TurnLatency(lat)).await?;
                    }
                }
                let r = self
                    .reply
                    .as_mut()
                    .expect("reply checked above; emit does not touch it");
                r.audio_samples += samples.len() as u64;
                let _ = rate;
                self.emit(AgentEvent::Audio { reply: id, samples }).await?;
            }
            TtsEvent::Chars(chars) => r.chars.extend(chars),
            TtsEvent::Done => {
                r.tts = None;
                r.streamed = true;
                let id = r.id;
                self.emit(AgentEvent::ReplyDone { reply: id }).await?;
                self.maybe_continue().await?;
            }
            TtsEvent::Failed(e) => return Err(Stop::Failed(e)),
        }
        Ok(())
    }

    /// The caller spoke over the reply: flush, cancel the LLM and the TTS.
    async fn barge_in(&mut self) -> Result<(), Stop> {
        let Some(r) = self.reply.as_mut() else {
            return Ok(());
        };
        info!(reply = r.id.0, "barge-in: cancelling llm and tts");
        r.interrupted = true;
        r.llm = None;
        r.tts = None;
        self.continue_after_tools = false;
        let nothing_played = r.audio_samples == 0;
        self.emit(AgentEvent::SpeechStarted).await?;
        if nothing_played {
            // The call has nothing to flush and will not answer.
            self.finish_interrupted(0).await?;
        }
        Ok(())
    }

    /// Keeps the heard part of the interrupted reply in the history.
    async fn finish_interrupted(&mut self, heard_ms: u64) -> Result<(), Stop> {
        let Some(r) = self.reply.take() else {
            return Ok(());
        };
        let heard = r.heard_text(heard_ms, self.call.rate_hz);
        info!(reply = r.id.0, heard_ms, heard = %heard, "reply interrupted");
        match r.history_index {
            Some(i) => {
                let has_tools = self.history[i].get("tool_calls").is_some();
                if heard.is_empty() && !has_tools {
                    self.history.remove(i);
                } else {
                    self.history[i]["content"] = if heard.is_empty() {
                        serde_json::Value::Null
                    } else {
                        heard.clone().into()
                    };
                }
            }
            None if !heard.is_empty() => self
                .history
                .push(serde_json::json!({"role": "assistant", "content": heard})),
            None => {}
        }
        if !heard.is_empty() {
            self.emit(AgentEvent::Transcript {
                speaker: Speaker::Agent,
                text: heard,
            })
            .await?;
        }
        Ok(())
    }

    async fn finish_played(&mut self) -> Result<(), Stop> {
        if let Some(r) = self.reply.take() {
            let text = r.text.trim().to_owned();
            if !text.is_empty() {
                self.emit(AgentEvent::Transcript {
                    speaker: Speaker::Agent,
                    text,
                })
                .await?;
            }
        }
        Ok(())
    }

    /// After tool results: ask the LLM again once every result is in and the reply that
    /// asked has finished streaming.
    async fn maybe_continue(&mut self) -> Result<(), Stop> {
        if !self.continue_after_tools || !self.outstanding_tools.is_empty() {
            return Ok(());
        }
        if let Some(r) = &self.reply {
            if !r.streamed {
                return Ok(());
            }
            self.finish_played().await?;
        }
        self.continue_after_tools = false;
        let r = self.new_reply(true);
        self.reply = Some(r);
        Ok(())
    }
}

/// Sends one sentence to the reply's TTS; `sent` records exactly the text the TTS gets
/// (trimmed, one space after each sentence), so character alignment maps onto it 1:1.
fn send_sentence(r: &mut Reply, sentence: String) {
    let t = sentence.trim();
    if t.is_empty() {
        return;
    }
    if let Some(tts) = &r.tts {
        r.sent.push_str(t);
        r.sent.push(' ');
        let _ = tts.text.send(TtsCommand::Text(t.to_owned()));
    }
}

fn assistant_with_tools(content: Option<String>, calls: &[ToolCallRequest]) -> serde_json::Value {
    serde_json::json!({
        "role": "assistant",
        "content": content,
        "tool_calls": calls.iter().map(|c| serde_json::json!({
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        })).collect::<Vec<_>>(),
    })
}

enum ReplyEv {
    Llm(Option<LlmEvent>),
    Tts(Option<TtsEvent>),
}

/// The next event of the current reply's LLM or TTS stream; pending while there is none.
async fn next_reply_event(reply: &mut Option<Reply>) -> ReplyEv {
    let Some(r) = reply.as_mut() else {
        return std::future::pending().await;
    };
    let (llm, tts) = (r.llm.as_mut(), r.tts.as_mut());
    tokio::select! {
        ev = async {
            match llm {
                Some(s) => s.events.recv().await,
                None => std::future::pending().await,
            }
        } => ReplyEv::Llm(ev),
        ev = async {
            match tts {
                Some(s) => s.events.recv().await,
                None => std::future::pending().await,
            }
        } => ReplyEv::Tts(ev),
    }
}

/// The call side is gone.
#[derive(Debug)]
struct Gone;

enum Stop {
    Gone,
    Failed(AgentError),
}

impl From<Gone> for Stop {
    fn from(_: Gone) -> Self {
        Stop::Gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_split_at_terminators_followed_by_space() {
        assert_eq!(sentence_end("Hello there. How"), Some(12));
        assert_eq!(sentence_end("It costs 3.50 dollars"), None);
        assert_eq!(sentence_end("Привет! Как"), Some("Привет!".len()));
        let long = "word ".repeat(60);
        let end = sentence_end(&long).unwrap();
        assert!(end <= MAX_SENTENCE_CHARS && end > 100);
    }

    #[test]
    fn heard_text_by_alignment_and_by_proportion() {
        let mut r = Reply {
            id: ReplyId(1),
            llm: None,
            tts: None,
            text: "Hello there. How are you today?".into(),
            pending: String::new(),
            sent: "Hello there. How are you today?".into(),
            chars: Vec::new(),
            audio_samples: 8_000 * 3,
            played_ms: 0,
            marks: None,
            tts_first: None,
            history_index: None,
            streamed: true,
            interrupted: true,
        };
        // 1 s of 3 s ≈ a third of 31 chars = 10 → "Hello ther" → "Hello".
        assert_eq!(r.heard_text(1_000, 8_000), "Hello");
        assert_eq!(
            r.heard_text(3_000, 8_000),
            "Hello there. How are you today?"
        );
        r.chars = "Hello there. How"
            .chars()
            .enumerate()
            .map(|(i, c)| (i as u64 * 100, c))
            .collect();
        // 1.35 s → 14 chars "Hello there. H" → "Hello there."
        assert_eq!(r.heard_text(1_350, 8_000), "Hello there.");
        assert_eq!(cut_to_words("Hello wor", "Hello world"), "Hello");
    }
}
