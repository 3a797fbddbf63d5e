//! Builds the whole gateway from a [`ValidConfig`] and shuts it down.
//!
//! Start order: data dir, engine and every function (all load errors are
//! collected), broker, local publisher, function workers, the router, sinks
//! (an MQTT sink with `subscribe` feeds cloud commands to the router),
//! sources, the file watch for hot reload. No task starts before everything that can fail
//! has been checked.
//!
//! Shutdown is a drain, not an abort: cancelling stops the sources and the
//! sinks' command intake; dropping the router (every holder lets go)
//! closes each function's queue, so the workers finish what is
//! queued; the last worker's end closes the sinks' queues and disconnects the
//! local publisher after its queued publishes; sinks wait briefly for
//! acknowledgements. The caller bounds the whole with a timeout.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::BrokerError;
use crate::config::SinkKind;
use crate::config::SourceSpec;
use crate::config::{Broker, MqttEndpoint, ValidConfig};
use crate::metrics::{FunctionMetrics, GatewayMetrics};
use crate::outbox::{Outbox, OutboxConfig, OutboxError};
use crate::output::SerialWriters;
use crate::output::{OutputPort, local_publisher};
use crate::progress::{Progress, SOURCE_LIMIT, WORKER_MARGIN};
use crate::router::{Route, Router};
use crate::runtime::queue::queue;
use crate::runtime::reload::{ReloadOutcome, Reloader, Slot, watch_files};
use crate::runtime::worker::Worker;
use crate::runtime::{EngineError, LoadError, LoadedFunction, Runtime, RuntimeOptions};
use crate::sinks::http::HttpSink;
use crate::sinks::mqtt::MqttSink;
use crate::sinks::{DeliveryStats, Sink, SinkCommon, SinkContext};
use crate::sources::i2c::{I2cParts, I2cSource};
use crate::sources::mqtt::{AckPoint, MqttSource, MqttSourceConfig};
use crate::sources::serial::{SerialParts, SerialSource, SourceStats, WRITE_QUEUE};
use crate::sources::{Source, SourceContext, SourceError};

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
    /// The outbox could not be opened.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The admin endpoint could not listen.
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
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
    functions: Vec<(String, Arc<FunctionMetrics>)>,
    metrics: Arc<GatewayMetrics>,
    local: MqttEndpoint,
    ready: tokio::sync::watch::Receiver<bool>,
    outbox: Outbox,
    sinks: Vec<crate::admin::Named<DeliveryStats>>,
    sources: Vec<crate::admin::Named<SourceStats>>,
    reloader: Arc<Reloader>,
    pooling: bool,
    admin: Option<SocketAddr>,
    progress: Arc<Progress>,
    broker_guard: Option<Arc<crate::broker::guard::Guard>>,
}

enum Parts {
    Serial(SerialParts),
    I2c(I2cParts),
}

impl Gateway {
    /// Starts everything `config` describes.
    pub async fn start(config: &ValidConfig) -> Result<Self, StartError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| StartError::DataDir {
            path: config.data_dir.clone(),
            reason: e.to_string(),
        })?;
        let runtime = {
            let opts = RuntimeOptions::for_gateway(config);
            Arc::new(
                tokio::task::spawn_blocking(move || Runtime::new(&opts))
                    .await
                    .map_err(|e| StartError::Engine(EngineError::from_join(&e)))??,
            )
        };
        let loaded = {
            let runtime = runtime.clone();
            let config = config.clone();
            tokio::task::spawn_blocking(move || load_functions(&runtime, &config))
                .await
                .map_err(|e| StartError::Engine(EngineError::from_join(&e)))?
                .map_err(StartError::Functions)?
        };
        let admin_listener = match &config.admin {
            Some(a) => Some(crate::admin::bind(a.listen).await?),
            None => None,
        };
        let metrics = Arc::new(GatewayMetrics::default());
        let (local, embedded) = match &config.broker {
            Broker::Embedded {
                retention_bytes_per_filter,
                access,
                ..
            } => {
                let broker =
                    crate::broker::start(access, *retention_bytes_per_filter, metrics.clone())
                        .await?;
                let endpoint = MqttEndpoint {
                    host: loopback_for(broker.addr).to_string(),
                    port: broker.addr.port(),
                    client_id: format!("edgefn-{}", config.gateway_id),
                    credentials: broker.login.clone(),
                    tls: None,
                };
                (endpoint, Some(broker))
            }
            Broker::External(endpoint) => (endpoint.clone(), None),
        };

        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let progress = Arc::new(Progress::default());

        let outbox = Outbox::open(OutboxConfig {
            path: config.data_dir.join("outbox.sqlite"),
            max_commits_per_sec: config.outbox_commits_per_sec,
            sinks: config.sinks.iter().map(|s| s.limits.clone()).collect(),
        })?;

        let publisher_stop = CancellationToken::new();
        let (publisher, poll) = local_publisher(&local, publisher_stop.clone(), metrics.clone());
        tracker.spawn(poll);

        // Serial sources: their write queues go to the workers' output port.
        let mut serial_writers = SerialWriters::new();
        let mut source_parts = Vec::new();
        let mut source_stats = Vec::new();
        for spec in &config.sources {
            let stats = Arc::new(SourceStats::default());
            match spec {
                SourceSpec::Serial(s) => {
                    source_stats.push((s.name.clone(), "serial", stats.clone()));
                    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
                    serial_writers.insert(s.name.clone(), (tx, stats.clone()));
                    source_parts.push(Parts::Serial(SerialParts {
                        spec: s.clone(),
                        writes: rx,
                        stats,
                        local: publisher.clone(),
                        beat: progress.watch("source", &s.name, SOURCE_LIMIT),
                    }));
                }
                SourceSpec::I2c(s) => {
                    source_stats.push((s.name.clone(), "i2c", stats.clone()));
                    source_parts.push(Parts::I2c(I2cParts {
                        spec: s.clone(),
                        stats,
                        beat: progress.watch("source", &s.name, SOURCE_LIMIT),
                        local: publisher.clone(),
                    }));
                }
            }
        }
        let port = OutputPort::new(publisher.clone(), outbox.clone(), serial_writers);

        let workers = TaskTracker::new();
        let mut routes = Vec::new();
        let mut functions = Vec::new();
        let mut slots = Vec::new();
        for (function, spec) in loaded.into_iter().zip(&config.functions) {
            let metrics = function.metrics().clone();
            tracing::info!(
                function = %spec.name,
                version = %function.version(),
                cached = function.from_cache(),
                instance = ?spec.instance,
                "Function loaded."
            );
            let (tx, rx) = queue(spec.limits.queue, spec.limits.queue_policy, metrics.clone());
            routes.push(Route {
                function: spec.name.clone(),
                triggers: spec.triggers.clone(),
                queue: tx,
            });
            functions.push((spec.name.clone(), metrics.clone()));
            let (versions_tx, versions) = tokio::sync::watch::channel(Arc::new(function));
            slots.push(Slot::new(spec.clone(), versions_tx, metrics));
            workers.spawn(
                Worker {
                    versions,
                    queue: rx,
                    port: port.clone(),
                    breaker: spec.breaker.clone(),
                    rollback_after: config.runtime.rollback_after,
                    beat: progress.watch(
                        "function",
                        &spec.name,
                        spec.limits.timeout + WORKER_MARGIN,
                    ),
                }
                .run(),
            );
        }
        // Sinks start after the router: cloud commands go through it. Should
        // a source then fail to build, intake stops (no command is taken for
        // a gateway that did not start).
        let stop_intake_on_error = cancel.clone().drop_guard();
        let router = Arc::new(Router::new(routes, metrics.clone()));
        let sinks_stop = CancellationToken::new();
        let mut sinks = Vec::new();
        for spec in &config.sinks {
            let stats = Arc::new(DeliveryStats::default());
            let kind = match &spec.kind {
                SinkKind::Mqtt(_) => "mqtt",
                SinkKind::Http(_) => "http",
            };
            sinks.push((spec.name.clone(), kind, stats.clone()));
            let ctx = SinkContext {
                outbox: outbox.clone(),
                gateway_id: config.gateway_id.clone(),
                stop: sinks_stop.clone(),
                metrics: metrics.clone(),
                stats,
                local: publisher.clone(),
                router: match &spec.kind {
                    SinkKind::Mqtt(m) if !m.subscribe.is_empty() => Some(router.clone()),
                    _ => None,
                },
                cancel: cancel.clone(),
            };
            let common = SinkCommon::of(spec);
            match &spec.kind {
                SinkKind::Mqtt(m) => {
                    let own = embedded.as_ref().and_then(|b| b.own_client(&m.endpoint));
                    let m = match own {
                        Some(endpoint) => &crate::config::MqttSinkSpec {
                            endpoint,
                            ..m.clone()
                        },
                        None => m,
                    };
                    tracker.spawn(MqttSink::build(common, m).run(ctx))
                }
                SinkKind::Http(h) => tracker.spawn(HttpSink::build(common, h).run(ctx)),
            };
        }
        let pooling = runtime.pooling();
        let reloader = Arc::new(Reloader::new(
            runtime,
            config.clone(),
            slots,
            metrics.clone(),
        ));
        if let Some(interval) = config.runtime.watch {
            tracker.spawn(watch_files(reloader.clone(), interval, cancel.clone()));
        }
        drop(port);
        workers.close();
        // When the last worker is done, nothing can publish or forward any
        // more: let the publisher flush and disconnect, commit what is left
        // in the outbox, then stop the sinks (undelivered records stay in the
        // outbox for the next start).
        let flush_outbox = outbox.clone();
        // Serial and I2C sources mirror through the publisher too: with no
        // function at all (a plain bridge), the workers are done at once,
        // and the publisher must still outlive the sources.
        let device_sources = TaskTracker::new();
        let devices_done = device_sources.clone();
        tracker.spawn(async move {
            devices_done.wait().await;
            workers.wait().await;
            let _ = publisher.try_disconnect();
            publisher_stop.cancel();
            flush_outbox.flush().await;
            sinks_stop.cancel();
        });

        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let ctx = SourceContext {
            cancel: cancel.clone(),
            router,
            metrics: metrics.clone(),
            ready: Arc::new(ready_tx),
        };
        for parts in source_parts {
            match parts {
                Parts::Serial(p) => {
                    device_sources.spawn(SerialSource::build(p, &ctx)?.run(ctx.clone()));
                }
                Parts::I2c(p) => {
                    device_sources.spawn(I2cSource::build(p, &ctx)?.run(ctx.clone()));
                }
            }
        }
        device_sources.close();
        let source = MqttSource::build(
            MqttSourceConfig {
                endpoint: local.clone(),
                keep_alive: config.source_keep_alive,
                ack: match config.broker {
                    Broker::Embedded { .. } => AckPoint::Queued,
                    Broker::External(_) => AckPoint::Handled,
                },
            },
            &ctx,
        )?;
        tracker.spawn(source.run(ctx));
        let admin = match admin_listener {
            Some(listener) => {
                let addr = listener.local_addr().ok();
                let state = Arc::new(crate::admin::AdminState {
                    gateway_id: config.gateway_id.clone(),
                    functions: functions.clone(),
                    metrics: metrics.clone(),
                    sources: source_stats.clone(),
                    sinks: sinks.clone(),
                    outbox: outbox.clone(),
                    reader: std::sync::Mutex::new(None),
                    ready: ready.clone(),
                    progress: progress.clone(),
                    stopping: cancel.clone(),
                    token: config.admin.as_ref().and_then(|a| a.token.clone()),
                });
                // Served until the drain has finished, so a scraper sees
                // `/readyz` turn 503 while the gateway stops.
                let stop = CancellationToken::new();
                tokio::spawn(crate::admin::serve(listener, state, stop.clone()));
                let done = tracker.clone();
                tokio::spawn(async move {
                    done.wait().await;
                    stop.cancel();
                });
                addr
            }
            None => None,
        };
        tokio::spawn(crate::progress::monitor(progress.clone(), cancel.clone()));
        tracker.close();
        stop_intake_on_error.disarm();
        let gateway = Self {
            cancel,
            tracker,
            functions,
            metrics,
            local,
            ready,
            outbox,
            sinks,
            sources: source_stats,
            reloader,
            pooling,
            admin,
            progress,
            broker_guard: embedded.and_then(|b| b.guard),
        };
        // Events published before the source has subscribed would be missed:
        // wait for the subscription, but do not fail start-up over an
        // unreachable external broker (the source keeps retrying).
        if !gateway.wait_ready(START_READY_WAIT).await {
            tracing::warn!(
                broker = %format!("{}:{}", gateway.local.host, gateway.local.port),
                "MQTT source not subscribed yet; events will flow once the broker is reachable."
            );
        }
        tracing::info!(
            gateway = %config.gateway_id,
            functions = gateway.functions.len(),
            sinks = config.sinks.len(),
            broker = %format!("{}:{}", gateway.local.host, gateway.local.port),
            "Gateway started."
        );
        Ok(gateway)
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

    /// A function's counters.
    pub fn function_metrics(&self, name: &str) -> Option<&Arc<FunctionMetrics>> {
        self.functions
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| m)
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

    /// Applies a re-read configuration (`SIGHUP`): functions whose settings
    /// or component changed are reloaded without a restart; what needs a
    /// restart is logged by name; a configuration naming sinks or serial
    /// ports the gateway lacks is refused whole.
    pub async fn reload(&self, config: ValidConfig) -> ReloadOutcome {
        self.reload_passwords();
        self.reloader.apply(config).await
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

/// Where a local client connects to reach a broker listening on `addr`.
fn loopback_for(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    }
}

/// systemd's service notification protocol (`Type=notify`): readiness,
/// stopping, and watchdog pings. Every call is a no-op when the gateway was
/// not started by systemd (`$NOTIFY_SOCKET` unset).
pub mod systemd {
    use std::sync::Arc;
    use std::time::Duration;

    use sd_notify::NotifyState;
    use tokio_util::sync::CancellationToken;

    use crate::progress::Progress;

    fn send(states: &[NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(false, states) {
            tracing::warn!(error = %e, "Could not notify systemd.");
        }
    }

    /// Start-up is complete: sources, functions and sinks run.
    pub fn ready(status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// The gateway is draining and will exit.
    pub fn stopping() {
        send(&[
            NotifyState::Stopping,
            NotifyState::Status("draining in-flight events"),
        ]);
    }

    /// `$WATCHDOG_USEC` if the watchdog is meant for this process: as
    /// `sd_watchdog_enabled(3)`, a `$WATCHDOG_PID` that names another process
    /// disables it, an absent one does not.
    fn watchdog_usec() -> Option<u64> {
        let usec = std::env::var("WATCHDOG_USEC").ok()?.parse::<u64>().ok()?;
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.parse::<u32>().ok() == Some(std::process::id()));
        (for_us && usec > 0).then_some(usec)
    }

    /// Pings the watchdog at half its interval (`WatchdogSec=` sets
    /// `$WATCHDOG_USEC`) until `stop` is cancelled. The pings come from a
    /// task on the gateway's async runtime: when the runtime stalls (all its
    /// threads blocked, a deadlock), the pings stop and systemd restarts the
    /// service. They also stop while a function worker or a source is stuck
    /// ([`crate::progress`]); `STATUS=` then says which.
    pub fn spawn_watchdog(stop: CancellationToken, progress: Arc<Progress>) {
        let Some(usec) = watchdog_usec() else {
            return;
        };
        let period = Duration::from_micros(usec / 2).max(Duration::from_millis(10));
        tracing::info!(
            period_ms = period.as_millis() as u64,
            "systemd watchdog enabled."
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stuck = false;
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                match progress.stuck() {
                    None if stuck => {
                        stuck = false;
                        send(&[
                            NotifyState::Status("progressing again"),
                            NotifyState::Watchdog,
                        ]);
                    }
                    None => send(&[NotifyState::Watchdog]),
                    Some(why) if !stuck => {
                        stuck = true;
                        send(&[NotifyState::Status(&format!("stuck: {why}"))]);
                    }
                    Some(_) => {}
                }
            }
        });
    }
}
