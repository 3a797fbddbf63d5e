//! systemd's service notification protocol (`Type=notify`): readiness,
//! stopping, and watchdog pings. Every call is a no-op when the gateway was
//! not started by systemd (`$NOTIFY_SOCKET` unset).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::progress::Progress;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "Could not notify systemd.");
    }
}

/// Start-up is complete: sources, functions and sinks run.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The gateway is draining and will exit.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight events"),
    ]);
}

/// `$WATCHDOG_USEC` if the watchdog is meant for this process: as
/// `sd_watchdog_enabled(3)`, a `$WATCHDOG_PID` that names another process
/// disables it, an absent one does not.
fn watchdog_usec() -> Option<u64> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?.parse::<u64>().ok()?;
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .is_none_or(|pid| pid.parse::<u32>().ok() == Some(std::process::id()));
    (for_us && usec > 0).then_some(usec)
}

/// Pings the watchdog at half its interval (`WatchdogSec=` sets
/// `$WATCHDOG_USEC`) until `stop` is cancelled. The pings come from a
/// task on the gateway's async runtime: when the runtime stalls (all its
/// threads blocked, a deadlock), the pings stop and systemd restarts the
/// service. They also stop while a function worker or a source is stuck
/// ([`crate::progress`]); `STATUS=` then says which.
pub fn spawn_watchdog(stop: CancellationToken, progress: Arc<Progress>) {
    let Some(usec) = watchdog_usec() else {
        return;
    };
    let period = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled."
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stuck = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            match progress.stuck() {
                None if stuck => {
                    stuck = false;
                    send(&[
                        NotifyState::Status("progressing again"),
                        NotifyState::Watchdog,
                    ]);
                }
                None => send(&[NotifyState::Watchdog]),
                Some(why) if !stuck => {
                    stuck = true;
                    send(&[NotifyState::Status(&format!("stuck: {why}"))]);
                }
                Some(_) => {}
            }
        }
    });
}
