//! The load benchmark's MQTT clients and measurements: sensors that
//! publish stamped readings, receivers that time them, and the gateway's or
//! a broker's CPU time and memory from `/proc`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use super::common::free_port;

pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// A `/proc/<pid>/status` value in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, key: &str) -> u64 {
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
pub fn now_us(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap()
}

/// A subscriber: reports (arrival µs, payload) for every message.
pub async fn receiver(
    port: u16,
    filter: &str,
    qos: QoS,
) -> mpsc::UnboundedReceiver<(u64, Vec<u8>)> {
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
                // Its phase is over (the receiving end is gone).
                Err(_) if tx.is_closed() => break,
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

pub static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Readings per sensor per phase at most: `value = send_us * SEQ_SPAN + seq`.
const SEQ_SPAN: u64 = 1_000_000;

/// `sensors` clients publish `total` readings
/// `{"value": <send µs>, "sensor": "s<k>"}` on
/// `sensors/s<k>/temperature` at `qos`, as fast as the broker takes them
/// (QoS 1 flow control, or TCP's at QoS 0) or at `rate` per second in all.
/// Returns when the broker has acknowledged all of them (QoS 1) or they
/// were all written (QoS 0).
pub async fn sensors(port: u16, sensors: usize, total: usize, rate: Option<f64>, qos: QoS) {
    let epoch = *EPOCH.get().unwrap();
    let mut tasks = Vec::new();
    for k in 0..sensors {
        let mut opts = MqttOptions::new(format!("load-sensor-{port}-{k}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(60));
        opts.set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        // The broker's PUBACKs (QoS 1) or the publishes written (QoS 0),
        // counted: the sensor disconnects once all its readings are done.
        let (acked_tx, mut acked) = tokio::sync::watch::channel(0usize);
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) if qos == QoS::AtLeastOnce => {
                        n += 1;
                        acked_tx.send_replace(n);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_)))
                        if qos == QoS::AtMostOnce =>
                    {
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
                    .publish(format!("sensors/s{k}/temperature"), qos, false, payload)
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
pub async fn collect(
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

pub struct Run {
    pub qos: QoS,
    pub events: usize,
    pub received: usize,
    pub unique: usize,
    pub secs: f64,
    pub latencies_us: Vec<u64>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.unique as f64 / self.secs
    }

    pub fn pct(&mut self, q: f64) -> f64 {
        self.latencies_us.sort_unstable();
        let n = self.latencies_us.len();
        if n == 0 {
            return f64::NAN;
        }
        self.latencies_us[((n as f64 * q) as usize).min(n - 1)] as f64 / 1000.0
    }

    pub fn report(&mut self, label: &str) {
        let (p50, p99, max) = (self.pct(0.5), self.pct(0.99), self.pct(1.0));
        println!(
            "{label} [QoS {}]: {:.0} events/s, {} sent, {} received ({} unique, {} lost), latency p50 {p50:.2} ms p99 {p99:.2} ms max {max:.2} ms",
            self.qos as u8,
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
pub fn stamp(payload: &[u8], field: &str) -> Option<((String, u64), u64)> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    // Enriched records arrive inside the forwarded envelope.
    let v = v.get("payload").unwrap_or(&v);
    let value = v.get(field)?.as_f64()? as u64;
    let sensor = v.get("sensor")?.as_str()?.to_owned();
    Some(((sensor, value % SEQ_SPAN), value / SEQ_SPAN))
}

/// Sends `events` through and measures. `field` names where the send time
/// comes back (`value` in alerts, `celsius` in enriched envelopes).
pub async fn measure(
    sensor_port: u16,
    rx: &mut mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    load: Load,
    field: &str,
) -> Run {
    let Load {
        sensors: sensors_n,
        events,
        rate,
        qos,
    } = load;
    let epoch = *EPOCH.get().unwrap();
    let start = now_us(epoch);
    let send = tokio::spawn(sensors(sensor_port, sensors_n, events, rate, qos));
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
        qos,
        events,
        received: got.len(),
        unique: seen.len(),
        secs: (last - start) as f64 / 1e6,
        latencies_us,
    }
}

/// What the sensors send in one measurement.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Sensor connections.
    pub sensors: usize,
    /// Readings in all.
    pub events: usize,
    /// Readings per second in all, or as fast as possible.
    pub rate: Option<f64>,
    /// The sensors' (and the receivers') QoS.
    pub qos: QoS,
}

/// Runs `load` through and reports it with the CPU time of the processes
/// `pids` (named) spent meanwhile, per event, and their peak RSS.
pub async fn measure_cpu(
    port: u16,
    rx: &mut mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    load: Load,
    field: &str,
    label: &str,
    pids: &[(&str, u32)],
) -> (Run, Vec<f64>) {
    let cpu0: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
    let mut run = measure(port, rx, load, field).await;
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|((_, p), c0)| cpu_seconds(*p) - c0)
        .collect();
    run.report(label);
    for ((name, pid), cpu) in pids.iter().zip(&cpu) {
        println!(
            "   {name} CPU: {cpu:.2} s = {:.1} µs per event = {:.0} events per CPU-second; peak RSS {} KiB",
            cpu * 1e6 / run.unique.max(1) as f64,
            run.unique as f64 / cpu,
            status_kib(*pid, "VmHWM")
        );
    }
    (run, cpu)
}
