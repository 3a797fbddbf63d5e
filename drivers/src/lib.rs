//! Serial framing codecs and embedded-hal 1.0 sensor drivers for edgefn.
//!
//! This crate knows nothing of the gateway.
//!
//! - [`codec`] (feature `std`, on by default): `tokio_util::codec` decoders
//!   that cut a serial byte stream into frames — [`codec::lines`],
//!   [`codec::cobs`], [`codec::slip`], [`codec::length_prefixed`],
//!   [`codec::nmea`] (NMEA 0183 with checksum) and [`codec::pms5003`]
//!   (Plantower particulate sensors, decoded into named fields). Each has a
//!   maximum frame size, resynchronises after garbage, counts what it
//!   skips, never panics and never buffers without bound.
//! - [`sensors`] (`no_std`): drivers generic over `embedded_hal::i2c::I2c` —
//!   [`sensors::bme280`] (temperature, pressure, humidity with the
//!   datasheet's compensation) and [`sensors::sht3x`] (CRC-8 checked).
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_code, missing_docs)]

#[cfg(feature = "std")]
pub mod codec;
pub mod sensors;
