//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics` (Prometheus
//! text format) and `/functions` (JSON).
//!
//! It listens on loopback by default; configuration refuses any other
//! address without a bearer token, and when a token is set every request
//! must carry it. Only `GET` is served, except `PUT /bundle` (a fleet
//! bundle for this board, see [`bundle`]), which is refused without a
//! `[fleet]` section and applies only bundles signed by a trusted key.
//! Connections are capped and a client that does not send its headers in
//! time is dropped, so a scraper cannot tie up the daemon.

mod bundle;
mod render;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::GatewayMetrics;
use crate::outbox::{Outbox, OutboxError, Reader};
use crate::progress::Progress;
use crate::sinks::DeliveryStats;
use crate::sources::SourceStats;

pub use render::{functions_json, prometheus};

/// Admin connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the admin endpoint did not start.
#[derive(Debug, thiserror::Error)]
#[error("admin.listen: cannot listen on `{addr}`: {reason}")]
pub struct AdminError {
    /// The configured address.
    pub addr: SocketAddr,
    /// The OS error.
    pub reason: String,
}

/// A source or sink: name, kind (`serial`, `i2c`, `mqtt`, `http`) and
/// counters.
pub type Named<T> = (String, &'static str, Arc<T>);

/// Everything the endpoint reads: shared handles to the gateway's counters.
pub struct AdminState {
    /// `gateway.id`.
    pub gateway_id: String,
    /// Per-function counters, in configuration order (changes at run
    /// time: functions are added and removed by a reload).
    pub functions: Arc<crate::metrics::FunctionTable>,
    /// Gateway-wide counters.
    pub metrics: Arc<GatewayMetrics>,
    /// Serial and I2C sources.
    pub sources: Vec<Named<SourceStats>>,
    /// Sinks and their delivery counters.
    pub sinks: Vec<Named<DeliveryStats>>,
    /// The outbox (depth per sink, oldest record).
    pub outbox: Outbox,
    /// The outbox read connection for the oldest-record query, opened at the
    /// first scrape and kept (`None` again after an error).
    pub reader: std::sync::Mutex<Option<Reader>>,
    /// Whether the MQTT source is subscribed.
    pub ready: watch::Receiver<bool>,
    /// Whether every function worker and source makes progress.
    pub progress: Arc<Progress>,
    /// Cancelled when the gateway starts stopping.
    pub stopping: CancellationToken,
    /// Required bearer token, if configured.
    pub token: Option<String>,
    /// The fleet agent, with a `[fleet]` section (`PUT /bundle`).
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
}

impl AdminState {
    /// Ready, or why not: `/readyz` and `edgefn_ready`.
    pub fn readiness(&self) -> Result<(), Cow<'static, str>> {
        if self.stopping.is_cancelled() {
            Err("stopping".into())
        } else if let Some(reason) = self.outbox.stats().failing() {
            Err(format!("outbox: commit failing: {reason}").into())
        } else if let Some(stuck) = self.progress.stuck() {
            Err(format!("stuck: {stuck}").into())
        } else if *self.ready.borrow() {
            Ok(())
        } else {
            Err("not subscribed to the local broker".into())
        }
    }

    /// Each sink's oldest stored record's forward time (ms since the
    /// epoch), on the kept read connection.
    fn oldest_records(&self) -> Result<Vec<Option<u64>>, OutboxError> {
        let mut kept = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let reader = match kept.take() {
            Some(r) => r,
            None => self.outbox.reader()?,
        };
        let result = self
            .sinks
            .iter()
            .map(|(s, _, _)| reader.oldest_ts(s))
            .collect::<Result<Vec<_>, _>>();
        // A connection that failed is not kept: the next scrape reopens.
        if result.is_ok() {
            *kept = Some(reader);
        }
        result
    }
}

/// Binds the admin address (before any task starts, so a taken port is a
/// start-up error).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr).await.map_err(|e| AdminError {
        addr,
        reason: e.to_string(),
    })
}

/// Serves requests until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, auth = state.token.is_some(), "Admin endpoint listening.");
    }
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "Admin endpoint could not accept a connection.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move {
                    let bundle = req.method() == Method::PUT && req.uri().path() == "/bundle";
                    let r = if bundle && authorized(state.token.as_deref(), &req) {
                        bundle::put(state, req).await
                    } else {
                        handle(state, &req).await
                    };
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "Admin connection ended with an error.");
            }
            drop(permit);
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    reply(status, "text/plain; charset=utf-8", body)
}

/// Whether `req` carries the bearer token (compared in constant time).
fn authorized(token: Option<&str>, req: &Request<Incoming>) -> bool {
    let Some(token) = token else { return true };
    let Some(given) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    given.len() == token.len()
        && given
            .iter()
            .zip(token.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn handle(state: Arc<AdminState>, req: &Request<Incoming>) -> Reply {
    if !authorized(state.token.as_deref(), req) {
        let mut r = text(StatusCode::UNAUTHORIZED, "bearer token required\n");
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"edgefn\""),
        );
        return r;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served (and PUT /bundle)\n",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match state.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("{why}\n"),
            ),
        },
        "/metrics" => {
            // SQLite: on a blocking thread.
            let s = state.clone();
            let oldest = match tokio::task::spawn_blocking(move || s.oldest_records()).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Admin endpoint could not read the outbox.");
                    vec![None; state.sinks.len()]
                }
                Err(_) => vec![None; state.sinks.len()],
            };
            reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                prometheus(&state, &oldest),
            )
        }
        "/functions" => reply(StatusCode::OK, "application/json", functions_json(&state)),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz, /metrics, /functions\n",
        ),
    }
}
