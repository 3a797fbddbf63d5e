//! The `[[sources]]` table of `kind = "modbus"` as written, its validation
//! (including the `[[sources.registers]]` it polls), and the validated
//! [`ModbusSpec`].

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Scope;
use crate::sources::serial::config::{FlowControl, Line, Parity};

/// Most registers (or coils) one source may poll.
pub const MAX_REGISTERS: usize = 256;

/// `[[sources]]` with `kind = "modbus"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusSourceConfig {
    /// Unique name (in logs, metrics and the events' attributes).
    pub name: String,
    /// Modbus TCP: `tcp://HOST[:PORT]` (port 502 by default). Exactly one
    /// of `url` and `path`.
    #[serde(default)]
    pub url: Option<String>,
    /// Modbus RTU: the serial device of the RS-485 bus. Several sources may
    /// name the same path (one per unit on the bus); they share the port
    /// and are polled in turn.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// RTU line speed.
    #[serde(default)]
    pub baud: Option<u32>,
    /// RTU data bits (default 8).
    #[serde(default)]
    pub data_bits: Option<u8>,
    /// RTU parity: `none`, `odd` or `even` (default `even`, as the Modbus
    /// serial line specification says).
    #[serde(default)]
    pub parity: Option<Parity>,
    /// RTU stop bits (default 1).
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// The device's unit (slave) id: 1–247 on a serial bus; 0–255 over
    /// TCP, where gateways route by it and plain devices ignore it.
    #[serde(default = "default_unit")]
    pub unit: u8,
    /// Milliseconds between polls.
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// How long one request may wait for its answer; a device that does
    /// not answer in time counts as a timeout and the poll is given up.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Topic of the events (one JSON object per poll).
    pub topic: String,
    /// Also publish each poll's event on this local MQTT topic (a plain
    /// Modbus → MQTT bridge without a function). Must not match a
    /// function's triggers.
    #[serde(default)]
    pub mirror_topic: Option<String>,
    /// What to read: one key of the event each.
    #[serde(default)]
    pub registers: Vec<RegisterConfig>,
}

fn default_unit() -> u8 {
    1
}
fn default_interval_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    1000
}

/// One `[[sources.registers]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// The event's key for this value.
    pub name: String,
    /// `holding`, `input`, `coil` or `discrete`.
    pub table: Table,
    /// The first register (or coil), 0-based as on the wire.
    pub address: u16,
    /// `u16`, `i16`, `u32`, `i32`, `f32` for registers; `bool` (the default
    /// and the only choice) for coils and discrete inputs.
    #[serde(default, rename = "type")]
    pub value: Option<ValueType>,
    /// 32-bit values: `big` (the first register holds the high word, the
    /// default) or `little`.
    #[serde(default)]
    pub word_order: Option<WordOrder>,
    /// Multiplies the value (e.g. `0.1` for a meter reporting decivolts).
    #[serde(default)]
    pub scale: Option<f64>,
}

/// The four Modbus data tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// Read/write 16-bit registers (function 3).
    Holding,
    /// Read-only 16-bit registers (function 4).
    Input,
    /// Read/write bits (function 1).
    Coil,
    /// Read-only bits (function 2).
    Discrete,
}

impl Table {
    /// Whether the table holds bits rather than 16-bit words.
    pub fn is_bits(self) -> bool {
        matches!(self, Self::Coil | Self::Discrete)
    }

    /// As written in the config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Holding => "holding",
            Self::Input => "input",
            Self::Coil => "coil",
            Self::Discrete => "discrete",
        }
    }
}

/// How a value is laid out in its registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
#[allow(missing_docs, reason = "self-explanatory")]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
}

impl ValueType {
    /// Registers (or bits) the value takes.
    pub fn width(self) -> u16 {
        match self {
            Self::U32 | Self::I32 | Self::F32 => 2,
            Self::U16 | Self::I16 | Self::Bool => 1,
        }
    }
}

/// The order of the two registers of a 32-bit value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// The first register holds the high word.
    #[default]
    Big,
    /// The first register holds the low word.
    Little,
}

/// Where the device is.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// Modbus TCP.
    Tcp {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// Modbus RTU on a serial line.
    Rtu {
        /// The serial device.
        path: PathBuf,
        /// Its settings.
        line: Line,
    },
}

impl Transport {
    /// For logs and the events' `device` attribute.
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp { host, port } => format!("tcp://{host}:{port}"),
            Self::Rtu { path, .. } => path.display().to_string(),
        }
    }
}

/// One validated register.
#[derive(Debug, Clone, PartialEq)]
pub struct Register {
    /// The event's key.
    pub name: String,
    /// Its table.
    pub table: Table,
    /// Its first address.
    pub address: u16,
    /// Its layout.
    pub value: ValueType,
    /// 32-bit word order.
    pub word_order: WordOrder,
    /// Multiplier, if any.
    pub scale: Option<f64>,
}

/// A validated Modbus source.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusSpec {
    /// Unique name.
    pub name: String,
    /// TCP or RTU.
    pub transport: Transport,
    /// Unit id.
    pub unit: u8,
    /// Poll interval.
    pub interval: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Event topic.
    pub topic: String,
    /// Optional local MQTT mirror topic.
    pub mirror_topic: Option<String>,
    /// What each poll reads.
    pub registers: Vec<Register>,
}

/// Checks the Modbus keys of `c`.
pub(super) fn validate(c: &ModbusSourceConfig, scope: &mut Scope<'_, '_>) -> Option<ModbusSpec> {
    let transport = transport(c, scope)?;
    let units = match transport {
        Transport::Tcp { .. } => 0..=255,
        Transport::Rtu { .. } => 1..=247,
    };
    if !units.contains(&c.unit) {
        let why = match transport {
            Transport::Tcp { .. } => "must be between 0 and 255",
            Transport::Rtu { .. } => "must be between 1 and 247 on a serial bus (0 is broadcast)",
        };
        scope.add("unit", why);
    }
    if !(10..=86_400_000).contains(&c.interval_ms) {
        scope.add("interval_ms", "must be between 10 and 86400000");
    }
    if !(10..=60_000).contains(&c.timeout_ms) {
        scope.add("timeout_ms", "must be between 10 and 60000");
    }
    Some(ModbusSpec {
        name: c.name.clone(),
        transport,
        unit: c.unit,
        interval: Duration::from_millis(c.interval_ms),
        timeout: Duration::from_millis(c.timeout_ms),
        topic: c.topic.clone(),
        mirror_topic: c.mirror_topic.clone(),
        registers: registers(&c.registers, scope),
    })
}

/// `url` or `path` with its line settings.
fn transport(c: &ModbusSourceConfig, scope: &mut Scope<'_, '_>) -> Option<Transport> {
    let line_keys = [
        ("baud", c.baud.is_some()),
        ("data_bits", c.data_bits.is_some()),
        ("parity", c.parity.is_some()),
        ("stop_bits", c.stop_bits.is_some()),
    ];
    match (&c.url, &c.path) {
        (Some(url), None) => {
            for (key, set) in line_keys {
                if set {
                    scope.add(key, "only applies to Modbus RTU (`path`), not to `url`");
                }
            }
            match parse_url(url) {
                Ok((host, port)) => Some(Transport::Tcp { host, port }),
                Err(why) => {
                    scope.add("url", format!("`{url}`: {why}"));
                    None
                }
            }
        }
        (None, Some(path)) => {
            let line = Line {
                baud: c.baud.unwrap_or(9600),
                data_bits: c.data_bits.unwrap_or(8),
                parity: c.parity.unwrap_or(Parity::Even),
                stop_bits: c.stop_bits.unwrap_or(1),
                flow_control: FlowControl::None,
            };
            line.check(scope);
            Some(Transport::Rtu {
                path: scope.resolve(path),
                line,
            })
        }
        (Some(_), Some(_)) => {
            scope.add(
                "url",
                "give either `url` (Modbus TCP) or `path` (RTU), not both",
            );
            None
        }
        (None, None) => {
            scope.add(
                "url",
                "missing: give `url = \"tcp://HOST:PORT\"` (Modbus TCP) or `path` (RTU)",
            );
            None
        }
    }
}

/// `tcp://HOST[:PORT]` → host and port (502 by default).
fn parse_url(url: &str) -> Result<(String, u16), String> {
    let Some(rest) = url.strip_prefix("tcp://") else {
        return Err("must start with `tcp://`".into());
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = match rest.rsplit_once(':') {
        // `[::1]:502` or `host:502`; a bare IPv6 address has several colons
        // and no brackets.
        Some((h, p)) if !h.contains(':') || h.ends_with(']') => {
            let port = p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("`{p}` is not a TCP port (1-65535)"))?;
            (h, port)
        }
        _ => (rest, 502),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err("needs a host name or address, as in `tcp://192.168.1.50:502`".into());
    }
    Ok((host.to_owned(), port))
}

/// Checks every `[[sources.registers]]` entry, and that no two overlap.
fn registers(list: &[RegisterConfig], scope: &mut Scope<'_, '_>) -> Vec<Register> {
    if list.is_empty() {
        scope.add(
            "registers",
            "at least one `[[sources.registers]]` is needed",
        );
    }
    if list.len() > MAX_REGISTERS {
        scope.add("registers", format!("at most {MAX_REGISTERS} per source"));
    }
    let mut out: Vec<Register> = Vec::with_capacity(list.len());
    for (i, r) in list.iter().enumerate() {
        let key = |field: &str| format!("registers[{i}].{field}");
        let value = match (r.table.is_bits(), r.value) {
            (true, None | Some(ValueType::Bool)) => ValueType::Bool,
            (false, None) => ValueType::U16,
            (false, Some(ValueType::Bool)) => {
                scope.add(
                    &key("type"),
                    format!(
                        "`bool` is for coils and discrete inputs, not `{}` registers",
                        r.table.name()
                    ),
                );
                ValueType::U16
            }
            (true, Some(_)) => {
                scope.add(
                    &key("type"),
                    format!("`{}` holds bits: its only type is `bool`", r.table.name()),
                );
                ValueType::Bool
            }
            (false, Some(v)) => v,
        };
        if r.name.is_empty() {
            scope.add(&key("name"), "must not be empty");
        } else if let Some(j) = out.iter().position(|o| o.name == r.name) {
            scope.add(
                &key("name"),
                format!("duplicate register name (also registers[{j}])"),
            );
        }
        if r.word_order.is_some() && value.width() != 2 {
            scope.add(
                &key("word_order"),
                "only applies to 32-bit types (u32, i32, f32)",
            );
        }
        if let Some(s) = r.scale {
            if value == ValueType::Bool {
                scope.add(&key("scale"), "does not apply to bits");
            } else if !s.is_finite() || s == 0.0 {
                scope.add(&key("scale"), "must be a finite, non-zero number");
            }
        }
        let last = u32::from(r.address) + u32::from(value.width()) - 1;
        if last > u32::from(u16::MAX) {
            scope.add(
                &key("address"),
                format!(
                    "a {}-register value cannot start at {}",
                    value.width(),
                    r.address
                ),
            );
        }
        let reg = Register {
            name: r.name.clone(),
            table: r.table,
            address: r.address,
            value,
            word_order: r.word_order.unwrap_or_default(),
            scale: r.scale,
        };
        if let Some((j, o)) = out.iter().enumerate().find(|(_, o)| overlaps(o, &reg)) {
            scope.add(
                &key("address"),
                format!(
                    "overlaps registers[{j}] (`{}`, {} {}..={})",
                    o.name,
                    o.table.name(),
                    o.address,
                    u32::from(o.address) + u32::from(o.value.width()) - 1
                ),
            );
        }
        out.push(reg);
    }
    out
}

fn overlaps(a: &Register, b: &Register) -> bool {
    let end = |r: &Register| u32::from(r.address) + u32::from(r.value.width());
    a.table == b.table && u32::from(a.address) < end(b) && u32::from(b.address) < end(a)
}
