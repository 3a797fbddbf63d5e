//! STUB of the signed desired document (the bundle branch replaces this file).

use serde::{Deserialize, Serialize};

use super::keys::{PublicKey, SigningKey, TrustedKeys};

/// What a gateway should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// The gateway this document is for.
    pub gateway: String,
    /// The bundle to run; `None` = the configuration's functions only.
    pub bundle: Option<BundleRef>,
    /// Apply even if not newer.
    pub force: bool,
    /// When it was issued (ms since the epoch).
    pub issued_ms: u64,
}

/// A bundle as announced in a desired document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    /// sha256 (lowercase hex) of the bundle file.
    pub sha256: String,
    /// The bundle's version.
    pub version: u64,
    /// Size of the bundle file in bytes.
    pub size: u64,
    /// Bytes per chunk (the last one may be shorter).
    pub chunk_size: u32,
    /// Number of chunks.
    pub chunks: u32,
}

/// Why a desired document was refused.
#[derive(Debug, thiserror::Error)]
pub enum DesiredError {
    /// Not a document.
    #[error("malformed desired document: {0}")]
    Malformed(String),
    /// Signed by no trusted key.
    #[error("not signed by a trusted key")]
    Untrusted,
}

#[derive(Serialize, Deserialize)]
struct Signed {
    doc: Desired,
    key: [u8; 32],
}

impl Desired {
    /// Signs the document (stub: CBOR with the signer's key, no signature).
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let mut out = Vec::new();
        let signed = Signed {
            doc: self.clone(),
            key: key.public().0,
        };
        let _ = ciborium::into_writer(&signed, &mut out);
        out
    }

    /// Opens a signed document.
    pub fn open(bytes: &[u8], trusted: &TrustedKeys) -> Result<(Desired, PublicKey), DesiredError> {
        let signed: Signed =
            ciborium::from_reader(bytes).map_err(|e| DesiredError::Malformed(e.to_string()))?;
        let key = PublicKey(signed.key);
        if !trusted.0.contains(&key) {
            return Err(DesiredError::Untrusted);
        }
        Ok((signed.doc, key))
    }
}
