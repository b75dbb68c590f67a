//! The ARI REST client: the few requests voicegate makes, typed, with Basic auth and a
//! timeout on each (Asterisk's `rest-api/api-docs/channels.json` and `bridges.json`).
//!
//! Status codes that matter are kept apart in [`AriError`]: 404 (no such channel or bridge:
//! already gone) and 409 (the channel is not in Stasis, see `asterisk.md`, "ARI facts").

use super::model::{Bridge, Channel, Variable};
use crate::secret::Secret;
use reqwest::{Method, StatusCode, Url};
use std::time::Duration;

/// Why an ARI request failed.
#[derive(Debug, thiserror::Error)]
pub enum AriError {
    /// The configured URL cannot be used.
    #[error("bad ari url: {0}")]
    Url(String),
    /// The HTTP client could not be built.
    #[error("cannot build the http client: {0}")]
    Client(String),
    /// Connecting, sending or reading failed, or the request timed out.
    #[error("{method} {path}: {detail}")]
    Transport {
        /// HTTP method.
        method: &'static str,
        /// Path below `/ari`.
        path: String,
        /// What failed.
        detail: String,
    },
    /// 404: the channel or bridge does not exist (any more).
    #[error("{method} {path}: not found")]
    NotFound {
        /// HTTP method.
        method: &'static str,
        /// Path below `/ari`.
        path: String,
    },
    /// 409: the channel is not in a Stasis application (`asterisk.md`, "ARI facts").
    #[error("{method} {path}: {message}")]
    NotInStasis {
        /// HTTP method.
        method: &'static str,
        /// Path below `/ari`.
        path: String,
        /// Asterisk's `message` ("Channel not in Stasis application").
        message: String,
    },
    /// 422: a bridge operation Asterisk cannot do now, in its own words: "Channel not in
    /// Stasis application" (`addChannel` before the channel's `StasisStart`) or "Channel not
    /// in bridge" (`removeChannel`). `res/ari/resource_bridges.c`.
    #[error("{method} {path}: {message}")]
    Unprocessable {
        /// HTTP method.
        method: &'static str,
        /// Path below `/ari`.
        path: String,
        /// Asterisk's `message`.
        message: String,
    },
    /// Any other non-2xx status.
    #[error("{method} {path}: http {status}: {message}")]
    Status {
        /// HTTP method.
        method: &'static str,
        /// Path below `/ari`.
        path: String,
        /// The status code.
        status: u16,
        /// Asterisk's `message`, or the body.
        message: String,
    },
    /// A 2xx body that is not the expected JSON.
    #[error("{method} {path}: unexpected body: {detail}")]
    Body {
        /// HTTP method.
        method: &'static str,
        /// Path below `/ari`.
        path: String,
        /// serde's message.
        detail: String,
    },
}

impl AriError {
    /// True for [`AriError::NotFound`]: the object is already gone.
    pub(crate) fn is_not_found(&self) -> bool {
        matches!(self, AriError::NotFound { .. })
    }
}

/// What `POST /channels/externalMedia` is asked for.
#[derive(Debug, Clone)]
pub(crate) struct ExternalMedia<'a> {
    /// Stasis application the new channel enters.
    pub(crate) app: &'a str,
    /// `HOST:PORT` Asterisk connects to (voicegate's AudioSocket listener), or sends its RTP
    /// to (the call's own UDP socket).
    pub(crate) external_host: &'a str,
    /// `audiosocket` or `rtp`.
    pub(crate) encapsulation: &'a str,
    /// `tcp` (with `audiosocket`) or `udp` (with `rtp`).
    pub(crate) transport: &'a str,
    /// `slin16` or `slin` (AudioSocket); `alaw`, `ulaw` or `slin16` (RTP).
    pub(crate) format: &'a str,
    /// The call id: Asterisk sends it in `0x01` (AudioSocket) and gives it as the Stasis
    /// argument of the new channel (every transport). A UUID string.
    pub(crate) data: &'a str,
    /// `connection_type`: `server` for the WebSocket transport (Asterisk waits for
    /// voicegate to connect to `/media/<connection id>`); `None` = Asterisk's default,
    /// `client`.
    pub(crate) connection_type: Option<&'a str>,
}

/// How the requests reach Asterisk.
#[derive(Clone)]
enum Transport {
    /// HTTP(S) with reqwest: every build but the unit tests' in-memory Asterisk.
    Http(reqwest::Client),
    /// The in-memory Asterisk of the unit tests ([`super::memory::MemoryAsterisk`]), with
    /// the request timeout applied here as reqwest applies it to [`Transport::Http`]: with
    /// no socket under it, the controller runs on tokio's paused clock.
    #[cfg(test)]
    Memory(std::sync::Arc<super::memory::MemoryAsterisk>, Duration),
}

/// An ARI REST client. Cheap to clone.
#[derive(Clone)]
pub struct AriClient {
    transport: Transport,
    base: Url,
    username: String,
    password: Secret,
}

impl std::fmt::Debug for AriClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AriClient")
            .field("base", &self.base.as_str())
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl AriClient {
    /// A client for Asterisk at `url` (`http://host:8088`, with or without `/ari`).
    ///
    /// # Errors
    /// [`AriError::Url`] for an unusable URL, [`AriError::Client`] if reqwest cannot build.
    pub fn new(
        url: &str,
        username: &str,
        password: Secret,
        timeout: Duration,
    ) -> Result<Self, AriError> {
        let mut base = Url::parse(url).map_err(|e| AriError::Url(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(AriError::Url(format!("{url}: not an http(s) base url")));
        }
        let path = base.path().trim_end_matches('/').to_owned();
        let path = if path.ends_with("/ari") {
            path
        } else {
            format!("{path}/ari")
        };
        base.set_path(&path);
        base.set_query(None);
        let http = crate::tls::http_client_builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| AriError::Client(e.to_string()))?;
        Ok(AriClient {
            transport: Transport::Http(http),
            base,
            username: username.to_owned(),
            password,
        })
    }

    /// A client of the unit tests' in-memory Asterisk: the same requests, the same status
    /// handling, each request given up after `timeout` as reqwest does.
    #[cfg(test)]
    pub(crate) fn in_memory(
        asterisk: std::sync::Arc<super::memory::MemoryAsterisk>,
        timeout: Duration,
    ) -> Self {
        AriClient {
            transport: Transport::Memory(asterisk, timeout),
            base: Url::parse("http://asterisk.invalid:8088/ari").expect("a valid url"),
            username: "voicegate".into(),
            password: Secret::new("in-memory"),
        }
    }

    /// The `/ari` base URL (no credentials in it).
    #[cfg(test)]
    pub(crate) fn base(&self) -> &Url {
        &self.base
    }

    /// The events WebSocket URL for `app` (`ws://…/ari/events?app=…`), credentials not
    /// included (sent as Basic auth).
    pub(crate) fn events_url(&self, app: &str) -> Url {
        let mut u = self.base.clone();
        // http → ws, https → wss; both are valid schemes for set_scheme.
        let scheme = if u.scheme() == "https" { "wss" } else { "ws" };
        let _ = u.set_scheme(scheme);
        u.set_path(&format!("{}/events", self.base.path()));
        u.query_pairs_mut()
            .append_pair("app", app)
            .append_pair("subscribeAll", "false");
        u
    }

    /// The `Authorization` header value (Basic), for the events WebSocket.
    pub(crate) fn basic_auth_header(&self) -> String {
        use base64::Engine as _;
        let raw = format!("{}:{}", self.username, self.password.expose());
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<(StatusCode, bytes::Bytes), AriError> {
        let m = method_name(&method);
        let (status, body) = self.send(method, path, query).await?;
        if status.is_success() {
            return Ok((status, body));
        }
        let path = path.to_owned();
        Err(match status.as_u16() {
            404 => AriError::NotFound { method: m, path },
            409 => AriError::NotInStasis {
                method: m,
                path,
                message: error_message(&body),
            },
            422 => AriError::Unprocessable {
                method: m,
                path,
                message: error_message(&body),
            },
            code => AriError::Status {
                method: m,
                path,
                status: code,
                message: error_message(&body),
            },
        })
    }

    /// Sends one request; the status and body of any answer, an error only if none came.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<(StatusCode, bytes::Bytes), AriError> {
        let m = method_name(&method);
        let transport = |detail: String| AriError::Transport {
            method: m,
            path: path.to_owned(),
            detail,
        };
        match &self.transport {
            Transport::Http(http) => {
                let mut url = self.base.clone();
                url.set_path(&format!("{}{path}", self.base.path()));
                if !query.is_empty() {
                    let mut q = url.query_pairs_mut();
                    for (k, v) in query {
                        q.append_pair(k, v);
                    }
                }
                // Without the URL: it carries no secret, but keep messages short.
                let failed = |e: reqwest::Error| transport(e.without_url().to_string());
                let resp = http
                    .request(method, url)
                    .basic_auth(&self.username, Some(self.password.expose()))
                    .send()
                    .await
                    .map_err(failed)?;
                let status = resp.status();
                let body = resp.bytes().await.map_err(failed)?;
                Ok((status, body))
            }
            #[cfg(test)]
            Transport::Memory(asterisk, limit) => {
                let asked = asterisk.exchange(m, path, query);
                match tokio::time::timeout(*limit, asked).await {
                    Ok((status, body)) => Ok((
                        StatusCode::from_u16(status).map_err(|e| transport(e.to_string()))?,
                        body,
                    )),
                    Err(_) => Err(transport("operation timed out".into())),
                }
            }
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
    ) -> Result<T, AriError> {
        let m = method_name(&method);
        let (_, body) = self.request(method, path, query).await?;
        serde_json::from_slice(&body).map_err(|e| AriError::Body {
            method: m,
            path: path.to_owned(),
            detail: e.to_string(),
        })
    }

    /// `POST /channels/{id}/answer`.
    ///
    /// # Errors
    /// [`AriError`]; 409 if the channel is not in Stasis.
    pub(crate) async fn answer(&self, channel: &str) -> Result<(), AriError> {
        self.request(
            Method::POST,
            &format!("/channels/{}/answer", seg(channel)),
            &[],
        )
        .await
        .map(drop)
    }

    /// `POST /bridges?type=mixing&name=…`: a new mixing bridge.
    ///
    /// # Errors
    /// [`AriError`].
    pub async fn create_bridge(&self, name: &str) -> Result<Bridge, AriError> {
        self.json(
            Method::POST,
            "/bridges",
            &[("type", "mixing"), ("name", name)],
        )
        .await
    }

    /// `GET /bridges`: every bridge.
    ///
    /// # Errors
    /// [`AriError`].
    pub(crate) async fn bridges(&self) -> Result<Vec<Bridge>, AriError> {
        self.json(Method::GET, "/bridges", &[]).await
    }

    /// `POST /bridges/{id}/addChannel?channel=a,b`.
    ///
    /// # Errors
    /// [`AriError`]; [`AriError::Unprocessable`] (422) if a channel is not in Stasis yet.
    pub(crate) async fn add_channels(
        &self,
        bridge: &str,
        channels: &[&str],
    ) -> Result<(), AriError> {
        let list = channels.join(",");
        self.request(
            Method::POST,
            &format!("/bridges/{}/addChannel", seg(bridge)),
            &[("channel", &list)],
        )
        .await
        .map(drop)
    }

    /// `POST /bridges/{id}/removeChannel?channel=…`.
    ///
    /// # Errors
    /// [`AriError`].
    pub async fn remove_channel(&self, bridge: &str, channel: &str) -> Result<(), AriError> {
        self.request(
            Method::POST,
            &format!("/bridges/{}/removeChannel", seg(bridge)),
            &[("channel", channel)],
        )
        .await
        .map(drop)
    }

    /// `DELETE /bridges/{id}`.
    ///
    /// # Errors
    /// [`AriError`]; [`AriError::NotFound`] if it is already gone.
    pub(crate) async fn destroy_bridge(&self, bridge: &str) -> Result<(), AriError> {
        self.request(Method::DELETE, &format!("/bridges/{}", seg(bridge)), &[])
            .await
            .map(drop)
    }

    /// `POST /channels/externalMedia?…&encapsulation=…&transport=…`. AudioSocket: Asterisk
    /// connects to `external_host` at once and sends `data` as the call id. RTP: Asterisk
    /// binds a UDP port and sends to `external_host`; the returned channel's `channelvars`
    /// name that port (`UNICASTRTP_LOCAL_ADDRESS`, `UNICASTRTP_LOCAL_PORT`: chan_rtp.c,
    /// `unicast_rtp_request`, copied into the response by `external_media_rtp_udp` in
    /// res/ari/resource_channels.c). WebSocket with `connection_type=server` and no
    /// `external_host`: Asterisk creates a `WebSocket/INCOMING` channel and answers with its
    /// connection id in `channelvars` `MEDIA_WEBSOCKET_CONNECTION_ID` (chan_websocket.c
    /// `set_channel_variables`, copied by `external_media_websocket`); the channel answers
    /// and enters Stasis once voicegate connects to `/media/<that id>`.
    ///
    /// # Errors
    /// [`AriError`]: 400 for missing `data`/`format`, 500 if `data` is not a UUID or nothing
    /// listens at `external_host` (`asterisk.md`).
    pub(crate) async fn external_media(
        &self,
        req: &ExternalMedia<'_>,
    ) -> Result<Channel, AriError> {
        let mut query = vec![("app", req.app)];
        // A WebSocket server connection has no external host (Asterisk: "May be empty for a
        // websocket server connection").
        if !req.external_host.is_empty() {
            query.push(("external_host", req.external_host));
        }
        query.extend([
            ("encapsulation", req.encapsulation),
            ("transport", req.transport),
            ("format", req.format),
            ("data", req.data),
        ]);
        if let Some(t) = req.connection_type {
            query.push(("connection_type", t));
        }
        self.json(Method::POST, "/channels/externalMedia", &query)
            .await
    }

    /// `POST /channels/{id}/continue?context=…&extension=…&priority=…`: leave Stasis and go
    /// on in the dialplan (204, then `StasisEnd`).
    ///
    /// # Errors
    /// [`AriError`]; 409 if the channel is not in Stasis.
    pub async fn continue_in_dialplan(
        &self,
        channel: &str,
        context: &str,
        extension: &str,
        priority: u32,
    ) -> Result<(), AriError> {
        let priority = priority.to_string();
        self.request(
            Method::POST,
            &format!("/channels/{}/continue", seg(channel)),
            &[
                ("context", context),
                ("extension", extension),
                ("priority", &priority),
            ],
        )
        .await
        .map(drop)
    }

    /// `DELETE /channels/{id}`: hang up (works on any channel, in Stasis or not).
    ///
    /// # Errors
    /// [`AriError`]; [`AriError::NotFound`] if it is already gone.
    pub async fn hangup(&self, channel: &str) -> Result<(), AriError> {
        self.request(
            Method::DELETE,
            &format!("/channels/{}", seg(channel)),
            &[("reason", "normal")],
        )
        .await
        .map(drop)
    }

    /// `GET /channels`: every channel.
    ///
    /// # Errors
    /// [`AriError`].
    pub async fn channels(&self) -> Result<Vec<Channel>, AriError> {
        self.json(Method::GET, "/channels", &[]).await
    }

    /// `GET /channels/{id}/variable?variable=NAME` (works outside Stasis too).
    ///
    /// # Errors
    /// [`AriError`].
    pub async fn variable(&self, channel: &str, name: &str) -> Result<String, AriError> {
        let v: Variable = self
            .json(
                Method::GET,
                &format!("/channels/{}/variable", seg(channel)),
                &[("variable", name)],
            )
            .await?;
        Ok(v.value)
    }
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        _ => "HTTP",
    }
}

/// Percent-encodes one path segment (channel ids are `1700000000.42`, but never trust input).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Asterisk's error body is `{"message": "..."}`; fall back to a short prefix of the text.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Msg {
        message: String,
    }
    match serde_json::from_slice::<Msg>(body) {
        Ok(m) => m.message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = AriClient::new(
            "http://127.0.0.1:8088",
            "voicegate",
            Secret::new("pw"),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(c.base().as_str(), "http://127.0.0.1:8088/ari");
        assert_eq!(
            c.events_url("voicegate").as_str(),
            "ws://127.0.0.1:8088/ari/events?app=voicegate&subscribeAll=false"
        );
        let c = AriClient::new(
            "https://pbx/ari/",
            "u",
            Secret::new("hunter2-secret"),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(c.base().as_str(), "https://pbx/ari");
        assert!(
            c.events_url("a")
                .as_str()
                .starts_with("wss://pbx/ari/events?")
        );
        // The password is in the Basic header only, never in Debug output or URLs.
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.events_url("a").as_str().contains("hunter2"));
        assert_eq!(c.basic_auth_header(), "Basic dTpodW50ZXIyLXNlY3JldA==");
        assert_eq!(seg("1.2/x"), "1.2%2Fx");
        assert_eq!(
            error_message(br#"{"message":"Channel not in Stasis application"}"#),
            "Channel not in Stasis application"
        );
    }
}
