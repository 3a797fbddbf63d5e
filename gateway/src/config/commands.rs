//! `subscribe` of an MQTT sink: the filters cloud commands arrive on.

use super::schema::{MqttSinkConfig, SinkConfig};
use super::{FunctionSpec, Problems};
use crate::topic::TopicFilter;

/// The placeholder replaced by the gateway id in a subscribe filter.
const GATEWAY: &str = "{gateway}";

/// A subscribe filter with `{gateway}` replaced.
fn render(raw: &str, gateway_id: &str) -> String {
    raw.replace(GATEWAY, gateway_id)
}

/// The validated subscribe filters of the MQTT sink at `key`.
pub(super) fn subscribe(
    p: &mut Problems<'_>,
    key: &str,
    c: &MqttSinkConfig,
    gateway_id: &str,
) -> Vec<TopicFilter> {
    let mut filters = Vec::new();
    for (j, raw) in c.subscribe.iter().enumerate() {
        let rendered = render(raw, gateway_id);
        match TopicFilter::parse(&rendered) {
            Ok(f) => filters.push(f),
            Err(e) => p.add(
                format!("{key}.subscribe[{j}]"),
                format!("`{raw}` is not a valid MQTT topic filter: {e}"),
            ),
        }
    }
    filters
}

/// Refuses `subscribe` on a sink kind that cannot subscribe.
pub(super) fn refuse_on_http(p: &mut Problems<'_>, key: &str, given: bool) {
    if given {
        p.add(
            format!("{key}.subscribe"),
            "only MQTT sinks can subscribe to cloud commands (this sink is `kind = \"http\"`)",
        );
    }
}

/// Refuses a subscribe filter that no function's triggers overlap: every
/// command arriving on it would be acknowledged and discarded.
pub(super) fn check_reach(
    p: &mut Problems<'_>,
    sinks: &[SinkConfig],
    functions: &[FunctionSpec],
    gateway_id: &str,
) {
    for (i, sink) in sinks.iter().enumerate() {
        let SinkConfig::Mqtt(c) = sink else { continue };
        for (j, raw) in c.subscribe.iter().enumerate() {
            let Ok(filter) = TopicFilter::parse(&render(raw, gateway_id)) else {
                continue;
            };
            let reached = functions
                .iter()
                .any(|f| f.triggers.filters().iter().any(|t| t.overlaps(&filter)));
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
