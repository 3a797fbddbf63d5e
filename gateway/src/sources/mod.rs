//! Sources: where events come from. Each kind lives in its own folder and
//! implements [`Source`]; the supervisor builds every source before starting
//! any task, then runs each on the task tracker.
//!
//! Kinds: [`mqtt`] (the local broker, subscribed to the functions'
//! triggers), [`serial`] (framed serial ports, with write-back), [`i2c`]
//! (polled embedded-hal sensor drivers) and [`timer`] (ticks at an interval
//! or at cron times).

pub mod i2c;
pub mod mqtt;
pub mod serial;
pub mod timer;

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;
use crate::router::Router;

/// What a running source needs.
#[derive(Debug, Clone)]
pub struct SourceContext {
    /// Cancelled when the gateway shuts down; the source must stop reading
    /// then (events already read are still dispatched).
    pub cancel: CancellationToken,
    /// Where events go.
    pub router: Arc<Router>,
    /// Gateway-wide counters.
    pub metrics: Arc<GatewayMetrics>,
    /// Set to `true` while the source is connected and subscribed, so the
    /// supervisor can report readiness.
    pub ready: Arc<tokio::sync::watch::Sender<bool>>,
}

/// A kind of event source.
pub trait Source: Sized + Send + 'static {
    /// The validated settings of this kind.
    type Config;
    /// Checks settings and prepares the source; starts no task.
    fn build(config: Self::Config, ctx: &SourceContext) -> Result<Self, SourceError>;
    /// Reads events and dispatches them until `ctx.cancel` fires.
    fn run(self, ctx: SourceContext) -> impl Future<Output = ()> + Send;
}

/// Why a source could not be built.
#[derive(Debug, thiserror::Error)]
#[error("source `{source_name}`: {reason}")]
pub struct SourceError {
    /// Which source.
    pub source_name: String,
    /// What is wrong.
    pub reason: String,
}

/// Publishes a serial frame or I2C reading on its source's `mirror_topic`
/// through the local publisher (QoS 0: a mirror is for watching, and must
/// never hold a device back).
pub(crate) async fn mirror(
    local: &rumqttc::AsyncClient,
    source: &str,
    topic: &str,
    payload: &[u8],
) {
    if let Err(e) = local
        .publish(topic, rumqttc::QoS::AtMostOnce, false, payload.to_vec())
        .await
    {
        tracing::warn!(source, error = %e, "Frame not mirrored.");
    }
}
