//! Store-and-forward: nothing the gateway accepted is lost across cloud
//! outages, `kill -9` and full outboxes; inputs are acknowledged in order.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::*;

/// Events per scenario: small enough for CI, scaled up with
/// `EDGEFN_SOAK_EVENTS` (see the README's soak command).
pub(crate) fn events(ci_default: u64) -> u64 {
    std::env::var("EDGEFN_SOAK_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ci_default)
}

pub(crate) fn enrich_config(header: &str, cloud_port: u16, outbox: &str) -> String {
    format!(
        r#"
{header}
[outbox]
max_commits_per_sec = 50

[[functions]]
name = "enrich"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["cloud"]
# Not a timeout test: a busy 2-core machine must not turn a descheduled
# invocation into a dead letter (which the counts would take for a loss).
limits = {{ timeout_ms = 5000 }}

[[sinks]]
kind = "mqtt"
name = "cloud"
url = "mqtt://127.0.0.1:{cloud_port}"
topic = "cloud/{{gateway}}/{{topic}}"
ack_timeout_s = 5
max_inflight = 50
{outbox}
"#,
        enrich = lit(&guest("enrich")),
    )
}

/// Collects envelopes until every reading `0..n` has arrived; returns
/// reading → set of envelope ids.
async fn collect_all(
    cloud: &mut Subscriber,
    n: u64,
    within: Duration,
) -> BTreeMap<u64, BTreeSet<String>> {
    collect_range(cloud, 0, n, within).await
}

/// [`collect_all`] for readings `from..n`; other readings are ignored.
pub(crate) async fn collect_range(
    cloud: &mut Subscriber,
    from: u64,
    n: u64,
    within: Duration,
) -> BTreeMap<u64, BTreeSet<String>> {
    let mut seen: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    let deadline = Instant::now() + within;
    while (seen.len() as u64) < n - from {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((_, payload)) = cloud.next_within(left).await else {
            let missing: Vec<u64> = (from..n)
                .filter(|i| !seen.contains_key(i))
                .take(20)
                .collect();
            panic!(
                "{} of {} readings arrived; missing (first 20): {missing:?}",
                seen.len(),
                n - from
            );
        };
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let reading = v["payload"]["celsius"].as_f64().unwrap() as u64;
        let id = v["id"].as_str().unwrap().to_owned();
        assert_eq!(
            id,
            format!("{}-{}", v["gateway"].as_str().unwrap(), v["seq"])
        );
        if (from..n).contains(&reading) {
            seen.entry(reading).or_default().insert(id);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_outage_loses_nothing_and_duplicates_keep_their_id() {
    let port = free_port();
    let Some(mut cloud) = Mosquitto::start_persistent(port) else {
        return;
    };
    let mut cloud_sub = persistent_subscriber(port, "cloud-watcher-outage", &["cloud/#"]).await;
    let (gw, _dir) = gateway(&enrich_config(&gateway_header("gw-outage"), port, "")).await;
    let (host, lport) = gw.local_broker();
    let mut sensor = Publisher::connect(host, lport).await;
    let n = events(3000);
    let third = n / 3;
    for i in 0..third {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
            .await;
    }
    cloud.stop();
    for i in third..n {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
            .await;
    }
    // Everything accepted during the outage is in the outbox.
    let stats = gw.outbox().sink_stats("cloud").unwrap();
    eventually("the outage backlog is in the outbox", || {
        stats.rows.load(Ordering::Relaxed) > 0
    })
    .await;
    cloud.restart();
    let seen = collect_all(&mut cloud_sub, n, Duration::from_secs(120)).await;
    for (reading, ids) in &seen {
        assert_eq!(
            ids.len(),
            1,
            "reading {reading} arrived under several ids: {ids:?}"
        );
    }
    eventually("the outbox drains", || {
        stats.rows.load(Ordering::Relaxed) == 0
    })
    .await;
    let delivery = gw.sink_stats("cloud").unwrap();
    assert!(
        delivery.failures.load(Ordering::Relaxed) >= 1,
        "the outage was noticed"
    );
    assert!(gw.shutdown(WAIT).await);
}

fn spawn_gateway(config: &std::path::Path) -> Child {
    Command::new(edgefn_bin())
        .args(["run", "--config"])
        .arg(config)
        .env("EDGEFN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn integrity_ok(db: &std::path::Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let result: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(result, "ok", "outbox integrity after kill -9");
}

/// A persistent Mosquitto (broker and cloud), a subscriber to `cloud/#`,
/// and the `enrich` config of gateway `gw-<name>` on a file.
struct ExternalSetup {
    port: u16,
    _broker: Mosquitto,
    cloud_sub: Subscriber,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

async fn external_setup(name: &str, gateway_extra: &str) -> Option<ExternalSetup> {
    let port = free_port();
    let broker = Mosquitto::start_persistent(port)?;
    let cloud_sub =
        persistent_subscriber(port, &format!("cloud-watcher-{name}"), &["cloud/#"]).await;
    let dir = tempfile::tempdir().unwrap();
    let header = format!(
        "[gateway]\nid = \"gw-{name}\"\ndata_dir = \"data\"\n{gateway_extra}\n[broker]\nkind = \"external\"\nurl = \"mqtt://127.0.0.1:{port}\"\n"
    );
    let config = dir.path().join("edgefn.toml");
    std::fs::write(&config, enrich_config(&header, port, "")).unwrap();
    Some(ExternalSetup {
        port,
        _broker: broker,
        cloud_sub,
        dir,
        config,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_with_sigkill_loses_nothing_mosquitto_accepted() {
    let Some(ExternalSetup {
        port,
        _broker,
        mut cloud_sub,
        dir,
        config,
    }) = external_setup("kill", "").await
    else {
        return;
    };
    let db = dir.path().join("data/outbox.sqlite");

    // A first run creates the gateway's persistent session on Mosquitto:
    // from then on Mosquitto keeps every reading for it. Reading 0 is the
    // probe that shows the session exists.
    let mut child = spawn_gateway(&config);
    let mut probe = Publisher::connect("127.0.0.1", port).await;
    let started = Instant::now();
    loop {
        probe
            .publish("sensors/s1/temperature", r#"{"value": 0}"#)
            .await;
        if cloud_sub
            .next_within(Duration::from_millis(300))
            .await
            .is_some()
        {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the gateway never forwarded the probe"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // Sensors publish to Mosquitto throughout; every PUBACK is a reading
    // Mosquitto accepted.
    let n = events(2000);
    let sensor = tokio::spawn(async move {
        let mut sensor = Publisher::connect("127.0.0.1", port).await;
        for i in 1..=n {
            sensor
                .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
                .await;
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let cycles: u64 = std::env::var("EDGEFN_KILL_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for cycle in 0..cycles {
        let mut child = spawn_gateway(&config);
        // A different kill point each cycle (start-up, mid-stream, commit).
        let after = Duration::from_millis(150 + (cycle * 97) % 700);
        tokio::time::sleep(after).await;
        child.kill().unwrap();
        child.wait().unwrap();
        if db.exists() {
            integrity_ok(&db);
        }
    }
    tokio::time::timeout(Duration::from_secs(120), sensor)
        .await
        .expect("sensor finished")
        .unwrap();
    let mut child = spawn_gateway(&config);
    let seen = collect_range(&mut cloud_sub, 1, n + 1, Duration::from_secs(120)).await;
    assert_eq!(seen.len() as u64, n);
    // A clean stop after all that.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM exit: {status}");
    integrity_ok(&db);
}

/// SIGTERM while sensors publish: systemd hears READY, watchdog pings and
/// STOPPING; the gateway stops intake, finishes and commits what it took,
/// exits 0 within `gateway.shutdown_timeout_s`; after a restart every
/// reading Mosquitto accepted reaches the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_in_time_and_loses_nothing() {
    let timeout_s = 5;
    let Some(ExternalSetup {
        port,
        _broker,
        mut cloud_sub,
        dir,
        config,
    }) = external_setup("term", &format!("shutdown_timeout_s = {timeout_s}\n")).await
    else {
        return;
    };
    let mut notify = NotifySocket::bind(dir.path());
    // stderr "is the journal": the file whose device:inode $JOURNAL_STREAM
    // names, as systemd sets it.
    let log_path = dir.path().join("journal.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let journal_stream = {
        use std::os::unix::fs::MetadataExt;
        let m = log.metadata().unwrap();
        format!("{}:{}", m.dev(), m.ino())
    };
    let mut child = KillOnDrop(
        Command::new(edgefn_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("EDGEFN_LOG", "info")
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "100000")
            .env("JOURNAL_STREAM", journal_stream)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    notify.wait_for("READY=1").await;
    // The watchdog is pinged while the gateway runs (every 50 ms here).
    notify.wait_for("WATCHDOG=1").await;
    notify.wait_for("WATCHDOG=1").await;

    let n = events(3000);
    let (sent_tx, mut sent) = tokio::sync::watch::channel(0u64);
    let sensor = tokio::spawn(async move {
        let mut sensor = Publisher::connect("127.0.0.1", port).await;
        for i in 1..=n {
            sensor
                .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
                .await;
            sent_tx.send_replace(i);
        }
    });
    // Stop in the middle of the stream, with readings in flight.
    sent.wait_for(|&i| i >= n / 3).await.unwrap();
    let stop = Instant::now();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status();
    let seen = notify.wait_for("STOPPING=1").await;
    assert!(
        seen.iter()
            .all(|l| l == "WATCHDOG=1" || l.starts_with("STATUS=")),
        "{seen:?}"
    );
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    let took = stop.elapsed();
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(
        took < Duration::from_secs(timeout_s),
        "stopping took {took:?}, more than shutdown_timeout_s = {timeout_s}"
    );
    integrity_ok(&dir.path().join("data/outbox.sqlite"));
    // Journal lines: a syslog priority prefix, no timestamp of our own.
    let journal = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        journal
            .lines()
            .any(|l| l.starts_with("<6>") && l.contains("Gateway started.")),
        "{journal}"
    );
    assert!(
        journal
            .lines()
            .any(|l| l.starts_with("<6>") && l.contains("Gateway stopped.")),
        "{journal}"
    );
    assert!(
        journal
            .lines()
            .all(|l| l.starts_with('<') && !l.contains("Z ") && !l.contains('\x1b')),
        "{journal}"
    );
    tokio::time::timeout(Duration::from_secs(120), sensor)
        .await
        .expect("sensor finished")
        .unwrap();
    // What the first run did not take is still queued for it on Mosquitto.
    let mut child = KillOnDrop(spawn_gateway(&config));
    let seen = collect_range(&mut cloud_sub, 1, n + 1, Duration::from_secs(120)).await;
    assert_eq!(seen.len() as u64, n);
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status();
    assert!(child.0.wait().unwrap().success());
}

fn order_config(header: &str) -> String {
    format!(
        r#"
{header}
[[functions]]
name = "slow"
component = {misbehave}
triggers = ["order/a/#"]
publish = ["slow/#"]
config = {{ mode = "slow" }}
limits = {{ timeout_ms = 5000 }}

[[functions]]
name = "fast"
component = {misbehave}
triggers = ["order/#"]
publish = ["echo/#"]
limits = {{ timeout_ms = 5000 }}
"#,
        misbehave = lit(&guest("misbehave")),
    )
}

/// Events that finish out of order (a slow function on earlier events) are
/// still acknowledged in order: more events than the broker lets stay
/// unacknowledged all get through, with no disconnect.
async fn acks_in_order(header: &str, broker_port: Option<u16>, n: usize) {
    let (gw, _dir) = gateway(&order_config(header)).await;
    let (host, port) = gw.local_broker();
    let (host, port) = (host.to_owned(), broker_port.unwrap_or(port));
    let mut out = Subscriber::connect(&host, port, &["echo/#", "slow/#"]).await;
    let mut sensor = Publisher::connect(&host, port).await;
    let mut expected = 0;
    for i in 0..n {
        let topic = if i % 10 == 0 {
            format!("order/a/{i}")
        } else {
            format!("order/b/{i}")
        };
        expected += if i % 10 == 0 { 2 } else { 1 };
        sensor.publish(&topic, format!("{i}")).await;
    }
    // Count distinct outputs (every topic is unique): a broker may deliver a
    // QoS 1 message to the test's subscriber twice.
    let mut got = std::collections::HashSet::new();
    while got.len() < expected {
        got.insert(out.next().await.0);
    }
    assert_eq!(
        gw.metrics().source_reconnects.load(Ordering::Relaxed),
        0,
        "no disconnect from a bad ack"
    );
    assert_eq!(gw.function_metrics("fast").unwrap().snapshot().ok, n as u64);
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_receive_order_with_rumqttd() {
    // rumqttd is configured with at most 500 unacknowledged messages.
    acks_in_order(&gateway_header("gw-order"), None, 700).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_receive_order_with_mosquitto() {
    let Some(m) = Mosquitto::start() else { return };
    let header = format!(
        "[gateway]\nid = \"gw-order-m\"\ndata_dir = \"data\"\n\n[broker]\nkind = \"external\"\nurl = \"mqtt://127.0.0.1:{}\"\n",
        m.port
    );
    // Mosquitto lets 20 messages stay unacknowledged per client here.
    acks_in_order(&header, Some(m.port), 200).await;
}

/// A gateway whose cloud is down (nothing listens on its port) and whose
/// outbox holds 5 records under `policy`, after 20 readings arrived.
async fn full_outbox(
    id: &str,
    policy: &str,
) -> (
    edgefn::supervisor::Gateway,
    tempfile::TempDir,
    u16,
    std::sync::Arc<edgefn::outbox::SinkStats>,
) {
    let cloud_port = free_port();
    let outbox = format!("[sinks.outbox]\nmax_rows = 5\nfull_policy = \"{policy}\"\n");
    let (gw, dir) = gateway(&enrich_config(&gateway_header(id), cloud_port, &outbox)).await;
    let (host, port) = gw.local_broker();
    let mut sensor = Publisher::connect(host, port).await;
    for i in 0..20 {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
            .await;
    }
    let stats = gw.outbox().sink_stats("cloud").unwrap();
    (gw, dir, cloud_port, stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_drops_oldest_when_so_configured() {
    let (gw, _dir, cloud_port, stats) = full_outbox("gw-full-drop", "drop_oldest").await;
    eventually("15 oldest dropped", || {
        stats.dropped_full.load(Ordering::Relaxed) == 15
    })
    .await;
    assert_eq!(stats.rows.load(Ordering::Relaxed), 5);
    // The cloud comes up: the 5 newest are delivered.
    let Some(_cloud) = Mosquitto::start_on(cloud_port) else {
        return;
    };
    eventually("the 5 newest delivered", || {
        stats.delivered.load(Ordering::Relaxed) == 5
    })
    .await;
    assert_eq!(stats.rows.load(Ordering::Relaxed), 0);
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_with_refuse_applies_back_pressure_and_loses_nothing() {
    let (gw, _dir, cloud_port, stats) = full_outbox("gw-full-refuse", "refuse").await;
    eventually("new records held back", || {
        stats.refused.load(Ordering::Relaxed) >= 1
    })
    .await;
    assert_eq!(stats.rows.load(Ordering::Relaxed), 5);
    assert_eq!(stats.dropped_full.load(Ordering::Relaxed), 0);
    // The cloud comes up: every reading is delivered, none dropped.
    let Some(_cloud) = Mosquitto::start_on(cloud_port) else {
        return;
    };
    eventually("all 20 delivered", || {
        stats.delivered.load(Ordering::Relaxed) == 20
    })
    .await;
    assert_eq!(stats.appended.load(Ordering::Relaxed), 20);
    assert!(gw.shutdown(WAIT).await);
}
