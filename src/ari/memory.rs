//! An in-memory Asterisk for the unit tests of the ARI controller on tokio's paused clock
//! (`#[tokio::test(start_paused = true)]`), so that its timings (retries, backoff, the
//! reconcile schedule, the transfer and media-join limits) are asserted exactly.
//!
//! It answers the REST requests voicegate makes ([`super::client::AriClient`] parses the
//! answers as it parses a real Asterisk's) with Asterisk 22's status codes and JSON shapes
//! (`rest-api/api-docs/channels.json`, `bridges.json` and `events.json` in the
//! asterisk-22.10.1 tarball of `shared/asterisk/`; error bodies `{"message": …}` as
//! `res/ari/resource_channels.c` and `resource_bridges.c` word them), and sends the events
//! they cause as JSON text through [`Event::parse`], as the events link does, in a real
//! Asterisk's order: a hangup gives `ChannelHangupRequest`, `ChannelLeftBridge`,
//! `StasisEnd`, `ChannelDestroyed`; `continue` gives `ChannelLeftBridge`, `StasisEnd`
//! (`tests/fake_ari/mod.rs` names the functions of the Asterisk source that publish them).
//!
//! As slow as a real one where the controller's timing depends on it: each answer takes
//! [`REPLY`] of virtual time; each event reaches the controller [`EVENT`] after what caused
//! it (so an externalMedia channel's `StasisStart` follows the REST answer, as observed on
//! Asterisk 22: `docs/asterisk.md`); a hung Asterisk ([`MemoryAsterisk::set_hung`]) takes
//! requests and never answers; events can be lost ([`MemoryAsterisk::lose_events`]). Every
//! request is logged with its virtual time ([`MemoryAsterisk::times`]).
//!
//! No socket under it: the same controller is tested over HTTP against the loopback fake
//! (`tests/suite/ari.rs`) and a real Asterisk (`tests/suite/asterisk.rs`).

use super::model::Event;
use bytes::Bytes;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long every REST answer takes.
pub(crate) const REPLY: Duration = Duration::from_millis(3);

/// How long after its cause an event reaches the controller.
pub(crate) const EVENT: Duration = Duration::from_millis(10);

/// `creationtime` of every channel and bridge, and every event's `timestamp`.
const CREATED: &str = "2026-12-03T10:00:00.000+0000";

/// A channel as Asterisk describes it.
#[derive(Debug, Clone)]
struct Chan {
    id: String,
    name: String,
    number: String,
    context: String,
    exten: String,
    app_name: String,
    app_data: String,
    /// The Stasis application the channel is in; empty outside Stasis.
    app: String,
}

impl Chan {
    /// `Channel` of `channels.json`.
    fn json(&self) -> Value {
        json!({
            "id": self.id, "name": self.name, "state": "Up", "protocol_id": "",
            "caller": {"name": "", "number": self.number},
            "connected": {"name": "", "number": ""}, "accountcode": "",
            "dialplan": {"context": self.context, "exten": self.exten, "priority": 1,
                         "app_name": self.app_name, "app_data": self.app_data},
            "creationtime": CREATED, "language": "en"
        })
    }
}

/// One request as it arrived.
#[derive(Debug, Clone)]
pub(crate) struct Logged {
    /// Virtual time since the Asterisk was made.
    pub(crate) at: Duration,
    /// `POST /channels/1764756000.1/continue` (path below `/ari`, without the query).
    pub(crate) line: String,
    /// The query, in order.
    pub(crate) query: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    seq: u64,
    channels: BTreeMap<String, Chan>,
    /// Bridge id → (name, members).
    bridges: BTreeMap<String, (String, Vec<String>)>,
    log: Vec<Logged>,
    hung: bool,
    lose_events: bool,
    /// The next this many `continue` requests answer 500.
    fail_continue: u32,
    /// `continue` moves the caller but its `StasisEnd` is lost.
    lose_stasis_end: bool,
    /// externalMedia channels never enter the application.
    media_never_joins: bool,
}

/// The in-memory Asterisk (module doc). Share it with [`super::client::AriClient::in_memory`].
pub(crate) struct MemoryAsterisk {
    app: String,
    t0: Instant,
    state: Mutex<State>,
    /// Events on their way to the controller, with the time they arrive.
    events: mpsc::UnboundedSender<(Instant, String)>,
}

impl MemoryAsterisk {
    /// An Asterisk with Stasis application `app`, its events going to `to` (the controller's
    /// event channel) by a task it spawns.
    pub(crate) fn new(app: &str, to: mpsc::Sender<Event>) -> std::sync::Arc<Self> {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, String)>();
        tokio::spawn(async move {
            while let Some((due, text)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                let ev = Event::parse(&text).expect("the in-memory Asterisk's events parse");
                if ev != Event::Other && to.send(ev).await.is_err() {
                    return;
                }
            }
        });
        std::sync::Arc::new(MemoryAsterisk {
            app: app.into(),
            t0: Instant::now(),
            state: Mutex::new(State::default()),
            events: tx,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("in-memory asterisk state")
    }

    /// Sends an event of `kind` with `body` (an object) to the application.
    fn emit(&self, st: &State, kind: &str, mut body: Value) {
        if st.lose_events {
            return;
        }
        let obj = body.as_object_mut().expect("an event body is an object");
        obj.insert("type".into(), json!(kind));
        obj.insert("timestamp".into(), json!(CREATED));
        obj.insert("asterisk_id".into(), json!("00:11:22:33:44:55"));
        obj.insert("application".into(), json!(self.app));
        let _ = self.events.send((Instant::now() + EVENT, body.to_string()));
    }

    /// A caller dials in and the dialplan runs `Stasis(<app>)`; its `StasisStart` is sent
    /// unless `announce` is false (a caller left by an earlier run, whose event is long
    /// gone). Returns the channel id.
    pub(crate) fn caller_enters(&self, number: &str, announce: bool) -> String {
        let mut st = self.state();
        let ch = Chan {
            context: "incoming".into(),
            app_name: "Stasis".into(),
            app_data: self.app.clone(),
            app: self.app.clone(),
            ..trunk_caller(&mut st, number)
        };
        if announce {
            let start = json!({"args": [], "channel": ch.json()});
            self.emit(&st, "StasisStart", start);
        }
        let id = ch.id.clone();
        st.channels.insert(id.clone(), ch);
        id
    }

    /// A caller inside `AudioSocket(<call id>,host:port)` (mode 1), outside Stasis.
    pub(crate) fn audiosocket_caller(&self, number: &str, call_id: &str) -> String {
        let mut st = self.state();
        let ch = Chan {
            context: "voicegate-app".into(),
            app_name: "AudioSocket".into(),
            app_data: format!("{call_id},127.0.0.1:9092"),
            ..trunk_caller(&mut st, number)
        };
        let id = ch.id.clone();
        st.channels.insert(id.clone(), ch);
        id
    }

    /// A bridge named `name` with no members, as a previous run may leave behind.
    pub(crate) fn leftover_bridge(&self, name: &str) -> String {
        let mut st = self.state();
        st.seq += 1;
        let id = format!("bridge-{}", st.seq);
        st.bridges.insert(id.clone(), (name.into(), Vec::new()));
        id
    }

    /// The caller hangs up.
    pub(crate) fn hang_up(&self, channel: &str) {
        let mut st = self.state();
        self.destroy(&mut st, channel);
    }

    /// A hung Asterisk takes requests and answers none (`true`), or answers again.
    pub(crate) fn set_hung(&self, hung: bool) {
        self.state().hung = hung;
    }

    /// Events are lost from now on (`true`): a link that does not know it lost them.
    pub(crate) fn lose_events(&self, lose: bool) {
        self.state().lose_events = lose;
    }

    /// The next `n` `continue` requests answer 500.
    pub(crate) fn fail_continue(&self, n: u32) {
        self.state().fail_continue = n;
    }

    /// `continue` moves the caller but its `StasisEnd` never arrives.
    pub(crate) fn lose_stasis_end_of_continue(&self) {
        self.state().lose_stasis_end = true;
    }

    /// externalMedia channels never enter the application.
    pub(crate) fn media_never_joins(&self) {
        self.state().media_never_joins = true;
    }

    /// Every request so far.
    pub(crate) fn requests(&self) -> Vec<Logged> {
        self.state().log.clone()
    }

    /// When each request whose line (`POST /channels/externalMedia`) `matches` arrived.
    pub(crate) fn times(&self, matches: impl Fn(&str) -> bool) -> Vec<Duration> {
        self.state()
            .log
            .iter()
            .filter(|l| matches(&l.line))
            .map(|l| l.at)
            .collect()
    }

    /// The `data` (call id) of every externalMedia channel created.
    pub(crate) fn media_data(&self) -> Vec<String> {
        let st = self.state();
        st.log
            .iter()
            .filter(|l| l.line == "POST /channels/externalMedia")
            .filter_map(|l| l.query.iter().find(|(k, _)| k == "data"))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Where channel `id` is in the dialplan (`context`, `app_name`), if it exists.
    pub(crate) fn whereabouts(&self, id: &str) -> Option<(String, String)> {
        let st = self.state();
        st.channels
            .get(id)
            .map(|c| (c.context.clone(), c.app_name.clone()))
    }

    /// Channels and bridges that exist.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let st = self.state();
        (st.channels.len(), st.bridges.len())
    }

    /// One request: logged on arrival, answered [`REPLY`] later (never while hung), with the
    /// status and body a real Asterisk gives.
    pub(crate) async fn exchange(
        &self,
        method: &'static str,
        path: &str,
        query: &[(&str, &str)],
    ) -> (u16, Bytes) {
        let hung = {
            let mut st = self.state();
            st.log.push(Logged {
                at: self.t0.elapsed(),
                line: format!("{method} {path}"),
                query: query
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            });
            st.hung
        };
        if hung {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(REPLY).await;
        let q = |k: &str| {
            query
                .iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        };
        let (status, body) = self.answer(method, path, &q);
        (
            status,
            body.map_or_else(Bytes::new, |b| b.to_string().into()),
        )
    }

    fn answer(
        &self,
        method: &str,
        path: &str,
        q: &dyn Fn(&str) -> Option<String>,
    ) -> (u16, Option<Value>) {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let mut st = self.state();
        match (method, parts.as_slice()) {
            ("GET", ["channels"]) => (200, Some(st.channels.values().map(Chan::json).collect())),
            ("GET", ["bridges"]) => {
                let list = st.bridges.iter().map(|(id, (name, m))| bridge(id, name, m));
                (200, Some(list.collect()))
            }
            ("POST", ["channels", "externalMedia"]) => self.external_media(&mut st, q),
            ("DELETE", ["channels", id]) => match self.destroy(&mut st, id) {
                true => (204, None),
                false => (404, msg("Channel not found")),
            },
            ("POST", ["channels", id, action]) => {
                let Some(ch) = st.channels.get(*id) else {
                    return (404, msg("Channel not found"));
                };
                if ch.app.is_empty() {
                    return (409, msg("Channel not in Stasis application"));
                }
                match *action {
                    "answer" => (204, None),
                    "continue" => self.continue_in_dialplan(&mut st, id, q),
                    _ => (404, msg("Resource not found")),
                }
            }
            ("POST", ["bridges"]) => {
                st.seq += 1;
                let id = format!("bridge-{}", st.seq);
                let name = q("name").unwrap_or_default();
                st.bridges.insert(id.clone(), (name.clone(), Vec::new()));
                (200, Some(bridge(&id, &name, &[])))
            }
            ("POST", ["bridges", b, "addChannel"]) => self.add_channels(&mut st, b, q),
            ("POST", ["bridges", b, "removeChannel"]) => {
                let c = q("channel").unwrap_or_default();
                match st.bridges.get(*b) {
                    None => (404, msg("Bridge not found")),
                    Some((_, m)) if !m.contains(&c) => (422, msg("Channel not in bridge")),
                    Some(_) => {
                        self.leave_bridges(&mut st, &c);
                        (204, None)
                    }
                }
            }
            ("DELETE", ["bridges", b]) => {
                let Some((_, members)) = st.bridges.get(*b).cloned() else {
                    return (404, msg("Bridge not found"));
                };
                for m in &members {
                    self.leave_bridges(&mut st, m);
                }
                st.bridges.remove(*b);
                let gone = json!({"bridge": bridge(b, "", &[])});
                self.emit(&st, "BridgeDestroyed", gone);
                (204, None)
            }
            _ => (404, msg("Resource not found")),
        }
    }

    /// `POST /channels/externalMedia` (`res/ari/resource_channels.c`,
    /// `ast_ari_channels_external_media`): the new channel, which enters the application
    /// with `data` as its argument after the answer.
    fn external_media(
        &self,
        st: &mut State,
        q: &dyn Fn(&str) -> Option<String>,
    ) -> (u16, Option<Value>) {
        let (Some(data), Some(_format)) = (q("data"), q("format")) else {
            return (400, msg("external_host, data and format are required"));
        };
        if q("app").is_none_or(|a| a.is_empty()) {
            return (400, msg("app cannot be empty"));
        }
        if uuid::Uuid::parse_str(&data).is_err() {
            return (500, msg("Failed to create external media channel"));
        }
        st.seq += 1;
        let host = q("external_host").unwrap_or_default();
        let mut ch = Chan {
            id: format!("1764756000.{}", st.seq),
            name: format!("AudioSocket/{host}-{:08x}", st.seq),
            number: String::new(),
            context: "default".into(),
            exten: "s".into(),
            app_name: String::new(),
            app_data: String::new(),
            app: String::new(),
        };
        let answer = ch.json();
        if !st.media_never_joins {
            ch.app = self.app.clone();
            ch.app_name = "Stasis".into();
            ch.app_data = format!("{},{data}", self.app);
            let start = json!({"args": [data], "channel": ch.json()});
            self.emit(st, "StasisStart", start);
        }
        st.channels.insert(ch.id.clone(), ch);
        (200, Some(answer))
    }

    /// `POST /channels/{id}/continue`: out of its bridge, out of the application.
    fn continue_in_dialplan(
        &self,
        st: &mut State,
        id: &str,
        q: &dyn Fn(&str) -> Option<String>,
    ) -> (u16, Option<Value>) {
        if st.fail_continue > 0 {
            st.fail_continue -= 1;
            return (500, msg("Internal Server Error"));
        }
        self.leave_bridges(st, id);
        let lose = st.lose_stasis_end;
        let ch = st.channels.get_mut(id).expect("looked up by the caller");
        ch.app.clear();
        ch.context = q("context").unwrap_or_default();
        ch.exten = q("extension").unwrap_or_default();
        ch.app_name = "Queue".into();
        ch.app_data = "operators".into();
        let end = json!({"channel": ch.json()});
        if !lose {
            self.emit(st, "StasisEnd", end);
        }
        (204, None)
    }

    /// `POST /bridges/{id}/addChannel?channel=a,b`: 422 for a channel not in Stasis (yet).
    fn add_channels(
        &self,
        st: &mut State,
        bridge_id: &str,
        q: &dyn Fn(&str) -> Option<String>,
    ) -> (u16, Option<Value>) {
        if !st.bridges.contains_key(bridge_id) {
            return (404, msg("Bridge not found"));
        }
        let list = q("channel").unwrap_or_default();
        let ids: Vec<&str> = list.split(',').collect();
        for c in &ids {
            match st.channels.get(*c) {
                None => return (400, msg("Channel not found")),
                Some(ch) if ch.app.is_empty() => {
                    return (422, msg("Channel not in Stasis application"));
                }
                Some(_) => {}
            }
        }
        for c in ids {
            let j = st.channels[c].json();
            let members = &mut st.bridges.get_mut(bridge_id).expect("checked").1;
            if !members.iter().any(|m| m == c) {
                members.push(c.to_owned());
                let entered = json!({"bridge": {"id": bridge_id}, "channel": j});
                self.emit(st, "ChannelEnteredBridge", entered);
            }
        }
        (204, None)
    }

    /// Takes channel `id` out of every bridge, with `ChannelLeftBridge` for each.
    fn leave_bridges(&self, st: &mut State, id: &str) {
        let Some(j) = st.channels.get(id).map(Chan::json) else {
            return;
        };
        let mut left = Vec::new();
        for (b, (name, members)) in st.bridges.iter_mut() {
            if members.iter().any(|m| m == id) {
                members.retain(|m| m != id);
                left.push(json!({"bridge": bridge(b, name, members), "channel": j}));
            }
        }
        for l in left {
            self.emit(st, "ChannelLeftBridge", l);
        }
    }

    /// Hangs channel `id` up with a real hangup's events; false if there is no such channel.
    fn destroy(&self, st: &mut State, id: &str) -> bool {
        let Some(j) = st.channels.get(id).map(Chan::json) else {
            return false;
        };
        self.emit(
            st,
            "ChannelHangupRequest",
            json!({"cause": 16, "channel": j}),
        );
        self.leave_bridges(st, id);
        let ch = st.channels.remove(id).expect("looked up above");
        if !ch.app.is_empty() {
            self.emit(st, "StasisEnd", json!({"channel": j}));
        }
        let destroyed = json!({"cause": 16, "cause_txt": "Normal Clearing", "channel": j});
        self.emit(st, "ChannelDestroyed", destroyed);
        true
    }
}

/// A new SIP caller's channel with the next id, in no application yet.
fn trunk_caller(st: &mut State, number: &str) -> Chan {
    st.seq += 1;
    Chan {
        id: format!("1764756000.{}", st.seq),
        name: format!("PJSIP/trunk-{:08x}", st.seq),
        number: number.into(),
        context: String::new(),
        exten: "s".into(),
        app_name: String::new(),
        app_data: String::new(),
        app: String::new(),
    }
}

/// `Bridge` of `bridges.json`.
fn bridge(id: &str, name: &str, members: &[String]) -> Value {
    json!({"id": id, "technology": "simple_bridge", "bridge_type": "mixing",
        "bridge_class": "stasis", "creator": "Stasis", "name": name,
        "channels": members, "creationtime": CREATED, "video_mode": "talker"})
}

/// Asterisk's error body.
fn msg(m: &str) -> Option<Value> {
    Some(json!({ "message": m }))
}
