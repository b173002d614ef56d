//! Telling the service manager what the daemon is doing, for a systemd unit of
//! `Type=notify` (through the `sd-notify` crate): a `STATUS=` line while it starts,
//! `READY=1` with the plugin counts once it is ready (the same moment its health says
//! SERVING), `STOPPING=1` when shutdown begins, and `WATCHDOG=1` at half the interval
//! systemd asks for (`WatchdogSec=`, given as `WATCHDOG_USEC`).
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does nothing. Plugins never
//! see these variables: their environment is built from an allowlist. A failure to notify
//! is logged and otherwise ignored: the daemon's work does not depend on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `states`, logging a failure.
fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "could not notify the service manager (NOTIFY_SOCKET)");
    }
}

/// A `STATUS=` line for `systemctl status`.
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// Whether `READY=1` was sent: a reload before it must not say ready early.
static READY: AtomicBool = AtomicBool::new(false);

/// `READY=1`, with what the daemon is ready with.
pub fn ready(text: &str) {
    READY.store(true, Ordering::SeqCst);
    notify(&[NotifyState::Ready, NotifyState::Status(text)]);
}

/// `RELOADING=1`, with the `MONOTONIC_USEC=` systemd wants beside it: a configuration
/// reload has begun. Nothing before the daemon is ready.
pub fn reloading() {
    if READY.load(Ordering::SeqCst) {
        notify_reloading("reloading the configuration");
    }
}

/// `RELOADING=1` for an upgrade: the daemon hands over to a new image of itself (same
/// pid), which says `READY=1` once it has taken over.
pub fn upgrading() {
    notify_reloading("upgrading: handing over to the new binary");
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` systemd wants beside it, and `status`.
fn notify_reloading(status: &str) {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a plain syscall with a valid pointer to a local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = i128::from(now.tv_sec) * 1_000_000 + i128::from(now.tv_nsec) / 1_000;
    notify(&[
        NotifyState::Reloading,
        NotifyState::MonotonicUsec(usec),
        NotifyState::Status(status),
    ]);
}

/// `READY=1` again once a reload has ended, applied or not (`text` says which). Nothing
/// before the daemon is ready.
pub fn reloaded(text: &str) {
    if READY.load(Ordering::SeqCst) {
        notify(&[NotifyState::Ready, NotifyState::Status(text)]);
    }
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping plugins"),
    ]);
}

/// When systemd asked for a watchdog (`WATCHDOG_USEC` for this process), a task sending
/// `WATCHDOG=1` at half that interval for as long as the runtime runs; the caller aborts
/// it when the daemon ends.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let every = (interval / 2).max(Duration::from_millis(1));
    tracing::info!(every = ?every, "systemd watchdog enabled");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    }))
}
