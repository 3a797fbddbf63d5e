//! Sinks: where forwarded records go. Each kind lives in its own folder and
//! implements [`Sink`]; each sink runs as one delivery task fed by a bounded
//! queue of [`SinkRecord`]s.
//!
//! Kinds: [`mqtt`] (a cloud MQTT broker, QoS 1, optional mutual TLS).
//!
//! Not yet crash-safe: records wait in memory until their broker acknowledges
//! them. The durable SQLite outbox replaces that queue in its own issue.

pub mod envelope;
pub mod mqtt;

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;

/// One forwarded payload on its way to a sink.
#[derive(Debug, Clone)]
pub struct SinkRecord {
    /// The function that forwarded it.
    pub function: String,
    /// The topic of the event the function handled.
    pub source_topic: String,
    /// What the function forwarded.
    pub payload: Bytes,
    /// When it was forwarded, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
}

/// What a running sink needs.
#[derive(Debug)]
pub struct SinkContext {
    /// Records to deliver; closed when every function worker has stopped.
    pub records: mpsc::Receiver<SinkRecord>,
    /// The gateway's id, for envelopes and topics.
    pub gateway_id: String,
    /// Fires when the gateway shuts down; a sink keeps delivering what is
    /// queued until `records` closes, then gives outstanding acknowledgements
    /// a short grace period.
    pub cancel: CancellationToken,
    /// Gateway-wide counters.
    pub metrics: Arc<GatewayMetrics>,
}

/// A kind of sink.
pub trait Sink: Sized + Send + 'static {
    /// The validated settings of this kind.
    type Config;
    /// Prepares the sink; starts no task.
    fn build(config: &Self::Config) -> Self;
    /// Delivers records until the queue closes.
    fn run(self, ctx: SinkContext) -> impl Future<Output = ()> + Send;
}
