//! Hostile guests against the limits that cover what Wasm execution alone
//! does not: waits inside WASI (sleep, poll), huge error strings, panics,
//! and floods of log lines and prints.

use std::process::Command;
use std::time::Duration;

use crate::support::*;

const DEAD_LETTERS: &str = "edgefn/deadletter/functions/#";

/// A gateway with a well-behaved `neighbour` and a `hostile` function
/// (200 ms timeout), both the `misbehave` guest.
fn hostile_config(id: &str) -> String {
    format!(
        r#"
{header}
[[functions]]
name = "neighbour"
component = {misbehave}
triggers = ["ok/#"]
publish = ["echo/#"]

[[functions]]
name = "hostile"
component = {misbehave}
triggers = ["hostile/#"]
publish = ["allowed/#"]
breaker = {{ failures = 0 }}
limits = {{ timeout_ms = 200 }}
"#,
        header = gateway_header(id),
        misbehave = lit(&guest("misbehave")),
    )
}

/// The slowest of ten round trips to the neighbour.
async fn neighbour_worst(sensor: &mut Publisher, echoes: &mut Subscriber, tag: &str) -> Duration {
    let times = round_trips(sensor, echoes, 10, tag).await;
    times.into_iter().max().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_in_wasi_end_at_the_deadline_while_a_neighbour_keeps_its_latency() {
    let (gw, _dir) = gateway(&hostile_config("gw-waits")).await;
    let (host, port) = gw.local_broker();
    let mut echoes = Subscriber::connect(host, port, &["echo/#"]).await;
    let mut dead = Subscriber::connect(host, port, &[DEAD_LETTERS]).await;
    let mut reports = Subscriber::connect(host, port, &["allowed/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    let mut attacker = Publisher::connect(host, port).await;
    neighbour_worst(&mut sensor, &mut echoes, "warmup").await;

    // An hour-long sleep, an hour-long poll and a busy loop: each stopped
    // at the 200 ms deadline (plus one 5 ms epoch tick for the loop), with
    // room for scheduling while other tests load the 2-core machine; the
    // hour-long waits would take an hour otherwise.
    for mode in ["sleep", "poll", "loop"] {
        attacker.publish("hostile/x", format!("mode:{mode}")).await;
        let worst = neighbour_worst(&mut sensor, &mut echoes, mode).await;
        let (_, letter) = dead.next_json().await;
        assert_eq!(letter["failure"], "timeout", "{mode}: {letter}");
        assert_eq!(letter["payload"], format!("mode:{mode}"));
        let us = letter["elapsed_us"].as_u64().unwrap();
        assert!((200_000..400_000).contains(&us), "{mode} ran {us} µs");
        assert!(
            worst < Duration::from_millis(100),
            "{mode}: neighbour round trip took {worst:?}"
        );
    }
    // A short sleep inside the deadline still works.
    attacker.publish("hostile/x", "mode:nap").await;
    let (topic, _) = reports.next().await;
    assert_eq!(topic, "allowed/nap");

    assert!(reports.try_next().is_none(), "a cut sleep never went on");
    let m = gw.function_metrics("hostile").unwrap().snapshot();
    assert_eq!((m.timeouts, m.ok, m.dead_lettered), (3, 1, 3), "{m:?}");
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_errors_are_cut_and_panics_say_what_panicked() {
    let toml = hostile_config("gw-errors").replace("timeout_ms = 200", "timeout_ms = 5000");
    let (gw, _dir) = gateway(&toml).await;
    let (host, port) = gw.local_broker();
    let mut dead = Subscriber::connect(host, port, &[DEAD_LETTERS]).await;
    let mut attacker = Publisher::connect(host, port).await;

    // An 8 MiB error string: the dead letter arrives, its reason cut to
    // 4 KiB and saying how much was cut.
    attacker.publish("hostile/x", "mode:err-huge").await;
    let (_, letter) = dead.next_json().await;
    assert_eq!(letter["failure"], "error", "{letter}");
    let reason = letter["reason"].as_str().unwrap();
    // 4 KiB of the guest's text, the failure's prefix and the note.
    assert!(
        reason.len() < 4096 + 100,
        "reason of {} bytes",
        reason.len()
    );
    assert!(
        reason.starts_with("the function returned an error: eee"),
        "{reason}"
    );
    let cut = 8 * 1024 * 1024 - 4096;
    assert!(
        reason.ends_with(&format!("… ({cut} bytes cut)")),
        "{reason}"
    );

    // A panic is named by its message and place, not `unreachable`.
    attacker.publish("hostile/x", "mode:panic").await;
    let (_, letter) = dead.next_json().await;
    assert_eq!(letter["failure"], "trap", "{letter}");
    let reason = letter["reason"].as_str().unwrap();
    assert!(
        reason.contains("panicked at functions/test-guests/src/lib.rs:")
            && reason.ends_with(": boom"),
        "{reason}"
    );
    assert!(gw.shutdown(WAIT).await);
}

/// Runs `edgefn invoke` (the real binary, logging to stderr) on the
/// `hostile` function with `mode`; returns (stdout, stderr).
fn invoke_binary(mode: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edgefn.toml");
    let toml = hostile_config("gw-invoke").replace("timeout_ms = 200", "timeout_ms = 10000");
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(edgefn_bin())
        .args(["invoke", "--config"])
        .arg(&config)
        .args(["hostile", "--topic", "hostile/x", "--payload"])
        .arg(format!("mode:{mode}"))
        .env("RUST_LOG", "info")
        .current_dir(dir.path())
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn guest_logs_and_prints_stay_within_the_log_budget() {
    // 5,000 `log` lines and 5,000 stdout lines in one invocation: the
    // default budget lets 20 lines through, the rest is counted and summed
    // up in one line.
    let (out, err) = invoke_binary("log-flood");
    assert!(out.contains("ok: 1 published"), "{out}\n{err}");
    assert!(err.contains("flood line 0"), "{err}");
    assert!(!err.contains("flood line 20"), "{err}");
    assert!(err.len() < 16 * 1024, "{} bytes of log", err.len());
    assert!(
        err.contains("Guest log lines over the function's log budget were dropped")
            && err.contains("suppressed=99"),
        "{err}"
    );

    // What a guest prints reaches the function's log.
    let (out, err) = invoke_binary("print");
    assert!(out.contains("ok: 1 published"), "{out}\n{err}");
    assert!(err.contains("a line on stdout"), "{err}");
    assert!(err.contains("a line on stderr"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressed_guest_log_lines_are_counted() {
    let (gw, _dir) =
        gateway(&hostile_config("gw-logs").replace("timeout_ms = 200", "timeout_ms = 10000")).await;
    let (host, port) = gw.local_broker();
    let mut reports = Subscriber::connect(host, port, &["allowed/#"]).await;
    let mut attacker = Publisher::connect(host, port).await;
    attacker.publish("hostile/x", "mode:log-flood").await;
    let (topic, _) = reports.next().await;
    assert_eq!(topic, "allowed/logged");
    let m = gw.function_metrics("hostile").unwrap().snapshot();
    // 10,000 lines, 20 written (a line cut at the capture's end may count
    // twice).
    assert!((9_900..=10_000).contains(&m.log_suppressed), "{m:?}");
    assert!(gw.shutdown(WAIT).await);
}
