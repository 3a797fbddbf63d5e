//! The serial source: reads a serial port (UART, USB-serial adapter, or any
//! tty), cuts the byte stream into frames with an `edgefn_drivers` codec,
//! and turns each frame into an event on the configured topic. Functions
//! allowed to write to the port (`serial_ports`) send bytes back through it.
//!
//! A device that disappears (adapter unplugged, read error, EOF) is logged
//! once, counted, and reopened with back-off until it returns; nothing else
//! in the gateway waits for it. Bad frames are counted and skipped by the
//! codec. Writes for a port that is not open are dropped and counted:
//! an actuator command should not fire minutes late.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use bytes::BytesMut;
use edgefn_drivers::codec::{CodecStats, FrameDecoder, Framing, pms5003};
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::codec::{Decoder, FramedRead};

pub mod config;

use super::SourceStats;
use super::{
    BuildEnv, BuiltSource, Common, Port, Source, SourceContext, SourceError, SourcePlugin,
};
use crate::config::KeyChanges;
use crate::event::{Event, SourceKind};
use crate::output::Writes;
use crate::progress::{Activity, Beat};
use config::{SerialSourceConfig, SerialSpec};

impl SourceStats {
    fn add_codec_delta(&self, now: CodecStats, before: &mut CodecStats) {
        self.invalid
            .fetch_add(now.invalid - before.invalid, Ordering::Relaxed);
        self.oversize
            .fetch_add(now.oversize - before.oversize, Ordering::Relaxed);
        self.discarded_bytes.fetch_add(
            now.discarded_bytes - before.discarded_bytes,
            Ordering::Relaxed,
        );
        if now.invalid > before.invalid || now.oversize > before.oversize {
            tracing::debug!(
                invalid = now.invalid,
                oversize = now.oversize,
                "Serial frames skipped."
            );
        }
        *before = now;
    }
}

/// A [`FrameDecoder`] that adds what it skips to the source's counters as
/// it happens, not when the next good frame arrives: a device at the wrong
/// baud rate sends nothing but garbage, and `/metrics` must show it.
struct Counted {
    inner: FrameDecoder,
    stats: Arc<SourceStats>,
    seen: CodecStats,
}

impl Decoder for Counted {
    type Item = Bytes;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, std::io::Error> {
        let frame = self.inner.decode(buf);
        self.stats
            .add_codec_delta(self.inner.stats(), &mut self.seen);
        frame
    }
}

/// Writes waiting for a port; beyond this they are dropped.
pub const WRITE_QUEUE: usize = 64;

/// The serial source.
pub struct SerialSource {
    spec: SerialSpec,
    writes: mpsc::Receiver<Bytes>,
    stats: Arc<SourceStats>,
    mirror: Option<rumqttc::AsyncClient>,
    beat: Arc<Beat>,
}

/// What the serial source needs besides its spec.
pub struct SerialParts {
    /// The spec.
    pub spec: SerialSpec,
    /// Bytes functions write to the port.
    pub writes: mpsc::Receiver<Bytes>,
    /// Its counters.
    pub stats: Arc<SourceStats>,
    /// The local broker, for `mirror_topic`.
    pub local: rumqttc::AsyncClient,
    /// Its progress, for the watchdog ([`crate::progress`]).
    pub beat: Arc<Beat>,
}

/// `kind = "serial"`.
pub struct Kind;

impl SourcePlugin for Kind {
    const KIND: &'static str = "serial";
    type Config = SerialSourceConfig;
    type Spec = SerialSpec;

    fn name(config: &SerialSourceConfig) -> &str {
        &config.name
    }

    fn validate(
        config: &SerialSourceConfig,
        scope: &mut crate::config::Scope<'_, '_>,
    ) -> Option<SerialSpec> {
        config::validate(config, scope)
    }

    fn common(spec: &SerialSpec) -> Common<'_> {
        Common {
            name: &spec.name,
            topic: Some(&spec.topic),
            mirror_topic: spec.mirror_topic.as_deref(),
            writable: true,
            port: Some(Port {
                path: &spec.path,
                shared: None,
            }),
        }
    }

    fn changed(a: &SerialSpec, b: &SerialSpec, keys: &mut KeyChanges) {
        keys.key("path", &a.path, &b.path);
        keys.key("baud", &a.baud, &b.baud);
        keys.key("data_bits", &a.data_bits, &b.data_bits);
        keys.key("parity", &a.parity, &b.parity);
        keys.key("stop_bits", &a.stop_bits, &b.stop_bits);
        keys.key("flow_control", &a.flow_control, &b.flow_control);
        keys.key("framing", &a.framing, &b.framing);
        keys.key("topic", &a.topic, &b.topic);
        keys.key("mirror_topic", &a.mirror_topic, &b.mirror_topic);
    }

    fn build(
        spec: &SerialSpec,
        env: &BuildEnv,
        ctx: &SourceContext,
    ) -> Result<BuiltSource, SourceError> {
        let stats = Arc::new(SourceStats::default());
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let source = SerialSource::build(
            SerialParts {
                spec: spec.clone(),
                writes: rx,
                stats: stats.clone(),
                local: env.local.clone(),
                beat: env.beat(&spec.name),
            },
            ctx,
        )?;
        Ok(BuiltSource::new(
            source,
            stats,
            Some(Writes::Serial(tx)),
            ctx,
        ))
    }
}

impl Source for SerialSource {
    type Config = SerialParts;

    fn build(parts: SerialParts, _ctx: &SourceContext) -> Result<Self, SourceError> {
        let mirror = parts.spec.mirror_topic.is_some().then_some(parts.local);
        Ok(Self {
            spec: parts.spec,
            writes: parts.writes,
            stats: parts.stats,
            mirror,
            beat: parts.beat,
        })
    }

    async fn run(mut self, ctx: SourceContext) {
        let name = self.spec.name.clone();
        let path = self.spec.path.display().to_string();
        let mut failures = 0u32;
        'open: while !ctx.cancel.is_cancelled() {
            let builder = self.spec.line().builder(&path);
            let reason = match builder.open_native_async() {
                Ok(port) => {
                    failures = 0;
                    self.stats.opened.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(source = %name, path = %path, framing = self.spec.framing.name(), "Serial port opened.");
                    match self.serve(port, &ctx).await {
                        Served::Cancelled => break 'open,
                        Served::Lost(reason) => reason,
                    }
                }
                Err(e) => e.to_string(),
            };
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            if failures == 0 {
                tracing::warn!(source = %name, path = %path, error = %reason, "Serial port unavailable; reopening with back-off.");
            } else {
                tracing::debug!(source = %name, error = %reason, attempt = failures, "Serial port still unavailable.");
            }
            let wait = crate::mqtt::backoff(failures.min(4));
            failures = failures.saturating_add(1);
            // Writes while the port is away are dropped, not queued.
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    () = ctx.cancel.cancelled() => break 'open,
                    () = tokio::time::sleep_until(deadline) => break,
                    w = self.writes.recv() => if w.is_some() {
                        self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(source = %name, "Serial write dropped: the port is not open.");
                    },
                }
            }
        }
        tracing::debug!(source = %name, "Serial source stopped.");
    }
}

enum Served {
    Cancelled,
    Lost(String),
}

impl SerialSource {
    async fn serve(&mut self, port: tokio_serial::SerialStream, ctx: &SourceContext) -> Served {
        let (rd, mut wr) = tokio::io::split(port);
        let decoder = Counted {
            inner: FrameDecoder::new(self.spec.framing),
            stats: self.stats.clone(),
            seen: CodecStats::default(),
        };
        let mut frames = FramedRead::new(rd, decoder);
        loop {
            tokio::select! {
                () = ctx.cancel.cancelled() => return Served::Cancelled,
                f = frames.next() => match f {
                    Some(Ok(frame)) => self.dispatch(frame, ctx).await,
                    Some(Err(e)) => return Served::Lost(format!("read failed: {e}")),
                    None => return Served::Lost("end of file (device gone)".into()),
                },
                w = self.writes.recv() => {
                    let Some(bytes) = w else { continue };
                    // A device that stops taking bytes (flow control) holds
                    // the whole source here: the watchdog's business.
                    self.beat.busy(Activity::Writing);
                    let written = wr.write_all(&bytes).await;
                    if written.is_ok() {
                        let _ = wr.flush().await;
                    }
                    self.beat.idle();
                    if let Err(e) = written {
                        self.stats.writes_dropped.fetch_add(1, Ordering::Relaxed);
                        return Served::Lost(format!("write failed: {e}"));
                    }
                    self.stats.written.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    async fn dispatch(&self, frame: Bytes, ctx: &SourceContext) {
        let payload = match self.spec.framing {
            Framing::Pms5003 => match pms5003::Reading::parse(&frame) {
                Some(r) => Bytes::from(pms_json(&r).to_string()),
                None => return,
            },
            _ => frame,
        };
        self.stats.frames.fetch_add(1, Ordering::Relaxed);
        if let (Some(local), Some(topic)) = (&self.mirror, &self.spec.mirror_topic) {
            self.beat.busy(Activity::Mirroring);
            super::mirror(local, &self.spec.name, topic, &payload).await;
            self.beat.idle();
        }
        let mut event = Event::new(SourceKind::Serial, self.spec.topic.clone(), payload);
        event.attributes = vec![
            ("port".into(), self.spec.name.clone()),
            ("path".into(), self.spec.path.display().to_string()),
            ("framing".into(), self.spec.framing.name().into()),
        ];
        ctx.router.dispatch(event).await;
    }
}

fn pms_json(r: &pms5003::Reading) -> serde_json::Value {
    serde_json::json!({
        "pm1_0_cf1": r.pm1_0_cf1,
        "pm2_5_cf1": r.pm2_5_cf1,
        "pm10_cf1": r.pm10_cf1,
        "pm1_0": r.pm1_0,
        "pm2_5": r.pm2_5,
        "pm10": r.pm10,
        "particles_0_3um": r.particles_0_3um,
        "particles_0_5um": r.particles_0_5um,
        "particles_1_0um": r.particles_1_0um,
        "particles_2_5um": r.particles_2_5um,
        "particles_5_0um": r.particles_5_0um,
        "particles_10um": r.particles_10um,
    })
}
