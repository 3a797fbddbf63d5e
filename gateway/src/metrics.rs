//! Counters kept by the gateway, readable while it runs (tests, logs and
//! the admin endpoint's `/metrics`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

/// Why an invocation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The handler returned `Err(message)`.
    Error(String),
    /// The handler failed after the host refused a call for a limit
    /// (calls per invocation, payload size, state quota).
    Quota(String),
    /// The handler failed after the host refused a call outside its
    /// allowlists.
    Denied(String),
    /// The handler ran past its time budget and was interrupted.
    Timeout,
    /// The guest tried to grow memory or tables past its cap.
    Memory(String),
    /// The guest trapped (panic, unreachable, out-of-bounds access…).
    Trap(String),
}

impl Failure {
    /// Whether the guest ran to completion and returned `Err` (as opposed to
    /// crashing: trap, timeout, memory). Only crashes trip the breaker.
    pub fn is_verdict(&self) -> bool {
        matches!(self, Self::Error(_) | Self::Quota(_) | Self::Denied(_))
    }

    /// A short, stable name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Error(_) => "error",
            Self::Quota(_) => "quota",
            Self::Denied(_) => "denied",
            Self::Timeout => "timeout",
            Self::Memory(_) => "memory",
            Self::Trap(_) => "trap",
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Error(m) => write!(f, "the function returned an error: {m}"),
            Self::Quota(m) => write!(f, "the function failed after going over a limit: {m}"),
            Self::Denied(m) => write!(f, "the function failed after a denied call: {m}"),
            Self::Timeout => f.write_str("the function ran past its timeout and was interrupted"),
            Self::Memory(m) => write!(f, "the function went over its memory limit: {m}"),
            Self::Trap(m) => write!(f, "the function trapped: {m}"),
        }
    }
}

/// Per-function counters.
#[derive(Debug, Default)]
pub struct FunctionMetrics {
    /// Invocations started.
    pub invocations: AtomicU64,
    /// Invocations that returned `Ok`.
    pub ok: AtomicU64,
    /// Invocations whose handler returned `Err`.
    pub errors: AtomicU64,
    /// Invocations that failed after a call was refused for a limit.
    pub quota_failures: AtomicU64,
    /// Invocations that failed after a call was refused by an allowlist.
    pub denied_failures: AtomicU64,
    /// Invocations that trapped.
    pub traps: AtomicU64,
    /// Invocations interrupted by the deadline.
    pub timeouts: AtomicU64,
    /// Invocations stopped at the memory cap.
    pub memory: AtomicU64,
    /// publish/forward calls refused by the allowlists.
    pub denied: AtomicU64,
    /// publish/forward calls refused by a limit.
    pub over_limit: AtomicU64,
    /// Messages published on the local broker.
    pub published: AtomicU64,
    /// Records handed to sinks.
    pub forwarded: AtomicU64,
    /// Events dropped by a full queue under `drop_oldest`.
    pub dropped: AtomicU64,
    /// Events published on the function's dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Guest log lines dropped by the log budget (lines per invocation,
    /// bytes per invocation, lines per second).
    pub log_suppressed: AtomicU64,
    /// Times the circuit breaker opened.
    pub breaker_opens: AtomicU64,
    /// The breaker's state: 0 closed, 1 open, 2 half-open.
    pub breaker_state: AtomicU8,
    /// New versions switched in (hot reload).
    pub reloads: AtomicU64,
    /// New versions refused or rolled back.
    pub rollbacks: AtomicU64,
    /// Whether the running version's code came from the compile cache.
    pub from_cache: AtomicBool,
    /// The running version (first 12 hex digits of the component's SHA-256).
    pub version: Mutex<String>,
    /// How long invocations took (successful or not).
    pub latency: Histogram,
}

/// Upper bounds of the latency buckets, in microseconds: from a warm call
/// (a few µs) to the longest sensible deadline.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000,
];

/// A fixed-bucket latency histogram, lock-free to update.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: std::time::Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_US.partition_point(|&bound| bound < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (`le` order, the last is `+Inf` = the
    /// total) and the sum in microseconds.
    pub fn cumulative(&self) -> ([u64; LATENCY_BUCKETS_US.len() + 1], u64) {
        let mut out = [0; LATENCY_BUCKETS_US.len() + 1];
        let mut total = 0;
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            total += b.load(Ordering::Relaxed);
            *o = total;
        }
        (out, self.sum_us.load(Ordering::Relaxed))
    }
}

impl FunctionMetrics {
    /// Counts a failure under its kind.
    pub fn count_failure(&self, failure: &Failure) {
        let counter = match failure {
            Failure::Error(_) => &self.errors,
            Failure::Quota(_) => &self.quota_failures,
            Failure::Denied(_) => &self.denied_failures,
            Failure::Timeout => &self.timeouts,
            Failure::Memory(_) => &self.memory,
            Failure::Trap(_) => &self.traps,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A consistent-enough copy for display and tests.
    pub fn snapshot(&self) -> FunctionCounts {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FunctionCounts {
            invocations: r(&self.invocations),
            ok: r(&self.ok),
            errors: r(&self.errors),
            quota_failures: r(&self.quota_failures),
            denied_failures: r(&self.denied_failures),
            traps: r(&self.traps),
            timeouts: r(&self.timeouts),
            memory: r(&self.memory),
            denied: r(&self.denied),
            over_limit: r(&self.over_limit),
            published: r(&self.published),
            forwarded: r(&self.forwarded),
            dropped: r(&self.dropped),
            dead_lettered: r(&self.dead_lettered),
            log_suppressed: r(&self.log_suppressed),
            breaker_opens: r(&self.breaker_opens),
            reloads: r(&self.reloads),
            rollbacks: r(&self.rollbacks),
        }
    }

    /// The running version's hash.
    pub fn version(&self) -> String {
        self.version
            .lock()
            .map(|v| v.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Records which version runs.
    pub fn set_version(&self, version: &str, from_cache: bool) {
        let mut v = self.version.lock().unwrap_or_else(|p| p.into_inner());
        v.clear();
        v.push_str(version);
        self.from_cache.store(from_cache, Ordering::Relaxed);
    }
}

/// A copy of [`FunctionMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs, reason = "same fields as FunctionMetrics")]
pub struct FunctionCounts {
    pub invocations: u64,
    pub ok: u64,
    pub errors: u64,
    pub quota_failures: u64,
    pub denied_failures: u64,
    pub traps: u64,
    pub timeouts: u64,
    pub memory: u64,
    pub denied: u64,
    pub over_limit: u64,
    pub published: u64,
    pub forwarded: u64,
    pub dropped: u64,
    pub dead_lettered: u64,
    pub log_suppressed: u64,
    pub breaker_opens: u64,
    pub reloads: u64,
    pub rollbacks: u64,
}

/// Gateway-wide counters.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    /// MQTT messages received by the source.
    pub events_in: AtomicU64,
    /// Events that matched no function.
    pub unmatched: AtomicU64,
    /// Records published to a sink and acknowledged (PUBACK).
    pub sink_acked: AtomicU64,
    /// Records a sink could not encode or send.
    pub sink_failed: AtomicU64,
    /// Reconnects of the MQTT source's connection to the local broker.
    pub source_reconnects: AtomicU64,
    /// QoS 0 messages the MQTT source dropped while the functions were held
    /// back (see `sources::mqtt`, Back-pressure).
    pub source_dropped: AtomicU64,
    /// Times the MQTT source stopped reading because QoS 1 messages waited
    /// for the functions (see `sources::mqtt`, Back-pressure).
    pub source_paused: AtomicU64,
    /// QoS 1 messages the MQTT source left with the broker, to fetch again,
    /// because the functions were behind (see `sources::mqtt`,
    /// Back-pressure).
    pub source_deferred: AtomicU64,
    /// Times the MQTT source resumed its session to fetch deferred messages.
    pub source_resyncs: AtomicU64,
    /// Reconnects of the local publisher's connection.
    pub publisher_reconnects: AtomicU64,
    /// Configuration reloads (`SIGHUP`) applied (in part: see
    /// `restart_pending`).
    pub reloads_applied: AtomicU64,
    /// Reloads refused whole: functions named sinks or serial ports the
    /// running gateway lacks, or an added or changed function failed to
    /// load.
    pub reloads_refused: AtomicU64,
    /// Reloads of a configuration that did not validate.
    pub reloads_failed: AtomicU64,
    /// Settings of the last reloaded configuration that differ from the
    /// running one and wait for a restart.
    pub restart_pending: AtomicU64,
    /// Times a subscriber of the embedded broker fell further behind than
    /// the broker's retention and skipped messages.
    pub broker_skips: AtomicU64,
    /// Devices logged in to the embedded broker through its guard.
    pub broker_logins: AtomicU64,
    /// Logins the embedded broker refused: wrong password, unknown user,
    /// anonymous where not allowed, bad certificate or handshake.
    pub broker_login_failures: AtomicU64,
    /// Publishes (and wills) outside a device's rights, dropped.
    pub broker_refused_publishes: AtomicU64,
    /// Subscription filters outside a device's rights, refused.
    pub broker_refused_subscribes: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounds_inclusive() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(5));
        h.observe(Duration::from_micros(6));
        h.observe(Duration::from_secs(5));
        let (c, sum) = h.cumulative();
        assert_eq!(c[0], 1, "5 µs is in the `le=5` bucket");
        assert_eq!(c[1], 2);
        assert_eq!(c[LATENCY_BUCKETS_US.len() - 1], 2);
        assert_eq!(c[LATENCY_BUCKETS_US.len()], 3, "+Inf holds everything");
        assert_eq!(sum, 5_000_011);
    }
}

/// The running functions' names and counters, in configuration order;
/// shared by the gateway, the admin endpoint and the reloader, which adds
/// and removes functions at run time (a removed function's counters
/// disappear from `/metrics` and `/functions`).
#[derive(Debug, Default)]
pub struct FunctionTable(std::sync::RwLock<Vec<(String, std::sync::Arc<FunctionMetrics>)>>);

impl FunctionTable {
    /// A table of `functions`.
    pub fn new(functions: Vec<(String, std::sync::Arc<FunctionMetrics>)>) -> Self {
        Self(std::sync::RwLock::new(functions))
    }

    /// The current list (a copy: nothing holds the lock while rendering).
    pub fn list(&self) -> Vec<(String, std::sync::Arc<FunctionMetrics>)> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A function's counters.
    pub fn get(&self, name: &str) -> Option<std::sync::Arc<FunctionMetrics>> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m.clone())
    }

    /// Replaces the list.
    pub fn set(&self, functions: Vec<(String, std::sync::Arc<FunctionMetrics>)>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = functions;
    }
}
