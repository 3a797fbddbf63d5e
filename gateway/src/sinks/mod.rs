//! Sinks: delivery from the durable outbox to the cloud. Each kind is a
//! plug-in folder implementing [`SinkPlugin`] (its table and validation in
//! `<kind>/config.rs`, a fallible `build` that creates its clients and TLS
//! settings, which `edgefn check` runs too, and its task, [`Sink::run`]);
//! the kinds are listed once, in `sink_kinds!` below. Each configured sink runs one
//! delivery task that reads its records from the [`Outbox`] in sequence
//! order, the high lane's before the normal one's (see
//! [`crate::outbox::lane`]), sends them, and confirms each record only when
//! the other side has acknowledged *that* record (MQTT PUBACK for its packet
//! id, HTTP 2xx). Confirmed rows are deleted; everything else is sent again
//! after a reconnect or restart, so delivery is at-least-once and in order
//! within each lane, and the envelope's `id` (`<gateway>-<seq>`) lets the
//! cloud drop duplicates.
//!
//! Kinds: [`mqtt`] (3.1.1 or 5, QoS 1, TLS and mutual TLS) and [`http`]
//! (POSTed batches, retries with back-off and jitter).
//!
//! Records the other side *rejects* (HTTP 4xx, an MQTT 5 PUBACK with an
//! error reason) are not retried forever: they go to the local dead-letter
//! topic `edgefn/deadletter/sinks/<sink>` with the reason, then are removed.

pub mod envelope;
pub mod http;
pub mod mqtt;
mod plugin;

use plugin::sink_kinds;
pub use plugin::{BuiltSink, CommonKeys, SinkEnv, SinkError, SinkPlugin};

// The kinds of `[[sinks]]`: adding one is its folder, one line here, and its
// docs (see docs/adding-a-kind.md).
sink_kinds! {
    Mqtt(mqtt::Kind),
    Http(http::Kind),
}

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::SinkSpec;
use crate::metrics::GatewayMetrics;
use crate::outbox::{Outbox, StoredRecord};

/// What a running sink needs.
#[derive(Clone)]
pub struct SinkContext {
    /// The outbox it delivers from.
    pub outbox: Outbox,
    /// The gateway's id, for envelopes, topics and idempotency keys.
    pub gateway_id: String,
    /// Fires when the gateway stops, after the outbox has been flushed: the
    /// sink stops sending (what is left stays in the outbox for the next
    /// start) and gives outstanding acknowledgements a short grace.
    pub stop: CancellationToken,
    /// Gateway-wide counters.
    pub metrics: Arc<GatewayMetrics>,
    /// Per-sink delivery counters.
    pub stats: Arc<DeliveryStats>,
    /// The local broker, for dead letters.
    pub local: rumqttc::AsyncClient,
    /// Where cloud commands go: the functions' router, for an MQTT sink
    /// with `subscribe` (`None` otherwise: holding it would keep the
    /// workers from stopping). Dropped when `cancel` fires.
    pub router: Option<Arc<crate::router::Router>>,
    /// Fires when the gateway starts stopping (the sources' token): command
    /// intake stops and lets go of the router, delivery goes on until
    /// `stop`.
    pub cancel: CancellationToken,
}

/// Counters of one delivery task.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Records confirmed by the other side.
    pub delivered: AtomicU64,
    /// Records sent more than once (after a reconnect or retry).
    pub resent: AtomicU64,
    /// Records rejected and dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Connections (re)established.
    pub connects: AtomicU64,
    /// Failed attempts: connection errors, timeouts, 5xx. For an MQTT sink
    /// each one tears the connection down: its reconnects.
    pub failures: AtomicU64,
    /// Cloud commands received (MQTT sinks with `subscribe`).
    pub commands_received: AtomicU64,
    /// Cloud commands acknowledged to the cloud broker, once handled.
    pub commands_acked: AtomicU64,
    /// QoS 0 cloud commands dropped while the functions held the intake
    /// back.
    pub commands_dropped: AtomicU64,
}

impl crate::sources::mqtt::intake::IntakeCounters for DeliveryStats {
    fn taken(&self, _: &GatewayMetrics) {
        self.commands_received.fetch_add(1, Ordering::Relaxed);
    }

    fn acked(&self) {
        self.commands_acked.fetch_add(1, Ordering::Relaxed);
    }

    fn dropped(&self, _: &GatewayMetrics) {
        self.commands_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

impl SinkContext {
    /// What a delivery task reads from: its own outbox connection and the
    /// commit notifications of `sink`. `None` (logged) if the outbox cannot
    /// be read; the sink then does not run and its records wait.
    pub fn delivery_inputs(
        &self,
        sink: &str,
    ) -> Option<(crate::outbox::Reader, tokio::sync::watch::Receiver<u64>)> {
        let committed = self.outbox.committed(sink)?;
        match self.outbox.reader() {
            Ok(r) => Some((r, committed)),
            Err(e) => {
                tracing::error!(sink, error = %e, "Sink cannot read the outbox.");
                None
            }
        }
    }
}

/// Settings every sink kind has.
#[derive(Debug, Clone)]
pub struct SinkCommon {
    /// The sink's name.
    pub name: String,
    /// Envelope encoding.
    pub format: crate::config::EnvelopeFormat,
    /// Records per message or request at most.
    pub batch_max: usize,
    /// How long a partial batch waits to fill.
    pub batch_linger: Duration,
}

impl SinkCommon {
    /// The common part of `spec`.
    pub fn of(spec: &SinkSpec) -> Self {
        Self {
            name: spec.name.clone(),
            format: spec.format,
            batch_max: spec.batch_max,
            batch_linger: spec.batch_linger,
        }
    }
}

/// A built sink's delivery task.
pub trait Sink: Sized + Send + 'static {
    /// Delivers records from the outbox until `ctx.stop` fires.
    fn run(self, ctx: SinkContext) -> impl Future<Output = ()> + Send;

    /// The sink as a [`BuiltSink`].
    fn boxed(self) -> BuiltSink {
        Box::new(move |ctx| Box::pin(self.run(ctx)))
    }
}

/// How long a stopping sink waits for outstanding acknowledgements.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

/// The local dead-letter topic of a sink.
pub fn dead_letter_topic(sink: &str) -> String {
    format!("edgefn/deadletter/sinks/{sink}")
}

/// Publishes rejected records on the sink's dead-letter topic (QoS 1 on the
/// local broker) with the reason, and counts them.
pub async fn dead_letter(ctx: &SinkContext, sink: &str, reason: &str, records: &[StoredRecord]) {
    let body = serde_json::json!({
        "sink": sink,
        "reason": reason,
        "records": records.iter().map(|r| envelope::json_value(&ctx.gateway_id, r)).collect::<Vec<_>>(),
    });
    ctx.stats
        .dead_lettered
        .fetch_add(records.len() as u64, Ordering::Relaxed);
    tracing::error!(
        sink,
        reason,
        records = records.len(),
        "Records rejected by the sink; dead-lettered."
    );
    let topic = dead_letter_topic(sink);
    if let Err(e) = ctx
        .local
        .publish(topic, rumqttc::QoS::AtLeastOnce, false, body.to_string())
        .await
    {
        tracing::error!(sink, error = %e, "Dead letter could not be published.");
    }
}
