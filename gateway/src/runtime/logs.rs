//! What a guest may write to the gateway's log, and how much of any string it
//! hands the host is kept.
//!
//! - **Budget**: each invocation may write `limits.log_lines` lines and
//!   `limits.log_bytes` bytes (its `log` calls and its stdout/stderr lines
//!   together), and each function `limits.log_lines_per_s` lines a second
//!   over time (a token bucket holding one second's worth). What is over is
//!   dropped, counted in `edgefn_function_log_suppressed_total`, and
//!   summed up in one log line at most every [`SUMMARY_EVERY`] per function.
//! - **Cuts**: a guest's log line is cut to [`LOG_LINE_BYTES`]; a failure
//!   reason (an `Err` string, a trap, a panic message) to
//!   [`REASON_BYTES`] in the dead letter and [`LOG_LINE_BYTES`] in the
//!   gateway's own log line; each cut says `… (N bytes cut)`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bindings::edgefn::function::types::Level;
use crate::config::Limits;
use crate::metrics::FunctionMetrics;

/// Longest guest log line, and longest failure reason in a log line.
pub const LOG_LINE_BYTES: usize = 1024;
pub use crate::output::REASON_BYTES;
pub use crate::text::{bound, bounded};
/// How often, at most, a function's suppressed lines are summed up in the log.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// A function's log rate over time, shared by all its stores.
#[derive(Debug)]
pub struct LogRate {
    per_sec: f64,
    tokens: f64,
    last: Instant,
    /// Suppressed since the last summary line.
    unreported: u64,
    last_summary: Option<Instant>,
}

impl LogRate {
    /// A bucket of `per_sec` lines a second, full.
    pub fn new(per_sec: u32) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            per_sec: f64::from(per_sec),
            tokens: f64::from(per_sec),
            last: Instant::now(),
            unreported: 0,
            last_summary: None,
        }))
    }

    /// Takes a token for one line: `true` if the line may be logged.
    pub(crate) fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + refill).min(self.per_sec);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl LogRate {
    /// Counts one suppressed line; returns how many were suppressed since
    /// the last summary when a summary is due (at most every
    /// [`SUMMARY_EVERY`]).
    pub(crate) fn suppressed(&mut self) -> Option<u64> {
        self.unreported += 1;
        let now = Instant::now();
        if self
            .last_summary
            .is_none_or(|t| now.duration_since(t) >= SUMMARY_EVERY)
        {
            self.last_summary = Some(now);
            Some(std::mem::take(&mut self.unreported))
        } else {
            None
        }
    }
}

/// One store's log budget: per invocation, plus the function's rate.
#[derive(Debug)]
pub struct LogBudget {
    function: Arc<str>,
    max_lines: u32,
    max_bytes: usize,
    rate: Arc<Mutex<LogRate>>,
    lines: u32,
    bytes: usize,
    suppressed: u64,
}

impl LogBudget {
    /// A budget from `limits`, drawing on the function's shared `rate`.
    pub fn new(function: Arc<str>, limits: &Limits, rate: Arc<Mutex<LogRate>>) -> Self {
        Self {
            function,
            max_lines: limits.log_lines,
            max_bytes: limits.log_bytes,
            rate,
            lines: 0,
            bytes: 0,
            suppressed: 0,
        }
    }

    /// Starts a new invocation's budget.
    pub fn begin(&mut self) {
        self.lines = 0;
        self.bytes = 0;
        self.suppressed = 0;
    }

    /// Writes one guest line, if the budget allows; counts it otherwise.
    pub fn write(&mut self, level: Level, message: &str) {
        let message = bounded(message, LOG_LINE_BYTES);
        let fits = self.lines < self.max_lines
            && self.bytes.saturating_add(message.len()) <= self.max_bytes;
        if !fits || !self.lock_rate().take() {
            self.suppressed += 1;
            return;
        }
        self.lines += 1;
        self.bytes += message.len();
        emit(&self.function, level, &message);
    }

    /// Writes a captured stdout or stderr stream, a line at a time.
    pub fn write_stream(&mut self, level: Level, captured: &super::wasi::Captured) {
        if captured.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&captured.head);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            self.write(level, line);
        }
        if captured.total > captured.head.len() {
            // Lines past the capture's cap (at least one).
            let kept = captured.head.iter().filter(|&&b| b == b'\n').count();
            let past = captured.newlines.saturating_sub(kept).max(1);
            self.suppressed += u64::try_from(past).unwrap_or(u64::MAX);
        }
    }

    /// Ends the invocation: counts what was suppressed, and sums it up in the
    /// log at most every [`SUMMARY_EVERY`].
    pub fn finish(&mut self, metrics: &FunctionMetrics) {
        if self.suppressed == 0 {
            return;
        }
        metrics
            .log_suppressed
            .fetch_add(self.suppressed, Ordering::Relaxed);
        let suppressed = std::mem::take(&mut self.suppressed);
        let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        rate.unreported += suppressed;
        let now = Instant::now();
        if rate
            .last_summary
            .is_none_or(|t| now.duration_since(t) >= SUMMARY_EVERY)
        {
            let suppressed = std::mem::take(&mut rate.unreported);
            rate.last_summary = Some(now);
            drop(rate);
            tracing::warn!(
                function = %self.function,
                suppressed,
                max_lines = self.max_lines,
                max_bytes = self.max_bytes,
                "Guest log lines over the function's log budget were dropped."
            );
        }
    }

    fn lock_rate(&self) -> std::sync::MutexGuard<'_, LogRate> {
        // Plain arithmetic under the lock: a poisoned one is still consistent.
        self.rate.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn emit(function: &str, level: Level, message: &str) {
    match level {
        Level::Trace => tracing::trace!(function, guest = true, "{message}"),
        Level::Debug => tracing::debug!(function, guest = true, "{message}"),
        Level::Info => tracing::info!(function, guest = true, "{message}"),
        Level::Warn => tracing::warn!(function, guest = true, "{message}"),
        Level::Error => tracing::error!(function, guest = true, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_cuts_on_a_char_boundary_and_says_how_much() {
        assert_eq!(bounded("short", 10), "short");
        let s = "é".repeat(10); // 20 bytes
        assert_eq!(bounded(&s, 5), "éé… (16 bytes cut)");
        let big = "x".repeat(8 * 1024 * 1024);
        let cut = bounded(&big, REASON_BYTES);
        assert!(cut.len() < REASON_BYTES + 32);
        assert!(cut.ends_with(&format!("… ({} bytes cut)", big.len() - REASON_BYTES)));
    }

    fn budget(lines: u32, bytes: usize, per_s: u32) -> LogBudget {
        let limits = Limits {
            log_lines: lines,
            log_bytes: bytes,
            log_lines_per_s: per_s,
            ..Limits::default()
        };
        LogBudget::new(Arc::from("f"), &limits, LogRate::new(per_s))
    }

    #[test]
    fn per_invocation_lines_and_bytes_then_rate() {
        let metrics = FunctionMetrics::default();
        let mut b = budget(3, 1_000_000, 1000);
        for _ in 0..10 {
            b.write(Level::Info, "line");
        }
        b.finish(&metrics);
        assert_eq!(metrics.log_suppressed.load(Ordering::Relaxed), 7);

        let mut b = budget(1000, 10, 1000);
        b.write(Level::Info, "12345678");
        b.write(Level::Info, "12345678");
        b.finish(&metrics);
        assert_eq!(metrics.log_suppressed.load(Ordering::Relaxed), 8);

        // The function's rate spans invocations: 5 lines a second.
        let mut b = budget(1000, 1_000_000, 5);
        for _ in 0..4 {
            b.begin();
            for _ in 0..3 {
                b.write(Level::Info, "x");
            }
            b.finish(&metrics);
        }
        let suppressed = metrics.log_suppressed.load(Ordering::Relaxed) - 8;
        assert!((6..=7).contains(&suppressed), "{suppressed}");
    }
}
