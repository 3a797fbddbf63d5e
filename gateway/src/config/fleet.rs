//! `[fleet]`: which keys a gateway trusts to sign bundles, which MQTT sink's
//! connection carries the fleet topics, how often the gateway reports, and
//! the largest bundle it accepts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Problems, SinkSpec};
use crate::fleet::keys::{PUBLIC_PREFIX, PublicKey, TrustedKeys};

/// Default `report_interval_s`.
const DEFAULT_REPORT_INTERVAL_S: u64 = 10;
/// Default `max_bundle_bytes`: 32 MiB.
const DEFAULT_MAX_BUNDLE_BYTES: u64 = 32 * 1024 * 1024;
/// Range of `max_bundle_bytes`: 1 KiB to 1 GiB.
const BUNDLE_BYTES: std::ops::RangeInclusive<u64> = 1024..=1024 * 1024 * 1024;

/// `[fleet]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Public keys whose signatures the gateway accepts on bundles and
    /// desired documents: key files (relative to the config) or inline
    /// `ed25519:<base64>` keys. At least one.
    pub trusted_keys: Vec<String>,
    /// An MQTT sink whose endpoint, TLS and credentials the fleet
    /// connection reuses; without it only `PUT /bundle` deploys.
    pub sink: Option<String>,
    /// How often the reported state is re-published, in seconds (1..=3600).
    #[serde(default = "default_report_interval_s")]
    pub report_interval_s: u64,
    /// The largest bundle accepted, in bytes (1 KiB..=1 GiB): a bound on
    /// what a deploy can make the gateway download and store.
    #[serde(default = "default_max_bundle_bytes")]
    pub max_bundle_bytes: u64,
}

fn default_report_interval_s() -> u64 {
    DEFAULT_REPORT_INTERVAL_S
}
fn default_max_bundle_bytes() -> u64 {
    DEFAULT_MAX_BUNDLE_BYTES
}

/// Validated `[fleet]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSpec {
    /// The keys whose signatures are accepted.
    pub trusted_keys: TrustedKeys,
    /// The MQTT sink whose connection carries the fleet topics.
    pub sink: Option<String>,
    /// How often the reported state is re-published.
    pub report_interval: Duration,
    /// The largest bundle accepted, in bytes.
    pub max_bundle_bytes: u64,
}

/// Validates `[fleet]` against the validated sinks.
pub(super) fn fleet(
    p: &mut Problems<'_>,
    settings: &FleetConfig,
    sinks: &[SinkSpec],
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Option<FleetSpec> {
    let before = p.list.len();
    if settings.trusted_keys.is_empty() {
        p.add(
            "fleet.trusted_keys",
            "needs at least one key (a `.pub` file from `edgefn keygen`, or `ed25519:<base64>`)",
        );
    }
    let mut keys = Vec::new();
    for (i, entry) in settings.trusted_keys.iter().enumerate() {
        let key = if entry.trim_start().starts_with(PUBLIC_PREFIX) {
            PublicKey::parse(entry)
        } else {
            PublicKey::read(&resolve(Path::new(entry)))
        };
        match key {
            Ok(k) if keys.contains(&k) => p.add(
                format!("fleet.trusted_keys[{i}]"),
                format!("key {} is listed twice", k.id()),
            ),
            Ok(k) => keys.push(k),
            Err(e) => p.add(format!("fleet.trusted_keys[{i}]"), e.to_string()),
        }
    }
    if let Some(name) = &settings.sink {
        match sinks.iter().find(|s| &s.name == name) {
            Some(s) if s.kind.mqtt_connection().is_none() => p.add(
                "fleet.sink",
                format!("`{name}` is not an MQTT sink: the fleet topics need an MQTT connection"),
            ),
            Some(_) => {}
            None => p.add("fleet.sink", format!("no sink named `{name}`")),
        }
    }
    if !(1..=3600).contains(&settings.report_interval_s) {
        p.add(
            "fleet.report_interval_s",
            "must be between 1 and 3600 seconds",
        );
    }
    if !BUNDLE_BYTES.contains(&settings.max_bundle_bytes) {
        p.add(
            "fleet.max_bundle_bytes",
            format!(
                "{} is outside {}..={} bytes (1 KiB to 1 GiB)",
                settings.max_bundle_bytes,
                BUNDLE_BYTES.start(),
                BUNDLE_BYTES.end()
            ),
        );
    }
    (p.list.len() == before).then(|| FleetSpec {
        trusted_keys: TrustedKeys(keys),
        sink: settings.sink.clone(),
        report_interval: Duration::from_secs(settings.report_interval_s),
        max_bundle_bytes: settings.max_bundle_bytes,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{ConfigError, ValidConfig, parse};
    use crate::fleet::keys::{PublicKey, keygen};

    const BASE: &str = "[gateway]\nid = \"gw1\"\n\
        [[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\nurl = \"mqtt://broker.example:1883\"\n\
        [[sinks]]\nkind = \"http\"\nname = \"http1\"\nurl = \"https://example.com/in\"\n";

    fn load(dir: &Path, fleet: &str) -> Result<ValidConfig, Vec<ConfigError>> {
        let text = format!("{BASE}[fleet]\n{fleet}\n");
        parse(&dir.join("edgefn.toml"), &text, &|_| None).map_err(|e| e.0)
    }

    #[test]
    fn fleet_keys_from_files_and_inline_with_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let (_, public) = keygen(&dir.path().join("keys")).unwrap();
        let inline = PublicKey::read(&keygen(&dir.path().join("k2")).unwrap().1).unwrap();
        let c = load(
            dir.path(),
            &format!("trusted_keys = [\"keys/edgefn.pub\", \"{inline}\"]\nsink = \"cloud\""),
        )
        .unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(
            f.trusted_keys.0,
            vec![PublicKey::read(&public).unwrap(), inline]
        );
        assert_eq!(f.sink.as_deref(), Some("cloud"));
        assert_eq!(f.report_interval, std::time::Duration::from_secs(10));
        assert_eq!(f.max_bundle_bytes, 32 * 1024 * 1024);
        let c = load(dir.path(), "trusted_keys = [\"keys/edgefn.pub\"]").unwrap();
        assert_eq!(c.fleet.unwrap().sink, None);
        let no_fleet = parse(&dir.path().join("x.toml"), BASE, &|_| None).unwrap();
        assert_eq!(no_fleet.fleet, None);
    }

    #[test]
    fn fleet_problems_name_their_key_paths() {
        let dir = tempfile::tempdir().unwrap();
        keygen(&dir.path().join("keys")).unwrap();
        let e = load(
            dir.path(),
            "trusted_keys = [\"keys/edgefn.pub\", \"x.pub\", \"ed25519:AAAA\", \"keys/edgefn.key\"]\n\
             sink = \"http1\"\nreport_interval_s = 0\nmax_bundle_bytes = 10",
        )
        .unwrap_err();
        let lines: Vec<String> = e.iter().map(ToString::to_string).collect();
        let file = dir.path().join("edgefn.toml").display().to_string();
        let has = |key: &str, text: &str| {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&format!("{file}: {key}: ")) && l.contains(text)),
                "{key} / {text}: {lines:#?}"
            )
        };
        has("fleet.trusted_keys[1]", "cannot read `");
        has("fleet.trusted_keys[1]", "x.pub`: No such file");
        has("fleet.trusted_keys[2]", "it holds 3 bytes");
        has(
            "fleet.trusted_keys[3]",
            "this is a secret key: list the public key",
        );
        has("fleet.sink", "`http1` is not an MQTT sink");
        has("fleet.report_interval_s", "between 1 and 3600");
        has("fleet.max_bundle_bytes", "10 is outside 1024..=1073741824");
        assert_eq!(lines.len(), 6, "{lines:#?}");

        let e = load(dir.path(), "trusted_keys = []\nsink = \"cloud2\"").unwrap_err();
        assert_eq!(e[0].key, "fleet.trusted_keys");
        assert!(e[0].reason.contains("at least one key"));
        assert_eq!(e[1].key, "fleet.sink");
        assert_eq!(e[1].reason, "no sink named `cloud2`");
        let e = load(
            dir.path(),
            "trusted_keys = [\"keys/edgefn.pub\"]\nsinks = \"cloud\"",
        )
        .unwrap_err();
        assert_eq!(e[0].key, "fleet.sinks");
        assert!(
            e[0].reason.contains("unknown field `sinks`"),
            "{}",
            e[0].reason
        );
    }
}
