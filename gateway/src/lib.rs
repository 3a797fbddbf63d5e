//! edgefn: a gateway daemon that takes sensor events (MQTT, serial ports,
//! I2C sensors), runs them through sandboxed WebAssembly functions (wasmtime
//! components) and forwards what they produce to the cloud through a
//! durable outbox.
//!
//! # Layout
//! - [`cli`]: the `edgefn` command line (`run`, `check`, `invoke`,
//!   `compile`, `passwd`).
//! - [`config`]: the TOML schema, `${VAR}` interpolation, validation into a
//!   [`config::ValidConfig`] that nothing else re-checks.
//! - [`supervisor`]: builds everything from the config, drains on shutdown,
//!   tells systemd when it is ready and pings its watchdog.
//! - [`broker`]: the embedded rumqttd broker.
//! - [`sources`]: where events come from ([`sources::mqtt`],
//!   [`sources::serial`], [`sources::i2c`]).
//! - [`router`]: topic-filter dispatch to per-function bounded queues.
//! - [`runtime`]: wasmtime engine and instance pool, component loading and
//!   the compile cache, limits (deadlines that cover WASI waits, the guest
//!   log budget), the host side of the WIT imports, durable
//!   `kv` state, and each function's queue, worker, circuit breaker and hot
//!   reload.
//! - [`output`]: sends a successful invocation's publishes and forwards,
//!   and failed events to the dead-letter topic.
//! - [`outbox`]: the durable SQLite store-and-forward queue (group commit).
//! - [`sinks`]: cloud delivery from the outbox ([`sinks::mqtt`],
//!   [`sinks::http`]) and the envelope.
//! - [`admin`]: the admin HTTP endpoint (health, readiness, Prometheus
//!   metrics, the function list).
//! - [`fleet`]: signed function bundles, keys, the desired state and the
//!   on-disk store of deployed bundles.
//! - [`topic`]: MQTT topic names and filters.
//! - [`progress`]: the progress watchdog (stuck workers and sources).
//! - [`event`], [`metrics`], [`mqtt`], [`simulate`]: shared pieces.

pub mod bindings {
    //! Host-side bindings of the `edgefn:function` WIT package
    //! (`functions/wit/`). `bindgen!` runs here and nowhere else.
    wasmtime::component::bindgen!({
        path: "../functions/wit",
        world: "function",
    });
}

pub mod admin;
pub mod broker;
pub mod cli;
pub mod config;
pub mod event;
pub mod fleet;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
pub mod output;
pub mod progress;
pub mod router;
pub mod runtime;
pub mod simulate;
pub mod sinks;
pub mod sources;
pub mod supervisor;
pub mod text;
pub mod topic;
