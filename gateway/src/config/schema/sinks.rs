//! `[[sinks]]` as written: MQTT and HTTP destinations and their outbox share.

use super::*;

/// `[[sinks]]`: a destination for forwarded records, chosen by `kind`.
#[derive(Debug, Clone)]
pub enum SinkConfig {
    /// An MQTT broker in the cloud (or anywhere else).
    Mqtt(MqttSinkConfig),
    /// An HTTP(S) endpoint that takes POSTed batches.
    Http(HttpSinkConfig),
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
    /// Not supported: only MQTT sinks take cloud commands. Accepted here
    /// only to refuse it with a clear message instead of serde's
    /// unknown-field text.
    #[serde(default)]
    pub subscribe: Option<toml::Value>,
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
    /// Topic filters to receive cloud commands on, on this sink's connection
    /// (persistent session, QoS 1); `{gateway}` is replaced by the gateway
    /// id. Each message triggers the functions whose triggers match it.
    #[serde(default)]
    pub subscribe: Vec<String>,
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
