//! The GPIO output: its config errors (and a function's `gpio` naming no
//! output); its logic over a fake line (the initial value, writes, a failed
//! write, the safe value at a stop and after a crash); and functions' writes
//! reaching its queue.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::ValidConfig;
use crate::sources::gpio::config::LineId;

const CONFIG: &str = r#"
[gateway]
id = "gw1"

[[functions]]
name = "f"
component = "f.wasm"
triggers = ["buttons/#"]
gpio = ["relay"]

[[sources]]
kind = "gpio_output"
name = "relay"
"#;

fn parse(extra: &str) -> ValidConfig {
    crate::config::tests::parse_str(&format!("{CONFIG}{extra}")).expect("valid")
}

fn problems(text: &str) -> Vec<String> {
    crate::config::tests::problems(text)
}

#[test]
fn gpio_outputs_are_validated_with_their_defaults() {
    let config = parse("line = 27\n");
    let crate::config::SourceSpec::GpioOutput(spec) = &config.sources[0] else {
        panic!("a gpio_output source: {:?}", config.sources[0]);
    };
    assert_eq!(spec.chip, Some(PathBuf::from("/dev/gpiochip0")));
    assert_eq!(spec.line, LineId::Offset(27));
    assert_eq!(
        (spec.active_low, spec.initial, spec.safe),
        (false, false, false)
    );
    assert_eq!(config.functions[0].gpio, ["relay".to_owned()].into());
    let config = parse("line = \"GPIO27\"\nactive_low = true\ninitial = true\nsafe = true\n");
    let crate::config::SourceSpec::GpioOutput(spec) = &config.sources[0] else {
        panic!("a gpio_output source");
    };
    assert_eq!(
        (spec.chip.clone(), spec.line.clone()),
        (None, LineId::Name("GPIO27".into()))
    );
    assert_eq!(
        (spec.active_low, spec.initial, spec.safe),
        (true, true, true)
    );
}

#[test]
fn gpio_output_config_errors_name_the_key() {
    let unknown = problems(&format!("{CONFIG}line = 27\ntopic = \"x/y\"\n"));
    assert!(
        unknown
            .iter()
            .any(|p| p.starts_with("sources[0]") && p.contains("unknown field `topic`")),
        "{unknown:?}"
    );
    let bad_line = problems(&format!("{CONFIG}line = -1\n"));
    assert!(
        bad_line
            .iter()
            .any(|p| p.starts_with("sources[0]")
                && p.contains("a line number (e.g. 17) or a line name")),
        "{bad_line:?}"
    );
    let empty = problems(&format!("{CONFIG}line = \" \"\n"));
    assert_eq!(
        empty,
        ["sources[0].line: must be a line number or a non-empty line name"]
    );
    let chip = problems(&format!("{CONFIG}line = 1\nchip = \"a b\"\n"));
    assert!(chip[0].starts_with("sources[0].chip: "), "{chip:?}");
    // A function's `gpio` must name a gpio_output (not a gpio input).
    let text = CONFIG
        .replace("gpio = [\"relay\"]", "gpio = [\"relay\", \"button\"]")
        .replace(
            "kind = \"gpio_output\"",
            "kind = \"gpio_output\"\nline = 27",
        )
        + "\n[[sources]]\nkind = \"gpio\"\nname = \"button\"\nline = 17\ntopic = \"buttons/b\"\n";
    assert_eq!(
        problems(&text),
        ["functions[0].gpio[1]: no GPIO output named `button` is configured under [[sources]]"]
    );
}

#[test]
fn a_function_naming_a_gpio_output_that_is_not_running_is_refused_at_reload() {
    let running = parse("line = 27\n");
    let text = CONFIG
        .replace("name = \"relay\"", "name = \"valve\"")
        .replace("[\"relay\"]", "[\"valve\"]")
        + "line = 27\n";
    let new = crate::config::tests::parse_str(&text).expect("valid");
    let problems = crate::config::diff::missing_targets(&running, &new);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("functions.f: GPIO output `valve` is not running")),
        "{problems:?}"
    );
}

/// What the fake line was set to, in order; `fail` makes `set` fail.
#[derive(Clone, Default)]
struct Fake {
    values: Arc<Mutex<Vec<bool>>>,
    fail: Arc<Mutex<bool>>,
}

struct FakeLine(Fake);

impl OutputLine for FakeLine {
    fn set(&mut self, value: bool) -> io::Result<()> {
        if *self.0.fail.lock().unwrap() {
            return Err(io::Error::other("line gone"));
        }
        self.0.values.lock().unwrap().push(value);
        Ok(())
    }
}

impl OutputLines for Fake {
    type Line = FakeLine;

    fn request(&self, _spec: &GpioOutputSpec, value: bool) -> Result<FakeLine, GpioError> {
        // The value the line is requested at.
        self.values.lock().unwrap().push(value);
        Ok(FakeLine(self.clone()))
    }
}

/// Refuses every request, as a busy line does.
struct Busy;

impl OutputLines for Busy {
    type Line = FakeLine;

    fn request(&self, spec: &GpioOutputSpec, _value: bool) -> Result<FakeLine, GpioError> {
        Err(GpioError::RequestOutput {
            chip: spec.chip.clone().unwrap_or_default(),
            offset: 27,
            source: gpiocdev::Error::InvalidArgument("busy".into()),
        })
    }
}

fn spec() -> GpioOutputSpec {
    GpioOutputSpec {
        name: "relay".into(),
        chip: Some("/dev/gpiochip0".into()),
        line: LineId::Offset(27),
        active_low: false,
        initial: true,
        safe: false,
    }
}

/// The parts of an output whose marker is in `dir`, and its queue.
fn parts(dir: &Path) -> (OutputParts, mpsc::Sender<bool>, Arc<SourceStats>) {
    let (tx, writes) = mpsc::channel(WRITE_QUEUE);
    let stats = Arc::new(SourceStats::default());
    let parts = OutputParts {
        spec: spec(),
        stats: stats.clone(),
        marker: marker_path(dir, "relay"),
        writes,
    };
    (parts, tx, stats)
}

#[tokio::test]
async fn the_line_starts_at_initial_takes_writes_and_stops_at_safe() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let (parts, tx, stats) = parts(dir.path());
    let marker = parts.marker.clone();
    let output = GpioOutput::with_lines(parts, &fake).expect("built");
    assert_eq!(*fake.values.lock().unwrap(), [true], "initial");
    assert!(marker.exists(), "the crash marker is created");
    let cancel = CancellationToken::new();
    let task = tokio::spawn(output.serve(cancel.clone()));
    tx.send(false).await.unwrap();
    tx.send(true).await.unwrap();
    let wait = async {
        while stats.written.load(Ordering::Relaxed) < 2 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("written");
    assert_eq!(*fake.values.lock().unwrap(), [true, false, true]);
    // A failing line: counted, logged, the source goes on.
    *fake.fail.lock().unwrap() = true;
    tx.send(false).await.unwrap();
    let wait = async {
        while stats.writes_dropped.load(Ordering::Relaxed) < 1 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("dropped");
    assert!(!task.is_finished());
    *fake.fail.lock().unwrap() = false;
    cancel.cancel();
    task.await.unwrap();
    assert_eq!(
        *fake.values.lock().unwrap(),
        [true, false, true, false],
        "safe at stop"
    );
    assert!(!marker.exists(), "a clean stop removes the marker");
}

#[test]
fn a_leftover_marker_makes_build_set_safe() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let (parts, _tx, _stats) = parts(dir.path());
    create_marker(&parts.marker).unwrap();
    let marker = parts.marker.clone();
    let _output = GpioOutput::with_lines(parts, &fake).expect("built");
    assert_eq!(
        *fake.values.lock().unwrap(),
        [false],
        "safe, not initial, after a crash"
    );
    assert!(marker.exists());
}

#[test]
fn a_busy_line_fails_build_naming_source_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let (parts, _tx, _stats) = parts(dir.path());
    let marker = parts.marker.clone();
    let Err(e) = GpioOutput::with_lines(parts, &Busy) else {
        panic!("a busy line must fail build");
    };
    assert_eq!(
        e.to_string(),
        "source `relay`: line: cannot request line 27 of /dev/gpiochip0 as an output"
    );
    assert!(e.cause.is_some(), "the kernel's answer is kept");
    assert!(!marker.exists());
}

#[test]
fn functions_gpio_writes_reach_the_queue() {
    let (tx, mut rx) = mpsc::channel(1);
    let stats = Arc::new(SourceStats::default());
    let mut writers = crate::output::Writers::default();
    writers.insert("relay".into(), Writes::Gpio(tx), stats.clone());
    let (queue, stats) = writers.gpio.get("relay").expect("the relay's queue");
    crate::output::offer(queue, stats, true, "f", "relay");
    // Full: dropped and counted.
    crate::output::offer(queue, stats, false, "f", "relay");
    assert_eq!(rx.try_recv().ok(), Some(true));
    assert!(rx.try_recv().is_err());
    assert_eq!(stats.writes_dropped.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn delivered_gpio_writes_reach_the_outputs_queue_in_call_order() {
    use crate::output::{GpioWrite, OutputPort, Outputs, Writers};
    let dir = tempfile::tempdir().unwrap();
    let outbox = crate::outbox::Outbox::open(crate::outbox::OutboxConfig {
        path: dir.path().join("outbox.sqlite"),
        max_commits_per_sec: 20,
        sinks: Vec::new(),
    })
    .expect("outbox opens");
    let opts = rumqttc::MqttOptions::new("t", "127.0.0.1", 1);
    let (local, _eventloop) = rumqttc::AsyncClient::new(opts, 8);
    let (tx, mut rx) = mpsc::channel(WRITE_QUEUE);
    let mut writers = Writers::default();
    writers.insert(
        "relay".into(),
        Writes::Gpio(tx),
        Arc::new(SourceStats::default()),
    );
    let port = OutputPort::new(local, outbox, writers);
    let outputs = Outputs {
        gpio_writes: vec![
            GpioWrite {
                line: "relay".into(),
                value: true,
            },
            // Not an output here (the host refuses it before): ignored.
            GpioWrite {
                line: "valve".into(),
                value: true,
            },
            GpioWrite {
                line: "relay".into(),
                value: false,
            },
        ],
        ..Outputs::default()
    };
    let event = Arc::new(crate::event::Event::new(
        crate::event::SourceKind::Manual,
        "t",
        "x",
    ));
    let progress = crate::progress::Progress::default();
    let beat = progress.watch("function", "f", Duration::from_secs(60));
    let metrics = crate::metrics::FunctionMetrics::default();
    port.deliver(
        "f",
        crate::outbox::Lane::Normal,
        &event,
        outputs,
        &metrics,
        &beat,
    )
    .await;
    assert_eq!(rx.try_recv().ok(), Some(true));
    assert_eq!(rx.try_recv().ok(), Some(false));
    assert!(rx.try_recv().is_err());
}
