//! Fleet deploy figures (issue 15), with the release binary on loopback:
//!
//! 1. **deploy → all running**: `edgefn deploy` of a new version to three
//!    gateways (each with its embedded broker) through a Mosquitto cloud,
//!    from the command's start until it exits having seen all three report
//!    the new version; `EDGEFN_BENCH_DEPLOYS` (default 10) deploys, each a
//!    real change of a 10-function bundle;
//! 2. **bundle overhead**: the bundle's size over its distinct components';
//! 3. **apply of 10 functions**: `PUT /bundle` on one gateway until it
//!    answers, with the components compiled on the board (compile cache
//!    off) and precompiled for this machine (`edgefn bundle --target`);
//!    `EDGEFN_BENCH_APPLIES` (default 5) each.
//!
//! `cargo build --release -p edgefn && cargo xtask functions && cargo bench
//! -p edgefn-tests --bench fleet` (needs `/usr/sbin/mosquitto`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark harness"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/mod.rs"]
mod common;
use common::{env_or, target_dir};

const TOKEN: &str = "fleet-bench-token-0123456789";
/// The guests the bundle draws its ten functions from.
const GUESTS: [&str; 5] = [
    "threshold",
    "enrich",
    "cbor_decode",
    "moving_average",
    "misbehave",
];

fn bin() -> PathBuf {
    let bin = target_dir().join("release/edgefn");
    assert!(
        bin.exists(),
        "build it first: cargo build --release -p edgefn"
    );
    bin
}

fn guest(name: &str) -> PathBuf {
    let p = target_dir().join(format!("wasm32-wasip2/guest/{name}.wasm"));
    assert!(p.exists(), "build the guests first: cargo xtask functions");
    p
}

fn run(args: &[&str]) -> String {
    let out = Command::new(bin()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "edgefn {args:?} failed:\n{text}");
    text
}

/// Kills its process on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mosquitto(dir: &Path, port: u16) -> Proc {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("/usr/sbin/mosquitto runs");
    wait_port(port);
    Proc(child)
}

/// Starts gateway `id`; returns it and its admin port.
fn gateway(dir: &Path, id: &str, cloud: u16, public: &Path, cache: bool) -> (Proc, u16) {
    let home = dir.join(id);
    std::fs::create_dir_all(&home).unwrap();
    let (port, admin) = (common::free_port(), common::free_port());
    let toml = format!(
        "[gateway]\nid = \"{id}\"\ndata_dir = \"data\"\n\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n\n[runtime]\ncompile_cache = {cache}\n\n[[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\nurl = \"mqtt://127.0.0.1:{cloud}\"\n\n[fleet]\nsink = \"cloud\"\ntrusted_keys = [{:?}]\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"{TOKEN}\"\n",
        public.display().to_string()
    );
    let config = home.join("edgefn.toml");
    std::fs::write(&config, toml).unwrap();
    let child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("EDGEFN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(admin);
    (Proc(child), admin)
}

/// Ten functions over the guests, `round` in each one's config (every
/// round is a real change).
fn functions(round: usize) -> String {
    (0..10)
        .map(|i| {
            format!(
                "[[functions]]\nname = \"f{i}\"\ncomponent = {:?}\ntriggers = [\"in/{i}\"]\npublish = [\"out/#\", \"alerts/#\", \"echo/#\"]\nconfig = {{ round = \"{round}\", mode = \"echo\" }}\n",
                guest(GUESTS[i % GUESTS.len()]).display().to_string()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn bundle(dir: &Path, key: &Path, round: usize, targets: &[&str]) -> PathBuf {
    let toml = dir.join(format!("r{round}.toml"));
    std::fs::write(&toml, functions(round)).unwrap();
    let out = dir.join(format!("r{round}-{}.bundle", targets.len()));
    let mut args = vec![
        "bundle".to_owned(),
        "--functions".to_owned(),
        toml.display().to_string(),
        "--key".to_owned(),
        key.display().to_string(),
        "--out".to_owned(),
        out.display().to_string(),
        "--version".to_owned(),
        (round + 1).to_string(),
    ];
    for t in targets {
        args.push("--target".to_owned());
        args.push((*t).to_owned());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&refs);
    out
}

fn stats(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pick = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    println!(
        "{name}: median {:.0} ms, p99 {:.0} ms, min {:.0} ms, max {:.0} ms (n = {})",
        pick(0.5),
        pick(0.99),
        pick(0.0),
        pick(1.0),
        samples.len()
    );
}

fn put(admin: u16, bundle: &Path) -> Duration {
    let body = std::fs::read(bundle).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let start = Instant::now();
        let r = reqwest::Client::new()
            .put(format!("http://127.0.0.1:{admin}/bundle"))
            .bearer_auth(TOKEN)
            .body(body)
            .send()
            .await
            .unwrap();
        let elapsed = start.elapsed();
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        assert!(status.is_success(), "{status}: {text}");
        elapsed
    })
}

fn host_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

fn main() {
    let deploys: usize = env_or("EDGEFN_BENCH_DEPLOYS", 10);
    let applies: usize = env_or("EDGEFN_BENCH_APPLIES", 5);
    let dir = tempfile::tempdir().unwrap();
    let cloud = common::free_port();
    let _cloud = mosquitto(dir.path(), cloud);
    let keys = dir.path().join("keys");
    run(&["keygen", "--out", keys.to_str().unwrap()]);
    let key = keys.join("edgefn.key");
    let public = keys.join("edgefn.pub");

    // 2. Overhead.
    let first = bundle(dir.path(), &key, 0, &[]);
    let raw: u64 = GUESTS
        .iter()
        .map(|g| std::fs::metadata(guest(g)).unwrap().len())
        .sum();
    let size = std::fs::metadata(&first).unwrap().len();
    println!(
        "bundle of 10 functions over {} distinct components: {size} bytes, components {raw} bytes, overhead {} bytes ({:.2} %)",
        GUESTS.len(),
        size - raw,
        (size - raw) as f64 * 100.0 / raw as f64
    );

    // 1. Deploy to three gateways.
    let gateways: Vec<(Proc, u16)> = ["b1", "b2", "b3"]
        .iter()
        .map(|id| gateway(dir.path(), id, cloud, &public, true))
        .collect();
    let via = format!("mqtt://127.0.0.1:{cloud}");
    let mut times = Vec::new();
    for round in 0..deploys {
        let b = if round == 0 {
            first.clone()
        } else {
            bundle(dir.path(), &key, round, &[])
        };
        let start = Instant::now();
        run(&[
            "deploy",
            b.to_str().unwrap(),
            "--via",
            &via,
            "--key",
            key.to_str().unwrap(),
            "--gateways",
            "b1,b2,b3",
        ]);
        times.push(start.elapsed());
    }
    stats("deploy -> 3 gateways running (10 functions)", times);
    drop(gateways);

    // 3. Apply on one board: compiled there, and precompiled.
    let (_gw, admin) = gateway(dir.path(), "apply", cloud, &public, false);
    let triple = host_triple();
    let mut compiled = Vec::new();
    let mut precompiled = Vec::new();
    for i in 0..applies {
        let round = 100 + 2 * i;
        compiled.push(put(admin, &bundle(dir.path(), &key, round, &[])));
        precompiled.push(put(admin, &bundle(dir.path(), &key, round + 1, &[&triple])));
    }
    stats("apply 10 functions, compiled on the board", compiled);
    stats(
        &format!("apply 10 functions, precompiled for {triple}"),
        precompiled,
    );
}
