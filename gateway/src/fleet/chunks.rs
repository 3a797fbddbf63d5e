//! Splitting a bundle file into chunks (one retained MQTT message each) and
//! assembling it again on the gateway, with every size checked against the
//! announced [`BundleRef`] before any memory is used.

use super::bundle::{is_sha256_hex, sha256_hex};
use super::desired::BundleRef;

/// Default chunk size: 96 KiB (AWS IoT Core allows 128 KB per message).
pub const DEFAULT_CHUNK_BYTES: u32 = 96 * 1024;

/// Largest chunk accepted: the gateway's MQTT clients take packets of up to
/// 1 MiB + 64 KiB.
pub const MAX_CHUNK_BYTES: u32 = 1024 * 1024;

/// Smallest chunk size (except for a bundle that fits in one chunk), so the
/// number of chunks, and the memory to track them, stays small.
pub const MIN_CHUNK_BYTES: u32 = 1024;

/// A chunk or an announcement that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The announced chunk size is out of bounds.
    #[error("chunk size {0} bytes is out of bounds ({MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} bytes)")]
    ChunkSize(u32),
    /// The announced bundle is larger than this gateway accepts.
    #[error("bundle of {size} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// Announced size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The chunk count does not match size and chunk size.
    #[error(
        "{chunks} chunks announced, but {size} bytes in chunks of {chunk_size} make {expected}"
    )]
    Count {
        /// Announced count.
        chunks: u32,
        /// Announced size.
        size: u64,
        /// Announced chunk size.
        chunk_size: u32,
        /// What size and chunk size imply.
        expected: u64,
    },
    /// The hash is not 64 lowercase hex digits.
    #[error("`{0}` is not a sha256 (64 lowercase hex digits)")]
    BadHash(String),
    /// A chunk index beyond the announced count.
    #[error("chunk {index} is out of range (the bundle has {chunks} chunks)")]
    IndexOutOfRange {
        /// The chunk's index.
        index: u32,
        /// Announced count.
        chunks: u32,
    },
    /// A chunk of the wrong size.
    #[error("chunk {index} has {got} bytes, {want} expected")]
    WrongSize {
        /// The chunk's index.
        index: u32,
        /// Its size.
        got: usize,
        /// The announced size of that chunk.
        want: u64,
    },
    /// The assembled file does not have the announced hash.
    #[error("the assembled bundle has sha256 {got}, {want} announced")]
    HashMismatch {
        /// The hash of the assembled bytes.
        got: String,
        /// The announced hash.
        want: String,
    },
}

/// The announcement of `bytes` (version `version`) cut into chunks of
/// `chunk_size` bytes.
pub fn bundle_ref(bytes: &[u8], version: u64, chunk_size: u32) -> Result<BundleRef, ChunkError> {
    if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_size) {
        return Err(ChunkError::ChunkSize(chunk_size));
    }
    let size = bytes.len() as u64;
    let chunks = u32::try_from(size.div_ceil(u64::from(chunk_size)).max(1))
        .map_err(|_| ChunkError::ChunkSize(chunk_size))?;
    Ok(BundleRef {
        sha256: sha256_hex(bytes),
        version,
        size,
        chunk_size,
        chunks,
    })
}

/// The chunks of `bytes` as announced by `r` (index, payload).
pub fn split<'a>(bytes: &'a [u8], r: &BundleRef) -> impl Iterator<Item = (u32, &'a [u8])> + 'a {
    let chunk = (r.chunk_size as usize).max(1);
    // An empty bundle is one empty chunk.
    let empty: &[u8] = &[];
    let first = bytes.is_empty().then_some((0, empty));
    first
        .into_iter()
        .chain(bytes.chunks(chunk).enumerate().map(|(i, c)| (i as u32, c)))
}

/// A bundle being assembled from its chunks.
#[derive(Debug)]
pub struct Assembly {
    r: BundleRef,
    /// Allocated (to the announced size) when the first chunk arrives.
    buf: Vec<u8>,
    have: Vec<bool>,
    missing: u32,
}

impl Assembly {
    /// Checks the announcement against itself and `max_bytes`; nothing is
    /// allocated beyond the chunk bitmap (at most `max_bytes / 1 KiB`).
    pub fn new(r: &BundleRef, max_bytes: u64) -> Result<Self, ChunkError> {
        if !is_sha256_hex(&r.sha256) {
            return Err(ChunkError::BadHash(r.sha256.clone()));
        }
        if r.size > max_bytes {
            return Err(ChunkError::TooLarge {
                size: r.size,
                max: max_bytes,
            });
        }
        let single = r.chunks == 1 && r.size <= u64::from(r.chunk_size);
        if r.chunk_size > MAX_CHUNK_BYTES
            || r.chunk_size == 0
            || (r.chunk_size < MIN_CHUNK_BYTES && !single)
        {
            return Err(ChunkError::ChunkSize(r.chunk_size));
        }
        let expected = r.size.div_ceil(u64::from(r.chunk_size)).max(1);
        if u64::from(r.chunks) != expected {
            return Err(ChunkError::Count {
                chunks: r.chunks,
                size: r.size,
                chunk_size: r.chunk_size,
                expected,
            });
        }
        Ok(Self {
            r: r.clone(),
            buf: Vec::new(),
            have: vec![false; r.chunks as usize],
            missing: r.chunks,
        })
    }

    /// Chunks still missing.
    pub fn missing(&self) -> u32 {
        self.missing
    }

    /// Takes chunk `index`; a duplicate is ignored. Returns whether every
    /// chunk is now in. A chunk that does not fit (index out of range,
    /// wrong size) is an error that changes nothing: the caller drops it.
    pub fn accept(&mut self, index: u32, payload: &[u8]) -> Result<bool, ChunkError> {
        let r = &self.r;
        if index >= r.chunks {
            return Err(ChunkError::IndexOutOfRange {
                index,
                chunks: r.chunks,
            });
        }
        let start = u64::from(index) * u64::from(r.chunk_size);
        let want = (r.size - start).min(u64::from(r.chunk_size));
        if payload.len() as u64 != want {
            return Err(ChunkError::WrongSize {
                index,
                got: payload.len(),
                want,
            });
        }
        if self.have[index as usize] {
            return Ok(self.missing == 0);
        }
        if self.buf.len() as u64 != r.size {
            self.buf = vec![0; r.size as usize];
        }
        let start = start as usize;
        self.buf[start..start + payload.len()].copy_from_slice(payload);
        self.have[index as usize] = true;
        self.missing -= 1;
        Ok(self.missing == 0)
    }

    /// The whole file, once every chunk is in and its hash matches. On a
    /// mismatch every chunk is forgotten (the buffer is kept), so the
    /// assembly can take the chunks again.
    pub fn finish(&mut self) -> Result<Vec<u8>, ChunkError> {
        debug_assert_eq!(self.missing, 0);
        let got = sha256_hex(&self.buf);
        if got != self.r.sha256 {
            self.have.fill(false);
            self.missing = self.r.chunks;
            return Err(ChunkError::HashMismatch {
                got,
                want: self.r.sha256.clone(),
            });
        }
        Ok(std::mem::take(&mut self.buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn assemble(data: &[u8], r: &BundleRef) -> Result<Vec<u8>, ChunkError> {
        let mut a = Assembly::new(r, 1 << 20)?;
        let mut done = false;
        for (i, c) in split(data, r) {
            done = a.accept(i, c)?;
        }
        assert!(done);
        a.finish()
    }

    #[test]
    fn split_and_assemble_exact_and_short_last_chunk() {
        for n in [0, 1, 1024, 4096, 4097, 10_000] {
            let data = bytes(n);
            let r = bundle_ref(&data, 3, 1024).unwrap();
            assert_eq!(u64::from(r.chunks), (n as u64).div_ceil(1024).max(1));
            let sizes: Vec<usize> = split(&data, &r).map(|(_, c)| c.len()).collect();
            assert_eq!(sizes.len() as u32, r.chunks);
            assert!(sizes[..sizes.len() - 1].iter().all(|s| *s == 1024));
            assert_eq!(assemble(&data, &r).unwrap(), data, "{n} bytes");
        }
    }

    #[test]
    fn duplicates_are_idempotent_and_order_free() {
        let data = bytes(3000);
        let r = bundle_ref(&data, 1, 1024).unwrap();
        let mut a = Assembly::new(&r, 1 << 20).unwrap();
        let chunks: Vec<_> = split(&data, &r).collect();
        assert!(!a.accept(2, chunks[2].1).unwrap());
        assert!(!a.accept(2, chunks[2].1).unwrap());
        assert!(!a.accept(0, chunks[0].1).unwrap());
        assert_eq!(a.missing(), 1);
        assert!(a.accept(1, chunks[1].1).unwrap());
        assert!(a.accept(1, chunks[1].1).unwrap());
        assert_eq!(a.finish().unwrap(), data);
    }

    #[test]
    fn bad_chunks_and_announcements_are_errors() {
        let data = bytes(3000);
        let r = bundle_ref(&data, 1, 1024).unwrap();
        let mut a = Assembly::new(&r, 1 << 20).unwrap();
        assert_eq!(
            a.accept(3, &data[..952]),
            Err(ChunkError::IndexOutOfRange {
                index: 3,
                chunks: 3
            })
        );
        assert_eq!(
            a.accept(0, &data[..1000]),
            Err(ChunkError::WrongSize {
                index: 0,
                got: 1000,
                want: 1024
            })
        );
        assert_eq!(
            a.accept(2, &data[..1024]),
            Err(ChunkError::WrongSize {
                index: 2,
                got: 1024,
                want: 952
            })
        );
        // Over the gateway's limit: refused before anything is allocated.
        assert!(matches!(
            Assembly::new(&r, 2999),
            Err(ChunkError::TooLarge {
                size: 3000,
                max: 2999
            })
        ));
        // A count that does not match the sizes.
        let lie = BundleRef {
            chunks: 1_000_000,
            ..r.clone()
        };
        assert!(matches!(
            Assembly::new(&lie, 1 << 20),
            Err(ChunkError::Count { .. })
        ));
        // Tiny chunks (a huge chunk bitmap) and chunks over 1 MiB.
        let tiny = BundleRef {
            chunk_size: 1,
            chunks: 3000,
            ..r.clone()
        };
        assert_eq!(
            Assembly::new(&tiny, 1 << 20).unwrap_err(),
            ChunkError::ChunkSize(1)
        );
        assert_eq!(
            bundle_ref(&data, 1, MAX_CHUNK_BYTES + 1).unwrap_err(),
            ChunkError::ChunkSize(MAX_CHUNK_BYTES + 1)
        );
        let hash = BundleRef {
            sha256: "../#".into(),
            ..r.clone()
        };
        assert!(matches!(
            Assembly::new(&hash, 1 << 20),
            Err(ChunkError::BadHash(_))
        ));
    }

    #[test]
    fn hash_mismatch_is_an_error() {
        let data = bytes(3000);
        let r = bundle_ref(&data, 1, 1024).unwrap();
        let mut other = data.clone();
        other[5] ^= 1;
        assert!(matches!(
            assemble(&other, &r),
            Err(ChunkError::HashMismatch { .. })
        ));
    }

    #[test]
    fn chunks_that_do_not_fit_change_nothing_and_a_mismatch_starts_over() {
        let data = bytes(3000);
        let r = bundle_ref(&data, 1, 1024).unwrap();
        let mut a = Assembly::new(&r, 1 << 20).unwrap();
        // Leftovers of a deploy with smaller chunks, a planted chunk.
        assert!(a.accept(5, &data[..1024]).is_err());
        assert!(a.accept(1, &data[..10]).is_err());
        assert_eq!(a.missing(), 3);
        // A right-size chunk with the wrong content: the whole is refused
        // and the assembly takes every chunk again.
        let mut bad = data[..1024].to_vec();
        bad[0] ^= 1;
        let chunks: Vec<_> = split(&data, &r).collect();
        a.accept(0, &bad).unwrap();
        a.accept(1, chunks[1].1).unwrap();
        assert!(a.accept(2, chunks[2].1).unwrap());
        assert!(matches!(a.finish(), Err(ChunkError::HashMismatch { .. })));
        assert_eq!(a.missing(), 3);
        for (i, c) in &chunks {
            a.accept(*i, c).unwrap();
        }
        assert_eq!(a.finish().unwrap(), data);
    }
}
