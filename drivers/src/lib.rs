//! Serial framing codecs and embedded-hal 1.0 sensor drivers for edgefn.
//!
//! This crate knows nothing of the gateway. It is empty for now: the framing
//! codecs (lines, COBS, SLIP, length-prefixed, NMEA, PMS5003) and the sensor
//! drivers (BME280, SHT3x) arrive with the serial and I2C sources.
#![no_std]
#![deny(unsafe_code, missing_docs)]
