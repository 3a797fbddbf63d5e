//! The GPIO source: one input line of a Linux GPIO chip (`/dev/gpiochipN`,
//! the character device's v2 uAPI through gpiocdev; not sysfs), requested
//! with edge detection, the kernel's debounce and a bias. Each edge is one
//! JSON event, `{"line":17,"value":1,"edge":"rising","timestamp_ns":…}`,
//! with the kernel's timestamp of the edge.
//!
//! `build` finds the chip and the line (by offset or by name) and requests
//! it, so a missing chip, a line that does not exist or a busy line fails
//! start-up naming the source and the key. A read error is counted, logged
//! once, and the line is released and requested again with back-off.
//! Functions see these events with `source-kind::serial` and the attribute
//! `protocol = "gpio"` (as Modbus has `protocol = "modbus"`): WIT 0.1.x
//! cannot grow its `source-kind` enum without breaking every function built
//! against it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

pub mod config;
pub mod lines;

use super::{
    BuildEnv, BuiltSource, Common, Source, SourceContext, SourceError, SourcePlugin, SourceStats,
};
use crate::config::KeyChanges;
use crate::event::{Event, SourceKind};
use config::{GpioSourceConfig, GpioSpec, LineId};
use lines::{Cdev, Edge, EdgeStream, GpioError, Lines, Requested};

/// `kind = "gpio"`.
pub struct Kind;

impl SourcePlugin for Kind {
    const KIND: &'static str = "gpio";
    type Config = GpioSourceConfig;
    type Spec = GpioSpec;

    fn name(config: &GpioSourceConfig) -> &str {
        &config.name
    }

    fn validate(
        config: &GpioSourceConfig,
        scope: &mut crate::config::Scope<'_, '_>,
    ) -> Option<GpioSpec> {
        config::validate(config, scope)
    }

    fn common(spec: &GpioSpec) -> Common<'_> {
        Common {
            name: &spec.name,
            topic: Some(&spec.topic),
            mirror_topic: spec.mirror_topic.as_deref(),
            writable: false,
            port: None,
        }
    }

    fn changed(a: &GpioSpec, b: &GpioSpec, keys: &mut KeyChanges) {
        keys.key("chip", &a.chip, &b.chip);
        keys.key("line", &a.line, &b.line);
        keys.key("edge", &a.edge, &b.edge);
        keys.key("debounce_ms", &a.debounce, &b.debounce);
        keys.key("bias", &a.bias, &b.bias);
        keys.key("active_low", &a.active_low, &b.active_low);
        keys.key("topic", &a.topic, &b.topic);
        keys.key("mirror_topic", &a.mirror_topic, &b.mirror_topic);
    }

    fn build(
        spec: &GpioSpec,
        env: &BuildEnv,
        ctx: &SourceContext,
    ) -> Result<BuiltSource, SourceError> {
        let stats = Arc::new(SourceStats::default());
        let parts = GpioParts {
            spec: spec.clone(),
            stats: stats.clone(),
            local: env.local.clone(),
        };
        let source = GpioSource::build(parts, ctx)?;
        Ok(BuiltSource::new(source, stats, None, ctx))
    }
}

/// What the GPIO source needs.
pub struct GpioParts {
    /// The spec.
    pub spec: GpioSpec,
    /// Its counters.
    pub stats: Arc<SourceStats>,
    /// The local broker, for `mirror_topic`.
    pub local: rumqttc::AsyncClient,
}

/// The GPIO source, over lines of `L` (the character device, or a fake
/// chip in tests).
pub struct GpioSource<L: Lines = Cdev> {
    spec: GpioSpec,
    stats: Arc<SourceStats>,
    mirror: Option<rumqttc::AsyncClient>,
    lines: L,
    /// The requested line; `None` after a read error, until requested again.
    line: Option<Requested<L::Stream>>,
}

impl Source for GpioSource {
    type Config = GpioParts;

    fn build(parts: GpioParts, _ctx: &SourceContext) -> Result<Self, SourceError> {
        Self::with_lines(parts, Cdev)
    }

    fn run(self, ctx: SourceContext) -> impl Future<Output = ()> + Send {
        self.read(ctx)
    }
}

impl<L: Lines> GpioSource<L> {
    /// Requests the line through `lines`; fails naming the source and the
    /// key at fault.
    pub fn with_lines(parts: GpioParts, lines: L) -> Result<Self, SourceError> {
        let line = lines
            .request(&parts.spec)
            .map_err(|e| source_error(&parts.spec.name, e))?;
        parts.stats.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            mirror: parts.spec.mirror_topic.is_some().then_some(parts.local),
            spec: parts.spec,
            stats: parts.stats,
            lines,
            line: Some(line),
        })
    }

    /// Dispatches each edge until `ctx.cancel` fires; after a read error,
    /// requests the line again with back-off.
    pub async fn read(mut self, ctx: SourceContext) {
        let name = self.spec.name.clone();
        let mut attempts: u32 = 0;
        loop {
            let Some(line) = self.line.as_mut() else {
                let wait = crate::mqtt::backoff(attempts.min(8));
                tokio::select! {
                    () = ctx.cancel.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
                attempts = attempts.saturating_add(1);
                self.rerequest(attempts);
                continue;
            };
            let edge = tokio::select! {
                () = ctx.cancel.cancelled() => break,
                edge = line.edges.next_edge() => edge,
            };
            match edge {
                Ok(edge) => {
                    self.stats.frames.fetch_add(1, Ordering::Relaxed);
                    let (chip, offset) = (line.chip.display().to_string(), line.offset);
                    self.dispatch(&ctx, &chip, offset, edge).await;
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(source = %name, chip = %line.chip.display(), line = line.offset, error = %e, "GPIO line read failed; re-requesting.");
                    // Dropping the request releases the line.
                    self.line = None;
                    attempts = 0;
                }
            }
        }
        tracing::debug!(source = %name, "GPIO source stopped.");
    }

    /// One attempt to request the line again after a read error.
    fn rerequest(&mut self, attempts: u32) {
        match self.lines.request(&self.spec) {
            Ok(line) => {
                self.stats.opened.fetch_add(1, Ordering::Relaxed);
                tracing::info!(source = %self.spec.name, chip = %line.chip.display(), line = line.offset, attempts, "GPIO line requested again.");
                self.line = Some(line);
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                let error = crate::text::chain(&e);
                tracing::debug!(source = %self.spec.name, error = %error, attempts, "GPIO line not requested; retrying.");
            }
        }
    }

    /// Sends one edge's event (and mirrors it).
    async fn dispatch(&self, ctx: &SourceContext, chip: &str, offset: u32, edge: Edge) {
        let payload = payload(&self.spec.line, edge);
        if let (Some(local), Some(topic)) = (&self.mirror, &self.spec.mirror_topic) {
            super::mirror(local, &self.spec.name, topic, payload.as_bytes()).await;
        }
        // WIT 0.1.x has no `gpio` source kind (see the module docs).
        let mut event = Event::new(SourceKind::Serial, self.spec.topic.clone(), payload);
        event.attributes = vec![
            ("protocol".into(), "gpio".into()),
            ("chip".into(), chip.to_owned()),
            ("line".into(), offset.to_string()),
        ];
        ctx.router.dispatch(event).await;
    }
}

/// `{"line":…,"value":0|1,"edge":"rising"|"falling","timestamp_ns":…}`,
/// with the line as configured (its number or its name).
fn payload(line: &LineId, edge: Edge) -> String {
    let line = match line {
        LineId::Offset(n) => serde_json::Value::from(*n),
        LineId::Name(name) => serde_json::Value::from(name.as_str()),
    };
    serde_json::json!({
        "line": line,
        "value": u8::from(edge.rising),
        "edge": if edge.rising { "rising" } else { "falling" },
        "timestamp_ns": edge.timestamp_ns,
    })
    .to_string()
}

/// `build`'s error: the reason names the key; the cause is the kernel's
/// answer, if any.
pub(crate) fn source_error(name: &str, e: GpioError) -> SourceError {
    let cause: Option<Box<dyn std::error::Error + Send + Sync>> = match &e {
        GpioError::Chip { source, .. }
        | GpioError::Request { source, .. }
        | GpioError::RequestOutput { source, .. } => Some(Box::new(source.clone())),
        GpioError::NoOffset { .. } | GpioError::NoName { .. } => None,
    };
    SourceError {
        source_name: name.to_owned(),
        reason: e.to_string(),
        cause,
    }
}

#[cfg(test)]
mod tests;
