//! The `[[sources]]` table of `kind = "gpio"` as written, its validation, and
//! the validated [`GpioSpec`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Scope;

/// The longest debounce period accepted, in milliseconds: longer than any
/// contact bounce, short enough not to swallow real presses.
pub const MAX_DEBOUNCE_MS: u64 = 1000;

/// `[[sources]]` with `kind = "gpio"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioSourceConfig {
    /// Unique name (in logs, metrics and the line's consumer label).
    pub name: String,
    /// The GPIO chip: a name (`gpiochip0`, meaning `/dev/gpiochip0`) or a
    /// path. Default `gpiochip0` for a line number; for a line name, every
    /// chip is searched unless a chip is given.
    #[serde(default)]
    pub chip: Option<String>,
    /// The line: its offset on the chip (`17`) or its name (`"GPIO17"`, as
    /// `gpioinfo` lists it).
    pub line: LineId,
    /// Which edges are events: `rising`, `falling` or `both` (default).
    #[serde(default)]
    pub edge: EdgeSelect,
    /// Debounce period in milliseconds, applied by the kernel (0, the
    /// default, turns it off; at most 1000).
    #[serde(default)]
    pub debounce_ms: u64,
    /// The line's pull resistor: `pull_up`, `pull_down`, `disabled` or
    /// `as_is` (default: left as the firmware or device tree set it).
    #[serde(default)]
    pub bias: BiasSetting,
    /// Inverts the line: low is 1 and a press to ground is a rising edge.
    #[serde(default)]
    pub active_low: bool,
    /// Topic of the events (one per edge).
    pub topic: String,
    /// Also publish each edge's event on this local MQTT topic (a plain
    /// GPIO → MQTT bridge without a function). Must not match a function's
    /// triggers.
    #[serde(default)]
    pub mirror_topic: Option<String>,
}

/// A line by offset or by name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(
    untagged,
    expecting = "a line number (e.g. 17) or a line name (e.g. \"GPIO17\")"
)]
pub enum LineId {
    /// The line's offset on its chip.
    Offset(u32),
    /// The line's name, as the kernel reports it.
    Name(String),
}

impl fmt::Display for LineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Offset(n) => write!(f, "{n}"),
            Self::Name(name) => write!(f, "`{name}`"),
        }
    }
}

/// Which edges become events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EdgeSelect {
    /// Inactive → active.
    Rising,
    /// Active → inactive.
    Falling,
    /// Both.
    #[default]
    Both,
}

/// The line's bias (pull resistor).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BiasSetting {
    /// Pull up to the supply (a button to ground).
    PullUp,
    /// Pull down to ground (a button to the supply).
    PullDown,
    /// No pull resistor: the line floats unless driven.
    Disabled,
    /// Leave the bias as it is.
    #[default]
    AsIs,
}

/// A validated GPIO source.
#[derive(Debug, Clone, PartialEq)]
pub struct GpioSpec {
    /// Unique name.
    pub name: String,
    /// The chip's device path; `None`: a named line on any chip.
    pub chip: Option<PathBuf>,
    /// The line as configured.
    pub line: LineId,
    /// Which edges are events.
    pub edge: EdgeSelect,
    /// Kernel debounce period (zero: off).
    pub debounce: Duration,
    /// Pull resistor.
    pub bias: BiasSetting,
    /// Whether low is active.
    pub active_low: bool,
    /// Event topic.
    pub topic: String,
    /// Optional local MQTT mirror topic.
    pub mirror_topic: Option<String>,
}

/// Checks the GPIO keys of `c`.
pub(super) fn validate(c: &GpioSourceConfig, scope: &mut Scope<'_, '_>) -> Option<GpioSpec> {
    let chip = chip_and_line(c.chip.as_deref(), &c.line, scope)?;
    if c.debounce_ms > MAX_DEBOUNCE_MS {
        scope.add(
            "debounce_ms",
            format!("must be between 0 (off) and {MAX_DEBOUNCE_MS}"),
        );
    }
    Some(GpioSpec {
        name: c.name.clone(),
        chip,
        line: c.line.clone(),
        edge: c.edge,
        debounce: Duration::from_millis(c.debounce_ms),
        bias: c.bias,
        active_low: c.active_low,
        topic: c.topic.clone(),
        mirror_topic: c.mirror_topic.clone(),
    })
}

/// The chip of `line` (`None`: a named line, searched on every chip), and
/// the checks of `chip` and `line` both GPIO kinds share.
pub(crate) fn chip_and_line(
    chip: Option<&str>,
    line: &LineId,
    scope: &mut Scope<'_, '_>,
) -> Option<Option<PathBuf>> {
    let chip = match (chip, line) {
        (Some(chip), _) => Some(chip_path(chip, scope)?),
        (None, LineId::Offset(_)) => Some(PathBuf::from("/dev/gpiochip0")),
        (None, LineId::Name(_)) => None,
    };
    if let LineId::Name(name) = line
        && name.trim().is_empty()
    {
        scope.add("line", "must be a line number or a non-empty line name");
    }
    Some(chip)
}

/// `gpiochip0` → `/dev/gpiochip0`; a path stays as it is.
pub(crate) fn chip_path(chip: &str, scope: &mut Scope<'_, '_>) -> Option<PathBuf> {
    if chip.starts_with('/') {
        return Some(PathBuf::from(chip));
    }
    if chip.is_empty() || chip.contains('/') || chip.chars().any(char::is_whitespace) {
        scope.add(
            "chip",
            format!("`{chip}`: give a chip name like `gpiochip0` or a path like `/dev/gpiochip0`"),
        );
        return None;
    }
    Some(PathBuf::from("/dev").join(chip))
}
