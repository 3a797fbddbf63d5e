//! Acknowledgement order with an external broker: an event that finishes
//! early (a fast function) is not acknowledged before an earlier one that is
//! still running (a slow function). Mosquitto accepts acks in any order, so
//! the proof is its in-flight window: with `max_inflight_messages 20` it
//! sends no 21st message until the oldest unacknowledged one is acked.

use std::sync::atomic::Ordering;

use crate::support::*;

/// How long the slow event runs: a busy loop ended by its deadline.
const SLOW_MS: u64 = 2000;
/// Fast events published after the slow one: more than Mosquitto's window.
const FAST: usize = 40;
/// Mosquitto's `max_inflight_messages` in the test broker's config.
const WINDOW: usize = 20;

fn config(port: u16) -> String {
    format!(
        r#"
[gateway]
id = "gw-ack-order"
data_dir = "data"

[broker]
kind = "external"
url = "mqtt://127.0.0.1:{port}"

[[functions]]
name = "slow"
component = {misbehave}
triggers = ["order/slow/#"]

[functions.limits]
timeout_ms = {SLOW_MS}

[[functions]]
name = "fast"
component = {misbehave}
triggers = ["order/fast/#"]
publish = ["echo/#"]
"#,
        misbehave = lit(&guest("misbehave")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_event_is_not_acked_before_an_earlier_slow_one() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let (gw, _dir) = gateway(&config(broker.port)).await;
    let mut out = Subscriber::connect(
        "127.0.0.1",
        broker.port,
        &["echo/#", "edgefn/deadletter/functions/slow"],
    )
    .await;
    let mut sensor = Publisher::connect("127.0.0.1", broker.port).await;
    // The slow event loops until its deadline; the fast ones finish at once.
    sensor.publish("order/slow/0", "mode:loop").await;
    for i in 1..=FAST {
        sensor
            .publish(&format!("order/fast/{i}"), format!("{i}"))
            .await;
    }
    // The slow event's dead letter is queued before its ack; every echo of
    // a message Mosquitto sent after that ack comes after it.
    let mut echoes_before = None;
    let mut echoes = std::collections::HashSet::new();
    while echoes_before.is_none() || echoes.len() < FAST {
        let (topic, _) = out.next().await;
        if topic.starts_with("edgefn/deadletter/") {
            echoes_before = Some(echoes.len());
        } else {
            echoes.insert(topic);
        }
    }
    let before = echoes_before.unwrap_or_default();
    assert!(
        before < WINDOW,
        "{before} fast events finished while the slow one ran: they were acknowledged \
         before it (out of receive order), so Mosquitto's window of {WINDOW} never filled"
    );
    assert_eq!(
        gw.metrics().source_reconnects.load(Ordering::Relaxed),
        0,
        "no disconnect"
    );
    assert_eq!(
        gw.function_metrics("fast").unwrap().snapshot().ok,
        FAST as u64
    );
    assert!(gw.shutdown(WAIT).await);
}
