//! `[[functions]]` validated: triggers, allowlists, limits, and the sink
//! topic templates they forward through.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use super::schema::FunctionConfig;
use super::*;
use crate::topic::{FilterSet, TopicFilter, validate_topic_name};

pub(super) fn filters(p: &mut Problems<'_>, key: &str, raw: &[String]) -> FilterSet {
    let mut out = Vec::new();
    for (i, f) in raw.iter().enumerate() {
        match TopicFilter::parse(f) {
            Ok(f) => out.push(f),
            Err(e) => p.add(format!("{key}[{i}]"), format!("`{f}`: {e}")),
        }
    }
    FilterSet::new(out)
}

/// Every `[[functions]]` entry; `sinks` and `serial_ports` are the names
/// they may refer to.
pub(super) fn functions(
    p: &mut Problems<'_>,
    config: &Config,
    sink_names: &BTreeSet<String>,
    serial_names: &BTreeSet<String>,
    modbus_names: &BTreeSet<String>,
    gpio_names: &BTreeSet<String>,
    resolve: &dyn Fn(&Path) -> PathBuf,
) -> Vec<FunctionSpec> {
    let mut functions = Vec::new();
    let mut function_names = BTreeSet::new();
    for (i, f) in config.functions.iter().enumerate() {
        let key = format!("functions[{i}]");
        check_name(p, &format!("{key}.name"), &f.name);
        if !function_names.insert(f.name.clone()) {
            p.add(
                format!("{key}.name"),
                format!("duplicate function name `{}`", f.name),
            );
        }
        for (j, port) in f.serial_ports.iter().enumerate() {
            if !serial_names.contains(port) {
                p.add(
                    format!("{key}.serial_ports[{j}]"),
                    format!("no serial source named `{port}` is configured under [[sources]]"),
                );
            }
        }
        let modbus = modbus_grants(p, &key, &f.modbus, modbus_names);
        for (j, line) in f.gpio.iter().enumerate() {
            if !gpio_names.contains(line) {
                p.add(
                    format!("{key}.gpio[{j}]"),
                    format!("no GPIO output named `{line}` is configured under [[sources]]"),
                );
            }
        }
        if let Some(mut spec) = function(
            p,
            &key,
            f,
            sink_names,
            resolve,
            config.runtime.max_memory_mib,
        ) {
            spec.modbus = modbus;
            functions.push(spec);
        }
    }
    functions
}

fn function(
    p: &mut Problems<'_>,
    key: &str,
    f: &FunctionConfig,
    sink_names: &BTreeSet<String>,
    resolve: &dyn Fn(&Path) -> PathBuf,
    max_memory_mib: u64,
) -> Option<FunctionSpec> {
    if f.triggers.is_empty() {
        p.add(format!("{key}.triggers"), "needs at least one topic filter");
    }
    let triggers = filters(p, &format!("{key}.triggers"), &f.triggers);
    let publish = filters(p, &format!("{key}.publish"), &f.publish);
    for (i, s) in f.sinks.iter().enumerate() {
        if !sink_names.contains(s) {
            p.add(
                format!("{key}.sinks[{i}]"),
                format!("no sink named `{s}` is configured under [[sinks]]"),
            );
        }
    }
    let l = &f.limits;
    let lkey = format!("{key}.limits");
    if !(1..=60_000).contains(&l.timeout_ms) {
        p.add(
            format!("{lkey}.timeout_ms"),
            "must be between 1 and 60000 milliseconds",
        );
    }
    if !(1..=4096).contains(&l.memory_mib) {
        p.add(
            format!("{lkey}.memory_mib"),
            "must be between 1 and 4096 MiB",
        );
    }
    if l.max_payload_bytes == 0 || l.max_payload_bytes > 16 * 1024 * 1024 {
        p.add(
            format!("{lkey}.max_payload_bytes"),
            "must be between 1 and 16777216",
        );
    }
    if !(1..=1_000_000).contains(&l.queue) {
        p.add(format!("{lkey}.queue"), "must be between 1 and 1000000");
    }
    if l.memory_mib > max_memory_mib {
        p.add(
            format!("{lkey}.memory_mib"),
            format!("{} MiB does not fit a pool slot: raise runtime.max_memory_mib (now {max_memory_mib})", l.memory_mib),
        );
    }
    for (name, v, max) in [
        ("max_instances", l.max_instances, 10_000),
        ("max_tables", l.max_tables, 10_000),
        (
            "max_table_elements",
            l.max_table_elements,
            MAX_TABLE_ELEMENTS,
        ),
    ] {
        if !(1..=max).contains(&v) {
            p.add(
                format!("{lkey}.{name}"),
                format!("must be between 1 and {max}"),
            );
        }
    }
    for (name, v, max) in [
        ("log_lines", u64::from(l.log_lines), 100_000),
        ("log_bytes", l.log_bytes as u64, 16 * 1024 * 1024),
        ("log_lines_per_s", u64::from(l.log_lines_per_s), 100_000),
    ] {
        if v > max {
            p.add(
                format!("{lkey}.{name}"),
                format!("must be at most {max} (0 silences the function's log)"),
            );
        }
    }
    let b = &f.breaker;
    if b.backoff_ms == 0 || b.backoff_ms > b.max_backoff_ms {
        p.add(
            format!("{key}.breaker.backoff_ms"),
            "must be at least 1 and at most breaker.max_backoff_ms",
        );
    }
    let st = &f.state;
    if !(1..=65_536).contains(&st.max_key_bytes) {
        p.add(
            format!("{key}.state.max_key_bytes"),
            "must be between 1 and 65536",
        );
    }
    if !(1..=16 * 1024 * 1024).contains(&st.max_value_bytes) {
        p.add(
            format!("{key}.state.max_value_bytes"),
            "must be between 1 and 16777216",
        );
    }
    if st.max_total_bytes == 0 {
        p.add(format!("{key}.state.max_total_bytes"), "must be at least 1");
    }
    Some(FunctionSpec {
        name: f.name.clone(),
        component: resolve(&f.component),
        triggers,
        publish,
        sinks: f.sinks.iter().cloned().collect(),
        serial_ports: f.serial_ports.iter().cloned().collect(),
        modbus: BTreeMap::new(),
        gpio: f.gpio.iter().cloned().collect(),
        config: f.config.clone(),
        limits: Limits::from(l),
        instance: f.instance,
        breaker: BreakerSpec::from(&f.breaker),
        state: StateQuota::from(&f.state),
        priority: f.priority,
    })
}

pub(crate) fn check_topic_template(p: &mut Problems<'_>, key: &str, template: &str) {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            p.add(key, "unterminated `{` in topic template");
            return;
        };
        let name = &rest[start + 1..start + len];
        if !matches!(name, "gateway" | "function" | "sink" | "topic") {
            p.add(
                key,
                format!("unknown placeholder `{{{name}}}` (use {{gateway}}, {{function}}, {{sink}} or {{topic}})"),
            );
        }
        rest = &rest[start + len + 1..];
    }
    let sample = render_topic(template, "gw", "fn", "sink", "a/b");
    if let Err(e) = validate_topic_name(&sample) {
        p.add(
            key,
            format!("`{template}` does not make a valid topic: {e}"),
        );
    }
}

/// Fills a sink topic template.
pub fn render_topic(
    template: &str,
    gateway: &str,
    function: &str,
    sink: &str,
    topic: &str,
) -> String {
    template
        .replace("{gateway}", gateway)
        .replace("{function}", function)
        .replace("{sink}", sink)
        .replace("{topic}", topic)
}

/// The `modbus` list of a function: `"meter"` (every address) or
/// `"meter:100-109"`, each naming a Modbus source.
fn modbus_grants(
    p: &mut Problems<'_>,
    key: &str,
    grants: &[String],
    modbus_names: &BTreeSet<String>,
) -> BTreeMap<String, RangeInclusive<u16>> {
    let mut out = BTreeMap::new();
    for (j, grant) in grants.iter().enumerate() {
        let key = format!("{key}.modbus[{j}]");
        let (device, range) = match grant.split_once(':') {
            None => (grant.as_str(), Some(0..=u16::MAX)),
            Some((device, range)) => (device, parse_range(range)),
        };
        let Some(range) = range else {
            p.add(
                key,
                format!("`{grant}`: give `DEVICE` or `DEVICE:FIRST-LAST`, as in `meter:100-109`"),
            );
            continue;
        };
        if !modbus_names.contains(device) {
            p.add(
                key,
                format!("no Modbus source named `{device}` is configured under [[sources]]"),
            );
        } else if out.insert(device.to_owned(), range).is_some() {
            p.add(key, format!("`{device}` is listed twice"));
        }
    }
    out
}

/// `FIRST-LAST` (or one address) as an inclusive range.
fn parse_range(text: &str) -> Option<RangeInclusive<u16>> {
    let (first, last) = text.split_once('-').unwrap_or((text, text));
    let (first, last) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
    (first <= last).then_some(first..=last)
}
