//! The configuration file's schema, as written by users (TOML).
//!
//! Every struct denies unknown fields so that a typo is an error rather than a
//! silently ignored setting. Defaults are functions so that the documented
//! default and the applied default are the same value.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

mod functions;
mod sinks;

pub use crate::sinks::http::config::HttpSinkConfig;
pub use crate::sinks::mqtt::config::{MqttProtocol, MqttSinkConfig};
pub use crate::sources::SourceConfig;
pub use crate::sources::i2c::config::{I2cDriver, I2cSourceConfig};
pub use crate::sources::serial::config::{
    FlowControl, FramingKind, LengthEndian, LengthWidth, Parity, SerialSourceConfig,
};
pub use functions::*;
pub use sinks::*;

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
    /// Fleet deploys of signed bundles (`[fleet]`). Off when absent.
    pub fleet: Option<super::fleet::FleetConfig>,
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
    /// instance, a reload candidate, and room for `edgefn invoke`), at
    /// least 64 so a reload can add functions (a slot reserves address
    /// space, not memory).
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
    /// Threads for the gateway's network and timer tasks (MQTT connections,
    /// the embedded broker's guard, sinks, the admin endpoint). Functions,
    /// the outbox's SQLite and the broker's router run on threads of their
    /// own, so one is enough for most boards: each event then wakes one
    /// fewer thread, which cut CPU per event by a quarter in the load
    /// benchmark. Raise it when one core's worth of network work is the
    /// limit (thousands of devices on the embedded broker's TLS listener).
    #[serde(default = "default_io_threads")]
    pub io_threads: usize,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}

fn default_shutdown_timeout_s() -> u64 {
    10
}

fn default_io_threads() -> usize {
    1
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

/// Marks a nested key path inside an error message, so the loader can append
/// it to the key it reports (serde's internally tagged enums lose the path).
pub(crate) const NESTED_PATH: char = '\u{1}';

/// Splits a tagged table into its `kind` and the rest.
pub(crate) fn tagged<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<(String, toml::Table), D::Error> {
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
pub(crate) fn inner<T: serde::de::DeserializeOwned, E: serde::de::Error>(
    table: toml::Table,
) -> Result<T, E> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        E::custom(format!(
            "{NESTED_PATH}{path}{NESTED_PATH}{}",
            e.into_inner()
        ))
    })
}

/// The error for an unknown `kind` of `what` (`source`, `sink`), listing
/// the known ones.
pub(crate) fn unknown_kind<E: serde::de::Error>(what: &str, kind: &str, known: &[&str]) -> E {
    let quoted: Vec<String> = known.iter().map(|k| format!("\"{k}\"")).collect();
    let list = match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    E::custom(format!(
        "{NESTED_PATH}kind{NESTED_PATH}unknown {what} kind `{kind}` (use {list})"
    ))
}
