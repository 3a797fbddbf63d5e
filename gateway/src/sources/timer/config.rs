//! `[[sources]]` with `kind = "timer"`: the settings as written
//! ([`TimerSourceConfig`]), their validation, and the validated
//! [`TimerSpec`].

use std::time::Duration;

use serde::Deserialize;

use super::schedule::{CronSchedule, Schedule};
use crate::config::Problems;

/// Shortest and longest `interval_ms` (as for I2C polls).
const INTERVAL_MS: std::ops::RangeInclusive<u64> = 10..=86_400_000;

/// `[[sources]]` with `kind = "timer"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimerSourceConfig {
    /// Unique name: in the tick's payload (`timer`), logs, metrics, and the
    /// name of its state file under `catch_up = "once"`.
    pub name: String,
    /// Topic of the ticks: functions trigger on it like on MQTT topics.
    pub topic: String,
    /// Milliseconds between ticks, counted from the gateway's start without
    /// drift; exactly one of `interval_ms` and `cron` is set.
    #[serde(default)]
    pub interval_ms: Option<u64>,
    /// A cron expression with six fields, seconds first
    /// (`"0 */5 * * * *"`), for ticks at wall-clock times; exactly one of
    /// `interval_ms` and `cron` is set.
    #[serde(default)]
    pub cron: Option<String>,
    /// IANA time zone the `cron` fields are read in (`"Europe/Berlin"`),
    /// so a daily tick stays at its local hour across daylight saving time.
    /// Default `UTC`; only with `cron`.
    #[serde(default)]
    pub timezone: Option<String>,
    /// What happens to ticks whose time passed while the timer could not
    /// fire (the previous tick's functions were busy, or the gateway was
    /// stopped): `skip` them, or fire `once` for all of them.
    #[serde(default)]
    pub catch_up: CatchUp,
}

/// What a timer does with ticks whose time passed while it could not fire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Drop them (counted); the next tick fires on schedule.
    #[default]
    Skip,
    /// Fire one late tick for all of them, then resume the schedule. The
    /// last scheduled time is kept in `<data_dir>/timers/<name>.last`, so
    /// ticks missed while the gateway was stopped count too.
    Once,
}

/// A validated timer source.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerSpec {
    /// Unique name.
    pub name: String,
    /// Event topic.
    pub topic: String,
    /// When it ticks.
    pub schedule: Schedule,
    /// What it does with missed ticks.
    pub catch_up: CatchUp,
}

/// Checks a timer source (`key` is `sources[i]`); its name and topic are
/// checked with every other source's. `now_ms` is the wall clock, to find
/// out whether a cron expression ever fires.
pub(crate) fn validate(
    p: &mut Problems<'_>,
    key: &str,
    c: &TimerSourceConfig,
    now_ms: i64,
) -> Option<TimerSpec> {
    if c.timezone.is_some() && c.cron.is_none() {
        p.add(
            format!("{key}.timezone"),
            "only applies with `cron` (an `interval_ms` timer counts from the start, in no time zone)",
        );
    }
    let schedule = match (c.interval_ms, &c.cron) {
        (Some(_), Some(_)) | (None, None) => {
            p.add(
                format!("{key}.interval_ms"),
                "set exactly one of `interval_ms` and `cron`",
            );
            None
        }
        (Some(ms), None) => {
            if INTERVAL_MS.contains(&ms) {
                Some(Schedule::Every(Duration::from_millis(ms)))
            } else {
                p.add(
                    format!("{key}.interval_ms"),
                    "must be between 10 and 86400000",
                );
                None
            }
        }
        (None, Some(expr)) => cron(p, key, expr, c.timezone.as_deref(), now_ms),
    }?;
    Some(TimerSpec {
        name: c.name.clone(),
        topic: c.topic.clone(),
        schedule,
        catch_up: c.catch_up,
    })
}

fn cron(
    p: &mut Problems<'_>,
    key: &str,
    expr: &str,
    timezone: Option<&str>,
    now_ms: i64,
) -> Option<Schedule> {
    let tz = match timezone {
        None => chrono_tz::UTC,
        Some(name) => match name.parse::<chrono_tz::Tz>() {
            Ok(tz) => tz,
            Err(_) => {
                p.add(
                    format!("{key}.timezone"),
                    format!("unknown time zone `{name}` (use an IANA name such as \"UTC\" or \"Europe/Berlin\")"),
                );
                return None;
            }
        },
    };
    match CronSchedule::parse(expr, tz, now_ms) {
        Ok(s) => Some(Schedule::Cron(Box::new(s))),
        Err(e) => {
            p.add(format!("{key}.cron"), e.to_string());
            None
        }
    }
}
