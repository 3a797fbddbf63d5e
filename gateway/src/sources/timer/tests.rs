//! The timer source: its config errors, a stalled function queue, and
//! `catch_up = "once"` across a restart (paused time, a real data dir).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::schedule::Schedule;
use super::schedule::tests::TestClock;
use super::*;
use crate::config::schema::QueuePolicy;
use crate::config::{ConfigError, SourceSpec, ValidConfig};
use crate::metrics::{FunctionMetrics, GatewayMetrics};
use crate::router::{Route, Router};
use crate::runtime::queue::{QueueReceiver, queue};
use crate::topic::{FilterSet, TopicFilter};

const BASE: i64 = 1_767_268_803_000;

const CONFIG: &str = r#"
[gateway]
id = "gw1"

[[functions]]
name = "f"
component = "f.wasm"
triggers = ["timers/#"]

[[sources]]
kind = "timer"
name = "heartbeat"
topic = "timers/heartbeat"
"#;

fn parse(extra: &str) -> Result<ValidConfig, Vec<ConfigError>> {
    crate::config::tests::parse_str(&format!("{CONFIG}{extra}")).map_err(|e| e.0)
}

/// The one problem of a timer with `extra` keys: (key, reason).
fn problem(extra: &str) -> (String, String) {
    match parse(extra) {
        Ok(_) => panic!("should be rejected: {extra}"),
        Err(e) => {
            assert_eq!(e.len(), 1, "{e:?}");
            (e[0].key.clone(), e[0].reason.clone())
        }
    }
}

#[test]
fn timer_sources_are_validated() {
    let c = parse("interval_ms = 5000\n").expect("valid");
    let SourceSpec::Timer(t) = &c.sources[0] else {
        panic!("a timer")
    };
    assert_eq!(t.schedule, Schedule::Every(Duration::from_secs(5)));
    assert_eq!(
        (t.catch_up, t.topic.as_str()),
        (CatchUp::Skip, "timers/heartbeat")
    );
    let c = parse("cron = \"0 */5 * * * *\"\ntimezone = \"Europe/Berlin\"\ncatch_up = \"once\"\n")
        .expect("valid");
    let SourceSpec::Timer(t) = &c.sources[0] else {
        panic!("a timer")
    };
    let Schedule::Cron(cron) = &t.schedule else {
        panic!("cron")
    };
    assert_eq!(
        (cron.expr(), cron.tz()),
        ("0 */5 * * * *", chrono_tz::Europe::Berlin)
    );
    assert_eq!(t.catch_up, CatchUp::Once);
}

#[test]
fn timer_config_errors_name_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "interval_ms = 100\ncron = \"* * * * * *\"\n",
            "sources[0].interval_ms",
            "exactly one of `interval_ms` and `cron`",
        ),
        ("", "sources[0].interval_ms", "exactly one of"),
        (
            "interval_ms = 5\n",
            "sources[0].interval_ms",
            "between 10 and 86400000",
        ),
        (
            "cron = \"*/5 * * * *\"\n",
            "sources[0].cron",
            "six fields, seconds first",
        ),
        (
            "cron = \"0 0 0 30 2 *\"\n",
            "sources[0].cron",
            "never fires",
        ),
        (
            "cron = \"0 61 * * * *\"\n",
            "sources[0].cron",
            "0 61 * * * *",
        ),
        (
            "cron = \"0 * * * * *\"\ntimezone = \"Mars/Olympus\"\n",
            "sources[0].timezone",
            "unknown time zone `Mars/Olympus`",
        ),
        (
            "interval_ms = 100\ntimezone = \"UTC\"\n",
            "sources[0].timezone",
            "only applies with `cron`",
        ),
        (
            "interval_ms = 100\ncatch_up = \"always\"\n",
            "sources[0].catch_up",
            "unknown variant `always`",
        ),
        (
            "interval_ms = 100\nevery = 3\n",
            "sources[0].every",
            "unknown field `every`",
        ),
    ];
    for (extra, key, reason) in cases {
        let (k, r) = problem(extra);
        assert_eq!(&k, key, "{extra}: {r}");
        assert!(r.contains(reason), "{extra}: `{r}` lacks `{reason}`");
    }
    // The topic is checked like every source's.
    let text = format!(
        "{}interval_ms = 100\n",
        CONFIG.replace("timers/heartbeat", "timers/+")
    );
    let no_env = |_: &str| None;
    let e = crate::config::parse(Path::new("/etc/edgefn/test.toml"), &text, &no_env)
        .expect_err("a wildcard topic");
    assert_eq!(e.0[0].key, "sources[0].topic", "{e:?}");
}

/// A context whose one function (`f`, on `timers/#`) has a `block` queue
/// of one event.
fn context() -> (SourceContext, QueueReceiver) {
    let metrics = Arc::new(GatewayMetrics::default());
    let (tx, rx) = queue(1, QueuePolicy::Block, Arc::new(FunctionMetrics::default()));
    let route = Route {
        function: "f".into(),
        triggers: FilterSet::new(vec![TopicFilter::parse("timers/#").expect("filter")]),
        queue: Arc::new(tx),
    };
    let ctx = SourceContext {
        cancel: CancellationToken::new(),
        router: Arc::new(Router::new(vec![route], metrics.clone())),
        metrics,
        ready: Arc::new(tokio::sync::watch::channel(false).0),
    };
    (ctx, rx)
}

fn parts(catch_up: CatchUp, data_dir: &Path) -> TimerParts {
    TimerParts {
        spec: TimerSpec {
            name: "hb".into(),
            topic: "timers/hb".into(),
            schedule: Schedule::Every(Duration::from_millis(100)),
            catch_up,
        },
        stats: Arc::new(SourceStats::default()),
        beat: crate::progress::Progress::default().watch("source", "hb", Duration::from_secs(5)),
        data_dir: data_dir.to_owned(),
    }
}

/// (scheduled_ms - base, received at ms since the start, count).
async fn take(rx: &mut QueueReceiver, base: i64, start: Instant) -> (i64, u128, u64) {
    let event = rx.pop().await.expect("an event");
    assert_eq!(event.source, crate::event::SourceKind::Timer);
    assert_eq!(event.topic, "timers/hb");
    let v: serde_json::Value = serde_json::from_slice(&event.payload).expect("JSON");
    assert_eq!(v["timer"], "hb");
    let field = |k: &str| v[k].as_i64().expect("a number");
    assert!(field("fired_ms") >= field("scheduled_ms"));
    let count = u64::try_from(field("count")).expect("count");
    (
        field("scheduled_ms") - base,
        start.elapsed().as_millis(),
        count,
    )
}

/// The function takes nothing from its queue of one for 550 ms: one tick
/// waits in the queue, one in the blocked dispatch, none piles up.
async fn stalled_function(catch_up: CatchUp) -> (Vec<(i64, u128, u64)>, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ctx, mut rx) = context();
    let clock = TestClock::new(BASE);
    let p = parts(catch_up, dir.path());
    let stats = p.stats.clone();
    let source = TimerSource::with_clock(p, clock).expect("built");
    let start = Instant::now();
    let run = tokio::spawn(source.tick_until_cancelled(ctx.clone()));
    tokio::time::sleep(Duration::from_millis(650)).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(take(&mut rx, BASE, start).await);
    }
    ctx.cancel.cancel();
    drop(rx);
    run.await.expect("the source stops");
    (seen, stats.ticks_skipped.load(Ordering::Relaxed))
}

#[tokio::test(start_paused = true)]
async fn a_stalled_function_never_makes_ticks_pile_up_under_skip() {
    let (seen, skipped) = stalled_function(CatchUp::Skip).await;
    // 100 was queued, 200 waited in the dispatch; 300..=600 were dropped.
    assert_eq!(
        seen,
        vec![
            (100, 650, 1),
            (200, 650, 2),
            (700, 700, 3),
            (800, 800, 4),
            (900, 900, 5)
        ]
    );
    assert_eq!(skipped, 4);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_function_gets_one_catch_up_tick_under_once() {
    let (seen, skipped) = stalled_function(CatchUp::Once).await;
    assert_eq!(
        seen,
        vec![
            (100, 650, 1),
            (200, 650, 2),
            (600, 650, 3),
            (700, 700, 4),
            (800, 800, 5)
        ]
    );
    assert_eq!(skipped, 3);
}

#[tokio::test(start_paused = true)]
async fn catch_up_once_fires_one_tick_for_the_time_the_gateway_was_stopped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("timers/hb.last");

    // First run: three ticks, then a clean stop.
    let (ctx, mut rx) = context();
    let source = TimerSource::with_clock(parts(CatchUp::Once, dir.path()), TestClock::new(BASE))
        .expect("built");
    let start = Instant::now();
    let run = tokio::spawn(source.tick_until_cancelled(ctx.clone()));
    for n in 1..=3 {
        assert_eq!(take(&mut rx, BASE, start).await.0, n * 100);
    }
    ctx.cancel.cancel();
    run.await.expect("the source stops");
    let saved = std::fs::read_to_string(&file).expect("state file");
    assert_eq!(saved.trim(), (BASE + 300).to_string());

    // Started again 10 s later: one catch-up tick at once for the 97 missed
    // (standing for the latest), then the schedule from the new start.
    let later = BASE + 10_000;
    let (ctx, mut rx) = context();
    let source = TimerSource::with_clock(parts(CatchUp::Once, dir.path()), TestClock::new(later))
        .expect("built");
    let start = Instant::now();
    let run = tokio::spawn(source.tick_until_cancelled(ctx.clone()));
    assert_eq!(take(&mut rx, later, start).await, (0, 0, 1));
    assert_eq!(take(&mut rx, later, start).await, (100, 100, 2));
    ctx.cancel.cancel();
    drop(rx);
    run.await.expect("the source stops");

    // Under skip nothing is kept, and nothing is caught up.
    let (ctx, mut rx) = context();
    let source = TimerSource::with_clock(parts(CatchUp::Skip, dir.path()), TestClock::new(later))
        .expect("built");
    let start = Instant::now();
    let run = tokio::spawn(source.tick_until_cancelled(ctx.clone()));
    assert_eq!(take(&mut rx, later, start).await, (100, 100, 1));
    ctx.cancel.cancel();
    drop(rx);
    run.await.expect("the source stops");

    // A malformed file, or an absurd time, means no catch-up tick (and
    // neither a failure nor an overflow).
    for text in ["garbage", "-9223372036854775808"] {
        std::fs::write(&file, text).expect("write");
        let (ctx, mut rx) = context();
        let clock = TestClock::new(later);
        let source =
            TimerSource::with_clock(parts(CatchUp::Once, dir.path()), clock).expect("built");
        let start = Instant::now();
        let run = tokio::spawn(source.tick_until_cancelled(ctx.clone()));
        assert_eq!(take(&mut rx, later, start).await, (100, 100, 1), "{text}");
        ctx.cancel.cancel();
        drop(rx);
        run.await.expect("the source stops");
    }
}
