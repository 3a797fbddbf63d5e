//! `cargo xtask`: the project's task runner (the alias lives in
//! `.cargo/config.toml`).
//!
//! - `cargo xtask demo`: builds the example functions and runs the gateway
//!   with `examples/demo.toml` and a simulated sensor.
//! - `cargo xtask test`: builds every guest (examples and test guests), then
//!   runs the whole test suite.
//! - `cargo xtask functions`: builds the guests only.
//!
//! Guests are built with `--profile guest --target wasm32-wasip2` into the
//! workspace's one target dir (`target/wasm32-wasip2/guest/*.wasm`).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};

/// Every guest package: the examples and the test guests.
const GUESTS: &[&str] = &[
    "threshold",
    "enrich",
    "cbor-decode",
    "moving-average",
    "edgefn-test-guests",
];
const WASM_TARGET: &str = "wasm32-wasip2";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let (task, rest) = args
        .split_first()
        .map_or(("help", &[][..]), |(t, r)| (t.as_str(), r));
    match task {
        "functions" => build_functions(),
        "demo" => {
            build_functions()?;
            let mut cmd = cargo();
            cmd.args(["run", "--package", "edgefn", "--", "run", "--config"])
                .arg(root().join("examples/demo.toml"))
                .arg("--simulate")
                .args(rest);
            exec(cmd)
        }
        "test" => {
            build_functions()?;
            // The durability tests run the real binary (kill -9 cycles).
            let mut build = cargo();
            build.args(["build", "--package", "edgefn"]);
            exec(build)?;
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--exclude", "xtask"])
                .args(rest);
            exec_tests(cmd)
        }
        "help" | "--help" | "-h" => {
            println!("cargo xtask <demo | test | functions>");
            Ok(())
        }
        other => bail!("unknown task `{other}` (try `cargo xtask help`)"),
    }
}

fn root() -> PathBuf {
    // cross/xtask -> workspace root
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn exec(mut cmd: Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and closes with one
/// summary line over all test binaries: `tests: N passed, N failed`.
fn exec_tests(mut cmd: Command) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    cmd.stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(';') {
                    let mut words = part.split_whitespace().rev();
                    let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                        continue;
                    };
                    let n: u64 = n.parse().unwrap_or(0);
                    match kind {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("tests: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Adds the wasm target if rustup lacks it (this machine sets
/// `RUSTUP_AUTO_INSTALL=0`, so rust-toolchain.toml alone does not).
fn ensure_wasm_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root())
        .output();
    match installed {
        Ok(out)
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == WASM_TARGET) =>
        {
            Ok(())
        }
        Ok(_) => {
            let mut cmd = Command::new("rustup");
            cmd.args(["target", "add", WASM_TARGET]).current_dir(root());
            exec(cmd)
        }
        // No rustup: assume the toolchain already has the target.
        Err(_) => Ok(()),
    }
}

fn build_functions() -> anyhow::Result<()> {
    ensure_wasm_target()?;
    let mut cmd = cargo();
    cmd.args(["build", "--profile", "guest", "--target", WASM_TARGET]);
    for g in GUESTS {
        cmd.args(["--package", g]);
    }
    exec(cmd)
}
