//! Raspberry Pi-class boards: ARM cross-builds with Debian's cross GCC, the
//! qemu-user smoke test, and the `.deb` packages with the systemd unit.
//!
//! - `cargo xtask cross [--profile P] [TARGET…]`: builds `edgefn` for the
//!   boards and prints the binary sizes (default profile `dist`).
//! - `cargo xtask smoke [--profile P] [TARGET…]`: cross-builds, then runs the
//!   binary under qemu-user: embedded broker, one function precompiled on
//!   this machine with `edgefn compile --target`, one compiled on the board
//!   at start, a reading from `mosquitto_pub`, the outputs seen by
//!   `mosquitto_sub`, the admin endpoint scraped, SIGTERM, exit 0.
//! - `cargo xtask deb [--profile P] [TARGET…]`: cross-builds and packages
//!   `target/deb/edgefn_<version>_<arch>.deb`, then checks the package:
//!   contents, the default configuration (`edgefn check`), the unit
//!   (`systemd-analyze verify`) and its exposure (`systemd-analyze security`,
//!   at most 2.0).
//!
//! TARGET is `aarch64-unknown-linux-gnu` (Pi 3/4/5, 64-bit OS: Cranelift)
//! or `armv7-unknown-linux-gnueabihf` (Pi 2 / Zero 2, 32-bit OS: Pulley);
//! none means both. Linkers and qemu runners are set in
//! `.cargo/config.toml`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{cargo, exec, root, target_dir};

/// One board family.
pub struct Board {
    /// Rust target triple.
    pub triple: &'static str,
    /// Debian architecture.
    deb_arch: &'static str,
    /// qemu-user binary.
    qemu: &'static str,
    /// The cross toolchain's sysroot (qemu's `-L`).
    sysroot: &'static str,
    /// Binutils prefix of the cross toolchain.
    tool_prefix: &'static str,
    /// The apt package with the cross GCC.
    apt: &'static str,
}

/// The boards we build for.
pub const BOARDS: [Board; 2] = [
    Board {
        triple: "aarch64-unknown-linux-gnu",
        deb_arch: "arm64",
        qemu: "qemu-aarch64",
        sysroot: "/usr/aarch64-linux-gnu",
        tool_prefix: "aarch64-linux-gnu-",
        apt: "gcc-aarch64-linux-gnu",
    },
    Board {
        triple: "armv7-unknown-linux-gnueabihf",
        deb_arch: "armhf",
        qemu: "qemu-arm",
        sysroot: "/usr/arm-linux-gnueabihf",
        tool_prefix: "arm-linux-gnueabihf-",
        apt: "gcc-arm-linux-gnueabihf",
    },
];

/// The example functions the package ships (file names as built).
const PACKAGED_FUNCTIONS: [&str; 4] = ["threshold", "enrich", "moving_average", "cbor_decode"];

/// Highest `systemd-analyze security` exposure accepted for the unit.
const MAX_EXPOSURE: f64 = 2.0;

/// `[--profile P] [TARGET…]` → profile and boards.
pub fn parse_args<'a>(
    args: &'a [String],
    default_profile: &'a str,
) -> anyhow::Result<(&'a str, Vec<&'static Board>)> {
    let mut profile = default_profile;
    let mut boards = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--profile" {
            profile = it.next().context("--profile needs a value")?;
        } else {
            let board = BOARDS.iter().find(|b| b.triple == a).with_context(|| {
                format!(
                    "unknown target `{a}` (known: {})",
                    BOARDS.map(|b| b.triple).join(", ")
                )
            })?;
            boards.push(board);
        }
    }
    if boards.is_empty() {
        boards = BOARDS.iter().collect();
    }
    Ok((profile, boards))
}

/// Whether `program` runs (`mosquitto_pub` knows no `--version`, so `--help`).
fn have(program: &str) -> bool {
    Command::new(program)
        .arg(if program.starts_with("mosquitto") {
            "--help"
        } else {
            "--version"
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Whether this machine can cross-build and emulate `board`.
pub fn can_cross(board: &Board) -> bool {
    have(&format!("{}gcc", board.tool_prefix)) && have(board.qemu)
}

/// What to install when a tool is missing.
pub fn missing_tools(board: &Board) -> String {
    format!(
        "cross-building for {} needs `{}gcc` and `{}`: apt-get install {} qemu-user, and rustup target add {}",
        board.triple, board.tool_prefix, board.qemu, board.apt, board.triple
    )
}

fn ensure_tools(board: &Board) -> anyhow::Result<()> {
    if !can_cross(board) {
        bail!("{}", missing_tools(board));
    }
    crate::ensure_target(board.triple)
}

/// The cross-built binary's path.
fn binary(board: &Board, profile: &str) -> PathBuf {
    let dir = if profile == "dev" { "debug" } else { profile };
    target_dir().join(board.triple).join(dir).join("edgefn")
}

/// Cross-builds `edgefn` for `board`; returns the binary.
pub fn build(board: &Board, profile: &str) -> anyhow::Result<PathBuf> {
    ensure_tools(board)?;
    let started = Instant::now();
    let mut cmd = cargo();
    cmd.args(["build", "--package", "edgefn", "--profile", profile])
        .args(["--target", board.triple]);
    exec(cmd)?;
    let bin = binary(board, profile);
    let size = std::fs::metadata(&bin)
        .with_context(|| format!("{} was not built", bin.display()))?
        .len();
    println!(
        "xtask: {} ({profile}): {} — {:.1} MiB, built in {:.0} s",
        board.triple,
        bin.display(),
        size as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64()
    );
    Ok(bin)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A plain HTTP/1.1 GET on loopback: status and body.
fn http_get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Kills the child on drop (a failed smoke test must not leave qemu behind).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The qemu smoke test for `board` (binary already built).
pub fn smoke(board: &Board, profile: &str) -> anyhow::Result<()> {
    for tool in ["mosquitto_pub", "mosquitto_sub"] {
        if !have(tool) {
            bail!("the smoke test needs `{tool}`: apt-get install mosquitto-clients");
        }
    }
    let bin = binary(board, profile);
    // The host binary precompiles `threshold` for the board.
    crate::host_binary()?;
    let host_bin = target_dir().join("debug/edgefn");
    let guests = target_dir().join("wasm32-wasip2/guest");
    let work = target_dir().join("smoke").join(board.triple);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mqtt = free_port()?;
    let admin = free_port()?;
    let config = |threshold: &Path| {
        format!(
            r#"[gateway]
id = "smoke-{arch}"
data_dir = "data"

[broker]
kind = "embedded"
listen = "127.0.0.1:{mqtt}"

[admin]
listen = "127.0.0.1:{admin}"

# Precompiled on the build machine with `edgefn compile --target`.
[[functions]]
name = "threshold"
component = "{threshold}"
triggers = ["sensors/+/temperature"]
publish = ["alerts/#"]
config = {{ limit = "30" }}
# Emulated and unoptimised (board-test), Pulley runs ~100x slower than on
# a board: the default 50 ms deadline is for real hardware.
limits = {{ timeout_ms = 10000 }}

# Compiled on the board at start (and cached), with durable state.
[[functions]]
name = "moving-average"
component = "{guests}/moving_average.wasm"
triggers = ["sensors/+/temperature"]
publish = ["smoothed/#"]
config = {{ window = "3" }}
limits = {{ timeout_ms = 10000 }}
"#,
            arch = board.deb_arch,
            threshold = threshold.display(),
            guests = guests.display(),
        )
    };
    // 1. Precompile `threshold` for the board on this machine.
    let compile_toml = work.join("compile.toml");
    std::fs::write(&compile_toml, config(&guests.join("threshold.wasm")))?;
    let precompiled = work.join("cwasm");
    let mut compile = Command::new(&host_bin);
    compile
        .args(["compile", "--config"])
        .arg(&compile_toml)
        .args(["--target", board.triple, "--out-dir"])
        .arg(&precompiled);
    exec(compile)?;
    let toml = work.join("edgefn.toml");
    std::fs::write(&toml, config(&precompiled.join("threshold.cwasm")))?;

    // 2. Start the ARM binary under qemu.
    let log_path = work.join("gateway.log");
    let started = Instant::now();
    let child = Command::new(board.qemu)
        .args(["-L", board.sysroot])
        .arg(&bin)
        .args(["run", "--config"])
        .arg(&toml)
        .current_dir(&work)
        .env("EDGEFN_LOG", "info,rumqttd=off")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .with_context(|| format!("starting {} {}", board.qemu, bin.display()))?;
    let mut gateway = Reaped(child);
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(status) = gateway.0.try_wait()? {
            bail!(
                "{}: the gateway exited during start-up ({status}):\n{}",
                board.triple,
                log()
            );
        }
        if matches!(http_get(admin, "/readyz"), Ok((200, _))) {
            break;
        }
        if Instant::now() > deadline {
            bail!("{}: not ready after 300 s:\n{}", board.triple, log());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready_after = started.elapsed();

    // 3. A subscriber (known to be subscribed once it prints the SUBACK),
    //    then one hot reading.
    // stdbuf: mosquitto_sub's debug lines are block-buffered into a pipe.
    let mut sub = Reaped(
        Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub"])
            .args(["-h", "127.0.0.1", "-p", &mqtt.to_string()])
            .args(["-t", "alerts/#", "-t", "smoothed/#", "-v", "-d"])
            .args(["-C", "2", "-W", "120"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting mosquitto_sub")?,
    );
    let (lines_tx, lines) = mpsc::channel();
    let out = sub.0.stdout.take().context("mosquitto_sub stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |what: &str| -> anyhow::Result<String> {
        lines
            .recv_timeout(Duration::from_secs(120))
            .with_context(|| format!("{}: no {what} from mosquitto_sub", board.triple))
    };
    while !next_line("SUBACK")?.contains("SUBACK") {}
    let published = Instant::now();
    let mut publish = Command::new("mosquitto_pub");
    publish
        .args(["-h", "127.0.0.1", "-p", &mqtt.to_string(), "-q", "1"])
        .args([
            "-t",
            "sensors/board/temperature",
            "-m",
            r#"{"value": 42.5}"#,
        ]);
    exec(publish)?;
    let mut alert = None;
    let mut smoothed = None;
    while alert.is_none() || smoothed.is_none() {
        let line = next_line("output")?;
        if line.starts_with("alerts/board/temperature ") {
            alert = Some(line);
        } else if line.starts_with("smoothed/board/temperature ") {
            smoothed = Some(line);
        }
    }
    let latency = published.elapsed();
    let (alert, smoothed) = (alert.unwrap_or_default(), smoothed.unwrap_or_default());
    if !alert.contains("42.5") || !smoothed.contains("42.5") {
        bail!("{}: unexpected outputs:\n{alert}\n{smoothed}", board.triple);
    }

    // 4. The admin endpoint counted it.
    let (status, metrics) = http_get(admin, "/metrics")?;
    let counted = metrics
        .lines()
        .any(|l| l == r#"edgefn_function_invocations_total{function="threshold"} 1"#);
    if status != 200 || !counted {
        bail!(
            "{}: /metrics ({status}) does not count the invocation:\n{metrics}",
            board.triple
        );
    }

    // 5. SIGTERM: a clean exit.
    let stopping = Instant::now();
    let mut kill = Command::new("kill");
    kill.args(["-TERM", &gateway.0.id().to_string()]);
    exec(kill)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = gateway.0.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            bail!(
                "{}: still running 60 s after SIGTERM:\n{}",
                board.triple,
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !status.success() {
        bail!("{}: exit after SIGTERM: {status}\n{}", board.triple, log());
    }
    println!(
        "xtask: smoke {} ({profile}, {}) ok: ready in {:.1} s, reading → alert + smoothed in {} ms, stopped in {} ms\n  {alert}\n  {smoothed}",
        board.triple,
        board.qemu,
        ready_after.as_secs_f64(),
        latency.as_millis(),
        stopping.elapsed().as_millis(),
    );
    Ok(())
}

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
pub fn package(board: &Board, profile: &str) -> anyhow::Result<PathBuf> {
    let version = env!("CARGO_PKG_VERSION");
    let bin = binary(board, profile);
    let debian = root().join("cross/debian");
    let out_dir = target_dir().join("deb");
    let stage = out_dir.join(format!("edgefn_{version}_{}", board.deb_arch));
    let _ = std::fs::remove_dir_all(&stage);

    let staged_bin = stage.join("usr/bin/edgefn");
    copy(&bin, &staged_bin, 0o755)?;
    // As dh_strip does: the package carries no debug info.
    exec({
        let mut c = Command::new(format!("{}strip", board.tool_prefix));
        c.arg("--strip-unneeded").arg(&staged_bin);
        c
    })?;
    copy(
        &debian.join("edgefn.toml"),
        &stage.join("etc/edgefn/edgefn.toml"),
        0o644,
    )?;
    copy(
        &debian.join("edgefn.service"),
        &stage.join("lib/systemd/system/edgefn.service"),
        0o644,
    )?;
    let guests = target_dir().join("wasm32-wasip2/guest");
    for f in PACKAGED_FUNCTIONS {
        copy(
            &guests.join(format!("{f}.wasm")),
            &stage.join(format!("usr/lib/edgefn/functions/{f}.wasm")),
            0o644,
        )?;
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
            "Package: edgefn
Version: {version}
Architecture: {arch}
Maintainer: edgefn developers <edgefn@example.invalid>
Installed-Size: {installed_kib}
Depends: libc6 (>= {glibc}), libgcc-s1, adduser
Recommends: mosquitto-clients
Section: net
Priority: optional
Homepage: https://example.invalid/edgefn
Description: gateway daemon running sandboxed WebAssembly functions on sensor data
 edgefn takes readings from MQTT, serial ports and I2C sensors, runs them
 through sandboxed WebAssembly functions (wasmtime; Cranelift on arm64,
 the Pulley interpreter on armhf) and forwards what they produce to the
 cloud through a durable SQLite outbox. Runs as a hardened systemd service
 (Type=notify, watchdog) with an admin endpoint for health and Prometheus
 metrics.
",
            arch = board.deb_arch,
            glibc = glibc_needed(board, &staged_bin)?,
        ),
    )?;
    let deb = out_dir.join(format!("edgefn_{version}_{}.deb", board.deb_arch));
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
pub fn check_package(board: &Board, deb: &Path) -> anyhow::Result<()> {
    let info = output(Command::new("dpkg-deb").arg("--field").arg(deb))?;
    if !info.contains(&format!("Architecture: {}", board.deb_arch)) {
        bail!("{}: wrong architecture:\n{info}", deb.display());
    }
    let contents = output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    for want in [
        "./usr/bin/edgefn",
        "./etc/edgefn/edgefn.toml",
        "./lib/systemd/system/edgefn.service",
        "./usr/lib/edgefn/functions/threshold.wasm",
        "./usr/lib/edgefn/functions/moving_average.wasm",
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
    let check = output(
        Command::new(target_dir().join("debug/edgefn"))
            .args(["check", "--config"])
            .arg(&config_path),
    )?;
    println!(
        "xtask: {} checked: files, systemd-analyze verify clean, exposure {exposure} (≤ {MAX_EXPOSURE}), {}",
        deb.display(),
        check.trim()
    );
    Ok(())
}
