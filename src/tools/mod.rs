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
//! - **`transfer_to_operator`** (built in, terminal): through an [`OperatorTransfer`] when
//!   one is installed (ARI), otherwise by ending the AudioSocket session with `0x00` so the
//!   dialplan's next priority (the operator queue) runs.
//!
//! A terminal tool runs only if the reply that asked for it was not interrupted, and only
//! after the words before it were played (the session's playout buffer is empty).
//!
//! # Declaring tools to a model
//!
//! Every provider receives the same provider-neutral list, [`crate::agent::CallInfo::tools`]
//! (a `Vec<`[`ToolSpec`]`>`, filled by the call session from the configured registry before
//! the agent starts), and renders it in its own wire shape:
//!
//! | provider | helper | shape |
//! |---|---|---|
//! | OpenAI Realtime (`session.update.session.tools`, providers.md §1.7) | [`openai_realtime_tools`] | `{"type":"function","name","description","parameters"}` (flat) |
//! | Chat Completions (`tools`, providers.md §7.1) | [`chat_completions_tools`] | `{"type":"function","function":{"name","description","parameters"}}` (nested) |
//! | ElevenLabs Agents client tools (providers.md §2.5) | [`elevenlabs_client_tools`] | `{"type":"client","name","description","parameters","expects_response":true,"response_timeout_secs"}` |
//!
//! ElevenLabs declares tools on the agent (dashboard or `POST /v1/convai/tools` with the
//! entry as `tool_config`), not per conversation; the helper renders what to paste there.
//! Whatever the provider, the model's call comes back as [`crate::agent::AgentEvent::ToolCall`]
//! and the result goes in as [`crate::agent::AgentInput::ToolResult`].

use serde_json::{Value, json};

/// Name of the built-in tool that ends the call after the goodbye was played.
pub const HANGUP: &str = "hangup";

/// Name of the built-in tool that hands the caller to a human operator.
pub const TRANSFER_TO_OPERATOR: &str = "transfer_to_operator";

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
    pub fn hangup() -> Self {
        ToolSpec {
            name: HANGUP.into(),
            description: "End the phone call. Say goodbye first, in the same reply; the call \
                          ends once the goodbye has been played to the caller."
                .into(),
            parameters: json!({"type": "object", "properties": {}}),
        }
    }

    /// The built-in `transfer_to_operator` tool's declaration.
    pub fn transfer_to_operator() -> Self {
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

    /// OpenAI Realtime's flat function entry (providers.md §1.2, §1.7):
    /// `{"type":"function","name":…,"description":…,"parameters":{…}}`.
    pub fn to_openai_realtime(&self) -> Value {
        json!({
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
        })
    }

    /// Chat Completions' nested function entry (providers.md §7.1):
    /// `{"type":"function","function":{"name":…,"description":…,"parameters":{…}}}`.
    pub fn to_chat_completions(&self) -> Value {
        json!({
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            }
        })
    }

    /// An ElevenLabs Agents client-tool entry (providers.md §2.5; the `tool_config` of
    /// `POST /v1/convai/tools`): `{"type":"client","name","description","parameters",
    /// "expects_response":true,"response_timeout_secs":…}`. `response_timeout_secs` is how
    /// long the agent waits for the `client_tool_result`.
    pub fn to_elevenlabs_client_tool(&self, response_timeout_secs: u32) -> Value {
        json!({
            "type": "client",
            "name": self.name,
            "description": self.description,
            "parameters": self.parameters,
            "expects_response": true,
            "response_timeout_secs": response_timeout_secs,
        })
    }
}

/// The `tools` array of an OpenAI Realtime `session.update` (flat entries).
pub fn openai_realtime_tools(specs: &[ToolSpec]) -> Value {
    Value::Array(specs.iter().map(ToolSpec::to_openai_realtime).collect())
}

/// The `tools` array of a Chat Completions request (nested entries).
pub fn chat_completions_tools(specs: &[ToolSpec]) -> Value {
    Value::Array(specs.iter().map(ToolSpec::to_chat_completions).collect())
}

/// ElevenLabs client-tool entries for the agent's configuration, each answered within
/// `response_timeout_secs`.
pub fn elevenlabs_client_tools(specs: &[ToolSpec], response_timeout_secs: u32) -> Value {
    Value::Array(
        specs
            .iter()
            .map(|s| s.to_elevenlabs_client_tool(response_timeout_secs))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search_tires() -> ToolSpec {
        ToolSpec {
            name: "search_tires".into(),
            description: "Find tyres in stock".into(),
            parameters: json!({"type":"object","properties":{"size":{"type":"string"}},"required":["size"]}),
        }
    }

    #[test]
    fn renders_each_provider_shape() {
        let specs = [search_tires(), ToolSpec::hangup()];
        let flat = openai_realtime_tools(&specs);
        assert_eq!(flat[0]["type"], "function");
        assert_eq!(flat[0]["name"], "search_tires");
        assert_eq!(flat[0]["parameters"]["required"][0], "size");
        assert!(flat[0].get("function").is_none());

        let nested = chat_completions_tools(&specs);
        assert_eq!(nested[1]["type"], "function");
        assert_eq!(nested[1]["function"]["name"], "hangup");
        assert_eq!(nested[1]["function"]["parameters"]["type"], "object");
        assert!(nested[1].get("name").is_none());

        let el = elevenlabs_client_tools(&specs, 15);
        assert_eq!(el[0]["type"], "client");
        assert_eq!(el[0]["name"], "search_tires");
        assert_eq!(el[0]["expects_response"], true);
        assert_eq!(el[0]["response_timeout_secs"], 15);
    }
}
