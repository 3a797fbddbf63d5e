//! The `[[sources]]` table of `kind = "serial"` as written, its validation,
//! and the validated [`SerialSpec`].

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::Scope;

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

/// A validated serial source.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialSpec {
    /// Unique name.
    pub name: String,
    /// Device path.
    pub path: PathBuf,
    /// Line speed.
    pub baud: u32,
    /// 5..=8.
    pub data_bits: u8,
    /// Parity.
    pub parity: Parity,
    /// 1 or 2.
    pub stop_bits: u8,
    /// Flow control.
    pub flow_control: FlowControl,
    /// Framing, with its limits.
    pub framing: edgefn_drivers::codec::Framing,
    /// Event topic.
    pub topic: String,
    /// Optional local MQTT mirror topic.
    pub mirror_topic: Option<String>,
}

/// How a serial line is driven: what the serial and Modbus RTU sources
/// share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    /// Line speed.
    pub baud: u32,
    /// 5..=8.
    pub data_bits: u8,
    /// Parity.
    pub parity: Parity,
    /// 1 or 2.
    pub stop_bits: u8,
    /// Flow control.
    pub flow_control: FlowControl,
}

impl Line {
    /// Checks the line's keys (`baud`, `data_bits`, `stop_bits`).
    pub fn check(&self, scope: &mut Scope<'_, '_>) {
        if !(50..=4_000_000).contains(&self.baud) {
            scope.add("baud", "must be between 50 and 4000000");
        }
        if !(5..=8).contains(&self.data_bits) {
            scope.add("data_bits", "must be 5, 6, 7 or 8");
        }
        if !(1..=2).contains(&self.stop_bits) {
            scope.add("stop_bits", "must be 1 or 2");
        }
    }

    /// The port at `path` with these settings, ready to open.
    pub fn builder(&self, path: &str) -> tokio_serial::SerialPortBuilder {
        tokio_serial::new(path, self.baud)
            .data_bits(match self.data_bits {
                5 => tokio_serial::DataBits::Five,
                6 => tokio_serial::DataBits::Six,
                7 => tokio_serial::DataBits::Seven,
                _ => tokio_serial::DataBits::Eight,
            })
            .parity(match self.parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Odd => tokio_serial::Parity::Odd,
                Parity::Even => tokio_serial::Parity::Even,
            })
            .stop_bits(if self.stop_bits == 2 {
                tokio_serial::StopBits::Two
            } else {
                tokio_serial::StopBits::One
            })
            .flow_control(match self.flow_control {
                FlowControl::None => tokio_serial::FlowControl::None,
                FlowControl::Software => tokio_serial::FlowControl::Software,
                FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
            })
    }
}

impl SerialSpec {
    /// The line settings.
    pub fn line(&self) -> Line {
        Line {
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
            flow_control: self.flow_control,
        }
    }
}

/// Checks the serial keys of `c`.
pub(super) fn validate(c: &SerialSourceConfig, scope: &mut Scope<'_, '_>) -> Option<SerialSpec> {
    use edgefn_drivers::codec::{Endian, Framing, Width};
    Line {
        baud: c.baud,
        data_bits: c.data_bits,
        parity: c.parity,
        stop_bits: c.stop_bits,
        flow_control: c.flow_control,
    }
    .check(scope);
    let default_max = if c.framing == FramingKind::Nmea {
        82
    } else {
        1024
    };
    let max = c.max_frame.unwrap_or(default_max);
    if !(1..=65_535).contains(&max) {
        scope.add("max_frame", "must be between 1 and 65535");
    }
    if c.framing != FramingKind::LengthPrefixed
        && (c.length_width.is_some() || c.length_endian.is_some())
    {
        scope.add(
            "length_width",
            "only applies to `framing = \"length_prefixed\"`",
        );
    }
    let width = match c.length_width.unwrap_or(LengthWidth::U16) {
        LengthWidth::U8 => Width::U8,
        LengthWidth::U16 => Width::U16,
    };
    if width == Width::U8 && max > 255 && c.framing == FramingKind::LengthPrefixed {
        scope.add(
            "max_frame",
            "can be at most 255 with `length_width = \"u8\"`",
        );
    }
    let min = c.min_len.unwrap_or(1);
    if c.min_len.is_some() && c.framing != FramingKind::LengthPrefixed {
        scope.add("min_len", "only applies to `framing = \"length_prefixed\"`");
    } else if min > max {
        scope.add("min_len", format!("must be at most max_frame ({max})"));
    }
    let endian = match c.length_endian.unwrap_or(LengthEndian::Big) {
        LengthEndian::Big => Endian::Big,
        LengthEndian::Little => Endian::Little,
    };
    let framing = match c.framing {
        FramingKind::Lines => Framing::Lines { max },
        FramingKind::Cobs => Framing::Cobs { max },
        FramingKind::Slip => Framing::Slip { max },
        FramingKind::LengthPrefixed => Framing::LengthPrefixed {
            width,
            endian,
            min,
            max,
        },
        FramingKind::Nmea => Framing::Nmea { max },
        FramingKind::Pms5003 => Framing::Pms5003,
    };
    Some(SerialSpec {
        name: c.name.clone(),
        path: scope.resolve(&c.path),
        baud: c.baud,
        data_bits: c.data_bits,
        parity: c.parity,
        stop_bits: c.stop_bits,
        flow_control: c.flow_control,
        framing,
        topic: c.topic.clone(),
        mirror_topic: c.mirror_topic.clone(),
    })
}
