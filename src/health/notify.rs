//! Every `sd_notify(3)` message voicegate sends, in one place (the `sd-notify` crate is pinned
//! at `=0.5.0`: its `notify` signature changed between 0.4 and 0.5).
//!
//! Each call is a no-op returning `Ok` when `NOTIFY_SOCKET` is unset (not run by systemd).
//! Messages, in the order a run sends them: `READY=1` + `STATUS=` once every listener is
//! bound; `WATCHDOG=1` (+ `STATUS=`) while healthy; `STOPPING=1` on shutdown;
//! `EXTEND_TIMEOUT_USEC=` while live calls drain.

use sd_notify::NotifyState;
use std::time::Duration;
use tracing::debug;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a `STATUS=` line.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=` alone.
pub(crate) fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// `WATCHDOG=1` with a `STATUS=` line.
pub(crate) fn watchdog(status: &str) {
    send(&[NotifyState::Watchdog, NotifyState::Status(status)]);
}

/// `RELOADING=1` then, when done, [`reloaded`].
pub(crate) fn reloading() {
    match NotifyState::monotonic_usec_now() {
        // systemd 253+ (`Type=notify-reload`) wants the clock with RELOADING=1.
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `READY=1` after a reload, with a `STATUS=` line.
pub(crate) fn reloaded(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1` with a `STATUS=` line.
pub(crate) fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// `EXTEND_TIMEOUT_USEC=`: systemd should wait `by` more for the stop to finish.
pub(crate) fn extend_timeout(by: Duration, status: &str) {
    let usec = by.as_micros().min(u32::MAX as u128) as u32;
    send(&[
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status(status),
    ]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`, for this PID), if any.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
