//! edgefn's end-to-end tests: one binary, a module per topic.
//!
//! Everything is real: the gateway runs in-process with the embedded rumqttd
//! broker on a free port, Mosquitto is started where installed (required when
//! `CI` is set), and the functions are the Wasm components built from
//! `functions/` by `cargo xtask test` (or `cargo xtask functions`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed test"
)]

mod ack_order;
mod alarm_lane;
mod backpressure;
mod bad_input;
mod broker_security;
mod cli;
mod commands;
mod disk_full;
mod durability;
mod fleet;
mod fleet_bundle;
mod fleet_link;
mod funcset;
mod gpio_output;
mod guest_limits;
mod memory;
mod modbus;
mod operations;
mod passwd;
mod pipeline;
mod reload;
mod runtime;
mod runtime_cli;
mod serial;
mod sinks;
mod support;
mod timer;
mod tls;
mod watchdog;
