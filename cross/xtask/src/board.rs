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
//!   `target/deb/edgefn_<version>_<arch>.deb`, then checks the package
//!   (see [`crate::deb`]).
//!
//! With `--runtime-only`, each builds the runtime-only gateway
//! (`--no-default-features`: no Cranelift, loads only precompiled `.cwasm`)
//! as `edgefn-runtime` beside the full binary; its smoke test also checks
//! that a portable `.wasm` is refused, and its package is `edgefn-runtime`.
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

use crate::{cargo, exec, target_dir};

/// One board family.
pub struct Board {
    /// Rust target triple.
    pub triple: &'static str,
    /// Debian architecture.
    pub deb_arch: &'static str,
    /// qemu-user binary.
    pub qemu: &'static str,
    /// The cross toolchain's sysroot (qemu's `-L`).
    pub sysroot: &'static str,
    /// Binutils prefix of the cross toolchain.
    pub tool_prefix: &'static str,
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

/// Which gateway build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The default features: Cranelift compiles `.wasm` on the board.
    Full,
    /// `--no-default-features`: no compiler, precompiled `.cwasm` only.
    RuntimeOnly,
}

impl Variant {
    /// The binary's file name in the target dir, and the package's name.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Full => "edgefn",
            Variant::RuntimeOnly => "edgefn-runtime",
        }
    }
}

/// `[--profile P] [--runtime-only] [TARGET…]` → profile, variant and boards.
pub fn parse_args<'a>(
    args: &'a [String],
    default_profile: &'a str,
) -> anyhow::Result<(&'a str, Variant, Vec<&'static Board>)> {
    let mut profile = default_profile;
    let mut variant = Variant::Full;
    let mut boards = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--profile" {
            profile = it.next().context("--profile needs a value")?;
        } else if a == "--runtime-only" {
            variant = Variant::RuntimeOnly;
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
    Ok((profile, variant, boards))
}

/// Whether `program` runs (`mosquitto_pub` knows no `--version`, so `--help`).
pub fn have(program: &str) -> bool {
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

/// The cross-built binary's path (`edgefn`, or `edgefn-runtime` for the
/// runtime-only build, which cargo writes as `edgefn` too).
pub fn binary(board: &Board, profile: &str, variant: Variant) -> PathBuf {
    let dir = if profile == "dev" { "debug" } else { profile };
    target_dir()
        .join(board.triple)
        .join(dir)
        .join(variant.name())
}

/// Cross-builds `edgefn` for `board`; returns the binary.
pub fn build(board: &Board, profile: &str, variant: Variant) -> anyhow::Result<PathBuf> {
    ensure_tools(board)?;
    let started = Instant::now();
    let mut cmd = cargo();
    cmd.args(["build", "--package", "edgefn", "--profile", profile])
        .args(["--target", board.triple]);
    if variant == Variant::RuntimeOnly {
        cmd.arg("--no-default-features");
    }
    exec(cmd)?;
    let bin = binary(board, profile, variant);
    if variant == Variant::RuntimeOnly {
        // Cargo names both builds `edgefn`: keep this one beside the other.
        let built = binary(board, profile, Variant::Full);
        std::fs::copy(&built, &bin)
            .with_context(|| format!("copying {} to {}", built.display(), bin.display()))?;
    }
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
pub fn smoke(board: &Board, profile: &str, variant: Variant) -> anyhow::Result<()> {
    for tool in ["mosquitto_pub", "mosquitto_sub"] {
        if !have(tool) {
            bail!("the smoke test needs `{tool}`: apt-get install mosquitto-clients");
        }
    }
    let bin = binary(board, profile, variant);
    // The host binary precompiles `threshold` for the board.
    crate::host_binary()?;
    let host_bin = target_dir().join("debug/edgefn");
    let guests = target_dir().join("wasm32-wasip2/guest");
    let work = target_dir().join("smoke").join(board.triple);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mqtt = free_port()?;
    let admin = free_port()?;
    let config = |threshold: &Path, moving_average: &Path| {
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

# Compiled on the board at start (and cached; precompiled too for the
# runtime-only build), with durable state.
[[functions]]
name = "moving-average"
component = "{moving_average}"
triggers = ["sensors/+/temperature"]
publish = ["smoothed/#"]
config = {{ window = "3" }}
limits = {{ timeout_ms = 10000 }}
"#,
            arch = board.deb_arch,
            threshold = threshold.display(),
            moving_average = moving_average.display(),
        )
    };
    // 1. Precompile the functions for the board on this machine.
    let compile_toml = work.join("compile.toml");
    let portable = guests.join("moving_average.wasm");
    std::fs::write(
        &compile_toml,
        config(&guests.join("threshold.wasm"), &portable),
    )?;
    let precompiled = work.join("cwasm");
    let mut compile = Command::new(&host_bin);
    compile
        .args(["compile", "--config"])
        .arg(&compile_toml)
        .args(["--target", board.triple, "--out-dir"])
        .arg(&precompiled);
    exec(compile)?;
    let moving_average = match variant {
        Variant::Full => portable,
        Variant::RuntimeOnly => {
            refuses_portable(board, &bin, &compile_toml)?;
            precompiled.join("moving-average.cwasm")
        }
    };
    let toml = work.join("edgefn.toml");
    std::fs::write(
        &toml,
        config(&precompiled.join("threshold.cwasm"), &moving_average),
    )?;

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
        "xtask: smoke {} {} ({profile}, {}) ok: ready in {:.1} s, reading → alert + smoothed in {} ms, stopped in {} ms\n  {alert}\n  {smoothed}",
        variant.name(),
        board.triple,
        board.qemu,
        ready_after.as_secs_f64(),
        latency.as_millis(),
        stopping.elapsed().as_millis(),
    );
    Ok(())
}

/// The runtime-only binary says what it is, and refuses a configuration
/// with a portable `.wasm`, naming the file and the command that fixes it.
fn refuses_portable(board: &Board, bin: &Path, config: &Path) -> anyhow::Result<()> {
    let qemu = || {
        let mut c = Command::new(board.qemu);
        c.args(["-L", board.sysroot]).arg(bin);
        c
    };
    let version = qemu().arg("--version").output()?;
    let version = String::from_utf8_lossy(&version.stdout);
    if !version.contains("runtime-only") {
        bail!(
            "{}: `--version` does not say runtime-only: {version}",
            bin.display()
        );
    }
    let check = qemu().args(["check", "--config"]).arg(config).output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let named = said.contains("threshold.wasm` is not precompiled")
        && said.contains("edgefn compile --config FILE --target");
    if check.status.success() || !named {
        bail!(
            "{}: a portable .wasm was not refused clearly ({}):\n{said}",
            board.triple,
            check.status
        );
    }
    let compile = qemu()
        .args(["compile", "--config"])
        .arg(config)
        .args(["--target", board.triple, "--out-dir", "/nonexistent"])
        .output()?;
    let said = String::from_utf8_lossy(&compile.stderr);
    if compile.status.success() || !said.contains("runtime-only build (no compiler)") {
        bail!(
            "{}: `edgefn compile` was not refused clearly:\n{said}",
            board.triple
        );
    }
    println!(
        "xtask: {} refuses a portable .wasm and `compile`: ok",
        bin.display()
    );
    Ok(())
}
