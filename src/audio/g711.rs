//! G.711 μ-law and A-law (ITU-T G.711), one byte per sample at 8 kHz, through the
//! `audio-codec-algorithms` crate. Slices in, slices or `Vec`s out; no state.

use audio_codec_algorithms::{decode_alaw, decode_ulaw, encode_alaw, encode_ulaw};

/// Which G.711 companding law.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Law {
    /// μ-law (PCMU), North America and Japan; OpenAI's `audio/pcmu`, ElevenLabs' `ulaw_8000`.
    Ulaw,
    /// A-law (PCMA), Europe and most other places; OpenAI's `audio/pcma`.
    Alaw,
}

impl Law {
    /// Encodes one slin sample.
    #[inline]
    pub fn encode(self, sample: i16) -> u8 {
        match self {
            Law::Ulaw => encode_ulaw(sample),
            Law::Alaw => encode_alaw(sample),
        }
    }

    /// Decodes one G.711 byte to a slin sample.
    #[inline]
    pub fn decode(self, byte: u8) -> i16 {
        match self {
            Law::Ulaw => decode_ulaw(byte),
            Law::Alaw => decode_alaw(byte),
        }
    }

    /// Appends the encoding of `samples` (slin, 8 kHz) to `out`, one byte per sample.
    pub fn encode_into(self, samples: &[i16], out: &mut Vec<u8>) {
        out.extend(samples.iter().map(|&s| self.encode(s)));
    }

    /// Appends the slin samples of `bytes` (G.711, 8 kHz) to `out`, one sample per byte.
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<i16>) {
        out.extend(bytes.iter().map(|&b| self.decode(b)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_close_for_both_laws() {
        for law in [Law::Ulaw, Law::Alaw] {
            for s in (-32768i32..=32767).step_by(97) {
                let s = s as i16;
                let back = law.decode(law.encode(s)) as i32;
                // G.711 keeps about 13 bits: the error grows with the magnitude.
                let tolerance = (s as i32).abs() / 16 + 16;
                assert!(
                    (back - s as i32).abs() <= tolerance,
                    "{law:?} {s} -> {back}"
                );
            }
        }
    }

    #[test]
    fn known_codes() {
        // μ-law silence is 0xFF, A-law silence is 0xD5 (G.711 tables).
        assert_eq!(Law::Ulaw.encode(0), 0xFF);
        assert_eq!(Law::Alaw.encode(0), 0xD5);
    }
}
