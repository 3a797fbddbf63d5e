//! The cloud side of the agent: each desired document from the fleet link
//! is verified (signed by a trusted key, addressed to this gateway, not
//! older than the one applied), its bundle fetched (or taken from
//! `data_dir/fleet/` when already there) and applied; the reported state is
//! published after every change and every `fleet.report_interval_s`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::apply::{ApplyOptions, Fleet, Refused, short};
use super::desired::{BundleRef, Desired};
use super::link::Link;
use super::report::{DesiredSummary, ReportState};

/// How long fetching a bundle may take: a minute, plus a second per 64 KiB.
fn fetch_timeout(size: u64) -> Duration {
    Duration::from_secs(60 + size / (64 * 1024))
}

/// How long after a failed fetch the same desired document is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// How handling one desired document ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Applied, already running, or refused for what it is: the same
    /// document would end the same way.
    Final,
    /// The bundle could not be fetched: try again later.
    Retry,
}

/// Handles desired documents and reports until `cancel`. A document is
/// handled on a task of its own, so reports keep going out during a long
/// fetch; the newest document waits for it (older waiting ones are
/// skipped); a fetch that failed is retried after [`RETRY`].
pub(crate) async fn run(
    fleet: Arc<Fleet>,
    link: Link,
    mut desired: mpsc::Receiver<Vec<u8>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(fleet.spec.report_interval);
    let (done_tx, mut done) = mpsc::channel::<(Vec<u8>, Outcome)>(1);
    let mut handled: Option<Vec<u8>> = None;
    let mut next: Option<Vec<u8>> = None;
    let mut running: Option<tokio::task::JoinHandle<()>> = None;
    let mut retry: Option<(Vec<u8>, tokio::time::Instant)> = None;
    loop {
        if running.is_none()
            && let Some(payload) = next.take()
            // A reconnect delivers the retained document again.
            && handled.as_deref() != Some(payload.as_slice())
        {
            let (fleet, link, tx) = (fleet.clone(), link.clone(), done_tx.clone());
            running = Some(tokio::spawn(async move {
                let outcome = fleet.handle_desired(&link, &payload).await;
                let _ = tx.send((payload, outcome)).await;
            }));
        }
        let retry_at = retry.as_ref().map(|(_, at)| *at);
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
            () = fleet.changed.notified() => {}
            payload = desired.recv() => {
                let Some(payload) = payload else { break };
                retry = None;
                next = Some(payload);
            }
            Some((payload, outcome)) = done.recv() => {
                running = None;
                match outcome {
                    Outcome::Final => handled = Some(payload),
                    Outcome::Retry if next.is_none() => {
                        retry = Some((payload, tokio::time::Instant::now() + RETRY));
                    }
                    Outcome::Retry => {}
                }
            }
            () = sleep_until(retry_at), if retry_at.is_some() => {
                if let Some((payload, _)) = retry.take() {
                    next.get_or_insert(payload);
                }
            }
        }
        link.report(fleet.report_json());
    }
    // Stopping: an apply cut short leaves the recorded set (see `apply`).
    if let Some(task) = running {
        task.abort();
    }
    tracing::debug!("Fleet agent stopped.");
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Fleet {
    /// Verifies one desired document and brings the gateway to it.
    pub(crate) async fn handle_desired(&self, link: &Link, payload: &[u8]) -> Outcome {
        let Some(desired) = self.accept(payload) else {
            return Outcome::Final;
        };
        let Some(r) = desired.bundle else {
            let _ = self.apply_none(desired.issued_ms).await;
            return Outcome::Final;
        };
        let Some(bytes) = self.obtain(link, &r).await else {
            return Outcome::Retry;
        };
        let opts = ApplyOptions {
            force: desired.force,
            issued_ms: Some(desired.issued_ms),
            expect_version: Some(r.version),
        };
        let _ = self.apply_bundle(bytes, opts).await;
        Outcome::Final
    }

    /// The desired document in `payload` if it is signed by a trusted key,
    /// addressed to this gateway, not older than the newest one applied, and
    /// names a bundle this gateway may take; else the refusal is recorded.
    fn accept(&self, payload: &[u8]) -> Option<Desired> {
        let desired = match Desired::open(payload, &self.spec.trusted_keys) {
            Ok((d, _signer)) => d,
            Err(e) => {
                let reason = format!("desired state refused: {e}");
                self.refuse(&Refused::new(None, None, reason));
                return None;
            }
        };
        let (sha, version) = desired
            .bundle
            .as_ref()
            .map_or((None, None), |b| (Some(b.sha256.clone()), Some(b.version)));
        let refuse = |reason: String| {
            self.refuse(&Refused::new(sha.clone(), version, reason));
            None
        };
        if desired.gateway != self.gateway_id {
            return refuse(format!(
                "desired state addressed to gateway `{}`, not `{}`",
                desired.gateway, self.gateway_id
            ));
        }
        let mark = self.state().issued_mark;
        if mark > 0 && desired.issued_ms == mark {
            // The document applied last, delivered again (a reconnect, a
            // restart); a bundle put on the board since then stays.
            tracing::debug!(issued_ms = mark, "Fleet: desired state already applied.");
            return None;
        }
        if desired.issued_ms < mark {
            return refuse(format!(
                "desired state issued at {} ms is older than one already applied ({mark} ms): a replay, or the deploying machine's clock is behind",
                desired.issued_ms
            ));
        }
        if let Some(r) = &desired.bundle
            && r.size > self.spec.max_bundle_bytes
        {
            return refuse(format!(
                "bundle of {} bytes exceeds fleet.max_bundle_bytes ({})",
                r.size, self.spec.max_bundle_bytes
            ));
        }
        self.state().desired = Some(DesiredSummary {
            sha256: sha,
            version,
            force: desired.force,
            issued_ms: desired.issued_ms,
        });
        Some(desired)
    }

    /// The bundle's bytes: from `data_dir/fleet/` when already there, else
    /// fetched over the link. `None` after a failed fetch (recorded as
    /// `failed`, tried again later).
    async fn obtain(&self, link: &Link, r: &BundleRef) -> Option<Vec<u8>> {
        let store = self.store.clone();
        let sha = r.sha256.clone();
        let kept = tokio::task::spawn_blocking(move || store.read_bundle(&sha)).await;
        if let Ok(Ok(Some(bytes))) = kept {
            return Some(bytes);
        }
        self.set_phase(ReportState::Applying);
        tracing::info!(bundle = %short(&r.sha256), version = r.version, size = r.size, chunks = r.chunks, "Fleet: fetching bundle.");
        match link.fetch(r, fetch_timeout(r.size)).await {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                tracing::warn!(bundle = %short(&r.sha256), error = %e, retry_s = RETRY.as_secs(), "Fleet: fetching the bundle failed; trying again later.");
                {
                    let mut state = self.state();
                    state.last_error = Some(format!("fetching bundle {}: {e}", short(&r.sha256)));
                    state.phase = ReportState::Failed;
                }
                self.changed.notify_one();
                None
            }
        }
    }
}
