//! The Modbus source: polls a device's registers and coils on an interval,
//! over Modbus TCP or Modbus RTU on a serial (RS-485) line, through
//! tokio-modbus, and turns each poll into one JSON event,
//! `{"voltage": 229.8, ...}`, keyed by the registers' names.
//!
//! A failed poll (an exception, a timeout, a garbled answer or a CRC error,
//! a lost connection) is counted and logged, and the next interval tries
//! again; a connection that cannot be made is retried with back-off.
//! Functions listing the source in `modbus` write registers and coils
//! through its queue (sent once, between polls, never retried).
//! Several sources on one serial path share the port and are polled in turn
//! ([`link`]). Functions see these events with `source-kind::serial` and the
//! attribute `protocol = "modbus"`: WIT 0.1.x cannot grow its `source-kind`
//! enum without breaking every function built against it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Map;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub mod config;
mod link;
pub mod registers;

use super::{
    BuildEnv, BuiltSource, Common, Port, Source, SourceContext, SourceError, SourcePlugin,
    SourceStats,
};
use crate::config::KeyChanges;
use crate::event::{Event, SourceKind};
use crate::output::{ModbusWrite, Writes};
use crate::progress::{Activity, Beat};
use config::{ModbusSourceConfig, ModbusSpec, Transport};
use link::{CallError, Link};
use registers::Read;

/// `kind = "modbus"`.
pub struct Kind;

impl SourcePlugin for Kind {
    const KIND: &'static str = "modbus";
    type Config = ModbusSourceConfig;
    type Spec = ModbusSpec;

    fn name(config: &ModbusSourceConfig) -> &str {
        &config.name
    }

    fn validate(
        config: &ModbusSourceConfig,
        scope: &mut crate::config::Scope<'_, '_>,
    ) -> Option<ModbusSpec> {
        config::validate(config, scope)
    }

    fn common(spec: &ModbusSpec) -> Common<'_> {
        Common {
            name: &spec.name,
            topic: Some(&spec.topic),
            mirror_topic: spec.mirror_topic.as_deref(),
            writable: false,
            port: match &spec.transport {
                Transport::Rtu { path, line } => Some(Port {
                    path,
                    shared: Some(*line),
                }),
                Transport::Tcp { .. } => None,
            },
        }
    }

    fn changed(a: &ModbusSpec, b: &ModbusSpec, keys: &mut KeyChanges) {
        keys.key("url", &a.transport, &b.transport);
        keys.key("unit", &a.unit, &b.unit);
        keys.key("interval_ms", &a.interval, &b.interval);
        keys.key("timeout_ms", &a.timeout, &b.timeout);
        keys.key("topic", &a.topic, &b.topic);
        keys.key("mirror_topic", &a.mirror_topic, &b.mirror_topic);
        keys.key("registers", &a.registers, &b.registers);
    }

    fn build(
        spec: &ModbusSpec,
        env: &BuildEnv,
        ctx: &SourceContext,
    ) -> Result<BuiltSource, SourceError> {
        let stats = Arc::new(SourceStats::default());
        let reads = registers::plan(&spec.registers);
        // One poll waits at most for its connection and each request.
        let steps = u32::try_from(reads.len() + 1).unwrap_or(u32::MAX);
        let limit = crate::progress::SOURCE_LIMIT + spec.timeout.saturating_mul(steps);
        // Like a serial port's: a full queue drops the write (counted).
        let (tx, writes) = mpsc::channel(WRITE_QUEUE);
        let source = ModbusSource {
            writes,
            link: Link::new(&spec.transport, spec.unit, spec.timeout, stats.clone()),
            device: spec.transport.describe(),
            spec: spec.clone(),
            reads,
            stats: stats.clone(),
            beat: env.progress.watch("source", &spec.name, limit),
            mirror: spec.mirror_topic.is_some().then(|| env.local.clone()),
        };
        Ok(BuiltSource::new(
            source,
            stats,
            Some(Writes::Modbus(tx)),
            ctx,
        ))
    }
}

/// Functions' writes waiting for the device.
const WRITE_QUEUE: usize = 64;

/// A running Modbus source.
pub struct ModbusSource {
    spec: ModbusSpec,
    writes: mpsc::Receiver<ModbusWrite>,
    device: String,
    reads: Vec<Read>,
    link: Link,
    stats: Arc<SourceStats>,
    beat: Arc<Beat>,
    mirror: Option<rumqttc::AsyncClient>,
}

impl Source for ModbusSource {
    type Config = Self;

    fn build(source: Self, _ctx: &SourceContext) -> Result<Self, SourceError> {
        Ok(source)
    }

    async fn run(mut self, ctx: SourceContext) {
        let mut ticker = tokio::time::interval(self.spec.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut health = Health::default();
        loop {
            tokio::select! {
                () = ctx.cancel.cancelled() => break,
                Some(w) = self.writes.recv() => self.write(&w).await,
                _ = ticker.tick() => {
                    if health.retry_at.is_none_or(|at| Instant::now() >= at) {
                        self.poll(&mut health, &ctx).await;
                    }
                }
            }
        }
        tracing::debug!(source = %self.spec.name, "Modbus source stopped.");
    }
}

impl ModbusSource {
    /// One poll: an event if the device answered every request.
    async fn poll(&self, health: &mut Health, ctx: &SourceContext) {
        let mut event = Map::new();
        let registers = &self.spec.registers;
        self.beat.busy(Activity::Polling);
        let polled = self
            .link
            .poll(&self.reads, |read, answer| {
                registers::decode(registers, read, &answer, &mut event)
            })
            .await;
        self.beat.idle();
        match polled {
            Ok(()) => {
                health.answered(&self.spec.name, &self.device);
                self.stats.frames.fetch_add(1, Ordering::Relaxed);
                let payload = serde_json::Value::Object(event).to_string();
                dispatch(&self.spec, &self.device, self.mirror.as_ref(), payload, ctx).await;
            }
            Err(e) => self.failed(&e, health),
        }
    }

    /// A function's write: sent once; a failure is counted and logged, not
    /// retried (an actuator command should not fire late).
    async fn write(&self, w: &ModbusWrite) {
        self.beat.busy(Activity::Writing);
        let written = self.link.write(w).await;
        self.beat.idle();
        match written {
            Ok(()) => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
                let error = crate::text::chain(&e);
                tracing::warn!(source = %self.spec.name, device = %self.device, address = w.address, error = %error, "Modbus write failed.");
            }
        }
    }
}

/// Whether the device has been answering, and when to try again if not.
#[derive(Default)]
struct Health {
    failing: bool,
    /// Connection attempts failed in a row.
    attempts: u32,
    /// No new connection before this.
    retry_at: Option<Instant>,
}

impl Health {
    fn answered(&mut self, source: &str, device: &str) {
        if self.failing {
            tracing::info!(source, device, "Modbus device answers again.");
        }
        *self = Self::default();
    }
}

impl ModbusSource {
    /// Counts and logs a failed poll; a lost connection backs off.
    fn failed(&self, e: &CallError, health: &mut Health) {
        let s = &self.stats;
        s.failures.fetch_add(1, Ordering::Relaxed);
        match e {
            CallError::Exception(_) => s.exceptions.fetch_add(1, Ordering::Relaxed),
            CallError::Timeout(_) => s.timeouts.fetch_add(1, Ordering::Relaxed),
            CallError::Invalid(_) => s.invalid.fetch_add(1, Ordering::Relaxed),
            CallError::Transport(_) => 0,
        };
        if matches!(e, CallError::Transport(_)) {
            // Back-off before the next connection attempt.
            let wait = crate::mqtt::backoff(health.attempts.min(8)).max(Duration::from_millis(500));
            health.attempts = health.attempts.saturating_add(1);
            health.retry_at = Some(Instant::now() + wait);
        }
        let name = &self.spec.name;
        let error = crate::text::chain(e);
        if !health.failing {
            tracing::warn!(source = %name, device = %self.device, unit = self.spec.unit, error = %error, "Modbus poll failed; retrying.");
            health.failing = true;
        } else {
            tracing::debug!(source = %name, error = %error, "Modbus poll failed again.");
        }
    }
}

/// Sends one poll's event (and mirrors it). A free function: the source's
/// Modbus context may move between threads but not be shared.
async fn dispatch(
    spec: &ModbusSpec,
    device: &str,
    mirror: Option<&rumqttc::AsyncClient>,
    payload: String,
    ctx: &SourceContext,
) {
    if let (Some(local), Some(topic)) = (mirror, &spec.mirror_topic) {
        super::mirror(local, &spec.name, topic, payload.as_bytes()).await;
    }
    // WIT 0.1.x has no `modbus` source kind (see the module docs).
    let mut event = Event::new(SourceKind::Serial, spec.topic.clone(), payload);
    event.attributes = vec![
        ("protocol".into(), "modbus".into()),
        ("device".into(), device.to_owned()),
        ("unit".into(), spec.unit.to_string()),
    ];
    ctx.router.dispatch(event).await;
}

#[cfg(test)]
mod tests;
