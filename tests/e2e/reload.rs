//! Configuration reload (`SIGHUP`) tells the truth: a configuration whose
//! functions name a sink the running gateway lacks is refused whole (nothing
//! accepted and then dropped); every change that needs a restart is reported
//! by name at every reload until the restart, against the running
//! configuration.

use std::path::Path;
use std::sync::atomic::Ordering;

use edgefn::config;
use edgefn::runtime::reload::ReloadOutcome;
use edgefn::supervisor::Gateway;

use crate::support::*;

/// `enrich` forwarding to `sink_for`, allowed `sinks`; sink `cloud` (and
/// `cloud2` if `cloud2`) on the cloud broker.
fn enrich_config(cloud_port: u16, sink_for: &str, sinks: &str, cloud2: bool) -> String {
    let sink = |name: &str| {
        format!(
            "[[sinks]]\nkind = \"mqtt\"\nname = \"{name}\"\nurl = \"mqtt://127.0.0.1:{cloud_port}\"\ntopic = \"{name}/{{gateway}}/{{topic}}\"\nbatch_max = 1\n"
        )
    };
    format!(
        "{}\n[[functions]]\nname = \"enrich\"\ncomponent = {}\ntriggers = [\"sensors/+/temperature\"]\nsinks = {sinks}\nconfig = {{ sink = \"{sink_for}\" }}\n\n{}\n{}",
        gateway_header("gw-refuse"),
        lit(&guest("enrich")),
        sink("cloud"),
        if cloud2 {
            sink("cloud2")
        } else {
            String::new()
        },
    )
}

pub(crate) async fn start(path: &Path, toml: &str) -> Gateway {
    std::fs::write(path, toml).unwrap();
    Gateway::start(&config::load(path).unwrap()).await.unwrap()
}

pub(crate) async fn reload(gw: &Gateway, path: &Path, toml: &str) -> ReloadOutcome {
    std::fs::write(path, toml).unwrap();
    gw.reload(config::load(path).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_pointing_a_function_at_a_sink_that_is_not_running_is_refused() {
    let (cloud_port, _cloud) = cloud_broker();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let gw = start(
        &path,
        &enrich_config(cloud_port, "cloud", r#"["cloud"]"#, false),
    )
    .await;
    let (host, port) = gw.local_broker();
    let mut cloud = Subscriber::connect("127.0.0.1", cloud_port, &["cloud/#", "cloud2/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    sensor
        .publish("sensors/s1/temperature", r#"{"value": 1}"#)
        .await;
    assert!(cloud.next().await.0.starts_with("cloud/gw-refuse/"));

    // Add sink `cloud2` and point the function at it: the function would
    // switch to the new allowlist at once, but `cloud2` is not running, so
    // its forwards would be acknowledged and then dropped.
    let outcome = reload(
        &gw,
        &path,
        &enrich_config(cloud_port, "cloud2", r#"["cloud", "cloud2"]"#, true),
    )
    .await;
    let ReloadOutcome::Refused(problems) = outcome else {
        panic!("applied: {outcome:?}");
    };
    assert_eq!(
        problems,
        ["functions.enrich: sink `cloud2` is not running (sinks are added at a restart)"]
    );
    assert_eq!(gw.metrics().reloads_refused.load(Ordering::Relaxed), 1);

    // Nothing was applied: the function keeps its settings and the next
    // reading still reaches `cloud`.
    sensor
        .publish("sensors/s1/temperature", r#"{"value": 2}"#)
        .await;
    let (topic, envelope) = cloud.next_json().await;
    assert!(topic.starts_with("cloud/gw-refuse/"), "{topic}");
    assert_eq!(envelope["payload"]["celsius"], 2.0, "{envelope}");
    let counts = gw.function_metrics("enrich").unwrap().snapshot();
    assert_eq!((counts.reloads, counts.forwarded), (0, 2), "{counts:?}");
    assert!(gw.shutdown(WAIT).await);
}

/// `threshold` with `limit`, an HTTP sink at `url`, the embedded broker on
/// `listen`.
fn threshold_config(listen: &str, url: &str, limit: u32) -> String {
    format!(
        "[gateway]\nid = \"gw-restart\"\ndata_dir = \"data\"\n[broker]\nkind = \"embedded\"\nlisten = \"{listen}\"\n\n[[functions]]\nname = \"threshold\"\ncomponent = {}\ntriggers = [\"sensors/+/temperature\"]\npublish = [\"alerts/#\"]\nconfig = {{ limit = \"{limit}\" }}\n\n[[sinks]]\nkind = \"http\"\nname = \"cloud\"\nurl = \"{url}\"\n",
        lit(&guest("threshold"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_needs_a_restart_is_reported_at_every_reload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let gw = start(
        &path,
        &threshold_config(&listen, "http://127.0.0.1:9/a", 30),
    )
    .await;
    let mut alerts = Subscriber::connect("127.0.0.1", port, &["alerts/#"]).await;
    let mut sensor = Publisher::connect("127.0.0.1", port).await;

    // A new broker address and sink URL (restart) with a new limit (live).
    let changed = threshold_config(
        &format!("127.0.0.1:{}", free_port()),
        "http://127.0.0.1:9/b",
        50,
    );
    let needs_restart = |outcome: &ReloadOutcome| match outcome {
        ReloadOutcome::Applied { restart_needed, .. } => restart_needed
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ReloadOutcome::Refused(p) => panic!("refused: {p:?}"),
    };
    let first = reload(&gw, &path, &changed).await;
    assert_eq!(
        needs_restart(&first),
        ["broker.listen changed", "sinks.cloud.url changed"]
    );
    assert!(matches!(first, ReloadOutcome::Applied { switched: 1, .. }));
    // The running configuration stays the baseline: the second reload of
    // the same file still reports both.
    let second = reload(&gw, &path, &changed).await;
    assert_eq!(
        needs_restart(&second),
        ["broker.listen changed", "sinks.cloud.url changed"]
    );
    assert!(matches!(second, ReloadOutcome::Applied { switched: 0, .. }));
    let m = gw.metrics();
    assert_eq!(
        (
            m.reloads_applied.load(Ordering::Relaxed),
            m.restart_pending.load(Ordering::Relaxed)
        ),
        (2, 2)
    );

    // The live change is in effect, on the broker that still runs.
    sensor
        .publish("sensors/a/temperature", r#"{"value": 45}"#)
        .await;
    sensor
        .publish("sensors/a/temperature", r#"{"value": 60}"#)
        .await;
    let (_, alert) = alerts.next_json().await;
    assert_eq!(
        (alert["value"].as_f64(), alert["limit"].as_f64()),
        (Some(60.0), Some(50.0))
    );
    assert!(gw.shutdown(WAIT).await);
}

/// Waits (up to [`WAIT`]) for a line containing every one of `parts`;
/// returns the lines before it too.
pub(crate) fn wait_for_line(
    lines: &std::sync::mpsc::Receiver<String>,
    parts: &[&str],
) -> (String, Vec<String>) {
    let deadline = std::time::Instant::now() + WAIT;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line with {parts:?} after {before:?}"));
        if parts.iter().all(|p| line.contains(p)) {
            return (line, before);
        }
        before.push(line);
    }
}

/// The real binary: a `[broker]` change is logged by name at the first and
/// the second `SIGHUP`; an invalid file and a refused one are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_names_what_needs_a_restart_every_time_and_counts_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let (port, admin) = (free_port(), free_port());
    let admin_table = format!("\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n");
    let toml = |listen: u16, sinks: &str| {
        threshold_config(&format!("127.0.0.1:{listen}"), "http://127.0.0.1:9/a", 30)
            .replace("publish = [", &format!("sinks = {sinks}\npublish = ["))
            + &admin_table
    };
    std::fs::write(&path, toml(port, "[]")).unwrap();
    let (mut child, lines) = crate::runtime_cli::run_binary(&path);

    let moved = free_port();
    std::fs::write(&path, toml(moved, "[]")).unwrap();
    for _ in 0..2 {
        signal(&child, "HUP");
        let (_, before) = wait_for_line(&lines, &["Configuration reloaded.", "restart_pending=1"]);
        assert!(
            before.iter().any(
                |l| l.contains("Reload: change needs a restart; not applied.")
                    && l.contains("section=broker")
                    && l.contains("key=listen change=changed")
            ),
            "{before:?}"
        );
    }
    // A new sink and the function pointed at it: refused.
    let cloud2 =
        "\n[[sinks]]\nkind = \"http\"\nname = \"cloud2\"\nurl = \"http://127.0.0.1:9/c\"\n";
    std::fs::write(&path, toml(moved, "[\"cloud2\"]") + cloud2).unwrap();
    signal(&child, "HUP");
    wait_for_line(&lines, &["Reload refused; nothing was changed.", "cloud2"]);
    std::fs::write(&path, "[gateway]\nid = ").unwrap();
    signal(&child, "HUP");
    wait_for_line(&lines, &["The new configuration is invalid"]);

    let metrics = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "edgefn_reloads_total{result=\"applied\"} 2",
        "edgefn_reloads_total{result=\"refused\"} 1",
        "edgefn_reloads_total{result=\"failed\"} 1",
        "edgefn_reload_restart_pending 1",
    ] {
        assert!(metrics.lines().any(|l| l == want), "{want}\n{metrics}");
    }
    let _ = child.kill();
    let _ = child.wait();
}
