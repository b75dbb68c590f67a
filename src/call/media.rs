//! The media-transport seam: what a call session needs from the channel that carries the
//! caller's audio, whichever way Asterisk carries it.
//!
//! A [`MediaPort`] is one call's media channel: it yields what the caller side sends
//! ([`MediaEvent`]: audio at the call's rate, a DTMF digit, a hangup) and takes the 20 ms
//! frames of the playout clock. The session ([`crate::call::session`]) and the sans-IO core
//! ([`crate::call::core`]) see only this, so every transport feeds the same call: AudioSocket
//! ([`AudioSocketPort`], over TCP or the WireGuard tunnel) here, and each other transport's
//! adapter beside it in `call/`. The transport modules themselves (`crate::audiosocket`, …)
//! know the wire only, never a call.

use crate::audiosocket::codec::{Message, SlinRate};
use crate::audiosocket::{Connection, ReadError};
use bytes::Bytes;
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite};

/// What the caller's side of a media channel sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaEvent {
    /// Caller audio: signed linear 16-bit little-endian samples (slin) at `rate`, usually
    /// one 20 ms frame (`rate.bytes_per_frame()` bytes). The first one fixes the call's rate.
    Audio {
        /// The sample rate of `payload`.
        rate: SlinRate,
        /// slin samples, little-endian.
        payload: Bytes,
    },
    /// A DTMF digit (`0`–`9`, `*`, `#`, `A`–`D`), at its end.
    Dtmf(char),
    /// The caller's side ended the call (a clean close, or the transport's own hangup).
    Hangup,
}

/// Why a media channel could not be read. Either ends that one call as a protocol error,
/// logged with its call id; no other call is touched.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The peer broke the transport's protocol (a malformed frame, an error frame, a second
    /// call id); the text says what, in the transport's terms.
    #[error("{0}")]
    Protocol(String),
    /// The socket failed, or closed inside a frame.
    #[error("read: {0}")]
    Io(std::io::Error),
}

/// One call's media channel, as the session drives it. Implementations: [`AudioSocketPort`]
/// and the other transports' adapters in `call/`.
///
/// Futures are `Send` so a call runs on any worker thread.
pub trait MediaPort: Send {
    /// The transport's label for metrics and records: `"audiosocket"`, `"rtp"`,
    /// `"websocket"`.
    fn transport(&self) -> &'static str;

    /// The next event from the caller's side: `Ok(None)` when the channel closed cleanly.
    /// Must be cancel-safe (the session `select!`s it against its clock): nothing read may be
    /// lost when the future is dropped.
    ///
    /// # Errors
    /// [`MediaError`] when the peer broke the protocol or the socket failed.
    fn read(&mut self) -> impl Future<Output = Result<Option<MediaEvent>, MediaError>> + Send;

    /// Writes one 20 ms frame of slin `samples` at `rate` (`rate.samples_per_frame()`
    /// samples), now: the session's playout clock paces the calls.
    ///
    /// # Errors
    /// The socket's write error; the session gives the call up.
    fn write_frame(
        &mut self,
        rate: SlinRate,
        samples: &[i16],
    ) -> impl Future<Output = std::io::Result<()>> + Send;

    /// The playout was flushed (barge-in): a transport that queues audio on the far side
    /// (chan_websocket's `FLUSH_MEDIA`) drops it there too. The default does nothing: on
    /// AudioSocket and RTP nothing is queued beyond the frame on the wire.
    ///
    /// # Errors
    /// The socket's write error.
    fn flushed(&mut self) -> impl Future<Output = std::io::Result<()>> + Send {
        async { Ok(()) }
    }

    /// Says goodbye the transport's way so the dialplan goes on (AudioSocket `0x00`).
    ///
    /// # Errors
    /// The socket's write error.
    fn hang_up(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;

    /// Closes the channel (TCP FIN, a WebSocket close, releasing a UDP port).
    ///
    /// # Errors
    /// The socket's error.
    fn close(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// What an AudioSocket read means for the call: the message as a [`MediaEvent`], a clean
/// close as `None`, and what may not come after the call id (an error frame `0xff`, a second
/// call id, bytes that are not AudioSocket) as [`MediaError::Protocol`].
///
/// # Errors
/// As above; a socket error is [`MediaError::Io`].
pub fn from_audiosocket(
    read: Result<Option<Message>, ReadError>,
) -> Result<Option<MediaEvent>, MediaError> {
    match read {
        Ok(Some(Message::Audio { rate, payload })) => Ok(Some(MediaEvent::Audio { rate, payload })),
        Ok(Some(Message::Dtmf(d))) => Ok(Some(MediaEvent::Dtmf(d))),
        Ok(Some(Message::Hangup)) => Ok(Some(MediaEvent::Hangup)),
        Ok(None) => Ok(None),
        Ok(Some(Message::Error(code))) => Err(MediaError::Protocol(format!(
            "asterisk sent error frame, code {code}"
        ))),
        Ok(Some(Message::CallId(id))) => Err(MediaError::Protocol(format!("second call id {id}"))),
        Err(ReadError::Codec(e)) => Err(MediaError::Protocol(e.to_string())),
        Err(ReadError::Io(e)) => Err(MediaError::Io(e)),
    }
}

/// An AudioSocket connection (Asterisk's `res_audiosocket`; TCP or the tunnel) whose call id
/// has been read: the media channel of modes 1 and 2 and of externalMedia over AudioSocket.
#[derive(Debug)]
pub struct AudioSocketPort<S> {
    conn: Connection<S>,
}

impl<S> AudioSocketPort<S> {
    /// The port over `conn`; bytes it read past the call id stay in it.
    pub fn new(conn: Connection<S>) -> Self {
        AudioSocketPort { conn }
    }
}

impl<S: AsyncRead + AsyncWrite + Send + Unpin> MediaPort for AudioSocketPort<S> {
    fn transport(&self) -> &'static str {
        "audiosocket"
    }

    async fn read(&mut self) -> Result<Option<MediaEvent>, MediaError> {
        from_audiosocket(self.conn.read_message().await)
    }

    async fn write_frame(&mut self, rate: SlinRate, samples: &[i16]) -> std::io::Result<()> {
        self.conn.write_audio(rate, samples).await
    }

    async fn hang_up(&mut self) -> std::io::Result<()> {
        self.conn.write_message(&Message::Hangup).await
    }

    async fn close(&mut self) -> std::io::Result<()> {
        self.conn.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audiosocket::codec::CodecError;
    use uuid::Uuid;

    #[test]
    fn audiosocket_reads_map_to_events_and_errors() {
        let audio = Message::Audio {
            rate: SlinRate::Hz16000,
            payload: Bytes::from_static(&[1, 0]),
        };
        assert_eq!(
            from_audiosocket(Ok(Some(audio))).unwrap(),
            Some(MediaEvent::Audio {
                rate: SlinRate::Hz16000,
                payload: Bytes::from_static(&[1, 0])
            })
        );
        assert_eq!(
            from_audiosocket(Ok(Some(Message::Dtmf('#')))).unwrap(),
            Some(MediaEvent::Dtmf('#'))
        );
        assert_eq!(from_audiosocket(Ok(None)).unwrap(), None);
        let e = from_audiosocket(Ok(Some(Message::Error(3)))).unwrap_err();
        assert_eq!(e.to_string(), "asterisk sent error frame, code 3");
        let e = from_audiosocket(Ok(Some(Message::CallId(Uuid::nil())))).unwrap_err();
        assert!(matches!(e, MediaError::Protocol(t) if t.starts_with("second call id")));
        let codec = CodecError::UnknownKind(0x42);
        let e = from_audiosocket(Err(ReadError::Codec(codec))).unwrap_err();
        assert!(matches!(e, MediaError::Protocol(_)), "{e:?}");
        let io = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let e = from_audiosocket(Err(ReadError::Io(io))).unwrap_err();
        assert!(e.to_string().starts_with("read: "), "{e}");
    }

    #[tokio::test]
    async fn the_audiosocket_port_writes_frames_and_says_goodbye_with_0x00() {
        let (a, b) = tokio::io::duplex(4096);
        let mut port = AudioSocketPort::new(Connection::new(a));
        let mut peer = Connection::new(b);
        port.write_frame(SlinRate::Hz8000, &[7; 160]).await.unwrap();
        port.hang_up().await.unwrap();
        port.close().await.unwrap();
        match peer.read_message().await.unwrap() {
            Some(Message::Audio { rate, payload }) => {
                assert_eq!(rate, SlinRate::Hz8000);
                assert_eq!(&payload[..2], &[7, 0]);
                assert_eq!(payload.len(), 320);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            peer.read_message().await.unwrap(),
            Some(Message::Hangup)
        ));
        assert!(peer.read_message().await.unwrap().is_none());
        assert_eq!(port.transport(), "audiosocket");
    }
}
