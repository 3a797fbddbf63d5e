//! The I2C source: polls a sensor driver from `edgefn_drivers::sensors` on a
//! Linux I2C bus (`/dev/i2c-N`) at a fixed interval and turns each reading
//! into a JSON event on the configured topic.
//!
//! Bus access is blocking, so each poll runs on a blocking thread. A missing
//! bus, a NACK or a CRC error is a logged, counted, failed poll; the next
//! interval tries again (the bus is reopened if opening failed).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use edgefn_drivers::sensors::{bme280, sht3x};
use linux_embedded_hal::{Delay, I2cdev};

use super::serial::SourceStats;
use super::{Source, SourceContext, SourceError};
use crate::config::I2cSpec;
use crate::config::schema::I2cDriver;
use crate::event::{Event, SourceKind};
use crate::progress::{Activity, Beat};

/// The I2C source.
pub struct I2cSource {
    spec: I2cSpec,
    stats: Arc<SourceStats>,
    beat: Arc<Beat>,
}

/// What the I2C source needs.
pub struct I2cParts {
    /// The spec.
    pub spec: I2cSpec,
    /// Its counters.
    pub stats: Arc<SourceStats>,
    /// Its progress, for the watchdog ([`crate::progress`]).
    pub beat: Arc<Beat>,
}

impl Source for I2cSource {
    type Config = I2cParts;

    fn build(parts: I2cParts, _ctx: &SourceContext) -> Result<Self, SourceError> {
        Ok(Self {
            spec: parts.spec,
            stats: parts.stats,
            beat: parts.beat,
        })
    }

    async fn run(self, ctx: SourceContext) {
        let mut ticker = tokio::time::interval(self.spec.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut bus: Option<I2cdev> = None;
        let mut failing = false;
        loop {
            tokio::select! {
                () = ctx.cancel.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let spec = self.spec.clone();
            self.beat.busy(Activity::Polling);
            let polled = tokio::task::spawn_blocking(move || poll(bus, &spec)).await;
            self.beat.idle();
            let (kept, result) = match polled {
                Ok(r) => r,
                Err(e) => (None, Err(format!("poll task failed: {e}"))),
            };
            bus = kept;
            match result {
                Ok(reading) => {
                    if failing {
                        tracing::info!(source = %self.spec.name, "I2C sensor answers again.");
                        failing = false;
                    }
                    self.stats.frames.fetch_add(1, Ordering::Relaxed);
                    let mut event = Event::new(
                        SourceKind::I2c,
                        self.spec.topic.clone(),
                        reading.to_string(),
                    );
                    event.attributes = vec![
                        ("bus".into(), self.spec.bus.display().to_string()),
                        ("address".into(), format!("0x{:02x}", self.spec.address)),
                    ];
                    ctx.router.dispatch(event).await;
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(source = %self.spec.name, bus = %self.spec.bus.display(), address = self.spec.address, error = %e, "I2C poll failed; retrying every interval.");
                        failing = true;
                    } else {
                        tracing::debug!(source = %self.spec.name, error = %e, "I2C poll failed again.");
                    }
                }
            }
        }
        tracing::debug!(source = %self.spec.name, "I2C source stopped.");
    }
}

/// One reading; returns the bus (if open) for the next poll.
fn poll(
    bus: Option<I2cdev>,
    spec: &I2cSpec,
) -> (Option<I2cdev>, Result<serde_json::Value, String>) {
    let dev = match bus {
        Some(d) => d,
        None => match I2cdev::new(&spec.bus) {
            Ok(d) => d,
            Err(e) => {
                return (
                    None,
                    Err(format!("cannot open {}: {e}", spec.bus.display())),
                );
            }
        },
    };
    let mut delay = Delay;
    let (dev, reading) = match spec.driver {
        I2cDriver::Bme280 => {
            let mut s = bme280::Bme280::new(dev, spec.address);
            let r = s.measure(&mut delay).map(|m| {
                serde_json::json!({
                    "temperature_c": m.temperature_c(),
                    "pressure_hpa": m.pressure_hpa(),
                    "humidity_pct": m.humidity_pct(),
                })
            });
            (s.release(), r.map_err(|e| format!("{e:?}")))
        }
        I2cDriver::Sht3x => {
            let mut s = sht3x::Sht3x::new(dev, spec.address);
            let r = s.measure(&mut delay).map(|m| {
                serde_json::json!({
                    "temperature_c": m.temperature_c(),
                    "humidity_pct": m.humidity_pct(),
                })
            });
            (s.release(), r.map_err(|e| format!("{e:?}")))
        }
    };
    let reading = reading.map(|mut v| {
        v["sensor"] = spec.name.clone().into();
        v["driver"] = match spec.driver {
            I2cDriver::Bme280 => "bme280",
            I2cDriver::Sht3x => "sht3x",
        }
        .into();
        v
    });
    (Some(dev), reading)
}
