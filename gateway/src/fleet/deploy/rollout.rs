//! The rollout as a state machine, apart from the MQTT plumbing: it takes
//! reports and clock ticks and answers with desired documents to publish,
//! until every gateway has an outcome.
//!
//! With a canary: publish to the canary, wait until it runs the new bundle,
//! bake (watch its health), then publish to the rest, or roll the canary
//! back (forced) when it is unhealthy. Without one: publish to every
//! gateway at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::fleet::desired::BundleRef;
use crate::fleet::report::{Health, ReportState, Reported};

/// What to roll out, where, and the rules.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Every target gateway (the canary included).
    pub gateways: Vec<String>,
    /// Deployed to first, alone.
    pub canary: Option<String>,
    /// The new bundle.
    pub bundle: BundleRef,
    /// Apply even if not newer than what runs.
    pub force: bool,
    /// How long the canary runs the new bundle before the rest get it.
    pub bake: Duration,
    /// How long to wait for the gateways of each step to report.
    pub timeout: Duration,
    /// How much the canary's failure rate may exceed the previous
    /// version's (0.05 = 5 percentage points).
    pub max_failure_rate: f64,
}

/// Where the canary goes back to when it is unhealthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rollback {
    /// The previous bundle (`None`: the configuration's functions only).
    To(Option<BundleRef>),
    /// Not known (why): the canary cannot be rolled back automatically.
    Unknown(String),
}

/// A step for the plumbing to carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Publish a signed desired document for each of `gateways`.
    Publish {
        /// The gateways.
        gateways: Vec<String>,
        /// The bundle (`None`: no bundle).
        bundle: Option<BundleRef>,
        /// Whether the document is forced.
        force: bool,
    },
    /// Put the retained desired document that `gateway` had before this
    /// deploy back (clear it if it had none): where no rollback target is
    /// known, it must not keep pointing at the new bundle.
    RestorePrevious {
        /// The gateway.
        gateway: String,
    },
    /// A progress line for the operator.
    Say(String),
}

/// What became of one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayResult {
    /// Runs the new bundle.
    Running,
    /// Refused it (the reason).
    Refused(String),
    /// Could not fetch or apply it (the error).
    Failed(String),
    /// Did not report it running within the timeout.
    TimedOut,
    /// The canary was unhealthy (why).
    Unhealthy(String),
    /// Never got the new desired document (the canary failed).
    NotDeployed,
}

/// The end of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Each gateway's result.
    pub results: BTreeMap<String, GatewayResult>,
    /// The canary's story, when it failed (e.g. `canary gw1 unhealthy: …;
    /// rolled back to version 3`).
    pub canary: Option<String>,
}

impl Outcome {
    /// Whether every gateway runs the new bundle.
    pub fn ok(&self) -> bool {
        self.results.values().all(|r| *r == GatewayResult::Running)
    }
}

#[derive(Debug, Clone)]
enum Phase {
    Canary { deadline: Instant },
    Baking { until: Instant },
    RollingBack { deadline: Instant, why: String },
    Rest { deadline: Instant },
    Done,
}

/// A rollout in progress.
#[derive(Debug)]
pub struct Rollout {
    plan: Plan,
    baseline: BTreeMap<String, Reported>,
    rollback: Rollback,
    phase: Phase,
    results: BTreeMap<String, GatewayResult>,
    /// The canary's latest report of the new bundle.
    canary_latest: Option<Reported>,
    outcome: Option<Outcome>,
}

/// Why `now` is worse than `previous` by the canary rule, if it is: the
/// breaker opened where the previous version's never did, or the failure
/// rate (with at least one failure) exceeds the previous one by more than
/// `max_rate`.
pub fn unhealthy(now: &Health, previous: &Health, max_rate: f64) -> Option<String> {
    if now.breaker_opens > previous.breaker_opens && previous.breaker_opens == 0 {
        return Some(format!(
            "circuit breaker opened {} time(s) (previous version never)",
            now.breaker_opens
        ));
    }
    let rate = |h: &Health| {
        if h.invocations == 0 {
            if h.failures > 0 { 1.0 } else { 0.0 }
        } else {
            h.failures as f64 / h.invocations as f64
        }
    };
    (now.failures >= 1 && rate(now) > rate(previous) + max_rate).then(|| {
        format!(
            "{} failures in {} invocations (previous version {} in {})",
            now.failures, now.invocations, previous.failures, previous.invocations
        )
    })
}

impl Rollout {
    /// Starts: the first desired documents to publish. `baseline` holds the
    /// reports seen before (the previous versions and their health).
    pub fn new(
        plan: Plan,
        baseline: BTreeMap<String, Reported>,
        rollback: Rollback,
        now: Instant,
    ) -> (Self, Vec<Action>) {
        let mut r = Self {
            phase: Phase::Done,
            plan,
            baseline,
            rollback,
            results: BTreeMap::new(),
            canary_latest: None,
            outcome: None,
        };
        let actions = match r.plan.canary.clone() {
            Some(canary) => {
                r.phase = Phase::Canary {
                    deadline: now + r.plan.timeout,
                };
                let mut actions = vec![r.publish_new(vec![canary.clone()])];
                if let Some(report) = r.runs_new_already(&canary) {
                    r.canary_latest = Some(report);
                    actions.extend(r.start_bake(now));
                }
                actions
            }
            None => r.start_rest(now),
        };
        (r, actions)
    }

    /// The result, once the rollout is over.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// When [`Rollout::on_tick`] must be called next.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Canary { deadline }
            | Phase::RollingBack { deadline, .. }
            | Phase::Rest { deadline } => Some(*deadline),
            Phase::Baking { until } => Some(*until),
            Phase::Done => None,
        }
    }

    fn publish_new(&self, gateways: Vec<String>) -> Action {
        Action::Publish {
            gateways,
            bundle: Some(self.plan.bundle.clone()),
            force: self.plan.force,
        }
    }

    /// The baseline report of `gw` if it already runs the new bundle.
    fn runs_new_already(&self, gw: &str) -> Option<Reported> {
        self.baseline
            .get(gw)
            .filter(|b| {
                b.state == ReportState::Running
                    && b.bundle
                        .as_ref()
                        .is_some_and(|x| x.sha256 == self.plan.bundle.sha256)
            })
            .cloned()
    }

    fn version(&self) -> u64 {
        self.plan.bundle.version
    }

    fn start_bake(&mut self, now: Instant) -> Vec<Action> {
        self.phase = Phase::Baking {
            until: now + self.plan.bake,
        };
        vec![Action::Say(format!(
            "canary {} runs version {}; baking {} s",
            self.plan.canary.as_deref().unwrap_or_default(),
            self.version(),
            self.plan.bake.as_secs()
        ))]
    }

    fn start_rest(&mut self, now: Instant) -> Vec<Action> {
        let canary = self.plan.canary.clone();
        let rest: Vec<String> = self
            .plan
            .gateways
            .iter()
            .filter(|g| Some(*g) != canary.as_ref())
            .cloned()
            .collect();
        if let Some(c) = canary {
            self.results.insert(c, GatewayResult::Running);
        }
        for g in &rest {
            if self.runs_new_already(g).is_some() {
                self.results.insert(g.clone(), GatewayResult::Running);
            }
        }
        self.phase = Phase::Rest {
            deadline: now + self.plan.timeout,
        };
        let actions = if rest.is_empty() {
            vec![]
        } else {
            vec![self.publish_new(rest)]
        };
        self.finish_if_complete();
        actions
    }

    /// What a report says about the new bundle on its gateway: `None` while
    /// nothing is decided (or the report is the one known before).
    fn judge(&self, r: &Reported) -> Option<GatewayResult> {
        let base = self.baseline.get(&r.gateway);
        if base == Some(r) {
            return None;
        }
        let sha = &self.plan.bundle.sha256;
        if r.state == ReportState::Running && r.bundle.as_ref().is_some_and(|b| &b.sha256 == sha) {
            return Some(GatewayResult::Running);
        }
        if let Some(f) = &r.last_refusal
            && f.sha256.as_ref() == Some(sha)
            && base.and_then(|b| b.last_refusal.as_ref()) != Some(f)
        {
            return Some(GatewayResult::Refused(f.reason.clone()));
        }
        let about_new = r.desired.as_ref().and_then(|d| d.sha256.as_ref()) == Some(sha);
        let old_failure =
            base.is_some_and(|b| b.state == ReportState::Failed && b.last_error == r.last_error);
        if r.state == ReportState::Failed && about_new && !old_failure {
            let error = r
                .last_error
                .clone()
                .unwrap_or_else(|| "no error given".into());
            return Some(GatewayResult::Failed(error));
        }
        None
    }

    /// Takes a report (any gateway's; others are ignored).
    pub fn on_report(&mut self, r: Reported, now: Instant) -> Vec<Action> {
        let is_canary = self.plan.canary.as_ref() == Some(&r.gateway);
        match self.phase.clone() {
            Phase::Canary { .. } if is_canary => match self.judge(&r) {
                Some(GatewayResult::Running) => {
                    self.canary_latest = Some(r);
                    self.start_bake(now)
                }
                Some(other) => self.canary_failed(other),
                None => vec![],
            },
            Phase::Baking { .. } if is_canary => {
                let runs_new = self.judge(&r) == Some(GatewayResult::Running)
                    || self.canary_latest.as_ref() == Some(&r);
                if !runs_new {
                    let why = format!(
                        "no longer runs version {} (state {})",
                        self.version(),
                        r.state.as_str()
                    );
                    return self.start_rollback(why, now);
                }
                let verdict = self.canary_health(&r);
                self.canary_latest = Some(r);
                match verdict {
                    Some(why) => self.start_rollback(why, now),
                    None => vec![],
                }
            }
            Phase::RollingBack { why, .. } if is_canary => {
                if self.runs_rollback_target(&r) {
                    let to = self.rollback_name();
                    self.finish_canary(format!("{why}; rolled back to {to}"));
                }
                vec![]
            }
            Phase::Rest { .. } if self.plan.gateways.contains(&r.gateway) && !is_canary => {
                if !self.results.contains_key(&r.gateway)
                    && let Some(result) = self.judge(&r)
                {
                    self.results.insert(r.gateway.clone(), result);
                }
                self.finish_if_complete();
                vec![]
            }
            _ => vec![],
        }
    }

    /// Advances on the clock.
    pub fn on_tick(&mut self, now: Instant) -> Vec<Action> {
        match self.phase.clone() {
            Phase::Canary { deadline } if now >= deadline => {
                self.canary_failed(GatewayResult::TimedOut)
            }
            Phase::Baking { until } if now >= until => {
                let verdict = self
                    .canary_latest
                    .clone()
                    .and_then(|r| self.canary_health(&r));
                match verdict {
                    Some(why) => self.start_rollback(why, now),
                    None => self.start_rest(now),
                }
            }
            Phase::RollingBack { deadline, why } if now >= deadline => {
                let to = self.rollback_name();
                let secs = self.plan.timeout.as_secs();
                self.finish_canary(format!(
                    "{why}; rollback to {to} not confirmed within {secs} s"
                ));
                vec![]
            }
            Phase::Rest { deadline } if now >= deadline => {
                for g in &self.plan.gateways {
                    self.results
                        .entry(g.clone())
                        .or_insert(GatewayResult::TimedOut);
                }
                self.finish_if_complete();
                vec![]
            }
            _ => vec![],
        }
    }

    fn canary_health(&self, r: &Reported) -> Option<String> {
        let previous = self
            .baseline
            .get(&r.gateway)
            .filter(|b| b.bundle.as_ref().map(|x| &x.sha256) != Some(&self.plan.bundle.sha256))
            .map(|b| b.since_apply)
            .unwrap_or_default();
        unhealthy(&r.since_apply, &previous, self.plan.max_failure_rate)
    }

    fn runs_rollback_target(&self, r: &Reported) -> bool {
        let Rollback::To(target) = &self.rollback else {
            return false;
        };
        r.state == ReportState::Running
            && r.bundle.as_ref().map(|b| &b.sha256) == target.as_ref().map(|t| &t.sha256)
    }

    fn rollback_name(&self) -> String {
        match &self.rollback {
            Rollback::To(Some(b)) => format!("version {}", b.version),
            Rollback::To(None) => "the configuration's functions (no bundle)".into(),
            Rollback::Unknown(_) => "an unknown version".into(),
        }
    }

    fn start_rollback(&mut self, why: String, now: Instant) -> Vec<Action> {
        let canary = self.plan.canary.clone().unwrap_or_default();
        let why = format!("canary {canary} unhealthy: {why}");
        match self.rollback.clone() {
            Rollback::To(bundle) => {
                self.phase = Phase::RollingBack {
                    deadline: now + self.plan.timeout,
                    why: why.clone(),
                };
                vec![
                    Action::Say(format!("{why}; rolling back to {}", self.rollback_name())),
                    Action::Publish {
                        gateways: vec![canary],
                        bundle,
                        force: true,
                    },
                ]
            }
            Rollback::Unknown(reason) => {
                self.finish_canary(format!("{why}; NOT rolled back: {reason}"));
                vec![]
            }
        }
    }

    /// The canary did not take the bundle (timed out, refused, failed):
    /// nobody else gets it, and its retained desired document is set back
    /// (forced) so that it does not apply the new bundle unwatched later.
    fn canary_failed(&mut self, result: GatewayResult) -> Vec<Action> {
        let canary = self.plan.canary.clone().unwrap_or_default();
        self.results.insert(canary.clone(), result);
        let (story, action) = match self.rollback.clone() {
            Rollback::To(bundle) => (
                format!(
                    "canary {canary} did not take version {}; its desired state is set back to {} (forced)",
                    self.version(),
                    self.rollback_name()
                ),
                Action::Publish {
                    gateways: vec![canary.clone()],
                    bundle,
                    force: true,
                },
            ),
            Rollback::Unknown(reason) => (
                format!(
                    "canary {canary} did not take version {}; its previous desired document is put back (no rollback target: {reason})",
                    self.version()
                ),
                Action::RestorePrevious {
                    gateway: canary.clone(),
                },
            ),
        };
        self.finish_rest_not_deployed(Some(story.clone()));
        vec![Action::Say(story), action]
    }

    /// The canary took it but was unhealthy: `story` says what happened.
    fn finish_canary(&mut self, story: String) {
        let canary = self.plan.canary.clone().unwrap_or_default();
        self.results
            .insert(canary, GatewayResult::Unhealthy(story.clone()));
        self.finish_rest_not_deployed(Some(story));
    }

    fn finish_rest_not_deployed(&mut self, story: Option<String>) {
        for g in &self.plan.gateways {
            self.results
                .entry(g.clone())
                .or_insert(GatewayResult::NotDeployed);
        }
        self.phase = Phase::Done;
        self.outcome = Some(Outcome {
            results: self.results.clone(),
            canary: story,
        });
    }

    fn finish_if_complete(&mut self) {
        if self
            .plan
            .gateways
            .iter()
            .all(|g| self.results.contains_key(g))
        {
            self.phase = Phase::Done;
            self.outcome = Some(Outcome {
                results: self.results.clone(),
                canary: None,
            });
        }
    }
}

#[cfg(test)]
#[path = "rollout_tests.rs"]
mod tests;
