//! Converters between the call's slin and a provider's wire audio format, one per direction,
//! stateful for the whole call (the resampler keeps its filter state).
//!
//! Providers name their formats differently (OpenAI `audio/pcmu`, ElevenLabs `ulaw_8000`,
//! Deepgram `mulaw`); all of them are one of [`WireFormat`].

use super::g711::Law;
use super::resample::{ResampleError, Resampler};

/// A provider-side audio format: headerless, mono.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// G.711 at 8 kHz, one byte per sample.
    G711(Law),
    /// Signed 16-bit little-endian PCM at the given rate, Hz.
    Pcm16 {
        /// Sample rate, Hz.
        rate_hz: u32,
    },
}

impl WireFormat {
    /// The format's sample rate, Hz.
    pub fn rate_hz(self) -> u32 {
        match self {
            WireFormat::G711(_) => 8_000,
            WireFormat::Pcm16 { rate_hz } => rate_hz,
        }
    }

    /// Bytes per millisecond of audio.
    pub(crate) fn bytes_per_ms(self) -> usize {
        match self {
            WireFormat::G711(_) => 8,
            WireFormat::Pcm16 { rate_hz } => rate_hz as usize / 500,
        }
    }
}

/// Call slin → provider format.
#[derive(Debug)]
pub(crate) struct Encoder {
    format: WireFormat,
    resampler: Resampler,
    input: Vec<i16>,
    scratch: Vec<i16>,
}

impl Encoder {
    /// Converts slin at `call_rate_hz` to `format`.
    ///
    /// # Errors
    /// If the rates cannot be resampled.
    pub(crate) fn new(call_rate_hz: u32, format: WireFormat) -> Result<Self, ResampleError> {
        Ok(Encoder {
            format,
            resampler: Resampler::new(call_rate_hz, format.rate_hz())?,
            input: Vec::with_capacity(1024),
            scratch: Vec::with_capacity(2048),
        })
    }

    /// Appends the encoding of `samples` (slin at the call rate) to `out`.
    pub(crate) fn encode(&mut self, samples: &[i16], out: &mut Vec<u8>) {
        self.scratch.clear();
        self.resampler.process(samples, &mut self.scratch);
        match self.format {
            WireFormat::G711(law) => law.encode_into(&self.scratch, out),
            WireFormat::Pcm16 { .. } => super::slin_to_le_bytes(&self.scratch, out),
        }
    }

    /// Appends the encoding of little-endian slin `bytes` (as AudioSocket carries them).
    pub(crate) fn encode_le_bytes(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.input.clear();
        super::slin_from_le_bytes(bytes, &mut self.input);
        let input = std::mem::take(&mut self.input);
        self.encode(&input, out);
        self.input = input;
    }
}

/// Provider format → call slin.
#[derive(Debug)]
pub(crate) struct Decoder {
    format: WireFormat,
    resampler: Resampler,
    scratch: Vec<i16>,
    /// An odd trailing byte of PCM16 kept for the next chunk (deltas may split a sample).
    carry: Option<u8>,
}

impl Decoder {
    /// Converts `format` to slin at `call_rate_hz`.
    ///
    /// # Errors
    /// If the rates cannot be resampled.
    pub(crate) fn new(format: WireFormat, call_rate_hz: u32) -> Result<Self, ResampleError> {
        Ok(Decoder {
            format,
            resampler: Resampler::new(format.rate_hz(), call_rate_hz)?,
            scratch: Vec::with_capacity(4096),
            carry: None,
        })
    }

    /// Appends the slin (call rate) of provider `bytes` to `out`.
    pub(crate) fn decode(&mut self, bytes: &[u8], out: &mut Vec<i16>) {
        self.scratch.clear();
        match self.format {
            WireFormat::G711(law) => law.decode_into(bytes, &mut self.scratch),
            WireFormat::Pcm16 { .. } => {
                let mut rest = bytes;
                if let (Some(lo), Some((&hi, tail))) = (self.carry, rest.split_first()) {
                    self.scratch.push(i16::from_le_bytes([lo, hi]));
                    self.carry = None;
                    rest = tail;
                }
                super::slin_from_le_bytes(rest, &mut self.scratch);
                if rest.len() % 2 == 1 {
                    self.carry = rest.last().copied();
                }
            }
        }
        self.resampler.process(&self.scratch, out);
    }

    /// Forgets buffered audio (after barge-in).
    pub(crate) fn reset(&mut self) {
        self.resampler.reset();
        self.carry = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulaw_round_trip_at_8khz_is_close() {
        let mut enc = Encoder::new(8_000, WireFormat::G711(Law::Ulaw)).unwrap();
        let mut dec = Decoder::new(WireFormat::G711(Law::Ulaw), 8_000).unwrap();
        let samples: Vec<i16> = (0..160)
            .map(|i| ((i as f32 * 0.3).sin() * 8000.0) as i16)
            .collect();
        let mut wire = Vec::new();
        enc.encode(&samples, &mut wire);
        assert_eq!(wire.len(), 160);
        let mut back = Vec::new();
        dec.decode(&wire, &mut back);
        for (a, b) in samples.iter().zip(&back) {
            assert!((*a as i32 - *b as i32).abs() < 300);
        }
    }

    #[test]
    fn pcm24k_from_8khz_triples_and_splits_samples_across_chunks() {
        let mut enc = Encoder::new(8_000, WireFormat::Pcm16 { rate_hz: 24_000 }).unwrap();
        let mut wire = Vec::new();
        for _ in 0..10 {
            enc.encode(&[1000; 160], &mut wire);
        }
        // 200 ms of 8 kHz = 1600 samples → ~4800 samples at 24 kHz, less filter delay.
        assert!(
            wire.len() > 2 * 4000 && wire.len() <= 2 * 4800,
            "{}",
            wire.len()
        );
        let mut dec = Decoder::new(WireFormat::Pcm16 { rate_hz: 8_000 }, 8_000).unwrap();
        let mut out = Vec::new();
        dec.decode(&[0x10], &mut out);
        assert!(out.is_empty());
        dec.decode(&[0x27, 0x01, 0x00], &mut out);
        assert_eq!(out, vec![0x2710, 1]);
    }
}
