//! WAV files on disk: [`crate::audio::wav::Recording`] read from and written to a path
//! (the audio module itself does no I/O).

use crate::audio::wav::{Recording, WavError};
use std::path::Path;

/// Reads a mono 16-bit PCM WAV file.
///
/// # Errors
/// As [`Recording::read`], plus I/O errors.
pub fn open(path: &Path) -> Result<Recording, WavError> {
    let file = std::fs::File::open(path).map_err(hound::Error::IoError)?;
    Recording::read(std::io::BufReader::new(file))
}

/// Writes `recording` to a WAV file at `path` (mono 16-bit PCM).
///
/// # Errors
/// I/O errors.
pub fn save(recording: &Recording, path: &Path) -> Result<(), WavError> {
    let file = std::fs::File::create(path).map_err(hound::Error::IoError)?;
    recording.write(std::io::BufWriter::new(file))
}
