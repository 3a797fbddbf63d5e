//! NMEA 0183 sentences: `$` or `!`, up to 79 characters, `*hh` checksum (the
//! XOR of every byte between the start and `*`), then `\r\n`. Sentences with
//! a wrong or missing checksum, or non-printable bytes, are dropped.

use bytes::{Buf, Bytes, BytesMut};

use super::{CodecStats, Step};

/// The NMEA decoder.
#[derive(Debug)]
pub struct Nmea {
    max: usize,
}

impl Nmea {
    /// Sentences of at most `max` bytes (82 in the standard, including
    /// `\r\n`).
    pub fn new(max: usize) -> Self {
        Self { max: max.max(8) }
    }
}

/// The checksum of a sentence body (between `$`/`!` and `*`).
pub fn checksum(body: &[u8]) -> u8 {
    body.iter().fold(0, |a, b| a ^ b)
}

/// A full sentence for `body` (e.g. `GPGGA,...`): `$body*hh\r\n`.
pub fn sentence(body: &str) -> String {
    format!("${body}*{:02X}\r\n", checksum(body.as_bytes()))
}

/// Checks a sentence without its line ending.
pub fn validate(s: &[u8]) -> bool {
    if s.len() < 4 || !matches!(s[0], b'$' | b'!') {
        return false;
    }
    if !s.iter().all(|b| (0x20..0x7f).contains(b)) {
        return false;
    }
    let Some(star) = s.iter().rposition(|b| *b == b'*') else {
        return false;
    };
    let hex = &s[star + 1..];
    if hex.len() != 2 {
        return false;
    }
    let Some(expected) = std::str::from_utf8(hex)
        .ok()
        .and_then(|h| u8::from_str_radix(h, 16).ok())
    else {
        return false;
    };
    checksum(&s[1..star]) == expected
}

impl Step for Nmea {
    fn step(&mut self, buf: &mut BytesMut, stats: &mut CodecStats) -> Option<Bytes> {
        loop {
            // Resynchronise on a sentence start.
            match buf.iter().position(|b| matches!(b, b'$' | b'!')) {
                Some(0) => {}
                Some(i) => {
                    stats.discarded_bytes += i as u64;
                    buf.advance(i);
                }
                None => {
                    stats.discarded_bytes += buf.len() as u64;
                    buf.clear();
                    return None;
                }
            }
            // A new start before the end means the sentence was cut short.
            let end = buf.iter().position(|b| *b == b'\n');
            let restart = buf
                .iter()
                .skip(1)
                .position(|b| matches!(b, b'$' | b'!'))
                .map(|p| p + 1);
            match (end, restart) {
                (Some(e), Some(r)) if r < e => {
                    stats.invalid += 1;
                    stats.discarded_bytes += r as u64;
                    buf.advance(r);
                }
                (Some(e), _) => {
                    let mut s = buf.split_to(e + 1);
                    s.truncate(e);
                    if s.last() == Some(&b'\r') {
                        s.truncate(s.len() - 1);
                    }
                    if s.len() + 2 > self.max {
                        stats.oversize += 1;
                    } else if validate(&s) {
                        return Some(s.freeze());
                    } else {
                        stats.invalid += 1;
                    }
                }
                (None, Some(r)) if r >= self.max => {
                    stats.oversize += 1;
                    stats.discarded_bytes += r as u64;
                    buf.advance(r);
                }
                (None, Some(r)) => {
                    // Cut short by a new sentence.
                    stats.invalid += 1;
                    stats.discarded_bytes += r as u64;
                    buf.advance(r);
                }
                (None, None) => {
                    if buf.len() >= self.max {
                        stats.oversize += 1;
                        stats.discarded_bytes += buf.len() as u64;
                        buf.clear();
                    }
                    return None;
                }
            }
        }
    }
}
