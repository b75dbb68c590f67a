//! A fake Asterisk for the ARI tests: the REST API and the `/ari/events` WebSocket on one
//! 127.0.0.1 port, with the JSON shapes and status codes of a real Asterisk 22
//! (`asterisk.md`): 409 "Channel not in Stasis application" for control of a channel outside
//! Stasis, 422 for adding such a channel to a bridge, 400/500 for bad externalMedia requests,
//! 404 for unknown objects, 401 without credentials.
//!
//! It also plays Asterisk's externalMedia side: on `POST /channels/externalMedia` it connects
//! to `external_host` at once and sends `data` as the AudioSocket call id (500 if nothing
//! listens), and once that channel and a caller share a bridge it streams the caller's
//! recording as paced 20 ms slin frames and records what comes back. Deleting the channel
//! closes the socket.
//!
//! It pushes back where a real Asterisk 22.10.1 does (source files named are in the
//! asterisk-22.10.1 tarball of `shared/asterisk/`):
//! - **Events in the real order.** A channel that hangs up gives `ChannelHangupRequest`
//!   (`main/channel.c`, `__ast_queue_hangup`/`ast_softhangup` publish it first), then
//!   `ChannelLeftBridge` if it was bridged (`res/res_stasis.c`, `stasis_app_exec` departs the
//!   bridge when its loop ends; `main/stasis_bridges.c`, `ast_bridge_publish_leave`), then
//!   `StasisEnd` (`app_send_end_msg`, after the depart), then `ChannelDestroyed`. `continue`
//!   gives `ChannelLeftBridge` then `StasisEnd`; `removeChannel` and deleting a bridge with
//!   members give `ChannelLeftBridge`. An externalMedia channel's `StasisStart` follows the REST
//!   reply ([`MediaJoin`]).
//! - **`app=`.** The events WebSocket needs `app` (400 "HTTP request is missing param:
//!   [app]", `res/ari/ari_websockets.c`, `websocket_attempted_cb`) and carries only the events
//!   of the applications it names: a channel's events go to the application it is in, a
//!   bridge's to the applications of the channels that were put in it (`app_subscribe_bridge`,
//!   `res/stasis/control.c`). externalMedia needs `app` (400 "app cannot be empty",
//!   `res/ari/resource_channels.c`) and its channel enters that application.
//! - **One bridge per channel.** `addChannel` of a channel that is in another bridge moves
//!   it: it leaves the old bridge (`ChannelLeftBridge`) before entering the new one
//!   (`res/stasis/control.c`, `control_swap_channel_in_bridge`: "Depart whatever Stasis bridge
//!   we're currently in"); Asterisk 22 has no error for this, so the fake does not invent one
//!   but counts the moves ([`Counts::bridge_moves`]) so a test can require that voicegate
//!   never causes one.
//! - **Media jitter** ([`FakeAri::media_jitter`]): the externalMedia side sends its frames
//!   with the gaps of a busy Asterisk (p99 27 ms, max 47 ms; `docs/asterisk.md`), through
//!   [`voicegate::caller::InputJitter`].
#![allow(dead_code)]

use crate::support::http;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use voicegate::audiosocket::codec::{self, Message, SlinRate};
use voicegate::audiosocket::read_message;

pub(crate) const USER: &str = "voicegate";
pub(crate) const PASS: &str = "ari-test-secret";

/// What the media side observed for one externalMedia channel.
#[derive(Debug, Default, Clone)]
pub(crate) struct MediaReport {
    pub call_id: Option<Uuid>,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub received: Vec<i16>,
    pub hangup_received: bool,
    pub closed: bool,
    /// Largest gap between two audio frames received from voicegate, ms.
    pub gap_max_ms: f64,
    /// RTP (`encapsulation=rtp`): every gap between two packets received from voicegate, ms.
    pub gaps_ms: Vec<f64>,
}

struct Media {
    uuid: Uuid,
    /// Digits the bridge passes to this channel, sent as AudioSocket 0x03.
    dtmf: tokio::sync::mpsc::UnboundedSender<char>,
    bridged: watch::Sender<bool>,
    hangup: CancellationToken,
    report: Arc<Mutex<MediaReport>>,
}

struct FakeChannel {
    id: String,
    name: String,
    caller_name: String,
    caller_number: String,
    in_stasis: bool,
    context: String,
    exten: String,
    priority: i64,
    app_name: String,
    app_data: String,
    /// The Stasis application the channel is in (empty outside Stasis).
    app: String,
    media: Option<Media>,
    /// Channel variables the dialplan set (`Set(VOICEGATE_PROFILE=…)`).
    vars: BTreeMap<String, String>,
}

impl FakeChannel {
    fn json(&self) -> Value {
        json!({
            "id": self.id, "name": self.name, "state": "Up", "protocol_id": "",
            "caller": {"name": self.caller_name, "number": self.caller_number},
            "connected": {"name": "", "number": ""}, "accountcode": "",
            "dialplan": {"context": self.context, "exten": self.exten, "priority": self.priority,
                         "app_name": self.app_name, "app_data": self.app_data},
            "creationtime": "2026-11-21T10:00:00.000+0000", "language": "en"
        })
    }
}

/// A `continue` request Asterisk accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Continued {
    pub channel: String,
    pub context: String,
    pub extension: String,
    pub priority: String,
}

#[derive(Default)]
struct State {
    channels: HashMap<String, FakeChannel>,
    bridges: HashMap<String, Vec<String>>,
    bridge_names: HashMap<String, String>,
    /// Applications subscribed to each bridge (those of the channels put in it).
    bridge_apps: HashMap<String, Vec<String>>,
    seq: u64,
    continued: Vec<Continued>,
    media_reports: Vec<Arc<Mutex<MediaReport>>>,
    status_409: u64,
    /// `METHOD /path` of every REST request held unanswered by [`FakeAri::hang_rest`].
    hung_requests: Vec<String>,
    /// When an externalMedia channel enters the application.
    media_join: MediaJoin,
    /// Late media frames for new externalMedia channels.
    media_jitter: Option<voicegate::caller::InputJitter>,
}

/// When a new externalMedia channel enters the Stasis application (its `StasisStart`).
///
/// A real Asterisk 22.10.1 answers `POST /channels/externalMedia` *before* the channel has
/// entered the application; its `StasisStart` follows later, and `addChannel` before it
/// answers 422 "Channel not in Stasis application" (`docs/asterisk.md` in shared/, observed:
/// REST reply at .402023, a too-early addChannel 422 at .402292, `StasisStart` at .402481;
/// `res/ari/resource_bridges.c`). The fake does the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum MediaJoin {
    /// 2–41 ms after the REST reply, every fifth channel 150 ms (default).
    #[default]
    Late,
    /// Never: the channel stays outside the application.
    Never,
}

/// Counters of what the fake did.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub bridges_created: AtomicU64,
    pub bridges_destroyed: AtomicU64,
    pub media_created: AtomicU64,
    pub media_destroyed: AtomicU64,
    pub channels_list_requests: AtomicU64,
    pub ws_attempts: AtomicU64,
    pub ws_clients: AtomicUsize,
    pub fail_continue: AtomicU64,
    /// Events WebSockets that went silent ([`FakeAri::silence_ws`]).
    pub ws_silenced: AtomicU64,
    /// `addChannel` requests that moved a channel out of another bridge (module doc).
    pub bridge_moves: AtomicU64,
    /// Events WebSocket upgrades refused for want of `app` (400).
    pub ws_without_app: AtomicU64,
}

pub(crate) struct FakeAri {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<String>,
    kill_ws: watch::Sender<u64>,
    refuse_ws: Arc<AtomicBool>,
    close_ws_at_once: Arc<AtomicBool>,
    hang_rest: Arc<AtomicBool>,
    lose_events: Arc<AtomicBool>,
    silent_ws: watch::Sender<bool>,
    pub counts: Arc<Counts>,
    speech: Arc<Vec<i16>>,
    rate: SlinRate,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<String>,
    kill_ws: watch::Receiver<u64>,
    refuse_ws: Arc<AtomicBool>,
    close_ws_at_once: Arc<AtomicBool>,
    hang_rest: Arc<AtomicBool>,
    lose_events: Arc<AtomicBool>,
    silent_ws: watch::Receiver<bool>,
    counts: Arc<Counts>,
    speech: Arc<Vec<i16>>,
    rate: SlinRate,
}

impl Drop for FakeAri {
    fn drop(&mut self) {
        self.task.abort();
        let st = self.state.lock().unwrap();
        for ch in st.channels.values() {
            if let Some(m) = &ch.media {
                m.hangup.cancel();
            }
        }
    }
}

impl FakeAri {
    /// Starts the fake; the media side streams `speech` (slin at `rate`).
    pub(crate) async fn start(speech: Vec<i16>, rate: SlinRate) -> FakeAri {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let (events, _) = broadcast::channel(1024);
        let (kill_ws, kill_rx) = watch::channel(0u64);
        let refuse_ws = Arc::new(AtomicBool::new(false));
        let close_ws_at_once = Arc::new(AtomicBool::new(false));
        let hang_rest = Arc::new(AtomicBool::new(false));
        let lose_events = Arc::new(AtomicBool::new(false));
        let (silent_ws, silent_rx) = watch::channel(false);
        let counts = Arc::new(Counts::default());
        let speech = Arc::new(speech);
        let shared = Arc::new(Shared {
            state: state.clone(),
            events: events.clone(),
            kill_ws: kill_rx,
            refuse_ws: refuse_ws.clone(),
            close_ws_at_once: close_ws_at_once.clone(),
            hang_rest: hang_rest.clone(),
            lose_events: lose_events.clone(),
            silent_ws: silent_rx,
            counts: counts.clone(),
            speech: speech.clone(),
            rate,
        });
        let task = tokio::spawn(http::serve(listener, move |req: Request| {
            serve(req, shared.clone())
        }));
        FakeAri {
            addr,
            state,
            events,
            kill_ws,
            refuse_ws,
            close_ws_at_once,
            hang_rest,
            lose_events,
            silent_ws,
            counts,
            speech,
            rate,
            task,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until an events WebSocket is connected.
    pub(crate) async fn wait_ws(&self) {
        wait_until(Duration::from_secs(10), || {
            self.counts.ws_clients.load(Ordering::SeqCst) > 0
        })
        .await;
    }

    /// A caller dials in and the dialplan runs `Stasis(voicegate)`: `StasisStart`.
    pub(crate) fn new_caller(&self, number: &str, name: &str) -> String {
        self.new_caller_in("voicegate", number, name)
    }

    /// A caller dials in and the dialplan runs `Stasis(<app>)`: `StasisStart` to the
    /// subscribers of `app` only.
    pub(crate) fn new_caller_in(&self, app: &str, number: &str, name: &str) -> String {
        self.new_caller_with(app, number, name, &[], &[])
    }

    /// A caller dials in and the dialplan sets `vars` then runs `Stasis(<app>,<args…>)`:
    /// `StasisStart` with `args` (ARI `StasisStart.args`), the variables readable with
    /// `GET /channels/{id}/variable`.
    pub(crate) fn new_caller_with(
        &self,
        app: &str,
        number: &str,
        name: &str,
        args: &[&str],
        vars: &[(&str, &str)],
    ) -> String {
        let mut st = self.state.lock().unwrap();
        st.seq += 1;
        let id = format!("1763719200.{}", st.seq);
        let ch = FakeChannel {
            id: id.clone(),
            name: format!("PJSIP/trunk-{:08x}", st.seq),
            caller_name: name.into(),
            caller_number: number.into(),
            in_stasis: true,
            context: "incoming".into(),
            exten: "s".into(),
            priority: 2,
            app_name: "Stasis".into(),
            app_data: app.into(),
            app: app.into(),
            media: None,
            vars: vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let ev = event(
            "StasisStart",
            app,
            json!({"args": args, "channel": ch.json()}),
        );
        st.channels.insert(id.clone(), ch);
        let _ = self.events.send(ev);
        id
    }

    /// A caller inside `AudioSocket(<uuid>,host:port)` (mode 1) or `Dial(AudioSocket/…)`
    /// (mode 2): not in Stasis.
    pub(crate) fn new_audiosocket_caller(
        &self,
        number: &str,
        name: &str,
        app_name: &str,
        app_data: &str,
    ) -> String {
        let mut st = self.state.lock().unwrap();
        st.seq += 1;
        let id = format!("1763719200.{}", st.seq);
        let seq = st.seq;
        st.channels.insert(
            id.clone(),
            FakeChannel {
                id: id.clone(),
                name: format!("PJSIP/trunk-{seq:08x}"),
                caller_name: name.into(),
                caller_number: number.into(),
                in_stasis: false,
                context: "voicegate-app".into(),
                exten: "s".into(),
                priority: 3,
                app_name: app_name.into(),
                app_data: app_data.into(),
                app: String::new(),
                media: None,
                vars: BTreeMap::new(),
            },
        );
        id
    }

    /// What a voicegate that died mid-call leaves behind: a caller in Stasis, an
    /// externalMedia channel (its socket long closed) and a `voicegate-` bridge holding both.
    /// Returns (caller, media, bridge) ids.
    pub(crate) fn orphans_from_previous_run(&self) -> (String, String, String) {
        let caller = self.new_caller("+15559999999", "Orphan");
        let mut st = self.state.lock().unwrap();
        st.seq += 1;
        let media = format!("1763719200.{}", st.seq);
        let seq = st.seq;
        let uuid = Uuid::new_v4();
        let (bridged, _) = watch::channel(true);
        st.channels.insert(
            media.clone(),
            FakeChannel {
                id: media.clone(),
                name: format!("AudioSocket/127.0.0.1:9092-{seq:08x}"),
                caller_name: String::new(),
                caller_number: String::new(),
                in_stasis: true,
                context: "default".into(),
                exten: "s".into(),
                priority: 1,
                app_name: "Stasis".into(),
                app_data: format!("voicegate,{uuid}"),
                app: "voicegate".into(),
                vars: BTreeMap::new(),
                media: Some(Media {
                    uuid,
                    dtmf: tokio::sync::mpsc::unbounded_channel().0,
                    bridged,
                    hangup: CancellationToken::new(),
                    report: Arc::new(Mutex::new(MediaReport::default())),
                }),
            },
        );
        let bridge = format!("b-orphan-{uuid}");
        st.bridges
            .insert(bridge.clone(), vec![caller.clone(), media.clone()]);
        st.bridge_names
            .insert(bridge.clone(), format!("voicegate-{uuid}"));
        self.counts.bridges_created.fetch_add(1, Ordering::SeqCst);
        self.counts.media_created.fetch_add(1, Ordering::SeqCst);
        (caller, media, bridge)
    }

    /// The caller presses a key: `ChannelDtmfReceived`.
    pub(crate) fn press(&self, channel: &str, digit: char) {
        let st = self.state.lock().unwrap();
        if let Some(ch) = st.channels.get(channel) {
            let ev = event(
                "ChannelDtmfReceived",
                &ch.app,
                json!({"digit": digit.to_string(), "duration_ms": 100, "channel": ch.json()}),
            );
            let _ = self.events.send(ev);
        }
    }

    /// The caller presses a key and the mixing bridge passes it on: `ChannelDtmfReceived`
    /// and `0x03` on every externalMedia channel in the caller's bridge.
    pub(crate) fn press_with_passthrough(&self, channel: &str, digit: char) {
        self.press(channel, digit);
        let st = self.state.lock().unwrap();
        for members in st
            .bridges
            .values()
            .filter(|m| m.iter().any(|c| c == channel))
        {
            for m in members {
                if let Some(media) = st.channels.get(m).and_then(|c| c.media.as_ref()) {
                    let _ = media.dtmf.send(digit);
                }
            }
        }
    }

    /// The caller hangs up.
    pub(crate) fn caller_hangs_up(&self, channel: &str) {
        let mut st = self.state.lock().unwrap();
        destroy_channel(&mut st, &self.events, &self.counts, channel);
    }

    /// Closes every events WebSocket cleanly (Close frame), as an Asterisk restart does.
    pub(crate) fn drop_ws(&self) {
        self.kill_ws.send_modify(|g| *g += 1);
    }

    /// While set, upgrades to the events WebSocket are answered 503.
    pub(crate) fn refuse_ws(&self, refuse: bool) {
        self.refuse_ws.store(refuse, Ordering::SeqCst);
    }

    /// While set, the events WebSocket upgrade succeeds and the server closes it at once with
    /// a clean Close frame.
    pub(crate) fn close_ws_at_once(&self, on: bool) {
        self.close_ws_at_once.store(on, Ordering::SeqCst);
    }

    /// While set, every REST request (not the events WebSocket upgrade) is read and never
    /// answered: the connection stays open until the client gives up and closes it, as an
    /// Asterisk whose HTTP server is wedged does.
    pub(crate) fn hang_rest(&self, on: bool) {
        self.hang_rest.store(on, Ordering::SeqCst);
    }

    /// While set, every events WebSocket, the connected ones and those accepted meanwhile,
    /// goes silent: Asterisk stops reading from it (so pings get no pong) and sends no event
    /// on it, and the TCP connection stays open (no Close, no FIN), as a wedged Asterisk or
    /// a dead path does. A socket once silent stays so until voicegate drops it; clearing the
    /// flag only lets new connections work again.
    pub(crate) fn silence_ws(&self, on: bool) {
        self.silent_ws.send_replace(on);
    }

    /// While set, events are not delivered on the events WebSocket, which otherwise goes on
    /// as usual (pongs answered, link up): events lost without the link noticing.
    pub(crate) fn lose_events(&self, on: bool) {
        self.lose_events.store(on, Ordering::SeqCst);
    }

    /// When the next externalMedia channels enter the application.
    pub(crate) fn media_join(&self, join: MediaJoin) {
        self.state.lock().unwrap().media_join = join;
    }

    /// New externalMedia channels send their frames late like a busy Asterisk (`None`: on
    /// the 20 ms grid).
    pub(crate) fn media_jitter(&self, jitter: Option<voicegate::caller::InputJitter>) {
        self.state.lock().unwrap().media_jitter = jitter;
    }

    /// `METHOD /path` of every REST request held by [`FakeAri::hang_rest`], in arrival order.
    pub(crate) fn hung_requests(&self) -> Vec<String> {
        self.state.lock().unwrap().hung_requests.clone()
    }

    /// The next `n` `continue` requests answer 500.
    pub(crate) fn fail_continue(&self, n: u64) {
        self.counts.fail_continue.store(n, Ordering::SeqCst);
    }

    pub(crate) fn continued(&self) -> Vec<Continued> {
        self.state.lock().unwrap().continued.clone()
    }

    pub(crate) fn channel_exists(&self, id: &str) -> bool {
        self.state.lock().unwrap().channels.contains_key(id)
    }

    pub(crate) fn live_bridges(&self) -> usize {
        self.state.lock().unwrap().bridges.len()
    }

    pub(crate) fn media_reports(&self) -> Vec<MediaReport> {
        let st = self.state.lock().unwrap();
        st.media_reports
            .iter()
            .map(|r| r.lock().unwrap().clone())
            .collect()
    }

    pub(crate) fn status_409_count(&self) -> u64 {
        self.state.lock().unwrap().status_409
    }

    pub(crate) fn count(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::SeqCst)
    }
}

/// Polls `f` every 20 ms until it holds, panicking after `limit`.
pub(crate) async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An event for the subscribers of application `app`.
fn event(kind: &str, app: &str, mut body: Value) -> String {
    let obj = body.as_object_mut().unwrap();
    obj.insert("type".into(), json!(kind));
    obj.insert("timestamp".into(), json!("2026-11-21T10:00:00.000+0000"));
    obj.insert("asterisk_id".into(), json!("00:11:22:33:44:55"));
    obj.insert("application".into(), json!(app));
    body.to_string()
}

/// Takes channel `id` out of every bridge it is in, with `ChannelLeftBridge` to its
/// application for each.
fn leave_bridges(st: &mut State, events: &broadcast::Sender<String>, id: &str) {
    let Some(ch) = st.channels.get(id) else {
        return;
    };
    let (j, app) = (ch.json(), ch.app.clone());
    for (bid, members) in st.bridges.iter_mut() {
        if members.iter().any(|m| m == id) {
            members.retain(|m| m != id);
            let _ = events.send(event(
                "ChannelLeftBridge",
                &app,
                json!({"bridge": {"id": bid, "bridge_type": "mixing", "channels": members.clone()}, "channel": j}),
            ));
        }
    }
}

fn destroy_channel(
    st: &mut State,
    events: &broadcast::Sender<String>,
    counts: &Counts,
    id: &str,
) -> bool {
    let Some(ch) = st.channels.get(id) else {
        return false;
    };
    // The order of a real hangup (module doc): the request, the bridge depart, StasisEnd,
    // then the channel is destroyed.
    let (j, app, in_stasis) = (ch.json(), ch.app.clone(), ch.in_stasis);
    let _ = events.send(event(
        "ChannelHangupRequest",
        &app,
        json!({"cause": 16, "channel": j}),
    ));
    leave_bridges(st, events, id);
    let ch = st.channels.remove(id).expect("looked up above");
    if let Some(m) = &ch.media {
        m.hangup.cancel();
        counts.media_destroyed.fetch_add(1, Ordering::SeqCst);
    }
    if in_stasis {
        let _ = events.send(event("StasisEnd", &app, json!({"channel": j})));
    }
    let _ = events.send(event(
        "ChannelDestroyed",
        &app,
        json!({"cause": 16, "cause_txt": "Normal Clearing", "channel": j}),
    ));
    true
}

fn authorized(req: &Request) -> bool {
    use base64::Engine as _;
    let want = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASS}"));
    req.header("authorization")
        .is_some_and(|v| v == format!("Basic {want}"))
        || req
            .query("api_key")
            .is_some_and(|k| k == format!("{USER}:{PASS}"))
}

/// Asterisk's answer: its `Server` header, a JSON body (none for 204).
fn respond(code: u16, body: Option<Value>) -> http::Response {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    http::full(
        code,
        &[
            ("server", "Asterisk/22.10.1"),
            ("content-type", "application/json"),
        ],
        body,
    )
}

fn msg(m: &str) -> Option<Value> {
    Some(json!({ "message": m }))
}

/// One HTTP request to the fake (on the shared test HTTP server, [`http`]).
async fn serve(mut req: Request, shared: Arc<Shared>) -> Option<http::Response> {
    if req.path == "/ari/events"
        && req
            .header("upgrade")
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    {
        shared.counts.ws_attempts.fetch_add(1, Ordering::SeqCst);
        if !authorized(&req) {
            return Some(respond(401, msg("Authentication required")));
        }
        if shared.refuse_ws.load(Ordering::SeqCst) {
            return Some(respond(503, msg("Service Unavailable")));
        }
        if req.query("app").is_none_or(|a| a.is_empty()) {
            shared.counts.ws_without_app.fetch_add(1, Ordering::SeqCst);
            return Some(respond(400, msg("HTTP request is missing param: [app]")));
        }
        let Some(key) = req.header("sec-websocket-key").map(str::to_owned) else {
            return Some(respond(400, msg("missing key")));
        };
        // Subscribe before the 101, so no event sent after the client sees the link up is
        // lost.
        let events = shared.events.subscribe();
        let mut kill = shared.kill_ws.clone();
        kill.borrow_and_update();
        // Only the events of the applications named in `app=` (comma-separated) reach it.
        let apps: Vec<String> = req
            .query("app")
            .map(|a| a.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        let upgraded = req.upgraded();
        tokio::spawn(async move {
            if let Some(io) = upgraded.await {
                websocket(io, apps, events, kill, shared).await;
            }
        });
        return Some(http::switching_protocols(&key));
    }
    if shared.hang_rest.load(Ordering::SeqCst) {
        let line = format!("{} {}", req.method, req.path);
        shared.state.lock().unwrap().hung_requests.push(line);
        // Never answer; the connection stays until the client closes it.
        return std::future::pending().await;
    }
    if !authorized(&req) {
        return Some(respond(401, msg("Authentication required")));
    }
    let (code, body) = rest(&req, &shared).await;
    if code == 409 {
        shared.state.lock().unwrap().status_409 += 1;
    }
    Some(respond(code, body))
}

async fn websocket(
    io: hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>,
    apps: Vec<String>,
    mut events: broadcast::Receiver<String>,
    mut kill: watch::Receiver<u64>,
    shared: Arc<Shared>,
) {
    let wanted = |text: &str| {
        serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|v| v["application"].as_str().map(str::to_owned))
            .is_some_and(|a| apps.contains(&a))
    };
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    if shared.close_ws_at_once.load(Ordering::SeqCst) {
        let _ = ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        return;
    }
    shared.counts.ws_clients.fetch_add(1, Ordering::SeqCst);
    let mut silent = shared.silent_ws.clone();
    loop {
        tokio::select! {
            // Silence first: an event sent after `silence_ws` is never delivered.
            biased;
            // (The watch's read guard is released inside, before holding on.)
            _ = async { silent.wait_for(|s| *s).await.is_ok() } => {
                shared.counts.ws_silenced.fetch_add(1, Ordering::SeqCst);
                shared.counts.ws_clients.fetch_sub(1, Ordering::SeqCst);
                // Hold the socket unread and unwritten until the fake is dropped.
                let _held = ws;
                while kill.changed().await.is_ok() {}
                return;
            }
            ev = events.recv() => match ev {
                Ok(_) if shared.lose_events.load(Ordering::SeqCst) => continue,
                Ok(text) if !wanted(&text) => continue,
                Ok(text) => if ws.send(WsMessage::text(text)).await.is_err() { break },
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => break,
            },
            _ = kill.changed() => {
                let _ = ws.close(None).await;
                // Drain until the client's close reply or EOF.
                let _ = tokio::time::timeout(Duration::from_millis(500), async { while let Some(Ok(_)) = ws.next().await {} }).await;
                break;
            }
            m = ws.next() => match m {
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    shared.counts.ws_clients.fetch_sub(1, Ordering::SeqCst);
}

async fn rest(req: &Request, shared: &Shared) -> (u16, Option<Value>) {
    let parts: Vec<&str> = req.path.trim_start_matches("/ari/").split('/').collect();
    let q = |k: &str| req.query(k);
    let events = &shared.events;
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["channels"]) => {
            shared
                .counts
                .channels_list_requests
                .fetch_add(1, Ordering::SeqCst);
            let st = shared.state.lock().unwrap();
            (
                200,
                Some(Value::Array(
                    st.channels.values().map(FakeChannel::json).collect(),
                )),
            )
        }
        ("POST", ["channels", "externalMedia"]) => external_media(req, shared).await,
        ("GET", ["bridges"]) => {
            let st = shared.state.lock().unwrap();
            let list = st
                .bridges
                .iter()
                .map(|(id, members)| json!({"id": id, "technology": "simple_bridge", "bridge_type": "mixing",
                    "bridge_class": "stasis", "creator": "Stasis", "name": st.bridge_names.get(id).cloned().unwrap_or_default(),
                    "channels": members, "creationtime": "2026-11-21T10:00:00.000+0000", "video_mode": "talker"}))
                .collect();
            (200, Some(Value::Array(list)))
        }
        ("GET", ["channels", id, "variable"]) => {
            let st = shared.state.lock().unwrap();
            match (st.channels.get(*id), q("variable")) {
                (None, _) => (404, msg("Channel not found")),
                (Some(_), None) => (400, msg("Variable name is required")),
                (Some(ch), Some(v)) if v == "CALLERID(num)" => {
                    (200, Some(json!({"value": ch.caller_number})))
                }
                (Some(ch), Some(v)) if ch.vars.contains_key(&v) => {
                    (200, Some(json!({"value": ch.vars[&v]})))
                }
                (Some(_), Some(_)) => (200, Some(json!({"value": ""}))),
            }
        }
        ("DELETE", ["channels", id]) => {
            let mut st = shared.state.lock().unwrap();
            if destroy_channel(&mut st, events, &shared.counts, id) {
                (204, None)
            } else {
                (404, msg("Channel not found"))
            }
        }
        ("POST", ["channels", id, action]) => {
            let mut st = shared.state.lock().unwrap();
            let Some(ch) = st.channels.get_mut(*id) else {
                return (404, msg("Channel not found"));
            };
            if !ch.in_stasis {
                return (409, msg("Channel not in Stasis application"));
            }
            match *action {
                "answer" | "ring" | "play" | "dtmf" | "variable" | "redirect" | "hold" => {
                    (204, None)
                }
                "continue" => {
                    if shared.counts.fail_continue.load(Ordering::SeqCst) > 0 {
                        shared.counts.fail_continue.fetch_sub(1, Ordering::SeqCst);
                        return (500, msg("Internal Server Error"));
                    }
                    let c = Continued {
                        channel: id.to_string(),
                        context: q("context").unwrap_or_default(),
                        extension: q("extension").unwrap_or_default(),
                        priority: q("priority").unwrap_or_default(),
                    };
                    // The channel departs its bridge, then leaves the application.
                    let app = ch.app.clone();
                    leave_bridges(&mut st, events, id);
                    let ch = st.channels.get_mut(*id).expect("looked up above");
                    ch.in_stasis = false;
                    ch.app = String::new();
                    ch.context = c.context.clone();
                    ch.exten = c.extension.clone();
                    ch.app_name = "Queue".into();
                    ch.app_data = "operators".into();
                    let j = ch.json();
                    st.continued.push(c);
                    let _ = events.send(event("StasisEnd", &app, json!({"channel": j})));
                    (204, None)
                }
                _ => (404, msg("Resource not found")),
            }
        }
        ("POST", ["bridges"]) => {
            let mut st = shared.state.lock().unwrap();
            st.seq += 1;
            let id = format!("b{}-{}", st.seq, Uuid::new_v4().simple());
            st.bridges.insert(id.clone(), Vec::new());
            st.bridge_names
                .insert(id.clone(), q("name").unwrap_or_default());
            shared.counts.bridges_created.fetch_add(1, Ordering::SeqCst);
            (
                200,
                Some(
                    json!({"id": id, "technology": "simple_bridge", "bridge_type": q("type").unwrap_or("mixing".into()),
                "bridge_class": "stasis", "creator": "Stasis", "name": q("name").unwrap_or_default(),
                "channels": [], "creationtime": "2026-11-21T10:00:00.000+0000", "video_mode": "talker"}),
                ),
            )
        }
        ("POST", ["bridges", bid, "addChannel"]) => {
            let mut st = shared.state.lock().unwrap();
            if !st.bridges.contains_key(*bid) {
                return (404, msg("Bridge not found"));
            }
            let Some(list) = q("channel") else {
                return (400, msg("channel is required"));
            };
            let ids: Vec<String> = list.split(',').map(str::to_owned).collect();
            for c in &ids {
                match st.channels.get(c) {
                    None => return (400, msg("Channel not found")),
                    Some(ch) if !ch.in_stasis => {
                        return (422, msg("Channel not in Stasis application"));
                    }
                    Some(_) => {}
                }
            }
            for c in &ids {
                if st.bridges[*bid].contains(c) {
                    continue;
                }
                // One bridge per channel: a channel in another bridge leaves it first.
                if st.bridges.iter().any(|(b, m)| b != bid && m.contains(c)) {
                    shared.counts.bridge_moves.fetch_add(1, Ordering::SeqCst);
                    leave_bridges(&mut st, events, c);
                }
                let (j, app) = (st.channels[c].json(), st.channels[c].app.clone());
                st.bridges.get_mut(*bid).unwrap().push(c.clone());
                let apps = st.bridge_apps.entry(bid.to_string()).or_default();
                if !apps.contains(&app) {
                    apps.push(app.clone());
                }
                let _ = events.send(event(
                    "ChannelEnteredBridge",
                    &app,
                    json!({"bridge": {"id": bid}, "channel": j}),
                ));
            }
            // Audio flows once a caller and an externalMedia channel share the bridge.
            let members = st.bridges[*bid].clone();
            let has_caller = members
                .iter()
                .any(|m| st.channels.get(m).is_some_and(|c| c.media.is_none()));
            for m in &members {
                if let Some(media) = st.channels.get(m).and_then(|c| c.media.as_ref()) {
                    if has_caller {
                        media.bridged.send_replace(true);
                    }
                }
            }
            (204, None)
        }
        ("POST", ["bridges", bid, "removeChannel"]) => {
            let mut st = shared.state.lock().unwrap();
            let Some(members) = st.bridges.get_mut(*bid) else {
                return (404, msg("Bridge not found"));
            };
            let c = q("channel").unwrap_or_default();
            if !members.contains(&c) {
                return (422, msg("Channel not in this bridge"));
            }
            leave_bridges(&mut st, events, &c);
            (204, None)
        }
        ("DELETE", ["bridges", bid]) => {
            let mut st = shared.state.lock().unwrap();
            let Some(members) = st.bridges.get(*bid).cloned() else {
                return (404, msg("Bridge not found"));
            };
            // Members are put out of the bridge first (they stay in their application).
            for m in &members {
                leave_bridges(&mut st, events, m);
            }
            st.bridge_names.remove(*bid);
            st.bridges.remove(*bid);
            shared
                .counts
                .bridges_destroyed
                .fetch_add(1, Ordering::SeqCst);
            for app in st.bridge_apps.remove(*bid).unwrap_or_default() {
                let _ = events.send(event(
                    "BridgeDestroyed",
                    &app,
                    json!({"bridge": {"id": bid, "bridge_type": "mixing", "channels": []}}),
                ));
            }
            (204, None)
        }
        _ => (404, msg("Resource not found")),
    }
}

async fn external_media(req: &Request, shared: &Shared) -> (u16, Option<Value>) {
    let q = |k: &str| req.query(k);
    let (Some(host), Some(data), Some(format)) = (q("external_host"), q("data"), q("format"))
    else {
        return (400, msg("external_host, data and format are required"));
    };
    // RTP: chan_rtp's UnicastRTP channel (res/ari/resource_channels.c,
    // `external_media_rtp_udp`; channels/chan_rtp.c): Asterisk binds its own UDP port, sends
    // to `external_host`, and answers with `channelvars` naming its port.
    let rtp = q("encapsulation").as_deref() == Some("rtp");
    if rtp && q("transport").as_deref() != Some("udp") {
        return (400, msg("RTP requires transport udp"));
    }
    if !rtp
        && (q("transport").as_deref() == Some("udp")
            || q("encapsulation").as_deref() != Some("audiosocket"))
    {
        return (400, msg("AudioSocket requires transport tcp"));
    }
    let Some(app) = q("app").filter(|a| !a.is_empty()) else {
        return (400, msg("app cannot be empty"));
    };
    let Ok(uuid) = Uuid::parse_str(&data) else {
        return (500, msg("Failed to create external media channel"));
    };
    use voicegate::rtp::RtpFormat;
    let (rate, rtp_format) = match (rtp, format.as_str()) {
        (_, "slin16") => (SlinRate::Hz16000, Some(RtpFormat::Slin16)),
        (false, "slin") => (SlinRate::Hz8000, None),
        (true, "alaw") => (SlinRate::Hz8000, Some(RtpFormat::Alaw)),
        (true, "ulaw") => (SlinRate::Hz8000, Some(RtpFormat::Ulaw)),
        _ => return (400, msg("Unsupported format")),
    };
    let media_io = if rtp {
        let (Ok(peer), Ok(sock)) = (
            host.parse::<SocketAddr>(),
            tokio::net::UdpSocket::bind("127.0.0.1:0").await,
        ) else {
            return (500, msg("Failed to create external media channel"));
        };
        MediaIo::Rtp(sock, peer, rtp_format.expect("set for every RTP format"))
    } else {
        // Asterisk connects at once and sends the UUID as the call id.
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&host)).await
        else {
            return (500, msg("Failed to create external media channel"));
        };
        let _ = stream.set_nodelay(true);
        let mut out = BytesMut::new();
        codec::encode(&Message::CallId(uuid), &mut out);
        if stream.write_all(&out).await.is_err() {
            return (500, msg("Failed to create external media channel"));
        }
        MediaIo::Tcp(stream)
    };
    let local_rtp = match &media_io {
        MediaIo::Rtp(sock, ..) => sock.local_addr().ok(),
        MediaIo::Tcp(_) => None,
    };
    let (bridged_tx, bridged_rx) = watch::channel(false);
    let hangup = CancellationToken::new();
    let report = Arc::new(Mutex::new(MediaReport {
        call_id: Some(uuid),
        ..Default::default()
    }));
    let speech = if rate == shared.rate {
        shared.speech.clone()
    } else {
        Arc::new(Vec::new())
    };
    let (dtmf_tx, dtmf_rx) = tokio::sync::mpsc::unbounded_channel();
    let jitter = shared.state.lock().unwrap().media_jitter;
    match media_io {
        MediaIo::Tcp(stream) => {
            tokio::spawn(media_side(
                stream,
                (rate, jitter),
                speech,
                dtmf_rx,
                bridged_rx,
                hangup.clone(),
                report.clone(),
            ));
        }
        MediaIo::Rtp(sock, peer, fmt) => {
            tokio::spawn(rtp_media_side(
                (sock, peer, fmt),
                speech,
                bridged_rx,
                hangup.clone(),
                report.clone(),
            ));
        }
    }
    let mut st = shared.state.lock().unwrap();
    st.seq += 1;
    let id = format!("1763719200.{}", st.seq);
    let ch = FakeChannel {
        id: id.clone(),
        name: if rtp {
            format!("UnicastRTP/{host}-{:08x}", st.seq)
        } else {
            format!("AudioSocket/{host}-{:08x}", st.seq)
        },
        caller_name: String::new(),
        caller_number: String::new(),
        // Not yet: see [`MediaJoin`].
        in_stasis: false,
        context: "default".into(),
        exten: "s".into(),
        priority: 1,
        app_name: "Stasis".into(),
        app_data: format!("{app},{data}"),
        app: app.clone(),
        vars: BTreeMap::new(),
        media: Some(Media {
            uuid,
            dtmf: dtmf_tx,
            bridged: bridged_tx,
            hangup,
            report: report.clone(),
        }),
    };
    let mut j = ch.json();
    if let Some(at) = local_rtp {
        j["channelvars"] = json!({
            "UNICASTRTP_LOCAL_ADDRESS": at.ip().to_string(),
            "UNICASTRTP_LOCAL_PORT": at.port().to_string(),
        });
    }
    st.channels.insert(id.clone(), ch);
    st.media_reports.push(report);
    shared.counts.media_created.fetch_add(1, Ordering::SeqCst);
    let delay = match st.media_join {
        MediaJoin::Never => None,
        MediaJoin::Late if st.seq % 5 == 0 => Some(Duration::from_millis(150)),
        MediaJoin::Late => Some(Duration::from_millis(2 + (st.seq * 13) % 40)),
    };
    if let Some(delay) = delay {
        // The REST reply goes out first; the channel enters the application later.
        let state = shared.state.clone();
        let events = shared.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut st = state.lock().unwrap();
            let Some(ch) = st.channels.get_mut(&id) else {
                return;
            };
            ch.in_stasis = true;
            let _ = events.send(event(
                "StasisStart",
                &app,
                json!({"args": [data], "channel": ch.json()}),
            ));
        });
    }
    (200, Some(j))
}

/// The transport of one externalMedia channel.
enum MediaIo {
    Tcp(TcpStream),
    Rtp(tokio::net::UdpSocket, SocketAddr, voicegate::rtp::RtpFormat),
}

/// Asterisk's end of an externalMedia RTP channel (chan_rtp): waits for the bridge, then
/// sends the caller's speech (then silence) as one RTP packet every 20 ms to voicegate,
/// and records what voicegate sends back, from any source (the fake is not strict about
/// sources; Asterisk's strictrtp learns the first one), with the gap between packets.
async fn rtp_media_side(
    (sock, peer, fmt): (tokio::net::UdpSocket, SocketAddr, voicegate::rtp::RtpFormat),
    speech: Arc<Vec<i16>>,
    mut bridged: watch::Receiver<bool>,
    hangup: CancellationToken,
    report: Arc<Mutex<MediaReport>>,
) {
    let sock = Arc::new(sock);
    let rx = sock.clone();
    let rep = report.clone();
    let stop = hangup.clone();
    let reading = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        let mut samples = Vec::new();
        let mut last: Option<tokio::time::Instant> = None;
        loop {
            let n = tokio::select! {
                () = stop.cancelled() => break,
                r = rx.recv_from(&mut buf) => match r { Ok((n, _)) => n, Err(_) => continue },
            };
            let Ok(p) = voicegate::rtp::packet::parse(&buf[..n]) else {
                continue;
            };
            let now = tokio::time::Instant::now();
            let gap = last.map(|l| (now - l).as_secs_f64() * 1e3);
            last = Some(now);
            samples.clear();
            fmt.decode(p.payload, &mut samples);
            let mut r = rep.lock().unwrap();
            if let Some(g) = gap {
                r.gap_max_ms = r.gap_max_ms.max(g);
                r.gaps_ms.push(g);
            }
            r.frames_received += 1;
            r.received.extend_from_slice(&samples);
        }
    });
    tokio::select! {
        () = hangup.cancelled() => {}
        r = bridged.wait_for(|b| *b) => { let _ = r; }
    }
    let spf = fmt.samples_per_frame();
    let silence = vec![0i16; spf];
    let mut tx = voicegate::rtp::RtpSender::new(fmt, 0x5eed, 1, 0);
    let start = tokio::time::Instant::now();
    let mut out = Vec::with_capacity(12 + 2 * spf);
    let mut n = 0u64;
    while !hangup.is_cancelled() {
        tokio::select! {
            () = hangup.cancelled() => break,
            () = tokio::time::sleep_until(start + Duration::from_millis(20 * n)) => {}
        }
        let chunk = speech
            .chunks(spf)
            .nth(n as usize)
            .filter(|c| c.len() == spf)
            .unwrap_or(&silence);
        out.clear();
        tx.packet(chunk, &mut out);
        if sock.send_to(&out, peer).await.is_err() {
            break;
        }
        report.lock().unwrap().frames_sent += 1;
        n += 1;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), reading).await;
    report.lock().unwrap().closed = true;
}

/// Asterisk's end of an externalMedia AudioSocket: waits for the bridge, then sends the
/// caller's speech (then silence) one 20 ms frame every 20 ms, records what comes back.
async fn media_side(
    stream: TcpStream,
    (rate, jitter): (SlinRate, Option<voicegate::caller::InputJitter>),
    speech: Arc<Vec<i16>>,
    mut dtmf: tokio::sync::mpsc::UnboundedReceiver<char>,
    mut bridged: watch::Receiver<bool>,
    hangup: CancellationToken,
    report: Arc<Mutex<MediaReport>>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let rep = report.clone();
    let reading = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(4096);
        let mut samples = Vec::new();
        let mut last: Option<tokio::time::Instant> = None;
        loop {
            match read_message(&mut reader, &mut buf).await {
                Ok(Some(Message::Audio { payload, .. })) => {
                    samples.clear();
                    voicegate::audio::slin_from_le_bytes(&payload, &mut samples);
                    let now = tokio::time::Instant::now();
                    let gap = last.map_or(0.0, |l| (now - l).as_secs_f64() * 1e3);
                    last = Some(now);
                    let mut r = rep.lock().unwrap();
                    r.gap_max_ms = r.gap_max_ms.max(gap);
                    r.frames_received += 1;
                    r.received.extend_from_slice(&samples);
                }
                Ok(Some(Message::Hangup)) => {
                    rep.lock().unwrap().hangup_received = true;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    });
    tokio::select! {
        () = hangup.cancelled() => {}
        r = bridged.wait_for(|b| *b) => { let _ = r; }
    }
    let spf = rate.samples_per_frame();
    let silence = vec![0i16; spf];
    let start = tokio::time::Instant::now();
    let mut out = BytesMut::with_capacity(4 + rate.bytes_per_frame());
    let mut n = 0u64;
    while !hangup.is_cancelled() {
        tokio::select! {
            () = hangup.cancelled() => break,
            () = tokio::time::sleep_until(start + Duration::from_millis(20 * n + jitter.map_or(0, |j| j.late_ms(n)))) => {}
        }
        let chunk = speech
            .chunks(spf)
            .nth(n as usize)
            .filter(|c| c.len() == spf)
            .unwrap_or(&silence);
        out.clear();
        while let Ok(d) = dtmf.try_recv() {
            codec::encode(&Message::Dtmf(d), &mut out);
        }
        codec::encode_audio_samples(rate, chunk, &mut out);
        if writer.write_all(&out).await.is_err() {
            break;
        }
        report.lock().unwrap().frames_sent += 1;
        n += 1;
        if reading.is_finished() {
            break;
        }
    }
    let _ = writer.shutdown().await;
    drop(writer);
    let _ = tokio::time::timeout(Duration::from_secs(2), reading).await;
    report.lock().unwrap().closed = true;
}
