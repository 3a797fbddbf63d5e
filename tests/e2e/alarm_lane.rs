//! The alarm lane: forwards of a `priority = "high"` function overtake a
//! backlog of normal records waiting for the same sink.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::operations::{get, parse, value};
use crate::support::*;

/// The sink's in-flight window: the alarm must be among the first this many
/// records the cloud receives.
const MAX_INFLIGHT: usize = 20;

fn config(header: &str, cloud_port: u16) -> String {
    format!(
        r#"
{header}
[outbox]
max_commits_per_sec = 50

[[functions]]
name = "readings"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["cloud"]
limits = {{ timeout_ms = 5000 }}

[[functions]]
name = "alarms"
component = {enrich}
triggers = ["alarms/+/temperature"]
sinks = ["cloud"]
priority = "high"
limits = {{ timeout_ms = 5000 }}

[[sinks]]
kind = "mqtt"
name = "cloud"
url = "mqtt://127.0.0.1:{cloud_port}"
topic = "cloud/{{function}}/{{topic}}"
ack_timeout_s = 10
max_inflight = {MAX_INFLIGHT}

[admin]
listen = "127.0.0.1:0"
"#,
        enrich = lit(&guest("enrich")),
    )
}

/// Polls `cond` (a counter) for up to `within`.
async fn until(what: &str, within: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alarm_overtakes_ten_thousand_waiting_records() {
    let port = free_port();
    let Some(mut cloud) = Mosquitto::start_persistent(port) else {
        return;
    };
    // The cloud's subscriber keeps its session (and its queue) while the
    // cloud is down; then the cloud goes down before the gateway starts.
    let mut cloud_sub = persistent_subscriber(port, "alarm-lane-watcher", &["cloud/#"]).await;
    cloud.stop();
    let (gw, _dir) = gateway(&config(&gateway_header("gw-lane"), port)).await;
    let (host, lport) = gw.local_broker();
    let mut sensor = Publisher::connect(host, lport).await;
    let n = 10_000u64;
    for i in 0..n {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
            .await;
    }
    let stored = gw.outbox().sink_stats("cloud").unwrap();
    until(
        "the backlog is in the outbox",
        Duration::from_secs(120),
        || stored.rows.load(Ordering::Relaxed) == n,
    )
    .await;
    sensor
        .publish("alarms/s1/temperature", "{\"value\": 99999}")
        .await;
    until("the alarm is in the outbox", WAIT, || {
        stored.high_rows.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stored.rows.load(Ordering::Relaxed), n + 1);
    let addr = gw.admin_addr().expect("admin configured");
    let metrics = parse(&get(addr, "/metrics", None).await.1);
    let lane = |l: &str| {
        value(
            &metrics,
            &format!(r#"edgefn_outbox_lane_records{{sink="cloud",lane="{l}"}}"#),
        )
    };
    assert_eq!((lane("high"), lane("normal")), (1.0, n as f64));

    cloud.restart();
    // Every record arrives: the alarm among the first window, the readings
    // in the order they were taken.
    let mut alarm_at = None;
    let mut next_reading = 0u64;
    let mut received = 0usize;
    let deadline = Instant::now() + Duration::from_secs(180);
    while alarm_at.is_none() || next_reading < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((topic, payload)) = cloud_sub.next_within(left).await else {
            panic!(
                "{received} records arrived; next reading {next_reading}, alarm at {alarm_at:?}"
            );
        };
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let value = v["payload"]["celsius"].as_f64().unwrap() as u64;
        if topic.starts_with("cloud/alarms/") {
            assert_eq!(value, 99_999);
            alarm_at.get_or_insert(received);
        } else if value == next_reading {
            next_reading += 1;
        } else {
            // A duplicate (at-least-once) may repeat an earlier reading,
            // never skip ahead.
            assert!(
                value < next_reading,
                "reading {value} before {next_reading}"
            );
        }
        received += 1;
    }
    let alarm_at = alarm_at.unwrap();
    assert!(
        alarm_at < MAX_INFLIGHT,
        "the alarm was record {alarm_at} to arrive, after {alarm_at} waiting readings"
    );
    until("the outbox drains", WAIT, || {
        stored.rows.load(Ordering::Relaxed) == 0 && stored.high_rows.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(gw.shutdown(WAIT).await);
}

/// `enrich` with `priority`, forwarding to a sink whose cloud is down (its
/// records stay in the outbox, where their lane can be seen).
fn offline_config(priority: &str, cloud_port: u16) -> String {
    format!(
        "{}\n[[functions]]\nname = \"enrich\"\ncomponent = {}\ntriggers = [\"sensors/+/temperature\"]\nsinks = [\"cloud\"]\npriority = \"{priority}\"\n\n[[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\nurl = \"mqtt://127.0.0.1:{}\"\n",
        gateway_header("gw-lane-reload"),
        lit(&guest("enrich")),
        cloud_port,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_priority_without_a_restart() {
    use edgefn::runtime::reload::ReloadOutcome;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let cloud_port = free_port();
    std::fs::write(&path, offline_config("normal", cloud_port)).unwrap();
    let gw = edgefn::supervisor::Gateway::start(&edgefn::config::load(&path).unwrap())
        .await
        .unwrap();
    let (host, port) = gw.local_broker();
    let mut sensor = Publisher::connect(host, port).await;
    let stored = gw.outbox().sink_stats("cloud").unwrap();
    sensor
        .publish("sensors/s1/temperature", r#"{"value": 1}"#)
        .await;
    eventually("the normal record is stored", || {
        stored.rows.load(Ordering::Relaxed) == 1
    })
    .await;
    assert_eq!(stored.high_rows.load(Ordering::Relaxed), 0);

    std::fs::write(&path, offline_config("high", cloud_port)).unwrap();
    let outcome = gw.reload(edgefn::config::load(&path).unwrap()).await;
    let ReloadOutcome::Applied {
        switched,
        restart_needed,
        ..
    } = outcome
    else {
        panic!("refused: {outcome:?}");
    };
    assert_eq!((switched, restart_needed), (1, vec![]));
    sensor
        .publish("sensors/s1/temperature", r#"{"value": 2}"#)
        .await;
    eventually("the next record is stored in the high lane", || {
        stored.rows.load(Ordering::Relaxed) == 2 && stored.high_rows.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_sink_sends_the_alarm_right_after_the_batch_it_is_retrying() {
    let port = free_port();
    let toml = format!(
        r#"
{header}
[outbox]
max_commits_per_sec = 100

[[functions]]
name = "readings"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["web"]
config = {{ sink = "web" }}

[[functions]]
name = "alarms"
component = {enrich}
triggers = ["alarms/+/temperature"]
sinks = ["web"]
config = {{ sink = "web" }}
priority = "high"

[[sinks]]
kind = "http"
name = "web"
url = "http://127.0.0.1:{port}/ingest"
timeout_ms = 300
max_backoff_ms = 200
batch_max = 10
"#,
        header = gateway_header("gw-lane-http"),
        enrich = lit(&guest("enrich")),
    );
    // Nothing listens yet: the first batch is retried while records queue.
    let (gw, _dir) = gateway(&toml).await;
    let (host, lport) = gw.local_broker();
    let mut sensor = Publisher::connect(host, lport).await;
    for i in 0..50 {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
            .await;
    }
    let stored = gw.outbox().sink_stats("web").unwrap();
    eventually("the readings are in the outbox", || {
        stored.rows.load(Ordering::Relaxed) == 50
    })
    .await;
    sensor
        .publish("alarms/s1/temperature", "{\"value\": 99999}")
        .await;
    eventually("the alarm is in the outbox", || {
        stored.high_rows.load(Ordering::Relaxed) == 1
    })
    .await;

    let mut srv = crate::sinks::server_on(port, Vec::new()).await;
    let mut batches = Vec::new();
    while batches.iter().map(Vec::len).sum::<usize>() < 51 {
        let (body, _, _) = tokio::time::timeout(WAIT, srv.accepted.recv())
            .await
            .unwrap()
            .unwrap();
        let batch: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let batch: Vec<(String, u64)> = batch
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let f = e["function"].as_str().unwrap().to_owned();
                (f, e["payload"]["celsius"].as_f64().unwrap() as u64)
            })
            .collect();
        batches.push(batch);
    }
    // The alarm goes at once: first, or right after the one batch that was
    // already on its way when it came (HTTP sends one batch at a time; a
    // batch still lingering to fill is read again, high lane first). It
    // travels alone, and the readings keep their order around it.
    let alarm_at = batches
        .iter()
        .position(|b| b.iter().any(|(f, _)| f == "alarms"))
        .unwrap();
    assert!(
        alarm_at <= 1,
        "the alarm came in batch {alarm_at}: {batches:?}"
    );
    assert_eq!(
        batches[alarm_at],
        [("alarms".to_owned(), 99_999)],
        "{batches:?}"
    );
    let readings: Vec<u64> = batches
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != alarm_at)
        .flat_map(|(_, b)| b.iter().map(|(_, v)| *v))
        .collect();
    assert_eq!(readings, (0..50).collect::<Vec<_>>());
    assert!(gw.shutdown(WAIT).await);
}
