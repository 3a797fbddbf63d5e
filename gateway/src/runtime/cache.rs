//! The compile cache and precompiled components.
//!
//! Compiling a component takes tens of milliseconds on x86 and seconds on a
//! small ARM board; loading compiled code takes a fraction of a millisecond.
//! Compiled components are kept in `<data_dir>/cache/` under
//! `<sha256 of the .wasm>-<engine compatibility hash>.cwasm`, so a restart, a
//! hot reload of an unchanged file, or another gateway build with the same
//! engine settings finds them; anything else is a miss and recompiles.
//!
//! Loading compiled code is trusting it like the gateway binary itself:
//! wasmtime cannot verify machine code. The cache directory is written only
//! by the gateway, and precompiled `.cwasm` files named in the configuration
//! must come from `edgefn compile` (treat them as executables).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Lowercase hex SHA-256 of `bytes`: the identity of a component version.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A stable (per gateway build) hash of everything in the engine's
/// configuration that compiled code depends on.
#[cfg(feature = "compiler")]
pub fn engine_hash(engine: &Engine) -> String {
    // SipHash with fixed keys: the same value for the same build and
    // settings, which is all a cache key needs.
    use std::hash::{Hash, Hasher};
    #[allow(
        deprecated,
        reason = "SipHasher's fixed keys make the hash stable across runs"
    )]
    let mut h = std::hash::SipHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The cache directory and the running engine's hash.
#[derive(Debug)]
pub struct CompileCache {
    dir: PathBuf,
    engine: String,
}

impl CompileCache {
    /// Opens (creates) `dir`; `None`, with a warning, if it cannot be used —
    /// the gateway then compiles every start.
    #[cfg(feature = "compiler")]
    pub fn open(dir: &Path, engine: &Engine) -> Option<Self> {
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "Compile cache unavailable; components will be compiled at every start.");
            return None;
        }
        Some(Self {
            dir: dir.to_owned(),
            engine: engine_hash(engine),
        })
    }

    /// The runtime-only build compiles nothing, so it caches nothing.
    #[cfg(not(feature = "compiler"))]
    pub fn open(_: &Path, _: &Engine) -> Option<Self> {
        None
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}-{}.cwasm", self.engine))
    }

    /// The cached compilation of the component with content `hash`.
    pub fn get(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let path = self.path(hash);
        if !path.exists() {
            return None;
        }
        #[allow(unsafe_code, reason = "loading compiled code is inherently unchecked")]
        // SAFETY: the file is in the gateway's own cache directory, written by
        // `put` below from code this engine compiled (the name carries the
        // engine's compatibility hash); wasmtime still checks its header and
        // engine settings, and the file is only mapped, never modified.
        let loaded = unsafe { Component::deserialize_file(engine, &path) };
        match loaded {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "Unusable compile cache entry; recompiling.");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `component` (best effort: a failure is logged, not fatal).
    pub fn put(&self, hash: &str, component: &Component) {
        let path = self.path(hash);
        let result = component
            .serialize()
            .map_err(|e| format!("{e:#}"))
            .and_then(|bytes| write_atomically(&path, &bytes).map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::warn!(file = %path.display(), error = %e, "Could not write the compile cache.");
        }
    }
}

/// Why the runtime-only build cannot compile, for the commands that need to.
pub const NO_COMPILER: &str = "this gateway is the runtime-only build (no compiler): compile and precompile with a full `edgefn` build";

/// Compiles the component `bytes` into a `.cwasm` for `engine`'s target.
#[cfg(feature = "compiler")]
pub fn precompile(engine: &Engine, bytes: &[u8]) -> Result<Vec<u8>, String> {
    engine
        .precompile_component(bytes)
        .map_err(|e| format!("{e:#}"))
}

/// The runtime-only build has no compiler.
#[cfg(not(feature = "compiler"))]
pub fn precompile(_: &Engine, _: &[u8]) -> Result<Vec<u8>, String> {
    Err(NO_COMPILER.to_owned())
}

/// Writes `bytes` to a temporary file beside `path`, then renames it: a
/// reader (or a crash) never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// The architecture a wasmtime `.cwasm` was compiled for, from its ELF
/// header.
pub fn precompiled_arch(bytes: &[u8]) -> Option<&'static str> {
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        return None;
    }
    let machine = match bytes[5] {
        1 => u16::from_le_bytes([bytes[18], bytes[19]]),
        _ => u16::from_be_bytes([bytes[18], bytes[19]]),
    };
    Some(match machine {
        62 => "x86_64",
        183 => "aarch64",
        // wasmtime writes Pulley bytecode objects with the RISC-V machine.
        243 => "pulley or riscv64",
        22 => "s390x",
        _ => "an unknown architecture",
    })
}

/// The architecture this engine runs compiled code for.
pub fn engine_arch(engine: &Engine) -> &'static str {
    if engine.is_pulley() {
        "pulley"
    } else {
        std::env::consts::ARCH
    }
}

/// Loads a `.cwasm` produced by `edgefn compile`, after checking that it was
/// built for this machine (wasmtime's own error for a wrong target is vague).
pub fn load_precompiled(engine: &Engine, bytes: &[u8]) -> Result<Component, String> {
    let want = engine_arch(engine);
    if let Some(have) = precompiled_arch(bytes)
        && !have.contains(want)
    {
        return Err(format!(
            "it was compiled for {have}, but this gateway runs {want} code; run `edgefn compile` for this board's target (see the README)"
        ));
    }
    #[allow(unsafe_code, reason = "loading compiled code is inherently unchecked")]
    // SAFETY: precompiled files are configured by the operator as function
    // components and are trusted like the gateway binary (documented in the
    // README); wasmtime checks the header, version and engine settings.
    let loaded = unsafe { Component::deserialize(engine, bytes) };
    loaded.map_err(|e| {
        format!("{e:#} (recompile it with `edgefn compile` using this gateway's version and [runtime] settings)")
    })
}
