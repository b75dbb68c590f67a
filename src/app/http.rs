//! The health listener's routes: `/health`, `/metrics`, `/v1/wireguard`,
//! `/v1/calls/{id}/next` and the announce `POST /v1/calls/{id}`.

use crate::health::HealthState;
use crate::health::http::{Router, json};
use std::sync::Arc;

/// The health listener's routes: `GET /health` (JSON; 200 when live and ready, else 503) and
/// `GET /metrics` (Prometheus text). Add more with [`Router::route`].
pub fn health_routes(health: Arc<HealthState>) -> Router {
    use hyper::{Method, StatusCode};
    Router::new()
        .route(Method::GET, "/health", move |_req| {
            let report = health.report();
            async move {
                let status = if report.live && report.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(status, &report)
            }
        })
        .route(Method::GET, "/metrics", |_req| async move {
            crate::health::http::respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                crate::health::metrics::render().into(),
            )
        })
}

/// `POST /v1/calls/{uuid}`: the dialplan announces a call before `AudioSocket()` (modes 1
/// and 2): its profile, caller number and name, called number and variables, as a form
/// (`profile=sales&caller_number=…&var_customer=…`, what `CURL(url,data)` sends) or JSON
/// (`{"profile": …, "variables": {…}}`); kept in `announcements` until the call connects
/// ([`crate::profiles::announce`]). Answers 204; 400 for a bad id or body.
pub fn announce_route(
    router: Router,
    announcements: Arc<crate::profiles::announce::Announcements>,
) -> Router {
    use crate::health::http::text;
    use hyper::StatusCode;
    router.route(hyper::Method::POST, "/v1/calls/{id}", move |req| {
        let id = req.param("id").and_then(|s| uuid::Uuid::parse_str(s).ok());
        let answer = match id {
            None => text(StatusCode::BAD_REQUEST, "the call id must be a UUID\n"),
            Some(id) => match crate::profiles::announce::Announcements::parse_body(&req.body) {
                Ok(choice) => {
                    tracing::debug!(call_id = %id, profile = ?choice.profile, "call announced");
                    announcements.announce(id, choice, tokio::time::Instant::now());
                    crate::health::http::respond(StatusCode::NO_CONTENT, "text/plain", "".into())
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            },
        };
        async move { answer }
    })
}

/// `POST /v1/websocket/{connection id}`: the dialplan announces a `WebSocket/INCOMING`
/// channel (from `Dial(...,b(...))`'s pre-dial handler, where `MEDIA_WEBSOCKET_CONNECTION_ID`
/// is set); voicegate connects to Asterisk's `/media/<id>` before answering. The body is a
/// form as `v(...)` would carry it (`call_id=<uuid>&caller=…&profile=…`). Answers 200
/// `connected` once `MEDIA_START` is read and the call is on its way; else 400 (bad id or
/// body), 502 (cannot connect: the text says why), 415 (not slin), 503 (shutting down), each
/// with a one-line reason. The dialplan hangs the waiting channel up unless the answer is
/// `connected`, so the caller goes to the operators at once.
pub(crate) fn incoming_ws_route(
    router: Router,
    connector: Arc<crate::call::media_ws::IncomingConnector>,
) -> Router {
    use crate::health::http::text;
    use hyper::StatusCode;
    router.route(hyper::Method::POST, "/v1/websocket/{id}", move |req| {
        let connector = connector.clone();
        let id = req.param("id").unwrap_or_default().to_owned();
        let body = req.body.clone();
        async move {
            match connector.connect(&id, &body).await {
                Ok(_) => text(StatusCode::OK, "connected"),
                Err(e) => {
                    tracing::warn!(connection_id = %id, error = %e, "WebSocket/INCOMING announcement not connected");
                    let status = StatusCode::from_u16(e.status())
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    text(status, format!("{e}\n"))
                }
            }
        }
    })
}

/// Every route of the health listener: [`health_routes`], `GET /v1/wireguard` (the tunnel's
/// statistics; 404 without `[wireguard]`) and `GET /v1/calls/{id}/next` (what the dialplan
/// does after `AudioSocket()` returns, from `next`).
pub fn http_router(
    health: Arc<HealthState>,
    next: Arc<crate::call::next::NextStore>,
    tunnel: Option<crate::tunnel::Tunnel>,
) -> Router {
    health_routes(health)
        .route(hyper::Method::GET, "/v1/wireguard", move |_req| {
            let tunnel = tunnel.clone();
            async move {
                let Some(tunnel) = tunnel else {
                    return crate::health::http::respond(
                        hyper::StatusCode::NOT_FOUND,
                        "text/plain; charset=utf-8",
                        "no [wireguard] configured\n".into(),
                    );
                };
                match tunnel.stats().await {
                    Ok(stats) => {
                        stats.record_metrics();
                        json(hyper::StatusCode::OK, &stats)
                    }
                    Err(e) => crate::health::http::respond(
                        hyper::StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain; charset=utf-8",
                        format!("tunnel: {e}\n").into(),
                    ),
                }
            }
        })
        .route(hyper::Method::GET, "/v1/calls/{id}/next", move |req| {
            let body = next.answer(req.params.get("id").map_or("", String::as_str));
            async move {
                crate::health::http::respond(
                    hyper::StatusCode::OK,
                    "text/plain; charset=utf-8",
                    body.into(),
                )
            }
        })
}
