//! Plantower PMS5003 / PMS7003 particulate-sensor frames: `0x42 0x4d`, a
//! big-endian frame length (28: thirteen 16-bit data words and the
//! checksum), the data, and a 16-bit checksum that is the sum of every byte
//! before it. A frame with a bad length or checksum is dropped and the
//! decoder resynchronises on the next `0x42 0x4d`.

use bytes::{Buf, Bytes, BytesMut};

use super::{CodecStats, Step};

/// Frame start.
pub const MAGIC: [u8; 2] = [0x42, 0x4d];
/// The frame length field of PMS5003 and PMS7003 frames.
pub const FRAME_LEN: usize = 28;
/// A whole frame: magic, length, 13 words, checksum.
pub const FRAME_BYTES: usize = 4 + FRAME_LEN;

/// One reading, in the datasheet's names and units (µg/m³, and particles
/// per 0.1 L of air).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    /// PM1.0, CF=1 (factory environment), µg/m³.
    pub pm1_0_cf1: u16,
    /// PM2.5, CF=1, µg/m³.
    pub pm2_5_cf1: u16,
    /// PM10, CF=1, µg/m³.
    pub pm10_cf1: u16,
    /// PM1.0, atmospheric environment, µg/m³.
    pub pm1_0: u16,
    /// PM2.5, atmospheric environment, µg/m³.
    pub pm2_5: u16,
    /// PM10, atmospheric environment, µg/m³.
    pub pm10: u16,
    /// Particles > 0.3 µm per 0.1 L.
    pub particles_0_3um: u16,
    /// Particles > 0.5 µm per 0.1 L.
    pub particles_0_5um: u16,
    /// Particles > 1.0 µm per 0.1 L.
    pub particles_1_0um: u16,
    /// Particles > 2.5 µm per 0.1 L.
    pub particles_2_5um: u16,
    /// Particles > 5.0 µm per 0.1 L.
    pub particles_5_0um: u16,
    /// Particles > 10 µm per 0.1 L.
    pub particles_10um: u16,
}

impl Reading {
    /// Parses a whole validated frame (as [`Pms5003`] yields it).
    pub fn parse(frame: &[u8]) -> Option<Self> {
        if frame.len() != FRAME_BYTES || frame[..2] != MAGIC || !checksum_ok(frame) {
            return None;
        }
        let w = |i: usize| u16::from_be_bytes([frame[4 + 2 * i], frame[5 + 2 * i]]);
        Some(Self {
            pm1_0_cf1: w(0),
            pm2_5_cf1: w(1),
            pm10_cf1: w(2),
            pm1_0: w(3),
            pm2_5: w(4),
            pm10: w(5),
            particles_0_3um: w(6),
            particles_0_5um: w(7),
            particles_1_0um: w(8),
            particles_2_5um: w(9),
            particles_5_0um: w(10),
            particles_10um: w(11),
        })
    }

    /// The frame a sensor would send for this reading.
    pub fn encode(&self) -> [u8; FRAME_BYTES] {
        let mut f = [0u8; FRAME_BYTES];
        f[..2].copy_from_slice(&MAGIC);
        f[2..4].copy_from_slice(&(FRAME_LEN as u16).to_be_bytes());
        let words = [
            self.pm1_0_cf1,
            self.pm2_5_cf1,
            self.pm10_cf1,
            self.pm1_0,
            self.pm2_5,
            self.pm10,
            self.particles_0_3um,
            self.particles_0_5um,
            self.particles_1_0um,
            self.particles_2_5um,
            self.particles_5_0um,
            self.particles_10um,
            0,
        ];
        for (i, w) in words.iter().enumerate() {
            f[4 + 2 * i..6 + 2 * i].copy_from_slice(&w.to_be_bytes());
        }
        let sum = sum(&f[..FRAME_BYTES - 2]);
        f[FRAME_BYTES - 2..].copy_from_slice(&sum.to_be_bytes());
        f
    }
}

fn sum(bytes: &[u8]) -> u16 {
    bytes
        .iter()
        .fold(0u16, |a, b| a.wrapping_add(u16::from(*b)))
}

fn checksum_ok(frame: &[u8]) -> bool {
    let n = frame.len();
    sum(&frame[..n - 2]) == u16::from_be_bytes([frame[n - 2], frame[n - 1]])
}

/// The PMS5003 decoder.
#[derive(Debug, Default)]
pub struct Pms5003;

impl Step for Pms5003 {
    fn step(&mut self, buf: &mut BytesMut, stats: &mut CodecStats) -> Option<Bytes> {
        loop {
            match buf.windows(2).position(|w| w == MAGIC) {
                Some(0) => {}
                Some(i) => {
                    stats.discarded_bytes += i as u64;
                    buf.advance(i);
                }
                None => {
                    // Keep a trailing 0x42: it may be the start of a frame.
                    let keep = usize::from(buf.last() == Some(&MAGIC[0]));
                    let drop = buf.len() - keep;
                    stats.discarded_bytes += drop as u64;
                    buf.advance(drop);
                    return None;
                }
            }
            if buf.len() < 4 {
                return None;
            }
            if usize::from(u16::from_be_bytes([buf[2], buf[3]])) != FRAME_LEN {
                stats.invalid += 1;
                stats.discarded_bytes += 1;
                buf.advance(1);
                continue;
            }
            if buf.len() < FRAME_BYTES {
                return None;
            }
            if checksum_ok(&buf[..FRAME_BYTES]) {
                return Some(buf.split_to(FRAME_BYTES).freeze());
            }
            stats.invalid += 1;
            stats.discarded_bytes += 1;
            buf.advance(1);
        }
    }
}
