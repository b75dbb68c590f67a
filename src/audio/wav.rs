//! Reading and writing mono 16-bit PCM WAV files (through `hound`), for the synthetic caller,
//! the self-test and the tests.

use std::io::{Read, Seek};

/// Why a WAV file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WavError {
    /// hound could not read or write the file.
    #[error("wav: {0}")]
    Hound(#[from] hound::Error),
    /// The file is not 16-bit integer PCM, or has more than one channel.
    #[error("wav: need mono 16-bit PCM, got {channels} channel(s) of {bits}-bit {format:?}")]
    Unsupported {
        /// Channels in the file.
        channels: u16,
        /// Bits per sample.
        bits: u16,
        /// Sample format.
        format: hound::SampleFormat,
    },
}

/// A mono slin recording.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    /// Sample rate, Hz.
    pub rate_hz: u32,
    /// Samples.
    pub samples: Vec<i16>,
}

impl Recording {
    /// Length in milliseconds.
    pub(crate) fn duration_ms(&self) -> u64 {
        self.samples.len() as u64 * 1000 / self.rate_hz as u64
    }

    /// Reads a mono 16-bit PCM WAV from any reader.
    ///
    /// # Errors
    /// [`WavError`] if it is not a WAV, or not mono 16-bit integer PCM.
    pub(crate) fn read<R: Read>(reader: R) -> Result<Self, WavError> {
        let mut r = hound::WavReader::new(reader)?;
        let spec = r.spec();
        if spec.channels != 1
            || spec.bits_per_sample != 16
            || spec.sample_format != hound::SampleFormat::Int
        {
            return Err(WavError::Unsupported {
                channels: spec.channels,
                bits: spec.bits_per_sample,
                format: spec.sample_format,
            });
        }
        let samples = r.samples::<i16>().collect::<Result<Vec<_>, _>>()?;
        Ok(Recording {
            rate_hz: spec.sample_rate,
            samples,
        })
    }

    /// Writes the recording as a mono 16-bit PCM WAV to a seekable writer.
    ///
    /// # Errors
    /// I/O errors from the writer.
    pub(crate) fn write<W: std::io::Write + Seek>(&self, writer: W) -> Result<(), WavError> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: self.rate_hz,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(writer, spec)?;
        for &s in &self.samples {
            w.write_sample(s)?;
        }
        w.finalize()?;
        Ok(())
    }
}
