//! COBS (Consistent Overhead Byte Stuffing) frames separated by `0x00`.

use bytes::{Bytes, BytesMut};

use super::{CodecStats, Step, next_decoded};

/// The COBS decoder.
#[derive(Debug)]
pub struct Cobs {
    max: usize,
    discarding: bool,
}

impl Cobs {
    /// Frames of at most `max` decoded bytes.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            discarding: false,
        }
    }
}

/// Decodes one COBS-encoded frame (without its `0x00` delimiter).
pub fn decode(encoded: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(encoded.len());
    let mut i = 0;
    while i < encoded.len() {
        let code = usize::from(encoded[i]);
        if code == 0 || i + code > encoded.len() {
            return None;
        }
        out.extend_from_slice(&encoded[i + 1..i + code]);
        i += code;
        if code < 0xff && i < encoded.len() {
            out.push(0);
        }
    }
    Some(out)
}

/// Encodes `data` with COBS, followed by the `0x00` delimiter.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 254 + 2);
    let mut code_at = out.len();
    out.push(0);
    let mut code = 1u8;
    for &b in data {
        if b == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(b);
            code += 1;
            if code == 0xff {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
    out.push(0);
    out
}

impl Step for Cobs {
    fn step(&mut self, buf: &mut BytesMut, stats: &mut CodecStats) -> Option<Bytes> {
        // Encoded frames are at most max + max/254 + 1 bytes long.
        let limit = self.max + self.max / 254 + 1;
        next_decoded(buf, 0, limit, self.max, &mut self.discarding, stats, decode)
    }
}
