//! Sensor drivers, generic over embedded-hal 1.0 `I2c` (and `DelayNs` for
//! measurement time), `no_std`. Each is made with `new(i2c, address)` and
//! gives the bus back with `release(self)`.

pub mod bme280;
pub mod sht3x;
