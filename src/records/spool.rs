//! The on-disk spool of call records (format in [`crate::records`]).
//!
//! [`Spool`] appends (blocking I/O: run it on a blocking thread); [`read_dir`] and
//! [`read_file`] read back. Nothing here panics on file contents.
//!
//! Damage: a frame whose length, checksum, version or encoding is wrong is skipped and the
//! reader *resynchronises*: it looks for the next offset where a complete frame with a
//! matching CRC starts, so one flipped byte costs only the record it hit (a damaged file
//! magic costs nothing). [`Spool::open`] copies every unreadable byte range of the newest
//! file into `<dir>/quarantine/` (never deleted by voicegate), then rewrites the file with
//! its good records only, so appends continue after them.

use super::CallRecord;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};

/// First 8 bytes of every spool file.
pub const MAGIC: &[u8; 8] = b"VGREC\x00\x01\n";
/// Version byte at the start of every record payload (2: [`CallRecord::truncated`] added).
pub(crate) const FORMAT_VERSION: u8 = 3;
/// The subdirectory unreadable bytes are moved to.
pub const QUARANTINE_DIR: &str = "quarantine";
/// Largest payload accepted, bytes; a larger length field is corruption.
pub(crate) const MAX_RECORD_BYTES: usize = 4 * 1024 * 1024;
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

/// What a file holds: its good records, and the byte ranges that are not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileScan {
    /// Records read, in order.
    pub(crate) records: Vec<CallRecord>,
    /// Offset just past the last good record (or the magic).
    pub(crate) good_len: u64,
    /// Bytes that are not part of a good record, in all (`damaged` plus the tail after
    /// `good_len`).
    pub(crate) torn_bytes: u64,
    /// Unreadable ranges before `good_len`: `(offset, length)` in file offsets.
    pub(crate) damaged: Vec<(u64, u64)>,
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

/// The record of the frame starting at `at`, and its length, if a complete valid frame
/// starts there.
fn frame_at(bytes: &[u8], at: usize) -> Option<(CallRecord, usize)> {
    let head = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if !(2..=MAX_RECORD_BYTES).contains(&len) {
        return None;
    }
    let payload = bytes.get(at + HEADER..at + HEADER + len)?;
    // Cheap checks first: resynchronisation tries this at every offset.
    if !(1..=FORMAT_VERSION).contains(&payload[0]) || crc32fast::hash(payload) != crc {
        return None;
    }
    let record = if payload[0] < 3 {
        // Version 1 lacks the trailing `truncated` list, versions 1 and 2 the trailing
        // `barge_in` stats and `profile`: postcard's empty sequence, a zero integer and
        // `None` are one zero byte each (their varints), so the missing fields read as empty,
        // zero and `None`.
        let mut v3 = payload[1..].to_vec();
        let missing = if payload[0] == 1 { 6 } else { 5 };
        v3.extend(std::iter::repeat_n(0u8, missing));
        postcard::from_bytes::<CallRecord>(&v3).ok()?
    } else {
        postcard::from_bytes::<CallRecord>(&payload[1..]).ok()?
    };
    Some((record, HEADER + len))
}

/// Parses the frames of a file's bytes after the magic (offsets relative to `bytes`). A bad
/// frame is skipped by searching for the next offset where a valid frame starts.
pub(crate) fn scan_bytes(bytes: &[u8]) -> FileScan {
    let mut records = Vec::new();
    let mut damaged = Vec::new();
    let mut at = 0usize;
    let mut good_len = 0usize;
    while at < bytes.len() {
        if let Some((record, n)) = frame_at(bytes, at) {
            if at > good_len {
                damaged.push((good_len as u64, (at - good_len) as u64));
            }
            records.push(record);
            at += n;
            good_len = at;
        } else {
            at += 1;
        }
    }
    FileScan {
        records,
        good_len: good_len as u64,
        torn_bytes: (bytes.len() - good_len) as u64 + damaged.iter().map(|d| d.1).sum::<u64>(),
        damaged,
    }
}

/// Reads one spool file. A damaged magic is counted as damaged bytes; the records after it
/// are still found.
///
/// # Errors
/// [`SpoolError::Io`].
pub(crate) fn read_file(path: &Path) -> Result<FileScan, SpoolError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io(path))?;
    Ok(scan_file_bytes(&bytes))
}

/// [`scan_bytes`] of a whole file, magic included; offsets are file offsets.
pub(crate) fn scan_file_bytes(bytes: &[u8]) -> FileScan {
    let magic_ok = bytes.len() >= MAGIC.len() && &bytes[..MAGIC.len()] == MAGIC;
    if bytes.len() < MAGIC.len() {
        // A file torn before its magic was complete holds no records.
        return FileScan {
            records: Vec::new(),
            good_len: 0,
            torn_bytes: bytes.len() as u64,
            damaged: Vec::new(),
        };
    }
    let mut scan = scan_bytes(&bytes[MAGIC.len()..]);
    let shift = MAGIC.len() as u64;
    for d in &mut scan.damaged {
        d.0 += shift;
    }
    scan.good_len += shift;
    if !magic_ok {
        match scan.damaged.first_mut() {
            Some(first) if first.0 == shift => {
                first.0 = 0;
                first.1 += shift;
            }
            _ => scan.damaged.insert(0, (0, shift)),
        }
        scan.torn_bytes += shift;
        if scan.records.is_empty() {
            // Nothing good at all: the whole file is one damaged range.
            scan.damaged.clear();
            scan.good_len = 0;
            scan.torn_bytes = bytes.len() as u64;
        }
    }
    scan
}

/// The spool files in `dir`, oldest first, with their sequence numbers.
///
/// # Errors
/// [`SpoolError::Io`] (a missing directory is an empty list).
pub(crate) fn files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
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

/// Makes a directory's entries durable (best effort).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Copies `bytes` (found at `offset` of `file`) to
/// `<dir>/quarantine/<file name>.<offset>.bad` and fsyncs it.
fn quarantine(dir: &Path, file: &Path, offset: u64, bytes: &[u8]) -> Result<(), SpoolError> {
    let qdir = dir.join(QUARANTINE_DIR);
    std::fs::create_dir_all(&qdir).map_err(io(&qdir))?;
    let name = file
        .file_name()
        .map_or("spool".into(), |n| n.to_string_lossy().into_owned());
    let mut target = qdir.join(format!("{name}.{offset}.bad"));
    let mut n = 1;
    while target.exists() {
        // The same range damaged again after an earlier start: keep both copies.
        target = qdir.join(format!("{name}.{offset}.bad.{n}"));
        n += 1;
    }
    let mut f = File::create(&target).map_err(io(&target))?;
    f.write_all(bytes).map_err(io(&target))?;
    f.sync_all().map_err(io(&target))?;
    sync_dir(&qdir);
    metrics::counter!(crate::health::metrics::RECORDS_QUARANTINED_BYTES)
        .increment(bytes.len() as u64);
    Ok(())
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
    quarantined: u64,
}

/// Copies the damaged ranges of `path` (its `bytes`, as `scan` read them) and its torn tail
/// into `<dir>/quarantine/`; returns how many bytes went there.
fn quarantine_damage(
    dir: &Path,
    path: &Path,
    bytes: &[u8],
    scan: &FileScan,
) -> Result<u64, SpoolError> {
    let mut quarantined = 0u64;
    let tail = (scan.good_len, bytes.len() as u64 - scan.good_len);
    for (at, n) in scan.damaged.iter().copied().chain([tail]) {
        if n > 0 {
            quarantine(dir, path, at, &bytes[at as usize..(at + n) as usize])?;
            quarantined += n;
        }
    }
    Ok(quarantined)
}

/// Cuts `path` back to its `good_len` bytes (dropping `torn` bytes of a torn record), synced.
fn cut_torn_tail(path: &Path, good_len: u64, torn: u64) -> Result<(), SpoolError> {
    tracing::warn!(file = %path.display(), torn_bytes = torn, "cut off a torn record (kept in quarantine/)");
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(good_len).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    Ok(())
}

/// Damage inside `path`: rewrites its good records (`scan.records`) into a fresh file, then
/// swaps it in (synced, directory too); returns the new file's length in bytes.
/// `quarantined` (bytes) is for the log line.
fn rewrite_good_records(
    dir: &Path,
    path: &Path,
    scan: &FileScan,
    quarantined: u64,
) -> Result<u64, SpoolError> {
    tracing::warn!(
        file = %path.display(),
        kept_records = scan.records.len(),
        damaged_bytes = quarantined,
        "damaged spool file: unreadable bytes moved to quarantine/, good records kept"
    );
    let tmp = path.with_extension("vgr.tmp");
    let mut out = Vec::with_capacity(scan.good_len as usize);
    out.extend_from_slice(MAGIC);
    for r in &scan.records {
        out.extend_from_slice(&encode_frame(r)?);
    }
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&out).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(dir);
    Ok(out.len() as u64)
}

impl Spool {
    /// Opens (creating) the spool in `dir`: continues the newest file after its last good
    /// record, or starts a new one. Unreadable bytes of the newest file (a torn tail, a
    /// damaged record or magic) are first copied into `<dir>/quarantine/` and the file is
    /// cut or rewritten to hold its good records only; see [`Spool::quarantined_bytes`].
    ///
    /// # Errors
    /// [`SpoolError`].
    pub fn open(dir: &Path, max_file_bytes: u64, keep_files: u32) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let existing = files(dir)?;
        let Some((seq, path)) = existing.last() else {
            let (path, file) = Self::create(dir, 1)?;
            return Ok(Spool {
                dir: dir.to_owned(),
                max_file_bytes,
                keep_files: keep_files.max(1),
                seq: 1,
                path,
                file,
                len: MAGIC.len() as u64,
                quarantined: 0,
            });
        };
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io(path))?;
        let scan = scan_file_bytes(&bytes);
        let torn = bytes.len() as u64 - scan.good_len;
        let quarantined = quarantine_damage(dir, path, &bytes, &scan)?;
        let len = if scan.damaged.is_empty() && scan.good_len >= MAGIC.len() as u64 {
            // Only a torn tail (or nothing): cut it.
            if torn > 0 {
                cut_torn_tail(path, scan.good_len, torn)?;
            }
            scan.good_len
        } else {
            rewrite_good_records(dir, path, &scan, quarantined)?
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io(path))?;
        file.seek(SeekFrom::Start(len)).map_err(io(path))?;
        Ok(Spool {
            dir: dir.to_owned(),
            max_file_bytes,
            keep_files: keep_files.max(1),
            seq: *seq,
            path: path.clone(),
            file,
            len,
            quarantined,
        })
    }

    /// Bytes of the newest file that [`Spool::open`] moved to quarantine.
    pub fn quarantined_bytes(&self) -> u64 {
        self.quarantined
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
        sync_dir(dir);
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
                speaker: crate::records::Speaker::Caller,
                text: "x".repeat(text_len),
            }],
            frames_in: 3000,
            frames_out: 3000,
            underruns: 0,
            truncated: vec![],
            barge_in: Default::default(),
            profile: None,
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

    /// Issue 14: one flipped byte anywhere in a file of 100 records loses only the record
    /// it hit, on reading and on reopening; the damaged bytes land in quarantine/.
    #[test]
    fn a_flipped_byte_loses_only_its_record() {
        let dir = tmp("flip");
        let mut s = Spool::open(&dir, 1 << 24, 4).unwrap();
        for i in 0..100 {
            s.append(&record(i, 30)).unwrap();
        }
        let path = s.current_file().to_owned();
        drop(s);
        let clean = std::fs::read(&path).unwrap();
        let frame = encode_frame(&record(0, 30)).unwrap().len();
        // Every byte of record 37's frame, and a few elsewhere.
        let first = MAGIC.len() + 37 * frame;
        for at in (first..first + frame).chain([MAGIC.len() + 3, clean.len() - 1]) {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x01;
            let scan = scan_file_bytes(&bytes);
            assert_eq!(scan.records.len(), 99, "flip at {at}");
        }
        // Reopen with record 37 damaged: 99 kept, the damage quarantined, appends go on.
        let mut bytes = clean.clone();
        bytes[first + 20] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let mut s = Spool::open(&dir, 1 << 24, 4).unwrap();
        assert_eq!(s.quarantined_bytes(), frame as u64);
        s.append(&record(100, 30)).unwrap();
        let (all, torn) = read_dir(&dir).unwrap();
        assert_eq!(torn, 0);
        assert_eq!(all.len(), 100);
        assert!(all.iter().all(|r| r.barge_ins != 37));
        assert_eq!(all.last().unwrap(), &record(100, 30));
        let q: Vec<_> = std::fs::read_dir(dir.join(QUARANTINE_DIR))
            .unwrap()
            .collect();
        assert_eq!(q.len(), 1);
        let q = std::fs::read(q[0].as_ref().unwrap().path()).unwrap();
        assert_eq!(q, bytes[first..first + frame]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_damaged_magic_loses_nothing_and_versions_1_and_2_still_read() {
        let dir = tmp("magic");
        let mut s = Spool::open(&dir, 1 << 24, 4).unwrap();
        for i in 0..5 {
            s.append(&record(i, 30)).unwrap();
        }
        let path = s.current_file().to_owned();
        drop(s);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[2] = b'X';
        // A version-1 frame (no `truncated` field) appended by hand.
        let mut body = postcard::to_stdvec(&record(5, 30)).unwrap();
        // The `profile` (None), the zero `barge_in` (version 3) and the empty `truncated`
        // list (version 2).
        body.truncate(body.len() - 6);
        let mut payload = vec![1u8];
        payload.extend_from_slice(&body);
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        // A version-2 frame (no `barge_in` stats).
        let mut body = postcard::to_stdvec(&record(6, 30)).unwrap();
        body.truncate(body.len() - 4);
        let mut payload = vec![2u8];
        payload.extend_from_slice(&body);
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_file(&path).unwrap().records.len(), 7);
        let mut s = Spool::open(&dir, 1 << 24, 4).unwrap();
        assert_eq!(s.quarantined_bytes(), MAGIC.len() as u64);
        let mut with_stats = record(7, 30);
        with_stats.barge_in.latencies_ms = vec![100, 120];
        with_stats.barge_in.false_barge_ins = 2;
        with_stats.barge_in.resumed_audio_ms = 2_340;
        s.append(&with_stats).unwrap();
        let (all, torn) = read_dir(&dir).unwrap();
        assert_eq!((all.len(), torn), (8, 0));
        assert_eq!(all[5], record(5, 30));
        assert_eq!(all[6], record(6, 30));
        assert_eq!(all[7], with_stats);
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
