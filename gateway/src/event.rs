//! The event: one input to the functions, whatever source it came from.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// The kind of source that produced an event (mirrors the WIT `source-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// An MQTT message on the local broker.
    Mqtt,
    /// A frame from a serial port.
    Serial,
    /// A reading from an I2C sensor.
    I2c,
    /// A timer tick.
    Timer,
    /// Injected by hand (`edgefn invoke`).
    Manual,
}

/// One input to the functions.
#[derive(Debug, Clone)]
pub struct Event {
    /// Where it came from.
    pub source: SourceKind,
    /// Its topic; functions are chosen by matching it against their triggers.
    pub topic: String,
    /// The raw payload.
    pub payload: Bytes,
    /// When the gateway received it, in milliseconds since the Unix epoch.
    pub received_at_ms: u64,
    /// Source-specific details.
    pub attributes: Vec<(String, String)>,
}

impl Event {
    /// An event received now.
    pub fn new(source: SourceKind, topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            source,
            topic: topic.into(),
            payload: payload.into(),
            received_at_ms: now_ms(),
            attributes: Vec::new(),
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
