//! When a timer ticks: the next time after a given one for `interval_ms`
//! and `cron` schedules, and what to do about ticks whose time passed while
//! the timer could not fire ([`CatchUp`]). [`Ticker`] holds no I/O but the
//! clocks, so tests drive it with paused tokio time.
//!
//! Interval ticks fall at `start + n × interval` on the monotonic clock
//! (no drift, no effect of wall-clock steps). Cron ticks are wall-clock
//! times in a time zone: the ticker sleeps at most [`MAX_SLEEP`] at a time
//! and looks at the wall clock again, so a clock step is noticed; a step
//! forward fires the awaited tick and treats the rest as missed (never a
//! burst), a step back waits for the wall clock to get there again.

use std::sync::Arc;
use std::time::Duration;

use chrono::TimeZone;
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use tokio::time::Instant;

use super::config::CatchUp;

/// Longest single sleep of a cron timer before it reads the wall clock again.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Missed ticks counted one by one at most (the count saturates here).
const MAX_COUNTED: u64 = 1000;

/// When a timer ticks.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Every so long, from the start.
    Every(Duration),
    /// At the times of a cron expression (boxed: it is large).
    Cron(Box<CronSchedule>),
}

/// A parsed cron expression in its time zone.
#[derive(Debug, Clone, PartialEq)]
pub struct CronSchedule {
    expr: String,
    cron: Cron,
    tz: Tz,
}

/// Why a cron expression was rejected.
#[derive(Debug, thiserror::Error)]
pub enum CronError {
    /// Not six fields.
    #[error(
        "`{expr}` has {fields} field(s); use six fields, seconds first (e.g. \"0 */5 * * * *\" for every five minutes)"
    )]
    Fields {
        /// The expression.
        expr: String,
        /// How many fields it has.
        fields: usize,
    },
    /// The parser said no.
    #[error("`{expr}`: {source}")]
    Invalid {
        /// The expression.
        expr: String,
        /// The parser's reason.
        #[source]
        source: croner::errors::CronError,
    },
    /// No time matches it.
    #[error("`{expr}` never fires (no date matches it)")]
    Never {
        /// The expression.
        expr: String,
    },
}

impl CronSchedule {
    /// Parses a six-field expression (or an `@daily`-style nickname) and
    /// checks it fires at least once after `now_ms`. The check is bounded:
    /// the parser's search gives up after a fixed number of steps (about
    /// 70 ms for `0 0 0 30 2 *` in a debug build).
    pub fn parse(expr: &str, tz: Tz, now_ms: i64) -> Result<Self, CronError> {
        let fields = expr.split_whitespace().count();
        if fields != 6 && !expr.trim_start().starts_with('@') {
            let expr = expr.to_owned();
            return Err(CronError::Fields { expr, fields });
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Required)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|source| CronError::Invalid {
                expr: expr.to_owned(),
                source,
            })?;
        let s = Self {
            expr: expr.to_owned(),
            cron,
            tz,
        };
        match s.next_after(now_ms) {
            Some(_) => Ok(s),
            None => Err(CronError::Never {
                expr: expr.to_owned(),
            }),
        }
    }

    /// The expression as written.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The time zone its fields are read in.
    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The first time strictly after `ms` (Unix milliseconds), if any.
    pub fn next_after(&self, ms: i64) -> Option<i64> {
        // Cron times are whole seconds: the first one > ms is the first one
        // >= the next whole second.
        let from = ms.div_euclid(1000).checked_add(1)?.checked_mul(1000)?;
        let t = self.tz.timestamp_millis_opt(from).single()?;
        let next = self.cron.find_next_occurrence(&t, true).ok()?;
        Some(next.timestamp_millis())
    }

    /// The last time strictly before `now` and strictly after `after`,
    /// with how many times lie in between (`after`, `now`) (saturating at
    /// [`MAX_COUNTED`]).
    pub fn missed(&self, after: i64, now: i64) -> Option<(i64, u64)> {
        let upto = now.checked_sub(1)?.div_euclid(1000).checked_mul(1000)?;
        let t = self.tz.timestamp_millis_opt(upto).single()?;
        let latest = self
            .cron
            .find_previous_occurrence(&t, true)
            .ok()?
            .timestamp_millis();
        if latest <= after {
            return None;
        }
        let mut n = 0;
        let mut at = after;
        while n < MAX_COUNTED {
            match self.next_after(at) {
                Some(t) if t <= latest => {
                    n += 1;
                    at = t;
                }
                _ => break,
            }
        }
        Some((latest, n.max(1)))
    }
}

/// The wall clock, in Unix milliseconds (a test clock in tests).
pub trait WallClock: Send + Sync {
    /// Now.
    fn now_ms(&self) -> i64;
}

/// The system's clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> i64 {
        i64::try_from(crate::event::now_ms()).unwrap_or(i64::MAX)
    }
}

/// One tick to fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    /// The time it was due, in Unix milliseconds.
    pub scheduled_ms: i64,
    /// When it fired, in Unix milliseconds.
    pub fired_ms: i64,
    /// Ticks fired by this timer in this run, this one included.
    pub count: u64,
    /// A catch-up tick for missed ones (`catch_up = "once"`).
    pub late: bool,
}

/// An interval schedule's position.
struct Every {
    period: Duration,
    start: Instant,
    start_ms: i64,
    /// Index of the last tick handled (fired or skipped); tick `n` is due
    /// at `start + n × period`.
    last: u64,
    /// Under `once`: the last scheduled time fired in an earlier run.
    resumed_from: Option<i64>,
}

/// A cron schedule's position.
struct AtTimes {
    schedule: Box<CronSchedule>,
    /// The last time handled (fired or skipped).
    last_ms: i64,
}

/// Where a schedule stands.
enum Plan {
    Every(Every),
    Cron(AtTimes),
}

/// Counts ticks and applies the catch-up rule.
struct Firing {
    catch_up: CatchUp,
    clock: Arc<dyn WallClock>,
    count: u64,
    skipped: u64,
}

/// Produces a timer's ticks.
pub struct Ticker {
    plan: Plan,
    firing: Firing,
}

impl Ticker {
    /// A ticker starting now. `resumed_from` is the last scheduled time
    /// fired before the gateway stopped (used under `catch_up = "once"`).
    pub fn new(
        schedule: &Schedule,
        catch_up: CatchUp,
        clock: Arc<dyn WallClock>,
        resumed_from: Option<i64>,
    ) -> Self {
        let now_ms = clock.now_ms();
        // A time from the future (the clock went back, or a bad file) or
        // before 1970 says nothing about what was missed.
        let resumed_from =
            resumed_from.filter(|&t| catch_up == CatchUp::Once && 0 < t && t <= now_ms);
        let plan = match schedule {
            Schedule::Every(period) => Plan::Every(Every {
                period: (*period).max(Duration::from_millis(1)),
                start: Instant::now(),
                start_ms: now_ms,
                last: 0,
                resumed_from,
            }),
            Schedule::Cron(schedule) => Plan::Cron(AtTimes {
                schedule: schedule.clone(),
                last_ms: resumed_from.unwrap_or(now_ms),
            }),
        };
        let firing = Firing {
            catch_up,
            clock,
            count: 0,
            skipped: 0,
        };
        Self { plan, firing }
    }

    /// Ticks skipped so far (dropped under `skip`, folded into a catch-up
    /// tick under `once`).
    pub fn skipped(&self) -> u64 {
        self.firing.skipped
    }

    /// Waits for the next tick. Ticks whose time passed since the last
    /// call returned are handled by the catch-up rule first. `None`: the
    /// schedule has no time left.
    pub async fn next(&mut self) -> Option<Tick> {
        match &mut self.plan {
            Plan::Every(e) => Some(e.next(&mut self.firing).await),
            Plan::Cron(c) => c.next(&mut self.firing).await,
        }
    }
}

impl Every {
    /// Unix milliseconds of tick `n`.
    fn at_ms(&self, n: u64) -> i64 {
        let offset = i64::try_from(self.period.as_millis().saturating_mul(u128::from(n)));
        self.start_ms.saturating_add(offset.unwrap_or(i64::MAX))
    }

    async fn next(&mut self, firing: &mut Firing) -> Tick {
        if let Some(tick) = self.resume(firing) {
            return tick;
        }
        // Ticks due strictly before now passed while the caller was busy.
        let nanos = self.period.as_nanos().max(1);
        let elapsed = Instant::now()
            .saturating_duration_since(self.start)
            .as_nanos();
        let passed = u64::try_from(elapsed.saturating_sub(1) / nanos).unwrap_or(u64::MAX);
        if passed > self.last {
            let missed = passed - self.last;
            self.last = passed;
            if let Some(tick) = firing.catch_up(missed, self.at_ms(passed)) {
                return tick;
            }
        }
        self.last += 1;
        let n = self.last;
        let offset = u32::try_from(n).map_or(Duration::MAX, |n| self.period.saturating_mul(n));
        match self.start.checked_add(offset) {
            Some(due) => tokio::time::sleep_until(due).await,
            None => std::future::pending().await,
        }
        firing.fire(self.at_ms(n), false)
    }

    /// Under `once`: one catch-up tick at the start for the ticks missed
    /// while the gateway was stopped.
    fn resume(&mut self, firing: &mut Firing) -> Option<Tick> {
        let last = self.resumed_from.take()?;
        let period_ms = i64::try_from(self.period.as_millis()).unwrap_or(i64::MAX);
        // The file is outside input: saturate rather than overflow.
        let missed = firing.clock.now_ms().saturating_sub(last) / period_ms.max(1);
        if missed < 1 {
            return None;
        }
        firing.note_skipped(u64::try_from(missed - 1).unwrap_or(0));
        let latest = last.saturating_add(missed.saturating_mul(period_ms));
        Some(firing.fire(latest, true))
    }
}

impl AtTimes {
    async fn next(&mut self, firing: &mut Firing) -> Option<Tick> {
        let now = firing.clock.now_ms();
        if let Some((latest, missed)) = self.schedule.missed(self.last_ms, now) {
            self.last_ms = latest;
            if let Some(tick) = firing.catch_up(missed, latest) {
                return Some(tick);
            }
        }
        loop {
            let next = self.schedule.next_after(self.last_ms)?;
            let now = firing.clock.now_ms();
            if now >= next {
                self.last_ms = next;
                return Some(firing.fire(next, false));
            }
            let wait = Duration::from_millis(u64::try_from(next - now).unwrap_or(0));
            tokio::time::sleep(wait.min(MAX_SLEEP)).await;
        }
    }
}

impl Firing {
    /// `missed` ticks passed, the last due at `latest_ms`: under `skip`
    /// they are dropped, under `once` one late tick stands for them all.
    fn catch_up(&mut self, missed: u64, latest_ms: i64) -> Option<Tick> {
        match self.catch_up {
            CatchUp::Skip => {
                self.note_skipped(missed);
                None
            }
            CatchUp::Once => {
                self.note_skipped(missed.saturating_sub(1));
                Some(self.fire(latest_ms, true))
            }
        }
    }

    fn note_skipped(&mut self, n: u64) {
        if n > 0 {
            self.skipped = self.skipped.saturating_add(n);
            tracing::debug!(skipped = n, catch_up = ?self.catch_up, "Timer ticks missed.");
        }
    }

    fn fire(&mut self, scheduled_ms: i64, late: bool) -> Tick {
        self.count += 1;
        Tick {
            scheduled_ms,
            fired_ms: self.clock.now_ms(),
            count: self.count,
            late,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
