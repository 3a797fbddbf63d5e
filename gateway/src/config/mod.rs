//! Configuration: the TOML schema ([`schema`]), `${VAR}` interpolation
//! ([`interpolate`]) and validation into a [`ValidConfig`] that nothing else
//! re-checks.
//!
//! Loading goes: read the file, parse TOML, interpolate every string value,
//! deserialize into the schema (unknown keys are errors), then validate every
//! setting and collect *all* problems. Each problem names the file, the key
//! path (e.g. `functions[1].limits.timeout_ms`) and the reason.

mod broker;
pub mod diff;
mod endpoint;
pub mod fleet;
mod functions;
pub mod interpolate;
pub mod schema;
mod scope;
mod sinks;
mod sources;
mod spec;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use broker::{Access, Listener, TlsListener};
pub use fleet::FleetSpec;
pub use functions::render_topic;
pub use schema::EnvelopeFormat;
use schema::{BrokerConfig, Config, TlsConfig};
pub use scope::{KeyChanges, Scope};
pub use spec::*;

pub use endpoint::endpoint_from_flags;
pub(crate) use endpoint::{endpoint, http_tls};
pub(crate) use functions::check_topic_template;
use functions::functions;
use sinks::{check_reach, sinks};
use sources::sources;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// The key path, such as `functions[0].triggers[1]`; empty for problems
    /// with the file as a whole.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.reason)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.reason)
        }
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} problem{} in the configuration",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Shortest bearer token accepted.
const MIN_TOKEN_LEN: usize = 16;

/// A listen address (`IP:port`); a problem naming `key` if it is not one.
fn listen_addr(p: &mut Problems<'_>, key: &str, value: &str, example: &str) -> Option<SocketAddr> {
    let parsed = value.parse::<SocketAddr>().ok();
    if parsed.is_none() {
        p.add(
            key,
            format!("`{value}` is not an IP address and port such as `{example}`"),
        );
    }
    parsed
}

/// `broker.retention_bytes_per_filter` within what rumqttd can work with:
/// [`crate::broker::RETENTION_SEGMENTS`] segments of at least 1 KiB each.
fn broker_retention(p: &mut Problems<'_>, bytes: u64) -> Option<u64> {
    let range = crate::broker::MIN_RETENTION_BYTES..=crate::broker::MAX_RETENTION_BYTES;
    if range.contains(&bytes) {
        Some(bytes)
    } else {
        p.add(
            "broker.retention_bytes_per_filter",
            format!(
                "{bytes} is outside {}..={} bytes",
                range.start(),
                range.end()
            ),
        );
        None
    }
}

fn admin(p: &mut Problems<'_>, settings: &schema::AdminSettings) -> Option<AdminSpec> {
    let listen = listen_addr(p, "admin.listen", &settings.listen, "127.0.0.1:9180")?;
    match &settings.token {
        Some(t) if t.len() < MIN_TOKEN_LEN => {
            p.add(
                "admin.token",
                format!("must be at least {MIN_TOKEN_LEN} characters"),
            );
            None
        }
        None if !listen.ip().is_loopback() => {
            p.add(
                "admin.token",
                format!("required when `admin.listen` (`{listen}`) is not a loopback address: anyone who can reach it could read the gateway's metrics"),
            );
            None
        }
        token => Some(AdminSpec {
            listen,
            token: token.clone(),
        }),
    }
}

/// Loads, interpolates and validates a configuration file, using the
/// process environment for `${VAR}`.
pub fn load(path: &Path) -> Result<ValidConfig, ConfigErrors> {
    load_with_env(path, &|name| std::env::var(name).ok())
}

/// [`load`] with an explicit variable lookup (for tests).
pub fn load_with_env(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ValidConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            key: String::new(),
            reason: format!("cannot read the file: {e}"),
        }])
    })?;
    parse(path, &text, env)
}

/// Parses and validates configuration text; `path` names the file in errors
/// and anchors relative paths.
pub fn parse(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ValidConfig, ConfigErrors> {
    let err = |key: String, reason: String| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            key,
            reason,
        }])
    };
    let mut table: toml::Table = toml::from_str(text).map_err(|e| {
        err(
            String::new(),
            format!("invalid TOML: {}", e.to_string().trim_end()),
        )
    })?;
    let mut problems = Vec::new();
    for (key, value) in table.iter_mut() {
        interpolate_value(key.clone(), value, env, &mut problems);
    }
    if !problems.is_empty() {
        return Err(ConfigErrors(
            problems
                .into_iter()
                .map(|(key, reason)| ConfigError {
                    file: path.to_owned(),
                    key,
                    reason,
                })
                .collect(),
        ));
    }
    from_table(path, table)
}

/// Deserializes and validates an interpolated table; the result keeps the
/// table (see [`with_functions`]).
fn from_table(path: &Path, table: toml::Table) -> Result<ValidConfig, ConfigErrors> {
    let err = |key: String, reason: String| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            key,
            reason,
        }])
    };
    let raw = std::sync::Arc::new(table.clone());
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let mut key = if key == "." { String::new() } else { key };
            let mut reason = e.into_inner().to_string().trim_end().to_owned();
            // A nested path from a tagged table (see `schema::NESTED_PATH`).
            let marker = schema::NESTED_PATH;
            if let Some((before, rest)) = reason.split_once(marker)
                && let Some((nested, message)) = rest.split_once(marker)
            {
                if nested != "." {
                    key = format!("{key}.{nested}");
                }
                reason = format!("{before}{message}");
            }
            err(key, reason)
        })?;
    let mut valid = validate(path, config)?;
    valid.raw = raw;
    Ok(valid)
}

/// `base` with `extra` functions (a fleet bundle's `[[functions]]`)
/// appended after the file's own, validated as one configuration: a
/// bundle's functions obey every rule the file's do (names unique, sinks
/// and serial ports that exist, topics the gateway may use). The extra
/// tables are not interpolated: `${VAR}` in a bundle stays as written, so a
/// bundle cannot read the board's environment. Problems in them are
/// reported as `ORIGIN: functions[i].key: reason`, `i` counting within
/// `extra`.
pub fn with_functions(
    base: &ValidConfig,
    extra: Vec<toml::Value>,
    origin: &Path,
) -> Result<ValidConfig, ConfigErrors> {
    let mut table = (*base.raw).clone();
    let own = match table.get("functions") {
        Some(toml::Value::Array(a)) => a.len(),
        _ => 0,
    };
    if !extra.is_empty() {
        let entry = table
            .entry("functions")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
        if let toml::Value::Array(list) = entry {
            list.extend(extra);
        }
    }
    from_table(&base.path, table).map_err(|ConfigErrors(list)| {
        ConfigErrors(list.into_iter().map(|e| relabel(e, own, origin)).collect())
    })
}

/// A problem in `functions[i]` with `i >= own` is the bundle's: named
/// after `origin`, counted from the bundle's first function.
fn relabel(mut e: ConfigError, own: usize, origin: &Path) -> ConfigError {
    let index = e
        .key
        .strip_prefix("functions[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest.to_owned())));
    if let Some((i, rest)) = index
        && i >= own
    {
        e.file = origin.to_owned();
        e.key = format!("functions[{}]{rest}", i - own);
    }
    e
}

fn interpolate_value(
    key: String,
    value: &mut toml::Value,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<(String, String)>,
) {
    match value {
        toml::Value::String(s) => match interpolate::interpolate(s, env) {
            Ok(new) => *s = new,
            Err(e) => problems.push((key, e.to_string())),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(format!("{key}[{i}]"), item, env, problems);
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                interpolate_value(format!("{key}.{k}"), v, env, problems);
            }
        }
        _ => {}
    }
}

/// Collects problems while validating.
/// Every problem found so far, each under its key path.
pub struct Problems<'a> {
    file: &'a Path,
    list: Vec<ConfigError>,
}

impl Problems<'_> {
    pub(crate) fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.list.push(ConfigError {
            file: self.file.to_owned(),
            key: key.into(),
            reason: reason.into(),
        });
    }
}

/// `[broker]`: the embedded broker's listeners and logins, or the external
/// broker's endpoint.
fn broker_spec(
    p: &mut Problems<'_>,
    config: &Config,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Option<Broker> {
    match &config.broker {
        BrokerConfig::Embedded {
            listen,
            retention_bytes_per_filter,
            allow_anonymous,
            password_file,
            tls,
            acl,
            ..
        } => {
            let retention = broker_retention(p, *retention_bytes_per_filter);
            let listen = listen_addr(p, "broker.listen", listen, "127.0.0.1:1883");
            let access = listen.and_then(|listen| {
                let keys = broker::AccessKeys {
                    listen,
                    allow_anonymous: *allow_anonymous,
                    password_file: password_file.as_deref(),
                    tls: tls.as_ref(),
                    acl: acl.as_deref(),
                };
                broker::access(p, resolve, keys)
            });
            retention
                .zip(access)
                .map(|(retention_bytes_per_filter, access)| Broker::Embedded {
                    retention_bytes_per_filter,
                    access,
                })
        }
        BrokerConfig::External(ext) => endpoint(
            p,
            "broker",
            resolve,
            &ext.url,
            ext.client_id
                .clone()
                .unwrap_or_else(|| format!("edgefn-{}", config.gateway.id)),
            ext.username.as_deref(),
            ext.password.as_deref(),
            ext.tls.as_ref(),
        )
        .map(Broker::External),
    }
}

/// The least default `runtime.pool_instances`: room for functions added by
/// a reload (a slot reserves address space, not memory).
pub const MIN_DEFAULT_POOL_INSTANCES: u32 = 64;

/// `[runtime]`.
fn runtime_spec(p: &mut Problems<'_>, config: &Config) -> RuntimeSpec {
    let rt = &config.runtime;
    if !(1..=4096).contains(&rt.max_memory_mib) {
        p.add("runtime.max_memory_mib", "must be between 1 and 4096 MiB");
    }
    if let Some(n) = rt.pool_instances
        && !(1..=10_000).contains(&n)
    {
        p.add("runtime.pool_instances", "must be between 1 and 10000");
    }
    if rt.watch_ms != 0 && rt.watch_ms < 50 {
        p.add(
            "runtime.watch_ms",
            "must be 0 (off) or at least 50 milliseconds",
        );
    }
    if rt.rollback_after == 0 {
        p.add("runtime.rollback_after", "must be at least 1");
    }
    RuntimeSpec {
        pooling: rt.pooling,
        pool_instances: rt.pool_instances.unwrap_or_else(|| {
            u32::try_from(config.functions.len())
                .unwrap_or(u32::MAX)
                .saturating_mul(2)
                .saturating_add(8)
                .max(MIN_DEFAULT_POOL_INSTANCES)
        }),
        pool_instances_set: rt.pool_instances,
        max_memory_bytes: rt.max_memory_mib.saturating_mul(1024 * 1024),
        compile_cache: rt.compile_cache,
        watch: (rt.watch_ms > 0).then(|| Duration::from_millis(rt.watch_ms)),
        rollback_after: rt.rollback_after,
    }
}

/// Characters allowed in gateway ids, function names and sink names: they
/// end up in MQTT topics, metric labels and file names.
pub(crate) fn check_name(p: &mut Problems<'_>, key: &str, name: &str) {
    if name.is_empty() {
        p.add(key, "must not be empty");
    } else if name.len() > 64 {
        p.add(key, "must be at most 64 characters long");
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        p.add(
            key,
            format!("`{name}` may only contain letters, digits, `-`, `_` and `.`"),
        );
    }
}

fn validate(path: &Path, config: Config) -> Result<ValidConfig, ConfigErrors> {
    let mut p = Problems {
        file: path,
        list: Vec::new(),
    };
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |rel: &Path| {
        if rel.is_absolute() {
            rel.to_owned()
        } else {
            base.join(rel)
        }
    };

    let gateway_id = config.gateway.id.clone();
    check_name(&mut p, "gateway.id", &gateway_id);

    let keep_alive_s = match &config.broker {
        BrokerConfig::Embedded { keep_alive_s, .. } => *keep_alive_s,
        BrokerConfig::External(ext) => ext.keep_alive_s,
    };
    if !(1..=65_535).contains(&keep_alive_s) {
        p.add("broker.keep_alive_s", "must be between 1 and 65535 seconds");
    }
    let broker = broker_spec(&mut p, &config, &resolve);

    let sinks = sinks(&mut p, &config, &resolve);
    let sink_names: BTreeSet<String> = sinks.iter().map(|s| s.name.clone()).collect();

    if !(1..=1000).contains(&config.outbox.max_commits_per_sec) {
        p.add("outbox.max_commits_per_sec", "must be between 1 and 1000");
    }

    let sources = sources(&mut p, &config, &resolve);
    let serial_names: BTreeSet<String> = sources
        .iter()
        .map(SourceSpec::common)
        .filter(|c| c.writable)
        .map(|c| c.name.to_owned())
        .collect();

    let modbus_names: BTreeSet<String> = sources
        .iter()
        .filter(|s| matches!(s, SourceSpec::Modbus(_)))
        .map(|s| s.common().name.to_owned())
        .collect();
    let gpio_names: BTreeSet<String> = sources
        .iter()
        .filter(|s| matches!(s, SourceSpec::GpioOutput(_)))
        .map(|s| s.common().name.to_owned())
        .collect();

    let runtime = runtime_spec(&mut p, &config);
    let functions = functions(
        &mut p,
        &config,
        &sink_names,
        &serial_names,
        &modbus_names,
        &gpio_names,
        &resolve,
    );
    check_reach(&mut p, &config, &sinks, &functions);
    // A mirrored frame must not come back in as an MQTT event.
    for (i, s) in sources.iter().enumerate() {
        if let Some(m) = s.common().mirror_topic
            && let Some(f) = functions.iter().find(|f| f.triggers.matches(m))
        {
            p.add(
                format!("sources[{i}].mirror_topic"),
                format!("`{m}` matches the triggers of function `{}`: each frame would be handled twice", f.name),
            );
        }
    }

    let admin = config.admin.as_ref().map(|a| admin(&mut p, a));
    let fleet = (config.fleet.as_ref()).map(|f| fleet::fleet(&mut p, f, &sinks, &resolve));
    if !(1..=3600).contains(&config.gateway.shutdown_timeout_s) {
        p.add(
            "gateway.shutdown_timeout_s",
            "must be between 1 and 3600 seconds",
        );
    }
    if !(1..=64).contains(&config.gateway.io_threads) {
        p.add("gateway.io_threads", "must be between 1 and 64");
    }

    match (p.list.is_empty(), broker) {
        (true, Some(broker)) => Ok(ValidConfig {
            path: path.to_owned(),
            gateway_id,
            data_dir: resolve(&config.gateway.data_dir),
            broker,
            source_keep_alive: Duration::from_secs(keep_alive_s),
            functions,
            sinks,
            outbox_commits_per_sec: config.outbox.max_commits_per_sec,
            sources,
            runtime,
            admin: admin.flatten(),
            shutdown_timeout: Duration::from_secs(config.gateway.shutdown_timeout_s),
            io_threads: config.gateway.io_threads,
            raw: std::sync::Arc::default(),
            fleet: fleet.flatten(),
        }),
        _ => Err(ConfigErrors(p.list)),
    }
}

#[cfg(test)]
pub(crate) mod tests;
