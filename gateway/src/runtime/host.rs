//! The host side of the WIT imports: what a function may do, checked against
//! its [`Capabilities`] on every call.
//!
//! Nothing a guest calls reaches a connection from here: `publish` and
//! `forward` only record [`Outputs`]; the caller releases them after the
//! handler has returned `Ok`. A failed or trapped invocation therefore never
//! emits half of its results.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::edgefn::function::host::Host;
use crate::bindings::edgefn::function::types::{self, CallError, Level, Qos};
use crate::bindings::edgefn::function::{gpio, kv, modbus, serial};
use crate::config::Limits;
use crate::output::{Forward, GpioWrite, ModbusValues, ModbusWrite, Outputs, Publish, SerialWrite};
use crate::runtime::logs::{LogBudget, LogRate};
use crate::runtime::state::{KvRefusal, KvTxn};
use crate::runtime::wasi::{self, Capture, Deadline};
use crate::topic::{FilterSet, validate_topic_name};

/// What one function is allowed to do, resolved from its configuration.
#[derive(Debug)]
pub struct Capabilities {
    /// The function's name (for logs).
    pub function: String,
    /// The gateway's id, returned by `gateway-id`.
    pub gateway_id: String,
    /// Filters a published topic must match.
    pub publish: FilterSet,
    /// Sinks it may forward to.
    pub sinks: BTreeSet<String>,
    /// Serial sources it may write to.
    pub serial_ports: BTreeSet<String>,
    /// Modbus sources it may write to, with the addresses allowed.
    pub modbus: BTreeMap<String, std::ops::RangeInclusive<u16>>,
    /// GPIO outputs it may set.
    pub gpio: BTreeSet<String>,
    /// `config(key)` values.
    pub config: BTreeMap<String, String>,
    /// publish + forward calls per invocation.
    pub max_calls: u32,
    /// Bytes per published or forwarded payload.
    pub max_payload_bytes: usize,
}

/// Caps linear memory, tables and instances, and remembers whether a cap was
/// hit so a resulting trap can be reported as "memory".
#[derive(Debug)]
pub struct Limiter {
    memory_bytes: usize,
    table_elements: usize,
    instances: usize,
    tables: usize,
    /// Set when a grow was refused.
    pub exceeded: bool,
}

impl Limiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            memory_bytes: limits.memory_bytes,
            table_elements: limits.max_table_elements,
            instances: limits.max_instances,
            tables: limits.max_tables,
            exceeded: false,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.exceeded = true;
            return Err(wasmtime::Error::msg(format!(
                "linear memory limit of {} bytes exceeded (asked for {desired})",
                self.memory_bytes
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.exceeded = true;
            return Err(wasmtime::Error::msg(format!(
                "table limit of {} elements exceeded (asked for {desired})",
                self.table_elements
            )));
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.tables
    }

    fn memories(&self) -> usize {
        self.instances
    }
}

/// The state of one store: one invocation (or one warm instance).
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// The guest's stdout and stderr, kept for its log and panic message.
    pub stdout: Capture,
    /// See `stdout`.
    pub stderr: Capture,
    /// When this invocation must end, waits included.
    pub deadline: Deadline,
    /// What the guest may still write to the log.
    pub log: LogBudget,
    /// Memory and table caps.
    pub limiter: Limiter,
    caps: Arc<Capabilities>,
    /// What the guest asked to publish and forward so far.
    pub outputs: Outputs,
    calls: u32,
    /// Calls refused because of the allowlists.
    pub denied: u32,
    /// Calls refused because of a limit.
    pub over_limit: u32,
    /// This invocation's view of the function's durable state.
    pub kv: Option<KvTxn>,
}

impl HostState {
    /// Fresh state: a WASI context that grants nothing (no files, no
    /// environment, no network, an empty stdin; stdout and stderr captured
    /// up to the log budget), and empty outputs. `log_rate` is the
    /// function's, shared by all its stores.
    pub fn new(
        caps: Arc<Capabilities>,
        limits: &Limits,
        kv: Option<KvTxn>,
        log_rate: Arc<Mutex<LogRate>>,
    ) -> Self {
        let stdout = Capture::new(limits.log_bytes);
        let stderr = Capture::new(limits.log_bytes);
        Self {
            wasi: wasi::context(&stdout, &stderr),
            table: ResourceTable::new(),
            stdout,
            stderr,
            deadline: Deadline::default(),
            log: LogBudget::new(Arc::from(caps.function.as_str()), limits, log_rate),
            limiter: Limiter::new(limits),
            caps,
            outputs: Outputs::default(),
            calls: 0,
            denied: 0,
            over_limit: 0,
            kv,
        }
    }

    /// Readies a warm instance's state for the next event: empty outputs,
    /// fresh per-invocation budgets, no pending state writes.
    pub fn begin(&mut self) {
        self.outputs = Outputs::default();
        self.calls = 0;
        self.log.begin();
        self.denied = 0;
        self.over_limit = 0;
        self.limiter.exceeded = false;
        if let Some(kv) = &mut self.kv {
            kv.reset();
        }
    }

    /// The resource table and the deadline, for a bounded wait.
    pub(crate) fn wait_parts(&mut self) -> (&mut ResourceTable, &mut Deadline) {
        (&mut self.table, &mut self.deadline)
    }

    fn deny(&mut self, reason: String) -> CallError {
        self.denied += 1;
        tracing::warn!(function = %self.caps.function, %reason, "Call denied.");
        CallError::Denied(reason)
    }

    fn over(&mut self, reason: String) -> CallError {
        self.over_limit += 1;
        tracing::warn!(function = %self.caps.function, %reason, "Call over limit.");
        CallError::OverLimit(reason)
    }

    /// Checks the per-invocation call budget and the payload size.
    fn charge(&mut self, payload_len: usize) -> Result<(), CallError> {
        if self.calls >= self.caps.max_calls {
            let max = self.caps.max_calls;
            return Err(self.over(format!(
                "at most {max} publish/forward calls per invocation"
            )));
        }
        if payload_len > self.caps.max_payload_bytes {
            let max = self.caps.max_payload_bytes;
            return Err(self.over(format!(
                "payload of {payload_len} bytes is over the limit of {max}"
            )));
        }
        self.calls += 1;
        Ok(())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl Host for HostState {
    fn publish(&mut self, topic: String, payload: Vec<u8>, qos: Qos) -> Result<(), CallError> {
        if let Err(e) = validate_topic_name(&topic) {
            return Err(CallError::Invalid(format!("topic {}: {e}", shown(&topic))));
        }
        if !self.caps.publish.matches(&topic) {
            return Err(self.deny(format!(
                "publishing on {} is not allowed (allowed: {})",
                shown(&topic),
                list(self.caps.publish.filters().iter().map(|f| f.as_str()))
            )));
        }
        self.charge(payload.len())?;
        let qos = match qos {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
            Qos::ExactlyOnce => 2,
        };
        self.outputs.publishes.push(Publish {
            topic,
            payload: Bytes::from(payload),
            qos,
        });
        Ok(())
    }

    fn forward(&mut self, sink: String, payload: Vec<u8>) -> Result<(), CallError> {
        if !self.caps.sinks.contains(&sink) {
            return Err(self.deny(format!(
                "forwarding to sink {} is not allowed (allowed: {})",
                shown(&sink),
                list(self.caps.sinks.iter().map(String::as_str))
            )));
        }
        self.charge(payload.len())?;
        self.outputs.forwards.push(Forward {
            sink,
            payload: Bytes::from(payload),
        });
        Ok(())
    }

    fn log(&mut self, level: Level, message: String) {
        self.log.write(level, &message);
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.caps.config.get(&key).cloned()
    }

    fn gateway_id(&mut self) -> String {
        self.caps.gateway_id.clone()
    }
}

impl serial::Host for HostState {
    fn write(&mut self, port: String, data: Vec<u8>) -> Result<(), CallError> {
        if !self.caps.serial_ports.contains(&port) {
            return Err(self.deny(format!(
                "writing to serial port {} is not allowed (allowed: {})",
                shown(&port),
                list(self.caps.serial_ports.iter().map(String::as_str))
            )));
        }
        self.charge(data.len())?;
        self.outputs.serial_writes.push(SerialWrite {
            port,
            data: Bytes::from(data),
        });
        Ok(())
    }
}

impl modbus::Host for HostState {
    fn write_registers(
        &mut self,
        device: String,
        address: u16,
        values: Vec<u16>,
    ) -> Result<(), CallError> {
        let n = values.len();
        self.modbus_write(device, address, n, 123, ModbusValues::Registers(values))
    }

    fn write_coils(
        &mut self,
        device: String,
        address: u16,
        values: Vec<bool>,
    ) -> Result<(), CallError> {
        let n = values.len();
        self.modbus_write(device, address, n, 1968, ModbusValues::Coils(values))
    }
}

impl gpio::Host for HostState {
    fn set(&mut self, line: String, value: bool) -> Result<(), CallError> {
        if !self.caps.gpio.contains(&line) {
            return Err(self.deny(format!(
                "setting GPIO line {} is not allowed (allowed: {})",
                shown(&line),
                list(self.caps.gpio.iter().map(String::as_str))
            )));
        }
        self.charge(1)?;
        self.outputs.gpio_writes.push(GpioWrite { line, value });
        Ok(())
    }
}

impl HostState {
    /// Checks a Modbus write against the function's `modbus` list and the
    /// protocol's limit of `max` values, and queues it with the outputs.
    fn modbus_write(
        &mut self,
        device: String,
        address: u16,
        n: usize,
        max: usize,
        values: ModbusValues,
    ) -> Result<(), CallError> {
        let Some(allowed) = self.caps.modbus.get(&device).cloned() else {
            return Err(self.deny(format!(
                "writing to Modbus device {} is not allowed (allowed: {})",
                shown(&device),
                list(self.caps.modbus.keys().map(String::as_str))
            )));
        };
        if !(1..=max).contains(&n) {
            return Err(CallError::Invalid(format!(
                "a Modbus write takes 1 to {max} values, not {n}"
            )));
        }
        let last = usize::from(address) + n - 1;
        if !allowed.contains(&address) || last > usize::from(*allowed.end()) {
            return Err(self.deny(format!(
                "writing addresses {address}..={last} of Modbus device {} is not allowed (allowed: {}..={})",
                shown(&device),
                allowed.start(),
                allowed.end()
            )));
        }
        self.charge(2 * n)?;
        self.outputs.modbus_writes.push(ModbusWrite {
            device,
            address,
            values,
        });
        Ok(())
    }

    fn kv_refused(&mut self, r: KvRefusal) -> CallError {
        match r {
            KvRefusal::OverLimit(m) => self.over(format!("state: {m}")),
            KvRefusal::Invalid(m) => CallError::Invalid(format!("state: {m}")),
            KvRefusal::Store(e) => {
                tracing::error!(function = %self.caps.function, error = %e, "State store failed.");
                CallError::Invalid(format!("state store unavailable: {e}"))
            }
        }
    }

    fn kv_missing(&self) -> CallError {
        CallError::Denied("this function has no state store".into())
    }
}

impl kv::Host for HostState {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        let kv = self.kv.as_ref()?;
        match kv.get(&key) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(function = %self.caps.function, error = %e, "State store failed.");
                None
            }
        }
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), CallError> {
        let Some(kv) = self.kv.as_mut() else {
            return Err(self.kv_missing());
        };
        kv.set(key, value).map_err(|r| self.kv_refused(r))
    }

    fn delete(&mut self, key: String) -> Result<(), CallError> {
        let Some(kv) = self.kv.as_mut() else {
            return Err(self.kv_missing());
        };
        kv.delete(key).map_err(|r| self.kv_refused(r))
    }

    fn list_keys(&mut self, prefix: String) -> Vec<String> {
        let Some(kv) = self.kv.as_ref() else {
            return Vec::new();
        };
        kv.keys(&prefix).unwrap_or_else(|e| {
            tracing::error!(function = %self.caps.function, error = %e, "State store failed.");
            Vec::new()
        })
    }
}

/// A guest-supplied string for an error message: quoted, and cut short so a
/// hostile guest cannot make the host hand megabytes back into its memory.
fn shown(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return format!("`{s}`");
    }
    let mut cut = MAX;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("`{}…` ({} bytes)", &s[..cut], s.len())
}

fn list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = items.collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}
