//! The WASI side of the sandbox: what a guest's standard library gets.
//!
//! - **A context that grants nothing**: no preopened directories, no
//!   environment, no network, an empty stdin. stdout and stderr go to a
//!   bounded in-memory [`Capture`]; after each call the runtime turns them
//!   into the function's log (under its log budget) and reads a panic
//!   message from stderr.
//! - **Deadlines cover waits.** Epoch interruption stops running Wasm only:
//!   a guest waiting inside `wasi:io/poll` (`std::thread::sleep`, a clock
//!   subscription, any pollable) is outside it, and a 5 s sleep under a 50 ms
//!   limit used to run for 5 s. [`bound_waits`] replaces the linker's `poll`
//!   and `pollable.block` with versions bounded by the invocation's deadline:
//!   when it passes, the call traps with [`Trap::Interrupt`], which the
//!   runtime reports as `timeout`.
//! - The other blocking WASI calls (`blocking-read`,
//!   `blocking-write-and-flush`, `blocking-flush`, `blocking-splice`) cannot
//!   wait here: the only streams a guest can get are the empty stdin and the
//!   in-memory stdout/stderr, which are always ready, and sockets cannot
//!   connect (no network is granted), so no other stream exists.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use wasmtime::component::{Linker, Resource};
use wasmtime::{StoreContextMut, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{DynPollable, OutputStream, Pollable, StreamResult};
use wasmtime_wasi::runtime::in_tokio;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};
use wasmtime_wasi_io::bindings::wasi::io::poll::{Host as _, HostPollable as _};

use crate::runtime::HostState;

/// The `wasi:io/poll` version wasmtime-wasi 48 defines; guests importing any
/// `0.2.x` link to it.
const WASI_POLL: &str = "wasi:io/poll@0.2.12";

/// Bytes kept from the end of a stream whatever came before: enough for a
/// panic message, which is the last thing a panicking guest writes.
const TAIL_BYTES: usize = 4096;

/// A guest's stdout or stderr: the first `cap` bytes of each invocation, the
/// last [`TAIL_BYTES`], and a count of everything written. Writing never
/// fails and never blocks; what does not fit is counted and dropped.
#[derive(Clone, Default)]
pub struct Capture(Arc<Mutex<Captured>>);

/// What a [`Capture`] holds.
#[derive(Debug, Default)]
pub struct Captured {
    /// The first bytes written, at most the capture's cap.
    pub head: Vec<u8>,
    /// The last bytes written (up to [`TAIL_BYTES`]).
    pub tail: VecDeque<u8>,
    /// Every byte written, kept or not.
    pub total: usize,
    /// Line ends written, kept or not.
    pub newlines: usize,
    cap: usize,
}

impl Capture {
    /// A capture that keeps at most `cap` bytes from the start.
    pub fn new(cap: usize) -> Self {
        Self(Arc::new(Mutex::new(Captured {
            cap,
            ..Captured::default()
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Captured> {
        // Only plain byte copies happen under the lock.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes what was written since the last call and starts over.
    pub fn take(&self) -> Captured {
        let mut c = self.lock();
        if c.total == 0 {
            return Captured::default();
        }
        let cap = c.cap;
        std::mem::replace(
            &mut *c,
            Captured {
                cap,
                ..Captured::default()
            },
        )
    }

    fn write(&self, bytes: &[u8]) {
        let mut c = self.lock();
        c.total = c.total.saturating_add(bytes.len());
        let newlines = bytes.iter().filter(|&&b| b == b'\n').count();
        c.newlines = c.newlines.saturating_add(newlines);
        let room = c.cap.saturating_sub(c.head.len());
        let keep = bytes.len().min(room);
        c.head.extend_from_slice(&bytes[..keep]);
        let from = bytes.len().saturating_sub(TAIL_BYTES);
        c.tail.extend(&bytes[from..]);
        let excess = c.tail.len().saturating_sub(TAIL_BYTES);
        c.tail.drain(..excess);
    }
}

impl Captured {
    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The guest's panic message (`panicked at src/lib.rs:12:5: boom`), if
    /// the stream holds one: Rust's panic hook writes it to stderr just
    /// before the abort that reaches the host as a bare `unreachable` trap.
    pub fn panic_message(&self) -> Option<String> {
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        find_panic(&tail).or_else(|| find_panic(&self.head))
    }
}

/// `panicked at <location>:\n<message>\nnote: …` → `panicked at
/// <location>: <message>`.
fn find_panic(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let at = text.rfind("panicked at ")?;
    let rest = &text[at + "panicked at ".len()..];
    let (location, message) = rest.split_once('\n').unwrap_or((rest, ""));
    let message: Vec<&str> = message
        .lines()
        .take_while(|l| !l.starts_with("note: run with `RUST_BACKTRACE"))
        .map(str::trim_end)
        .collect();
    let location = location.trim_end().trim_end_matches(':');
    Some(format!(
        "panicked at {location}: {}",
        message.join(" ").trim()
    ))
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        Capture::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Capture::write(&self, buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A WASI context that grants nothing, with stdout and stderr captured.
pub fn context(stdout: &Capture, stderr: &Capture) -> WasiCtx {
    WasiCtxBuilder::new()
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .build()
}

/// When the current invocation must be over.
#[derive(Debug, Default)]
pub struct Deadline {
    at: Option<Instant>,
    /// Set when a wait was cut short by the deadline: the invocation timed
    /// out, whatever the guest returns afterwards.
    pub hit: bool,
}

impl Deadline {
    /// Arms the deadline for a new invocation.
    pub fn arm(&mut self, at: Instant) {
        self.at = Some(at);
        self.hit = false;
    }

    /// Time left, or the trap that ends the invocation when none is.
    fn remaining(&mut self) -> wasmtime::Result<std::time::Duration> {
        let left = self.at.map_or(std::time::Duration::MAX, |at| {
            at.saturating_duration_since(Instant::now())
        });
        if left.is_zero() {
            return Err(self.passed());
        }
        Ok(left)
    }

    fn passed(&mut self) -> wasmtime::Error {
        self.hit = true;
        wasmtime::Error::from(Trap::Interrupt)
    }
}

/// Replaces `wasi:io/poll`'s `poll` and `pollable.block` (linked by
/// `wasmtime_wasi::p2::add_to_linker_sync`) with versions that wait at most
/// until the invocation's deadline, then trap.
pub fn bound_waits(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut poll = linker.instance(WASI_POLL)?;
    poll.func_wrap(
        "poll",
        |mut cx: StoreContextMut<'_, HostState>, (list,): (Vec<Resource<DynPollable>>,)| {
            let (table, deadline) = cx.data_mut().wait_parts();
            let left = deadline.remaining()?;
            match in_tokio(tokio::time::timeout(left, table.poll(list))) {
                Ok(ready) => Ok((ready?,)),
                Err(_) => Err(deadline.passed()),
            }
        },
    )?;
    poll.func_wrap(
        "[method]pollable.block",
        |mut cx: StoreContextMut<'_, HostState>, (pollable,): (Resource<DynPollable>,)| {
            let (table, deadline) = cx.data_mut().wait_parts();
            let left = deadline.remaining()?;
            match in_tokio(tokio::time::timeout(left, table.block(pollable))) {
                Ok(done) => done,
                Err(_) => Err(deadline.passed()),
            }
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_head_and_tail_and_counts_everything() {
        let c = Capture::new(8);
        c.write(b"0123456789");
        c.write(&vec![b'x'; 10_000]);
        c.write(b"the end");
        let got = c.take();
        assert_eq!(got.head, b"01234567");
        assert_eq!(got.total, 10_017);
        assert_eq!(got.tail.len(), TAIL_BYTES);
        assert!(
            got.tail
                .iter()
                .copied()
                .collect::<Vec<_>>()
                .ends_with(b"the end")
        );
        assert!(c.take().is_empty(), "take starts over");
    }

    #[test]
    fn panic_message_from_rusts_hook() {
        let c = Capture::new(1024);
        for piece in [
            "\nthread '<unnamed>' panicked at ",
            "src/lib.rs:12:5",
            ":\n",
            "boom\n",
            "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n",
        ] {
            c.write(piece.as_bytes());
        }
        assert_eq!(
            c.take().panic_message().as_deref(),
            Some("panicked at src/lib.rs:12:5: boom")
        );
        c.write(b"plain output\n");
        assert_eq!(c.take().panic_message(), None);
    }
}
