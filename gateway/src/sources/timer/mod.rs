//! The timer source: ticks on a schedule (`interval_ms`, or a six-field
//! `cron` expression in a time zone) and turns each tick into an event of
//! kind `timer` on its topic, with the JSON payload
//! `{"timer","scheduled_ms","fired_ms","count"}`.
//!
//! At most one tick of a timer is on its way at a time: the loop awaits the
//! dispatch, which waits while a function's `block` queue is full. Ticks
//! whose time passes meanwhile are handled by `catch_up` ([`schedule`]):
//! skipped (counted in `edgefn_source_ticks_skipped_total`), or folded into
//! one late tick. Under `once`, the last scheduled time is kept in the data
//! directory ([`state`]) so ticks missed while the gateway was stopped get
//! their one catch-up tick at the next start.

pub mod config;
pub mod schedule;
mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub use config::{CatchUp, TimerSourceConfig, TimerSpec};
use schedule::{SystemClock, Tick, Ticker, WallClock};
use state::StateFile;

use super::{BuildEnv, BuiltSource, Common, SourcePlugin, SourceStats};
use super::{Source, SourceContext, SourceError};
use crate::config::{KeyChanges, Scope};
use crate::event::{Event, SourceKind};
use crate::progress::{Activity, Beat};

/// What the timer source needs.
pub struct TimerParts {
    /// The spec.
    pub spec: TimerSpec,
    /// Its counters.
    pub stats: Arc<SourceStats>,
    /// Its progress, for the watchdog ([`crate::progress`]).
    pub beat: Arc<Beat>,
    /// `gateway.data_dir`: state files go to its `timers/` folder.
    pub data_dir: PathBuf,
}

/// The timer source.
pub struct TimerSource {
    spec: TimerSpec,
    stats: Arc<SourceStats>,
    beat: Arc<Beat>,
    ticker: Ticker,
    state: Option<StateFile>,
}

/// `kind = "timer"`.
pub struct Kind;

impl SourcePlugin for Kind {
    const KIND: &'static str = "timer";
    type Config = TimerSourceConfig;
    type Spec = TimerSpec;

    fn name(config: &TimerSourceConfig) -> &str {
        &config.name
    }

    fn validate(config: &TimerSourceConfig, scope: &mut Scope<'_, '_>) -> Option<TimerSpec> {
        let now_ms = i64::try_from(crate::event::now_ms()).unwrap_or(i64::MAX);
        let (p, key, _) = scope.parts();
        config::validate(p, key, config, now_ms)
    }

    fn common(spec: &TimerSpec) -> Common<'_> {
        Common {
            name: &spec.name,
            topic: Some(&spec.topic),
            mirror_topic: None,
            writable: false,
            port: None,
        }
    }

    fn changed(a: &TimerSpec, b: &TimerSpec, keys: &mut KeyChanges) {
        use schedule::Schedule;
        let every = |s: &Schedule| match s {
            Schedule::Every(d) => Some(*d),
            Schedule::Cron(_) => None,
        };
        let cron = |s: &Schedule| match s {
            Schedule::Every(_) => None,
            Schedule::Cron(c) => Some((c.expr().to_owned(), c.tz())),
        };
        keys.key("interval_ms", &every(&a.schedule), &every(&b.schedule));
        keys.key("cron", &cron(&a.schedule), &cron(&b.schedule));
        keys.key("catch_up", &a.catch_up, &b.catch_up);
        keys.key("topic", &a.topic, &b.topic);
    }

    fn build(
        spec: &TimerSpec,
        env: &BuildEnv,
        ctx: &SourceContext,
    ) -> Result<BuiltSource, SourceError> {
        let stats = Arc::new(SourceStats::default());
        let source = TimerSource::build(
            TimerParts {
                spec: spec.clone(),
                stats: stats.clone(),
                beat: env.beat(&spec.name),
                data_dir: env.data_dir.clone(),
            },
            ctx,
        )?;
        Ok(BuiltSource::new(source, stats, None, ctx))
    }
}

impl Source for TimerSource {
    type Config = TimerParts;

    fn build(parts: TimerParts, _ctx: &SourceContext) -> Result<Self, SourceError> {
        Self::with_clock(parts, Arc::new(SystemClock))
    }

    async fn run(self, ctx: SourceContext) {
        self.tick_until_cancelled(ctx).await;
    }
}

impl TimerSource {
    /// A timer reading the wall clock from `clock` (a test clock in tests).
    /// Under `catch_up = "once"` this creates `<data_dir>/timers` and reads
    /// the timer's state file.
    pub fn with_clock(parts: TimerParts, clock: Arc<dyn WallClock>) -> Result<Self, SourceError> {
        let (state, resumed_from) = match parts.spec.catch_up {
            CatchUp::Skip => (None, None),
            CatchUp::Once => {
                let dir = parts.data_dir.join("timers");
                let (file, last) =
                    StateFile::open(&dir, &parts.spec.name).map_err(|e| SourceError {
                        source_name: parts.spec.name.clone(),
                        reason: e.to_string(),
                        cause: Some(Box::new(e)),
                    })?;
                (Some(file), last)
            }
        };
        let ticker = Ticker::new(
            &parts.spec.schedule,
            parts.spec.catch_up,
            clock,
            resumed_from,
        );
        Ok(Self {
            spec: parts.spec,
            stats: parts.stats,
            beat: parts.beat,
            ticker,
            state,
        })
    }

    /// Ticks until `ctx.cancel` fires.
    pub async fn tick_until_cancelled(mut self, ctx: SourceContext) {
        loop {
            let tick = tokio::select! {
                () = ctx.cancel.cancelled() => break,
                tick = self.ticker.next() => tick,
            };
            let Some(tick) = tick else {
                tracing::warn!(source = %self.spec.name, "Timer schedule has no time left; it will not fire again.");
                ctx.cancel.cancelled().await;
                break;
            };
            self.stats.frames.fetch_add(1, Ordering::Relaxed);
            self.stats
                .ticks_skipped
                .store(self.ticker.skipped(), Ordering::Relaxed);
            if tick.late {
                tracing::debug!(source = %self.spec.name, scheduled_ms = tick.scheduled_ms, skipped = self.ticker.skipped(), "Timer fires a catch-up tick.");
            }
            self.dispatch(tick, &ctx).await;
            if let Some(state) = &mut self.state {
                self.beat.busy(Activity::Saving);
                state.fired(tick.scheduled_ms).await;
                self.beat.idle();
            }
        }
        if let Some(state) = &mut self.state {
            state.flush().await;
        }
        tracing::debug!(source = %self.spec.name, "Timer source stopped.");
    }

    async fn dispatch(&self, tick: Tick, ctx: &SourceContext) {
        let payload = serde_json::json!({
            "timer": self.spec.name,
            "scheduled_ms": tick.scheduled_ms,
            "fired_ms": tick.fired_ms,
            "count": tick.count,
        });
        let mut event = Event::new(
            SourceKind::Timer,
            self.spec.topic.clone(),
            payload.to_string(),
        );
        event.received_at_ms = u64::try_from(tick.fired_ms).unwrap_or(0);
        ctx.router.dispatch(event).await;
    }
}

#[cfg(test)]
mod tests;
