//! Text lines ending in `\n` or `\r\n`; the terminator is removed and empty
//! lines are skipped.

use bytes::{Bytes, BytesMut};

use super::{CodecStats, Step, next_delimited};

/// The line decoder.
#[derive(Debug)]
pub struct Lines {
    max: usize,
    discarding: bool,
}

impl Lines {
    /// Lines of at most `max` bytes (without the terminator).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            discarding: false,
        }
    }
}

impl Step for Lines {
    fn step(&mut self, buf: &mut BytesMut, stats: &mut CodecStats) -> Option<Bytes> {
        loop {
            // One more byte for a `\r` before the `\n`.
            let mut line = next_delimited(buf, b'\n', self.max + 1, &mut self.discarding, stats)?;
            if line.last() == Some(&b'\r') {
                line.truncate(line.len() - 1);
            }
            if line.len() > self.max {
                stats.oversize += 1;
                continue;
            }
            if !line.is_empty() {
                return Some(line.freeze());
            }
        }
    }
}
