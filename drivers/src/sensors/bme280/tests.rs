use embedded_hal_mock::eh1::delay::NoopDelay;
use embedded_hal_mock::eh1::i2c::{Mock, Transaction};

use super::*;

/// The worked example of the BMP280 datasheet (section 3.12), whose
/// temperature and pressure compensation the BME280 shares.
fn example() -> Calibration {
    Calibration {
        dig_t1: 27504,
        dig_t2: 26435,
        dig_t3: -1000,
        dig_p1: 36477,
        dig_p2: -10685,
        dig_p3: 3024,
        dig_p4: 2855,
        dig_p5: 140,
        dig_p6: -7,
        dig_p7: 15500,
        dig_p8: -14600,
        dig_p9: 6000,
        dig_h1: 75,
        dig_h2: 362,
        dig_h3: 0,
        dig_h4: 313,
        dig_h5: 50,
        dig_h6: 30,
    }
}

#[test]
fn datasheet_worked_example() {
    let c = example();
    let (t_fine, t) = c.temperature(519_888);
    assert_eq!(t_fine, 128_422);
    assert_eq!(t, 2508, "25.08 °C");
    let p = c.pressure(t_fine, 415_148);
    assert_eq!(p / 256, 100_653, "100653 Pa (Q24.8 {p})");
}

/// The datasheet's floating-point humidity formula (section 8.1), as an
/// independent check of the integer one.
fn humidity_float(c: &Calibration, t_fine: i32, adc_h: i32) -> f64 {
    let mut h = f64::from(t_fine) - 76_800.0;
    h = (f64::from(adc_h) - (f64::from(c.dig_h4) * 64.0 + f64::from(c.dig_h5) / 16_384.0 * h))
        * (f64::from(c.dig_h2) / 65_536.0
            * (1.0
                + f64::from(c.dig_h6) / 67_108_864.0
                    * h
                    * (1.0 + f64::from(c.dig_h3) / 67_108_864.0 * h)));
    h *= 1.0 - f64::from(c.dig_h1) * h / 524_288.0;
    h.clamp(0.0, 100.0)
}

#[test]
fn integer_humidity_agrees_with_the_float_formula() {
    let c = example();
    for adc_h in [20_000, 25_000, 29_000, 33_000, 40_000] {
        let q = c.humidity(128_422, adc_h);
        let int = f64::from(q) / 1024.0;
        let float = humidity_float(&c, 128_422, adc_h);
        assert!((int - float).abs() < 0.1, "adc {adc_h}: {int} vs {float}");
    }
}

#[test]
fn calibration_registers_parse() {
    let mut a = [0u8; 26];
    a[0..2].copy_from_slice(&27504u16.to_le_bytes());
    a[2..4].copy_from_slice(&26435i16.to_le_bytes());
    a[4..6].copy_from_slice(&(-1000i16).to_le_bytes());
    a[25] = 75;
    // H4 = 0x139 = 313 (E4 = 0x13, E5 low nibble = 9); H5 = 0x032 = 50 (E6 = 0x03, E5 high nibble = 2).
    let b = [0x6a, 0x01, 0x00, 0x13, 0x29, 0x03, 0x1e];
    let c = Calibration::parse(&a, &b);
    assert_eq!(
        (c.dig_t1, c.dig_t2, c.dig_t3, c.dig_h1),
        (27504, 26435, -1000, 75)
    );
    assert_eq!(
        (c.dig_h2, c.dig_h3, c.dig_h4, c.dig_h5, c.dig_h6),
        (362, 0, 313, 50, 30)
    );
}

#[test]
fn init_and_measure_with_the_exact_transactions() {
    let mut a = [0u8; 26];
    a[0..2].copy_from_slice(&27504u16.to_le_bytes());
    a[2..4].copy_from_slice(&26435i16.to_le_bytes());
    a[4..6].copy_from_slice(&(-1000i16).to_le_bytes());
    let words: [i16; 9] = [
        -28_059, /* p1 as raw */
        -10685, 3024, 2855, 140, -7, 15500, -14600, 6000,
    ];
    for (i, w) in words.iter().enumerate() {
        a[6 + 2 * i..8 + 2 * i].copy_from_slice(&w.to_le_bytes());
    }
    a[6..8].copy_from_slice(&36477u16.to_le_bytes());
    a[25] = 75;
    let b = [0x6a, 0x01, 0x00, 0x13, 0x29, 0x03, 0x1e];
    // adc_P = 415148 = 0x655AC, adc_T = 519888 = 0x7EED0, adc_H = 29000.
    let data = [
        0x65,
        0x5a,
        0xc0,
        0x7e,
        0xed,
        0x00,
        (29_000u16 >> 8) as u8,
        (29_000u16 & 0xff) as u8,
    ];
    let addr = ADDRESS_PRIMARY;
    let expectations = [
        Transaction::write_read(addr, vec![0xd0], vec![CHIP_ID]),
        Transaction::write_read(addr, vec![0x88], a.to_vec()),
        Transaction::write_read(addr, vec![0xe1], b.to_vec()),
        Transaction::write(addr, vec![0xf2, 0x01]),
        Transaction::write(addr, vec![0xf4, 0x25]),
        Transaction::write_read(addr, vec![0xf3], vec![0x00]),
        Transaction::write_read(addr, vec![0xf7], data.to_vec()),
    ];
    let mut sensor = Bme280::new(Mock::new(&expectations), addr);
    let m = sensor.measure(&mut NoopDelay::new()).expect("measures");
    assert_eq!(m.temperature_centi_c, 2508);
    assert_eq!(m.pressure_q24_8 / 256, 100_653);
    let rh = m.humidity_pct();
    assert!((0.0..=100.0).contains(&rh), "{rh}");
    sensor.release().done();
}

#[test]
fn a_wrong_chip_id_is_reported() {
    let expectations = [Transaction::write_read(
        ADDRESS_SECONDARY,
        vec![0xd0],
        vec![0x58],
    )];
    let mut sensor = Bme280::new(Mock::new(&expectations), ADDRESS_SECONDARY);
    assert_eq!(sensor.init(), Err(Error::WrongChip(0x58)));
    sensor.release().done();
}
