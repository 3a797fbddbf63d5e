//! The I2C source on a mock bus: a BME280 register file that counts how
//! often its calibration is read, and an SHT3x whose CRC is wrong.

use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use embedded_hal::i2c::{ErrorType, Operation};
use rumqttc::{AsyncClient, Event as MqttEvent, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::MqttEndpoint;
use crate::metrics::GatewayMetrics;
use crate::router::Router;

const WAIT: Duration = Duration::from_secs(15);

/// A BME280 as a register file (the datasheet example's calibration and a
/// reading of 25.08 °C); counts reads of the calibration block.
#[derive(Clone)]
struct FakeBme280 {
    regs: [u8; 256],
    calibration_reads: Arc<AtomicU32>,
}

impl FakeBme280 {
    fn new() -> Self {
        let mut regs = [0u8; 256];
        regs[0xd0] = bme280::CHIP_ID;
        let calib: [u16; 12] = [
            27504, 26435, 64536, 36477, 54851, 3024, 2855, 140, 65529, 15500, 50936, 6000,
        ];
        for (i, w) in calib.iter().enumerate() {
            regs[0x88 + 2 * i..0x8a + 2 * i].copy_from_slice(&w.to_le_bytes());
        }
        regs[0xa1] = 75;
        regs[0xe1..0xe8].copy_from_slice(&[0x6a, 0x01, 0x00, 0x13, 0x29, 0x03, 0x1e]);
        regs[0xf7..0xff].copy_from_slice(&[0x65, 0x5a, 0xc0, 0x7e, 0xed, 0x00, 0x71, 0x48]);
        Self {
            regs,
            calibration_reads: Arc::default(),
        }
    }
}

impl ErrorType for FakeBme280 {
    type Error = core::convert::Infallible;
}

impl I2c for FakeBme280 {
    fn transaction(&mut self, _: u8, ops: &mut [Operation<'_>]) -> Result<(), Self::Error> {
        let mut reg = 0usize;
        for op in ops {
            match op {
                Operation::Write(w) => reg = w.first().copied().map_or(reg, usize::from),
                Operation::Read(r) => {
                    if reg == 0x88 {
                        self.calibration_reads.fetch_add(1, Ordering::Relaxed);
                    }
                    for (i, b) in r.iter_mut().enumerate() {
                        *b = self.regs.get(reg + i).copied().unwrap_or(0);
                    }
                }
            }
        }
        Ok(())
    }
}

/// An SHT3x that answers every measurement with a wrong CRC.
struct BadCrcSht3x;

impl ErrorType for BadCrcSht3x {
    type Error = core::convert::Infallible;
}

impl I2c for BadCrcSht3x {
    fn transaction(&mut self, _: u8, ops: &mut [Operation<'_>]) -> Result<(), Self::Error> {
        for op in ops {
            if let Operation::Read(r) = op {
                r.fill(0x5a);
            }
        }
        Ok(())
    }
}

fn spec(driver: I2cDriver, mirror_topic: Option<&str>) -> I2cSpec {
    I2cSpec {
        name: "climate".into(),
        bus: PathBuf::from("/dev/i2c-mock"),
        driver,
        address: 0x76,
        interval: Duration::from_millis(10),
        topic: "i2c/climate".into(),
        mirror_topic: mirror_topic.map(str::to_owned),
    }
}

/// A context with no function (a bridge).
fn context() -> SourceContext {
    let metrics = Arc::new(GatewayMetrics::default());
    SourceContext {
        cancel: CancellationToken::new(),
        router: Arc::new(Router::new(Vec::new(), metrics.clone())),
        metrics,
        ready: Arc::new(tokio::sync::watch::channel(false).0),
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connects a subscriber to `filter`; returns once the broker acknowledged it.
async fn subscribe(port: u16, filter: &str) -> tokio::sync::mpsc::UnboundedReceiver<Vec<u8>> {
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new("i2c-test-sub", "127.0.0.1", port), 16);
    client.subscribe(filter, QoS::AtMostOnce).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    tokio::spawn(async move {
        let _client = client;
        while let Ok(e) = eventloop.poll().await {
            match e {
                MqttEvent::Incoming(Packet::SubAck(_)) => {
                    if let Some(s) = subscribed_tx.take() {
                        let _ = s.send(());
                    }
                }
                MqttEvent::Incoming(Packet::Publish(p)) => {
                    let _ = tx.send(p.payload.to_vec());
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, subscribed)
        .await
        .unwrap()
        .unwrap();
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bme280_bridge_reads_calibration_once_and_mirrors_every_reading() {
    let broker = crate::broker::EmbeddedBroker::start(
        ([127, 0, 0, 1], 0).into(),
        None,
        crate::broker::DEFAULT_RETENTION_BYTES,
        Arc::default(),
    )
    .unwrap();
    let port = broker.addr().port();
    let endpoint = MqttEndpoint {
        host: "127.0.0.1".into(),
        port,
        client_id: "i2c-test".into(),
        credentials: None,
        tls: None,
    };
    let ctx = context();
    let (local, poll) =
        crate::output::local_publisher(&endpoint, ctx.cancel.clone(), ctx.metrics.clone());
    tokio::spawn(poll);
    let mut mirrored = subscribe(port, "mirror/#").await;

    let bus = FakeBme280::new();
    let calibration_reads = bus.calibration_reads.clone();
    let stats = Arc::new(SourceStats::default());
    let parts = I2cParts {
        spec: spec(I2cDriver::Bme280, Some("mirror/climate")),
        stats: stats.clone(),
        beat: crate::progress::Progress::default().watch(
            "source",
            "climate",
            Duration::from_secs(5),
        ),
        local,
    };
    let source = I2cSource::with_bus(parts, Arc::new(move |_: &Path| Ok(bus.clone())));
    let running = tokio::spawn(source.poll_until_cancelled(ctx.clone()));
    for _ in 0..3 {
        let payload = tokio::time::timeout(WAIT, mirrored.recv())
            .await
            .expect("a mirrored reading in time")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(v["sensor"], "climate");
        let t = v["temperature_c"].as_f64().unwrap();
        assert!((t - 25.08).abs() < 0.01, "{v}");
    }
    ctx.cancel.cancel();
    running.await.unwrap();
    assert!(stats.frames.load(Ordering::Relaxed) >= 3);
    assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    assert_eq!(
        calibration_reads.load(Ordering::Relaxed),
        1,
        "the driver (and its calibration) is kept between polls"
    );
}

#[tokio::test]
async fn crc_errors_count_as_invalid_readings_at_once() {
    let ctx = context();
    let (local, _eventloop) = AsyncClient::new(MqttOptions::new("unused", "127.0.0.1", 1), 1);
    let stats = Arc::new(SourceStats::default());
    let parts = I2cParts {
        spec: spec(I2cDriver::Sht3x, None),
        stats: stats.clone(),
        beat: crate::progress::Progress::default().watch(
            "source",
            "climate",
            Duration::from_secs(5),
        ),
        local,
    };
    let source = I2cSource::with_bus(parts, Arc::new(|_: &Path| Ok(BadCrcSht3x)));
    let running = tokio::spawn(source.poll_until_cancelled(ctx.clone()));
    wait_for("two invalid readings counted", || {
        stats.invalid.load(Ordering::Relaxed) >= 2
    })
    .await;
    ctx.cancel.cancel();
    running.await.unwrap();
    assert_eq!(stats.frames.load(Ordering::Relaxed), 0);
    assert!(stats.failures.load(Ordering::Relaxed) >= 2);
}
