//! The call session's side of tools: runs HTTP tools in spawned tasks and decides when a
//! terminal tool (hangup, transfer) may end the call.
//!
//! Owned by the call session, one per call. Nothing here blocks: HTTP tools
//! run in a [`JoinSet`] (aborted when the call ends) and come back through
//! [`ToolRunner::next_step`]; the terminal-tool state machine is advanced by the session's
//! events ([`ToolRunner::on_agent_audio`], [`ToolRunner::on_reply_done`],
//! [`ToolRunner::on_barge_in`]) and polled on the 20 ms tick ([`ToolRunner::poll_terminal`]).
//!
//! When a terminal tool may run: the caller did not interrupt the reply that asked for it
//! (neither before the call arrived nor while it waits), the playout buffer is empty, and the
//! agent is done speaking: either the provider said so for that reply
//! (the agent's `ReplyDone` event) or no agent audio arrived for [`TERMINAL_QUIET`]
//! (providers that do not tie tool calls to replies, such as ElevenLabs, may still be
//! streaming the goodbye when the call arrives).

use super::http::{ToolContext, error_result};
use super::{ToolAction, ToolRegistry, ToolResult};
use crate::audio::ReplyId;
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument as _, info, warn};

/// Without a `ReplyDone` for its reply, a terminal tool waits for this much agent silence
/// (after both the call and the last agent audio) before it runs, so a goodbye still being
/// streamed is not cut.
pub(crate) const TERMINAL_QUIET: Duration = Duration::from_millis(800);

/// Tool results held while the agent's input channel is full, at most.
const MAX_UNSENT: usize = 16;

/// Replies remembered as done or interrupted.
const REMEMBERED_REPLIES: usize = 16;

/// How a terminal tool ends the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Terminal {
    /// `hangup`: the goodbye was played; send `0x00`.
    Hangup,
    /// `transfer_to_operator`: the caller goes to the operators; `detail` says how
    /// (`dialplan`: the session ends with `0x00`; a Stasis call is then `continue`d by the
    /// ARI controller, see [`crate::tools`]).
    Operator {
        /// How the caller was handed over.
        detail: String,
    },
}

/// What the session does with a finished background task.
#[derive(Debug)]
pub(crate) enum ToolStep {
    /// Send this to the agent (a tool result), through [`ToolRunner::deliver`].
    Answer(ToolResult),
}

#[derive(Debug)]
enum Done {
    Result { call_id: String, output: String },
}

#[derive(Debug, Clone)]
enum TerminalKind {
    Hangup,
    Transfer { reason: Option<String> },
}

#[derive(Debug)]
struct Pending {
    call_id: String,
    name: String,
    kind: TerminalKind,
    reply: Option<ReplyId>,
    since: Instant,
}

/// Per-call tool state; see the module docs.
#[derive(Debug)]
pub struct ToolRunner {
    registry: Arc<ToolRegistry>,
    ctx: ToolContext,
    tasks: JoinSet<Done>,
    pending: Option<Pending>,
    replies_done: VecDeque<ReplyId>,
    interrupted: VecDeque<ReplyId>,
    last_agent_audio: Option<Instant>,
    unsent: VecDeque<ToolResult>,
}

fn remember(list: &mut VecDeque<ReplyId>, reply: ReplyId) {
    if list.len() == REMEMBERED_REPLIES {
        list.pop_front();
    }
    list.push_back(reply);
}

impl ToolRunner {
    /// Tools of `registry` for the call `call` (the agent's call info converts into a
    /// [`ToolContext`]).
    pub(crate) fn new(registry: Arc<ToolRegistry>, call: impl Into<ToolContext>) -> Self {
        ToolRunner {
            registry,
            ctx: call.into(),
            tasks: JoinSet::new(),
            pending: None,
            replies_done: VecDeque::new(),
            interrupted: VecDeque::new(),
            last_agent_audio: None,
            unsent: VecDeque::new(),
        }
    }

    /// A terminal tool is waiting for its moment.
    pub(crate) fn terminal_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// The model called tool `name`. HTTP tools start in the background; terminal tools
    /// are remembered until [`Self::poll_terminal`] says the call may end. Returns an
    /// immediate answer for the agent when the call cannot run (unknown tool, the reply was
    /// interrupted, another terminal tool is pending).
    pub(crate) fn on_tool_call(
        &mut self,
        call_id: String,
        name: &str,
        arguments: &str,
        reply: Option<ReplyId>,
        now: Instant,
    ) -> Option<ToolResult> {
        let answer = |output: String| {
            Some(ToolResult {
                call_id: call_id.clone(),
                output,
            })
        };
        let Some(tool) = self.registry.get(name) else {
            warn!(tool = %name, "agent asked for a tool that is not configured");
            return answer(error_result(&format!("unknown tool {name}")));
        };
        match &tool.action {
            ToolAction::Http(http) => {
                info!(tool = %name, "running http tool");
                let http = http.clone();
                let ctx = self.ctx.clone();
                let arguments = arguments.to_owned();
                self.tasks.spawn(
                    async move {
                        let output = http.call(&ctx, &call_id, &arguments).await;
                        Done::Result { call_id, output }
                    }
                    .in_current_span(),
                );
                None
            }
            action => {
                if reply.is_some_and(|r| self.interrupted.contains(&r)) {
                    info!(tool = %name, "terminal tool not run: its reply was interrupted");
                    return answer(error_result(
                        "not executed: the caller interrupted the reply that asked for it",
                    ));
                }
                if self.terminal_pending() {
                    return answer(error_result("not executed: the call is already ending"));
                }
                let kind = match action {
                    ToolAction::Hangup => TerminalKind::Hangup,
                    _ => TerminalKind::Transfer {
                        reason: serde_json::from_str::<Value>(arguments).ok().and_then(|v| {
                            v.get("reason").and_then(Value::as_str).map(str::to_owned)
                        }),
                    },
                };
                info!(tool = %name, "terminal tool waits for the reply to be played");
                self.pending = Some(Pending {
                    call_id,
                    name: name.to_owned(),
                    kind,
                    reply,
                    since: now,
                });
                None
            }
        }
    }

    /// Agent audio arrived (any reply).
    pub(crate) fn on_agent_audio(&mut self, now: Instant) {
        self.last_agent_audio = Some(now);
    }

    /// The agent said no more audio comes for `reply`.
    pub(crate) fn on_reply_done(&mut self, reply: ReplyId) {
        remember(&mut self.replies_done, reply);
    }

    /// The caller barged in and the playout was flushed (`flushed` is the reply that was
    /// playing). A pending terminal tool is dropped: the caller wants to go on. Returns the
    /// answer for its tool call.
    pub(crate) fn on_barge_in(&mut self, flushed: Option<ReplyId>) -> Option<ToolResult> {
        if let Some(r) = flushed {
            remember(&mut self.interrupted, r);
        }
        let p = self.pending.take()?;
        info!(tool = %p.name, "terminal tool cancelled: the caller interrupted");
        Some(ToolResult {
            call_id: p.call_id,
            output: error_result(
                "not executed: the caller interrupted the reply that asked for it",
            ),
        })
    }

    /// Called on each 20 ms tick while [`Self::terminal_pending`]: returns how the call
    /// ends once a pending terminal tool may run.
    pub(crate) fn poll_terminal(&mut self, playout_empty: bool, now: Instant) -> Option<Terminal> {
        let p = self.pending.as_ref()?;
        if !playout_empty {
            return None;
        }
        let reply_done = p.reply.is_some_and(|r| self.replies_done.contains(&r));
        let quiet_since = self.last_agent_audio.map_or(p.since, |t| t.max(p.since));
        if !reply_done && now < quiet_since + TERMINAL_QUIET {
            return None;
        }
        // Checked just above that a terminal tool is pending.
        let p = self.pending.take().expect("pending terminal tool");
        match p.kind {
            TerminalKind::Hangup => {
                info!("hangup tool: goodbye played, ending the call");
                Some(Terminal::Hangup)
            }
            TerminalKind::Transfer { reason } => {
                info!(
                    reason = reason.as_deref().unwrap_or(""),
                    "transfer to operator: ending the session for the operators (dialplan queue, or ARI continue for a Stasis call)"
                );
                Some(Terminal::Operator {
                    detail: "dialplan".into(),
                })
            }
        }
    }

    /// The next finished background task (pending forever when none runs). Cancel-safe.
    pub(crate) async fn next_step(&mut self) -> ToolStep {
        loop {
            if self.tasks.is_empty() {
                std::future::pending::<()>().await;
            }
            match self.tasks.join_next().await {
                Some(Ok(Done::Result { call_id, output })) => {
                    return ToolStep::Answer(ToolResult { call_id, output });
                }
                Some(Err(e)) => warn!(error = %e, "tool task failed"),
                None => {}
            }
        }
    }

    /// Sends `input` to the agent (whose input type converts from a [`ToolResult`]) without
    /// waiting; if its channel is full the message is kept (up to 16) and retried by
    /// [`Self::retry_unsent`].
    pub(crate) fn deliver<T: From<ToolResult>>(
        &mut self,
        agent: &mpsc::Sender<T>,
        input: ToolResult,
    ) {
        if !self.unsent.is_empty() {
            self.queue(input);
            return;
        }
        if let Err(TrySendError::Full(_)) = agent.try_send(T::from(input.clone())) {
            self.queue(input);
        }
    }

    fn queue(&mut self, input: ToolResult) {
        if self.unsent.len() == MAX_UNSENT {
            warn!("agent input full; dropping the oldest tool result");
            self.unsent.pop_front();
        }
        self.unsent.push_back(input);
    }

    /// Retries results the agent's full channel refused (call on each tick; free when none).
    pub(crate) fn retry_unsent<T: From<ToolResult>>(&mut self, agent: &mpsc::Sender<T>) {
        while let Some(input) = self.unsent.pop_front() {
            match agent.try_send(T::from(input.clone())) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    self.unsent.push_front(input);
                    return;
                }
                Err(TrySendError::Closed(_)) => {
                    self.unsent.clear();
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::{ToolConfig, ToolKind};

    fn runner(kinds: &[ToolKind]) -> ToolRunner {
        let entries: Vec<ToolConfig> = kinds
            .iter()
            .map(|&kind| ToolConfig {
                kind,
                name: None,
                description: None,
                parameters: None,
                url: None,
                method: Default::default(),
                headers: Default::default(),
                timeout_ms: 1000,
            })
            .collect();
        let registry = Arc::new(ToolRegistry::from_config(&entries).unwrap());
        let call = ToolContext {
            call_id: uuid::Uuid::nil(),
            caller_number: None,
        };
        ToolRunner::new(registry, call)
    }

    #[tokio::test]
    async fn hangup_waits_for_playout_and_quiet_unless_the_reply_is_done() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut r = runner(&[ToolKind::Hangup]);
        r.on_agent_audio(t0);
        assert!(
            r.on_tool_call("c1".into(), HANGUP_NAME, "{}", Some(ReplyId(1)), t0)
                .is_none()
        );
        assert!(r.terminal_pending());
        assert_eq!(
            r.poll_terminal(false, ms(5_000)),
            None,
            "words still queued"
        );
        assert_eq!(
            r.poll_terminal(true, ms(100)),
            None,
            "agent may still be streaming"
        );
        assert_eq!(r.poll_terminal(true, ms(900)), Some(Terminal::Hangup));
        assert!(!r.terminal_pending());

        let mut r = runner(&[ToolKind::Hangup]);
        r.on_reply_done(ReplyId(1));
        r.on_tool_call("c1".into(), HANGUP_NAME, "{}", Some(ReplyId(1)), t0);
        assert_eq!(
            r.poll_terminal(true, t0),
            Some(Terminal::Hangup),
            "reply done: at once"
        );
    }

    #[tokio::test]
    async fn interruption_cancels_or_refuses_terminal_tools() {
        let t0 = Instant::now();
        let mut r = runner(&[ToolKind::Hangup, ToolKind::TransferToOperator]);
        r.on_tool_call("c1".into(), HANGUP_NAME, "{}", Some(ReplyId(1)), t0);
        let answer = r.on_barge_in(Some(ReplyId(1)));
        assert!(matches!(answer, Some(ToolResult { ref call_id, .. }) if call_id == "c1"));
        assert!(!r.terminal_pending());
        assert_eq!(r.poll_terminal(true, t0 + Duration::from_secs(5)), None);
        // Asked for by the interrupted reply afterwards: refused at once.
        let refused = r.on_tool_call("c2".into(), TRANSFER_NAME, "{}", Some(ReplyId(1)), t0);
        assert!(
            matches!(refused, Some(ToolResult { ref output, .. }) if output.contains("interrupted"))
        );
        // Another reply's transfer goes ahead, through the dialplan without ARI.
        r.on_tool_call(
            "c3".into(),
            TRANSFER_NAME,
            "{\"reason\":\"x\"}",
            Some(ReplyId(2)),
            t0,
        );
        assert_eq!(
            r.poll_terminal(true, t0 + TERMINAL_QUIET),
            Some(Terminal::Operator {
                detail: "dialplan".into()
            })
        );
    }

    #[tokio::test]
    async fn unknown_tool_is_answered_with_an_error() {
        let mut r = runner(&[]);
        let a = r.on_tool_call("c".into(), "nope", "{}", None, Instant::now());
        assert!(
            matches!(a, Some(ToolResult { ref output, .. }) if output.contains("unknown tool nope"))
        );
    }

    const HANGUP_NAME: &str = crate::tools::HANGUP;
    const TRANSFER_NAME: &str = crate::tools::TRANSFER_TO_OPERATOR;
}
