//! STUB of the signing keys (the bundle branch replaces this file).

use std::path::Path;

use sha2::{Digest, Sha256};

/// A private signing key.
pub struct SigningKey([u8; 32]);

impl SigningKey {
    /// Reads a key file (stub: any non-empty file; its hash is the key).
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        if bytes.is_empty() {
            return Err(KeyError::Invalid("empty key file".into()));
        }
        Ok(Self(Sha256::digest(&bytes).into()))
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(Sha256::digest(self.0).into())
    }

    /// Signs `msg` (stub: a hash, not a signature).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        let h: [u8; 32] = Sha256::new()
            .chain_update(self.public().0)
            .chain_update(msg)
            .finalize()
            .into();
        out[..32].copy_from_slice(&h);
        out
    }
}

/// A public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey(pub(crate) [u8; 32]);

impl PublicKey {
    /// A short printable id.
    pub fn id(&self) -> String {
        self.0[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The keys a gateway trusts.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TrustedKeys(pub Vec<PublicKey>);

/// Why a key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a key.
    #[error("not a key: {0}")]
    Invalid(String),
}
