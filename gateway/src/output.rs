//! Where a successful invocation's outputs go: publishes to the local broker
//! (through a connection of their own), forwards into the durable outbox,
//! writes to the queues of the serial, Modbus and GPIO output sources.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, EventLoop, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::MqttEndpoint;
use crate::event::{Event, now_ms};
use crate::metrics::{FunctionMetrics, GatewayMetrics};
use crate::outbox::{Lane, NewRecord, Outbox};
use crate::progress::{Activity, Beat};
use crate::sources::SourceStats;
use crate::text::bounded;

/// Longest failure reason in a dead letter.
pub const REASON_BYTES: usize = 4096;

/// A message the function asked to publish on the local broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// MQTT QoS level (0, 1 or 2).
    pub qos: u8,
}

/// A payload the function asked to forward to a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Sink name.
    pub sink: String,
    /// Payload.
    pub payload: Bytes,
}

/// Bytes the function asked to write to a serial port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialWrite {
    /// The serial source's name.
    pub port: String,
    /// The bytes.
    pub data: Bytes,
}

/// Values the function asked to write to a Modbus device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModbusValues {
    /// Holding registers (function 16).
    Registers(Vec<u16>),
    /// Coils (function 15).
    Coils(Vec<bool>),
}

/// A write the function asked for on a Modbus source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModbusWrite {
    /// The Modbus source's name.
    pub device: String,
    /// The first register or coil.
    pub address: u16,
    /// What to write there.
    pub values: ModbusValues,
}

/// A value the function asked to set on a GPIO output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpioWrite {
    /// The GPIO output source's name.
    pub line: String,
    /// The value (`true`: active).
    pub value: bool,
}

/// Everything one successful invocation produced, in call order per kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outputs {
    /// Local publishes.
    pub publishes: Vec<Publish>,
    /// Forwards to sinks.
    pub forwards: Vec<Forward>,
    /// Writes to serial ports.
    pub serial_writes: Vec<SerialWrite>,
    /// Writes to Modbus devices.
    pub modbus_writes: Vec<ModbusWrite>,
    /// Values for GPIO outputs.
    pub gpio_writes: Vec<GpioWrite>,
}

/// Hands outputs to the local broker and the outbox. Cloned into every
/// function worker.
#[derive(Debug, Clone)]
pub struct OutputPort {
    local: AsyncClient,
    outbox: Outbox,
    writers: Arc<Writers>,
}

/// The write queue of a writable source.
#[derive(Debug)]
pub enum Writes {
    /// Bytes for a serial port.
    Serial(mpsc::Sender<Bytes>),
    /// Register and coil writes for a Modbus device.
    Modbus(mpsc::Sender<ModbusWrite>),
    /// Values for a GPIO output.
    Gpio(mpsc::Sender<bool>),
}

/// Write queues of the writable sources, by source name, with their
/// counters.
#[derive(Debug, Default)]
pub struct Writers {
    /// Serial sources.
    pub serial: HashMap<String, (mpsc::Sender<Bytes>, Arc<SourceStats>)>,
    /// Modbus sources.
    pub modbus: HashMap<String, (mpsc::Sender<ModbusWrite>, Arc<SourceStats>)>,
    /// GPIO outputs.
    pub gpio: HashMap<String, (mpsc::Sender<bool>, Arc<SourceStats>)>,
}

impl Writers {
    /// Adds the queue of the source `name`.
    pub fn insert(&mut self, name: String, writes: Writes, stats: Arc<SourceStats>) {
        match writes {
            Writes::Serial(q) => {
                self.serial.insert(name, (q, stats));
            }
            Writes::Modbus(q) => {
                self.modbus.insert(name, (q, stats));
            }
            Writes::Gpio(q) => {
                self.gpio.insert(name, (q, stats));
            }
        }
    }
}

/// Queues `item` for a device without waiting: a full queue drops it (an
/// actuator command should not fire late) and counts the drop.
pub(crate) fn offer<T>(
    queue: &mpsc::Sender<T>,
    stats: &SourceStats,
    item: T,
    function: &str,
    source: &str,
) {
    if queue.try_send(item).is_err() {
        stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            function,
            source,
            "Write dropped: the device's queue is full."
        );
    }
}

impl OutputPort {
    /// A port publishing through `local`, forwarding into `outbox` and
    /// writing to the sources in `writers`.
    pub fn new(local: AsyncClient, outbox: Outbox, writers: Writers) -> Self {
        Self {
            local,
            outbox,
            writers: Arc::new(writers),
        }
    }

    /// Sends `outputs` of `function`, produced while handling `event`. The
    /// forwards are appended to the outbox holding a reference to the event,
    /// so the event is acknowledged only after they are committed. Waits
    /// while a queue is full (back-pressure to the function's worker); a
    /// wait for room in the outbox is idle for `beat` (deliberate
    /// back-pressure, not a stall). The forwards wait in `lane` (the
    /// function's priority).
    pub async fn deliver(
        &self,
        function: &str,
        lane: Lane,
        event: &Arc<Event>,
        outputs: Outputs,
        metrics: &FunctionMetrics,
        beat: &Beat,
    ) {
        for p in outputs.publishes {
            let qos = match p.qos {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                _ => QoS::ExactlyOnce,
            };
            // Counted before it goes out, so whoever receives it sees it
            // counted; taken back if it could not be queued.
            metrics.published.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self
                .local
                .publish(p.topic.clone(), qos, false, p.payload.to_vec())
                .await
            {
                metrics.published.fetch_sub(1, Ordering::Relaxed);
                tracing::error!(function, topic = %p.topic, error = %e, "Publish could not be queued.");
            }
        }
        // Never wait on a device: a full queue drops the command.
        for w in outputs.serial_writes {
            if let Some((queue, stats)) = self.writers.serial.get(&w.port) {
                offer(queue, stats, w.data, function, &w.port);
            }
        }
        for w in outputs.modbus_writes {
            if let Some((queue, stats)) = self.writers.modbus.get(&w.device) {
                let device = w.device.clone();
                offer(queue, stats, w, function, &device);
            }
        }
        for w in outputs.gpio_writes {
            if let Some((queue, stats)) = self.writers.gpio.get(&w.line) {
                offer(queue, stats, w.value, function, &w.line);
            }
        }
        if outputs.forwards.is_empty() {
            return;
        }
        let ts_ms = now_ms();
        let n = outputs.forwards.len() as u64;
        let records = outputs
            .forwards
            .into_iter()
            .map(|f| NewRecord {
                sink: f.sink,
                function: function.to_owned(),
                topic: event.topic.clone(),
                payload: f.payload,
                ts_ms,
                lane,
            })
            .collect();
        beat.idle();
        let appended = self
            .outbox
            .append(records, Some(Box::new(event.clone())))
            .await;
        beat.busy(Activity::Delivering);
        match appended {
            Ok(()) => {
                metrics.forwarded.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(function, error = %e, "Forwards not stored; the input stays unacknowledged.")
            }
        }
    }
}

/// The most of an event's payload a dead letter carries when the whole one
/// would not fit in one message of the local broker.
pub const DEAD_LETTER_PAYLOAD_BYTES: usize = 64 * 1024;

/// Sets `payload` (UTF-8 text) or `payload_base64` (anything else).
fn put_payload(body: &mut serde_json::Value, payload: &[u8]) {
    use base64::Engine as _;
    if let Some(o) = body.as_object_mut() {
        o.remove("payload");
        o.remove("payload_base64");
    }
    match std::str::from_utf8(payload) {
        Ok(text) => body["payload"] = text.into(),
        Err(e) if e.error_len().is_none() && e.valid_up_to() + 4 > payload.len() => {
            // A cut through a multi-byte character: drop the partial one.
            body["payload"] = String::from_utf8_lossy(&payload[..e.valid_up_to()]).into();
        }
        Err(_) => {
            body["payload_base64"] = base64::engine::general_purpose::STANDARD
                .encode(payload)
                .into();
        }
    }
}

/// The dead-letter topic of `function` (`$`-topics cannot be used: the
/// embedded broker refuses subscriptions to them).
pub fn dead_letter_topic(function: &str) -> String {
    format!("edgefn/deadletter/functions/{function}")
}

/// Which function (and version) a dead letter is about.
#[derive(Debug, Clone, Copy)]
pub struct FunctionRef<'a> {
    /// Its name.
    pub name: &'a str,
    /// The version that failed.
    pub version: &'a str,
    /// Its counters.
    pub metrics: &'a FunctionMetrics,
}

impl OutputPort {
    /// Publishes `event` on `function`'s dead-letter topic (QoS 1) with the
    /// reason, instead of letting it vanish, and counts it. The reason is at
    /// most [`REASON_BYTES`] of the guest's text plus its prefix; a payload that would not fit in one message of
    /// the local broker is cut to [`DEAD_LETTER_PAYLOAD_BYTES`] and marked
    /// (`payload_bytes`, `payload_cut`), so the dead letter always arrives.
    pub async fn dead_letter(
        &self,
        function: FunctionRef<'_>,
        event: &Event,
        kind: &str,
        reason: &str,
        elapsed: Option<Duration>,
    ) {
        let mut body = serde_json::json!({
            "function": function.name,
            "version": function.version,
            "failure": kind,
            // The guest's part is already cut to REASON_BYTES; this bounds
            // the whole (failure prefix included) as a last resort.
            "reason": bounded(reason, REASON_BYTES + 1024),
            "topic": event.topic,
            "received_at_ms": event.received_at_ms,
        });
        put_payload(&mut body, &event.payload);
        if body.to_string().len() > crate::broker::MAX_PAYLOAD_BYTES - 1024 {
            let cut = &event.payload[..DEAD_LETTER_PAYLOAD_BYTES.min(event.payload.len())];
            put_payload(&mut body, cut);
            body["payload_bytes"] = event.payload.len().into();
            body["payload_cut"] = true.into();
        }
        if let Some(e) = elapsed {
            body["elapsed_us"] = u64::try_from(e.as_micros()).unwrap_or(u64::MAX).into();
        }
        function
            .metrics
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
        let topic = dead_letter_topic(function.name);
        if let Err(e) = self
            .local
            .publish(topic, QoS::AtLeastOnce, false, body.to_string())
            .await
        {
            tracing::error!(function = %function.name, error = %e, "Dead letter could not be queued.");
        }
    }
}

/// Connects the local publisher: returns the client and the task that polls
/// its event loop until the client disconnects (or, unconnected, until `stop`).
pub fn local_publisher(
    endpoint: &MqttEndpoint,
    stop: CancellationToken,
    metrics: Arc<GatewayMetrics>,
) -> (
    AsyncClient,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let mut opts = crate::mqtt::options(endpoint, "out", Duration::from_secs(30));
    opts.set_clean_session(true);
    let (client, eventloop) = AsyncClient::new(opts, 1024);
    (client, poll_publisher(eventloop, stop, metrics))
}

async fn poll_publisher(
    mut eventloop: EventLoop,
    stop: CancellationToken,
    metrics: Arc<GatewayMetrics>,
) {
    // Runs until the supervisor, after the last worker has finished, asks the
    // client to disconnect: requests are handled in order, so every publish
    // queued before that goes out first.
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => failures = 0,
            Ok(_) => {}
            Err(_) if stop.is_cancelled() => break,
            Err(e) => {
                metrics.publisher_reconnects.fetch_add(1, Ordering::Relaxed);
                if failures == 0 {
                    tracing::warn!(error = %e, "Local publisher lost its connection; reconnecting.");
                }
                let wait = crate::mqtt::backoff(failures);
                failures = failures.saturating_add(1);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
