//! The event: one input to the functions, whatever source it came from.

use std::sync::Arc;
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
    /// Acknowledges the input when the last holder lets go: the event's
    /// function workers and the outbox commit holding its forwards. `None`
    /// for inputs that need no acknowledgement.
    pub ack: Option<Arc<AckGuard>>,
}

/// Calls its closure once, when dropped: "this input is fully handled".
///
/// The acknowledgement rides on ownership, so there is no counter to keep in
/// step by hand: whoever still holds a clone of the event owes work.
pub struct AckGuard(Option<Box<dyn FnOnce() + Send + Sync>>);

impl AckGuard {
    /// A guard that runs `done` when dropped.
    pub fn new(done: impl FnOnce() + Send + Sync + 'static) -> Self {
        Self(Some(Box::new(done)))
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        if let Some(done) = self.0.take() {
            done();
        }
    }
}

impl std::fmt::Debug for AckGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AckGuard")
    }
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
            ack: None,
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
