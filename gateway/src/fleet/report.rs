//! The JSON a gateway publishes (retained) on `edgefn/fleet/<gw>/reported`:
//! what it runs, the last desired document it saw, its functions' health
//! and its last refusal. Every optional part has a serde default, so older
//! and newer gateways and tools read each other's reports.

use serde::{Deserialize, Serialize};

/// A gateway's reported state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    /// The gateway's id.
    pub gateway: String,
    /// When this report was made (ms since the epoch, the gateway's clock).
    #[serde(default)]
    pub reported_ms: u64,
    /// What the gateway is doing.
    pub state: ReportState,
    /// The bundle that runs; `None` = the configuration's functions only.
    #[serde(default)]
    pub bundle: Option<RunningBundle>,
    /// The last desired document seen.
    #[serde(default)]
    pub desired: Option<DesiredSummary>,
    /// Every function that runs.
    #[serde(default)]
    pub functions: Vec<FunctionReport>,
    /// Health of the bundle's functions since the running bundle was applied.
    #[serde(default)]
    pub since_apply: Health,
    /// The last desired document or bundle that was refused.
    #[serde(default)]
    pub last_refusal: Option<Refusal>,
    /// The last error (e.g. a fetch that failed).
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What a gateway is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportState {
    /// Running what it reports in `bundle`.
    #[default]
    Running,
    /// Fetching or applying a bundle.
    Applying,
    /// Refused the last desired document (see `last_refusal`).
    Refused,
    /// Could not fetch or apply the last desired bundle (see `last_error`).
    Failed,
}

impl ReportState {
    /// The lowercase name, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Applying => "applying",
            Self::Refused => "refused",
            Self::Failed => "failed",
        }
    }
}

/// The bundle a gateway runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningBundle {
    /// sha256 (hex) of the bundle file.
    pub sha256: String,
    /// The bundle's version.
    pub version: u64,
    /// When it was applied (ms since the epoch).
    #[serde(default)]
    pub applied_ms: u64,
}

/// The last desired document a gateway saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredSummary {
    /// Its bundle's sha256; `None` = no bundle.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Its bundle's version.
    #[serde(default)]
    pub version: Option<u64>,
    /// Whether it was forced.
    #[serde(default)]
    pub force: bool,
    /// When it was issued (ms since the epoch, the deploy machine's
    /// clock): `edgefn deploy` issues later ones, whatever its own clock
    /// says, so they are not refused as replays.
    #[serde(default)]
    pub issued_ms: u64,
}

/// One function's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionReport {
    /// Its name.
    pub name: String,
    /// Its version (a prefix of the component's hash).
    #[serde(default)]
    pub version: String,
    /// `closed`, `open` or `half-open`.
    #[serde(default)]
    pub breaker: String,
    /// Invocations since start.
    #[serde(default)]
    pub invocations: u64,
    /// Failed invocations since start.
    #[serde(default)]
    pub failures: u64,
    /// Times its circuit breaker opened.
    #[serde(default)]
    pub breaker_opens: u64,
}

/// Invocation counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Invocations.
    #[serde(default)]
    pub invocations: u64,
    /// Failed invocations.
    #[serde(default)]
    pub failures: u64,
    /// Circuit breaker openings.
    #[serde(default)]
    pub breaker_opens: u64,
}

/// A refused desired document or bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The refused bundle's sha256, if known.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The refused bundle's version, if known.
    #[serde(default)]
    pub version: Option<u64>,
    /// Why.
    pub reason: String,
    /// When (ms since the epoch).
    #[serde(default)]
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_and_extended_reports_parse() {
        let r: Reported =
            serde_json::from_str(r#"{"gateway":"gw1","state":"refused","future":1}"#).unwrap();
        assert_eq!(r.state, ReportState::Refused);
        assert_eq!(r.since_apply, Health::default());
        let full = Reported {
            gateway: "gw1".into(),
            reported_ms: 5,
            state: ReportState::Running,
            bundle: Some(RunningBundle {
                sha256: "ab".into(),
                version: 2,
                applied_ms: 4,
            }),
            desired: Some(DesiredSummary {
                sha256: Some("ab".into()),
                version: Some(2),
                force: false,
                issued_ms: 0,
            }),
            functions: vec![FunctionReport {
                name: "f".into(),
                version: "0123".into(),
                breaker: "half-open".into(),
                invocations: 3,
                failures: 1,
                breaker_opens: 1,
            }],
            since_apply: Health {
                invocations: 3,
                failures: 1,
                breaker_opens: 1,
            },
            last_refusal: Some(Refusal {
                sha256: None,
                version: None,
                reason: "old".into(),
                at_ms: 1,
            }),
            last_error: None,
        };
        let json = serde_json::to_string(&full).unwrap();
        assert!(json.contains(r#""state":"running""#), "{json}");
        assert_eq!(serde_json::from_str::<Reported>(&json).unwrap(), full);
    }
}
