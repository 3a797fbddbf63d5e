//! Builds the whole gateway from a [`ValidConfig`] and shuts it down.
//!
//! Start ([`start`]): data dir, engine and every function (all load errors
//! are collected), broker, outbox, the functions' queues and the router,
//! then every sink and source is *built* (clients, TLS, devices, timers);
//! only then do tasks start: the local publisher, the sinks, the sources,
//! the function workers, the MQTT source and the file watch for hot reload.
//! No task starts before everything that can fail has been checked.
//!
//! Shutdown is a drain, not an abort: cancelling stops the sources; dropping
//! the router closes each function's queue, so the workers finish what is
//! queued; the last worker's end closes the sinks' queues and disconnects the
//! local publisher after its queued publishes; sinks wait briefly for
//! acknowledgements. The caller bounds the whole with a timeout.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::BrokerError;
use crate::config::{MqttEndpoint, ValidConfig};
use crate::metrics::{FunctionMetrics, GatewayMetrics};
use crate::outbox::{Outbox, OutboxError};
use crate::progress::Progress;
use crate::runtime::reload::{ReloadOutcome, Reloader};
use crate::runtime::{EngineError, LoadError, LoadedFunction, Runtime};
use crate::sinks::{DeliveryStats, SinkError};
use crate::sources::{SourceError, SourceStats};

pub use start::build_sinks;

/// How long start-up waits for the MQTT source's subscription.
const START_READY_WAIT: Duration = Duration::from_secs(5);

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be created.
    #[error("gateway.data_dir: cannot create `{path}`: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// The Wasm engine could not be created.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// One or more functions could not be loaded.
    #[error("{} function(s) could not be loaded:\n  - {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  - "))]
    Functions(Vec<LoadError>),
    /// The embedded broker did not start.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A source could not be built.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A sink could not be built.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The outbox could not be opened.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The admin endpoint could not listen.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
    /// The fleet state in the data directory could not be opened.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::BootError),
}

/// Loads every function of `config`, collecting all errors.
pub fn load_functions(
    runtime: &Runtime,
    config: &ValidConfig,
) -> Result<Vec<LoadedFunction>, Vec<LoadError>> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for spec in &config.functions {
        match runtime.load(spec, &config.gateway_id, Arc::default()) {
            Ok(f) => loaded.push(f),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

/// A running gateway.
pub struct Gateway {
    cancel: CancellationToken,
    tracker: TaskTracker,
    functions: Arc<crate::metrics::FunctionTable>,
    metrics: Arc<GatewayMetrics>,
    local: MqttEndpoint,
    ready: tokio::sync::watch::Receiver<bool>,
    outbox: Outbox,
    sinks: Vec<crate::admin::Named<DeliveryStats>>,
    sources: Vec<crate::admin::Named<SourceStats>>,
    reloader: Arc<Reloader>,
    subscriptions: Subscriptions,
    pooling: bool,
    admin: Option<SocketAddr>,
    progress: Arc<Progress>,
    broker_guard: Option<Arc<crate::broker::guard::Guard>>,
    fleet: Option<Arc<crate::fleet::Fleet>>,
}

/// The function set's subscriptions and the MQTT source's acknowledged
/// ones.
struct Subscriptions {
    /// Weak: the gateway must not keep the queues open past the drain.
    router: std::sync::Weak<crate::router::Router>,
    live: tokio::sync::watch::Receiver<Vec<String>>,
}

impl Gateway {
    /// Waits up to `timeout` until the MQTT source's subscriptions on the
    /// broker are exactly the current function set's (after a reload that
    /// changed them: the new filters subscribed and the stale ones
    /// unsubscribed, both acknowledged); returns whether they are.
    pub async fn wait_subscribed(&self, timeout: Duration) -> bool {
        let Some(want) = self
            .subscriptions
            .router
            .upgrade()
            .map(|r| r.subscriptions())
        else {
            return false;
        };
        let mut live = self.subscriptions.live.clone();
        matches!(
            tokio::time::timeout(timeout, live.wait_for(|l| *l == want)).await,
            Ok(Ok(_))
        )
    }

    /// Waits up to `timeout` until the MQTT source is connected and
    /// subscribed; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut ready = self.ready.clone();
        matches!(
            tokio::time::timeout(timeout, ready.wait_for(|r| *r)).await,
            Ok(Ok(_))
        )
    }

    /// Where the admin endpoint listens, if configured (the bound address,
    /// so port 0 in the configuration gives the real port).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The local broker's host and port (for clients and tests).
    pub fn local_broker(&self) -> (&str, u16) {
        (&self.local.host, self.local.port)
    }

    /// Where the embedded broker's guard listens for devices (`plain` or
    /// `tls`), when it runs.
    pub fn broker_listener(&self, name: &str) -> Option<SocketAddr> {
        self.broker_guard.as_ref()?.listener(name)
    }

    /// The login the gateway's own clients use on the local broker (the
    /// embedded broker's internal one when its guard runs).
    pub fn local_login(&self) -> Option<&(String, String)> {
        self.local.credentials.as_ref()
    }

    /// A function's counters (`None` for a function not running, e.g.
    /// removed by a reload).
    pub fn function_metrics(&self, name: &str) -> Option<Arc<FunctionMetrics>> {
        self.functions.get(name)
    }

    /// The running functions' names, in configuration order (changes with
    /// every reload that adds or removes functions).
    pub fn function_names(&self) -> Vec<String> {
        self.functions.list().into_iter().map(|(n, _)| n).collect()
    }

    /// The outbox (counters, flush).
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// A serial or I2C source's counters.
    pub fn source_stats(&self, name: &str) -> Option<&Arc<SourceStats>> {
        self.sources
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, s)| s)
    }

    /// A sink's delivery counters.
    pub fn sink_stats(&self, name: &str) -> Option<&Arc<DeliveryStats>> {
        self.sinks
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, s)| s)
    }

    /// Whether function instances come from the pre-reserved pool (`false`
    /// after a fallback to on-demand allocation).
    pub fn pooling(&self) -> bool {
        self.pooling
    }

    /// Applies a re-read configuration (`SIGHUP`, or the fleet agent's):
    /// the function set becomes `config`'s (functions added, removed and
    /// updated, all or nothing; see [`crate::runtime::reload`]); what needs
    /// a restart is logged by name; a configuration naming sinks or serial
    /// ports the gateway lacks is refused whole. With `[fleet]`, the
    /// applied bundle's functions stay, validated with the new file's.
    pub async fn reload(&self, config: ValidConfig) -> ReloadOutcome {
        self.reload_passwords();
        match &self.fleet {
            Some(fleet) => fleet.reload(config).await,
            None => self.reloader.apply(config).await,
        }
    }

    /// The fleet agent, with a `[fleet]` section.
    pub fn fleet(&self) -> Option<&Arc<crate::fleet::Fleet>> {
        self.fleet.as_ref()
    }

    /// Re-reads the embedded broker's password file, if it has one; on an
    /// error the old entries stay and the failure is counted.
    fn reload_passwords(&self) {
        let Some(guard) = &self.broker_guard else {
            return;
        };
        match guard.reload_passwords() {
            Ok(Some(users)) => {
                tracing::info!(users, "Embedded broker: password file re-read.");
            }
            Ok(None) => {}
            Err(e) => {
                self.metrics
                    .reloads_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(error = %e, "Embedded broker: the password file could not be re-read; the previous entries stay.");
            }
        }
    }

    /// Checks the component files now (the file watch does it periodically).
    pub async fn check_files(&self) -> usize {
        self.reloader.check_files().await
    }

    /// Whether every worker and source makes progress (the watchdog).
    pub fn progress(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// Gateway-wide counters.
    pub fn metrics(&self) -> &Arc<GatewayMetrics> {
        &self.metrics
    }

    /// Stops intake, drains what is in flight, and waits up to `timeout`.
    /// Returns `false` if the timeout ran out first.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        self.cancel.cancel();
        let drained = tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok();
        if drained {
            tracing::info!("Gateway stopped.");
        } else {
            tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "Gateway shutdown timed out; in-flight work abandoned."
            );
        }
        drained
    }
}

mod start;
pub mod systemd;

/// Where a local client connects to reach a broker listening on `addr`.
fn loopback_for(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}
