//! The AudioSocket listener: accepts Asterisk's connections, reads the call id, and runs one
//! task per call ([`crate::call::run_session`]).
//!
//! A malformed stream or a missing call id closes that connection only, logged with the peer
//! and call id; every other call goes on. Shutdown is two-staged: [`Server::run`] stops
//! accepting when `stop` is cancelled, then waits for live calls up to the grace period, then
//! cancels `hangup`, which makes each call send `0x00` and close.

use crate::agent::{CallInfo, SharedAgent};
use crate::audiosocket::codec::Message;
use crate::call::directory::{Admission, CallDetails, CallDirectory};
use crate::call::{CallSummary, Outcome, SessionParams, session::read_message};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

/// Settings of the listener.
#[derive(Debug, Clone)]
pub struct ServerParams {
    /// Time a new connection has to send its call id (`0x01`).
    pub call_id_timeout: Duration,
    /// How long live calls may go on after shutdown starts.
    pub shutdown_grace: Duration,
    /// Per-call settings.
    pub session: SessionParams,
}

impl ServerParams {
    /// The listener settings of a config.
    pub fn from_config(c: &crate::config::AudioSocketConfig) -> Self {
        ServerParams {
            call_id_timeout: c.call_id_timeout(),
            shutdown_grace: c.shutdown_grace(),
            session: SessionParams {
                playout_max: c.playout_max(),
                idle_timeout: c.idle_timeout(),
            },
        }
    }
}

/// A bound AudioSocket listener, ready to [`Server::run`].
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    agent: SharedAgent,
    params: Arc<ServerParams>,
    summaries: Option<mpsc::UnboundedSender<CallSummary>>,
    directory: Option<Arc<dyn CallDirectory>>,
}

impl std::fmt::Debug for dyn crate::agent::Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Agent({})", self.name())
    }
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]).
    ///
    /// # Errors
    /// The bind error.
    pub async fn bind(
        addr: SocketAddr,
        agent: SharedAgent,
        params: ServerParams,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Server {
            listener,
            agent,
            params: Arc::new(params),
            summaries: None,
            directory: None,
        })
    }

    /// Sends the summary of every finished call to `tx` (for call records and tests).
    pub fn with_summaries(mut self, tx: mpsc::UnboundedSender<CallSummary>) -> Self {
        self.summaries = Some(tx);
        self
    }

    /// Asks `directory` about each call before it starts and tells it how each call ended
    /// (caller details and DTMF from ARI, Stasis-only admission, the `/next` store).
    pub fn with_directory(mut self, directory: Arc<dyn CallDirectory>) -> Self {
        self.directory = Some(directory);
        self
    }

    /// The bound address.
    ///
    /// # Errors
    /// As [`TcpListener::local_addr`].
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts calls until `stop` is cancelled, then lets live calls finish for the grace
    /// period and hangs up the rest. Returns when every call task has ended.
    pub async fn run(self, stop: CancellationToken) {
        let tracker = TaskTracker::new();
        let hangup = CancellationToken::new();
        let local = self.listener.local_addr().ok();
        info!(listen = ?local, agent = self.agent.name(), "audiosocket listening");
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let agent = self.agent.clone();
                        let params = self.params.clone();
                        let hangup = hangup.clone();
                        let summaries = self.summaries.clone();
                        let directory = self.directory.clone();
                        tracker.spawn(async move {
                            if let Some(summary) = handle_connection(stream, peer, agent, &params, hangup, directory).await {
                                if let Some(tx) = summaries {
                                    let _ = tx.send(summary);
                                }
                            }
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        drop(self.listener);
        tracker.close();
        let live = tracker.len();
        if live > 0 {
            info!(
                live_calls = live,
                grace_s = self.params.shutdown_grace.as_secs(),
                "stopped accepting; waiting for live calls"
            );
        }
        if timeout(self.params.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                live_calls = tracker.len(),
                "grace period over; hanging up live calls"
            );
            hangup.cancel();
            tracker.wait().await;
        }
        info!("audiosocket listener stopped");
    }
}

/// Reads the call id and runs the call. Returns `None` if the connection never became a call.
async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    agent: SharedAgent,
    params: &ServerParams,
    hangup: CancellationToken,
    directory: Option<Arc<dyn CallDirectory>>,
) -> Option<CallSummary> {
    if let Err(e) = stream.set_nodelay(true) {
        warn!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let (mut reader, writer) = stream.into_split();
    let mut buf = BytesMut::with_capacity(2048);
    let call_id = match timeout(params.call_id_timeout, read_message(&mut reader, &mut buf)).await {
        Ok(Ok(Some(Message::CallId(id)))) => id,
        Ok(Ok(Some(other))) => {
            warn!(%peer, first = ?kind_name(&other), "first message is not a call id; closing");
            return None;
        }
        Ok(Ok(None)) => {
            info!(%peer, "connection closed before a call id");
            return None;
        }
        Ok(Err(e)) => {
            warn!(%peer, error = %e, "malformed stream before the call id; closing");
            return None;
        }
        Err(_) => {
            warn!(%peer, timeout_ms = params.call_id_timeout.as_millis() as u64, "no call id in time; closing");
            return None;
        }
    };
    let span = info_span!("call", call_id = %call_id, %peer);
    async move {
        // The directory may end this call alone; the server's hangup still ends every call.
        let end = hangup.child_token();
        let details = match &directory {
            Some(d) => match d.admit(call_id, end.clone()).await {
                Admission::Accept(details) => details,
                Admission::Reject => {
                    warn!("call id not issued by voicegate; closing");
                    return None;
                }
            },
            None => CallDetails::default(),
        };
        info!("call started");
        let info = CallInfo {
            call_id,
            rate_hz: 0,
            caller_number: details.caller_number,
            caller_name: details.caller_name,
        };
        let summary = crate::call::session::run_session_with_input(
            reader,
            writer,
            buf,
            info,
            agent,
            params.session.clone(),
            end,
            details.extra_input,
        )
        .await;
        if let Some(d) = &directory {
            d.finished(&summary);
        }
        match &summary.outcome {
            Outcome::ProtocolError(e) => warn!(error = %e, "malformed stream; call closed"),
            Outcome::Fallback(e) => warn!(error = %e, "call handed to the fallback"),
            _ => {}
        }
        info!(
            outcome = ?summary.outcome,
            duration_ms = summary.duration.as_millis() as u64,
            frames_in = summary.frames_in,
            frames_out = summary.frames_out,
            underruns = summary.underruns,
            barge_ins = summary.barge_ins,
            "call ended"
        );
        Some(summary)
    }
    .instrument(span)
    .await
}

fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Hangup => "hangup",
        Message::CallId(_) => "call id",
        Message::Dtmf(_) => "dtmf",
        Message::Audio { .. } => "audio",
        Message::Error(_) => "error",
    }
}
