#![no_main]
//! Fuzzes the `length_prefixed` decoder.

#[path = "common.rs"]
mod common;

#[allow(unused_imports)]
use edgefn_drivers::codec::{Endian, Framing, Width};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| common::run(Framing::LengthPrefixed { width: Width::U16, endian: Endian::Big, min: 0, max: 256 }, 256, data));
