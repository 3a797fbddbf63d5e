//! `[[functions]]` as written: the component, triggers, allowlists, limits,
//! breaker and state quotas.

use super::*;

/// `[[functions]]`: one Wasm function.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// Unique name; used in logs, metrics, sink topics and `edgefn invoke`.
    pub name: String,
    /// Path of the compiled component (`.wasm`), relative to the config file.
    pub component: PathBuf,
    /// MQTT topic filters whose messages trigger this function.
    pub triggers: Vec<String>,
    /// Topic filters the function may publish on; anything else is denied.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Sinks the function may forward to; anything else is denied.
    #[serde(default)]
    pub sinks: Vec<String>,
    /// Serial sources (by name) the function may write to with
    /// `serial.write`; anything else is denied.
    #[serde(default)]
    pub serial_ports: Vec<String>,
    /// Modbus sources (by name) the function may write registers and coils
    /// of, each as `"meter"` (any address) or `"meter:100-109"` (only
    /// addresses 100 to 109); anything else is denied.
    #[serde(default)]
    pub modbus: Vec<String>,
    /// GPIO outputs (`kind = "gpio_output"` sources, by name) the function
    /// may set with `gpio.set`; anything else is denied.
    #[serde(default)]
    pub gpio: Vec<String>,
    /// Free-form settings the function reads with `config(key)`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Resource limits enforced by the host.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `reuse` (default): one warm instance handles events one after
    /// another, so in-memory state persists between events (like a Worker
    /// isolate); it is thrown away after any trap, timeout or limit. `fresh`:
    /// a new instance for every event, for the strongest isolation.
    #[serde(default)]
    pub instance: InstanceMode,
    /// When to stop calling a function that keeps failing.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Quotas of the function's durable key-value state (`kv` interface).
    #[serde(default)]
    pub state: StateConfig,
    /// `normal` (default) or `high`: the outbox lane of its forwards. High
    /// records (alarms) are delivered before any normal record waiting for
    /// the same sink, so an alarm is not stuck behind a backlog.
    #[serde(default)]
    pub priority: Priority,
}

/// The outbox lane of a function's forwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Delivered in order with everything else.
    #[default]
    Normal,
    /// Delivered before any waiting normal record.
    High,
}

/// How instances are used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceMode {
    /// A warm instance serves events one after another.
    #[default]
    Reuse,
    /// A new instance per event.
    Fresh,
}

/// What a full function queue does to the next event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueuePolicy {
    /// The source waits until there is room (back-pressure; nothing lost).
    #[default]
    Block,
    /// The oldest queued event is dropped and counted.
    DropOldest,
}

/// `[functions.breaker]`: the per-function circuit breaker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive crashed invocations (trap, timeout, memory) that open the
    /// breaker; 0 disables it. A handler's `Err` does not count: it is the
    /// function rejecting a bad input.
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    /// How long the breaker stays open the first time, in milliseconds; it
    /// doubles after each failed probe.
    #[serde(default = "default_breaker_backoff_ms")]
    pub backoff_ms: u64,
    /// The longest the breaker stays open, in milliseconds.
    #[serde(default = "default_breaker_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: default_breaker_failures(),
            backoff_ms: default_breaker_backoff_ms(),
            max_backoff_ms: default_breaker_max_backoff_ms(),
        }
    }
}

fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_backoff_ms() -> u64 {
    1000
}
fn default_breaker_max_backoff_ms() -> u64 {
    60_000
}

/// `[functions.state]`: quotas of the durable key-value state.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Longest key, in bytes.
    #[serde(default = "default_max_key_bytes")]
    pub max_key_bytes: usize,
    /// Largest value, in bytes.
    #[serde(default = "default_max_value_bytes")]
    pub max_value_bytes: usize,
    /// Keys plus values of this function, in bytes.
    #[serde(default = "default_max_total_bytes")]
    pub max_total_bytes: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            max_key_bytes: default_max_key_bytes(),
            max_value_bytes: default_max_value_bytes(),
            max_total_bytes: default_max_total_bytes(),
        }
    }
}

fn default_max_key_bytes() -> usize {
    256
}
fn default_max_value_bytes() -> usize {
    64 * 1024
}
fn default_max_total_bytes() -> u64 {
    1024 * 1024
}

/// `[functions.limits]`: what one invocation may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Wall-clock budget of one invocation, in milliseconds; a guest still
    /// running after it is interrupted (a runaway loop cannot stall the
    /// gateway).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Cap on the guest's linear memory, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Cap on publish + forward calls in one invocation.
    #[serde(default = "default_max_calls")]
    pub max_calls: u32,
    /// Cap on the size of one published or forwarded payload, in bytes.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// Events waiting for this function (its own queue: a slow function
    /// never delays another one's events).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// When the queue is full: `block` (default) makes the source wait, so
    /// nothing is lost; `drop_oldest` drops the oldest queued event and
    /// counts it (for readings where only the latest matters).
    #[serde(default)]
    pub queue_policy: QueuePolicy,
    /// Core instances one invocation may create (a component holds several).
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
    /// Tables one invocation may create.
    #[serde(default = "default_max_tables")]
    pub max_tables: usize,
    /// Elements one table may grow to.
    #[serde(default = "default_max_table_elements")]
    pub max_table_elements: usize,
    /// Log lines one invocation may write (`log` calls and stdout/stderr
    /// lines together): a guest logging in a loop must not fill the SD card
    /// through journald. The rest is dropped and counted.
    #[serde(default = "default_log_lines")]
    pub log_lines: u32,
    /// Log bytes one invocation may write (same reason as `log_lines`).
    #[serde(default = "default_log_bytes")]
    pub log_bytes: usize,
    /// Log lines a second the function may write over time, across
    /// invocations: a few lines per event at a high event rate add up.
    #[serde(default = "default_log_lines_per_s")]
    pub log_lines_per_s: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            timeout_ms: default_timeout_ms(),
            memory_mib: default_memory_mib(),
            max_calls: default_max_calls(),
            max_payload_bytes: default_max_payload_bytes(),
            queue: default_queue(),
            queue_policy: QueuePolicy::default(),
            max_instances: default_max_instances(),
            max_tables: default_max_tables(),
            max_table_elements: default_max_table_elements(),
            log_lines: default_log_lines(),
            log_bytes: default_log_bytes(),
            log_lines_per_s: default_log_lines_per_s(),
        }
    }
}

fn default_log_lines() -> u32 {
    20
}
fn default_log_bytes() -> usize {
    4096
}
fn default_log_lines_per_s() -> u32 {
    50
}

fn default_max_instances() -> usize {
    32
}
fn default_max_tables() -> usize {
    16
}
fn default_max_table_elements() -> usize {
    20_000
}

fn default_timeout_ms() -> u64 {
    50
}
fn default_memory_mib() -> u64 {
    32
}
fn default_max_calls() -> u32 {
    64
}
fn default_max_payload_bytes() -> usize {
    256 * 1024
}
fn default_queue() -> usize {
    1024
}
