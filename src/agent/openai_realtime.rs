//! The `openai_realtime` agent: the OpenAI Realtime API (GA shapes, as openai-python's
//! `src/openai/types/realtime/*` define them) over one WebSocket per call (`providers.md` §1).
//! The preview (beta) interface is gone (OpenAI refuses `OpenAI-Beta: realtime=v1`), and so
//! is voicegate's support for it: `api = "preview"` is a config error.
//!
//! Each call is a sans-IO protocol, [`protocol::Realtime`] (`openai_realtime/protocol.rs`: server
//! events, call inputs and timers in, with `now` passed in; wire messages, [`AgentEvent`]s and
//! timers out), run by the shared WebSocket driver ([`super::driver`]), which spawns its
//! tasks inside the call's span. One call, step by step:
//!
//! 1. Connect to `{url}?model={model}` with `Authorization: Bearer <key>` and receive
//!    `session.created`, both
//!    within `connect_timeout_ms`; send `session.update` (instructions, voice, server VAD,
//!    input transcription, audio formats) and receive `session.updated` within another
//!    `connect_timeout_ms`. Caller audio that arrives meanwhile is kept (up to
//!    [`SETUP_BUFFER_FRAMES`]) and sent once the session is ready, so a caller who speaks at
//!    once is not cut off.
//! 2. Audio format: G.711 μ-law (`audio/pcmu`) when the call is 8 kHz and
//!    `g711` is on, otherwise pcm16 at 24 kHz (§0, §1.2). The formats used are the ones the
//!    server states in `session.updated` (input and output separately), not the ones asked
//!    for. As a sanity check, a pcm16 delta of odd length, or a first 500 ms of agent audio
//!    far louder than speech (what μ-law read as pcm16, or the reverse, sounds like), is
//!    logged as a sign that the stated format is wrong.
//! 3. Uplink: every caller frame (slin at the call rate) is converted by one stateful
//!    [`Encoder`](crate::audio::convert::Encoder) and sent at once as one `input_audio_buffer.append` (20 ms each: no
//!    batching, so server VAD sees speech with no added latency; §1.3 recommends small
//!    chunks).
//! 4. Downlink: `response.output_audio.delta` is decoded by one
//!    stateful [`Decoder`](crate::audio::convert::Decoder) into [`AgentEvent::Audio`], one [`ReplyId`] per assistant item;
//!    the audio-done event gives [`AgentEvent::ReplyDone`].
//! 5. Barge-in (§1.6): on `input_audio_buffer.speech_started` the task emits
//!    [`AgentEvent::SpeechStarted`] before anything else; the call flushes its playout buffer
//!    and answers [`AgentInput::Interrupted`](super::AgentInput::Interrupted) with what the caller heard, which becomes
//!    `conversation.item.truncate {item_id, content_index: 0, audio_end_ms}`. Server VAD runs
//!    with `interrupt_response: true`, so the server cancels the in-flight response itself
//!    and no `response.cancel` is sent; late deltas of the interrupted item are dropped.
//! 6. Keypad: DTMF digits become a user `input_text` message plus `response.create` (see
//!    [`Keypad`](super::keypad::Keypad): 1 s after the last digit, or at once on `#`); the first digit interrupts a
//!    reply being heard like a barge-in, with a `response.cancel` if it is still streaming.
//! 7. Transcripts of both sides; tools declared with [`OpenAiRealtime::with_tools`] and their
//!    calls (`response.function_call_arguments.done` → [`AgentEvent::ToolCall`],
//!    [`AgentInput::ToolResult`](super::AgentInput::ToolResult) → `function_call_output` + `response.create`, §1.7); an
//!    optional greeting (a `response.create` right after set-up, so the agent speaks first).
//! 8. One response at a time (`Responses`): the server allows one active response per
//!    conversation and refuses a `response.create` meanwhile with
//!    `conversation_already_has_active_response`. Every `response.create` voicegate wants
//!    (tool output, keypad turn, greeting) waits for the `response.done` of the active one,
//!    and for the outputs of all function calls of that response (parallel calls get one
//!    `response.create`), as openai-agents-js's `responseCreateSequencer.ts` does; one the
//!    server still refuses (it started a response voicegate had not yet heard of) is sent
//!    again after that response's `response.done`.
//! 9. Session renewal: OpenAI ends a session at 60 minutes (`session_expired`, close 1001).
//!    After `session_renew_s` (default 55 min) a second session is set up beside the live
//!    one; at the first quiet moment (no response active or wanted, no reply streaming, no
//!    function call open, the caller not speaking, no keypad digits waiting) the transcript
//!    so far goes into it as conversation items (`message` items: the caller's as
//!    `input_text`, the agent's as `output_text`; the last [`HISTORY_ITEMS`]), caller audio
//!    switches to it and the old socket is closed. Nothing is being played or said at that
//!    moment, so the caller hears no gap. If the old session ends first while the new one is
//!    ready, the switch happens then.
//!
//! Failures end the session with [`AgentEvent::Failed`]: connect failure or timeout, an
//! `error` event that ends the session (authentication, `session_expired`, quota; any error
//! during set-up), or the socket closing. Other `error` events are logged and the call goes
//! on. The API key is only ever written into the `Authorization` header; provider messages
//! are scrubbed of it (and of anything shaped like an OpenAI key) before they are logged.

mod protocol;

#[cfg(any(fuzzing, test))]
use protocol::Realtime;

use super::{Agent, AgentEvent, AgentSession, CallInfo};
use super::{Speaker, session_channel};
use crate::agent::config::{NoiseReduction, OpenAiRealtimeConfig, TurnDetection, VadEagerness};
use crate::audio::ReplyId;
use crate::audio::convert::WireFormat;
use crate::audio::g711::Law;
use crate::error::ConfigError;
use crate::secret::Secret;
use serde::Deserialize;
use serde_json::{Value, json};
use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

const PROVIDER: &str = "openai_realtime";

/// Caller frames kept while the session is being set up (50 × 20 ms = 1 s); older ones are
/// dropped.
pub(crate) const SETUP_BUFFER_FRAMES: usize = 50;

/// Transcript lines carried into a renewed session, at most.
pub(crate) const HISTORY_ITEMS: usize = 64;

/// When setting up the renewal session fails, it is tried again this much later.
const RENEW_RETRY: Duration = Duration::from_secs(30);

/// Replies remembered for truncation (ReplyId ↔ item_id); older ones are forgotten.
const MAX_REPLIES: usize = 16;

/// Wire silence pushed through a resampling decoder at the end of a reply so its last
/// samples come out of the filter, ms.
const TAIL_FLUSH_MS: usize = 40;

/// The first this many ms of agent audio in a call are checked for a plausible level.
const LEVEL_CHECK_MS: usize = 500;

/// RMS (slin units) above which the first [`LEVEL_CHECK_MS`] of agent audio cannot be speech
/// in the confirmed format: real prompts and TTS sit near 2000–5000, while μ-law bytes read
/// as pcm16 (or pcm16 read as μ-law) give 13000–18000 (measured on `tests/fixtures`).
const IMPLAUSIBLE_RMS: f64 = 9_000.0;

/// `error.code` values after which the session cannot go on.
const FATAL_CODES: [&str; 6] = [
    "session_expired",
    "invalid_api_key",
    "insufficient_quota",
    "model_not_found",
    "session_closed",
    "unauthorized",
];

/// `error.type` values after which the session cannot go on.
const FATAL_TYPES: [&str; 2] = ["authentication_error", "permission_error"];

/// Everything a session needs, resolved once at start-up.
#[derive(Debug, Clone)]
struct Settings {
    /// Local barge-in (`[agent.barge_in]`), when on.
    barge_in: Option<crate::audio::bargein::BargeInConfig>,
    /// `{url}?model={model}`.
    url: String,
    api_key: Secret,
    voice: String,
    instructions: String,
    greeting: Option<String>,
    g711: bool,
    vad_threshold: f32,
    vad_prefix_padding_ms: u32,
    vad_silence_duration_ms: u32,
    turn_detection: TurnDetection,
    vad_eagerness: VadEagerness,
    noise_reduction: Option<NoiseReduction>,
    idle_timeout_ms: Option<u32>,
    transcription_language: Option<String>,
    transcription_prompt: Option<String>,
    transcription_model: String,
    connect_timeout: Duration,
    /// A new session replaces the live one after this long (OpenAI's limit is 60 min).
    session_renew: Duration,
    /// `idle_timeout_ms` prompts before the goodbye to a silent caller.
    idle_prompts: u32,
    /// Function declarations for `session.update` (§1.7); empty = no tools.
    tools: Vec<Value>,
}

/// The OpenAI Realtime provider: one WebSocket session per call.
#[derive(Debug, Clone)]
pub struct OpenAiRealtime {
    settings: Arc<Settings>,
}

impl OpenAiRealtime {
    /// Resolves the API key and the instructions once, at start-up.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key: `agent.api_key` (unset or unreadable),
    /// `agent.instructions_file` (unreadable), `agent.model` (characters that do not belong
    /// in a URL query), `agent.api` (the removed `preview`).
    pub fn new(cfg: &OpenAiRealtimeConfig) -> Result<Self, ConfigError> {
        cfg.check_api()?;
        let api_key = cfg
            .api_key
            .resolve()
            .map_err(|e| ConfigError::invalid("agent.api_key", e.to_string()))?;
        let instructions = cfg
            .load_instructions()
            .map_err(|e| ConfigError::invalid("agent.instructions_file", e.to_string()))?;
        if cfg.model.is_empty()
            || !cfg
                .model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ConfigError::invalid(
                "agent.model",
                "must be a model name such as gpt-realtime (letters, digits, - _ .)",
            ));
        }
        let sep = if cfg.url.contains('?') { '&' } else { '?' };
        Ok(OpenAiRealtime {
            settings: Arc::new(Settings {
                url: format!("{}{sep}model={}", cfg.url, cfg.model),
                api_key,
                voice: cfg.voice.clone(),
                instructions,
                greeting: cfg.greeting.clone().filter(|g| !g.trim().is_empty()),
                g711: cfg.g711,
                vad_threshold: cfg.vad_threshold,
                vad_prefix_padding_ms: cfg.vad_prefix_padding_ms,
                vad_silence_duration_ms: cfg.vad_silence_duration_ms,
                turn_detection: cfg.turn_detection,
                vad_eagerness: cfg.vad_eagerness,
                noise_reduction: cfg.noise_reduction,
                idle_timeout_ms: cfg.idle_timeout_ms,
                transcription_language: cfg.transcription_language.clone(),
                transcription_prompt: cfg.transcription_prompt.clone(),
                transcription_model: cfg.transcription_model.clone(),
                connect_timeout: cfg.connect_timeout(),
                session_renew: Duration::from_secs(cfg.session_renew_s),
                idle_prompts: cfg.idle_prompts,
                tools: Vec::new(),
                barge_in: cfg.barge_in.enabled.then(|| cfg.barge_in.clone()),
            }),
        })
    }

    /// Declares the tools the model may call, each in the flat Realtime shape
    /// `{"type":"function","name":…,"description":…,"parameters":{JSON Schema}}`
    /// (`providers.md` §1.7). They are sent in `session.update` with `tool_choice: "auto"`;
    /// calls arrive as [`AgentEvent::ToolCall`].
    pub fn with_tools(mut self, tools: Vec<Value>) -> Self {
        Arc::make_mut(&mut self.settings).tools = tools;
        self
    }
}

impl Agent for OpenAiRealtime {
    fn name(&self) -> &'static str {
        PROVIDER
    }

    fn barge_in(&self) -> Option<crate::audio::bargein::BargeInConfig> {
        self.settings.barge_in.clone()
    }

    fn start(&self, call: CallInfo) -> AgentSession {
        let (session, endpoint) = session_channel();
        let mut settings = self.settings.clone();
        // The call's `[[tools]]` join any declared with `with_tools`, in the flat Realtime
        // shape.
        if !call.tools.is_empty() {
            let tools = &mut Arc::make_mut(&mut settings).tools;
            tools.extend(tool_declarations(&call.tools));
        }
        // The profile's `{placeholders}` (caller number, called number, custom variables).
        if !call.variables.is_empty() {
            let s = Arc::make_mut(&mut settings);
            s.instructions = super::fill_placeholders(&s.instructions, &call.variables);
            if let Some(g) = &mut s.greeting {
                *g = super::fill_placeholders(g, &call.variables);
            }
        }
        match protocol::Realtime::new(settings, &call) {
            Ok(p) => {
                super::task::spawn(super::driver::run(p, endpoint));
            }
            Err(e) => {
                warn!(error = %e, "openai realtime session failed");
                let _ = endpoint.events.try_send(AgentEvent::Failed(e));
            }
        }
        session
    }
}

/// The `tools` array of a `session.update` (providers.md §1.2, §1.7; oai-py
/// `realtime_function_tool_param.py`): one flat function entry per tool,
/// `{"type":"function","name":…,"description":…,"parameters":{…}}`.
pub fn tool_declarations(specs: &[crate::tools::ToolSpec]) -> Vec<Value> {
    specs
        .iter()
        .map(|s| {
            json!({
                "type": "function",
                "name": s.name,
                "description": s.description,
                "parameters": s.parameters,
            })
        })
        .collect()
}

/// The audio formats the server confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Formats {
    /// What `input_audio_buffer.append` carries.
    input: WireFormat,
    /// What the audio deltas carry.
    output: WireFormat,
}

/// The format to ask for: μ-law for 8 kHz calls when `g711` is on, else pcm16 at 24 kHz.
fn requested_format(s: &Settings, call_rate_hz: u32) -> WireFormat {
    if call_rate_hz == 8_000 && s.g711 {
        WireFormat::G711(Law::Ulaw)
    } else {
        WireFormat::Pcm16 { rate_hz: 24_000 }
    }
}

/// A format as `session.update` writes it (openai-python
/// `types/realtime/realtime_audio_formats_param.py`): `{"type":"audio/pcmu"}`,
/// `{"type":"audio/pcma"}` or `{"type":"audio/pcm","rate":24000}`.
fn format_json(f: WireFormat) -> Value {
    match f {
        WireFormat::G711(Law::Ulaw) => json!({"type": "audio/pcmu"}),
        WireFormat::G711(Law::Alaw) => json!({"type": "audio/pcma"}),
        WireFormat::Pcm16 { rate_hz } => json!({"type": "audio/pcm", "rate": rate_hz}),
    }
}

/// Reads a GA format object; `None` if unknown.
fn parse_format(v: &Value) -> Option<WireFormat> {
    match v {
        Value::Object(o) => match o.get("type")?.as_str()? {
            "audio/pcmu" => Some(WireFormat::G711(Law::Ulaw)),
            "audio/pcma" => Some(WireFormat::G711(Law::Alaw)),
            "audio/pcm" => {
                let rate = o.get("rate").and_then(Value::as_u64).unwrap_or(24_000);
                // Anything outside the usual audio rates is not a format we can trust.
                (8_000..=48_000)
                    .contains(&rate)
                    .then_some(WireFormat::Pcm16 {
                        rate_hz: rate as u32,
                    })
            }
            _ => None,
        },
        _ => None,
    }
}

/// The formats a `session.updated` session states; `requested` where it states none.
fn confirmed_formats(session: &Value, requested: WireFormat) -> Formats {
    let pick = |field: &str| {
        let stated = session.pointer(field);
        match stated.and_then(parse_format) {
            Some(f) => f,
            None => {
                debug!(field, stated = ?stated, "no usable format in session.updated; using the requested one");
                requested
            }
        }
    };
    Formats {
        input: pick("/audio/input/format"),
        output: pick("/audio/output/format"),
    }
}

/// The `session.update` event for this configuration (`providers.md` §1.2, §1.5, §1.9).
fn session_update(s: &Settings, format: WireFormat) -> Value {
    // The server cancels its own response on barge-in (§1.6), so voicegate never sends
    // response.cancel for it; it only truncates what the caller did not hear.
    let turn_detection = match s.turn_detection {
        TurnDetection::ServerVad => {
            let mut t = json!({
                "type": "server_vad",
                "threshold": s.vad_threshold,
                "prefix_padding_ms": s.vad_prefix_padding_ms,
                "silence_duration_ms": s.vad_silence_duration_ms,
                "create_response": true,
                "interrupt_response": true,
            });
            if let Some(ms) = s.idle_timeout_ms {
                t["idle_timeout_ms"] = json!(ms);
            }
            t
        }
        TurnDetection::SemanticVad => json!({
            "type": "semantic_vad",
            "eagerness": match s.vad_eagerness {
                VadEagerness::Auto => "auto",
                VadEagerness::Low => "low",
                VadEagerness::Medium => "medium",
                VadEagerness::High => "high",
            },
            "create_response": true,
            "interrupt_response": true,
        }),
    };
    let transcription = (!s.transcription_model.is_empty()).then(|| {
        let mut t = json!({"model": s.transcription_model});
        if let Some(l) = &s.transcription_language {
            t["language"] = json!(l);
        }
        if let Some(p) = &s.transcription_prompt {
            t["prompt"] = json!(p);
        }
        t
    });
    let fmt = format_json(format);
    let mut input = json!({"format": fmt, "turn_detection": turn_detection});
    if let Some(t) = transcription {
        input["transcription"] = t;
    }
    if let Some(n) = s.noise_reduction {
        input["noise_reduction"] = json!({"type": match n {
            NoiseReduction::NearField => "near_field",
            NoiseReduction::FarField => "far_field",
        }});
    }
    let mut session = json!({
        "type": "realtime",
        "instructions": s.instructions,
        "output_modalities": ["audio"],
        "audio": {
            "input": input,
            "output": {"format": fmt, "voice": s.voice},
        },
    });
    // Flat function declarations (`realtime_function_tool_param.py`, §1.7).
    if !s.tools.is_empty() {
        session["tools"] = Value::Array(s.tools.clone());
        session["tool_choice"] = json!("auto");
    }
    json!({"type": "session.update", "session": session})
}

/// The code of the `error` the server answers a `response.create` with while a response is
/// active (openai/openai-agents-python#1466, pipecat-ai/pipecat#3960).
const ACTIVE_RESPONSE: &str = "conversation_already_has_active_response";

/// The `response.create` requests of one session, sent one at a time (see module doc, 8).
/// Sans-IO: the live loop feeds it server events and sends what [`Responses::poll`] returns.
#[derive(Debug, Default)]
struct Responses {
    /// A response is in progress at the server (`response.created` seen, or the server said
    /// so in an error; `response.done` not yet).
    active: bool,
    /// A `response.create` was sent and neither `response.created` nor an error answered it.
    requested: bool,
    /// The last `response.create` sent, kept until the next `response.done` so that it can be
    /// sent again if the server refuses it.
    sent: Option<Value>,
    /// A `response.create` waiting for its turn (later requests are covered by it: one
    /// response answers every item added before it).
    wanted: Option<Value>,
    /// Function calls of the current response whose output has not been sent.
    open_calls: HashSet<String>,
    /// Numbers the `event_id`s of the `response.create`s (`vg_response_create_N`).
    sent_count: u64,
}

impl Responses {
    /// Asks for a response (`event` is a `response.create`, with or without `response`).
    fn want(&mut self, event: Value) {
        if self.wanted.is_none() {
            self.wanted = Some(event);
        }
    }

    /// The `response.create` to send now, if one is wanted and nothing stands in its way.
    fn poll(&mut self) -> Option<Value> {
        if self.active || self.requested || !self.open_calls.is_empty() {
            return None;
        }
        let mut event = self.wanted.take()?;
        self.sent_count += 1;
        event["event_id"] = json!(format!("vg_response_create_{}", self.sent_count));
        self.requested = true;
        self.sent = Some(event.clone());
        Some(event)
    }

    fn on_created(&mut self) {
        self.active = true;
        self.requested = false;
        // Calls of an earlier response whose output never came (a terminal tool, an
        // interrupted one) do not hold the conversation up any longer.
        self.open_calls.clear();
    }

    fn on_done(&mut self) {
        self.active = false;
        if !self.requested {
            self.sent = None;
        }
    }

    fn on_function_call(&mut self, call_id: &str) {
        self.open_calls.insert(call_id.to_owned());
    }

    fn on_tool_output(&mut self, call_id: &str) {
        self.open_calls.remove(call_id);
    }

    /// An `error` event; `true` if it refused a `response.create` of ours because a response
    /// was active: the request waits for that response's `response.done` and goes again.
    fn on_error(&mut self, error: Option<&Value>) -> bool {
        let field = |name: &str| error.and_then(|e| e.get(name)).and_then(Value::as_str);
        let ours = |sent: &Value| match field("event_id") {
            Some(id) => sent.get("event_id").and_then(Value::as_str) == Some(id),
            // Older servers leave event_id null: the error is about the last create.
            None => true,
        };
        let Some(sent) = self.sent.as_ref().filter(|s| ours(s)) else {
            return false;
        };
        if field("code") == Some(ACTIVE_RESPONSE) {
            let mut again = sent.clone();
            if let Some(o) = again.as_object_mut() {
                o.remove("event_id");
            }
            self.sent = None;
            self.requested = false;
            self.active = true;
            if self.wanted.is_none() {
                self.wanted = Some(again);
            }
            return true;
        }
        if field("event_id").is_some() {
            // Refused for another reason: it will not be answered.
            self.sent = None;
            self.requested = false;
        }
        false
    }
}

/// The `response.create` that makes the agent speak `greeting` first.
fn greeting_response(greeting: &str) -> Value {
    json!({
        "type": "response.create",
        "response": {
            "instructions": format!(
                "Greet the caller now by saying exactly this, and nothing else: \"{greeting}\""
            ),
        },
    })
}

/// One transcript line as a `conversation.item.create` for a renewed session
/// (openai-python `types/realtime/realtime_conversation_item_user_message_param.py`,
/// `…_assistant_message_param.py`: `input_text` for the user, `output_text` for the
/// assistant).
fn history_item((speaker, text): &(Speaker, String)) -> Value {
    let (role, kind) = match speaker {
        Speaker::Caller => ("user", "input_text"),
        Speaker::Agent => ("assistant", "output_text"),
    };
    json!({
        "type": "conversation.item.create",
        "item": {"type": "message", "role": role, "content": [{"type": kind, "text": text}]},
    })
}

/// `type/code: message` of an `error` object, scrubbed of the key.
fn describe_error(error: Option<&Value>, key: &Secret) -> String {
    let field = |name: &str| {
        error
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .unwrap_or("")
    };
    scrub(
        &format!("{}/{}: {}", field("type"), field("code"), field("message")),
        key,
    )
}

/// An `error` event the session cannot survive (`providers.md` §1.8).
fn is_fatal(error: Option<&Value>) -> bool {
    let field = |name: &str| error.and_then(|e| e.get(name)).and_then(Value::as_str);
    field("code").is_some_and(|c| FATAL_CODES.contains(&c))
        || field("type").is_some_and(|t| FATAL_TYPES.contains(&t))
}

/// Removes the API key, and any word that looks like an OpenAI key (`sk-…`, as OpenAI echoes
/// a masked key in auth errors), from provider text before it reaches a log or a record.
fn scrub(text: &str, key: &Secret) -> String {
    let key = key.expose();
    let text = if key.len() >= 4 {
        Cow::Owned(text.replace(key, "<redacted>"))
    } else {
        Cow::Borrowed(text)
    };
    let mut out = String::with_capacity(text.len());
    let mut rest: &str = &text;
    while let Some(i) = rest.find("sk-") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 3..];
        // Only a word that starts with `sk-` ("risk-free" stays as it is).
        if rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric())
        {
            out.push_str("sk-");
            rest = after;
            continue;
        }
        out.push_str("sk-<redacted>");
        let end = after
            .find(|c: char| c.is_whitespace() || "\"',;)".contains(c))
            .unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The fields of a server event voicegate reads; everything else is ignored. Strings borrow
/// from the message where JSON escaping allows.
#[derive(Debug, Deserialize)]
struct ServerEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    /// Empty when absent (serde borrows a `Cow` only when it is not inside an `Option`).
    #[serde(default, borrow)]
    item_id: Cow<'a, str>,
    /// The response an output event belongs to; empty when absent.
    #[serde(default, borrow)]
    response_id: Cow<'a, str>,
    /// Base64 audio or a text delta; empty when absent.
    #[serde(default, borrow)]
    delta: Cow<'a, str>,
    #[serde(default)]
    transcript: Option<String>,
    #[serde(default)]
    call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    session: Option<Value>,
    #[serde(default)]
    response: Option<Value>,
}

/// Fuzzing hook (`fuzz/fuzz_targets/openai_realtime_event.rs`; built only with
/// `--cfg fuzzing`, as cargo-fuzz builds, and in unit tests): drives one call's live
/// [`Realtime`] protocol with `data` as server messages, one per line, the way the driver
/// feeds it, first through a session's set-up and then through the live session (20 ms of
/// virtual time per message, timers fired when due), on a fresh protocol for each phase.
#[cfg(any(fuzzing, test))]
pub fn fuzz_server_messages(data: &[u8]) {
    use super::driver::{ServerMsg, WsProtocol};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = OpenAiRealtimeConfig {
        api_key: crate::secret::SecretSource::Inline("sk-fuzz-key".into()),
        instructions: "Fuzz.".into(),
        greeting: Some("Hello.".into()),
        ..OpenAiRealtimeConfig::default()
    };
    let Ok(agent) = OpenAiRealtime::new(&cfg) else {
        return;
    };
    for (live, rate_hz) in [(false, 8_000), (true, 16_000)] {
        let call = CallInfo {
            call_id: uuid::Uuid::nil(),
            rate_hz,
            caller_number: None,
            caller_name: None,
            tools: Vec::new(),
            variables: Default::default(),
        };
        let Ok(mut p) = Realtime::new(agent.settings.clone(), &call) else {
            return;
        };
        let mut now = tokio::time::Instant::now();
        let mut out = Vec::new();
        p.start(now, &mut out);
        p.handle_server(now, 1, ServerMsg::Opened, &mut out);
        if live {
            for ev in [
                r#"{"type":"session.created"}"#,
                r#"{"type":"session.updated","session":{"audio":{"input":{"format":{"type":"audio/pcm","rate":24000}},"output":{"format":{"type":"audio/pcmu"}}}}}"#,
            ] {
                p.handle_server(now, 1, ServerMsg::Text(ev), &mut out);
            }
        }
        for line in text.lines() {
            now += Duration::from_millis(20);
            if p.poll_timeout().is_some_and(|t| t <= now) {
                p.handle_timeout(now, &mut out);
            }
            p.handle_server(now, 1, ServerMsg::Text(line), &mut out);
            out.clear();
        }
    }
}

/// Checks the level of the first [`LEVEL_CHECK_MS`] of agent audio, in the wire format as
/// confirmed, before any resampling: a wrong format shows up as noise far louder than speech.
#[derive(Debug, Default)]
struct LevelCheck {
    sum_sq: f64,
    samples: usize,
    done: bool,
}

impl LevelCheck {
    /// Feeds one delta; once [`LEVEL_CHECK_MS`] have been seen, returns their RMS if it is
    /// implausible for speech (and never anything again).
    fn feed(&mut self, wire: &[u8], format: WireFormat) -> Option<f64> {
        if self.done {
            return None;
        }
        match format {
            WireFormat::G711(law) => {
                for &b in wire {
                    let x = f64::from(law.decode(b));
                    self.sum_sq += x * x;
                }
                self.samples += wire.len();
            }
            WireFormat::Pcm16 { .. } => {
                for b in wire.chunks_exact(2) {
                    let x = f64::from(i16::from_le_bytes([b[0], b[1]]));
                    self.sum_sq += x * x;
                }
                self.samples += wire.len() / 2;
            }
        }
        if self.samples < format.rate_hz() as usize * LEVEL_CHECK_MS / 1000 {
            return None;
        }
        self.done = true;
        let rms = (self.sum_sq / self.samples as f64).sqrt();
        (rms > IMPLAUSIBLE_RMS).then_some(rms)
    }
}

/// One assistant item being played (ReplyId ↔ item_id).
#[derive(Debug)]
struct Reply {
    id: ReplyId,
    item_id: String,
    /// The response the audio item belongs to: a function call in the same response was
    /// asked for by this reply (a terminal tool waits for it to be played).
    response_id: String,
    /// Wire audio received for it, bytes.
    wire_bytes: usize,
    /// The audio-done event arrived.
    done: bool,
    /// Barge-in hit it: later deltas are dropped.
    cancelled: bool,
}

/// Where the goodbye to a caller who stays silent stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Goodbye {
    /// Not needed.
    No,
    /// Wanted once the server's own response to the last timeout is done.
    AfterResponse,
    /// Its `response.create` is wanted or sent.
    Asked,
    /// Response `id` is saying it; its `response.done` ends the call.
    Speaking(String),
}

/// The `response.create` for the goodbye to a caller who stays silent.
fn goodbye_response() -> Value {
    json!({
        "type": "response.create",
        "response": {
            "instructions": "The caller has not answered your last prompts. Say a short, polite goodbye now; the call ends after it.",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretSource;
    use crate::tools::ToolSpec;

    #[test]
    fn renders_flat_tool_declarations() {
        let search = ToolSpec {
            name: "search_tires".into(),
            description: "Find tyres in stock".into(),
            parameters: json!({"type":"object","properties":{"size":{"type":"string"}},"required":["size"]}),
        };
        let flat = tool_declarations(&[search, ToolSpec::hangup()]);
        assert_eq!(flat[0]["type"], "function");
        assert_eq!(flat[0]["name"], "search_tires");
        assert_eq!(flat[0]["parameters"]["required"][0], "size");
        assert!(flat[0].get("function").is_none());
        assert_eq!(flat[1]["name"], "hangup");
    }

    fn settings(transcription: &str) -> Settings {
        let cfg = OpenAiRealtimeConfig {
            api_key: SecretSource::Inline("sk-unit-test-key-123".into()),
            voice: "marin".into(),
            instructions: "Be brief.".into(),
            transcription_model: transcription.into(),
            ..OpenAiRealtimeConfig::default()
        };
        Arc::try_unwrap(OpenAiRealtime::new(&cfg).unwrap().settings).unwrap()
    }

    #[test]
    fn ga_session_update_shape() {
        let s = settings("gpt-4o-mini-transcribe");
        assert_eq!(s.url, "wss://api.openai.com/v1/realtime?model=gpt-realtime");
        let v = session_update(&s, requested_format(&s, 8_000));
        assert_eq!(v["type"], "session.update");
        let ss = &v["session"];
        assert_eq!(ss["type"], "realtime");
        assert_eq!(ss["audio"]["input"]["format"]["type"], "audio/pcmu");
        assert_eq!(ss["audio"]["output"]["format"]["type"], "audio/pcmu");
        assert_eq!(ss["audio"]["output"]["voice"], "marin");
        assert_eq!(ss["audio"]["input"]["turn_detection"]["type"], "server_vad");
        assert_eq!(
            ss["audio"]["input"]["turn_detection"]["silence_duration_ms"],
            500
        );
        assert_eq!(
            ss["audio"]["input"]["transcription"]["model"],
            "gpt-4o-mini-transcribe"
        );
        assert!(ss.get("input_audio_format").is_none());
        assert!(
            ss["audio"]["input"].get("noise_reduction").is_none(),
            "unset: none"
        );
        assert!(
            ss["audio"]["input"]["turn_detection"]
                .get("idle_timeout_ms")
                .is_none()
        );
        // Wideband calls get pcm at 24 kHz.
        let v = session_update(&s, requested_format(&s, 16_000));
        assert_eq!(
            v["session"]["audio"]["input"]["format"],
            json!({"type": "audio/pcm", "rate": 24000})
        );
    }

    #[test]
    fn semantic_vad_noise_reduction_idle_timeout_and_transcription_hints() {
        let mut s = settings("gpt-4o-mini-transcribe");
        s.turn_detection = TurnDetection::SemanticVad;
        s.vad_eagerness = VadEagerness::Low;
        s.noise_reduction = Some(NoiseReduction::NearField);
        s.transcription_language = Some("uk".into());
        s.transcription_prompt = Some("Шиномонтаж, R16".into());
        let v = session_update(&s, requested_format(&s, 8_000));
        let input = &v["session"]["audio"]["input"];
        assert_eq!(
            input["turn_detection"],
            json!({"type": "semantic_vad", "eagerness": "low", "create_response": true, "interrupt_response": true})
        );
        assert_eq!(input["noise_reduction"], json!({"type": "near_field"}));
        assert_eq!(input["transcription"]["language"], "uk");
        assert_eq!(input["transcription"]["prompt"], "Шиномонтаж, R16");
        s.turn_detection = TurnDetection::ServerVad;
        s.idle_timeout_ms = Some(8_000);
        let v = session_update(&s, requested_format(&s, 8_000));
        let td = &v["session"]["audio"]["input"]["turn_detection"];
        assert_eq!(td["type"], "server_vad");
        assert_eq!(td["idle_timeout_ms"], 8_000);
    }

    #[test]
    fn tools_and_no_transcription() {
        let mut s = settings("");
        let v = session_update(&s, requested_format(&s, 8_000));
        let input = &v["session"]["audio"]["input"];
        assert!(input.get("transcription").is_none(), "empty model = off");
        assert!(v["session"].get("tools").is_none(), "no tools declared");
        let tool = json!({"type": "function", "name": "get_time", "description": "Current time",
                          "parameters": {"type": "object", "properties": {}}});
        s.tools = vec![tool.clone()];
        let v = session_update(&s, requested_format(&s, 8_000));
        assert_eq!(v["session"]["tools"], json!([tool]));
        assert_eq!(v["session"]["tool_choice"], "auto");
    }

    #[test]
    fn responses_go_one_at_a_time() {
        let create = || json!({"type": "response.create"});
        let mut r = Responses::default();
        // A response with two parallel calls is active: nothing goes out.
        r.on_created();
        r.on_function_call("a");
        r.on_function_call("b");
        r.on_tool_output("a");
        r.want(create());
        assert!(r.poll().is_none(), "response active");
        r.on_tool_output("b");
        r.want(create());
        assert!(r.poll().is_none(), "response active");
        r.on_done();
        let sent = r.poll().expect("one create after done and both outputs");
        assert_eq!(sent["event_id"], "vg_response_create_1");
        assert!(r.poll().is_none(), "the two requests were one");
        // The server refuses it: a response of its own started meanwhile.
        r.on_created();
        let refused = json!({"type": "invalid_request_error", "code": ACTIVE_RESPONSE,
                             "message": "Conversation already has an active response in progress: resp_x.",
                             "param": null, "event_id": "vg_response_create_1"});
        assert!(r.on_error(Some(&refused)));
        assert!(r.poll().is_none(), "waits for that response");
        r.on_done();
        let again = r.poll().expect("sent again after done");
        assert_eq!(again["event_id"], "vg_response_create_2");
        // Another client event's error is not about the create.
        r.on_created();
        let other = json!({"code": ACTIVE_RESPONSE, "event_id": "evt_other"});
        assert!(!r.on_error(Some(&other)));
    }

    #[test]
    fn an_unanswered_call_does_not_block_later_responses() {
        let mut r = Responses::default();
        r.on_created();
        r.on_function_call("hangup_1");
        r.on_done();
        r.want(json!({"type": "response.create"}));
        assert!(r.poll().is_none(), "the output may still come");
        // The caller spoke and the server answered: the old call is moot.
        r.on_created();
        r.on_done();
        assert!(r.poll().is_some());
    }

    #[test]
    fn the_removed_preview_api_is_a_config_error() {
        let mut cfg = OpenAiRealtimeConfig {
            api_key: SecretSource::Inline("k".into()),
            api: Some("preview".into()),
            ..OpenAiRealtimeConfig::default()
        };
        let e = OpenAiRealtime::new(&cfg).unwrap_err().to_string();
        assert!(e.contains("agent.api") && e.contains("GA"), "{e}");
        cfg.api = Some("ga".into());
        assert!(OpenAiRealtime::new(&cfg).is_ok());
    }

    #[test]
    fn confirmed_formats_are_read() {
        let req = WireFormat::G711(Law::Ulaw);
        let ga = json!({"audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}},
                                  "output": {"format": {"type": "audio/pcma"}}}});
        assert_eq!(
            confirmed_formats(&ga, req),
            Formats {
                input: WireFormat::Pcm16 { rate_hz: 24_000 },
                output: WireFormat::G711(Law::Alaw)
            }
        );
        // The beta strings are not GA formats: the requested one stands.
        let preview = json!({"input_audio_format": "pcm16", "output_audio_format": "g711_ulaw"});
        assert_eq!(
            confirmed_formats(&preview, req),
            Formats {
                input: req,
                output: req
            }
        );
        assert_eq!(
            confirmed_formats(&json!({}), req),
            Formats {
                input: req,
                output: req
            }
        );
        assert_eq!(parse_format(&json!({"type": "audio/pcm", "rate": 3})), None);
    }

    #[test]
    fn fatal_errors() {
        assert!(is_fatal(Some(
            &json!({"type": "invalid_request_error", "code": "session_expired"})
        )));
        assert!(is_fatal(Some(&json!({"type": "authentication_error"}))));
        assert!(!is_fatal(Some(
            &json!({"type": "invalid_request_error", "code": "response_cancel_not_active"})
        )));
        assert!(!is_fatal(None));
    }

    #[test]
    fn scrub_removes_the_key_and_key_like_words() {
        let key = Secret::new("sk-live-abcdef123456");
        let s = scrub(
            "Incorrect API key provided: sk-live-***3456. Bearer sk-live-abcdef123456 x",
            &key,
        );
        assert!(!s.contains("abcdef"), "{s}");
        assert!(!s.contains("3456"), "{s}");
        assert!(s.ends_with(" x"), "{s}");
        assert_eq!(scrub("a risk-free day", &key), "a risk-free day");
        let other = Secret::new("plainkey99");
        assert_eq!(scrub("got plainkey99!", &other), "got <redacted>!");
    }

    #[test]
    fn level_check_flags_audio_read_in_the_wrong_format() {
        let speech = crate::selftest::builtin_recording().samples;
        let mut ulaw = Vec::new();
        Law::Ulaw.encode_into(&speech, &mut ulaw);
        let mut pcm = Vec::new();
        crate::audio::slin_to_le_bytes(&speech, &mut pcm);
        let pcm8 = WireFormat::Pcm16 { rate_hz: 8_000 };
        let ulaw_fmt = WireFormat::G711(Law::Ulaw);
        let check = |wire: &[u8], format: WireFormat| {
            let mut c = LevelCheck::default();
            wire.chunks(800).find_map(|d| c.feed(d, format)).is_some()
        };
        assert!(!check(&ulaw, ulaw_fmt), "real speech in the right format");
        assert!(!check(&pcm, pcm8), "real speech in the right format");
        assert!(check(&ulaw, pcm8), "μ-law read as pcm16");
        assert!(check(&pcm, ulaw_fmt), "pcm16 read as μ-law");
    }

    /// The fuzzing hook runs the corpus, one message at a time and all as one conversation,
    /// and hostile text, without a panic.
    #[test]
    fn fuzz_hook_survives_the_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/openai_realtime_event");
        let mut all = Vec::new();
        for entry in std::fs::read_dir(dir).expect("corpus") {
            let data = std::fs::read(entry.unwrap().path()).unwrap();
            fuzz_server_messages(&data);
            all.extend_from_slice(&data);
            all.push(b'\n');
        }
        fuzz_server_messages(&all);
        for hostile in [
            "",
            "\n\n",
            "{",
            "[]",
            r#"{"type":"response.output_audio.delta","item_id":"","delta":"%%"}"#,
            r#"{"type":"response.output_audio.delta","item_id":"i","delta":"AAA"}"#,
            r#"{"type":"response.done"}"#,
        ] {
            fuzz_server_messages(hostile.as_bytes());
        }
    }

    #[test]
    fn server_event_borrows_delta() {
        let text = r#"{"type":"response.output_audio.delta","item_id":"item_1","delta":"AAAA","extra":{"a":1}}"#;
        let ev: ServerEvent<'_> = serde_json::from_str(text).unwrap();
        assert_eq!(ev.kind, "response.output_audio.delta");
        assert!(matches!(ev.delta, Cow::Borrowed("AAAA")));
        assert!(matches!(ev.item_id, Cow::Borrowed("item_1")));
        let ev: ServerEvent<'_> = serde_json::from_str(r#"{"type":"error"}"#).unwrap();
        assert!(ev.item_id.is_empty() && ev.delta.is_empty());
    }
}
