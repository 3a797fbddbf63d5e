//! What a gateway reports on `edgefn/fleet/<gateway>/reported`: the running
//! bundle, each function's state and counters, the health of the running
//! bundle since it was applied (what `edgefn deploy` compares during a
//! canary's bake), and the last refusal or error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::apply::{Fleet, now_ms};
use super::report::{FunctionReport, Health, Reported, RunningBundle};
use super::store::Current;
use crate::metrics::{FunctionCounts, FunctionMetrics};

/// Each function's counters when the running bundle was applied.
#[derive(Debug, Default, Clone)]
pub(crate) struct Baseline(BTreeMap<String, Health>);

/// Invocations that did not return `Ok`, by any cause.
fn failures(c: &FunctionCounts) -> u64 {
    c.errors + c.traps + c.timeouts + c.memory + c.quota_failures + c.denied_failures
}

fn health(m: &FunctionMetrics) -> Health {
    let c = m.snapshot();
    Health {
        invocations: c.invocations,
        failures: failures(&c),
        breaker_opens: c.breaker_opens,
    }
}

impl Baseline {
    /// The counters of `names` (all functions when empty) now.
    pub(crate) fn take(functions: &[(String, Arc<FunctionMetrics>)], names: &[String]) -> Self {
        Self(
            functions
                .iter()
                .filter(|(n, _)| names.is_empty() || names.contains(n))
                .map(|(n, m)| (n.clone(), health(m)))
                .collect(),
        )
    }

    /// What `names` (all when empty) did since the baseline.
    fn since(&self, functions: &[(String, Arc<FunctionMetrics>)], names: &[String]) -> Health {
        let mut sum = Health::default();
        for (n, m) in functions {
            if !names.is_empty() && !names.contains(n) {
                continue;
            }
            let now = health(m);
            let base = self.0.get(n).cloned().unwrap_or_default();
            sum.invocations += now.invocations.saturating_sub(base.invocations);
            sum.failures += now.failures.saturating_sub(base.failures);
            sum.breaker_opens += now.breaker_opens.saturating_sub(base.breaker_opens);
        }
        sum
    }
}

/// The running bundle, if any.
pub(crate) fn running(c: Option<&Current>) -> Option<RunningBundle> {
    let c = c?;
    c.sha256.as_ref().map(|sha| RunningBundle {
        sha256: sha.clone(),
        version: c.version,
        applied_ms: c.applied_ms,
    })
}

impl Fleet {
    /// The report as it stands.
    pub fn report(&self) -> Reported {
        let functions = (self.functions)();
        let state = self.state();
        Reported {
            gateway: self.gateway_id.clone(),
            reported_ms: now_ms(),
            state: state.phase,
            bundle: running(state.current.as_ref()),
            desired: state.desired.clone(),
            functions: functions
                .iter()
                .map(|(name, m)| {
                    let h = health(m);
                    FunctionReport {
                        name: name.clone(),
                        version: m.version(),
                        breaker: breaker_name(m.breaker_state.load(Ordering::Relaxed)).to_owned(),
                        invocations: h.invocations,
                        failures: h.failures,
                        breaker_opens: h.breaker_opens,
                    }
                })
                .collect(),
            since_apply: state.baseline.since(&functions, &state.names),
            last_refusal: state.last_refusal.clone(),
            last_error: state.last_error.clone(),
        }
    }

    /// The report as JSON.
    pub fn report_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.report()).unwrap_or_default()
    }
}

fn breaker_name(state: u8) -> &'static str {
    match state {
        0 => "closed",
        1 => "open",
        _ => "half-open",
    }
}
