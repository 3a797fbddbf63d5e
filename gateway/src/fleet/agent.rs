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
use super::desired::Desired;
use super::link::Link;
use super::report::{DesiredSummary, ReportState};

/// How long fetching a bundle may take: a minute, plus a second per 64 KiB.
fn fetch_timeout(size: u64) -> Duration {
    Duration::from_secs(60 + size / (64 * 1024))
}

/// Handles desired documents and reports until `cancel`.
pub(crate) async fn run(
    fleet: Arc<Fleet>,
    link: Link,
    mut desired: mpsc::Receiver<Vec<u8>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(fleet.spec.report_interval);
    let mut last: Option<Vec<u8>> = None;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
            () = fleet.changed.notified() => {}
            payload = desired.recv() => {
                let Some(payload) = payload else { break };
                // A reconnect delivers the retained document again.
                if last.as_deref() == Some(payload.as_slice()) {
                    continue;
                }
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = fleet.handle_desired(&link, &payload) => {}
                }
                last = Some(payload);
            }
        }
        link.report(fleet.report_json());
    }
    tracing::debug!("Fleet agent stopped.");
}

impl Fleet {
    /// Verifies one desired document and brings the gateway to it.
    async fn handle_desired(&self, link: &Link, payload: &[u8]) {
        let desired = match Desired::open(payload, &self.spec.trusted_keys) {
            Ok((d, _signer)) => d,
            Err(e) => {
                self.refuse(&Refused::new(
                    None,
                    None,
                    format!("desired state refused: {e}"),
                ));
                return;
            }
        };
        let (sha, version) = desired
            .bundle
            .as_ref()
            .map_or((None, None), |b| (Some(b.sha256.clone()), Some(b.version)));
        let refuse = |reason: String| Refused::new(sha.clone(), version, reason);
        if desired.gateway != self.gateway_id {
            self.refuse(&refuse(format!(
                "desired state addressed to gateway `{}`, not `{}`",
                desired.gateway, self.gateway_id
            )));
            return;
        }
        let applied_issue = self.state().current.as_ref().map(|c| c.issued_ms);
        if let Some(applied) = applied_issue
            && desired.issued_ms < applied
        {
            self.refuse(&refuse(format!(
                "desired state issued at {} ms is older than the one applied ({applied} ms): a replay",
                desired.issued_ms
            )));
            return;
        }
        self.state().desired = Some(DesiredSummary {
            sha256: sha.clone(),
            version,
            force: desired.force,
            issued_ms: desired.issued_ms,
        });
        let Some(r) = desired.bundle else {
            let _ = self.apply_none(desired.issued_ms).await;
            return;
        };
        if r.size > self.spec.max_bundle_bytes {
            self.refuse(&refuse(format!(
                "bundle of {} bytes exceeds fleet.max_bundle_bytes ({})",
                r.size, self.spec.max_bundle_bytes
            )));
            return;
        }
        let bytes = match self.store.read_bundle(&r.sha256) {
            Ok(Some(b)) => b,
            _ => {
                self.set_phase(ReportState::Applying);
                tracing::info!(bundle = %short(&r.sha256), version = r.version, size = r.size, chunks = r.chunks, "Fleet: fetching bundle.");
                match link.fetch(&r, fetch_timeout(r.size)).await {
                    Ok(b) => b,
                    Err(e) => {
                        self.state().last_error =
                            Some(format!("fetching bundle {}: {e}", short(&r.sha256)));
                        self.refuse(&refuse(format!("fetching the bundle failed: {e}")));
                        return;
                    }
                }
            }
        };
        let opts = ApplyOptions {
            force: desired.force,
            issued_ms: Some(desired.issued_ms),
        };
        let _ = self.apply_bundle(bytes, opts).await;
    }
}
