//! GPIO access behind a small trait: [`Lines`] requests the configured line
//! as an input with edge detection and hands back an [`EdgeStream`]. The
//! gateway uses [`Cdev`], the Linux GPIO character device through gpiocdev
//! (uAPI v2); the tests use a fake chip.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

use gpiocdev::line::{Bias, EdgeDetection, EdgeKind};
use gpiocdev::{Chip, Request};
use tokio::io::unix::AsyncFd;

use super::config::{BiasSetting, EdgeSelect, GpioSpec, LineId};

/// One edge of the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edge {
    /// Inactive → active (`true`) or active → inactive.
    pub rising: bool,
    /// The kernel's timestamp of the edge (CLOCK_MONOTONIC), in
    /// nanoseconds.
    pub timestamp_ns: u64,
}

/// A requested line: where it is, and its edges.
pub struct Requested<S> {
    /// The chip's device path.
    pub chip: PathBuf,
    /// The line's offset on it.
    pub offset: u32,
    /// Its edges.
    pub edges: S,
}

/// Requests lines.
pub trait Lines: Send + Sync + 'static {
    /// The edges of a requested line.
    type Stream: EdgeStream;
    /// Finds the line of `spec` and requests it as an input with edge
    /// detection, debounce and bias.
    fn request(&self, spec: &GpioSpec) -> Result<Requested<Self::Stream>, GpioError>;
}

/// The edges of a requested line; dropping it releases the line.
pub trait EdgeStream: Send + 'static {
    /// Waits for the next edge.
    fn next_edge(&mut self) -> impl Future<Output = io::Result<Edge>> + Send;
}

/// Why a line could not be requested. Each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum GpioError {
    /// The chip cannot be opened.
    #[error("chip: cannot open {}", chip.display())]
    Chip {
        /// Its path.
        chip: PathBuf,
        /// Why.
        #[source]
        source: gpiocdev::Error,
    },
    /// An offset past the chip's last line.
    #[error("line: {offset} does not exist on {} (it has lines 0 to {})", chip.display(), lines.saturating_sub(1))]
    NoOffset {
        /// The chip's path.
        chip: PathBuf,
        /// The offset asked for.
        offset: u32,
        /// How many lines the chip has.
        lines: u32,
    },
    /// No line has that name.
    #[error("line: no line named `{name}` on {where_} (`gpioinfo` lists the names)")]
    NoName {
        /// The name asked for.
        name: String,
        /// The chip searched, or "any GPIO chip".
        where_: String,
    },
    /// The kernel refused the request (busy, no permission, an option the
    /// chip does not support).
    #[error("line: cannot request line {offset} of {} as an input", chip.display())]
    Request {
        /// The chip's path.
        chip: PathBuf,
        /// The line's offset.
        offset: u32,
        /// Why.
        #[source]
        source: gpiocdev::Error,
    },
    /// The kernel refused the request of an output (`gpio_output`).
    #[error("line: cannot request line {offset} of {} as an output", chip.display())]
    RequestOutput {
        /// The chip's path.
        chip: PathBuf,
        /// The line's offset.
        offset: u32,
        /// Why.
        #[source]
        source: gpiocdev::Error,
    },
}

/// The Linux GPIO character device (`/dev/gpiochipN`).
pub struct Cdev;

impl Lines for Cdev {
    type Stream = CdevEdges;

    fn request(&self, spec: &GpioSpec) -> Result<Requested<CdevEdges>, GpioError> {
        let (chip, offset) = locate(spec.chip.as_deref(), &spec.line)?;
        let mut builder = Request::builder();
        builder
            .on_chip(&chip)
            .with_consumer(format!("edgefn:{}", spec.name))
            .with_line(offset)
            .as_input()
            .with_edge_detection(match spec.edge {
                EdgeSelect::Rising => EdgeDetection::RisingEdge,
                EdgeSelect::Falling => EdgeDetection::FallingEdge,
                EdgeSelect::Both => EdgeDetection::BothEdges,
            })
            .with_bias(match spec.bias {
                BiasSetting::PullUp => Some(Bias::PullUp),
                BiasSetting::PullDown => Some(Bias::PullDown),
                BiasSetting::Disabled => Some(Bias::Disabled),
                BiasSetting::AsIs => None,
            });
        if !spec.debounce.is_zero() {
            builder.with_debounce_period(spec.debounce);
        }
        if spec.active_low {
            builder.as_active_low();
        }
        let request = builder.request().map_err(|source| GpioError::Request {
            chip: chip.clone(),
            offset,
            source,
        })?;
        // The safe constructor is deprecated because an `AsyncFd` cannot
        // tell when a borrowed fd is closed under it; here it owns the
        // request, which owns its fd until the `AsyncFd` drops it. (The
        // replacement, `register`, is `unsafe` for the same promise.)
        #[allow(deprecated, reason = "the AsyncFd owns the request and so its fd")]
        let fd = AsyncFd::new(request).map_err(|e| GpioError::Request {
            chip: chip.clone(),
            offset,
            source: e.into(),
        })?;
        Ok(Requested {
            chip,
            offset,
            edges: CdevEdges(fd),
        })
    }
}

/// The chip and offset of `line`.
pub(crate) fn locate(chip: Option<&Path>, line: &LineId) -> Result<(PathBuf, u32), GpioError> {
    let path = match (chip, line) {
        (Some(path), _) => path,
        (None, LineId::Offset(_)) => Path::new("/dev/gpiochip0"),
        // A named line on whichever chip has it.
        (None, LineId::Name(name)) => {
            return gpiocdev::find_named_line(name)
                .map(|found| (found.chip, found.info.offset))
                .ok_or_else(|| GpioError::NoName {
                    name: name.clone(),
                    where_: "any GPIO chip".into(),
                });
        }
    };
    let opened = Chip::from_path(path).map_err(|source| GpioError::Chip {
        chip: path.to_owned(),
        source,
    })?;
    // The chip's canonical path (a symlink resolved).
    let chip = opened.path().to_owned();
    match line {
        LineId::Offset(offset) => {
            let info = opened.info().map_err(|source| GpioError::Chip {
                chip: chip.clone(),
                source,
            })?;
            if *offset >= info.num_lines {
                return Err(GpioError::NoOffset {
                    chip,
                    offset: *offset,
                    lines: info.num_lines,
                });
            }
            Ok((chip, *offset))
        }
        LineId::Name(name) => match opened.find_line_info(name) {
            Some(info) => Ok((chip, info.offset)),
            None => Err(GpioError::NoName {
                name: name.clone(),
                where_: chip.display().to_string(),
            }),
        },
    }
}

/// A requested line's edges, read when its fd is readable.
pub struct CdevEdges(AsyncFd<Request>);

impl EdgeStream for CdevEdges {
    async fn next_edge(&mut self) -> io::Result<Edge> {
        loop {
            let mut guard = self.0.readable().await?;
            let request = self.0.get_ref();
            if !request.has_edge_event().map_err(io::Error::other)? {
                guard.clear_ready();
                continue;
            }
            let event = request.read_edge_event().map_err(io::Error::other)?;
            if !request.has_edge_event().map_err(io::Error::other)? {
                guard.clear_ready();
            }
            return Ok(Edge {
                rising: event.kind == EdgeKind::Rising,
                timestamp_ns: event.timestamp_ns,
            });
        }
    }
}
