//! What the admin endpoint says: the Prometheus text exposition of every
//! counter, and the JSON function list.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::AdminState;
use crate::metrics::LATENCY_BUCKETS_US;

/// The breaker state's name for a `breaker_state` value.
fn breaker_name(state: u8) -> &'static str {
    match state {
        0 => "closed",
        1 => "open",
        _ => "half-open",
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn esc(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Builds one metric family: `# HELP`, `# TYPE`, then samples.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Self { out, name }
    }

    /// One sample; `labels` are `(name, value)` pairs.
    fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) -> &mut Self {
        self.sample_suffixed("", labels, value)
    }

    fn sample_suffixed(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) -> &mut Self {
        let _ = write!(self.out, "{}{suffix}", self.name);
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.out, " {value}");
        self
    }
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Every metric in the Prometheus text format (version 0.0.4).
/// `oldest_ms[i]` is sink `i`'s oldest stored record's time, if any.
pub fn prometheus(state: &AdminState, oldest_ms: &[Option<u64>]) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let m = &state.metrics;
    let functions = state.functions.list();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);

    Family::new(
        &mut out,
        "edgefn_info",
        "gauge",
        "The gateway's identity; always 1.",
    )
    .sample(
        &[
            ("gateway", &state.gateway_id),
            ("version", env!("CARGO_PKG_VERSION")),
        ],
        1,
    );
    Family::new(
        &mut out,
        "edgefn_ready",
        "gauge",
        "1 when the MQTT source is subscribed, outbox commits succeed, every function worker and source makes progress, and the gateway is not stopping.",
    )
    .sample(&[], u8::from(state.readiness().is_ok()));

    // Sources.
    {
        let mut f = Family::new(
            &mut out,
            "edgefn_source_events_total",
            "counter",
            "Events taken in, per source.",
        );
        f.sample(&[("source", "mqtt"), ("kind", "mqtt")], get(&m.events_in));
        for (name, kind, s) in &state.sources {
            f.sample(&[("source", name), ("kind", kind)], get(&s.frames));
        }
    }
    let per_source = |out: &mut String, name, help, value: &dyn Fn(&_) -> u64| {
        let mut f = Family::new(out, name, "counter", help);
        for (source, _, s) in &state.sources {
            f.sample(&[("source", source)], value(s));
        }
    };
    per_source(
        &mut out,
        "edgefn_source_invalid_frames_total",
        "Malformed or overlong frames (serial), malformed readings (I2C CRC errors) and garbled Modbus answers skipped, per source.",
        &|s| get(&s.invalid) + get(&s.oversize),
    );
    per_source(
        &mut out,
        "edgefn_source_failures_total",
        "Failed opens, read errors and failed polls, per serial, I2C or Modbus source.",
        &|s| get(&s.failures),
    );
    per_source(
        &mut out,
        "edgefn_source_timeouts_total",
        "Requests a Modbus device did not answer within timeout_ms, per source.",
        &|s| get(&s.timeouts),
    );
    per_source(
        &mut out,
        "edgefn_source_exceptions_total",
        "Requests a Modbus device answered with an exception, per source.",
        &|s| get(&s.exceptions),
    );
    per_source(
        &mut out,
        "edgefn_source_writes_total",
        "Frames written to a serial device by functions, per source.",
        &|s| get(&s.written),
    );
    Family::new(
        &mut out,
        "edgefn_source_dropped_total",
        "counter",
        "QoS 0 messages the MQTT source dropped while the functions were held back.",
    )
    .sample(&[("source", "mqtt")], get(&m.source_dropped));
    Family::new(
        &mut out,
        "edgefn_source_paused_total",
        "counter",
        "Times the MQTT source stopped reading while QoS 1 messages waited for the functions.",
    )
    .sample(&[("source", "mqtt")], get(&m.source_paused));
    Family::new(
        &mut out,
        "edgefn_source_deferred_total",
        "counter",
        "QoS 1 messages the MQTT source left with the broker to fetch again, while the functions were behind.",
    )
    .sample(&[("source", "mqtt")], get(&m.source_deferred));
    Family::new(
        &mut out,
        "edgefn_source_resyncs_total",
        "counter",
        "Times the MQTT source resumed its session to fetch deferred messages.",
    )
    .sample(&[("source", "mqtt")], get(&m.source_resyncs));
    per_source(
        &mut out,
        "edgefn_source_writes_dropped_total",
        "Serial writes dropped (port not open, its queue full, or the write failed), per source.",
        &|s| get(&s.writes_dropped),
    );
    per_source(
        &mut out,
        "edgefn_source_ticks_skipped_total",
        "Timer ticks whose time passed while the timer could not fire (skipped, or folded into one catch-up tick), per source.",
        &|s| get(&s.ticks_skipped),
    );
    Family::new(
        &mut out,
        "edgefn_events_unmatched_total",
        "counter",
        "Events that matched no function's triggers.",
    )
    .sample(&[], get(&m.unmatched));
    Family::new(
        &mut out,
        "edgefn_broker_subscriber_skips_total",
        "counter",
        "Times a subscriber of the embedded broker fell further behind than broker.retention_bytes_per_filter and skipped the oldest messages.",
    )
    .sample(&[], get(&m.broker_skips));
    broker_access(&mut out, m);
    if let Some(f) = &state.fleet {
        fleet(&mut out, f);
    }

    // Functions.
    let per_function = |out: &mut String, name, kind: &str, help, value: &dyn Fn(&_) -> u64| {
        let mut f = Family::new(out, name, kind, help);
        for (function, fm) in &functions {
            f.sample(&[("function", function)], value(fm));
        }
    };
    per_function(
        &mut out,
        "edgefn_function_invocations_total",
        "counter",
        "Invocations started, per function.",
        &|f| get(&f.invocations),
    );
    {
        let mut f = Family::new(
            &mut out,
            "edgefn_function_results_total",
            "counter",
            "Invocations ended, per function and result: ok, error (the handler returned Err), quota, denied, trap, timeout, memory.",
        );
        for (function, fm) in &functions {
            for (result, c) in [
                ("ok", &fm.ok),
                ("error", &fm.errors),
                ("quota", &fm.quota_failures),
                ("denied", &fm.denied_failures),
                ("trap", &fm.traps),
                ("timeout", &fm.timeouts),
                ("memory", &fm.memory),
            ] {
                f.sample(&[("function", function), ("result", result)], get(c));
            }
        }
    }
    {
        let mut f = Family::new(
            &mut out,
            "edgefn_function_duration_seconds",
            "histogram",
            "Time per invocation, instantiation included, per function.",
        );
        for (function, fm) in &functions {
            let (cumulative, sum_us) = fm.latency.cumulative();
            for (bound, count) in LATENCY_BUCKETS_US.iter().zip(&cumulative) {
                let le = format!("{}", *bound as f64 / 1e6);
                f.sample_suffixed("_bucket", &[("function", function), ("le", &le)], count);
            }
            let total = cumulative[LATENCY_BUCKETS_US.len()];
            f.sample_suffixed("_bucket", &[("function", function), ("le", "+Inf")], total);
            f.sample_suffixed("_sum", &[("function", function)], sum_us as f64 / 1e6);
            f.sample_suffixed("_count", &[("function", function)], total);
        }
    }
    {
        let mut f = Family::new(
            &mut out,
            "edgefn_function_calls_refused_total",
            "counter",
            "publish/forward/state calls the host refused, per function and reason: denied (allowlist) or limit.",
        );
        for (function, fm) in &functions {
            f.sample(
                &[("function", function), ("reason", "denied")],
                get(&fm.denied),
            );
            f.sample(
                &[("function", function), ("reason", "limit")],
                get(&fm.over_limit),
            );
        }
    }
    per_function(
        &mut out,
        "edgefn_function_published_total",
        "counter",
        "Messages published on the local broker, per function.",
        &|f| get(&f.published),
    );
    per_function(
        &mut out,
        "edgefn_function_forwarded_total",
        "counter",
        "Records handed to the outbox for a sink, per function.",
        &|f| get(&f.forwarded),
    );
    per_function(
        &mut out,
        "edgefn_function_dropped_total",
        "counter",
        "Events dropped by a full queue (drop_oldest), per function.",
        &|f| get(&f.dropped),
    );
    per_function(
        &mut out,
        "edgefn_function_dead_lettered_total",
        "counter",
        "Events published on the function's dead-letter topic.",
        &|f| get(&f.dead_lettered),
    );
    per_function(
        &mut out,
        "edgefn_function_log_suppressed_total",
        "counter",
        "Guest log lines dropped by the function's log budget.",
        &|f| get(&f.log_suppressed),
    );
    per_function(
        &mut out,
        "edgefn_function_breaker_state",
        "gauge",
        "Circuit breaker: 0 closed, 1 open, 2 half-open.",
        &|f| u64::from(f.breaker_state.load(Ordering::Relaxed)),
    );
    per_function(
        &mut out,
        "edgefn_function_breaker_opens_total",
        "counter",
        "Times the circuit breaker opened.",
        &|f| get(&f.breaker_opens),
    );
    per_function(
        &mut out,
        "edgefn_function_reloads_total",
        "counter",
        "New versions switched in by hot reload.",
        &|f| get(&f.reloads),
    );
    per_function(
        &mut out,
        "edgefn_function_rollbacks_total",
        "counter",
        "New versions refused or rolled back.",
        &|f| get(&f.rollbacks),
    );

    // Sinks and the outbox.
    let per_sink = |out: &mut String, name, kind: &str, help, value: &dyn Fn(usize) -> u64| {
        let mut f = Family::new(out, name, kind, help);
        for (i, (sink, _, _)) in state.sinks.iter().enumerate() {
            f.sample(&[("sink", sink)], value(i));
        }
    };
    let delivery = |i: usize| &state.sinks[i].2;
    let stored = |i: usize| state.outbox.sink_stats(&state.sinks[i].0);
    per_sink(
        &mut out,
        "edgefn_sink_delivered_total",
        "counter",
        "Records confirmed by the cloud (events out), per sink.",
        &|i| get(&delivery(i).delivered),
    );
    per_sink(
        &mut out,
        "edgefn_sink_resent_total",
        "counter",
        "Records sent again after a reconnect or retry, per sink.",
        &|i| get(&delivery(i).resent),
    );
    per_sink(
        &mut out,
        "edgefn_sink_dead_lettered_total",
        "counter",
        "Records the cloud rejected, dead-lettered, per sink.",
        &|i| get(&delivery(i).dead_lettered),
    );
    per_sink(
        &mut out,
        "edgefn_sink_failures_total",
        "counter",
        "Failed delivery attempts (connection errors, timeouts, 5xx), per sink.",
        &|i| get(&delivery(i).failures),
    );
    per_sink(
        &mut out,
        "edgefn_sink_commands_total",
        "counter",
        "Cloud commands received on the sink's `subscribe` filters, per sink.",
        &|i| get(&delivery(i).commands_received),
    );
    per_sink(
        &mut out,
        "edgefn_sink_commands_acked_total",
        "counter",
        "Cloud commands acknowledged to the cloud broker once handled, per sink.",
        &|i| get(&delivery(i).commands_acked),
    );
    per_sink(
        &mut out,
        "edgefn_sink_commands_dropped_total",
        "counter",
        "QoS 0 cloud commands dropped while the functions held the intake back, per sink.",
        &|i| get(&delivery(i).commands_dropped),
    );
    per_sink(
        &mut out,
        "edgefn_outbox_records",
        "gauge",
        "Records waiting in the outbox, per sink.",
        &|i| stored(i).map_or(0, |s| get(&s.rows)),
    );
    {
        let mut f = Family::new(
            &mut out,
            "edgefn_outbox_lane_records",
            "gauge",
            "Records waiting in the outbox, per sink and lane (high: alarms, delivered first).",
        );
        for (i, (sink, _, _)) in state.sinks.iter().enumerate() {
            let (rows, high) = stored(i).map_or((0, 0), |s| (get(&s.rows), get(&s.high_rows)));
            f.sample(&[("sink", sink), ("lane", "high")], high);
            f.sample(
                &[("sink", sink), ("lane", "normal")],
                rows.saturating_sub(high),
            );
        }
    }
    per_sink(
        &mut out,
        "edgefn_outbox_bytes",
        "gauge",
        "Payload bytes waiting in the outbox, per sink.",
        &|i| stored(i).map_or(0, |s| get(&s.bytes)),
    );
    {
        let mut f = Family::new(
            &mut out,
            "edgefn_outbox_oldest_record_age_seconds",
            "gauge",
            "Age of the oldest record waiting in the outbox, per sink (0 when empty).",
        );
        for (i, (sink, _, _)) in state.sinks.iter().enumerate() {
            let age_ms = oldest_ms
                .get(i)
                .copied()
                .flatten()
                .map_or(0, |ts| now_ms.saturating_sub(ts));
            f.sample(&[("sink", sink)], age_ms as f64 / 1e3);
        }
    }
    {
        let mut f = Family::new(
            &mut out,
            "edgefn_outbox_lost_total",
            "counter",
            "Records removed undelivered, per sink and reason: full (drop_oldest) or ttl.",
        );
        for (i, (sink, _, _)) in state.sinks.iter().enumerate() {
            let s = stored(i);
            f.sample(
                &[("sink", sink), ("reason", "full")],
                s.as_ref().map_or(0, |s| get(&s.dropped_full)),
            );
            f.sample(
                &[("sink", sink), ("reason", "ttl")],
                s.as_ref().map_or(0, |s| get(&s.expired)),
            );
        }
    }
    Family::new(
        &mut out,
        "edgefn_outbox_commits_total",
        "counter",
        "Outbox transactions committed (one fsync each).",
    )
    .sample(&[], get(&state.outbox.stats().commits));
    Family::new(
        &mut out,
        "edgefn_outbox_commit_failures_total",
        "counter",
        "Outbox transactions that failed (disk full, I/O error) and were rolled back; their records are kept and retried.",
    )
    .sample(&[], get(&state.outbox.stats().commit_failures));
    Family::new(
        &mut out,
        "edgefn_outbox_writable",
        "gauge",
        "1 while outbox commits succeed; 0 while they fail (intake held back, nothing acknowledged).",
    )
    .sample(&[], u8::from(state.outbox.stats().failing().is_none()));

    // Connections.
    {
        let mut f = Family::new(
            &mut out,
            "edgefn_connection_reconnects_total",
            "counter",
            "Reconnects per MQTT connection: the source and the local publisher (to the local broker), and each MQTT sink.",
        );
        f.sample(&[("connection", "mqtt-source")], get(&m.source_reconnects));
        f.sample(
            &[("connection", "local-publisher")],
            get(&m.publisher_reconnects),
        );
        // An MQTT sink tears its connection down on every failure.
        for (sink, _, d) in state.sinks.iter().filter(|(_, kind, _)| *kind == "mqtt") {
            f.sample(&[("connection", &format!("sink/{sink}"))], get(&d.failures));
        }
    }
    reloads(&mut out, state);
    out
}

/// Configuration reloads (`SIGHUP`) and what waits for a restart.
fn reloads(out: &mut String, state: &AdminState) {
    let m = &state.metrics;
    Family::new(
        out,
        "edgefn_reloads_total",
        "counter",
        "Configuration reloads (SIGHUP) by result: applied, refused (functions named sinks or serial ports the running gateway lacks, or an added or changed function failed to load) or failed (invalid configuration).",
    )
    .sample(&[("result", "applied")], get(&m.reloads_applied))
    .sample(&[("result", "refused")], get(&m.reloads_refused))
    .sample(&[("result", "failed")], get(&m.reloads_failed));
    Family::new(
        out,
        "edgefn_reload_restart_pending",
        "gauge",
        "Settings of the last reloaded configuration that differ from the running one and need a restart.",
    )
    .sample(&[], get(&m.restart_pending));
}

/// `/functions`: name, version hash, breaker state and counters of each
/// function, as a JSON array.
pub fn functions_json(state: &AdminState) -> String {
    let list: Vec<serde_json::Value> = state
        .functions
        .list()
        .iter()
        .map(|(name, m)| {
            let (cumulative, sum_us) = m.latency.cumulative();
            let count = cumulative[LATENCY_BUCKETS_US.len()];
            serde_json::json!({
                "name": name,
                "version": m.version(),
                "state": breaker_name(m.breaker_state.load(Ordering::Relaxed)),
                "from_cache": m.from_cache.load(Ordering::Relaxed),
                "mean_us": sum_us.checked_div(count).unwrap_or(0),
                "counters": m.snapshot(),
            })
        })
        .collect();
    serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".to_owned())
}

/// The fleet agent: the running bundle's version, bundles applied and
/// refused.
fn fleet(out: &mut String, f: &crate::fleet::Fleet) {
    let report = f.report();
    Family::new(
        out,
        "edgefn_fleet_bundle_version",
        "gauge",
        "Version of the fleet bundle that runs; 0 = the configuration file's functions only.",
    )
    .sample(&[], report.bundle.map_or(0, |b| b.version));
    Family::new(
        out,
        "edgefn_fleet_bundles_total",
        "counter",
        "Fleet bundles switched to (applied) and bundles or desired documents refused since start.",
    )
    .sample(&[("result", "applied")], f.applied.load(Ordering::Relaxed))
    .sample(&[("result", "refused")], f.refused.load(Ordering::Relaxed));
}

/// The embedded broker's logins and refusals (through its guard).
fn broker_access(out: &mut String, m: &crate::metrics::GatewayMetrics) {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Family::new(
        out,
        "edgefn_broker_logins_total",
        "counter",
        "Clients the embedded broker's guard let in.",
    )
    .sample(&[], get(&m.broker_logins));
    Family::new(
        out,
        "edgefn_broker_login_failures_total",
        "counter",
        "Logins the embedded broker refused: wrong password or user, anonymous where not allowed, bad client certificate or TLS handshake.",
    )
    .sample(&[], get(&m.broker_login_failures));
    Family::new(
        out,
        "edgefn_broker_refused_total",
        "counter",
        "Publishes (and wills) and subscription filters outside a device's rights, refused.",
    )
    .sample(&[("action", "publish")], get(&m.broker_refused_publishes))
    .sample(
        &[("action", "subscribe")],
        get(&m.broker_refused_subscribes),
    );
}
