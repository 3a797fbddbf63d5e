//! The core pipeline: MQTT in → Wasm function → local publish and forward to
//! a second ("cloud") broker, over rumqttc and Mosquitto's own clients.

use std::process::Command;

use crate::support::*;

fn demo_like(cloud_port: u16, format: &str) -> String {
    format!(
        r#"
{header}
[[functions]]
name = "threshold"
component = {threshold}
triggers = ["sensors/+/temperature"]
publish = ["alerts/#"]
config = {{ limit = "30" }}

[[functions]]
name = "enrich"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["cloud"]

[[functions]]
name = "cbor-decode"
component = {cbor}
triggers = ["raw/+/cbor"]
publish = ["decoded/#"]

[[sinks]]
kind = "mqtt"
name = "cloud"
url = "mqtt://127.0.0.1:{cloud_port}"
topic = "cloud/{{gateway}}/{{topic}}"
format = "{format}"
"#,
        header = gateway_header("gw-test"),
        threshold = lit(&guest("threshold")),
        enrich = lit(&guest("enrich")),
        cbor = lit(&guest("cbor_decode")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reading_raises_alert_and_is_forwarded_to_the_cloud() {
    let (cloud_port, _cloud) = cloud_broker();
    let (gw, _dir) = gateway(&demo_like(cloud_port, "json")).await;
    let (host, port) = gw.local_broker();
    let mut alerts = Subscriber::connect(host, port, &["alerts/#"]).await;
    let mut cloud = Subscriber::connect("127.0.0.1", cloud_port, &["cloud/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;

    sensor
        .publish("sensors/s1/temperature", r#"{"value": 31.5}"#)
        .await;
    let (topic, alert) = alerts.next_json().await;
    assert_eq!(topic, "alerts/s1/temperature");
    assert_eq!(alert["value"], 31.5);
    assert_eq!(alert["sensor"], "s1");

    let (topic, envelope) = cloud.next_json().await;
    assert_eq!(topic, "cloud/gw-test/sensors/s1/temperature");
    assert_eq!(envelope["gateway"], "gw-test");
    assert_eq!(envelope["function"], "enrich");
    assert_eq!(envelope["topic"], "sensors/s1/temperature");
    assert_eq!(envelope["seq"], 1);
    assert!(
        envelope["ts"]
            .as_u64()
            .is_some_and(|ts| ts > 1_600_000_000_000)
    );
    assert_eq!(envelope["payload"]["celsius"], 31.5);
    assert_eq!(envelope["payload"]["gateway"], "gw-test");
    let f = envelope["payload"]["fahrenheit"].as_f64().unwrap();
    assert!((f - 88.7).abs() < 1e-9, "{f}");

    // A cold reading is forwarded but raises no alert: the next alert is the
    // next hot reading's (threshold handles its events in order).
    sensor
        .publish("sensors/s2/temperature", r#"{"value": 25}"#)
        .await;
    sensor
        .publish("sensors/s3/temperature", r#"{"value": 40}"#)
        .await;
    let (topic, alert) = alerts.next_json().await;
    assert_eq!(topic, "alerts/s3/temperature");
    assert_eq!(alert["value"], 40.0);
    let (_, e2) = cloud.next_json().await;
    let (_, e3) = cloud.next_json().await;
    assert_eq!((e2["seq"].as_u64(), e3["seq"].as_u64()), (Some(2), Some(3)));
    assert_eq!(e2["payload"]["celsius"], 25.0);
    assert_eq!(e3["payload"]["celsius"], 40.0);

    let threshold = gw.function_metrics("threshold").unwrap().snapshot();
    assert_eq!(
        (threshold.invocations, threshold.ok, threshold.published),
        (3, 3, 2)
    );
    assert!(gw.shutdown(WAIT).await, "clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_interoperate_with_the_embedded_broker() {
    if !has_mosquitto_clients() {
        skip("mosquitto_pub is not installed (apt-get install mosquitto-clients)");
        return;
    }
    let (cloud_port, _cloud) = cloud_broker();
    let (gw, _dir) = gateway(&demo_like(cloud_port, "json")).await;
    let (host, port) = gw.local_broker();
    let mut alerts = Subscriber::connect(host, port, &["alerts/#"]).await;
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-V",
            "mqttv311",
        ])
        .args([
            "-t",
            "sensors/kitchen/temperature",
            "-m",
            r#"{"value": 35.25}"#,
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let (topic, alert) = alerts.next_json().await;
    assert_eq!(topic, "alerts/kitchen/temperature");
    assert_eq!(alert["value"], 35.25);

    // And mosquitto_sub sees the gateway's output.
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-t",
            "alerts/#",
            "-C",
            "1",
            "-W",
            "15",
            "-q",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // mosquitto_sub has no readiness signal: publish until it has seen one.
    let mut sensor = Publisher::connect(host, port).await;
    let started = std::time::Instant::now();
    let output = loop {
        sensor
            .publish("sensors/hall/temperature", r#"{"value": 31}"#)
            .await;
        if let Some(status) = sub.try_wait().unwrap() {
            assert!(status.success(), "mosquitto_sub failed");
            break sub.wait_with_output().unwrap();
        }
        assert!(started.elapsed() < WAIT, "mosquitto_sub saw no alert");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(line["sensor"], "hall");
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_mosquitto_broker_works_the_same_way() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let toml = format!(
        r#"
[gateway]
id = "gw-ext"

[broker]
kind = "external"
url = "mqtt://127.0.0.1:{port}"

[[functions]]
name = "threshold"
component = {threshold}
triggers = ["sensors/+/temperature"]
publish = ["alerts/#"]
"#,
        port = mosquitto.port,
        threshold = lit(&guest("threshold")),
    );
    let (gw, _dir) = gateway(&toml).await;
    assert_eq!(gw.local_broker(), ("127.0.0.1", mosquitto.port));
    let mut alerts = Subscriber::connect("127.0.0.1", mosquitto.port, &["alerts/#"]).await;
    let mut sensor = Publisher::connect("127.0.0.1", mosquitto.port).await;
    // The gateway's subscription may land a moment after start: publish
    // until the first alert arrives.
    let started = std::time::Instant::now();
    let (topic, alert) = loop {
        sensor
            .publish("sensors/garage/temperature", r#"{"value": 30.5}"#)
            .await;
        match tokio::time::timeout(std::time::Duration::from_millis(200), alerts.next_json()).await
        {
            Ok(m) => break m,
            Err(_) => assert!(started.elapsed() < WAIT, "no alert through Mosquitto"),
        }
    };
    assert_eq!(topic, "alerts/garage/temperature");
    assert_eq!(alert["value"], 30.5);
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cbor_frames_are_decoded_and_cbor_envelopes_carry_bytes() {
    let (cloud_port, _cloud) = cloud_broker();
    let (gw, _dir) = gateway(&demo_like(cloud_port, "cbor")).await;
    let (host, port) = gw.local_broker();
    let mut decoded = Subscriber::connect(host, port, &["decoded/#"]).await;
    let mut cloud = Subscriber::connect("127.0.0.1", cloud_port, &["cloud/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;

    let mut frame = Vec::new();
    ciborium::into_writer(&("s9", 2150i64, 455i64, 3011i64), &mut frame).unwrap();
    sensor.publish("raw/s9/cbor", frame).await;
    let (topic, v) = decoded.next_json().await;
    assert_eq!(topic, "decoded/s9");
    assert_eq!(v["temperature_c"], 21.5);
    assert_eq!(v["humidity_pct"], 45.5);
    assert_eq!(v["battery_v"], 3.011);

    sensor
        .publish("sensors/s1/temperature", r#"{"value": 20}"#)
        .await;
    let (_, envelope) = cloud.next().await;
    let v: ciborium::value::Value = ciborium::from_reader(envelope.as_slice()).unwrap();
    let map = v.as_map().unwrap();
    let get = |k: &str| {
        map.iter()
            .find(|(key, _)| key.as_text() == Some(k))
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(get("function").as_text(), Some("enrich"));
    let inner: serde_json::Value =
        serde_json::from_slice(get("payload").as_bytes().unwrap()).unwrap();
    assert_eq!(inner["celsius"], 20.0);
    assert!(gw.shutdown(WAIT).await);
}
