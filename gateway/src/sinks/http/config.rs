//! The `[[sinks]]` table of `kind = "http"` as written, its validation, and
//! the validated [`HttpSinkSpec`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::config::schema::{EnvelopeFormat, SinkOutboxConfig, TlsConfig};
use crate::config::{Scope, http_tls};

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

/// A validated HTTP sink.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSinkSpec {
    /// The URL batches are POSTed to.
    pub url: String,
    /// Extra headers, including `Authorization` when a token is set.
    pub headers: Vec<(String, String)>,
    /// Request timeout.
    pub timeout: Duration,
    /// Longest wait between retries.
    pub max_backoff: Duration,
    /// Custom CA and/or client identity.
    pub tls: Option<HttpTls>,
}
/// TLS files of an HTTP sink, read and checked at validation time.
#[derive(Clone, PartialEq)]
pub struct HttpTls {
    /// PEM CA certificates trusted besides the system's; `None`: the
    /// system's only.
    pub ca: Option<Vec<u8>>,
    /// PEM client certificate chain and key, for mutual TLS.
    pub client_auth: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for HttpTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("HttpTls")
            .field("ca_bytes", &self.ca.as_ref().map(Vec::len))
            .field("client_auth", &self.client_auth.is_some())
            .finish()
    }
}

pub(super) fn validate(c: &HttpSinkConfig, scope: &mut Scope<'_, '_>) -> Option<HttpSinkSpec> {
    if c.subscribe.is_some() {
        scope.add(
            "subscribe",
            "only MQTT sinks can subscribe to cloud commands (this sink is `kind = \"http\"`)",
        );
    }
    let (p, key, resolve) = scope.parts();
    let secure = c.url.starts_with("https://");
    if !secure && !c.url.starts_with("http://") {
        p.add(
            format!("{key}.url"),
            format!("`{}` must start with `http://` or `https://`", c.url),
        );
        return None;
    }
    match reqwest::Url::parse(&c.url) {
        Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {}
        Ok(_) => {
            p.add(format!("{key}.url"), format!("`{}` has no host", c.url));
            return None;
        }
        Err(e) => {
            p.add(
                format!("{key}.url"),
                format!("`{}` is not a valid URL: {e}", c.url),
            );
            return None;
        }
    }
    if !(100..=600_000).contains(&c.timeout_ms) {
        p.add(
            format!("{key}.timeout_ms"),
            "must be between 100 and 600000",
        );
    }
    if c.max_backoff_ms < 100 {
        p.add(format!("{key}.max_backoff_ms"), "must be at least 100");
    }
    let mut headers = Vec::new();
    for (name, value) in &c.headers {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            p.add(
                format!("{key}.headers.{name}"),
                "is not a valid header name",
            );
        } else if value.contains(['\r', '\n']) {
            p.add(
                format!("{key}.headers.{name}"),
                "must not contain line breaks",
            );
        } else {
            headers.push((name.clone(), value.clone()));
        }
    }
    if let Some(token) = &c.bearer_token {
        if token.is_empty() || token.contains(['\r', '\n']) {
            p.add(
                format!("{key}.bearer_token"),
                "must be a non-empty single line",
            );
        } else {
            headers.push(("Authorization".into(), format!("Bearer {token}")));
        }
    }
    let tls = match (&c.tls, secure) {
        (Some(_), false) => {
            p.add(
                format!("{key}.tls"),
                format!("is set but `{}` is not `https://`", c.url),
            );
            None
        }
        (Some(t), true) => http_tls(p, &format!("{key}.tls"), t, resolve),
        (None, _) => None,
    };
    Some(HttpSinkSpec {
        url: c.url.clone(),
        headers,
        timeout: Duration::from_millis(c.timeout_ms),
        max_backoff: Duration::from_millis(c.max_backoff_ms),
        tls,
    })
}
