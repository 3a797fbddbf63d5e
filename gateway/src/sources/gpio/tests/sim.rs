//! The GPIO source on a real character device: a `gpio-sim` chip made
//! through configfs, its line pulled up and down from sysfs. Where the
//! kernel has no `gpio-sim` (or configfs is not mounted), the test reports
//! itself as skipped, with the wording of the end-to-end suite. The GPIO
//! output is driven on the same kind of chip, its value read back from sysfs.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::*;

const GPIO_SIM: &str = "/sys/kernel/config/gpio-sim";

/// Reports the running test as skipped: a `SKIPPED <test>: <reason>` line
/// written straight to stdout (libtest captures only `print!`), as
/// `tests/e2e/support::skip` does.
fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unknown");
    let _ = writeln!(std::io::stdout().lock(), "SKIPPED {test}: {reason}");
}

/// A live `gpio-sim` chip of 8 lines, line 3 named `EDGEFN_BTN`; removed
/// when dropped.
struct SimChip {
    dir: PathBuf,
    /// `/dev/gpiochipN`.
    dev: PathBuf,
    /// `/sys/devices/platform/<dev_name>/<chip_name>`.
    sysfs: PathBuf,
}

impl SimChip {
    fn new() -> io::Result<Self> {
        let dir = Path::new(GPIO_SIM).join(format!("edgefn-test-{}", std::process::id()));
        fs::create_dir(&dir)?;
        let bank = dir.join("bank0");
        fs::create_dir(&bank)?;
        fs::write(bank.join("num_lines"), "8")?;
        let line = bank.join("line3");
        fs::create_dir(&line)?;
        fs::write(line.join("name"), "EDGEFN_BTN")?;
        fs::write(dir.join("live"), "1")?;
        let chip = fs::read_to_string(bank.join("chip_name"))?
            .trim()
            .to_owned();
        let device = fs::read_to_string(dir.join("dev_name"))?.trim().to_owned();
        Ok(Self {
            dev: Path::new("/dev").join(&chip),
            sysfs: Path::new("/sys/devices/platform").join(device).join(chip),
            dir,
        })
    }

    /// Pulls line `offset` up (`true`) or down, as a button would.
    fn pull(&self, offset: u32, up: bool) -> io::Result<()> {
        let pull = if up { "pull-up" } else { "pull-down" };
        fs::write(
            self.sysfs.join(format!("sim_gpio{offset}")).join("pull"),
            pull,
        )
    }
}

impl Drop for SimChip {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("live"), "0");
        let _ = fs::remove_dir(self.dir.join("bank0/line3"));
        let _ = fs::remove_dir(self.dir.join("bank0"));
        let _ = fs::remove_dir(&self.dir);
    }
}

fn sim_spec(chip: &SimChip, line: LineId) -> GpioSpec {
    GpioSpec {
        chip: Some(chip.dev.clone()),
        bias: BiasSetting::AsIs,
        ..spec(line)
    }
}

#[tokio::test]
async fn a_gpio_sim_line_pulled_up_is_a_rising_edge() {
    if !Path::new(GPIO_SIM).is_dir() {
        skip("gpio-sim not available (no /sys/kernel/config/gpio-sim)");
        return;
    }
    let chip = SimChip::new().expect("a gpio-sim chip (needs root)");
    let (ctx, mut rx) = context();

    // A line that does not exist, by offset and by name, fails the build.
    let Err(e) = GpioSource::build(parts(sim_spec(&chip, LineId::Offset(8))), &ctx) else {
        panic!("line 8 of 8 must fail");
    };
    assert!(e.to_string().contains("line: 8 does not exist"), "{e}");
    let missing = LineId::Name("NO_SUCH_LINE".into());
    let Err(e) = GpioSource::build(parts(sim_spec(&chip, missing)), &ctx) else {
        panic!("an unknown name must fail");
    };
    assert!(
        e.to_string().contains("line: no line named `NO_SUCH_LINE`"),
        "{e}"
    );

    // The line by name; a second request of it finds it busy.
    let named = sim_spec(&chip, LineId::Name("EDGEFN_BTN".into()));
    let source = GpioSource::build(parts(named.clone()), &ctx).expect("requested");
    let Err(e) = GpioSource::build(parts(named), &ctx) else {
        panic!("a busy line must fail");
    };
    assert!(e.to_string().contains("cannot request line 3"), "{e}");

    let task = tokio::spawn(source.read(ctx.clone()));
    chip.pull(3, true).expect("pull up");
    let event = next_event(&mut rx).await;
    let payload = json(&event);
    assert_eq!(
        (&payload["line"], &payload["value"], &payload["edge"]),
        (
            &serde_json::json!("EDGEFN_BTN"),
            &serde_json::json!(1),
            &serde_json::json!("rising")
        )
    );
    assert!(payload["timestamp_ns"].as_u64().is_some_and(|t| t > 0));
    chip.pull(3, false).expect("pull down");
    let event = next_event(&mut rx).await;
    assert_eq!(json(&event)["edge"], "falling");
    ctx.cancel.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops")
        .expect("no panic");
}

/// The value a `gpio-sim` line is driven at by its consumer.
fn driven(chip: &SimChip, offset: u32) -> String {
    fs::read_to_string(chip.sysfs.join(format!("sim_gpio{offset}")).join("value"))
        .expect("the simulated line's value")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn a_gpio_sim_output_starts_at_initial_takes_writes_and_stops_at_safe() {
    use crate::sources::gpio_output::config::GpioOutputSpec;
    use crate::sources::gpio_output::{GpioOutput, OutputParts, marker_path};

    if !Path::new(GPIO_SIM).is_dir() {
        skip("gpio-sim not available (no /sys/kernel/config/gpio-sim)");
        return;
    }
    let chip = SimChip::new().expect("a gpio-sim chip (needs root)");
    let (ctx, _rx) = context();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let stats = Arc::new(SourceStats::default());
    let (tx, writes) = mpsc::channel(8);
    let parts = OutputParts {
        spec: GpioOutputSpec {
            name: "relay".into(),
            chip: Some(chip.dev.clone()),
            line: LineId::Offset(5),
            active_low: false,
            initial: true,
            safe: false,
        },
        stats: stats.clone(),
        marker: marker_path(dir.path(), "relay"),
        writes,
    };
    let output = GpioOutput::build(parts, &ctx).expect("requested");
    assert_eq!(driven(&chip, 5), "1", "initial");
    let task = tokio::spawn(output.serve(ctx.cancel.clone()));
    tx.send(false).await.expect("queued");
    let written = async {
        while stats.written.load(Ordering::Relaxed) < 1 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, written).await.expect("written");
    assert_eq!(driven(&chip, 5), "0");
    tx.send(true).await.expect("queued");
    let written = async {
        while stats.written.load(Ordering::Relaxed) < 2 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(WAIT, written).await.expect("written");
    assert_eq!(driven(&chip, 5), "1");
    ctx.cancel.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .expect("stops")
        .expect("no panic");
    assert!(!marker_path(dir.path(), "relay").exists());
}

/// The built `misbehave` test guest (`cargo xtask functions`).
fn misbehave_guest() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("wasm32-wasip2/guest/misbehave.wasm")
}

/// End to end on a `gpio-sim` chip, through a whole gateway: a button's
/// rising edge runs a function that sets the relay; stopping the gateway
/// sets the relay's safe value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_sets_an_output_after_an_input_edge() {
    if !Path::new(GPIO_SIM).is_dir() {
        skip("gpio-sim not available (no /sys/kernel/config/gpio-sim)");
        return;
    }
    let chip = SimChip::new().expect("a gpio-sim chip (needs root)");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let dev = chip.dev.display();
    let text = format!(
        "[gateway]\nid = \"gw-gpio-sim\"\ndata_dir = \"data\"\n\n\
         [broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[functions]]\nname = \"press\"\ncomponent = {:?}\ntriggers = [\"buttons/#\"]\n\
         publish = [\"allowed/#\"]\ngpio = [\"relay\"]\nconfig = {{ mode = \"gpio-set\", line = \"relay\" }}\n\n\
         [[sources]]\nkind = \"gpio\"\nname = \"button\"\nchip = \"{dev}\"\nline = 3\nedge = \"rising\"\ntopic = \"buttons/door\"\n\n\
         [[sources]]\nkind = \"gpio_output\"\nname = \"relay\"\nchip = \"{dev}\"\nline = 5\n",
        misbehave_guest().display().to_string()
    );
    let path = dir.path().join("edgefn.toml");
    fs::write(&path, text).expect("config written");
    let config = crate::config::load(&path).expect("a valid config");
    let gw = crate::supervisor::Gateway::start(&config)
        .await
        .expect("the gateway starts");
    assert_eq!(driven(&chip, 5), "0", "initial");
    chip.pull(3, true).expect("pull up");
    let set = async {
        while driven(&chip, 5) != "1" {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(WAIT, set)
        .await
        .expect("the relay is set after the edge");
    assert!(gw.shutdown(WAIT).await);
    assert_eq!(driven(&chip, 5), "0", "safe after a clean stop");
}
