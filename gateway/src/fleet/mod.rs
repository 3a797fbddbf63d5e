//! Fleet deploy: signed function bundles sent to gateways over the cloud
//! broker, applied atomically, rolled out with a canary.
