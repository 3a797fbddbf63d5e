//! Outbox throughput under group commit: events committed per second and
//! commits (fsyncs) per second, with one 120-byte forward per event appended
//! the way function workers do it (each with an acknowledgement hold).
//!
//! `cargo bench -p edgefn --bench outbox` (`EDGEFN_BENCH_EVENTS` to change
//! the count, default 200000).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark harness"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use edgefn::outbox::{FullPolicy, NewRecord, Outbox, OutboxConfig, SinkLimits};

struct Ack(Arc<AtomicU64>);
impl Drop for Ack {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let events: u64 = std::env::var("EDGEFN_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(OutboxConfig {
        path: dir.path().join("outbox.sqlite"),
        max_commits_per_sec: 20,
        sinks: vec![SinkLimits {
            sink: "cloud".into(),
            max_rows: u64::MAX / 2,
            max_bytes: u64::MAX / 2,
            ttl: std::time::Duration::from_secs(3600),
            policy: FullPolicy::Refuse,
        }],
    })
    .unwrap();
    let payload = Bytes::from(vec![b'x'; 120]);
    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let producers: Vec<_> = (0..2)
        .map(|p| {
            let outbox = outbox.clone();
            let payload = payload.clone();
            let acked = acked.clone();
            tokio::spawn(async move {
                for _ in (p..events).step_by(2) {
                    let record = NewRecord {
                        sink: "cloud".into(),
                        function: "enrich".into(),
                        topic: "sensors/s1/temperature".into(),
                        payload: payload.clone(),
                        ts_ms: 0,
                        lane: edgefn::outbox::Lane::Normal,
                    };
                    outbox
                        .append(vec![record], Some(Box::new(Ack(acked.clone()))))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    outbox.flush().await;
    let elapsed = started.elapsed();
    assert_eq!(
        acked.load(Ordering::Relaxed),
        events,
        "every append acknowledged after its commit"
    );
    let commits = outbox.stats().commits.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64();
    println!(
        "outbox: {events} events committed in {secs:.2} s = {:.0} events/s; {commits} commits = {:.1} commits (fsyncs)/s; {:.0} events per commit",
        events as f64 / secs,
        commits as f64 / secs,
        events as f64 / commits as f64
    );
}
