//! Hot reload: new versions of functions without a restart.
//!
//! Two triggers: the file watch (each function's component file is checked
//! every `runtime.watch_ms` for a new size, modification time or inode) and
//! `SIGHUP` (the configuration is read again; functions whose settings or
//! file changed are reloaded). A new version is loaded, validated and
//! instantiated on a blocking thread while the old one keeps serving; only
//! then is it handed to the function's worker, which switches between two
//! events (see [`crate::runtime::worker`]). A version that fails to load is
//! refused and the old one keeps running.
//!
//! What a reload cannot change without a restart (see
//! [`crate::config::diff`]) is logged by name and left as it was; the
//! running configuration stays the baseline, so the next reload reports it
//! again. A configuration whose functions name a sink or serial port the
//! running gateway lacks is refused whole: applying its allowlists would
//! accept forwards and writes that then have nowhere to go.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::config::diff::{RestartNeeded, missing_targets, restart_needed};
use crate::config::{FunctionSpec, ValidConfig};
use crate::metrics::{FunctionMetrics, GatewayMetrics};
use crate::runtime::{LoadedFunction, Runtime};

/// What identifies one state of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        inode: m.ino(),
    })
}

/// One function as the reloader sees it.
pub struct Slot {
    spec: FunctionSpec,
    versions: watch::Sender<Arc<LoadedFunction>>,
    metrics: Arc<FunctionMetrics>,
    stamp: Option<Stamp>,
}

impl Slot {
    /// A slot for `spec`, whose worker receives versions from `versions`.
    pub fn new(
        spec: FunctionSpec,
        versions: watch::Sender<Arc<LoadedFunction>>,
        metrics: Arc<FunctionMetrics>,
    ) -> Self {
        let stamp = stamp(&spec.component);
        Self {
            spec,
            versions,
            metrics,
            stamp,
        }
    }
}

/// What a configuration reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Applied: `switched` functions got a new version; the settings in
    /// `restart_needed` wait for a restart.
    Applied {
        /// New versions handed to workers.
        switched: usize,
        /// Changes that were not applied.
        restart_needed: Vec<RestartNeeded>,
    },
    /// Refused whole, nothing applied; why.
    Refused(Vec<String>),
}

/// Loads new versions and hands them to the workers.
pub struct Reloader {
    runtime: Arc<Runtime>,
    /// The configuration the gateway was started with: what runs, apart
    /// from the functions' live settings (kept in the slots).
    config: Mutex<ValidConfig>,
    slots: Mutex<Vec<Slot>>,
    metrics: Arc<GatewayMetrics>,
}

impl Reloader {
    /// A reloader over `slots`, started from `config`.
    pub fn new(
        runtime: Arc<Runtime>,
        config: ValidConfig,
        slots: Vec<Slot>,
        metrics: Arc<GatewayMetrics>,
    ) -> Self {
        Self {
            runtime,
            config: Mutex::new(config),
            slots: Mutex::new(slots),
            metrics,
        }
    }

    /// Reloads every function whose component file changed since it was
    /// last loaded. Returns how many new versions were handed over.
    pub async fn check_files(&self) -> usize {
        let gateway_id = self.config.lock().await.gateway_id.clone();
        let mut slots = self.slots.lock().await;
        let mut switched = 0;
        for slot in slots.iter_mut() {
            let now = stamp(&slot.spec.component);
            if now == slot.stamp || now.is_none() {
                continue;
            }
            slot.stamp = now;
            let spec = slot.spec.clone();
            if self
                .reload(slot, spec, &gateway_id, "component file changed")
                .await
            {
                switched += 1;
            }
        }
        switched
    }

    /// Applies a re-read configuration (`SIGHUP`) against the running one,
    /// which stays the baseline (so what needs a restart is reported again
    /// at every reload until the restart). Refused whole, with nothing
    /// applied, when a function names a sink or serial port the running
    /// gateway lacks; otherwise every function whose live settings or
    /// component changed is reloaded and each setting that needs a restart
    /// is logged by name.
    pub async fn apply(&self, new: ValidConfig) -> ReloadOutcome {
        let running = self.config.lock().await;
        let missing = missing_targets(&running, &new);
        if !missing.is_empty() {
            self.metrics.reloads_refused.fetch_add(1, Ordering::Relaxed);
            for problem in &missing {
                tracing::error!(%problem, "Reload refused; nothing was changed.");
            }
            return ReloadOutcome::Refused(missing);
        }
        let restart = restart_needed(&running, &new);
        for c in &restart {
            tracing::warn!(
                section = %c.section,
                key = %c.key,
                change = %c.change,
                "Reload: change needs a restart; not applied."
            );
        }
        let mut slots = self.slots.lock().await;
        let mut switched = 0;
        for spec in &new.functions {
            let Some(slot) = slots.iter_mut().find(|s| s.spec.name == spec.name) else {
                continue;
            };
            // What only a restart changes stays as it runs.
            let mut next = spec.clone();
            next.triggers = slot.spec.triggers.clone();
            next.limits.queue = slot.spec.limits.queue;
            next.limits.queue_policy = slot.spec.limits.queue_policy;
            next.breaker = slot.spec.breaker.clone();
            let now = stamp(&next.component);
            if next == slot.spec && now == slot.stamp {
                continue;
            }
            slot.stamp = now;
            if self
                .reload(slot, next, &running.gateway_id, "configuration reloaded")
                .await
            {
                switched += 1;
            }
        }
        self.metrics.reloads_applied.fetch_add(1, Ordering::Relaxed);
        let pending = u64::try_from(restart.len()).unwrap_or(u64::MAX);
        self.metrics
            .restart_pending
            .store(pending, Ordering::Relaxed);
        ReloadOutcome::Applied {
            switched,
            restart_needed: restart,
        }
    }

    async fn reload(
        &self,
        slot: &mut Slot,
        spec: FunctionSpec,
        gateway_id: &str,
        why: &'static str,
    ) -> bool {
        let runtime = self.runtime.clone();
        let metrics = slot.metrics.clone();
        let gw = gateway_id.to_owned();
        let load_spec = spec.clone();
        let loaded =
            tokio::task::spawn_blocking(move || runtime.load(&load_spec, &gw, metrics)).await;
        let old_version = slot.versions.borrow().version().to_owned();
        match loaded {
            Ok(Ok(f)) => {
                if f.version() == old_version && spec == slot.spec {
                    tracing::debug!(function = %spec.name, "Component unchanged; nothing to reload.");
                    return false;
                }
                tracing::info!(
                    function = %spec.name,
                    from = %old_version,
                    to = %f.version(),
                    cached = f.from_cache(),
                    why,
                    "New version loaded and instantiated; events switch to it."
                );
                slot.spec = spec;
                slot.versions.send_replace(Arc::new(f));
                true
            }
            Ok(Err(e)) => {
                slot.metrics.rollbacks.fetch_add(1, Ordering::Relaxed);
                tracing::error!(function = %spec.name, version = %old_version, error = %e, why, "New version failed to load; rolled back: the previous version keeps running.");
                false
            }
            Err(e) => {
                slot.metrics.rollbacks.fetch_add(1, Ordering::Relaxed);
                tracing::error!(function = %spec.name, error = %e, "Loading the new version failed in the host; the previous version keeps running.");
                false
            }
        }
    }
}

/// Checks the component files every `interval` until `cancel`.
pub async fn watch_files(reloader: Arc<Reloader>, interval: Duration, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        reloader.check_files().await;
    }
}
