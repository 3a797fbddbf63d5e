//! Reading the gateways' retained reports, and `edgefn status`'s table.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use tokio::time::Instant;

use super::cloud::Cloud;
use crate::fleet::report::Reported;
use crate::fleet::topics;

/// After the subscription, how long without a message ends the reading
/// when no gateway list was given (the broker sends retained messages
/// right away).
const QUIET: Duration = Duration::from_millis(500);

/// The retained reports (subscribe [`topics::REPORTED_ALL`] first, plus any
/// `extra` filters, whose messages are returned too): until every gateway of
/// `want` has reported (and, with `extra`, a quiet pause followed), or
/// `wait` has passed; without `want`, until a quiet pause. Unreadable reports are named on stderr and skipped.
pub async fn collect(
    cloud: &mut Cloud,
    want: &[String],
    extra: &[String],
    wait: Duration,
) -> anyhow::Result<(BTreeMap<String, Reported>, Vec<(String, Vec<u8>)>)> {
    // The extra filters first: a broker sends each subscription's retained
    // messages in order, so theirs come before the reports.
    let mut filters = extra.to_vec();
    filters.push(topics::REPORTED_ALL.to_owned());
    cloud.subscribe(&filters, wait).await?;
    let deadline = Instant::now() + wait;
    let mut reports = BTreeMap::new();
    let mut others = Vec::new();
    loop {
        let all_seen = !want.is_empty() && want.iter().all(|g| reports.contains_key(g));
        if all_seen && extra.is_empty() {
            break;
        }
        // Without a list, or with every listed report in but other
        // retained messages perhaps still coming: until a quiet pause.
        let until = if want.is_empty() || all_seen {
            deadline.min(Instant::now() + QUIET)
        } else {
            deadline
        };
        let Some((topic, payload)) = cloud.next_message(until).await? else {
            break;
        };
        match topics::reported_gateway(&topic) {
            Some(gw) => match parse(gw, &payload) {
                Ok(r) => {
                    reports.insert(gw.to_owned(), r);
                }
                Err(e) => eprintln!("warning: {topic}: {e}"),
            },
            None => others.push((topic, payload.to_vec())),
        }
    }
    Ok((reports, others))
}

/// A report from its topic's payload; its `gateway` must match the topic.
pub fn parse(gw: &str, payload: &[u8]) -> Result<Reported, String> {
    let r: Reported = serde_json::from_slice(payload).map_err(|e| format!("not a report: {e}"))?;
    if r.gateway != gw {
        return Err(format!("names gateway `{}`", r.gateway.escape_debug()));
    }
    Ok(r)
}

pub use crate::event::now_ms;

fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// Writes the status table: one line per gateway of `want` (or every
/// reporting gateway without `want`). Returns the listed gateways that have
/// no report.
pub fn table(
    out: &mut dyn Write,
    reports: &BTreeMap<String, Reported>,
    want: &[String],
    now_ms: u64,
) -> std::io::Result<Vec<String>> {
    let names: Vec<&String> = if want.is_empty() {
        reports.keys().collect()
    } else {
        want.iter().collect()
    };
    writeln!(
        out,
        "{:<20} {:<9} {:>7} {:<12} {:>9} {:>8} {:>6}  LAST REFUSAL / ERROR",
        "GATEWAY", "STATE", "VERSION", "SHA256", "FUNCTIONS", "FAILURES", "AGE"
    )?;
    let mut missing = Vec::new();
    for gw in names {
        // Names and hashes come from the broker: never raw control bytes
        // on the operator's terminal.
        let name = gw.escape_debug().to_string();
        let Some(r) = reports.get(gw) else {
            writeln!(out, "{name:<20} {:<9}", "no report")?;
            missing.push(gw.clone());
            continue;
        };
        let (version, sha) = r
            .bundle
            .as_ref()
            .map_or(("-".to_owned(), "-".to_owned()), |b| {
                (
                    b.version.to_string(),
                    b.sha256
                        .chars()
                        .take(12)
                        .collect::<String>()
                        .escape_debug()
                        .to_string(),
                )
            });
        let open = r.functions.iter().filter(|f| f.breaker != "closed").count();
        let functions = if open == 0 {
            r.functions.len().to_string()
        } else {
            format!("{} ({open} open)", r.functions.len())
        };
        let note = match (&r.last_refusal, &r.last_error) {
            (Some(f), _) => format!(
                "refused{}: {}",
                f.version.map_or(String::new(), |v| format!(" version {v}")),
                f.reason
            ),
            (None, Some(e)) => format!("error: {e}"),
            (None, None) => String::new(),
        };
        writeln!(
            out,
            "{name:<20} {:<9} {version:>7} {sha:<12} {functions:>9} {:>8} {:>6}  {}",
            r.state.as_str(),
            r.since_apply.failures,
            age(now_ms.saturating_sub(r.reported_ms)),
            note.escape_debug(),
        )?;
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::report::{Health, Refusal, ReportState, Reported};

    #[test]
    fn the_table_never_prints_control_bytes_from_the_broker() {
        let gw = "gw\u{1b}[2J".to_owned();
        let r = Reported {
            gateway: gw.clone(),
            reported_ms: 1_000,
            state: ReportState::Refused,
            bundle: None,
            desired: None,
            functions: vec![],
            since_apply: Health::default(),
            last_refusal: Some(Refusal {
                sha256: None,
                version: Some(2),
                reason: "bad\u{1b}]0;title\u{7}".into(),
                at_ms: 1,
            }),
            last_error: None,
        };
        let reports = BTreeMap::from([(gw, r)]);
        let mut out = Vec::new();
        let missing = table(&mut out, &reports, &[], 5_000).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(missing.is_empty());
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text:?}"
        );
        assert!(text.contains("refused version 2: bad"), "{text}");
        assert!(text.contains(" 4s "), "{text}");
    }
}
