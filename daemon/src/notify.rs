//! systemd's service notifications, for the packaged unit's `Type=notify` (docs/packaging.md):
//! `READY=1` once every listener is up, `WATCHDOG=1` at half the unit's `WatchdogSec=` for as
//! long as the runtime and its blocking pool run jobs, `STOPPING=1` when shutdown begins.
//! Outside systemd (no `NOTIFY_SOCKET`, no `WATCHDOG_USEC`) nothing is sent.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::tasks::{self, Shutdown};

fn send(state: NotifyState) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        warn!(error = %e, "cannot notify systemd");
    }
}

/// Start-up is complete: systemd may start the units ordered after phantomd.
pub fn ready() {
    send(NotifyState::Ready);
}

/// Shutdown has begun.
pub fn stopping() {
    send(NotifyState::Stopping);
}

/// When systemd asked for a watchdog, pings it at half the interval until shutdown. The ping
/// runs as a periodic job on the blocking pool, so a wedged runtime or an exhausted pool stops
/// the pings and systemd restarts the daemon.
pub fn start_watchdog(shutdown: &Shutdown) -> Option<JoinHandle<()>> {
    let interval = watchdog_interval(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )?;
    let period = (interval / 2).max(Duration::from_millis(10));
    info!(
        interval_ms = period.as_millis() as u64,
        "systemd watchdog on"
    );
    Some(tasks::every(
        "systemd watchdog",
        period,
        shutdown.clone(),
        || send(NotifyState::Watchdog),
    ))
}

/// The watchdog interval systemd asked of process `pid`, read as libsystemd's
/// `sd_watchdog_enabled` does: `WATCHDOG_USEC` set and positive, and `WATCHDOG_PID`, when set,
/// naming this process (sd-notify's own check also refuses a missing `WATCHDOG_PID`).
fn watchdog_interval(usec: Option<&str>, watchdog_pid: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(p) = watchdog_pid
        && p.trim().parse::<u32>().ok() != Some(pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_reads_systemds_variables() {
        let d = Duration::from_micros;
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(d(30_000_000))
        );
        assert_eq!(watchdog_interval(Some("400000"), None, 7), Some(d(400_000)));
        // Meant for another process (a parent that did not clear its environment).
        assert_eq!(watchdog_interval(Some("400000"), Some("8"), 7), None);
        for bad in ["", "0", "-1", "soon"] {
            assert_eq!(watchdog_interval(Some(bad), None, 7), None, "{bad:?}");
        }
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }
}
