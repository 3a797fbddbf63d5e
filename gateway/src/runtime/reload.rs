//! Hot reload: new versions of functions, and a new function set, without
//! a restart.
//!
//! Two triggers: the file watch (each function's component file is checked
//! every `runtime.watch_ms` for a new size, modification time or inode) and
//! `SIGHUP` (the configuration is read again). A new version is loaded,
//! validated and instantiated on a blocking thread while the old one keeps
//! serving; only then is it handed to the function's worker, which switches
//! between two events (see [`crate::runtime::worker`]). A file-watch version
//! that fails to load is refused and the old one keeps running.
//!
//! A configuration reload changes the whole function set: functions are
//! added, removed, or changed in any setting (component, triggers, limits
//! including the queue, breaker, allowlists, config, instance mode,
//! priority, state quota; see [`crate::runtime::funcset`] for how each kind
//! of change is switched). **All or nothing**: every added or changed
//! function is loaded and instantiated before anything switches; if one
//! fails, the whole change is refused and the running set is untouched.
//! Functions the change does not touch keep their queue, worker and route.
//!
//! What a reload cannot change without a restart (see
//! [`crate::config::diff`]: broker, sinks, sources, …) is logged by name and
//! left as it was; the running configuration stays the baseline for those,
//! so the next reload reports them again. A configuration whose functions
//! name a sink or serial port the running gateway lacks is refused whole:
//! applying its allowlists would accept forwards and writes that then have
//! nowhere to go.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;

use crate::config::diff::{RestartNeeded, missing_targets, restart_needed};
use crate::config::{FunctionSpec, ValidConfig};
use crate::metrics::{FunctionMetrics, FunctionTable, GatewayMetrics};
use crate::router::{Route, Router};
use crate::runtime::funcset::{Change, Running, Workers, plan, same_version_settings};
use crate::runtime::queue::queue;
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
    /// Cancelled once its worker has stopped.
    done: CancellationToken,
    metrics: Arc<FunctionMetrics>,
    stamp: Option<Stamp>,
}

impl Slot {
    /// A slot for `spec`, whose worker is `running`.
    pub fn new(spec: FunctionSpec, running: Running, metrics: Arc<FunctionMetrics>) -> Self {
        let stamp = stamp(&spec.component);
        Self {
            spec,
            versions: running.versions,
            done: running.done,
            metrics,
            stamp,
        }
    }
}

/// What a configuration reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Applied: functions were added, removed and updated; the settings in
    /// `restart_needed` wait for a restart.
    Applied {
        /// Functions whose worker got a new version or new settings.
        switched: usize,
        /// Functions started by this reload.
        added: Vec<String>,
        /// Functions stopped by this reload (each drains what it had
        /// queued).
        removed: Vec<String>,
        /// Running functions that changed in any way (version, settings,
        /// triggers, queue, breaker).
        updated: Vec<String>,
        /// Changes that were not applied.
        restart_needed: Vec<RestartNeeded>,
    },
    /// Refused whole, nothing applied; why.
    Refused(Vec<String>),
}

/// The parts of the running gateway a reload changes besides the workers'
/// versions.
pub struct SetHandles {
    /// The routing table. Weak: the reloader must never keep the queues
    /// open past the drain (dropping the router closes them).
    pub router: Weak<Router>,
    /// Spawns workers for added functions and replaced queues.
    pub workers: Workers,
    /// The functions' names and counters (gateway, admin endpoint).
    pub functions: Arc<FunctionTable>,
}

/// What the switch did, for [`ReloadOutcome::Applied`].
#[derive(Default)]
struct Switched {
    switched: usize,
    added: Vec<String>,
    removed: Vec<String>,
    updated: Vec<String>,
}

/// Loads new versions and function sets and switches them in.
pub struct Reloader {
    runtime: Arc<Runtime>,
    /// The configuration the gateway was started with (what needs a restart
    /// is compared against it), with the functions of the last applied
    /// reload.
    config: Mutex<ValidConfig>,
    slots: Mutex<Vec<Slot>>,
    /// Removed functions whose worker may still be draining, by name: one
    /// added again under that name starts only once it has stopped (never
    /// two workers for one function).
    draining: std::sync::Mutex<HashMap<String, CancellationToken>>,
    metrics: Arc<GatewayMetrics>,
    set: SetHandles,
}

impl Reloader {
    /// A reloader over `slots`, started from `config`.
    pub fn new(
        runtime: Arc<Runtime>,
        config: ValidConfig,
        slots: Vec<Slot>,
        metrics: Arc<GatewayMetrics>,
        set: SetHandles,
    ) -> Self {
        Self {
            runtime,
            config: Mutex::new(config),
            slots: Mutex::new(slots),
            draining: std::sync::Mutex::default(),
            metrics,
            set,
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

    /// Applies a re-read configuration (`SIGHUP`, or the fleet agent's):
    /// the function set becomes `new`'s, all or nothing (see the module
    /// docs). Refused whole, with nothing applied, when a function names a
    /// sink or serial port the running gateway lacks or any added or
    /// changed function fails to load; each setting that needs a restart
    /// is logged by name.
    pub async fn apply(&self, new: ValidConfig) -> ReloadOutcome {
        let mut running = self.config.lock().await;
        let missing = missing_targets(&running, &new);
        if !missing.is_empty() {
            return self.refuse(missing);
        }
        let restart = restart_needed(&running, &new);
        let mut slots = self.slots.lock().await;
        let changes: Vec<(Change, Option<Stamp>)> = new
            .functions
            .iter()
            .map(|spec| {
                let slot = slots.iter().find(|s| s.spec.name == spec.name);
                let now = stamp(&spec.component);
                let file_changed = slot.is_some_and(|s| s.stamp != now);
                (plan(slot.map(|s| &s.spec), spec, file_changed), now)
            })
            .collect();
        let loaded = match self.load_changed(&slots, &new, &changes).await {
            Ok(loaded) => loaded,
            Err(reasons) => return self.refuse(reasons),
        };
        let done = match self.switch(&mut slots, &new.functions, changes, loaded) {
            Ok(done) => done,
            Err(reasons) => return self.refuse(reasons),
        };
        running.functions = new.functions;
        for c in &restart {
            tracing::warn!(
                section = %c.section,
                key = %c.key,
                change = %c.change,
                "Reload: change needs a restart; not applied."
            );
        }
        self.metrics.reloads_applied.fetch_add(1, Ordering::Relaxed);
        let pending = u64::try_from(restart.len()).unwrap_or(u64::MAX);
        self.metrics
            .restart_pending
            .store(pending, Ordering::Relaxed);
        ReloadOutcome::Applied {
            switched: done.switched,
            added: done.added,
            removed: done.removed,
            updated: done.updated,
            restart_needed: restart,
        }
    }

    fn refuse(&self, reasons: Vec<String>) -> ReloadOutcome {
        self.metrics.reloads_refused.fetch_add(1, Ordering::Relaxed);
        for problem in &reasons {
            tracing::error!(%problem, "Reload refused; nothing was changed.");
        }
        ReloadOutcome::Refused(reasons)
    }

    /// Loads (compiles, validates, instantiates) every function of `new`
    /// whose change needs it, on a blocking thread; one entry per function
    /// of `new`. Any failure refuses the whole change: every reason.
    async fn load_changed(
        &self,
        slots: &[Slot],
        new: &ValidConfig,
        changes: &[(Change, Option<Stamp>)],
    ) -> Result<Vec<Option<LoadedFunction>>, Vec<String>> {
        let jobs: Vec<(FunctionSpec, Arc<FunctionMetrics>, bool)> = new
            .functions
            .iter()
            .zip(changes)
            .filter(|(_, (change, _))| change.loads())
            .map(
                |(spec, _)| match slots.iter().find(|s| s.spec.name == spec.name) {
                    Some(slot) => (spec.clone(), slot.metrics.clone(), true),
                    None => (spec.clone(), Arc::default(), false),
                },
            )
            .collect();
        let runtime = self.runtime.clone();
        let gw = new.gateway_id.clone();
        let results = tokio::task::spawn_blocking(move || {
            jobs.into_iter()
                .map(|(spec, metrics, running)| {
                    let loaded = runtime.load(&spec, &gw, metrics.clone());
                    (spec.name, metrics, running, loaded)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| vec![format!("loading the functions failed in the host: {e}")])?;
        let mut loaded = Vec::new();
        let mut reasons = Vec::new();
        for (name, metrics, running, result) in results {
            match result {
                Ok(f) => loaded.push((name, f)),
                Err(e) => {
                    if running {
                        metrics.rollbacks.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::error!(function = %name, error = %e, "Function failed to load; the reload is refused and the running functions stay as they are.");
                    reasons.push(e.to_string());
                }
            }
        }
        if !reasons.is_empty() {
            return Err(reasons);
        }
        Ok(new
            .functions
            .iter()
            .map(|spec| {
                let at = loaded.iter().position(|(n, _)| *n == spec.name)?;
                Some(loaded.swap_remove(at).1)
            })
            .collect())
    }

    /// Switches the running set to `specs`: new routing table, workers
    /// spawned or replaced, versions handed over, removed functions let go.
    fn switch(
        &self,
        slots: &mut Vec<Slot>,
        specs: &[FunctionSpec],
        changes: Vec<(Change, Option<Stamp>)>,
        loaded: Vec<Option<LoadedFunction>>,
    ) -> Result<Switched, Vec<String>> {
        let stopping = || vec!["the gateway is stopping; nothing was changed".to_owned()];
        let router = self.set.router.upgrade().ok_or_else(stopping)?;
        // Keeps the drain from finishing while workers are being spawned;
        // once it has closed the tracker, nothing may be added.
        let _hold = self.set.workers.tracker.token();
        if self.set.workers.tracker.is_closed() {
            return Err(stopping());
        }
        let routes = router.routes();
        let mut old: Vec<Option<Slot>> = std::mem::take(slots).into_iter().map(Some).collect();
        let mut next_routes = Vec::new();
        let mut done = Switched::default();
        for ((spec, (change, now)), function) in specs.iter().zip(changes).zip(loaded) {
            let existing = old
                .iter_mut()
                .find(|s| s.as_ref().is_some_and(|s| s.spec.name == spec.name))
                .and_then(Option::take);
            let route = routes.iter().find(|r| r.function == spec.name).cloned();
            let (slot, route) = match (existing, route, change) {
                (Some(slot), Some(route), Change::Untouched) => (slot, route),
                (Some(slot), Some(route), Change::InPlace { triggers, .. }) => {
                    self.in_place(slot, route, spec, now, function, triggers, &mut done)
                }
                (Some(slot), _, _) => self.replace(slot, spec, now, function, &mut done),
                (None, _, _) => match function {
                    Some(f) => self.add(spec, now, f, &mut done),
                    None => continue,
                },
            };
            slots.push(slot);
            next_routes.push(route);
        }
        router.replace(next_routes);
        self.set.functions.set(
            slots
                .iter()
                .map(|s| (s.spec.name.clone(), s.metrics.clone()))
                .collect(),
        );
        let mut draining = self.draining.lock().unwrap_or_else(PoisonError::into_inner);
        draining.retain(|_, stopped| !stopped.is_cancelled());
        for slot in old.into_iter().flatten() {
            tracing::info!(function = %slot.spec.name, "Function removed: it drains what it has queued, then stops.");
            draining.insert(slot.spec.name.clone(), slot.done);
            done.removed.push(slot.spec.name);
        }
        Ok(done)
    }

    /// A function with new triggers and/or a new version on its queue and
    /// worker.
    #[allow(clippy::too_many_arguments, reason = "one step of `switch`")]
    fn in_place(
        &self,
        mut slot: Slot,
        route: Arc<Route>,
        spec: &FunctionSpec,
        now: Option<Stamp>,
        function: Option<LoadedFunction>,
        triggers: bool,
        done: &mut Switched,
    ) -> (Slot, Arc<Route>) {
        let route = if triggers {
            Arc::new(Route {
                function: spec.name.clone(),
                triggers: spec.triggers.clone(),
                queue: route.queue.clone(),
            })
        } else {
            route
        };
        let mut changed = triggers;
        if let Some(f) = function {
            let old_version = slot.versions.borrow().version().to_owned();
            if f.version() != old_version || !same_version_settings(&slot.spec, spec) {
                tracing::info!(function = %spec.name, from = %old_version, to = %f.version(), cached = f.from_cache(), "New version loaded and instantiated; events switch to it.");
                slot.versions.send_replace(Arc::new(f));
                done.switched += 1;
                changed = true;
            }
        }
        if changed {
            tracing::info!(function = %spec.name, triggers, "Function updated in place.");
            done.updated.push(spec.name.clone());
        }
        slot.spec = spec.clone();
        slot.stamp = now;
        (slot, route)
    }

    /// A function on a new queue and worker (new queue settings or
    /// breaker), which starts once the old worker has drained.
    fn replace(
        &self,
        slot: Slot,
        spec: &FunctionSpec,
        now: Option<Stamp>,
        function: Option<LoadedFunction>,
        done: &mut Switched,
    ) -> (Slot, Arc<Route>) {
        let function = match function {
            Some(f) => {
                done.switched += 1;
                Arc::new(f)
            }
            None => slot.versions.borrow().clone(),
        };
        let (tx, rx) = queue(
            spec.limits.queue,
            spec.limits.queue_policy,
            slot.metrics.clone(),
        );
        let running = self
            .set
            .workers
            .spawn(function, spec, rx, Some(slot.done.clone()));
        tracing::info!(function = %spec.name, queue = spec.limits.queue, "Function gets a new queue and worker; it starts once the old one has drained.");
        done.updated.push(spec.name.clone());
        let route = Arc::new(Route::new(spec.name.clone(), spec.triggers.clone(), tx));
        let mut slot = Slot::new(spec.clone(), running, slot.metrics);
        slot.stamp = now;
        (slot, route)
    }

    /// A function not running before; if one of that name was removed and
    /// is still draining, the new worker starts once it has stopped.
    fn add(
        &self,
        spec: &FunctionSpec,
        now: Option<Stamp>,
        function: LoadedFunction,
        done: &mut Switched,
    ) -> (Slot, Arc<Route>) {
        let metrics = function.metrics().clone();
        let (tx, rx) = queue(spec.limits.queue, spec.limits.queue_policy, metrics.clone());
        tracing::info!(function = %spec.name, version = %function.version(), cached = function.from_cache(), "Function added.");
        let after = self
            .draining
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&spec.name)
            .filter(|stopped| !stopped.is_cancelled());
        let running = self.set.workers.spawn(Arc::new(function), spec, rx, after);
        done.added.push(spec.name.clone());
        let route = Arc::new(Route::new(spec.name.clone(), spec.triggers.clone(), tx));
        let mut slot = Slot::new(spec.clone(), running, metrics);
        slot.stamp = now;
        (slot, route)
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
