//! The health listener's routes: `/health`, `/metrics`, `/v1/wireguard` and
//! `/v1/calls/{id}/next`.

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
