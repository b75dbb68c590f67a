//! The events link on tokio's paused clock: each connection is a WebSocket over an in-memory
//! pipe whose server end (Asterisk's `/ari/events`, speaking RFC 6455 through tungstenite
//! as Asterisk's `res_http_websocket.c` does) the test holds; refused, hung and accepted
//! connects come from a script. The reconnect waits, the ping-silence limit and the
//! backoff's reset are asserted to the millisecond. Over real sockets the same link is
//! tested against the loopback fake (`tests/suite/ari.rs`) and a real Asterisk.

use super::*;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::io::DuplexStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What one connection attempt meets.
enum Attempt {
    /// Refused (Asterisk down: connection refused, or 401).
    Refuse,
    /// Never answers (a host that drops packets); the link's connect timeout ends it.
    Hang,
    /// Accepted: the server end goes to the test.
    Accept,
}

/// Asterisk's end of one accepted connection.
type Server = WebSocketStream<DuplexStream>;

struct Link {
    link: EventLink,
    events: mpsc::Receiver<Event>,
    servers: mpsc::UnboundedReceiver<Server>,
    /// When each attempt began, since the start.
    attempts: Arc<Mutex<Vec<Duration>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Starts the link with `params` against `script` (refused once it runs out).
fn start(params: EventsParams, script: Vec<Attempt>) -> Link {
    let t0 = Instant::now();
    let mut script = VecDeque::from(script);
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let (server_tx, servers) = mpsc::unbounded_channel();
    let seen = attempts.clone();
    let connect = move || {
        seen.lock().unwrap().push(t0.elapsed());
        let next = script.pop_front().unwrap_or(Attempt::Refuse);
        let server_tx = server_tx.clone();
        async move {
            match next {
                Attempt::Refuse => Err("HTTP error: 401 Unauthorized".to_owned()),
                Attempt::Hang => std::future::pending().await,
                Attempt::Accept => {
                    let (client, server) = tokio::io::duplex(64 * 1024);
                    let server = WebSocketStream::from_raw_socket(server, Role::Server, None).await;
                    let _ = server_tx.send(server);
                    Ok(WebSocketStream::from_raw_socket(client, Role::Client, None).await)
                }
            }
        }
    };
    let (tx, events) = mpsc::channel(EVENT_QUEUE);
    let stop = CancellationToken::new();
    let (task, link) = spawn_with(
        connect,
        "ws://asterisk/ari/events".into(),
        params,
        tx,
        stop.clone(),
    );
    Link {
        link,
        events,
        servers,
        attempts,
        stop,
        task,
    }
}

fn params(ping: Duration) -> EventsParams {
    EventsParams {
        initial: ms(500),
        max: ms(4_000),
        ping,
        stable: ms(5_000),
        connect_timeout: ms(2_000),
    }
}

async fn until(t0: Instant, at: Duration) {
    tokio::time::sleep_until(t0 + at).await;
}

/// Lets every task woken at this instant run (the clock stays where it is).
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn event(kind: &str) -> WsMessage {
    let body = serde_json::json!({"type": kind, "args": [],
        "channel": {"id": "1764756000.1"}, "application": "voicegate"});
    WsMessage::text(body.to_string())
}

/// Events are forwarded in order; an unknown type and a malformed message are skipped
/// without ending the link; a stop closes it and ends the task.
#[tokio::test(start_paused = true)]
async fn events_are_forwarded_in_order_and_bad_ones_skipped() {
    let mut l = start(params(ms(10_000)), vec![Attempt::Accept]);
    let mut server = l.servers.recv().await.unwrap();
    settle().await;
    assert_eq!(*l.link.state.borrow(), LinkState::Up);
    server.send(event("StasisStart")).await.unwrap();
    server.send(event("ChannelVarset")).await.unwrap();
    server.send(WsMessage::text("not json")).await.unwrap();
    server.send(event("StasisEnd")).await.unwrap();
    let first = l.events.recv().await.unwrap();
    assert!(matches!(first, Event::StasisStart { .. }), "{first:?}");
    let second = l.events.recv().await.unwrap();
    assert!(matches!(second, Event::StasisEnd { .. }), "{second:?}");
    l.stop.cancel();
    // The link says goodbye with a Close frame.
    let closing = server.next().await.unwrap().unwrap();
    assert!(matches!(closing, WsMessage::Close(_)), "{closing:?}");
    l.task.await.unwrap();
    assert_eq!(*l.link.state.borrow(), LinkState::Down);
    assert_eq!(l.link.attempts(), 1);
}

/// A server that stops sending anything (a half-open connection: no events, no pongs) is
/// dropped at the first ping tick more than two intervals after its last frame, and the
/// link connects again `initial` later; one that answers the pings is kept.
#[tokio::test(start_paused = true)]
async fn silent_link_is_dropped_by_ping_and_connected_again_after_the_initial_wait() {
    let t0 = Instant::now();
    let mut l = start(params(ms(1_000)), vec![Attempt::Accept, Attempt::Accept]);
    let mut silent = l.servers.recv().await.unwrap();
    silent.send(event("StasisStart")).await.unwrap();
    assert!(l.events.recv().await.is_some());
    // Pings at 1 s and 2 s go unanswered (the server does not read); at 3 s the last frame
    // is more than two intervals old.
    until(t0, ms(2_999)).await;
    assert_eq!(*l.link.state.borrow(), LinkState::Up);
    until(t0, ms(3_000)).await;
    settle().await;
    assert_eq!(*l.link.state.borrow(), LinkState::Down);
    let mut answering = l.servers.recv().await.unwrap();
    assert_eq!(*l.attempts.lock().unwrap(), [ms(0), ms(3_500)]);
    // This one reads, so tungstenite answers every ping: kept for ten intervals and more.
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = answering.next().await {} });
    until(t0, ms(16_000)).await;
    assert_eq!(*l.link.state.borrow(), LinkState::Up);
    assert_eq!(l.link.attempts(), 2);
    drop(silent);
    l.stop.cancel();
    l.task.await.unwrap();
    reader.await.unwrap();
}

/// Refused and hung connects wait `initial`, doubling up to `max`; a link that stayed up
/// for `stable` starts the waits over, a shorter one does not. Asterisk's Close frame is
/// an end like any other: the next connect waits too.
#[tokio::test(start_paused = true)]
async fn reconnects_back_off_doubling_to_the_cap_and_reset_after_a_stable_link() {
    let t0 = Instant::now();
    use Attempt::{Accept, Hang, Refuse};
    let script = vec![Hang, Refuse, Refuse, Refuse, Refuse, Accept, Accept];
    let mut l = start(params(ms(10_000)), script);
    // Hang: given up at the 2 s connect timeout; then waits of 0.5, 1, 2, 4 and 4 s.
    let mut stable = l.servers.recv().await.unwrap();
    assert_eq!(
        *l.attempts.lock().unwrap(),
        [
            ms(0),
            ms(2_500),
            ms(3_500),
            ms(5_500),
            ms(9_500),
            ms(13_500)
        ]
    );
    // Up for 6 s (over `stable`), then Asterisk restarts: Close.
    until(t0, ms(19_500)).await;
    stable.close(None).await.unwrap();
    let mut short = l.servers.recv().await.unwrap();
    // Reset: 0.5 s after the close.
    assert_eq!(l.attempts.lock().unwrap().last(), Some(&ms(20_000)));
    // Up for 1 s only: the waits go on from where the reset left them (1 s, then 2 s).
    until(t0, ms(21_000)).await;
    short.close(None).await.unwrap();
    until(t0, ms(25_000)).await;
    assert_eq!(
        l.attempts.lock().unwrap()[6..],
        [ms(20_000), ms(22_000), ms(24_000)]
    );
    assert_eq!(*l.link.state.borrow(), LinkState::Down);
    l.stop.cancel();
    l.task.await.unwrap();
}
