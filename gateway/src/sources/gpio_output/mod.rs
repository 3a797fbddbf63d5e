//! The GPIO output source: one output line of a Linux GPIO chip that
//! functions listing it in `gpio` set through WIT `gpio.set` (a relay, a
//! valve). It produces no events.
//!
//! `build` requests the line as an output at its `initial` value, or at its
//! `safe` value when the previous run did not stop cleanly: a marker file,
//! `<data_dir>/gpio/<name>.running`, is created once the line is requested
//! and removed after a clean stop has set `safe`, so a marker found at
//! start means the gateway crashed (or was killed) while driving the line.
//! A crash runs no code: until the gateway is started again, the kernel
//! keeps driving the line at its last value (see `docs/gpio.md`).
//!
//! Writes arrive through a queue ([`crate::output::Writes::Gpio`]), only
//! from invocations that returned `Ok`; a failed write is counted and
//! logged, never retried.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use gpiocdev::Request;
use gpiocdev::line::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod config;

use super::gpio::lines::{GpioError, locate};
use super::gpio::source_error;
use super::{
    BuildEnv, BuiltSource, Common, Source, SourceContext, SourceError, SourcePlugin, SourceStats,
};
use crate::config::KeyChanges;
use crate::output::Writes;
use config::{GpioOutputConfig, GpioOutputSpec};

/// Functions' writes waiting for the line; a full queue drops them.
pub const WRITE_QUEUE: usize = 64;

/// `kind = "gpio_output"`.
pub struct Kind;

impl SourcePlugin for Kind {
    const KIND: &'static str = "gpio_output";
    type Config = GpioOutputConfig;
    type Spec = GpioOutputSpec;

    fn name(config: &GpioOutputConfig) -> &str {
        &config.name
    }

    fn validate(
        config: &GpioOutputConfig,
        scope: &mut crate::config::Scope<'_, '_>,
    ) -> Option<GpioOutputSpec> {
        config::validate(config, scope)
    }

    fn common(spec: &GpioOutputSpec) -> Common<'_> {
        Common {
            name: &spec.name,
            topic: None,
            mirror_topic: None,
            writable: false,
            port: None,
        }
    }

    fn changed(a: &GpioOutputSpec, b: &GpioOutputSpec, keys: &mut KeyChanges) {
        keys.key("chip", &a.chip, &b.chip);
        keys.key("line", &a.line, &b.line);
        keys.key("active_low", &a.active_low, &b.active_low);
        keys.key("initial", &a.initial, &b.initial);
        keys.key("safe", &a.safe, &b.safe);
    }

    fn build(
        spec: &GpioOutputSpec,
        env: &BuildEnv,
        ctx: &SourceContext,
    ) -> Result<BuiltSource, SourceError> {
        let stats = Arc::new(SourceStats::default());
        let (tx, writes) = mpsc::channel(WRITE_QUEUE);
        let parts = OutputParts {
            spec: spec.clone(),
            stats: stats.clone(),
            marker: marker_path(&env.data_dir, &spec.name),
            writes,
        };
        let source = GpioOutput::build(parts, ctx)?;
        Ok(BuiltSource::new(source, stats, Some(Writes::Gpio(tx)), ctx))
    }
}

/// One requested output line; dropping it releases the line.
pub trait OutputLine: Send + 'static {
    /// Drives the line: `true` is active.
    fn set(&mut self, value: bool) -> io::Result<()>;
}

/// Requests output lines.
pub trait OutputLines {
    /// A requested line.
    type Line: OutputLine;
    /// Finds the line of `spec` and requests it as an output at `value`.
    fn request(&self, spec: &GpioOutputSpec, value: bool) -> Result<Self::Line, GpioError>;
}

/// The crash marker of the output `name`.
pub fn marker_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join("gpio").join(format!("{name}.running"))
}

/// What the GPIO output needs.
pub struct OutputParts {
    /// The spec.
    pub spec: GpioOutputSpec,
    /// Its counters.
    pub stats: Arc<SourceStats>,
    /// Its crash marker ([`marker_path`]).
    pub marker: PathBuf,
    /// Functions' writes.
    pub writes: mpsc::Receiver<bool>,
}

/// A requested GPIO output, over a line of `L` (the character device, or
/// a fake line in tests).
pub struct GpioOutput<L: OutputLine = CdevLine> {
    spec: GpioOutputSpec,
    stats: Arc<SourceStats>,
    marker: PathBuf,
    writes: mpsc::Receiver<bool>,
    line: L,
}

impl Source for GpioOutput {
    type Config = OutputParts;

    fn build(parts: OutputParts, _ctx: &SourceContext) -> Result<Self, SourceError> {
        Self::with_lines(parts, &Cdev)
    }

    fn run(self, ctx: SourceContext) -> impl Future<Output = ()> + Send {
        self.serve(ctx.cancel)
    }
}

impl<L: OutputLine> GpioOutput<L> {
    /// Requests the line through `lines` at `initial`, or at `safe` if the
    /// crash marker is left from the previous run, then creates the marker.
    /// Fails naming the source and the key at fault.
    pub fn with_lines<F>(parts: OutputParts, lines: &F) -> Result<Self, SourceError>
    where
        F: OutputLines<Line = L>,
    {
        let spec = parts.spec;
        let crashed = parts.marker.exists();
        let value = if crashed { spec.safe } else { spec.initial };
        let line = lines
            .request(&spec, value)
            .map_err(|e| source_error(&spec.name, e))?;
        if crashed {
            tracing::warn!(source = %spec.name, marker = %parts.marker.display(), value, "GPIO output set to its safe value: the gateway did not stop cleanly last time.");
        }
        create_marker(&parts.marker).map_err(|e| SourceError {
            source_name: spec.name.clone(),
            reason: format!("cannot create {}", parts.marker.display()),
            cause: Some(Box::new(e)),
        })?;
        parts.stats.opened.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            spec,
            stats: parts.stats,
            marker: parts.marker,
            writes: parts.writes,
            line,
        })
    }

    /// Sets each value functions write until `cancel` fires; then sets
    /// `safe` and removes the crash marker.
    pub async fn serve(mut self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                Some(value) = self.writes.recv() => self.write(value),
            }
        }
        self.stop();
    }

    /// One function's write: set once; a failure is counted and logged.
    fn write(&mut self, value: bool) {
        match self.line.set(value) {
            Ok(()) => {
                self.stats.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(source = %self.spec.name, value, error = %e, "GPIO output not set.");
            }
        }
    }

    /// The clean stop: `safe`, then no marker.
    fn stop(&mut self) {
        let (name, safe) = (&self.spec.name, self.spec.safe);
        if let Err(e) = self.line.set(safe) {
            // The marker stays, so the next start sets `safe`.
            tracing::error!(source = %name, value = safe, error = %e, "GPIO output could not be set to its safe value at stop.");
            return;
        }
        match std::fs::remove_file(&self.marker) {
            Ok(()) => {
                tracing::info!(source = %name, value = safe, "GPIO output set to its safe value; stopped.");
            }
            Err(e) => {
                tracing::warn!(source = %name, marker = %self.marker.display(), error = %e, "GPIO output set to its safe value; its crash marker could not be removed.");
            }
        }
    }
}

/// Creates `marker` (and its folder).
fn create_marker(marker: &Path) -> io::Result<()> {
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(marker, b"")
}

/// The Linux GPIO character device (`/dev/gpiochipN`).
pub struct Cdev;

impl OutputLines for Cdev {
    type Line = CdevLine;

    fn request(&self, spec: &GpioOutputSpec, value: bool) -> Result<CdevLine, GpioError> {
        let (chip, offset) = locate(spec.chip.as_deref(), &spec.line)?;
        let mut builder = Request::builder();
        builder
            .on_chip(&chip)
            .with_consumer(format!("edgefn:{}", spec.name))
            .with_line(offset);
        // Active-low first, so the initial value is the logical one.
        if spec.active_low {
            builder.as_active_low();
        }
        builder.as_output(Value::from(value));
        let request = builder
            .request()
            .map_err(|source| GpioError::RequestOutput {
                chip,
                offset,
                source,
            })?;
        Ok(CdevLine(request))
    }
}

/// A requested output line of the character device.
pub struct CdevLine(Request);

impl OutputLine for CdevLine {
    fn set(&mut self, value: bool) -> io::Result<()> {
        self.0
            .set_lone_value(Value::from(value))
            .map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests;
