//! `[[sources]]` as written: serial ports and I2C sensors.

use super::*;

/// `[[sources]]`: a serial port or an I2C sensor, chosen by `kind`.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A serial port (UART, USB-serial adapter).
    Serial(SerialSourceConfig),
    /// An I2C sensor polled at an interval.
    I2c(I2cSourceConfig),
    /// A timer: ticks at an interval or at cron times.
    Timer(crate::sources::timer::TimerSourceConfig),
}

impl SourceConfig {
    /// The source's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Serial(c) => &c.name,
            Self::I2c(c) => &c.name,
            Self::Timer(c) => &c.name,
        }
    }
}

impl<'de> Deserialize<'de> for SourceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, table) = tagged::<D>(d)?;
        match kind.as_str() {
            "serial" => inner::<_, D::Error>(table).map(Self::Serial),
            "i2c" => inner::<_, D::Error>(table).map(Self::I2c),
            "timer" => inner::<_, D::Error>(table).map(Self::Timer),
            other => Err(serde::de::Error::custom(format!(
                "{NESTED_PATH}kind{NESTED_PATH}unknown source kind `{other}` (use \"serial\", \"i2c\" or \"timer\")"
            ))),
        }
    }
}

/// `[[sources]]` with `kind = "serial"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSourceConfig {
    /// Unique name; functions list it in `serial_ports` to write to it.
    pub name: String,
    /// Device path, e.g. `/dev/ttyUSB0` or a stable `/dev/serial/by-id/...`.
    pub path: PathBuf,
    /// Line speed.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5, 6, 7 or 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// `none`, `odd` or `even`.
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// `none`, `software` (XON/XOFF) or `hardware` (RTS/CTS).
    #[serde(default)]
    pub flow_control: FlowControl,
    /// How the byte stream is cut into frames: `lines`, `cobs`, `slip`,
    /// `length_prefixed`, `nmea` or `pms5003`.
    pub framing: FramingKind,
    /// Longest frame in bytes (default 1024; NMEA's standard is 82).
    #[serde(default)]
    pub max_frame: Option<usize>,
    /// `length_prefixed` only: `u8` or `u16`.
    #[serde(default)]
    pub length_width: Option<LengthWidth>,
    /// `length_prefixed` only: `big` or `little` (for `u16`).
    #[serde(default)]
    pub length_endian: Option<LengthEndian>,
    /// `length_prefixed` only: shortest frame in bytes (default 1). On a
    /// noisy line a stray `0x00` looks like an empty frame, so empty frames
    /// are counted invalid unless a device really sends them (`min_len = 0`).
    #[serde(default)]
    pub min_len: Option<usize>,
    /// Topic of the events (functions trigger on it like on MQTT topics).
    pub topic: String,
    /// Also publish each frame on this local MQTT topic (for dashboards and
    /// debugging). Must not match a function's triggers, or the frame would
    /// be handled twice.
    #[serde(default)]
    pub mirror_topic: Option<String>,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

/// Serial parity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs, reason = "self-explanatory")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

/// Serial flow control.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs, reason = "self-explanatory")]
pub enum FlowControl {
    #[default]
    None,
    Software,
    Hardware,
}

/// Serial framings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs, reason = "see edgefn_drivers::codec")]
pub enum FramingKind {
    Lines,
    Cobs,
    Slip,
    LengthPrefixed,
    Nmea,
    Pms5003,
}

/// Width of a length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs, reason = "self-explanatory")]
pub enum LengthWidth {
    U8,
    U16,
}

/// Byte order of a length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs, reason = "self-explanatory")]
pub enum LengthEndian {
    Big,
    Little,
}

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
