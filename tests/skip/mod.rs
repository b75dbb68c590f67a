//! The one way a test in `tests/` skips (issue 20): [`skip`] prints a grep-able marker line
//! `voicegate-test-skipped: <test>: <why>` on stderr and, when `VOICEGATE_SKIP_LOG` names a
//! file, appends it there too (a passing test's stderr is captured by the test harness;
//! `.ci/run` counts the file's lines and fails unless there are none). Under
//! `VOICEGATE_REQUIRE_ALL=1` (set by `.ci/run`) a skip is a failure instead: in CI every test
//! must run.

use std::io::Write as _;

/// The prefix of every skip marker line (`.ci/run` greps for it).
pub(crate) const MARKER: &str = "voicegate-test-skipped";

/// Records that `test` did not run because of `why` (see the module docs); the caller then
/// returns. Panics under `VOICEGATE_REQUIRE_ALL=1`.
pub(crate) fn skip(test: &str, why: &str) {
    let line = format!("{MARKER}: {test}: {why}");
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("VOICEGATE_SKIP_LOG") {
        // One short append per line: concurrent tests' lines do not interleave.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
    assert!(
        std::env::var("VOICEGATE_REQUIRE_ALL").as_deref() != Ok("1"),
        "{line} — and VOICEGATE_REQUIRE_ALL=1: in CI every test must run"
    );
}
