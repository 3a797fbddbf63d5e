//! What access control costs the broker (issue 13): the same workload, in
//! the same run, through five brokers, each its own process:
//!
//! 1. `edgefn run` with the embedded broker open (loopback, anonymous:
//!    rumqttd alone);
//! 2. edgefn with the guard on plain TCP: `password_file` (argon2, written
//!    by `edgefn passwd`) and `[[broker.acl]]`;
//! 3. edgefn with the guard on its TLS listener, password login, same ACL;
//! 4. Mosquitto 2 with `password_file` and `acl_file` granting the same
//!    rights, plain TCP;
//! 5. Mosquitto anonymous (the baseline).
//!
//! The user `bench` may publish `bench/{user}/#` and subscribe `bench/#`.
//! One rumqttc subscriber (QoS 1, `bench/#`) and one rumqttc publisher
//! (QoS 1) on `bench/bench/t`, 60-byte payloads carrying a sequence number
//! and the send time: first at a steady rate, then as fast as the broker
//! takes them. Per broker: messages delivered (must be all: the run fails
//! after printing its table if any is lost), latency publish → receive
//! p50/p99, throughput, the broker process's CPU time per message
//! (utime + stime from `/proc/<pid>/stat`), its peak RSS (`VmHWM`, before
//! the clients connect and at the end), and the publisher's CONNECT →
//! CONNACK time (the login).
//!
//! ```sh
//! cargo bench -p edgefn-tests --bench broker_access
//! ```
//! It builds the release `edgefn` (as the `load` bench does) and needs
//! `/usr/sbin/mosquitto` and `mosquitto_passwd`. Environment:
//! `EDGEFN_BENCH_MESSAGES` (default 20000 per phase), `EDGEFN_BENCH_RATE`
//! (default 5000 messages/s for the steady phase), `EDGEFN_BENCH_BROKERS`
//! (default `12345`: which of the five to run, in that order).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark harness"
)]

use std::process::Command;
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode, Transport,
};
use tokio::sync::{mpsc, watch};

#[path = "common/mod.rs"]
mod common;
use common::free_port;
use common::{env_or, target_dir};

#[path = "broker_access/brokers.rs"]
mod brokers;
use brokers::{Broker, Setup, USER};

/// Bytes of each payload: sequence number, send time (µs), padding.
const PAYLOAD_BYTES: usize = 60;

static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Microseconds since the benchmark started (publisher and subscriber share
/// the clock).
fn now_us() -> u64 {
    u64::try_from(EPOCH.get().unwrap().elapsed().as_micros()).unwrap()
}

/// utime + stime of `pid`, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Peak RSS of `pid` in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Client options for `broker`: TLS to `localhost` with its CA, or plain
/// TCP to 127.0.0.1; logged in when it wants logins.
fn options(broker: &Broker, role: &str) -> MqttOptions {
    let id = format!("bench-{role}-{}", free_port());
    let mut opts = match &broker.tls_ca {
        Some(ca) => {
            let mut o = MqttOptions::new(id, "localhost", broker.port);
            o.set_transport(Transport::tls(ca.clone().into_bytes(), None, None));
            o
        }
        None => MqttOptions::new(id, "127.0.0.1", broker.port),
    };
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_inflight(100);
    if let Some((user, password)) = broker.credentials() {
        opts.set_credentials(user, password);
    }
    opts
}

/// Connection errors seen by the bench's clients (each one is a reconnect).
static ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn client_error(role: &str, e: &rumqttc::ConnectionError) {
    ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    eprintln!("{role}: {e}");
}

/// A received message: (sequence number, send µs, arrival µs).
type Arrival = (u64, u64, u64);

/// The subscriber: `bench/#` at QoS 1; every message goes to the channel.
/// Returns once the broker granted the subscription, with the task that
/// polls its connection (abort it to disconnect).
async fn subscriber(
    broker: &Broker,
) -> (
    mpsc::UnboundedReceiver<Arrival>,
    tokio::task::JoinHandle<()>,
) {
    let (client, mut eventloop) = AsyncClient::new(options(broker, "sub"), 1000);
    client.subscribe("bench/#", QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let (granted_tx, granted) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let _client = client;
        let mut granted_tx = Some(granted_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let arrived = now_us();
                    let field = |i: usize| {
                        let bytes = p.payload.get(i * 8..i * 8 + 8)?;
                        Some(u64::from_le_bytes(bytes.try_into().ok()?))
                    };
                    if let (Some(seq), Some(sent)) = (field(0), field(1))
                        && tx.send((seq, sent, arrived)).is_err()
                    {
                        break;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let ok = matches!(ack.return_codes[..], [SubscribeReasonCode::Success(_)]);
                    if let Some(g) = granted_tx.take() {
                        let _ = g.send(ok);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    client_error("subscriber", &e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    let ok = tokio::time::timeout(Duration::from_secs(10), granted)
        .await
        .expect("a SUBACK within 10 s")
        .unwrap();
    assert!(
        ok,
        "{}: the subscription to bench/# was refused",
        broker.label
    );
    (rx, task)
}

/// The publisher's client and its count of PUBACKs received.
struct Publisher {
    client: AsyncClient,
    acked: watch::Receiver<u64>,
    /// CONNECT → CONNACK of its first connection.
    connect: Duration,
    /// The task that polls its connection.
    task: tokio::task::JoinHandle<()>,
}

async fn publisher(broker: &Broker) -> Publisher {
    let (client, eventloop) = AsyncClient::new(options(broker, "pub"), 1000);
    let (acked_tx, acked) = watch::channel(0);
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(poll_publisher(eventloop, acked_tx, connected_tx));
    let connect = tokio::time::timeout(Duration::from_secs(10), connected)
        .await
        .expect("a CONNACK within 10 s")
        .unwrap();
    Publisher {
        client,
        acked,
        connect,
        task,
    }
}

async fn poll_publisher(
    mut eventloop: EventLoop,
    acked: watch::Sender<u64>,
    connected: tokio::sync::oneshot::Sender<Duration>,
) {
    let start = Instant::now();
    let mut connected = Some(connected);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(c) = connected.take() {
                    let _ = c.send(start.elapsed());
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked.send_modify(|n| *n += 1);
            }
            Ok(_) => {}
            Err(e) => {
                client_error("publisher", &e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One phase's results.
struct Phase {
    delivered: usize,
    duplicates: usize,
    secs: f64,
    latencies_us: Vec<u64>,
    cpu_ticks: u64,
}

impl Phase {
    fn pct_ms(&self, q: f64) -> f64 {
        let n = self.latencies_us.len();
        if n == 0 {
            return f64::NAN;
        }
        self.latencies_us[((n as f64 * q) as usize).min(n - 1)] as f64 / 1000.0
    }

    /// Broker CPU per message in µs (ticks are 10 ms).
    fn cpu_us_per_msg(&self, n: usize) -> f64 {
        self.cpu_ticks as f64 * 10_000.0 / n as f64
    }
}

/// Publishes sequence numbers `first..first + n` (at `rate` per second, or
/// as fast as QoS 1 flow control allows) and collects them at the
/// subscriber; the broker's CPU time is read before and after.
async fn phase(
    pid: u32,
    publisher: &Publisher,
    rx: &mut mpsc::UnboundedReceiver<Arrival>,
    first: u64,
    n: usize,
    rate: Option<f64>,
) -> Phase {
    let cpu0 = cpu_ticks(pid);
    let acked0 = *publisher.acked.borrow();
    let start = now_us();
    let client = publisher.client.clone();
    let send = tokio::spawn(async move {
        let topic = format!("bench/{USER}/t");
        let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r));
        let t0 = Instant::now();
        for i in 0..n as u64 {
            if let Some(iv) = interval {
                let due = t0 + iv * u32::try_from(i).unwrap();
                tokio::time::sleep_until(due.into()).await;
            }
            let mut payload = Vec::with_capacity(PAYLOAD_BYTES);
            payload.extend_from_slice(&(first + i).to_le_bytes());
            payload.extend_from_slice(&now_us().to_le_bytes());
            payload.resize(PAYLOAD_BYTES, b'.');
            client
                .publish(&topic, QoS::AtLeastOnce, false, payload)
                .await
                .unwrap();
        }
    });
    let mut seen = vec![false; n];
    let (mut delivered, mut duplicates, mut last) = (0, 0, start);
    let mut latencies_us = Vec::with_capacity(n);
    while delivered < n {
        let Ok(Some((seq, sent, arrived))) =
            tokio::time::timeout(Duration::from_secs(10), rx.recv()).await
        else {
            break; // 10 s without a message: the rest is lost.
        };
        let Some(slot) = seq
            .checked_sub(first)
            .and_then(|i| seen.get_mut(i as usize))
        else {
            continue;
        };
        if std::mem::replace(slot, true) {
            duplicates += 1;
            continue;
        }
        delivered += 1;
        last = arrived;
        latencies_us.push(arrived.saturating_sub(sent));
    }
    send.await.unwrap();
    let mut acked = publisher.acked.clone();
    let target = acked0 + n as u64;
    let _ = tokio::time::timeout(Duration::from_secs(10), acked.wait_for(|a| *a >= target)).await;
    latencies_us.sort_unstable();
    Phase {
        delivered,
        duplicates,
        secs: (last - start) as f64 / 1e6,
        latencies_us,
        cpu_ticks: cpu_ticks(pid) - cpu0,
    }
}

/// One broker's row.
struct Row {
    label: &'static str,
    connect: Duration,
    steady: Phase,
    flood: Phase,
    /// Before any client connected, and at the end.
    rss_idle_kib: u64,
    peak_rss_kib: u64,
    errors: u64,
}

async fn run(broker: &Broker, n: usize, rate: f64) -> Row {
    let pid = broker.proc.0.id();
    let errors0 = ERRORS.load(std::sync::atomic::Ordering::Relaxed);
    let rss_idle_kib = peak_rss_kib(pid);
    let (mut rx, sub_task) = subscriber(broker).await;
    let publisher = publisher(broker).await;
    let steady = phase(pid, &publisher, &mut rx, 0, n, Some(rate)).await;
    let flood = phase(pid, &publisher, &mut rx, n as u64, n, None).await;
    // Stop both clients before the broker goes, so they do not reconnect
    // (and count errors) against the next one.
    publisher.task.abort();
    sub_task.abort();
    Row {
        label: broker.label,
        connect: publisher.connect,
        steady,
        flood,
        rss_idle_kib,
        peak_rss_kib: peak_rss_kib(pid),
        errors: ERRORS.load(std::sync::atomic::Ordering::Relaxed) - errors0,
    }
}

fn print_table(rows: &[Row], n: usize, rate: f64) {
    println!();
    println!(
        "| broker | login (CONNACK) ms | steady {rate:.0}/s: delivered | p50 / p99 ms | CPU µs/msg | flat out: delivered | msgs/s | p50 / p99 ms | CPU µs/msg | peak RSS MiB: before clients, end | client errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (s, f) = (&r.steady, &r.flood);
        println!(
            "| {} | {:.1} | {}/{n}{} | {:.2} / {:.2} | {:.1} | {}/{n}{} | {:.0} | {:.1} / {:.1} | {:.1} | {:.1}, {:.1} | {} |",
            r.label,
            r.connect.as_secs_f64() * 1000.0,
            s.delivered,
            dup_note(s.duplicates),
            s.pct_ms(0.5),
            s.pct_ms(0.99),
            s.cpu_us_per_msg(n),
            f.delivered,
            dup_note(f.duplicates),
            f.delivered as f64 / f.secs,
            f.pct_ms(0.5),
            f.pct_ms(0.99),
            f.cpu_us_per_msg(n),
            r.rss_idle_kib as f64 / 1024.0,
            r.peak_rss_kib as f64 / 1024.0,
            r.errors,
        );
    }
}

fn dup_note(duplicates: usize) -> String {
    if duplicates == 0 {
        String::new()
    } else {
        format!(" (+{duplicates} dup)")
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    EPOCH.set(Instant::now()).unwrap();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "edgefn"])
        .status()
        .unwrap();
    assert!(status.success(), "building the release gateway");
    let n: usize = env_or("EDGEFN_BENCH_MESSAGES", 20_000);
    let rate: f64 = env_or("EDGEFN_BENCH_RATE", 5000.0);
    let which: String = env_or("EDGEFN_BENCH_BROKERS", "12345".to_owned());
    println!(
        "broker access bench: {n} messages of {PAYLOAD_BYTES} bytes per phase, steady phase at {rate}/s, then flat out; brokers {which}"
    );
    let dir = tempfile::tempdir().unwrap();
    let edgefn = target_dir().join("release/edgefn");
    let setup = Setup::new(dir.path(), edgefn, which.contains(['2', '3']));
    let mut rows = Vec::new();
    for b in which.chars() {
        let broker = setup.start(b);
        let row = run(&broker, n, rate).await;
        println!(
            "{}: steady {}/{n}, flat out {}/{n} in {:.2} s",
            row.label, row.steady.delivered, row.flood.delivered, row.flood.secs
        );
        rows.push(row);
    }
    print_table(&rows, n, rate);
    let lossy: Vec<&str> = rows
        .iter()
        .filter(|r| r.steady.delivered < n || r.flood.delivered < n)
        .map(|r| r.label)
        .collect();
    assert!(lossy.is_empty(), "messages lost through: {lossy:?}");
}
