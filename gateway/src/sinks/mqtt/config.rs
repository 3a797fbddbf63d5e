//! The `[[sinks]]` table of `kind = "mqtt"` as written, its validation, and
//! the validated [`MqttSinkSpec`].

use std::time::Duration;

use serde::Deserialize;

use crate::config::schema::{EnvelopeFormat, SinkOutboxConfig, TlsConfig};
use crate::config::{MqttEndpoint, Scope, check_topic_template, endpoint};
use crate::topic::TopicFilter;

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

/// A validated MQTT sink.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttSinkSpec {
    /// The broker to deliver to.
    pub endpoint: MqttEndpoint,
    /// Topic template with `{gateway}`, `{function}`, `{sink}`, `{topic}`.
    pub topic_template: String,
    /// In-flight window (messages).
    pub max_inflight: u16,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Protocol version.
    pub protocol: MqttProtocol,
    /// Tear the connection down when a publish waits longer than this.
    pub ack_timeout: Duration,
    /// Cloud command filters (`{gateway}` replaced); empty: none.
    pub subscribe: Vec<TopicFilter>,
}

/// Checks the MQTT keys of `c`.
pub(super) fn validate(c: &MqttSinkConfig, scope: &mut Scope<'_, '_>) -> Option<MqttSinkSpec> {
    if c.max_inflight == 0 {
        scope.add("max_inflight", "must be at least 1");
    }
    if !(5..=65_535).contains(&c.keep_alive_s) {
        scope.add("keep_alive_s", "must be between 5 and 65535 seconds");
    }
    if !(1..=86_400).contains(&c.ack_timeout_s) {
        scope.add("ack_timeout_s", "must be between 1 and 86400 seconds");
    }
    let gateway_id = scope.gateway_id().to_owned();
    let subscribe = subscribe(c, scope);
    refuse_echo(c, &subscribe, scope);
    let (p, key, resolve) = scope.parts();
    check_topic_template(p, &format!("{key}.topic"), &c.topic);
    endpoint(
        p,
        key,
        resolve,
        &c.url,
        c.client_id
            .clone()
            .unwrap_or_else(|| format!("edgefn-{gateway_id}-{}", c.name)),
        c.username.as_deref(),
        c.password.as_deref(),
        c.tls.as_ref(),
    )
    .map(|endpoint| MqttSinkSpec {
        endpoint,
        topic_template: c.topic.clone(),
        max_inflight: c.max_inflight,
        keep_alive: Duration::from_secs(c.keep_alive_s),
        protocol: c.protocol,
        ack_timeout: Duration::from_secs(c.ack_timeout_s),
        subscribe,
    })
}

/// The placeholder replaced by the gateway id in a subscribe filter.
const GATEWAY: &str = "{gateway}";

/// `subscribe` with `{gateway}` replaced, each filter checked.
fn subscribe(c: &MqttSinkConfig, scope: &mut Scope<'_, '_>) -> Vec<TopicFilter> {
    let mut filters = Vec::new();
    for (j, raw) in c.subscribe.iter().enumerate() {
        let rendered = raw.replace(GATEWAY, scope.gateway_id());
        match TopicFilter::parse(&rendered) {
            Ok(f) => filters.push(f),
            Err(e) => scope.add(
                &format!("subscribe[{j}]"),
                format!("`{raw}` is not a valid MQTT topic filter: {e}"),
            ),
        }
    }
    filters
}

/// Refuses a `subscribe` filter that the sink's own `topic` can publish on:
/// each forward would come back as a command (and, with a function
/// triggered by it forwarding again, loop without end).
fn refuse_echo(c: &MqttSinkConfig, filters: &[TopicFilter], scope: &mut Scope<'_, '_>) {
    // Every topic the template can render: placeholders match any level
    // (`{topic}`, the event's topic, any number of them).
    let rendered = c
        .topic
        .replace(GATEWAY, scope.gateway_id())
        .replace("{function}", "+")
        .replace("{sink}", &c.name)
        .replace("{topic}", "#");
    let Some(forwards) = rendered
        .find('#')
        .map_or(Some(rendered.as_str()), |at| rendered.get(..=at))
        .and_then(|f| TopicFilter::parse(f).ok())
    else {
        return;
    };
    for (j, filter) in filters.iter().enumerate() {
        if filter.overlaps(&forwards) {
            scope.add(
                &format!("subscribe[{j}]"),
                format!(
                    "`{}` matches this sink's own `topic` (`{}`): every forward would come back as a command",
                    filter.as_str(),
                    c.topic
                ),
            );
        }
    }
}
