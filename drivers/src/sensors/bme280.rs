//! Bosch BME280: temperature, pressure and humidity over I2C, with the
//! datasheet's integer compensation formulas (BME280 datasheet rev. 1.6,
//! section 4.2.3 and 8.2).
//!
//! Measurements use forced mode: one conversion per [`Bme280::measure`],
//! oversampling ×1 for all three, so the sensor sleeps between polls.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

/// Address with SDO to GND.
pub const ADDRESS_PRIMARY: u8 = 0x76;
/// Address with SDO to VDDIO.
pub const ADDRESS_SECONDARY: u8 = 0x77;
/// The value of the chip-id register.
pub const CHIP_ID: u8 = 0x60;

const REG_CHIP_ID: u8 = 0xd0;
const REG_CALIB_00: u8 = 0x88;
const REG_CALIB_26: u8 = 0xe1;
const REG_CTRL_HUM: u8 = 0xf2;
const REG_STATUS: u8 = 0xf3;
const REG_CTRL_MEAS: u8 = 0xf4;
const REG_DATA: u8 = 0xf7;
/// ctrl_meas: osrs_t ×1, osrs_p ×1, forced mode.
#[allow(
    clippy::unusual_byte_groupings,
    reason = "grouped as the register fields: osrs_t, osrs_p, mode"
)]
const CTRL_MEAS_FORCED: u8 = 0b001_001_01;
/// ctrl_hum: osrs_h ×1.
const CTRL_HUM_X1: u8 = 0b001;
/// status: a conversion is running.
const STATUS_MEASURING: u8 = 1 << 3;

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    /// The bus reported an error (NACK, arbitration loss…).
    I2c(E),
    /// The chip at the address is not a BME280 (its id is given).
    WrongChip(u8),
    /// The conversion did not finish in time.
    Timeout,
}

/// The factory calibration read from the chip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[allow(missing_docs, reason = "the datasheet's names")]
pub struct Calibration {
    pub dig_t1: u16,
    pub dig_t2: i16,
    pub dig_t3: i16,
    pub dig_p1: u16,
    pub dig_p2: i16,
    pub dig_p3: i16,
    pub dig_p4: i16,
    pub dig_p5: i16,
    pub dig_p6: i16,
    pub dig_p7: i16,
    pub dig_p8: i16,
    pub dig_p9: i16,
    pub dig_h1: u8,
    pub dig_h2: i16,
    pub dig_h3: u8,
    pub dig_h4: i16,
    pub dig_h5: i16,
    pub dig_h6: i8,
}

impl Calibration {
    /// Parses calib00..25 (0x88..0xA1) and calib26..32 (0xE1..0xE7).
    pub fn parse(a: &[u8; 26], b: &[u8; 7]) -> Self {
        let u = |i: usize| u16::from_le_bytes([a[i], a[i + 1]]);
        let s = |i: usize| i16::from_le_bytes([a[i], a[i + 1]]);
        Self {
            dig_t1: u(0),
            dig_t2: s(2),
            dig_t3: s(4),
            dig_p1: u(6),
            dig_p2: s(8),
            dig_p3: s(10),
            dig_p4: s(12),
            dig_p5: s(14),
            dig_p6: s(16),
            dig_p7: s(18),
            dig_p8: s(20),
            dig_p9: s(22),
            dig_h1: a[25],
            dig_h2: i16::from_le_bytes([b[0], b[1]]),
            dig_h3: b[2],
            dig_h4: (i16::from(b[3] as i8) << 4) | i16::from(b[4] & 0x0f),
            dig_h5: (i16::from(b[5] as i8) << 4) | i16::from(b[4] >> 4),
            dig_h6: b[6] as i8,
        }
    }

    /// `t_fine` and the temperature in 0.01 °C from a raw 20-bit reading.
    /// (64-bit arithmetic: identical results to the datasheet's 32-bit code
    /// for real readings, and no overflow on garbage.)
    pub fn temperature(&self, adc_t: i32) -> (i32, i32) {
        let adc = i64::from(adc_t);
        let t1 = i64::from(self.dig_t1);
        let var1 = (((adc >> 3) - (t1 << 1)) * i64::from(self.dig_t2)) >> 11;
        let var2 = (((((adc >> 4) - t1) * ((adc >> 4) - t1)) >> 12) * i64::from(self.dig_t3)) >> 14;
        let t_fine = (var1 + var2).clamp(i64::from(i32::MIN) / 8, i64::from(i32::MAX) / 8) as i32;
        (t_fine, (t_fine * 5 + 128) >> 8)
    }

    /// Pressure in Pa as Q24.8 (divide by 256), the datasheet's 64-bit
    /// formula; 0 when the calibration would divide by zero.
    pub fn pressure(&self, t_fine: i32, adc_p: i32) -> u32 {
        let mut var1 = i64::from(t_fine) - 128_000;
        let mut var2 = var1.wrapping_mul(var1).wrapping_mul(i64::from(self.dig_p6));
        var2 = var2.wrapping_add(var1.wrapping_mul(i64::from(self.dig_p5)) << 17);
        var2 = var2.wrapping_add(i64::from(self.dig_p4) << 35);
        var1 = (var1.wrapping_mul(var1).wrapping_mul(i64::from(self.dig_p3)) >> 8)
            .wrapping_add(var1.wrapping_mul(i64::from(self.dig_p2)) << 12);
        var1 = ((1i64 << 47).wrapping_add(var1)).wrapping_mul(i64::from(self.dig_p1)) >> 33;
        if var1 == 0 {
            return 0;
        }
        let mut p: i64 = 1_048_576 - i64::from(adc_p);
        p = ((p << 31).wrapping_sub(var2)).wrapping_mul(3125) / var1;
        let var1 = i64::from(self.dig_p9)
            .wrapping_mul(p >> 13)
            .wrapping_mul(p >> 13)
            >> 25;
        let var2 = i64::from(self.dig_p8).wrapping_mul(p) >> 19;
        p = (p.wrapping_add(var1).wrapping_add(var2) >> 8) + (i64::from(self.dig_p7) << 4);
        p.clamp(0, i64::from(u32::MAX)) as u32
    }

    /// Relative humidity in % as Q22.10 (divide by 1024), the datasheet's
    /// formula (in 64-bit arithmetic, as above).
    pub fn humidity(&self, t_fine: i32, adc_h: i32) -> u32 {
        let x = i64::from(t_fine) - 76_800;
        let (h1, h2, h3) = (
            i64::from(self.dig_h1),
            i64::from(self.dig_h2),
            i64::from(self.dig_h3),
        );
        let (h4, h5, h6) = (
            i64::from(self.dig_h4),
            i64::from(self.dig_h5),
            i64::from(self.dig_h6),
        );
        let a = ((i64::from(adc_h) << 14) - (h4 << 20) - (h5 * x) + 16_384) >> 15;
        let b = ((((((x * h6) >> 10) * (((x * h3) >> 11) + 32_768)) >> 10) + 2_097_152) * h2
            + 8192)
            >> 14;
        let mut v = a.wrapping_mul(b);
        v -= ((((v >> 15) * (v >> 15)) >> 7) * h1) >> 4;
        v = v.clamp(0, 419_430_400);
        (v >> 12) as u32
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Temperature in 0.01 °C.
    pub temperature_centi_c: i32,
    /// Pressure in Pa, Q24.8.
    pub pressure_q24_8: u32,
    /// Relative humidity in %, Q22.10.
    pub humidity_q22_10: u32,
}

impl Measurement {
    /// Temperature in °C.
    pub fn temperature_c(&self) -> f32 {
        self.temperature_centi_c as f32 / 100.0
    }
    /// Pressure in hPa.
    pub fn pressure_hpa(&self) -> f32 {
        self.pressure_q24_8 as f32 / 25_600.0
    }
    /// Relative humidity in %.
    pub fn humidity_pct(&self) -> f32 {
        self.humidity_q22_10 as f32 / 1024.0
    }
}

/// The driver.
#[derive(Debug)]
pub struct Bme280<I2C> {
    i2c: I2C,
    address: u8,
    calibration: Option<Calibration>,
}

impl<I2C: I2c> Bme280<I2C> {
    /// A driver for the chip at `address` ([`ADDRESS_PRIMARY`] or
    /// [`ADDRESS_SECONDARY`]); talks to the bus only from [`Self::init`] on.
    pub fn new(i2c: I2C, address: u8) -> Self {
        Self {
            i2c,
            address,
            calibration: None,
        }
    }

    /// Checks the chip id and reads the calibration.
    pub fn init(&mut self) -> Result<Calibration, Error<I2C::Error>> {
        let mut id = [0u8];
        self.i2c
            .write_read(self.address, &[REG_CHIP_ID], &mut id)
            .map_err(Error::I2c)?;
        if id[0] != CHIP_ID {
            return Err(Error::WrongChip(id[0]));
        }
        let mut a = [0u8; 26];
        let mut b = [0u8; 7];
        self.i2c
            .write_read(self.address, &[REG_CALIB_00], &mut a)
            .map_err(Error::I2c)?;
        self.i2c
            .write_read(self.address, &[REG_CALIB_26], &mut b)
            .map_err(Error::I2c)?;
        let c = Calibration::parse(&a, &b);
        self.calibration = Some(c);
        Ok(c)
    }

    /// Runs one forced-mode conversion and compensates it. Calls
    /// [`Self::init`] first if it has not run.
    pub fn measure<D: DelayNs>(&mut self, delay: &mut D) -> Result<Measurement, Error<I2C::Error>> {
        let c = match self.calibration {
            Some(c) => c,
            None => self.init()?,
        };
        // ctrl_hum takes effect only after a write to ctrl_meas.
        self.i2c
            .write(self.address, &[REG_CTRL_HUM, CTRL_HUM_X1])
            .map_err(Error::I2c)?;
        self.i2c
            .write(self.address, &[REG_CTRL_MEAS, CTRL_MEAS_FORCED])
            .map_err(Error::I2c)?;
        // ×1 oversampling of all three: 9.3 ms at most (datasheet 9.1).
        delay.delay_ms(10);
        let mut status = [0u8];
        let mut tries = 0;
        loop {
            self.i2c
                .write_read(self.address, &[REG_STATUS], &mut status)
                .map_err(Error::I2c)?;
            if status[0] & STATUS_MEASURING == 0 {
                break;
            }
            tries += 1;
            if tries > 10 {
                return Err(Error::Timeout);
            }
            delay.delay_ms(2);
        }
        let mut d = [0u8; 8];
        self.i2c
            .write_read(self.address, &[REG_DATA], &mut d)
            .map_err(Error::I2c)?;
        let adc_p = (i32::from(d[0]) << 12) | (i32::from(d[1]) << 4) | (i32::from(d[2]) >> 4);
        let adc_t = (i32::from(d[3]) << 12) | (i32::from(d[4]) << 4) | (i32::from(d[5]) >> 4);
        let adc_h = (i32::from(d[6]) << 8) | i32::from(d[7]);
        let (t_fine, temperature_centi_c) = c.temperature(adc_t);
        Ok(Measurement {
            temperature_centi_c,
            pressure_q24_8: c.pressure(t_fine, adc_p),
            humidity_q22_10: c.humidity(t_fine, adc_h),
        })
    }

    /// Gives the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }
}

#[cfg(test)]
mod tests;
