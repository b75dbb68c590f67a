//! The cascade's LLM: any OpenAI-compatible Chat Completions endpoint, streamed over SSE,
//! with tool calls (`providers.md` §7).
//!
//! [`LlmClient::stream`] posts the conversation and spawns a task that turns the SSE stream
//! into [`LlmEvent`]s: text deltas as they arrive, then the assembled tool calls, then the
//! finish reason. Dropping the [`LlmStream`] aborts the task, which drops the response and so
//! closes the connection: the provider stops generating (and billing).
//!
//! A request the endpoint turns away before answering (connection refused or reset, HTTP
//! 429, 500, 502, 503, 504 or 529, which OpenAI's and OpenRouter's error pages say to retry
//! after a brief wait) is sent again up to `retries` times, `retry_delay` apart or after the
//! server's `Retry-After` if that is no longer than [`RETRY_AFTER_MAX`]; a longer wait is not
//! made on a caller's time. Nothing is retried once the stream has started: its words may
//! already be spoken.

use crate::agent::AgentError;
use crate::secret::Secret;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

const PROVIDER: &str = "chat_completions";

/// Longest pause between two pieces of a streaming response before it counts as stalled.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Most bytes of an error body kept for the message.
const ERROR_BODY_MAX: usize = 2_048;

/// The longest `Retry-After` honoured; a server asking for more gets no retry.
pub(crate) const RETRY_AFTER_MAX: Duration = Duration::from_secs(2);

/// HTTP statuses worth a retry: rate limited (429), server error or overloaded (500, 502,
/// 503, 504, and 529 as Anthropic's models behind OpenRouter send it).
const RETRY_STATUSES: [u16; 6] = [429, 500, 502, 503, 504, 529];

pub use crate::tools::ToolSpec;

/// The `tools` array of a Chat Completions request (providers.md §7.1; openai-python
/// `chat_completion_function_tool_param.py`): one nested function entry per tool,
/// `{"type":"function","function":{"name":…,"description":…,"parameters":{…}}}`.
pub fn tool_declarations(specs: &[ToolSpec]) -> serde_json::Value {
    serde_json::Value::Array(
        specs
            .iter()
            .map(|s| {
                serde_json::json!({
                    "type": "function",
                    "function": {
                        "name": s.name,
                        "description": s.description,
                        "parameters": s.parameters,
                    }
                })
            })
            .collect(),
    )
}

/// A tool call the model made, assembled from its fragments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallRequest {
    /// The model's id for the call (`call_…`).
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Arguments as JSON text.
    pub arguments: String,
}

/// What the stream yields.
#[derive(Debug, Clone)]
pub(crate) enum LlmEvent {
    /// A piece of the reply's text.
    Text(String),
    /// The tool calls of this response (sent once, before [`LlmEvent::Done`]).
    ToolCalls(Vec<ToolCallRequest>),
    /// The response is complete; `finish_reason` as sent (`stop`, `tool_calls`, `length`, …).
    Done {
        /// The finish reason, if the endpoint sent one.
        finish_reason: Option<String>,
    },
    /// The request or the stream failed.
    Failed(AgentError),
}

/// Settings of the client (from `[agent.llm]`).
#[derive(Debug, Clone)]
pub(crate) struct LlmSettings {
    /// Endpoint URL.
    pub(crate) url: String,
    /// Bearer key.
    pub(crate) api_key: Secret,
    /// Model id.
    pub(crate) model: String,
    /// Sampling temperature.
    pub(crate) temperature: Option<f32>,
    /// Most tokens per reply, sent as `max_completion_tokens` (the deprecated `max_tokens`
    /// is refused by reasoning models; openai-python `types/chat/completion_create_params.py`).
    pub(crate) max_completion_tokens: Option<u32>,
    /// Extra headers (OpenRouter's `HTTP-Referer`, `X-Title`).
    pub(crate) extra_headers: BTreeMap<String, String>,
    /// Time allowed until the response headers arrive.
    pub(crate) timeout: Duration,
    /// Further attempts after a retryable refusal (0: none).
    pub(crate) retries: u32,
    /// Wait before a retry when the server gives no `Retry-After`.
    pub(crate) retry_delay: Duration,
}

/// A Chat Completions client shared by all calls (one connection pool).
#[derive(Debug, Clone)]
pub(crate) struct LlmClient {
    http: reqwest::Client,
    settings: LlmSettings,
    headers: HeaderMap,
    tools: serde_json::Value,
}

/// Why an [`LlmClient`] could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LlmBuildError {
    /// An extra header name or value is not valid HTTP.
    #[error("invalid header {0}")]
    Header(String),
    /// The HTTP client could not be built.
    #[error("http client: {0}")]
    Client(String),
}

impl LlmClient {
    /// A client for `settings` offering `tools` to the model.
    ///
    /// # Errors
    /// [`LlmBuildError`] for a malformed header or TLS setup failure.
    pub(crate) fn new(settings: LlmSettings, tools: &[ToolSpec]) -> Result<Self, LlmBuildError> {
        let mut headers = HeaderMap::new();
        for (k, v) in &settings.extra_headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| LlmBuildError::Header(k.clone()))?;
            let value = HeaderValue::from_str(v).map_err(|_| LlmBuildError::Header(k.clone()))?;
            headers.insert(name, value);
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", settings.api_key.expose()))
            .map_err(|_| LlmBuildError::Header("authorization".into()))?;
        auth.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, auth);
        let http = crate::tls::http_client_builder()
            .connect_timeout(settings.timeout)
            .build()
            .map_err(|e| LlmBuildError::Client(e.to_string()))?;
        Ok(LlmClient {
            http,
            settings,
            headers,
            tools: tool_declarations(tools),
        })
    }

    /// This client offering `extra` tools besides its own (a call's `[[tools]]`); shares
    /// the connection pool.
    pub(crate) fn with_more_tools(&self, extra: &[ToolSpec]) -> LlmClient {
        let mut client = self.clone();
        if let (serde_json::Value::Array(all), serde_json::Value::Array(more)) =
            (&mut client.tools, tool_declarations(extra))
        {
            all.extend(more);
        }
        client
    }

    /// The request body for `messages` (the whole conversation, system prompt first).
    pub(crate) fn body(&self, messages: &[serde_json::Value]) -> serde_json::Value {
        let mut body = serde_json::json!({
            "model": self.settings.model,
            "stream": true,
            "stream_options": {"include_usage": true},
            "messages": messages,
        });
        if self.tools.as_array().is_some_and(|t| !t.is_empty()) {
            body["tools"] = self.tools.clone();
            body["tool_choice"] = "auto".into();
        }
        // Only what is configured: reasoning models refuse `temperature` among others, so an
        // unset value is left out rather than sent as a default.
        if let Some(t) = self.settings.temperature {
            body["temperature"] = t.into();
        }
        if let Some(m) = self.settings.max_completion_tokens {
            body["max_completion_tokens"] = m.into();
        }
        body
    }

    /// Starts streaming a completion of `messages`.
    pub(crate) fn stream(&self, messages: &[serde_json::Value]) -> LlmStream {
        let (tx, rx) = mpsc::channel(256);
        let request = self
            .http
            .post(&self.settings.url)
            .headers(self.headers.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(&self.body(messages));
        let settings = self.settings.clone();
        let task = crate::agent::task::spawn(async move {
            if let Err(e) = run(request, &settings, &tx).await {
                let _ = tx.send(LlmEvent::Failed(e)).await;
            }
        });
        LlmStream { events: rx, task }
    }
}

/// Sends `request`, retrying refusals, and streams the answer into `tx`.
async fn run(
    request: reqwest::RequestBuilder,
    settings: &LlmSettings,
    tx: &mpsc::Sender<LlmEvent>,
) -> Result<(), AgentError> {
    let mut attempt = 0;
    let response = loop {
        // A JSON body is held in memory, so the builder always clones.
        let Some(this_try) = request.try_clone() else {
            return Err(AgentError::Protocol {
                provider: PROVIDER,
                detail: "request cannot be repeated".into(),
            });
        };
        debug!(attempt, "llm request");
        let (error, wait) = match send(this_try, settings.timeout).await {
            Ok(response) => break response,
            Err(Refused::Final(e)) => return Err(e),
            Err(Refused::Retryable { error, retry_after }) => (error, retry_after),
        };
        let wait = wait.unwrap_or(settings.retry_delay);
        if attempt >= settings.retries || wait > RETRY_AFTER_MAX {
            return Err(if attempt > 0 {
                after_attempts(error, attempt + 1)
            } else {
                error
            });
        }
        attempt += 1;
        warn!(attempt, wait_ms = wait.as_millis() as u64, error = %error, "llm request refused; retrying");
        tokio::time::sleep(wait).await;
    };
    stream_response(response, tx).await
}

/// One streaming completion; dropping it cancels the request.
#[derive(Debug)]
pub(crate) struct LlmStream {
    /// Events in order; ends after [`LlmEvent::Done`] or [`LlmEvent::Failed`].
    pub(crate) events: mpsc::Receiver<LlmEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LlmStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `error` with "(after `n` attempts)" added to its detail.
fn after_attempts(error: AgentError, n: u32) -> AgentError {
    match error {
        AgentError::Connect { provider, detail } => AgentError::Connect {
            provider,
            detail: format!("{detail} (after {n} attempts)"),
        },
        AgentError::Provider { provider, detail } => AgentError::Provider {
            provider,
            detail: format!("{detail} (after {n} attempts)"),
        },
        other => other,
    }
}

/// Why a request got no streaming answer.
enum Refused {
    /// Worth another attempt (after the server's `Retry-After`, if it sent one).
    Retryable {
        error: AgentError,
        retry_after: Option<Duration>,
    },
    /// Not worth one: a timeout (the caller has waited long enough), a client error.
    Final(AgentError),
}

/// Sends one request and waits for a successful response's headers.
async fn send(
    request: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<reqwest::Response, Refused> {
    let response = match tokio::time::timeout(timeout, request.send()).await {
        Err(_) => {
            return Err(Refused::Final(AgentError::Timeout {
                provider: PROVIDER,
                detail: format!("no response within {timeout:?}"),
            }));
        }
        Ok(Err(e)) => {
            let retryable = e.is_connect() || e.is_request();
            let error = AgentError::Connect {
                provider: PROVIDER,
                detail: e.without_url().to_string(),
            };
            // Refused or reset before an answer: nothing was generated, so try again.
            return Err(if retryable {
                Refused::Retryable {
                    error,
                    retry_after: None,
                }
            } else {
                Refused::Final(error)
            });
        }
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    if !status.is_success() {
        // Retry-After in seconds (RFC 9110 §10.2.3; the HTTP-date form is not used by these
        // APIs and counts as absent).
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3_600.0)));
        let body = tokio::time::timeout(Duration::from_secs(2), response.bytes())
            .await
            .ok()
            .and_then(|b| b.ok())
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&body[..body.len().min(ERROR_BODY_MAX)]).into_owned();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v.pointer("/error/message")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            })
            .unwrap_or(text);
        let error = AgentError::Provider {
            provider: PROVIDER,
            detail: format!("HTTP {}: {message}", status.as_u16()),
        };
        return Err(if RETRY_STATUSES.contains(&status.as_u16()) {
            Refused::Retryable { error, retry_after }
        } else {
            Refused::Final(error)
        });
    }
    Ok(response)
}

/// Turns a successful response's SSE body into events.
async fn stream_response(
    response: reqwest::Response,
    tx: &mpsc::Sender<LlmEvent>,
) -> Result<(), AgentError> {
    let mut body = response.bytes_stream();
    let mut reader = StreamReader::default();
    let mut text = Vec::new();
    while !reader.done {
        let chunk = match tokio::time::timeout(STALL_TIMEOUT, body.next()).await {
            Err(_) => {
                return Err(AgentError::Timeout {
                    provider: PROVIDER,
                    detail: format!("stream stalled for {STALL_TIMEOUT:?}"),
                });
            }
            Ok(None) if reader.finish_reason.is_some() => break,
            Ok(None) => {
                return Err(AgentError::Protocol {
                    provider: PROVIDER,
                    detail: "stream ended without a finish reason or [DONE]".into(),
                });
            }
            Ok(Some(Err(e))) => {
                return Err(AgentError::Provider {
                    provider: PROVIDER,
                    detail: format!("stream: {}", e.without_url()),
                });
            }
            Ok(Some(Ok(c))) => c,
        };
        let read = reader.push(&chunk, &mut text);
        for t in text.drain(..) {
            if tx.send(LlmEvent::Text(t)).await.is_err() {
                return Ok(());
            }
        }
        read?;
    }
    let finish_reason = reader.finish_reason;
    let calls = reader.assembler.finish();
    debug!(
        ?finish_reason,
        tool_calls = calls.len(),
        "llm stream complete"
    );
    if !calls.is_empty() {
        let _ = tx.send(LlmEvent::ToolCalls(calls)).await;
    }
    let _ = tx.send(LlmEvent::Done { finish_reason }).await;
    Ok(())
}

/// The sans-IO reader of a Chat Completions stream: bytes in (any split), text deltas out;
/// tool-call fragments assembled, the finish reason kept, `[DONE]` noted. The stream task
/// and the fuzz target (`fuzz/fuzz_targets/llm_sse.rs`, through [`inspect_stream`]) run the
/// same code.
#[derive(Debug, Default)]
struct StreamReader {
    sse: SseParser,
    data: Vec<String>,
    assembler: ToolCallAssembler,
    finish_reason: Option<String>,
    /// `data: [DONE]` arrived: nothing after it is read.
    done: bool,
}

impl StreamReader {
    /// Feeds `bytes`; appends the text deltas of the complete events to `text`.
    ///
    /// # Errors
    /// A chunk that is not JSON, or one carrying the provider's `error` object; the deltas
    /// before it are in `text`.
    fn push(&mut self, bytes: &[u8], text: &mut Vec<String>) -> Result<(), AgentError> {
        if self.done {
            return Ok(());
        }
        self.sse.push(bytes, &mut self.data);
        for payload in std::mem::take(&mut self.data) {
            if payload.trim() == "[DONE]" {
                self.done = true;
                return Ok(());
            }
            let c = parse_chunk(&payload)?;
            for choice in c.choices {
                if let Some(delta) = choice.delta {
                    text.extend(delta.content.filter(|t| !t.is_empty()));
                    for tc in delta.tool_calls.unwrap_or_default() {
                        self.assembler.push(tc);
                    }
                }
                if let Some(r) = choice.finish_reason {
                    self.finish_reason = Some(r);
                }
            }
        }
        Ok(())
    }
}

/// One SSE `data:` payload as a chunk; an `error` object in it (some OpenAI-compatible
/// servers report failures mid-stream this way) is the provider's error.
fn parse_chunk(payload: &str) -> Result<Chunk, AgentError> {
    let c: Chunk = serde_json::from_str(payload).map_err(|e| AgentError::Protocol {
        provider: PROVIDER,
        detail: format!("bad chunk: {e}"),
    })?;
    if let Some(err) = &c.error {
        let message = err
            .get("message")
            .and_then(|m| m.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| err.to_string());
        return Err(AgentError::Provider {
            provider: PROVIDER,
            detail: message,
        });
    }
    Ok(c)
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    delta: Option<Delta>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
    tool_calls: Option<Vec<ToolCallFragment>>,
}

#[derive(Deserialize)]
struct ToolCallFragment {
    #[serde(default)]
    index: u32,
    id: Option<String>,
    function: Option<FunctionFragment>,
}

#[derive(Deserialize)]
struct FunctionFragment {
    name: Option<String>,
    arguments: Option<String>,
}

/// Reads a whole Chat Completions stream `bytes` with the stream task's own reader (exposed
/// for the fuzz target `fuzz/fuzz_targets/llm_sse.rs`). Returns the text deltas and the
/// assembled tool calls; a chunk that is not JSON ends it, as it ends a turn.
pub fn inspect_stream(bytes: &[u8]) -> (Vec<String>, Vec<ToolCallRequest>) {
    let mut reader = StreamReader::default();
    let mut text = Vec::new();
    let _ = reader.push(bytes, &mut text);
    (text, reader.assembler.finish())
}

/// Joins `delta.tool_calls` fragments by `index` (§7.2 "Tool-call assembly").
#[derive(Debug, Default)]
struct ToolCallAssembler {
    calls: BTreeMap<u32, ToolCallRequest>,
}

impl ToolCallAssembler {
    fn push(&mut self, f: ToolCallFragment) {
        let call = self
            .calls
            .entry(f.index)
            .or_insert_with(|| ToolCallRequest {
                id: String::new(),
                name: String::new(),
                arguments: String::new(),
            });
        if let Some(id) = f.id {
            call.id = id;
        }
        if let Some(func) = f.function {
            if let Some(n) = func.name {
                call.name.push_str(&n);
            }
            if let Some(a) = func.arguments {
                call.arguments.push_str(&a);
            }
        }
    }

    fn finish(self) -> Vec<ToolCallRequest> {
        self.calls
            .into_values()
            .filter(|c| !c.name.is_empty())
            .map(|mut c| {
                if c.arguments.trim().is_empty() {
                    c.arguments = "{}".into();
                }
                c
            })
            .collect()
    }
}

/// A sans-IO Server-Sent Events parser: bytes in, the `data` of each complete event out.
/// Comment lines (`:` — OpenRouter's keepalives) and other fields are skipped.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Feeds `bytes`; appends the data of each event completed by them to `out`.
    pub(crate) fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            if self.line.is_empty() {
                if self.has_data {
                    out.push(std::mem::take(&mut self.data));
                    self.has_data = false;
                }
            } else if let Some(rest) = self.line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&String::from_utf8_lossy(rest));
                self.has_data = true;
            }
            self.line.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_nested_tool_declarations() {
        let search = ToolSpec {
            name: "search_tires".into(),
            description: "Find tyres in stock".into(),
            parameters: serde_json::json!({"type":"object","properties":{"size":{"type":"string"}},"required":["size"]}),
        };
        let nested = tool_declarations(&[search, ToolSpec::hangup()]);
        assert_eq!(nested[1]["type"], "function");
        assert_eq!(nested[1]["function"]["name"], "hangup");
        assert_eq!(nested[1]["function"]["parameters"]["type"], "object");
        assert!(nested[1].get("name").is_none());
    }

    #[test]
    fn sse_split_anywhere_with_comments() {
        let text = ": OPENROUTER PROCESSING\n\ndata: {\"a\":1}\r\n\r\ndata: [DONE]\n\n";
        for split in 0..text.len() {
            let mut p = SseParser::default();
            let mut out = Vec::new();
            p.push(&text.as_bytes()[..split], &mut out);
            p.push(&text.as_bytes()[split..], &mut out);
            assert_eq!(out, vec!["{\"a\":1}".to_string(), "[DONE]".to_string()]);
        }
    }

    #[test]
    fn tool_call_fragments_assemble() {
        let mut a = ToolCallAssembler::default();
        let frags = [
            r#"{"index":0,"id":"call_1","type":"function","function":{"name":"book","arguments":""}}"#,
            r#"{"index":1,"id":"call_2","type":"function","function":{"name":"hangup","arguments":""}}"#,
            r#"{"index":0,"function":{"arguments":"{\"time\":"}}"#,
            r#"{"index":0,"function":{"arguments":"\"19:00\"}"}}"#,
        ];
        for f in frags {
            a.push(serde_json::from_str(f).unwrap());
        }
        assert_eq!(
            a.finish(),
            vec![
                ToolCallRequest {
                    id: "call_1".into(),
                    name: "book".into(),
                    arguments: r#"{"time":"19:00"}"#.into()
                },
                ToolCallRequest {
                    id: "call_2".into(),
                    name: "hangup".into(),
                    arguments: "{}".into()
                },
            ]
        );
    }
}
