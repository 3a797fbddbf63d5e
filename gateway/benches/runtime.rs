//! The function runtime's speed, in-process (no MQTT): what one invocation
//! costs in `fresh` and `reuse` mode, where a fresh invocation's time goes,
//! the overhead of epoch interruption on a compute-heavy guest, and events/s
//! through one function and through ten in parallel.
//!
//! `cargo bench -p edgefn --bench runtime` after `cargo xtask functions`.
//! Criterion prints its estimates; the percentile lines (`p50`/`p99` over
//! `EDGEFN_BENCH_SAMPLES` single invocations, default 20000) are printed
//! after them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark harness"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use edgefn::config::{self, FunctionSpec, RuntimeSpec};
use edgefn::event::{Event, SourceKind};
use edgefn::runtime::{LoadedFunction, Runtime, RuntimeOptions};

/// A 64-byte JSON reading above the threshold (so it publishes an alert).
const PAYLOAD: &str = r#"{"value": 35.25, "sensor": "s1", "unit": "C", "seq": 12345678}"#;

fn guest(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = dir.join("wasm32-wasip2/guest").join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask functions` first",
        path.display()
    );
    path
}

/// Function specs parsed from a config, so they get the real defaults.
fn specs(functions: &str) -> (Vec<FunctionSpec>, RuntimeSpec) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.toml");
    std::fs::write(&path, format!("[gateway]\nid = \"bench\"\n{functions}")).unwrap();
    let c = config::load(&path).unwrap();
    (c.functions, c.runtime)
}

fn function_toml(name: &str, component: &Path, instance: &str, extra: &str) -> String {
    format!(
        "[[functions]]\nname = \"{name}\"\ncomponent = {:?}\ntriggers = [\"sensors/#\"]\npublish = [\"alerts/#\"]\ninstance = \"{instance}\"\n{extra}\n",
        component.display().to_string()
    )
}

fn load(
    instance: &str,
    pooling: bool,
    epoch: bool,
    component: &Path,
    extra: &str,
) -> LoadedFunction {
    let (specs, mut rt) = specs(&function_toml("f", component, instance, extra));
    rt.pooling = pooling;
    let mut opts = RuntimeOptions::ephemeral(rt);
    opts.epoch_interruption = epoch;
    let runtime = Runtime::new(&opts).unwrap();
    assert_eq!(runtime.pooling(), pooling);
    runtime.load(&specs[0], "bench", Arc::default()).unwrap()
}

fn event(payload: &str) -> Event {
    Event::new(
        SourceKind::Mqtt,
        "sensors/s1/temperature",
        payload.to_owned(),
    )
}

fn invocations(c: &mut Criterion) {
    let threshold = guest("threshold");
    let ev = event(PAYLOAD);
    let mut g = c.benchmark_group("invoke");
    for (label, instance, pooling) in [
        ("fresh", "fresh", true),
        ("reuse", "reuse", true),
        ("fresh-on-demand", "fresh", false),
    ] {
        let f = load(instance, pooling, true, &threshold, "");
        g.bench_function(label, |b| {
            b.iter(|| {
                let inv = f.invoke(&ev);
                assert_eq!(inv.outcome.unwrap().publishes.len(), 1);
            });
        });
    }
    // Where a fresh invocation's time goes: instantiation alone.
    let f = load("fresh", true, true, &threshold, "");
    g.bench_function("instantiate-only", |b| {
        b.iter(|| assert!(f.instantiate_and_drop()));
    });
    // ... and the per-store host state (an empty WASI context).
    let caps = Arc::new(edgefn::runtime::Capabilities {
        function: "f".into(),
        gateway_id: "bench".into(),
        publish: Default::default(),
        sinks: Default::default(),
        serial_ports: Default::default(),
        modbus: Default::default(),
        gpio: Default::default(),
        config: Default::default(),
        max_calls: 64,
        max_payload_bytes: 1024,
    });
    let limits = edgefn::config::Limits::default();
    let log_rate = edgefn::runtime::logs::LogRate::new(limits.log_lines_per_s);
    g.bench_function("host-state-only", |b| {
        b.iter(|| edgefn::runtime::HostState::new(caps.clone(), &limits, None, log_rate.clone()));
    });
    g.finish();
}

fn epoch_overhead(c: &mut Criterion) {
    let misbehave = guest("misbehave");
    let ev = event("mode:compute:1000000");
    let mut g = c.benchmark_group("compute-1M-rounds");
    g.sample_size(30);
    for (label, epoch) in [("epoch-on", true), ("epoch-off", false)] {
        let f = load(
            "reuse",
            true,
            epoch,
            &misbehave,
            "limits = { timeout_ms = 60000 }",
        );
        g.bench_function(label, |b| {
            b.iter(|| assert!(f.invoke(&ev).outcome.is_ok()));
        });
    }
    g.finish();
}

criterion_group!(benches, invocations, epoch_overhead);

fn percentiles(label: &str, f: &LoadedFunction, samples: usize) {
    let ev = event(PAYLOAD);
    for _ in 0..1000 {
        f.invoke(&ev);
    }
    let mut times: Vec<Duration> = (0..samples)
        .map(|_| {
            let t = Instant::now();
            let inv = f.invoke(&ev);
            let d = t.elapsed();
            assert!(inv.outcome.is_ok());
            d
        })
        .collect();
    times.sort();
    let p = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    println!(
        "{label:<22} p50 {:>6.1} µs   p99 {:>6.1} µs   max {:>8.1} µs   ({samples} invocations)",
        p(0.50).as_secs_f64() * 1e6,
        p(0.99).as_secs_f64() * 1e6,
        times[times.len() - 1].as_secs_f64() * 1e6
    );
}

/// Events/s when `functions` functions each handle `per_function` events on
/// their own thread (like their workers do).
fn throughput(functions: usize, per_function: usize) {
    let threshold = guest("threshold");
    let toml: String = (0..functions)
        .map(|i| function_toml(&format!("f{i}"), &threshold, "reuse", ""))
        .collect();
    let (specs, rt) = specs(&toml);
    let runtime = Runtime::new(&RuntimeOptions::ephemeral(rt)).unwrap();
    let loaded: Vec<Arc<LoadedFunction>> = specs
        .iter()
        .map(|s| Arc::new(runtime.load(s, "bench", Arc::default()).unwrap()))
        .collect();
    let start = Instant::now();
    let threads: Vec<_> = loaded
        .into_iter()
        .map(|f| {
            std::thread::spawn(move || {
                let ev = event(PAYLOAD);
                for _ in 0..per_function {
                    assert!(f.invoke(&ev).outcome.is_ok());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let total = functions * per_function;
    println!(
        "throughput: {functions:>2} function(s) in parallel: {:>9.0} events/s ({total} events in {secs:.2} s)",
        total as f64 / secs
    );
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    let samples: usize = std::env::var("EDGEFN_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let threshold = guest("threshold");
    println!();
    for (label, instance, pooling) in [
        ("fresh (pooling)", "fresh", true),
        ("reuse (warm)", "reuse", true),
        ("fresh (on-demand)", "fresh", false),
    ] {
        let f = load(instance, pooling, true, &threshold, "");
        percentiles(label, &f, samples);
    }
    throughput(1, 200_000);
    throughput(10, 20_000);
}
