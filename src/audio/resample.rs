//! A stateful streaming resampler for mono slin, built on `rubato`'s FFT resampler.
//!
//! One [`Resampler`] lives per call and direction for the whole call: a fresh resampler per
//! 20 ms chunk would restart the filter each time and crackle. Input may come in chunks of any
//! size; output comes out as soon as a whole internal chunk (20 ms of input) is in. Buffers are
//! allocated once, in [`Resampler::new`]; [`Resampler::process`] allocates only if `out` grows.

use rubato::{FftFixedIn, Resampler as _};

/// Input handled per internal step, in milliseconds.
const CHUNK_MS: usize = 20;

/// Why a resampler could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ResampleError {
    /// `rubato` rejected the rates (zero, or a ratio it cannot do).
    #[error("cannot resample {from_hz} Hz to {to_hz} Hz: {source}")]
    Construction {
        /// Input sample rate, Hz.
        from_hz: u32,
        /// Output sample rate, Hz.
        to_hz: u32,
        /// What rubato said.
        source: rubato::ResamplerConstructionError,
    },
}

/// Converts mono slin from one sample rate to another, keeping filter state across calls.
pub(crate) struct Resampler {
    from_hz: u32,
    to_hz: u32,
    inner: Option<FftFixedIn<f32>>,
    /// Input samples waiting for a whole chunk, as f32 in [-1, 1).
    pending: Vec<f32>,
    out_buf: Vec<Vec<f32>>,
}

impl std::fmt::Debug for Resampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resampler")
            .field("from_hz", &self.from_hz)
            .field("to_hz", &self.to_hz)
            .finish()
    }
}

impl Resampler {
    /// A resampler from `from_hz` to `to_hz` (both Hz). Equal rates give a pass-through.
    ///
    /// # Errors
    /// [`ResampleError::Construction`] if rubato cannot resample between the two rates.
    pub(crate) fn new(from_hz: u32, to_hz: u32) -> Result<Self, ResampleError> {
        let chunk = (from_hz as usize * CHUNK_MS) / 1000;
        let inner = if from_hz == to_hz {
            None
        } else {
            Some(
                FftFixedIn::new(from_hz as usize, to_hz as usize, chunk, 1, 1).map_err(
                    |source| ResampleError::Construction {
                        from_hz,
                        to_hz,
                        source,
                    },
                )?,
            )
        };
        let out_max = inner.as_ref().map_or(0, |r| r.output_frames_max());
        Ok(Resampler {
            from_hz,
            to_hz,
            inner,
            pending: Vec::with_capacity(chunk * 2),
            out_buf: vec![vec![0.0; out_max]],
        })
    }

    /// Feeds `input` (slin at `from_hz`) and appends every output sample now ready (slin at
    /// `to_hz`) to `out`. Output lags input by the filter delay and up to one 20 ms chunk.
    pub(crate) fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        let Some(inner) = self.inner.as_mut() else {
            out.extend_from_slice(input);
            return;
        };
        self.pending
            .extend(input.iter().map(|&s| f32::from(s) / 32768.0));
        let mut consumed = 0;
        while self.pending.len() - consumed >= inner.input_frames_next() {
            let need = inner.input_frames_next();
            let chunk = [&self.pending[consumed..consumed + need]];
            match inner.process_into_buffer(&chunk, &mut self.out_buf, None) {
                Ok((used, produced)) => {
                    consumed += used;
                    out.extend(self.out_buf[0][..produced].iter().map(|&x| to_i16(x)));
                }
                // Buffers are sized from rubato's own numbers; a failure is a broken
                // invariant, so drop this chunk rather than loop forever.
                Err(_) => {
                    consumed += need;
                }
            }
        }
        self.pending.drain(..consumed);
    }

    /// Drops buffered input and filter state (after barge-in, so old speech does not leak
    /// into the next reply).
    pub(crate) fn reset(&mut self) {
        self.pending.clear();
        if let Some(inner) = self.inner.as_mut() {
            inner.reset();
        }
    }
}

#[inline]
fn to_i16(x: f32) -> i16 {
    (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(hz: f32, rate: u32, n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| {
                ((i as f32 * hz * 2.0 * std::f32::consts::PI / rate as f32).sin() * 10_000.0) as i16
            })
            .collect()
    }

    /// Power of `signal` at `hz`, by correlation (a one-bin DFT).
    fn power_at(signal: &[i16], hz: f32, rate: u32) -> f32 {
        let (mut re, mut im) = (0.0f32, 0.0f32);
        for (i, &s) in signal.iter().enumerate() {
            let ph = i as f32 * hz * 2.0 * std::f32::consts::PI / rate as f32;
            re += s as f32 * ph.cos();
            im += s as f32 * ph.sin();
        }
        (re * re + im * im).sqrt() / signal.len() as f32
    }

    #[test]
    fn upsamples_in_odd_chunks_keeping_the_tone() {
        for (from, to) in [
            (8_000, 24_000),
            (16_000, 24_000),
            (24_000, 8_000),
            (24_000, 16_000),
            (8_000, 16_000),
            (44_100, 8_000),
        ] {
            let mut r = Resampler::new(from, to).unwrap();
            let input = sine(440.0, from, from as usize); // one second
            let mut out = Vec::new();
            for chunk in input.chunks(137) {
                r.process(chunk, &mut out);
            }
            // All but the last partial chunk and the filter delay came out.
            let expected = to as usize;
            assert!(
                out.len() > expected * 9 / 10 && out.len() <= expected,
                "{from}->{to}: {}",
                out.len()
            );
            let steady = &out[out.len() / 4..];
            let tone = power_at(steady, 440.0, to);
            let off = power_at(steady, 1234.0, to);
            assert!(
                tone > 3_000.0 && off < tone / 50.0,
                "{from}->{to}: tone {tone} off {off}"
            );
        }
    }

    #[test]
    fn equal_rates_pass_through() {
        let mut r = Resampler::new(8_000, 8_000).unwrap();
        let mut out = Vec::new();
        r.process(&[1, 2, 3], &mut out);
        assert_eq!(out, vec![1, 2, 3]);
    }
}
