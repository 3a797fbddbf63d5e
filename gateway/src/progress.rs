//! The progress watchdog: whether every function worker and every serial or
//! I2C source still makes progress, not just whether the async runtime has a
//! free thread.
//!
//! Each worker and source keeps a [`Beat`]: the step it is in (an
//! invocation, sending outputs, a sensor poll, a write to a device, a mirror
//! publish) and since when, in one atomic each. Waiting for input is idle,
//! never stuck: a quiet source is fine. Waiting on deliberate back-pressure
//! (a full function queue under `block`, a full outbox under `refuse`) is
//! idle too: the outbox and the queues report those themselves, and a
//! restart would not help. A step that lasts longer than its limit means a
//! host bug or an output that cannot move: then `/readyz` answers 503 with
//! the reason, the gateway stops pinging systemd's watchdog (so systemd
//! restarts it), and an error is logged once, naming the worker or source.
//!
//! Limits: a worker's step, `limits.timeout_ms` plus [`WORKER_MARGIN`]; a
//! source's step, [`SOURCE_LIMIT`].

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How long past its `timeout_ms` one step of a function's worker (one
/// invocation, or handing its outputs on) may last.
pub const WORKER_MARGIN: Duration = Duration::from_secs(5);
/// How long one step of a serial or I2C source (a poll, a write to the
/// device, a mirror publish) may last.
pub const SOURCE_LIMIT: Duration = Duration::from_secs(5);
/// How often [`monitor`] looks.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// What a worker or source is busy with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Activity {
    /// A guest invocation.
    Invoking = 1,
    /// Handing an invocation's outputs to the local broker, the outbox or
    /// the serial ports.
    Delivering = 2,
    /// An I2C sensor poll.
    Polling = 3,
    /// A write to a serial device.
    Writing = 4,
    /// Mirroring a serial frame to the local broker.
    Mirroring = 5,
    /// Saving a timer's state file (`catch_up = "once"`).
    Saving = 6,
}

impl Activity {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Invoking,
            2 => Self::Delivering,
            3 => Self::Polling,
            4 => Self::Writing,
            6 => Self::Saving,
            _ => Self::Mirroring,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Invoking => "invocation running",
            Self::Delivering => "outputs waiting to be sent",
            Self::Polling => "sensor poll running",
            Self::Writing => "write to the device pending",
            Self::Mirroring => "mirror publish pending",
            Self::Saving => "timer state file being written",
        }
    }
}

/// One worker's or source's progress: lock-free to update.
#[derive(Debug)]
pub struct Beat {
    epoch: Instant,
    /// Milliseconds since `epoch` + 1 when the current step began; 0 = idle.
    since_ms: AtomicU64,
    activity: AtomicU8,
    limit_ms: AtomicU64,
}

impl Beat {
    fn new(epoch: Instant, limit: Duration) -> Self {
        Self {
            epoch,
            since_ms: AtomicU64::new(0),
            activity: AtomicU8::new(Activity::Invoking as u8),
            limit_ms: AtomicU64::new(millis(limit)),
        }
    }

    fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed()) + 1
    }

    /// A step begins now.
    pub fn busy(&self, what: Activity) {
        self.activity.store(what as u8, Ordering::Relaxed);
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Waiting for input or on deliberate back-pressure: not stuck.
    pub fn idle(&self) {
        self.since_ms.store(0, Ordering::Relaxed);
    }

    /// A new limit for each step (a worker's new version may have a new
    /// `timeout_ms`).
    pub fn set_limit(&self, limit: Duration) {
        self.limit_ms.store(millis(limit), Ordering::Relaxed);
    }

    /// The step and how long it has lasted at `now_ms`, if longer than the
    /// limit.
    fn overdue(&self, now_ms: u64) -> Option<(Activity, Duration)> {
        let since = self.since_ms.load(Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let busy = now_ms.saturating_sub(since);
        (busy > self.limit_ms.load(Ordering::Relaxed)).then(|| {
            let what = Activity::from_u8(self.activity.load(Ordering::Relaxed));
            (what, Duration::from_millis(busy))
        })
    }
}

fn describe(what: Activity, busy: Duration) -> String {
    format!("{} for {:.1} s", what.describe(), busy.as_secs_f64())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Watched {
    kind: &'static str,
    name: String,
    /// Weak: a worker or source that has stopped (a function removed by a
    /// reload) drops its beat and so leaves the watch.
    beat: std::sync::Weak<Beat>,
}

/// Every worker's and source's [`Beat`].
pub struct Progress {
    epoch: Instant,
    watched: Mutex<Vec<Watched>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            watched: Mutex::new(Vec::new()),
        }
    }
}

impl Progress {
    /// A beat for `kind` (`function`, `source`) `name`, stuck when one step
    /// lasts longer than `limit`; watched while the returned beat lives.
    pub fn watch(&self, kind: &'static str, name: &str, limit: Duration) -> Arc<Beat> {
        let beat = Arc::new(Beat::new(self.epoch, limit));
        let mut watched = self.lock();
        watched.retain(|w| w.beat.strong_count() > 0);
        watched.push(Watched {
            kind,
            name: name.to_owned(),
            beat: Arc::downgrade(&beat),
        });
        beat
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Watched>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Each stuck worker or source: `(kind name, why)`, e.g.
    /// `("function threshold", "invocation running for 12.3 s")`.
    pub fn stuck_list(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .filter_map(|w| {
                let beat = w.beat.upgrade()?;
                let (what, busy) = beat.overdue(beat.now_ms())?;
                Some((format!("{} {}", w.kind, w.name), describe(what, busy)))
            })
            .collect()
    }

    /// Why the gateway is stuck, if it is: every stuck worker and source,
    /// e.g. `function threshold: invocation running for 12.3 s`.
    pub fn stuck(&self) -> Option<String> {
        let list = self.stuck_list();
        (!list.is_empty()).then(|| {
            list.iter()
                .map(|(who, why)| format!("{who}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }
}

/// Logs an error when a worker or source gets stuck and a notice when it
/// moves again, until `stop`.
pub async fn monitor(progress: Arc<Progress>, stop: CancellationToken) {
    let mut stuck: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = progress.stuck_list();
        for (who, why) in &now {
            if !stuck.contains(who) {
                tracing::error!(stuck = %who, why = %why, "No progress: stuck past its limit; not ready, and systemd's watchdog is no longer pinged.");
            }
        }
        for who in &stuck {
            if !now.iter().any(|(w, _)| w == who) {
                tracing::info!(stuck = %who, "Progress again.");
            }
        }
        stuck = now.into_iter().map(|(who, _)| who).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_never_stuck_and_a_step_past_its_limit_is() {
        let p = Progress::default();
        let beat = p.watch("source", "gps", Duration::from_millis(20));
        assert_eq!(p.stuck(), None, "idle from the start");
        assert_eq!(beat.overdue(u64::MAX), None, "idle is never overdue");
        beat.busy(Activity::Writing);
        let since = beat.since_ms.load(Ordering::Relaxed);
        assert_eq!(beat.overdue(since + 20), None, "at the limit");
        let (what, busy) = beat.overdue(since + 12_345).unwrap();
        assert_eq!(
            describe(what, busy),
            "write to the device pending for 12.3 s"
        );
        beat.idle();
        assert_eq!(beat.overdue(since + 12_345), None);
    }

    #[test]
    fn a_stopped_worker_leaves_the_watch() {
        let p = Progress::default();
        let beat = p.watch("function", "removed", Duration::from_millis(1));
        beat.busy(Activity::Invoking);
        std::thread::sleep(Duration::from_millis(5));
        assert!(p.stuck().is_some(), "busy past its limit");
        // A function removed by a reload: its worker ends, its beat goes.
        drop(beat);
        assert_eq!(p.stuck(), None);
        let _other = p.watch("function", "next", Duration::from_secs(1));
        assert_eq!(p.lock().len(), 1, "the dead entry is pruned");
    }
}
