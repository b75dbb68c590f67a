//! The RTP fixed header (RFC 3550 §5.1) as a value: [`parse`] a datagram into a
//! [`RtpPacket`] view, [`RtpHeader::emit`] one back into bytes.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |V=2|P|X|  CC   |M|     PT      |       sequence number         |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                           timestamp                           |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |           synchronization source (SSRC) identifier            |
//! +=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+=+
//! |            contributing source (CSRC) identifiers             |
//! |                             ....                              |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | (X) profile-defined | length in 32-bit words  | extension ... |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! | payload ...                          | (P) padding ... | count |
//! ```
//!
//! Guarantees: [`parse`] never panics on any input and never allocates; it rejects a version
//! other than 2, a datagram shorter than its declared CSRC list, extension or padding, and a
//! padding count of 0. What parses re-emits to the same bytes, except that padding octets
//! before the count are emitted as zeros (RFC 3550 leaves their value open).

/// Bytes of the fixed header (no CSRC, no extension).
pub(crate) const FIXED_HEADER_BYTES: usize = 12;

/// Largest datagram voicegate reads or writes, in bytes (an Ethernet MTU; 20 ms of slin16 is
/// 640 bytes of payload).
pub(crate) const MAX_DATAGRAM_BYTES: usize = 1500;

/// Why a datagram is not an RTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RtpError {
    /// Fewer than 12 bytes.
    #[error("rtp datagram of {0} bytes is shorter than the 12-byte header")]
    TooShort(usize),
    /// The version field is not 2.
    #[error("rtp version {0}, not 2")]
    Version(u8),
    /// The CSRC list, the extension or the padding runs past the end of the datagram.
    #[error("rtp datagram of {len} bytes is shorter than its header declares ({needed})")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Bytes the header and padding need.
        needed: usize,
    },
    /// The padding bit is set but the last octet (the padding count) is 0.
    #[error("rtp padding count of 0")]
    ZeroPadding,
}

/// The header extension (the `X` bit): a 16-bit profile-defined value and whole 32-bit
/// words of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension<'a> {
    /// The profile-defined 16 bits (e.g. `0xBEDE` for RFC 8285 one-byte headers).
    pub profile: u16,
    /// The extension data, a multiple of 4 bytes long.
    pub data: &'a [u8],
}

/// The RTP header fields voicegate reads and writes (RFC 3550 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader<'a> {
    /// `M`: for audio, the first packet of a talkspurt (RFC 3551 §4.1).
    pub marker: bool,
    /// `PT`, 7 bits: 0 = PCMU, 8 = PCMA, 118 = Asterisk's L16/16000.
    pub payload_type: u8,
    /// Sequence number, +1 per packet, wrapping.
    pub sequence: u16,
    /// Sampling instant of the first payload sample, in clock-rate units, wrapping.
    pub timestamp: u32,
    /// Synchronization source.
    pub ssrc: u32,
    /// Contributing sources (`CC` of them, at most 15), as raw big-endian bytes.
    pub csrc: &'a [u8],
    /// The header extension, if `X` is set.
    pub extension: Option<Extension<'a>>,
    /// Padding octets at the end, including the count octet (0 = no `P` bit).
    pub padding: u8,
}

impl<'a> RtpHeader<'a> {
    /// A plain header: no CSRC, no extension, no padding.
    pub(crate) fn new(payload_type: u8, sequence: u16, timestamp: u32, ssrc: u32) -> Self {
        RtpHeader {
            marker: false,
            payload_type: payload_type & 0x7F,
            sequence,
            timestamp,
            ssrc,
            csrc: &[],
            extension: None,
            padding: 0,
        }
    }

    /// Number of CSRC identifiers (`CC`).
    #[cfg(test)]
    pub(crate) fn csrc_count(&self) -> usize {
        self.csrc.len() / 4
    }

    /// Bytes of the header with CSRCs and extension (not the padding).
    #[cfg(test)]
    pub(crate) fn header_len(&self) -> usize {
        FIXED_HEADER_BYTES + self.csrc.len() + self.extension.map_or(0, |e| 4 + e.data.len())
    }

    /// Appends the packet, header + `payload` + padding, to `out`.
    ///
    /// Fields beyond the wire's range are cut to it: `payload_type` to 7 bits, `csrc` to
    /// its first 15 whole identifiers, extension data to whole 32-bit words (at most
    /// 65 535 of them).
    pub fn emit(&self, payload: &[u8], out: &mut Vec<u8>) {
        let csrc = &self.csrc[..(self.csrc.len() / 4).min(15) * 4];
        let b0 = 0x80
            | (u8::from(self.padding > 0) << 5)
            | (u8::from(self.extension.is_some()) << 4)
            | (csrc.len() / 4) as u8;
        out.push(b0);
        out.push((u8::from(self.marker) << 7) | (self.payload_type & 0x7F));
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.ssrc.to_be_bytes());
        out.extend_from_slice(csrc);
        if let Some(ext) = self.extension {
            let words = (ext.data.len() / 4).min(usize::from(u16::MAX));
            out.extend_from_slice(&ext.profile.to_be_bytes());
            out.extend_from_slice(&(words as u16).to_be_bytes());
            out.extend_from_slice(&ext.data[..words * 4]);
        }
        out.extend_from_slice(payload);
        if self.padding > 0 {
            out.extend(std::iter::repeat_n(0u8, usize::from(self.padding) - 1));
            out.push(self.padding);
        }
    }
}

/// A parsed datagram: its header and a view of its payload (padding removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpPacket<'a> {
    /// The header.
    pub header: RtpHeader<'a>,
    /// The payload, without header and padding.
    pub payload: &'a [u8],
}

/// Parses one datagram.
///
/// # Errors
/// [`RtpError`] for a datagram that is not version-2 RTP or is shorter than it declares.
pub fn parse(datagram: &[u8]) -> Result<RtpPacket<'_>, RtpError> {
    let len = datagram.len();
    if len < FIXED_HEADER_BYTES {
        return Err(RtpError::TooShort(len));
    }
    let b0 = datagram[0];
    let version = b0 >> 6;
    if version != 2 {
        return Err(RtpError::Version(version));
    }
    let has_padding = b0 & 0x20 != 0;
    let has_extension = b0 & 0x10 != 0;
    let cc = usize::from(b0 & 0x0F);
    let truncated = |needed| RtpError::Truncated { len, needed };
    let mut at = FIXED_HEADER_BYTES + cc * 4;
    if len < at {
        return Err(truncated(at));
    }
    let csrc = &datagram[FIXED_HEADER_BYTES..at];
    let extension = if has_extension {
        if len < at + 4 {
            return Err(truncated(at + 4));
        }
        let profile = u16::from_be_bytes([datagram[at], datagram[at + 1]]);
        let words = usize::from(u16::from_be_bytes([datagram[at + 2], datagram[at + 3]]));
        let end = at + 4 + words * 4;
        if len < end {
            return Err(truncated(end));
        }
        let data = &datagram[at + 4..end];
        at = end;
        Some(Extension { profile, data })
    } else {
        None
    };
    let padding = if has_padding {
        // `len >= 12` here, so the last octet exists.
        let count = datagram[len - 1];
        if count == 0 {
            return Err(RtpError::ZeroPadding);
        }
        if len < at + usize::from(count) {
            return Err(truncated(at + usize::from(count)));
        }
        count
    } else {
        0
    };
    let header = RtpHeader {
        marker: datagram[1] & 0x80 != 0,
        payload_type: datagram[1] & 0x7F,
        sequence: u16::from_be_bytes([datagram[2], datagram[3]]),
        timestamp: u32::from_be_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]),
        ssrc: u32::from_be_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]),
        csrc,
        extension,
        padding,
    };
    Ok(RtpPacket {
        header,
        payload: &datagram[at..len - usize::from(padding)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_a_pcma_packet_as_asterisk_sends_it() {
        // V=2, no P/X/CC, M=1, PT=8, seq 0x1234, ts 160, SSRC 0xDEADBEEF, 160 bytes of 0xD5.
        let mut d = vec![0x80, 0x88, 0x12, 0x34, 0, 0, 0, 160, 0xDE, 0xAD, 0xBE, 0xEF];
        d.extend([0xD5; 160]);
        let p = parse(&d).unwrap();
        assert!(p.header.marker);
        assert_eq!(p.header.payload_type, 8);
        assert_eq!(p.header.sequence, 0x1234);
        assert_eq!(p.header.timestamp, 160);
        assert_eq!(p.header.ssrc, 0xDEAD_BEEF);
        assert_eq!(p.payload.len(), 160);
        assert_eq!(p.header.padding, 0);
        let mut again = Vec::new();
        p.header.emit(p.payload, &mut again);
        assert_eq!(again, d);
    }

    #[test]
    fn csrc_extension_and_padding_are_skipped() {
        // CC=2, X, P: 12 + 8 (CSRC) + 4 + 4 (one extension word) + 3 payload + 4 padding.
        let mut d = vec![0xB2, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        d.extend([1, 1, 1, 1, 2, 2, 2, 2]);
        d.extend([0xBE, 0xDE, 0, 1, 9, 9, 9, 9]);
        d.extend([7, 7, 7]);
        d.extend([0, 0, 0, 4]);
        let p = parse(&d).unwrap();
        assert_eq!(p.header.csrc_count(), 2);
        let ext = p.header.extension.unwrap();
        assert_eq!((ext.profile, ext.data), (0xBEDE, &[9u8, 9, 9, 9][..]));
        assert_eq!(p.payload, &[7, 7, 7]);
        assert_eq!(p.header.padding, 4);
    }

    #[test]
    fn rejects_what_is_not_rtp() {
        assert_eq!(parse(&[0x80; 11]), Err(RtpError::TooShort(11)));
        let mut d = vec![0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse(&d), Err(RtpError::Version(1)));
        d[0] = 0x81; // CC=1 with no CSRC bytes
        assert_eq!(
            parse(&d),
            Err(RtpError::Truncated {
                len: 12,
                needed: 16
            })
        );
        d[0] = 0x90; // X with no extension header
        assert_eq!(
            parse(&d),
            Err(RtpError::Truncated {
                len: 12,
                needed: 16
            })
        );
        d[0] = 0xA0; // P with a count of 0
        assert_eq!(parse(&d), Err(RtpError::ZeroPadding));
        d[11] = 13; // P with more padding than the datagram
        assert_eq!(
            parse(&d),
            Err(RtpError::Truncated {
                len: 12,
                needed: 25
            })
        );
    }

    /// marker, payload type, sequence, timestamp, SSRC, CSRC bytes, extension, padding, payload.
    type Fields = (
        bool,
        u8,
        u16,
        u32,
        u32,
        Vec<u8>,
        Option<(u16, Vec<u8>)>,
        u8,
        Vec<u8>,
    );

    fn arb_packet() -> impl Strategy<Value = Fields> {
        (
            any::<bool>(),
            0u8..128,
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            prop::collection::vec(any::<[u8; 4]>(), 0..16).prop_map(|v| v.concat()),
            prop::option::of((
                any::<u16>(),
                prop::collection::vec(any::<[u8; 4]>(), 0..4).prop_map(|v| v.concat()),
            )),
            any::<u8>(),
            prop::collection::vec(any::<u8>(), 0..400),
        )
    }

    proptest! {
        #[test]
        fn emit_then_parse_round_trips(
            (marker, pt, seq, ts, ssrc, csrc, ext, padding, payload) in arb_packet()
        ) {
            let header = RtpHeader {
                marker,
                payload_type: pt,
                sequence: seq,
                timestamp: ts,
                ssrc,
                csrc: &csrc,
                extension: ext.as_ref().map(|(profile, data)| Extension { profile: *profile, data }),
                padding,
            };
            let mut bytes = Vec::new();
            header.emit(&payload, &mut bytes);
            prop_assert_eq!(bytes.len(), header.header_len() + payload.len() + usize::from(padding));
            let p = parse(&bytes).unwrap();
            prop_assert_eq!(p.header, header);
            prop_assert_eq!(p.payload, &payload[..]);
        }

        #[test]
        fn parse_never_panics_and_what_parses_re_emits(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(p) = parse(&bytes) {
                let mut again = Vec::new();
                p.header.emit(p.payload, &mut again);
                prop_assert_eq!(again.len(), bytes.len());
                let pad = usize::from(p.header.padding);
                // Everything but the padding filler is the same.
                prop_assert_eq!(&again[..bytes.len() - pad], &bytes[..bytes.len() - pad]);
                prop_assert_eq!(again.last(), if pad > 0 { bytes.last() } else { again.last() });
            }
        }
    }
}
