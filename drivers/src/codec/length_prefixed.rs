//! A length prefix (u8 or u16, big or little endian), then that many bytes.
//!
//! There is no sync marker, so resynchronisation is by elimination: a prefix
//! announcing more than the maximum, or less than the minimum (by default a
//! zero-length frame: on a noisy line a stray `0x00` is far more likely
//! than an empty message), is counted invalid, one byte is dropped, and the
//! next byte is tried as a prefix.

use bytes::{Buf, Bytes, BytesMut};

use super::{CodecStats, Endian, Step, Width};

/// The length-prefixed decoder.
#[derive(Debug)]
pub struct LengthPrefixed {
    width: Width,
    endian: Endian,
    min: usize,
    max: usize,
}

impl LengthPrefixed {
    /// Frames of `min..=max` bytes after a `width` prefix in `endian`.
    pub fn new(width: Width, endian: Endian, min: usize, max: usize) -> Self {
        Self {
            width,
            endian,
            min,
            max,
        }
    }
}

fn header_len(width: Width) -> usize {
    match width {
        Width::U8 => 1,
        Width::U16 => 2,
    }
}

/// Encodes `data` with its prefix; `None` if it does not fit the width.
pub fn encode(width: Width, endian: Endian, data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() + 2);
    match width {
        Width::U8 => out.push(u8::try_from(data.len()).ok()?),
        Width::U16 => {
            let n = u16::try_from(data.len()).ok()?;
            out.extend_from_slice(&match endian {
                Endian::Big => n.to_be_bytes(),
                Endian::Little => n.to_le_bytes(),
            });
        }
    }
    out.extend_from_slice(data);
    Some(out)
}

impl Step for LengthPrefixed {
    fn step(&mut self, buf: &mut BytesMut, stats: &mut CodecStats) -> Option<Bytes> {
        let h = header_len(self.width);
        loop {
            if buf.len() < h {
                return None;
            }
            let len = match (self.width, self.endian) {
                (Width::U8, _) => usize::from(buf[0]),
                (Width::U16, Endian::Big) => usize::from(u16::from_be_bytes([buf[0], buf[1]])),
                (Width::U16, Endian::Little) => usize::from(u16::from_le_bytes([buf[0], buf[1]])),
            };
            if len > self.max || len < self.min {
                stats.invalid += 1;
                stats.discarded_bytes += 1;
                buf.advance(1);
                continue;
            }
            if buf.len() < h + len {
                return None;
            }
            buf.advance(h);
            return Some(buf.split_to(len).freeze());
        }
    }
}
