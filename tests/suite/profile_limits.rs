//! Per-profile tools and limits end to end, over the WebSocket media channel: a fake
//! Asterisk (`chan_websocket`'s client side: the upgrade of `res_http_websocket.c`'s
//! `websocket_client_handshake`, then `MEDIA_START` as `chan_websocket.c` writes it, shapes
//! from `src/chanws/protocol.rs`) dials the real chanws listener with
//! `v(profile=sales,caller=...)`, which arrives as the URI's query. The listener's
//! [`WebSocketCalls`] hands each call to the same [`Router`] as AudioSocket, with a guard.
//! Scripted agents (`tests/support/mod.rs`) report the [`CallInfo`] each session got: which
//! agent ran is the profile chosen, and its `tools` are what the model would be declared.
//! `[profiles.limits]`: `max_calls` and `daily_budget_minutes` send the call over them to
//! the operators with the reason in its record; `max_call_s` ends the profile's calls (one
//! test takes its 10 s minimum in real time).

use crate::support;

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use support::ScriptAgent;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use voicegate::agent::{AgentEndpoint, CallInfo, SharedAgent};
use voicegate::call::media_ws::WebSocketCalls;
use voicegate::call::route::{Generation, Router, ServerParams};
use voicegate::call::{CallSummary, Outcome};
use voicegate::chanws::protocol::{Command, ControlFormat, Event, MediaFormat, MediaStart};
use voicegate::chanws::server::{ListenSettings, Server};
use voicegate::config::AudioSocketConfig;
use voicegate::fallback::FallbackReason;
use voicegate::guard::{Guard, GuardConfig, ProfileLimits, Rejection};
use voicegate::profiles::Profiles;
use voicegate::tools::{ToolConfig, ToolRegistry};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sessions = mpsc::UnboundedReceiver<(CallInfo, AgentEndpoint)>;

/// The box: `[[tools]]` = search_tires, hangup, transfer_to_operator; the default profile
/// and `sales` (tools: `hangup` only; `limits`), each on its own scripted agent.
struct Box {
    addr: SocketAddr,
    default: Sessions,
    sales: Sessions,
    summaries: mpsc::UnboundedReceiver<CallSummary>,
    guard: Arc<Guard>,
    _stop: tokio_util::sync::DropGuard,
}

fn box_tools() -> ToolRegistry {
    let cfg: Vec<ToolConfig> = serde_json::from_value(serde_json::json!([
        {"name": "search_tires", "description": "Find tyres", "url": "http://127.0.0.1:9/t"},
        {"kind": "hangup"},
        {"kind": "transfer_to_operator"},
    ]))
    .unwrap();
    ToolRegistry::from_config(&cfg).unwrap()
}

async fn start(limits: ProfileLimits) -> Box {
    let (default_agent, default) = ScriptAgent::new();
    let (sales_agent, sales) = ScriptAgent::new();
    let default_agent: SharedAgent = Arc::new(default_agent);
    let box_tools = box_tools();
    let sales_tools = box_tools
        .for_profile(Some(&["hangup".into()]), &[])
        .unwrap();
    let profiles = Profiles::single(default_agent.clone())
        .with_profile("sales", Arc::new(sales_agent))
        .with_tools("sales", sales_tools)
        .with_limits("sales", limits);
    let params =
        ServerParams::from_config(&AudioSocketConfig::default()).with_tools(Arc::new(box_tools));
    let generation = Generation::new(default_agent, params).with_profiles(profiles);
    let guard = Arc::new(Guard::new(GuardConfig::default(), None).unwrap());
    let (tx, summaries) = mpsc::unbounded_channel();
    let mut router = Router::fixed(generation);
    router.summaries = Some(tx.into());
    router.guard = Some(guard.clone());
    let calls = WebSocketCalls {
        router: Arc::new(router),
        settings: ListenSettings {
            handshake_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_millis(100),
            credentials: None,
            max_message_bytes: 65_536,
        },
    };
    let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = server.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.run(Arc::new(calls), stop.clone()));
    Box {
        addr,
        default,
        sales,
        summaries,
        guard,
        _stop: stop.drop_guard(),
    }
}

/// Dials the listener as Asterisk does for `WebSocket/voicegate/c(slin16)/v(<query>)`:
/// the upgrade with `Sec-WebSocket-Protocol: media` and the `v()` pairs as the query, then
/// `MEDIA_START` in JSON and one frame of audio.
async fn dial(addr: SocketAddr, query: &str) -> Ws {
    let mut req = format!("ws://{addr}/media?{query}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("media"));
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let start = Event::MediaStart(MediaStart {
        connection_id: "voicegate".into(),
        channel: "WebSocket/voicegate/0x55d0c0ffee00".into(),
        channel_id: "1764712345.42".into(),
        format: MediaFormat::Slin(16_000),
        optimal_frame_size: 640,
        ptime: 20,
        channel_variables: Default::default(),
    });
    let text = start.render(ControlFormat::Json, "1764712345.42");
    ws.send(Message::text(text)).await.unwrap();
    // The caller's first audio (20 ms of slin16): the session starts the agent with it.
    ws.send(Message::binary(vec![0u8; 640])).await.unwrap();
    ws
}

async fn session(rx: &mut Sessions) -> (CallInfo, AgentEndpoint) {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an agent session in time")
        .expect("agent alive")
}

async fn summary(b: &mut Box) -> CallSummary {
    tokio::time::timeout(Duration::from_secs(10), b.summaries.recv())
        .await
        .expect("a call summary in time")
        .expect("router alive")
}

fn names(info: &CallInfo) -> Vec<&str> {
    info.tools.iter().map(|t| t.name.as_str()).collect()
}

/// Reads what voicegate sends until the socket closes; the commands, in order.
async fn commands_until_close(ws: &mut Ws) -> Vec<Command> {
    let mut out = Vec::new();
    let read = async {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Text(t) => out.push(Command::parse(&t, ControlFormat::Json).unwrap()),
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("voicegate closes the channel");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v_profile_chooses_the_agent_and_its_tools() {
    let mut b = start(ProfileLimits::default()).await;
    let mut sales = dial(b.addr, "profile=sales&caller=%2B4930123&customer=C-17").await;
    let (info, _agent) = session(&mut b.sales).await;
    assert_eq!(names(&info), ["hangup"]);
    assert_eq!(info.caller_number.as_deref(), Some("+4930123"));
    assert_eq!(info.variables["profile"], "sales");
    assert_eq!(info.variables["customer"], "C-17");
    assert!(b.default.try_recv().is_err(), "the default agent ran too");

    // No profile in v(): the default agent, with every [[tools]] entry of the box.
    let mut plain = dial(b.addr, "caller=%2B4930999").await;
    let (info, _agent2) = session(&mut b.default).await;
    assert_eq!(
        names(&info),
        ["search_tires", "hangup", "transfer_to_operator"]
    );
    assert_eq!(info.variables["profile"], "default");

    // Both sessions are up for at least 50 ms: their agent time is charged.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for ws in [&mut sales, &mut plain] {
        ws.close(None).await.unwrap();
    }
    let mut profiles = [summary(&mut b).await, summary(&mut b).await];
    profiles.sort_by_key(|s| s.profile.clone());
    let got: Vec<_> = profiles.iter().map(|s| s.profile.as_deref()).collect();
    assert_eq!(got, [Some("default"), Some("sales")]);
    assert!(profiles.iter().all(|s| s.transport == "websocket"));
    // The sales call's minutes count in its profile's share and in the box's total.
    let now = SystemTime::now();
    let sales_used = b.guard.profile_budget_used("sales", now);
    assert!(sales_used >= Duration::from_millis(50), "{sales_used:?}");
    assert!(b.guard.budget_used(now) >= sales_used + Duration::from_millis(50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_whose_minutes_are_spent_sends_its_calls_to_the_operators() {
    let minute = ProfileLimits {
        daily_budget_minutes: 1,
        ..ProfileLimits::default()
    };
    let mut b = start(minute).await;
    b.guard
        .charge_profile(Some("sales"), Duration::from_secs(60), SystemTime::now());
    let mut ws = dial(b.addr, "profile=sales&caller=100").await;
    let cmds = commands_until_close(&mut ws).await;
    assert!(cmds.contains(&Command::Hangup), "{cmds:?}");
    let s = summary(&mut b).await;
    assert_eq!(
        s.outcome.label(),
        (
            "fallback",
            Some("profile \"sales\": the profile's daily AI budget is spent")
        )
    );
    assert_eq!(
        s.fallback.as_ref().map(FallbackReason::label),
        Some("profile_budget_spent")
    );
    assert!(b.sales.try_recv().is_err(), "an agent session was opened");
    // The box's budget (none configured) and the default profile are not affected.
    let _other = dial(b.addr, "caller=200").await;
    let (info, _agent) = session(&mut b.default).await;
    assert_eq!(info.caller_number.as_deref(), Some("200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_at_its_call_limit_sends_the_next_call_to_the_operators() {
    let one = ProfileLimits {
        max_calls: 1,
        ..ProfileLimits::default()
    };
    let mut b = start(one).await;
    let mut first = dial(b.addr, "profile=sales&caller=100").await;
    let (_info, _agent) = session(&mut b.sales).await;
    assert_eq!(b.guard.profile_calls("sales"), 1);

    // The second sales call: no agent session; HANGUP and a close send it back to the
    // dialplan, whose next priority is the operators.
    let mut second = dial(b.addr, "profile=sales&caller=200").await;
    let cmds = commands_until_close(&mut second).await;
    assert!(cmds.contains(&Command::Hangup), "{cmds:?}");
    let s = summary(&mut b).await;
    assert_eq!(s.caller_number.as_deref(), Some("200"));
    assert_eq!(s.profile.as_deref(), Some("sales"));
    assert_eq!(
        s.fallback,
        Some(FallbackReason::ProfileLimit {
            profile: "sales".into(),
            limit: Rejection::ProfileLimit,
        })
    );
    assert_eq!(
        s.outcome.label(),
        (
            "fallback",
            Some("profile \"sales\": the profile's call limit is reached")
        )
    );
    assert!(matches!(s.outcome, Outcome::Fallback(_)));
    assert!(b.sales.try_recv().is_err(), "an agent session was opened");

    // Other profiles are not limited by it.
    let _other = dial(b.addr, "caller=300").await;
    let (_info, _agent3) = session(&mut b.default).await;

    // The first call ends: its slot is free, the next sales call gets its agent.
    first.close(None).await.unwrap();
    let s = summary(&mut b).await;
    assert_eq!(s.caller_number.as_deref(), Some("100"));
    assert_eq!(b.guard.profile_calls("sales"), 0);
    let _third = dial(b.addr, "profile=sales&caller=400").await;
    let (info, _agent4) = session(&mut b.sales).await;
    assert_eq!(info.caller_number.as_deref(), Some("400"));
}

/// `[profiles.limits] max_call_s`: the profile's call ends at its own limit (the box has
/// none here), with `HANGUP` and the record `max_duration`, while the caller still talks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profiles_max_call_s_ends_its_calls() {
    let ten = ProfileLimits {
        max_call_s: 10,
        ..ProfileLimits::default()
    };
    let mut b = start(ten).await;
    let ws = dial(b.addr, "profile=sales&caller=100").await;
    let (_info, _agent) = session(&mut b.sales).await;
    let (mut tx, mut rx) = ws.split();
    // The caller keeps sending 20 ms frames until voicegate closes.
    let talk = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(20));
        loop {
            every.tick().await;
            if tx.send(Message::binary(vec![0u8; 640])).await.is_err() {
                break;
            }
        }
    });
    let began = tokio::time::Instant::now();
    let hangup = async {
        while let Some(Ok(m)) = rx.next().await {
            if let Message::Text(t) = m
                && Command::parse(&t, ControlFormat::Json) == Ok(Command::Hangup)
            {
                return;
            }
        }
        panic!("closed without HANGUP");
    };
    tokio::time::timeout(Duration::from_secs(20), hangup)
        .await
        .expect("HANGUP within 20 s");
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(9_500), "{took:?}");
    let s = summary(&mut b).await;
    assert_eq!(s.outcome, Outcome::MaxDuration, "{s:?}");
    assert_eq!(s.profile.as_deref(), Some("sales"));
    talk.abort();
}
