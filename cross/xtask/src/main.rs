//! `cargo xtask`: the project's task runner (the alias lives in
//! `.cargo/config.toml`).
//!
//! - `cargo xtask demo`: builds the example functions and runs the gateway
//!   with `examples/demo.toml` and a simulated sensor.
//! - `cargo xtask test`: builds every guest (examples and test guests), then
//!   runs the whole test suite.
//! - `cargo xtask functions`: builds the guests only.
//! - `cargo xtask cross | smoke | deb`: ARM cross-builds, the qemu smoke
//!   test, the `.deb` packages (see [`board`] and [`deb`]); with
//!   `--runtime-only`, of the runtime-only board build.
//!
//! Guests are built with `--profile guest --target wasm32-wasip2` into the
//! workspace's one target dir (`target/wasm32-wasip2/guest/*.wasm`).

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};

mod board;
mod deb;

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
            host_binary()?;
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--exclude", "xtask"])
                .args(rest);
            exec_tests(cmd)?;
            boards_in_test()
        }
        "cross" => {
            let (profile, variant, boards) = board::parse_args(rest, "dist")?;
            for b in boards {
                board::build(b, profile, variant)?;
            }
            Ok(())
        }
        "smoke" => {
            let (profile, variant, boards) = board::parse_args(rest, "dist")?;
            build_functions()?;
            for b in boards {
                board::build(b, profile, variant)?;
                board::smoke(b, profile, variant)?;
            }
            Ok(())
        }
        "deb" => {
            let (profile, variant, boards) = board::parse_args(rest, "dist")?;
            build_functions()?;
            host_binary()?;
            for b in boards {
                board::build(b, profile, variant)?;
                let deb = deb::package(b, profile, variant)?;
                deb::check_package(b, &deb, variant)?;
            }
            Ok(())
        }
        "help" | "--help" | "-h" => {
            println!(
                "cargo xtask <demo | test | functions | cross | smoke | deb> \
                 (cross/smoke/deb: [--profile P] [--runtime-only] [TARGET…], default profile dist)"
            );
            Ok(())
        }
        other => bail!("unknown task `{other}` (try `cargo xtask help`)"),
    }
}

/// The test suite's board part: for each ARM target, a cross-build, the
/// qemu smoke test, the `.deb` and its checks. Required in CI; elsewhere
/// skipped (with what to install) when the cross toolchain is missing.
///
/// CI builds the boards with the `board-test` profile (no optimisation, no
/// LTO, no debug info: ~3 min per target): the smoke test exercises the same code, and a
/// `dist` (fat LTO) build for two targets takes ~11 min each on two cores,
/// a `dev` one (debug info) as long. `cargo xtask deb` builds the shipped
/// packages with `dist`.
fn boards_in_test() -> anyhow::Result<()> {
    let ci = std::env::var_os("CI").is_some();
    let profile = std::env::var("EDGEFN_BOARD_PROFILE").unwrap_or_else(|_| "board-test".into());
    for b in &board::BOARDS {
        if !ci && !board::can_cross(b) {
            println!(
                "xtask: skipping the {} board tests: {}",
                b.triple,
                board::missing_tools(b)
            );
            continue;
        }
        // The full build on both boards; the runtime-only build on 64-bit
        // ARM (its size target), after the full one: they share the path
        // cargo writes the binary to.
        let variants: &[board::Variant] = if b.triple.starts_with("aarch64") {
            &[board::Variant::Full, board::Variant::RuntimeOnly]
        } else {
            &[board::Variant::Full]
        };
        for &variant in variants {
            board::build(b, &profile, variant)?;
            board::smoke(b, &profile, variant)?;
            let deb = deb::package(b, &profile, variant)?;
            deb::check_package(b, &deb, variant)?;
        }
    }
    Ok(())
}

/// Builds the host `edgefn` (debug): the tests run it, and it precompiles
/// functions for the boards.
fn host_binary() -> anyhow::Result<()> {
    let mut build = cargo();
    build.args(["build", "--package", "edgefn"]);
    exec(build)
}

/// The workspace's one target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

fn root() -> PathBuf {
    // cross/xtask -> workspace root
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
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

/// Runs `cargo test`, passing its output through, and closes with the
/// skipped tests and their reasons, then one summary line over all test
/// binaries: `tests: N passed, N failed, N skipped`.
fn exec_tests(mut cmd: Command) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    cmd.stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    let mut summary = Summary::default();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            summary.line(&line);
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    print!("{}", summary.closing());
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Counts over `cargo test`'s output. A test that could not run for want of
/// a tool says so with a `SKIPPED <test>: <reason>` line (see
/// `tests/e2e/support`); libtest counts it as passed, the summary as skipped.
#[derive(Debug, Default)]
struct Summary {
    passed: u64,
    failed: u64,
    /// Skipped tests and why, by name.
    skipped: std::collections::BTreeMap<String, String>,
    failed_names: std::collections::BTreeSet<String>,
}

impl Summary {
    fn line(&mut self, line: &str) {
        if let Some(at) = line.find("SKIPPED ") {
            let marker = &line[at + "SKIPPED ".len()..];
            if let Some((test, reason)) = marker.split_once(": ") {
                self.skipped
                    .entry(test.trim().to_owned())
                    .or_insert_with(|| reason.trim().to_owned());
            }
        }
        if let Some(test) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            self.failed_names.insert(test.to_owned());
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match kind {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    _ => {}
                }
            }
        }
    }

    /// The skipped tests with their reasons, then the closing line.
    fn closing(&self) -> String {
        let skipped: Vec<_> = self
            .skipped
            .iter()
            .filter(|(test, _)| !self.failed_names.contains(*test))
            .collect();
        let n = skipped.len() as u64;
        let mut out = String::new();
        for (test, reason) in &skipped {
            out.push_str(&format!("skipped: {test}: {reason}\n"));
        }
        out.push_str(&format!(
            "tests: {} passed, {} failed, {n} skipped\n",
            self.passed.saturating_sub(n),
            self.failed
        ));
        out
    }
}

/// Adds a target if rustup lacks it (this machine sets
/// `RUSTUP_AUTO_INSTALL=0`, so rust-toolchain.toml alone does not).
fn ensure_target(target: &str) -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(root())
        .output();
    match installed {
        Ok(out)
            if String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == target) =>
        {
            Ok(())
        }
        Ok(_) => {
            let mut cmd = Command::new("rustup");
            cmd.args(["target", "add", target]).current_dir(root());
            exec(cmd)
        }
        // No rustup: assume the toolchain already has the target.
        Err(_) => Ok(()),
    }
}

fn build_functions() -> anyhow::Result<()> {
    ensure_target(WASM_TARGET)?;
    let mut cmd = cargo();
    cmd.args(["build", "--profile", "guest", "--target", WASM_TARGET]);
    for g in GUESTS {
        cmd.args(["--package", g]);
    }
    exec(cmd)
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn skipped_tests_are_listed_and_not_counted_as_passed() {
        let mut s = Summary::default();
        for line in [
            "running 3 tests",
            "SKIPPED pipeline::with_mosquitto: mosquitto is not installed",
            "test pipeline::with_mosquitto ... ok",
            // libtest with one thread prints the name before the test runs.
            "test tls::mutual ... SKIPPED tls::mutual: mosquitto is not installed",
            "ok",
            "test pipeline::plain ... ok",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "test result: FAILED. 4 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        ] {
            s.line(line);
        }
        assert_eq!(
            s.closing(),
            "skipped: pipeline::with_mosquitto: mosquitto is not installed\n\
             skipped: tls::mutual: mosquitto is not installed\n\
             tests: 5 passed, 1 failed, 2 skipped\n"
        );
    }

    #[test]
    fn a_skipped_test_that_failed_counts_as_failed() {
        let mut s = Summary::default();
        for line in [
            "SKIPPED sinks::x: mosquitto is not installed",
            "test sinks::x ... FAILED",
            "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
        ] {
            s.line(line);
        }
        assert_eq!(s.closing(), "tests: 0 passed, 1 failed, 0 skipped\n");
    }
}
