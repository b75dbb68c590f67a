//! The `/ari/events` WebSocket: one long-lived connection per Stasis application, kept up
//! for the life of the service.
//!
//! - Reconnects after every end of the connection, clean or not (a Close frame from Asterisk
//!   restarting is the common case, and the one bridges that only reconnect on errors miss),
//!   waiting between attempts with capped exponential backoff: `initial`, doubled per
//!   failure up to `max`, back to `initial` only after a connection stayed up for
//!   [`EventsParams::stable`]. There is no path that reconnects without waiting.
//! - Pings every `ping` interval; a link with no frame from Asterisk for two intervals is
//!   dropped and reconnected (a half-open TCP connection).
//! - Link state is published on a `watch` channel ([`LinkState`]) for health and for the
//!   controller, which reconciles its calls after a reconnect (events may have been missed).
//! - Credentials go in an `Authorization: Basic` header, never in the URL (which is logged).

use super::client::AriClient;
use super::model::Event;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Events the channel to the controller holds before the socket reader waits.
pub(crate) const EVENT_QUEUE: usize = 1024;

/// State of the events link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// ARI is not used for events (lookup mode).
    Disabled,
    /// Connecting (first time or again).
    Connecting,
    /// Connected and receiving events.
    Up,
    /// Disconnected; waiting before the next attempt.
    Down,
}

impl LinkState {
    /// `disabled`, `connecting`, `up` or `down`, for health output.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LinkState::Disabled => "disabled",
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down => "down",
        }
    }
}

/// Timing of the events link.
#[derive(Debug, Clone)]
pub(crate) struct EventsParams {
    /// First wait after a disconnect.
    pub(crate) initial: Duration,
    /// Longest wait.
    pub(crate) max: Duration,
    /// Ping interval; two without any frame back drop the link.
    pub(crate) ping: Duration,
    /// A connection up this long resets the backoff to `initial`.
    pub(crate) stable: Duration,
    /// Connecting (TCP + upgrade) may take this long.
    pub(crate) connect_timeout: Duration,
}

/// What others can observe of the link.
#[derive(Debug, Clone)]
pub struct EventLink {
    /// Current state.
    pub state: watch::Receiver<LinkState>,
    /// Connection attempts so far (first connect included).
    pub attempts: Arc<AtomicU64>,
}

impl EventLink {
    /// A link that is never used (lookup mode).
    pub(crate) fn disabled() -> Self {
        let (_tx, rx) = watch::channel(LinkState::Disabled);
        EventLink {
            state: rx,
            attempts: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Connection attempts so far.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }
}

/// Spawns the events task: connects, forwards every known event to `tx`, reconnects for as
/// long as `stop` is not cancelled and `tx` has a receiver.
pub(crate) fn spawn(
    client: AriClient,
    app: String,
    params: EventsParams,
    tx: mpsc::Sender<Event>,
    stop: CancellationToken,
) -> (tokio::task::JoinHandle<()>, EventLink) {
    let url = client.events_url(&app);
    let shown = url.to_string();
    let connect = move || {
        let url = url.clone();
        let auth = client.basic_auth_header();
        async move {
            let mut request = url
                .as_str()
                .into_client_request()
                .map_err(|e| format!("ari events url unusable: {e}"))?;
            let auth = auth
                .parse()
                .map_err(|_| "ari credentials are not a valid header value".to_owned())?;
            request.headers_mut().insert("authorization", auth);
            let connector = Some(crate::tls::websocket_connector());
            tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector)
                .await
                .map(|(ws, _)| ws)
                .map_err(|e| e.to_string())
        }
    };
    spawn_with(connect, shown, params, tx, stop)
}

/// [`spawn`] with the connection made by `connect` (a WebSocket client over any stream);
/// `url` is for the log.
fn spawn_with<S, C, F>(
    mut connect: C,
    url: String,
    params: EventsParams,
    tx: mpsc::Sender<Event>,
    stop: CancellationToken,
) -> (tokio::task::JoinHandle<()>, EventLink)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    C: FnMut() -> F + Send + 'static,
    F: Future<Output = Result<tokio_tungstenite::WebSocketStream<S>, String>> + Send,
{
    let (state_tx, state_rx) = watch::channel(LinkState::Connecting);
    let attempts = Arc::new(AtomicU64::new(0));
    let link = EventLink {
        state: state_rx,
        attempts: attempts.clone(),
    };
    let task = tokio::spawn(async move {
        let mut backoff = crate::backoff::Backoff::new(params.initial, params.max);
        loop {
            if stop.is_cancelled() || tx.is_closed() {
                break;
            }
            attempts.fetch_add(1, Ordering::Relaxed);
            let _ = state_tx.send(LinkState::Connecting);
            let connected = tokio::select! {
                () = stop.cancelled() => break,
                r = timeout(params.connect_timeout, connect()) => r,
            };
            match connected {
                Ok(Ok(ws)) => {
                    info!(url = %url, "ari events connected");
                    let _ = state_tx.send(LinkState::Up);
                    let up_at = Instant::now();
                    let why = pump(ws, &params, &tx, &stop).await;
                    if up_at.elapsed() >= params.stable {
                        backoff.reset();
                    }
                    if stop.is_cancelled() {
                        break;
                    }
                    warn!(reason = %why, "ari events link lost; reconnecting");
                }
                Ok(Err(e)) => warn!(error = %e, "ari events connect failed"),
                Err(_) => warn!(
                    timeout_ms = params.connect_timeout.as_millis() as u64,
                    "ari events connect timed out"
                ),
            }
            let _ = state_tx.send(LinkState::Down);
            let wait = backoff.next_wait();
            debug!(wait_ms = wait.as_millis() as u64, "ari events backoff");
            tokio::select! {
                () = stop.cancelled() => break,
                () = sleep(wait) => {}
            }
        }
        let _ = state_tx.send(LinkState::Down);
    });
    (task, link)
}

/// Reads one connection until it ends; returns why.
async fn pump<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    params: &EventsParams,
    tx: &mpsc::Sender<Event>,
    stop: &CancellationToken,
) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut ping = tokio::time::interval_at(Instant::now() + params.ping, params.ping);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rx = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                let _ = ws.close(None).await;
                return "shutdown".into();
            }
            _ = ping.tick() => {
                if last_rx.elapsed() > params.ping * 2 {
                    return "no frames for two ping intervals".into();
                }
                if let Err(e) = ws.send(WsMessage::Ping(Default::default())).await {
                    return format!("ping: {e}");
                }
            }
            msg = ws.next() => {
                last_rx = Instant::now();
                match msg {
                    Some(Ok(WsMessage::Text(text))) => match Event::parse(&text) {
                        Ok(Event::Other) => {}
                        Ok(ev) => {
                            if tx.send(ev).await.is_err() {
                                let _ = ws.close(None).await;
                                return "controller gone".into();
                            }
                        }
                        Err(e) => warn!(error = %e, "ari event not understood; skipped"),
                    },
                    Some(Ok(WsMessage::Close(frame))) => {
                        return format!("closed by asterisk ({:?})", frame.map(|f| f.code));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return format!("read: {e}"),
                    None => return "connection ended".into(),
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
