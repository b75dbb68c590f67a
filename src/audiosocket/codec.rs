//! Sans-IO AudioSocket codec: bytes ⇄ [`Message`], no sockets, no clock.
//!
//! Wire format, from Asterisk's `include/asterisk/res_audiosocket.h` (and observed on
//! Asterisk 22, see `docs/architecture.md`): every frame is
//!
//! ```text
//! kind: u8 | length: u16 big-endian | payload: [u8; length]
//! ```
//!
//! | kind        | payload                                              |
//! |-------------|------------------------------------------------------|
//! | `0x00`      | hangup, empty                                        |
//! | `0x01`      | call id, 16 raw UUID bytes                           |
//! | `0x03`      | DTMF digit, 1 ASCII byte (`0-9*#A-D`)                |
//! | `0x10`      | slin 8 kHz: signed 16-bit little-endian mono samples |
//! | `0x11–0x18` | slin at 12, 16, 24, 32, 44.1, 48, 96, 192 kHz        |
//! | `0xFF`      | error, 1-byte code                                   |
//!
//! Guarantees: [`decode`] never panics on any input; it returns `Ok(None)` for a partial
//! frame (more bytes are needed) and consumes nothing in that case; it rejects an unknown kind,
//! a payload longer than [`MAX_PAYLOAD_BYTES`], an odd audio length and a malformed fixed-size
//! payload *from the header alone*, before any payload is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use uuid::Uuid;

/// Size of the frame header: kind (1 byte) + length (2 bytes, big-endian).
pub(crate) const HEADER_BYTES: usize = 3;

/// Largest payload accepted, in bytes: 100 ms of slin at 192 kHz (38 400 bytes).
///
/// Asterisk sends 20 ms frames (320 bytes at 8 kHz, 7 680 bytes at 192 kHz); anything longer
/// than five such frames is treated as a corrupt stream rather than buffered.
pub(crate) const MAX_PAYLOAD_BYTES: usize = 38_400;

/// Sample rates AudioSocket can carry, each with its own frame kind (`0x10`–`0x18`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlinRate {
    /// 8 kHz, kind `0x10` (the only rate before Asterisk 20.17/21.12/22.7/23.1).
    Hz8000,
    /// 12 kHz, kind `0x11`.
    Hz12000,
    /// 16 kHz, kind `0x12`.
    Hz16000,
    /// 24 kHz, kind `0x13`.
    Hz24000,
    /// 32 kHz, kind `0x14`.
    Hz32000,
    /// 44.1 kHz, kind `0x15`.
    Hz44100,
    /// 48 kHz, kind `0x16`.
    Hz48000,
    /// 96 kHz, kind `0x17`.
    Hz96000,
    /// 192 kHz, kind `0x18`.
    Hz192000,
}

impl SlinRate {
    /// Every rate, in kind order (`0x10` first).
    pub const ALL: [SlinRate; 9] = [
        SlinRate::Hz8000,
        SlinRate::Hz12000,
        SlinRate::Hz16000,
        SlinRate::Hz24000,
        SlinRate::Hz32000,
        SlinRate::Hz44100,
        SlinRate::Hz48000,
        SlinRate::Hz96000,
        SlinRate::Hz192000,
    ];

    /// The frame kind byte for audio at this rate (`0x10`–`0x18`).
    pub(crate) const fn kind(self) -> u8 {
        0x10 + self as u8
    }

    /// The rate for an audio kind byte, or `None` when `kind` is not `0x10`–`0x18`.
    pub(crate) const fn from_kind(kind: u8) -> Option<SlinRate> {
        match kind {
            0x10..=0x18 => Some(Self::ALL[(kind - 0x10) as usize]),
            _ => None,
        }
    }

    /// The sample rate in Hz.
    pub const fn hz(self) -> u32 {
        match self {
            SlinRate::Hz8000 => 8_000,
            SlinRate::Hz12000 => 12_000,
            SlinRate::Hz16000 => 16_000,
            SlinRate::Hz24000 => 24_000,
            SlinRate::Hz32000 => 32_000,
            SlinRate::Hz44100 => 44_100,
            SlinRate::Hz48000 => 48_000,
            SlinRate::Hz96000 => 96_000,
            SlinRate::Hz192000 => 192_000,
        }
    }

    /// The AudioSocket rate for a sample rate in Hz, if AudioSocket has a kind for it.
    pub fn from_hz(hz: u32) -> Option<SlinRate> {
        Self::ALL.into_iter().find(|r| r.hz() == hz)
    }

    /// Samples in one 20 ms frame at this rate (160 at 8 kHz, 882 at 44.1 kHz).
    pub const fn samples_per_frame(self) -> usize {
        (self.hz() / 50) as usize
    }

    /// Bytes in one full 20 ms slin frame at this rate (320 at 8 kHz, 640 at 16 kHz).
    pub const fn bytes_per_frame(self) -> usize {
        self.samples_per_frame() * 2
    }
}

/// One AudioSocket message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `0x00`: end of the session. Asterisk never sends it (a caller hanging up is a
    /// closed socket); voicegate sends it to make `AudioSocket()` return 0.
    Hangup,
    /// `0x01`: the call id, always the first message from Asterisk.
    CallId(Uuid),
    /// `0x03`: one DTMF digit, `0-9`, `*`, `#` or `A-D`. Only Asterisk sends it: Asterisk
    /// hangs the call up if it receives one.
    Dtmf(char),
    /// `0x10`–`0x18`: slin audio, signed 16-bit little-endian mono. The payload has an even
    /// length, not always a full 20 ms frame (276-byte frames were seen at 8 kHz).
    Audio {
        /// Sample rate, from the frame kind.
        rate: SlinRate,
        /// Raw little-endian samples; `payload.len()` is even.
        payload: Bytes,
    },
    /// `0xFF`: error with its 1-byte code. Asterisk hangs up if it receives one.
    Error(u8),
}

/// Why a byte stream is not valid AudioSocket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The kind byte is none of `0x00`, `0x01`, `0x03`, `0x10`–`0x18`, `0xFF`.
    #[error("unknown audiosocket frame kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The declared payload length exceeds [`MAX_PAYLOAD_BYTES`].
    #[error("audiosocket frame of kind 0x{kind:02x} declares {len} bytes, more than {max}", max = MAX_PAYLOAD_BYTES)]
    Oversized {
        /// The frame kind.
        kind: u8,
        /// The declared payload length, in bytes.
        len: usize,
    },
    /// A fixed-size payload (`0x00`: 0, `0x01`: 16, `0x03`: 1, `0xFF`: 1 byte) has another
    /// length, or an audio payload has an odd length.
    #[error(
        "audiosocket frame of kind 0x{kind:02x} has a payload of {len} bytes, expected {expected}"
    )]
    BadLength {
        /// The frame kind.
        kind: u8,
        /// The declared payload length, in bytes.
        len: usize,
        /// What the kind requires, in words.
        expected: &'static str,
    },
    /// A DTMF payload that is not one of `0-9*#A-D`.
    #[error("audiosocket dtmf payload 0x{0:02x} is not a digit of 0-9*#A-D")]
    BadDtmf(u8),
}

/// Checks a header's kind and declared length before the payload is buffered.
fn check_header(kind: u8, len: usize) -> Result<(), CodecError> {
    let expected = match kind {
        0x00 => (len == 0, "0"),
        0x01 => (len == 16, "16"),
        0x03 | 0xFF => (len == 1, "1"),
        0x10..=0x18 => {
            if len > MAX_PAYLOAD_BYTES {
                return Err(CodecError::Oversized { kind, len });
            }
            (len % 2 == 0, "an even number")
        }
        other => return Err(CodecError::UnknownKind(other)),
    };
    match expected {
        (true, _) => Ok(()),
        (false, expected) => Err(CodecError::BadLength {
            kind,
            len,
            expected,
        }),
    }
}

/// Whether `byte` is a DTMF digit AudioSocket can carry (`0-9*#A-D`).
pub(crate) fn is_dtmf_digit(byte: u8) -> bool {
    matches!(byte, b'0'..=b'9' | b'*' | b'#' | b'A'..=b'D')
}

/// Decodes one message from the front of `buf`.
///
/// Returns `Ok(Some(message))` and removes the frame from `buf`; `Ok(None)` when `buf` holds
/// only part of a frame (nothing is consumed); `Err` when the stream is not AudioSocket, in
/// which case the connection cannot be resynchronised and should be closed. An audio payload
/// is split off `buf` without copying.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, CodecError> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let kind = buf[0];
    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
    check_header(kind, len)?;
    if buf.len() < HEADER_BYTES + len {
        return Ok(None);
    }
    buf.advance(HEADER_BYTES);
    let payload = buf.split_to(len);
    let message = match kind {
        0x00 => Message::Hangup,
        0x01 => {
            let mut id = [0u8; 16];
            id.copy_from_slice(&payload);
            Message::CallId(Uuid::from_bytes(id))
        }
        0x03 => {
            let digit = payload[0];
            if !is_dtmf_digit(digit) {
                return Err(CodecError::BadDtmf(digit));
            }
            Message::Dtmf(digit as char)
        }
        0xFF => Message::Error(payload[0]),
        _ => Message::Audio {
            // check_header accepted only 0x10..=0x18 here.
            rate: SlinRate::from_kind(kind).ok_or(CodecError::UnknownKind(kind))?,
            payload: payload.freeze(),
        },
    };
    Ok(Some(message))
}

/// Appends the frame for `message` to `out`.
///
/// # Panics
/// If an audio payload is longer than [`MAX_PAYLOAD_BYTES`] or odd, or a DTMF digit is not
/// one of `0-9*#A-D`: those are bugs in the caller, never input from the wire.
pub fn encode(message: &Message, out: &mut BytesMut) {
    match message {
        Message::Hangup => out.put_slice(&[0x00, 0, 0]),
        Message::CallId(id) => {
            out.put_slice(&[0x01, 0, 16]);
            out.put_slice(id.as_bytes());
        }
        Message::Dtmf(digit) => {
            assert!(
                digit.is_ascii() && is_dtmf_digit(*digit as u8),
                "not a DTMF digit: {digit:?}"
            );
            out.put_slice(&[0x03, 0, 1, *digit as u8]);
        }
        Message::Audio { rate, payload } => encode_audio_header(*rate, payload.len(), out)
            .map(|()| out.put_slice(payload))
            .unwrap_or_else(|e| panic!("{e}")),
        Message::Error(code) => out.put_slice(&[0xFF, 0, 1, *code]),
    }
}

/// Appends the 3-byte header of an audio frame of `payload_bytes` bytes at `rate` to `out`;
/// the caller appends the samples (little-endian). Lets the playout path write samples
/// straight into the output buffer without an intermediate [`Bytes`].
///
/// # Errors
/// [`CodecError::Oversized`] or [`CodecError::BadLength`] if the length is not a valid audio
/// payload.
pub(crate) fn encode_audio_header(
    rate: SlinRate,
    payload_bytes: usize,
    out: &mut BytesMut,
) -> Result<(), CodecError> {
    check_header(rate.kind(), payload_bytes)?;
    out.put_u8(rate.kind());
    // check_header bounded the length to MAX_PAYLOAD_BYTES < u16::MAX.
    out.put_u16(payload_bytes as u16);
    Ok(())
}

/// Appends one audio frame holding `samples` (encoded little-endian) at `rate` to `out`.
///
/// # Panics
/// If `samples` is longer than [`MAX_PAYLOAD_BYTES`]` / 2`.
pub fn encode_audio_samples(rate: SlinRate, samples: &[i16], out: &mut BytesMut) {
    encode_audio_header(rate, samples.len() * 2, out).unwrap_or_else(|e| panic!("{e}"));
    out.reserve(samples.len() * 2);
    for s in samples {
        out.put_i16_le(*s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(bytes: &[u8]) -> Result<Option<Message>, CodecError> {
        decode(&mut BytesMut::from(bytes))
    }

    #[test]
    fn decodes_each_kind() {
        assert_eq!(one(&[0x00, 0, 0]).unwrap(), Some(Message::Hangup));
        let id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let mut frame = vec![0x01, 0, 16];
        frame.extend_from_slice(id.as_bytes());
        assert_eq!(one(&frame).unwrap(), Some(Message::CallId(id)));
        assert_eq!(one(&[0x03, 0, 1, b'#']).unwrap(), Some(Message::Dtmf('#')));
        assert_eq!(one(&[0xFF, 0, 1, 7]).unwrap(), Some(Message::Error(7)));
        let audio = one(&[0x12, 0, 4, 1, 0, 0xff, 0xff]).unwrap().unwrap();
        assert_eq!(
            audio,
            Message::Audio {
                rate: SlinRate::Hz16000,
                payload: Bytes::from_static(&[1, 0, 0xff, 0xff])
            }
        );
    }

    #[test]
    fn partial_frames_are_incomplete_and_consume_nothing() {
        let mut buf = BytesMut::from(&[0x10, 0x01][..]);
        assert_eq!(decode(&mut buf).unwrap(), None);
        assert_eq!(buf.len(), 2);
        buf.extend_from_slice(&[0x40]);
        buf.extend_from_slice(&[0u8; 319]);
        assert_eq!(decode(&mut buf).unwrap(), None);
        assert_eq!(buf.len(), 322);
        buf.extend_from_slice(&[0u8; 1]);
        assert!(
            matches!(decode(&mut buf).unwrap(), Some(Message::Audio { rate: SlinRate::Hz8000, payload }) if payload.len() == 320)
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_bad_frames_from_the_header_alone() {
        assert_eq!(one(&[0x02, 0, 0]), Err(CodecError::UnknownKind(0x02)));
        assert_eq!(one(&[0x19, 0, 0]), Err(CodecError::UnknownKind(0x19)));
        assert_eq!(
            one(&[0x10, 0xff, 0xff]),
            Err(CodecError::Oversized {
                kind: 0x10,
                len: 65_535
            })
        );
        assert!(matches!(
            one(&[0x10, 0, 3]),
            Err(CodecError::BadLength { len: 3, .. })
        ));
        assert!(matches!(
            one(&[0x01, 0, 15]),
            Err(CodecError::BadLength { len: 15, .. })
        ));
        assert!(matches!(
            one(&[0x00, 0, 1]),
            Err(CodecError::BadLength { .. })
        ));
        assert_eq!(one(&[0x03, 0, 1, b'x']), Err(CodecError::BadDtmf(b'x')));
    }

    #[test]
    fn short_and_empty_audio_frames_are_accepted() {
        let m = one(&[0x10, 0, 0]).unwrap().unwrap();
        assert!(matches!(m, Message::Audio { payload, .. } if payload.is_empty()));
        let mut frame = vec![0x10, 0x01, 0x14];
        frame.extend_from_slice(&[0u8; 276]);
        assert!(
            matches!(one(&frame).unwrap(), Some(Message::Audio { payload, .. }) if payload.len() == 276)
        );
    }

    #[test]
    fn rate_kinds_round_trip() {
        for rate in SlinRate::ALL {
            assert_eq!(SlinRate::from_kind(rate.kind()), Some(rate));
            assert_eq!(SlinRate::from_hz(rate.hz()), Some(rate));
        }
        assert_eq!(SlinRate::Hz8000.bytes_per_frame(), 320);
        assert_eq!(SlinRate::Hz16000.bytes_per_frame(), 640);
        assert_eq!(SlinRate::Hz48000.bytes_per_frame(), 1920);
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            Just(Message::Hangup),
            any::<u128>().prop_map(|n| Message::CallId(Uuid::from_u128(n))),
            prop::sample::select(b"0123456789*#ABCD".to_vec())
                .prop_map(|d| Message::Dtmf(d as char)),
            any::<u8>().prop_map(Message::Error),
            (
                0usize..9,
                prop::collection::vec(any::<i16>(), 0..(MAX_PAYLOAD_BYTES / 2))
            )
                .prop_map(|(r, samples)| {
                    let mut payload = BytesMut::new();
                    for s in samples {
                        payload.put_i16_le(s);
                    }
                    Message::Audio {
                        rate: SlinRate::ALL[r],
                        payload: payload.freeze(),
                    }
                }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_any_split(messages in prop::collection::vec(arb_message(), 1..6), split in any::<prop::sample::Index>()) {
            let mut wire = BytesMut::new();
            for m in &messages {
                encode(m, &mut wire);
            }
            // Feed the stream in two parts at an arbitrary point, as TCP may deliver it.
            let wire = wire.freeze();
            let cut = split.index(wire.len() + 1);
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut decoded = Vec::new();
            while let Some(m) = decode(&mut buf).unwrap() {
                decoded.push(m);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(m) = decode(&mut buf).unwrap() {
                decoded.push(m);
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(decoded, messages);
        }

        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf) {}
        }

        /// Near-valid streams (real kinds, small lengths, random payloads, cut anywhere):
        /// every message decoded re-encodes to exactly the bytes it consumed, an incomplete
        /// frame consumes nothing, and decoding stops only at the end, a partial frame or an
        /// error.
        #[test]
        fn whatever_decodes_re_encodes_to_the_bytes_it_came_from(
            frames in prop::collection::vec(
                (
                    prop::sample::select(vec![0x00u8, 0x01, 0x03, 0x10, 0x11, 0x12, 0x18, 0xFF, 0x02, 0x19]),
                    prop_oneof![Just(0usize), Just(1), Just(16), 0usize..400],
                    any::<u8>(),
                ),
                1..8,
            ),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = Vec::new();
            for (i, (kind, len, seed)) in frames.iter().enumerate() {
                wire.push(*kind);
                wire.extend_from_slice(&(*len as u16).to_be_bytes());
                // DTMF payloads are mostly valid digits, so the frames after them are reached.
                wire.extend((0..*len).map(|k| if *kind == 0x03 { b"0123456789*#ABCD"[(*seed as usize + i) % 16] } else { seed.wrapping_add(k as u8) }));
            }
            wire.truncate(cut.index(wire.len() + 1));
            let mut buf = BytesMut::from(&wire[..]);
            let mut at = 0;
            loop {
                let before = buf.len();
                match decode(&mut buf) {
                    Ok(Some(m)) => {
                        let used = before - buf.len();
                        let mut again = BytesMut::new();
                        encode(&m, &mut again);
                        prop_assert_eq!(&again[..], &wire[at..at + used], "{:?}", m);
                        at += used;
                    }
                    Ok(None) => {
                        prop_assert_eq!(buf.len(), before, "an incomplete frame consumed bytes");
                        let complete = before >= HEADER_BYTES
                            && before >= HEADER_BYTES + u16::from_be_bytes([buf[1], buf[2]]) as usize;
                        prop_assert!(!complete, "a whole frame was left undecoded");
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
    }
}
