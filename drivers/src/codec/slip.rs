//! SLIP (RFC 1055) frames separated by `END` (`0xC0`).

use bytes::{Bytes, BytesMut};

use super::{CodecStats, Step, next_decoded};

/// Frame delimiter.
pub const END: u8 = 0xc0;
/// Escape byte.
pub const ESC: u8 = 0xdb;
/// Escaped `END`.
pub const ESC_END: u8 = 0xdc;
/// Escaped `ESC`.
pub const ESC_ESC: u8 = 0xdd;

/// The SLIP decoder.
#[derive(Debug)]
pub struct Slip {
    max: usize,
    discarding: bool,
}

impl Slip {
    /// Frames of at most `max` decoded bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            discarding: false,
        }
    }
}

/// Decodes one SLIP frame body (without `END`s).
pub fn decode(encoded: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut bytes = encoded.iter();
    while let Some(&b) = bytes.next() {
        if b == ESC {
            match bytes.next() {
                Some(&ESC_END) => out.push(END),
                Some(&ESC_ESC) => out.push(ESC),
                _ => return None,
            }
        } else {
            out.push(b);
        }
    }
    Some(out)
}

/// Encodes `data` as a SLIP frame with a leading and a trailing `END`.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 2);
    out.push(END);
    for &b in data {
        match b {
            END => out.extend_from_slice(&[ESC, ESC_END]),
            ESC => out.extend_from_slice(&[ESC, ESC_ESC]),
            b => out.push(b),
        }
    }
    out.push(END);
    out
}

impl Step for Slip {
    fn step(&mut self, buf: &mut BytesMut, stats: &mut CodecStats) -> Option<Bytes> {
        // Escaping at most doubles a frame.
        next_decoded(
            buf,
            END,
            self.max * 2,
            self.max,
            &mut self.discarding,
            stats,
            decode,
        )
    }
}
