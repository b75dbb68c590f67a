//! ElevenLabs Agents (Conversational AI) over WebSocket (providers.md §2).
//!
//! One WebSocket per call: `<url>?agent_id=<id>` for a public agent, or a signed URL fetched
//! per call with the `xi-api-key` for a private one (§2.1). The first message is
//! `conversation_initiation_client_data` with the dynamic variables `caller_number` and
//! `call_id` and any configured overrides (prompt, first message, language) (§2.2). The
//! server answers `conversation_initiation_metadata` naming the agent's audio formats
//! (`ulaw_8000`, `pcm_8000` … `pcm_48000`); voicegate takes them from there rather than
//! assuming them, and converts the call's slin with [`crate::audio::convert`]. Caller audio
//! that arrives before the metadata is held (up to [`EARLY_AUDIO`]) and sent after it.
//!
//! Each call is a sans-IO protocol, [`protocol::Conversation`] (`elevenlabs_agent/protocol.rs`, `now`
//! passed in), run by the shared WebSocket driver ([`super::driver`]) once the URL is known.
//!
//! Mapping (§2.3, §2.4, §2.5):
//!
//! | ElevenLabs | voicegate |
//! |---|---|
//! | caller audio | `{"user_audio_chunk":"<base64>"}` every `chunk_ms` |
//! | `audio` | [`AgentEvent::Audio`] (audio with an `event_id` at or below the last interruption's is dropped, as the official SDK does) |
//! | `interruption` | [`AgentEvent::SpeechStarted`]: the call flushes its playout |
//! | `ping` | `{"type":"pong","event_id":…}` at once |
//! | `user_transcript` | [`AgentEvent::Transcript`] (caller) |
//! | `agent_response` | [`AgentEvent::Transcript`] (agent), held until the next turn so that an `agent_response_correction` (the reply was cut by an interruption) can replace it with what the caller heard |
//! | `client_tool_call` | [`AgentEvent::ToolCall`]; its [`AgentInput::ToolResult`](super::AgentInput::ToolResult) goes back as `client_tool_result` (`is_error` when the result is `{"error":…}`) |
//! | DTMF | digits collected by [`Keypad`](super::keypad::Keypad) (1 s after the last, or at once on `#`), then one `user_message` the agent answers |
//! | `error` (`error_event`: `code`, `error_type`, `reason`, `message`) | logged; its details join the reason of the close that follows |
//! | close with code 1000 | [`AgentEvent::Ended`] (the agent ended the conversation) |
//! | any other close, a dropped connection, a failed connect, no metadata in time | [`AgentEvent::Failed`] |
//!
//! Shapes: elevenlabs/packages `schemas/agent.asyncapi.yaml`. Two agent settings matter and
//! only the agent's owner can change them: client tool calls arrive only if the agent's
//! `client_events` include `client_tool_call` (the default list does not), and the
//! `prompt`/`first_message`/`language` overrides voicegate sends must be allowed in the
//! agent's security settings, or the server closes with 1008 (`override_error`). With tools
//! configured, the first call logs a warning saying so.
//!
//! Replies: ElevenLabs does not number replies, so a new [`ReplyId`](crate::audio::ReplyId) starts with the first
//! audio after the caller's transcript or an interruption. A tool call is tied to the reply
//! being spoken, or to the interrupted one if it arrives after an interruption and before
//! new audio, so the call can refuse a terminal tool whose goodbye was cut off.

mod protocol;

#[cfg(any(fuzzing, test))]
use protocol::Conversation;

use super::{Agent, AgentEndpoint, AgentError, AgentEvent, AgentSession, CallInfo};
use crate::agent::config::ElevenlabsAgentConfig;
use crate::audio::convert::WireFormat;
use crate::audio::g711::Law;
use crate::error::ConfigError;
use crate::secret::Secret;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio::time::Instant;

const PROVIDER: &str = "elevenlabs_agent";

/// Whether the `client_events` warning was logged (once per process).
static TOOLS_WARNED: AtomicBool = AtomicBool::new(false);

/// Caller audio held while waiting for the `conversation_initiation_metadata` (1 s).
pub(crate) const EARLY_AUDIO: Duration = Duration::from_secs(1);

/// Parses an ElevenLabs audio format name (`ulaw_8000`, `pcm_16000`, …; providers.md §2.2).
/// `None` for formats a phone bridge cannot use.
pub(crate) fn parse_format(name: &str) -> Option<WireFormat> {
    match name {
        "ulaw_8000" => Some(WireFormat::G711(Law::Ulaw)),
        "alaw_8000" => Some(WireFormat::G711(Law::Alaw)),
        _ => {
            let rate: u32 = name.strip_prefix("pcm_")?.parse().ok()?;
            matches!(rate, 8_000 | 16_000 | 22_050 | 24_000 | 44_100 | 48_000)
                .then_some(WireFormat::Pcm16 { rate_hz: rate })
        }
    }
}

#[derive(Debug)]
struct Settings {
    /// Local barge-in (`[agent.barge_in]`), when on.
    barge_in: Option<crate::audio::bargein::BargeInConfig>,
    url: String,
    agent_id: String,
    api_key: Option<Secret>,
    signed_url_endpoint: String,
    prompt: Option<String>,
    first_message: Option<String>,
    language: Option<String>,
    chunk_ms: u32,
    connect_timeout: Duration,
    http: Option<reqwest::Client>,
}

/// The ElevenLabs Agents provider; see the module docs.
#[derive(Debug, Clone)]
pub(crate) struct ElevenlabsAgent {
    settings: Arc<Settings>,
}

impl ElevenlabsAgent {
    /// Builds the provider from `[agent]` (resolves the API key, reads the prompt file).
    ///
    /// # Errors
    /// [`ConfigError`] naming the bad key.
    pub(crate) fn from_config(c: &ElevenlabsAgentConfig) -> Result<Self, ConfigError> {
        c.validate()?;
        let api_key = match &c.api_key {
            Some(k) => Some(
                k.resolve()
                    .map_err(|e| ConfigError::invalid("agent.api_key", e.to_string()))?,
            ),
            None => None,
        };
        let http =
            match api_key {
                Some(_) => Some(crate::tls::http_client_builder().build().map_err(|e| {
                    ConfigError::invalid("agent.signed_url_endpoint", e.to_string())
                })?),
                None => None,
            };
        Ok(ElevenlabsAgent {
            settings: Arc::new(Settings {
                url: c.url.clone(),
                agent_id: c.agent_id.clone(),
                api_key,
                signed_url_endpoint: c.signed_url_endpoint.clone(),
                prompt: c.load_prompt()?,
                first_message: c.first_message.clone(),
                language: c.language.clone(),
                chunk_ms: c.chunk_ms,
                connect_timeout: c.connect_timeout(),
                http,
                barge_in: c.barge_in.enabled.then(|| c.barge_in.clone()),
            }),
        })
    }
}

/// The request bodies of ElevenLabs' `POST /v1/convai/tools` (providers.md §2.5;
/// elevenlabs.io `docs/api-reference/tools/create`, client variant: `{"tool_config": {…}}`,
/// one per tool): `{"type":"client","name","description","parameters","expects_response",
/// "response_timeout_secs"}`, each answered within `response_timeout_secs` (ElevenLabs
/// accepts 1–120 for client tools; the value is clamped to that). The built-in terminal
/// tools (`hangup`, `transfer_to_operator`) expect no response: the call ends instead.
/// ElevenLabs declares tools on the agent, not per conversation: create each with one POST,
/// attach the returned ids to the agent (`tool_ids`) and add `client_tool_call` to its
/// `client_events` (not in the default list; without it the server never sends the calls).
pub fn client_tools(specs: &[crate::tools::ToolSpec], response_timeout_secs: u32) -> Value {
    use crate::tools::{HANGUP, TRANSFER_TO_OPERATOR};
    let timeout = response_timeout_secs.clamp(1, 120);
    Value::Array(
        specs
            .iter()
            .map(|s| {
                let expects_response = !matches!(s.name.as_str(), HANGUP | TRANSFER_TO_OPERATOR);
                json!({"tool_config": {
                    "type": "client",
                    "name": s.name,
                    "description": s.description,
                    "parameters": s.parameters,
                    "expects_response": expects_response,
                    "response_timeout_secs": timeout,
                }})
            })
            .collect(),
    )
}

impl Agent for ElevenlabsAgent {
    fn name(&self) -> &'static str {
        PROVIDER
    }

    fn barge_in(&self) -> Option<crate::audio::bargein::BargeInConfig> {
        self.settings.barge_in.clone()
    }

    fn start(&self, call: CallInfo) -> AgentSession {
        let (session, endpoint) = super::session_channel();
        super::task::spawn(run(self.settings.clone(), call, endpoint));
        session
    }
}

/// Fetches the conversation's URL (a signed one for a private agent), then runs the
/// conversation protocol on the shared driver; connecting and the metadata share one
/// deadline, `connect_timeout` from now.
async fn run(s: Arc<Settings>, call: CallInfo, io: AgentEndpoint) {
    let deadline = Instant::now() + s.connect_timeout;
    let url = match tokio::time::timeout_at(deadline, conversation_url(&s)).await {
        Ok(Ok(url)) => url,
        Ok(Err(e)) => return fail(e, io).await,
        Err(_) => {
            let e = AgentError::Timeout {
                provider: PROVIDER,
                detail: "signed url".into(),
            };
            return fail(e, io).await;
        }
    };
    if io.events.is_closed() {
        return;
    }
    let conversation = protocol::Conversation::new(s, &call, url, deadline);
    super::driver::run(conversation, io).await;
}

async fn fail(e: AgentError, mut io: AgentEndpoint) {
    let _ = io.events.send(AgentEvent::Failed(e)).await;
    // Stay until the call lets go, so the call sees the event before the channel closes.
    while io.input.recv().await.is_some() {}
}

fn connect_err(detail: impl Into<String>) -> AgentError {
    AgentError::Connect {
        provider: PROVIDER,
        detail: detail.into(),
    }
}

fn protocol_err(detail: impl Into<String>) -> AgentError {
    AgentError::Protocol {
        provider: PROVIDER,
        detail: detail.into(),
    }
}

fn provider_err(detail: impl Into<String>) -> AgentError {
    AgentError::Provider {
        provider: PROVIDER,
        detail: detail.into(),
    }
}

/// The URL to connect to: a signed URL when an API key is configured (§2.1).
async fn conversation_url(s: &Settings) -> Result<String, AgentError> {
    let (Some(key), Some(http)) = (&s.api_key, &s.http) else {
        let mut url = reqwest::Url::parse(&s.url).map_err(|e| connect_err(format!("url: {e}")))?;
        url.query_pairs_mut().append_pair("agent_id", &s.agent_id);
        return Ok(url.into());
    };
    let mut url = reqwest::Url::parse(&s.signed_url_endpoint)
        .map_err(|e| connect_err(format!("signed_url_endpoint: {e}")))?;
    url.query_pairs_mut().append_pair("agent_id", &s.agent_id);
    let response = http
        .get(url)
        .header("xi-api-key", key.expose())
        .timeout(s.connect_timeout)
        .send()
        .await
        .map_err(|e| connect_err(format!("signed url: {}", e.without_url())))?;
    let status = response.status();
    if !status.is_success() {
        return Err(connect_err(format!("signed url: HTTP {}", status.as_u16())));
    }
    let body: Value = response
        .json()
        .await
        .map_err(|e| connect_err(format!("signed url: {}", e.without_url())))?;
    body.get("signed_url")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| connect_err("signed url: no signed_url in the answer"))
}

/// The `conversation_initiation_client_data` message (§2.2).
fn client_data(s: &Settings, call: &CallInfo) -> String {
    let mut agent = Map::new();
    let fill = |t: &str| super::fill_placeholders(t, &call.variables);
    if let Some(p) = &s.prompt {
        agent.insert("prompt".into(), json!({ "prompt": fill(p) }));
    }
    if let Some(m) = &s.first_message {
        agent.insert("first_message".into(), json!(fill(m)));
    }
    if let Some(l) = &s.language {
        agent.insert("language".into(), json!(l));
    }
    // The profile's variables (caller and called number, custom ones; empty ones too: an
    // agent whose prompt names a variable the client leaves out fails to start) first; the
    // two the agent always had keep their meaning.
    let mut vars: Map<String, serde_json::Value> = call
        .variables
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    vars.insert(
        "caller_number".into(),
        json!(call.caller_number.as_deref().unwrap_or("unknown")),
    );
    vars.insert("call_id".into(), json!(call.call_id.to_string()));
    let mut msg = json!({
        "type": "conversation_initiation_client_data",
        "dynamic_variables": vars,
    });
    if !agent.is_empty() {
        msg["conversation_config_override"] = json!({ "agent": agent });
    }
    msg.to_string()
}

/// One ElevenLabs Agents server message, reduced to what the session loop acts on
/// (providers.md §2.3–§2.5). Fields a message lacks, or carries with the wrong JSON type, take
/// the defaults named per variant, exactly as the loop treats them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ServerMessage {
    /// `conversation_initiation_metadata`: the agent's audio format names (`ulaw_8000`,
    /// `pcm_16000`, …; see [`parse_format`]) and the conversation id; `""` when missing.
    Metadata {
        /// `conversation_initiation_metadata_event.conversation_id`.
        conversation_id: String,
        /// `user_input_audio_format`: what the caller's audio must be sent as.
        input_format: String,
        /// `agent_output_audio_format`: what the agent's `audio` carries.
        output_format: String,
    },
    /// `audio`: one chunk of agent audio in the output format.
    Audio {
        /// `audio_event.event_id`; `i64::MAX` when missing, so it is never taken for audio
        /// from before an interruption.
        event_id: i64,
        /// `audio_event.audio_base_64`, still base64; `None` when missing.
        audio_base_64: Option<String>,
    },
    /// `interruption`: the caller spoke over the agent.
    Interruption {
        /// `interruption_event.event_id`; 0 when missing. Audio at or below it is stale.
        event_id: i64,
    },
    /// `ping`: answer at once with `{"type":"pong","event_id":…}`.
    Ping {
        /// `ping_event.event_id`, echoed as is (`null` when missing).
        event_id: Value,
    },
    /// `user_transcript`: the caller's turn, transcribed.
    UserTranscript {
        /// `user_transcription_event.user_transcript`; `None` when missing.
        text: Option<String>,
    },
    /// `agent_response`: the text of the agent's reply.
    AgentResponse {
        /// `agent_response_event.agent_response`; `None` when missing.
        text: Option<String>,
    },
    /// `client_tool_call` with a tool name and call id.
    ToolCall {
        /// `client_tool_call.tool_call_id`, echoed in `client_tool_result`.
        tool_call_id: String,
        /// `client_tool_call.tool_name`.
        tool_name: String,
        /// `client_tool_call.parameters` as JSON text; `{}` when missing or not an object.
        arguments: String,
    },
    /// `client_tool_call` without `tool_name` or `tool_call_id` (ignored by the loop).
    MalformedToolCall,
    /// `error` (`ErrorPayload` of agent.asyncapi.yaml: `error_event` with `code` 1000 / 1002
    /// / 1008 / 1011, `error_type` such as `override_error` or `missing_dynamic_variable`,
    /// `reason`, `message`), or the older `client_error`; `kind` is the `type`. Missing
    /// fields are `None`.
    Error {
        /// The message's `type`.
        kind: String,
        /// `error_event.code`: the WebSocket close code that follows.
        code: Option<i64>,
        /// `error_event.error_type`.
        error_type: Option<String>,
        /// `error_event.reason`, or else `error_event.message`.
        reason: Option<String>,
    },
    /// `agent_response_correction`: the agent's reply was cut; what the caller heard.
    AgentResponseCorrection {
        /// `agent_response_correction_event.corrected_agent_response`; `None` when missing.
        corrected: Option<String>,
    },
    /// Any other `type` (`vad_score`, `agent_response_correction`, …, or `""` when the
    /// message has no string `type`); ignored.
    Other {
        /// The message's `type`, `""` when missing.
        kind: String,
    },
}

/// Parses one ElevenLabs Agents server text message (providers.md §2.3–§2.5) into the
/// [`ServerMessage`] the session loop acts on. Pure: no I/O, no state; strings are moved out
/// of the parsed JSON, not copied. Audio stays base64 (the loop decodes it only when it keeps
/// it).
///
/// # Errors
/// The [`serde_json::Error`] when the text is not JSON (the loop logs and ignores it). Any
/// JSON value parses: missing or mistyped fields take the defaults documented on
/// [`ServerMessage`].
pub(crate) fn parse_server_message(text: &str) -> Result<ServerMessage, serde_json::Error> {
    let mut v: Value = serde_json::from_str(text)?;
    let kind = match v.get_mut("type").map(Value::take) {
        Some(Value::String(k)) => k,
        _ => String::new(),
    };
    let take_str = |v: &mut Value, pointer: &str| match v.pointer_mut(pointer).map(Value::take) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let int = |v: &Value, pointer: &str| v.pointer(pointer).and_then(Value::as_i64);
    Ok(match kind.as_str() {
        "conversation_initiation_metadata" => {
            let mut field = |name: &str| {
                let pointer = format!("/conversation_initiation_metadata_event/{name}");
                take_str(&mut v, &pointer).unwrap_or_default()
            };
            ServerMessage::Metadata {
                conversation_id: field("conversation_id"),
                input_format: field("user_input_audio_format"),
                output_format: field("agent_output_audio_format"),
            }
        }
        "audio" => ServerMessage::Audio {
            event_id: int(&v, "/audio_event/event_id").unwrap_or(i64::MAX),
            audio_base_64: take_str(&mut v, "/audio_event/audio_base_64"),
        },
        "interruption" => ServerMessage::Interruption {
            event_id: int(&v, "/interruption_event/event_id").unwrap_or(0),
        },
        "ping" => ServerMessage::Ping {
            event_id: v
                .pointer_mut("/ping_event/event_id")
                .map(Value::take)
                .unwrap_or(Value::Null),
        },
        "user_transcript" => ServerMessage::UserTranscript {
            text: take_str(&mut v, "/user_transcription_event/user_transcript"),
        },
        "agent_response" => ServerMessage::AgentResponse {
            text: take_str(&mut v, "/agent_response_event/agent_response"),
        },
        "client_tool_call" => client_tool_call(&mut v),
        "client_error" | "error" => {
            let code = int(&v, "/error_event/code");
            let error_type = take_str(&mut v, "/error_event/error_type");
            let reason = take_str(&mut v, "/error_event/reason")
                .or_else(|| take_str(&mut v, "/error_event/message"));
            ServerMessage::Error {
                kind,
                code,
                error_type,
                reason,
            }
        }
        "agent_response_correction" => ServerMessage::AgentResponseCorrection {
            corrected: take_str(
                &mut v,
                "/agent_response_correction_event/corrected_agent_response",
            ),
        },
        _ => ServerMessage::Other { kind },
    })
}

/// A `client_tool_call` message (`tool_name`, `tool_call_id`, `parameters`); malformed
/// without a name or id.
fn client_tool_call(v: &mut Value) -> ServerMessage {
    let mut take = |pointer: &str| match v.pointer_mut(pointer).map(Value::take) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let name = take("/client_tool_call/tool_name");
    let id = take("/client_tool_call/tool_call_id");
    match (name, id) {
        (Some(tool_name), Some(tool_call_id)) => ServerMessage::ToolCall {
            tool_call_id,
            tool_name,
            arguments: match v.pointer("/client_tool_call/parameters") {
                Some(p @ Value::Object(_)) => p.to_string(),
                _ => "{}".to_owned(),
            },
        },
        _ => ServerMessage::MalformedToolCall,
    }
}

/// Fuzzing hook (`fuzz/fuzz_targets/elevenlabs_agent_event.rs`; built only with
/// `--cfg fuzzing`, as cargo-fuzz builds, and in unit tests): drives one call's
/// [`Conversation`] protocol with `data` as server messages, one per line, the way the driver
/// feeds it (socket open, 20 ms of virtual time per message, timers fired when due), at 8 and
/// at 16 kHz, with caller audio and a keypad digit between messages.
#[cfg(any(fuzzing, test))]
pub fn fuzz_server_messages(data: &[u8]) {
    use super::AgentInput;
    use super::driver::{ServerMsg, WsProtocol};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = ElevenlabsAgentConfig {
        url: "ws://127.0.0.1:9/c".into(),
        agent_id: "agent_fuzz".into(),
        ..Default::default()
    };
    let Ok(agent) = ElevenlabsAgent::from_config(&cfg) else {
        return;
    };
    for rate_hz in [8_000, 16_000] {
        let call = CallInfo {
            call_id: uuid::Uuid::nil(),
            rate_hz,
            caller_number: None,
            caller_name: None,
            tools: Vec::new(),
            variables: Default::default(),
        };
        let mut now = Instant::now();
        let deadline = now + Duration::from_secs(60);
        let mut c = Conversation::new(agent.settings.clone(), &call, cfg.url.clone(), deadline);
        let mut out = Vec::new();
        c.start(now, &mut out);
        c.handle_server(now, 1, ServerMsg::Opened, &mut out);
        let frame = bytes::Bytes::from(vec![0u8; rate_hz as usize / 25]);
        for (n, line) in text.lines().enumerate() {
            now += Duration::from_millis(20);
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now, &mut out);
            }
            c.handle_server(now, 1, ServerMsg::Text(line), &mut out);
            c.handle_input(now, AgentInput::Audio(frame.clone()), &mut out);
            if n % 7 == 3 {
                c.handle_input(now, AgentInput::Dtmf('5'), &mut out);
            }
            out.clear();
        }
        c.finish(&mut out);
    }
}

#[cfg(test)]
mod tests {

    /// The fuzzing hook runs the corpus, one message at a time and all as one conversation,
    /// and hostile text, without a panic.
    #[test]
    fn fuzz_hook_survives_the_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/elevenlabs_agent_event");
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
            "{",
            r#"{"type":"audio","audio_event":{"audio_base_64":"%%","event_id":1}}"#,
            r#"{"type":"conversation_initiation_metadata","conversation_initiation_metadata_event":{"agent_output_audio_format":"pcm_7","user_input_audio_format":"ulaw_8000"}}"#,
        ] {
            fuzz_server_messages(hostile.as_bytes());
        }
    }

    use super::*;

    #[test]
    fn renders_client_tool_bodies() {
        let search = crate::tools::ToolSpec {
            name: "search_tires".into(),
            description: "Find tyres in stock".into(),
            parameters: json!({"type":"object","properties":{"size":{"type":"string"}},"required":["size"]}),
        };
        let specs = [search, crate::tools::ToolSpec::hangup()];
        let el = client_tools(&specs, 15);
        let t = &el[0]["tool_config"];
        assert_eq!(t["type"], "client");
        assert_eq!(t["name"], "search_tires");
        assert_eq!(t["expects_response"], true);
        assert_eq!(t["response_timeout_secs"], 15);
        assert_eq!(
            el[1]["tool_config"]["expects_response"], false,
            "hangup ends the call instead"
        );
        assert_eq!(
            client_tools(&specs, 600)[0]["tool_config"]["response_timeout_secs"],
            120,
            "client tools accept at most 120 s"
        );
    }

    #[test]
    fn formats_parse() {
        assert_eq!(parse_format("ulaw_8000"), Some(WireFormat::G711(Law::Ulaw)));
        assert_eq!(
            parse_format("pcm_16000"),
            Some(WireFormat::Pcm16 { rate_hz: 16_000 })
        );
        assert_eq!(parse_format("pcm_17"), None);
        assert_eq!(parse_format("mp3_44100_128"), None);
    }

    #[test]
    fn server_messages_parse_as_the_loop_reads_them() {
        let m = parse_server_message(
            r#"{"type":"conversation_initiation_metadata","conversation_initiation_metadata_event":{"conversation_id":"c1","agent_output_audio_format":"pcm_16000","user_input_audio_format":"ulaw_8000"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ServerMessage::Metadata {
                conversation_id: "c1".into(),
                input_format: "ulaw_8000".into(),
                output_format: "pcm_16000".into(),
            }
        );
        let m = parse_server_message(
            r#"{"type":"audio","audio_event":{"audio_base_64":"AAA=","event_id":4}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ServerMessage::Audio {
                event_id: 4,
                audio_base_64: Some("AAA=".into())
            }
        );
        // A missing event id never makes audio look older than an interruption.
        let m = parse_server_message(r#"{"type":"audio","audio_event":{}}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::Audio {
                event_id: i64::MAX,
                audio_base_64: None
            }
        );
        let m = parse_server_message(
            r#"{"type":"interruption","interruption_event":{"event_id":"x"}}"#,
        )
        .unwrap();
        assert_eq!(m, ServerMessage::Interruption { event_id: 0 });
        let m = parse_server_message(r#"{"type":"ping","ping_event":{"event_id":9,"ping_ms":30}}"#)
            .unwrap();
        assert_eq!(m, ServerMessage::Ping { event_id: json!(9) });
        let m = parse_server_message(r#"{"type":"client_tool_call","client_tool_call":{"tool_name":"t","tool_call_id":"i","parameters":[1]}}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::ToolCall {
                tool_call_id: "i".into(),
                tool_name: "t".into(),
                arguments: "{}".into()
            }
        );
        let m = parse_server_message(
            r#"{"type":"client_tool_call","client_tool_call":{"tool_name":"t"}}"#,
        )
        .unwrap();
        assert_eq!(m, ServerMessage::MalformedToolCall);
        let m = parse_server_message(
            r#"{"type":"user_transcript","user_transcription_event":{"user_transcript":"hi"}}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            ServerMessage::UserTranscript {
                text: Some("hi".into())
            }
        );
        let m = parse_server_message(r#"{"type":"error"}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::Error {
                kind: "error".into(),
                code: None,
                error_type: None,
                reason: None,
            }
        );
        let m = parse_server_message(r#"{"type":"error","error_event":{"code":1008,"message":"Override for field 'first_message' is not allowed by config.","error_type":"override_error","reason":"invalid override"}}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::Error {
                kind: "error".into(),
                code: Some(1008),
                error_type: Some("override_error".into()),
                reason: Some("invalid override".into()),
            }
        );
        let m = parse_server_message(r#"{"type":"agent_response_correction","agent_response_correction_event":{"original_agent_response":"Sure, our hours are nine to five","corrected_agent_response":"Sure, our hours","event_id":7}}"#).unwrap();
        assert_eq!(
            m,
            ServerMessage::AgentResponseCorrection {
                corrected: Some("Sure, our hours".into())
            }
        );
        assert_eq!(
            parse_server_message("[1,2]").unwrap(),
            ServerMessage::Other {
                kind: String::new()
            }
        );
        assert!(parse_server_message("{not json").is_err());
    }

    #[test]
    fn client_data_carries_variables_and_overrides() {
        let s = Settings {
            url: "ws://x".into(),
            agent_id: "a".into(),
            api_key: None,
            signed_url_endpoint: String::new(),
            prompt: Some("Be brief.".into()),
            first_message: None,
            language: Some("uk".into()),
            chunk_ms: 40,
            connect_timeout: Duration::from_secs(1),
            http: None,
            barge_in: None,
        };
        let call = CallInfo {
            call_id: uuid::Uuid::nil(),
            rate_hz: 8000,
            caller_number: Some("+380441234567".into()),
            caller_name: None,
            tools: Vec::new(),
            variables: Default::default(),
        };
        let v: Value = serde_json::from_str(&client_data(&s, &call)).unwrap();
        assert_eq!(v["type"], "conversation_initiation_client_data");
        assert_eq!(v["dynamic_variables"]["caller_number"], "+380441234567");
        assert_eq!(
            v["dynamic_variables"]["call_id"],
            uuid::Uuid::nil().to_string()
        );
        let agent = &v["conversation_config_override"]["agent"];
        assert_eq!(agent["prompt"]["prompt"], "Be brief.");
        assert_eq!(agent["language"], "uk");
        assert!(agent.get("first_message").is_none());
    }

    #[test]
    fn a_profiles_variables_become_dynamic_variables_and_fill_the_overrides() {
        let s = Settings {
            url: "ws://x".into(),
            agent_id: "a".into(),
            api_key: None,
            signed_url_endpoint: String::new(),
            prompt: Some("Sales for {customer}.".into()),
            first_message: Some("Hello {caller_name}.".into()),
            language: None,
            chunk_ms: 40,
            connect_timeout: Duration::from_secs(1),
            http: None,
            barge_in: None,
        };
        let variables = [
            ("customer", "C-17"),
            ("caller_name", "Ann"),
            ("called_number", "200"),
            ("caller_number", "ignored: the call's own number wins"),
            ("empty", ""),
        ];
        let call = CallInfo {
            call_id: uuid::Uuid::nil(),
            rate_hz: 8000,
            caller_number: Some("+4930123".into()),
            caller_name: Some("Ann".into()),
            tools: Vec::new(),
            variables: variables
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let v: Value = serde_json::from_str(&client_data(&s, &call)).unwrap();
        let d = &v["dynamic_variables"];
        assert_eq!(d["customer"], "C-17");
        assert_eq!(d["called_number"], "200");
        assert_eq!(d["caller_number"], "+4930123");
        assert_eq!(d["empty"], "", "{d}");
        let agent = &v["conversation_config_override"]["agent"];
        assert_eq!(agent["prompt"]["prompt"], "Sales for C-17.");
        assert_eq!(agent["first_message"], "Hello Ann.");
    }
}
