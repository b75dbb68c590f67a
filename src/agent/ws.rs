//! Opening a provider's WebSocket: TLS through [`crate::tls`], extra headers (auth), and a
//! connect timeout. Shared by every WebSocket provider.

use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A provider WebSocket (plain `ws://` for local fakes, `wss://` with rustls otherwise).
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a WebSocket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum WsConnectError {
    /// The URL or a header is malformed.
    #[error("bad request: {0}")]
    Request(String),
    /// TCP, TLS or the HTTP upgrade failed (the provider's HTTP status is in the message).
    #[error("{0}")]
    Handshake(String),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Read buffer of each provider socket, bytes. tungstenite's default (128 KiB) is zero-filled
/// up to its capacity on every read, which at hundreds of calls was the largest single CPU
/// cost of a call (the load bench, `docs/performance.md`), and is held per call; provider
/// messages are a few KiB (a 200 ms pcm16 24 kHz delta is 12.8 KiB of base64), and larger
/// ones still arrive whole: the buffer grows to the frame's length.
pub(crate) const READ_BUFFER_BYTES: usize = 8 * 1024;

/// The WebSocket settings of every provider connection (see [`READ_BUFFER_BYTES`]).
pub(crate) fn socket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
}

/// Opens a WebSocket to `url` with `headers` (name, value), waiting at most `timeout`.
///
/// # Errors
/// [`WsConnectError`]; header values never appear in the message.
pub async fn connect(
    url: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Ws, WsConnectError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| WsConnectError::Request(format!("url {url}: {e}")))?;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| WsConnectError::Request(format!("header name {name}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| WsConnectError::Request(format!("value of header {name}")))?;
        request.headers_mut().insert(name, value);
    }
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(socket_config()),
        true,
        Some(crate::tls::websocket_connector()),
    );
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok((ws, _response))) => Ok(ws),
        Ok(Err(e)) => Err(WsConnectError::Handshake(e.to_string())),
        Err(_) => Err(WsConnectError::Timeout(timeout)),
    }
}
