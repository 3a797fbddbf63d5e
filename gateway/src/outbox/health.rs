//! Failing commits (disk full, I/O error): the back-off between retries,
//! rate-limited logs, and the state that `/readyz` and `/metrics` show.
//!
//! A failed transaction is rolled back and everything in it (appends with
//! their [`super::AckHold`]s, confirmations) is kept and retried; while
//! commits fail, the writer takes no new appends, so the bounded append
//! queue fills and back-pressure reaches the sources.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{OutboxError, OutboxStats};

/// The pause after the first failed commit; doubled after each further one.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// The longest pause between retries.
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// While commits keep failing, the error is logged again at most this often.
pub(super) const REPEAT_LOG: Duration = Duration::from_secs(30);

/// Since when, and how often, commits have been failing.
struct Failing {
    since: Instant,
    failures: u64,
    backoff: Duration,
    retry_at: Instant,
    logged_at: Instant,
}

/// The writer's view of commit health; publishes it in [`OutboxStats`].
pub(super) struct Health {
    stats: Arc<OutboxStats>,
    failing: Option<Failing>,
}

impl Health {
    pub(super) fn new(stats: Arc<OutboxStats>) -> Self {
        Self {
            stats,
            failing: None,
        }
    }

    /// When to retry, while commits are failing.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.failing.as_ref().map(|f| f.retry_at)
    }

    /// A commit failed and was rolled back; `held` appends wait for the
    /// retry.
    pub(super) fn failed(&mut self, error: &OutboxError, held: usize) {
        self.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
        let reason = match error {
            OutboxError::Sqlite { reason, .. } => reason.clone(),
            e => e.to_string(),
        };
        *self.stats.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        let now = Instant::now();
        let Some(f) = self.failing.as_mut() else {
            tracing::error!(
                error = %error,
                held_appends = held,
                "Outbox commit failed and was rolled back: nothing more is taken in or acknowledged until a commit succeeds; retrying."
            );
            self.failing = Some(Failing {
                since: now,
                failures: 1,
                backoff: BACKOFF_MIN,
                retry_at: now + BACKOFF_MIN,
                logged_at: now,
            });
            return;
        };
        f.failures += 1;
        f.backoff = (f.backoff * 2).min(BACKOFF_MAX);
        f.retry_at = now + f.backoff;
        if now.duration_since(f.logged_at) >= REPEAT_LOG {
            f.logged_at = now;
            tracing::error!(
                error = %error,
                failures = f.failures,
                failing_s = f.since.elapsed().as_secs(),
                held_appends = held,
                "Outbox commits still failing; intake still held back; retrying."
            );
        }
    }

    /// A commit that included every held append succeeded.
    pub(super) fn succeeded(&mut self) {
        let Some(f) = self.failing.take() else {
            return;
        };
        *self.stats.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
        tracing::info!(
            failures = f.failures,
            failed_for_ms = f.since.elapsed().as_millis() as u64,
            "Outbox commits succeed again; intake resumes."
        );
    }
}
