//! How long an alarm (`priority = "high"`) takes to reach the cloud while
//! 100,000 normal records wait for the same sink.
//!
//! `cargo bench -p edgefn-tests --bench alarm_lane` (needs the guests built:
//! `cargo xtask functions`, and `/usr/sbin/mosquitto`). Each run starts a
//! gateway whose outbox already holds `EDGEFN_BENCH_BACKLOG` (default
//! 100,000) normal records and one alarm, with a Mosquitto cloud up (the
//! state after an outage, or a restart during one), then measures:
//!
//! 1. **connect → alarm**: from the sink's TCP connection (accepted by a
//!    small proxy in front of Mosquitto, which notes the instant) to the
//!    stored alarm arriving at a cloud subscriber (MQTT handshake, outbox
//!    read and publish included), and whether it was the first record the
//!    cloud received;
//! 2. **publish → alarm, backlog draining**: an alarm reading published to
//!    the local broker (through the `enrich` function, the outbox commit and
//!    the sink's full in-flight window) until it arrives at the cloud,
//!    `EDGEFN_BENCH_ALARMS` (default 20) times per run while the backlog
//!    drains.
//!
//! `EDGEFN_BENCH_RUNS` (default 5) runs; median and p99 over all samples.
//! The subscriber listens to the alarm topic only, so Mosquitto's queue for
//! it never holds normal records (that would measure the subscriber).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark harness"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use edgefn::outbox::{Lane, NewRecord, Outbox, OutboxConfig, SinkLimits};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

#[path = "common/mod.rs"]
mod common;
use common::env_or;

fn enrich_wasm() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let wasm = dir.join("wasm32-wasip2/guest/enrich.wasm");
    assert!(
        wasm.exists(),
        "build the guests first: cargo xtask functions"
    );
    wasm
}

/// A throw-away Mosquitto on `port`, killed on drop.
struct Cloud {
    child: Child,
    /// Holds its configuration file.
    _dir: tempfile::TempDir,
}

impl Cloud {
    fn start(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        std::fs::write(
            &conf,
            format!(
                "{}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n",
                if root { "user root\n" } else { "" }
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("/usr/sbin/mosquitto runs");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, _dir: dir }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy to `to` on a free port: returns the port and the instant it
/// accepted its first connection.
async fn proxy(to: u16) -> (u16, tokio::sync::oneshot::Receiver<Instant>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut first = Some(tx);
        while let Ok((mut inbound, _)) = listener.accept().await {
            if let Some(tx) = first.take() {
                let _ = tx.send(Instant::now());
            }
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, rx)
}

/// A client on `port` subscribed to `filter`: arrival instants and payloads.
async fn subscribe(
    port: u16,
    id: &str,
    filter: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<(Instant, Vec<u8>)>) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((Instant::now(), p.payload.to_vec()));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send((Instant::now(), Vec::new()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _suback = rx.recv().await.unwrap();
    (client, rx)
}

/// Fills the outbox of `data_dir` with `backlog` normal records, then one
/// alarm, as a gateway cut off from its cloud would have.
async fn fill_outbox(data_dir: &Path, backlog: u64) {
    std::fs::create_dir_all(data_dir).unwrap();
    let outbox = Outbox::open(OutboxConfig {
        path: data_dir.join("outbox.sqlite"),
        max_commits_per_sec: 20,
        sinks: vec![SinkLimits {
            sink: "cloud".into(),
            max_rows: 1_000_000,
            max_bytes: 1 << 30,
            ttl: Duration::from_secs(7 * 24 * 3600),
            policy: edgefn::outbox::FullPolicy::Refuse,
        }],
    })
    .unwrap();
    let record = |function: &str, lane: Lane, i: u64| {
        NewRecord {
        sink: "cloud".into(),
        function: function.into(),
        topic: "sensors/s1/temperature".into(),
        payload: format!(
            "{{\"sensor\":\"s1\",\"celsius\":{i},\"fahrenheit\":0,\"kelvin\":0,\"gateway\":\"bench\"}}"
        )
        .into(),
        ts_ms: edgefn::event::now_ms(),
        lane,
    }
    };
    for chunk in 0..backlog.div_ceil(1000) {
        let records = (chunk * 1000..((chunk + 1) * 1000).min(backlog))
            .map(|i| record("readings", Lane::Normal, i))
            .collect();
        outbox.append(records, None).await.unwrap();
    }
    outbox
        .append(vec![record("alarms", Lane::High, 99_999)], None)
        .await
        .unwrap();
    outbox.flush().await;
}

fn config(dir: &Path, cloud_port: u16) -> edgefn::config::ValidConfig {
    let path = dir.join("edgefn.toml");
    std::fs::write(
        &path,
        format!(
            r#"[gateway]
id = "bench"
data_dir = "data"

[broker]
kind = "embedded"
listen = "127.0.0.1:0"

[[functions]]
name = "alarms"
component = {:?}
triggers = ["alarms/+/temperature"]
sinks = ["cloud"]
priority = "high"

[[sinks]]
kind = "mqtt"
name = "cloud"
url = "mqtt://127.0.0.1:{cloud_port}"
topic = "cloud/{{function}}/{{topic}}"
"#,
            enrich_wasm().display().to_string()
        ),
    )
    .unwrap();
    edgefn::config::load(&path).unwrap()
}

struct Samples {
    connect_to_alarm: Vec<Duration>,
    first_is_alarm: usize,
    /// The fewest normal records waiting when an alarm was published.
    min_waiting: u64,
    publish_to_alarm: Vec<Duration>,
    drain_per_s: Vec<f64>,
}

async fn run(run: usize, backlog: u64, alarms: usize, s: &mut Samples) {
    let dir = tempfile::tempdir().unwrap();
    fill_outbox(&dir.path().join("data"), backlog).await;
    let cloud_port = common::free_port();
    let _cloud = Cloud::start(cloud_port);
    let (_sub, mut rx) =
        subscribe(cloud_port, &format!("bench-cloud-{run}"), "cloud/alarms/#").await;
    // A second subscriber sees whatever arrives first, then leaves.
    let (all, mut all_rx) = subscribe(cloud_port, &format!("bench-all-{run}"), "cloud/#").await;
    let (via, connected) = proxy(cloud_port).await;
    let config = config(dir.path(), via);
    let gw = edgefn::supervisor::Gateway::start(&config).await.unwrap();
    let delivery = gw.sink_stats("cloud").unwrap().clone();
    let (arrived, _) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the stored alarm arrives")
        .unwrap();
    let connected = connected.await.unwrap();
    s.connect_to_alarm.push(arrived - connected);
    let (_, first) = all_rx.recv().await.unwrap();
    let first: serde_json::Value = serde_json::from_slice(&first).unwrap();
    s.first_is_alarm += usize::from(first["function"] == "alarms");
    all.disconnect().await.unwrap();

    let (host, port) = gw.local_broker();
    let (local, mut local_loop) = AsyncClient::new(
        MqttOptions::new(format!("bench-sensor-{run}"), host, port),
        100,
    );
    tokio::spawn(async move { while local_loop.poll().await.is_ok() {} });
    let stored = gw.outbox().sink_stats("cloud").unwrap();
    let (delivered_before, t_before) = (delivery.delivered.load(Ordering::Relaxed), Instant::now());
    for i in 0..alarms {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiting = stored.rows.load(Ordering::Relaxed);
        assert!(
            waiting > 1000,
            "the backlog drained before sample {i}: lower EDGEFN_BENCH_ALARMS"
        );
        s.min_waiting = s.min_waiting.min(waiting);
        let sent = Instant::now();
        local
            .publish(
                "alarms/s1/temperature",
                QoS::AtLeastOnce,
                false,
                "{\"value\": 99}",
            )
            .await
            .unwrap();
        let (arrived, _) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("a published alarm arrives")
            .unwrap();
        s.publish_to_alarm.push(arrived - sent);
    }
    let drained = delivery.delivered.load(Ordering::Relaxed) - delivered_before;
    s.drain_per_s
        .push(drained as f64 / t_before.elapsed().as_secs_f64());
    gw.shutdown(Duration::from_secs(10)).await;
}

fn report(what: &str, samples: &mut [Duration]) {
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99).div_ceil(100) - 1];
    println!(
        "{what}: n={} median={median:.1?} p99={p99:.1?} max={:.1?}",
        samples.len(),
        samples[samples.len() - 1]
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = env_or("EDGEFN_BENCH_RUNS", 5);
    let backlog: u64 = env_or("EDGEFN_BENCH_BACKLOG", 100_000);
    let alarms: usize = env_or("EDGEFN_BENCH_ALARMS", 20);
    let mut s = Samples {
        connect_to_alarm: Vec::new(),
        first_is_alarm: 0,
        min_waiting: u64::MAX,
        publish_to_alarm: Vec::new(),
        drain_per_s: Vec::new(),
    };
    for r in 0..runs {
        run(r, backlog, alarms, &mut s).await;
    }
    println!(
        "alarm lane, {backlog} normal records waiting, {runs} runs, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    report(
        "sink TCP connect -> stored alarm at the cloud",
        &mut s.connect_to_alarm,
    );
    println!(
        "runs where the alarm was the first record at the cloud: {}/{runs}",
        s.first_is_alarm
    );
    report(
        "alarm published -> at the cloud, backlog draining",
        &mut s.publish_to_alarm,
    );
    println!(
        "fewest normal records waiting at a publish: {}",
        s.min_waiting
    );
    let rates: Vec<String> = s.drain_per_s.iter().map(|r| format!("{r:.0}")).collect();
    println!(
        "backlog drain rate meanwhile (records/s): {}",
        rates.join(", ")
    );
}
