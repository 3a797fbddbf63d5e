//! STUB (replaced by the guardparts branch).
#![allow(missing_docs, dead_code, unused_variables)]
use std::path::{Path, PathBuf};
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTlsConfig {
    pub listen: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub enum TlsSetupError {
    Stub,
}
pub fn acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<tokio_rustls::TlsAcceptor, TlsSetupError> {
    Err(TlsSetupError::Stub)
}
pub fn peer_user(conn: &tokio_rustls::rustls::ServerConnection) -> Result<Option<String>, String> {
    Ok(None)
}
