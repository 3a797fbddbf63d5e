//! STUB of the bundle format (the bundle branch replaces this file).

use sha2::{Digest, Sha256};

use super::keys::PublicKey;

/// A bundle's manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The bundle's version.
    pub version: u64,
    /// When it was built (ms since the epoch).
    pub created_ms: u64,
}

/// Limits applied when reading a bundle.
#[derive(Debug, Clone)]
pub struct BundleLimits {
    /// Largest bundle file accepted.
    pub max_bytes: u64,
}

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not a bundle.
    #[error("not a bundle: {0}")]
    Malformed(String),
}

/// A bundle file.
pub struct Bundle;

impl Bundle {
    /// Parses and checks hashes, no trust decision: for tools. Stub format:
    /// `STUB <version>\n` followed by anything.
    pub fn inspect(
        bytes: &[u8],
        limits: &BundleLimits,
    ) -> Result<(Manifest, String, PublicKey), BundleError> {
        if bytes.len() as u64 > limits.max_bytes {
            return Err(BundleError::Malformed("too large".into()));
        }
        let line = bytes
            .split(|b| *b == b'\n')
            .next()
            .and_then(|l| std::str::from_utf8(l).ok())
            .and_then(|l| l.strip_prefix("STUB "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| BundleError::Malformed("no `STUB <version>` line".into()))?;
        let sha: String = Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok((
            Manifest {
                version: line,
                created_ms: 0,
            },
            sha,
            PublicKey([0; 32]),
        ))
    }
}
