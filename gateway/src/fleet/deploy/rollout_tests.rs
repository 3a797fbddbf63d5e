//! Unit tests of the rollout decisions.

use super::*;
use crate::fleet::report::{Refusal, RunningBundle};

const NEW: &str = "aa";
const OLD: &str = "bb";

fn bundle(sha: &str, version: u64) -> BundleRef {
    BundleRef {
        sha256: sha.into(),
        version,
        size: 10,
        chunk_size: 1024,
        chunks: 1,
    }
}

fn plan(canary: Option<&str>) -> Plan {
    Plan {
        gateways: vec!["gw1".into(), "gw2".into(), "gw3".into()],
        canary: canary.map(Into::into),
        bundle: bundle(NEW, 2),
        force: false,
        bake: Duration::from_secs(30),
        timeout: Duration::from_secs(120),
        max_failure_rate: 0.05,
    }
}

fn report(gw: &str, sha: Option<&str>, health: (u64, u64, u64)) -> Reported {
    Reported {
        gateway: gw.into(),
        reported_ms: 1,
        state: ReportState::Running,
        bundle: sha.map(|s| RunningBundle {
            sha256: s.into(),
            version: if s == NEW { 2 } else { 1 },
            applied_ms: 1,
        }),
        desired: None,
        functions: vec![],
        since_apply: Health {
            invocations: health.0,
            failures: health.1,
            breaker_opens: health.2,
        },
        last_refusal: None,
        last_error: None,
    }
}

fn baseline() -> BTreeMap<String, Reported> {
    ["gw1", "gw2", "gw3"]
        .iter()
        .map(|g| (g.to_string(), report(g, Some(OLD), (112, 0, 0))))
        .collect()
}

fn publishes(actions: &[Action]) -> Vec<(Vec<String>, Option<String>, bool)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish {
                gateways,
                bundle,
                force,
            } => Some((
                gateways.clone(),
                bundle.as_ref().map(|b| b.sha256.clone()),
                *force,
            )),
            Action::Say(_) | Action::RestorePrevious { .. } => None,
        })
        .collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn health_rule() {
    let h = |i, f, b| Health {
        invocations: i,
        failures: f,
        breaker_opens: b,
    };
    assert_eq!(unhealthy(&h(100, 0, 0), &h(100, 0, 0), 0.05), None);
    // 5 % more than before is allowed, more is not.
    assert_eq!(unhealthy(&h(100, 5, 0), &h(100, 0, 0), 0.05), None);
    assert!(unhealthy(&h(100, 6, 0), &h(100, 0, 0), 0.05).is_some());
    // Relative to the previous version's rate.
    assert_eq!(unhealthy(&h(100, 12, 0), &h(100, 10, 0), 0.05), None);
    assert_eq!(
        unhealthy(&h(37, 37, 0), &h(112, 0, 0), 0.05).as_deref(),
        Some("37 failures in 37 invocations (previous version 0 in 112)")
    );
    // A failure without an invocation count is a 100 % rate.
    assert!(unhealthy(&h(0, 1, 0), &h(0, 0, 0), 0.05).is_some());
    // The breaker: unhealthy only where the previous version had none.
    assert!(unhealthy(&h(10, 0, 1), &h(10, 0, 0), 0.05).is_some());
    assert_eq!(unhealthy(&h(10, 0, 1), &h(10, 0, 2), 0.05), None);
}

#[test]
fn no_canary_publishes_to_all_and_waits_for_each() {
    let t0 = Instant::now();
    let (mut r, actions) = Rollout::new(plan(None), baseline(), Rollback::To(None), t0);
    assert_eq!(
        publishes(&actions),
        vec![(names(&["gw1", "gw2", "gw3"]), Some(NEW.into()), false)]
    );
    // The retained report known before decides nothing.
    assert!(
        r.on_report(report("gw1", Some(OLD), (112, 0, 0)), t0)
            .is_empty()
    );
    r.on_report(report("gw1", Some(NEW), (0, 0, 0)), t0);
    let mut refused = report("gw2", Some(OLD), (112, 0, 0));
    refused.state = ReportState::Refused;
    refused.last_refusal = Some(Refusal {
        sha256: Some(NEW.into()),
        version: Some(2),
        reason: "version 2 is not newer than 2".into(),
        at_ms: 5,
    });
    r.on_report(refused, t0);
    assert!(r.outcome().is_none());
    r.on_tick(t0 + Duration::from_secs(119));
    assert!(r.outcome().is_none());
    r.on_tick(t0 + Duration::from_secs(120));
    let o = r.outcome().unwrap();
    assert!(!o.ok());
    assert_eq!(o.results["gw1"], GatewayResult::Running);
    assert_eq!(
        o.results["gw2"],
        GatewayResult::Refused("version 2 is not newer than 2".into())
    );
    assert_eq!(o.results["gw3"], GatewayResult::TimedOut);
}

#[test]
fn healthy_canary_then_the_rest() {
    let t0 = Instant::now();
    let (mut r, actions) = Rollout::new(
        plan(Some("gw1")),
        baseline(),
        Rollback::To(Some(bundle(OLD, 1))),
        t0,
    );
    assert_eq!(
        publishes(&actions),
        vec![(names(&["gw1"]), Some(NEW.into()), false)]
    );
    // Another gateway's report changes nothing while the canary runs.
    assert!(
        r.on_report(report("gw2", Some(NEW), (0, 0, 0)), t0)
            .is_empty()
    );
    r.on_report(report("gw1", Some(NEW), (0, 0, 0)), t0);
    assert_eq!(r.next_deadline(), Some(t0 + Duration::from_secs(30)));
    assert!(
        r.on_report(report("gw1", Some(NEW), (50, 1, 0)), t0)
            .is_empty()
    );
    let actions = r.on_tick(t0 + Duration::from_secs(30));
    assert_eq!(
        publishes(&actions),
        vec![(names(&["gw2", "gw3"]), Some(NEW.into()), false)]
    );
    r.on_report(report("gw2", Some(NEW), (0, 0, 0)), t0);
    assert!(r.outcome().is_none());
    r.on_report(report("gw3", Some(NEW), (0, 0, 0)), t0);
    assert!(r.outcome().unwrap().ok());
}

#[test]
fn unhealthy_canary_is_rolled_back_to_the_previous_bundle() {
    let t0 = Instant::now();
    let (mut r, _) = Rollout::new(
        plan(Some("gw1")),
        baseline(),
        Rollback::To(Some(bundle(OLD, 1))),
        t0,
    );
    r.on_report(report("gw1", Some(NEW), (0, 0, 0)), t0);
    let actions = r.on_report(report("gw1", Some(NEW), (37, 37, 0)), t0);
    assert_eq!(
        publishes(&actions),
        vec![(names(&["gw1"]), Some(OLD.into()), true)]
    );
    assert!(r.outcome().is_none());
    r.on_report(report("gw1", Some(OLD), (0, 0, 0)), t0);
    let o = r.outcome().unwrap();
    assert_eq!(
        o.canary.as_deref(),
        Some(
            "canary gw1 unhealthy: 37 failures in 37 invocations (previous version 0 in 112); rolled back to version 1"
        )
    );
    assert_eq!(o.results["gw2"], GatewayResult::NotDeployed);
    assert_eq!(o.results["gw3"], GatewayResult::NotDeployed);
}

#[test]
fn rollback_to_no_bundle_and_unknown_target() {
    let t0 = Instant::now();
    let mut base = baseline();
    base.insert("gw1".into(), report("gw1", None, (0, 0, 0)));
    let (mut r, _) = Rollout::new(plan(Some("gw1")), base.clone(), Rollback::To(None), t0);
    r.on_report(report("gw1", Some(NEW), (0, 0, 0)), t0);
    // Health is checked at the end of the bake too.
    r.on_report(report("gw1", Some(NEW), (10, 0, 1)), t0);
    let actions = r.on_tick(t0 + Duration::from_secs(30));
    assert!(
        actions.is_empty(),
        "rollback already under way: {actions:?}"
    );
    r.on_report(report("gw1", None, (0, 0, 0)), t0);
    let story = r.outcome().unwrap().canary.clone().unwrap();
    assert!(
        story.ends_with("rolled back to the configuration's functions (no bundle)"),
        "{story}"
    );

    let (mut r, _) = Rollout::new(
        plan(Some("gw1")),
        base,
        Rollback::Unknown("no desired document".into()),
        t0,
    );
    r.on_report(report("gw1", Some(NEW), (0, 0, 0)), t0);
    let actions = r.on_report(report("gw1", Some(NEW), (5, 5, 0)), t0);
    assert!(publishes(&actions).is_empty());
    let story = r.outcome().unwrap().canary.clone().unwrap();
    assert!(
        story.contains("NOT rolled back: no desired document"),
        "{story}"
    );
}

#[test]
fn canary_refusal_or_timeout_stops_the_rollout() {
    let t0 = Instant::now();
    let (mut r, _) = Rollout::new(plan(Some("gw1")), baseline(), Rollback::To(None), t0);
    let mut failed = report("gw1", Some(OLD), (112, 0, 0));
    failed.state = ReportState::Failed;
    failed.desired = Some(crate::fleet::report::DesiredSummary {
        sha256: Some(NEW.into()),
        version: Some(2),
        force: false,
        issued_ms: 0,
    });
    failed.last_error = Some("bundle aa: 1 of 1 chunks missing".into());
    let actions = r.on_report(failed, t0);
    let o = r.outcome().unwrap();
    assert_eq!(
        o.results["gw1"],
        GatewayResult::Failed("bundle aa: 1 of 1 chunks missing".into())
    );
    assert_eq!(o.results["gw2"], GatewayResult::NotDeployed);
    // Its desired document goes back (forced) to what it ran.
    assert_eq!(publishes(&actions), [(names(&["gw1"]), None, true)]);
    assert!(o.canary.as_ref().unwrap().contains("set back to"), "{o:?}");

    let rollback = Rollback::To(Some(bundle(OLD, 1)));
    let (mut r, _) = Rollout::new(plan(Some("gw1")), baseline(), rollback, t0);
    let actions = r.on_tick(t0 + Duration::from_secs(120));
    let o = r.outcome().unwrap();
    assert_eq!(o.results["gw1"], GatewayResult::TimedOut);
    assert_eq!(o.results["gw3"], GatewayResult::NotDeployed);
    assert_eq!(
        publishes(&actions),
        [(names(&["gw1"]), Some(OLD.to_owned()), true)]
    );

    // Refused, with no rollback target: its previous document goes back.
    let unknown = Rollback::Unknown("gw1 had not reported".into());
    let (mut r, _) = Rollout::new(plan(Some("gw1")), baseline(), unknown, t0);
    let mut refused = report("gw1", Some(OLD), (112, 0, 0));
    refused.state = ReportState::Refused;
    refused.last_refusal = Some(Refusal {
        sha256: Some(NEW.into()),
        version: Some(2),
        reason: "untrusted key".into(),
        at_ms: 2,
    });
    let actions = r.on_report(refused, t0);
    assert!(
        actions.contains(&Action::RestorePrevious {
            gateway: "gw1".into()
        }),
        "{actions:?}"
    );
    assert!(r.outcome().unwrap().canary.is_some());
}

#[test]
fn a_stale_refusal_is_not_taken_for_a_new_one() {
    let t0 = Instant::now();
    let mut base = baseline();
    let mut old = report("gw2", Some(OLD), (1, 0, 0));
    old.last_refusal = Some(Refusal {
        sha256: Some(NEW.into()),
        version: Some(2),
        reason: "earlier attempt".into(),
        at_ms: 1,
    });
    base.insert("gw2".into(), old.clone());
    let (mut r, _) = Rollout::new(plan(None), base, Rollback::To(None), t0);
    // A fresh report that still carries the old refusal.
    old.reported_ms = 2;
    r.on_report(old, t0);
    r.on_report(report("gw1", Some(NEW), (0, 0, 0)), t0);
    r.on_report(report("gw3", Some(NEW), (0, 0, 0)), t0);
    assert!(r.outcome().is_none());
    r.on_report(report("gw2", Some(NEW), (0, 0, 0)), t0);
    assert!(r.outcome().unwrap().ok());
}
