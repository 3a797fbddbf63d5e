//! Sensirion SHT3x (SHT30/31/35): temperature and humidity over I2C, every
//! word checked with the datasheet's CRC-8 (polynomial 0x31, init 0xFF).

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

/// Address with ADDR to GND.
pub const ADDRESS_PRIMARY: u8 = 0x44;
/// Address with ADDR to VDD.
pub const ADDRESS_SECONDARY: u8 = 0x45;
/// Single shot, high repeatability, no clock stretching.
pub const CMD_MEASURE_HIGH: [u8; 2] = [0x24, 0x00];

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    /// The bus reported an error (NACK, arbitration loss…).
    I2c(E),
    /// A word failed its CRC (noise on the bus, or not an SHT3x).
    Crc,
}

/// The datasheet's CRC-8: polynomial 0x31, init 0xFF, no reflection.
pub fn crc8(data: &[u8]) -> u8 {
    let mut crc = 0xffu8;
    for &b in data {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x31
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Temperature in 0.01 °C.
    pub temperature_centi_c: i32,
    /// Relative humidity in 0.01 %.
    pub humidity_centi_pct: u32,
}

impl Measurement {
    /// From the raw words (datasheet 4.13).
    pub fn from_raw(t: u16, rh: u16) -> Self {
        Self {
            temperature_centi_c: -4500 + ((17_500 * i32::from(t)) / 65_535),
            humidity_centi_pct: (10_000 * u32::from(rh)) / 65_535,
        }
    }
    /// Temperature in °C.
    pub fn temperature_c(&self) -> f32 {
        self.temperature_centi_c as f32 / 100.0
    }
    /// Relative humidity in %.
    pub fn humidity_pct(&self) -> f32 {
        self.humidity_centi_pct as f32 / 100.0
    }
}

/// The driver.
#[derive(Debug)]
pub struct Sht3x<I2C> {
    i2c: I2C,
    address: u8,
}

impl<I2C: I2c> Sht3x<I2C> {
    /// A driver for the chip at `address`.
    pub fn new(i2c: I2C, address: u8) -> Self {
        Self { i2c, address }
    }

    /// One single-shot, high-repeatability measurement (15.5 ms).
    pub fn measure<D: DelayNs>(&mut self, delay: &mut D) -> Result<Measurement, Error<I2C::Error>> {
        self.i2c
            .write(self.address, &CMD_MEASURE_HIGH)
            .map_err(Error::I2c)?;
        delay.delay_us(15_500);
        let mut d = [0u8; 6];
        self.i2c.read(self.address, &mut d).map_err(Error::I2c)?;
        if crc8(&d[0..2]) != d[2] || crc8(&d[3..5]) != d[5] {
            return Err(Error::Crc);
        }
        Ok(Measurement::from_raw(
            u16::from_be_bytes([d[0], d[1]]),
            u16::from_be_bytes([d[3], d[4]]),
        ))
    }

    /// Gives the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }
}

#[cfg(test)]
mod tests {
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};

    use super::*;

    #[test]
    fn crc_matches_the_datasheet_example() {
        // SHT3x datasheet, table 19: CRC(0xBEEF) = 0x92.
        assert_eq!(crc8(&[0xbe, 0xef]), 0x92);
    }

    #[test]
    fn measures_with_the_exact_transactions() {
        // 0x6666 -> 25.00 °C; 0x8000 -> 50.00 %RH.
        let t = [0x66, 0x66];
        let rh = [0x80, 0x00];
        let data = [t[0], t[1], crc8(&t), rh[0], rh[1], crc8(&rh)];
        let expectations = [
            Transaction::write(ADDRESS_PRIMARY, CMD_MEASURE_HIGH.to_vec()),
            Transaction::read(ADDRESS_PRIMARY, data.to_vec()),
        ];
        let mut sensor = Sht3x::new(Mock::new(&expectations), ADDRESS_PRIMARY);
        let m = sensor.measure(&mut NoopDelay::new()).expect("measures");
        assert_eq!(m.temperature_centi_c, 2500);
        assert_eq!(m.humidity_centi_pct, 5000);
        sensor.release().done();
    }

    #[test]
    fn a_corrupt_word_is_a_crc_error() {
        let expectations = [
            Transaction::write(ADDRESS_PRIMARY, CMD_MEASURE_HIGH.to_vec()),
            Transaction::read(ADDRESS_PRIMARY, vec![0x66, 0x66, 0x00, 0x80, 0x00, 0x00]),
        ];
        let mut sensor = Sht3x::new(Mock::new(&expectations), ADDRESS_PRIMARY);
        assert_eq!(sensor.measure(&mut NoopDelay::new()), Err(Error::Crc));
        sensor.release().done();
    }

    #[test]
    fn a_nack_is_an_i2c_error() {
        use embedded_hal::i2c::ErrorKind;
        let expectations = [
            Transaction::write(ADDRESS_PRIMARY, CMD_MEASURE_HIGH.to_vec()).with_error(
                ErrorKind::NoAcknowledge(embedded_hal::i2c::NoAcknowledgeSource::Address),
            ),
        ];
        let mut sensor = Sht3x::new(Mock::new(&expectations), ADDRESS_PRIMARY);
        assert!(matches!(
            sensor.measure(&mut NoopDelay::new()),
            Err(Error::I2c(_))
        ));
        sensor.release().done();
    }
}
