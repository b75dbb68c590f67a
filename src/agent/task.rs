//! Spawning an agent's tasks inside the call's tracing span, so every log line of a call,
//! from every task (the agent's own, and its STT, LLM, TTS and socket tasks), carries the
//! call id the call's span (`call{call_id=…}`) records.

use std::future::Future;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

/// Spawns `task` on the current tokio runtime inside [`tracing::Span::current`] (captured
/// now, before the spawn): the span of the call whose session started the agent.
pub(crate) fn spawn<F>(task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(task.instrument(tracing::Span::current()))
}
