//! voicegate as the WebSocket **client** of Asterisk's media channel: for a `chan_websocket`
//! channel waiting for its application (`WebSocket/INCOMING`, which ARI externalMedia with
//! `transport=websocket&connection_type=server` creates), voicegate connects to Asterisk's
//! own HTTP server at `ws://<asterisk>:8088/media/<connection id>` and, once upgraded, reads
//! `MEDIA_START`. From there the call is the same [`MediaChannel`] as one Asterisk opened to
//! voicegate's listener ([`crate::chanws::server`]).
//!
//! Source: Asterisk 22.10.1 `channels/chan_websocket.c`: `websocket_new` makes the connection
//! id of an `INCOMING` channel with `ast_uuid_generate_str` and `set_channel_variables` puts
//! it in the channel variable `MEDIA_WEBSOCKET_CONNECTION_ID`; `incoming_ws_http_callback`,
//! registered for the URI prefix `media`, looks the id up in the rest of the path and answers
//! `404 Not Found` for an unknown one and `409 Conflict` when one is already connected; then
//! `res/res_http_websocket.c` (`ast_websocket_uri_cb`) upgrades, choosing the subprotocol
//! `media` (the only one the channel registers). `websocket_handoff_to_channel` sends
//! `MEDIA_START` and answers the channel. `/media` takes no credentials: the connection id,
//! a random UUID known only to whoever created the channel, is the key.

use crate::chanws::connection::MediaChannel;
use crate::chanws::server::{HandshakeFailure, media_ws_config, read_media_start};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::MaybeTlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tracing::debug;

/// The channel variable holding a `WebSocket/INCOMING` channel's connection id
/// (`MEDIA_WEBSOCKET_CONNECTION_ID` in `chan_websocket.c`; also in the externalMedia answer's
/// `channelvars`).
pub(crate) const CONNECTION_ID_VARIABLE: &str = "MEDIA_WEBSOCKET_CONNECTION_ID";

/// Longest connection id accepted (a UUID string is 36).
pub(crate) const MAX_CONNECTION_ID_LEN: usize = 64;

/// The stream under a connected media channel: plain TCP for `ws://`, TLS for `wss://`.
pub(crate) type ClientStream = MaybeTlsStream<TcpStream>;

/// Why voicegate could not connect to an Asterisk media WebSocket.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The base URL is not an `http(s)://` or `ws(s)://` URL, or the connection id is not a
    /// token of letters, digits and `-` (at most [`MAX_CONNECTION_ID_LEN`]).
    #[error("media url: {0}")]
    Url(String),
    /// TCP or TLS failed (Asterisk not listening: connection refused).
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    /// Asterisk answered the upgrade with an HTTP error: `404` (no channel waits with that
    /// connection id), `409` (one is already connected), `426`/`400` (not a usable upgrade).
    #[error("asterisk answered HTTP {0}")]
    Http(u16),
    /// Any other WebSocket failure during the upgrade.
    #[error("websocket: {0}")]
    Ws(tokio_tungstenite::tungstenite::Error),
    /// No upgrade and `MEDIA_START` within the timeout.
    #[error("no MEDIA_START within {0} ms")]
    Timeout(u64),
    /// Upgraded, but the first message was not `MEDIA_START` or the socket closed first.
    #[error("media handshake: {}", .0.label())]
    Handshake(HandshakeFailure),
}

impl ConnectError {
    /// The label for `voicegate_handshake_failures_total{reason}`: `connect`, `http_<code>`
    /// (`http_404`, `http_409`, …), `upgrade`, `timeout`, `closed`, `not_media_start`,
    /// `url`.
    pub(crate) fn label(&self) -> String {
        match self {
            ConnectError::Url(_) => "url".into(),
            ConnectError::Io(_) => "connect".into(),
            ConnectError::Http(code) => format!("http_{code}"),
            ConnectError::Ws(_) => "upgrade".into(),
            ConnectError::Timeout(_) => "timeout".into(),
            ConnectError::Handshake(h) => h.label().into(),
        }
    }
}

/// A media channel voicegate connected to.
#[derive(Debug)]
pub(crate) struct Outgoing {
    /// The media channel, `MEDIA_START` read.
    pub(crate) channel: MediaChannel<ClientStream>,
    /// Asterisk's address (the TCP peer).
    pub(crate) peer: SocketAddr,
}

/// The media URL of connection `id` on the Asterisk HTTP server at `base`: `ws://` for
/// `http://` or `ws://`, `wss://` for `https://` or `wss://`, the path of `base` (an
/// `http.conf` `prefix`; a trailing `/ari`, as ARI URLs may have, is dropped) followed by
/// `/media/<id>`. E.g. `http://127.0.0.1:8088` and
/// `0b5c5f2e-…` → `ws://127.0.0.1:8088/media/0b5c5f2e-…`.
///
/// # Errors
/// [`ConnectError::Url`] for another scheme, an unparsable base, or an id that is empty,
/// longer than [`MAX_CONNECTION_ID_LEN`] or not letters, digits and `-` (what
/// `ast_uuid_generate_str` makes; anything else could leave the path).
pub(crate) fn media_url(base: &str, id: &str) -> Result<reqwest::Url, ConnectError> {
    if id.is_empty()
        || id.len() > MAX_CONNECTION_ID_LEN
        || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ConnectError::Url(format!(
            "connection id {id:?}: letters, digits and - only"
        )));
    }
    let mut url =
        reqwest::Url::parse(base).map_err(|e| ConnectError::Url(format!("{base}: {e}")))?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(ConnectError::Url(format!("{base}: scheme {other}"))),
    };
    url.set_scheme(scheme)
        .map_err(|()| ConnectError::Url(format!("{base}: cannot be a {scheme} URL")))?;
    let path = url.path().trim_end_matches('/');
    let path = path.strip_suffix("/ari").unwrap_or(path).to_owned();
    url.set_path(&format!("{path}/media/{id}"));
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// Connects to `url` (see [`media_url`]), offering the subprotocol `media`, and reads
/// `MEDIA_START`, all within `limit`. Messages up to `max_message_bytes` are taken. TLS
/// (`wss://`) uses [`crate::tls`].
///
/// # Errors
/// [`ConnectError`]: refused, an HTTP error from Asterisk, no `MEDIA_START`, the timeout.
pub(crate) async fn connect(
    url: &reqwest::Url,
    limit: Duration,
    max_message_bytes: usize,
) -> Result<Outgoing, ConnectError> {
    let limit_ms = limit.as_millis() as u64;
    timeout(limit, connect_inner(url, max_message_bytes))
        .await
        .unwrap_or(Err(ConnectError::Timeout(limit_ms)))
}

async fn connect_inner(
    url: &reqwest::Url,
    max_message_bytes: usize,
) -> Result<Outgoing, ConnectError> {
    use tokio_tungstenite::tungstenite::Error as E;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::Url(e.to_string()))?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("media"));
    let connected = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(media_ws_config(max_message_bytes)),
        true,
        Some(crate::tls::websocket_connector()),
    )
    .await;
    let mut ws = match connected {
        Ok((ws, _)) => ws,
        Err(E::Http(resp)) => return Err(ConnectError::Http(resp.status().as_u16())),
        Err(E::Io(e)) => return Err(ConnectError::Io(e)),
        Err(e) => return Err(ConnectError::Ws(e)),
    };
    let peer = match ws.get_ref() {
        MaybeTlsStream::Plain(s) => s.peer_addr()?,
        MaybeTlsStream::Rustls(s) => s.get_ref().0.peer_addr()?,
        _ => return Err(ConnectError::Url("unexpected stream kind".into())),
    };
    let (format, start) = read_media_start(&mut ws, peer)
        .await
        .map_err(ConnectError::Handshake)?;
    debug!(%peer, channel = %start.channel, "media websocket connected");
    Ok(Outgoing {
        channel: MediaChannel::new(ws, format, start),
        peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chanws::protocol::{ControlFormat, Event, MediaFormat, MediaStart};
    use futures_util::SinkExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

    const ID: &str = "0b5c5f2e-7a41-4c3e-9d7b-2f1e5a6b7c8d";

    #[test]
    fn the_media_url_follows_the_http_server() {
        for (base, want) in [
            ("http://127.0.0.1:8088", "ws://127.0.0.1:8088/media/"),
            ("http://127.0.0.1:8088/", "ws://127.0.0.1:8088/media/"),
            ("http://127.0.0.1:8088/ari", "ws://127.0.0.1:8088/media/"),
            ("http://pbx:8088/asterisk/", "ws://pbx:8088/asterisk/media/"),
            ("https://pbx.example:8089", "wss://pbx.example:8089/media/"),
            ("ws://[::1]:8088", "ws://[::1]:8088/media/"),
        ] {
            assert_eq!(
                media_url(base, ID).unwrap().as_str(),
                format!("{want}{ID}"),
                "{base}"
            );
        }
        for (base, id) in [
            ("ftp://pbx", ID),
            ("not a url", ID),
            ("http://pbx:8088", ""),
            ("http://pbx:8088", "../ari/channels"),
            ("http://pbx:8088", "a?b"),
            ("http://pbx:8088", &"a".repeat(65)),
        ] {
            assert!(
                matches!(media_url(base, id), Err(ConnectError::Url(_))),
                "{base} {id}"
            );
        }
    }

    fn start() -> MediaStart {
        MediaStart {
            connection_id: ID.into(),
            channel: "WebSocket/INCOMING/0x7f3a2c001234".into(),
            channel_id: "1764712345.9".into(),
            format: MediaFormat::Slin(16_000),
            optimal_frame_size: 640,
            ptime: 20,
            channel_variables: Default::default(),
        }
    }

    /// A fake of Asterisk's `/media` (chan_websocket.c `incoming_ws_http_callback` and
    /// res_http_websocket.c `ast_websocket_uri_cb`): the upgrade for path `/media/<ID>` with
    /// subprotocol `media` chosen, then `MEDIA_START` in plain text, then what the test
    /// sends back is echoed into `seen`.
    async fn fake_media_server() -> (SocketAddr, tokio::sync::oneshot::Receiver<(String, String)>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut path = String::new();
            let mut proto = String::new();
            #[allow(clippy::result_large_err)]
            let cb = |req: &Request, mut resp: Response| {
                path = req.uri().path().to_owned();
                proto = req
                    .headers()
                    .get("sec-websocket-protocol")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                resp.headers_mut()
                    .insert("sec-websocket-protocol", HeaderValue::from_static("media"));
                Ok(resp)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(s, cb).await.unwrap();
            let ms = Event::MediaStart(start()).render(ControlFormat::PlainText, "1764712345.9");
            ws.send(Message::text(ms)).await.unwrap();
            let _ = tx.send((path, proto));
            // Keep the socket open until the client closes it.
            use futures_util::StreamExt;
            while let Some(Ok(_)) = ws.next().await {}
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn connects_offers_media_and_reads_media_start() {
        let (addr, seen) = fake_media_server().await;
        let url = media_url(&format!("http://{addr}"), ID).unwrap();
        let mut out = connect(&url, Duration::from_secs(5), 65_536).await.unwrap();
        assert_eq!(out.peer, addr);
        assert_eq!(out.channel.format(), ControlFormat::PlainText);
        assert_eq!(out.channel.start().connection_id, ID);
        assert_eq!(out.channel.start().format, MediaFormat::Slin(16_000));
        let (path, proto) = seen.await.unwrap();
        assert_eq!(path, format!("/media/{ID}"));
        assert_eq!(proto, "media");
        out.channel.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_io_error() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let url = media_url(&format!("http://{addr}"), ID).unwrap();
        let e = connect(&url, Duration::from_secs(5), 65_536)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, ConnectError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused),
            "{e:?}"
        );
        assert_eq!(e.label(), "connect");
    }

    /// Asterisk's answer to an unknown or already connected id: `ast_http_error` through
    /// `ast_http_send` (main/http.c): status line, `Server`, `Date`, `Connection: close`,
    /// `Cache-Control`, `Content-type: text/html`, `Content-Length`, an HTML body.
    async fn http_error_server(code: u16, title: &'static str) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let body = format!(
                "<!DOCTYPE HTML PUBLIC \"-//IETF//DTD HTML 2.0//EN\">\r\n<html><head>\r\n\
                 <title>{code} {title}</title>\r\n</head><body>\r\n<h1>{title}</h1>\r\n\
                 <p>WebSocket instance not found</p>\r\n<hr />\r\n\
                 <address>Asterisk</address>\r\n</body></html>\r\n"
            );
            let resp = format!(
                "HTTP/1.1 {code} {title}\r\nServer: Asterisk\r\n\
                 Date: Thu, 03 Dec 2026 04:00:00 GMT\r\nConnection: close\r\n\
                 Cache-Control: no-cache, no-store\r\nContent-type: text/html\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
        });
        addr
    }

    #[tokio::test]
    async fn an_http_error_from_asterisk_names_its_status() {
        for (code, title) in [(404, "Not Found"), (409, "Conflict")] {
            let addr = http_error_server(code, title).await;
            let url = media_url(&format!("http://{addr}"), ID).unwrap();
            let e = connect(&url, Duration::from_secs(5), 65_536)
                .await
                .unwrap_err();
            assert!(matches!(e, ConnectError::Http(c) if c == code), "{e:?}");
            assert_eq!(e.label(), format!("http_{code}"));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_never_answers_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let url = media_url(&format!("http://{addr}"), ID).unwrap();
        let e = connect(&url, Duration::from_millis(500), 65_536)
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::Timeout(500)), "{e:?}");
        drop(l);
    }
}
