//! The validated configuration: what [`super::validate`] produces and the
//! rest of the gateway reads (addresses parsed, paths resolved, filters
//! compiled, TLS material read). Nothing here is checked again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use super::broker::Access;
use super::schema::{self, EnvelopeFormat};
pub use crate::sinks::SinkKind;
pub use crate::sinks::http::config::{HttpSinkSpec, HttpTls};
pub use crate::sinks::mqtt::config::MqttSinkSpec;
pub use crate::sources::SourceSpec;
pub use crate::sources::i2c::config::I2cSpec;
pub use crate::sources::serial::config::SerialSpec;
use crate::topic::FilterSet;

/// A validated configuration: addresses parsed, paths resolved, filters
/// compiled, TLS material read.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// `gateway.id`.
    pub gateway_id: String,
    /// `gateway.data_dir`, resolved.
    pub data_dir: PathBuf,
    /// The local broker.
    pub broker: Broker,
    /// `broker.keep_alive_s`: keep-alive of the MQTT source's connection.
    pub source_keep_alive: Duration,
    /// The functions, in file order.
    pub functions: Vec<FunctionSpec>,
    /// The sinks, in file order.
    pub sinks: Vec<SinkSpec>,
    /// `outbox.max_commits_per_sec`.
    pub outbox_commits_per_sec: u32,
    /// Serial and I2C sources, in file order.
    pub sources: Vec<SourceSpec>,
    /// `[runtime]`.
    pub runtime: RuntimeSpec,
    /// `[admin]`, if configured.
    pub admin: Option<AdminSpec>,
    /// `gateway.shutdown_timeout_s`.
    pub shutdown_timeout: Duration,
    /// `gateway.io_threads`: the async runtime's worker threads.
    pub io_threads: usize,
    /// The file's table after `${VAR}` interpolation, kept so that a fleet
    /// bundle's functions can be validated together with the file's
    /// ([`super::with_functions`]).
    pub raw: std::sync::Arc<toml::Table>,
    /// `[fleet]`, if configured: deploys of signed bundles.
    pub fleet: Option<super::FleetSpec>,
}

/// Validated `[admin]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSpec {
    /// Where the endpoint listens.
    pub listen: SocketAddr,
    /// The bearer token requests must carry, if any.
    pub token: Option<String>,
}

/// Validated `[runtime]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSpec {
    /// Use the pooling allocator (falls back to on-demand if it cannot).
    pub pooling: bool,
    /// Instance slots in the pool.
    pub pool_instances: u32,
    /// `pool_instances` as the file sets it (`None`: the default, derived
    /// from the number of functions), so a reload that only adds functions
    /// does not report the derived size as a change needing a restart.
    pub pool_instances_set: Option<u32>,
    /// Size of one pool slot's linear memory, in bytes.
    pub max_memory_bytes: u64,
    /// Cache compiled components in the data dir.
    pub compile_cache: bool,
    /// File-watch interval; `None` = off.
    pub watch: Option<Duration>,
    /// Failures in a row that roll a new version back.
    pub rollback_after: u32,
}

/// The local broker, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Broker {
    /// rumqttd inside the gateway, listening on this address.
    Embedded {
        /// Bytes kept per subscription filter (`broker.retention_bytes_per_filter`).
        retention_bytes_per_filter: u64,
        /// Listeners, logins and topic rights.
        access: Access,
    },
    /// A broker elsewhere.
    External(MqttEndpoint),
}

/// Where and how to connect as an MQTT client.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttEndpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// MQTT client id.
    pub client_id: String,
    /// User name and password.
    pub credentials: Option<(String, String)>,
    /// TLS material, when the URL is `mqtts://`.
    pub tls: Option<TlsMaterial>,
}

/// TLS files, read and checked at validation time.
#[derive(Clone, PartialEq)]
pub struct TlsMaterial {
    /// PEM CA certificates.
    pub ca: Vec<u8>,
    /// PEM client certificate chain and key, for mutual TLS.
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
    /// ALPN protocol names.
    pub alpn: Vec<Vec<u8>>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("TlsMaterial")
            .field("ca_bytes", &self.ca.len())
            .field("client_auth", &self.client_auth.is_some())
            .field("alpn", &self.alpn.len())
            .finish()
    }
}

/// A validated function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    /// Unique name.
    pub name: String,
    /// Absolute (or config-relative resolved) path of the component.
    pub component: PathBuf,
    /// Filters that trigger it.
    pub triggers: FilterSet,
    /// Filters it may publish on.
    pub publish: FilterSet,
    /// Sinks it may forward to.
    pub sinks: BTreeSet<String>,
    /// Serial sources it may write to.
    pub serial_ports: BTreeSet<String>,
    /// Modbus sources it may write to, with the addresses allowed.
    pub modbus: BTreeMap<String, RangeInclusive<u16>>,
    /// GPIO outputs it may set.
    pub gpio: BTreeSet<String>,
    /// Its `config(key)` values.
    pub config: BTreeMap<String, String>,
    /// Its limits.
    pub limits: Limits,
    /// Warm or fresh instances.
    pub instance: schema::InstanceMode,
    /// Circuit breaker settings.
    pub breaker: BreakerSpec,
    /// Key-value state quotas.
    pub state: StateQuota,
    /// The outbox lane of its forwards.
    pub priority: schema::Priority,
}

/// Validated circuit-breaker settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerSpec {
    /// Consecutive failures that open it; 0 = never.
    pub failures: u32,
    /// First open period.
    pub backoff: Duration,
    /// Longest open period.
    pub max_backoff: Duration,
}

impl From<&schema::BreakerConfig> for BreakerSpec {
    fn from(c: &schema::BreakerConfig) -> Self {
        Self {
            failures: c.failures,
            backoff: Duration::from_millis(c.backoff_ms),
            max_backoff: Duration::from_millis(c.max_backoff_ms),
        }
    }
}

/// Validated key-value quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateQuota {
    /// Longest key.
    pub max_key_bytes: usize,
    /// Largest value.
    pub max_value_bytes: usize,
    /// Keys plus values.
    pub max_total_bytes: u64,
}

impl Default for StateQuota {
    fn default() -> Self {
        Self::from(&schema::StateConfig::default())
    }
}

impl From<&schema::StateConfig> for StateQuota {
    fn from(c: &schema::StateConfig) -> Self {
        Self {
            max_key_bytes: c.max_key_bytes,
            max_value_bytes: c.max_value_bytes,
            max_total_bytes: c.max_total_bytes,
        }
    }
}

/// The largest `limits.max_table_elements` (the pool's table slot size).
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Validated per-function limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one invocation.
    pub timeout: Duration,
    /// Linear memory cap, in bytes.
    pub memory_bytes: usize,
    /// publish + forward calls per invocation.
    pub max_calls: u32,
    /// Bytes per published or forwarded payload.
    pub max_payload_bytes: usize,
    /// Queue length in front of the function.
    pub queue: usize,
    /// What a full queue does.
    pub queue_policy: schema::QueuePolicy,
    /// Core instances per store.
    pub max_instances: usize,
    /// Tables per store.
    pub max_tables: usize,
    /// Elements per table.
    pub max_table_elements: usize,
    /// Guest log lines per invocation.
    pub log_lines: u32,
    /// Guest log bytes per invocation.
    pub log_bytes: usize,
    /// Guest log lines per second, per function.
    pub log_lines_per_s: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self::from(&schema::LimitsConfig::default())
    }
}

impl From<&schema::LimitsConfig> for Limits {
    fn from(c: &schema::LimitsConfig) -> Self {
        Self {
            timeout: Duration::from_millis(c.timeout_ms),
            memory_bytes: usize::try_from(c.memory_mib.saturating_mul(1024 * 1024))
                .unwrap_or(usize::MAX),
            max_calls: c.max_calls,
            max_payload_bytes: c.max_payload_bytes,
            queue: c.queue,
            queue_policy: c.queue_policy,
            max_instances: c.max_instances,
            max_tables: c.max_tables,
            max_table_elements: c.max_table_elements,
            log_lines: c.log_lines,
            log_bytes: c.log_bytes,
            log_lines_per_s: c.log_lines_per_s,
        }
    }
}

/// A validated sink.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkSpec {
    /// Unique name.
    pub name: String,
    /// Envelope encoding.
    pub format: EnvelopeFormat,
    /// Records per message or request at most.
    pub batch_max: usize,
    /// How long a partial batch waits to fill.
    pub batch_linger: Duration,
    /// This sink's outbox limits.
    pub limits: crate::outbox::SinkLimits,
    /// Kind-specific settings.
    pub kind: SinkKind,
}
