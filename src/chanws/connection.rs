//! One call's WebSocket media channel after `MEDIA_START`: binary messages are media in the
//! channel's format, text messages are control ([`crate::chanws::protocol`]). Over any
//! `AsyncRead + AsyncWrite` (a TCP stream, an in-memory duplex in tests).
//!
//! [`MediaChannel::recv`] is cancel-safe (it polls the WebSocket stream once per message),
//! so it can sit in a `select!` next to a clock.

use crate::chanws::protocol::{Command, ControlFormat, Event, MediaStart, ParseError};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// What arrived from Asterisk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// One binary message: media in the channel's format (Asterisk writes one frame per
    /// message, e.g. 640 bytes of slin16 every 20 ms).
    Media(Bytes),
    /// A control event.
    Event(Event),
}

/// Why the channel could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A text message that is not a control message of the call's format.
    #[error("control message: {0}")]
    Control(#[from] ParseError),
    /// The WebSocket failed (socket error, protocol violation, over-size message).
    #[error("websocket: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
}

/// A call's media channel: the WebSocket, the control format and the `MEDIA_START` it began
/// with.
#[derive(Debug)]
pub struct MediaChannel<S> {
    ws: WebSocketStream<S>,
    format: ControlFormat,
    start: MediaStart,
    closed: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MediaChannel<S> {
    /// The channel over `ws`, whose `MEDIA_START` (in `format`) has been read.
    pub(crate) fn new(ws: WebSocketStream<S>, format: ControlFormat, start: MediaStart) -> Self {
        MediaChannel {
            ws,
            format,
            start,
            closed: false,
        }
    }

    /// The call's `MEDIA_START`.
    pub(crate) fn start(&self) -> &MediaStart {
        &self.start
    }

    /// The call's control format (sniffed from `MEDIA_START`).
    pub(crate) fn format(&self) -> ControlFormat {
        self.format
    }

    /// The next media or event; `Ok(None)` when Asterisk closed the WebSocket (its hangup).
    /// Pings are answered by the WebSocket layer. An event word this version does not know
    /// is skipped (logged at debug), a malformed known one is an error.
    ///
    /// # Errors
    /// [`ChannelError`] for a malformed control message or a failed WebSocket.
    pub(crate) async fn recv(&mut self) -> Result<Option<Inbound>, ChannelError> {
        use tokio_tungstenite::tungstenite::Error as E;
        loop {
            let msg = match self.ws.next().await {
                None | Some(Err(E::ConnectionClosed | E::AlreadyClosed)) => return Ok(None),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => m,
            };
            match msg {
                Message::Binary(b) => return Ok(Some(Inbound::Media(b))),
                Message::Text(t) => match Event::parse(&t, self.format) {
                    Ok(e) => return Ok(Some(Inbound::Event(e))),
                    Err(ParseError::Unknown(word)) => {
                        tracing::debug!(%word, "chan_websocket event unknown to this version; skipped");
                    }
                    Err(e) => return Err(e.into()),
                },
                Message::Close(_) => return Ok(None),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Sends one binary media message.
    ///
    /// # Errors
    /// The WebSocket's error.
    pub(crate) async fn send_media(&mut self, media: Bytes) -> Result<(), ChannelError> {
        Ok(self.ws.send(Message::Binary(media)).await?)
    }

    /// Sends one control command in the call's format.
    ///
    /// # Errors
    /// [`ChannelError::Control`] if the command cannot be written in this format
    /// ([`Command::render`]), else the WebSocket's error.
    pub(crate) async fn send(&mut self, command: &Command) -> Result<(), ChannelError> {
        let text = command.render(self.format)?;
        Ok(self.ws.send(Message::text(text)).await?)
    }

    /// Closes the WebSocket with `1000` (normal). Idempotent.
    ///
    /// # Errors
    /// The WebSocket's error (a peer already gone is not one).
    pub(crate) async fn close(&mut self) -> Result<(), ChannelError> {
        use tokio_tungstenite::tungstenite::Error as E;
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        match self.ws.close(Some(frame)).await {
            Ok(()) | Err(E::ConnectionClosed | E::AlreadyClosed) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
