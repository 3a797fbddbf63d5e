//! The guest SDK: write an edgefn function in Rust.
//!
//! ```ignore
//! use edgefn_sdk::{Event, Function, publish_json};
//!
//! struct Hello;
//!
//! impl Function for Hello {
//!     fn handle(event: Event) -> Result<(), String> {
//!         let reading: serde_json::Value = event.json()?;
//!         publish_json("hello/out", &reading)?;
//!         Ok(())
//!     }
//! }
//!
//! edgefn_sdk::export!(Hello);
//! ```
//!
//! Build with `cargo build --profile guest --target wasm32-wasip2`; the result
//! is a component the gateway loads directly.
//!
//! Every host call is checked against the function's configuration: a publish
//! outside its `publish` filters or a forward to a sink not in its `sinks`
//! returns [`Error`] and never reaches a broker. Publishes and forwards are
//! sent only if the handler returns `Ok`; so are writes to the function's
//! durable state ([`kv`]).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[doc(hidden)]
#[allow(
    unsafe_code,
    clippy::too_many_arguments,
    reason = "wit-bindgen generates the canonical ABI glue"
)]
pub mod bindings {
    //! Guest-side bindings of `functions/wit` (generated once, here).
    wit_bindgen::generate!({
        path: "../wit",
        world: "function",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "edgefn_sdk::bindings",
    });
}

/// The trait a function implements: `fn handle(event: Event) -> Result<(), String>`.
pub use bindings::Guest as Function;
/// One input event.
pub use bindings::edgefn::function::types::Event;
pub use bindings::edgefn::function::types::{CallError, Level, Qos, SourceKind};
pub use bindings::edgefn::function::{gpio, host, modbus, serial};

pub mod kv;
/// Exports a type implementing [`Function`] as the component's handler:
/// `edgefn_sdk::export!(MyFunction);`.
pub use bindings::export;

/// An error from a host call or a payload helper; converts into the
/// handler's `String` error with `?`.
#[derive(Debug, Clone, PartialEq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<Error> for String {
    fn from(e: Error) -> Self {
        e.0
    }
}

impl From<CallError> for Error {
    fn from(e: CallError) -> Self {
        Error(match e {
            CallError::Denied(m) => format!("denied: {m}"),
            CallError::OverLimit(m) => format!("over limit: {m}"),
            CallError::Invalid(m) => format!("invalid: {m}"),
        })
    }
}

/// Deepest CBOR nesting [`Event::cbor`] accepts.
pub const MAX_CBOR_DEPTH: usize = 64;

impl Event {
    /// Parses the payload as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            Error(format!(
                "payload on `{}` is not the expected JSON: {e}",
                self.topic
            ))
        })
    }

    /// Parses the payload as CBOR. Nesting deeper than
    /// [`MAX_CBOR_DEPTH`] is an error (not a stack overflow), and length
    /// prefixes are never trusted for pre-allocation (serde caps it).
    pub fn cbor<T: DeserializeOwned>(&self) -> Result<T, Error> {
        ciborium::de::from_reader_with_recursion_limit(self.payload.as_slice(), MAX_CBOR_DEPTH)
            .map_err(|e| {
                Error(format!(
                    "payload on `{}` is not the expected CBOR: {e}",
                    self.topic
                ))
            })
    }

    /// The topic's level `index` (0-based): for `sensors/s1/temperature`,
    /// level 1 is `s1`.
    pub fn topic_level(&self, index: usize) -> Option<&str> {
        self.topic.split('/').nth(index)
    }

    /// A source attribute, such as `retain` for MQTT.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Publishes `payload` on the local broker at QoS 1.
pub fn publish(topic: &str, payload: impl AsRef<[u8]>) -> Result<(), Error> {
    Ok(host::publish(topic, payload.as_ref(), Qos::AtLeastOnce)?)
}

/// Publishes `payload` on the local broker at `qos`: `Qos::AtMostOnce` for
/// readings where the next one replaces a lost one and every packet counts.
pub fn publish_qos(topic: &str, payload: impl AsRef<[u8]>, qos: Qos) -> Result<(), Error> {
    Ok(host::publish(topic, payload.as_ref(), qos)?)
}

/// Publishes `value` as JSON on the local broker at QoS 1.
pub fn publish_json<T: Serialize + ?Sized>(topic: &str, value: &T) -> Result<(), Error> {
    publish(topic, to_json(value)?)
}

/// Forwards `payload` to the sink named `sink`.
pub fn forward(sink: &str, payload: impl AsRef<[u8]>) -> Result<(), Error> {
    Ok(host::forward(sink, payload.as_ref())?)
}

/// Forwards `value` as JSON to the sink named `sink`.
pub fn forward_json<T: Serialize + ?Sized>(sink: &str, value: &T) -> Result<(), Error> {
    forward(sink, to_json(value)?)
}

/// Writes `data` to the serial source named `port` (an actuator, a motor
/// controller…); the function must list the port in `serial_ports`.
pub fn serial_write(port: &str, data: impl AsRef<[u8]>) -> Result<(), Error> {
    Ok(serial::write(port, data.as_ref())?)
}

/// Writes `values` to the holding registers from `address` on the Modbus
/// source named `device`; the function must list the device in `modbus`.
/// Sent only if the handler returns `Ok`.
pub fn modbus_write_registers(device: &str, address: u16, values: &[u16]) -> Result<(), Error> {
    Ok(modbus::write_registers(device, address, values)?)
}

/// Sets the coils from `address` on the Modbus source named `device`; the
/// function must list the device in `modbus`. Sent only if the handler
/// returns `Ok`.
pub fn modbus_write_coils(device: &str, address: u16, values: &[bool]) -> Result<(), Error> {
    Ok(modbus::write_coils(device, address, values)?)
}

/// Sets the GPIO output named `line` (a `gpio_output` source) to `value`;
/// the function must list the line in `gpio`. Sent only if the handler
/// returns `Ok`.
pub fn gpio_set(line: &str, value: bool) -> Result<(), Error> {
    Ok(gpio::set(line, value)?)
}

/// A string from the function's `config` table.
pub fn config(key: &str) -> Option<String> {
    host::config(key)
}

/// A parsed value from the function's `config` table, or `default` when the
/// key is not set; an unparsable value is an error naming the key.
pub fn config_or<T: FromStr>(key: &str, default: T) -> Result<T, Error>
where
    T::Err: fmt::Display,
{
    match host::config(key) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|e| Error(format!("config `{key}` = `{raw}`: {e}"))),
    }
}

/// The id of the gateway running the function.
pub fn gateway_id() -> String {
    host::gateway_id()
}

/// Writes a line to the gateway's log at `level`.
pub fn log(level: Level, message: &str) {
    host::log(level, message);
}

pub(crate) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(|e| Error(format!("cannot encode JSON: {e}")))
}
