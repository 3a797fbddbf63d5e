//! The `[[sources]]` table of `kind = "i2c"` as written, its validation, and
//! the validated [`I2cSpec`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Scope;

/// `[[sources]]` with `kind = "i2c"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I2cSourceConfig {
    /// Unique name (in logs and events).
    pub name: String,
    /// The Linux I2C bus device.
    #[serde(default = "default_i2c_bus")]
    pub bus: PathBuf,
    /// `bme280` or `sht3x`.
    pub driver: I2cDriver,
    /// 7-bit address; default 0x76 for the BME280, 0x44 for the SHT3x.
    #[serde(default)]
    pub address: Option<u8>,
    /// Milliseconds between readings.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Topic of the events (a JSON reading each).
    pub topic: String,
    /// Also publish each reading on this local MQTT topic: with no function
    /// at all, this makes the source a plain I2C → MQTT bridge. Must not
    /// match a function's triggers, or the reading would be handled twice.
    #[serde(default)]
    pub mirror_topic: Option<String>,
}

fn default_i2c_bus() -> PathBuf {
    PathBuf::from("/dev/i2c-1")
}
fn default_interval_ms() -> u64 {
    5000
}

/// Supported I2C sensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum I2cDriver {
    /// Bosch BME280: temperature, pressure, humidity.
    Bme280,
    /// Sensirion SHT3x: temperature, humidity.
    Sht3x,
}

/// A validated I2C source.
#[derive(Debug, Clone, PartialEq)]
pub struct I2cSpec {
    /// Unique name.
    pub name: String,
    /// Bus device.
    pub bus: PathBuf,
    /// Driver.
    pub driver: I2cDriver,
    /// 7-bit address.
    pub address: u8,
    /// Poll interval.
    pub interval: Duration,
    /// Event topic.
    pub topic: String,
    /// Optional local MQTT mirror topic.
    pub mirror_topic: Option<String>,
}

/// Checks the I2C keys of `c`.
pub(super) fn validate(c: &I2cSourceConfig, scope: &mut Scope<'_, '_>) -> Option<I2cSpec> {
    let address = c.address.unwrap_or(match c.driver {
        I2cDriver::Bme280 => edgefn_drivers::sensors::bme280::ADDRESS_PRIMARY,
        I2cDriver::Sht3x => edgefn_drivers::sensors::sht3x::ADDRESS_PRIMARY,
    });
    if !(0x03..=0x77).contains(&address) {
        scope.add("address", "must be a 7-bit address between 0x03 and 0x77");
    }
    if !(10..=86_400_000).contains(&c.interval_ms) {
        scope.add("interval_ms", "must be between 10 and 86400000");
    }
    Some(I2cSpec {
        name: c.name.clone(),
        bus: c.bus.clone(),
        driver: c.driver,
        address,
        interval: Duration::from_millis(c.interval_ms),
        topic: c.topic.clone(),
        mirror_topic: c.mirror_topic.clone(),
    })
}
