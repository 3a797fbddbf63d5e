//! Framing codecs: cut a serial byte stream into frames.
//!
//! Every decoder here follows the same rules, so a noisy line can never hurt
//! the gateway:
//! - bad data is **counted and skipped**, never returned as an error (an
//!   error would end a `FramedRead`); `decode` only fails on I/O;
//! - the buffer never grows past the maximum frame size (plus a header):
//!   an overlong frame is dropped and the decoder resynchronises on the next
//!   delimiter or header;
//! - it never panics, whatever the input (property-tested and fuzzed).
//!
//! [`Framing`] picks a codec by configuration and [`FrameDecoder`] runs it.

pub mod cobs;
pub mod length_prefixed;
pub mod lines;
pub mod nmea;
pub mod pms5003;
pub mod slip;

use bytes::{Bytes, BytesMut};
use tokio_util::codec::Decoder;

/// What a decoder has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CodecStats {
    /// Frames returned.
    pub frames: u64,
    /// Frames dropped as malformed (bad escape, checksum, length…).
    pub invalid: u64,
    /// Frames dropped for being longer than the maximum.
    pub oversize: u64,
    /// Bytes thrown away while resynchronising.
    pub discarded_bytes: u64,
}

/// Byte order of a length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endian {
    /// Most significant byte first.
    Big,
    /// Least significant byte first.
    Little,
}

/// Width of a length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// One byte (frames up to 255 bytes).
    U8,
    /// Two bytes (frames up to 65,535 bytes).
    U16,
}

/// A framing, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Text lines ending in `\n` or `\r\n` (the terminator is removed).
    Lines {
        /// Longest line.
        max: usize,
    },
    /// COBS-encoded frames separated by `0x00`.
    Cobs {
        /// Longest decoded frame.
        max: usize,
    },
    /// SLIP (RFC 1055) frames separated by `0xC0`.
    Slip {
        /// Longest decoded frame.
        max: usize,
    },
    /// A length prefix, then that many bytes.
    LengthPrefixed {
        /// Prefix width.
        width: Width,
        /// Prefix byte order.
        endian: Endian,
        /// Shortest frame: shorter ones (by default the empty frame) are
        /// counted invalid, like garbage.
        min: usize,
        /// Longest frame.
        max: usize,
    },
    /// NMEA 0183 sentences (`$...*hh\r\n`), checksum checked.
    Nmea {
        /// Longest sentence (82 in the standard).
        max: usize,
    },
    /// Plantower PMS5003/PMS7003 frames (`0x42 0x4d`, length, data, checksum).
    Pms5003,
}

impl Framing {
    /// A short name for logs and event attributes.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Lines { .. } => "lines",
            Self::Cobs { .. } => "cobs",
            Self::Slip { .. } => "slip",
            Self::LengthPrefixed { .. } => "length_prefixed",
            Self::Nmea { .. } => "nmea",
            Self::Pms5003 => "pms5003",
        }
    }
}

/// A decoder for any [`Framing`]; yields each frame's bytes (for PMS5003 the
/// whole validated frame: parse it with [`pms5003::Reading::parse`]).
#[derive(Debug)]
pub struct FrameDecoder {
    inner: Inner,
    stats: CodecStats,
}

#[derive(Debug)]
enum Inner {
    Lines(lines::Lines),
    Cobs(cobs::Cobs),
    Slip(slip::Slip),
    LengthPrefixed(length_prefixed::LengthPrefixed),
    Nmea(nmea::Nmea),
    Pms5003(pms5003::Pms5003),
}

impl FrameDecoder {
    /// A decoder for `framing`.
    pub fn new(framing: Framing) -> Self {
        let inner = match framing {
            Framing::Lines { max } => Inner::Lines(lines::Lines::new(max)),
            Framing::Cobs { max } => Inner::Cobs(cobs::Cobs::new(max)),
            Framing::Slip { max } => Inner::Slip(slip::Slip::new(max)),
            Framing::LengthPrefixed {
                width,
                endian,
                min,
                max,
            } => Inner::LengthPrefixed(length_prefixed::LengthPrefixed::new(
                width, endian, min, max,
            )),
            Framing::Nmea { max } => Inner::Nmea(nmea::Nmea::new(max)),
            Framing::Pms5003 => Inner::Pms5003(pms5003::Pms5003),
        };
        Self {
            inner,
            stats: CodecStats::default(),
        }
    }

    /// What it has seen so far.
    pub fn stats(&self) -> CodecStats {
        self.stats
    }
}

/// The step every codec implements: take at most one frame from `buf`,
/// updating `stats`; `None` when more bytes are needed.
pub(crate) trait Step {
    fn step(&mut self, buf: &mut BytesMut, stats: &mut CodecStats) -> Option<Bytes>;
}

impl Decoder for FrameDecoder {
    type Item = Bytes;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, std::io::Error> {
        let stats = &mut self.stats;
        let frame = match &mut self.inner {
            Inner::Lines(c) => c.step(buf, stats),
            Inner::Cobs(c) => c.step(buf, stats),
            Inner::Slip(c) => c.step(buf, stats),
            Inner::LengthPrefixed(c) => c.step(buf, stats),
            Inner::Nmea(c) => c.step(buf, stats),
            Inner::Pms5003(c) => c.step(buf, stats),
        };
        if frame.is_some() {
            stats.frames += 1;
        }
        Ok(frame)
    }
}

/// Shared by the delimiter-based codecs: takes the next complete chunk before
/// `delim` (without it), skipping empty chunks, or — when no delimiter is
/// within `max + 1` bytes — drops the buffer and remembers to drop the rest
/// of that chunk too. Returns `(chunk, was_oversize)`.
pub(crate) fn next_delimited(
    buf: &mut BytesMut,
    delim: u8,
    max: usize,
    discarding: &mut bool,
    stats: &mut CodecStats,
) -> Option<BytesMut> {
    loop {
        match buf.iter().position(|b| *b == delim) {
            Some(i) => {
                let mut chunk = buf.split_to(i + 1);
                chunk.truncate(i);
                if *discarding {
                    *discarding = false;
                    stats.discarded_bytes += chunk.len() as u64;
                    continue;
                }
                if chunk.is_empty() {
                    continue;
                }
                if chunk.len() > max {
                    stats.oversize += 1;
                    stats.discarded_bytes += chunk.len() as u64;
                    continue;
                }
                return Some(chunk);
            }
            None => {
                if buf.len() > max {
                    if !*discarding {
                        stats.oversize += 1;
                    }
                    stats.discarded_bytes += buf.len() as u64;
                    buf.clear();
                    *discarding = true;
                }
                return None;
            }
        }
    }
}

/// [`next_delimited`] plus a body decoder (COBS, SLIP): the next frame that
/// decodes and fits `max`; malformed and overlong bodies are counted.
pub(crate) fn next_decoded(
    buf: &mut BytesMut,
    delim: u8,
    encoded_limit: usize,
    max: usize,
    discarding: &mut bool,
    stats: &mut CodecStats,
    decode: fn(&[u8]) -> Option<Vec<u8>>,
) -> Option<Bytes> {
    loop {
        let chunk = next_delimited(buf, delim, encoded_limit, discarding, stats)?;
        match decode(&chunk) {
            Some(frame) if frame.len() <= max => return Some(Bytes::from(frame)),
            Some(_) => stats.oversize += 1,
            None => stats.invalid += 1,
        }
    }
}

#[cfg(test)]
mod tests;
