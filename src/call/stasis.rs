//! The Stasis application and the caller lookup: what voicegate does with ARI for each call.
//!
//! **Stasis mode** (`asterisk.md`, mode 3). On `StasisStart` of a caller channel:
//! answer → create a mixing bridge → register a fresh UUID → `POST /channels/externalMedia`
//! with that UUID as `data`, pointed at voicegate's own AudioSocket listener → add the caller
//! and the externalMedia channel to the bridge. Asterisk connects at once with the UUID; the
//! listener asks this controller ([`CallDirectory::admit`]) and gets the caller's number and
//! name and a channel for DTMF (`ChannelDtmfReceived` → [`AgentInput::Dtmf`]). On a
//! Stasis-only listener a UUID this controller did not create is rejected.
//!
//! When the session ends ([`CallDirectory::finished`]): the agent ended the call → `DELETE`
//! the caller; anything else while the caller is still here (the agent failed, a tool asked
//! for a human, the media link dropped, shutdown) → transfer: remove the caller from the
//! bridge, `continue` to the configured context/extension/priority, wait for `StasisEnd`,
//! retry once, then hang up with an error logged. Clean-up runs on `StasisEnd` or
//! `ChannelDestroyed` of the caller and after every transfer or hangup: the session is ended
//! (its agent session with it), the bridge destroyed and the externalMedia channel deleted,
//! each exactly once.
//!
//! **AudioSocket modes 1 and 2.** ARI cannot control those channels (409), so for an unknown
//! UUID the controller only looks up the channel whose `dialplan.app_data` holds it
//! (`GET /channels`, one request per call at most, shared by calls that arrive together) for
//! the caller's number and name; what happens next is decided by the dialplan asking
//! [`NextStore`] over HTTP.
//!
//! The registry is a short-held `std::sync::Mutex` (never across an `.await`); every REST
//! sequence runs in its own task, so a slow Asterisk never stalls the event loop.

use super::directory::{Admission, AdmitFuture, CallDetails, CallDirectory, EXTRA_INPUT_CAPACITY};
use super::next::{Next, NextStore};
use super::{CallSummary, Outcome};
use crate::agent::AgentInput;
use crate::ari::client::{AriClient, AriError, ExternalMedia};
use crate::ari::config::{AriConfig, AriFormat, AriMedia, AriMode};
use crate::ari::events::{self, EventLink, EventsParams, LinkState};
use crate::ari::model::{Channel, Event};
use crate::call::media_rtp::{PortCall, RTP_CALL_QUEUE, RtpCall, RtpPort, RtpPorts};
use crate::call::media_ws::WebSocketPort;
use crate::chanws::client::{self as ws_client, ClientStream};
use crate::fallback::FallbackReason;
use crate::profiles::ProfileChoice;
use crate::rtp::RtpFormat;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

/// The channel variable the examples use to name a Stasis call's profile
/// (`[ari] profile_variable`): `Set(VOICEGATE_PROFILE=sales)` before `Stasis(voicegate)`.
pub const PROFILE_VARIABLE: &str = "VOICEGATE_PROFILE";

/// The called number (the DID) of a channel: its dialplan extension, unless that is the
/// catch-all `s` or empty.
fn called_number(channel: &Channel) -> Option<String> {
    let exten = &channel.dialplan.exten;
    (!exten.is_empty() && exten != "s").then(|| exten.clone())
}

/// After clean-up, a session still running this long (its socket not closed by Asterisk) is
/// ended by voicegate.
const SESSION_END_BACKSTOP: Duration = Duration::from_secs(1);

/// Orphans found after the events link comes up are acted on only if still orphaned this
/// much later.
const ORPHAN_RECHECK: Duration = Duration::from_secs(2);

/// How long a fetched channel list answers lookups before a new one is fetched.
const CHANNEL_CACHE_TTL: Duration = Duration::from_secs(2);

/// First wait before a reconcile pass retries a caller given up on (or follows a pass that
/// could not list the channels); doubled after each such pass, up to
/// [`AriSettings::reconcile_interval`].
pub const RETRY_INITIAL: Duration = Duration::from_secs(2);

/// What a reconcile pass achieved.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// It got Asterisk's channel list.
    listed: bool,
    /// Callers given up on it tried to move or hang up.
    retried: usize,
}

/// What the controller needs from the config.
#[derive(Debug, Clone)]
pub(crate) struct AriSettings {
    /// Stasis application name.
    pub(crate) app: String,
    /// `HOST:PORT` Asterisk connects to for externalMedia.
    pub(crate) external_host: String,
    /// externalMedia format.
    pub(crate) format: AriFormat,
    /// externalMedia transport (AudioSocket or RTP).
    pub(crate) media: AriMedia,
    /// With RTP: the ports and the jitter buffer's bound.
    pub(crate) rtp: Option<RtpSettings>,
    /// With WebSocket: where and how voicegate connects to Asterisk's `/media`.
    pub(crate) websocket: Option<WsSettings>,
    /// Reject AudioSocket connections with a UUID this controller did not create.
    pub(crate) stasis_only: bool,
    /// Transfer target: context.
    pub(crate) transfer_context: String,
    /// Transfer target: extension.
    pub(crate) transfer_extension: String,
    /// Transfer target: priority.
    pub(crate) transfer_priority: u32,
    /// Wait this long for `StasisEnd` after `continue`.
    pub(crate) transfer_confirm: Duration,
    /// Caller lookup may take this long.
    pub(crate) lookup_timeout: Duration,
    /// The channel variable naming a Stasis call's profile (`[ari] profile_variable`).
    pub(crate) profile_variable: Option<String>,
    /// Longest time between two reconcile passes (and the cap of the retry backoff).
    pub(crate) reconcile_interval: Duration,
    /// How long setup waits for the externalMedia channel's own `StasisStart` before it
    /// bridges it (Asterisk puts the channel into the application after answering the REST
    /// request; `addChannel` before that answers 422).
    pub(crate) media_join_timeout: Duration,
}

/// How RTP calls get their sockets (`ari.media = "rtp"`).
#[derive(Debug, Clone)]
pub(crate) struct RtpSettings {
    /// The port range on voicegate's RTP address.
    pub(crate) ports: Arc<RtpPorts>,
    /// The RTP payload format.
    pub(crate) format: RtpFormat,
    /// Most audio the jitter buffer holds.
    pub(crate) jitter_max: Duration,
}

/// How voicegate connects to Asterisk's media WebSockets (`ari.media = "websocket"`).
#[derive(Debug, Clone)]
pub(crate) struct WsSettings {
    /// Asterisk's HTTP server (`ari.url`); the media URL is
    /// [`ws_client::media_url`]`(base, connection id)`.
    pub(crate) base: String,
    /// The upgrade and `MEDIA_START` must come within this long (`ari.request_timeout_ms`).
    pub(crate) handshake_timeout: Duration,
    /// Largest WebSocket message taken, bytes.
    pub(crate) max_message_bytes: usize,
}

/// Largest message taken on an externalMedia WebSocket (20 ms of slin192 is 7680 bytes; as
/// `[websocket] max_message_bytes`' default).
pub(crate) const WS_MAX_MESSAGE_BYTES: usize = 65_536;

/// A WebSocket externalMedia call, for [`crate::call::media_rtp::serve`].
pub(crate) type WsCall = PortCall<WebSocketPort<ClientStream>>;

impl RtpSettings {
    /// From `[ari]`: the address is the host of `external_host` when it is an IP address,
    /// else `listen`'s (the config check makes sure one of them is usable).
    fn from_config(c: &AriConfig, listen: SocketAddr) -> Option<Self> {
        if c.media != AriMedia::Rtp {
            return None;
        }
        let ip = c
            .external_host
            .as_deref()
            .and_then(|h| h.rsplit_once(':'))
            .and_then(|(host, _)| host.trim_matches(['[', ']']).parse().ok())
            .unwrap_or(listen.ip());
        let format = match c.format {
            AriFormat::Alaw => RtpFormat::Alaw,
            AriFormat::Ulaw => RtpFormat::Ulaw,
            // The config check allows only these three with RTP.
            AriFormat::Slin16 | AriFormat::Slin => RtpFormat::Slin16,
        };
        // `AriConfig::validate` checked the range; the default stands in should it not have run.
        let range = c.rtp_port_range().unwrap_or(40_000..=40_999);
        Some(RtpSettings {
            ports: Arc::new(RtpPorts::new(ip, range)),
            format,
            jitter_max: c.rtp_jitter_max(),
        })
    }
}

impl AriSettings {
    /// Settings from `[ari]`; `listen` is the AudioSocket listener, the default external host.
    pub(crate) fn from_config(c: &AriConfig, listen: SocketAddr) -> Self {
        AriSettings {
            media: c.media,
            rtp: RtpSettings::from_config(c, listen),
            websocket: (c.media == AriMedia::Websocket).then(|| WsSettings {
                base: c.url.clone(),
                handshake_timeout: c.request_timeout(),
                max_message_bytes: WS_MAX_MESSAGE_BYTES,
            }),
            app: c.app.clone(),
            external_host: c
                .external_host
                .clone()
                .unwrap_or_else(|| listen.to_string()),
            format: c.format,
            stasis_only: c.stasis_only,
            transfer_context: c.transfer_context.clone(),
            transfer_extension: c.transfer_extension.clone(),
            transfer_priority: c.transfer_priority,
            transfer_confirm: c.transfer_confirm(),
            lookup_timeout: c.lookup_timeout(),
            profile_variable: c.profile_variable.clone(),
            reconcile_interval: c.reconcile_interval(),
            media_join_timeout: c.media_join_timeout(),
        }
    }
}

/// A Stasis caller sent to the operators before any AudioSocket session ran for it (the
/// setup failed, or maintenance / an open breaker routed it there at once): what the records
/// and metrics need to count it as such.
#[derive(Debug, Clone)]
pub struct Unserved {
    /// The call id voicegate issued for the caller.
    pub call_id: Uuid,
    /// The caller's number (ARI `caller.number`).
    pub caller_number: Option<String>,
    /// Why the caller went to the operators.
    pub reason: FallbackReason,
    /// When the caller's `StasisStart` arrived.
    pub started: SystemTime,
    /// From `StasisStart` to the decision.
    pub duration: Duration,
}

/// What the controller asks of, and tells, the rest of voicegate. Both are optional.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Asked once per new Stasis caller, before anything is set up: `Some(reason)`
    /// (maintenance, an open breaker) sends the caller to the operators at once, with no
    /// bridge and no externalMedia channel.
    pub route: Option<Arc<dyn Fn() -> Option<FallbackReason> + Send + Sync>>,
    /// Told about each [`Unserved`] caller, once.
    pub report: Option<Arc<dyn Fn(Unserved) + Send + Sync>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("route", &self.route.is_some())
            .field("report", &self.report.is_some())
            .finish()
    }
}

/// Why setting up a Stasis call failed.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    /// A REST request failed.
    #[error(transparent)]
    Ari(#[from] AriError),
    /// No RTP socket: every port of `ari.rtp_ports` taken, or Asterisk's answer lacked its
    /// RTP address.
    #[error("rtp: {0}")]
    Rtp(std::io::Error),
    /// No media WebSocket: Asterisk's answer lacked the connection id, the connection failed,
    /// or the call could not be queued.
    #[error("websocket: {0}")]
    WebSocket(String),
    /// The externalMedia channel did not enter the application in time.
    #[error("externalMedia channel {channel} sent no StasisStart within {waited_ms} ms")]
    MediaNotJoined {
        /// The externalMedia channel id.
        channel: String,
        /// How long setup waited.
        waited_ms: u64,
    },
}

/// Counters of what the controller did (monotonic).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AriStats {
    /// Stasis calls set up (caller `StasisStart`s handled).
    pub calls: u64,
    /// Bridges created.
    pub bridges_created: u64,
    /// Bridges destroyed (or found already gone).
    pub bridges_destroyed: u64,
    /// externalMedia channels created.
    pub media_created: u64,
    /// externalMedia channels deleted (or found already gone).
    pub media_destroyed: u64,
    /// RTP calls handed to the router (`ari.media = "rtp"`).
    pub rtp_calls: u64,
    /// WebSocket calls connected and handed to the router (`ari.media = "websocket"`).
    pub websocket_calls: u64,
    /// Callers transferred to the operators (confirmed by `StasisEnd`).
    pub transfers: u64,
    /// Transfers that failed twice and ended in a hangup.
    pub transfer_failures: u64,
    /// Callers hung up by voicegate.
    pub hangups: u64,
    /// AudioSocket connections rejected (UUID not issued on a Stasis-only listener).
    pub rejected: u64,
    /// Caller lookups that sent `GET /channels`.
    pub lookups_fetched: u64,
    /// Callers given up on: setup or the final flow failed and so did the hangup (ARI not
    /// answering); each waits in [`Controller::given_up_callers`] for a reconcile pass.
    pub given_up: u64,
    /// Reconcile passes that got Asterisk's channel list.
    pub reconciles: u64,
    /// Callers sent to the operators before any AudioSocket session ran for them.
    pub unserved: u64,
}

#[derive(Default)]
struct Counters {
    calls: AtomicU64,
    bridges_created: AtomicU64,
    bridges_destroyed: AtomicU64,
    media_created: AtomicU64,
    media_destroyed: AtomicU64,
    rtp_calls: AtomicU64,
    websocket_calls: AtomicU64,
    transfers: AtomicU64,
    transfer_failures: AtomicU64,
    hangups: AtomicU64,
    rejected: AtomicU64,
    lookups_fetched: AtomicU64,
    given_up: AtomicU64,
    reconciles: AtomicU64,
    unserved: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Answer, bridge, externalMedia in progress.
    Setup,
    /// Bridged; the agent is talking.
    Live,
    /// `continue` in progress.
    Transferring,
    /// `DELETE` in progress.
    HangingUp,
    /// Cleaned up; waiting only for the session to report.
    Done,
}

struct StasisCall {
    caller: String,
    number: Option<String>,
    name: Option<String>,
    /// The profile the dialplan chose (`Stasis()` argument, `VOICEGATE_PROFILE`) and the
    /// called number.
    profile: ProfileChoice,
    bridge: Option<String>,
    media: Option<String>,
    input: Option<mpsc::Sender<AgentInput>>,
    end: Option<CancellationToken>,
    /// RTP: ends the media channel's reads when the caller's side is gone.
    media_closed: Option<CancellationToken>,
    phase: Phase,
    admitted: bool,
    session_done: bool,
    /// Set when the caller left Stasis (continued, hung up, destroyed).
    left: watch::Sender<bool>,
    /// Set when the externalMedia channel's own `StasisStart` arrived.
    media_joined: watch::Sender<bool>,
    /// Why voicegate sent this caller to the operators, when it did so itself.
    fallback: Option<FallbackReason>,
    /// Reported through [`Hooks::report`]: no session may start for it any more.
    reported: bool,
    /// When the caller's `StasisStart` arrived.
    started: (SystemTime, Instant),
}

/// What a reconcile pass does for a caller given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// `continue` to the operators (then `DELETE` if Asterisk refuses).
    Transfer,
    /// `DELETE` (the agent had ended the call).
    Hangup,
}

/// A caller still in Stasis whose call voicegate gave up on because ARI did not answer.
struct GivenUp {
    call_id: Uuid,
    retry: Retry,
}

#[derive(Default)]
struct Registry {
    calls: HashMap<Uuid, StasisCall>,
    by_channel: HashMap<String, Uuid>,
    /// Caller channel id → the call given up on; left on `StasisEnd`/`ChannelDestroyed` or
    /// when a reconcile pass moved, hung up or no longer found the channel.
    given_up: HashMap<String, GivenUp>,
}

impl Registry {
    fn forget(&mut self, id: Uuid) {
        if let Some(c) = self.calls.remove(&id) {
            self.by_channel.remove(&c.caller);
            if let Some(m) = &c.media {
                self.by_channel.remove(m);
            }
        }
    }
}

struct Inner {
    client: AriClient,
    settings: AriSettings,
    next: Arc<NextStore>,
    registry: Mutex<Registry>,
    cache: tokio::sync::Mutex<Option<(Instant, Vec<Channel>)>>,
    counters: Counters,
    /// Wakes [`Controller::run`] when a caller is given up on, to schedule a retry.
    given_up_wake: tokio::sync::Notify,
    hooks: Hooks,
    /// Where RTP calls go once set up (to [`crate::call::media_rtp::serve`]).
    rtp_calls: Option<mpsc::Sender<RtpCall>>,
    /// Where WebSocket calls go once connected (to [`crate::call::media_rtp::serve`]).
    ws_calls: Option<mpsc::Sender<WsCall>>,
}

/// The ARI controller. Cheap to clone; install it on the AudioSocket server with
/// [`crate::call::route::Router::directory`] and drive it with [`Controller::run`].
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("app", &self.inner.settings.app)
            .finish_non_exhaustive()
    }
}

/// A started ARI integration: the controller, its event link, its tasks.
#[derive(Debug)]
pub struct AriRuntime {
    /// The controller (also the AudioSocket server's [`CallDirectory`]).
    pub controller: Controller,
    /// The events link, for health.
    pub link: EventLink,
    /// The events task and the controller's event loop; they end when `stop` is cancelled.
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
    /// With `ari.media = "rtp"`: the calls the controller set up, for
    /// [`crate::call::media_rtp::serve`].
    pub rtp_calls: Option<mpsc::Receiver<RtpCall>>,
    /// With `ari.media = "websocket"`: the calls the controller connected, for
    /// [`crate::call::media_rtp::serve`].
    pub ws_calls: Option<mpsc::Receiver<WsCall>>,
}

/// Builds the controller from `[ari]` and starts it: in Stasis mode the events WebSocket and
/// the event loop; in lookup mode nothing runs in the background.
///
/// # Errors
/// [`AriError`] if the password cannot be read or the client cannot be built.
pub fn start(
    cfg: &AriConfig,
    listen: SocketAddr,
    next: Arc<NextStore>,
    hooks: Hooks,
    stop: CancellationToken,
) -> Result<AriRuntime, AriError> {
    let password = cfg
        .password
        .resolve()
        .map_err(|e| AriError::Client(format!("ari.password: {e}")))?;
    let client = AriClient::new(&cfg.url, &cfg.username, password, cfg.request_timeout())?;
    let (rtp_tx, rtp_calls) = match cfg.media {
        AriMedia::Rtp if cfg.mode == AriMode::Stasis => {
            let (tx, rx) = mpsc::channel(RTP_CALL_QUEUE);
            (Some(tx), Some(rx))
        }
        _ => (None, None),
    };
    let (ws_tx, ws_calls) = match cfg.media {
        AriMedia::Websocket if cfg.mode == AriMode::Stasis => {
            let (tx, rx) = mpsc::channel(RTP_CALL_QUEUE);
            (Some(tx), Some(rx))
        }
        _ => (None, None),
    };
    let controller = Controller::build(
        client.clone(),
        AriSettings::from_config(cfg, listen),
        next,
        hooks,
        (rtp_tx, ws_tx),
    );
    if cfg.mode == AriMode::Lookup {
        return Ok(AriRuntime {
            controller,
            link: EventLink::disabled(),
            tasks: Vec::new(),
            rtp_calls,
            ws_calls,
        });
    }
    let (tx, rx) = mpsc::channel(events::EVENT_QUEUE);
    let params = EventsParams {
        initial: cfg.reconnect_initial(),
        max: cfg.reconnect_max(),
        ping: cfg.ping_interval(),
        stable: cfg.reconnect_max().max(Duration::from_secs(5)),
        connect_timeout: cfg.request_timeout().max(Duration::from_secs(2)),
    };
    let (events_task, link) = events::spawn(client, cfg.app.clone(), params, tx, stop.clone());
    let run = tokio::spawn(controller.clone().run(rx, link.state.clone(), stop));
    Ok(AriRuntime {
        controller,
        link,
        tasks: vec![events_task, run],
        rtp_calls,
        ws_calls,
    })
}

impl Controller {
    /// A controller using `client`, with [`Hooks`] for routing and reporting; dispositions of
    /// the calls it sees go to `next`, RTP calls to `queues.0` and WebSocket calls to
    /// `queues.1`.
    fn build(
        client: AriClient,
        settings: AriSettings,
        next: Arc<NextStore>,
        hooks: Hooks,
        queues: (Option<mpsc::Sender<RtpCall>>, Option<mpsc::Sender<WsCall>>),
    ) -> Self {
        let (rtp_calls, ws_calls) = queues;
        Controller {
            inner: Arc::new(Inner {
                client,
                settings,
                next,
                registry: Mutex::new(Registry::default()),
                cache: tokio::sync::Mutex::new(None),
                counters: Counters::default(),
                given_up_wake: tokio::sync::Notify::new(),
                hooks,
                rtp_calls,
                ws_calls,
            }),
        }
    }

    /// The REST client.
    pub fn client(&self) -> &AriClient {
        &self.inner.client
    }

    /// What it did so far.
    pub fn stats(&self) -> AriStats {
        let c = &self.inner.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AriStats {
            calls: l(&c.calls),
            bridges_created: l(&c.bridges_created),
            bridges_destroyed: l(&c.bridges_destroyed),
            media_created: l(&c.media_created),
            media_destroyed: l(&c.media_destroyed),
            rtp_calls: l(&c.rtp_calls),
            websocket_calls: l(&c.websocket_calls),
            transfers: l(&c.transfers),
            transfer_failures: l(&c.transfer_failures),
            hangups: l(&c.hangups),
            rejected: l(&c.rejected),
            lookups_fetched: l(&c.lookups_fetched),
            given_up: l(&c.given_up),
            reconciles: l(&c.reconciles),
            unserved: l(&c.unserved),
        }
    }

    /// Callers given up on that are still waiting for a reconcile pass to move or hang them
    /// up (0 when ARI answered every time).
    pub fn given_up_callers(&self) -> usize {
        self.registry().given_up.len()
    }

    /// Remembers a caller whose call failed because ARI did not answer, and wakes the event
    /// loop to retry it (see [`Controller::run`]).
    fn give_up(&self, id: Uuid, caller: &str, retry: Retry) {
        bump(&self.inner.counters.given_up);
        self.registry()
            .given_up
            .insert(caller.to_owned(), GivenUp { call_id: id, retry });
        self.inner.given_up_wake.notify_one();
    }

    /// Waits until no Stasis call is tracked any more (every transfer, hangup and clean-up
    /// finished), at most `limit`; true if it got there. Call it on shutdown after the
    /// AudioSocket server stopped, so callers whose sessions ended are not left in Stasis.
    pub async fn settle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.tracked_calls() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                warn!(
                    calls = self.tracked_calls(),
                    "ari: calls still tracked at shutdown"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stasis calls it still tracks (0 once every call is cleaned up and reported).
    pub fn tracked_calls(&self) -> usize {
        self.registry().calls.len()
    }

    /// Moves call `id` into the final `phase` (transferring or hanging up) and reads what the
    /// flow needs from it, unless it is gone or another final flow already claimed it.
    fn claim<T>(&self, id: Uuid, phase: Phase, read: impl FnOnce(&StasisCall) -> T) -> Option<T> {
        let mut reg = self.registry();
        let call = reg.calls.get_mut(&id)?;
        if matches!(
            call.phase,
            Phase::Transferring | Phase::HangingUp | Phase::Done
        ) {
            return None;
        }
        call.phase = phase;
        Some(read(call))
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A poisoned lock means a panic elsewhere mid-update; the maps are still consistent
        // enough to clean up calls, which matters more than stopping.
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the event loop until `stop` is cancelled or the events channel closes, and
    /// schedules the reconcile passes, one at a time. A pass lists Asterisk's channels, cleans
    /// up calls whose caller is gone (a missed `StasisEnd`), retries the callers given up on
    /// ([`Controller::given_up_callers`]: `continue` to the operators, or `DELETE` if the
    /// agent had ended the call) and hands orphans to the operators. Passes run:
    /// - each time the events link comes up (first connect and every reconnect: events may
    ///   have been missed);
    /// - every [`AriSettings::reconcile_interval`] in any case, whatever the link does (a
    ///   `StasisEnd` can be lost on a link that never reported itself down);
    /// - while a caller given up on waits, or after a pass that could not list the channels:
    ///   [`RETRY_INITIAL`] after the give-up, then doubling per pass up to the interval. Each
    ///   pass costs one `GET /channels` while ARI does not answer, so a hung Asterisk sees one
    ///   request per period, never a loop.
    pub(crate) async fn run(
        self,
        mut events: mpsc::Receiver<Event>,
        mut link: watch::Receiver<LinkState>,
        stop: CancellationToken,
    ) {
        let interval = self.inner.settings.reconcile_interval;
        let mut backoff = crate::backoff::Backoff::new(RETRY_INITIAL.min(interval), interval);
        let mut was_up = false;
        let mut lost = false;
        let mut pass: Option<tokio::task::JoinHandle<Pass>> = None;
        let mut wanted = false;
        let mut due = Instant::now() + interval;
        loop {
            if wanted && pass.is_none() {
                wanted = false;
                let me = self.clone();
                pass = Some(tokio::spawn(async move { me.reconcile().await }));
            }
            tokio::select! {
                () = stop.cancelled() => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.handle(ev),
                    None => break,
                },
                changed = link.changed() => {
                    if changed.is_err() {
                        // The events task is gone; keep serving what arrives.
                        link = watch::channel(LinkState::Down).1;
                        continue;
                    }
                    let state = *link.borrow_and_update();
                    match state {
                        LinkState::Up => {
                            if !was_up || lost {
                                wanted = true;
                            }
                            was_up = true;
                            lost = false;
                        }
                        LinkState::Down => lost = true,
                        _ => {}
                    }
                }
                () = self.inner.given_up_wake.notified() => {
                    due = due.min(Instant::now() + backoff.peek());
                }
                () = tokio::time::sleep_until(due), if pass.is_none() => wanted = true,
                done = async {
                    match pass.as_mut() {
                        Some(p) => p.await,
                        None => std::future::pending().await,
                    }
                }, if pass.is_some() => {
                    pass = None;
                    let done = done.unwrap_or(Pass { listed: false, retried: 0 });
                    if done.listed && self.given_up_callers() == 0 {
                        backoff.reset();
                        due = Instant::now() + interval;
                    } else {
                        if !done.listed || done.retried > 0 {
                            // This pass was the retry and it failed: wait longer this time.
                            backoff.next_wait();
                        }
                        let wait = backoff.peek();
                        due = Instant::now() + wait;
                        debug!(wait_ms = wait.as_millis() as u64, listed = done.listed, "ari: next reconcile pass");
                    }
                }
            }
        }
        if let Some(p) = pass {
            p.abort();
        }
    }

    /// Handles one event (REST work is spawned).
    pub(crate) fn handle(&self, ev: Event) {
        match ev {
            Event::StasisStart { args, channel } => {
                let known = {
                    let mut reg = self.registry();
                    if let Some(&id) = reg.by_channel.get(&channel.id) {
                        // Setup registered our externalMedia channel before its event came.
                        if let Some(c) = reg.calls.get_mut(&id) {
                            if c.caller != channel.id {
                                c.media_joined.send_replace(true);
                            }
                        }
                        true
                    } else if let Some(id) = args
                        .first()
                        .and_then(|a| Uuid::parse_str(a).ok())
                        .filter(|id| reg.calls.contains_key(id))
                    {
                        // Our own externalMedia channel entering the app: it can be bridged
                        // now (before this, `addChannel` answers 422).
                        reg.by_channel.insert(channel.id.clone(), id);
                        if let Some(c) = reg.calls.get_mut(&id) {
                            c.media.get_or_insert_with(|| channel.id.clone());
                            c.media_joined.send_replace(true);
                        }
                        true
                    } else {
                        false
                    }
                };
                if !known {
                    // A caller given up on that entered the app again is a new call.
                    self.registry().given_up.remove(&channel.id);
                    let id = self.register(&channel, &args);
                    let me = self.clone();
                    tokio::spawn(async move { me.setup(id, channel).await });
                }
            }
            Event::StasisEnd { channel } | Event::ChannelDestroyed { channel, .. } => {
                self.channel_left(&channel.id);
            }
            Event::ChannelDtmfReceived { digit, channel, .. } => {
                let Some(d) = digit.chars().next() else {
                    return;
                };
                let reg = self.registry();
                if let Some(call) = reg
                    .by_channel
                    .get(&channel.id)
                    .and_then(|id| reg.calls.get(id))
                {
                    if call.caller == channel.id {
                        if let Some(tx) = &call.input {
                            let _ = tx.try_send(AgentInput::Dtmf(d));
                        }
                    }
                }
            }
            Event::ChannelHangupRequest { channel, cause } => {
                debug!(channel = %channel.id, cause, "hangup requested");
            }
            Event::ChannelEnteredBridge { bridge, channel } => {
                debug!(channel = %channel.id, bridge = %bridge.id, "channel entered bridge");
            }
            Event::BridgeDestroyed { bridge } => {
                let mut reg = self.registry();
                for call in reg.calls.values_mut() {
                    if call.bridge.as_deref() == Some(bridge.id.as_str()) {
                        call.bridge = None;
                        bump(&self.inner.counters.bridges_destroyed);
                    }
                }
            }
            Event::Other => {}
        }
    }

    /// A channel left Stasis or was destroyed.
    fn channel_left(&self, channel: &str) {
        let id = {
            let mut reg = self.registry();
            if let Some(g) = reg.given_up.remove(channel) {
                info!(call_id = %g.call_id, channel, "caller given up on has left stasis");
            }
            let Some(&id) = reg.by_channel.get(channel) else {
                return;
            };
            let Some(call) = reg.calls.get_mut(&id) else {
                return;
            };
            if call.caller == channel {
                call.left.send_replace(true);
                Some(id)
            } else {
                // The externalMedia channel: it is gone, nothing to delete.
                if call.media.as_deref() == Some(channel) {
                    call.media = None;
                    bump(&self.inner.counters.media_destroyed);
                }
                reg.by_channel.remove(channel);
                None
            }
        };
        if let Some(id) = id {
            let me = self.clone();
            tokio::spawn(async move { me.cleanup(id).await });
        }
    }

    /// Registers a new caller under a fresh call id, before any `.await`, so that events
    /// for it (a quick hangup) find it.
    /// The first `Stasis()` argument (`Stasis(voicegate,sales)`) names the call's profile.
    fn register(&self, channel: &Channel, args: &[String]) -> Uuid {
        let id = Uuid::new_v4();
        let profile = ProfileChoice {
            profile: args.first().filter(|a| !a.is_empty()).cloned(),
            caller_number: channel.caller_number(),
            caller_name: channel.caller_name(),
            called_number: called_number(channel),
            ..ProfileChoice::default()
        };
        bump(&self.inner.counters.calls);
        let mut reg = self.registry();
        reg.by_channel.insert(channel.id.clone(), id);
        reg.calls.insert(
            id,
            StasisCall {
                caller: channel.id.clone(),
                number: channel.caller_number(),
                name: channel.caller_name(),
                profile: profile.bounded(),
                bridge: None,
                media: None,
                input: None,
                end: None,
                media_closed: None,
                phase: Phase::Setup,
                admitted: false,
                session_done: false,
                left: watch::channel(false).0,
                media_joined: watch::channel(false).0,
                fallback: None,
                reported: false,
                started: (SystemTime::now(), Instant::now()),
            },
        );
        id
    }

    async fn setup(self, id: Uuid, channel: Channel) {
        if let Some(reason) = self.inner.hooks.route.as_ref().and_then(|r| r()) {
            info!(call_id = %id, channel = %channel.id, %reason, "stasis call sent straight to the operators");
            self.send_to_operators(id, reason).await;
            return;
        }
        self.read_profile_variable(id, &channel).await;
        info!(call_id = %id, channel = %channel.id, "stasis call: setting up");
        match self.bridge_media(id, &channel).await {
            Ok(()) => debug!(call_id = %id, "stasis call bridged"),
            Err(SetupError::Ari(e)) if e.is_not_found() => {
                info!(call_id = %id, error = %e, "caller gone during setup");
                self.cleanup(id).await;
            }
            Err(e) => {
                warn!(call_id = %id, error = %e, "stasis setup failed; sending the caller to the operators");
                self.send_to_operators(id, FallbackReason::SetupFailed(e.to_string()))
                    .await;
            }
        }
    }

    /// Without a `Stasis()` argument, the channel variable `[ari] profile_variable` (when
    /// set) names the call's profile (`GET /channels/{id}/variable`); unset, empty or
    /// unanswered within the lookup timeout: none.
    async fn read_profile_variable(&self, id: Uuid, channel: &Channel) {
        let Some(name) = &self.inner.settings.profile_variable else {
            return;
        };
        if self.read(id, |call| call.profile.profile.is_some()) != Some(false) {
            return;
        }
        let c = &self.inner.client;
        let asked = c.variable(&channel.id, name);
        let value = match timeout(self.inner.settings.lookup_timeout, asked).await {
            Ok(Ok(v)) if !v.is_empty() => v,
            Ok(Err(e)) if !e.is_not_found() => {
                debug!(call_id = %id, error = %e, "cannot read {name}");
                return;
            }
            _ => return,
        };
        debug!(call_id = %id, profile = %value, "profile from {name}");
        self.keep(id, |call| call.profile.profile = Some(value));
    }

    /// Answer, bridge, externalMedia, wait for its `StasisStart`, bridge both. `Ok` also when
    /// the caller left meanwhile (the clean-up is the caller's `StasisEnd`'s).
    async fn bridge_media(&self, id: Uuid, channel: &Channel) -> Result<(), SetupError> {
        let c = &self.inner.client;
        let s = &self.inner.settings;
        let Some((mut joined, mut left)) = self.read(id, |call| {
            (call.media_joined.subscribe(), call.left.subscribe())
        }) else {
            return Ok(());
        };
        c.answer(&channel.id).await?;
        let bridge = c.create_bridge(&format!("voicegate-{id}")).await?;
        bump(&self.inner.counters.bridges_created);
        if !self.keep(id, |call| call.bridge = Some(bridge.id.clone())) {
            self.destroy_bridge(&bridge.id).await;
            return Ok(());
        }
        let data = id.to_string();
        // RTP: this call's own UDP socket is where Asterisk sends.
        let rtp = match &s.rtp {
            Some(r) => {
                let sock = r.ports.bind().map_err(SetupError::Rtp)?;
                let at = sock.local_addr().map_err(SetupError::Rtp)?;
                Some((sock, at.to_string()))
            }
            None => None,
        };
        let (encapsulation, transport) = s.media.encapsulation();
        let websocket = s.media == AriMedia::Websocket;
        let media = c
            .external_media(&ExternalMedia {
                app: &s.app,
                // WebSocket: Asterisk waits for voicegate to connect (no host of ours).
                external_host: match &rtp {
                    _ if websocket => "",
                    Some((_, at)) => at,
                    None => &s.external_host,
                },
                encapsulation,
                transport,
                format: s.format.as_str(),
                data: &data,
                connection_type: websocket.then_some("server"),
            })
            .await?;
        bump(&self.inner.counters.media_created);
        let media_id = media.id.clone();
        let kept = self.keep(id, |call| {
            call.media = Some(media_id.clone());
        });
        self.registry().by_channel.insert(media.id.clone(), id);
        if !kept {
            self.delete_media(&media.id).await;
            return Ok(());
        }
        if let Some((sock, _)) = rtp {
            self.start_rtp(id, sock, &media)?;
        }
        if websocket {
            // The channel answers, and enters the application, once voicegate is connected.
            self.start_websocket(id, &media).await?;
        }
        self.join_and_bridge(id, channel, &bridge.id, &media, &mut joined, &mut left)
            .await
    }

    /// Waits for the externalMedia channel's `StasisStart` (or the caller leaving), then
    /// bridges it with the caller and marks the call live.
    async fn join_and_bridge(
        &self,
        id: Uuid,
        channel: &Channel,
        bridge: &str,
        media: &Channel,
        joined: &mut watch::Receiver<bool>,
        left: &mut watch::Receiver<bool>,
    ) -> Result<(), SetupError> {
        let c = &self.inner.client;
        let s = &self.inner.settings;
        // Asterisk answers the REST request before the new channel has entered the
        // application; bridging it before its own `StasisStart` fails with 422.
        let waited = Instant::now();
        tokio::select! {
            r = timeout(s.media_join_timeout, joined.wait_for(|j| *j)) => {
                if !matches!(r, Ok(Ok(_))) {
                    return Err(SetupError::MediaNotJoined {
                        channel: media.id.clone(),
                        waited_ms: s.media_join_timeout.as_millis() as u64,
                    });
                }
            }
            _ = left.wait_for(|l| *l) => return Ok(()),
        }
        debug!(call_id = %id, channel = %media.id, waited_ms = waited.elapsed().as_millis() as u64, "externalMedia channel in stasis");
        c.add_channels(bridge, &[&channel.id, &media.id]).await?;
        self.keep(id, |call| {
            if call.phase == Phase::Setup {
                call.phase = Phase::Live;
            }
        });
        Ok(())
    }

    /// Hands the RTP call to the router: Asterisk's RTP address from the externalMedia
    /// answer, the port over `sock`. If no session admits it in time (the guard or the call
    /// limits refused it), the caller goes to the operators.
    fn start_rtp(
        &self,
        id: Uuid,
        sock: tokio::net::UdpSocket,
        media: &Channel,
    ) -> Result<(), SetupError> {
        let s = &self.inner.settings;
        let (Some(r), Some(tx)) = (&s.rtp, &self.inner.rtp_calls) else {
            return Err(SetupError::Rtp(std::io::Error::other("no RTP call queue")));
        };
        let peer = media.unicast_rtp_local().ok_or_else(|| {
            SetupError::Rtp(std::io::Error::other(
                "externalMedia answer has no UNICASTRTP_LOCAL_ADDRESS/PORT",
            ))
        })?;
        let closed = CancellationToken::new();
        if !self.keep(id, |call| call.media_closed = Some(closed.clone())) {
            // Cleaned up meanwhile (the caller left): no session; the socket closes here.
            return Ok(());
        }
        let port = RtpPort::new(sock, peer, r.format, r.jitter_max, closed);
        debug!(call_id = %id, %peer, "rtp call handed to the router");
        tx.try_send(RtpCall {
            call_id: id,
            peer,
            port,
            choice: None,
        })
        .map_err(|_| SetupError::Rtp(std::io::Error::other("RTP call queue full or closed")))?;
        bump(&self.inner.counters.rtp_calls);
        self.watch_admission(id, "rtp");
        Ok(())
    }

    /// If no session admits call `id` within `ari.media_join_timeout` (the guard or the call
    /// limits refused its media), sends the caller to the operators.
    fn watch_admission(&self, id: Uuid, transport: &'static str) {
        let me = self.clone();
        let wait = self.inner.settings.media_join_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let unadmitted = me.read(id, |c| !c.admitted && c.phase != Phase::Done);
            if unadmitted == Some(true) {
                warn!(call_id = %id, transport, "media not admitted (guard or limits); sending the caller to the operators");
                let why = FallbackReason::SetupFailed(format!("{transport} media not admitted"));
                me.send_to_operators(id, why).await;
            }
        });
    }

    /// Connects to the `WebSocket/INCOMING` channel Asterisk created (its connection id from
    /// the externalMedia answer's `channelvars`) and hands the call to the router. If no
    /// session admits it in time, the caller goes to the operators.
    async fn start_websocket(&self, id: Uuid, media: &Channel) -> Result<(), SetupError> {
        let s = &self.inner.settings;
        let (Some(w), Some(tx)) = (&s.websocket, &self.inner.ws_calls) else {
            return Err(SetupError::WebSocket("no WebSocket call queue".into()));
        };
        let conn = media
            .channelvars
            .get(ws_client::CONNECTION_ID_VARIABLE)
            .ok_or_else(|| {
                SetupError::WebSocket(format!(
                    "externalMedia answer has no {}",
                    ws_client::CONNECTION_ID_VARIABLE
                ))
            })?;
        let url = ws_client::media_url(&w.base, conn)
            .map_err(|e| SetupError::WebSocket(e.to_string()))?;
        let out = match ws_client::connect(&url, w.handshake_timeout, w.max_message_bytes).await {
            Ok(out) => out,
            Err(e) => {
                ::metrics::counter!(crate::health::metrics::HANDSHAKE_FAILURES, "reason" => e.label())
                    .increment(1);
                return Err(SetupError::WebSocket(format!("{url}: {e}")));
            }
        };
        let peer = out.peer;
        let port = WebSocketPort::new(out.channel)
            .map_err(|format| SetupError::WebSocket(format!("media in {format}, not slin")))?;
        if self.read(id, |c| c.phase == Phase::Done) != Some(false) {
            // Cleaned up meanwhile (the caller left): no session; the socket closes here.
            return Ok(());
        }
        debug!(call_id = %id, %peer, connection_id = %conn, "websocket media connected; call handed to the router");
        tx.try_send(WsCall {
            call_id: id,
            peer,
            port,
            choice: None,
        })
        .map_err(|_| SetupError::WebSocket("call queue full or closed".into()))?;
        bump(&self.inner.counters.websocket_calls);
        self.watch_admission(id, "websocket");
        Ok(())
    }

    /// Reads from the call if it is still tracked.
    fn read<T>(&self, id: Uuid, f: impl FnOnce(&StasisCall) -> T) -> Option<T> {
        self.registry().calls.get(&id).map(f)
    }

    /// Sends the caller to the operators because of `reason`, and makes sure the call is
    /// counted as such: through its session's summary if one ran, else through
    /// [`Hooks::report`].
    async fn send_to_operators(&self, id: Uuid, reason: FallbackReason) {
        let unserved = {
            let mut reg = self.registry();
            let Some(call) = reg.calls.get_mut(&id) else {
                return;
            };
            call.fallback.get_or_insert(reason.clone());
            if call.admitted || call.reported {
                None
            } else {
                call.reported = true;
                Some(Unserved {
                    call_id: id,
                    caller_number: call.number.clone(),
                    reason,
                    started: call.started.0,
                    duration: call.started.1.elapsed(),
                })
            }
        };
        if let Some(u) = unserved {
            bump(&self.inner.counters.unserved);
            if let Some(report) = &self.inner.hooks.report {
                report(u);
            }
        }
        self.transfer_flow(id).await;
    }

    /// Applies `f` to the call if it is still wanted (not cleaned up, caller still here).
    fn keep(&self, id: Uuid, f: impl FnOnce(&mut StasisCall)) -> bool {
        let mut reg = self.registry();
        match reg.calls.get_mut(&id) {
            Some(call) if call.phase != Phase::Done => {
                f(call);
                true
            }
            _ => false,
        }
    }

    async fn destroy_bridge(&self, bridge: &str) {
        match self.inner.client.destroy_bridge(bridge).await {
            Ok(()) => bump(&self.inner.counters.bridges_destroyed),
            Err(e) if e.is_not_found() => bump(&self.inner.counters.bridges_destroyed),
            Err(e) => warn!(bridge, error = %e, "cannot destroy bridge"),
        }
    }

    async fn delete_media(&self, media: &str) {
        match self.inner.client.hangup(media).await {
            Ok(()) => bump(&self.inner.counters.media_destroyed),
            Err(e) if e.is_not_found() => bump(&self.inner.counters.media_destroyed),
            Err(e) => warn!(channel = media, error = %e, "cannot delete externalMedia channel"),
        }
        self.registry().by_channel.remove(media);
    }

    /// Ends the call's session and removes its bridge and externalMedia channel; idempotent.
    async fn cleanup(&self, id: Uuid) {
        let (bridge, media, end) = {
            let mut reg = self.registry();
            let Some(call) = reg.calls.get_mut(&id) else {
                return;
            };
            call.phase = Phase::Done;
            call.input = None;
            if let Some(closed) = call.media_closed.take() {
                // RTP has no socket for Asterisk to close: the caller's side ends here.
                closed.cancel();
            }
            let taken = (call.bridge.take(), call.media.take(), call.end.take());
            if call.session_done || !call.admitted {
                if !call.admitted {
                    // A connection may still arrive for it; it will be rejected or looked up.
                    debug!(call_id = %id, "cleaned up before its media connected");
                }
                reg.forget(id);
            }
            taken
        };
        if let Some(b) = bridge {
            self.destroy_bridge(&b).await;
        }
        if let Some(m) = media {
            self.delete_media(&m).await;
        }
        // Deleting the externalMedia channel makes Asterisk close the AudioSocket, which ends
        // the session and its agent session. Should that not happen, end it from here.
        if let Some(end) = end {
            tokio::spawn(async move {
                tokio::time::sleep(SESSION_END_BACKSTOP).await;
                end.cancel();
            });
        }
        debug!(call_id = %id, "stasis call cleaned up");
    }

    /// Moves the caller to the operators: remove from the bridge, `continue`, wait for
    /// `StasisEnd`; once more if that fails; then hang up. Never leaves the caller in silence.
    async fn transfer_flow(&self, id: Uuid) {
        let s = &self.inner.settings;
        let c = &self.inner.client;
        let Some((caller, bridge, mut left)) = self.claim(id, Phase::Transferring, |call| {
            (
                call.caller.clone(),
                call.bridge.clone(),
                call.left.subscribe(),
            )
        }) else {
            return;
        };
        if *left.borrow() {
            self.cleanup(id).await;
            return;
        }
        if let Some(b) = &bridge {
            if let Err(e) = c.remove_channel(b, &caller).await {
                debug!(call_id = %id, error = %e, "remove from bridge before transfer");
            }
        }
        for attempt in 1..=2u32 {
            match c
                .continue_in_dialplan(
                    &caller,
                    &s.transfer_context,
                    &s.transfer_extension,
                    s.transfer_priority,
                )
                .await
            {
                Ok(()) => {
                    if timeout(s.transfer_confirm, left.wait_for(|l| *l))
                        .await
                        .is_ok()
                    {
                        bump(&self.inner.counters.transfers);
                        info!(call_id = %id, context = %s.transfer_context, "caller transferred to the operators");
                        self.cleanup(id).await;
                        return;
                    }
                    warn!(call_id = %id, attempt, "transfer not confirmed by StasisEnd");
                }
                Err(e) if e.is_not_found() => {
                    info!(call_id = %id, "caller gone before the transfer");
                    self.cleanup(id).await;
                    return;
                }
                Err(AriError::NotInStasis { .. }) if attempt > 1 => {
                    // The first continue did take the caller out of Stasis (its StasisEnd was
                    // missed): the dialplan has the caller now.
                    bump(&self.inner.counters.transfers);
                    self.cleanup(id).await;
                    return;
                }
                Err(e) => warn!(call_id = %id, attempt, error = %e, "transfer failed"),
            }
        }
        error!(call_id = %id, "transfer to the operators failed twice; hanging up the caller");
        bump(&self.inner.counters.transfer_failures);
        match c.hangup(&caller).await {
            Ok(()) => bump(&self.inner.counters.hangups),
            Err(e) if e.is_not_found() => {}
            Err(e) => {
                error!(call_id = %id, error = %e, "cannot hang up the caller either; retrying the transfer when ARI answers");
                self.give_up(id, &caller, Retry::Transfer);
            }
        }
        self.cleanup(id).await;
    }

    async fn hangup_flow(&self, id: Uuid) {
        let Some(caller) = self.claim(id, Phase::HangingUp, |call| call.caller.clone()) else {
            return;
        };
        let mut done = false;
        for attempt in 1..=2u32 {
            match self.inner.client.hangup(&caller).await {
                Ok(()) => {
                    bump(&self.inner.counters.hangups);
                    done = true;
                    break;
                }
                Err(e) if e.is_not_found() => {
                    done = true;
                    break;
                }
                Err(e) => warn!(call_id = %id, attempt, error = %e, "hangup failed"),
            }
        }
        if !done {
            error!(call_id = %id, "cannot hang up the caller; retrying when ARI answers");
            self.give_up(id, &caller, Retry::Hangup);
        }
        self.cleanup(id).await;
    }

    /// One reconcile pass (scheduled by [`Controller::run`]). With Asterisk's channels in
    /// hand it:
    /// 1. cleans up tracked calls whose caller channel no longer exists (their `StasisEnd`
    ///    was missed); only calls tracked before the list was asked for, so a caller whose
    ///    `StasisStart` arrives meanwhile is not taken for gone;
    /// 2. retries the callers given up on ([`Controller::given_up_callers`]): `continue` to
    ///    the operators (or `DELETE` if that was the plan, or if Asterisk refuses the
    ///    `continue`); one still unanswered stays for the next pass, one gone or out of the
    ///    app is forgotten;
    /// 3. deals with orphans, channels and bridges of this application that no call owns
    ///    (left by a previous voicegate run, by a link lost mid-setup, or by a clean-up ARI
    ///    did not answer): an orphaned caller goes to the operators, an orphaned
    ///    externalMedia channel is deleted, an orphaned `voicegate-` bridge destroyed.
    ///    Orphans are confirmed by a second look [`ORPHAN_RECHECK`] later, so a call whose
    ///    `StasisStart` is still on its way is never mistaken for one.
    async fn reconcile(&self) -> Pass {
        // Taken before the list is asked for (see step 1).
        let tracked = self.tracked_callers();
        let given_up: Vec<(String, Uuid, Retry)> = self
            .registry()
            .given_up
            .iter()
            .map(|(ch, g)| (ch.clone(), g.call_id, g.retry))
            .collect();
        let channels = match self.inner.client.channels().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, given_up = given_up.len(), "reconcile: cannot list channels");
                return Pass {
                    listed: false,
                    retried: given_up.len(),
                };
            }
        };
        bump(&self.inner.counters.reconciles);
        self.clean_up_gone(&tracked, &channels).await;
        for (channel, call_id, retry) in &given_up {
            self.retry_given_up(&channels, channel, *call_id, *retry)
                .await;
        }
        let given_up: Vec<String> = given_up.into_iter().map(|(ch, _, _)| ch).collect();
        self.deal_with_orphans(&channels, &given_up).await;
        Pass {
            listed: true,
            retried: given_up.len(),
        }
    }

    /// The calls not yet done, as `(call id, caller channel id)`.
    fn tracked_callers(&self) -> Vec<(Uuid, String)> {
        self.registry()
            .calls
            .iter()
            .filter(|(_, c)| c.phase != Phase::Done)
            .map(|(id, c)| (*id, c.caller.clone()))
            .collect()
    }

    /// Step 1 of [`Controller::reconcile`]: cleans up each of the `tracked` calls whose caller
    /// is not among `channels` (and whose call is not done meanwhile).
    async fn clean_up_gone(&self, tracked: &[(Uuid, String)], channels: &[Channel]) {
        let gone: Vec<Uuid> = tracked
            .iter()
            .filter(|(_, caller)| !channels.iter().any(|ch| &ch.id == caller))
            .map(|(id, _)| *id)
            .collect();
        if !gone.is_empty() {
            info!(
                gone = gone.len(),
                "reconcile: callers gone without a StasisEnd seen"
            );
        }
        for id in gone {
            if let Some(c) = self.registry().calls.get(&id) {
                if c.phase == Phase::Done {
                    continue;
                }
                c.left.send_replace(true);
            }
            self.cleanup(id).await;
        }
    }

    /// The orphans among `list` and `bridges`: channels of this application that no call
    /// owns and that are not (or were not at the start of this pass: `given_up`) given up
    /// on, and `voicegate-` bridges no call owns, as `(channels, bridge ids)`.
    fn orphans(
        &self,
        list: &[Channel],
        bridges: &[crate::ari::model::Bridge],
        given_up: &[String],
    ) -> (Vec<Channel>, Vec<String>) {
        let reg = self.registry();
        let chans: Vec<Channel> = list
            .iter()
            .filter(|ch| {
                self.in_our_app(ch)
                    && !reg.by_channel.contains_key(&ch.id)
                    && !reg.given_up.contains_key(&ch.id)
                    && !given_up.contains(&ch.id)
            })
            .cloned()
            .collect();
        let owned: Vec<&String> = reg
            .calls
            .values()
            .filter_map(|c| c.bridge.as_ref())
            .collect();
        let brs: Vec<String> = bridges
            .iter()
            .filter(|b| b.name.starts_with("voicegate-") && !owned.contains(&&b.id))
            .map(|b| b.id.clone())
            .collect();
        (chans, brs)
    }

    /// Step 3 of [`Controller::reconcile`]: finds the orphans, looks again
    /// [`ORPHAN_RECHECK`] later, and acts on those orphaned both times: an externalMedia
    /// channel is deleted, a caller sent to the operators, a bridge destroyed.
    async fn deal_with_orphans(&self, channels: &[Channel], given_up: &[String]) {
        let c = &self.inner.client;
        let bridges = c.bridges().await.unwrap_or_default();
        let (first_chans, first_brs) = self.orphans(channels, &bridges, given_up);
        if first_chans.is_empty() && first_brs.is_empty() {
            return;
        }
        tokio::time::sleep(ORPHAN_RECHECK).await;
        let (Ok(channels), Ok(bridges)) = (c.channels().await, c.bridges().await) else {
            return;
        };
        let (chans, brs) = self.orphans(&channels, &bridges, given_up);
        for ch in chans
            .iter()
            .filter(|ch| first_chans.iter().any(|f| f.id == ch.id))
        {
            if ch.name.starts_with("AudioSocket/") || ch.name.starts_with("WebSocket/") {
                info!(channel = %ch.id, "reconcile: deleting an orphaned externalMedia channel");
                self.delete_media(&ch.id).await;
                continue;
            }
            self.orphan_to_operators(ch).await;
        }
        for b in brs.iter().filter(|b| first_brs.contains(b)) {
            info!(bridge = %b, "reconcile: destroying an orphaned bridge");
            self.destroy_bridge(b).await;
        }
    }

    /// An orphaned caller goes to the operators (`continue`); hung up if Asterisk refuses.
    async fn orphan_to_operators(&self, ch: &Channel) {
        let c = &self.inner.client;
        warn!(channel = %ch.id, "reconcile: caller in the stasis app with no call; sending to the operators");
        let s = &self.inner.settings;
        let moved = c
            .continue_in_dialplan(
                &ch.id,
                &s.transfer_context,
                &s.transfer_extension,
                s.transfer_priority,
            )
            .await;
        if let Err(e) = moved {
            if !e.is_not_found() {
                error!(channel = %ch.id, error = %e, "orphaned caller cannot be transferred; hanging up");
                let _ = c.hangup(&ch.id).await;
            }
        } else {
            bump(&self.inner.counters.transfers);
        }
    }

    /// Step 2 of [`Controller::reconcile`] for one caller given up on: forgotten once it is
    /// gone, out of the app, transferred or hung up; kept while ARI still does not answer.
    async fn retry_given_up(&self, channels: &[Channel], channel: &str, id: Uuid, retry: Retry) {
        let c = &self.inner.client;
        let forget = || {
            self.registry().given_up.remove(channel);
        };
        match channels.iter().find(|ch| ch.id == channel) {
            None => {
                info!(call_id = %id, channel, "reconcile: caller given up on is gone");
                return forget();
            }
            Some(ch) if !self.in_our_app(ch) => {
                info!(call_id = %id, channel, "reconcile: caller given up on has left stasis");
                return forget();
            }
            Some(_) => {}
        }
        if !self.registry().given_up.contains_key(channel) {
            // Its StasisEnd arrived while this pass ran.
            return;
        }
        if retry == Retry::Transfer {
            let s = &self.inner.settings;
            match c
                .continue_in_dialplan(
                    channel,
                    &s.transfer_context,
                    &s.transfer_extension,
                    s.transfer_priority,
                )
                .await
            {
                Ok(()) => {
                    bump(&self.inner.counters.transfers);
                    warn!(call_id = %id, channel, context = %s.transfer_context,
                        "reconcile: caller given up on is transferred to the operators now that ARI answers");
                    return forget();
                }
                Err(e) if e.is_not_found() || matches!(e, AriError::NotInStasis { .. }) => {
                    return forget();
                }
                Err(e @ AriError::Transport { .. }) => {
                    warn!(call_id = %id, error = %e, "reconcile: transfer of a caller given up on failed again");
                    return;
                }
                // Asterisk answered and refused: hang up rather than leave the caller in
                // silence, as a transfer failing twice does.
                Err(e) => {
                    error!(call_id = %id, error = %e, "reconcile: asterisk refused the transfer of a caller given up on; hanging up");
                }
            }
        }
        match c.hangup(channel).await {
            Ok(()) => {
                bump(&self.inner.counters.hangups);
                info!(call_id = %id, channel, "reconcile: caller given up on is hung up");
                forget();
            }
            Err(e) if e.is_not_found() => forget(),
            Err(e) => {
                warn!(call_id = %id, error = %e, "reconcile: hangup of a caller given up on failed again");
            }
        }
    }

    /// A channel sitting in this controller's Stasis application.
    fn in_our_app(&self, ch: &Channel) -> bool {
        ch.dialplan.app_name == "Stasis"
            && ch.dialplan.app_data.split(',').next() == Some(self.inner.settings.app.as_str())
    }

    /// The channel of an `AudioSocket()` / channel-driver call: the one whose
    /// `dialplan.app_data` holds the call id (not the AudioSocket leg itself). One
    /// `GET /channels` at most per call; calls arriving together share one.
    async fn lookup(&self, call_id: Uuid) -> Option<Channel> {
        let key = call_id.to_string();
        let find = |list: &[Channel]| -> Option<Channel> {
            list.iter()
                .filter(|c| c.dialplan.app_data.to_ascii_lowercase().contains(&key))
                .min_by_key(|c| c.name.starts_with("AudioSocket/"))
                .cloned()
        };
        let mut cache = self.inner.cache.lock().await;
        if let Some((at, list)) = cache.as_ref() {
            if at.elapsed() < CHANNEL_CACHE_TTL {
                if let Some(c) = find(list) {
                    return Some(c);
                }
            }
        }
        bump(&self.inner.counters.lookups_fetched);
        match self.inner.client.channels().await {
            Ok(list) => {
                let found = find(&list);
                *cache = Some((Instant::now(), list));
                found
            }
            Err(e) => {
                warn!(call_id = %call_id, error = %e, "caller lookup failed");
                None
            }
        }
    }
}

impl CallDirectory for Controller {
    fn admit(&self, call_id: Uuid, end: CancellationToken) -> AdmitFuture<'_> {
        Box::pin(async move {
            {
                let mut reg = self.registry();
                if let Some(call) = reg.calls.get_mut(&call_id) {
                    if call.admitted || call.reported || call.phase == Phase::Done {
                        bump(&self.inner.counters.rejected);
                        return Admission::Reject;
                    }
                    call.admitted = true;
                    call.end = Some(end);
                    let (tx, rx) = mpsc::channel(EXTRA_INPUT_CAPACITY);
                    call.input = Some(tx);
                    return Admission::Accept(CallDetails {
                        caller_number: call.number.clone(),
                        caller_name: call.name.clone(),
                        extra_input: Some(rx),
                        // Our externalMedia channel: prompt its media with silence at once.
                        media_at_once: true,
                        observer: None,
                        profile: Some(call.profile.clone()),
                    });
                }
                if self.inner.settings.stasis_only {
                    bump(&self.inner.counters.rejected);
                    return Admission::Reject;
                }
            }
            let found = timeout(self.inner.settings.lookup_timeout, self.lookup(call_id))
                .await
                .ok()
                .flatten();
            match found {
                Some(ch) => {
                    debug!(call_id = %call_id, channel = %ch.id, "caller found");
                    Admission::Accept(CallDetails {
                        caller_number: ch.caller_number(),
                        caller_name: ch.caller_name(),
                        extra_input: None,
                        media_at_once: false,
                        observer: None,
                        profile: Some(ProfileChoice {
                            called_number: called_number(&ch),
                            ..ProfileChoice::default()
                        }),
                    })
                }
                None => Admission::Accept(CallDetails::default()),
            }
        })
    }

    fn finished(&self, summary: &mut CallSummary) {
        let id = summary.call_id;
        if summary.fallback.is_none() {
            let reason = self
                .registry()
                .calls
                .get(&id)
                .and_then(|c| c.fallback.clone());
            if let Some(reason) = reason {
                // voicegate, not the agent, sent this caller to the operators (setup failed
                // after the media connected): count and record it as such.
                summary.outcome = Outcome::Fallback(reason.to_string());
                summary.fallback = Some(reason);
            }
        }
        self.inner
            .next
            .set_default(id, Next::from_outcome(&summary.outcome));
        let action = {
            let mut reg = self.registry();
            let Some(call) = reg.calls.get_mut(&id) else {
                return;
            };
            call.session_done = true;
            call.input = None;
            call.end = None;
            match call.phase {
                Phase::Done => {
                    reg.forget(id);
                    None
                }
                Phase::Transferring | Phase::HangingUp => None,
                // One mapping for every mode: what `/next` would answer.
                Phase::Setup | Phase::Live => {
                    Some(Next::from_outcome(&summary.outcome) == Next::Hangup)
                }
            }
        };
        if let Some(agent_ended) = action {
            let me = self.clone();
            tokio::spawn(async move {
                if agent_ended {
                    me.hangup_flow(id).await;
                } else {
                    me.transfer_flow(id).await;
                }
            });
        }
    }
}

#[cfg(test)]
#[path = "stasis_tests.rs"]
mod tests;
