//! The function runtime: one wasmtime [`Engine`], components compiled once
//! (or loaded from the compile cache) and pre-instantiated, and limited
//! stores: a warm instance per function (`reuse`) or a new one per event
//! (`fresh`), both carved from the pooling allocator's pre-reserved slots
//! with copy-on-write memory images.
//!
//! # Sandbox
//! - **Time**: epoch interruption. One ticker thread per [`Runtime`]
//!   advances the engine's epoch every [`EPOCH_TICK`]; each invocation gets a
//!   deadline of `ceil(timeout / tick) + 1` ticks, so a runaway guest is
//!   stopped at most one tick after its timeout. A guest waiting in WASI
//!   (`sleep`, `poll`) is stopped at its timeout by the bounded waits of
//!   [`wasi`].
//! - **Output**: what a guest logs, prints or returns as an error is bounded
//!   ([`logs`]).
//! - **Memory**: a [`host::Limiter`] caps linear memory and tables per store;
//!   a refused grow traps and is reported as `memory`.
//! - **Capabilities**: WASI is linked with a context that grants nothing;
//!   `publish`/`forward` are checked against the function's allowlists
//!   ([`host::Capabilities`]) and only recorded — the caller sends them after
//!   a successful return.
//!
//! Guest calls are synchronous and run on blocking threads (never on the
//! async reactor): the caller uses `spawn_blocking` or a thread of its own.

pub mod breaker;
pub mod cache;
mod errors;
pub mod funcset;
pub mod host;
mod invoke;
pub mod logs;
pub mod queue;
pub mod reload;
pub mod state;
pub mod wasi;
pub mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use crate::bindings::{Function, FunctionPre};
use crate::config::schema::InstanceMode;
use crate::config::{FunctionSpec, Limits, MAX_TABLE_ELEMENTS, RuntimeSpec, ValidConfig};
use crate::metrics::{Failure, FunctionMetrics};
pub use crate::output::{Forward, Outputs, Publish, SerialWrite};
pub use host::{Capabilities, HostState};
use invoke::instantiate_reason;
use state::{KvTxn, StateStore};

/// How often the epoch advances; the resolution of invocation timeouts.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The WIT world every function must implement.
pub const WORLD: &str = "edgefn:function/function@0.1.2";

pub use errors::{EngineError, LoadError};

/// Keeps the epoch ticker thread running while any holder lives: the
/// [`Runtime`] and every [`LoadedFunction`] hold one, so a function's
/// deadline keeps working even if the runtime that loaded it is gone.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How to build the engine.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// `[runtime]` settings: pool, memory slot size, cache.
    pub spec: RuntimeSpec,
    /// Where compiled components are cached; `None` = no cache.
    pub cache_dir: Option<PathBuf>,
    /// The durable state database; `None` = an in-memory one.
    pub state_path: Option<PathBuf>,
    /// Epoch interruption (timeouts). Only benchmarks turn it off.
    pub epoch_interruption: bool,
    /// Compile for another target (`edgefn compile --target`); such an
    /// engine can only precompile.
    pub target: Option<String>,
}

impl RuntimeOptions {
    /// Options for a gateway: cache and state under the data dir.
    pub fn for_gateway(config: &ValidConfig) -> Self {
        Self {
            spec: config.runtime.clone(),
            cache_dir: config
                .runtime
                .compile_cache
                .then(|| config.data_dir.join("cache")),
            state_path: Some(config.data_dir.join("state.sqlite")),
            epoch_interruption: true,
            target: None,
        }
    }

    /// Options that touch no file: for `check`, `invoke` and tests.
    pub fn ephemeral(spec: RuntimeSpec) -> Self {
        Self {
            spec,
            cache_dir: None,
            state_path: None,
            epoch_interruption: true,
            target: None,
        }
    }
}

/// The shared engine, linker and epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    ticker: Arc<Ticker>,
    pooling: bool,
    cache: Option<cache::CompileCache>,
    state: StateStore,
}

/// The engine configuration shared by running and precompiling: the same
/// settings give the same compatibility hash, so `edgefn compile` output and
/// the compile cache stay valid for the gateway that loads them.
fn engine_config(opts: &RuntimeOptions) -> Result<Config, EngineError> {
    let mut config = Config::new();
    config.epoch_interruption(opts.epoch_interruption);
    config.wasm_component_model(true);
    // Small, fixed reservations (not wasmtime's 4 GiB per memory on 64-bit):
    // linear memory is capped per function anyway, and a Raspberry Pi
    // kernel may give a process only 39 bits (512 GiB) of address space.
    // Bounds checks are explicit; measured at the same speed.
    config.memory_reservation(opts.spec.max_memory_bytes);
    config.memory_guard_size(64 * 1024);
    config.memory_reservation_for_growth(0);
    config.memory_init_cow(true);
    if let Some(target) = &opts.target {
        config
            .target(target)
            .map_err(|e| EngineError(format!("target `{target}`: {e:#}")))?;
    }
    Ok(config)
}

fn pool_config(spec: &RuntimeSpec) -> PoolingAllocationConfig {
    let slots = spec.pool_instances;
    // Resetting a slot for its next instance is most of a fresh
    // invocation's cost. With Linux's PAGEMAP_SCAN (6.7+) wasmtime resets
    // only the pages the last instance dirtied and keeps them mapped, so the
    // next instance takes no page faults: measured 21 → 11 µs per fresh
    // invocation. Without it, memset-ing a large resident region costs more
    // than the faults it saves, so keep only the first 64 KiB.
    let scan = PoolingAllocationConfig::is_pagemap_scan_available();
    let keep = if scan { 1024 * 1024 } else { 64 * 1024 };
    let mut pool = PoolingAllocationConfig::new();
    // A wasip2 component holds several core instances (the program and the
    // WASI adapter shims), each with at most one memory and a few tables;
    // only the program defines a memory (one per guest built from
    // functions/), so a slot is one instance with one memory: 64 slots of
    // 64 MiB reserve 4 GiB of address space and no resident memory. A
    // component defining more memories takes more than one slot's share.
    pool.total_component_instances(slots)
        .total_core_instances(slots.saturating_mul(16))
        .total_memories(slots)
        .total_tables(slots.saturating_mul(8))
        .max_memories_per_module(1)
        .max_tables_per_module(4)
        .table_elements(MAX_TABLE_ELEMENTS)
        .max_memory_size(usize::try_from(spec.max_memory_bytes).unwrap_or(usize::MAX))
        .linear_memory_keep_resident(keep)
        .table_keep_resident(16 * 1024)
        .pagemap_scan(if scan {
            wasmtime::Enabled::Yes
        } else {
            wasmtime::Enabled::No
        });
    pool
}

impl Runtime {
    /// Creates the engine (pooling allocator if configured, on-demand if
    /// the pool cannot be reserved), links the host interfaces, opens the
    /// state store and starts the epoch ticker thread.
    pub fn new(opts: &RuntimeOptions) -> Result<Self, EngineError> {
        let mut config = engine_config(opts)?;
        let mut pooling = false;
        let engine = if opts.spec.pooling && opts.target.is_none() {
            config
                .allocation_strategy(InstanceAllocationStrategy::Pooling(pool_config(&opts.spec)));
            match Engine::new(&config) {
                Ok(engine) => {
                    pooling = true;
                    engine
                }
                Err(e) => {
                    tracing::warn!(
                        slots = opts.spec.pool_instances,
                        slot_mib = opts.spec.max_memory_bytes / (1024 * 1024),
                        error = %format!("{e:#}"),
                        "Cannot reserve the instance pool (small address space or ulimit -v?); falling back to on-demand allocation, instances start slower."
                    );
                    config.allocation_strategy(InstanceAllocationStrategy::OnDemand);
                    Engine::new(&config).map_err(|e| EngineError(format!("{e:#}")))?
                }
            }
        } else {
            Engine::new(&config).map_err(|e| EngineError(format!("{e:#}")))?
        };
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .and_then(|()| wasi::bound_waits(&mut linker))
            .map_err(|e| EngineError(format!("linking WASI: {e:#}")))?;
        Function::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| EngineError(format!("linking the host interface: {e:#}")))?;

        let state = match &opts.state_path {
            Some(path) => StateStore::open(path),
            None => StateStore::open(Path::new(":memory:")),
        }
        .map_err(|e| EngineError(e.to_string()))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        if opts.epoch_interruption {
            let stop = ticker_stop.clone();
            let ticking = engine.clone();
            std::thread::Builder::new()
                .name("edgefn-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        ticking.increment_epoch();
                    }
                })
                .map_err(|e| EngineError(format!("starting the epoch ticker: {e}")))?;
        }
        let cache = opts
            .cache_dir
            .as_ref()
            .and_then(|dir| cache::CompileCache::open(dir, &engine));
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            ticker: Arc::new(Ticker { stop: ticker_stop }),
            pooling,
            cache,
            state,
        })
    }

    /// Whether instances come from the pre-reserved pool.
    pub fn pooling(&self) -> bool {
        self.pooling
    }

    /// The engine (for precompiling).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles a function's component (or takes it from the compile cache,
    /// or loads a precompiled `.cwasm`), checks that it implements the world,
    /// pre-instantiates it and creates one instance to prove it starts.
    /// `metrics` carries over from the version it replaces.
    pub fn load(
        &self,
        spec: &FunctionSpec,
        gateway_id: &str,
        metrics: Arc<FunctionMetrics>,
    ) -> Result<LoadedFunction, LoadError> {
        let path = &spec.component;
        let bytes = std::fs::read(path).map_err(|e| LoadError::Read {
            function: spec.name.clone(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let version = cache::content_hash(&bytes);
        let (component, from_cache) = self.component(&spec.name, path, &bytes, &version)?;
        let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
            function: spec.name.clone(),
            path: path.clone(),
            reason: format!("{e:#}"),
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = FunctionPre::new(pre).map_err(wrong_world)?;
        let function: Arc<str> = Arc::from(spec.name.as_str());
        let loaded = LoadedFunction {
            name: function.clone(),
            version: version[..12].to_owned(),
            from_cache,
            mode: spec.instance,
            lane: match spec.priority {
                crate::config::schema::Priority::Normal => crate::outbox::Lane::Normal,
                crate::config::schema::Priority::High => crate::outbox::Lane::High,
            },
            pre,
            engine: self.engine.clone(),
            _ticker: self.ticker.clone(),
            caps: Arc::new(Capabilities {
                function: spec.name.clone(),
                gateway_id: gateway_id.to_owned(),
                publish: spec.publish.clone(),
                sinks: spec.sinks.clone(),
                serial_ports: spec.serial_ports.clone(),
                modbus: spec.modbus.clone(),
                gpio: spec.gpio.clone(),
                config: spec.config.clone(),
                max_calls: spec.limits.max_calls,
                max_payload_bytes: spec.limits.max_payload_bytes,
            }),
            log_rate: logs::LogRate::new(spec.limits.log_lines_per_s),
            limits: spec.limits.clone(),
            state: self.state.clone(),
            quota: spec.state,
            metrics,
            warm: Mutex::new(None),
        };
        // Prove it instantiates (a start function may trap, the pool may be
        // full) before anything is switched over to it; in `reuse` mode this
        // instance becomes the warm one.
        let warm = loaded.instantiate().map_err(|e| LoadError::Instantiate {
            function: spec.name.clone(),
            path: path.clone(),
            reason: instantiate_reason(&e),
        })?;
        if loaded.mode == InstanceMode::Reuse {
            *loaded.warm_slot() = Some(warm);
        }
        Ok(loaded)
    }

    fn component(
        &self,
        function: &str,
        path: &Path,
        bytes: &[u8],
        hash: &str,
    ) -> Result<(Component, bool), LoadError> {
        let not_component = |reason: String| LoadError::NotAComponent {
            function: function.to_owned(),
            path: path.to_owned(),
            reason,
        };
        if Engine::detect_precompiled(bytes).is_some() {
            return cache::load_precompiled(&self.engine, bytes)
                .map(|c| (c, true))
                .map_err(|reason| LoadError::Precompiled {
                    function: function.to_owned(),
                    path: path.to_owned(),
                    reason,
                });
        }
        if wasmparser_kind(bytes) == Some(WasmKind::CoreModule) {
            return Err(not_component(
                "it is a core WebAssembly module; build the function for `wasm32-wasip2` (or run `wasm-tools component new`) to get a component".into(),
            ));
        }
        if let Some(c) = self.cache.as_ref().and_then(|c| c.get(&self.engine, hash)) {
            return Ok((c, true));
        }
        let component = self.compile(function, path, bytes)?;
        if let Some(cache) = &self.cache {
            cache.put(hash, &component);
        }
        Ok((component, false))
    }

    /// Compiles a portable component with Cranelift.
    #[cfg(feature = "compiler")]
    fn compile(&self, function: &str, path: &Path, bytes: &[u8]) -> Result<Component, LoadError> {
        Component::new(&self.engine, bytes).map_err(|e| LoadError::NotAComponent {
            function: function.to_owned(),
            path: path.to_owned(),
            reason: format!("{e:#}"),
        })
    }

    /// The runtime-only build has no compiler: a portable component is
    /// refused, naming the command that precompiles it.
    #[cfg(not(feature = "compiler"))]
    fn compile(&self, function: &str, path: &Path, _: &[u8]) -> Result<Component, LoadError> {
        Err(LoadError::NotPrecompiled {
            function: function.to_owned(),
            path: path.to_owned(),
            target: crate::fleet::bundle::host_target().unwrap_or_else(|| "TARGET".to_owned()),
        })
    }
}

#[derive(Debug, PartialEq, Eq)]
enum WasmKind {
    CoreModule,
    Component,
}

/// Tells a core module from a component by the header (magic + version +
/// layer), to give a precise error for the most common mistake.
fn wasmparser_kind(bytes: &[u8]) -> Option<WasmKind> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return None;
    }
    match bytes[6..8] {
        [0, 0] => Some(WasmKind::CoreModule),
        [1, 0] => Some(WasmKind::Component),
        _ => None,
    }
}

/// A live instance and its store.
struct Warm {
    store: Store<HostState>,
    instance: Function,
}

/// A function ready to run: compiled, linked and pre-instantiated.
pub struct LoadedFunction {
    name: Arc<str>,
    version: String,
    from_cache: bool,
    mode: InstanceMode,
    /// The outbox lane of its forwards (`priority`).
    lane: crate::outbox::Lane,
    pre: FunctionPre<HostState>,
    engine: Engine,
    _ticker: Arc<Ticker>,
    caps: Arc<Capabilities>,
    limits: Limits,
    /// The function's log rate, shared by its stores.
    log_rate: Arc<Mutex<logs::LogRate>>,
    state: StateStore,
    quota: crate::config::StateQuota,
    metrics: Arc<FunctionMetrics>,
    /// `reuse` mode: the warm instance between events. Only the function's
    /// worker invokes, so the lock is never contended.
    warm: Mutex<Option<Warm>>,
}

/// The result of one invocation.
#[derive(Debug)]
pub struct Invocation {
    /// Outputs on success, the reason otherwise.
    pub outcome: Result<Outputs, Failure>,
    /// Wall-clock time of instantiate (if any) + call.
    pub elapsed: Duration,
}

impl LoadedFunction {
    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The first 12 hex digits of the component's SHA-256.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether the compiled code came from the compile cache (or a
    /// precompiled file) rather than the compiler.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// The outbox lane of its forwards (its `priority`).
    pub fn lane(&self) -> crate::outbox::Lane {
        self.lane
    }

    /// Its counters.
    pub fn metrics(&self) -> &Arc<FunctionMetrics> {
        &self.metrics
    }

    /// Name, version and counters, for a dead letter.
    pub fn id(&self) -> crate::output::FunctionRef<'_> {
        crate::output::FunctionRef {
            name: self.name(),
            version: self.version(),
            metrics: self.metrics(),
        }
    }

    /// Its limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Creates an instance and drops it, without calling it: the
    /// instantiation cost alone (for the runtime benchmark).
    #[doc(hidden)]
    pub fn instantiate_and_drop(&self) -> bool {
        self.instantiate().is_ok()
    }

    fn warm_slot(&self) -> std::sync::MutexGuard<'_, Option<Warm>> {
        // The slot only holds an instance between calls; a poisoned lock
        // means a host panic mid-call, and the instance is dropped below.
        self.warm.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn instantiate(&self) -> wasmtime::Result<Warm> {
        let kv = KvTxn::new(self.state.clone(), self.name.clone(), self.quota);
        let mut store = Store::new(
            &self.engine,
            HostState::new(
                self.caps.clone(),
                &self.limits,
                Some(kv),
                self.log_rate.clone(),
            ),
        );
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        self.arm_deadline(&mut store);
        let instance = self.pre.instantiate(&mut store)?;
        Ok(Warm { store, instance })
    }

    fn arm_deadline(&self, store: &mut Store<HostState>) {
        let ticks = self
            .limits
            .timeout
            .as_nanos()
            .div_ceil(EPOCH_TICK.as_nanos())
            + 1;
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store
            .data_mut()
            .deadline
            .arm(Instant::now() + self.limits.timeout);
    }
}

impl EngineError {
    /// For a blocking task that did not complete (panicked or cancelled).
    pub fn from_join(e: &tokio::task::JoinError) -> Self {
        Self(format!("a start-up task failed: {e}"))
    }
}
