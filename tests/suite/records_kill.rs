//! Call records survive `kill -9`: a child process appends large records to a spool as fast
//! as it can and is killed mid-write; every record it acknowledged is read back intact, a
//! torn tail is skipped and cut off on the next open, and `voicegate records export` prints
//! them as JSON lines.
//!
//! The child is this test binary itself, re-run with `spool_writer_child` selected and
//! `VOICEGATE_TEST_SPOOL_WRITER` naming the spool directory; without that variable the
//! child test returns at once.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};
use voicegate::agent::Speaker;
use voicegate::records::spool::{Spool, read_dir};
use voicegate::records::{CallRecord, TranscriptLine};

const CHILD_ENV: &str = "VOICEGATE_TEST_SPOOL_WRITER";

/// `text_len` bytes of words, built once per length (keeps the child's time in write(2)).
fn big_text(text_len: usize) -> String {
    static CACHE: std::sync::Mutex<Vec<(usize, String)>> = std::sync::Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap();
    if let Some((_, t)) = cache.iter().find(|(n, _)| *n == text_len) {
        return t.clone();
    }
    let t = "words ".repeat(text_len / 6);
    cache.push((text_len, t.clone()));
    t
}

/// A call record of about `text_len` bytes, distinct per `i`.
fn record(i: u64, text_len: usize) -> CallRecord {
    CallRecord {
        call_id: uuid::Uuid::from_u128(0x5eed_0000 + i as u128),
        caller_number: Some(format!("+4930555{i:04}")),
        started_unix_ms: 1_760_000_000_000 + i * 1000,
        ended_unix_ms: 1_760_000_000_000 + i * 1000 + 42_000,
        duration_ms: 42_000,
        agent: "echo".into(),
        outcome: if i % 3 == 0 { "fallback" } else { "completed" }.into(),
        detail: (i % 3 == 0).then(|| "agent failed: cannot connect".into()),
        rate_hz: 8000,
        barge_ins: i % 4,
        turn_latencies_ms: vec![700, 820 + i as u32],
        tool_calls: vec![],
        dtmf: "12#".into(),
        transcript: vec![
            TranscriptLine {
                speaker: Speaker::Caller,
                text: format!("call {i} ") + &big_text(text_len),
            },
            TranscriptLine {
                speaker: Speaker::Agent,
                text: "Thank you, goodbye.".into(),
            },
        ],
        frames_in: 2100,
        frames_out: 2100,
        underruns: 0,
        truncated: vec![],
        barge_in: Default::default(),
        profile: None,
    }
}

/// Big records make the write itself long enough that kills land inside it.
const TEXT_LEN: usize = 2_000_000;
const MAX_ROUNDS: u64 = 40;

#[test]
fn spool_writer_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut spool = Spool::open(std::path::Path::new(&dir), 2 * 1024 * 1024, 1000).unwrap();
    let mut out = std::io::stdout();
    for i in 0.. {
        spool.append(&record(i, TEXT_LEN)).unwrap();
        // Acknowledged only after append returned (fsync'd).
        writeln!(out, "appended {i}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn records_survive_kill_9_mid_write_and_export_as_json() {
    // On tmpfs fsync is nearly free, so more of the child's time is spent inside write(2)
    // and a kill can tear a record; on disk it mostly lands in fsync.
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let root = base.join(format!("vg-records-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    // Kill a fresh writer per round at a varying moment until two kills have torn a record
    // (a kill lands inside write(2) about one time in ten here), at most MAX_ROUNDS times.
    // Every round checks that every acknowledged record is intact.
    let mut torn_dir = None;
    let mut tears_seen = 0;
    let mut rounds = 0;
    let mut dir = root.join("round-0");
    while rounds < MAX_ROUNDS && tears_seen < 2 {
        dir = root.join(format!("round-{rounds}"));
        rounds += 1;
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg(crate::common::test_name(
                module_path!(),
                "spool_writer_child",
            ))
            .args(["--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut last = None;
        while let Some(Ok(line)) = lines.next() {
            if let Some(n) = line.strip_prefix("appended ") {
                let n: u64 = n.parse().unwrap();
                last = Some(n);
                if n >= 1 {
                    break;
                }
            }
        }
        let jitter = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64
            % 10_000;
        std::thread::sleep(Duration::from_micros(jitter));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("appended ") {
                last = Some(n.parse().unwrap());
            }
        }
        let acknowledged = last.map_or(0, |n| n + 1);
        let (records, torn) = read_dir(&dir).unwrap();
        if torn > 0 {
            tears_seen += 1;
            torn_dir.get_or_insert_with(|| dir.clone());
        }
        // Every acknowledged record is there, intact and in order; at most one more (written
        // but not yet acknowledged when the kill came).
        assert!(
            records.len() as u64 >= acknowledged && records.len() as u64 <= acknowledged + 1,
            "round {rounds}: {} records, {acknowledged} acknowledged",
            records.len()
        );
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r, &record(i as u64, TEXT_LEN), "record {i} intact");
        }
    }
    eprintln!("torn tails observed in {tears_seen} of {rounds} kills");
    let dir = torn_dir.unwrap_or(dir);
    let acknowledged = read_dir(&dir).unwrap().0.len() as u64;

    // Reopening cuts any torn tail; a new append lands after the good records.
    let mut spool = Spool::open(&dir, 2 * 1024 * 1024, 1000).unwrap();
    spool.append(&record(999, 100)).unwrap();
    drop(spool);
    let (records, torn) = read_dir(&dir).unwrap();
    assert_eq!(torn, 0);
    assert_eq!(records.len() as u64, acknowledged + 1);
    assert_eq!(records.last().unwrap(), &record(999, 100));

    // `voicegate records export`: one JSON object per record.
    let config = dir.join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("--config")
        .arg(&config)
        .args(["records", "export", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), records.len());
    let last = lines.last().unwrap();
    assert_eq!(last["call_id"], record(999, 100).call_id.to_string());
    assert_eq!(last["caller_number"], "+49305550999");
    assert_eq!(last["duration_ms"], 42_000);
    assert_eq!(last["transcript"][1]["speaker"], "agent");
    assert_eq!(last["transcript"][1]["text"], "Thank you, goodbye.");
    assert_eq!(lines[0]["outcome"], "fallback");
    assert_eq!(lines[0]["detail"], "agent failed: cannot connect");

    let list = Command::new(env!("CARGO_BIN_EXE_voicegate"))
        .arg("--config")
        .arg(&config)
        .args(["records", "list", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let list = String::from_utf8(list.stdout).unwrap();
    assert_eq!(list.lines().count(), records.len());
    assert!(list.contains(&record(999, 100).call_id.to_string()));
    std::fs::remove_dir_all(&root).ok();
}
