//! Fleet deploy: signed function bundles sent to gateways over the cloud
//! broker, applied atomically, rolled out with a canary.

pub mod bundle;
pub mod chunks;
pub mod deploy;
pub mod desired;
pub mod keys;
pub mod link;
pub mod report;
pub mod topics;
