//! Fleet deployment: signed function bundles, the signed desired state a
//! gateway follows, and the on-disk store of what it runs.
//!
//! - [`keys`]: ed25519 key files, key ids, the trusted key list.
//! - [`bundle`]: the signed, content-addressed bundle format.
//! - [`desired`]: the signed desired-state document.
//! - [`store`]: bundles, components and the current state under
//!   `data_dir/fleet/`, written atomically.
//! - [`cli_bundle`]: the bodies of `edgefn keygen` and `edgefn bundle`.

pub mod bundle;
pub mod cli_bundle;
pub mod desired;
pub mod keys;
pub mod store;
