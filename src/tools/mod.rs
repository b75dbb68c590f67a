//! Tools the voice agent can call: declared to the model, run by voicegate.
//!
//! Three kinds, all configured under `[[tools]]` (see `examples/voicegate.toml`):
//!
//! - **HTTP tools** ([`http`]): a business's own lookup (a tyre shop's `search_tires`). The
//!   model's arguments, the call id and the caller's number go to an HTTP endpoint; its JSON
//!   reply goes back to the model as the tool result. They run in a spawned task, so the
//!   call's 20 ms loop never waits for them.
//! - **`hangup`** (built in, terminal): the agent says goodbye, the playout drains, then the
//!   call ends with `0x00`.
//! - **`transfer_to_operator`** (built in, terminal): ends the AudioSocket session with
//!   `0x00` and the outcome `call::Outcome::Operator``("dialplan")`. Without ARI the
//!   dialplan's next priority (the operator queue) runs; for a Stasis call the ARI controller
//!   sees that outcome when the session ends and `continue`s the caller to the transfer
//!   context (`ari.transfer_context`), as for any fallback.
//!
//! A terminal tool runs only if the reply that asked for it was not interrupted, and only
//! after the words before it were played (the session's playout buffer is empty).
//!
//! # Declaring tools to a model
//!
//! Every provider receives the same provider-neutral list of [`ToolSpec`]s (the agent's call
//! info carries it, filled by the call session from the configured registry before the agent
//! starts), and renders it in its own wire shape, in the provider's module (OpenAI Realtime's
//! flat entries, Chat Completions' nested ones, ElevenLabs' `POST /v1/convai/tools` bodies;
//! `voicegate tools --format …` prints each). This module knows no provider and no agent
//! type: the model's call comes back as the agent's `ToolCall` event, and the session hands
//! the tool's answer, a [`ToolResult`], to the agent (whose input converts from it).

pub mod http;
pub(crate) mod runner;

pub use http::{HttpTool, ToolContext};
pub use runner::{Terminal, ToolRunner};

use crate::secret::SecretSource;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Name of the built-in tool that ends the call after the goodbye was played.
pub(crate) const HANGUP: &str = "hangup";

/// Name of the built-in tool that hands the caller to a human operator.
pub const TRANSFER_TO_OPERATOR: &str = "transfer_to_operator";

/// The answer to one tool call, for the model: the provider's id of the call and the
/// result as JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolResult {
    /// The provider's id of the tool call.
    pub call_id: String,
    /// Result text (JSON).
    pub output: String,
}

/// A tool as the model sees it, independent of the provider.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ToolSpec {
    /// Function name the model calls (`^[a-zA-Z0-9_-]{1,64}$`, the common subset of
    /// OpenAI's and ElevenLabs' rules).
    pub name: String,
    /// What the tool does and when to use it, for the model.
    pub description: String,
    /// JSON Schema of the arguments object (`{"type":"object","properties":{…},"required":[…]}`).
    pub parameters: Value,
}

impl ToolSpec {
    /// The built-in `hangup` tool's declaration.
    pub(crate) fn hangup() -> Self {
        ToolSpec {
            name: HANGUP.into(),
            description: "End the phone call. Say goodbye first, in the same reply; the call \
                          ends once the goodbye has been played to the caller."
                .into(),
            parameters: json!({"type": "object", "properties": {}}),
        }
    }

    /// The built-in `transfer_to_operator` tool's declaration.
    pub(crate) fn transfer_to_operator() -> Self {
        ToolSpec {
            name: TRANSFER_TO_OPERATOR.into(),
            description: "Transfer the caller to a human operator. Tell the caller you are \
                          transferring them first, in the same reply."
                .into(),
            parameters: json!({
                "type": "object",
                "properties": {
                    "reason": {"type": "string", "description": "Why the caller needs a human, in a few words."}
                }
            }),
        }
    }
}

/// What a `[[tools]]` entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolKind {
    /// An HTTP endpoint (the default): needs `name`, `description`, `url`.
    #[default]
    Http,
    /// The built-in [`HANGUP`].
    Hangup,
    /// The built-in [`TRANSFER_TO_OPERATOR`].
    TransferToOperator,
}

/// HTTP method of an HTTP tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// Arguments, call id and caller number as query parameters.
    Get,
    /// A JSON body (the default).
    #[default]
    Post,
    /// A JSON body.
    Put,
    /// A JSON body.
    Patch,
}

/// One `[[tools]]` entry of the config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// `http` (default), `hangup` or `transfer_to_operator`.
    #[serde(default)]
    pub kind: ToolKind,
    /// Function name the model calls; required for `http`, fixed for the built-ins.
    #[serde(default)]
    pub name: Option<String>,
    /// What the tool does and when to use it, for the model; the built-ins have a default.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON Schema of the arguments, as a TOML table (default: an object without
    /// properties; the built-ins have their own).
    #[serde(default)]
    pub parameters: Option<Value>,
    /// `http`: the endpoint, `http://` or `https://`.
    #[serde(default)]
    pub url: Option<String>,
    /// `http`: `GET`, `POST` (default), `PUT` or `PATCH`.
    #[serde(default)]
    pub method: HttpMethod,
    /// `http`: extra request headers; values are secrets (plain string, `{ env = … }`,
    /// `{ file = … }`, `{ credential = … }`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, SecretSource>,
    /// `http`: the whole request may take this long, ms (default 5000); after it the model
    /// gets an error result.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl ToolConfig {
    /// The name the model calls it by: `name` for an HTTP tool (`None` when missing), the
    /// built-in's fixed name otherwise.
    pub(crate) fn declared_name(&self) -> Option<&str> {
        match self.kind {
            ToolKind::Http => self.name.as_deref(),
            ToolKind::Hangup => Some(HANGUP),
            ToolKind::TransferToOperator => Some(TRANSFER_TO_OPERATOR),
        }
    }
}

fn default_timeout_ms() -> u64 {
    5_000
}

/// Why the configured tools cannot be used. Messages name the tool.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// A `[[tools]]` entry is incomplete or inconsistent.
    #[error("tool {tool}: {message}")]
    Invalid {
        /// The tool's name (or `#n` for an unnamed entry).
        tool: String,
        /// What is wrong.
        message: String,
    },
    /// Two entries have the same name.
    #[error("tool {0} is declared twice")]
    Duplicate(String),
    /// A header secret cannot be read.
    #[error("tool {tool}: header {header}: {source}")]
    Secret {
        /// The tool.
        tool: String,
        /// The header name.
        header: String,
        /// Why.
        source: crate::secret::SecretError,
    },
    /// The HTTP client cannot be built.
    #[error("http client: {0}")]
    Client(String),
}

/// What running a tool does.
#[derive(Debug, Clone)]
pub enum ToolAction {
    /// Call an HTTP endpoint; the reply is the result.
    Http(Arc<HttpTool>),
    /// End the call once the goodbye was played (terminal).
    Hangup,
    /// Hand the caller to an operator once the words before it were played (terminal).
    TransferToOperator,
}

impl ToolAction {
    /// Ends the call: runs only after the reply's words were played and only if it was not
    /// interrupted.
    #[cfg(test)]
    pub(crate) fn is_terminal(&self) -> bool {
        !matches!(self, ToolAction::Http(_))
    }
}

/// A configured tool: what the model sees and what voicegate does.
#[derive(Debug, Clone)]
pub struct Tool {
    /// The declaration sent to the model.
    pub spec: ToolSpec,
    /// What running it does.
    pub action: ToolAction,
}

/// The configured tools, shared by every call (`Arc`).
#[derive(Clone, Default)]
pub struct ToolRegistry {
    tools: Vec<Tool>,
}

impl std::fmt::Debug for ToolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolRegistry")
            .field(
                "tools",
                &self.tools.iter().map(|t| &t.spec.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The declaration of one `[[tools]]` entry: a built-in's own (its name fixed, no url or
/// headers) or an HTTP tool's name and description, with `description` / `parameters`
/// overridden from the entry. `invalid` builds the error for this entry.
fn tool_spec(c: &ToolConfig, invalid: &impl Fn(&str) -> ToolError) -> Result<ToolSpec, ToolError> {
    let (mut spec, builtin) = match c.kind {
        ToolKind::Http => {
            let name = c.name.clone().ok_or_else(|| invalid("needs a name"))?;
            let description = c
                .description
                .clone()
                .ok_or_else(|| invalid("needs a description"))?;
            (
                ToolSpec {
                    name,
                    description,
                    parameters: json!({"type": "object", "properties": {}}),
                },
                false,
            )
        }
        ToolKind::Hangup => (ToolSpec::hangup(), true),
        ToolKind::TransferToOperator => (ToolSpec::transfer_to_operator(), true),
    };
    if builtin {
        if c.name.as_ref().is_some_and(|n| *n != spec.name) {
            return Err(invalid("a built-in tool's name cannot be changed"));
        }
        if c.url.is_some() || !c.headers.is_empty() {
            return Err(invalid("a built-in tool has no url or headers"));
        }
    }
    if let Some(d) = &c.description {
        spec.description = d.clone();
    }
    if let Some(p) = &c.parameters {
        if !p.is_object() || p.get("type").and_then(Value::as_str) != Some("object") {
            return Err(invalid(
                "parameters must be a JSON schema with type = \"object\"",
            ));
        }
        spec.parameters = p.clone();
    }
    if !valid_name(&spec.name) {
        return Err(invalid(
            "name must be 1-64 characters of a-z, A-Z, 0-9, _ or -",
        ));
    }
    Ok(spec)
}

/// The action of an HTTP `[[tools]]` entry: its url (http or https), timeout (100 to
/// 60 000 ms) and resolved header secrets, on the HTTP `client` shared by all HTTP tools
/// (built by the first one).
fn http_action(
    c: &ToolConfig,
    spec: &ToolSpec,
    client: &mut Option<reqwest::Client>,
    invalid: &impl Fn(&str) -> ToolError,
) -> Result<ToolAction, ToolError> {
    let url = c.url.clone().ok_or_else(|| invalid("needs a url"))?;
    let parsed = reqwest::Url::parse(&url).map_err(|e| invalid(&format!("url: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("url must start with http:// or https://"));
    }
    if !(100..=60_000).contains(&c.timeout_ms) {
        return Err(invalid("timeout_ms must be 100 to 60000"));
    }
    let mut headers = Vec::with_capacity(c.headers.len());
    for (name, source) in &c.headers {
        let value = source.resolve().map_err(|source| ToolError::Secret {
            tool: spec.name.clone(),
            header: name.clone(),
            source,
        })?;
        headers.push((name.clone(), value));
    }
    let client = match client {
        Some(c) => c.clone(),
        None => {
            let built = crate::tls::http_client_builder()
                .build()
                .map_err(|e| ToolError::Client(e.to_string()))?;
            *client = Some(built.clone());
            built
        }
    };
    let tool = HttpTool::new(
        client,
        spec.name.clone(),
        parsed,
        c.method,
        headers,
        Duration::from_millis(c.timeout_ms),
    )
    .map_err(|e| invalid(&e))?;
    Ok(ToolAction::Http(Arc::new(tool)))
}

impl ToolRegistry {
    /// No tools: the agent declares none, and any tool call is answered with an error.
    pub fn empty() -> Self {
        ToolRegistry::default()
    }

    /// Builds the tools of `[[tools]]`, resolving header secrets and building one HTTP
    /// client (rustls, embedded roots) shared by all HTTP tools.
    ///
    /// # Errors
    /// [`ToolError`] naming the first bad entry.
    pub fn from_config(entries: &[ToolConfig]) -> Result<Self, ToolError> {
        let mut tools: Vec<Tool> = Vec::with_capacity(entries.len());
        let mut client: Option<reqwest::Client> = None;
        for (i, c) in entries.iter().enumerate() {
            let label = c.name.clone().unwrap_or_else(|| format!("#{}", i + 1));
            let invalid = |message: &str| ToolError::Invalid {
                tool: label.clone(),
                message: message.to_owned(),
            };
            let spec = tool_spec(c, &invalid)?;
            if tools.iter().any(|t| t.spec.name == spec.name) {
                return Err(ToolError::Duplicate(spec.name));
            }
            let action = match c.kind {
                ToolKind::Hangup => ToolAction::Hangup,
                ToolKind::TransferToOperator => ToolAction::TransferToOperator,
                ToolKind::Http => http_action(c, &spec, &mut client, &invalid)?,
            };
            tools.push(Tool { spec, action });
        }
        Ok(ToolRegistry { tools })
    }

    /// A profile's tools: the tools of this registry (the box's `[[tools]]`) that `names`
    /// lists, in its order (`None`: none of them), then the profile's `own` entries
    /// (`[[profiles.tools]]`), built as [`Self::from_config`] builds them.
    ///
    /// # Errors
    /// [`ToolError::Invalid`] for a name this registry lacks, [`ToolError::Duplicate`]
    /// for a name listed twice or both listed and defined, or the first bad `own` entry's.
    pub fn for_profile(
        &self,
        names: Option<&[String]>,
        own: &[ToolConfig],
    ) -> Result<Self, ToolError> {
        let mut tools = ToolRegistry::from_config(own)?.tools;
        let mut picked = Vec::new();
        for name in names.unwrap_or_default() {
            let tool = self.get(name).ok_or_else(|| ToolError::Invalid {
                tool: name.clone(),
                message: "no [[tools]] entry has this name".into(),
            })?;
            if picked
                .iter()
                .chain(&tools)
                .any(|t: &Tool| t.spec.name == *name)
            {
                return Err(ToolError::Duplicate(name.clone()));
            }
            picked.push(tool.clone());
        }
        picked.append(&mut tools);
        Ok(ToolRegistry { tools: picked })
    }

    /// The declarations of every tool, in config order, for the agent's call info.
    pub fn specs(&self) -> Vec<ToolSpec> {
        self.tools.iter().map(|t| t.spec.clone()).collect()
    }

    /// The tool called `name`.
    pub fn get(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.spec.name == name)
    }
}

/// Checks the `[[tools]]` entries as the registry would build them (names, kinds, URLs,
/// schemas).
///
/// # Errors
/// [`crate::error::ConfigError::Invalid`] naming `tools` and what is wrong.
pub(crate) fn validate_config(entries: &[ToolConfig]) -> Result<(), crate::error::ConfigError> {
    ToolRegistry::from_config(entries)
        .map(drop)
        .map_err(|e| crate::error::ConfigError::invalid("tools", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        tools: Vec<ToolConfig>,
    }

    fn registry(toml_text: &str) -> Result<ToolRegistry, ToolError> {
        let doc: Doc = toml::from_str(toml_text).expect("toml");
        ToolRegistry::from_config(&doc.tools)
    }

    #[test]
    fn config_builds_http_and_builtin_tools() {
        let r = registry(
            r#"
[[tools]]
name = "search_tires"
description = "Find tyres in stock"
url = "http://127.0.0.1:9/tires"
headers = { Authorization = "Bearer x" }
timeout_ms = 2000
[tools.parameters]
type = "object"
required = ["size"]
[tools.parameters.properties.size]
type = "string"

[[tools]]
kind = "hangup"

[[tools]]
kind = "transfer_to_operator"
description = "Hand over to a human."
"#,
        )
        .unwrap();
        let specs = r.specs();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].parameters["properties"]["size"]["type"], "string");
        assert_eq!(specs[1].name, HANGUP);
        assert_eq!(specs[2].description, "Hand over to a human.");
        assert!(matches!(
            r.get("search_tires").unwrap().action,
            ToolAction::Http(_)
        ));
        assert!(r.get(HANGUP).unwrap().action.is_terminal());
        assert!(!format!("{r:?}").contains("Bearer"));
    }

    #[test]
    fn bad_entries_are_named() {
        let e = registry("[[tools]]\nname = \"x\"\ndescription = \"d\"\n").unwrap_err();
        assert!(e.to_string().contains("needs a url"), "{e}");
        let e = registry("[[tools]]\nkind = \"hangup\"\nname = \"bye\"\n").unwrap_err();
        assert!(e.to_string().contains("cannot be changed"), "{e}");
        let e =
            registry("[[tools]]\nkind = \"hangup\"\n[[tools]]\nkind = \"hangup\"\n").unwrap_err();
        assert!(matches!(e, ToolError::Duplicate(_)), "{e}");
        let e = registry("[[tools]]\nname = \"a b\"\ndescription = \"d\"\nurl = \"http://x/\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("name must be"), "{e}");
        let e = registry(
            "[[tools]]\nname = \"a\"\ndescription = \"d\"\nurl = \"http://x/\"\nheaders = { X = { env = \"VG_SURELY_UNSET\" } }\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("header X"), "{e}");
    }
}
