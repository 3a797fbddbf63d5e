//! The connection under a Modbus source: its own TCP connection, or its
//! share of an RS-485 bus. Sources naming the same serial `path` share one
//! open port through a process-wide registry; a fair lock makes them take
//! turns, so two units are never asked at once.
//!
//! Each call is bounded by the source's `timeout_ms`. The bytes that arrive
//! are counted, so a call that timed out can be told apart: nothing came
//! (the device is silent) or something came that never decoded (a bad CRC
//! or a garbled frame: tokio-modbus skips such bytes and waits on).

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_modbus::client::{Context, Reader, Writer};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_serial::SerialPortBuilderExt;

use super::config::{Table, Transport};
use super::registers::{Answer, Read};
use crate::output::{ModbusValues, ModbusWrite};
use crate::sources::SourceStats;
use crate::sources::serial::config::Line;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The device answered with a Modbus exception.
    #[error("exception from the device: {0}")]
    Exception(ExceptionCode),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// An answer came that did not decode: a CRC error, a garbled or
    /// mismatched frame.
    #[error("invalid answer: {0}")]
    Invalid(String),
    /// The connection failed (and is dropped: the next poll reconnects).
    #[error("connection failed")]
    Transport(#[source] io::Error),
}

/// A connection, opened on first use and after a failure.
pub struct Link {
    transport: Transport,
    unit: u8,
    timeout: Duration,
    /// The connection: the source's own (TCP) or its serial bus's.
    bus: Arc<Bus>,
    /// Counts the connections made (`opened`).
    stats: Arc<SourceStats>,
}

/// An open Modbus context with the counter of bytes read through it.
struct Connected {
    ctx: Context,
    received: Arc<AtomicU64>,
}

/// One connection, shared by the sources on a serial port; a TCP source
/// has one of its own.
pub struct Bus {
    line: Option<Line>,
    port: tokio::sync::Mutex<Option<Connected>>,
}

impl Bus {
    fn new(line: Option<Line>) -> Arc<Self> {
        Arc::new(Self {
            line,
            port: tokio::sync::Mutex::new(None),
        })
    }
}

/// The buses open in this process, by path.
static BUSES: LazyLock<Mutex<HashMap<PathBuf, Weak<Bus>>>> = LazyLock::new(Default::default);

/// The bus at `path`, shared with every other live source on it.
fn bus(path: &PathBuf, line: Line) -> Arc<Bus> {
    let mut buses = BUSES.lock().unwrap_or_else(|p| p.into_inner());
    buses.retain(|_, b| b.strong_count() > 0);
    if let Some(bus) = buses.get(path).and_then(Weak::upgrade)
        && bus.line == Some(line)
    {
        return bus;
    }
    // Different settings for the same port are refused by the config check;
    // a reload that changes them gets a bus of its own once the old sources
    // are gone (until then the port is locked and opening fails, retried).
    let bus = Bus::new(Some(line));
    buses.insert(path.clone(), Arc::downgrade(&bus));
    bus
}

type Slot<'a> = tokio::sync::MutexGuard<'a, Option<Connected>>;

impl Link {
    /// A link for the device of `transport`, not yet connected.
    pub fn new(
        transport: &Transport,
        unit: u8,
        timeout: Duration,
        stats: Arc<SourceStats>,
    ) -> Self {
        let bus = match transport {
            Transport::Tcp { .. } => Bus::new(None),
            Transport::Rtu { path, line } => bus(path, *line),
        };
        Self {
            transport: transport.clone(),
            unit,
            timeout,
            bus,
            stats,
        }
    }

    /// The connection, held until the guard drops (other units on the bus
    /// wait their turn), opened first if need be.
    async fn session(&self) -> Result<Slot<'_>, CallError> {
        let mut slot = self.bus.port.lock().await;
        if slot.is_none() {
            *slot = Some(open(&self.transport, self.unit, self.timeout).await?);
            self.stats.opened.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(conn) = slot.as_mut() {
            conn.ctx.set_slave(Slave(self.unit));
        }
        Ok(slot)
    }

    /// After a failed request: a broken connection (or, over TCP, one whose
    /// answers may now arrive late and out of step) is opened afresh.
    fn after(&self, e: &CallError, slot: &mut Slot<'_>) {
        let tcp = matches!(self.transport, Transport::Tcp { .. });
        if matches!(e, CallError::Transport(_)) || (tcp && !matches!(e, CallError::Exception(_))) {
            **slot = None;
        }
    }

    /// Runs `reads` in turn (holding the bus for all of them), handing each
    /// answer to `each`. Stops at the first failure: a device that does not
    /// answer one request would make the rest wait out their timeouts too.
    pub async fn poll(
        &self,
        reads: &[Read],
        mut each: impl FnMut(&Read, Answer) -> Result<(), String>,
    ) -> Result<(), CallError> {
        let mut slot = self.session().await?;
        for read in reads {
            let result = match slot.as_mut() {
                Some(conn) => match call(conn, read, self.timeout).await {
                    Ok(answer) => each(read, answer).map_err(CallError::Invalid),
                    Err(e) => Err(e),
                },
                None => Err(CallError::Transport(io::ErrorKind::NotConnected.into())),
            };
            if let Err(e) = result {
                self.after(&e, &mut slot);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Writes what a function asked for, within the timeout.
    pub async fn write(&self, w: &ModbusWrite) -> Result<(), CallError> {
        let mut slot = self.session().await?;
        let Some(conn) = slot.as_mut() else {
            return Err(CallError::Transport(io::ErrorKind::NotConnected.into()));
        };
        let before = conn.received.load(Ordering::Relaxed);
        let ctx = &mut conn.ctx;
        let done = tokio::time::timeout(self.timeout, async move {
            match &w.values {
                ModbusValues::Registers(v) => ctx.write_multiple_registers(w.address, v).await,
                ModbusValues::Coils(v) => ctx.write_multiple_coils(w.address, v).await,
            }
        })
        .await;
        let result = classify(done, conn, before, self.timeout);
        if let Err(e) = &result {
            self.after(e, &mut slot);
        }
        result
    }
}

/// Connects (TCP) or opens the port (RTU), within `timeout` for TCP.
async fn open(transport: &Transport, unit: u8, timeout: Duration) -> Result<Connected, CallError> {
    let received = Arc::new(AtomicU64::new(0));
    let ctx = match transport {
        Transport::Tcp { host, port } => {
            let stream = tokio::time::timeout(
                timeout,
                tokio::net::TcpStream::connect((host.as_str(), *port)),
            )
            .await
            .map_err(|_| CallError::Timeout(timeout))?
            .map_err(CallError::Transport)?;
            // Requests are small and answered one at a time.
            stream.set_nodelay(true).map_err(CallError::Transport)?;
            let counted = Counted {
                inner: stream,
                received: received.clone(),
            };
            tokio_modbus::client::tcp::attach_slave(counted, Slave(unit))
        }
        Transport::Rtu { path, line } => {
            let port = line
                .builder(&path.display().to_string())
                .open_native_async()
                .map_err(|e| CallError::Transport(io::Error::other(e)))?;
            let counted = Counted {
                inner: port,
                received: received.clone(),
            };
            tokio_modbus::client::rtu::attach_slave(counted, Slave(unit))
        }
    };
    Ok(Connected { ctx, received })
}

/// One request, classified.
async fn call(conn: &mut Connected, read: &Read, timeout: Duration) -> Result<Answer, CallError> {
    let before = conn.received.load(Ordering::Relaxed);
    let ctx = &mut conn.ctx;
    let (start, count) = (read.start, read.count);
    let answer = tokio::time::timeout(timeout, async move {
        Ok::<_, tokio_modbus::Error>(match read.table {
            Table::Holding => ctx
                .read_holding_registers(start, count)
                .await?
                .map(Answer::Words),
            Table::Input => ctx
                .read_input_registers(start, count)
                .await?
                .map(Answer::Words),
            Table::Coil => ctx.read_coils(start, count).await?.map(Answer::Bits),
            Table::Discrete => ctx
                .read_discrete_inputs(start, count)
                .await?
                .map(Answer::Bits),
        })
    })
    .await;
    classify(answer, conn, before, timeout)
}

/// What came of a request that was given `timeout`.
fn classify<T>(
    done: Result<tokio_modbus::Result<T>, tokio::time::error::Elapsed>,
    conn: &Connected,
    before: u64,
    timeout: Duration,
) -> Result<T, CallError> {
    match done {
        Ok(Ok(Ok(answer))) => Ok(answer),
        Ok(Ok(Err(code))) => Err(CallError::Exception(code)),
        Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(CallError::Invalid(e.to_string())),
        Ok(Err(tokio_modbus::Error::Transport(e))) if e.kind() == io::ErrorKind::InvalidData => {
            Err(CallError::Invalid(e.to_string()))
        }
        Ok(Err(tokio_modbus::Error::Transport(e))) => Err(CallError::Transport(e)),
        Err(_) if conn.received.load(Ordering::Relaxed) != before => Err(CallError::Invalid(
            "bytes arrived but never formed a valid frame (bad CRC or garbled)".into(),
        )),
        Err(_) => Err(CallError::Timeout(timeout)),
    }
}

/// A transport that counts the bytes read through it.
#[derive(Debug)]
struct Counted<T> {
    inner: T,
    received: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
