//! The I2C source: polls a sensor driver from `edgefn_drivers::sensors` on a
//! Linux I2C bus (`/dev/i2c-N`) at a fixed interval and turns each reading
//! into a JSON event on the configured topic (and, with `mirror_topic`,
//! publishes it on the local broker too: with no function, a plain
//! I2C → MQTT bridge).
//!
//! Bus access is blocking, so each poll runs on a blocking thread. The
//! driver is kept between polls, so what it reads once (the BME280's factory
//! calibration) is read once. A missing bus, a NACK or a CRC error is a
//! logged, counted, failed poll; the next interval tries again (the bus is
//! reopened if opening failed, and the driver starts afresh after a failed
//! poll: the chip may have been reset or swapped).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use edgefn_drivers::sensors::{bme280, sht3x};
use embedded_hal::i2c::I2c;
use linux_embedded_hal::{Delay, I2cdev};

pub mod config;

use super::SourceStats;
use super::{BuildEnv, BuiltSource, Common, Source, SourceContext, SourceError, SourcePlugin};
use crate::config::KeyChanges;
use crate::event::{Event, SourceKind};
use crate::progress::{Activity, Beat};
use config::{I2cDriver, I2cSourceConfig, I2cSpec};

/// Opens a bus: `/dev/i2c-N` in the gateway, a mock bus in tests.
pub type BusOpener<B> = Arc<dyn Fn(&Path) -> Result<B, String> + Send + Sync>;

/// The I2C source, over buses of type `B`.
pub struct I2cSource<B = I2cdev> {
    spec: I2cSpec,
    stats: Arc<SourceStats>,
    beat: Arc<Beat>,
    mirror: Option<rumqttc::AsyncClient>,
    open: BusOpener<B>,
}

/// What the I2C source needs.
pub struct I2cParts {
    /// The spec.
    pub spec: I2cSpec,
    /// Its counters.
    pub stats: Arc<SourceStats>,
    /// Its progress, for the watchdog ([`crate::progress`]).
    pub beat: Arc<Beat>,
    /// The local broker, for `mirror_topic`.
    pub local: rumqttc::AsyncClient,
}

/// `kind = "i2c"`.
pub struct Kind;

impl SourcePlugin for Kind {
    const KIND: &'static str = "i2c";
    type Config = I2cSourceConfig;
    type Spec = I2cSpec;

    fn name(config: &I2cSourceConfig) -> &str {
        &config.name
    }

    fn validate(
        config: &I2cSourceConfig,
        scope: &mut crate::config::Scope<'_, '_>,
    ) -> Option<I2cSpec> {
        config::validate(config, scope)
    }

    fn common(spec: &I2cSpec) -> Common<'_> {
        Common {
            name: &spec.name,
            topic: Some(&spec.topic),
            mirror_topic: spec.mirror_topic.as_deref(),
            writable: false,
            port: None,
        }
    }

    fn changed(a: &I2cSpec, b: &I2cSpec, keys: &mut KeyChanges) {
        keys.key("bus", &a.bus, &b.bus);
        keys.key("driver", &a.driver, &b.driver);
        keys.key("address", &a.address, &b.address);
        keys.key("interval_ms", &a.interval, &b.interval);
        keys.key("topic", &a.topic, &b.topic);
        keys.key("mirror_topic", &a.mirror_topic, &b.mirror_topic);
    }

    fn build(
        spec: &I2cSpec,
        env: &BuildEnv,
        ctx: &SourceContext,
    ) -> Result<BuiltSource, SourceError> {
        let stats = Arc::new(SourceStats::default());
        let source = I2cSource::build(
            I2cParts {
                spec: spec.clone(),
                stats: stats.clone(),
                beat: env.beat(&spec.name),
                local: env.local.clone(),
            },
            ctx,
        )?;
        Ok(BuiltSource::new(source, stats, None, ctx))
    }
}

impl Source for I2cSource {
    type Config = I2cParts;

    fn build(parts: I2cParts, _ctx: &SourceContext) -> Result<Self, SourceError> {
        let open: BusOpener<I2cdev> = Arc::new(|path: &Path| {
            I2cdev::new(path).map_err(|e| format!("cannot open {}: {e}", path.display()))
        });
        Ok(Self::with_bus(parts, open))
    }

    async fn run(self, ctx: SourceContext) {
        self.poll_until_cancelled(ctx).await;
    }
}

/// Why a poll failed.
struct Failed {
    reason: String,
    /// The sensor answered with a malformed reading (a CRC mismatch).
    invalid: bool,
}

impl<B: I2c + Send + 'static> I2cSource<B> {
    /// A source whose bus is opened by `open`.
    pub fn with_bus(parts: I2cParts, open: BusOpener<B>) -> Self {
        let mirror = parts.spec.mirror_topic.is_some().then_some(parts.local);
        Self {
            spec: parts.spec,
            stats: parts.stats,
            beat: parts.beat,
            mirror,
            open,
        }
    }

    /// Polls every interval until `ctx.cancel` fires.
    pub async fn poll_until_cancelled(self, ctx: SourceContext) {
        let mut ticker = tokio::time::interval(self.spec.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sensor: Option<Sensor<B>> = None;
        let mut failing = false;
        loop {
            tokio::select! {
                () = ctx.cancel.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let spec = self.spec.clone();
            let open = self.open.clone();
            self.beat.busy(Activity::Polling);
            let polled = tokio::task::spawn_blocking(move || poll(sensor, &spec, &*open)).await;
            self.beat.idle();
            let (kept, result) = match polled {
                Ok(r) => r,
                Err(e) => (
                    None,
                    Err(Failed {
                        reason: format!("poll task failed: {e}"),
                        invalid: false,
                    }),
                ),
            };
            sensor = kept;
            match result {
                Ok(reading) => {
                    if failing {
                        tracing::info!(source = %self.spec.name, "I2C sensor answers again.");
                        failing = false;
                    }
                    self.stats.frames.fetch_add(1, Ordering::Relaxed);
                    self.dispatch(reading, &ctx).await;
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    if e.invalid {
                        self.stats.invalid.fetch_add(1, Ordering::Relaxed);
                    }
                    if !failing {
                        tracing::warn!(source = %self.spec.name, bus = %self.spec.bus.display(), address = self.spec.address, error = %e.reason, "I2C poll failed; retrying every interval.");
                        failing = true;
                    } else {
                        tracing::debug!(source = %self.spec.name, error = %e.reason, "I2C poll failed again.");
                    }
                }
            }
        }
        tracing::debug!(source = %self.spec.name, "I2C source stopped.");
    }

    async fn dispatch(&self, reading: serde_json::Value, ctx: &SourceContext) {
        let payload = reading.to_string();
        if let (Some(local), Some(topic)) = (&self.mirror, &self.spec.mirror_topic) {
            super::mirror(local, &self.spec.name, topic, payload.as_bytes()).await;
        }
        let mut event = Event::new(SourceKind::I2c, self.spec.topic.clone(), payload);
        event.attributes = vec![
            ("bus".into(), self.spec.bus.display().to_string()),
            ("address".into(), format!("0x{:02x}", self.spec.address)),
        ];
        ctx.router.dispatch(event).await;
    }
}

/// A driver with its bus.
enum Sensor<B> {
    Bme280(bme280::Bme280<B>),
    Sht3x(sht3x::Sht3x<B>),
}

impl<B: I2c> Sensor<B> {
    fn new(bus: B, spec: &I2cSpec) -> Self {
        match spec.driver {
            I2cDriver::Bme280 => Self::Bme280(bme280::Bme280::new(bus, spec.address)),
            I2cDriver::Sht3x => Self::Sht3x(sht3x::Sht3x::new(bus, spec.address)),
        }
    }

    fn release(self) -> B {
        match self {
            Self::Bme280(s) => s.release(),
            Self::Sht3x(s) => s.release(),
        }
    }

    fn measure(&mut self) -> Result<serde_json::Value, Failed> {
        let mut delay = Delay;
        let failed = |reason: String, invalid: bool| Failed { reason, invalid };
        match self {
            Self::Bme280(s) => s
                .measure(&mut delay)
                .map(|m| {
                    serde_json::json!({
                        "temperature_c": m.temperature_c(),
                        "pressure_hpa": m.pressure_hpa(),
                        "humidity_pct": m.humidity_pct(),
                    })
                })
                .map_err(|e| failed(format!("{e:?}"), false)),
            Self::Sht3x(s) => s
                .measure(&mut delay)
                .map(|m| {
                    serde_json::json!({
                        "temperature_c": m.temperature_c(),
                        "humidity_pct": m.humidity_pct(),
                    })
                })
                .map_err(|e| failed(format!("{e:?}"), matches!(e, sht3x::Error::Crc))),
        }
    }
}

/// One reading; returns the driver (if the bus is open) for the next poll.
fn poll<B: I2c>(
    sensor: Option<Sensor<B>>,
    spec: &I2cSpec,
    open: &(dyn Fn(&Path) -> Result<B, String> + Send + Sync),
) -> (Option<Sensor<B>>, Result<serde_json::Value, Failed>) {
    let mut sensor = match sensor {
        Some(s) => s,
        None => match open(&spec.bus) {
            Ok(bus) => Sensor::new(bus, spec),
            Err(reason) => {
                let invalid = false;
                return (None, Err(Failed { reason, invalid }));
            }
        },
    };
    match sensor.measure() {
        Ok(mut v) => {
            v["sensor"] = spec.name.clone().into();
            v["driver"] = match spec.driver {
                I2cDriver::Bme280 => "bme280",
                I2cDriver::Sht3x => "sht3x",
            }
            .into();
            (Some(sensor), Ok(v))
        }
        // Keep the bus, start the driver afresh.
        Err(e) => (Some(Sensor::new(sensor.release(), spec)), Err(e)),
    }
}

#[cfg(test)]
mod tests;
