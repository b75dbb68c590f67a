//! The on-disk outbox of one webhook: events waiting to be delivered, oldest first.
//!
//! A directory (`<state>/webhooks/<name>/`) of one file per event,
//! `<seq:020>_<enqueued_unix_ms>_<key>.json`, holding the exact body that is POSTed. An
//! event is written to `<seq>.part`, fsync'd, renamed into place and the directory fsync'd,
//! so after [`Outbox::push`] returns it survives `kill -9` and power loss; a `.part` left by
//! a crash is deleted on open (its event was never acknowledged to anyone). An event leaves
//! the outbox only when it was delivered ([`Outbox::remove`]), when it is older than the
//! webhook's `max_age_h` ([`Outbox::expire`]), or when the outbox is over its bounds
//! (`max_events`, `max_bytes`): then the oldest go first ([`Outbox::push`] returns how many),
//! so a receiver that is down for days never fills the disk.
//!
//! Blocking file I/O: call from `spawn_blocking`. Not on any call's path.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

/// One event in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// Order of arrival; unique within the outbox, also across restarts.
    pub(crate) seq: u64,
    /// When it was put in, ms since the Unix epoch.
    pub(crate) enqueued_unix_ms: u64,
    /// The idempotency key (the call id), `[0-9a-zA-Z_.:-]`, at most 128 bytes.
    pub(crate) key: String,
    /// Size of the body, bytes.
    pub(crate) bytes: u64,
}

/// The outbox's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Events kept at most.
    pub(crate) max_events: usize,
    /// Bytes of bodies kept at most.
    pub(crate) max_bytes: u64,
}

/// One webhook's outbox directory and its index.
#[derive(Debug)]
pub(crate) struct Outbox {
    dir: PathBuf,
    bounds: Bounds,
    entries: VecDeque<Entry>,
    bytes: u64,
    next_seq: u64,
}

/// Whether `key` may name a file: 1 to 128 bytes of `[0-9a-zA-Z_.:-]`, not starting with `.`.
pub(crate) fn valid_key(key: &str) -> bool {
    (1..=128).contains(&key.len())
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

impl Outbox {
    /// Opens (creating) the outbox in `dir`: deletes `.part` files a crash left, indexes the
    /// events in order. Files that are not events are left alone.
    ///
    /// # Errors
    /// The directory cannot be created or read.
    pub(crate) fn open(dir: &Path, bounds: Bounds) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut entries = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".part") {
                fs::remove_file(e.path())?;
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            let mut parts = stem.splitn(3, '_');
            let (Some(seq), Some(ms), Some(key)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(seq), Ok(enqueued_unix_ms)) = (seq.parse(), ms.parse()) else {
                continue;
            };
            if !valid_key(key) {
                continue;
            }
            entries.push(Entry {
                seq,
                enqueued_unix_ms,
                key: key.to_owned(),
                bytes: e.metadata()?.len(),
            });
        }
        entries.sort_by_key(|e| e.seq);
        let next_seq = entries.last().map_or(0, |e| e.seq + 1);
        let bytes = entries.iter().map(|e| e.bytes).sum();
        Ok(Outbox {
            dir: dir.to_owned(),
            bounds,
            entries: entries.into(),
            bytes,
            next_seq,
        })
    }

    fn path(&self, e: &Entry) -> PathBuf {
        self.dir.join(format!(
            "{:020}_{}_{}.json",
            e.seq, e.enqueued_unix_ms, e.key
        ))
    }

    /// Puts an event in, durably (fsync'd file and directory), then drops the oldest events
    /// while over the bounds; returns how many were dropped (the new one is never dropped
    /// unless it alone is over `max_bytes`, which it then replaces nothing: it is refused).
    ///
    /// # Errors
    /// `InvalidInput` for a key [`valid_key`] refuses or a body over `max_bytes`; the write
    /// failed (nothing was put in).
    pub(crate) fn push(
        &mut self,
        key: &str,
        enqueued_unix_ms: u64,
        body: &[u8],
    ) -> io::Result<u64> {
        if !valid_key(key) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "invalid key"));
        }
        if body.len() as u64 > self.bounds.max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "event larger than max_bytes",
            ));
        }
        let entry = Entry {
            seq: self.next_seq,
            enqueued_unix_ms,
            key: key.to_owned(),
            bytes: body.len() as u64,
        };
        let part = self.dir.join(format!("{:020}.part", entry.seq));
        let mut f = File::create(&part)?;
        f.write_all(body)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&part, self.path(&entry))?;
        File::open(&self.dir)?.sync_all()?;
        self.next_seq += 1;
        self.bytes += entry.bytes;
        self.entries.push_back(entry);
        let mut dropped = 0;
        while self.entries.len() > self.bounds.max_events || self.bytes > self.bounds.max_bytes {
            // At least the new entry is in: the loop ends before the queue is empty, since
            // the new entry alone fits both bounds (max_events >= 1 by validation).
            let Some(oldest) = self.entries.front().cloned() else {
                break;
            };
            self.remove(oldest.seq)?;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// The oldest event and its body; `None` when empty.
    ///
    /// # Errors
    /// The file cannot be read.
    pub(crate) fn front(&self) -> io::Result<Option<(Entry, Vec<u8>)>> {
        let Some(e) = self.entries.front() else {
            return Ok(None);
        };
        Ok(Some((e.clone(), fs::read(self.path(e))?)))
    }

    /// Removes the event `seq` (delivered, expired or dropped); `false` when it is not in
    /// the outbox any more (dropped while it was being delivered).
    ///
    /// # Errors
    /// The file cannot be deleted.
    pub(crate) fn remove(&mut self, seq: u64) -> io::Result<bool> {
        let Some(i) = self.entries.iter().position(|e| e.seq == seq) else {
            return Ok(false);
        };
        match fs::remove_file(self.path(&self.entries[i])) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // i is a valid index: found just above.
        let e = self.entries.remove(i).expect("index found above");
        self.bytes -= e.bytes;
        Ok(true)
    }

    /// Removes events enqueued before `cutoff_unix_ms`; returns how many.
    ///
    /// # Errors
    /// A file cannot be deleted.
    pub(crate) fn expire(&mut self, cutoff_unix_ms: u64) -> io::Result<u64> {
        let mut n = 0;
        while let Some(e) = self.entries.front().cloned() {
            if e.enqueued_unix_ms >= cutoff_unix_ms {
                break;
            }
            self.remove(e.seq)?;
            n += 1;
        }
        Ok(n)
    }

    /// Events waiting.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of the bodies waiting.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// When the oldest waiting event was put in, ms since the Unix epoch.
    pub(crate) fn oldest_unix_ms(&self) -> Option<u64> {
        self.entries.front().map(|e| e.enqueued_unix_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vg-outbox-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    const WIDE: Bounds = Bounds {
        max_events: 100,
        max_bytes: 1 << 20,
    };

    #[test]
    fn events_survive_reopen_in_order_and_a_crash_leftover_is_removed() {
        let d = tmp("reopen");
        let mut o = Outbox::open(&d, WIDE).unwrap();
        for i in 0..3u64 {
            o.push(
                &format!("call-{i}"),
                1000 + i,
                format!("{{\"n\":{i}}}").as_bytes(),
            )
            .unwrap();
        }
        o.remove(0).unwrap();
        // A write torn by a crash.
        fs::write(d.join("00000000000000000009.part"), b"{\"n\":").unwrap();
        drop(o);
        let mut o = Outbox::open(&d, WIDE).unwrap();
        assert!(!d.join("00000000000000000009.part").exists());
        assert_eq!(o.len(), 2);
        let (e, body) = o.front().unwrap().unwrap();
        assert_eq!(
            (e.seq, e.key.as_str(), e.enqueued_unix_ms),
            (1, "call-1", 1001)
        );
        assert_eq!(body, b"{\"n\":1}");
        assert_eq!(o.oldest_unix_ms(), Some(1001));
        // Sequence numbers continue after the highest one kept.
        o.push("call-3", 1003, b"{}").unwrap();
        assert!(d.join("00000000000000000003_1003_call-3.json").exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_bound_drops_the_oldest_and_counts_them() {
        let d = tmp("bound");
        let mut o = Outbox::open(
            &d,
            Bounds {
                max_events: 3,
                max_bytes: 100,
            },
        )
        .unwrap();
        let mut dropped = 0;
        for i in 0..5u64 {
            dropped += o.push(&format!("k{i}"), i, &[b'x'; 10]).unwrap();
        }
        assert_eq!((o.len(), dropped), (3, 2));
        assert_eq!(o.front().unwrap().unwrap().0.key, "k2");
        // By bytes: a 90-byte event leaves room for no 10-byte one beside it.
        assert_eq!(o.push("big", 9, &[b'y'; 90]).unwrap(), 2);
        assert_eq!((o.len(), o.bytes()), (2, 100));
        assert_eq!(fs::read_dir(&d).unwrap().count(), 2);
        assert!(o.push("huge", 10, &[b'z'; 101]).is_err());
        assert!(o.push("../escape", 10, b"{}").is_err());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn expiry_removes_only_older_events() {
        let d = tmp("expire");
        let mut o = Outbox::open(&d, WIDE).unwrap();
        for i in 0..4u64 {
            o.push(&format!("k{i}"), i * 1000, b"{}").unwrap();
        }
        assert_eq!(o.expire(2000).unwrap(), 2);
        assert_eq!(o.oldest_unix_ms(), Some(2000));
        assert!(!o.remove(0).unwrap());
        let _ = fs::remove_dir_all(&d);
    }
}
