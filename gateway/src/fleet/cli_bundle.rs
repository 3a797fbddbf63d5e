//! The bodies of `edgefn keygen --out DIR` and `edgefn bundle --functions
//! FILE --key KEY --out APP.bundle [--version N] [--target T]...`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::bundle::{self, Bundle, BundleLimits};
use super::keys::{self, SigningKey};

/// `edgefn keygen` arguments.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// The directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

/// `edgefn bundle` arguments.
#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    /// The TOML file with only `[[functions]]` (components relative to it).
    #[arg(long)]
    pub functions: PathBuf,
    /// The secret key (`edgefn.key` from `edgefn keygen`).
    #[arg(long)]
    pub key: PathBuf,
    /// The bundle file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// The bundle's version (default: the creation time in ms). A gateway
    /// refuses a version older than the one it runs unless forced.
    #[arg(long)]
    pub version: Option<u64>,
    /// Also embed components precompiled for this target, as `edgefn
    /// compile --target` names it (repeatable).
    #[arg(long)]
    pub target: Vec<String>,
}

/// `edgefn keygen --out DIR`: a new key pair; refuses to overwrite one.
pub fn keygen(args: &KeygenArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let (secret, public) = keys::keygen(&args.out).map_err(once)?;
    let key = SigningKey::read(&secret).map_err(once)?;
    writeln!(
        out,
        "keygen: secret key {} (mode 0600; keep it off the gateways), public key {} (id {}); list the public key in each gateway's `[fleet] trusted_keys`",
        secret.display(),
        public.display(),
        key.public().id()
    )?;
    Ok(ExitCode::SUCCESS)
}

/// `edgefn bundle`: builds, signs and writes a bundle, then prints its
/// sha256, version, size and overhead over the raw components.
pub fn bundle(args: &BundleArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    let out_file = &args.out;
    let key = SigningKey::read(&args.key).map_err(once)?;
    let bytes = bundle::build(&args.functions, &key, args.version, &args.target)?;
    // Read back as a gateway would (the signer trusted): what it checks.
    let limits = BundleLimits {
        max_bytes: u64::MAX,
    };
    let trusted = keys::TrustedKeys(vec![key.public()]);
    let opened = Bundle::open(&bytes, &trusted, &limits).context("checking the new bundle")?;
    super::store::write_atomically(out_file, &bytes)
        .map_err(|e| anyhow::anyhow!("writing the bundle: {e}"))?;
    let (raw, blob_bytes) = opened.sizes();
    let size = bytes.len() as u64;
    let overhead = size.saturating_sub(blob_bytes);
    writeln!(
        out,
        "bundle: {} ({} function{}, signed by key {})\n  sha256 {}\n  version {}\n  size {size} bytes: components {raw} bytes{}, overhead {overhead} bytes ({:.2}% over the components)",
        out_file.display(),
        opened.manifest.components.len(),
        if opened.manifest.components.len() == 1 {
            ""
        } else {
            "s"
        },
        opened.signer.id(),
        opened.sha256,
        opened.manifest.version,
        if blob_bytes > raw {
            format!(" + precompiled {} bytes", blob_bytes - raw)
        } else {
            String::new()
        },
        overhead as f64 * 100.0 / blob_bytes.max(1) as f64,
    )?;
    Ok(ExitCode::SUCCESS)
}

/// An error whose message already ends with its cause: shown once.
fn once(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}
