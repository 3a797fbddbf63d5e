//! Validation of `[[sources]]`: what every source has (a unique name, an
//! event topic, an optional mirror topic) is checked here; each kind checks
//! its own keys ([`crate::sources::SourcePlugin::validate`]).

use super::*;
use crate::sources::{Common, SourceSpec};
use crate::topic::validate_topic_name;

pub(super) fn sources(
    p: &mut Problems<'_>,
    config: &Config,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Vec<SourceSpec> {
    let mut out: Vec<SourceSpec> = Vec::new();
    let mut names = BTreeSet::new();
    for (i, source) in config.sources.iter().enumerate() {
        let key = format!("sources[{i}]");
        check_name(p, &format!("{key}.name"), source.name());
        if !names.insert(source.name().to_owned()) {
            p.add(
                format!("{key}.name"),
                format!("duplicate source name `{}`", source.name()),
            );
        }
        let mut scope = Scope::new(p, key.clone(), resolve, &config.gateway.id);
        let Some(spec) = source.validate(&mut scope) else {
            continue;
        };
        let common = spec.common();
        if let Some(topic) = common.topic
            && let Err(e) = validate_topic_name(topic)
        {
            p.add(format!("{key}.topic"), format!("`{topic}`: {e}"));
        }
        if let Some(m) = common.mirror_topic
            && let Err(e) = validate_topic_name(m)
        {
            p.add(format!("{key}.mirror_topic"), format!("`{m}`: {e}"));
        }
        if let Some(why) = port_clash(&common, &out) {
            p.add(format!("{key}.path"), why);
        }
        out.push(spec);
    }
    out
}

/// Why `source` cannot open its serial port beside the entries before it:
/// only Modbus RTU units on one bus, with the same line settings, share one.
fn port_clash(source: &Common<'_>, before: &[SourceSpec]) -> Option<String> {
    let port = source.port?;
    let (other, theirs) = before
        .iter()
        .find_map(|s| Some((s.common(), s.common().port?)).filter(|(_, p)| p.path == port.path))?;
    let shared = matches!((port.shared, theirs.shared), (Some(a), Some(b)) if a == b);
    (!shared).then(|| {
        format!(
            "`{}` is also opened by source `{}`; only Modbus sources with the same serial settings can share a port",
            port.path.display(),
            other.name
        )
    })
}
