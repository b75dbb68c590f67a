//! The console's HTTP routes on the health listener (docs/console.md lists them):
//!
//! | route | auth | answer |
//! |---|---|---|
//! | `GET /console`, `/console/app.js`, `/console/app.css` | none | the embedded page |
//! | `POST /console/login` `{"password": …}` | rate limit | `204` + cookie, `401`, `429` |
//! | `POST /console/logout` | CSRF | `204` |
//! | `GET /console/api/session` | cookie | `{"csrf", "mode"}` |
//! | `GET /console/api/events` | cookie | `text/event-stream`: a snapshot, then live lines |
//! | `POST /console/api/calls/{id}/takeover` and `/hangup` | CSRF | `204`, `404` |
//! | `POST /console/api/maintenance` `{"on": bool}` | CSRF | `204` |
//! | `GET /console/api/handovers` | cookie | the handover cards, newest first |
//! | `GET /console/api/history?from=&to=&number=&outcome=&format=json\|csv` | cookie | records |
//! | `GET /console/api/state` | cookie | health, budget, tunnel, feed drops |
//!
//! Without a valid session the API answers `401`; an action without the session's CSRF
//! token in `X-CSRF-Token` answers `403`. Every page carries a strict Content-Security-Policy
//! (only its own script and style) and `X-Frame-Options: DENY`.

use super::auth::Auth;
use super::{Action, Console, EVENTS_DROPPED};
use crate::health::http::{HttpResponse, RouteRequest, Router, json, respond};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tracing::{info, warn};
use uuid::Uuid;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// How long one event stream lasts: less than the listener's connection limit
/// ([`crate::health::http::CONNECTION_TIMEOUT`]); the browser's `EventSource` reconnects
/// at once (`retry: 500`) and gets a fresh snapshot.
pub(crate) const STREAM_LIFETIME: Duration = Duration::from_secs(8);

/// What the routes need besides the console.
#[derive(Debug)]
pub(crate) struct Deps {
    /// The console.
    pub(crate) console: Arc<Console>,
    /// Logins and sessions.
    pub(crate) auth: Arc<Auth>,
    /// The records spool, when `[records] enabled`.
    pub(crate) spool: Option<PathBuf>,
    /// The guard (today's AI budget).
    pub(crate) guard: Option<Arc<crate::guard::Guard>>,
    /// The WireGuard tunnel, when configured.
    pub(crate) tunnel: Option<crate::tunnel::Tunnel>,
    /// Live-feed lines dropped for slow browsers.
    pub(crate) dropped: AtomicU64,
}

fn with_headers(mut r: HttpResponse, extra: &[(&'static str, String)]) -> HttpResponse {
    let h = r.headers_mut();
    for (k, v) in [
        ("cache-control", "no-store"),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        (
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    for (k, v) in extra {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.append(HeaderName::from_static(k), v);
        }
    }
    r
}

fn status(code: StatusCode, msg: &'static str) -> HttpResponse {
    with_headers(json(code, &serde_json::json!({"error": msg})), &[])
}

fn no_content(extra: &[(&'static str, String)]) -> HttpResponse {
    with_headers(
        respond(StatusCode::NO_CONTENT, "text/plain", Bytes::new()),
        extra,
    )
}

/// The console's routes added to `router`.
pub(crate) fn routes(router: Router, deps: Arc<Deps>) -> Router {
    let asset = |ct: &'static str, body: &'static str| {
        move |_req: RouteRequest| async move {
            with_headers(
                respond(StatusCode::OK, ct, Bytes::from_static(body.as_bytes())),
                &[],
            )
        }
    };
    let d = deps.clone();
    let router = router
        .route(
            Method::GET,
            "/console",
            asset("text/html; charset=utf-8", INDEX),
        )
        .route(
            Method::GET,
            "/console/app.js",
            asset("text/javascript; charset=utf-8", SCRIPT),
        )
        .route(
            Method::GET,
            "/console/app.css",
            asset("text/css; charset=utf-8", STYLE),
        )
        .route(Method::POST, "/console/login", move |req| {
            login(d.clone(), req)
        });
    let d = deps.clone();
    let router = router.route(Method::POST, "/console/logout", move |req| {
        let d = d.clone();
        async move {
            let Some(s) = d.auth.action(&req.headers) else {
                return status(StatusCode::FORBIDDEN, "csrf");
            };
            info!(target: "voicegate::audit", action = "logout", who = %s.label, "console action");
            d.auth.logout(&req.headers);
            no_content(&[(
                "set-cookie",
                format!(
                    "{}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
                    super::auth::COOKIE
                ),
            )])
        }
    });
    let d = deps.clone();
    let router = router.route(Method::GET, "/console/api/session", move |req| {
        let d = d.clone();
        async move {
            match d.auth.session(&req.headers) {
                Some(s) => with_headers(
                    json(
                        StatusCode::OK,
                        &serde_json::json!({"csrf": s.csrf, "mode": d.console.mode}),
                    ),
                    &[],
                ),
                None => status(StatusCode::UNAUTHORIZED, "login"),
            }
        }
    });
    let router = live_routes(router, &deps);
    read_routes(router, deps)
}

/// The live feed and the actions on it: events, take-over, hang-up, maintenance.
fn live_routes(router: Router, deps: &Arc<Deps>) -> Router {
    let d = deps.clone();
    let router = router.route(Method::GET, "/console/api/events", move |req| {
        let d = d.clone();
        async move {
            if d.auth.session(&req.headers).is_none() {
                return status(StatusCode::UNAUTHORIZED, "login");
            }
            events(d)
        }
    });
    let router = action_route(
        router,
        deps,
        "/console/api/calls/{id}/takeover",
        Action::TakeOver,
    );
    let router = action_route(
        router,
        deps,
        "/console/api/calls/{id}/hangup",
        Action::HangUp,
    );
    let d = deps.clone();
    router.route(Method::POST, "/console/api/maintenance", move |req| {
        let d = d.clone();
        async move {
            let Some(s) = d.auth.action(&req.headers) else {
                return status(StatusCode::FORBIDDEN, "csrf");
            };
            let Some(on) = serde_json::from_slice::<serde_json::Value>(&req.body)
                .ok()
                .and_then(|v| v["on"].as_bool())
            else {
                return status(StatusCode::BAD_REQUEST, "body: {\"on\": bool}");
            };
            let who = who(&s);
            let c = d.console.clone();
            match tokio::task::spawn_blocking(move || c.set_maintenance(on, &who)).await {
                Ok(Ok(())) => no_content(&[]),
                _ => {
                    warn!(
                        "console: maintenance switch changed but not saved in the state directory"
                    );
                    status(StatusCode::INTERNAL_SERVER_ERROR, "switched, but not saved")
                }
            }
        }
    })
}

/// What a supervisor reads: handovers, history, state.
fn read_routes(router: Router, deps: Arc<Deps>) -> Router {
    let d = deps.clone();
    let router = router.route(Method::GET, "/console/api/handovers", move |req| {
        let d = d.clone();
        async move {
            if d.auth.session(&req.headers).is_none() {
                return status(StatusCode::UNAUTHORIZED, "login");
            }
            with_headers(json(StatusCode::OK, &d.console.handovers()), &[])
        }
    });
    let d = deps.clone();
    let router = router.route(Method::GET, "/console/api/history", move |req| {
        let d = d.clone();
        async move {
            if d.auth.session(&req.headers).is_none() {
                return status(StatusCode::UNAUTHORIZED, "login");
            }
            history(&d, req.query.as_deref().unwrap_or("")).await
        }
    });
    let d = deps;
    router.route(Method::GET, "/console/api/state", move |req| {
        let d = d.clone();
        async move {
            if d.auth.session(&req.headers).is_none() {
                return status(StatusCode::UNAUTHORIZED, "login");
            }
            state(&d).await
        }
    })
}

/// The audit log's "who": the session label and its source address.
fn who(s: &super::auth::Session) -> String {
    match s.peer {
        Some(ip) => format!("session {} from {ip}", s.label),
        None => format!("session {}", s.label),
    }
}

fn action_route(router: Router, deps: &Arc<Deps>, pattern: &str, action: Action) -> Router {
    let d = deps.clone();
    router.route(Method::POST, pattern, move |req| {
        let d = d.clone();
        async move {
            let Some(s) = d.auth.action(&req.headers) else {
                return status(StatusCode::FORBIDDEN, "csrf");
            };
            let Some(id) = req.param("id").and_then(|i| Uuid::parse_str(i).ok()) else {
                return status(StatusCode::NOT_FOUND, "no such live call");
            };
            if d.console.act(id, action, &who(&s)) {
                no_content(&[])
            } else {
                status(StatusCode::NOT_FOUND, "no such live call")
            }
        }
    })
}

async fn login(d: Arc<Deps>, req: RouteRequest) -> HttpResponse {
    let peer = req.peer.map(|p| p.ip());
    let is_json = req
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return status(StatusCode::UNSUPPORTED_MEDIA_TYPE, "application/json");
    }
    if !d.auth.attempt(peer, Instant::now()) {
        warn!(target: "voicegate::audit", peer = ?peer, "console login refused: too many attempts");
        return with_headers(
            status(StatusCode::TOO_MANY_REQUESTS, "too many attempts"),
            &[(
                "retry-after",
                super::auth::LOGIN_REFILL.as_secs().to_string(),
            )],
        );
    }
    let password = serde_json::from_slice::<serde_json::Value>(&req.body)
        .ok()
        .and_then(|v| v["password"].as_str().map(str::to_owned))
        .unwrap_or_default();
    match d.auth.login(password, peer).await {
        Some(id) => {
            info!(target: "voicegate::audit", action = "login", peer = ?peer, "console login");
            no_content(&[("set-cookie", d.auth.set_cookie(&id))])
        }
        None => {
            warn!(target: "voicegate::audit", peer = ?peer, "console login failed: wrong password");
            status(StatusCode::UNAUTHORIZED, "wrong password")
        }
    }
}

/// A body fed from a channel: one frame per message.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

fn sse(data: &str) -> Bytes {
    Bytes::from(format!("data: {data}\n\n"))
}

/// The event stream: `retry`, a snapshot, then every live-feed line, for
/// [`STREAM_LIFETIME`]. A watcher that fell behind gets a new snapshot (the lines it missed
/// are counted as dropped).
fn events(d: Arc<Deps>) -> HttpResponse {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let mut feed = d.console.subscribe();
    tokio::spawn(async move {
        let until = tokio::time::Instant::now() + STREAM_LIFETIME;
        let first = format!("retry: 500\n\ndata: {}\n\n", d.console.snapshot());
        if tx.send(Bytes::from(first)).await.is_err() {
            return;
        }
        loop {
            let line = tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                r = feed.recv() => r,
            };
            let bytes = match line {
                Ok(l) => sse(&l),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    ::metrics::counter!(EVENTS_DROPPED).increment(n);
                    d.dropped.fetch_add(n, Ordering::Relaxed);
                    sse(&d.console.snapshot().to_string())
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(bytes).await.is_err() {
                return;
            }
        }
    });
    let mut r = HttpResponse::new(ChannelBody(rx).boxed());
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    with_headers(r, &[])
}

/// A history search's filters.
#[derive(Debug, Default)]
struct Search {
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    number: Option<String>,
    outcome: Option<String>,
    csv: bool,
}

/// Records kept in one history answer (the newest).
pub(crate) const HISTORY_MAX: usize = 500;

fn parse_search(query: &str) -> Search {
    let mut s = Search::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let v = v.trim().to_owned();
        if v.is_empty() {
            continue;
        }
        match &*k {
            "from" => s.from_ms = v.parse().ok(),
            "to" => s.to_ms = v.parse().ok(),
            "number" => s.number = Some(v),
            "outcome" => s.outcome = Some(v),
            "format" => s.csv = v == "csv",
            _ => {}
        }
    }
    s
}

/// A CSV field: quoted, quotes doubled, and a leading `= + - @` defused with `'` so a
/// spreadsheet never runs a transcript as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// The records matching `query`, newest first, as JSON or CSV.
async fn history(d: &Deps, query: &str) -> HttpResponse {
    let search = parse_search(query);
    let Some(dir) = d.spool.clone() else {
        return status(
            StatusCode::NOT_FOUND,
            "records are off ([records] enabled = false)",
        );
    };
    let read = tokio::task::spawn_blocking(move || crate::records::spool::read_dir(&dir)).await;
    let mut records = match read {
        Ok(Ok((r, _))) => r,
        Ok(Err(crate::records::spool::SpoolError::Io { source, .. }))
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Vec::new()
        }
        _ => return status(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the records"),
    };
    records.retain(|r| {
        search.from_ms.is_none_or(|f| r.started_unix_ms >= f)
            && search.to_ms.is_none_or(|t| r.started_unix_ms <= t)
            && search.outcome.as_ref().is_none_or(|o| &r.outcome == o)
            && search.number.as_ref().is_none_or(|n| {
                r.caller_number
                    .as_deref()
                    .is_some_and(|c| c.contains(n.as_str()))
            })
    });
    records.sort_by_key(|r| std::cmp::Reverse(r.started_unix_ms));
    records.truncate(HISTORY_MAX);
    if !search.csv {
        return with_headers(json(StatusCode::OK, &records), &[]);
    }
    let out = history_csv(&records);
    with_headers(
        respond(StatusCode::OK, "text/csv; charset=utf-8", out.into()),
        &[(
            "content-disposition",
            "attachment; filename=\"voicegate-calls.csv\"".into(),
        )],
    )
}

/// The records as CSV (RFC 4180: CRLF lines, quoted text fields), a header line first.
fn history_csv(records: &[crate::records::CallRecord]) -> String {
    let mut out = String::from(
        "call_id,started_unix_ms,caller_number,duration_ms,ai_minutes,agent,outcome,detail,turn_latencies_ms,tool_calls,transcript\r\n",
    );
    for r in records {
        let transcript: Vec<String> = r
            .transcript
            .iter()
            .map(|l| {
                format!(
                    "{}: {}",
                    serde_json::to_value(l.speaker)
                        .unwrap_or_default()
                        .as_str()
                        .unwrap_or(""),
                    l.text
                )
            })
            .collect();
        let tools: Vec<String> = r
            .tool_calls
            .iter()
            .map(|t| format!("{}({})", t.name, t.arguments))
            .collect();
        let turns: Vec<String> = r.turn_latencies_ms.iter().map(u32::to_string).collect();
        let fields = [
            r.call_id.to_string(),
            r.started_unix_ms.to_string(),
            csv_field(r.caller_number.as_deref().unwrap_or("")),
            r.duration_ms.to_string(),
            format!("{:.2}", r.duration_ms as f64 / 60_000.0),
            csv_field(&r.agent),
            csv_field(&r.outcome),
            csv_field(r.detail.as_deref().unwrap_or("")),
            csv_field(&turns.join(" ")),
            csv_field(&tools.join("; ")),
            csv_field(&transcript.join(" | ")),
        ];
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

/// Health, maintenance, today's AI budget, the tunnel's peers, feed drops.
async fn state(d: &Deps) -> HttpResponse {
    let budget_used_s = d
        .guard
        .as_ref()
        .map(|g| g.budget_used(SystemTime::now()).as_secs());
    let tunnel = match &d.tunnel {
        Some(t) => t
            .stats()
            .await
            .ok()
            .map(|s| serde_json::to_value(s).unwrap_or_default()),
        None => None,
    };
    with_headers(
        json(
            StatusCode::OK,
            &serde_json::json!({
                "health": d.console.health.report(),
                "maintenance": d.console.maintenance(),
                "mode": d.console.mode,
                "budget_used_s": budget_used_s,
                "wireguard": tunnel,
                "console_events_dropped": d.dropped.load(Ordering::Relaxed),
            }),
        ),
        &[],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("a\"b"), "\"a\"\"b\"");
        assert_eq!(csv_field("=SUM(A1)"), "\"'=SUM(A1)\"");
        let s = parse_search("from=10&to=20&number=%2B49&outcome=transferred&format=csv");
        assert_eq!((s.from_ms, s.to_ms), (Some(10), Some(20)));
        assert_eq!(s.number.as_deref(), Some("+49"));
        assert!(s.csv);
    }
}
