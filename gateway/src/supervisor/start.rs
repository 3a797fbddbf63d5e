//! [`Gateway::start`]: everything that can fail is built first (engine,
//! functions, broker, outbox, sinks, sources); only then does any task of
//! the gateway's own start. Each step is one call; the kinds of sources and
//! sinks are behind their plug-in points ([`crate::sources::SourcePlugin`],
//! [`crate::sinks::SinkPlugin`]).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Gateway, START_READY_WAIT, StartError, Subscriptions, load_functions, loopback_for};
use crate::admin::{AdminState, Named};
use crate::config::{Broker, MqttEndpoint, ValidConfig};
use crate::metrics::{FunctionTable, GatewayMetrics};
use crate::outbox::{Outbox, OutboxConfig};
use crate::output::{OutputPort, Writers, local_publisher};
use crate::progress::Progress;
use crate::router::{Route, Router};
use crate::runtime::funcset::Workers;
use crate::runtime::queue::{QueueReceiver, queue};
use crate::runtime::reload::{Reloader, SetHandles, Slot, watch_files};
use crate::runtime::{EngineError, LoadedFunction, Runtime, RuntimeOptions};
use crate::sinks::{BuiltSink, DeliveryStats, SinkCommon, SinkContext, SinkEnv, SinkError};
use crate::sources::mqtt::{AckPoint, MqttSource, MqttSourceConfig};
use crate::sources::{BuildEnv, BuiltSource, Source, SourceContext, SourceError, SourceStats};

/// A function ready to run: its worker's inputs, not yet spawned.
struct Prepared {
    function: LoadedFunction,
    queue: QueueReceiver,
}

impl Gateway {
    /// Starts everything `config` describes.
    pub async fn start(config: &ValidConfig) -> Result<Self, StartError> {
        let (config, boot, runtime, loaded) = functions_to_start(config).await?;
        let config = &config;
        let admin_listener = match &config.admin {
            Some(a) => Some(crate::admin::bind(a.listen).await?),
            None => None,
        };
        let metrics = Arc::new(GatewayMetrics::default());
        let (local, embedded) = local_broker(config, &metrics).await?;
        let outbox = Outbox::open(OutboxConfig {
            path: config.data_dir.join("outbox.sqlite"),
            max_commits_per_sec: config.outbox_commits_per_sec,
            sinks: config.sinks.iter().map(|s| s.limits.clone()).collect(),
        })?;
        let progress = Arc::new(Progress::default());
        let publisher_stop = CancellationToken::new();
        let (publisher, publisher_poll) =
            local_publisher(&local, publisher_stop.clone(), metrics.clone());

        let (routes, prepared) = prepare_functions(loaded, config);
        let cancel = CancellationToken::new();
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let ctx = SourceContext {
            cancel: cancel.clone(),
            router: Arc::new(Router::new(routes, metrics.clone())),
            metrics: metrics.clone(),
            ready: Arc::new(ready_tx),
        };

        // Everything that can fail, before any task starts.
        let sinks = build_sinks(
            config,
            SinkEnv {
                broker: embedded.as_ref(),
            },
        )?;
        let env = BuildEnv {
            local: publisher.clone(),
            progress: progress.clone(),
            data_dir: config.data_dir.clone(),
        };
        let sources = build_sources(config, &env, &ctx)?;
        let (live_tx, live) = tokio::sync::watch::channel(Vec::new());
        let mqtt_source = mqtt_source(config, &local, &ctx, Arc::new(live_tx))?;

        // Start: publisher, sinks, workers, sources.
        let tracker = TaskTracker::new();
        tracker.spawn(publisher_poll);
        let sinks_stop = CancellationToken::new();
        // A sink taking cloud commands holds the router until `cancel`
        // fires; no other sink may (the workers stop once all let go).
        let sink_stats = spawn_sinks(&tracker, sinks, |stats, commands| SinkContext {
            outbox: outbox.clone(),
            gateway_id: config.gateway_id.clone(),
            stop: sinks_stop.clone(),
            metrics: metrics.clone(),
            stats,
            local: publisher.clone(),
            router: commands.then(|| ctx.router.clone()),
            cancel: cancel.clone(),
        });
        let (device_sources, writers, source_stats) = spawn_sources(sources);
        let port = OutputPort::new(publisher.clone(), outbox.clone(), writers);
        let workers = Workers {
            tracker: TaskTracker::new(),
            port,
            progress: progress.clone(),
            rollback_after: config.runtime.rollback_after,
        };
        let (functions, slots) = spawn_workers(prepared, config, &workers);
        tracker.spawn(
            Drain {
                cancel: cancel.clone(),
                sources: device_sources,
                workers: workers.tracker.clone(),
                publisher,
                publisher_stop,
                outbox: outbox.clone(),
                sinks_stop,
            }
            .run(),
        );
        let router = Arc::downgrade(&ctx.router);
        let subscriptions = Subscriptions {
            router: router.clone(),
            live,
        };
        tracker.spawn(mqtt_source.run(ctx));

        let pooling = runtime.pooling();
        let functions = Arc::new(FunctionTable::new(functions));
        let handles = SetHandles {
            router,
            workers,
            functions: functions.clone(),
        };
        let reloader = Arc::new(Reloader::new(
            runtime,
            config.clone(),
            slots,
            metrics.clone(),
            handles,
        ));
        let fleet = spawn_changes(config, boot, &reloader, &functions, &cancel, &tracker);
        tokio::spawn(crate::progress::monitor(progress.clone(), cancel.clone()));
        tracker.close();
        let mut gateway = Self {
            cancel,
            tracker,
            functions,
            metrics,
            local,
            ready,
            outbox,
            sinks: sink_stats,
            sources: source_stats,
            reloader,
            subscriptions,
            pooling,
            admin: None,
            progress,
            broker_guard: embedded.and_then(|b| b.guard),
            fleet,
        };
        if let Some(listener) = admin_listener {
            gateway.admin = gateway.serve_admin(listener, config);
        }
        gateway.announce(config).await;
        Ok(gateway)
    }

    /// Serves the admin endpoint until the drain has finished, so a scraper
    /// sees `/readyz` turn 503 while the gateway stops; returns its address.
    fn serve_admin(
        &self,
        listener: tokio::net::TcpListener,
        config: &ValidConfig,
    ) -> Option<std::net::SocketAddr> {
        let state = AdminState {
            gateway_id: config.gateway_id.clone(),
            functions: self.functions.clone(),
            metrics: self.metrics.clone(),
            sources: self.sources.clone(),
            sinks: self.sinks.clone(),
            outbox: self.outbox.clone(),
            reader: std::sync::Mutex::new(None),
            ready: self.ready.clone(),
            progress: self.progress.clone(),
            stopping: self.cancel.clone(),
            token: config.admin.as_ref().and_then(|a| a.token.clone()),
            fleet: self.fleet.clone(),
        };
        let addr = listener.local_addr().ok();
        let stop = CancellationToken::new();
        tokio::spawn(crate::admin::serve(listener, Arc::new(state), stop.clone()));
        let done = self.tracker.clone();
        tokio::spawn(async move {
            done.wait().await;
            stop.cancel();
        });
        addr
    }

    /// Waits for the MQTT source's subscription (events published before it
    /// would be missed), without failing start-up over an unreachable
    /// external broker (the source keeps retrying), and logs the start.
    async fn announce(&self, config: &ValidConfig) {
        let broker = format!("{}:{}", self.local.host, self.local.port);
        if !self.wait_ready(START_READY_WAIT).await {
            tracing::warn!(
                broker = %broker,
                "MQTT source not subscribed yet; events will flow once the broker is reachable."
            );
        }
        tracing::info!(
            gateway = %config.gateway_id,
            functions = self.functions.list().len(),
            sinks = config.sinks.len(),
            broker = %broker,
            io_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            "Gateway started."
        );
    }
}

/// The configuration to start with and its functions, loaded: with
/// `[fleet]`, the file's functions plus the applied bundle's (see
/// [`crate::fleet::boot`]).
async fn functions_to_start(
    config: &ValidConfig,
) -> Result<
    (
        ValidConfig,
        Option<crate::fleet::Boot>,
        Arc<Runtime>,
        Vec<LoadedFunction>,
    ),
    StartError,
> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| StartError::DataDir {
        path: config.data_dir.clone(),
        reason: e.to_string(),
    })?;
    let (merged, mut boot) = match crate::fleet::boot(config)? {
        Some((merged, boot)) => (merged, Some(boot)),
        None => (config.clone(), None),
    };
    let runtime = engine(&merged).await?;
    let (config, loaded) = load_with_fallback(&runtime, merged, boot.as_mut()).await?;
    Ok((config, boot, runtime, loaded))
}

/// What changes the function set while the gateway runs: the file watch
/// (hot reload) and, with `[fleet]`, the fleet agent.
fn spawn_changes(
    config: &ValidConfig,
    boot: Option<crate::fleet::Boot>,
    reloader: &Arc<Reloader>,
    functions: &Arc<FunctionTable>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<Arc<crate::fleet::Fleet>> {
    if let Some(interval) = config.runtime.watch {
        tracker.spawn(watch_files(reloader.clone(), interval, cancel.clone()));
    }
    boot.map(|boot| {
        crate::fleet::spawn(
            boot,
            config,
            reloader.clone(),
            functions.clone(),
            cancel,
            tracker,
        )
    })
}

/// The order in which a stopping gateway lets go of its parts.
struct Drain {
    cancel: CancellationToken,
    sources: TaskTracker,
    workers: TaskTracker,
    publisher: rumqttc::AsyncClient,
    publisher_stop: CancellationToken,
    outbox: Outbox,
    sinks_stop: CancellationToken,
}

impl Drain {
    /// When the sources have stopped and the last worker is done, nothing
    /// can publish or forward any more: the publisher flushes and
    /// disconnects, what is left is committed to the outbox, then the sinks
    /// stop (undelivered records stay in the outbox for the next start). The
    /// sources mirror through the publisher too: with no function at all (a
    /// plain bridge) the workers are done at once, and the publisher must
    /// still outlive the sources.
    ///
    /// The workers' tracker stays open while the gateway runs (a reload adds
    /// workers); it is closed here, once the sources have stopped.
    async fn run(self) {
        self.cancel.cancelled().await;
        self.sources.wait().await;
        self.workers.close();
        self.workers.wait().await;
        let _ = self.publisher.try_disconnect();
        self.publisher_stop.cancel();
        self.outbox.flush().await;
        self.sinks_stop.cancel();
    }
}

/// The MQTT source on the local broker. With the embedded broker, which
/// does not outlive the gateway, a message is acknowledged once queued;
/// with an external one, once handled.
fn mqtt_source(
    config: &ValidConfig,
    local: &MqttEndpoint,
    ctx: &SourceContext,
    live: Arc<tokio::sync::watch::Sender<Vec<String>>>,
) -> Result<MqttSource, SourceError> {
    let ack = match config.broker {
        Broker::Embedded { .. } => AckPoint::Queued,
        Broker::External(_) => AckPoint::Handled,
    };
    MqttSource::build(
        MqttSourceConfig {
            endpoint: local.clone(),
            keep_alive: config.source_keep_alive,
            ack,
            live,
        },
        ctx,
    )
}

/// The Wasm engine, created on a blocking thread.
async fn engine(config: &ValidConfig) -> Result<Arc<Runtime>, StartError> {
    let opts = RuntimeOptions::for_gateway(config);
    let runtime = tokio::task::spawn_blocking(move || Runtime::new(&opts))
        .await
        .map_err(|e| StartError::Engine(EngineError::from_join(&e)))??;
    Ok(Arc::new(runtime))
}

/// Every function's queue and its route, before anything can send to it.
fn prepare_functions(
    loaded: Vec<LoadedFunction>,
    config: &ValidConfig,
) -> (Vec<Route>, Vec<Prepared>) {
    let mut routes = Vec::new();
    let mut prepared = Vec::new();
    for (function, spec) in loaded.into_iter().zip(&config.functions) {
        let (tx, rx) = queue(
            spec.limits.queue,
            spec.limits.queue_policy,
            function.metrics().clone(),
        );
        routes.push(Route::new(spec.name.clone(), spec.triggers.clone(), tx));
        prepared.push(Prepared {
            function,
            queue: rx,
        });
    }
    (routes, prepared)
}

/// Spawns the built `[[sources]]` on a tracker of their own (the local
/// publisher outlives them); returns it closed, the write queues of the
/// writable ones, and their counters.
fn spawn_sources(
    sources: Vec<(String, &'static str, BuiltSource)>,
) -> (TaskTracker, Writers, Vec<Named<SourceStats>>) {
    let tracker = TaskTracker::new();
    let mut writers = Writers::default();
    let mut stats = Vec::new();
    for (name, kind, built) in sources {
        if let Some(writes) = built.writes {
            writers.insert(name.clone(), writes, built.stats.clone());
        }
        stats.push((name, kind, built.stats));
        tracker.spawn(built.run);
    }
    tracker.close();
    (tracker, writers, stats)
}

/// Spawns one worker per function on the workers' tracker (left open for
/// the workers a reload adds); returns the functions' counters and their
/// hot-reload slots.
fn spawn_workers(
    prepared: Vec<Prepared>,
    config: &ValidConfig,
    workers: &Workers,
) -> (
    Vec<(String, Arc<crate::metrics::FunctionMetrics>)>,
    Vec<Slot>,
) {
    let mut functions = Vec::new();
    let mut slots = Vec::new();
    for (p, spec) in prepared.into_iter().zip(&config.functions) {
        let metrics = p.function.metrics().clone();
        tracing::info!(
            function = %spec.name,
            version = %p.function.version(),
            cached = p.function.from_cache(),
            instance = ?spec.instance,
            "Function loaded."
        );
        functions.push((spec.name.clone(), metrics.clone()));
        let running = workers.spawn(Arc::new(p.function), spec, p.queue, None);
        slots.push(Slot::new(spec.clone(), running, metrics));
    }
    (functions, slots)
}

/// [`load_all`]; when a fleet bundle's functions do not load (say, a
/// precompiled component for other engine settings), the gateway starts
/// with the configuration file's own functions and reports why: a board is
/// never kept from starting by its bundle.
async fn load_with_fallback(
    runtime: &Arc<Runtime>,
    merged: ValidConfig,
    boot: Option<&mut crate::fleet::Boot>,
) -> Result<(ValidConfig, Vec<LoadedFunction>), StartError> {
    let first = load_all(runtime, &merged).await;
    let Some(boot) = boot.filter(|b| b.has_bundle() && first.is_err()) else {
        return first.map(|loaded| (merged, loaded));
    };
    if let Some(portable) = boot.portable()
        && let Ok(loaded) = load_all(runtime, &portable).await
    {
        tracing::warn!(
            "Fleet: the bundle's precompiled components did not load; running its portable ones."
        );
        return Ok((portable, loaded));
    }
    let reason = first.err().map(|e| e.to_string()).unwrap_or_default();
    tracing::error!(%reason, "Fleet: the applied bundle's functions did not load; starting with the configuration file's functions.");
    let base = boot.forget_bundle(reason);
    let loaded = load_all(runtime, &base).await?;
    Ok((base, loaded))
}

/// Every function of `config`, compiled or loaded from the cache on a
/// blocking thread; all load errors together.
async fn load_all(
    runtime: &Arc<Runtime>,
    config: &ValidConfig,
) -> Result<Vec<LoadedFunction>, StartError> {
    let runtime = runtime.clone();
    let config = config.clone();
    tokio::task::spawn_blocking(move || load_functions(&runtime, &config))
        .await
        .map_err(|e| StartError::Engine(EngineError::from_join(&e)))?
        .map_err(StartError::Functions)
}

/// The local broker's endpoint for the gateway's own clients, and the
/// embedded broker when it runs in this process.
async fn local_broker(
    config: &ValidConfig,
    metrics: &Arc<GatewayMetrics>,
) -> Result<(MqttEndpoint, Option<crate::broker::Running>), StartError> {
    match &config.broker {
        Broker::Embedded {
            retention_bytes_per_filter,
            access,
        } => {
            let broker =
                crate::broker::start(access, *retention_bytes_per_filter, metrics.clone()).await?;
            let endpoint = MqttEndpoint {
                host: loopback_for(broker.addr).to_string(),
                port: broker.addr.port(),
                client_id: format!("edgefn-{}", config.gateway_id),
                credentials: broker.login.clone(),
                tls: None,
            };
            Ok((endpoint, Some(broker)))
        }
        Broker::External(endpoint) => Ok((endpoint.clone(), None)),
    }
}

/// A built sink with its name and kind, and whether it takes cloud
/// commands (then it gets the router).
pub(crate) type NamedSink = (String, &'static str, BuiltSink, bool);

/// Builds every sink of `config` (clients, TLS); starts nothing. `edgefn
/// check` calls it too, without a broker.
pub fn build_sinks(config: &ValidConfig, env: SinkEnv<'_>) -> Result<Vec<NamedSink>, SinkError> {
    config
        .sinks
        .iter()
        .map(|spec| {
            let built = spec.kind.build(SinkCommon::of(spec), &env)?;
            let commands = !spec.kind.subscriptions().is_empty();
            Ok((spec.name.clone(), spec.kind.kind(), built, commands))
        })
        .collect()
}

/// Spawns the sinks, each with the context `ctx` makes from its counters
/// and whether it takes commands.
fn spawn_sinks(
    tracker: &TaskTracker,
    sinks: Vec<NamedSink>,
    ctx: impl Fn(Arc<DeliveryStats>, bool) -> SinkContext,
) -> Vec<Named<DeliveryStats>> {
    let mut named = Vec::new();
    for (name, kind, run, commands) in sinks {
        let stats = Arc::new(DeliveryStats::default());
        tracker.spawn(run(ctx(stats.clone(), commands)));
        named.push((name, kind, stats));
    }
    named
}

/// Builds every `[[sources]]` entry; starts nothing.
fn build_sources(
    config: &ValidConfig,
    env: &BuildEnv,
    ctx: &SourceContext,
) -> Result<Vec<(String, &'static str, BuiltSource)>, SourceError> {
    config
        .sources
        .iter()
        .map(|spec| {
            let built = spec.build(env, ctx)?;
            Ok((spec.common().name.to_owned(), spec.kind(), built))
        })
        .collect()
}
