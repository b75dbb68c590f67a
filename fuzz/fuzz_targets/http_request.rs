//! Fuzzes the health listener's request handling end to end: arbitrary bytes from a client,
//! through hyper's HTTP/1.1 parser with the listener's settings
//! (`voicegate::health::http::serve_stream`: head limit, header and body timeouts, one
//! request per connection) into the service's own router (`voicegate::app::http_router`:
//! `/health`, `/metrics`, `/v1/wireguard`, `/v1/calls/{id}/next`). The connection must end,
//! and whatever comes back must be an HTTP/1.x response (hyper answers an HTTP/1.0 request
//! in kind). Time is tokio's paused clock, so a
//! request that waits for a timeout costs no wall time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use voicegate::health::http::Router;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime")
    })
}

fn router() -> Arc<Router> {
    static ROUTER: OnceLock<Arc<Router>> = OnceLock::new();
    ROUTER
        .get_or_init(|| {
            let breaker = Arc::new(voicegate::fallback::Breaker::new(
                3,
                std::time::Duration::from_secs(30),
            ));
            let health = Arc::new(voicegate::health::HealthState::new("echo", breaker));
            let next = Arc::new(voicegate::call::next::NextStore::new());
            Arc::new(voicegate::app::http_router(health, next, None))
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let served = tokio::spawn(voicegate::health::http::serve_stream(router(), server));
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out).await;
        served.await.expect("the connection task never panics");
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
            "not an HTTP/1.x response: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
    });
});
