//! Schedule logic with paused tokio time, and cron times as plain unit tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::TimeZone;
use tokio::time::Instant;

use super::*;

/// A wall clock that follows paused tokio time from `base`, plus steps.
pub(crate) struct TestClock {
    start: Instant,
    base: i64,
    step: AtomicI64,
}

impl TestClock {
    pub(crate) fn new(base: i64) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            base,
            step: AtomicI64::new(0),
        })
    }

    /// Steps the wall clock (as NTP or an operator would).
    pub(crate) fn jump(&self, ms: i64) {
        self.step.fetch_add(ms, Ordering::Relaxed);
    }
}

impl WallClock for TestClock {
    fn now_ms(&self) -> i64 {
        let elapsed = i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.base + elapsed + self.step.load(Ordering::Relaxed)
    }
}

/// 2026-01-01T12:00:03Z.
const BASE: i64 = 1_767_268_803_000;
const MS: Duration = Duration::from_millis(100);

fn every(period: Duration, catch_up: CatchUp, clock: &Arc<TestClock>) -> Ticker {
    let clock: Arc<dyn WallClock> = clock.clone();
    Ticker::new(&Schedule::Every(period), catch_up, clock, None)
}

#[tokio::test(start_paused = true)]
async fn interval_ticks_fall_on_start_plus_n_intervals_without_drift() {
    let clock = TestClock::new(BASE);
    let start = Instant::now();
    let mut t = every(MS, CatchUp::Skip, &clock);
    for n in 1..=50u32 {
        let tick = t.next().await.expect("a tick");
        assert_eq!(Instant::now() - start, MS * n, "tick {n} fired on time");
        assert_eq!(tick.scheduled_ms, BASE + i64::from(n) * 100);
        assert_eq!(tick.fired_ms, tick.scheduled_ms);
        assert_eq!(tick.count, u64::from(n));
        assert!(!tick.late);
        // The consumer takes 37 ms: the schedule does not move.
        tokio::time::advance(Duration::from_millis(37)).await;
    }
    assert_eq!(t.skipped(), 0);
}

/// The first tick's consumer is blocked for five intervals (and a half).
async fn stalled(catch_up: CatchUp) -> (Vec<(Tick, Duration)>, u64) {
    let clock = TestClock::new(BASE);
    let start = Instant::now();
    let mut t = every(MS, catch_up, &clock);
    let mut ticks = Vec::new();
    let first = t.next().await.expect("a tick");
    ticks.push((first, Instant::now() - start));
    tokio::time::advance(MS * 5 + MS / 2).await;
    for _ in 0..3 {
        let tick = t.next().await.expect("a tick");
        ticks.push((tick, Instant::now() - start));
    }
    (ticks, t.skipped())
}

#[tokio::test(start_paused = true)]
async fn a_stalled_consumer_under_skip_gets_the_next_tick_on_schedule_never_a_burst() {
    let (ticks, skipped) = stalled(CatchUp::Skip).await;
    let at: Vec<_> = ticks
        .iter()
        .map(|(t, d)| (t.scheduled_ms - BASE, d.as_millis(), t.count, t.late))
        .collect();
    // Blocked from 100 to 650 ms: the ticks due at 200..=600 are dropped.
    assert_eq!(
        at,
        vec![
            (100, 100, 1, false),
            (700, 700, 2, false),
            (800, 800, 3, false),
            (900, 900, 4, false)
        ]
    );
    assert_eq!(skipped, 5);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_consumer_under_once_gets_exactly_one_late_tick_then_the_schedule() {
    let (ticks, skipped) = stalled(CatchUp::Once).await;
    let at: Vec<_> = ticks
        .iter()
        .map(|(t, d)| (t.scheduled_ms - BASE, d.as_millis(), t.count, t.late))
        .collect();
    assert_eq!(
        at,
        vec![
            (100, 100, 1, false),
            // At once, for the five missed (the latest one's time).
            (600, 650, 2, true),
            (700, 700, 3, false),
            (800, 800, 4, false)
        ]
    );
    assert_eq!(skipped, 4);
}

#[tokio::test(start_paused = true)]
async fn an_interval_timer_under_once_catches_up_once_for_a_stop() {
    let clock = TestClock::new(BASE);
    let dyn_clock: Arc<dyn WallClock> = clock.clone();
    // Last fired 350 ms before this start: ticks at -250, -150, -50 missed.
    let resumed = Some(BASE - 350);
    let mut t = Ticker::new(&Schedule::Every(MS), CatchUp::Once, dyn_clock, resumed);
    let start = Instant::now();
    let first = t.next().await.expect("a tick");
    assert_eq!(
        (
            first.scheduled_ms - BASE,
            first.late,
            Instant::now() - start
        ),
        (-50, true, Duration::ZERO)
    );
    assert_eq!(t.skipped(), 2);
    let second = t.next().await.expect("a tick");
    assert_eq!((second.scheduled_ms - BASE, second.count), (100, 2));

    // Under skip the stop leaves nothing to fire; a time in the future
    // (clock stepped back) is ignored too.
    for (catch_up, resumed) in [(CatchUp::Skip, BASE - 350), (CatchUp::Once, BASE + 5000)] {
        let dyn_clock: Arc<dyn WallClock> = clock.clone();
        let now = clock.now_ms();
        let mut t = Ticker::new(&Schedule::Every(MS), catch_up, dyn_clock, Some(resumed));
        let first = t.next().await.expect("a tick");
        assert_eq!((first.scheduled_ms - now, first.late), (100, false));
    }
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> i64 {
    chrono::Utc
        .with_ymd_and_hms(y, mo, d, h, mi, s)
        .single()
        .expect("a valid time")
        .timestamp_millis()
}

fn cron(expr: &str, tz: &str) -> CronSchedule {
    CronSchedule::parse(expr, tz.parse().expect("a zone"), BASE).expect("valid cron")
}

#[test]
fn every_five_minutes_is_on_the_fives() {
    let c = cron("0 */5 * * * *", "UTC");
    assert_eq!(
        c.next_after(utc(2026, 1, 1, 12, 3, 10)),
        Some(utc(2026, 1, 1, 12, 5, 0))
    );
    // Strictly after: a time on the schedule gives the following one.
    assert_eq!(
        c.next_after(utc(2026, 1, 1, 12, 5, 0)),
        Some(utc(2026, 1, 1, 12, 10, 0))
    );
    assert_eq!(
        c.next_after(utc(2026, 1, 1, 12, 5, 0) - 1),
        Some(utc(2026, 1, 1, 12, 5, 0))
    );
    assert_eq!(
        c.next_after(utc(2026, 12, 31, 23, 58, 0)),
        Some(utc(2027, 1, 1, 0, 0, 0))
    );
    // Missed between 12:00:00 (handled) and 12:17:00: 12:05, 12:10, 12:15.
    assert_eq!(
        c.missed(utc(2026, 1, 1, 12, 0, 0), utc(2026, 1, 1, 12, 17, 0)),
        Some((utc(2026, 1, 1, 12, 15, 0), 3))
    );
    // A time exactly now is due, not missed.
    assert_eq!(
        c.missed(utc(2026, 1, 1, 12, 0, 0), utc(2026, 1, 1, 12, 5, 0)),
        None
    );
}

#[test]
fn a_local_time_follows_daylight_saving_time() {
    let c = cron("0 0 8 * * *", "Europe/Berlin");
    // 08:00 CET = 07:00 UTC in winter; 08:00 CEST = 06:00 UTC in summer.
    assert_eq!(
        c.next_after(utc(2026, 1, 10, 0, 0, 0)),
        Some(utc(2026, 1, 10, 7, 0, 0))
    );
    assert_eq!(
        c.next_after(utc(2026, 7, 10, 0, 0, 0)),
        Some(utc(2026, 7, 10, 6, 0, 0))
    );
    // 02:30 does not exist on 2026-03-29 (02:00 CET -> 03:00 CEST): it runs
    // right after the gap, at 03:00 CEST (01:00 UTC).
    let c = cron("0 30 2 * * *", "Europe/Berlin");
    assert_eq!(
        c.next_after(utc(2026, 3, 28, 12, 0, 0)),
        Some(utc(2026, 3, 29, 1, 0, 0))
    );
    // 02:30 happens twice on 2026-10-25 (03:00 CEST -> 02:00 CET): once.
    let first = c.next_after(utc(2026, 10, 24, 12, 0, 0));
    assert_eq!(first, Some(utc(2026, 10, 25, 0, 30, 0)));
    assert_eq!(
        c.next_after(utc(2026, 10, 25, 0, 30, 0)),
        Some(utc(2026, 10, 26, 1, 30, 0))
    );
}

#[test]
fn cron_expressions_are_six_fields_and_must_fire() {
    let utc: Tz = chrono_tz::UTC;
    let e = CronSchedule::parse("*/5 * * * *", utc, BASE).expect_err("five fields");
    assert!(matches!(e, CronError::Fields { fields: 5, .. }), "{e}");
    assert!(e.to_string().contains("six fields, seconds first"), "{e}");
    let e = CronSchedule::parse("0 0 0 1 1 * 2030", utc, BASE).expect_err("seven fields");
    assert!(matches!(e, CronError::Fields { fields: 7, .. }), "{e}");
    let e = CronSchedule::parse("61 * * * * *", utc, BASE).expect_err("out of range");
    assert!(matches!(e, CronError::Invalid { .. }), "{e}");
    for never in ["0 0 0 30 2 *", "0 0 0 31 4 *"] {
        let started = std::time::Instant::now();
        let e = CronSchedule::parse(never, utc, BASE).expect_err("never fires");
        assert!(matches!(e, CronError::Never { .. }), "{e}");
        assert!(e.to_string().contains("never fires"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "bounded check");
    }
    // Rare is not never: 29 February.
    assert!(CronSchedule::parse("0 0 0 29 2 *", utc, BASE).is_ok());
    assert!(CronSchedule::parse("@hourly", utc, BASE).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_cron_timer_survives_clock_steps_without_a_burst() {
    let clock = TestClock::new(BASE);
    let dyn_clock: Arc<dyn WallClock> = clock.clone();
    let every_10s = Schedule::Cron(Box::new(cron("*/10 * * * * *", "UTC")));
    let mut t = Ticker::new(&every_10s, CatchUp::Skip, dyn_clock, None);
    let first = t.next().await.expect("a tick");
    assert_eq!(first.scheduled_ms, BASE + 7000); // 12:00:10
    assert_eq!(first.fired_ms, first.scheduled_ms);

    // The clock steps an hour (and 4 s) forward while the timer sleeps.
    let stepper = {
        let clock = clock.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            clock.jump(3_604_000);
        })
    };
    let awaited = t.next().await.expect("a tick");
    stepper.await.expect("stepper");
    // The tick it waited for (12:00:20) fires once, when its sleep ends...
    assert_eq!(awaited.scheduled_ms, BASE + 17_000);
    assert_eq!(awaited.fired_ms, BASE + 17_000 + 3_604_000);
    // ...the 360 times up to 13:00:20 are skipped, 13:00:30 is on schedule.
    let next = t.next().await.expect("a tick");
    assert_eq!(next.scheduled_ms, BASE + 3_627_000);
    assert_eq!(next.fired_ms, next.scheduled_ms);
    assert_eq!(t.skipped(), 360);

    // A step back: nothing fires until the wall clock is there again.
    clock.jump(-3_604_000);
    let back = t.next().await.expect("a tick");
    assert_eq!(back.scheduled_ms, BASE + 3_637_000);
    assert_eq!(back.fired_ms, back.scheduled_ms);
    assert_eq!(back.count, 4);
}
