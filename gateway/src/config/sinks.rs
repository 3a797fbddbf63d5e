//! Validation of `[[sinks]]`: what every sink has (a unique name, batching,
//! its outbox share) is checked here; each kind checks its own keys
//! ([`crate::sinks::SinkPlugin::validate`]).

use super::*;

pub(super) fn sinks(
    p: &mut Problems<'_>,
    config: &Config,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Vec<SinkSpec> {
    let mut sinks = Vec::new();
    let mut names = BTreeSet::new();
    for (i, sink) in config.sinks.iter().enumerate() {
        let key = format!("sinks[{i}]");
        check_name(p, &format!("{key}.name"), sink.name());
        if !names.insert(sink.name().to_owned()) {
            p.add(
                format!("{key}.name"),
                format!("duplicate sink name `{}`", sink.name()),
            );
        }
        let common = sink.common();
        let (format, batch_max, batch_linger_ms, outbox) = (
            common.format,
            common.batch_max,
            common.batch_linger_ms,
            common.outbox,
        );
        if !(1..=10_000).contains(&batch_max) {
            p.add(format!("{key}.batch_max"), "must be between 1 and 10000");
        }
        if batch_linger_ms > 60_000 {
            p.add(format!("{key}.batch_linger_ms"), "must be at most 60000");
        }
        if outbox.max_rows == 0 {
            p.add(format!("{key}.outbox.max_rows"), "must be at least 1");
        }
        if outbox.max_bytes < 1024 {
            p.add(format!("{key}.outbox.max_bytes"), "must be at least 1024");
        }
        if outbox.ttl_s == 0 {
            p.add(format!("{key}.outbox.ttl_s"), "must be at least 1 second");
        }
        let limits = crate::outbox::SinkLimits {
            sink: sink.name().to_owned(),
            max_rows: outbox.max_rows,
            max_bytes: outbox.max_bytes,
            ttl: Duration::from_secs(outbox.ttl_s),
            policy: outbox.full_policy,
        };
        let kind = sink.validate(&mut Scope::new(p, key, resolve, &config.gateway.id));
        if let Some(kind) = kind {
            sinks.push(SinkSpec {
                name: sink.name().to_owned(),
                format,
                batch_max,
                batch_linger: Duration::from_millis(batch_linger_ms),
                limits,
                kind,
            });
        }
    }
    sinks
}

/// Refuses a `subscribe` filter that no function's triggers overlap: every
/// command arriving on it would be acknowledged and discarded.
pub(super) fn check_reach(
    p: &mut Problems<'_>,
    config: &Config,
    sinks: &[SinkSpec],
    functions: &[FunctionSpec],
) {
    for sink in sinks {
        let Some(i) = config.sinks.iter().position(|s| s.name() == sink.name) else {
            continue;
        };
        for (j, filter) in sink.kind.subscriptions().iter().enumerate() {
            let reached = functions
                .iter()
                .any(|f| f.triggers.filters().iter().any(|t| t.overlaps(filter)));
            if !reached {
                p.add(
                    format!("sinks[{i}].subscribe[{j}]"),
                    format!(
                        "no function's `triggers` match `{}`: commands on it would be acknowledged and discarded",
                        filter.as_str()
                    ),
                );
            }
        }
    }
}
