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
//! The conversation is a sans-IO state machine (`protocol.rs`, `CascadeProtocol`): it is fed
//! the call's inputs, the STT's events, each LLM request's and each reply's TTS events and
//! its keypad deadline, each with `now`, and answers with outputs (audio for the STT, an LLM
//! request to start or drop, a reply's TTS stream to open, feed, finish or drop, an
//! [`AgentEvent`](super::AgentEvent) for the call, a failure). A thin driver (`driver.rs`)
//! owns the STT session, the LLM and TTS streams, the call's channels and the clock, and
//! carries the outputs out; every task it starts runs in the call's span. All of what
//! follows is decided in the protocol and tested on virtual time (`protocol_tests.rs`).
//!
//! - **Latency.** The TTS connection opens while the LLM request is in flight; each sentence
//!   goes to the TTS as soon as the LLM has finished it, so the caller hears the first words
//!   before the LLM is done. Per turn the agent measures end of caller speech (the local
//!   VAD's last voiced frame) → STT end of turn → first LLM token → first TTS audio, and
//!   sends them as [`AgentEvent::TurnLatency`](super::AgentEvent::TurnLatency); the call adds the first frame on the wire.
//! - **Barge-in.** The call sends every frame it plays ([`AgentInput::Playout`](super::AgentInput::Playout), opted in by
//!   [`Agent::wants_playout_reference`]); the [`crate::audio::vad::Vad`] compares the caller leg against it,
//!   so the agent's own voice coming back down the line is not taken for the caller. While
//!   only echo can be present the STT receives silence instead of the echo (the frames are
//!   kept and sent once the caller really speaks). With `[agent.barge_in]` on (the default)
//!   the call pauses playout on the caller's voice at once ([`crate::audio::bargein`]) and
//!   the STT's first words (heard by the VAD as speech, not a configured backchannel)
//!   confirm the barge-in; a backchannel turn while the agent talks is not a turn. With it
//!   off the VAD alone decides. On a confirmed barge-in:
//!   [`AgentEvent::SpeechStarted`](super::AgentEvent::SpeechStarted) (the call flushes playout and answers
//!   [`AgentInput::Interrupted`](super::AgentInput::Interrupted) with the heard time), the LLM request and the TTS stream are
//!   cancelled, and the history keeps only the words the caller heard (ElevenLabs' character
//!   alignment, else proportionally).
//! - **Tools.** Tool calls from the LLM become [`AgentEvent::ToolCall`](super::AgentEvent::ToolCall)s; the results come
//!   back as [`AgentInput::ToolResult`](super::AgentInput::ToolResult) and go into the next request as `tool` messages.
//! - **Keypad.** DTMF digits become a caller turn the LLM reads ("(The caller typed 1234 on
//!   the phone keypad.)"), sent 1 s after the last digit or at once on `#`; the first digit
//!   stops the agent talking, as a barge-in does.
//! - **Failures.** Any provider failing mid-call ends the session with
//!   [`AgentEvent::Failed`](super::AgentEvent::Failed) naming the provider.

pub mod config;
mod driver;
pub mod llm;
mod protocol;
mod reply;
pub mod stt;
pub mod tts;

pub use config::CascadeConfig;
pub use llm::ToolSpec;

use super::{Agent, AgentSession, CallInfo};
use crate::error::ConfigError;
use driver::Driver;
use llm::{LlmClient, LlmSettings};
use protocol::CascadeProtocol;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;
use tts::TtsSettings;

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
            let llm = if call.tools.is_empty() {
                shared.llm.clone()
            } else {
                shared.llm.with_more_tools(&call.tools)
            };
            let conversation = CascadeProtocol::new(&shared.cfg, &shared.system_prompt, &call);
            let io = Driver {
                io: endpoint,
                stt,
                stt_name: shared.cfg.stt.provider.name(),
                llm,
                tts: shared.tts.call(call.rate_hz),
            };
            driver::run(conversation, io).await;
        };
        let _enter = span.enter();
        super::task::spawn(task);
        session
    }
}
