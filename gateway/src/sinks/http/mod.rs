//! The HTTP sink: POSTs batches of outbox records (a JSON or CBOR array of
//! envelopes) to a URL, one request at a time, in sequence order.
//!
//! - 2xx: the batch is confirmed and deleted from the outbox.
//! - 5xx, 408, 429, timeouts and connection errors: the same batch is sent
//!   again after exponential back-off with jitter (up to `max_backoff_ms`),
//!   for as long as it takes.
//! - Any other 4xx: the server will not take this batch; it goes to the
//!   dead-letter topic with the status and the start of the response body,
//!   and delivery moves on.
//!
//! Records of the outbox's high lane are sent before normal ones, and a
//! batch never mixes lanes (see [`crate::outbox::lane`]).
//!
//! Each request carries `Idempotency-Key: <gateway>-<first seq>-<last seq>`
//! and every envelope its own `id`.
//!
//! TLS: the system's CAs are trusted, plus `tls.ca` if given; `tls.cert` and
//! `tls.key` add a client certificate (mutual TLS), with or without `ca`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;

pub mod config;

use super::{BuiltSink, CommonKeys, SinkEnv, SinkError, SinkPlugin};
use super::{Sink, SinkCommon, SinkContext, dead_letter, envelope};
use crate::config::{EnvelopeFormat, KeyChanges, Scope};
use config::{HttpSinkConfig, HttpSinkSpec};

/// Bytes of an error response kept for the dead letter.
const MAX_ERROR_BODY: usize = 1024;

/// The HTTP sink.
pub struct HttpSink {
    common: SinkCommon,
    spec: HttpSinkSpec,
    client: reqwest::Client,
}

enum Outcome {
    Delivered,
    Rejected(String),
    Retry(String),
}

/// The HTTP client of `spec`: its timeouts, and the CA and client identity
/// of `tls`.
fn client(spec: &HttpSinkSpec) -> Result<reqwest::Client, (&'static str, reqwest::Error)> {
    let mut b = reqwest::Client::builder()
        .timeout(spec.timeout)
        .connect_timeout(spec.timeout)
        .user_agent(concat!("edgefn/", env!("CARGO_PKG_VERSION")));
    if let Some(tls) = &spec.tls {
        // `ca` adds to the system's CAs; without it they alone are trusted.
        if let Some(ca) = &tls.ca {
            for cert in reqwest::Certificate::from_pem_bundle(ca).map_err(|e| ("tls.ca", e))? {
                b = b.add_root_certificate(cert);
            }
        }
        if let Some((cert, key)) = &tls.client_auth {
            let mut pem = cert.clone();
            pem.push(b'\n');
            pem.extend_from_slice(key);
            b = b.identity(reqwest::Identity::from_pem(&pem).map_err(|e| ("tls.cert/tls.key", e))?);
        }
    }
    let what = if spec.tls.is_some() {
        "tls"
    } else {
        "HTTP client"
    };
    b.build().map_err(|e| (what, e))
}

/// `kind = "http"`.
pub struct Kind;

impl SinkPlugin for Kind {
    const KIND: &'static str = "http";
    type Config = HttpSinkConfig;
    type Spec = HttpSinkSpec;

    fn common(c: &HttpSinkConfig) -> CommonKeys<'_> {
        CommonKeys {
            name: &c.name,
            format: c.format,
            batch_max: c.batch_max,
            batch_linger_ms: c.batch_linger_ms,
            outbox: &c.outbox,
        }
    }

    fn validate(c: &HttpSinkConfig, scope: &mut Scope<'_, '_>) -> Option<HttpSinkSpec> {
        config::validate(c, scope)
    }

    fn changed(a: &HttpSinkSpec, b: &HttpSinkSpec, keys: &mut KeyChanges) {
        keys.key("url", &a.url, &b.url);
        keys.key("headers", &a.headers, &b.headers);
        keys.key("timeout_ms", &a.timeout, &b.timeout);
        keys.key("max_backoff_ms", &a.max_backoff, &b.max_backoff);
        keys.key("tls", &a.tls, &b.tls);
    }

    fn build(
        common: SinkCommon,
        spec: &HttpSinkSpec,
        _env: &SinkEnv<'_>,
    ) -> Result<BuiltSink, SinkError> {
        let client = client(spec).map_err(|(what, e)| SinkError {
            sink: common.name.clone(),
            what,
            source: Box::new(e),
        })?;
        Ok(HttpSink {
            common,
            spec: spec.clone(),
            client,
        }
        .boxed())
    }
}

impl Sink for HttpSink {
    async fn run(self, ctx: SinkContext) {
        let spec = self.spec.clone();
        let client = self.client.clone();
        let Some((reader, mut committed)) = ctx.delivery_inputs(&self.common.name) else {
            return;
        };
        let content_type = match self.common.format {
            EnvelopeFormat::Json => "application/json",
            EnvelopeFormat::Cbor => "application/cbor",
        };
        let mut after = crate::outbox::Cursor::default();
        'batches: while !ctx.stop.is_cancelled() {
            let mut batch = match reader.next_batch(
                &self.common.name,
                &after,
                self.common.batch_max,
            ) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(sink = %self.common.name, error = %e, "Outbox read failed.");
                    Vec::new()
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    () = ctx.stop.cancelled() => break,
                    r = committed.changed() => if r.is_err() { break },
                }
                continue;
            }
            if batch.len() < self.common.batch_max && !self.common.batch_linger.is_zero() {
                tokio::select! {
                    () = ctx.stop.cancelled() => break,
                    () = tokio::time::sleep(self.common.batch_linger) => {}
                }
                if let Ok(more) =
                    reader.next_batch(&self.common.name, &after, self.common.batch_max)
                {
                    batch = more;
                }
                if batch.is_empty() {
                    // Dropped or expired while lingering.
                    continue;
                }
            }
            let body = envelope::encode_batch(self.common.format, &ctx.gateway_id, &batch, true);
            let key = envelope::batch_key(&ctx.gateway_id, &batch);
            let mut attempt = 0u32;
            loop {
                let mut req = client
                    .post(&spec.url)
                    .header("Content-Type", content_type)
                    .header("Idempotency-Key", &key)
                    .body(body.clone());
                for (name, value) in &spec.headers {
                    req = req.header(name, value);
                }
                let outcome = tokio::select! {
                    () = ctx.stop.cancelled() => break 'batches,
                    r = req.send() => match r {
                        Ok(resp) => {
                            let status = resp.status();
                            if status.is_success() {
                                Outcome::Delivered
                            } else {
                                let text = resp.text().await.unwrap_or_default();
                                let mut text: String = text.chars().take(MAX_ERROR_BODY).collect();
                                if text.is_empty() {
                                    text = "(empty body)".into();
                                }
                                let reason = format!("HTTP {status}: {text}");
                                if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
                                    Outcome::Retry(reason)
                                } else {
                                    Outcome::Rejected(reason)
                                }
                            }
                        }
                        Err(e) => Outcome::Retry(format!("{e}")),
                    },
                };
                let seqs: Vec<u64> = batch.iter().map(|r| r.seq).collect();
                match outcome {
                    Outcome::Delivered => {
                        if attempt > 0 {
                            ctx.stats
                                .resent
                                .fetch_add(seqs.len() as u64, Ordering::Relaxed);
                            tracing::info!(sink = %self.common.name, attempts = attempt + 1, "Batch delivered after retries.");
                        }
                        ctx.stats
                            .delivered
                            .fetch_add(seqs.len() as u64, Ordering::Relaxed);
                        ctx.metrics
                            .sink_acked
                            .fetch_add(seqs.len() as u64, Ordering::Relaxed);
                        ctx.outbox.confirm(&self.common.name, seqs);
                        after.advance_past(&batch);
                        break;
                    }
                    Outcome::Rejected(reason) => {
                        dead_letter(&ctx, &self.common.name, &reason, &batch).await;
                        ctx.outbox.confirm(&self.common.name, seqs);
                        after.advance_past(&batch);
                        break;
                    }
                    Outcome::Retry(reason) => {
                        ctx.stats.failures.fetch_add(1, Ordering::Relaxed);
                        let base =
                            Duration::from_millis(100u64.saturating_mul(1 << attempt.min(16)))
                                .min(spec.max_backoff);
                        let jitter: f64 = rand::rng().random_range(0.5..1.0);
                        let wait = base.mul_f64(jitter);
                        if attempt == 0 {
                            tracing::warn!(sink = %self.common.name, reason = %reason, records = batch.len(), "HTTP delivery failed; retrying with back-off.");
                        } else {
                            tracing::debug!(sink = %self.common.name, reason = %reason, attempt, "HTTP delivery failed again.");
                        }
                        attempt = attempt.saturating_add(1);
                        tokio::select! {
                            () = ctx.stop.cancelled() => break 'batches,
                            () = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
        tracing::debug!(sink = %self.common.name, "Sink stopped.");
    }
}
