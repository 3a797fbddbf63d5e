//! Fleet deploy: signed bundles of functions, delivered over the cloud
//! broker (or `PUT /bundle`) and applied without a restart.
//!
//! - [`keys`]: ed25519 key pairs (`edgefn keygen`) and the trusted keys;
//! - [`bundle`]: the signed, content-addressed bundle (`edgefn bundle`);
//! - [`desired`]: the signed desired state per gateway;
//! - [`store`]: `data_dir/fleet/`, written by atomic renames;
//! - [`topics`], [`chunks`], [`link`]: the transport over an MQTT sink's
//!   endpoint; [`report`]: the reported state's JSON;
//! - [`apply`], [`status`], [`agent`]: the gateway's agent;
//! - [`cli_bundle`]: `edgefn keygen` and `edgefn bundle`; [`deploy`]:
//!   `edgefn deploy` and `edgefn status`.

pub mod agent;
pub mod apply;
pub mod bundle;
pub mod chunks;
pub mod cli_bundle;
pub mod deploy;
pub mod desired;
pub mod keys;
pub mod link;
pub mod report;
pub mod status;
pub mod store;
pub mod topics;

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use apply::{Applied, ApplyOptions, Fleet, Refused};

use crate::config::{FleetSpec, ValidConfig, with_functions};
use crate::metrics::FunctionTable;
use crate::runtime::reload::Reloader;
use store::{Current, Store};

/// What a gateway with `[fleet]` starts from.
pub struct Boot {
    /// The configuration file, without bundle functions.
    pub(crate) base: ValidConfig,
    pub(crate) spec: FleetSpec,
    pub(crate) store: Store,
    /// The bundle recorded as applied, if it could be loaded.
    pub(crate) current: Option<Current>,
    pub(crate) tables: Vec<toml::Value>,
    pub(crate) names: Vec<String>,
    /// Why the recorded bundle was not loaded.
    pub(crate) error: Option<String>,
    /// The newest desired document applied (see `apply::State`).
    pub(crate) issued_mark: u64,
}

impl Boot {
    /// Whether a bundle's functions are part of the start configuration.
    pub(crate) fn has_bundle(&self) -> bool {
        !self.tables.is_empty()
    }

    /// The start configuration with the bundle's portable components (its
    /// precompiled ones did not load: built for other engine settings).
    pub(crate) fn portable(&mut self) -> Option<ValidConfig> {
        if self.tables.is_empty() {
            return None;
        }
        let (_, tables, merged) = load_current(self, None).ok().flatten()?;
        self.tables = tables;
        Some(merged)
    }

    /// Starts without the bundle (its functions did not load): the file's
    /// configuration, and `reason` for the report. The replay mark stays,
    /// so no desired document older than the one applied is taken.
    pub(crate) fn forget_bundle(&mut self, reason: String) -> ValidConfig {
        self.tables.clear();
        self.names.clear();
        self.current = None;
        self.error = Some(reason);
        self.base.clone()
    }
}

/// Creates the agent for a started gateway and, with `fleet.sink`, its
/// connection to the cloud and the task that follows the desired state.
pub(crate) fn spawn(
    boot: Boot,
    config: &ValidConfig,
    reloader: Arc<Reloader>,
    functions: Arc<FunctionTable>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Arc<Fleet> {
    let sink = boot.spec.sink.clone();
    let max_bundle_bytes = boot.spec.max_bundle_bytes;
    let view: apply::FunctionsView = Arc::new(move || functions.list());
    let fleet = Arc::new(Fleet::new(boot, reloader, view));
    let connection = sink
        .and_then(|name| config.sinks.iter().find(|s| s.name == name))
        .and_then(|s| s.kind.mqtt_connection());
    if let Some((endpoint, keep_alive)) = connection {
        let (link, desired) = link::start(
            link::LinkConfig {
                endpoint: endpoint.clone(),
                gateway_id: config.gateway_id.clone(),
                keep_alive,
                max_bundle_bytes,
            },
            cancel.clone(),
            tracker,
        );
        tracker.spawn(agent::run(fleet.clone(), link, desired, cancel.clone()));
    }
    fleet
}

/// Why the fleet state could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("fleet: {0}")]
pub struct BootError(#[from] store::StoreError);

/// The configuration to start with: the file's functions plus those of the
/// bundle recorded in `data_dir/fleet/current.json`, verified again with the
/// trusted keys configured now. A recorded bundle that no longer verifies or
/// validates is left out (the gateway starts with the file's functions and
/// reports why), so a board is never kept from starting by its bundle.
pub fn boot(config: &ValidConfig) -> Result<Option<(ValidConfig, Boot)>, BootError> {
    let Some(spec) = config.fleet.clone() else {
        return Ok(None);
    };
    let store = Store::open(&config.data_dir)?;
    let mut boot = Boot {
        base: config.clone(),
        spec,
        store,
        current: None,
        tables: Vec::new(),
        names: Vec::new(),
        error: None,
        issued_mark: 0,
    };
    // The replay mark survives a bundle that is left out below.
    boot.issued_mark = boot
        .store
        .current()
        .ok()
        .flatten()
        .map_or(0, |c| c.issued_ms);
    let merged = match load_current(&boot, bundle::host_target().as_deref()) {
        Ok(None) => config.clone(),
        Ok(Some((current, tables, merged))) => {
            boot.names = tables
                .iter()
                .filter_map(|t| t.get("name")?.as_str().map(str::to_owned))
                .collect();
            boot.current = Some(current);
            boot.tables = tables;
            merged
        }
        Err(reason) => {
            tracing::error!(%reason, "Fleet: the recorded bundle is not loaded; starting with the configuration file's functions.");
            boot.error = Some(reason);
            config.clone()
        }
    };
    Ok(Some((merged, boot)))
}

type Loaded = (Current, Vec<toml::Value>, ValidConfig);

/// The recorded bundle's functions, with the precompiled components for
/// `target` where the bundle has them.
fn load_current(boot: &Boot, target: Option<&str>) -> Result<Option<Loaded>, String> {
    let current = boot.store.current().map_err(|e| e.to_string())?;
    let Some(current) = current else {
        return Ok(None);
    };
    let Some(sha) = current.sha256.clone() else {
        return Ok(Some((current, Vec::new(), boot.base.clone())));
    };
    let bytes = boot
        .store
        .read_bundle(&sha)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("bundle {sha} is recorded as applied but missing"))?;
    let limits = bundle::BundleLimits {
        max_bytes: boot.spec.max_bundle_bytes,
    };
    let opened = bundle::Bundle::open(&bytes, &boot.spec.trusted_keys, &limits)
        .map_err(|e| format!("bundle {sha}: {e}"))?;
    boot.store
        .write_components(&opened, target)
        .map_err(|e| e.to_string())?;
    let tables = opened
        .functions(&boot.store.components_dir(), target)
        .map_err(|e| e.to_string())?;
    let origin = PathBuf::from(format!(
        "bundle {} (version {})",
        apply::short(&sha),
        current.version
    ));
    let merged = with_functions(&boot.base, tables.clone(), &origin).map_err(|e| e.to_string())?;
    Ok(Some((current, tables, merged)))
}
