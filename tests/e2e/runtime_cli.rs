//! The runtime from outside the process: the instance pool under
//! `ulimit -v` and its fallback, `edgefn compile` (the compile cache and
//! cross-target `.cwasm`), and `SIGHUP` reloads of the real binary.

use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::Instant;

use edgefn::supervisor::Gateway;

use crate::support::*;

fn run_cli(args: &[&str], ulimit_kib: Option<u64>) -> (bool, String, String) {
    let bin = edgefn_bin();
    let mut cmd = match ulimit_kib {
        Some(kib) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -v {kib} && exec \"$0\" \"$@\""))
                .arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    let out = cmd.args(args).env("EDGEFN_LOG", "warn").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_pool_fits_a_small_address_space_and_falls_back_when_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, runtime: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[gateway]\nid = \"gw\"\ndata_dir = \"data\"\n{runtime}\n[[functions]]\nname = \"threshold\"\ncomponent = {}\ntriggers = [\"sensors/+/temperature\"]\npublish = [\"alerts/#\"]\n",
                lit(&guest("threshold"))
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let default = write("default.toml", "");
    let huge = write("huge.toml", "[runtime]\npool_instances = 10000\n");
    let invoke = |config: &str| {
        [
            "invoke",
            "-c",
            config,
            "threshold",
            "--topic",
            "sensors/a/temperature",
            "--payload",
            r#"{"value": 40}"#,
        ]
        .map(str::to_owned)
    };
    // 8 GiB of address space: far less than a Pi 4's 39-bit 512 GiB.
    let limit = Some(8 * 1024 * 1024);
    let args = invoke(&default);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = run_cli(&args, limit);
    assert!(ok, "{out}{err}");
    assert!(out.contains("publish alerts/a/temperature"), "{out}");
    assert!(
        !err.contains("falling back"),
        "the default pool fits: {err}"
    );

    // 10,000 slots × 2 memories × 64 MiB do not fit: on-demand, with a warning.
    let args = invoke(&huge);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, out, err) = run_cli(&args, limit);
    assert!(ok, "{out}{err}");
    assert!(out.contains("publish alerts/a/temperature"), "{out}");
    assert!(
        err.contains("falling back to on-demand allocation"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compile_fills_the_cache_and_precompiles_for_other_targets() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edgefn.toml");
    let body = |component: &Path| {
        format!(
            "{}\n[[functions]]\nname = \"threshold\"\ncomponent = {}\ntriggers = [\"sensors/+/temperature\"]\npublish = [\"alerts/#\"]\n",
            gateway_header("gw-compile"),
            lit(component)
        )
    };
    std::fs::write(&config, body(&guest("threshold"))).unwrap();
    let c = config.display().to_string();
    let (ok, out, err) = run_cli(&["compile", "-c", &c], None);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("threshold: compiled ("), "{out}");
    let (ok, out, _) = run_cli(&["compile", "-c", &c], None);
    assert!(ok);
    assert!(out.starts_with("threshold: cached ("), "{out}");
    // The gateway starts from the cache.
    let loaded = edgefn::config::load(&config).unwrap();
    let gw = Gateway::start(&loaded).await.unwrap();
    let m = gw.function_metrics("threshold").unwrap();
    assert!(m.from_cache.load(std::sync::atomic::Ordering::Relaxed));
    assert!(gw.shutdown(WAIT).await);

    // For a Raspberry Pi (aarch64) and an armv7 board (Pulley).
    for (target, arch) in [
        ("aarch64-unknown-linux-gnu", "aarch64"),
        ("armv7-unknown-linux-gnueabihf", "pulley"),
    ] {
        std::fs::write(&config, body(&guest("threshold"))).unwrap();
        let out_dir = dir.path().join(target);
        let o = out_dir.display().to_string();
        let (ok, out, err) = run_cli(
            &["compile", "-c", &c, "--target", target, "--out-dir", &o],
            None,
        );
        assert!(ok, "{out}{err}");
        let cwasm = out_dir.join("threshold.cwasm");
        assert!(cwasm.exists(), "{out}");
        // This x86 machine refuses it, saying why.
        std::fs::write(&config, body(&cwasm)).unwrap();
        let mut report = Vec::new();
        let code = edgefn::cli::execute(
            edgefn::cli::Command::Check {
                config: config.clone(),
            },
            &mut report,
        )
        .unwrap();
        let report = String::from_utf8(report).unwrap();
        assert_eq!(code, ExitCode::FAILURE, "{report}");
        assert!(
            report.contains(&format!("it was compiled for {arch}")),
            "{report}"
        );
    }
    // Precompiled for this machine: used as is.
    std::fs::write(&config, body(&guest("threshold"))).unwrap();
    let host_dir = dir.path().join("host");
    let h = host_dir.display().to_string();
    let (ok, out, err) = run_cli(&["compile", "-c", &c, "--out-dir", &h], None);
    assert!(ok, "{out}{err}");
    std::fs::write(&config, body(&host_dir.join("threshold.cwasm"))).unwrap();
    invoke_threshold(&c);
}

/// `edgefn invoke` of the function `threshold` in the config file `config`
/// on a reading over its limit: it must publish the alert.
fn invoke_threshold(config: &str) {
    let args = [
        "invoke",
        "-c",
        config,
        "threshold",
        "--topic",
        "sensors/a/temperature",
        "--payload",
        r#"{"value": 31}"#,
    ];
    let (ok, out, err) = run_cli(&args, None);
    assert!(ok, "{out}{err}");
    assert!(out.contains("publish alerts/a/temperature"), "{out}");
}

/// The real binary running `config` (`EDGEFN_LOG=info`) once it has logged
/// `Gateway started.`, and its stderr lines from then on.
pub(crate) fn run_binary(
    config: &std::path::Path,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let (child, lines, _) = start_binary(config);
    (child, lines)
}

/// [`run_binary`], and its `Gateway started.` line.
pub(crate) fn start_binary(
    config: &std::path::Path,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    String,
) {
    let mut child = Command::new(edgefn_bin())
        .args(["run", "--config"])
        .arg(config)
        .env("EDGEFN_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let started = wait_for_line(&lines, &["Gateway started."]);
    (child, lines, started)
}

/// Lines of a child's stderr, read on a thread.
pub(crate) fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (up to [`WAIT`]) for a line containing every one of `parts`.
pub(crate) fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, parts: &[&str]) -> String {
    let deadline = Instant::now() + WAIT;
    // What the process said instead, for the failure message.
    let mut seen: Vec<String> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).unwrap_or_else(|e| {
            panic!(
                "no log line with {parts:?} ({e}); the last lines:\n{}",
                seen.join("\n")
            )
        });
        if parts.iter().all(|p| line.contains(p)) {
            return line;
        }
        if seen.len() == 20 {
            seen.remove(0);
        }
        seen.push(line);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_changed_functions_and_keeps_serving_through_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("edgefn.toml");
    let write = |limit: &str| {
        std::fs::write(
            &config,
            format!(
                "[gateway]\nid = \"gw-hup\"\ndata_dir = \"data\"\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n[runtime]\nwatch_ms = 0\n[[functions]]\nname = \"threshold\"\ncomponent = {}\ntriggers = [\"sensors/+/temperature\"]\npublish = [\"alerts/#\"]\nconfig = {{ limit = \"{limit}\" }}\n",
                lit(&guest("threshold"))
            ),
        )
        .unwrap();
    };
    write("30");
    let (mut child, lines) = run_binary(&config);
    let mut alerts = Subscriber::connect("127.0.0.1", port, &["alerts/#"]).await;
    let mut sensor = Publisher::connect("127.0.0.1", port).await;
    sensor
        .publish("sensors/a/temperature", r#"{"value": 40}"#)
        .await;
    assert_eq!(alerts.next_json().await.1["limit"], 30.0);

    // A broken config is refused; the running one stays.
    std::fs::write(&config, "[gateway]\nid = ").unwrap();
    signal(&child, "HUP");
    wait_for_line(&lines, &["The new configuration is invalid"]);
    sensor
        .publish("sensors/a/temperature", r#"{"value": 41}"#)
        .await;
    assert_eq!(alerts.next_json().await.1["value"], 41.0);

    // A changed setting: the function is reloaded without a restart.
    write("50");
    signal(&child, "HUP");
    wait_for_line(&lines, &["Configuration reloaded.", "switched=1"]);
    sensor
        .publish("sensors/a/temperature", r#"{"value": 45}"#)
        .await;
    sensor
        .publish("sensors/a/temperature", r#"{"value": 60}"#)
        .await;
    let (_, alert) = alerts.next_json().await;
    assert_eq!(
        (alert["value"].as_f64(), alert["limit"].as_f64()),
        (Some(60.0), Some(50.0))
    );

    signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// `gateway.io_threads` sizes the binary's async runtime: one by default.
#[test]
fn io_threads_size_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edgefn.toml");
    for (line, want) in [("", "io_threads=1"), ("io_threads = 3\n", "io_threads=3")] {
        std::fs::write(
            &config,
            format!(
                "[gateway]\nid = \"gw-io\"\ndata_dir = \"data\"\n{line}[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{}\"\n",
                free_port()
            ),
        )
        .unwrap();
        let (child, _lines, started) = start_binary(&config);
        let _child = KillOnDrop(child);
        assert!(started.contains(want), "{started}");
    }
}

/// WIT additions are semver-compatible: a function built against
/// `edgefn:function@0.1.2` (kept as built in `tests/fixtures/`) runs on a
/// gateway whose WIT is newer.
#[test]
fn a_function_built_against_an_older_wit_still_runs() {
    let component = root().join("tests/fixtures/threshold-wit-0.1.2.wasm");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("edgefn.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw-compat\"\ndata_dir = \"data\"\n[[functions]]\nname = \"threshold\"\ncomponent = {}\ntriggers = [\"sensors/#\"]\npublish = [\"alerts/#\"]\n",
            lit(&component)
        ),
    )
    .unwrap();
    invoke_threshold(&config.display().to_string());
}
