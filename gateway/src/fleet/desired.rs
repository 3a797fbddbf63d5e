//! The desired state of one gateway, signed: which bundle it should run
//! (or none), published retained on `edgefn/fleet/<gateway>/desired`.
//!
//! Wire format: the CBOR map `{"doc": bytes, "key": bytes(32),
//! "signature": bytes(64)}`, where `doc` is the CBOR of [`Desired`] and the
//! signature covers `doc`. Read from the network: the size is bounded before
//! parsing and nothing in it can panic the gateway.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::bundle::{from_cbor, is_sha256_hex, to_cbor};
use super::keys::{PublicKey, SignatureError, SigningKey, TrustedKeys};

/// The largest signed document read (a real one is under 300 bytes).
pub const MAX_DESIRED_BYTES: usize = 16 * 1024;

/// What a gateway should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    /// The gateway it is for (`gateway.id`).
    pub gateway: String,
    /// The bundle to run; `None`: only the config's own functions.
    pub bundle: Option<BundleRef>,
    /// Apply even if older than the running bundle (a rollback).
    pub force: bool,
    /// When it was issued (ms since the Unix epoch).
    pub issued_ms: u64,
}

/// Which bundle, and how its chunks travel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    /// sha256 hex of the bundle file.
    pub sha256: String,
    /// Its manifest's version.
    pub version: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Bytes per chunk (the last one may be shorter).
    pub chunk_size: u32,
    /// Number of chunks: `ceil(size / chunk_size)`.
    pub chunks: u32,
}

/// Why a desired document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DesiredError {
    /// Larger than [`MAX_DESIRED_BYTES`].
    #[error("the desired document is {size} bytes, more than the {MAX_DESIRED_BYTES} accepted")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Not a signed desired document, or inconsistent.
    #[error("not a valid desired document: {0}")]
    Malformed(String),
    /// Signed by a key the gateway does not trust.
    #[error("desired document signed by unknown key {id} (not in `[fleet] trusted_keys`)")]
    UnknownKey {
        /// The signer's key id.
        id: String,
    },
    /// The signature does not match the document.
    #[error("desired document has a bad signature: it was changed after signing")]
    BadSignature,
}

#[derive(Serialize, Deserialize)]
struct Signed {
    doc: ByteBuf,
    key: ByteBuf,
    signature: ByteBuf,
}

impl Desired {
    /// The signed wire form.
    pub fn sign(&self, key: &SigningKey) -> Vec<u8> {
        let doc = to_cbor(self);
        let signature = key.sign(&doc);
        to_cbor(&Signed {
            doc: ByteBuf::from(doc),
            key: ByteBuf::from(key.public().to_bytes().to_vec()),
            signature: ByteBuf::from(signature.to_vec()),
        })
    }

    /// Verifies the signature by a trusted key and decodes the document.
    pub fn open(bytes: &[u8], trusted: &TrustedKeys) -> Result<(Desired, PublicKey), DesiredError> {
        if bytes.len() > MAX_DESIRED_BYTES {
            return Err(DesiredError::TooLarge { size: bytes.len() });
        }
        let signed: Signed = from_cbor(bytes).map_err(DesiredError::Malformed)?;
        let signer = trusted
            .verify(&signed.key, &signed.doc, &signed.signature)
            .map_err(|e| match e {
                SignatureError::UnknownKey { id } => DesiredError::UnknownKey { id },
                SignatureError::BadSignature => DesiredError::BadSignature,
                SignatureError::Malformed => DesiredError::Malformed(e.to_string()),
            })?;
        let desired: Desired = from_cbor(&signed.doc).map_err(DesiredError::Malformed)?;
        if let Some(b) = &desired.bundle {
            b.check().map_err(DesiredError::Malformed)?;
        }
        Ok((desired, signer))
    }
}

impl BundleRef {
    /// A reference for a bundle of `size` bytes sent in `chunk_size` chunks.
    pub fn new(sha256: String, version: u64, size: u64, chunk_size: u32) -> Self {
        let chunks = size.div_ceil(u64::from(chunk_size.max(1)));
        Self {
            sha256,
            version,
            size,
            chunk_size,
            chunks: u32::try_from(chunks).unwrap_or(u32::MAX),
        }
    }

    /// The fields agree: a sha256, chunks that cover the size.
    fn check(&self) -> Result<(), String> {
        if !is_sha256_hex(&self.sha256) {
            return Err(format!(
                "bundle.sha256 `{}` is not a sha256 in hex",
                self.sha256.escape_debug()
            ));
        }
        let expected = match self.chunk_size {
            0 => None,
            n => Some(self.size.div_ceil(u64::from(n))),
        };
        if self.size == 0 || expected != Some(u64::from(self.chunks)) {
            return Err(format!(
                "bundle: {} chunks of {} bytes do not make {} bytes",
                self.chunks, self.chunk_size, self.size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::keys::keygen;

    fn key(dir: &std::path::Path) -> SigningKey {
        SigningKey::read(&keygen(dir).unwrap().0).unwrap()
    }

    fn doc() -> Desired {
        Desired {
            gateway: "gw1".to_owned(),
            bundle: Some(BundleRef::new("ab".repeat(32), 7, 300_000, 100_000)),
            force: false,
            issued_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_signed_document_opens_and_a_changed_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        let trusted = TrustedKeys(vec![k.public()]);
        let bytes = doc().sign(&k);
        assert_eq!(Desired::open(&bytes, &trusted), Ok((doc(), k.public())));
        assert_eq!(doc().bundle.unwrap().chunks, 3);
        let none = Desired {
            bundle: None,
            ..doc()
        };
        assert_eq!(Desired::open(&none.sign(&k), &trusted).unwrap().0, none);

        // Flip one bit inside the signed document ("gw1" → "gw0").
        let mut tampered = bytes.clone();
        let at = tampered.windows(3).position(|w| w == b"gw1").unwrap();
        tampered[at + 2] = b'0';
        assert_eq!(
            Desired::open(&tampered, &trusted),
            Err(DesiredError::BadSignature)
        );
        let other = key(&dir.path().join("other"));
        assert_eq!(
            Desired::open(&doc().sign(&other), &trusted),
            Err(DesiredError::UnknownKey {
                id: other.public().id()
            })
        );
    }

    #[test]
    fn garbage_truncated_and_huge_documents_are_refused_without_panic() {
        let dir = tempfile::tempdir().unwrap();
        let k = key(dir.path());
        let trusted = TrustedKeys(vec![k.public()]);
        let bytes = doc().sign(&k);
        for n in 0..bytes.len() {
            assert!(Desired::open(&bytes[..n], &trusted).is_err());
        }
        let huge = vec![0u8; MAX_DESIRED_BYTES + 1];
        assert!(matches!(
            Desired::open(&huge, &trusted),
            Err(DesiredError::TooLarge { .. })
        ));
        // A byte string claiming 2^63 bytes.
        let claim = [
            0xa1, 0x63, b'd', b'o', b'c', 0x5b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        assert!(matches!(
            Desired::open(&claim, &trusted),
            Err(DesiredError::Malformed(_))
        ));
        let mut bad = doc();
        bad.bundle = Some(BundleRef {
            chunks: 2,
            ..BundleRef::new("ab".repeat(32), 7, 300_000, 100_000)
        });
        let e = Desired::open(&bad.sign(&k), &trusted).unwrap_err();
        assert!(e.to_string().contains("do not make"), "{e}");
    }
}
