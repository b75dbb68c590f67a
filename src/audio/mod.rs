//! The audio path: G.711, resampling, framing and playout. Everything here is sans-IO and
//! works on slin (signed 16-bit mono samples, native `i16`) unless it says otherwise.

pub(crate) mod bargein;
pub mod convert;
pub mod g711;
pub mod playout;
pub mod resample;
pub(crate) mod vad;
pub mod wav;

pub use playout::{FRAME, PlayoutBuffer, PlayoutClock, ReplyId};

/// Appends the slin samples of little-endian `bytes` to `out` (an odd last byte is ignored).
pub fn slin_from_le_bytes(bytes: &[u8], out: &mut Vec<i16>) {
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]])),
    );
}

/// Appends `samples` to `out` as little-endian bytes (slin on AudioSocket, `pcm16` for the
/// providers).
pub fn slin_to_le_bytes(samples: &[i16], out: &mut Vec<u8>) {
    out.reserve(samples.len() * 2);
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
}

/// Root-mean-square level of `samples`, in linear units (0 to 32768).
pub fn rms(samples: &[i16]) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: f64 = samples.iter().map(|&s| (s as f64) * (s as f64)).sum();
    (sum / samples.len() as f64).sqrt() as f32
}
