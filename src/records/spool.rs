//! The on-disk spool of call records (format in [`crate::records`]).
//!
//! [`Spool`] appends (blocking I/O: run it on a blocking thread); [`read_dir`] and
//! [`read_file`] read back, skipping a torn tail. Nothing here panics on file contents.

use super::CallRecord;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

/// First 8 bytes of every spool file.
pub const MAGIC: &[u8; 8] = b"VGREC\x00\x01\n";
/// Version byte at the start of every record payload.
pub const FORMAT_VERSION: u8 = 1;
/// Largest payload accepted, bytes; a larger length field is corruption.
pub const MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;
const HEADER: usize = 8;

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not start with the spool magic.
    #[error("{0}: not a voicegate record file")]
    NotASpool(PathBuf),
    /// A record could not be encoded (larger than [`MAX_RECORD_BYTES`]).
    #[error("record too large to store ({0} bytes)")]
    TooLarge(usize),
    /// postcard could not encode the record.
    #[error("cannot encode record: {0}")]
    Encode(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where a file's good records end, and why reading stopped early (if it did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileScan {
    /// Records read, in order.
    pub records: Vec<CallRecord>,
    /// Offset just past the last good record.
    pub good_len: u64,
    /// Bytes after `good_len` that are not a complete, valid record (a torn tail).
    pub torn_bytes: u64,
}

/// Encodes one frame: length, crc32 of the payload, payload (version byte + postcard).
///
/// # Errors
/// [`SpoolError::Encode`], [`SpoolError::TooLarge`].
pub fn encode_frame(rec: &CallRecord) -> Result<Vec<u8>, SpoolError> {
    let body = postcard::to_stdvec(rec).map_err(|e| SpoolError::Encode(e.to_string()))?;
    let len = body.len() + 1;
    if len > MAX_RECORD_BYTES {
        return Err(SpoolError::TooLarge(len));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&[FORMAT_VERSION]);
    crc.update(&body);
    let mut frame = Vec::with_capacity(HEADER + len);
    frame.extend_from_slice(&(len as u32).to_le_bytes());
    frame.extend_from_slice(&crc.finalize().to_le_bytes());
    frame.push(FORMAT_VERSION);
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Parses the frames of a whole file's bytes (after the magic), stopping at the first frame
/// that is incomplete, oversized, fails its checksum or does not decode.
pub fn scan_bytes(bytes: &[u8]) -> FileScan {
    let mut records = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= HEADER {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        if len == 0 || len > MAX_RECORD_BYTES || bytes.len() - at - HEADER < len {
            break;
        }
        let payload = &bytes[at + HEADER..at + HEADER + len];
        if crc32fast::hash(payload) != crc || payload[0] != FORMAT_VERSION {
            break;
        }
        match postcard::from_bytes::<CallRecord>(&payload[1..]) {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
        at += HEADER + len;
    }
    FileScan {
        records,
        good_len: at as u64,
        torn_bytes: (bytes.len() - at) as u64,
    }
}

/// Reads one spool file.
///
/// # Errors
/// [`SpoolError::Io`], [`SpoolError::NotASpool`].
pub fn read_file(path: &Path) -> Result<FileScan, SpoolError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io(path))?;
    if bytes.len() < MAGIC.len() {
        // A file torn before its magic was complete holds no records.
        return Ok(FileScan {
            records: Vec::new(),
            good_len: 0,
            torn_bytes: bytes.len() as u64,
        });
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(SpoolError::NotASpool(path.to_owned()));
    }
    let mut scan = scan_bytes(&bytes[MAGIC.len()..]);
    scan.good_len += MAGIC.len() as u64;
    Ok(scan)
}

/// The spool files in `dir`, oldest first, with their sequence numbers.
///
/// # Errors
/// [`SpoolError::Io`] (a missing directory is an empty list).
pub fn files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_prefix("calls-")
            .and_then(|s| s.strip_suffix(".vgr"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Every record in `dir`, oldest first, and the total of torn bytes skipped.
///
/// # Errors
/// [`SpoolError`] from listing or reading a file.
pub fn read_dir(dir: &Path) -> Result<(Vec<CallRecord>, u64), SpoolError> {
    let mut records = Vec::new();
    let mut torn = 0;
    for (_, path) in files(dir)? {
        let scan = read_file(&path)?;
        records.extend(scan.records);
        torn += scan.torn_bytes;
    }
    Ok((records, torn))
}

/// The appending end of a spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_file_bytes: u64,
    keep_files: u32,
    seq: u64,
    path: PathBuf,
    file: File,
    len: u64,
}

impl Spool {
    /// Opens (creating) the spool in `dir`: continues the newest file after cutting off any
    /// torn tail, or starts a new one.
    ///
    /// # Errors
    /// [`SpoolError`].
    pub fn open(dir: &Path, max_file_bytes: u64, keep_files: u32) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let existing = files(dir)?;
        if let Some((seq, path)) = existing.last() {
            let scan = read_file(path)?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io(path))?;
            let mut spool = Spool {
                dir: dir.to_owned(),
                max_file_bytes,
                keep_files: keep_files.max(1),
                seq: *seq,
                path: path.clone(),
                file,
                len: scan.good_len,
            };
            if scan.good_len < MAGIC.len() as u64 {
                spool.file.set_len(0).map_err(io(path))?;
                spool.file.write_all(MAGIC).map_err(io(path))?;
                spool.len = MAGIC.len() as u64;
            } else if scan.torn_bytes > 0 {
                tracing::warn!(file = %path.display(), torn_bytes = scan.torn_bytes, "cutting off a torn record");
                spool.file.set_len(scan.good_len).map_err(io(path))?;
            }
            spool.file.sync_all().map_err(io(path))?;
            spool
                .file
                .seek(SeekFrom::Start(spool.len))
                .map_err(io(path))?;
            Ok(spool)
        } else {
            let (path, file) = Self::create(dir, 1)?;
            Ok(Spool {
                dir: dir.to_owned(),
                max_file_bytes,
                keep_files: keep_files.max(1),
                seq: 1,
                path,
                file,
                len: MAGIC.len() as u64,
            })
        }
    }

    fn create(dir: &Path, seq: u64) -> Result<(PathBuf, File), SpoolError> {
        let path = dir.join(format!("calls-{seq:08}.vgr"));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        file.write_all(MAGIC).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
        // Make the new file's directory entry durable too.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok((path, file))
    }

    /// The file being appended to.
    pub fn current_file(&self) -> &Path {
        &self.path
    }

    /// Appends `rec` and fsyncs; rotates first if the file would exceed the size limit.
    ///
    /// # Errors
    /// [`SpoolError`]; on a write error the file is cut back to its last good record.
    pub fn append(&mut self, rec: &CallRecord) -> Result<(), SpoolError> {
        let frame = encode_frame(rec)?;
        if self.len > MAGIC.len() as u64 && self.len + frame.len() as u64 > self.max_file_bytes {
            self.rotate()?;
        }
        if let Err(e) = self.file.write_all(&frame) {
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(io(&self.path)(e));
        }
        self.file.sync_data().map_err(io(&self.path))?;
        self.len += frame.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), SpoolError> {
        let (path, file) = Self::create(&self.dir, self.seq + 1)?;
        self.seq += 1;
        self.path = path;
        self.file = file;
        self.len = MAGIC.len() as u64;
        let all = files(&self.dir)?;
        let excess = all.len().saturating_sub(self.keep_files as usize);
        for (_, old) in all.iter().take(excess) {
            std::fs::remove_file(old).map_err(io(old))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::TranscriptLine;

    pub(crate) fn record(i: u64, text_len: usize) -> CallRecord {
        CallRecord {
            call_id: uuid::Uuid::from_u128(i as u128 + 1),
            caller_number: Some(format!("+49301234{i:03}")),
            started_unix_ms: 1_700_000_000_000 + i,
            ended_unix_ms: 1_700_000_060_000 + i,
            duration_ms: 60_000,
            agent: "echo".into(),
            outcome: "completed".into(),
            detail: None,
            rate_hz: 8000,
            barge_ins: i,
            turn_latencies_ms: vec![640, 720],
            tool_calls: vec![],
            dtmf: "5".into(),
            transcript: vec![TranscriptLine {
                speaker: crate::agent::Speaker::Caller,
                text: "x".repeat(text_len),
            }],
            frames_in: 3000,
            frames_out: 3000,
            underruns: 0,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vg-spool-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn torn_tail_at_every_offset_is_skipped_and_cut() {
        let dir = tmp("torn");
        let mut s = Spool::open(&dir, 1 << 20, 4).unwrap();
        for i in 0..3 {
            s.append(&record(i, 50)).unwrap();
        }
        let path = s.current_file().to_owned();
        drop(s);
        let full = std::fs::read(&path).unwrap();
        let frame_len = encode_frame(&record(3, 50)).unwrap().len();
        let good = full.len();
        // Append a 4th record, then tear it at every possible length.
        let mut extra = full.clone();
        extra.extend_from_slice(&encode_frame(&record(3, 50)).unwrap());
        for cut in 0..frame_len {
            std::fs::write(&path, &extra[..good + cut]).unwrap();
            let scan = read_file(&path).unwrap();
            assert_eq!(scan.records.len(), 3, "cut {cut}");
            assert_eq!(scan.good_len, good as u64);
            assert_eq!(scan.torn_bytes, cut as u64);
        }
        // A flipped bit in the last record: checksum catches it.
        let mut flipped = extra.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(read_file(&path).unwrap().records.len(), 3);
        // Reopening cuts the torn tail and appends after the good records.
        let mut s = Spool::open(&dir, 1 << 20, 4).unwrap();
        s.append(&record(9, 50)).unwrap();
        let (all, torn) = read_dir(&dir).unwrap();
        assert_eq!(torn, 0);
        assert_eq!(all.len(), 4);
        assert_eq!(all[3], record(9, 50));
        assert_eq!(all[0], record(0, 50));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = tmp("rotate");
        let mut s = Spool::open(&dir, 64 * 1024, 3).unwrap();
        for i in 0..40 {
            s.append(&record(i, 10_000)).unwrap();
        }
        let files = files(&dir).unwrap();
        assert_eq!(files.len(), 3, "{files:?}");
        for (_, f) in &files {
            assert!(std::fs::metadata(f).unwrap().len() <= 64 * 1024);
        }
        let (all, torn) = read_dir(&dir).unwrap();
        assert_eq!(torn, 0);
        // The newest records are kept, in order.
        assert_eq!(all.last().unwrap(), &record(39, 10_000));
        assert!(
            all.windows(2)
                .all(|w| w[0].started_unix_ms < w[1].started_unix_ms)
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
