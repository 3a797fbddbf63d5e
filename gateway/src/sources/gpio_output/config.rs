//! The `[[sources]]` table of `kind = "gpio_output"` as written, its
//! validation, and the validated [`GpioOutputSpec`].

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::Scope;
use crate::sources::gpio::config::{LineId, chip_and_line};

/// `[[sources]]` with `kind = "gpio_output"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioOutputConfig {
    /// Unique name: the name functions set it by (`gpio = ["relay"]`), and
    /// in logs, metrics and the line's consumer label.
    pub name: String,
    /// The GPIO chip: a name (`gpiochip0`, meaning `/dev/gpiochip0`) or a
    /// path. Default `gpiochip0` for a line number; for a line name, every
    /// chip is searched unless a chip is given.
    #[serde(default)]
    pub chip: Option<String>,
    /// The line: its offset on the chip (`27`) or its name (`"GPIO27"`, as
    /// `gpioinfo` lists it).
    pub line: LineId,
    /// Inverts the line: `true` (active) drives it low, for boards whose
    /// relays switch on a low input.
    #[serde(default)]
    pub active_low: bool,
    /// The value set when the gateway starts (default `false`, inactive).
    #[serde(default)]
    pub initial: bool,
    /// The value set when the gateway stops, and at start instead of
    /// `initial` after a crash (default `false`: a motor off, a valve
    /// closed).
    #[serde(default)]
    pub safe: bool,
}

/// A validated GPIO output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpioOutputSpec {
    /// Unique name.
    pub name: String,
    /// The chip's device path; `None`: a named line on any chip.
    pub chip: Option<PathBuf>,
    /// The line as configured.
    pub line: LineId,
    /// Whether low is active.
    pub active_low: bool,
    /// Value at a clean start.
    pub initial: bool,
    /// Value at a stop, and at start after a crash.
    pub safe: bool,
}

/// Checks the keys of `c`.
pub(super) fn validate(c: &GpioOutputConfig, scope: &mut Scope<'_, '_>) -> Option<GpioOutputSpec> {
    let chip = chip_and_line(c.chip.as_deref(), &c.line, scope)?;
    Some(GpioOutputSpec {
        name: c.name.clone(),
        chip,
        line: c.line.clone(),
        active_low: c.active_low,
        initial: c.initial,
        safe: c.safe,
    })
}
