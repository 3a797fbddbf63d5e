//! How much a `kill -9` of the gateway can lose with the **embedded** broker
//! (rumqttd acknowledges a device's QoS 1 publish on receipt and keeps
//! nothing on disk): a sensor publishes at a steady rate and counts the
//! broker's PUBACKs; the gateway is killed mid-stream and restarted; the
//! readings acknowledged to the sensor but never forwarded to the cloud (a
//! Mosquitto that outlives the gateway) are the loss window.
//!
//! `cargo bench -p edgefn-tests --bench crash_window` (needs the guests,
//! `cargo build -p edgefn` and Mosquitto). Prints the loss per run, in
//! readings and in milliseconds of readings at the achieved rate.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark harness"
)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Target rate; the achieved rate is printed (the loop sleeps 1 ms a reading).
const RATE_PER_S: u64 = 1000;
const RUNS: usize = 5;

#[path = "common/mod.rs"]
mod common;
use common::free_port;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join("target/debug/edgefn");
    let enrich = root.join("target/wasm32-wasip2/guest/enrich.wasm");
    assert!(
        bin.exists() && enrich.exists(),
        "run `cargo xtask functions` and `cargo build -p edgefn` first"
    );
    let dir = tempfile::tempdir().unwrap();
    let cloud_port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(&conf, format!("user root\nlistener {cloud_port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n")).unwrap();
    let mut cloud = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // The cloud watcher.
    let mut opts = MqttOptions::new("crash-window-cloud", "127.0.0.1", cloud_port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    client.subscribe("cloud/#", QoS::AtLeastOnce).await.unwrap();
    let (tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<(String, u64)>();
    tokio::spawn(async move {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = eventloop.poll().await {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                let _ = tx.send((p.topic, v["payload"]["celsius"].as_f64().unwrap() as u64));
            }
        }
    });

    let mut losses = Vec::new();
    for run in 0..RUNS {
        let port = free_port();
        let config = dir.path().join(format!("run{run}.toml"));
        std::fs::write(
            &config,
            format!(
                "[gateway]\nid = \"cw{run}\"\ndata_dir = \"data{run}\"\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n\
                 [[functions]]\nname = \"enrich\"\ncomponent = {:?}\ntriggers = [\"sensors/+/temperature\"]\nsinks = [\"cloud\"]\n\
                 [[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\nurl = \"mqtt://127.0.0.1:{cloud_port}\"\ntopic = \"cloud/{{gateway}}\"\n",
                enrich.display().to_string()
            ),
        )
        .unwrap();
        let spawn = || {
            Command::new(&bin)
                .args(["run", "--config"])
                .arg(&config)
                .env("EDGEFN_LOG", "error")
                .spawn()
                .unwrap()
        };
        let mut gw = spawn();
        // Sensor: steady rate, counts PUBACKs (each = accepted by the broker).
        let mut opts = MqttOptions::new(format!("crash-window-sensor-{run}"), "127.0.0.1", port);
        opts.set_inflight(100);
        let (sensor, mut sensor_loop) = AsyncClient::new(opts, 1000);
        let (ack_tx, mut acks) = tokio::sync::mpsc::unbounded_channel::<u16>();
        let (up_tx, up) = tokio::sync::oneshot::channel::<()>();
        let poller = tokio::spawn(async move {
            let mut up_tx = Some(up_tx);
            loop {
                match sensor_loop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = ack_tx.send(a.pkid);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = up_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    // Before the gateway's broker is up: retry.
                    Err(_) if up_tx.is_some() => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(_) => return,
                }
            }
        });
        up.await.unwrap();
        // Let the gateway finish subscribing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < Duration::from_secs(2) {
            sensor
                .publish(
                    "sensors/s/temperature",
                    QoS::AtLeastOnce,
                    false,
                    format!("{{\"value\": {sent}}}"),
                )
                .await
                .unwrap();
            sent += 1;
            tokio::time::sleep(Duration::from_micros(1_000_000 / RATE_PER_S)).await;
        }
        gw.kill().unwrap();
        gw.wait().unwrap();
        let _ = poller.await;
        let mut acked = 0u64;
        while acks.try_recv().is_ok() {
            acked += 1;
        }
        // rumqttd acks in order: the first `acked` readings were accepted.
        let mut gw = spawn();
        let mut seen = BTreeSet::new();
        let topic = format!("cloud/cw{run}");
        let mut quiet = Duration::from_secs(10); // the restart compiles the function
        while let Ok(Some((t, n))) = tokio::time::timeout(quiet, arrived.recv()).await {
            if t == topic {
                seen.insert(n);
            }
            quiet = Duration::from_secs(2);
        }
        let lost = (0..acked).filter(|n| !seen.contains(n)).count();
        println!(
            "run {run}: sent {sent}, acknowledged by the embedded broker {acked}, lost {lost} ({:.0} ms at {RATE_PER_S}/s)",
            lost as f64 * 1000.0 / RATE_PER_S as f64
        );
        losses.push(lost);
        gw.kill().unwrap();
        gw.wait().unwrap();
    }
    losses.sort();
    println!(
        "embedded-broker crash window: median {} readings, max {} (at {RATE_PER_S} readings/s)",
        losses[losses.len() / 2],
        losses[losses.len() - 1]
    );
    let _ = cloud.kill();
    let _ = cloud.wait();
}
