//! Signed function bundles: a set of `[[functions]]` with their components,
//! content-addressed (sha256) and signed with an ed25519 key.
//!
//! A bundle is one CBOR map: `{"edgefn-bundle": 1, "manifest": bytes,
//! "key": bytes(32), "signature": bytes(64), "blobs": {"<sha256 hex>":
//! bytes}}`. The signature covers the manifest bytes, and the manifest
//! names every blob's sha256, so it covers the blobs too. A bundle's
//! identity is the sha256 of the whole file. Everything here reads
//! untrusted bytes: sizes are checked before parsing, nesting is bounded,
//! nothing is allocated from a length prefix, and no input panics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};

use super::keys::{PublicKey, SignatureError, TrustedKeys, hex};
use crate::config::schema::FunctionConfig;
use crate::event::now_ms;

/// The bundle format this build writes and reads.
pub const FORMAT: u64 = 1;
/// Deepest CBOR nesting accepted (the formats need 3 levels).
const MAX_DEPTH: usize = 16;
/// Prefix of a `component` in the manifest's functions text.
const COMPONENT_PREFIX: &str = "sha256:";

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Larger than `[fleet] max_bundle_bytes` (checked before parsing).
    #[error(
        "the bundle is {size} bytes, more than the {max} accepted (`[fleet] max_bundle_bytes`)"
    )]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// Not a bundle, truncated, or inconsistent.
    #[error("not a valid edgefn bundle: {0}")]
    Malformed(String),
    /// A format this gateway cannot read.
    #[error(
        "bundle format {0} is not supported (this edgefn reads format {FORMAT}); rebuild it with this gateway's `edgefn bundle` or upgrade the gateway"
    )]
    UnsupportedFormat(u64),
    /// No key or signature.
    #[error("the bundle is not signed; build it with `edgefn bundle --key`")]
    Unsigned,
    /// Signed by a key the gateway does not trust.
    #[error("signed by unknown key {id} (not in `[fleet] trusted_keys`)")]
    UnknownKey {
        /// The signer's key id.
        id: String,
    },
    /// The signature does not match the manifest.
    #[error("bad signature: the manifest was changed after signing")]
    BadSignature,
    /// A component whose bytes do not match its sha256.
    #[error("component {blob} does not match its sha256 (tampered with or corrupted)")]
    Tampered {
        /// The sha256 it is stored under.
        blob: String,
    },
    /// A component the manifest names is not in the bundle.
    #[error("component {blob} named in the manifest is missing from the bundle")]
    Missing {
        /// Its sha256.
        blob: String,
    },
    /// The functions text is wrong (names the key path).
    #[error("{0}")]
    Functions(String),
    /// Building failed: a component cannot be read or precompiled.
    #[error("{0}")]
    Build(String),
}

impl From<SignatureError> for BundleError {
    fn from(e: SignatureError) -> Self {
        match e {
            SignatureError::UnknownKey { id } => Self::UnknownKey { id },
            SignatureError::BadSignature => Self::BadSignature,
            SignatureError::Malformed => Self::Malformed(e.to_string()),
        }
    }
}

/// What a gateway accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleLimits {
    /// The largest bundle, in bytes; checked before parsing.
    pub max_bytes: u64,
}

/// The signed part of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Orders bundles: a gateway refuses one older than it runs unless
    /// forced. Default: the creation time in ms.
    pub version: u64,
    /// When it was built (ms since the Unix epoch).
    pub created_ms: u64,
    /// The `[[functions]]` TOML, each `component` as `sha256:<hex>`.
    pub functions: String,
    /// One entry per function.
    pub components: Vec<ComponentEntry>,
}

/// A function's component and its precompiled variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentEntry {
    /// The function's name.
    pub function: String,
    /// sha256 hex of the `.wasm` (or of the `.cwasm` if only that was given).
    pub wasm: String,
    /// Target name (as `edgefn compile --target` names it) → sha256 hex of
    /// the `.cwasm` for it.
    pub precompiled: BTreeMap<String, String>,
}

/// The file as stored (fields optional so that a missing one gets a
/// precise error, and unknown ones are ignored by older readers).
#[derive(Serialize, Deserialize)]
struct BundleFile {
    #[serde(rename = "edgefn-bundle")]
    format: Option<u64>,
    manifest: Option<ByteBuf>,
    key: Option<ByteBuf>,
    signature: Option<ByteBuf>,
    #[serde(default)]
    blobs: BTreeMap<String, ByteBuf>,
}

/// A verified bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The signed manifest.
    pub manifest: Manifest,
    /// sha256 hex of the whole file: the bundle's identity.
    pub sha256: String,
    /// The key that signed it.
    pub signer: PublicKey,
    blobs: BTreeMap<String, Vec<u8>>,
}

impl Bundle {
    /// Verifies format, size, signature by a trusted key, every blob's hash;
    /// every manifest component present; no extra blobs; functions TOML
    /// parses and each function has exactly one ComponentEntry.
    pub fn open(
        bytes: &[u8],
        trusted: &TrustedKeys,
        limits: &BundleLimits,
    ) -> Result<Bundle, BundleError> {
        parse(bytes, limits, |key, msg, sig| {
            Ok(trusted.verify(key, msg, sig)?)
        })
    }

    /// Parses and checks hashes, no trust decision (for tools such as
    /// `edgefn deploy`): manifest, sha256 hex of `bytes`, signer.
    pub fn inspect(
        bytes: &[u8],
        limits: &BundleLimits,
    ) -> Result<(Manifest, String, PublicKey), BundleError> {
        let b = parse(bytes, limits, |key, msg, sig| {
            let key32: [u8; 32] = key
                .try_into()
                .map_err(|_| BundleError::from(SignatureError::Malformed))?;
            let signer = PublicKey::from_bytes(&key32).ok_or_else(|| {
                BundleError::Malformed("the signing key is not an ed25519 key".to_owned())
            })?;
            Ok(TrustedKeys(vec![signer]).verify(key, msg, sig)?)
        })?;
        Ok((b.manifest, b.sha256, b.signer))
    }

    /// The component bytes for `function`: the precompiled one for `target`
    /// if present (bool = precompiled), else the wasm.
    pub fn component(&self, function: &str, target: Option<&str>) -> Option<(&[u8], bool)> {
        let entry = self.entry(function)?;
        let (sha, precompiled) = chosen(entry, target);
        Some((self.blobs.get(sha)?.as_slice(), precompiled))
    }

    /// The `[[functions]]` array as TOML values, each `component` replaced
    /// by `dir/<sha256>.wasm` (or `.cwasm` when the precompiled entry for
    /// `target` is used) — the files `store.rs` writes.
    pub fn functions(
        &self,
        dir: &Path,
        target: Option<&str>,
    ) -> Result<Vec<toml::Value>, BundleError> {
        let (table, _) = parse_functions(&self.manifest.functions, "manifest")?;
        let mut out = Vec::new();
        for (i, mut f) in function_tables(table).into_iter().enumerate() {
            let name = f.get("name").and_then(|v| v.as_str()).unwrap_or_default();
            let Some(entry) = self.entry(name) else {
                return Err(BundleError::Functions(format!(
                    "manifest: functions[{i}]: no component entry for `{name}`"
                )));
            };
            let (sha, precompiled) = chosen(entry, target);
            let bytes = self.blobs.get(sha).map_or(&[][..], Vec::as_slice);
            let file = dir.join(component_file(sha, bytes, precompiled));
            f.insert(
                "component".to_owned(),
                toml::Value::String(file.to_string_lossy().into_owned()),
            );
            out.push(toml::Value::Table(f));
        }
        Ok(out)
    }

    /// Every component file for `target` (one per function, deduplicated):
    /// its file name (`<sha256>.wasm` or `.cwasm`) and bytes.
    pub fn component_files(&self, target: Option<&str>) -> Vec<(String, &[u8])> {
        let mut files = BTreeMap::new();
        for entry in &self.manifest.components {
            let (sha, precompiled) = chosen(entry, target);
            if let Some(bytes) = self.blobs.get(sha) {
                files.insert(component_file(sha, bytes, precompiled), bytes.as_slice());
            }
        }
        files.into_iter().collect()
    }

    /// Bytes of the components as given (each distinct `.wasm` once), and
    /// of every blob including the precompiled ones.
    pub fn sizes(&self) -> (u64, u64) {
        let wasm: BTreeSet<&str> = self
            .manifest
            .components
            .iter()
            .map(|c| c.wasm.as_str())
            .collect();
        let len = |sha: &str| self.blobs.get(sha).map_or(0, |b| b.len() as u64);
        let raw = wasm.into_iter().map(len).sum();
        (raw, self.blobs.keys().map(|k| len(k)).sum())
    }

    fn entry(&self, function: &str) -> Option<&ComponentEntry> {
        self.manifest
            .components
            .iter()
            .find(|c| c.function == function)
    }
}

/// The blob used for `target`: its sha256 and whether it is precompiled.
fn chosen<'a>(entry: &'a ComponentEntry, target: Option<&str>) -> (&'a str, bool) {
    match target.and_then(|t| entry.precompiled.get(t)) {
        Some(sha) => (sha, true),
        None => (&entry.wasm, false),
    }
}

/// The file name of a component: `<sha256>.cwasm` if precompiled (an ELF
/// object), else `<sha256>.wasm`.
pub fn component_file(sha: &str, bytes: &[u8], precompiled: bool) -> String {
    let cwasm = precompiled || bytes.starts_with(b"\x7fELF");
    format!("{sha}.{}", if cwasm { "cwasm" } else { "wasm" })
}

fn parse(
    bytes: &[u8],
    limits: &BundleLimits,
    verify: impl FnOnce(&[u8], &[u8], &[u8]) -> Result<PublicKey, BundleError>,
) -> Result<Bundle, BundleError> {
    let size = bytes.len() as u64;
    if size > limits.max_bytes {
        return Err(BundleError::TooLarge {
            size,
            max: limits.max_bytes,
        });
    }
    let file: BundleFile = from_cbor(bytes).map_err(BundleError::Malformed)?;
    match file.format {
        Some(FORMAT) => {}
        Some(other) => return Err(BundleError::UnsupportedFormat(other)),
        None => {
            return Err(BundleError::Malformed(
                "no `edgefn-bundle` format field".to_owned(),
            ));
        }
    }
    let manifest_bytes = file
        .manifest
        .ok_or_else(|| BundleError::Malformed("no manifest".to_owned()))?;
    let (Some(key), Some(signature)) = (file.key, file.signature) else {
        return Err(BundleError::Unsigned);
    };
    if key.is_empty() || signature.is_empty() {
        return Err(BundleError::Unsigned);
    }
    let signer = verify(&key, &manifest_bytes, &signature)?;
    let manifest: Manifest =
        from_cbor(&manifest_bytes).map_err(|e| BundleError::Malformed(format!("manifest: {e}")))?;
    let blobs = check_blobs(&manifest, file.blobs)?;
    check_manifest_functions(&manifest)?;
    Ok(Bundle {
        manifest,
        sha256: sha256_hex(bytes),
        signer,
        blobs,
    })
}

/// Every blob matches its name, every named blob is there, no other blob.
fn check_blobs(
    manifest: &Manifest,
    blobs: BTreeMap<String, ByteBuf>,
) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    let mut named = BTreeSet::new();
    for entry in &manifest.components {
        for sha in std::iter::once(&entry.wasm).chain(entry.precompiled.values()) {
            if !is_sha256_hex(sha) {
                return Err(BundleError::Malformed(format!(
                    "function `{}`: `{}` is not a sha256 in hex",
                    entry.function.escape_debug(),
                    sha.escape_debug()
                )));
            }
            named.insert(sha.as_str());
        }
    }
    let mut out = BTreeMap::new();
    for (name, bytes) in blobs {
        if !named.contains(name.as_str()) {
            return Err(BundleError::Malformed(format!(
                "blob `{}` is not named in the manifest",
                name.escape_debug()
            )));
        }
        if sha256_hex(&bytes) != name {
            return Err(BundleError::Tampered { blob: name });
        }
        out.insert(name, bytes.into_vec());
    }
    if let Some(missing) = named.iter().find(|n| !out.contains_key(**n)) {
        return Err(BundleError::Missing {
            blob: (*missing).to_owned(),
        });
    }
    Ok(out)
}

/// The functions text parses, and functions and component entries match
/// one to one, each `component` naming its entry's wasm.
fn check_manifest_functions(manifest: &Manifest) -> Result<(), BundleError> {
    let (_, functions) = parse_functions(&manifest.functions, "manifest")?;
    let mut entries: BTreeMap<&str, &ComponentEntry> = BTreeMap::new();
    for c in &manifest.components {
        if entries.insert(&c.function, c).is_some() {
            return Err(BundleError::Functions(format!(
                "manifest: function `{}` has more than one component entry",
                c.function.escape_debug()
            )));
        }
    }
    for (i, f) in functions.iter().enumerate() {
        let Some(entry) = entries.remove(f.name.as_str()) else {
            return Err(BundleError::Functions(format!(
                "manifest: functions[{i}]: no component entry for `{}`",
                f.name.escape_debug()
            )));
        };
        let expected = format!("{COMPONENT_PREFIX}{}", entry.wasm);
        if f.component.as_os_str() != expected.as_str() {
            return Err(BundleError::Functions(format!(
                "manifest: functions[{i}].component: `{}` is not `{expected}`",
                f.component.display()
            )));
        }
    }
    if let Some(extra) = entries.keys().next() {
        return Err(BundleError::Functions(format!(
            "manifest: component entry for `{}`, which is not a function",
            extra.escape_debug()
        )));
    }
    Ok(())
}

/// The `[[functions]]` file: only that key, each entry with the config's
/// own schema (unknown keys refused), names unique. Errors read
/// `WHAT: functions[i].key: reason`.
pub fn parse_functions(
    text: &str,
    what: &str,
) -> Result<(toml::Table, Vec<FunctionConfig>), BundleError> {
    let fail = |key: &str, reason: String| {
        let sep = if key.is_empty() { "" } else { ": " };
        BundleError::Functions(format!("{what}: {key}{sep}{reason}"))
    };
    let table: toml::Table = toml::from_str(text)
        .map_err(|e| fail("", format!("invalid TOML: {}", e.to_string().trim_end())))?;
    if let Some(other) = table.keys().find(|k| *k != "functions") {
        return Err(fail(
            other,
            "only `[[functions]]` tables belong in a bundle".to_owned(),
        ));
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct FunctionsFile {
        #[serde(default)]
        functions: Vec<FunctionConfig>,
    }
    let file: FunctionsFile = serde_path_to_error::deserialize(toml::Value::Table(table.clone()))
        .map_err(|e| {
        let key = e.path().to_string();
        let reason = e.into_inner().to_string();
        // A nested path from a tagged table (see `schema::NESTED_PATH`).
        let marker = crate::config::schema::NESTED_PATH;
        match reason
            .split_once(marker)
            .and_then(|(_, r)| r.split_once(marker))
        {
            Some((nested, message)) => fail(&format!("{key}.{nested}"), message.to_owned()),
            None => fail(&key, reason.trim_end().to_owned()),
        }
    })?;
    if file.functions.is_empty() {
        return Err(fail(
            "functions",
            "a bundle needs at least one `[[functions]]`".to_owned(),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, f) in file.functions.iter().enumerate() {
        if !names.insert(f.name.as_str()) {
            return Err(fail(
                &format!("functions[{i}].name"),
                format!("`{}` is used twice", f.name.escape_debug()),
            ));
        }
    }
    Ok((table, file.functions))
}

/// The `[[functions]]` tables of a parsed functions file.
fn function_tables(mut table: toml::Table) -> Vec<toml::Table> {
    match table.remove("functions") {
        Some(toml::Value::Array(items)) => items
            .into_iter()
            .filter_map(|v| match v {
                toml::Value::Table(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// sha256 in lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// 64 lower-case hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// CBOR of a value of ours (cannot fail for these plain structs).
pub(crate) fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    #[allow(clippy::expect_used, reason = "plain structs into memory cannot fail")]
    ciborium::into_writer(value, &mut out).expect("CBOR encoding into memory");
    out
}

/// Reads one CBOR item that must fill `bytes`, nesting bounded.
pub(crate) fn from_cbor<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut reader = bytes;
    let value = ciborium::de::from_reader_with_recursion_limit(&mut reader, MAX_DEPTH).map_err(
        |e| match e {
            ciborium::de::Error::Io(_) => "truncated".to_owned(),
            ciborium::de::Error::Syntax(at) => format!("invalid CBOR at byte {at}"),
            ciborium::de::Error::Semantic(_, m) => m,
            ciborium::de::Error::RecursionLimitExceeded => "nested too deeply".to_owned(),
        },
    )?;
    if !reader.is_empty() {
        return Err(format!("{} unexpected bytes after the end", reader.len()));
    }
    Ok(value)
}

mod build;
#[cfg(test)]
mod tests;

pub use build::{build, host_target, wasm_target};
