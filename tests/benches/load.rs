//! The end-to-end load benchmark: the whole pipeline on one machine, the
//! gateway as its own process (the release `edgefn` binary, so its CPU time
//! and memory are its own), sensors and receivers as real MQTT clients.
//!
//! `cargo bench -p edgefn-tests --bench load` (builds the release binary and
//! needs the guests, `cargo xtask functions`, and `mosquitto`). Environment:
//! `EDGEFN_LOAD_EVENTS` (default 200000 per throughput phase),
//! `EDGEFN_LOAD_EMBEDDED_EVENTS` (default 100000, phase 8),
//! `EDGEFN_LOAD_SENSORS` (default 4), `EDGEFN_LOAD_RATE` (default 5000 events/s
//! for the latency phase), `EDGEFN_LOAD_SECONDS` (default 10),
//! `EDGEFN_LOAD_PHASES` (default `1234568`), `EDGEFN_LOAD_BINARY` (measure
//! this gateway binary instead of building the release one: A/B runs).
//!
//! Phases, each printed as it finishes; 1, 2 and 8 run at QoS 1 and QoS 0
//! (sensors, the function's publish and the receiver at the same level):
//! 1. raw broker passthrough: sensors → Mosquitto → receiver (the ceiling),
//!    with Mosquitto's CPU and peak RSS;
//! 2. MQTT → function → MQTT against that Mosquitto (`threshold`, every
//!    reading alerts), as fast as possible: events/s with nothing lost, CPU
//!    µs of the gateway (and of Mosquitto) per event, peak RSS (and, at QoS
//!    1, the steady rate right after the flood);
//! 3. the same path at a steady rate on a fresh gateway: latency p50/p99/max
//!    sensor → receiver, CPU per event;
//! 8. embedded mode: a fresh Mosquitto's passthrough of
//!    `EDGEFN_LOAD_EMBEDDED_EVENTS` readings, then the same clients against
//!    the gateway's own broker (no Mosquitto), flat out at both QoS levels
//!    and at the steady rate;
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

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::QoS;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The gateway under test: `EDGEFN_LOAD_BINARY` (another build to compare,
/// used as it is), else the release build.
fn gateway_binary() -> PathBuf {
    std::env::var_os("EDGEFN_LOAD_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release/edgefn"))
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

#[path = "load/clients.rs"]
mod clients;
use clients::{EPOCH, Load, measure, measure_cpu, receiver, status_kib};

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
    let mut child = Command::new(gateway_binary())
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

fn threshold_functions(n: usize, qos: QoS) -> String {
    (0..n)
        .map(|i| {
            let trigger = if i == 0 {
                "sensors/+/temperature".to_owned()
            } else {
                format!("idle/{i}/#")
            };
            format!(
                "[[functions]]\nname = \"threshold-{i}\"\ncomponent = {}\ntriggers = [\"{trigger}\"]\npublish = [\"alerts/#\"]\nconfig = {{ limit = \"-1e18\", qos = \"{}\" }}\n",
                guest("threshold"),
                qos as u8,
            )
        })
        .collect()
}

/// The benchmark's settings and scratch directory.
struct Bench {
    dir: tempfile::TempDir,
    events: usize,
    embedded_events: usize,
    sensors: usize,
    rate: f64,
    seconds: f64,
}

impl Bench {
    fn load(&self, events: usize, rate: Option<f64>, qos: QoS) -> Load {
        Load {
            sensors: self.sensors,
            events,
            rate,
            qos,
        }
    }

    fn steady(&self) -> usize {
        (self.rate * self.seconds) as usize
    }

    /// A config's `[gateway]` and `[broker]` sections.
    fn header(&self, id: &str, broker: &str) -> String {
        format!(
            "[gateway]\nid = \"{id}\"\ndata_dir = {:?}\n{broker}\n",
            self.dir.path().join(id).display().to_string()
        )
    }

    /// A gateway running `threshold` (every reading alerts, at `qos`) on
    /// the external broker at `port`.
    fn external(&self, name: &str, port: u16, qos: QoS) -> Proc {
        let toml = format!(
            "{}{}",
            self.header(
                name,
                &format!("[broker]\nkind = \"external\"\nurl = \"mqtt://127.0.0.1:{port}\"\n")
            ),
            threshold_functions(1, qos)
        );
        gateway(self.dir.path(), name, &toml)
    }

    /// A gateway running `threshold` on its embedded broker at `port`, its
    /// log sized as phase 4's (10 × 10 MiB per filter), so a flood skips
    /// nothing.
    fn embedded(&self, name: &str, port: u16, qos: QoS) -> Proc {
        let retention = 104_857_600;
        let toml = format!(
            "{}{}",
            self.header(
                name,
                &format!("[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\nretention_bytes_per_filter = {retention}\n")
            ),
            threshold_functions(1, qos)
        );
        gateway(self.dir.path(), name, &toml)
    }
}

const QOS: [QoS; 2] = [QoS::AtLeastOnce, QoS::AtMostOnce];

/// Phase 1: sensors → Mosquitto → receiver, at both QoS levels.
async fn passthrough(b: &Bench, port: u16, mosq: &Proc, events: usize, label: &str) {
    for qos in QOS {
        let mut rx = receiver(port, "sensors/#", qos).await;
        measure_cpu(
            port,
            &mut rx,
            b.load(events, None, qos),
            "value",
            label,
            &[("Mosquitto", mosq.0.id())],
        )
        .await;
    }
}

/// Phases 2 and 3: MQTT → threshold → MQTT through the external Mosquitto.
async fn external(b: &Bench, mport: u16, mosq: &Proc, phase: impl Fn(char) -> bool) {
    let rate = b.rate;
    if phase('3') {
        // A fresh gateway at a steady rate: latency and CPU per event.
        let gw = b.external("fn-steady", mport, QoS::AtLeastOnce);
        let mut rx = receiver(mport, "alerts/#", QoS::AtLeastOnce).await;
        let label = format!("3. MQTT → threshold → MQTT (external Mosquitto) at a steady {rate}/s");
        let pids = [("gateway", gw.0.id()), ("Mosquitto", mosq.0.id())];
        measure_cpu(
            mport,
            &mut rx,
            b.load(b.steady(), Some(rate), QoS::AtLeastOnce),
            "value",
            &label,
            &pids,
        )
        .await;
    }
    if phase('2') {
        for qos in QOS {
            let gw = b.external("fn", mport, qos);
            let mut rx = receiver(mport, "alerts/#", qos).await;
            let label = "2. MQTT → threshold → MQTT (external Mosquitto), as fast as possible";
            let pids = [("gateway", gw.0.id()), ("Mosquitto", mosq.0.id())];
            measure_cpu(
                mport,
                &mut rx,
                b.load(b.events, None, qos),
                "value",
                label,
                &pids,
            )
            .await;
            if qos == QoS::AtLeastOnce {
                let mut run =
                    measure(mport, &mut rx, b.load(b.steady(), Some(rate), qos), "value").await;
                run.report(&format!(
                    "   the same gateway at a steady {rate}/s right after that flood"
                ));
            }
        }
    }
}

/// Phase 8: embedded mode. Sensors and receiver connect to the gateway
/// itself; Mosquitto's passthrough of the same load in the same run (a
/// fresh Mosquitto, so its peak RSS is this phase's).
async fn embedded(b: &Bench) {
    let n = b.embedded_events;
    let port = free_port();
    {
        let mosq = mosquitto(b.dir.path(), port);
        passthrough(
            b,
            port,
            &mosq,
            n,
            "8. embedded mode: Mosquitto passthrough, as fast as possible",
        )
        .await;
    }
    for qos in QOS {
        let port = free_port();
        let gw = b.embedded("embedded", port, qos);
        let mut rx = receiver(port, "alerts/#", qos).await;
        let label =
            "8. embedded mode: sensors → gateway (threshold) → receiver, as fast as possible";
        measure_cpu(
            port,
            &mut rx,
            b.load(n, None, qos),
            "value",
            label,
            &[("gateway", gw.0.id())],
        )
        .await;
    }
    let port = free_port();
    let gw = b.embedded("embedded-steady", port, QoS::AtLeastOnce);
    let mut rx = receiver(port, "alerts/#", QoS::AtLeastOnce).await;
    let label = format!("8. embedded mode at a steady {}/s", b.rate);
    let load = b.load(b.steady(), Some(b.rate), QoS::AtLeastOnce);
    measure_cpu(
        port,
        &mut rx,
        load,
        "value",
        &label,
        &[("gateway", gw.0.id())],
    )
    .await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    EPOCH.set(Instant::now()).unwrap();
    if std::env::var_os("EDGEFN_LOAD_BINARY").is_none() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "edgefn"])
            .status()
            .unwrap();
        assert!(status.success(), "building the release gateway");
    }
    let b = Bench {
        dir: tempfile::tempdir().unwrap(),
        events: env_or("EDGEFN_LOAD_EVENTS", 200_000),
        embedded_events: env_or("EDGEFN_LOAD_EMBEDDED_EVENTS", 100_000),
        sensors: env_or("EDGEFN_LOAD_SENSORS", 4),
        rate: env_or("EDGEFN_LOAD_RATE", 5000.0),
        seconds: env_or("EDGEFN_LOAD_SECONDS", 10.0),
    };
    let phases: String = env_or("EDGEFN_LOAD_PHASES", "1234568".to_owned());
    let phase = |p: char| phases.contains(p);
    let (events, sensors_n, rate, seconds) = (b.events, b.sensors, b.rate, b.seconds);
    println!(
        "edgefn load benchmark: {events} events per throughput phase, {sensors_n} sensors, steady phase {rate}/s for {seconds} s"
    );

    // 1. The ceiling: raw passthrough through Mosquitto, same clients.
    let mport = free_port();
    let mosq = mosquitto(b.dir.path(), mport);
    if phase('1') {
        passthrough(&b, mport, &mosq, events, "1. raw Mosquitto passthrough").await;
    }
    // 2 + 3. MQTT → function → MQTT, gateway on the external Mosquitto.
    external(&b, mport, &mosq, phase).await;
    if phase('8') {
        embedded(&b).await;
    }
    let dir = &b.dir;
    let header = |id: &str, broker: &str| b.header(id, broker);
    let steady = b.steady();

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
        let q1 = QoS::AtLeastOnce;
        measure_cpu(
            eport,
            &mut rx,
            b.load(events, None, q1),
            "celsius",
            label,
            &[("gateway", gw.0.id())],
        )
        .await;
        let mut run = measure(eport, &mut rx, b.load(steady, Some(rate), q1), "celsius").await;
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
            threshold_functions(10, QoS::AtLeastOnce)
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
    let bin = gateway_binary();
    println!(
        "6. release binary: {} bytes ({:.1} MiB)",
        std::fs::metadata(&bin).unwrap().len(),
        std::fs::metadata(&bin).unwrap().len() as f64 / (1024.0 * 1024.0)
    );
}
