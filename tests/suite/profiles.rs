//! Agent profiles end to end: the dialplan's announce (`POST /v1/calls/{uuid}` on the health
//! listener's router, in process) chooses a profile for the AudioSocket call that follows;
//! the chosen profile's agent (OpenAI Realtime, talking to the fake server in
//! `tests/common/fake_openai.rs`, real wire format) receives its instructions and greeting
//! with the `{placeholders}` filled; the DID map is the fallback; an unknown profile gets the
//! default or is refused per `[profile_routing]`.

use crate::fake_openai;

use fake_openai::{FakeConn, FakeOpenAi};
use http_body_util::Full;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use voicegate::agent::SharedAgent;
use voicegate::agent::openai_realtime::OpenAiRealtime;
use voicegate::audio::convert::WireFormat;
use voicegate::audio::g711::Law;
use voicegate::audio::wav::Recording;
use voicegate::audiosocket::SlinRate;
use voicegate::audiosocket::server::Server;
use voicegate::call::route::{Generation, Router, ServerParams};
use voicegate::call::{CallSummary, Outcome};
use voicegate::caller::{CallPlan, run_call};
use voicegate::config::{AudioSocketConfig, OpenAiRealtimeConfig};
use voicegate::profiles::announce::Announcements;
use voicegate::profiles::{ProfileRoutingConfig, Profiles, Unmatched};
use voicegate::secret::SecretSource;

const KEY: &str = "sk-test-profiles";
const ULAW: WireFormat = WireFormat::G711(Law::Ulaw);

fn agent(url: &str, instructions: &str, greeting: Option<&str>) -> SharedAgent {
    let cfg = OpenAiRealtimeConfig {
        url: url.to_owned(),
        api_key: SecretSource::Inline(KEY.into()),
        instructions: instructions.into(),
        greeting: greeting.map(str::to_owned),
        connect_timeout_ms: 2_000,
        ..OpenAiRealtimeConfig::default()
    };
    Arc::new(OpenAiRealtime::new(&cfg).expect("agent config"))
}

/// The AudioSocket listener with a default agent and a `sales` profile, both on `fake`,
/// `"300"` mapped to `sales`, and the announce route.
struct Box {
    addr: std::net::SocketAddr,
    http: voicegate::health::http::Router,
    summaries: mpsc::UnboundedReceiver<CallSummary>,
    _stop: tokio_util::sync::DropGuard,
}

async fn start(fake: &FakeOpenAi, unknown: Unmatched) -> Box {
    let default = agent(&fake.url, "General desk for {caller_number}.", None);
    let sales = agent(
        &fake.url,
        "Sales desk. Caller {caller_number} dialled {called_number}; customer {customer}.",
        Some("Hello {caller_name}, sales here."),
    );
    let routing = ProfileRoutingConfig {
        unknown_profile: unknown,
        dids: [("300".to_owned(), "sales".to_owned())].into(),
        ..ProfileRoutingConfig::default()
    };
    let profiles = Profiles::single(default.clone())
        .with_profile("sales", sales)
        .with_routing(routing);
    let params = ServerParams::from_config(&AudioSocketConfig::default());
    let generation = Generation::new(default, params).with_profiles(profiles);
    let announcements = Arc::new(Announcements::new());
    let (tx, summaries) = mpsc::unbounded_channel();
    let mut router = Router::fixed(generation);
    router.summaries = Some(tx.into());
    router.announcements = Some(announcements.clone());
    let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(Arc::new(router), stop.clone()));
    let http =
        voicegate::app::http::announce_route(voicegate::health::http::Router::new(), announcements);
    Box {
        addr,
        http,
        summaries,
        _stop: stop.drop_guard(),
    }
}

impl Box {
    /// `POST /v1/calls/{id}` with `body` as the dialplan's `CURL()` sends it; the status.
    async fn announce(&self, id: &str, body: &str) -> u16 {
        let req = hyper::Request::post(format!("/v1/calls/{id}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(bytes::Bytes::from(body.to_owned())))
            .unwrap();
        self.http.handle(req).await.status().as_u16()
    }

    async fn next_summary(&mut self) -> CallSummary {
        tokio::time::timeout(Duration::from_secs(10), self.summaries.recv())
            .await
            .expect("a call summary in time")
            .expect("server running")
    }
}

fn plan(call_id: uuid::Uuid) -> CallPlan {
    CallPlan {
        call_id,
        rate: SlinRate::Hz8000,
        speech: Recording {
            rate_hz: 8_000,
            samples: vec![],
        },
        speech_offset: Duration::from_millis(100),
        dtmf: vec![],
        duration: Duration::from_millis(1_500),
    }
}

/// Places the call; meanwhile the fake accepts the agent's session and returns its
/// `session.update` and the events after it.
async fn call_and_capture(b: &Box, fake: &FakeOpenAi, id: uuid::Uuid) -> (Value, Vec<Value>) {
    let stream = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let caller = tokio::spawn(async move { run_call(stream, &plan(id)).await });
    let (_, conn) = fake.accept(None, Instant::now()).await;
    let mut c: FakeConn = conn.expect("the agent's session");
    c.session_created().await;
    let update = c.expect("session.update").await;
    c.session_updated(&update, (ULAW, ULAW)).await;
    let mut after = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(3), c.next_event()).await {
        if ev["type"] != "input_audio_buffer.append" {
            after.push(ev);
        }
    }
    caller.await.unwrap().expect("call");
    (update, after)
}

#[tokio::test]
async fn an_announced_profile_runs_with_its_placeholders_filled() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut b = start(&fake, Unmatched::Default).await;
    let id = uuid::Uuid::new_v4();
    let body = "profile=sales&caller_number=%2B4930123&caller_name=Ann+Lee&called_number=200&var_customer=C-17";
    assert_eq!(b.announce(&id.to_string(), body).await, 204);
    let (update, after) = call_and_capture(&b, &fake, id).await;
    assert_eq!(
        update["session"]["instructions"],
        "Sales desk. Caller +4930123 dialled 200; customer C-17."
    );
    let greeting = after
        .iter()
        .find(|e| e["type"] == "response.create")
        .expect("the sales profile greets first");
    let text = greeting["response"]["instructions"].as_str().unwrap();
    assert!(text.contains("\"Hello Ann Lee, sales here.\""), "{text}");
    let s = b.next_summary().await;
    assert_eq!(s.call_id, id);
    assert_eq!(s.profile.as_deref(), Some("sales"));
    assert_eq!(s.caller_number.as_deref(), Some("+4930123"));
}

#[tokio::test]
async fn the_called_number_chooses_when_no_profile_is_named() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut b = start(&fake, Unmatched::Default).await;
    let id = uuid::Uuid::new_v4();
    let body = "caller_number=555&called_number=300";
    assert_eq!(b.announce(&id.to_string(), body).await, 204);
    let (update, _) = call_and_capture(&b, &fake, id).await;
    assert_eq!(
        update["session"]["instructions"],
        "Sales desk. Caller 555 dialled 300; customer {customer}."
    );
    assert_eq!(b.next_summary().await.profile.as_deref(), Some("sales"));
}

#[tokio::test]
async fn an_unannounced_call_and_an_unknown_profile_get_the_default() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut b = start(&fake, Unmatched::Default).await;
    let (update, _) = call_and_capture(&b, &fake, uuid::Uuid::new_v4()).await;
    assert_eq!(update["session"]["instructions"], "General desk for .");
    assert_eq!(b.next_summary().await.profile.as_deref(), Some("default"));

    let id = uuid::Uuid::new_v4();
    let body = "profile=nosuch&caller_number=777";
    assert_eq!(b.announce(&id.to_string(), body).await, 204);
    let (update, _) = call_and_capture(&b, &fake, id).await;
    assert_eq!(update["session"]["instructions"], "General desk for 777.");
    assert_eq!(b.next_summary().await.profile.as_deref(), Some("default"));
}

#[tokio::test]
async fn an_unknown_profile_is_refused_when_configured_so() {
    let fake = FakeOpenAi::bind(KEY).await;
    let mut b = start(&fake, Unmatched::Refuse).await;
    let id = uuid::Uuid::new_v4();
    assert_eq!(b.announce(&id.to_string(), "profile=nosuch").await, 204);
    let stream = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let report = run_call(stream, &plan(id)).await.expect("call");
    assert!(report.hangup_received, "voicegate hung up the refused call");
    let s = b.next_summary().await;
    assert!(
        matches!(&s.outcome, Outcome::Rejected(r) if r.contains("nosuch")),
        "{:?}",
        s.outcome
    );
    assert_eq!(s.profile, None);
    assert_eq!(s.agent_time, Duration::ZERO, "no agent session ran");
}

#[tokio::test]
async fn a_bad_announce_is_answered_400() {
    let fake = FakeOpenAi::bind(KEY).await;
    let b = start(&fake, Unmatched::Default).await;
    assert_eq!(b.announce("not-a-uuid", "profile=sales").await, 400);
    let id = uuid::Uuid::new_v4().to_string();
    assert_eq!(b.announce(&id, "{\"profile\": 7}").await, 400);
}
