//! What a gateway deployed, on disk under `data_dir/fleet/`:
//! `bundles/<sha256>.bundle`, the components they hold as
//! `components/<sha256>.wasm|.cwasm`, and `current.json` (the bundle that
//! runs).
//!
//! Every write goes to `<file>.tmp`, is fsynced, renamed over the file and
//! the directory fsynced: a power cut leaves the old file or the new one.
//! A `.tmp` left by a power cut is never read, and [`Store::prune`] removes
//! it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::bundle::{Bundle, BundleLimits, is_sha256_hex};

/// The bundle that runs (or none: only the config's functions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    /// sha256 hex of the running bundle; `None` = no bundle.
    pub sha256: Option<String>,
    /// Its manifest's version (0 for none).
    pub version: u64,
    /// When it was applied (ms since the Unix epoch).
    pub applied_ms: u64,
    /// `issued_ms` of the desired document that asked for it.
    pub issued_ms: u64,
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory operation failed.
    #[error("`{}`: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `current.json` (or a stored bundle) cannot be read back.
    #[error("`{}` is corrupt: {reason}; remove it to start from the configuration's functions", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A bundle name that is not a sha256.
    #[error("`{}` is not a sha256 in hex", .0.escape_debug())]
    BadName(String),
}

/// The fleet directory of one gateway.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

const CURRENT: &str = "current.json";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Store {
    /// Opens (creating the directories) `data_dir/fleet/`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let store = Store {
            dir: data_dir.join("fleet"),
        };
        for dir in [store.bundles_dir(), store.components_dir()] {
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        }
        Ok(store)
    }

    fn bundles_dir(&self) -> PathBuf {
        self.dir.join("bundles")
    }

    fn bundle_path(&self, sha256: &str) -> Result<PathBuf, StoreError> {
        if !is_sha256_hex(sha256) {
            return Err(StoreError::BadName(sha256.to_owned()));
        }
        Ok(self.bundles_dir().join(format!("{sha256}.bundle")))
    }

    /// Stores a bundle as `bundles/<sha256>.bundle`, atomically.
    pub fn save_bundle(&self, sha256: &str, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let path = self.bundle_path(sha256)?;
        write_atomically(&path, bytes)?;
        Ok(path)
    }

    /// A stored bundle's bytes, if stored.
    pub fn read_bundle(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.bundle_path(sha256)?;
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Where components are written (`components/`).
    pub fn components_dir(&self) -> PathBuf {
        self.dir.join("components")
    }

    /// Writes the bundle's components for `target` as
    /// `components/<sha256>.wasm|.cwasm`, atomically; files already there
    /// (content-addressed, so identical) are kept.
    pub fn write_components(
        &self,
        bundle: &Bundle,
        target: Option<&str>,
    ) -> Result<(), StoreError> {
        let dir = self.components_dir();
        for (name, bytes) in bundle.component_files(target) {
            let path = dir.join(name);
            if !path.exists() {
                write_atomically(&path, bytes)?;
            }
        }
        Ok(())
    }

    /// The running bundle from `current.json`; `None` if there is none. A
    /// corrupt file is an error naming it.
    pub fn current(&self) -> Result<Option<Current>, StoreError> {
        let path = self.dir.join(CURRENT);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let current: Current = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if let Some(sha) = &current.sha256
            && !is_sha256_hex(sha)
        {
            return Err(StoreError::Corrupt {
                path,
                reason: format!("`{}` is not a sha256 in hex", sha.escape_debug()),
            });
        }
        Ok(Some(current))
    }

    /// Replaces `current.json` atomically (tmp, fsync, rename, fsync dir).
    pub fn set_current(&self, c: &Current) -> Result<(), StoreError> {
        let path = self.dir.join(CURRENT);
        let mut json = serde_json::to_vec_pretty(c).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        json.push(b'\n');
        write_atomically(&path, &json)
    }

    /// Deletes every bundle but `keep` (sha256s), every component none of
    /// them holds, and leftover `.tmp` files.
    pub fn prune(&self, keep: &[&str]) -> Result<(), StoreError> {
        let mut blobs = std::collections::BTreeSet::new();
        for sha in keep {
            let path = self.bundle_path(sha)?;
            let Some(bytes) = self.read_bundle(sha)? else {
                continue;
            };
            // Our own file, verified when it came in: only its names matter.
            let limits = BundleLimits {
                max_bytes: u64::MAX,
            };
            let (manifest, ..) =
                Bundle::inspect(&bytes, &limits).map_err(|e| StoreError::Corrupt {
                    path,
                    reason: e.to_string(),
                })?;
            for c in manifest.components {
                blobs.extend(c.precompiled.into_values());
                blobs.insert(c.wasm);
            }
        }
        let keep_file = |dir: &str, name: &str| match name.split_once('.') {
            Some((stem, "bundle")) if dir == "bundles" => keep.contains(&stem),
            Some((stem, "wasm" | "cwasm")) if dir == "components" => blobs.contains(stem),
            _ => false,
        };
        for dir in ["bundles", "components"] {
            let path = self.dir.join(dir);
            for entry in std::fs::read_dir(&path).map_err(io(&path))? {
                let entry = entry.map_err(io(&path))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !keep_file(dir, &name) {
                    let file = entry.path();
                    std::fs::remove_file(&file).map_err(io(&file))?;
                }
            }
            sync_dir(&path)?;
        }
        Ok(())
    }
}

/// Writes `path` so that a crash leaves the old content or the new one:
/// `<path>.tmp`, fsync, rename, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests;
