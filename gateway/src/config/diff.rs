//! What a re-read configuration (`SIGHUP`) changes that the running gateway
//! cannot apply live, named setting by setting, and what it asks for that
//! the running gateway does not have.
//!
//! Applied live: the whole function set (see [`crate::runtime::reload`]):
//! functions added, removed or changed in any setting. Everything else is
//! built at start and needs a restart: `[gateway]`, `[broker]`, `[outbox]`,
//! `[runtime]`, `[admin]`, `[fleet]`, every sink and source setting, and added or
//! removed sinks and sources.
//!
//! Sections are compared as whole values, key by key, so any difference is
//! found, not only a changed number of entries.

use std::fmt;

use super::{Broker, SinkSpec, SourceSpec, ValidConfig};

/// One setting that differs from the running configuration and is not
/// applied until a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartNeeded {
    /// Where: `gateway`, `broker`, `runtime`, `sinks.cloud`,
    /// `sources.gps`, `functions.enrich`, …
    pub section: String,
    /// Which key (`url`, `path`, …), or `*` for a whole entry.
    pub key: &'static str,
    /// `changed`, `added` or `removed`.
    pub change: &'static str,
}

impl fmt::Display for RestartNeeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key == "*" {
            write!(f, "{} {}", self.section, self.change)
        } else {
            write!(f, "{}.{} {}", self.section, self.key, self.change)
        }
    }
}

#[derive(Default)]
struct Diff(Vec<RestartNeeded>);

impl Diff {
    fn key<T: PartialEq + ?Sized>(&mut self, section: &str, key: &'static str, a: &T, b: &T) {
        if a != b {
            self.0.push(RestartNeeded {
                section: section.to_owned(),
                key,
                change: "changed",
            });
        }
    }

    fn entry(&mut self, section: String, change: &'static str) {
        self.0.push(RestartNeeded {
            section,
            key: "*",
            change,
        });
    }

    /// Entries by name: added, removed, and `compare` for those in both.
    fn entries<T>(
        &mut self,
        prefix: &str,
        running: &[T],
        new: &[T],
        name: impl Fn(&T) -> &str,
        mut compare: impl FnMut(&mut Self, &str, &T, &T),
    ) {
        for n in new {
            let section = format!("{prefix}.{}", name(n));
            match running.iter().find(|r| name(r) == name(n)) {
                Some(r) => compare(self, &section, r, n),
                None => self.entry(section, "added"),
            }
        }
        for r in running {
            if !new.iter().any(|n| name(n) == name(r)) {
                self.entry(format!("{prefix}.{}", name(r)), "removed");
            }
        }
    }

    fn sink(&mut self, section: &str, a: &SinkSpec, b: &SinkSpec) {
        self.key(section, "format", &a.format, &b.format);
        self.key(section, "batch_max", &a.batch_max, &b.batch_max);
        self.key(section, "batch_linger_ms", &a.batch_linger, &b.batch_linger);
        let (la, lb) = (&a.limits, &b.limits);
        self.key(section, "outbox.max_rows", &la.max_rows, &lb.max_rows);
        self.key(section, "outbox.max_bytes", &la.max_bytes, &lb.max_bytes);
        self.key(section, "outbox.ttl_s", &la.ttl, &lb.ttl);
        self.key(section, "outbox.full_policy", &la.policy, &lb.policy);
        self.keys(section, a.kind.changed(&b.kind));
    }

    /// Records `keys` of `section` as changed.
    fn keys(&mut self, section: &str, keys: Vec<&'static str>) {
        for key in keys {
            self.0.push(RestartNeeded {
                section: section.to_owned(),
                key,
                change: "changed",
            });
        }
    }

    fn source(&mut self, section: &str, a: &SourceSpec, b: &SourceSpec) {
        self.keys(section, a.changed(b));
    }
}

fn source_name(s: &SourceSpec) -> &str {
    s.common().name
}

/// Every setting of `new` that differs from `running` and needs a restart.
pub fn restart_needed(running: &ValidConfig, new: &ValidConfig) -> Vec<RestartNeeded> {
    let mut d = Diff::default();
    d.key("gateway", "id", &running.gateway_id, &new.gateway_id);
    d.key("gateway", "data_dir", &running.data_dir, &new.data_dir);
    let (ta, tb) = (&running.shutdown_timeout, &new.shutdown_timeout);
    d.key("gateway", "shutdown_timeout_s", ta, tb);
    let (ia, ib) = (&running.io_threads, &new.io_threads);
    d.key("gateway", "io_threads", ia, ib);
    // The fleet agent and its connection are built at start.
    d.key("fleet", "*", &running.fleet, &new.fleet);
    match (&running.broker, &new.broker) {
        (
            Broker::Embedded {
                retention_bytes_per_filter: ra,
                access: xa,
            },
            Broker::Embedded {
                retention_bytes_per_filter: rb,
                access: xb,
            },
        ) => {
            d.key("broker", "listen", &xa.plain.addr, &xb.plain.addr);
            d.key("broker", "retention_bytes_per_filter", ra, rb);
            // The password file's *contents* are re-read on every SIGHUP;
            // which file, the listeners and the rights need a restart.
            let anonymous = |x: &crate::config::Access| {
                (
                    x.plain.anonymous,
                    x.tls.as_ref().map(|t| t.listener.anonymous),
                )
            };
            d.key("broker", "allow_anonymous", &anonymous(xa), &anonymous(xb));
            d.key(
                "broker",
                "password_file",
                &xa.password_file,
                &xb.password_file,
            );
            d.key("broker", "tls", &xa.tls, &xb.tls);
            d.key("broker", "acl", &xa.acl, &xb.acl);
        }
        (Broker::External(a), Broker::External(b)) => {
            let mut keys = super::KeyChanges::default();
            keys.endpoint(a, b);
            d.keys("broker", keys.into_keys());
        }
        _ => d.key("broker", "kind", &0, &1),
    }
    let (ka, kb) = (&running.source_keep_alive, &new.source_keep_alive);
    d.key("broker", "keep_alive_s", ka, kb);
    let (ca, cb) = (running.outbox_commits_per_sec, new.outbox_commits_per_sec);
    d.key("outbox", "max_commits_per_sec", &ca, &cb);
    let (ra, rb) = (&running.runtime, &new.runtime);
    d.key("runtime", "pooling", &ra.pooling, &rb.pooling);
    // The default size follows the number of functions, which a reload
    // may change; only a size the file sets is compared.
    if ra.pool_instances_set.is_some() || rb.pool_instances_set.is_some() {
        d.key(
            "runtime",
            "pool_instances",
            &ra.pool_instances,
            &rb.pool_instances,
        );
    }
    d.key(
        "runtime",
        "max_memory_mib",
        &ra.max_memory_bytes,
        &rb.max_memory_bytes,
    );
    d.key(
        "runtime",
        "compile_cache",
        &ra.compile_cache,
        &rb.compile_cache,
    );
    d.key("runtime", "watch_ms", &ra.watch, &rb.watch);
    d.key(
        "runtime",
        "rollback_after",
        &ra.rollback_after,
        &rb.rollback_after,
    );
    let listen = |c: &ValidConfig| c.admin.as_ref().map(|a| a.listen);
    let token = |c: &ValidConfig| c.admin.as_ref().and_then(|a| a.token.clone());
    d.key("admin", "listen", &listen(running), &listen(new));
    d.key("admin", "token", &token(running), &token(new));
    d.entries("sinks", &running.sinks, &new.sinks, |s| &s.name, Diff::sink);
    d.entries(
        "sources",
        &running.sources,
        &new.sources,
        source_name,
        Diff::source,
    );
    d.0
}

/// Why `new` cannot be applied to a gateway running `running`: functions
/// that name a sink or serial port the running gateway does not have (their
/// forwards or writes would be accepted and then dropped).
pub fn missing_targets(running: &ValidConfig, new: &ValidConfig) -> Vec<String> {
    let mut problems = Vec::new();
    for f in &new.functions {
        for sink in &f.sinks {
            if !running.sinks.iter().any(|s| &s.name == sink) {
                problems.push(format!(
                    "functions.{}: sink `{sink}` is not running (sinks are added at a restart)",
                    f.name
                ));
            }
        }
        for port in &f.serial_ports {
            let running_port = running
                .sources
                .iter()
                .map(SourceSpec::common)
                .any(|s| s.writable && s.name == port);
            if !running_port {
                problems.push(format!(
                    "functions.{}: serial port `{port}` is not running (sources are added at a restart)",
                    f.name
                ));
            }
        }
        for device in f.modbus.keys() {
            if !running.sources.iter().any(|s| s.common().name == device) {
                problems.push(format!(
                    "functions.{}: Modbus device `{device}` is not running (sources are added at a restart)",
                    f.name
                ));
            }
        }
        for line in &f.gpio {
            if !running.sources.iter().any(|s| s.common().name == line) {
                problems.push(format!(
                    "functions.{}: GPIO output `{line}` is not running (sources are added at a restart)",
                    f.name
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> ValidConfig {
        let text = format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"/tmp/d\"\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:1883\"\n{extra}"
        );
        super::super::parse(std::path::Path::new("/tmp/edgefn.toml"), &text, &|_| None)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    const SINK: &str =
        "[[sinks]]\nkind = \"http\"\nname = \"cloud\"\nurl = \"http://127.0.0.1:1/a\"\n";

    #[test]
    fn names_each_changed_key_and_whole_entries() {
        let running = parse(SINK);
        let new = parse(&format!(
            "{}\n[[sinks]]\nkind = \"http\"\nname = \"cloud2\"\nurl = \"http://127.0.0.1:1/c\"\n[outbox]\nmax_commits_per_sec = 7\n",
            SINK.replace("/a", "/b")
        ));
        let found: Vec<String> = restart_needed(&running, &new)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            found,
            [
                "outbox.max_commits_per_sec changed",
                "sinks.cloud.url changed",
                "sinks.cloud2 added",
            ]
        );
        assert!(restart_needed(&running, &running).is_empty());
    }

    #[test]
    fn a_changed_thread_count_needs_a_restart() {
        let running = parse("");
        let mut new = running.clone();
        new.io_threads = 2;
        let found: Vec<String> = restart_needed(&running, &new)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(found, ["gateway.io_threads changed"]);
    }

    #[test]
    fn a_function_naming_a_sink_that_is_not_running_is_refused() {
        let running = parse(SINK);
        let new = parse(&format!(
            "{SINK}\n[[sinks]]\nkind = \"http\"\nname = \"cloud2\"\nurl = \"http://127.0.0.1:1/c\"\n[[functions]]\nname = \"f\"\ncomponent = \"/tmp/f.wasm\"\ntriggers = [\"a/#\"]\nsinks = [\"cloud\", \"cloud2\"]\n"
        ));
        let problems = missing_targets(&running, &new);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("sink `cloud2`"), "{problems:?}");
        assert!(missing_targets(&new, &new).is_empty());
    }

    #[test]
    fn a_function_naming_a_modbus_device_that_is_not_running_is_refused() {
        let running = parse("");
        let new = parse(
            "[[sources]]\nkind = \"modbus\"\nname = \"pump\"\nurl = \"tcp://127.0.0.1:1\"\ntopic = \"m/pump\"\n[[sources.registers]]\nname = \"v\"\ntable = \"holding\"\naddress = 0\n[[functions]]\nname = \"f\"\ncomponent = \"/tmp/f.wasm\"\ntriggers = [\"a/#\"]\nmodbus = [\"pump\"]\n",
        );
        let problems = missing_targets(&running, &new);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("Modbus device `pump` is not running"),
            "{problems:?}"
        );
        assert!(missing_targets(&new, &new).is_empty());
    }

    #[test]
    fn function_changes_and_the_derived_pool_size_need_no_restart() {
        let f = |name: &str, topic: &str, queue: usize| {
            format!(
                "[[functions]]\nname = \"{name}\"\ncomponent = \"/tmp/f.wasm\"\ntriggers = [\"{topic}/#\"]\nlimits = {{ queue = {queue} }}\n"
            )
        };
        let many: String = (0..40).map(|i| f(&format!("g{i}"), "g", 10)).collect();
        let running = parse(&(f("a", "a", 10) + &f("b", "b", 10)));
        let new = parse(&(f("a", "a2", 20) + &f("c", "c", 10) + &many));
        assert_ne!(running.runtime.pool_instances, new.runtime.pool_instances);
        assert!(
            restart_needed(&running, &new).is_empty(),
            "{:?}",
            restart_needed(&running, &new)
        );
        let fixed = parse(&format!(
            "[runtime]\npool_instances = 5\n{}",
            f("a", "a", 10)
        ));
        let found: Vec<String> = restart_needed(&running, &fixed)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(found, ["runtime.pool_instances changed"]);
    }
}
