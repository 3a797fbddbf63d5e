//! Ed25519 keys: the key files `edgefn keygen` writes, key ids, and the
//! list of keys a gateway trusts (`[fleet] trusted_keys`).
//!
//! Files: `edgefn.key` holds `ed25519-secret:<base64 of the 32-byte seed>`
//! (mode 0600), `edgefn.pub` holds `ed25519:<base64 of the public key>`. A
//! key id is the first 8 bytes of the public key's sha256, in hex: short
//! enough for messages, long enough to tell keys apart.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::Signer as _;
use sha2::{Digest, Sha256};

/// Prefix of a secret key file's content.
pub const SECRET_PREFIX: &str = "ed25519-secret:";
/// Prefix of a public key (file or inline in `trusted_keys`).
pub const PUBLIC_PREFIX: &str = "ed25519:";
/// The secret key's file name in `keygen --out DIR`.
pub const SECRET_FILE: &str = "edgefn.key";
/// The public key's file name in `keygen --out DIR`.
pub const PUBLIC_FILE: &str = "edgefn.pub";
/// The largest key file read (a key file is under 100 bytes).
const MAX_KEY_FILE: u64 = 4096;

/// A key file that cannot be read, written or parsed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading a key file failed.
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a key file failed.
    #[error("cannot write `{}`: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `keygen` found a key file already there.
    #[error("`{}` already exists; refusing to overwrite a key (move it away or choose another --out)", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The text is not a key of the expected kind.
    #[error("{what}: {reason}")]
    Format {
        /// The file, or `key` for inline text.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// The operating system gave no random bytes.
    #[error("cannot get random bytes from the operating system: {0}")]
    Random(String),
}

/// Why a signature was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Signed by a key that is not in the trusted list.
    #[error("signed by unknown key {id} (not in `[fleet] trusted_keys`)")]
    UnknownKey {
        /// The signer's key id.
        id: String,
    },
    /// The signature does not match the signed bytes.
    #[error(
        "bad signature: the signed content was changed after signing, or signed by another key"
    )]
    BadSignature,
    /// The key or signature field has the wrong length.
    #[error("malformed key or signature (a key is 32 bytes, a signature 64)")]
    Malformed,
}

/// A secret signing key (`edgefn.key`).
pub struct SigningKey(ed25519_dalek::SigningKey);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret itself.
        write!(f, "SigningKey({})", self.public().id())
    }
}

impl SigningKey {
    /// Reads a secret key file (`ed25519-secret:<base64>`).
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let text = read_small(path)?;
        let seed =
            decode(text.trim(), SECRET_PREFIX, "an ed25519 secret key").map_err(|reason| {
                KeyError::Format {
                    what: path.display().to_string(),
                    reason,
                }
            })?;
        Ok(Self(ed25519_dalek::SigningKey::from_bytes(&seed)))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

/// A public key (`ed25519:<base64>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl PublicKey {
    /// Parses `ed25519:<base64 of 32 bytes>`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let format = |reason| KeyError::Format {
            what: "inline key".to_owned(),
            reason,
        };
        let bytes = decode(text.trim(), PUBLIC_PREFIX, "an ed25519 public key").map_err(format)?;
        Self::from_bytes(&bytes).ok_or_else(|| format("not a valid ed25519 public key".to_owned()))
    }

    /// Reads a public key file.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let text = read_small(path)?;
        Self::parse(&text).map_err(|e| match e {
            KeyError::Format { reason, .. } => KeyError::Format {
                what: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// The key from its 32 bytes; `None` if they are not a curve point.
    pub fn from_bytes(bytes: &[u8; 32]) -> Option<Self> {
        ed25519_dalek::VerifyingKey::from_bytes(bytes)
            .ok()
            .map(Self)
    }

    /// The key id: the first 8 bytes of sha256(key), in hex.
    pub fn id(&self) -> String {
        key_id(self.0.as_bytes())
    }

    /// The 32 key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", STANDARD.encode(self.0.as_bytes()))
    }
}

/// The id of any 32 key bytes (also of keys that are not trusted).
pub fn key_id(key: &[u8]) -> String {
    hex(&Sha256::digest(key)[..8])
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys whose signatures a gateway accepts.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TrustedKeys(pub Vec<PublicKey>);

impl TrustedKeys {
    /// Checks that `sig` is a signature of `msg` by `key` and that `key` is
    /// trusted; returns the key.
    pub fn verify(&self, key: &[u8], msg: &[u8], sig: &[u8]) -> Result<PublicKey, SignatureError> {
        let key: &[u8; 32] = key.try_into().map_err(|_| SignatureError::Malformed)?;
        let sig: &[u8; 64] = sig.try_into().map_err(|_| SignatureError::Malformed)?;
        let Some(trusted) = self.0.iter().find(|k| k.0.as_bytes() == key) else {
            return Err(SignatureError::UnknownKey { id: key_id(key) });
        };
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        // Strict: no malleable signatures, no weak keys.
        trusted
            .0
            .verify_strict(msg, &sig)
            .map_err(|_| SignatureError::BadSignature)?;
        Ok(trusted.clone())
    }
}

/// Writes a new key pair into `dir` (created if missing): `edgefn.key`
/// (mode 0600) and `edgefn.pub`. Refuses to overwrite either file.
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
    let secret_path = dir.join(SECRET_FILE);
    let public_path = dir.join(PUBLIC_FILE);
    for path in [&secret_path, &public_path] {
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| KeyError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    let secret = format!("{SECRET_PREFIX}{}\n", STANDARD.encode(seed));
    create_new(&secret_path, secret.as_bytes(), 0o600)?;
    let public = format!("{}\n", PublicKey(key.verifying_key()));
    create_new(&public_path, public.as_bytes(), 0o644)?;
    Ok((secret_path, public_path))
}

/// Creates `path` (never replacing a file) with `mode`, writes and syncs.
fn create_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let write = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                write(source)
            }
        })?;
    file.write_all(bytes).map_err(write)?;
    file.sync_all().map_err(write)
}

fn read_small(path: &Path) -> Result<String, KeyError> {
    use std::io::Read;
    let read = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(MAX_KEY_FILE)
        .read_to_string(&mut text)
        .map_err(read)?;
    Ok(text)
}

/// `<prefix><base64 of 32 bytes>` → the bytes.
fn decode(text: &str, prefix: &str, what: &str) -> Result<[u8; 32], String> {
    let expected = format!("expected {what} written as `{prefix}<base64 of 32 bytes>`");
    if prefix == PUBLIC_PREFIX && text.starts_with(SECRET_PREFIX) {
        return Err("this is a secret key: list the public key (`edgefn.pub`) and keep the secret one off the gateways".to_owned());
    }
    let Some(b64) = text.strip_prefix(prefix) else {
        return Err(format!("{expected}; it does not start with `{prefix}`"));
    };
    let bytes = STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("{expected}; bad base64: {e}"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{expected}; it holds {} bytes", bytes.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_0600_secret_and_a_public_key_and_refuses_to_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = keygen(dir.path()).unwrap();
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let key = SigningKey::read(&secret).unwrap();
        let pubkey = PublicKey::read(&public).unwrap();
        assert_eq!(key.public(), pubkey);
        assert_eq!(pubkey.id().len(), 16);
        let text = std::fs::read_to_string(&public).unwrap();
        assert!(text.starts_with("ed25519:") && text.ends_with('\n'));
        assert_eq!(PublicKey::parse(&text).unwrap(), pubkey);
        let again = keygen(dir.path()).unwrap_err();
        assert!(matches!(again, KeyError::Exists { .. }), "{again}");
        assert!(again.to_string().contains("already exists"), "{again}");
        // The first key is untouched.
        assert_eq!(SigningKey::read(&secret).unwrap().public(), pubkey);
    }

    #[test]
    fn verify_accepts_trusted_signatures_only() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = keygen(&dir.path().join("a")).unwrap();
        let (b, _) = keygen(&dir.path().join("b")).unwrap();
        let (a, b) = (SigningKey::read(&a).unwrap(), SigningKey::read(&b).unwrap());
        let trusted = TrustedKeys(vec![a.public()]);
        let sig = a.sign(b"msg");
        let key = a.public().to_bytes();
        assert_eq!(trusted.verify(&key, b"msg", &sig), Ok(a.public()));
        assert_eq!(
            trusted.verify(&key, b"msh", &sig),
            Err(SignatureError::BadSignature)
        );
        let unknown = trusted.verify(&b.public().to_bytes(), b"msg", &b.sign(b"msg"));
        assert_eq!(
            unknown,
            Err(SignatureError::UnknownKey {
                id: b.public().id()
            })
        );
        assert_eq!(
            trusted.verify(&key[..31], b"msg", &sig),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            trusted.verify(&key, b"msg", &sig[..63]),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn bad_key_text_is_refused_with_the_reason() {
        for (text, reason) in [
            ("ed25519-secret:AAAA", "this is a secret key"),
            ("rsa:AAAA", "does not start with `ed25519:`"),
            ("ed25519:!!", "bad base64"),
            ("ed25519:AAAA", "it holds 3 bytes"),
        ] {
            let e = PublicKey::parse(text).unwrap_err().to_string();
            assert!(e.contains(reason), "{text}: {e}");
        }
    }
}
