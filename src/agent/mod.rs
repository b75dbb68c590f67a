//! Voice agents: one interface for every provider.
//!
//! An agent runs as its own task per call and talks to the call's session (`call::run_session`)
//! over two bounded channels, so a slow provider never blocks the 20 ms audio path:
//!
//! - [`AgentInput`] (call → agent): caller audio as slin at the call's sample rate, DTMF,
//!   how much of an interrupted reply the caller heard, tool results.
//! - [`AgentEvent`] (agent → call): agent audio as slin at the call's sample rate, barge-in
//!   ("the caller started speaking: flush"), transcripts, tool calls, end, error.
//!
//! Each provider converts between the call's slin and its own wire format itself (G.711,
//! resampling), with one stateful converter per direction for the whole call.
//!
//! Adding a provider: one file here implementing [`Agent`], plus its config variant.

pub mod cascade;
pub(crate) mod config;
pub(crate) mod driver;
pub mod echo;
pub mod elevenlabs_agent;
pub(crate) mod keypad;
pub mod openai_realtime;
pub(crate) mod task;
pub mod ws;

use crate::audio::ReplyId;
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::mpsc;
use uuid::Uuid;

/// Frames of caller audio the agent's input channel holds (64 × 20 ms = 1.28 s). When it is
/// full the call drops the newest frame and counts it.
pub(crate) const INPUT_CAPACITY_FRAMES: usize = 64;

/// Events the agent's event channel holds before the agent task waits for the call.
pub(crate) const EVENT_CAPACITY: usize = 256;

/// What the agent knows about the call it serves.
#[derive(Debug, Clone)]
pub struct CallInfo {
    /// The AudioSocket call id.
    pub call_id: Uuid,
    /// Sample rate of the call's slin audio, Hz (8000 for kind `0x10`, 16000 for `0x12`, …).
    pub rate_hz: u32,
    /// The caller's number, when Asterisk told us (ARI).
    pub caller_number: Option<String>,
    /// The caller's name, when Asterisk told us (ARI).
    pub caller_name: Option<String>,
    /// Tools the agent should declare to its model (each provider renders them in its own
    /// wire shape); filled by the call session from the configured registry. Empty
    /// when no tools are configured.
    pub tools: Vec<crate::tools::ToolSpec>,
    /// The call's variables (`caller_number`, `called_number`, `profile`, custom ones from the
    /// dialplan or the profile) for the `{name}` placeholders of instructions and greeting
    /// ([`fill_placeholders`]); ElevenLabs Agents receive them as `dynamic_variables`. Empty
    /// when the call has no profile data.
    pub variables: std::collections::BTreeMap<String, String>,
}

/// `template` with every `{name}` whose name is in `vars` replaced by its value; unknown
/// `{…}` and lone braces are left as they are (instructions may contain JSON examples).
/// Names are 1–64 of `A-Za-z0-9_`.
pub(crate) fn fill_placeholders(
    template: &str,
    vars: &std::collections::BTreeMap<String, String>,
) -> String {
    if vars.is_empty() {
        return template.to_owned();
    }
    // The braces as escapes: a lone brace in a char literal unbalances brace-counting tools.
    const OPEN: char = '\x7b';
    const CLOSE: char = '\x7d';
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find(OPEN) {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..name_len];
        match vars.get(name) {
            Some(v) if (1..=64).contains(&name_len) && after[name_len..].starts_with(CLOSE) => {
                out.push_str(v);
                rest = &after[name_len + 1..];
            }
            _ => {
                out.push(OPEN);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

pub use crate::records::Speaker;

/// Call → agent.
#[derive(Debug, Clone)]
pub enum AgentInput {
    /// Caller audio: slin little-endian bytes at [`CallInfo::rate_hz`], normally one 20 ms
    /// frame (may be shorter), exactly as AudioSocket carried it.
    Audio(Bytes),
    /// A DTMF digit the caller pressed (`0-9*#A-D`).
    Dtmf(char),
    /// The call flushed its playout buffer after [`AgentEvent::SpeechStarted`]: the caller
    /// heard `heard_ms` of `reply` (OpenAI: the `audio_end_ms` of `conversation.item.truncate`).
    Interrupted {
        /// The reply that was playing.
        reply: ReplyId,
        /// Milliseconds of it the caller heard.
        heard_ms: u64,
    },
    /// The whole of `reply` has been played to the caller.
    PlayedOut {
        /// The reply.
        reply: ReplyId,
    },
    /// One frame exactly as it went out on the wire to the caller (slin at
    /// [`CallInfo::rate_hz`], 20 ms, silence included), sent every tick only to agents whose
    /// [`Agent::wants_playout_reference`] is true: the echo reference for a local VAD.
    Playout(Vec<i16>),
    /// The result of an [`AgentEvent::ToolCall`], as the JSON text the model should see.
    ToolResult {
        /// The provider's id of the tool call.
        call_id: String,
        /// Result text (JSON).
        output: String,
    },
}

/// Agent → call.
#[derive(Debug, Clone)]
pub enum AgentEvent {
    /// Agent speech: slin samples at [`CallInfo::rate_hz`], part of `reply`. Arrives faster
    /// than real time; the call's playout buffer meters it out.
    Audio {
        /// The reply this audio belongs to.
        reply: ReplyId,
        /// Samples.
        samples: Vec<i16>,
    },
    /// No more audio will come for `reply`.
    ReplyDone {
        /// The reply.
        reply: ReplyId,
    },
    /// The caller started speaking over the agent (barge-in): flush playout now and answer
    /// with [`AgentInput::Interrupted`].
    SpeechStarted,
    /// A piece of transcript.
    Transcript {
        /// Who spoke.
        speaker: Speaker,
        /// The text.
        text: String,
    },
    /// The model asks voicegate to run a tool; answer with [`AgentInput::ToolResult`].
    ToolCall {
        /// The provider's id for this call of the tool.
        call_id: String,
        /// Tool name.
        name: String,
        /// Arguments, as the JSON text the model produced.
        arguments: String,
        /// The reply that asked for it, if the provider ties tool calls to replies.
        reply: Option<ReplyId>,
    },
    /// Latency of one turn, sent just before the reply's first [`AgentEvent::Audio`]; the
    /// call fills in [`TurnLatency::first_frame_ms`] and records it in the call summary.
    TurnLatency(TurnLatency),
    /// The agent ended the conversation normally.
    Ended {
        /// Why, in words.
        reason: String,
    },
    /// The agent failed; the call should go to the fallback (operators).
    Failed(AgentError),
}

/// How long one turn took, each time in ms from the end of the caller's speech (the agent's
/// VAD's last voiced frame). `None` where a stage did not happen or is not measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TurnLatency {
    /// The reply this turn produced ([`ReplyId`]'s number).
    pub reply: u64,
    /// … until the STT reported the end of the turn.
    pub stt_final_ms: Option<u64>,
    /// … until the LLM's first token (text or tool call).
    pub llm_first_token_ms: Option<u64>,
    /// … until the TTS's first audio arrived.
    pub tts_first_audio_ms: Option<u64>,
    /// … until the first frame of the reply went out on the wire (filled in by the call).
    pub first_frame_ms: Option<u64>,
}

/// Why an agent session failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    /// Could not connect to the provider (DNS, TCP, TLS, HTTP upgrade, auth).
    #[error("cannot connect to {provider}: {detail}")]
    Connect {
        /// Provider name.
        provider: &'static str,
        /// What failed.
        detail: String,
    },
    /// The provider sent something voicegate cannot use.
    #[error("{provider} protocol error: {detail}")]
    Protocol {
        /// Provider name.
        provider: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The provider reported an error or closed the session.
    #[error("{provider} error: {detail}")]
    Provider {
        /// Provider name.
        provider: &'static str,
        /// What the provider said.
        detail: String,
    },
    /// The provider did not answer in time.
    #[error("{provider} timed out: {detail}")]
    Timeout {
        /// Provider name.
        provider: &'static str,
        /// What was being waited for.
        detail: String,
    },
}

/// Why a provider failed, as the `reason` label of `voicegate_provider_errors_total`:
/// `quota` when the provider refused for a quota, a rate or a concurrency limit (so an
/// operator sees why calls went to the humans), else `error`. Read from the failure's text,
/// which carries each vendor's own words:
/// OpenAI `insufficient_quota` / `rate_limit_exceeded` (openai-python error codes), HTTP 429
/// on any upgrade or request, Soniox `error_code` 429 (soniox.com `stt/rt/error-handling`;
/// its default limit is 10 concurrent sessions), ElevenLabs Scribe `quota_exceeded` /
/// `rate_limited` / `resource_exhausted` / `queue_overflow` (scribe.asyncapi.yaml), ElevenLabs
/// TTS `quota_exceeded`.
pub(crate) fn failure_reason(detail: &str) -> &'static str {
    const QUOTA: [&str; 12] = [
        "insufficient_quota",
        "rate_limit_exceeded",
        "quota_exceeded",
        "quota exceeded",
        "rate_limited",
        "resource_exhausted",
        "queue_overflow",
        "too many requests",
        "too many concurrent",
        "http 429",
        "error 429",
        "429 too many",
    ];
    let d = detail.to_ascii_lowercase();
    if QUOTA.iter().any(|q| d.contains(q)) {
        "quota"
    } else {
        "error"
    }
}

/// The call's end of an agent session.
#[derive(Debug)]
pub struct AgentSession {
    /// Send caller audio and control here; `try_send` on the audio path.
    pub input: mpsc::Sender<AgentInput>,
    /// Agent events arrive here; `None` means the agent task is gone.
    pub events: mpsc::Receiver<AgentEvent>,
}

/// The agent task's end of an agent session.
#[derive(Debug)]
pub struct AgentEndpoint {
    /// What the call sends; `None` when the call is over.
    pub input: mpsc::Receiver<AgentInput>,
    /// Where agent events go.
    pub events: mpsc::Sender<AgentEvent>,
}

/// A connected pair of [`AgentSession`] and [`AgentEndpoint`] with the standard capacities.
pub fn session_channel() -> (AgentSession, AgentEndpoint) {
    let (in_tx, in_rx) = mpsc::channel(INPUT_CAPACITY_FRAMES);
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_CAPACITY);
    (
        AgentSession {
            input: in_tx,
            events: ev_rx,
        },
        AgentEndpoint {
            input: in_rx,
            events: ev_tx,
        },
    )
}

/// A voice agent provider: starts one session per call.
pub trait Agent: Send + Sync + 'static {
    /// Short name for logs, metrics and call records (`echo`, `openai_realtime`, …).
    fn name(&self) -> &'static str;

    /// Starts a session for `call`: spawns the agent's task on the current tokio runtime and
    /// returns the call's end of it. Never blocks; connection failures arrive later as
    /// [`AgentEvent::Failed`].
    fn start(&self, call: CallInfo) -> AgentSession;

    /// Whether the call should send [`AgentInput::Playout`] with every frame it plays (an
    /// echo reference for an agent running its own VAD). Default: no.
    fn wants_playout_reference(&self) -> bool {
        false
    }

    /// Whether the agent's audio is a live stream in step with the caller's (the echo
    /// agent): when the call's playout clock skips ticks after a stall, the audio those
    /// ticks would have carried is dropped, so the stream keeps its timing instead of
    /// falling behind for the rest of the call. Default: no (a reply is delayed, never cut).
    fn live_playout(&self) -> bool {
        false
    }

    /// Local barge-in for this agent's calls ([`crate::audio::bargein`]): the call pauses
    /// playout on the caller's voice and waits for the provider to confirm. `None` (the
    /// default): only the agent's [`AgentEvent::SpeechStarted`] stops playback.
    fn barge_in(&self) -> Option<crate::audio::bargein::BargeInConfig> {
        None
    }
}

/// A shared agent provider.
pub type SharedAgent = Arc<dyn Agent>;

/// A tool's answer goes to the agent as [`AgentInput::ToolResult`].
impl From<crate::tools::ToolResult> for AgentInput {
    fn from(r: crate::tools::ToolResult) -> Self {
        AgentInput::ToolResult {
            call_id: r.call_id,
            output: r.output,
        }
    }
}

/// What a tool may know of the call (its id and the caller's number).
impl From<&CallInfo> for crate::tools::ToolContext {
    fn from(call: &CallInfo) -> Self {
        crate::tools::ToolContext {
            call_id: call.call_id,
            caller_number: call.caller_number.clone(),
        }
    }
}

/// Builds the agent provider the configuration selects.
///
/// # Errors
/// [`crate::error::ConfigError`] if the provider's settings cannot be used (for example an
/// instructions file that cannot be read).
pub fn from_config(
    cfg: &crate::agent::config::AgentConfig,
) -> Result<SharedAgent, crate::error::ConfigError> {
    use crate::agent::config::AgentConfig;
    Ok(match cfg {
        AgentConfig::Echo(c) => Arc::new(echo::EchoAgent::new(c.delay())),
        AgentConfig::Cascade(c) => Arc::new(cascade::CascadeAgent::new(c, Vec::new())?),
        AgentConfig::OpenaiRealtime(c) => Arc::new(openai_realtime::OpenAiRealtime::new(c)?),
        AgentConfig::ElevenlabsAgent(c) => {
            Arc::new(elevenlabs_agent::ElevenlabsAgent::from_config(c)?)
        }
    })
}
