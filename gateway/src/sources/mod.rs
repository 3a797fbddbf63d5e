//! Sources: where events come from.
//!
//! Each kind of `[[sources]]` entry is a plug-in folder implementing
//! [`SourcePlugin`]: its table and validation (`<kind>/config.rs`), a
//! fallible `build` that creates devices, clients and timers before any task
//! starts, and its task ([`Source::run`]). The kinds are listed once, in
//! `source_kinds!` below; configuration, reload diffs and start-up only
//! dispatch on `kind` (see `docs/adding-a-kind.md`).
//!
//! Kinds: [`serial`] (framed serial ports, with write-back), [`i2c`]
//! (polled embedded-hal sensor drivers), [`timer`] (ticks at an interval
//! or at cron times), [`modbus`] (polled registers over TCP or RS-485),
//! [`gpio`] (edges of a GPIO input line) and [`gpio_output`] (a GPIO output
//! line functions set; it produces no events). The [`mqtt`] source, the local
//! broker subscribed to the functions' triggers, is not a `[[sources]]`
//! entry: every gateway has exactly one.

pub mod gpio;
pub mod gpio_output;
pub mod i2c;
pub mod modbus;
pub mod mqtt;
mod plugin;
pub mod serial;
pub mod timer;

use plugin::source_kinds;
pub use plugin::{BuildEnv, BuiltSource, Common, Port, SourcePlugin};

// The kinds of `[[sources]]`: adding one is its folder, one line here, and
// its docs (see docs/adding-a-kind.md).
source_kinds! {
    Serial(serial::Kind),
    I2c(i2c::Kind),
    Timer(timer::Kind),
    Modbus(modbus::Kind),
    Gpio(gpio::Kind),
    GpioOutput(gpio_output::Kind),
}

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

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
    /// The underlying error, if any.
    #[source]
    pub cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Counters of one `[[sources]]` entry (serial port, I2C sensor, timer…).
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Frames (or readings) turned into events.
    pub frames: AtomicU64,
    /// Malformed frames skipped.
    pub invalid: AtomicU64,
    /// Overlong frames skipped.
    pub oversize: AtomicU64,
    /// Bytes thrown away while resynchronising.
    pub discarded_bytes: AtomicU64,
    /// Times the device was opened.
    pub opened: AtomicU64,
    /// Failed opens, read errors, EOFs, failed polls.
    pub failures: AtomicU64,
    /// Writes sent to the device.
    pub written: AtomicU64,
    /// Writes dropped (device not open, or queue full).
    pub writes_dropped: AtomicU64,
    /// Timer ticks whose time passed while the timer could not fire
    /// (dropped under `catch_up = "skip"`, folded into one late tick under
    /// `"once"`).
    pub ticks_skipped: AtomicU64,
    /// Polls a device answered with a Modbus exception.
    pub exceptions: AtomicU64,
    /// Polls a device did not answer in time.
    pub timeouts: AtomicU64,
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
