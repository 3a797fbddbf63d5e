//! Applying a bundle to the running gateway, one at a time and all or
//! nothing: verify the signature and every hash, store the bundle and its
//! components in `data_dir/fleet/`, validate its functions together with the
//! configuration file's own, load and instantiate every new or changed
//! function, switch (the same path as `SIGHUP`, [`Reloader::apply`]), and
//! only then record the new bundle as current (an atomic rename). A power
//! cut before that record leaves the old set after a restart; after it, the
//! new one. A bundle that fails anywhere is refused, the refusal is kept for
//! the report, and the old set keeps running.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::bundle::{Bundle, BundleLimits};
use super::report::{DesiredSummary, Refusal, ReportState};
use super::status::Baseline;
use super::store::{Current, Store};
use crate::config::{ConfigErrors, FleetSpec, ValidConfig, with_functions};
use crate::runtime::reload::{ReloadOutcome, Reloader};

/// The gateway's functions and their counters, read when reporting.
pub type FunctionsView =
    Arc<dyn Fn() -> Vec<(String, Arc<crate::metrics::FunctionMetrics>)> + Send + Sync>;

/// How a bundle came and what it may do.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    /// Accept a bundle older than the running one (a deliberate rollback).
    pub force: bool,
    /// The desired document's issue time, when it came from the cloud.
    pub issued_ms: Option<u64>,
    /// The version the desired document announced for the bundle.
    pub expect_version: Option<u64>,
}

/// What an accepted bundle did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// It already runs; nothing changed.
    AlreadyRunning {
        /// Its version.
        version: u64,
    },
    /// The function set switched to it.
    Switched {
        /// Its version.
        version: u64,
        /// Its hash.
        sha256: String,
        /// Functions added, removed and updated.
        added: Vec<String>,
        /// Functions removed.
        removed: Vec<String>,
        /// Functions updated.
        updated: Vec<String>,
    },
}

/// Why a bundle (or desired document) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    /// What was refused, when known.
    pub sha256: Option<String>,
    /// Its version, when known.
    pub version: Option<u64>,
    /// Why, for the operator.
    pub reason: String,
}

impl Refused {
    pub(crate) fn new(sha256: Option<String>, version: Option<u64>, reason: String) -> Self {
        Self {
            sha256,
            version,
            reason,
        }
    }
}

/// What the agent knows and reports.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub(crate) current: Option<Current>,
    /// The running bundle's `[[functions]]` tables, for `SIGHUP` merges.
    pub(crate) tables: Vec<toml::Value>,
    /// The running bundle's function names.
    pub(crate) names: Vec<String>,
    pub(crate) baseline: Baseline,
    pub(crate) desired: Option<DesiredSummary>,
    pub(crate) last_refusal: Option<Refusal>,
    pub(crate) last_error: Option<String>,
    pub(crate) phase: ReportState,
    /// The newest desired document's issue time ever applied (kept in
    /// `current.json`, never lowered, also when a bundle is applied by
    /// `PUT /bundle` or left out at start): older documents are replays.
    pub(crate) issued_mark: u64,
}

/// The fleet agent's core, shared by the cloud link and `PUT /bundle`.
pub struct Fleet {
    pub(crate) gateway_id: String,
    pub(crate) spec: FleetSpec,
    pub(crate) store: Store,
    target: Option<String>,
    reloader: Arc<Reloader>,
    /// The configuration file as last loaded, without bundle functions.
    base: Mutex<ValidConfig>,
    pub(crate) state: Mutex<State>,
    /// One apply (or `SIGHUP`) at a time.
    applying: tokio::sync::Mutex<()>,
    pub(crate) functions: FunctionsView,
    /// Wakes the reporter after a change.
    pub(crate) changed: Notify,
    /// Bundles (or "no bundle" states) switched to.
    pub applied: AtomicU64,
    /// Bundles and desired documents refused.
    pub refused: AtomicU64,
}

pub(crate) use crate::event::now_ms;

impl Fleet {
    /// The agent for a gateway started from `boot`.
    pub(crate) fn new(
        boot: super::Boot,
        reloader: Arc<Reloader>,
        functions: FunctionsView,
    ) -> Self {
        let mut state = State {
            current: boot.current,
            tables: boot.tables,
            names: boot.names,
            issued_mark: boot.issued_mark,
            ..State::default()
        };
        state.last_error = boot.error;
        Self {
            gateway_id: boot.base.gateway_id.clone(),
            spec: boot.spec,
            store: boot.store,
            target: super::bundle::host_target(),
            reloader,
            base: Mutex::new(boot.base),
            state: Mutex::new(state),
            applying: tokio::sync::Mutex::new(()),
            functions,
            changed: Notify::new(),
            applied: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn base(&self) -> ValidConfig {
        self.base.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A re-read configuration file (`SIGHUP`), merged with the running
    /// bundle's functions and applied the same way a bundle is.
    pub async fn reload(&self, file: ValidConfig) -> ReloadOutcome {
        let _one = self.applying.lock().await;
        let tables = self.state().tables.clone();
        let merged = match with_functions(&file, tables, &self.origin()) {
            Ok(m) => m,
            Err(errors) => {
                return ReloadOutcome::Refused(errors.0.iter().map(ToString::to_string).collect());
            }
        };
        let outcome = self.reloader.apply(merged).await;
        if matches!(outcome, ReloadOutcome::Applied { .. }) {
            *self.base.lock().unwrap_or_else(|p| p.into_inner()) = file;
        }
        outcome
    }

    /// Where problems in the running bundle's functions are reported.
    fn origin(&self) -> PathBuf {
        match &self.state().current {
            Some(Current {
                sha256: Some(sha),
                version,
                ..
            }) => PathBuf::from(format!("bundle {} (version {version})", short(sha))),
            _ => PathBuf::from("bundle"),
        }
    }

    /// Verifies and applies a bundle; see the module docs.
    pub async fn apply_bundle(
        &self,
        bytes: Vec<u8>,
        opts: ApplyOptions,
    ) -> Result<Applied, Refused> {
        let _one = self.applying.lock().await;
        self.set_phase(ReportState::Applying);
        let result = self.apply_locked(bytes, opts).await;
        self.settle(&result);
        result
    }

    /// Runs only the configuration file's functions (the desired state
    /// names no bundle: the rollback of a first deploy).
    pub async fn apply_none(&self, issued_ms: u64) -> Result<Applied, Refused> {
        let _one = self.applying.lock().await;
        let already = matches!(
            &self.state().current,
            None | Some(Current { sha256: None, .. })
        );
        let result = if already {
            Ok(Applied::AlreadyRunning { version: 0 })
        } else {
            self.set_phase(ReportState::Applying);
            self.switch(self.base(), None, Vec::new(), Vec::new(), issued_ms)
                .await
        };
        self.settle(&result);
        result
    }

    async fn apply_locked(&self, bytes: Vec<u8>, opts: ApplyOptions) -> Result<Applied, Refused> {
        let (bundle, bytes) = self.open(bytes, opts).await?;
        let sha = bundle.sha256.clone();
        let version = bundle.manifest.version;
        let refuse = |reason: String| Refused::new(Some(sha.clone()), Some(version), reason);
        // Before anything is written: a replayed old bundle costs no disk.
        if let Some(done) = self.check_version(&bundle, opts)? {
            return Ok(done);
        }
        let bundle = self.keep(bundle, bytes).await?;
        tracing::info!(bundle = %short(&sha), version, force = opts.force, "Fleet: applying bundle.");
        let dir = self.store.components_dir();
        let mut attempt = self.target.clone();
        loop {
            let tables = bundle
                .functions(&dir, attempt.as_deref())
                .map_err(|e| refuse(e.to_string()))?;
            let names = table_names(&tables);
            let origin = PathBuf::from(format!("bundle {} (version {version})", short(&sha)));
            let merged = with_functions(&self.base(), tables.clone(), &origin)
                .map_err(|e| refuse(problems(&e)))?;
            let issued = opts.issued_ms.unwrap_or(0);
            match self
                .switch(merged, Some((&bundle, version)), tables, names, issued)
                .await
            {
                // A precompiled component this engine cannot load (other
                // engine settings): try the portable `.wasm` once.
                Err(e) if attempt.is_some() && uses_precompiled(&bundle, attempt.as_deref()) => {
                    tracing::warn!(bundle = %short(&sha), reason = %e.reason, "Precompiled components refused; trying the portable ones.");
                    attempt = None;
                }
                other => return other,
            }
        }
    }

    /// Verifies `bytes` (size, format, signature, hashes) off the reactor,
    /// and that it is the version the desired state announced.
    async fn open(&self, bytes: Vec<u8>, opts: ApplyOptions) -> Result<(Bundle, Vec<u8>), Refused> {
        let trusted = self.spec.trusted_keys.clone();
        let limits = BundleLimits {
            max_bytes: self.spec.max_bundle_bytes,
        };
        let (bundle, bytes) = tokio::task::spawn_blocking(move || {
            match Bundle::open(&bytes, &trusted, &limits) {
                Ok(b) => Ok((b, bytes)),
                Err(e) => {
                    // Name what was refused when it can be read at all.
                    let read = Bundle::inspect(&bytes, &limits).ok();
                    Err(Refused::new(
                        read.as_ref().map(|(_, sha, _)| sha.clone()),
                        read.as_ref().map(|(m, _, _)| m.version),
                        e.to_string(),
                    ))
                }
            }
        })
        .await
        .map_err(|e| Refused::new(None, None, format!("verifying failed in the host: {e}")))??;
        let version = bundle.manifest.version;
        match opts.expect_version {
            Some(announced) if announced != version => Err(Refused::new(
                Some(bundle.sha256.clone()),
                Some(version),
                format!(
                    "the desired state announces version {announced}, the bundle is version {version}"
                ),
            )),
            _ => Ok((bundle, bytes)),
        }
    }

    /// Stores the bundle and its components (the precompiled ones for this
    /// machine and the portable ones they fall back to) in
    /// `data_dir/fleet/`, off the reactor.
    async fn keep(&self, bundle: Bundle, bytes: Vec<u8>) -> Result<Bundle, Refused> {
        let store = self.store.clone();
        let target = self.target.clone();
        tokio::task::spawn_blocking(move || {
            let refuse = |e: &dyn std::fmt::Display| {
                Refused::new(
                    Some(bundle.sha256.clone()),
                    Some(bundle.manifest.version),
                    e.to_string(),
                )
            };
            store
                .save_bundle(&bundle.sha256, &bytes)
                .map_err(|e| refuse(&e))?;
            store
                .write_components(&bundle, target.as_deref())
                .map_err(|e| refuse(&e))?;
            if uses_precompiled(&bundle, target.as_deref()) {
                store
                    .write_components(&bundle, None)
                    .map_err(|e| refuse(&e))?;
            }
            Ok(bundle)
        })
        .await
        .map_err(|e| Refused::new(None, None, format!("storing failed in the host: {e}")))?
    }

    /// `Some` when nothing is to be done; a refusal for an older (or
    /// conflicting) version unless forced.
    fn check_version(
        &self,
        bundle: &Bundle,
        opts: ApplyOptions,
    ) -> Result<Option<Applied>, Refused> {
        let version = bundle.manifest.version;
        let mut state = self.state();
        let Some(current) = state.current.clone() else {
            return Ok(None);
        };
        if current.sha256.as_deref() == Some(bundle.sha256.as_str()) {
            // Re-announced (a newer desired document for the same bundle):
            // remember its issue time so an older document stays refused.
            if let Some(issued) = opts.issued_ms.filter(|i| *i > current.issued_ms) {
                let next = Current {
                    issued_ms: issued,
                    ..current
                };
                if self.store.set_current(&next).is_ok() {
                    state.issued_mark = issued;
                    state.current = Some(next);
                }
            }
            return Ok(Some(Applied::AlreadyRunning { version }));
        }
        let refuse = |reason: String| {
            Err(Refused::new(
                Some(bundle.sha256.clone()),
                Some(version),
                reason,
            ))
        };
        if current.sha256.is_some() && !opts.force {
            if version < current.version {
                return refuse(format!(
                    "version {version} is older than the running version {}: refused so that a replayed bundle cannot roll a fix back; deploy it with --force (or PUT /bundle?force=true) to roll back on purpose",
                    current.version
                ));
            }
            if version == current.version {
                return refuse(format!(
                    "version {version} is already running with different contents (bundle {}); build the new bundle with a higher --version, or force it",
                    current.sha256.as_deref().map_or("?", short)
                ));
            }
        }
        Ok(None)
    }

    /// Switches the function set to `merged` and records what runs.
    async fn switch(
        &self,
        merged: ValidConfig,
        bundle: Option<(&Bundle, u64)>,
        tables: Vec<toml::Value>,
        names: Vec<String>,
        issued_ms: u64,
    ) -> Result<Applied, Refused> {
        let (sha, version) = bundle.map_or((None, 0), |(b, v)| (Some(b.sha256.clone()), v));
        let refuse = |reason: String| Refused::new(sha.clone(), bundle.map(|(_, v)| v), reason);
        let (added, removed, updated) = match self.reloader.apply(merged).await {
            ReloadOutcome::Refused(reasons) => return Err(refuse(reasons.join("; "))),
            ReloadOutcome::Applied {
                added,
                removed,
                updated,
                ..
            } => (added, removed, updated),
        };
        let current = Current {
            sha256: sha.clone(),
            version,
            applied_ms: now_ms(),
            issued_ms: issued_ms.max(self.state().issued_mark),
        };
        // The switch has happened: from here on, failing to record it only
        // means that a restart comes back to the previous set (and the
        // cloud's desired state brings this one again).
        if let Err(e) = self.store.set_current(&current) {
            tracing::error!(error = %e, "Fleet: the new function set runs but could not be recorded; a restart returns to the previous one.");
            self.state().last_error = Some(format!("recording the applied bundle: {e}"));
        }
        let keep: Vec<&str> = sha.iter().map(String::as_str).collect();
        let previous = self.state().current.clone();
        let mut keep_all = keep.clone();
        if let Some(Current {
            sha256: Some(p), ..
        }) = &previous
        {
            keep_all.push(p.as_str());
        }
        if let Err(e) = self.store.prune(&keep_all) {
            tracing::warn!(error = %e, "Fleet: old bundles could not be removed.");
        }
        let baseline = Baseline::take(&(self.functions)(), &names);
        let mut state = self.state();
        state.issued_mark = current.issued_ms;
        state.current = Some(current);
        state.tables = tables;
        state.names = names;
        state.baseline = baseline;
        tracing::info!(version, bundle = %sha.as_deref().map_or("none", short), added = ?added, removed = ?removed, updated = ?updated, "Fleet: function set switched.");
        Ok(Applied::Switched {
            version,
            sha256: sha.unwrap_or_default(),
            added,
            removed,
            updated,
        })
    }

    pub(crate) fn set_phase(&self, phase: ReportState) {
        self.state().phase = phase;
        self.changed.notify_one();
    }

    /// Records an apply's result for the report.
    fn settle(&self, result: &Result<Applied, Refused>) {
        let mut state = self.state();
        match result {
            Ok(done) => {
                state.phase = ReportState::Running;
                if matches!(done, Applied::Switched { .. }) {
                    self.applied.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(r) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(bundle = %r.sha256.as_deref().map_or("?", short), version = ?r.version, reason = %r.reason, "Fleet: bundle refused; the running set stays.");
                state.phase = ReportState::Refused;
                state.last_refusal = Some(Refusal {
                    sha256: r.sha256.clone(),
                    version: r.version,
                    reason: r.reason.clone(),
                    at_ms: now_ms(),
                });
            }
        }
        drop(state);
        self.changed.notify_one();
    }

    /// Records a refusal that happened before any bundle was opened (a bad
    /// desired document, a failed fetch).
    pub(crate) fn refuse(&self, refused: &Refused) {
        self.settle(&Err(refused.clone()));
    }
}

/// Whether `target`'s precompiled components are in `bundle`.
fn uses_precompiled(bundle: &Bundle, target: Option<&str>) -> bool {
    target.is_some_and(|t| {
        bundle
            .manifest
            .components
            .iter()
            .any(|c| c.precompiled.contains_key(t))
    })
}

/// The `name` of each `[[functions]]` table.
fn table_names(tables: &[toml::Value]) -> Vec<String> {
    tables
        .iter()
        .filter_map(|t| t.get("name")?.as_str().map(str::to_owned))
        .collect()
}

fn problems(errors: &ConfigErrors) -> String {
    errors
        .0
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The first 12 hex digits of a hash, for messages.
pub(crate) fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}
