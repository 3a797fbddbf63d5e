//! The GPIO source: its config errors; its logic over a fake chip (an edge's
//! event, a read error re-requesting the line, cancellation); and, where
//! the kernel has `gpio-sim`, the real character device (otherwise reported
//! as skipped).

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, MqttOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::config::{BiasSetting, EdgeSelect};
use super::*;
use crate::config::schema::QueuePolicy;
use crate::config::{ConfigError, ValidConfig};
use crate::metrics::{FunctionMetrics, GatewayMetrics};
use crate::router::{Route, Router};
use crate::runtime::queue::{QueueReceiver, queue};
use crate::topic::{FilterSet, TopicFilter};

mod sim;

/// How long a test waits for an event before failing.
const WAIT: Duration = Duration::from_secs(10);

const CONFIG: &str = r#"
[gateway]
id = "gw1"

[[functions]]
name = "f"
component = "f.wasm"
triggers = ["buttons/#"]

[[sources]]
kind = "gpio"
name = "button"
topic = "buttons/door"
"#;

fn parse(extra: &str) -> Result<ValidConfig, Vec<ConfigError>> {
    crate::config::tests::parse_str(&format!("{CONFIG}{extra}")).map_err(|e| e.0)
}

/// Every problem of `extra`, as `key: reason`.
fn problems(extra: &str) -> Vec<String> {
    crate::config::tests::problems(&format!("{CONFIG}{extra}"))
}

fn spec_of(config: &ValidConfig) -> &GpioSpec {
    match &config.sources[0] {
        crate::config::SourceSpec::Gpio(spec) => spec,
        other => panic!("a gpio source: {other:?}"),
    }
}

#[test]
fn gpio_sources_are_validated_with_their_defaults() {
    let config = parse("line = 17\n").expect("valid");
    let spec = spec_of(&config);
    assert_eq!(spec.chip, Some(PathBuf::from("/dev/gpiochip0")));
    assert_eq!(spec.line, LineId::Offset(17));
    assert_eq!(
        (spec.edge, spec.bias),
        (EdgeSelect::Both, BiasSetting::AsIs)
    );
    assert_eq!((spec.debounce, spec.active_low), (Duration::ZERO, false));

    let config = parse(
        "line = \"GPIO17\"\nedge = \"falling\"\ndebounce_ms = 20\nbias = \"pull_up\"\nactive_low = true\n",
    )
    .expect("valid");
    let spec = spec_of(&config);
    // A named line without a chip is looked for on every chip.
    assert_eq!(spec.chip, None);
    assert_eq!(spec.line, LineId::Name("GPIO17".into()));
    assert_eq!(
        (spec.edge, spec.bias, spec.debounce, spec.active_low),
        (
            EdgeSelect::Falling,
            BiasSetting::PullUp,
            Duration::from_millis(20),
            true
        )
    );
    let config = parse("line = 3\nchip = \"gpiochip4\"\n").expect("valid");
    assert_eq!(spec_of(&config).chip, Some(PathBuf::from("/dev/gpiochip4")));
    let config = parse("line = 3\nchip = \"/dev/gpiochip1\"\n").expect("valid");
    assert_eq!(spec_of(&config).chip, Some(PathBuf::from("/dev/gpiochip1")));
}

#[test]
fn gpio_config_errors_name_the_key() {
    let cases = [
        (
            "line = 17\nedge = \"up\"\n",
            "sources[0].edge: unknown variant `up`",
        ),
        (
            "line = 17\ndebounce_ms = 1001\n",
            "sources[0].debounce_ms: must be between 0 (off) and 1000",
        ),
        (
            "line = 17\npin = 11\n",
            "sources[0].pin: unknown field `pin`",
        ),
        (
            "line = 17\nbias = \"up\"\n",
            "sources[0].bias: unknown variant `up`",
        ),
        (
            "line = 17\nchip = \"gpio chip\"\n",
            "sources[0].chip: `gpio chip`: give a chip name like `gpiochip0`",
        ),
        (
            "line = 17\nchip = \"dev/gpiochip0\"\n",
            "sources[0].chip: `dev/gpiochip0`: give a chip name",
        ),
        (
            "line = -1\n",
            "sources[0].line: a line number (e.g. 17) or a line name",
        ),
        (
            "line = \"\"\n",
            "sources[0].line: must be a line number or a non-empty line name",
        ),
        ("edge = \"both\"\n", "sources[0]: missing field `line`"),
    ];
    for (extra, expected) in cases {
        let found = problems(extra);
        assert!(
            found.iter().any(|p| p.starts_with(expected)),
            "{extra}: {found:?} lacks `{expected}`"
        );
    }
}

/// A context whose one function (`f`, on `buttons/#`) has a queue of 8.
fn context() -> (SourceContext, QueueReceiver) {
    let metrics = Arc::new(GatewayMetrics::default());
    let (tx, rx) = queue(8, QueuePolicy::Block, Arc::new(FunctionMetrics::default()));
    let route = Route {
        function: "f".into(),
        triggers: FilterSet::new(vec![TopicFilter::parse("buttons/#").expect("filter")]),
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

fn spec(line: LineId) -> GpioSpec {
    GpioSpec {
        name: "button".into(),
        chip: Some("/dev/gpiochip0".into()),
        line,
        edge: EdgeSelect::Both,
        debounce: Duration::ZERO,
        bias: BiasSetting::PullUp,
        active_low: false,
        topic: "buttons/door".into(),
        mirror_topic: None,
    }
}

fn parts(spec: GpioSpec) -> GpioParts {
    let (local, _eventloop) = AsyncClient::new(MqttOptions::new("unused", "127.0.0.1", 1), 1);
    GpioParts {
        spec,
        stats: Arc::new(SourceStats::default()),
        local,
    }
}

type Sender = mpsc::UnboundedSender<io::Result<Edge>>;

/// A fake chip: each request takes the next of its lines' edge queues; with
/// none left, the line is busy.
struct FakeChip {
    /// How many requests were made.
    requests: Arc<tokio::sync::watch::Sender<usize>>,
    lines: Mutex<VecDeque<FakeEdges>>,
}

impl FakeChip {
    /// A chip that can be requested `n` times; the senders feed each
    /// request's edges.
    fn new(n: usize) -> (Self, Vec<Sender>) {
        let chip = Self {
            requests: Arc::new(tokio::sync::watch::channel(0).0),
            lines: Mutex::default(),
        };
        let mut senders = Vec::new();
        for _ in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            chip.lines.lock().expect("lock").push_back(FakeEdges(rx));
            senders.push(tx);
        }
        (chip, senders)
    }
}

struct FakeEdges(mpsc::UnboundedReceiver<io::Result<Edge>>);

impl Lines for FakeChip {
    type Stream = FakeEdges;

    fn request(&self, spec: &GpioSpec) -> Result<Requested<FakeEdges>, GpioError> {
        self.requests.send_modify(|n| *n += 1);
        let chip = PathBuf::from("/dev/gpiochip0");
        let offset = match spec.line {
            LineId::Offset(n) => n,
            LineId::Name(_) => 17,
        };
        if offset >= 28 {
            return Err(GpioError::NoOffset {
                chip,
                offset,
                lines: 28,
            });
        }
        match self.lines.lock().expect("lock").pop_front() {
            Some(edges) => Ok(Requested {
                chip,
                offset,
                edges,
            }),
            None => Err(GpioError::Request {
                chip,
                offset,
                source: gpiocdev::Error::InvalidArgument("busy".into()),
            }),
        }
    }
}

impl EdgeStream for FakeEdges {
    async fn next_edge(&mut self) -> io::Result<Edge> {
        match self.0.recv().await {
            Some(edge) => edge,
            // The test let go of the line: no more edges.
            None => std::future::pending().await,
        }
    }
}

async fn next_event(rx: &mut QueueReceiver) -> Arc<Event> {
    tokio::time::timeout(WAIT, rx.pop())
        .await
        .expect("an event in time")
        .expect("an event")
}

fn json(event: &Event) -> serde_json::Value {
    serde_json::from_slice(&event.payload).expect("JSON payload")
}

#[tokio::test]
async fn an_edge_is_an_event_with_the_kernels_timestamp() {
    let (ctx, mut rx) = context();
    let (chip, senders) = FakeChip::new(1);
    let parts = parts(spec(LineId::Offset(17)));
    let stats = parts.stats.clone();
    let source = GpioSource::with_lines(parts, chip).expect("requested");
    let task = tokio::spawn(source.read(ctx.clone()));

    let edge = |rising, timestamp_ns| {
        Ok(Edge {
            rising,
            timestamp_ns,
        })
    };
    senders[0].send(edge(true, 1_234_567_890)).expect("send");
    senders[0].send(edge(false, 1_234_600_000)).expect("send");
    let event = next_event(&mut rx).await;
    assert_eq!(
        json(&event),
        serde_json::json!({"line": 17, "value": 1, "edge": "rising", "timestamp_ns": 1_234_567_890u64})
    );
    assert_eq!(event.topic, "buttons/door");
    assert_eq!(event.source, SourceKind::Serial);
    let attribute = |key: &str| {
        event
            .attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(attribute("protocol").as_deref(), Some("gpio"));
    assert_eq!(attribute("chip").as_deref(), Some("/dev/gpiochip0"));
    assert_eq!(attribute("line").as_deref(), Some("17"));
    let event = next_event(&mut rx).await;
    assert_eq!(
        json(&event),
        serde_json::json!({"line": 17, "value": 0, "edge": "falling", "timestamp_ns": 1_234_600_000u64})
    );
    assert_eq!(stats.frames.load(Ordering::Relaxed), 2);
    ctx.cancel.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops")
        .expect("no panic");

    // A line configured by name is named so in the event.
    let named = payload(
        &LineId::Name("GPIO17".into()),
        Edge {
            rising: true,
            timestamp_ns: 5,
        },
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&named).expect("JSON"),
        serde_json::json!({"line": "GPIO17", "value": 1, "edge": "rising", "timestamp_ns": 5})
    );
}

#[tokio::test(start_paused = true)]
async fn a_read_error_is_counted_and_the_line_requested_again() {
    let (ctx, mut rx) = context();
    // The line can be requested twice: at build, and once after the error.
    let (chip, senders) = FakeChip::new(2);
    let mut requests = chip.requests.subscribe();
    let parts = parts(spec(LineId::Offset(17)));
    let stats = parts.stats.clone();
    let source = GpioSource::with_lines(parts, chip).expect("requested");
    let task = tokio::spawn(source.read(ctx.clone()));

    senders[0]
        .send(Err(io::Error::other("read failed")))
        .expect("send");
    // Only the new request's edges can arrive.
    senders[1]
        .send(Ok(Edge {
            rising: true,
            timestamp_ns: 7,
        }))
        .expect("send");
    let event = next_event(&mut rx).await;
    assert_eq!(json(&event)["timestamp_ns"], 7);
    assert_eq!(*requests.borrow(), 2);
    assert_eq!(stats.failures.load(Ordering::Relaxed), 1);
    assert_eq!(stats.opened.load(Ordering::Relaxed), 2);
    assert_eq!(stats.frames.load(Ordering::Relaxed), 1);

    // Then the line is busy: each failed request is counted, and retried
    // with back-off.
    senders[1]
        .send(Err(io::Error::other("read failed")))
        .expect("send");
    tokio::time::timeout(WAIT, requests.wait_for(|n| *n >= 5))
        .await
        .expect("requested again and again")
        .expect("chip alive");
    // Two read errors, and the busy requests before the fifth.
    assert!(stats.failures.load(Ordering::Relaxed) >= 4);
    ctx.cancel.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops while backing off")
        .expect("no panic");
}

#[tokio::test]
async fn cancellation_stops_the_source() {
    let (ctx, _rx) = context();
    let (chip, _senders) = FakeChip::new(1);
    let source = GpioSource::with_lines(parts(spec(LineId::Offset(17))), chip).expect("requested");
    let task = tokio::spawn(source.read(ctx.clone()));
    ctx.cancel.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops while waiting for an edge")
        .expect("no panic");
}

#[test]
fn a_line_that_cannot_be_requested_fails_build_naming_source_and_key() {
    let (chip, _senders) = FakeChip::new(1);
    let Err(e) = GpioSource::with_lines(parts(spec(LineId::Offset(40))), chip) else {
        panic!("line 40 of 28 must fail");
    };
    assert_eq!(
        e.to_string(),
        "source `button`: line: 40 does not exist on /dev/gpiochip0 (it has lines 0 to 27)"
    );
    let (chip, _senders) = FakeChip::new(0);
    let Err(e) = GpioSource::with_lines(parts(spec(LineId::Offset(3))), chip) else {
        panic!("a busy line must fail");
    };
    assert_eq!(
        e.to_string(),
        "source `button`: line: cannot request line 3 of /dev/gpiochip0 as an input"
    );
    // The kernel's answer is kept as the cause.
    let cause = std::error::Error::source(&e).expect("a cause");
    assert_eq!(cause.to_string(), "busy");
}
