//! One invocation: run an event through a loaded function (warm or fresh
//! instance), then name its outcome from the result and the store's state,
//! write what the guest printed to its log, and count and log it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use wasmtime::Trap;

use super::{HostState, Invocation, LoadedFunction, Outputs, logs};
use crate::bindings::edgefn::function::types::{self as wit, Level};
use crate::config::schema::InstanceMode;
use crate::event::{Event, SourceKind};
use crate::metrics::Failure;
use crate::runtime::state::KvTxn;

impl LoadedFunction {
    /// Runs `event` through the function: on the warm instance (`reuse`) or
    /// a new one (`fresh`). Blocks the calling thread for at most the
    /// timeout (plus one epoch tick). An instance that trapped, timed out or
    /// hit a limit is thrown away; the next event gets a new one. Counts and
    /// logs the outcome; never panics on guest behaviour.
    pub fn invoke(&self, event: &Event) -> Invocation {
        let started = Instant::now();
        self.metrics.invocations.fetch_add(1, Ordering::Relaxed);
        let wit_event = wit::Event {
            source: match event.source {
                SourceKind::Mqtt => wit::SourceKind::Mqtt,
                SourceKind::Serial => wit::SourceKind::Serial,
                SourceKind::I2c => wit::SourceKind::I2c,
                SourceKind::Timer => wit::SourceKind::Timer,
                SourceKind::Manual => wit::SourceKind::Manual,
            },
            topic: event.topic.clone(),
            payload: event.payload.to_vec(),
            received_at_ms: event.received_at_ms,
            attributes: event.attributes.clone(),
        };
        let mut slot = self.warm_slot();
        let warm = match slot.take() {
            Some(mut w) => {
                w.store.data_mut().begin();
                self.arm_deadline(&mut w.store);
                Ok(w)
            }
            None => self.instantiate(),
        };
        let (result, warm) = match warm {
            Ok(mut w) => {
                let r = w.instance.call_handle(&mut w.store, &wit_event);
                (r, Some(w))
            }
            Err(e) => (Err(e), None),
        };
        let elapsed = started.elapsed();
        self.metrics.latency.observe(elapsed);
        let mut warm = warm;
        let mut outcome = self.settle(result, warm.as_mut().map(|w| w.store.data_mut()));
        // Keep a healthy instance warm; anything that trapped or hit a limit
        // is dropped here (its pool slot is wiped and reused).
        if self.mode == InstanceMode::Reuse
            && outcome.as_ref().err().is_none_or(Failure::is_verdict)
            && let Some(mut w) = warm
        {
            if let Some(kv) = &mut w.store.data_mut().kv {
                kv.reset();
            }
            *slot = Some(w);
        }
        drop(slot);
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        match &mut outcome {
            Ok(out) => {
                self.metrics.ok.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    function = %self.name,
                    topic = %event.topic,
                    elapsed_us,
                    published = out.publishes.len(),
                    forwarded = out.forwards.len(),
                    "Function invoked."
                );
            }
            Err(failure) => {
                self.metrics.count_failure(failure);
                tracing::warn!(
                    function = %self.name,
                    version = %self.version,
                    topic = %event.topic,
                    elapsed_us,
                    failure = failure.kind(),
                    reason = %logs::bounded(&failure.to_string(), logs::LOG_LINE_BYTES),
                    "Function failed; its outputs were discarded."
                );
            }
        }
        Invocation { outcome, elapsed }
    }
}

impl LoadedFunction {
    /// Names the outcome of a call from its result and its store's state
    /// (`None`: no instance could be created), writes what the guest printed
    /// to its log under the log budget, and bounds every guest-supplied
    /// reason ([`logs::REASON_BYTES`]).
    fn settle(
        &self,
        result: wasmtime::Result<Result<(), String>>,
        mut state: Option<&mut HostState>,
    ) -> Result<Outputs, Failure> {
        let mut seen = (0, 0, false, false);
        let mut stderr = None;
        if let Some(s) = state.as_deref_mut() {
            let stdout = s.stdout.take();
            let err = s.stderr.take();
            s.log.write_stream(Level::Info, &stdout);
            s.log.write_stream(Level::Warn, &err);
            s.log.finish(&self.metrics);
            seen = (s.denied, s.over_limit, s.limiter.exceeded, s.deadline.hit);
            stderr = Some(err);
        }
        let (denied, over_limit, exceeded, timed_out) = seen;
        self.metrics
            .denied
            .fetch_add(u64::from(denied), Ordering::Relaxed);
        self.metrics
            .over_limit
            .fetch_add(u64::from(over_limit), Ordering::Relaxed);
        let cut = |mut m: String| {
            logs::bound(&mut m, logs::REASON_BYTES);
            m
        };
        match result {
            // A wait cut short by the deadline: a timeout, whatever the guest
            // did after it.
            _ if timed_out => Err(Failure::Timeout),
            Ok(Ok(())) => match state {
                Some(s) => match s.kv.as_mut().map(KvTxn::commit).transpose() {
                    Ok(_) => Ok(std::mem::take(&mut s.outputs)),
                    Err(e) => Err(Failure::Error(format!("state could not be saved: {e}"))),
                },
                None => Ok(Outputs::default()),
            },
            // A refused call usually ends the handler through `?`: name the
            // failure after the refusal.
            Ok(Err(message)) if over_limit > 0 => Err(Failure::Quota(cut(message))),
            Ok(Err(message)) if denied > 0 => Err(Failure::Denied(cut(message))),
            Ok(Err(message)) => Err(Failure::Error(cut(message))),
            Err(e) if exceeded => Err(Failure::Memory(root_message(&e))),
            Err(e) if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => Err(Failure::Timeout),
            // A panic reaches the host as a bare `unreachable`; its message
            // is on stderr.
            Err(e) => {
                let panic = stderr
                    .as_ref()
                    .and_then(super::wasi::Captured::panic_message);
                Err(Failure::Trap(
                    cut(panic.unwrap_or_else(|| root_message(&e))),
                ))
            }
        }
    }
}

/// The most useful line of a wasmtime error: the trap or root cause, without
/// the backtrace.
pub(super) fn root_message(e: &wasmtime::Error) -> String {
    if let Some(trap) = e.downcast_ref::<Trap>() {
        return trap.to_string();
    }
    e.root_cause().to_string()
}

/// Why an instantiation failed; a full instance pool (functions added at run
/// time beyond its slots) names the setting to raise.
pub(super) fn instantiate_reason(e: &wasmtime::Error) -> String {
    let reason = root_message(e);
    if e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
        .is_some()
        || reason.contains("maximum concurrent limit")
    {
        format!(
            "{reason}: every slot of the instance pool is taken; raise `runtime.pool_instances` (needs a restart) or run fewer functions"
        )
    } else {
        reason
    }
}
