//! Shared helpers: guest paths, free ports, gateways from TOML, MQTT
//! subscribers and publishers, and a Mosquitto process.

#![allow(dead_code, reason = "not every test module uses every helper")]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgefn::config::{self, ValidConfig};
use edgefn::supervisor::Gateway;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};

/// How long any test waits for an expected message.
pub const WAIT: Duration = Duration::from_secs(15);

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The built component of a guest (`threshold`, `enrich`, `cbor_decode`,
/// `misbehave`, `not-a-function`).
pub fn guest(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let path = dir.join("wasm32-wasip2/guest").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the guests first with `cargo xtask functions` (or run the suite with `cargo xtask test`)",
        path.display()
    );
    path
}

#[path = "../../benches/common/mod.rs"]
mod common;
pub use common::free_port;

/// Writes `toml` into a fresh directory and loads it.
pub fn config(toml: &str) -> (ValidConfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    std::fs::write(&path, toml).unwrap();
    let config = config::load(&path).unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"));
    (config, dir)
}

/// The `[gateway]` and `[broker]` tables of a test gateway: embedded broker
/// on a free port.
pub fn gateway_header(id: &str) -> String {
    format!(
        "[gateway]\nid = \"{id}\"\ndata_dir = \"data\"\n\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:0\"\n"
    )
}

/// A TOML string literal for a path.
pub fn lit(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// Starts a gateway from `toml` (which should use an embedded broker on port
/// 0 or an external one).
pub async fn gateway(toml: &str) -> (Gateway, tempfile::TempDir) {
    let (config, dir) = config(toml);
    let gw = Gateway::start(&config)
        .await
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    (gw, dir)
}

/// A connected MQTT subscriber collecting messages.
pub struct Subscriber {
    rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    client: AsyncClient,
}

static NEXT_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A client id unique within this test run.
pub fn client_id(kind: &str) -> String {
    let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("test-{kind}-{}-{n}", std::process::id())
}

impl Subscriber {
    /// Connects and subscribes to `filters`; returns once the broker has
    /// acknowledged the subscription.
    pub async fn connect(host: &str, port: u16, filters: &[&str]) -> Self {
        Self::connect_with(MqttOptions::new(client_id("sub"), host, port), filters).await
    }

    /// [`Subscriber::connect`] with options of the caller's (e.g. TLS).
    pub async fn connect_with(mut opts: MqttOptions, filters: &[&str]) -> Self {
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        for f in filters {
            client.subscribe(*f, QoS::AtLeastOnce).await.unwrap();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let mut pending = filters.len();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        pending -= 1;
                        if pending == 0
                            && let Some(r) = ready_tx.take()
                        {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send((p.topic, p.payload.to_vec())).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("subscription acknowledged in time")
            .expect("subscriber task alive");
        Self { rx, client }
    }

    /// The next message, or a panic after [`WAIT`].
    pub async fn next(&mut self) -> (String, Vec<u8>) {
        tokio::time::timeout(WAIT, self.rx.recv())
            .await
            .expect("a message arrives in time")
            .expect("subscriber alive")
    }

    /// The next message as JSON.
    pub async fn next_json(&mut self) -> (String, serde_json::Value) {
        let (topic, payload) = self.next().await;
        let v = serde_json::from_slice(&payload).unwrap_or_else(|e| {
            panic!(
                "payload on {topic} is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&payload)
            )
        });
        (topic, v)
    }

    /// Whether a message is already waiting (does not wait).
    pub fn try_next(&mut self) -> Option<(String, Vec<u8>)> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

/// A connected publisher.
pub struct Publisher {
    client: AsyncClient,
    acks: mpsc::UnboundedReceiver<()>,
}

impl Publisher {
    /// Connects to `host:port`.
    pub async fn connect(host: &str, port: u16) -> Self {
        Self::connect_with(MqttOptions::new(client_id("pub"), host, port)).await
    }

    /// [`Publisher::connect`] with options of the caller's (e.g. TLS).
    pub async fn connect_with(opts: MqttOptions) -> Self {
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        if tx.send(()).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Self { client, acks }
    }

    /// Publishes at QoS 1 and waits for the broker's PUBACK.
    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, self.acks.recv())
            .await
            .expect("PUBACK in time")
            .expect("publisher alive");
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
    }
}

/// Polls `cond` until it holds or [`WAIT`] passes; for counters, which have
/// no event to wait on.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A Mosquitto broker on a free loopback port, killed on drop.
pub struct Mosquitto {
    child: Child,
    pub port: u16,
    bin: PathBuf,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

fn find_mosquitto() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Whether `mosquitto_pub` is installed.
pub fn has_mosquitto_clients() -> bool {
    Command::new("mosquitto_pub")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Whether tests that need Mosquitto must run (they must in CI).
pub fn mosquitto_required() -> bool {
    std::env::var_os("CI").is_some()
}

/// Reports the running test (or a part of it) as skipped, with `reason`, for
/// `cargo xtask test`'s summary, which counts it as skipped instead of
/// passed: a `SKIPPED <test>: <reason>` line written straight to stdout
/// (libtest captures only `print!`). In CI nothing may be skipped: a panic.
pub fn skip(reason: &str) {
    use std::io::Write as _;
    assert!(!mosquitto_required(), "required in CI: {reason}");
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unknown");
    let _ = writeln!(std::io::stdout().lock(), "SKIPPED {test}: {reason}");
}

const NO_MOSQUITTO: &str =
    "mosquitto is not installed (apt-get install mosquitto mosquitto-clients)";

impl Mosquitto {
    /// Starts Mosquitto, or returns `None` when it is not installed (a panic
    /// in CI, where it must be).
    pub fn start() -> Option<Self> {
        Self::start_with("")
    }

    /// [`Mosquitto::start`] with extra lines for the listener (e.g. TLS), or
    /// general settings that override the defaults above them.
    pub fn start_with(listener_extra: &str) -> Option<Self> {
        Self::reported(Self::launch(free_port(), listener_extra, false))
    }

    /// Reports the test as skipped when Mosquitto is missing.
    fn reported(m: Option<Self>) -> Option<Self> {
        if m.is_none() {
            skip(NO_MOSQUITTO);
        }
        m
    }

    /// A Mosquitto that keeps sessions and queued messages on disk across
    /// its own restarts (`persistence true`, `autosave_on_changes true`,
    /// unlimited queues), on `port`.
    pub fn start_persistent(port: u16) -> Option<Self> {
        Self::reported(Self::launch(port, "", true))
    }

    /// A plain Mosquitto on a port chosen by the caller.
    pub fn start_on(port: u16) -> Option<Self> {
        Self::reported(Self::launch(port, "", false))
    }

    fn launch(port: u16, listener_extra: &str, persistent: bool) -> Option<Self> {
        let Some(bin) = find_mosquitto() else {
            assert!(
                !mosquitto_required(),
                "Mosquitto is required in CI: apt-get install mosquitto mosquitto-clients"
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        let persistence = if persistent {
            format!(
                "persistence true\npersistence_location {}/\nautosave_on_changes true\nautosave_interval 1\n",
                dir.path().display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        std::fs::write(
            &conf,
            // `user root`: as root, Mosquitto would otherwise switch to the
            // `mosquitto` user, who cannot read the test's private files.
            format!(
                "{user}listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}max_queued_messages 0\nmax_inflight_messages 20\n{listener_extra}\n",
                user = if is_root() { "user root\n" } else { "" },
            ),
        )
        .unwrap();
        let mut m = Self {
            child: spawn_mosquitto(&bin, &conf),
            port,
            bin,
            conf,
            _dir: dir,
        };
        m.wait_up();
        Some(m)
    }

    fn wait_up(&mut self) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on {addr}"
            );
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "mosquitto exited at start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops it with SIGTERM (a persistent one saves its state) and waits.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    /// Starts it again with the same configuration and port.
    pub fn restart(&mut self) {
        self.child = spawn_mosquitto(&self.bin, &self.conf);
        self.wait_up();
    }
}

fn spawn_mosquitto(bin: &Path, conf: &Path) -> Child {
    Command::new(bin)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A "cloud" broker for sinks: Mosquitto where installed, else a second
/// embedded broker. Returns its port and a guard to keep alive.
pub fn cloud_broker() -> (u16, Option<Mosquitto>) {
    match Mosquitto::launch(free_port(), "", false) {
        Some(m) => (m.port, Some(m)),
        None => {
            let b = edgefn::broker::EmbeddedBroker::start(
                ([127, 0, 0, 1], 0).into(),
                None,
                edgefn::broker::DEFAULT_RETENTION_BYTES,
                std::sync::Arc::default(),
            )
            .unwrap();
            (b.addr().port(), None)
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The `edgefn` binary (built by `cargo xtask test`).
pub fn edgefn_bin() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let bin = dir.join("debug/edgefn");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p edgefn` (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// A subscriber with a persistent session (`clean_session = false`) and a
/// fixed client id, so that messages queued for it survive its broker's
/// restart (with a persistent Mosquitto).
pub async fn persistent_subscriber(port: u16, id: &str, filters: &[&str]) -> Subscriber {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_clean_session(false);
    Subscriber::connect_with(opts, filters).await
}

impl Subscriber {
    /// The next message, waiting up to `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<(String, Vec<u8>)> {
        tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

/// Round trips to the neighbour: publish `ok/<n>`, wait for `echo/ok/<n>`.
pub async fn round_trips(
    sensor: &mut Publisher,
    echoes: &mut Subscriber,
    n: usize,
    tag: &str,
) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let topic = format!("ok/{tag}-{i}");
        let start = Instant::now();
        sensor.publish(&topic, "ping").await;
        loop {
            let (t, _) = echoes.next().await;
            if t == format!("echo/{topic}") {
                break;
            }
        }
        times.push(start.elapsed());
    }
    times
}

/// A gateway process that a failing test does not leave behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Collects systemd notifications sent to a `$NOTIFY_SOCKET` of the test's.
pub struct NotifySocket {
    /// The socket's path, for `NOTIFY_SOCKET`.
    pub path: PathBuf,
    rx: mpsc::UnboundedReceiver<String>,
}

impl NotifySocket {
    /// Binds `notify.sock` in `dir`.
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    if tx.send(line.to_owned()).is_err() {
                        return;
                    }
                }
            }
        });
        Self { path, rx }
    }

    /// Waits up to `within` for a line starting with `prefix`; returns it
    /// and the lines before it, or `None` with those lines.
    pub async fn wait_for_prefix(
        &mut self,
        prefix: &str,
        within: Duration,
    ) -> (Option<String>, Vec<String>) {
        let mut before = Vec::new();
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(line)) if line.starts_with(prefix) => return (Some(line), before),
                Ok(Some(line)) => before.push(line),
                _ => return (None, before),
            }
        }
    }

    /// Waits for a line equal to `want`; returns the lines seen before it.
    pub async fn wait_for(&mut self, want: &str) -> Vec<String> {
        match self.wait_for_prefix(want, WAIT).await {
            (Some(line), before) if line == want => before,
            (_, before) => panic!("no `{want}` from the gateway; got {before:?}"),
        }
    }
}

/// Sends signal `sig` (`HUP`, `TERM`…) to `child`.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}
