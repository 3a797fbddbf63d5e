//! Phase 7 of the load benchmark, the soak: the demo configuration
//! (`examples/demo.toml`: embedded broker, its four functions, the `cloud`
//! sink pointing back at the broker) under a steady stream of readings, one
//! outside subscriber on `cloud/#` and `alerts/#`, and the gateway's RSS
//! sampled as it runs.
//!
//! `EDGEFN_SOAK_RATE` (default 500 readings/s), `EDGEFN_SOAK_SECONDS`
//! (default 300; 3600 for the full hour), `EDGEFN_SOAK_SAMPLE_S` (default 10),
//! `EDGEFN_SOAK_WARMUP_S` (default 60: samples before it are not part of the
//! flatness verdict), `EDGEFN_SOAK_RETENTION` (sets
//! `broker.retention_bytes_per_filter`; the default is the gateway's).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet};

use super::clients::sensors;
use super::*;

/// Counts what the outside subscriber receives, per filter.
struct Received {
    cloud: AtomicU64,
    alerts: AtomicU64,
    /// Ticks on every message.
    arrived: tokio::sync::watch::Sender<()>,
}

impl Received {
    fn counts(&self) -> (u64, u64) {
        (
            self.cloud.load(Ordering::Relaxed),
            self.alerts.load(Ordering::Relaxed),
        )
    }
}

/// One client subscribed to `cloud/#` and `alerts/#` at QoS 1, counting
/// (not keeping) what arrives.
async fn outside_subscriber(port: u16) -> Arc<Received> {
    let mut opts = MqttOptions::new(format!("soak-outside-{port}"), "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    opts.set_keep_alive(Duration::from_secs(60));
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    client.subscribe("cloud/#", QoS::AtLeastOnce).await.unwrap();
    client
        .subscribe("alerts/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let received = Arc::new(Received {
        cloud: AtomicU64::new(0),
        alerts: AtomicU64::new(0),
        arrived: tokio::sync::watch::channel(()).0,
    });
    let counts = received.clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _client = client;
        let (mut ready, mut subacks) = (Some(ready_tx), 0);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let counter = if p.topic.starts_with("cloud/") {
                        &counts.cloud
                    } else {
                        &counts.alerts
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    counts.arrived.send_replace(());
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subacks += 1;
                    if subacks == 2
                        && let Some(r) = ready.take()
                    {
                        let _ = r.send(());
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("outside subscriber: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    ready_rx.await.unwrap();
    received
}

/// The release gateway on the demo configuration, its broker on `port` and
/// admin endpoint on `admin`.
fn demo_gateway(dir: &Path, port: u16, admin: u16) -> Proc {
    let mut toml = std::fs::read_to_string(root().join("examples/demo.toml")).unwrap();
    if let Ok(bytes) = std::env::var("EDGEFN_SOAK_RETENTION") {
        let listen = "listen = \"${EDGEFN_MQTT_LISTEN:-127.0.0.1:1883}\"\n";
        assert!(toml.contains(listen), "the demo's [broker] table changed");
        toml = toml.replacen(
            listen,
            &format!("{listen}retention_bytes_per_filter = {bytes}\n"),
            1,
        );
    }
    let cfg = dir.join("soak-demo.toml");
    std::fs::write(&cfg, toml).unwrap();
    super::start_gateway(
        &cfg,
        &[
            ("EDGEFN_MQTT_LISTEN", format!("127.0.0.1:{port}").into()),
            ("EDGEFN_ADMIN_LISTEN", format!("127.0.0.1:{admin}").into()),
            ("EDGEFN_DATA_DIR", dir.join("soak-data").into()),
            (
                "EDGEFN_FUNCTIONS_DIR",
                target_dir().join("wasm32-wasip2/guest").into(),
            ),
        ],
    )
}

/// `edgefn_broker_subscriber_skips_total` from the admin endpoint.
async fn broker_skips(admin: u16) -> String {
    let body = match reqwest::get(format!("http://127.0.0.1:{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => return format!("? ({e})"),
    };
    body.lines()
        .find_map(|l| l.strip_prefix("edgefn_broker_subscriber_skips_total "))
        .unwrap_or("?")
        .to_owned()
}

/// Least-squares slope of `(seconds, KiB)` samples, in KiB per minute.
fn slope_kib_per_min(samples: &[(f64, u64)]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let (mx, my) = samples
        .iter()
        .fold((0.0, 0.0), |(x, y), (t, r)| (x + t / n, y + *r as f64 / n));
    let (num, den) = samples.iter().fold((0.0, 0.0), |(num, den), (t, r)| {
        (num + (t - mx) * (*r as f64 - my), den + (t - mx) * (t - mx))
    });
    num / den * 60.0
}

/// Runs the soak and prints the RSS curve and the verdict.
pub async fn run(dir: &Path, sensors_n: usize) {
    let rate: f64 = env_or("EDGEFN_SOAK_RATE", 500.0);
    let seconds: f64 = env_or("EDGEFN_SOAK_SECONDS", 300.0);
    let sample_s: f64 = env_or("EDGEFN_SOAK_SAMPLE_S", 10.0);
    let warmup_s: f64 = env_or("EDGEFN_SOAK_WARMUP_S", 60.0);
    // The first start compiles the functions into the compile cache; the
    // measured one is a restart, as a board runs after its first start.
    drop(demo_gateway(dir, free_port(), free_port()));
    let (port, admin) = (free_port(), free_port());
    let gw = demo_gateway(dir, port, admin);
    let pid = gw.0.id();
    let received = outside_subscriber(port).await;
    let total = (rate * seconds) as usize;
    println!(
        "7. soak: the demo (restarted with its compile cache) at {rate} readings/s for {seconds} s ({total} readings), RSS every {sample_s} s (retention per filter: {})",
        std::env::var("EDGEFN_SOAK_RETENTION").unwrap_or_else(|_| "default".into())
    );
    let start = Instant::now();
    let mut send = tokio::spawn(sensors(
        port,
        sensors_n,
        total,
        Some(rate),
        QoS::AtLeastOnce,
    ));
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(sample_s));
    loop {
        tokio::select! {
            r = &mut send => { r.unwrap(); break; }
            _ = tick.tick() => {}
        }
        let t = start.elapsed().as_secs_f64();
        let rss = status_kib(pid, "VmRSS");
        samples.push((t, rss));
        let (cloud, alerts) = received.counts();
        println!(
            "   t={t:>6.0} s  RSS {rss:>7} KiB  received cloud {cloud:>8} alerts {alerts:>8}  broker skips {}",
            broker_skips(admin).await,
        );
    }
    // Let the last readings arrive (or give up after 10 s without one).
    let mut arrived = received.arrived.subscribe();
    loop {
        let (cloud, alerts) = received.counts();
        if cloud as usize >= total && alerts as usize >= total {
            break;
        }
        if tokio::time::timeout(Duration::from_secs(10), arrived.changed())
            .await
            .is_err()
        {
            break;
        }
    }
    let settled: Vec<(f64, u64)> = samples
        .iter()
        .copied()
        .filter(|(t, _)| *t >= warmup_s)
        .collect();
    let after_warmup = settled.first().map_or(0, |s| s.1);
    let max = settled.iter().map(|s| s.1).max().unwrap_or(0);
    println!(
        "   RSS after warm-up ({warmup_s} s) {after_warmup} KiB, max after it {max} KiB, at the end {} KiB (peak over the run {} KiB); slope after warm-up {:.1} KiB/min",
        status_kib(pid, "VmRSS"),
        status_kib(pid, "VmHWM"),
        slope_kib_per_min(&settled),
    );
    let (cloud, alerts) = received.counts();
    println!(
        "   {total} readings sent; outside subscriber received {cloud} on cloud/#, {alerts} on alerts/#; broker subscriber skips {}",
        broker_skips(admin).await,
    );
}
