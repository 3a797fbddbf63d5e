//! The configuration file's schema, as written by users (TOML).
//!
//! Every struct denies unknown fields so that a typo is an error rather than a
//! silently ignored setting. Defaults are functions so that the documented
//! default and the applied default are the same value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity and storage of this gateway.
    pub gateway: GatewayConfig,
    /// The MQTT broker that sensors publish to and functions publish on.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// The Wasm functions to run.
    #[serde(default)]
    pub functions: Vec<FunctionConfig>,
    /// Where forwarded records go (the cloud).
    #[serde(default)]
    pub sinks: Vec<SinkConfig>,
    /// The durable outbox between functions and sinks.
    #[serde(default)]
    pub outbox: OutboxSettings,
    /// Event sources besides the MQTT broker: serial ports and I2C sensors.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// The function runtime: instance pool, compile cache, hot reload.
    #[serde(default)]
    pub runtime: RuntimeSettings,
    /// The admin HTTP endpoint (health, readiness, Prometheus metrics, the
    /// function list). Off when the table is absent.
    pub admin: Option<AdminSettings>,
}

/// `[admin]`: the operations endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    /// Address to listen on. Loopback by default, so only the board itself
    /// (or an SSH tunnel) can read it; any other address needs `token`.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer token every request must carry (`Authorization: Bearer …`).
    /// Required when `listen` is not a loopback address; use
    /// `${EDGEFN_ADMIN_TOKEN}` to keep it out of the file.
    pub token: Option<String>,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9180".to_owned()
}

/// `[runtime]`: settings shared by every function.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Pre-reserve instance slots (pooling allocator with copy-on-write
    /// memory images) so that starting an instance costs microseconds. If the
    /// reservation fails (a small address space, `ulimit -v`), the gateway
    /// falls back to on-demand allocation with a warning.
    #[serde(default = "default_true")]
    pub pooling: bool,
    /// Instance slots in the pool. Default: 2 per function plus 8 (a warm
    /// instance, a reload candidate, and room for `edgefn invoke`).
    #[serde(default)]
    pub pool_instances: Option<u32>,
    /// The largest linear memory any function may have, in MiB: the size of
    /// one pool slot. Every function's `limits.memory_mib` must fit.
    #[serde(default = "default_max_memory_mib")]
    pub max_memory_mib: u64,
    /// Keep compiled components in `<data_dir>/cache`, keyed by content hash
    /// and engine, so a restart does not recompile.
    #[serde(default = "default_true")]
    pub compile_cache: bool,
    /// How often component files are checked for changes, in milliseconds
    /// (hot reload); 0 turns the file watch off (`SIGHUP` still reloads).
    #[serde(default = "default_watch_ms")]
    pub watch_ms: u64,
    /// A new version that fails this many invocations in a row before its
    /// first success is rolled back to the previous one.
    #[serde(default = "default_rollback_after")]
    pub rollback_after: u32,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            pooling: true,
            pool_instances: None,
            max_memory_mib: default_max_memory_mib(),
            compile_cache: true,
            watch_ms: default_watch_ms(),
            rollback_after: default_rollback_after(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_memory_mib() -> u64 {
    64
}
fn default_watch_ms() -> u64 {
    1000
}
fn default_rollback_after() -> u32 {
    3
}

/// `[[sources]]`: a serial port or an I2C sensor, chosen by `kind`.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A serial port (UART, USB-serial adapter).
    Serial(SerialSourceConfig),
    /// An I2C sensor polled at an interval.
    I2c(I2cSourceConfig),
}

impl SourceConfig {
    /// The source's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Serial(c) => &c.name,
            Self::I2c(c) => &c.name,
        }
    }
}

impl<'de> Deserialize<'de> for SourceConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, table) = tagged::<D>(d)?;
        match kind.as_str() {
            "serial" => inner::<_, D::Error>(table).map(Self::Serial),
            "i2c" => inner::<_, D::Error>(table).map(Self::I2c),
            other => Err(serde::de::Error::custom(format!(
                "{NESTED_PATH}kind{NESTED_PATH}unknown source kind `{other}` (use \"serial\" or \"i2c\")"
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

/// `[outbox]`: the SQLite store-and-forward queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    /// Ceiling on commits per second; each commit is one fsync, so this
    /// bounds the write load on an SD card. Records are grouped per commit.
    #[serde(default = "default_max_commits_per_sec")]
    pub max_commits_per_sec: u32,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self {
            max_commits_per_sec: default_max_commits_per_sec(),
        }
    }
}

fn default_max_commits_per_sec() -> u32 {
    20
}

/// `[gateway]`: who this gateway is and where it keeps its files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// A stable id for this gateway; it appears in forwarded envelopes and
    /// sink topics so the cloud can tell gateways apart.
    pub id: String,
    /// Directory for the gateway's own files (created if missing). Relative
    /// paths are resolved against the configuration file's directory.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Seconds a stop (SIGTERM) may take: intake stops at once, in-flight
    /// invocations finish and their forwards are committed to the outbox
    /// within this time; what is still running after it is abandoned. Keep
    /// it below systemd's `TimeoutStopSec`.
    #[serde(default = "default_shutdown_timeout_s")]
    pub shutdown_timeout_s: u64,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

fn default_shutdown_timeout_s() -> u64 {
    10
}

/// `[broker]`: the local MQTT broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BrokerConfig {
    /// Run the broker inside the gateway (rumqttd), so sensors can connect to
    /// the gateway directly without any other service.
    Embedded {
        /// Address the embedded broker listens on (MQTT 3.1.1 over TCP).
        #[serde(default = "default_listen")]
        listen: String,
        /// Keep-alive of the gateway's MQTT source connection, in seconds.
        /// The broker runs in the gateway's process, so a dead broker closes
        /// the socket and pings detect nothing; the default is the longest
        /// (65535 s) because rumqttd 0.20 withholds its PINGRESP from a
        /// client whose in-flight window is full: with a short keep-alive an
        /// outbox stall ends in a reconnect and redelivered duplicates.
        #[serde(default = "default_embedded_keep_alive_s")]
        keep_alive_s: u64,
        /// Bytes of messages (topic + payload) the broker keeps for each
        /// subscription filter, so a board's memory stays bounded however
        /// long the stream runs. A subscriber that falls further behind than
        /// this skips the oldest messages; the skip is counted and logged.
        #[serde(default = "default_retention_bytes_per_filter")]
        retention_bytes_per_filter: u64,
        /// Whether devices may connect without logging in. Unset means yes
        /// on a loopback listener (only local processes can reach it) and
        /// no anywhere else; `true` on a network listener is an explicit,
        /// logged choice to let anyone who can reach it read and write
        /// every topic.
        #[serde(default)]
        allow_anonymous: Option<bool>,
        /// Password file written by `edgefn passwd` (salted argon2id
        /// hashes, one `user:hash` line per device), so devices on the LAN
        /// must log in. Re-read on SIGHUP.
        #[serde(default)]
        password_file: Option<PathBuf>,
        /// A second, TLS listener (e.g. on the LAN while `listen` stays on
        /// loopback), optionally accepting client certificates.
        #[serde(default)]
        tls: Option<crate::broker::tls::BrokerTlsConfig>,
        /// What each logged-in device may publish and subscribe to. Unset:
        /// publish under `sensors/{user}/#`, read nothing.
        #[serde(default)]
        acl: Option<Vec<crate::broker::acl::AclRule>>,
    },
    /// Use a broker that runs elsewhere (e.g. Mosquitto on the same board).
    External(ExternalBrokerConfig),
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self::Embedded {
            listen: default_listen(),
            keep_alive_s: default_embedded_keep_alive_s(),
            retention_bytes_per_filter: default_retention_bytes_per_filter(),
            allow_anonymous: None,
            password_file: None,
            tls: None,
            acl: None,
        }
    }
}

fn default_embedded_keep_alive_s() -> u64 {
    65_535
}

fn default_local_keep_alive_s() -> u64 {
    30
}

fn default_listen() -> String {
    "127.0.0.1:1883".to_owned()
}

fn default_retention_bytes_per_filter() -> u64 {
    crate::broker::DEFAULT_RETENTION_BYTES
}

/// `[broker]` with `kind = "external"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalBrokerConfig {
    /// `mqtt://host:port`, or `mqtts://host:port` together with `tls`.
    pub url: String,
    /// MQTT client id; defaults to `edgefn-<gateway id>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name, if the broker requires authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// Password, if the broker requires authentication (use `${VAR}` to keep
    /// it out of the file).
    #[serde(default)]
    pub password: Option<String>,
    /// TLS settings, required for `mqtts://`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Keep-alive of the gateway's MQTT source connection, in seconds: the
    /// broker drops a connection silent for 1.5 times this.
    #[serde(default = "default_local_keep_alive_s")]
    pub keep_alive_s: u64,
}

/// TLS settings for an MQTT connection (rustls).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the CA certificate(s) that sign the server's certificate.
    /// Required for MQTT (rumqttc trusts only these). An HTTP sink with a
    /// client certificate may leave it out to trust the system's CAs (a
    /// public cloud endpoint that wants mutual TLS).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain, for mutual TLS (AWS IoT Core, Azure IoT
    /// Hub). Requires `key`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of the client certificate. Requires `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// ALPN protocols to offer, e.g. `["x-amzn-mqtt-ca"]` for AWS IoT on
    /// port 443. MQTT only: refused for HTTP sinks, whose client offers
    /// its own.
    #[serde(default)]
    pub alpn: Vec<String>,
}

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

/// `[[sinks]]`: a destination for forwarded records, chosen by `kind`.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// An MQTT broker in the cloud (or anywhere else).
    Mqtt(MqttSinkConfig),
    /// An HTTP(S) endpoint that takes POSTed batches.
    Http(HttpSinkConfig),
}

/// Marks a nested key path inside an error message, so the loader can append
/// it to the key it reports (serde's internally tagged enums lose the path).
pub(crate) const NESTED_PATH: char = '\u{1}';

/// Splits a tagged table into its `kind` and the rest.
fn tagged<'de, D: serde::Deserializer<'de>>(d: D) -> Result<(String, toml::Table), D::Error> {
    use serde::de::Error;
    let mut table = toml::Table::deserialize(d)?;
    match table.remove("kind") {
        Some(toml::Value::String(k)) => Ok((k, table)),
        Some(_) => Err(D::Error::custom(format!(
            "{NESTED_PATH}kind{NESTED_PATH}must be a string"
        ))),
        None => Err(D::Error::custom("missing field `kind`")),
    }
}

/// Deserializes the rest of a tagged table, keeping the nested key path.
fn inner<T: serde::de::DeserializeOwned, E: serde::de::Error>(table: toml::Table) -> Result<T, E> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        E::custom(format!(
            "{NESTED_PATH}{path}{NESTED_PATH}{}",
            e.into_inner()
        ))
    })
}

impl<'de> Deserialize<'de> for SinkConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, table) = tagged::<D>(d)?;
        match kind.as_str() {
            "mqtt" => inner::<_, D::Error>(table).map(Self::Mqtt),
            "http" => inner::<_, D::Error>(table).map(Self::Http),
            other => Err(serde::de::Error::custom(format!(
                "{NESTED_PATH}kind{NESTED_PATH}unknown sink kind `{other}` (use \"mqtt\" or \"http\")"
            ))),
        }
    }
}

impl SinkConfig {
    /// The sink's name, as functions refer to it.
    pub fn name(&self) -> &str {
        match self {
            Self::Mqtt(c) => &c.name,
            Self::Http(c) => &c.name,
        }
    }
}

/// `[sinks.outbox]`: how much of the outbox one sink may hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkOutboxConfig {
    /// Records held for this sink at most.
    #[serde(default = "default_max_rows")]
    pub max_rows: u64,
    /// Payload bytes held for this sink at most.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Records older than this many seconds are deleted undelivered
    /// (counted and logged).
    #[serde(default = "default_ttl_s")]
    pub ttl_s: u64,
    /// When full: `refuse` (hold new records back; the sources stop
    /// acknowledging, nothing is dropped) or `drop_oldest`.
    #[serde(default = "default_full_policy")]
    pub full_policy: crate::outbox::FullPolicy,
}

impl Default for SinkOutboxConfig {
    fn default() -> Self {
        Self {
            max_rows: default_max_rows(),
            max_bytes: default_max_bytes(),
            ttl_s: default_ttl_s(),
            full_policy: default_full_policy(),
        }
    }
}

fn default_max_rows() -> u64 {
    1_000_000
}
fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_ttl_s() -> u64 {
    7 * 24 * 3600
}
fn default_full_policy() -> crate::outbox::FullPolicy {
    crate::outbox::FullPolicy::Refuse
}

/// MQTT protocol version of a sink connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 3.1.1; the idempotency key travels in the envelope (`id`).
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5; the idempotency key also travels as the user property
    /// `idempotency-key`.
    #[serde(rename = "5")]
    V5,
}

/// `[[sinks]]` with `kind = "http"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Unique name that functions use in `forward(sink, ...)`.
    pub name: String,
    /// `http://` or `https://` URL that batches are POSTed to.
    pub url: String,
    /// Extra request headers (values may use `${VAR}`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Sent as `Authorization: Bearer <token>` (use `${VAR}`).
    #[serde(default)]
    pub bearer_token: Option<String>,
    /// Body encoding: a JSON array or a CBOR array of envelopes.
    #[serde(default)]
    pub format: EnvelopeFormat,
    /// Records per request at most.
    #[serde(default = "default_http_batch_max")]
    pub batch_max: usize,
    /// How long to wait for a batch to fill before sending a partial one.
    #[serde(default = "default_http_linger_ms")]
    pub batch_linger_ms: u64,
    /// Request timeout (connect + response), in milliseconds.
    #[serde(default = "default_http_timeout_ms")]
    pub timeout_ms: u64,
    /// Longest wait between retries, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// TLS: a custom CA (trusted besides the system's CAs) and/or, for
    /// mutual TLS, a client certificate and key; `alpn` is refused. Without
    /// it, `https://` trusts the system's CAs.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Outbox limits for this sink.
    #[serde(default)]
    pub outbox: SinkOutboxConfig,
}

fn default_http_batch_max() -> usize {
    100
}
fn default_http_linger_ms() -> u64 {
    100
}
fn default_http_timeout_ms() -> u64 {
    10_000
}
fn default_max_backoff_ms() -> u64 {
    30_000
}

/// `[[sinks]]` with `kind = "mqtt"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSinkConfig {
    /// Unique name that functions use in `forward(sink, ...)`.
    pub name: String,
    /// `mqtt://host:port`, or `mqtts://host:port` together with `tls`.
    pub url: String,
    /// MQTT client id; defaults to `edgefn-<gateway id>-<sink name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name, if the broker requires authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// Password, if the broker requires authentication.
    #[serde(default)]
    pub password: Option<String>,
    /// Topic of each forwarded record. `{gateway}`, `{function}`, `{sink}`
    /// and `{topic}` (the topic of the event the function handled) are
    /// replaced.
    #[serde(default = "default_sink_topic")]
    pub topic: String,
    /// Envelope encoding: `json` (readable) or `cbor` (compact).
    #[serde(default)]
    pub format: EnvelopeFormat,
    /// TLS settings, required for `mqtts://`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Records in flight (sent, not yet acknowledged) at most.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// MQTT keep-alive, in seconds.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// `"3.1.1"` (default) or `"5"`.
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// Records per MQTT message at most; above 1, a message carries an array
    /// of envelopes (fewer publishes, e.g. for AWS IoT's 100 publishes/s).
    #[serde(default = "default_mqtt_batch_max")]
    pub batch_max: usize,
    /// How long to wait for a batch to fill (only with `batch_max` > 1).
    #[serde(default)]
    pub batch_linger_ms: u64,
    /// A connection with a publish unacknowledged this long is torn down and
    /// rebuilt, and everything unconfirmed is sent again.
    #[serde(default = "default_ack_timeout_s")]
    pub ack_timeout_s: u64,
    /// Outbox limits for this sink.
    #[serde(default)]
    pub outbox: SinkOutboxConfig,
}

fn default_mqtt_batch_max() -> usize {
    1
}
fn default_ack_timeout_s() -> u64 {
    30
}

fn default_sink_topic() -> String {
    "edgefn/{gateway}/{function}".to_owned()
}
fn default_max_inflight() -> u16 {
    100
}
fn default_keep_alive_s() -> u64 {
    30
}

/// How a forwarded record is encoded on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeFormat {
    /// A JSON object; a JSON payload is embedded as JSON, any other payload
    /// as base64 under `payload_base64`.
    #[default]
    Json,
    /// A CBOR map with the payload as a byte string.
    Cbor,
}
