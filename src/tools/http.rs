//! HTTP tools: a business's endpoint answers the model's tool call.
//!
//! Request (`POST`, `PUT`, `PATCH`): a JSON body
//!
//! ```json
//! {"tool":"search_tires","tool_call_id":"tc_1","call_id":"<AudioSocket UUID>",
//!  "caller_number":"+4930123456","arguments":{"size":"205/55 R16"}}
//! ```
//!
//! (`caller_number` is `null` when Asterisk did not tell it.) With `GET` the same fields go
//! in the query: `tool`, `tool_call_id`, `call_id`, `caller_number` (omitted when unknown)
//! and each top-level argument (strings as they are, other values as JSON text).
//!
//! Reply: a 2xx JSON body is the tool result, passed to the model as compact JSON text; a
//! body that is not JSON becomes `{"result":"<text>"}`. Bodies are cut at
//! [`MAX_REPLY_BYTES`]. Everything that goes wrong (non-2xx, timeout, refused connection,
//! arguments that are not a JSON object) becomes `{"error":"…"}`: the model hears about the
//! failure and the call goes on. This is the convention for every failed tool result.

use super::HttpMethod;
use crate::secret::Secret;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, warn};
use uuid::Uuid;

/// Most of a tool endpoint's reply that is read, bytes (64 KiB); the model needs no more.
pub(crate) const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The call a tool runs for: what the endpoint learns besides the arguments.
#[derive(Debug, Clone)]
pub struct ToolContext {
    /// The AudioSocket call id.
    pub call_id: Uuid,
    /// The caller's number, when known.
    pub caller_number: Option<String>,
}

/// One configured HTTP tool.
pub struct HttpTool {
    client: reqwest::Client,
    name: String,
    url: reqwest::Url,
    method: HttpMethod,
    headers: HeaderMap,
    timeout: Duration,
}

impl std::fmt::Debug for HttpTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Header values are secrets; only their names are shown.
        f.debug_struct("HttpTool")
            .field("name", &self.name)
            .field("url", &self.url.as_str())
            .field("method", &self.method)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// An error result in the convention every tool uses: `{"error":"<message>"}`.
pub(crate) fn error_result(message: &str) -> String {
    json!({ "error": message }).to_string()
}

/// The result is an error result (`{"error": …}` at the top level).
pub(crate) fn is_error_result(output: &str) -> bool {
    serde_json::from_str::<Value>(output)
        .ok()
        .is_some_and(|v| v.get("error").is_some())
}

impl HttpTool {
    /// A tool `name` calling `url` with `method` and the extra `headers`, each request
    /// limited to `timeout`.
    ///
    /// # Errors
    /// A message naming the header that is not a valid HTTP header (its value is not shown).
    pub(crate) fn new(
        client: reqwest::Client,
        name: String,
        url: reqwest::Url,
        method: HttpMethod,
        headers: Vec<(String, Secret)>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let mut map = HeaderMap::with_capacity(headers.len());
        for (n, v) in headers {
            let hn = HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| format!("header name {n} is not valid"))?;
            let mut hv = HeaderValue::from_str(v.expose())
                .map_err(|_| format!("value of header {n} is not valid"))?;
            hv.set_sensitive(true);
            map.insert(hn, hv);
        }
        Ok(HttpTool {
            client,
            name,
            url,
            method,
            headers: map,
            timeout,
        })
    }

    /// Calls the endpoint for the model's `arguments` (JSON text) and returns the result
    /// text of a [`super::ToolResult`]. Never fails: errors are
    /// `{"error":"…"}` results. Takes at most the tool's timeout.
    pub async fn call(&self, ctx: &ToolContext, tool_call_id: &str, arguments: &str) -> String {
        let args: Value = if arguments.trim().is_empty() {
            json!({})
        } else {
            match serde_json::from_str(arguments) {
                Ok(v @ Value::Object(_)) => v,
                _ => return error_result("arguments are not a JSON object"),
            }
        };
        let started = Instant::now();
        let request = self.request(ctx, tool_call_id, args);
        // reqwest's timeout covers the body too; the outer one guards against anything else.
        let outcome = tokio::time::timeout(self.timeout, async {
            let response = request.send().await?;
            let status = response.status();
            let body = read_limited(response).await?;
            Ok::<_, reqwest::Error>((status, body))
        })
        .await;
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Err(_) => {
                warn!(tool = %self.name, elapsed_ms, "tool endpoint timed out");
                error_result(&format!(
                    "tool {} timed out after {} ms",
                    self.name,
                    self.timeout.as_millis()
                ))
            }
            Ok(Err(e)) if e.is_timeout() => {
                warn!(tool = %self.name, elapsed_ms, "tool endpoint timed out");
                error_result(&format!(
                    "tool {} timed out after {} ms",
                    self.name,
                    self.timeout.as_millis()
                ))
            }
            Ok(Err(e)) => {
                let e = e.without_url();
                warn!(tool = %self.name, elapsed_ms, error = %e, "tool endpoint failed");
                error_result(&format!("tool {} failed: {e}", self.name))
            }
            Ok(Ok((status, body))) => self.answered(elapsed_ms, status, &body),
        }
    }

    /// The request for one call: `GET` with the context and the arguments as query
    /// parameters, or a JSON body `{tool, tool_call_id, call_id, caller_number, arguments}`;
    /// with the configured headers, `Accept: application/json` and the tool's timeout.
    fn request(
        &self,
        ctx: &ToolContext,
        tool_call_id: &str,
        args: Value,
    ) -> reqwest::RequestBuilder {
        let request = match self.method {
            HttpMethod::Get => {
                let mut query: Vec<(String, String)> = vec![
                    ("tool".into(), self.name.clone()),
                    ("tool_call_id".into(), tool_call_id.to_owned()),
                    ("call_id".into(), ctx.call_id.to_string()),
                ];
                if let Some(n) = &ctx.caller_number {
                    query.push(("caller_number".into(), n.clone()));
                }
                if let Value::Object(map) = &args {
                    for (k, v) in map {
                        let text = match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        query.push((k.clone(), text));
                    }
                }
                let mut url = self.url.clone();
                url.query_pairs_mut().extend_pairs(&query);
                self.client.get(url)
            }
            m => {
                let body = json!({
                    "tool": self.name,
                    "tool_call_id": tool_call_id,
                    "call_id": ctx.call_id.to_string(),
                    "caller_number": ctx.caller_number,
                    "arguments": args,
                });
                let builder = match m {
                    HttpMethod::Put => self.client.put(self.url.clone()),
                    HttpMethod::Patch => self.client.patch(self.url.clone()),
                    _ => self.client.post(self.url.clone()),
                };
                builder.json(&body)
            }
        };
        request
            .headers(self.headers.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(self.timeout)
    }

    /// The result text of an answer: its JSON (or `{"result": text}`) on success, else
    /// `{"error": "… answered HTTP n", "body": …}`.
    fn answered(&self, elapsed_ms: u64, status: reqwest::StatusCode, body: &[u8]) -> String {
        debug!(tool = %self.name, elapsed_ms, status = status.as_u16(), "tool endpoint answered");
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        if status.is_success() {
            match parsed {
                Some(v) => v.to_string(),
                None => json!({ "result": String::from_utf8_lossy(body) }).to_string(),
            }
        } else {
            warn!(tool = %self.name, status = status.as_u16(), "tool endpoint answered an error");
            json!({
                "error": format!("tool {} answered HTTP {}", self.name, status.as_u16()),
                "body": parsed.unwrap_or_else(|| Value::String(String::from_utf8_lossy(body).into_owned())),
            })
            .to_string()
        }
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_REPLY_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_REPLY_BYTES {
            break;
        }
    }
    Ok(body)
}
