//! What a component kind's validation works with: a [`Scope`] reports each
//! problem under the key of the entry being checked (`sources[2].baud`),
//! resolves relative paths against the configuration file, and knows the
//! gateway id; [`KeyChanges`] lists the keys whose values a re-read
//! configuration changes.

use std::path::{Path, PathBuf};

use super::Problems;

/// Resolves a configured path against the configuration file's directory.
pub(crate) type Resolve<'a> = &'a dyn Fn(&Path) -> PathBuf;

/// One `[[sources]]` or `[[sinks]]` entry under validation.
pub struct Scope<'a, 'f> {
    problems: &'a mut Problems<'f>,
    key: String,
    resolve: &'a dyn Fn(&Path) -> PathBuf,
    gateway_id: &'a str,
}

impl<'a, 'f> Scope<'a, 'f> {
    pub(super) fn new(
        problems: &'a mut Problems<'f>,
        key: String,
        resolve: &'a dyn Fn(&Path) -> PathBuf,
        gateway_id: &'a str,
    ) -> Self {
        Self {
            problems,
            key,
            resolve,
            gateway_id,
        }
    }

    /// Reports a problem with `field` of this entry (`field` may be a path,
    /// such as `tls.ca` or `subscribe[1]`).
    pub fn add(&mut self, field: &str, reason: impl Into<String>) {
        let key = format!("{}.{field}", self.key);
        self.problems.add(key, reason);
    }

    /// The entry's key, such as `sinks[1]`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// `path` resolved against the configuration file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        (self.resolve)(path)
    }

    /// The gateway id (`gateway.id`), for defaults such as client ids.
    pub fn gateway_id(&self) -> &str {
        self.gateway_id
    }

    /// The parts the shared validators take.
    pub(crate) fn parts(&mut self) -> (&mut Problems<'f>, &str, Resolve<'_>) {
        (self.problems, &self.key, self.resolve)
    }
}

/// The keys of one entry whose values differ between two configurations.
#[derive(Debug, Default)]
pub struct KeyChanges(Vec<&'static str>);

impl KeyChanges {
    /// Records `key` if `a` and `b` differ.
    pub fn key<T: PartialEq + ?Sized>(&mut self, key: &'static str, a: &T, b: &T) {
        if a != b {
            self.0.push(key);
        }
    }

    /// Records the keys of an MQTT connection that differ.
    pub fn endpoint(&mut self, a: &super::MqttEndpoint, b: &super::MqttEndpoint) {
        self.key("url", &(&a.host, a.port), &(&b.host, b.port));
        self.key("client_id", &a.client_id, &b.client_id);
        let user = |e: &super::MqttEndpoint| e.credentials.as_ref().map(|c| c.0.clone());
        let pass = |e: &super::MqttEndpoint| e.credentials.as_ref().map(|c| c.1.clone());
        self.key("username", &user(a), &user(b));
        self.key("password", &pass(a), &pass(b));
        self.key("tls", &a.tls, &b.tls);
    }

    /// The keys recorded.
    pub fn into_keys(self) -> Vec<&'static str> {
        self.0
    }
}
