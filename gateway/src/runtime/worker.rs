//! A function's worker: takes events from the function's own queue in
//! arrival order, runs them on a blocking thread, and settles each one.
//!
//! - Success: outputs go to the [`OutputPort`]; the breaker closes.
//! - Failure (error, quota, denied, trap, timeout, memory): the event goes to
//!   the function's dead-letter topic with the reason. Traps, timeouts and
//!   memory failures count towards the breaker; a handler's `Err` does not
//!   (it is the function's verdict on a bad input, and a burst of bad
//!   readings must not shut out the good ones).
//! - Breaker open: the event is dead-lettered without running.
//! - New version (hot reload): switched in between two events, so an event
//!   never sees half a swap. Until its first success the new version is on
//!   probation: an event it fails is run again on the previous version; if
//!   the previous version handles it, that is a strike against the new one
//!   (a regression, not a bad input), and `rollback_after` strikes roll it
//!   back.
//! - Replaced worker (a reload changed the function's queue or breaker): the
//!   new worker waits for the old one to drain its queue and stop
//!   ([`Worker::after`]), so no event is reordered.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::BreakerSpec;
use crate::event::Event;
use crate::metrics::Failure;
use crate::output::OutputPort;
use crate::progress::{Activity, Beat, WORKER_MARGIN};
use crate::runtime::breaker::{Admit, Breaker, BreakerState};
use crate::runtime::queue::QueueReceiver;
use crate::runtime::{Invocation, LoadedFunction};

/// Everything a worker needs.
pub struct Worker {
    /// The current version; the reloader sends new ones.
    pub versions: watch::Receiver<Arc<LoadedFunction>>,
    /// The function's queue.
    pub queue: QueueReceiver,
    /// Where outputs and dead letters go.
    pub port: OutputPort,
    /// Breaker settings.
    pub breaker: BreakerSpec,
    /// Failures in a row that roll a new version back.
    pub rollback_after: u32,
    /// Its progress, for the watchdog ([`crate::progress`]).
    pub beat: Arc<Beat>,
    /// The worker this one replaces: it starts handling only once that one
    /// has drained its queue and stopped (events stay in order).
    pub after: Option<CancellationToken>,
    /// Cancelled when this worker has stopped (its queue closed and drained).
    pub done: CancellationToken,
}

struct Probation {
    previous: Arc<LoadedFunction>,
    failures: u32,
}

/// Runs `event` on `f` on the current thread; a panic in the host (a bug,
/// never guest behaviour) fails this invocation instead of the worker.
fn invoke(f: &LoadedFunction, event: &Event) -> Invocation {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.invoke(event))) {
        Ok(inv) => inv,
        Err(_) => {
            let failure = Failure::Trap("the host failed during the call".into());
            f.metrics().count_failure(&failure);
            Invocation {
                outcome: Err(failure),
                elapsed: std::time::Duration::ZERO,
            }
        }
    }
}

impl Worker {
    /// Runs until the queue is closed and drained, on a thread of its own
    /// (guest calls block): events are taken and invoked there without a
    /// hand-off to another thread per event; only waiting for the next event
    /// and handing outputs to async connections go through the runtime.
    pub async fn run(self) {
        let _done = self.done.clone().drop_guard();
        if let Some(after) = &self.after {
            after.cancelled().await;
        }
        let rt = tokio::runtime::Handle::current();
        if let Err(e) = tokio::task::spawn_blocking(move || self.run_blocking(&rt)).await {
            tracing::error!(error = %e, "Function worker failed.");
        }
    }

    fn run_blocking(mut self, rt: &tokio::runtime::Handle) {
        let mut current = self.versions.borrow_and_update().clone();
        let metrics = current.metrics().clone();
        metrics.set_version(current.version(), current.from_cache());
        let name = current.name().to_owned();
        let mut breaker = Breaker::new(self.breaker.clone());
        let mut probation: Option<Probation> = None;
        loop {
            let event = match self.queue.try_pop() {
                Some(e) => e,
                None => {
                    self.beat.idle();
                    match rt.block_on(self.queue.pop()) {
                        Some(e) => e,
                        None => break,
                    }
                }
            };
            self.beat.busy(Activity::Delivering);
            if self.versions.has_changed().unwrap_or(false) {
                let next = self.versions.borrow_and_update().clone();
                self.beat.set_limit(next.limits().timeout + WORKER_MARGIN);
                tracing::info!(function = %name, from = %current.version(), to = %next.version(), "Switched to the new version.");
                metrics.set_version(next.version(), next.from_cache());
                metrics.reloads.fetch_add(1, Ordering::Relaxed);
                probation = Some(Probation {
                    previous: std::mem::replace(&mut current, next),
                    failures: 0,
                });
                breaker.reset();
            }
            if let Admit::Reject(left) = breaker.admit(Instant::now()) {
                let reason = format!(
                    "the circuit breaker is open for another {} ms",
                    left.as_millis()
                );
                rt.block_on(self.port.dead_letter(
                    current.id(),
                    &event,
                    "breaker-open",
                    &reason,
                    None,
                ));
                continue;
            }
            self.beat.busy(Activity::Invoking);
            let inv = invoke(&current, &event);
            let inv = match (inv.outcome, probation.as_mut()) {
                (Err(failure), Some(p)) => {
                    let previous = p.previous.clone();
                    self.beat.busy(Activity::Invoking);
                    let retry = invoke(&previous, &event);
                    if retry.outcome.is_ok() {
                        p.failures += 1;
                        if p.failures >= self.rollback_after {
                            tracing::error!(
                                function = %name,
                                failed = %current.version(),
                                restored = %previous.version(),
                                failures = p.failures,
                                last_failure = %failure,
                                "New version failed where the previous one succeeded; rolled back to the previous version."
                            );
                            metrics.rollbacks.fetch_add(1, Ordering::Relaxed);
                            metrics.set_version(previous.version(), previous.from_cache());
                            current = previous;
                            probation = None;
                        } else {
                            tracing::warn!(function = %name, version = %current.version(), failure = failure.kind(), "New version failed on probation; the previous version handled the event.");
                        }
                    }
                    retry
                }
                (outcome, _) => {
                    if outcome.is_ok() {
                        probation = None;
                    }
                    Invocation {
                        outcome,
                        elapsed: inv.elapsed,
                    }
                }
            };
            self.beat.busy(Activity::Delivering);
            rt.block_on(self.settle(&current, &mut breaker, &event, inv));
            metrics
                .breaker_state
                .store(breaker.state() as u8, Ordering::Relaxed);
        }
        self.beat.idle();
        tracing::debug!(function = %name, "Function worker stopped.");
    }

    async fn settle(
        &self,
        f: &LoadedFunction,
        breaker: &mut Breaker,
        event: &Arc<Event>,
        inv: Invocation,
    ) {
        match inv.outcome {
            Ok(outputs) => {
                if breaker.state() != BreakerState::Closed {
                    tracing::info!(function = %f.name(), "Circuit breaker closed: the function works again.");
                }
                breaker.success();
                // Before the outputs go out: whoever sees them sees the
                // breaker closed.
                f.metrics()
                    .breaker_state
                    .store(breaker.state() as u8, Ordering::Relaxed);
                self.port
                    .deliver(f.name(), f.lane(), event, outputs, f.metrics(), &self.beat)
                    .await;
            }
            Err(failure) => {
                if failure.is_verdict() {
                    // The guest ran to completion and rejected the input.
                    breaker.success();
                } else if let Some(backoff) = breaker.failure(Instant::now()) {
                    f.metrics().breaker_opens.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        function = %f.name(),
                        backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                        "Circuit breaker opened: the function keeps failing; its events go to the dead-letter topic."
                    );
                }
                self.port
                    .dead_letter(
                        f.id(),
                        event,
                        failure.kind(),
                        &failure.to_string(),
                        Some(inv.elapsed),
                    )
                    .await;
            }
        }
    }
}
