//! The `.deb` packages: the cross-built gateway, its default configuration,
//! the systemd unit and the example functions; then the checks of a built
//! package: contents, the default configuration (`edgefn check`), the unit
//! (`systemd-analyze verify`) and its exposure (`systemd-analyze security`,
//! at most 2.0).
//!
//! The runtime-only build is packaged as `edgefn-runtime` (it provides,
//! conflicts with and replaces `edgefn`): the same unit and configuration,
//! with the example functions precompiled for the board on this machine
//! (`edgefn compile --target`), since it cannot compile `.wasm` itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::board::{Board, Variant, binary};
use crate::{exec, root, target_dir};

/// The example functions the package ships (file names as built).
const PACKAGED_FUNCTIONS: [&str; 4] = ["threshold", "enrich", "moving_average", "cbor_decode"];

/// Highest `systemd-analyze security` exposure accepted for the unit.
const MAX_EXPOSURE: f64 = 2.0;

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The newest `GLIBC_x.y` symbol version the binary needs.
fn glibc_needed(board: &Board, bin: &Path) -> anyhow::Result<String> {
    let symbols = output(
        Command::new(format!("{}objdump", board.tool_prefix))
            .arg("-T")
            .arg(bin),
    )?;
    let newest = symbols
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .context("no GLIBC symbol versions in the binary")?;
    Ok(format!("{}.{}", newest.0, newest.1))
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Packages the cross-built binary for `board`; returns the `.deb`.
pub fn package(board: &Board, profile: &str, variant: Variant) -> anyhow::Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let name = variant.name();
    let bin = binary(board, profile, variant);
    let debian = root().join("cross/debian");
    let out_dir = target_dir().join("deb");
    let stage = out_dir.join(format!("{name}_{version}_{}", board.deb_arch));
    let _ = std::fs::remove_dir_all(&stage);

    let staged_bin = stage.join("usr/bin/edgefn");
    copy(&bin, &staged_bin, 0o755)?;
    // As dh_strip does: the package carries no debug info.
    exec({
        let mut c = Command::new(format!("{}strip", board.tool_prefix));
        c.arg("--strip-unneeded").arg(&staged_bin);
        c
    })?;
    let config = std::fs::read_to_string(debian.join("edgefn.toml"))?;
    let config = match variant {
        Variant::Full => config,
        Variant::RuntimeOnly => config.replace(".wasm\"", ".cwasm\""),
    };
    std::fs::create_dir_all(stage.join("etc/edgefn"))?;
    std::fs::write(stage.join("etc/edgefn/edgefn.toml"), config)?;
    copy(
        &debian.join("edgefn.service"),
        &stage.join("lib/systemd/system/edgefn.service"),
        0o644,
    )?;
    let functions = stage.join("usr/lib/edgefn/functions");
    match variant {
        Variant::Full => {
            let guests = target_dir().join("wasm32-wasip2/guest");
            for f in PACKAGED_FUNCTIONS {
                let file = format!("{f}.wasm");
                copy(&guests.join(&file), &functions.join(file), 0o644)?;
            }
        }
        Variant::RuntimeOnly => precompile_functions(board, &out_dir, &functions)?,
    }
    let doc = stage.join("usr/share/doc/edgefn");
    copy(&root().join("README.md"), &doc.join("README.md"), 0o644)?;
    // The README links into docs/: ship them beside it.
    for entry in std::fs::read_dir(root().join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md")
            && let Some(name) = path.file_name()
        {
            copy(&path, &doc.join("docs").join(name), 0o644)?;
        }
    }
    std::fs::write(
        doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: edgefn\n\nFiles: *\nLicense: Apache-2.0\n On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n",
    )?;
    let installed_kib = dir_size(&stage)? / 1024;
    let control = stage.join("DEBIAN");
    std::fs::create_dir_all(&control)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(&debian.join(script), &control.join(script), 0o755)?;
    }
    std::fs::write(control.join("conffiles"), "/etc/edgefn/edgefn.toml\n")?;
    std::fs::write(
        control.join("control"),
        format!(
            "Package: {name}
Version: {version}
Architecture: {arch}
Maintainer: edgefn developers <edgefn@example.invalid>
Installed-Size: {installed_kib}
Depends: libc6 (>= {glibc}), libgcc-s1, adduser
Recommends: mosquitto-clients
Section: net
Priority: optional
Homepage: https://example.invalid/edgefn
{relations}Description: gateway daemon running sandboxed WebAssembly functions on sensor data{flavour}
 edgefn takes readings from MQTT, serial ports and I2C sensors, runs them
 through sandboxed WebAssembly functions (wasmtime; Cranelift on arm64,
 the Pulley interpreter on armhf) and forwards what they produce to the
 cloud through a durable SQLite outbox. Runs as a hardened systemd service
 (Type=notify, watchdog) with an admin endpoint for health and Prometheus
 metrics.
",
            arch = board.deb_arch,
            glibc = glibc_needed(board, &staged_bin)?,
            relations = match variant {
                Variant::Full => "",
                Variant::RuntimeOnly => "Provides: edgefn\nConflicts: edgefn\nReplaces: edgefn\n",
            },
            flavour = match variant {
                Variant::Full => "",
                Variant::RuntimeOnly => " (runtime-only)",
            },
        ),
    )?;
    let deb = out_dir.join(format!("{name}_{version}_{}.deb", board.deb_arch));
    let mut build = Command::new("dpkg-deb");
    build
        .args(["--build", "--root-owner-group", "-Zxz"])
        .arg(&stage)
        .arg(&deb);
    output(&mut build)?;
    println!(
        "xtask: {} — {:.1} MiB (installed {:.1} MiB)",
        deb.display(),
        std::fs::metadata(&deb)?.len() as f64 / (1024.0 * 1024.0),
        installed_kib as f64 / 1024.0
    );
    Ok(deb)
}

/// Checks a built package: its metadata and files, its default
/// configuration against its own functions, its unit (verify, exposure).
pub fn check_package(board: &Board, deb: &Path, variant: Variant) -> anyhow::Result<()> {
    let info = output(Command::new("dpkg-deb").arg("--field").arg(deb))?;
    if !info.contains(&format!("Architecture: {}", board.deb_arch)) {
        bail!("{}: wrong architecture:\n{info}", deb.display());
    }
    let provides = info.lines().any(|l| l == "Provides: edgefn");
    if provides != (variant == Variant::RuntimeOnly) {
        bail!("{}: `Provides: edgefn` is wrong:\n{info}", deb.display());
    }
    let contents = output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    for want in [
        "./usr/bin/edgefn",
        "./etc/edgefn/edgefn.toml",
        "./lib/systemd/system/edgefn.service",
        &format!("./usr/lib/edgefn/functions/threshold.{}", wasm_ext(variant)),
        &format!(
            "./usr/lib/edgefn/functions/moving_average.{}",
            wasm_ext(variant)
        ),
    ] {
        if !contents.lines().any(|l| l.ends_with(want)) {
            bail!("{}: `{want}` is missing:\n{contents}", deb.display());
        }
    }
    // Unpack beside the host's systemd units, so that `verify` resolves the
    // unit's dependencies and finds its executables in the package tree.
    let tree = target_dir()
        .join("deb")
        .join(format!("root-{}", board.deb_arch));
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::create_dir_all(tree.join("lib/systemd/system"))?;
    output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tree))?;
    for entry in std::fs::read_dir("/lib/systemd/system")
        .context("systemd-analyze verify needs systemd's units in /lib/systemd/system")?
    {
        let entry = entry?;
        let to = tree.join("lib/systemd/system").join(entry.file_name());
        if entry.file_type()?.is_file() && !to.exists() {
            std::fs::copy(entry.path(), to)?;
        }
    }
    copy(Path::new("/bin/kill"), &tree.join("bin/kill"), 0o755)?;
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", tree.display()))
        .arg("edgefn.service")
        .output()
        .context("running systemd-analyze (apt-get install systemd)")?;
    let complaints = String::from_utf8_lossy(&verify.stderr);
    if !verify.status.success() || !complaints.trim().is_empty() {
        bail!("systemd-analyze verify edgefn.service:\n{complaints}");
    }
    let unit = tree.join("lib/systemd/system/edgefn.service");
    let security = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&unit),
    )?;
    let exposure: f64 = security
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for edgefn.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no exposure level in:\n{security}"))?;
    if exposure > MAX_EXPOSURE {
        bail!("edgefn.service exposure {exposure} > {MAX_EXPOSURE}:\n{security}");
    }
    // The default configuration is valid with the functions it ships.
    let config = std::fs::read_to_string(tree.join("etc/edgefn/edgefn.toml"))?
        .replace(
            "/usr/lib/edgefn",
            &tree.join("usr/lib/edgefn").display().to_string(),
        )
        .replace(
            "/var/lib/edgefn",
            &tree.join("var/lib/edgefn").display().to_string(),
        );
    let config_path = tree.join("check.toml");
    std::fs::write(&config_path, config)?;
    // The full package's configuration is checked by this machine's
    // gateway; the runtime-only one's `.cwasm` run on the board, so its own
    // binary checks it under qemu.
    let mut check = match variant {
        Variant::Full => Command::new(target_dir().join("debug/edgefn")),
        Variant::RuntimeOnly => {
            let mut c = Command::new(board.qemu);
            c.args(["-L", board.sysroot])
                .arg(tree.join("usr/bin/edgefn"));
            c
        }
    };
    let check = output(check.args(["check", "--config"]).arg(&config_path))?;
    println!(
        "xtask: {} checked: files, systemd-analyze verify clean, exposure {exposure} (≤ {MAX_EXPOSURE}), {}",
        deb.display(),
        check.trim()
    );
    Ok(())
}

/// The packaged functions' file extension.
fn wasm_ext(variant: Variant) -> &'static str {
    match variant {
        Variant::Full => "wasm",
        Variant::RuntimeOnly => "cwasm",
    }
}

/// The example functions precompiled for `board` by this machine's full
/// gateway (`edgefn compile --target`), as `<file>.cwasm` in `into`.
fn precompile_functions(board: &Board, work: &Path, into: &Path) -> anyhow::Result<()> {
    let guests = target_dir().join("wasm32-wasip2/guest");
    let mut config = format!(
        "[gateway]\nid = \"package\"\ndata_dir = \"{}\"\n",
        work.join("data").display()
    );
    for f in PACKAGED_FUNCTIONS {
        config.push_str(&format!(
            "\n[[functions]]\nname = \"{f}\"\ncomponent = \"{}\"\ntriggers = [\"package/{f}\"]\n",
            guests.join(format!("{f}.wasm")).display()
        ));
    }
    let config_path = work.join(format!("precompile-{}.toml", board.deb_arch));
    std::fs::write(&config_path, config)?;
    std::fs::create_dir_all(into)?;
    let mut compile = Command::new(target_dir().join("debug/edgefn"));
    compile
        .args(["compile", "--config"])
        .arg(&config_path)
        .args(["--target", board.triple, "--out-dir"])
        .arg(into);
    output(&mut compile)?;
    Ok(())
}
