//! The hook between the AudioSocket listener and whoever knows about calls before they
//! connect (ARI in Stasis mode) or wants to hear how they ended (the `/next` disposition
//! store, the ARI controller).
//!
//! [`crate::call::route::Router::directory`] holds one. The router asks
//! [`CallDirectory::admit`] once the call id (`0x01`) is read and before the call's agent
//! starts, and tells [`CallDirectory::finished`] the call's summary once it ends. Without a
//! directory every call is admitted with no caller details.

use crate::agent::{AgentEvent, AgentInput};
use crate::call::CallSummary;
use std::future::Future;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Inputs for a call's agent from outside its AudioSocket stream (ARI `ChannelDtmfReceived`);
/// 16 is ample for DTMF, which a person types at most a few per second.
pub(crate) const EXTRA_INPUT_CAPACITY: usize = 16;

/// What the directory says about a new connection.
#[derive(Debug)]
pub enum Admission {
    /// Run the call.
    Accept(CallDetails),
    /// Close the connection before any agent session opens (a UUID nobody created).
    Reject,
}

/// What is known about an admitted call.
#[derive(Debug, Default)]
pub struct CallDetails {
    /// The caller's number (ARI `caller.number`), if known.
    pub caller_number: Option<String>,
    /// The caller's name (ARI `caller.name`), if known.
    pub caller_name: Option<String>,
    /// More input for the agent (DTMF from ARI), merged with what AudioSocket carries.
    pub extra_input: Option<mpsc::Receiver<AgentInput>>,
    /// Send silence from the first tick instead of waiting for Asterisk's first frame: an
    /// externalMedia channel was seen (Asterisk 22.10.1, about 1 call in 30) to send nothing
    /// until it received a frame from voicegate.
    pub media_at_once: bool,
    /// The agent profile and call variables the directory learned (Stasis: the channel
    /// variable `VOICEGATE_PROFILE` or the `Stasis()` argument); `None`: not said.
    pub profile: Option<crate::profiles::ProfileChoice>,
    /// Sees the call's agent events as the session handles them (the console's live feed).
    pub observer: Option<SharedObserver>,
}

/// Watches one call's agent events from inside its session task (the 20 ms loop): it is
/// called for every [`AgentEvent`] before the call handles it, so it must return at once —
/// never wait, never do I/O (the console copies what it needs and broadcasts without
/// waiting, dropping what a slow watcher cannot take).
pub trait CallObserver: Send + Sync + 'static {
    /// One agent event of the call.
    fn agent_event(&self, event: &AgentEvent);

    /// A tool's result, before it goes to the agent.
    fn tool_result(&self, _result: &crate::tools::ToolResult) {}
}

/// A shared [`CallObserver`].
pub(crate) type SharedObserver = std::sync::Arc<dyn CallObserver>;

impl std::fmt::Debug for dyn CallObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallObserver")
    }
}

/// A boxed future returned by [`CallDirectory::admit`].
pub(crate) type AdmitFuture<'a> = Pin<Box<dyn Future<Output = Admission> + Send + 'a>>;

/// Knows calls before they connect and hears how they end.
pub trait CallDirectory: Send + Sync + 'static {
    /// Called once per connection with its call id. `end` ends this call when cancelled
    /// (the session sends `0x00` and closes, then its agent session is dropped); the
    /// directory may keep it. Should answer within a few hundred ms: audio from Asterisk
    /// waits in the socket meanwhile.
    fn admit(&self, call_id: Uuid, end: CancellationToken) -> AdmitFuture<'_>;

    /// Called once per admitted call when its session has ended, before the call is
    /// counted and recorded. The directory may correct the outcome when it, not the session,
    /// decided how the call ended (the ARI controller sent the caller to the operators).
    fn finished(&self, summary: &mut CallSummary);
}

impl std::fmt::Debug for dyn CallDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallDirectory")
    }
}
