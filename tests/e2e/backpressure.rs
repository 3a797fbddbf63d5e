//! Back-pressure: a long outbox stall under `refuse` holds the MQTT source's
//! intake back without silencing its connection, so the broker never drops
//! it and nothing is redelivered twice; and a broker that sends more than
//! the gateway can hold (Mosquitto 2.0.11 ignores its in-flight window once
//! acks flow) has the rest deferred, not piled up in memory.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;

/// More than the outbox, its append queue and the function's queue hold.
const READINGS: u64 = 6_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_refuse_stall_keeps_the_source_connected() {
    // A broker that sends the gateway every reading unacknowledged (an
    // in-flight window above READINGS), so the stall reaches the source
    // once the outbox (100 rows), its append queue (4,096) and the
    // function's queue (1) are full.
    let Some(broker) = Mosquitto::start_with("max_inflight_messages 10000") else {
        return;
    };
    let cloud_port = free_port();
    // The source's keep-alive is 1 s: Mosquitto drops a connection silent
    // for 1.5 s.
    let toml = format!(
        r#"[gateway]
id = "gw-stall"
data_dir = "data"

[broker]
kind = "external"
url = "mqtt://127.0.0.1:{broker_port}"
keep_alive_s = 1

[outbox]
max_commits_per_sec = 50

[[functions]]
name = "enrich"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["cloud"]
[functions.limits]
queue = 1
timeout_ms = 5000

[[sinks]]
kind = "mqtt"
name = "cloud"
url = "mqtt://127.0.0.1:{cloud_port}"
topic = "cloud/{{gateway}}/{{topic}}"
ack_timeout_s = 5
[sinks.outbox]
max_rows = 100
full_policy = "refuse"
"#,
        broker_port = broker.port,
        enrich = lit(&guest("enrich")),
    );
    let (gw, _dir) = gateway(&toml).await;
    let mut sensor = Publisher::connect("127.0.0.1", broker.port).await;
    for i in 0..READINGS {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
            .await;
    }
    let stats = gw.outbox().sink_stats("cloud").unwrap();
    eventually("the full outbox holds records back", || {
        stats.refused.load(Ordering::Relaxed) >= 1
    })
    .await;
    // The stall itself: five keep-alive periods with the intake held back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(stats.rows.load(Ordering::Relaxed), 100, "still held back");
    // What the gateway took in fits in the outbox, its append queue, the
    // function's queue, the worker and the dispatcher, and the intake's
    // limit (with some slack for appends in flight to the writer); the
    // rest was left with the broker. Without the limit it takes in all.
    let bound = 100 + 4096 + 256 + edgefn::sources::mqtt::MAX_HELD_QOS1 as u64;
    let metrics = gw.metrics();
    let taken = metrics.events_in.load(Ordering::Relaxed);
    assert!(
        taken <= bound,
        "took in {taken} readings, more than {bound}"
    );
    assert_eq!(
        metrics.source_deferred.load(Ordering::Relaxed),
        READINGS - taken,
        "the rest deferred"
    );

    // The cloud comes up: every reading is delivered once.
    let _cloud = edgefn::broker::EmbeddedBroker::start(
        ([127, 0, 0, 1], cloud_port).into(),
        None,
        edgefn::broker::DEFAULT_RETENTION_BYTES,
        std::sync::Arc::default(),
    )
    .expect("cloud broker");
    eventually("every reading delivered", || {
        stats.delivered.load(Ordering::Relaxed) >= READINGS
    })
    .await;
    assert_eq!(
        metrics.source_reconnects.load(Ordering::Relaxed),
        0,
        "the source kept its connection through the stall"
    );
    assert!(
        metrics.source_resyncs.load(Ordering::Relaxed) >= 1,
        "the deferred readings were fetched again"
    );
    assert_eq!(
        gw.function_metrics("enrich")
            .unwrap()
            .snapshot()
            .invocations,
        READINGS,
        "no reading redelivered and handled twice"
    );
    assert_eq!(stats.appended.load(Ordering::Relaxed), READINGS);
    assert!(gw.shutdown(WAIT).await);
}
