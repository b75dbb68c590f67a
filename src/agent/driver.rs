//! The one WebSocket driver of the sans-IO providers: it owns the sockets, the clock and the
//! call's channels, and a [`WsProtocol`] decides everything else.
//!
//! A protocol is a state machine fed with what happened — an input from the call
//! ([`WsProtocol::handle_input`]), a message or the end of one of its sockets
//! ([`WsProtocol::handle_server`]), a timer that came due ([`WsProtocol::handle_timeout`]) —
//! each time with `now` passed in, and it answers with [`Out`]s: open, write to or close a
//! socket, an [`AgentEvent`] for the call, or the end of the session. It reads no clock and
//! does no I/O, so its tests run on virtual time with exact timing assertions.
//!
//! Sockets are numbered by the protocol ([`SocketId`]): a provider that replaces its session
//! (OpenAI's renewal before the 60-minute limit) or reconnects opens a second one beside the
//! first. Each socket is connected and read by its own task, spawned inside the call's span
//! ([`super::task::spawn`]), so every log line carries the call id.

use super::ws::{self, Ws};
use super::{AgentEndpoint, AgentError, AgentEvent, AgentInput};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tracing::debug;

/// A socket of one session, numbered by its protocol.
pub(crate) type SocketId = u32;

/// A single WebSocket write may block this long before the session is given up.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A closing socket gets this long to say goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Server messages each socket's reader may hold before it waits for the driver.
const READ_QUEUE: usize = 64;

/// What a protocol asks the driver to do, in order.
#[derive(Debug)]
pub(crate) enum Out {
    /// Connect socket `socket` to `url` with `headers` (name, value), within `timeout`; the
    /// result arrives as [`ServerMsg::Opened`] or [`ServerMsg::Closed`].
    Open {
        /// The socket's number.
        socket: SocketId,
        /// `ws://` or `wss://` URL.
        url: String,
        /// Upgrade headers (authentication).
        headers: Vec<(String, String)>,
        /// Connect timeout.
        timeout: Duration,
    },
    /// Write one text message on `socket`.
    Send {
        /// The socket.
        socket: SocketId,
        /// The message (JSON text).
        text: String,
    },
    /// Close `socket` (in the background, within a second).
    Close {
        /// The socket.
        socket: SocketId,
    },
    /// Give the call this event.
    Event(AgentEvent),
    /// The session failed: [`AgentEvent::Failed`] goes to the call and the driver stops.
    Fail(AgentError),
    /// The session is over (the agent ended it, after its [`AgentEvent::Ended`]).
    Stop,
}

/// What happened on one socket.
#[derive(Debug)]
pub(crate) enum ServerMsg<'a> {
    /// The socket is connected.
    Opened,
    /// A text message.
    Text(&'a str),
    /// The socket is gone (connect failure, close frame, read or write error).
    Closed(Closed),
}

/// Why a socket is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Closed {
    /// The close frame's code and reason, when the server sent one.
    pub(crate) frame: Option<(u16, String)>,
    /// What happened, in words, with the provider's reason where it gave one (never with
    /// upgrade header values): `connect: …`, `server closed the session (code 1011, reason
    /// "…")`, `server closed the connection`, `websocket send failed: …`.
    pub(crate) detail: String,
}

impl Closed {
    /// Gone without a close frame, for `detail`.
    pub(crate) fn because(detail: impl Into<String>) -> Self {
        Closed {
            frame: None,
            detail: detail.into(),
        }
    }
}

/// A provider's protocol, sans-IO; see the module docs.
pub(crate) trait WsProtocol: Send + 'static {
    /// The session starts at `now` (open the first socket).
    fn start(&mut self, now: Instant, out: &mut Vec<Out>);
    /// An input from the call.
    fn handle_input(&mut self, now: Instant, input: AgentInput, out: &mut Vec<Out>);
    /// A message on, or the end of, `socket`.
    fn handle_server(
        &mut self,
        now: Instant,
        socket: SocketId,
        msg: ServerMsg<'_>,
        out: &mut Vec<Out>,
    );
    /// [`WsProtocol::poll_timeout`] has come.
    fn handle_timeout(&mut self, now: Instant, out: &mut Vec<Out>);
    /// When [`WsProtocol::handle_timeout`] is next due, if a timer is set.
    fn poll_timeout(&self) -> Option<Instant>;
    /// The call is over (its input closed): last words for the call's record (events go
    /// out only if the call still reads them) and the sockets, which the driver then closes.
    fn finish(&mut self, out: &mut Vec<Out>) {
        let _ = out;
    }
}

/// One socket's news, from its reader task.
enum Read {
    Opened(SocketId, SplitSink<Ws, Message>),
    Text(SocketId, tokio_tungstenite::tungstenite::Utf8Bytes),
    Closed(SocketId, Closed),
}

/// Runs `protocol` for one call until the call or the session ends.
pub(crate) async fn run<P: WsProtocol>(mut protocol: P, mut io: AgentEndpoint) {
    let (read_tx, mut read_rx) = mpsc::channel::<Read>(READ_QUEUE);
    let mut sinks: HashMap<SocketId, SplitSink<Ws, Message>> = HashMap::new();
    let mut out = Vec::new();
    protocol.start(Instant::now(), &mut out);
    loop {
        if !apply(&mut out, &mut sinks, &read_tx, &io, &mut protocol).await {
            // Stay until the call lets go, so the call sees the last event first.
            for (_, sink) in sinks.drain() {
                close(sink);
            }
            while io.input.recv().await.is_some() {}
            return;
        }
        let due = protocol.poll_timeout();
        tokio::select! {
            input = io.input.recv() => match input {
                Some(input) => protocol.handle_input(Instant::now(), input, &mut out),
                None => {
                    protocol.finish(&mut out);
                    finish(out, &mut sinks, &io).await;
                    break;
                }
            },
            Some(read) = read_rx.recv() => match read {
                Read::Opened(id, sink) => {
                    sinks.insert(id, sink);
                    protocol.handle_server(Instant::now(), id, ServerMsg::Opened, &mut out);
                }
                Read::Text(id, text) => {
                    protocol.handle_server(Instant::now(), id, ServerMsg::Text(text.as_str()), &mut out);
                }
                Read::Closed(id, why) => {
                    sinks.remove(&id);
                    protocol.handle_server(Instant::now(), id, ServerMsg::Closed(why), &mut out);
                }
            },
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                protocol.handle_timeout(Instant::now(), &mut out);
            }
        }
    }
    // The call is over: say goodbye politely, but do not wait long for it.
    for (_, sink) in sinks {
        close(sink);
    }
}

/// Carries out the last `out` of a call that is over: events only if the call still reads
/// them, messages as usual.
async fn finish(
    out: Vec<Out>,
    sinks: &mut HashMap<SocketId, SplitSink<Ws, Message>>,
    io: &AgentEndpoint,
) {
    for o in out {
        match o {
            Out::Event(ev) => {
                let _ = io.events.try_send(ev);
            }
            Out::Send { socket, text } => {
                if let Some(sink) = sinks.get_mut(&socket) {
                    let _ = send(sink, text).await;
                }
            }
            _ => {}
        }
    }
}

/// Carries out `out` in order; `false` once the session is over.
async fn apply<P: WsProtocol>(
    out: &mut Vec<Out>,
    sinks: &mut HashMap<SocketId, SplitSink<Ws, Message>>,
    read_tx: &mpsc::Sender<Read>,
    io: &AgentEndpoint,
    protocol: &mut P,
) -> bool {
    // A write failure is news for the protocol, which may answer with more to do.
    while !out.is_empty() {
        let mut failed = None;
        for o in std::mem::take(out) {
            match o {
                Out::Open {
                    socket,
                    url,
                    headers,
                    timeout,
                } => {
                    super::task::spawn(open(socket, url, headers, timeout, read_tx.clone()));
                }
                Out::Send { socket, text } => {
                    let Some(sink) = sinks.get_mut(&socket) else {
                        debug!(socket, "message for a socket that is not open dropped");
                        continue;
                    };
                    if let Err(why) = send(sink, text).await {
                        sinks.remove(&socket);
                        failed = Some((socket, Closed::because(why)));
                        break;
                    }
                }
                Out::Close { socket } => {
                    if let Some(sink) = sinks.remove(&socket) {
                        close(sink);
                    }
                }
                Out::Event(ev) => {
                    if io.events.send(ev).await.is_err() {
                        return false;
                    }
                }
                Out::Fail(e) => {
                    let _ = io.events.send(AgentEvent::Failed(e)).await;
                    return false;
                }
                Out::Stop => return false,
            }
        }
        if let Some((socket, why)) = failed {
            protocol.handle_server(Instant::now(), socket, ServerMsg::Closed(why), out);
        }
    }
    true
}

async fn send(sink: &mut SplitSink<Ws, Message>, text: String) -> Result<(), String> {
    match timeout(SEND_TIMEOUT, sink.send(Message::Text(text.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("websocket send failed: {e}")),
        Err(_) => Err(format!("websocket send blocked for {SEND_TIMEOUT:?}")),
    }
}

fn close(mut sink: SplitSink<Ws, Message>) {
    super::task::spawn(async move {
        let _ = timeout(CLOSE_GRACE, sink.close()).await;
    });
}

/// Connects socket `id`, hands its write half to the driver, then forwards what it reads.
async fn open(
    id: SocketId,
    url: String,
    headers: Vec<(String, String)>,
    connect_timeout: Duration,
    tx: mpsc::Sender<Read>,
) {
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let ws = match ws::connect(&url, &pairs, connect_timeout).await {
        Ok(ws) => ws,
        Err(e) => {
            let why = Closed::because(format!("connect: {e}"));
            let _ = tx.send(Read::Closed(id, why)).await;
            return;
        }
    };
    let (sink, stream) = ws.split();
    if tx.send(Read::Opened(id, sink)).await.is_err() {
        return;
    }
    let why = read(id, stream, &tx).await;
    let _ = tx.send(Read::Closed(id, why)).await;
}

/// Forwards the text messages of `stream` until it ends; returns why it ended.
async fn read(id: SocketId, mut stream: SplitStream<Ws>, tx: &mpsc::Sender<Read>) -> Closed {
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => {
                if tx.send(Read::Text(id, t)).await.is_err() {
                    return Closed::because("the session is over");
                }
            }
            Some(Ok(Message::Close(Some(f)))) => {
                let code = u16::from(f.code);
                return Closed {
                    detail: format!(
                        "server closed the session (code {code}, reason \"{}\")",
                        f.reason
                    ),
                    frame: Some((code, f.reason.as_str().to_owned())),
                };
            }
            Some(Ok(Message::Close(None))) => {
                return Closed::because("server closed the connection");
            }
            None => return Closed::because("server closed the connection without a close frame"),
            Some(Ok(_)) => {}
            Some(Err(
                e @ (WsError::ConnectionClosed
                | WsError::AlreadyClosed
                | WsError::Io(_)
                | WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)),
            )) => return Closed::because(format!("server closed the connection: {e}")),
            Some(Err(e)) => return Closed::because(format!("websocket failed: {e}")),
        }
    }
}
