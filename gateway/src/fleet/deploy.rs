//! `edgefn deploy` and `edgefn status`: the operator's side of the fleet.
//! Deploy publishes a bundle's chunks and signed desired documents on the
//! cloud broker and follows the gateways' reports through a canary rollout
//! ([`rollout`]); status prints the gateways' reported states.

pub mod cloud;
pub mod rollout;
pub mod status;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use self::cloud::Cloud;
use self::rollout::{Action, GatewayResult, Outcome, Plan, Rollback, Rollout};
use super::bundle::{Bundle, BundleLimits};
use super::chunks::{DEFAULT_CHUNK_BYTES, bundle_ref};
use super::desired::{BundleRef, Desired};
use super::keys::{SigningKey, TrustedKeys};
use super::report::Reported;
use super::topics;
use crate::config::MqttEndpoint;

/// Longest `--bake-s`, `--timeout-s` or `--wait-s`: a week.
const MAX_WAIT_S: u64 = 7 * 24 * 3600;

/// Largest bundle file `edgefn deploy` reads.
const MAX_BUNDLE_FILE: u64 = 256 * 1024 * 1024;

/// Exit code of a deploy that did not complete (refusal, timeout, unhealthy
/// canary); 1 is an error before the rollout (flags, files, connection).
pub const EXIT_ROLLOUT_FAILED: u8 = 3;

/// How to reach the cloud broker (as an MQTT sink's settings).
#[derive(Debug, Clone, clap::Args)]
pub struct CloudArgs {
    /// The cloud broker: `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    #[arg(long)]
    pub via: String,
    /// PEM CA certificate(s) of the broker (required with `mqtts://`).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS (with `--client-key`).
    #[arg(long, requires = "client_key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of `--cert`.
    #[arg(long, requires = "cert")]
    pub client_key: Option<PathBuf>,
    /// MQTT user name.
    #[arg(long)]
    pub username: Option<String>,
    /// A file whose first line is the MQTT password.
    #[arg(long, requires = "username")]
    pub password_file: Option<PathBuf>,
}

/// `edgefn deploy`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct DeployArgs {
    /// The bundle file (`edgefn bundle`).
    pub bundle: PathBuf,
    /// The cloud broker.
    #[command(flatten)]
    pub cloud: CloudArgs,
    /// The signing key (`edgefn keygen`); gateways must trust its public key.
    #[arg(long)]
    pub key: PathBuf,
    /// The gateways to deploy to, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub gateways: Vec<String>,
    /// Deploy to this gateway first, bake, and stop (rolling it back) if it
    /// is unhealthy. One of `--gateways`.
    #[arg(long)]
    pub canary: Option<String>,
    /// Seconds the canary runs the new bundle before the rest get it.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=MAX_WAIT_S))]
    pub bake_s: u64,
    /// Seconds to wait for the gateways of each step to report.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=MAX_WAIT_S))]
    pub timeout_s: u64,
    /// Apply even if not newer than what a gateway runs.
    #[arg(long)]
    pub force: bool,
    /// Bytes per chunk message (at most 1 MiB; AWS IoT Core takes 128 KB).
    #[arg(long, default_value_t = DEFAULT_CHUNK_BYTES)]
    pub chunk_bytes: u32,
    /// How much the canary's failure rate may exceed the previous
    /// version's (0.05 = 5 percentage points).
    #[arg(long, default_value_t = 0.05)]
    pub max_failure_rate: f64,
}

/// `edgefn status`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The cloud broker.
    #[command(flatten)]
    pub cloud: CloudArgs,
    /// Only these gateways (comma-separated); each must have a report.
    #[arg(long, value_delimiter = ',')]
    pub gateways: Vec<String>,
    /// Seconds to wait for the retained reports.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=MAX_WAIT_S))]
    pub wait_s: u64,
}

/// Seconds to wait for the connection and each acknowledgement.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

impl CloudArgs {
    /// The endpoint, checked like an MQTT sink's (TLS files read).
    pub fn endpoint(&self, tool: &str) -> anyhow::Result<MqttEndpoint> {
        let password = match &self.password_file {
            Some(f) => {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("--password-file `{}`", f.display()))?;
                Some(text.lines().next().unwrap_or_default().to_owned())
            }
            None => None,
        };
        let secure = self.via.starts_with("mqtts://");
        anyhow::ensure!(
            !secure || self.ca.is_some(),
            "--via `{}` uses TLS: give the broker's PEM CA certificate(s) with --ca",
            self.via
        );
        anyhow::ensure!(
            secure || (self.ca.is_none() && self.cert.is_none()),
            "--ca and --cert need an `mqtts://` --via"
        );
        let tls = secure.then(|| crate::config::schema::TlsConfig {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.client_key.clone(),
            alpn: vec![],
        });
        let client_id = format!(
            "edgefn-{tool}-{}-{}",
            std::process::id(),
            status::now_ms() % 100_000
        );
        crate::config::endpoint_from_flags(
            std::path::Path::new("--via"),
            &self.via,
            client_id,
            self.username.as_deref(),
            password.as_deref(),
            tls.as_ref(),
        )
        .map_err(|errors| {
            let lines: Vec<String> = errors
                .0
                .iter()
                .map(|e| format!("{}: {}", flag(&e.key), e.reason))
                .collect();
            anyhow::anyhow!("{}", lines.join("\n"))
        })
    }
}

/// The command-line flag behind a key of `config::endpoint_from_flags`.
fn flag(key: &str) -> &'static str {
    match key {
        "cloud.tls" | "cloud.tls.ca" => "--ca",
        "cloud.tls.cert" => "--cert",
        "cloud.tls.key" => "--client-key",
        "cloud.password" => "--password-file",
        _ => "--via",
    }
}

fn check_gateways(list: &[String]) -> anyhow::Result<()> {
    for g in list {
        anyhow::ensure!(
            topics::is_gateway_id(g),
            "--gateways: `{}` is not a gateway id (1 to 64 letters, digits, `-`, `_`, `.`)",
            g.escape_debug()
        );
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `edgefn status`.
pub fn status(args: StatusArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    check_gateways(&args.gateways)?;
    let endpoint = args.cloud.endpoint("status")?;
    let reports = runtime()?.block_on(async {
        let mut cloud = Cloud::connect(&endpoint, CONNECT_WAIT).await?;
        let wait = Duration::from_secs(args.wait_s);
        anyhow::Ok(
            status::collect(&mut cloud, &args.gateways, &[], wait)
                .await?
                .0,
        )
    })?;
    let missing = status::table(out, &reports, &args.gateways, status::now_ms())?;
    if !missing.is_empty() {
        writeln!(out, "no report from {}", missing.join(", "))?;
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `edgefn deploy`.
pub fn deploy(mut args: DeployArgs, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    check_gateways(&args.gateways)?;
    let mut seen = std::collections::BTreeSet::new();
    args.gateways.retain(|g| seen.insert(g.clone()));
    if let Some(c) = &args.canary {
        anyhow::ensure!(
            args.gateways.contains(c),
            "--canary `{c}` must be one of --gateways"
        );
    }
    anyhow::ensure!(
        args.max_failure_rate.is_finite() && args.max_failure_rate >= 0.0,
        "--max-failure-rate must be a number of at least 0"
    );
    let file = args.bundle.display().to_string();
    let bytes = std::fs::read(&args.bundle).with_context(|| format!("reading `{file}`"))?;
    let limits = BundleLimits {
        max_bytes: MAX_BUNDLE_FILE,
    };
    let (manifest, sha256, signer) =
        Bundle::inspect(&bytes, &limits).map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
    let key = SigningKey::read(&args.key).map_err(|e| anyhow::anyhow!("--key: {e}"))?;
    if signer != key.public() {
        writeln!(
            out,
            "note: the bundle is signed by key {}, the desired documents will be by key {}; gateways must trust both",
            signer.id(),
            key.public().id()
        )?;
    }
    let r = bundle_ref(&bytes, manifest.version, args.chunk_bytes)
        .map_err(|e| anyhow::anyhow!("--chunk-bytes: {e}"))?;
    debug_assert_eq!(r.sha256, sha256);
    let endpoint = args.cloud.endpoint("deploy")?;
    let started = std::time::Instant::now();
    let outcome = runtime()?.block_on(run(&args, &endpoint, &key, &bytes, r.clone(), out))?;
    report_outcome(out, &args, &r, &outcome, started.elapsed())
}

async fn run(
    args: &DeployArgs,
    endpoint: &MqttEndpoint,
    key: &SigningKey,
    bytes: &[u8],
    r: BundleRef,
    out: &mut dyn Write,
) -> anyhow::Result<Outcome> {
    let mut cloud = Cloud::connect(endpoint, CONNECT_WAIT).await?;
    let timeout = Duration::from_secs(args.timeout_s);
    let extra: Vec<String> = args.canary.iter().map(|c| topics::desired(c)).collect();
    let (baseline, others) =
        status::collect(&mut cloud, &args.gateways, &extra, Duration::from_secs(3)).await?;
    for g in args.gateways.iter().filter(|g| !baseline.contains_key(*g)) {
        writeln!(out, "{g}: not seen yet (no report); deploying anyway")?;
    }
    let rollback = rollback_target(args.canary.as_deref(), &r, &baseline, &others, key);
    let issued_floor = issued_floor(&args.gateways, &baseline);
    cloud::publish_bundle(&mut cloud, bytes, &r, timeout.max(CONNECT_WAIT)).await?;
    writeln!(
        out,
        "published bundle version {} ({}…, {} bytes in {} chunk(s))",
        r.version,
        &r.sha256[..12],
        r.size,
        r.chunks
    )?;
    let plan = Plan {
        gateways: args.gateways.clone(),
        canary: args.canary.clone(),
        bundle: r,
        force: args.force,
        bake: Duration::from_secs(args.bake_s),
        timeout,
        max_failure_rate: args.max_failure_rate,
    };
    let (mut rollout, actions) = Rollout::new(plan, baseline, rollback, std::time::Instant::now());
    perform(&mut cloud, key, issued_floor, &others, actions, out).await?;
    loop {
        if let Some(outcome) = rollout.outcome() {
            return Ok(outcome.clone());
        }
        let deadline = rollout.next_deadline().map_or_else(
            || tokio::time::Instant::now() + timeout,
            tokio::time::Instant::from_std,
        );
        let actions = match cloud.next_message(deadline).await? {
            Some((topic, payload)) => match topics::reported_gateway(&topic) {
                Some(gw) => match status::parse(gw, &payload) {
                    Ok(report) => rollout.on_report(report, std::time::Instant::now()),
                    Err(e) => {
                        eprintln!("warning: {topic}: {e}");
                        vec![]
                    }
                },
                None => vec![],
            },
            None => rollout.on_tick(std::time::Instant::now()),
        };
        perform(&mut cloud, key, issued_floor, &others, actions, out).await?;
    }
}

/// The lowest `issued_ms` this deploy may use: one more than the newest
/// desired document any target gateway reports having seen, so a deploy
/// machine whose clock is behind another's is not taken for a replay.
fn issued_floor(gateways: &[String], baseline: &BTreeMap<String, Reported>) -> u64 {
    gateways
        .iter()
        .filter_map(|g| baseline.get(g)?.desired.as_ref())
        .map(|d| d.issued_ms.saturating_add(1))
        .max()
        .unwrap_or(0)
}

/// Where the canary goes back to: the bundle it reported before, as
/// announced in its previous desired document (readable with this key).
/// Unknown if the canary already ran the new bundle (`new`) before this
/// deploy: going "back" to it would change nothing.
fn rollback_target(
    canary: Option<&str>,
    new: &BundleRef,
    baseline: &BTreeMap<String, Reported>,
    others: &[(String, Vec<u8>)],
    key: &SigningKey,
) -> Rollback {
    let Some(canary) = canary else {
        return Rollback::To(None);
    };
    let Some(report) = baseline.get(canary) else {
        return Rollback::Unknown(format!("{canary} had not reported what it ran before"));
    };
    let Some(running) = &report.bundle else {
        return Rollback::To(None);
    };
    if running.sha256 == new.sha256 {
        return Rollback::Unknown("the canary already ran this bundle before this deploy".into());
    }
    let topic = topics::desired(canary);
    let trusted = TrustedKeys(vec![key.public()]);
    let previous = others
        .iter()
        .filter(|(t, _)| *t == topic)
        .filter_map(|(_, payload)| Desired::open(payload, &trusted).ok())
        .filter_map(|(doc, _)| doc.bundle)
        .find(|b| b.sha256 == running.sha256);
    match previous {
        Some(b) => Rollback::To(Some(b)),
        None => Rollback::Unknown(format!(
            "no desired document for its version {} signed with this key on {topic}",
            running.version
        )),
    }
}

async fn perform(
    cloud: &mut Cloud,
    key: &SigningKey,
    issued_floor: u64,
    retained: &[(String, Vec<u8>)],
    actions: Vec<Action>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    for action in actions {
        match action {
            Action::Say(line) => writeln!(out, "{line}")?,
            Action::RestorePrevious { gateway } => {
                // The document read before this deploy, unchanged (empty:
                // there was none, and an empty retained message clears it).
                let topic = topics::desired(&gateway);
                let previous = retained
                    .iter()
                    .find(|(t, _)| *t == topic)
                    .map(|(_, p)| p.clone())
                    .unwrap_or_default();
                let what = if previous.is_empty() {
                    "cleared"
                } else {
                    "restored"
                };
                cloud
                    .publish_retained(vec![(topic, previous)], CONNECT_WAIT)
                    .await
                    .context("restoring the previous desired document")?;
                writeln!(out, "previous desired state {what} for {gateway}")?;
            }
            Action::Publish {
                gateways,
                bundle,
                force,
            } => {
                let messages = gateways
                    .iter()
                    .map(|g| {
                        let doc = Desired {
                            gateway: g.clone(),
                            bundle: bundle.clone(),
                            force,
                            issued_ms: status::now_ms().max(issued_floor),
                        };
                        (topics::desired(g), doc.sign(key))
                    })
                    .collect();
                cloud
                    .publish_retained(messages, CONNECT_WAIT)
                    .await
                    .context("publishing the desired documents")?;
                writeln!(out, "desired state published for {}", gateways.join(", "))?;
            }
        }
    }
    Ok(())
}

fn report_outcome(
    out: &mut dyn Write,
    args: &DeployArgs,
    r: &BundleRef,
    outcome: &Outcome,
    elapsed: Duration,
) -> anyhow::Result<ExitCode> {
    let mut failed = Vec::new();
    for (gw, result) in &outcome.results {
        let line = match result {
            GatewayResult::Running => format!("running version {}", r.version),
            GatewayResult::Refused(why) => format!("refused: {why}"),
            GatewayResult::Failed(why) => format!("failed: {why}"),
            GatewayResult::TimedOut => format!("not reported within {} s", args.timeout_s),
            // The story is printed once, below.
            GatewayResult::Unhealthy(_) => "unhealthy canary".to_owned(),
            GatewayResult::NotDeployed => "not deployed (the canary failed)".to_owned(),
        };
        writeln!(out, "{gw}: {}", line.escape_debug())?;
        if *result != GatewayResult::Running {
            failed.push(gw.as_str());
        }
    }
    let secs = elapsed.as_secs_f64();
    let n = outcome.results.len();
    if outcome.ok() {
        writeln!(
            out,
            "deployed version {} to {n} gateway{} in {secs:.1} s",
            r.version,
            if n == 1 { "" } else { "s" }
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(story) = &outcome.canary {
        writeln!(out, "{}", story.escape_debug())?;
    }
    writeln!(
        out,
        "deploy of version {} failed after {secs:.1} s: not running on {}",
        r.version,
        failed.join(", ")
    )?;
    Ok(ExitCode::from(EXIT_ROLLOUT_FAILED))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::report::{DesiredSummary, ReportState, RunningBundle};

    fn bundle(sha: char, version: u64) -> BundleRef {
        BundleRef::new(sha.to_string().repeat(64), version, 10, 1024)
    }

    fn report(gw: &str, running: Option<&BundleRef>, issued_ms: u64) -> Reported {
        Reported {
            gateway: gw.into(),
            reported_ms: 1,
            state: ReportState::Running,
            bundle: running.map(|b| RunningBundle {
                sha256: b.sha256.clone(),
                version: b.version,
                applied_ms: 1,
            }),
            desired: Some(DesiredSummary {
                sha256: running.map(|b| b.sha256.clone()),
                version: running.map(|b| b.version),
                force: false,
                issued_ms,
            }),
            functions: vec![],
            since_apply: Default::default(),
            last_refusal: None,
            last_error: None,
        }
    }

    fn key() -> SigningKey {
        let dir = tempfile::tempdir().unwrap();
        SigningKey::read(&super::super::keys::keygen(dir.path()).unwrap().0).unwrap()
    }

    fn desired_doc(gw: &str, b: &BundleRef, key: &SigningKey) -> (String, Vec<u8>) {
        let doc = Desired {
            gateway: gw.into(),
            bundle: Some(b.clone()),
            force: false,
            issued_ms: 1,
        };
        (topics::desired(gw), doc.sign(key))
    }

    #[test]
    fn rollback_is_the_previous_bundle_never_the_new_one() {
        let key = key();
        let (old, new) = (bundle('b', 1), bundle('a', 2));
        let on_old = BTreeMap::from([("gw1".to_owned(), report("gw1", Some(&old), 1))]);
        let others = vec![desired_doc("gw1", &old, &key)];
        assert_eq!(
            rollback_target(Some("gw1"), &new, &on_old, &others, &key),
            Rollback::To(Some(old))
        );
        // A re-run after the canary already took the new bundle: its
        // retained desired document names the new bundle.
        let on_new = BTreeMap::from([("gw1".to_owned(), report("gw1", Some(&new), 1))]);
        let others = vec![desired_doc("gw1", &new, &key)];
        assert_eq!(
            rollback_target(Some("gw1"), &new, &on_new, &others, &key),
            Rollback::Unknown("the canary already ran this bundle before this deploy".into())
        );
    }

    #[test]
    fn issued_after_every_target_gateways_last_desired_document() {
        let gws: Vec<String> = vec!["gw1".into(), "gw2".into()];
        let b = bundle('a', 1);
        // gw2 saw a document from a deploy machine whose clock is an hour
        // ahead of ours; gw3 is not a target.
        let ahead = status::now_ms() + 3_600_000;
        let baseline = BTreeMap::from([
            ("gw1".to_owned(), report("gw1", Some(&b), 5)),
            ("gw2".to_owned(), report("gw2", Some(&b), ahead)),
            ("gw3".to_owned(), report("gw3", Some(&b), u64::MAX - 1)),
        ]);
        let floor = issued_floor(&gws, &baseline);
        assert_eq!(floor, ahead + 1);
        assert!(status::now_ms().max(floor) > ahead);
        assert_eq!(issued_floor(&gws, &BTreeMap::new()), 0);
        let saturated = BTreeMap::from([("gw1".to_owned(), report("gw1", None, u64::MAX))]);
        assert_eq!(issued_floor(&gws, &saturated), u64::MAX);
    }
}
