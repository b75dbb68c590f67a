//! The call-centre console: a small web page served on the health listener under
//! `/console` (docs/console.md) that shows the live calls with their transcripts, lets a
//! supervisor take a call over (to the operators) or hang it up, toggles maintenance, shows
//! the recently transferred calls, the call history from the records spool and the state.
//!
//! Off by default (`[console] enabled`); behind a password (an argon2 hash, [`auth`]) and the
//! health listener's allowlist. The page, its script and style are embedded
//! (`include_str!` in [`routes`]).
//!
//! How the live feed reaches the browsers without slowing a call: [`ConsoleDirectory`] wraps
//! the calls' [`CallDirectory`] and gives every admitted call an observer; the observer runs
//! in the call's 20 ms loop, updates the call's row under a short lock and puts one JSON line
//! on a bounded broadcast ([`EVENTS_CAPACITY`]). Sending never waits: a browser that falls
//! behind loses the oldest lines (counted in `voicegate_console_events_dropped_total`) and is
//! sent a fresh snapshot instead.

pub mod auth;
pub(crate) mod routes;

use crate::agent::{AgentEvent, Speaker, TurnLatency};
use crate::call::directory::{AdmitFuture, CallDirectory, CallObserver};
use crate::call::next::{Next, NextStore};
use crate::call::route::Generation;
use crate::call::{CallSummary, Outcome};
use crate::records::CallerNumbers;
use crate::secret::SecretSource;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

/// Lines the live feed holds for the slowest browser; beyond that it drops the oldest.
pub(crate) const EVENTS_CAPACITY: usize = 1024;
/// Finished calls that went to the operators kept for the handover cards.
pub(crate) const HANDOVERS_KEPT: usize = 50;
/// Transcript lines kept per live call (older ones are in the record once it ends).
pub(crate) const LIVE_LINES_KEPT: usize = 200;
/// The state file of the console's maintenance switch, in the state directory.
pub(crate) const MAINTENANCE_FILE: &str = "console-maintenance.json";
/// Metric: live-feed lines a slow browser did not get.
pub(crate) const EVENTS_DROPPED: &str = "voicegate_console_events_dropped_total";

/// `[console]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Serve the console under `/console` on the health listener (default `false`).
    pub enabled: bool,
    /// The login password's argon2 hash, a PHC string (`$argon2id$v=19$…`), inline or from
    /// `{ env = … }`, `{ file = … }`, `{ credential = … }`. Required when enabled.
    pub password_hash: Option<SecretSource>,
    /// How long a login lasts, minutes (default 480).
    pub session_minutes: u32,
    /// `[console.summary]`: a Chat Completions endpoint that writes a three-line summary on
    /// each handover card (absent: no summary).
    pub summary: Option<SummaryConfig>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            enabled: false,
            password_hash: None,
            session_minutes: 480,
            summary: None,
        }
    }
}

/// `[console.summary]`: an OpenAI-compatible Chat Completions endpoint (`providers.md` §7).
/// The transcript and tool results of a call going to the operators are sent there.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryConfig {
    /// Endpoint, e.g. `https://api.openai.com/v1/chat/completions`.
    pub url: String,
    /// Bearer key.
    pub api_key: SecretSource,
    /// Model id, e.g. `gpt-4o-mini`.
    pub model: String,
    /// Time allowed until the response headers arrive, ms (default 10000).
    #[serde(default = "default_summary_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_summary_timeout_ms() -> u64 {
    10_000
}

/// The system prompt of the handover summary.
pub(crate) const SUMMARY_PROMPT: &str = "You write handover notes for a call-centre operator who is \
about to take over a phone call from a voice assistant. From the transcript and tool results \
below, write exactly three short lines, plain text, no preamble: 1) who is calling and why; \
2) what the assistant already did or found out; 3) what is still open.";

impl SummaryConfig {
    /// The client, with the key resolved.
    ///
    /// # Errors
    /// When the key cannot be read or the HTTP client cannot be built.
    pub(crate) fn client(&self) -> Result<crate::agent::cascade::llm::LlmClient, String> {
        use crate::agent::cascade::llm::{LlmClient, LlmSettings};
        let settings = LlmSettings {
            url: self.url.clone(),
            api_key: self
                .api_key
                .resolve()
                .map_err(|e| format!("console.summary.api_key: {e}"))?,
            model: self.model.clone(),
            temperature: None,
            max_completion_tokens: Some(200),
            extra_headers: Default::default(),
            timeout: Duration::from_millis(self.timeout_ms),
            retries: 0,
            retry_delay: Duration::from_secs(1),
        };
        LlmClient::new(settings, &[]).map_err(|e| format!("console.summary: {e}"))
    }
}

impl ConsoleConfig {
    /// Checks the keys.
    ///
    /// # Errors
    /// [`crate::error::ConfigError::Invalid`] when enabled without a password hash or with a
    /// session length of 0.
    pub(crate) fn validate(&self) -> Result<(), crate::error::ConfigError> {
        use crate::error::ConfigError;
        if self.enabled && self.password_hash.is_none() {
            return Err(ConfigError::invalid(
                "console.password_hash",
                "console.enabled needs an argon2 PHC string ($argon2id$...)",
            ));
        }
        if let Some(sum) = &self.summary {
            if !(sum.url.starts_with("http://") || sum.url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    "console.summary.url",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if self.session_minutes == 0 {
            return Err(ConfigError::invalid(
                "console.session_minutes",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The resolved, parsed password hash.
    ///
    /// # Errors
    /// When the secret cannot be read or is not an argon2 PHC string.
    pub(crate) fn hash(&self) -> Result<auth::PasswordHash, String> {
        let source = self
            .password_hash
            .as_ref()
            .ok_or("console.password_hash is not set")?;
        let secret = source.resolve().map_err(|e| e.to_string())?;
        auth::PasswordHash::parse(secret.expose())
            .map_err(|e| format!("console.password_hash: {e}"))
    }
}

/// What a call is doing, as the console shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CallState {
    /// Before the agent's first words.
    Greeting = 0,
    /// The caller has the floor.
    Listening = 1,
    /// The caller finished a turn; no reply audio yet.
    Thinking = 2,
    /// Reply audio is arriving.
    Speaking = 3,
}

impl CallState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => CallState::Listening,
            2 => CallState::Thinking,
            3 => CallState::Speaking,
            _ => CallState::Greeting,
        }
    }

    /// `greeting`, `listening`, `thinking`, `speaking`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            CallState::Greeting => "greeting",
            CallState::Listening => "listening",
            CallState::Thinking => "thinking",
            CallState::Speaking => "speaking",
        }
    }
}

/// What a supervisor asked of a live call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send the caller to the operators now.
    TakeOver,
    /// End the call.
    HangUp,
}

/// One live call: what the page shows of it.
#[derive(Debug)]
struct Live {
    started: SystemTime,
    caller: Option<String>,
    agent: &'static str,
    state: AtomicU8,
    detail: Mutex<LiveDetail>,
    end: CancellationToken,
}

#[derive(Debug, Default)]
struct LiveDetail {
    lines: VecDeque<serde_json::Value>,
    turns: Vec<TurnLatency>,
    action: Option<(Action, String)>,
}

/// The console's shared state: live calls, the feed, handover cards, the maintenance switch.
#[derive(Debug)]
pub(crate) struct Console {
    /// `audiosocket` or `stasis`: how calls reach voicegate here.
    pub(crate) mode: &'static str,
    numbers: CallerNumbers,
    calls: Mutex<HashMap<Uuid, Arc<Live>>>,
    feed: broadcast::Sender<Arc<str>>,
    handovers: Mutex<VecDeque<serde_json::Value>>,
    generation: watch::Sender<Arc<Generation>>,
    health: Arc<crate::health::HealthState>,
    next: Arc<NextStore>,
    state_dir: PathBuf,
    summarizer: Option<crate::agent::cascade::llm::LlmClient>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Console {
    /// A console over the service's generation (for the maintenance switch), health and
    /// `/next` store; caller numbers shown per `numbers` (the `[records]` policy).
    pub(crate) fn new(
        mode: &'static str,
        numbers: CallerNumbers,
        generation: watch::Sender<Arc<Generation>>,
        health: Arc<crate::health::HealthState>,
        next: Arc<NextStore>,
        state_dir: PathBuf,
        summarizer: Option<crate::agent::cascade::llm::LlmClient>,
    ) -> Arc<Self> {
        Arc::new(Console {
            mode,
            numbers,
            calls: Mutex::new(HashMap::new()),
            feed: broadcast::channel(EVENTS_CAPACITY).0,
            handovers: Mutex::new(VecDeque::new()),
            generation,
            health,
            next,
            state_dir,
            summarizer,
        })
    }

    /// Puts one line on the live feed; never waits (no watcher: nothing to do).
    fn publish(&self, value: &serde_json::Value) {
        if self.feed.receiver_count() > 0 {
            let _ = self.feed.send(Arc::from(value.to_string()));
        }
    }

    /// A receiver of the live feed (JSON lines).
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.feed.subscribe()
    }

    fn row(id: Uuid, c: &Live) -> serde_json::Value {
        json!({
            "id": id,
            "caller": c.caller,
            "agent": c.agent,
            "started_unix_ms": unix_ms(c.started),
            "state": CallState::from_u8(c.state.load(Ordering::Relaxed)).label(),
        })
    }

    /// The live calls with their transcripts and turn latencies, oldest first.
    pub(crate) fn snapshot(&self) -> serde_json::Value {
        // Copied out first: a call starting or ending never waits for the rows' JSON.
        let calls: Vec<(Uuid, Arc<Live>)> = self
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, c)| (*id, c.clone()))
            .collect();
        let mut rows: Vec<_> = calls
            .iter()
            .map(|(id, c)| {
                let mut row = Self::row(*id, c);
                let d = c.detail.lock().unwrap_or_else(|p| p.into_inner());
                row["lines"] = json!(d.lines);
                row["turns"] = json!(d.turns);
                row["mode"] = json!(self.mode);
                row
            })
            .collect();
        rows.sort_by_key(|r| r["started_unix_ms"].as_u64());
        json!({"type": "snapshot", "calls": rows, "maintenance": self.maintenance()})
    }

    /// The handover cards of the calls that went to the operators, newest first.
    pub(crate) fn handovers(&self) -> Vec<serde_json::Value> {
        let h = self.handovers.lock().unwrap_or_else(|p| p.into_inner());
        h.iter().rev().cloned().collect()
    }

    /// Asks a live call to end: to the operators or hung up. `false` if no such live call.
    /// `who` names the supervisor in the audit line and the call's handover card.
    pub(crate) fn act(&self, id: Uuid, action: Action, who: &str) -> bool {
        let call = self
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        let Some(call) = call else {
            return false;
        };
        call.detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .action
            .get_or_insert((action, who.to_owned()));
        let what = match action {
            Action::TakeOver => "take_over",
            Action::HangUp => "hang_up",
        };
        info!(target: "voicegate::audit", action = what, call_id = %id, who, "console action");
        match action {
            Action::TakeOver => self.next.set(id, Next::Operator),
            Action::HangUp => self.next.set(id, Next::Hangup),
        }
        call.end.cancel();
        true
    }

    /// Whether the maintenance switch is on for new calls.
    pub(crate) fn maintenance(&self) -> bool {
        self.generation.borrow().fallback.maintenance
    }

    /// Turns the maintenance switch on or off for new calls, as the config key and a reload
    /// would, and saves it in the state directory ([`MAINTENANCE_FILE`]) so it survives a
    /// restart and later reloads (until toggled again).
    ///
    /// # Errors
    /// When the state file cannot be written; the switch is changed anyway.
    pub(crate) fn set_maintenance(&self, on: bool, who: &str) -> std::io::Result<()> {
        apply_maintenance(&self.generation, &self.health, on);
        info!(target: "voicegate::audit", action = "maintenance", on, who, "console action");
        save_maintenance(&self.state_dir, on)
    }

    fn admitted(&self, id: Uuid, end: CancellationToken, caller: Option<&str>) -> Arc<Live> {
        let live = Arc::new(Live {
            started: SystemTime::now(),
            caller: caller.and_then(|n| self.numbers.apply(n)),
            agent: self.generation.borrow().agent.name(),
            state: AtomicU8::new(CallState::Greeting as u8),
            detail: Mutex::new(LiveDetail::default()),
            end,
        });
        let mut row = Self::row(id, &live);
        row["mode"] = json!(self.mode);
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, live.clone());
        self.publish(&json!({"type": "call", "call": row}));
        live
    }

    fn ended(self: &Arc<Self>, summary: &mut CallSummary) {
        let id = summary.call_id;
        let live = self
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        let action = live.as_ref().and_then(|l| {
            l.detail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .action
                .clone()
        });
        match action {
            Some((Action::TakeOver, _)) => summary.outcome = Outcome::Operator("supervisor".into()),
            Some((Action::HangUp, _)) => summary.outcome = Outcome::AgentEnded("supervisor".into()),
            None => {}
        }
        let outcome = serde_json::to_value(&summary.outcome).unwrap_or_default();
        self.publish(&json!({"type": "ended", "id": id, "outcome": outcome}));
        // The tools the agent called and what they answered, from the live lines.
        let tools: Vec<serde_json::Value> = live
            .as_ref()
            .map(|l| {
                let d = l.detail.lock().unwrap_or_else(|p| p.into_inner());
                d.lines
                    .iter()
                    .filter(|v| matches!(v["kind"].as_str(), Some("tool" | "tool_result")))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let to_operators = matches!(summary.outcome, Outcome::Operator(_) | Outcome::Fallback(_));
        if to_operators {
            let (_, reason) = summary.outcome.label();
            let card = json!({
                "id": id,
                "caller": summary.caller_number.as_deref().and_then(|n| self.numbers.apply(n)),
                "agent": summary.agent,
                "started_unix_ms": unix_ms(summary.started),
                "duration_ms": summary.duration.as_millis() as u64,
                "outcome": outcome,
                "reason": reason,
                "by": action.map(|(_, who)| who),
                "transcript": summary.transcript.iter()
                    .map(|(s, t)| json!({"speaker": s, "text": t})).collect::<Vec<_>>(),
                "tools": tools,
            });
            let mut h = self.handovers.lock().unwrap_or_else(|p| p.into_inner());
            if h.len() >= HANDOVERS_KEPT {
                h.pop_front();
            }
            h.push_back(card.clone());
            drop(h);
            self.publish(&json!({"type": "handover", "card": card}));
            self.summarise(id, &card);
        }
    }

    /// With `[console.summary]`, asks for the card's three-line summary in a task of its own
    /// (the transfer never waits for it) and adds it to the card when it comes.
    fn summarise(self: &Arc<Self>, id: Uuid, card: &serde_json::Value) {
        use crate::agent::cascade::llm::LlmEvent;
        use tracing::Instrument as _;
        let Some(client) = self.summarizer.clone() else {
            return;
        };
        let mut text = String::new();
        for l in card["transcript"].as_array().into_iter().flatten() {
            let who = if l["speaker"] == "caller" {
                "Caller"
            } else {
                "Assistant"
            };
            text.push_str(&format!("{who}: {}\n", l["text"].as_str().unwrap_or("")));
        }
        for t in card["tools"].as_array().into_iter().flatten() {
            match t["kind"].as_str() {
                Some("tool") => text.push_str(&format!(
                    "Tool call {}({})\n",
                    t["name"].as_str().unwrap_or(""),
                    t["arguments"].as_str().unwrap_or("")
                )),
                _ => text.push_str(&format!(
                    "Tool result: {}\n",
                    t["output"].as_str().unwrap_or("")
                )),
            }
        }
        text.push_str(&format!(
            "Why it goes to an operator: {}\n",
            card["reason"].as_str().unwrap_or("")
        ));
        let messages = [
            json!({"role": "system", "content": SUMMARY_PROMPT}),
            json!({"role": "user", "content": text}),
        ];
        let me = self.clone();
        tokio::spawn(
            async move {
                let mut stream = client.stream(&messages);
                let mut out = String::new();
                while let Some(ev) = stream.events.recv().await {
                    match ev {
                        LlmEvent::Text(t) => out.push_str(&t),
                        LlmEvent::Done { .. } => break,
                        LlmEvent::Failed(e) => {
                            warn!(error = %e, "handover summary failed; the card has none");
                            return;
                        }
                        LlmEvent::ToolCalls(_) => {}
                    }
                }
                let out = out.trim().to_owned();
                {
                    let mut h = me.handovers.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(card) = h.iter_mut().find(|c| c["id"] == json!(id)) {
                        card["summary"] = json!(out);
                    }
                }
                me.publish(&json!({"type": "summary", "id": id, "summary": out}));
            }
            .in_current_span(),
        );
    }
}

/// Sets the maintenance switch of new calls (the generation) and of `/health`.
fn apply_maintenance(
    generation: &watch::Sender<Arc<Generation>>,
    health: &crate::health::HealthState,
    on: bool,
) {
    generation.send_modify(|g| {
        let mut next = (**g).clone();
        next.fallback.maintenance = on;
        *g = Arc::new(next);
    });
    health.set_maintenance(on);
    if on {
        warn!("maintenance switch on (console): every call goes to the operators");
    } else {
        info!("maintenance switch off (console)");
    }
}

fn save_maintenance(dir: &std::path::Path, on: bool) -> std::io::Result<()> {
    let path = dir.join(MAINTENANCE_FILE);
    let tmp = dir.join(format!("{MAINTENANCE_FILE}.tmp"));
    std::fs::write(&tmp, json!({"maintenance": on}).to_string())?;
    std::fs::rename(tmp, path)
}

/// The maintenance switch the console saved in `state_dir`, if any: it wins over
/// `fallback.maintenance` at start and on reload until toggled again.
pub(crate) fn saved_maintenance(state_dir: &std::path::Path) -> Option<bool> {
    let text = std::fs::read_to_string(state_dir.join(MAINTENANCE_FILE)).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["maintenance"].as_bool()
}

/// The calls' directory with the console in front: every admitted call is shown live and
/// can be taken over; its end is reported to the console before the inner directory, so a
/// supervisor's take-over is what the inner directory (the `/next` store, ARI) acts on.
#[derive(Debug)]
pub(crate) struct ConsoleDirectory {
    /// The directory the service would use without the console.
    pub(crate) inner: Arc<dyn CallDirectory>,
    /// The console.
    pub(crate) console: Arc<Console>,
}

struct Observer {
    id: Uuid,
    live: Arc<Live>,
    console: Arc<Console>,
}

impl Observer {
    fn set_state(&self, s: CallState) {
        if self.live.state.swap(s as u8, Ordering::Relaxed) != s as u8 {
            self.console
                .publish(&json!({"type": "state", "id": self.id, "state": s.label()}));
        }
    }

    fn line(&self, v: serde_json::Value) {
        {
            let mut d = self.live.detail.lock().unwrap_or_else(|p| p.into_inner());
            if d.lines.len() >= LIVE_LINES_KEPT {
                d.lines.pop_front();
            }
            d.lines.push_back(v.clone());
        }
        self.console
            .publish(&json!({"type": "line", "id": self.id, "line": v}));
    }
}

impl CallObserver for Observer {
    fn agent_event(&self, event: &AgentEvent) {
        match event {
            // The most frequent event: one atomic swap, a line only on a change.
            AgentEvent::Audio { .. } => self.set_state(CallState::Speaking),
            AgentEvent::ReplyDone { .. } => self.set_state(CallState::Listening),
            AgentEvent::SpeechStarted => {
                let speaking = self.live.state.load(Ordering::Relaxed) == CallState::Speaking as u8;
                if speaking {
                    self.line(json!({"kind": "barge_in"}));
                }
                self.set_state(CallState::Listening);
            }
            AgentEvent::Transcript { speaker, text } => {
                self.line(json!({"kind": "say", "speaker": speaker, "text": text}));
                if *speaker == Speaker::Caller {
                    self.set_state(CallState::Thinking);
                }
            }
            AgentEvent::ToolCall {
                call_id,
                name,
                arguments,
                ..
            } => self.line(json!({"kind": "tool", "call_id": call_id, "name": name,
                                  "arguments": cut(arguments)})),
            AgentEvent::TurnLatency(t) => {
                // A turn may come twice: from the agent, then from the call with its first
                // frame on the wire; the later replaces the earlier.
                let mut detail = self.live.detail.lock().unwrap_or_else(|p| p.into_inner());
                match detail.turns.iter_mut().find(|old| old.reply == t.reply) {
                    Some(old) => *old = t.clone(),
                    None => detail.turns.push(t.clone()),
                }
                drop(detail);
                self.console
                    .publish(&json!({"type": "turn", "id": self.id, "turn": t}));
            }
            AgentEvent::Ended { reason } => self.line(json!({"kind": "ended", "text": reason})),
            AgentEvent::Failed(e) => self.line(json!({"kind": "failed", "text": e.to_string()})),
        }
    }

    fn tool_result(&self, r: &crate::tools::ToolResult) {
        self.line(json!({"kind": "tool_result", "call_id": r.call_id, "output": cut(&r.output)}));
    }
}

/// Bytes of a tool's arguments or result shown live (the record keeps its own bound).
pub(crate) const TOOL_TEXT_BYTES: usize = 2048;

/// `text` cut to [`TOOL_TEXT_BYTES`] on a character boundary, `…` marking a cut.
fn cut(text: &str) -> String {
    if text.len() <= TOOL_TEXT_BYTES {
        return text.to_owned();
    }
    let mut end = TOOL_TEXT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl CallDirectory for ConsoleDirectory {
    fn admit(&self, call_id: Uuid, end: CancellationToken) -> AdmitFuture<'_> {
        Box::pin(async move {
            match self.inner.admit(call_id, end.clone()).await {
                crate::call::directory::Admission::Accept(mut details) => {
                    let live =
                        self.console
                            .admitted(call_id, end, details.caller_number.as_deref());
                    details.observer = Some(Arc::new(Observer {
                        id: call_id,
                        live,
                        console: self.console.clone(),
                    }));
                    crate::call::directory::Admission::Accept(details)
                }
                reject => reject,
            }
        })
    }

    fn finished(&self, summary: &mut CallSummary) {
        self.console.ended(summary);
        self.inner.finished(summary);
    }
}

/// Applies a maintenance switch saved by the console to a freshly loaded config's value.
pub(crate) fn effective_maintenance(configured: bool, state_dir: &std::path::Path) -> bool {
    saved_maintenance(state_dir).unwrap_or(configured)
}

/// How long a console login lasts under `c`.
pub(crate) fn session_lifetime(c: &ConsoleConfig) -> Duration {
    Duration::from_secs(u64::from(c.session_minutes) * 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::directory::Admission;
    use crate::call::route::ServerParams;

    fn console(dir: &std::path::Path) -> (Arc<Console>, Arc<NextStore>) {
        let agent = crate::agent::from_config(&Default::default()).unwrap();
        let health = Arc::new(crate::health::HealthState::new(
            agent.name(),
            Arc::new(crate::fallback::Breaker::new(0, Duration::from_secs(1))),
        ));
        let params = ServerParams::from_config(&Default::default());
        let (tx, _) = watch::channel(Arc::new(Generation::new(agent, params)));
        let next = Arc::new(NextStore::new());
        let c = Console::new(
            "audiosocket",
            CallerNumbers::Masked,
            tx,
            health,
            next.clone(),
            dir.to_owned(),
            None,
        );
        (c, next)
    }

    fn summary(id: Uuid, outcome: Outcome) -> CallSummary {
        let mut s = CallSummary::without_agent(id, "echo", outcome);
        s.caller_number = Some("+4915112345678".into());
        s.transcript = vec![(Speaker::Caller, "my invoice".into())];
        s
    }

    #[tokio::test]
    async fn a_call_is_shown_live_taken_over_and_handed_over_with_what_was_said() {
        let dir = std::env::temp_dir().join(format!("vg-console-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, next) = console(&dir);
        let d = ConsoleDirectory {
            inner: next.clone(),
            console: c.clone(),
        };
        let mut feed = c.subscribe();
        let id = Uuid::new_v4();
        let end = CancellationToken::new();
        let Admission::Accept(details) = d.admit(id, end.clone()).await else {
            panic!("admitted")
        };
        let o = details.observer.expect("an observer for the call");
        o.agent_event(&AgentEvent::Transcript {
            speaker: Speaker::Caller,
            text: "my invoice".into(),
        });
        o.agent_event(&AgentEvent::ToolCall {
            call_id: "t1".into(),
            name: "lookup".into(),
            arguments: "{\"n\":1}".into(),
            reply: None,
        });
        o.tool_result(&crate::tools::ToolResult {
            call_id: "t1".into(),
            output: "{\"due\":12}".into(),
        });
        let snap = c.snapshot();
        let row = &snap["calls"][0];
        assert_eq!(row["id"], id.to_string());
        assert_eq!(row["state"], "thinking", "{row}");
        assert_eq!(row["lines"][0]["text"], "my invoice");
        assert_eq!(row["lines"][2]["output"], "{\"due\":12}");
        let first: serde_json::Value = serde_json::from_str(&feed.recv().await.unwrap()).unwrap();
        assert_eq!(first["type"], "call");
        assert!(
            !c.act(Uuid::new_v4(), Action::TakeOver, "t"),
            "no such call"
        );
        assert!(c.act(id, Action::TakeOver, "session x"));
        assert!(end.is_cancelled(), "the session is told to end");
        // The session ends as a shutdown; the console makes it the supervisor's transfer.
        let mut s = summary(id, Outcome::Shutdown);
        d.finished(&mut s);
        assert_eq!(s.outcome, Outcome::Operator("supervisor".into()));
        assert_eq!(next.answer(&id.to_string()), "operator");
        assert_eq!(c.snapshot()["calls"].as_array().unwrap().len(), 0);
        let card = &c.handovers()[0];
        assert_eq!(card["caller"], "**********5678");
        assert_eq!(card["reason"], "supervisor");
        assert_eq!(card["by"], "session x");
        assert_eq!(card["transcript"][0]["text"], "my invoice");
        assert_eq!(card["tools"][1]["output"], "{\"due\":12}");
        // Hang-up: `/next` says hangup.
        let id2 = Uuid::new_v4();
        let _ = d.admit(id2, CancellationToken::new()).await;
        assert!(c.act(id2, Action::HangUp, "session x"));
        let mut s = summary(id2, Outcome::Shutdown);
        d.finished(&mut s);
        assert_eq!(s.outcome, Outcome::AgentEnded("supervisor".into()));
        assert_eq!(next.answer(&id2.to_string()), "hangup");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_watcher_that_does_not_read_never_holds_a_call_up() {
        let dir = std::env::temp_dir().join(format!("vg-console-lag-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, next) = console(&dir);
        let d = ConsoleDirectory {
            inner: next,
            console: c.clone(),
        };
        let mut feed = c.subscribe();
        let Admission::Accept(details) = d.admit(Uuid::new_v4(), CancellationToken::new()).await
        else {
            panic!("admitted")
        };
        let o = details.observer.unwrap();
        // Three times the feed's capacity while nobody reads: every call returns at once.
        for i in 0..3 * EVENTS_CAPACITY {
            o.agent_event(&AgentEvent::Transcript {
                speaker: Speaker::Agent,
                text: format!("line {i}"),
            });
        }
        match feed.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => {
                assert_eq!(n as usize, 3 * EVENTS_CAPACITY + 1 - EVENTS_CAPACITY)
            }
            other => panic!("the slow watcher lost the oldest lines: {other:?}"),
        }
        // The call's own rows keep the newest lines, bounded.
        let snap = c.snapshot();
        let lines = snap["calls"][0]["lines"].as_array().unwrap();
        assert_eq!(lines.len(), LIVE_LINES_KEPT);
        assert_eq!(
            lines.last().unwrap()["text"],
            format!("line {}", 3 * EVENTS_CAPACITY - 1)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_maintenance_switch_is_saved_and_wins_over_the_config_key() {
        let dir = std::env::temp_dir().join(format!("vg-console-maint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, _) = console(&dir);
        assert!(!c.maintenance());
        assert_eq!(saved_maintenance(&dir), None);
        assert!(
            effective_maintenance(true, &dir),
            "nothing saved: the config key"
        );
        c.set_maintenance(true, "session x").unwrap();
        assert!(c.maintenance(), "new calls get the switch");
        assert!(c.health.report().maintenance);
        c.set_maintenance(false, "session x").unwrap();
        assert!(
            !effective_maintenance(true, &dir),
            "saved off wins over the key"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
