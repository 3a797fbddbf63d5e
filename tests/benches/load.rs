//! The end-to-end load benchmark: the whole pipeline on one machine, the
//! gateway as its own process (the release `edgefn` binary, so its CPU time
//! and memory are its own), sensors and receivers as real MQTT clients.
//!
//! `cargo bench -p edgefn-tests --bench load` (builds the release binary and
//! needs the guests, `cargo xtask functions`, and `mosquitto`). Environment:
//! `EDGEFN_LOAD_EVENTS` (default 200000 per throughput phase),
//! `EDGEFN_LOAD_SENSORS` (default 4), `EDGEFN_LOAD_RATE` (default 5000 events/s
//! for the latency phase), `EDGEFN_LOAD_SECONDS` (default 10).
//!
//! Phases, each printed as it finishes:
//! 1. raw broker passthrough: sensors → Mosquitto → receiver (the ceiling);
//! 2. MQTT → function → MQTT against that Mosquitto (`threshold`, every
//!    reading alerts), as fast as possible: events/s with nothing lost, CPU
//!    seconds of the gateway per 1,000 events, its peak RSS (and the steady
//!    rate right after the flood);
//! 3. the same path at a steady rate on a fresh gateway: latency p50/p99/max
//!    sensor → receiver;
//! 4. durable path: sensors → embedded broker → `enrich` → SQLite outbox →
//!    MQTT sink → a second Mosquitto (the cloud) → receiver: events/s with
//!    nothing lost, latency, CPU, peak RSS;
//! 5. idle RSS with 10 functions loaded; 6. the release binary's size;
//! 7. (only when asked for: `EDGEFN_LOAD_PHASES=7`) the soak: the demo at
//!    a steady 500 readings/s, its RSS sampled over time (see `load/soak.rs`
//!    for its parameters, e.g. `EDGEFN_SOAK_SECONDS=3600`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark harness"
)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn guest(name: &str) -> String {
    let p = target_dir().join(format!("wasm32-wasip2/guest/{name}.wasm"));
    assert!(p.exists(), "build the guests first: cargo xtask functions");
    format!("{:?}", p.display().to_string())
}

#[path = "common/mod.rs"]
mod common;
use common::env_or;
use common::free_port;

#[path = "load/soak.rs"]
mod soak;

fn wait_port(port: u16) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Mosquitto tuned not to be the bottleneck by configuration: no queue
/// limit, a deep in-flight window, no persistence.
fn mosquitto(dir: &Path, port: u16) -> Proc {
    let conf = dir.join(format!("mosquitto-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 1000\nlog_dest none\n"
        ),
    )
    .unwrap();
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto is installed (apt-get install mosquitto)");
    wait_port(port);
    Proc(child)
}

/// The release gateway, started from `toml`; returns once it logged that it
/// started.
fn gateway(dir: &Path, name: &str, toml: &str) -> Proc {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, toml).unwrap();
    start_gateway(&cfg, &[])
}

/// The release gateway on the config file `cfg`, with `env` added to its
/// environment; returns once it logged that it started.
fn start_gateway(cfg: &Path, env: &[(&str, std::ffi::OsString)]) -> Proc {
    let mut child = Command::new(target_dir().join("release/edgefn"))
        .args(["run", "--config"])
        .arg(cfg)
        .env("EDGEFN_LOG", "warn,edgefn::supervisor=info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut started = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("Gateway started.") {
                if let Some(tx) = started.take() {
                    let _ = tx.send(());
                }
            } else if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("gateway: {line}");
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the gateway started");
    Proc(child)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// A `/proc/<pid>/status` value in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Microseconds since the benchmark started: the sensors put it in each
/// reading, the receivers subtract it from their clock.
fn now_us(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap()
}

/// A subscriber: reports (arrival µs, payload) for every message.
async fn receiver(port: u16, filter: &str, qos: QoS) -> mpsc::UnboundedReceiver<(u64, Vec<u8>)> {
    let mut opts = MqttOptions::new(format!("load-rx-{port}-{}", free_port()), "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_keep_alive(Duration::from_secs(60));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    client.subscribe(filter, qos).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let epoch = *EPOCH.get().unwrap();
    tokio::spawn(async move {
        let _client = client;
        let mut ready = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send((now_us(epoch), p.payload.to_vec())).is_err() {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("receiver on {port}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ready_rx.await.unwrap();
    rx
}

static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Readings per sensor per phase at most: `value = send_us * SEQ_SPAN + seq`.
const SEQ_SPAN: u64 = 1_000_000;

/// `sensors` clients publish `total` readings
/// `{"value": <send µs>, "sensor": "s<k>"}` on
/// `sensors/s<k>/temperature`, as fast as the broker takes them (QoS 1
/// flow control) or at `rate` per second in all. Returns when the broker
/// has acknowledged all of them.
async fn sensors(port: u16, sensors: usize, total: usize, rate: Option<f64>) {
    let epoch = *EPOCH.get().unwrap();
    let mut tasks = Vec::new();
    for k in 0..sensors {
        let mut opts = MqttOptions::new(format!("load-sensor-{port}-{k}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(60));
        opts.set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        // The broker's PUBACKs, counted: the sensor disconnects once all its
        // readings are acknowledged.
        let (acked_tx, mut acked) = tokio::sync::watch::channel(0usize);
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        n += 1;
                        acked_tx.send_replace(n);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("sensor {k}: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        let share = total / sensors + usize::from(k < total % sensors);
        tasks.push(tokio::spawn(async move {
            let interval = rate.map(|r| Duration::from_secs_f64(sensors as f64 / r));
            let start = Instant::now();
            for i in 0..share {
                if let Some(iv) = interval {
                    let due = start + iv * u32::try_from(i).unwrap();
                    tokio::time::sleep_until(due.into()).await;
                }
                // The send time and the sequence number in one exactly
                // representable number (< 2^53), so any function's output
                // that carries `value` on identifies the reading.
                let value = now_us(epoch) * SEQ_SPAN + i as u64;
                let payload = format!("{{\"value\": {value}, \"sensor\": \"s{k}\"}}");
                client
                    .publish(
                        format!("sensors/s{k}/temperature"),
                        QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .await
                    .unwrap();
            }
            let all_acked = matches!(
                tokio::time::timeout(Duration::from_secs(60), acked.wait_for(|n| *n >= share))
                    .await,
                Ok(Ok(_))
            );
            assert!(all_acked, "sensor {k}: not every reading was acknowledged");
            let _ = client.disconnect().await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Collects `n` messages (or gives up after `idle` without one).
async fn collect(
    rx: &mut mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    n: usize,
    idle: Duration,
) -> Vec<(u64, Vec<u8>)> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match tokio::time::timeout(idle, rx.recv()).await {
            Ok(Some(m)) => got.push(m),
            _ => break,
        }
    }
    got
}

struct Run {
    events: usize,
    received: usize,
    unique: usize,
    secs: f64,
    latencies_us: Vec<u64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.unique as f64 / self.secs
    }

    fn pct(&mut self, q: f64) -> f64 {
        self.latencies_us.sort_unstable();
        let n = self.latencies_us.len();
        if n == 0 {
            return f64::NAN;
        }
        self.latencies_us[((n as f64 * q) as usize).min(n - 1)] as f64 / 1000.0
    }

    fn report(&mut self, label: &str) {
        let (p50, p99, max) = (self.pct(0.5), self.pct(0.99), self.pct(1.0));
        println!(
            "{label}: {:.0} events/s, {} sent, {} received ({} unique, {} lost), latency p50 {p50:.2} ms p99 {p99:.2} ms max {max:.2} ms",
            self.rate(),
            self.events,
            self.received,
            self.unique,
            self.events.saturating_sub(self.unique),
        );
    }
}

/// The sensor, sequence number and send time (µs) of a received message,
/// from its `field`.
fn stamp(payload: &[u8], field: &str) -> Option<((String, u64), u64)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    // Enriched records arrive inside the forwarded envelope.
    let v = v.get("payload").unwrap_or(&v);
    let value = v.get(field)?.as_f64()? as u64;
    let sensor = v.get("sensor")?.as_str()?.to_owned();
    Some(((sensor, value % SEQ_SPAN), value / SEQ_SPAN))
}

/// Sends `events` through and measures. `field` names where the send time
/// comes back (`value` in alerts, `celsius` in enriched envelopes).
async fn measure(
    sensor_port: u16,
    rx: &mut mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    sensors_n: usize,
    events: usize,
    rate: Option<f64>,
    field: &str,
) -> Run {
    let epoch = *EPOCH.get().unwrap();
    let start = now_us(epoch);
    let send = tokio::spawn(sensors(sensor_port, sensors_n, events, rate));
    let got = collect(rx, events, Duration::from_secs(10)).await;
    send.await.unwrap();
    let last = got.last().map_or(start, |(t, _)| *t);
    let mut seen = HashSet::with_capacity(got.len());
    let mut latencies_us = Vec::with_capacity(got.len());
    for (arrived, payload) in &got {
        if let Some((id, sent)) = stamp(payload, field)
            && seen.insert(id)
        {
            latencies_us.push(arrived.saturating_sub(sent));
        }
    }
    Run {
        events,
        received: got.len(),
        unique: seen.len(),
        secs: (last - start) as f64 / 1e6,
        latencies_us,
    }
}

/// Phase 2 and 4: `events` as fast as possible through `gw`, with its CPU
/// time per event and peak RSS.
async fn flood(
    gw: &Proc,
    port: u16,
    rx: &mut mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    sensors_n: usize,
    events: usize,
    field: &str,
    label: &str,
) {
    let pid = gw.0.id();
    let cpu0 = cpu_seconds(pid);
    let mut run = measure(port, rx, sensors_n, events, None, field).await;
    let cpu = cpu_seconds(pid) - cpu0;
    run.report(label);
    println!(
        "   gateway CPU: {cpu:.2} s = {:.3} CPU-s per 1000 events = {:.0} events per CPU-second; peak RSS {} KiB",
        cpu * 1000.0 / run.unique.max(1) as f64,
        run.unique as f64 / cpu,
        status_kib(pid, "VmHWM")
    );
}

fn threshold_functions(n: usize) -> String {
    (0..n)
        .map(|i| {
            let trigger = if i == 0 {
                "sensors/+/temperature".to_owned()
            } else {
                format!("idle/{i}/#")
            };
            format!(
                "[[functions]]\nname = \"threshold-{i}\"\ncomponent = {}\ntriggers = [\"{trigger}\"]\npublish = [\"alerts/#\"]\nconfig = {{ limit = \"-1e18\" }}\n",
                guest("threshold")
            )
        })
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    EPOCH.set(Instant::now()).unwrap();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "edgefn"])
        .status()
        .unwrap();
    assert!(status.success(), "building the release gateway");
    let events: usize = env_or("EDGEFN_LOAD_EVENTS", 200_000);
    let sensors_n: usize = env_or("EDGEFN_LOAD_SENSORS", 4);
    let rate: f64 = env_or("EDGEFN_LOAD_RATE", 5000.0);
    let seconds: f64 = env_or("EDGEFN_LOAD_SECONDS", 10.0);
    let phases: String = env_or("EDGEFN_LOAD_PHASES", "123456".to_owned());
    let phase = |p: char| phases.contains(p);
    let dir = tempfile::tempdir().unwrap();
    println!(
        "edgefn load benchmark: {events} events per throughput phase, {sensors_n} sensors, steady phase {rate}/s for {seconds} s"
    );

    // 1. The ceiling: raw passthrough through Mosquitto, same clients, QoS 1.
    let mport = free_port();
    let _mosq = mosquitto(dir.path(), mport);
    if phase('1') {
        let mut rx = receiver(mport, "sensors/#", QoS::AtLeastOnce).await;
        let mut run = measure(mport, &mut rx, sensors_n, events, None, "value").await;
        run.report("1. raw Mosquitto passthrough (QoS 1)");
    }

    // 2 + 3. MQTT → function → MQTT, gateway on the external Mosquitto.
    let header = |id: &str, broker: &str| {
        format!(
            "[gateway]\nid = \"{id}\"\ndata_dir = {:?}\n{broker}\n",
            dir.path().join(id).display().to_string()
        )
    };
    let fn_toml = format!(
        "{}{}",
        header(
            "bench-fn",
            &format!("[broker]\nkind = \"external\"\nurl = \"mqtt://127.0.0.1:{mport}\"\n")
        ),
        threshold_functions(1)
    );
    let steady = (rate * seconds) as usize;
    if phase('3') {
        // A fresh gateway at a steady rate.
        let _gw = gateway(dir.path(), "fn-steady", &fn_toml);
        let mut rx = receiver(mport, "alerts/#", QoS::AtLeastOnce).await;
        let mut run = measure(mport, &mut rx, sensors_n, steady, Some(rate), "value").await;
        run.report(&format!("3. MQTT → threshold → MQTT at a steady {rate}/s"));
    }
    if phase('2') {
        let gw = gateway(dir.path(), "fn", &fn_toml);
        let mut rx = receiver(mport, "alerts/#", QoS::AtLeastOnce).await;
        let label = "2. MQTT → threshold → MQTT (external Mosquitto), as fast as possible";
        flood(&gw, mport, &mut rx, sensors_n, events, "value", label).await;
        let mut run = measure(mport, &mut rx, sensors_n, steady, Some(rate), "value").await;
        run.report(&format!(
            "   the same gateway at a steady {rate}/s right after that flood"
        ));
    }

    // 4. The durable path: embedded broker → enrich → outbox → cloud.
    let cport = free_port();
    let _cloud = mosquitto(dir.path(), cport);
    if phase('4') {
        // The flood outruns the gateway and rumqttd acknowledges the sensors
        // at once: the backlog waits in the broker's log, sized here as it
        // was before `retention_bytes_per_filter` existed (10 × 10 MiB), so
        // nothing is skipped. With the default 1 MiB a flood faster than the
        // gateway skips readings (counted): see the README's Broker memory.
        let eport = free_port();
        let toml = format!(
            "{}[[functions]]\nname = \"enrich\"\ncomponent = {}\ntriggers = [\"sensors/+/temperature\"]\nsinks = [\"cloud\"]\nconfig = {{ sink = \"cloud\" }}\n\n[[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\nurl = \"mqtt://127.0.0.1:{cport}\"\ntopic = \"cloud/{{gateway}}/{{topic}}\"\nmax_inflight = 1000\nbatch_max = 1\n{outbox}",
            header(
                "bench-durable",
                &format!(
                    "[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{eport}\"\nretention_bytes_per_filter = 104857600\n"
                )
            ),
            guest("enrich"),
            outbox = std::env::var("EDGEFN_LOAD_OUTBOX").unwrap_or_default(),
        );
        let gw = gateway(dir.path(), "durable", &toml);
        let mut rx = receiver(cport, "cloud/#", QoS::AtLeastOnce).await;
        let label = "4. MQTT → enrich → outbox (SQLite, fsync) → MQTT sink → cloud Mosquitto, as fast as possible";
        flood(&gw, eport, &mut rx, sensors_n, events, "celsius", label).await;
        let mut run = measure(eport, &mut rx, sensors_n, steady, Some(rate), "celsius").await;
        run.report(&format!("   durable path at a steady {rate}/s"));
    }

    // 5. Idle RSS with 10 functions loaded.
    if phase('5') {
        let toml = format!(
            "{}{}",
            header(
                "bench-idle",
                &format!(
                    "[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{}\"\n",
                    free_port()
                )
            ),
            threshold_functions(10)
        );
        // First start compiles the components (and fills the compile
        // cache); a restart loads them from the cache, as a deployed board
        // does every time after the first.
        for start in ["first start (compiles)", "restart (compile cache)"] {
            let gw = gateway(dir.path(), "idle", &toml);
            tokio::time::sleep(Duration::from_secs(2)).await;
            let pid = gw.0.id();
            println!(
                "5. idle RSS with 10 functions loaded, {start}: {} KiB ({} KiB anonymous, {} KiB file-backed: the binary's code and the compiled functions)",
                status_kib(pid, "VmRSS"),
                status_kib(pid, "RssAnon"),
                status_kib(pid, "RssFile"),
            );
        }
    }

    // 7. The soak (long: not in the default phases).
    if phase('7') {
        soak::run(dir.path(), sensors_n).await;
    }

    // 6. Binary size.
    let bin = target_dir().join("release/edgefn");
    println!(
        "6. release binary: {} bytes ({:.1} MiB)",
        std::fs::metadata(&bin).unwrap().len(),
        std::fs::metadata(&bin).unwrap().len() as f64 / (1024.0 * 1024.0)
    );
}
