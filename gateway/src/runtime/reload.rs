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
//! What a reload cannot change without a restart (triggers, added or removed
//! functions, sinks, sources, the broker) is logged and left as it was.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{FunctionSpec, ValidConfig};
use crate::metrics::FunctionMetrics;
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

/// Loads new versions and hands them to the workers.
pub struct Reloader {
    runtime: Arc<Runtime>,
    config: Mutex<ValidConfig>,
    slots: Mutex<Vec<Slot>>,
}

impl Reloader {
    /// A reloader over `slots`, started from `config`.
    pub fn new(runtime: Arc<Runtime>, config: ValidConfig, slots: Vec<Slot>) -> Self {
        Self {
            runtime,
            config: Mutex::new(config),
            slots: Mutex::new(slots),
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

    /// Applies a re-read configuration (`SIGHUP`): reloads functions whose
    /// settings or component changed; logs what needs a restart. Returns
    /// how many new versions were handed over.
    pub async fn apply(&self, new: ValidConfig) -> usize {
        let mut current = self.config.lock().await;
        let mut slots = self.slots.lock().await;
        let mut switched = 0;
        for spec in &new.functions {
            let Some(slot) = slots.iter_mut().find(|s| s.spec.name == spec.name) else {
                tracing::warn!(function = %spec.name, "New function in the configuration; it starts at the next restart.");
                continue;
            };
            if spec.triggers != slot.spec.triggers {
                tracing::warn!(function = %spec.name, "Changed triggers take effect at the next restart; the old ones stay.");
            }
            let mut next = spec.clone();
            next.triggers = slot.spec.triggers.clone();
            let now = stamp(&next.component);
            if next == slot.spec && now == slot.stamp {
                continue;
            }
            slot.stamp = now;
            if self
                .reload(slot, next, &new.gateway_id, "configuration reloaded")
                .await
            {
                switched += 1;
            }
        }
        for slot in slots.iter() {
            if !new.functions.iter().any(|f| f.name == slot.spec.name) {
                tracing::warn!(function = %slot.spec.name, "Function removed from the configuration; it keeps running until the next restart.");
            }
        }
        if new.sinks.len() != current.sinks.len()
            || new.sources.len() != current.sources.len()
            || new.runtime != current.runtime
        {
            tracing::warn!(
                "Changes to sinks, sources, the broker or [runtime] take effect at the next restart."
            );
        }
        *current = new;
        switched
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
