//! `edgefn deploy` against a real Mosquitto, with small stand-in gateways
//! built on the fleet link (fetch the bundle of each new desired document,
//! report it running): a canary rollout to three gateways, and an unhealthy
//! canary rolled back while the others never see the new version.
//!
//! The stand-ins are not the gateway's agent (the full gateway tests live
//! with it); they check the deploy command's side of the protocol.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use edgefn::cli::{Command, execute};
use edgefn::config::MqttEndpoint;
use edgefn::fleet::deploy::{CloudArgs, DeployArgs};
use edgefn::fleet::desired::Desired;
use edgefn::fleet::keys::{SigningKey, TrustedKeys};
use edgefn::fleet::link::{self, LinkConfig};
use edgefn::fleet::report::{Health, ReportState, Reported, RunningBundle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::*;

/// A signing key file (`ed25519-secret:<base64 seed>`).
fn key_file(dir: &Path) -> PathBuf {
    use base64::Engine as _;
    let path = dir.join("deploy.key");
    let seed = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    std::fs::write(&path, format!("ed25519-secret:{seed}\n")).unwrap();
    path
}

/// A bundle file of `version` (the format `Bundle::inspect` reads).
fn bundle_file(dir: &Path, version: u64) -> PathBuf {
    let path = dir.join(format!("v{version}.bundle"));
    let mut bytes = format!("STUB {version}\n").into_bytes();
    bytes.extend((0..200_000u32).map(|i| (i * version as u32 % 251) as u8));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn now_ms() -> u64 {
    edgefn::fleet::deploy::status::now_ms()
}

/// A stand-in gateway: reports what it runs; on each new desired document
/// fetches the bundle and reports it running, with `bad_version`'s
/// functions failing every invocation.
fn stand_in(
    port: u16,
    gw: &str,
    trusted: TrustedKeys,
    bad_version: Option<u64>,
    cancel: CancellationToken,
) {
    let (link, mut desired) = link::start(
        LinkConfig {
            endpoint: MqttEndpoint {
                host: "127.0.0.1".into(),
                port,
                client_id: client_id(gw),
                credentials: None,
                tls: None,
            },
            gateway_id: gw.into(),
            keep_alive: Duration::from_secs(5),
            max_bundle_bytes: 1 << 20,
        },
        cancel,
        &TaskTracker::new(),
    );
    let gw = gw.to_owned();
    let report = move |bundle: Option<(String, u64)>, health: (u64, u64)| {
        let r = Reported {
            gateway: gw.clone(),
            reported_ms: now_ms(),
            state: ReportState::Running,
            bundle: bundle.map(|(sha256, version)| RunningBundle {
                sha256,
                version,
                applied_ms: now_ms(),
            }),
            desired: None,
            functions: vec![],
            since_apply: Health {
                invocations: health.0,
                failures: health.1,
                breaker_opens: 0,
            },
            last_refusal: None,
            last_error: None,
        };
        serde_json::to_vec(&r).unwrap()
    };
    link.report(report(None, (0, 0)));
    tokio::spawn(async move {
        let mut running: Option<String> = None;
        while let Some(payload) = desired.recv().await {
            let Ok((doc, _)) = Desired::open(&payload, &trusted) else {
                continue;
            };
            let sha = doc.bundle.as_ref().map(|b| b.sha256.clone());
            if sha == running {
                continue;
            }
            let bundle = match &doc.bundle {
                Some(b) => {
                    link.fetch(b, WAIT).await.unwrap();
                    Some((b.sha256.clone(), b.version))
                }
                None => None,
            };
            let version = bundle.as_ref().map(|b| b.1);
            let health = if version.is_some() && version == bad_version {
                (37, 37)
            } else {
                (112, 0)
            };
            running = sha;
            link.report(report(bundle, health));
        }
    });
}

fn deploy(port: u16, dir: &Path, version: u64, canary: Option<&str>) -> (ExitCode, String) {
    let args = DeployArgs {
        bundle: bundle_file(dir, version),
        cloud: CloudArgs {
            via: format!("mqtt://127.0.0.1:{port}"),
            ca: None,
            cert: None,
            client_key: None,
            username: None,
            password_file: None,
        },
        key: key_file(dir),
        gateways: vec!["gw1".into(), "gw2".into(), "gw3".into()],
        canary: canary.map(Into::into),
        bake_s: 1,
        timeout_s: 15,
        force: false,
        chunk_bytes: 64 * 1024,
        max_failure_rate: 0.05,
    };
    let mut out = Vec::new();
    let code = execute(Command::Deploy(args), &mut out).unwrap();
    (code, String::from_utf8(out).unwrap())
}

async fn fleet(port: u16, dir: &Path, bad_version: Option<u64>) -> CancellationToken {
    let key = SigningKey::read(&key_file(dir)).unwrap();
    let trusted = TrustedKeys(vec![key.public()]);
    let cancel = CancellationToken::new();
    for gw in ["gw1", "gw2", "gw3"] {
        let bad = (gw == "gw1").then_some(bad_version).flatten();
        stand_in(port, gw, trusted.clone(), bad, cancel.clone());
    }
    // Every stand-in's first report is retained before the deploy starts.
    let mut sub = Subscriber::connect("127.0.0.1", port, &["edgefn/fleet/+/reported"]).await;
    for _ in 0..3 {
        sub.next().await;
    }
    cancel
}

async fn run_deploy(
    port: u16,
    dir: &Path,
    version: u64,
    canary: Option<&str>,
) -> (ExitCode, String) {
    let dir = dir.to_owned();
    let canary = canary.map(str::to_owned);
    tokio::task::spawn_blocking(move || deploy(port, &dir, version, canary.as_deref()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_rollout_reaches_every_gateway() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cancel = fleet(broker.port, dir.path(), None).await;
    let (code, out) = run_deploy(broker.port, dir.path(), 2, Some("gw1")).await;
    println!("{out}");
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert!(
        out.contains("canary gw1 runs version 2; baking 1 s"),
        "{out}"
    );
    for gw in ["gw1", "gw2", "gw3"] {
        assert!(out.contains(&format!("{gw}: running version 2")), "{out}");
    }
    assert!(
        out.contains("deployed version 2 to 3 gateways in "),
        "{out}"
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_canary_is_rolled_back_and_the_rest_never_get_the_version() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cancel = fleet(broker.port, dir.path(), Some(3)).await;
    let (code, out) = run_deploy(broker.port, dir.path(), 1, None).await;
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    let (code, out) = run_deploy(broker.port, dir.path(), 3, Some("gw1")).await;
    println!("{out}");
    assert_eq!(code, ExitCode::from(3), "{out}");
    assert!(
        out.contains(
            "canary gw1 unhealthy: 37 failures in 37 invocations (previous version 0 in 112); rolled back to version 1"
        ),
        "{out}"
    );
    assert!(
        out.contains("gw2: not deployed (the canary failed)"),
        "{out}"
    );
    // gw2 and gw3 still run version 1, and the canary is back on it.
    let mut sub = Subscriber::connect("127.0.0.1", broker.port, &["edgefn/fleet/+/reported"]).await;
    for _ in 0..3 {
        let (topic, payload) = sub.next().await;
        let r: Reported = serde_json::from_slice(&payload).unwrap();
        assert_eq!(r.bundle.map(|b| b.version), Some(1), "{topic}");
    }
    cancel.cancel();
}
