//! STUB (replaced by the passwd branch).
#![allow(missing_docs, dead_code, unused_variables)]
use std::path::Path;
#[derive(Debug, Clone, Default)]
pub struct Passwords;
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub enum PasswdError {
    Stub,
}
impl Passwords {
    pub fn load(path: &Path) -> Result<Self, PasswdError> {
        Ok(Passwords)
    }
    pub fn entry(&self, user: &str) -> Option<&str> {
        None
    }
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        false
    }
    pub fn len(&self) -> usize {
        0
    }
    pub fn is_empty(&self) -> bool {
        true
    }
}
pub fn check_user_name(name: &str) -> Result<(), String> {
    Ok(())
}
