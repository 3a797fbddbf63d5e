//! Bad input of every kind: payloads a function cannot parse, guests that
//! trap, loop, hog memory or call outside their allowlist. Each is counted
//! and logged, and the gateway keeps serving the next event.

use crate::support::*;

fn misbehave_config(extra_limits: &str) -> String {
    format!(
        r#"
{header}
[[functions]]
name = "threshold"
component = {threshold}
triggers = ["sensors/+/temperature"]
publish = ["alerts/#"]

[[functions]]
name = "misbehave"
component = {misbehave}
triggers = ["misc/#"]
publish = ["allowed/#", "echo/#"]

[functions.limits]
timeout_ms = 100
memory_mib = 16
{extra_limits}
"#,
        header = gateway_header("gw-bad"),
        threshold = lit(&guest("threshold")),
        misbehave = lit(&guest("misbehave")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_payload_is_counted_and_the_next_reading_still_works() {
    let (gw, _dir) = gateway(&misbehave_config("")).await;
    let (host, port) = gw.local_broker();
    let mut alerts = Subscriber::connect(host, port, &["alerts/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    sensor
        .publish("sensors/s1/temperature", "not json at all")
        .await;
    sensor
        .publish("sensors/s1/temperature", [0xff, 0x00, 0xfe])
        .await;
    sensor
        .publish("sensors/s1/temperature", r#"{"value": "hot"}"#)
        .await;
    sensor
        .publish("sensors/s1/temperature", r#"{"value": 45}"#)
        .await;
    let (topic, alert) = alerts.next_json().await;
    assert_eq!(topic, "alerts/s1/temperature");
    assert_eq!(alert["value"], 45.0);
    let m = gw.function_metrics("threshold").unwrap().snapshot();
    assert_eq!((m.invocations, m.errors, m.ok), (4, 3, 1));
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_timeout_and_memory_hog_are_contained() {
    let (gw, _dir) = gateway(&misbehave_config("")).await;
    let (host, port) = gw.local_broker();
    let mut out = Subscriber::connect(host, port, &["echo/#", "allowed/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    for mode in ["mode:trap", "mode:loop", "mode:alloc", "mode:error"] {
        sensor.publish("misc/x", mode).await;
    }
    sensor.publish("misc/x", "still alive").await;
    // One queue, handled in order: the echo comes after all four failures.
    let (topic, payload) = out.next().await;
    assert_eq!(topic, "echo/misc/x");
    assert_eq!(payload, b"still alive");
    let m = gw.function_metrics("misbehave").unwrap().snapshot();
    assert_eq!(m.traps, 1, "{m:?}");
    assert_eq!(m.timeouts, 1, "{m:?}");
    assert_eq!(m.memory, 1, "{m:?}");
    assert_eq!(m.errors, 1, "{m:?}");
    assert_eq!((m.invocations, m.ok), (5, 1), "{m:?}");
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_outside_the_allowlist_is_denied_and_never_reaches_the_broker() {
    let (gw, _dir) = gateway(&misbehave_config("")).await;
    let (host, port) = gw.local_broker();
    let mut out = Subscriber::connect(host, port, &["forbidden/#", "allowed/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    sensor.publish("misc/x", "mode:publish-denied").await;
    // The guest reports the refusal on allowed/denied, after its denied
    // publish: had that reached the broker, it would arrive first.
    let (topic, payload) = out.next().await;
    assert_eq!(topic, "allowed/denied");
    let text = String::from_utf8(payload).unwrap();
    assert!(
        text.starts_with("denied: publishing on `forbidden/topic` is not allowed"),
        "{text}"
    );

    sensor.publish("misc/x", "mode:forward-denied").await;
    let (topic, payload) = out.next().await;
    assert_eq!(topic, "allowed/denied");
    let text = String::from_utf8(payload).unwrap();
    assert!(
        text.starts_with("denied: forwarding to sink `not-my-sink` is not allowed"),
        "{text}"
    );
    let m = gw.function_metrics("misbehave").unwrap().snapshot();
    assert_eq!((m.denied, m.ok, m.published), (2, 2, 2), "{m:?}");
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_invocations_emit_nothing_and_call_limits_hold() {
    let (gw, _dir) = gateway(&misbehave_config("max_calls = 5")).await;
    let (host, port) = gw.local_broker();
    let mut out = Subscriber::connect(host, port, &["echo/#", "allowed/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    // `partial` publishes then fails; `flood` publishes until the call limit
    // stops it, then fails. Neither may emit anything: the first message
    // out is the echo that follows them.
    sensor.publish("misc/x", "mode:partial").await;
    sensor.publish("misc/x", "mode:flood").await;
    sensor.publish("misc/x", "after").await;
    let (topic, payload) = out.next().await;
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("echo/misc/x", &b"after"[..])
    );
    let m = gw.function_metrics("misbehave").unwrap().snapshot();
    // The flood's failure is named after the refusal that ended it.
    assert_eq!(
        (m.errors, m.quota_failures, m.over_limit, m.published),
        (1, 1, 1, 1),
        "{m:?}"
    );
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cbor_frames_are_errors_not_crashes() {
    let toml = format!(
        "{}\n[[functions]]\nname = \"cbor-decode\"\ncomponent = {}\ntriggers = [\"raw/+/cbor\"]\npublish = [\"decoded/#\"]\n",
        gateway_header("gw-cbor"),
        lit(&guest("cbor_decode")),
    );
    let (gw, _dir) = gateway(&toml).await;
    let (host, port) = gw.local_broker();
    let mut decoded = Subscriber::connect(host, port, &["decoded/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    let hostile: Vec<Vec<u8>> = vec![
        // An array claiming 2^64-1 elements.
        vec![0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        // A byte string claiming 4 GiB.
        vec![0x84, 0x5a, 0xff, 0xff, 0xff, 0xff, 0x00],
        // 5,000 nested arrays (the SDK stops at 64).
        vec![0x81; 5_000],
        // Truncated, and plain garbage.
        vec![0x84, 0x62, b's'],
        b"\xff\xfe not cbor".to_vec(),
    ];
    for frame in &hostile {
        sensor.publish("raw/x/cbor", frame.clone()).await;
    }
    let mut good = Vec::new();
    ciborium::into_writer(&("ok", 2000i64, 500i64, 3000i64), &mut good).unwrap();
    sensor.publish("raw/ok/cbor", good).await;
    let (topic, v) = decoded.next_json().await;
    assert_eq!(topic, "decoded/ok");
    assert_eq!(v["temperature_c"], 20.0);
    let m = gw.function_metrics("cbor-decode").unwrap().snapshot();
    assert_eq!(
        m.errors,
        hostile.len() as u64,
        "each hostile frame is a handled error: {m:?}"
    );
    assert_eq!((m.traps, m.memory, m.ok), (0, 0, 1), "{m:?}");
    assert!(gw.shutdown(WAIT).await);
}
