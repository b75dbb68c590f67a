//! AudioSocket framing over a byte stream: [`Connection`] reads and writes whole
//! [`Message`]s over anything `AsyncRead + AsyncWrite` (a TCP stream, a WireGuard tunnel
//! stream, an in-memory duplex in tests).
//!
//! Owns the read buffer, like mini-redis's `Connection`: [`Connection::read_message`] is
//! cancel-safe (bytes read stay buffered), so it can sit in a `select!` next to a clock.
//! It knows the wire only, never a call: the call id is just the first [`Message`].
//! [`read_message`] is the same reader for code that holds a split read half.

use crate::audiosocket::codec::{self, CodecError, Message, SlinRate};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why reading a message failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not AudioSocket.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The socket failed, or closed inside a frame (`UnexpectedEof`).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads the next message from `reader`, buffering in `buf`. `Ok(None)` is a clean close
/// between frames; a close in the middle of a frame is an error. Cancel-safe: bytes read
/// stay in `buf`.
///
/// # Errors
/// [`ReadError::Codec`] for bytes that are not AudioSocket (see [`codec::decode`]),
/// [`ReadError::Io`] for a socket error or a close inside a frame.
pub async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Message>, ReadError> {
    loop {
        if let Some(m) = codec::decode(buf)? {
            return Ok(Some(m));
        }
        buf.reserve(1024);
        if reader.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed inside a frame ({} bytes pending)",
                        buf.len()
                    ),
                )))
            };
        }
    }
}

/// One AudioSocket connection: the stream, its read buffer and a reusable write buffer.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    read_buf: BytesMut,
    write_buf: BytesMut,
}

impl<S> Connection<S> {
    /// Wraps `stream`; nothing is read or written yet. `S` may be a whole stream or one
    /// half of a split one (reading needs `AsyncRead`, writing `AsyncWrite`).
    pub fn new(stream: S) -> Self {
        Connection {
            stream,
            read_buf: BytesMut::with_capacity(2048),
            write_buf: BytesMut::with_capacity(4 + SlinRate::Hz8000.bytes_per_frame()),
        }
    }
}

impl<S: AsyncRead + Unpin> Connection<S> {
    /// Reads the next message: `Ok(None)` on a clean close between frames. Cancel-safe.
    ///
    /// # Errors
    /// As [`read_message`].
    pub async fn read_message(&mut self) -> Result<Option<Message>, ReadError> {
        read_message(&mut self.stream, &mut self.read_buf).await
    }
}

impl<S: AsyncWrite + Unpin> Connection<S> {
    /// Writes one message (encoded with [`codec::encode`]) in one `write_all`.
    ///
    /// # Errors
    /// The socket's write error.
    pub(crate) async fn write_message(&mut self, message: &Message) -> std::io::Result<()> {
        self.write_buf.clear();
        codec::encode(message, &mut self.write_buf);
        self.stream.write_all(&self.write_buf).await
    }

    /// Writes one audio frame of `samples` (slin) at `rate` in one `write_all`, without
    /// building a [`Message`].
    ///
    /// # Errors
    /// The socket's write error.
    pub(crate) async fn write_audio(
        &mut self,
        rate: SlinRate,
        samples: &[i16],
    ) -> std::io::Result<()> {
        self.write_buf.clear();
        codec::encode_audio_samples(rate, samples, &mut self.write_buf);
        self.stream.write_all(&self.write_buf).await
    }

    /// Writes bytes that already hold whole encoded frames.
    ///
    /// # Errors
    /// The socket's write error.
    pub(crate) async fn write_encoded(&mut self, frames: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(frames).await
    }

    /// Shuts the write side down (TCP FIN), after flushing.
    ///
    /// # Errors
    /// The socket's error.
    pub(crate) async fn shutdown(&mut self) -> std::io::Result<()> {
        self.stream.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[tokio::test]
    async fn messages_round_trip_across_any_split() {
        let (a, b) = tokio::io::duplex(7);
        let mut tx = Connection::new(a);
        let mut rx = Connection::new(b);
        let id = Uuid::from_u128(0x1234_5678);
        let writer = tokio::spawn(async move {
            tx.write_message(&Message::CallId(id)).await.unwrap();
            tx.write_audio(SlinRate::Hz16000, &[1; 320]).await.unwrap();
            tx.write_message(&Message::Dtmf('7')).await.unwrap();
            tx.shutdown().await.unwrap();
        });
        assert!(matches!(rx.read_message().await.unwrap(), Some(Message::CallId(i)) if i == id));
        match rx.read_message().await.unwrap() {
            Some(Message::Audio { rate, payload }) => {
                assert_eq!(rate, SlinRate::Hz16000);
                assert_eq!(payload.len(), 640);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            rx.read_message().await.unwrap(),
            Some(Message::Dtmf('7'))
        ));
        assert!(rx.read_message().await.unwrap().is_none(), "clean close");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_close_inside_a_frame_is_an_error() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[0x10, 0x01, 0x40, 0, 0]).await.unwrap();
        drop(a);
        let mut rx = Connection::new(b);
        match rx.read_message().await {
            Err(ReadError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
            other => panic!("{other:?}"),
        }
    }
}
