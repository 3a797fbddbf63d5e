//! Latency from `mosquitto_pub` of a hot reading to the alert arriving at a
//! subscriber, through the embedded broker and the `threshold` function.
//!
//! `cargo bench -p edgefn-tests --bench alert_latency` (needs the guests
//! built: `cargo xtask functions`, and mosquitto-clients). Prints the median
//! and p99 of 100 samples. Each sample includes starting the mosquitto_pub
//! process, as a user would experience it; the in-gateway part is reported
//! separately as the time from the gateway receiving the reading
//! (`received_at_ms` in the alert) to the alert arriving.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark harness"
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const SAMPLES: usize = 100;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let wasm = root.join("target/wasm32-wasip2/guest/threshold.wasm");
    assert!(
        wasm.exists(),
        "build the guests first: cargo xtask functions"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("edgefn.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"bench\"\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:0\"\n[[functions]]\nname = \"threshold\"\ncomponent = {:?}\ntriggers = [\"sensors/+/temperature\"]\npublish = [\"alerts/#\"]\n",
            wasm.display().to_string()
        ),
    )
    .unwrap();
    let config = edgefn::config::load(&cfg).unwrap();
    let gw = edgefn::supervisor::Gateway::start(&config).await.unwrap();
    let (host, port) = gw.local_broker();
    let (host, port) = (host.to_owned(), port);

    let mut opts = MqttOptions::new("bench-sub", host.clone(), port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client
        .subscribe("alerts/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((Instant::now(), now_ms(), p.payload.to_vec()));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send((Instant::now(), 0, Vec::new()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _suback = rx.recv().await.unwrap();

    let mut end_to_end = Vec::with_capacity(SAMPLES);
    let mut in_gateway = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let started = Instant::now();
        let status = Command::new("mosquitto_pub")
            .args(["-h", &host, "-p", &port.to_string(), "-q", "1"])
            .args([
                "-t",
                &format!("sensors/b{i}/temperature"),
                "-m",
                "{\"value\": 40}",
            ])
            .status()
            .expect("mosquitto_pub runs");
        assert!(status.success());
        let (arrived, arrived_ms, payload) =
            tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("alert in time")
                .unwrap();
        end_to_end.push(arrived - started);
        let alert: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let received = alert["received_at_ms"].as_u64().unwrap();
        in_gateway.push(Duration::from_millis(arrived_ms.saturating_sub(received)));
    }
    report("mosquitto_pub start → alert received", &mut end_to_end);
    report(
        "gateway receive → alert received (ms resolution)",
        &mut in_gateway,
    );
    gw.shutdown(Duration::from_secs(5)).await;
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99).div_ceil(100) - 1];
    println!(
        "{what}: n={} median={median:?} p99={p99:?} max={:?}",
        samples.len(),
        samples[samples.len() - 1]
    );
}
