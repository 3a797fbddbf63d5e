//! Building a bundle (`edgefn bundle`): the functions file read with the
//! config's own schema, each component hashed, embedded and optionally
//! precompiled per target, the manifest signed.

use std::collections::BTreeMap;
use std::path::Path;

use serde_bytes::ByteBuf;

use super::{
    BundleError, BundleFile, COMPONENT_PREFIX, ComponentEntry, FORMAT, Manifest, function_tables,
    now_ms, parse_functions, sha256_hex, to_cbor,
};
use crate::fleet::keys::SigningKey;

/// Builds and signs a bundle from a `[[functions]]` file: each `component`
/// (relative to the file) hashed and embedded, and precompiled for each of
/// `targets`. `version` defaults to the creation time in ms.
pub fn build(
    functions_toml: &Path,
    key: &SigningKey,
    version: Option<u64>,
    targets: &[String],
) -> Result<Vec<u8>, BundleError> {
    let file = functions_toml.display().to_string();
    let text = std::fs::read_to_string(functions_toml)
        .map_err(|e| BundleError::Build(format!("{file}: cannot read the file: {e}")))?;
    let (table, functions) = parse_functions(&text, &file)?;
    let base = functions_toml.parent().unwrap_or(Path::new("."));
    let engines = targets
        .iter()
        .map(|t| precompiler(t).map(|rt| (wasm_target(t), rt)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut blobs = BTreeMap::new();
    let mut components = Vec::new();
    for (i, f) in functions.iter().enumerate() {
        let path = base.join(&f.component);
        let bytes = std::fs::read(&path).map_err(|e| {
            BundleError::Build(format!(
                "{file}: functions[{i}].component: cannot read `{}`: {e}",
                path.display()
            ))
        })?;
        let wasm = sha256_hex(&bytes);
        let mut precompiled = BTreeMap::new();
        for (target, runtime) in &engines {
            let code = crate::runtime::cache::precompile(runtime.engine(), &bytes).map_err(|e| {
                BundleError::Build(format!(
                    "{file}: functions[{i}].component: cannot precompile `{}` for {target}: {e}",
                    path.display()
                ))
            })?;
            let sha = sha256_hex(&code);
            precompiled.insert(target.clone(), sha.clone());
            blobs.insert(sha, ByteBuf::from(code));
        }
        blobs.insert(wasm.clone(), ByteBuf::from(bytes));
        components.push(ComponentEntry {
            function: f.name.clone(),
            wasm,
            precompiled,
        });
    }
    let created_ms = now_ms();
    let manifest = Manifest {
        version: version.unwrap_or(created_ms),
        created_ms,
        functions: rewrite_components(table, &components)?,
        components,
    };
    let manifest = to_cbor(&manifest);
    let signature = key.sign(&manifest);
    Ok(to_cbor(&BundleFile {
        format: Some(FORMAT),
        manifest: Some(ByteBuf::from(manifest)),
        key: Some(ByteBuf::from(key.public().to_bytes().to_vec())),
        signature: Some(ByteBuf::from(signature.to_vec())),
        blobs,
    }))
}

/// The functions text with each `component` as `sha256:<hex>`.
fn rewrite_components(
    table: toml::Table,
    components: &[ComponentEntry],
) -> Result<String, BundleError> {
    let mut tables = function_tables(table);
    for (f, c) in tables.iter_mut().zip(components) {
        f.insert(
            "component".to_owned(),
            toml::Value::String(format!("{COMPONENT_PREFIX}{}", c.wasm)),
        );
    }
    let mut out = toml::Table::new();
    out.insert(
        "functions".to_owned(),
        toml::Value::Array(tables.into_iter().map(toml::Value::Table).collect()),
    );
    toml::to_string(&out).map_err(|e| BundleError::Build(format!("writing the manifest: {e}")))
}

/// An engine that precompiles for `target` with the default `[runtime]`
/// settings (as `edgefn compile --target` does with a config's).
fn precompiler(target: &str) -> Result<crate::runtime::Runtime, BundleError> {
    if !cfg!(feature = "compiler") {
        return Err(BundleError::Build(format!(
            "--target {target}: {}",
            crate::runtime::cache::NO_COMPILER
        )));
    }
    let settings = crate::config::schema::RuntimeSettings::default();
    let spec = crate::config::RuntimeSpec {
        pooling: false,
        pool_instances: 1,
        pool_instances_set: None,
        max_memory_bytes: settings.max_memory_mib.saturating_mul(1024 * 1024),
        compile_cache: false,
        watch: None,
        rollback_after: settings.rollback_after,
    };
    let mut opts = crate::runtime::RuntimeOptions::ephemeral(spec);
    opts.target = Some(wasm_target(target));
    crate::runtime::Runtime::new(&opts)
        .map_err(|e| BundleError::Build(format!("--target {target}: {e}")))
}

/// The wasmtime target for a board's triple: 32-bit ARM has no Cranelift
/// backend and runs the Pulley interpreter.
pub fn wasm_target(triple: &str) -> String {
    if triple.starts_with("armv7") || triple.starts_with("arm-") || triple.starts_with("thumbv7") {
        "pulley32".to_owned()
    } else {
        triple.to_owned()
    }
}

/// The name `edgefn compile --target` uses for this machine's engine: the
/// key of this gateway's entries in a bundle's `precompiled` map.
pub fn host_target() -> Option<String> {
    let arch = std::env::consts::ARCH;
    let triple = |arch: &str| {
        let env = if cfg!(target_env = "musl") {
            "musl"
        } else {
            "gnu"
        };
        Some(format!("{arch}-unknown-linux-{env}"))
    };
    match arch {
        _ if !cfg!(target_os = "linux") => None,
        "x86_64" | "aarch64" | "s390x" => triple(arch),
        "riscv64" => triple("riscv64gc"),
        // No Cranelift backend: wasmtime runs Pulley.
        _ if cfg!(target_pointer_width = "32") => Some("pulley32".to_owned()),
        _ => Some("pulley64".to_owned()),
    }
}
