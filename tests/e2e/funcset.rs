//! The function set changes at run time (issue 15): a reload adds, removes
//! and rewires functions without a restart, all or nothing, and a function
//! it does not touch loses and reorders nothing while others change.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use edgefn::runtime::reload::ReloadOutcome;

use crate::reload::{reload, start};
use crate::support::*;

const DEAD_LETTERS: &str = "edgefn/deadletter/functions/#";

/// One `[[functions]]` entry running the `misbehave` guest in echo mode
/// (publishes each payload on `echo/<topic>`), plus `extra` lines.
fn echo(name: &str, triggers: &str, extra: &str) -> String {
    format!(
        "\n[[functions]]\nname = \"{name}\"\ncomponent = {}\ntriggers = {triggers}\npublish = [\"echo/#\"]\n{extra}\n",
        lit(&guest("misbehave"))
    )
}

fn header(id: &str, extra: &str) -> String {
    format!("{}{extra}\n", gateway_header(id))
}

/// `(switched, added, removed, updated)` of an applied reload.
fn applied(outcome: ReloadOutcome) -> (usize, Vec<String>, Vec<String>, Vec<String>) {
    match outcome {
        ReloadOutcome::Applied {
            switched,
            added,
            removed,
            updated,
            restart_needed,
        } => {
            assert!(restart_needed.is_empty(), "{restart_needed:?}");
            (switched, added, removed, updated)
        }
        ReloadOutcome::Refused(reasons) => panic!("refused: {reasons:?}"),
    }
}

/// Publishes `payload` on `topic` and waits for its echo; any other echo
/// arriving first fails the test.
async fn round_trip(sensor: &mut Publisher, echoes: &mut Subscriber, topic: &str, payload: &str) {
    sensor.publish(topic, payload).await;
    let want = format!("echo/{topic}");
    loop {
        let (t, p) = echoes.next().await;
        assert!(
            t == want || !t.starts_with("echo/"),
            "unexpected echo {t} while waiting for {want}"
        );
        if t == want {
            assert_eq!(p, payload.as_bytes());
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_removes_and_rewires_functions_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let admin = free_port();
    let head = header(
        "gw-funcset",
        &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\n"),
    );
    let gw = start(
        &path,
        &format!(
            "{head}{}{}",
            echo("a", r#"["a/#"]"#, ""),
            echo("b", r#"["b/#"]"#, "")
        ),
    )
    .await;
    let (host, port) = gw.local_broker();
    let mut echoes = Subscriber::connect(host, port, &["echo/#"]).await;
    let mut dead = Subscriber::connect(host, port, &[DEAD_LETTERS]).await;
    let mut sensor = Publisher::connect(host, port).await;
    round_trip(&mut sensor, &mut echoes, "a/1", "1").await;
    round_trip(&mut sensor, &mut echoes, "b/1", "1").await;

    // `a` moves to `a2/#`, `b` goes, `c` comes.
    let next = format!(
        "{head}{}{}",
        echo("a", r#"["a2/#"]"#, ""),
        echo("c", r#"["c/#"]"#, "")
    );
    let (switched, added, removed, updated) = applied(reload(&gw, &path, &next).await);
    assert_eq!(
        (switched, added, removed, updated),
        (0, vec!["c".into()], vec!["b".into()], vec!["a".into()])
    );
    assert_eq!(gw.function_names(), ["a", "c"]);
    assert!(gw.wait_subscribed(WAIT).await, "new triggers subscribed");
    assert!(gw.function_metrics("b").is_none());
    // The old topics are no longer handled: `a/2` would be handled by `a`
    // before `a2/2` (one queue, in order) and fail the round trip.
    sensor.publish("a/2", "2").await;
    sensor.publish("b/2", "2").await;
    round_trip(&mut sensor, &mut echoes, "c/1", "1").await;
    round_trip(&mut sensor, &mut echoes, "a2/2", "2").await;
    let a = gw.function_metrics("a").unwrap().snapshot();
    assert_eq!(a.ok, 2, "{a:?}");
    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("function=\"c\""), "{metrics}");
    assert!(!metrics.contains("function=\"b\""), "{metrics}");

    // `a` gets a new queue and a breaker that opens at the first trap.
    let next = format!(
        "{head}{}{}",
        echo(
            "a",
            r#"["a2/#"]"#,
            "limits = { queue = 7 }\nbreaker = { failures = 1, backoff_ms = 60000, max_backoff_ms = 60000 }"
        ),
        echo("c", r#"["c/#"]"#, "")
    );
    let (switched, added, removed, updated) = applied(reload(&gw, &path, &next).await);
    assert_eq!(
        (switched, added, removed, updated),
        (0, vec![], vec![], vec!["a".into()])
    );
    round_trip(&mut sensor, &mut echoes, "a2/3", "3").await;
    sensor.publish("a2/4", "mode:trap").await;
    sensor.publish("a2/5", "5").await;
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let (_, letter) = dead.next_json().await;
        kinds.push(letter["failure"].as_str().unwrap().to_owned());
    }
    assert_eq!(kinds, ["trap", "breaker-open"]);
    // `c` was untouched by that.
    round_trip(&mut sensor, &mut echoes, "c/2", "2").await;
    assert!(gw.shutdown(WAIT).await, "drains after adds and removes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_addition_refuses_the_whole_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let head = header("gw-funcset-refuse", "");
    let gw = start(&path, &format!("{head}{}", echo("a", r#"["a/#"]"#, ""))).await;
    let (host, port) = gw.local_broker();
    let mut echoes = Subscriber::connect(host, port, &["echo/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;

    // `c` is fine, `broken` is not a function, `a` would move to `a2/#`.
    let broken = format!(
        "\n[[functions]]\nname = \"broken\"\ncomponent = {}\ntriggers = [\"d/#\"]\n",
        lit(&guest("not-a-function"))
    );
    let next = format!(
        "{head}{}{}{broken}",
        echo("a", r#"["a2/#"]"#, ""),
        echo("c", r#"["c/#"]"#, "")
    );
    let outcome = reload(&gw, &path, &next).await;
    let ReloadOutcome::Refused(reasons) = outcome else {
        panic!("applied: {outcome:?}");
    };
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("broken"), "{reasons:?}");
    assert_eq!(gw.metrics().reloads_refused.load(Ordering::Relaxed), 1);
    assert_eq!(gw.function_names(), ["a"]);
    // Nothing switched: `c/1` and `a2/1` go nowhere, `a/1` still reaches
    // `a` (after `a2/1` in its queue, had the change been applied).
    sensor.publish("c/1", "1").await;
    sensor.publish("a2/1", "1").await;
    round_trip(&mut sensor, &mut echoes, "a/1", "1").await;
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_beyond_the_instance_pool_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let head = header("gw-funcset-pool", "[runtime]\npool_instances = 1\n");
    let gw = start(&path, &format!("{head}{}", echo("a", r#"["a/#"]"#, ""))).await;
    if !gw.pooling() {
        skip("no instance pool on this machine (on-demand allocation)");
        assert!(gw.shutdown(WAIT).await);
        return;
    }
    let next = format!(
        "{head}{}{}",
        echo("a", r#"["a/#"]"#, ""),
        echo("b", r#"["b/#"]"#, "")
    );
    let outcome = reload(&gw, &path, &next).await;
    let ReloadOutcome::Refused(reasons) = outcome else {
        panic!("applied: {outcome:?}");
    };
    assert!(
        reasons.iter().any(|r| r.contains("runtime.pool_instances")),
        "{reasons:?}"
    );
    assert_eq!(gw.function_names(), ["a"]);
    assert!(gw.shutdown(WAIT).await);
}

/// Publishes numbered payloads at a steady pace until `stop` (and at
/// least 100): one on `steady/s` every tick, one on `moving/m` every fifth
/// (faster than `moving` handles them, so its queue keeps a backlog), each
/// acknowledged before the next. Returns how many went to each.
async fn stream(mut sensor: Publisher, stop: Arc<AtomicBool>) -> (usize, usize) {
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    let (mut steady, mut moving) = (0, 0);
    while steady < 100 || !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        sensor.publish("steady/s", steady.to_string()).await;
        steady += 1;
        if steady % 5 == 0 {
            sensor.publish("moving/m", moving.to_string()).await;
            moving += 1;
        }
    }
    (steady, moving)
}

/// Waits for the numbered outputs `0..n` on each `(topic, n)`; fails on a
/// loss, a duplicate or a reordering.
async fn expect_in_order(echoes: &mut Subscriber, topics: &[(&str, usize)]) {
    let mut next = vec![0usize; topics.len()];
    while next.iter().zip(topics).any(|(&k, (_, n))| k < *n) {
        let (t, p) = tokio::time::timeout(Duration::from_secs(60), echoes.next())
            .await
            .unwrap_or_else(|_| panic!("stalled at {next:?} of {topics:?}"));
        let Some(i) = topics.iter().position(|(want, _)| t == *want) else {
            continue;
        };
        let got: usize = String::from_utf8(p).unwrap().parse().unwrap();
        assert_eq!(got, next[i], "{}: lost, repeated or reordered", topics[i].0);
        next[i] += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_loses_and_reorders_nothing_while_functions_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let head = header("gw-funcset-stream", "");
    let steady = echo("steady", r#"["steady/#"]"#, "");
    // `moving` is slow (20 ms per event, output on `slow/…`), so its queue
    // holds a backlog whenever its worker is replaced, and its small queue
    // paces the whole intake (both streams last through every change).
    let moving = |extra: &str| {
        let config = if extra.contains("config") {
            ""
        } else {
            "config = { mode = \"slow\" }\n"
        };
        let limits = if extra.contains("limits") {
            ""
        } else {
            "limits = { queue = 5 }\n"
        };
        echo(
            "moving",
            r#"["moving/#"]"#,
            &format!("{config}{limits}{extra}"),
        )
        .replace("publish = [\"echo/#\"]", "publish = [\"slow/#\"]")
    };
    let gw = start(&path, &format!("{head}{steady}{}", moving(""))).await;
    let (host, port) = gw.local_broker();
    let mut echoes = Subscriber::connect(host, port, &["echo/#", "slow/#"]).await;
    let sensor = Publisher::connect(host, port).await;
    let stop = Arc::new(AtomicBool::new(false));
    let flow = tokio::spawn(stream(sensor, stop.clone()));

    // While both streams flow: others come and go, and `moving` gets new
    // queues, a new breaker and new settings (its worker is replaced; the
    // new one must wait for the old one's queue).
    let other = |name: &str, t: &str| echo(name, &format!("[\"{t}/#\"]"), "");
    let steps = [
        format!("{head}{steady}{}{}", moving(""), other("x1", "x1")),
        format!(
            "{head}{steady}{}{}",
            moving("limits = { queue = 3 }"),
            other("x1", "x1b")
        ),
        format!(
            "{head}{steady}{}{}",
            moving("limits = { queue = 50, queue_policy = \"block\" }\nbreaker = { failures = 9 }"),
            other("x2", "x2")
        ),
        format!(
            "{head}{steady}{}{}",
            moving("config = { mode = \"slow\", k = \"v\" }"),
            other("x2", "x2")
        ),
        format!("{head}{steady}{}", moving("limits = { queue = 2 }")),
    ];
    let handled = gw.function_metrics("steady").unwrap();
    for (i, step) in steps.iter().enumerate() {
        // Each change lands while the streams flow.
        let at = handled.snapshot().ok;
        eventually("the stream advances", || handled.snapshot().ok >= at + 10).await;
        let outcome = reload(&gw, &path, step).await;
        let (_, added, removed, updated) = applied(outcome);
        assert!(!updated.contains(&"steady".to_owned()), "step {i}");
        assert!(!added.contains(&"steady".to_owned()) && !removed.contains(&"steady".to_owned()));
    }
    stop.store(true, Ordering::Relaxed);
    let (steady_n, moving_n) = flow.await.unwrap();
    expect_in_order(
        &mut echoes,
        &[("echo/steady/s", steady_n), ("slow/moving/m", moving_n)],
    )
    .await;
    let steady = gw.function_metrics("steady").unwrap().snapshot();
    assert_eq!(steady.ok, steady_n as u64, "{steady:?}");
    assert_eq!(gw.function_names(), ["steady", "moving"]);
    assert!(gw.shutdown(WAIT).await, "drains after the changes");
}

/// The real binary: `SIGHUP` starts a function on a gateway that had none
/// (its trigger is subscribed from an empty set), and `SIGTERM` still
/// drains and exits cleanly afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_starts_a_function_on_a_gateway_that_had_none() {
    use crate::reload::wait_for_line;
    use crate::runtime_cli::run_binary;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let port = free_port();
    let base = format!(
        "[gateway]\nid = \"gw-hup\"\ndata_dir = \"data\"\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n"
    );
    std::fs::write(&path, &base).unwrap();
    let (mut child, lines) = run_binary(&path);
    let mut echoes = Subscriber::connect("127.0.0.1", port, &["echo/#"]).await;
    let mut sensor = Publisher::connect("127.0.0.1", port).await;

    std::fs::write(&path, format!("{base}{}", echo("f", r#"["f/#"]"#, ""))).unwrap();
    signal(&child, "HUP");
    // Both lines, in either order: the subscription may be acknowledged
    // before the reload's own log line.
    let (_, before) = wait_for_line(&lines, &["subscriptions acknowledged", "f/#"]);
    let reloaded =
        |l: &String| l.contains("Configuration reloaded.") && l.contains("added=[\"f\"]");
    if !before.iter().any(reloaded) {
        wait_for_line(&lines, &["Configuration reloaded.", "added=[\"f\"]"]);
    }
    round_trip(&mut sensor, &mut echoes, "f/1", "1").await;

    signal(&child, "TERM");
    let exited = tokio::task::spawn_blocking(move || child.wait());
    let status = tokio::time::timeout(WAIT, exited)
        .await
        .expect("the gateway stops in time")
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// With an external broker (Mosquitto, acknowledgements when handled), a
/// reload moves the subscription over: the removed function's filter is
/// unsubscribed, the added one's subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_follows_on_an_external_broker() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let head = format!(
        "[gateway]\nid = \"gw-funcset-ext\"\ndata_dir = \"data\"\n[broker]\nkind = \"external\"\nurl = \"mqtt://127.0.0.1:{}\"\n",
        broker.port
    );
    let gw = start(&path, &format!("{head}{}", echo("a", r#"["a/#"]"#, ""))).await;
    assert!(gw.wait_subscribed(WAIT).await);
    let mut echoes = Subscriber::connect("127.0.0.1", broker.port, &["echo/#"]).await;
    let mut sensor = Publisher::connect("127.0.0.1", broker.port).await;
    round_trip(&mut sensor, &mut echoes, "a/1", "1").await;

    let next = format!("{head}{}", echo("c", r#"["c/#"]"#, ""));
    let (_, added, removed, _) = applied(reload(&gw, &path, &next).await);
    assert_eq!((added, removed), (vec!["c".into()], vec!["a".into()]));
    assert!(gw.wait_subscribed(WAIT).await, "c/# acknowledged");
    // `a/2` is no longer delivered at all: unsubscribed, it would otherwise
    // reach the gateway before `c/1` (one session, in order) and count as
    // unmatched.
    sensor.publish("a/2", "2").await;
    round_trip(&mut sensor, &mut echoes, "c/1", "1").await;
    assert_eq!(gw.metrics().unmatched.load(Ordering::Relaxed), 0);
    assert_eq!(gw.function_metrics("c").unwrap().snapshot().ok, 1);
    assert!(gw.shutdown(WAIT).await);
}

/// A function removed while its queue still holds a backlog, and added
/// again by the next reload: the new worker waits for the old one to drain
/// (one worker per name), so nothing is reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_removed_and_added_again_never_runs_two_workers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let head = header("gw-funcset-readd", "");
    let steady = echo("steady", r#"["steady/#"]"#, "");
    // 20 ms per event: 100 events are a 2 s backlog.
    let slow = echo(
        "s",
        r#"["s/#"]"#,
        "config = { mode = \"slow\" }\nlimits = { queue = 200 }",
    )
    .replace("publish = [\"echo/#\"]", "publish = [\"slow/#\"]");
    let with_slow = format!("{head}{steady}{slow}");
    let gw = start(&path, &with_slow).await;
    let (host, port) = gw.local_broker();
    let mut echoes = Subscriber::connect(host, port, &["slow/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    for i in 0..100 {
        sensor.publish("s/m", i.to_string()).await;
    }
    let handled = gw.function_metrics("s").unwrap();
    eventually("the slow function has started", || {
        handled.snapshot().ok >= 1
    })
    .await;
    let (_, _, removed, _) = applied(reload(&gw, &path, &format!("{head}{steady}")).await);
    assert_eq!(removed, ["s"]);
    let (_, added, _, _) = applied(reload(&gw, &path, &with_slow).await);
    assert_eq!(added, ["s"]);
    assert!(gw.wait_subscribed(WAIT).await);
    for i in 100..110 {
        sensor.publish("s/m", i.to_string()).await;
    }
    // Events in flight at the removal may be lost; none may be reordered.
    let mut last = None;
    while last != Some(109) {
        let (t, p) = tokio::time::timeout(Duration::from_secs(30), echoes.next())
            .await
            .unwrap_or_else(|_| panic!("stalled after {last:?}"));
        assert_eq!(t, "slow/s/m");
        let n: u32 = String::from_utf8(p).unwrap().parse().unwrap();
        assert!(last.is_none_or(|l| n > l), "{n} after {last:?}: reordered");
        last = Some(n);
    }
    assert!(gw.shutdown(WAIT).await);
}
