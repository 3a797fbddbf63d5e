//! Durable per-function state: a key-value store kept by the gateway (in
//! SQLite), surviving restarts and new versions of the function.
//!
//! Writes are saved only if the handler returns `Ok`; reads see the call's
//! own earlier writes. Quotas (by default: key ≤ 256 bytes, value ≤ 64 KiB,
//! 1 MiB per function) are enforced by the host: over them, `set` fails.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::bindings::edgefn::function::kv as host;

/// The bytes stored under `key`.
pub fn get(key: &str) -> Option<Vec<u8>> {
    host::get(key)
}

/// Stores `value` under `key`.
pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
    Ok(host::set(key, value.as_ref())?)
}

/// Removes `key` (a missing key is fine).
pub fn delete(key: &str) -> Result<(), Error> {
    Ok(host::delete(key)?)
}

/// Keys starting with `prefix`, sorted.
pub fn keys(prefix: &str) -> Vec<String> {
    host::list_keys(prefix)
}

/// The JSON value stored under `key`; `None` if absent, an error if it does
/// not parse as `T`.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Error> {
    match host::get(key) {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error(format!("state `{key}` is not the expected JSON: {e}"))),
    }
}

/// Stores `value` as JSON under `key`.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), Error> {
    set(key, crate::to_json(value)?)
}
