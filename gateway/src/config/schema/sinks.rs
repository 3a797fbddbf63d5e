//! What every `[[sinks]]` entry has as written: its outbox share and its
//! envelope format. Each kind's own table lives in its folder
//! (`crate::sinks::<kind>::config`).

pub use crate::sinks::SinkConfig;

use super::*;

/// `[sinks.outbox]`: how much of the outbox one sink may hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkOutboxConfig {
    /// Records held for this sink at most.
    #[serde(default = "default_max_rows")]
    pub max_rows: u64,
    /// Payload bytes held for this sink at most.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Records older than this many seconds are deleted undelivered
    /// (counted and logged).
    #[serde(default = "default_ttl_s")]
    pub ttl_s: u64,
    /// When full: `refuse` (hold new records back; the sources stop
    /// acknowledging, nothing is dropped) or `drop_oldest`.
    #[serde(default = "default_full_policy")]
    pub full_policy: crate::outbox::FullPolicy,
}

impl Default for SinkOutboxConfig {
    fn default() -> Self {
        Self {
            max_rows: default_max_rows(),
            max_bytes: default_max_bytes(),
            ttl_s: default_ttl_s(),
            full_policy: default_full_policy(),
        }
    }
}

fn default_max_rows() -> u64 {
    1_000_000
}
fn default_max_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_ttl_s() -> u64 {
    7 * 24 * 3600
}
fn default_full_policy() -> crate::outbox::FullPolicy {
    crate::outbox::FullPolicy::Refuse
}

/// How a forwarded record is encoded on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeFormat {
    /// A JSON object; a JSON payload is embedded as JSON, any other payload
    /// as base64 under `payload_base64`.
    #[default]
    Json,
    /// A CBOR map with the payload as a byte string.
    Cbor,
}
