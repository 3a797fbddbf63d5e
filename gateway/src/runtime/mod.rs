//! The function runtime: one wasmtime [`Engine`], components compiled once
//! and pre-instantiated, and a fresh, limited [`Store`] per invocation.
//!
//! # Sandbox
//! - **Time**: epoch interruption. One ticker thread per [`Runtime`]
//!   advances the engine's epoch every [`EPOCH_TICK`]; each invocation gets a
//!   deadline of `ceil(timeout / tick) + 1` ticks, so a runaway guest is
//!   stopped at most one tick after its timeout.
//! - **Memory**: a [`host::Limiter`] caps linear memory and tables per store;
//!   a refused grow traps and is reported as `memory`.
//! - **Capabilities**: WASI is linked with a context that grants nothing;
//!   `publish`/`forward` are checked against the function's allowlists
//!   ([`host::Capabilities`]) and only recorded — the caller sends them after
//!   a successful return.
//!
//! Guest calls are synchronous and run on blocking threads (never on the
//! async reactor): the caller uses `spawn_blocking` or a thread of its own.

pub mod host;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store, Trap};

use crate::bindings::edgefn::function::types::{self as wit};
use crate::bindings::{Function, FunctionPre};
use crate::config::{FunctionSpec, Limits};
use crate::event::{Event, SourceKind};
use crate::metrics::{Failure, FunctionMetrics};
pub use host::{Capabilities, Forward, HostState, Outputs, Publish, SerialWrite};

/// How often the epoch advances; the resolution of invocation timeouts.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The WIT world every function must implement.
pub const WORLD: &str = "edgefn:function/function@0.1.1";

/// Why a function could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is missing or unreadable.
    #[error("function `{function}`: cannot read `{path}`: {reason}")]
    Read {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The file is not a valid WebAssembly component.
    #[error("function `{function}`: `{path}` is not a valid WebAssembly component: {reason}")]
    NotAComponent {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// What wasmtime said.
        reason: String,
    },
    /// The component is valid but does not implement the function world.
    #[error("function `{function}`: `{path}` does not implement the `{WORLD}` world: {reason}")]
    WrongWorld {
        /// Function name.
        function: String,
        /// Component path.
        path: PathBuf,
        /// What is missing or mismatched.
        reason: String,
    },
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the WebAssembly engine: {0}")]
pub struct EngineError(String);

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

/// The shared engine, linker and epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    ticker: Arc<Ticker>,
}

impl Runtime {
    /// Creates the engine and links the host interfaces; starts the epoch
    /// ticker thread.
    pub fn new() -> Result<Self, EngineError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        let engine = Engine::new(&config).map_err(|e| EngineError(format!("{e:#}")))?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| EngineError(format!("linking WASI: {e:#}")))?;
        Function::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| EngineError(format!("linking the host interface: {e:#}")))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
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
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            ticker: Arc::new(Ticker { stop: ticker_stop }),
        })
    }

    /// Compiles a function's component, checks that it implements the world,
    /// and pre-instantiates it.
    pub fn load(&self, spec: &FunctionSpec, gateway_id: &str) -> Result<LoadedFunction, LoadError> {
        let path = &spec.component;
        let bytes = std::fs::read(path).map_err(|e| LoadError::Read {
            function: spec.name.clone(),
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let component = self.compile(&spec.name, path, &bytes)?;
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
        Ok(LoadedFunction {
            name: spec.name.clone(),
            pre,
            engine: self.engine.clone(),
            _ticker: self.ticker.clone(),
            caps: Arc::new(Capabilities {
                function: spec.name.clone(),
                gateway_id: gateway_id.to_owned(),
                publish: spec.publish.clone(),
                sinks: spec.sinks.clone(),
                serial_ports: spec.serial_ports.clone(),
                config: spec.config.clone(),
                max_calls: spec.limits.max_calls,
                max_payload_bytes: spec.limits.max_payload_bytes,
            }),
            limits: spec.limits.clone(),
            metrics: Arc::new(FunctionMetrics::default()),
        })
    }

    fn compile(&self, function: &str, path: &Path, bytes: &[u8]) -> Result<Component, LoadError> {
        let not_component = |reason: String| LoadError::NotAComponent {
            function: function.to_owned(),
            path: path.to_owned(),
            reason,
        };
        if wasmparser_kind(bytes) == Some(WasmKind::CoreModule) {
            return Err(not_component(
                "it is a core WebAssembly module; build the function for `wasm32-wasip2` (or run `wasm-tools component new`) to get a component".into(),
            ));
        }
        Component::new(&self.engine, bytes).map_err(|e| not_component(format!("{e:#}")))
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

/// A function ready to run: compiled, linked and pre-instantiated.
pub struct LoadedFunction {
    name: String,
    pre: FunctionPre<HostState>,
    engine: Engine,
    _ticker: Arc<Ticker>,
    caps: Arc<Capabilities>,
    limits: Limits,
    metrics: Arc<FunctionMetrics>,
}

/// The result of one invocation.
#[derive(Debug)]
pub struct Invocation {
    /// Outputs on success, the reason otherwise.
    pub outcome: Result<Outputs, Failure>,
    /// Wall-clock time of instantiate + call.
    pub elapsed: Duration,
}

impl LoadedFunction {
    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its counters.
    pub fn metrics(&self) -> &Arc<FunctionMetrics> {
        &self.metrics
    }

    /// Its limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Runs `event` through the function in a fresh instance. Blocks the
    /// calling thread for at most the timeout (plus one epoch tick). Counts
    /// and logs the outcome; never panics on guest behaviour.
    pub fn invoke(&self, event: &Event) -> Invocation {
        let started = Instant::now();
        self.metrics.invocations.fetch_add(1, Ordering::Relaxed);
        let mut store = Store::new(
            &self.engine,
            HostState::new(self.caps.clone(), self.limits.memory_bytes),
        );
        store.limiter(|s| &mut s.limiter);
        let ticks = self
            .limits
            .timeout
            .as_nanos()
            .div_ceil(EPOCH_TICK.as_nanos())
            + 1;
        store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
        store.epoch_deadline_trap();

        let wit_event = wit::Event {
            source: match event.source {
                SourceKind::Mqtt => wit::SourceKind::Mqtt,
                SourceKind::Serial => wit::SourceKind::Serial,
                SourceKind::I2c => wit::SourceKind::I2c,
                SourceKind::Timer => wit::SourceKind::Timer,
                SourceKind::Manual => wit::SourceKind::Manual,
            },
            topic: event.topic.clone(),
            payload: event.payload.to_vec(),
            received_at_ms: event.received_at_ms,
            attributes: event.attributes.clone(),
        };
        let result = self
            .pre
            .instantiate(&mut store)
            .and_then(|instance| instance.call_handle(&mut store, &wit_event));
        let elapsed = started.elapsed();
        let state = store.into_data();
        self.metrics
            .denied
            .fetch_add(u64::from(state.denied), Ordering::Relaxed);
        self.metrics
            .over_limit
            .fetch_add(u64::from(state.over_limit), Ordering::Relaxed);
        let outcome = match result {
            Ok(Ok(())) => Ok(state.outputs),
            Ok(Err(message)) => Err(Failure::Error(message)),
            Err(e) if state.limiter.exceeded => Err(Failure::Memory(root_message(&e))),
            Err(e) if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => Err(Failure::Timeout),
            Err(e) => Err(Failure::Trap(root_message(&e))),
        };
        let elapsed_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        match &outcome {
            Ok(out) => {
                self.metrics.ok.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    function = %self.name,
                    topic = %event.topic,
                    elapsed_us,
                    published = out.publishes.len(),
                    forwarded = out.forwards.len(),
                    "Function invoked."
                );
            }
            Err(failure) => {
                self.metrics.count_failure(failure);
                tracing::warn!(
                    function = %self.name,
                    topic = %event.topic,
                    elapsed_us,
                    failure = failure.kind(),
                    reason = %failure,
                    "Function failed; its outputs were discarded."
                );
            }
        }
        Invocation { outcome, elapsed }
    }
}

/// The most useful line of a wasmtime error: the trap or root cause, without
/// the backtrace.
fn root_message(e: &wasmtime::Error) -> String {
    if let Some(trap) = e.downcast_ref::<Trap>() {
        return trap.to_string();
    }
    e.root_cause().to_string()
}

impl EngineError {
    /// For a blocking task that did not complete (panicked or cancelled).
    pub fn from_join(e: &tokio::task::JoinError) -> Self {
        Self(format!("a start-up task failed: {e}"))
    }
}
