//! Modbus sources against real peers: a tokio-modbus TCP server in the test
//! process, and a simulated RTU bus with two units on a kernel
//! pseudo-terminal. Readings reach a function and MQTT; exceptions, silence
//! and bad CRCs are counted and survived; a restarted TCP server is
//! reconnected.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tokio_modbus::server::tcp::{Server, accept_tcp_connection};
use tokio_modbus::{ExceptionCode, Request, Response};

use crate::support::*;

/// A meter: input registers 0–1 hold 229.8 as an `f32`, holding register 2
/// holds 2298 (decivolts), coil 0 is on. Writes are recorded, as
/// `registers ADDRESS [VALUES]` and `coils ADDRESS [VALUES]`.
#[derive(Clone, Default)]
struct Meter {
    writes: Arc<std::sync::Mutex<Vec<String>>>,
}

impl tokio_modbus::server::Service for Meter {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Request<'static>) -> Self::Future {
        let bits = 229.8f32.to_bits();
        let words = |addr: u16, n: u16, table: &[u16]| -> Result<Vec<u16>, ExceptionCode> {
            (addr..addr + n)
                .map(|a| {
                    table
                        .get(usize::from(a))
                        .copied()
                        .ok_or(ExceptionCode::IllegalDataAddress)
                })
                .collect()
        };
        let answer = match req {
            Request::ReadInputRegisters(a, n) => {
                words(a, n, &[(bits >> 16) as u16, bits as u16]).map(Response::ReadInputRegisters)
            }
            Request::ReadHoldingRegisters(a, n) => {
                words(a, n, &[0, 0, 2298]).map(Response::ReadHoldingRegisters)
            }
            Request::ReadCoils(0, 1) => Ok(Response::ReadCoils(vec![true])),
            Request::WriteMultipleRegisters(a, words) => {
                self.record(format!("registers {a} {words:?}"));
                Ok(Response::WriteMultipleRegisters(a, words.len() as u16))
            }
            Request::WriteMultipleCoils(a, coils) => {
                self.record(format!("coils {a} {coils:?}"));
                Ok(Response::WriteMultipleCoils(a, coils.len() as u16))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        std::future::ready(answer)
    }
}

impl Meter {
    fn record(&self, write: String) {
        self.writes.lock().unwrap().push(write);
    }

    fn writes(&self) -> Vec<String> {
        self.writes.lock().unwrap().clone()
    }
}

/// Serves a [`Meter`] on `addr` until the returned task is aborted.
async fn serve(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    serve_meter(addr, Meter::default()).await
}

/// Serves `meter` on `addr` until the returned task is aborted.
async fn serve_meter(addr: SocketAddr, meter: Meter) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let server = Server::new(listener);
        let on_connected = |stream, addr| {
            let meter = meter.clone();
            async move { accept_tcp_connection(stream, addr, |_| Ok(Some(meter.clone()))) }
        };
        let _ = server.serve(&on_connected, |_| {}).await;
    })
}

const METER_REGISTERS: &str = r#"
[[sources.registers]]
name = "voltage"
table = "input"
address = 0
type = "f32"
[[sources.registers]]
name = "volts"
table = "holding"
address = 2
scale = 0.1
[[sources.registers]]
name = "relay"
table = "coil"
address = 0
"#;

fn echo_function() -> String {
    format!(
        "[[functions]]\nname = \"echo\"\ncomponent = {}\ntriggers = [\"meters/#\"]\npublish = [\"echo/#\"]\n",
        lit(&guest("misbehave"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_meter_reaches_a_function_and_is_reconnected_after_a_restart() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = serve(addr).await;
    let toml = format!(
        "{}{}[[sources]]\nkind = \"modbus\"\nname = \"meter\"\nurl = \"tcp://{addr}\"\ninterval_ms = 50\ntimeout_ms = 500\ntopic = \"meters/meter\"\nmirror_topic = \"mirror/meter\"\n{METER_REGISTERS}",
        gateway_header("gw-modbus-tcp"),
        echo_function()
    );
    let (gw, _dir) = gateway(&toml).await;
    let (host, port) = gw.local_broker();
    let mut out = Subscriber::connect(host, port, &["echo/#"]).await;
    let mut mirror = Subscriber::connect(host, port, &["mirror/#"]).await;
    let want = r#"{"relay":true,"voltage":229.8,"volts":229.8}"#;
    let (topic, payload) = out.next().await;
    assert_eq!(topic, "echo/meters/meter");
    assert_eq!(String::from_utf8_lossy(&payload), want);
    assert_eq!(mirror.next().await.1, want.as_bytes());

    // The server goes away: polls fail and are counted; it comes back on
    // the same port: the source connects again and readings flow.
    let stats = gw.source_stats("meter").unwrap().clone();
    server.abort();
    let _ = server.await;
    eventually("failed polls", || {
        stats.failures.load(Ordering::Relaxed) >= 2
    })
    .await;
    let server = serve(addr).await;
    eventually("reconnected", || stats.opened.load(Ordering::Relaxed) >= 2).await;
    let frames = stats.frames.load(Ordering::Relaxed);
    eventually("readings again", || {
        stats.frames.load(Ordering::Relaxed) > frames
    })
    .await;
    server.abort();
    assert!(gw.shutdown(WAIT).await);
}

/// How the simulated RTU bus answers.
const NORMAL: u8 = 0;
const EXCEPTION: u8 = 1;
const SILENT: u8 = 2;
const BAD_CRC: u8 = 3;

/// The CRC of Modbus RTU frames (CRC-16/MODBUS), for the simulated bus.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xffffu16;
    for b in bytes {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xa001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// An RS-485 bus with units 1 and 2 on the master side of a pty: reads
/// read requests (8 bytes) and write requests (functions 15 and 16, which
/// it records in `writes` as `unit N registers|coils ADDRESS BYTES`) and
/// answers them as `mode` says. Holding register `a` of unit `u` holds
/// `u * 100 + a`. Requests from two masters talking at once would
/// interleave and be answered out of step.
fn rtu_bus(mut master: File, mode: Arc<AtomicU8>, writes: Arc<std::sync::Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        let mut req = vec![0u8; 8];
        while master.read_exact(&mut req[..8]).is_ok() {
            let (unit, function) = (req[0], req[1]);
            let write = matches!(function, 15 | 16);
            if write {
                // The byte count is the 7th byte; the first data byte and
                // the rest, then the CRC, follow.
                let more = usize::from(req[6]) + 1;
                req.resize(8 + more, 0);
                if master.read_exact(&mut req[8..]).is_err() {
                    return;
                }
            }
            let n = req.len();
            let crc_ok = crc16(&req[..n - 2]).to_le_bytes() == req[n - 2..];
            if !crc_ok || !(1..=2).contains(&unit) {
                req.truncate(8);
                continue;
            }
            let addr = u16::from_be_bytes([req[2], req[3]]);
            let count = u16::from_be_bytes([req[4], req[5]]);
            let mut answer = vec![unit];
            match mode.load(Ordering::Relaxed) {
                SILENT => {
                    req.truncate(8);
                    continue;
                }
                EXCEPTION => answer.extend([function | 0x80, 0x02]),
                _ if write => {
                    let table = if function == 16 { "registers" } else { "coils" };
                    writes
                        .lock()
                        .unwrap()
                        .push(format!("unit {unit} {table} {addr} {:?}", &req[7..n - 2]));
                    answer.extend(&req[1..6]);
                }
                _ => {
                    answer.extend([function, (count * 2) as u8]);
                    for a in addr..addr + count {
                        answer.extend((u16::from(unit) * 100 + a).to_be_bytes());
                    }
                }
            }
            let mut crc = crc16(&answer).to_le_bytes();
            if mode.load(Ordering::Relaxed) == BAD_CRC {
                crc[0] ^= 0xff;
            }
            answer.extend(crc);
            if master.write_all(&answer).is_err() {
                return;
            }
            req.truncate(8);
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_units_share_an_rtu_bus_and_survive_exceptions_silence_and_bad_crcs() {
    let pty = nix::pty::openpty(None, None).unwrap();
    let path: PathBuf = nix::unistd::ttyname(&pty.slave).unwrap();
    let _slave: OwnedFd = pty.slave;
    let mode = Arc::new(AtomicU8::new(NORMAL));
    let writes = Arc::new(std::sync::Mutex::new(Vec::new()));
    rtu_bus(File::from(pty.master), mode.clone(), writes.clone());
    let unit = |name: &str, unit: u8| {
        format!(
            "[[sources]]\nkind = \"modbus\"\nname = \"{name}\"\npath = {}\nbaud = 19200\nunit = {unit}\ninterval_ms = 20\ntimeout_ms = 200\ntopic = \"meters/{name}\"\n[[sources.registers]]\nname = \"a\"\ntable = \"holding\"\naddress = 0\n[[sources.registers]]\nname = \"b\"\ntable = \"holding\"\naddress = 1\n",
            lit(&path)
        )
    };
    // Unit 2 is also written to, on every reading, between the polls.
    let toml = format!(
        "{}{}{}{}{}",
        gateway_header("gw-modbus-rtu"),
        echo_function(),
        writer("writer", "modbus-write", "u2:10-11", 10),
        unit("u1", 1),
        unit("u2", 2)
    );
    let (gw, _dir) = gateway(&toml).await;
    let (host, port) = gw.local_broker();
    let mut out = Subscriber::connect(host, port, &["echo/#"]).await;
    let mut got = std::collections::BTreeMap::new();
    let both = async {
        while got.len() < 2 {
            let (topic, payload) = out.next().await;
            got.insert(topic, String::from_utf8_lossy(&payload).into_owned());
        }
    };
    tokio::time::timeout(WAIT, both)
        .await
        .expect("readings of both units");
    assert_eq!(got["echo/meters/u1"], r#"{"a":100,"b":101}"#);
    assert_eq!(got["echo/meters/u2"], r#"{"a":200,"b":201}"#);

    let stats = [
        gw.source_stats("u1").unwrap().clone(),
        gw.source_stats("u2").unwrap().clone(),
    ];
    let each = |f: fn(&edgefn::sources::SourceStats) -> &AtomicU64, at_least: u64| {
        let stats = stats.clone();
        move || {
            stats
                .iter()
                .all(|s| f(s).load(Ordering::Relaxed) >= at_least)
        }
    };
    // Many polls of both units in turn, and writes between them: none
    // answered out of step.
    eventually("20 polls each", each(|s| &s.frames, 20)).await;
    eventually("writes sent", || {
        stats[1].written.load(Ordering::Relaxed) >= 4
    })
    .await;
    for s in &stats {
        assert_eq!(s.invalid.load(Ordering::Relaxed), 0, "answers out of step");
    }
    let written = writes.lock().unwrap().clone();
    assert_eq!(
        written[..2],
        ["unit 2 registers 10 [0, 7, 0, 8]", "unit 2 coils 10 [1]"]
    );
    mode.store(EXCEPTION, Ordering::Relaxed);
    eventually("exceptions counted", each(|s| &s.exceptions, 1)).await;
    mode.store(SILENT, Ordering::Relaxed);
    eventually("timeouts counted", each(|s| &s.timeouts, 1)).await;
    mode.store(BAD_CRC, Ordering::Relaxed);
    eventually("bad CRCs counted", each(|s| &s.invalid, 1)).await;
    mode.store(NORMAL, Ordering::Relaxed);
    let frames: Vec<u64> = stats
        .iter()
        .map(|s| s.frames.load(Ordering::Relaxed))
        .collect();
    eventually("readings again", || {
        stats
            .iter()
            .zip(&frames)
            .all(|(s, f)| s.frames.load(Ordering::Relaxed) > *f)
    })
    .await;
    // One port, opened once: the units share it.
    assert_eq!(
        stats
            .iter()
            .map(|s| s.opened.load(Ordering::Relaxed))
            .sum::<u64>(),
        1
    );
    assert!(gw.shutdown(WAIT).await);
}

/// A Modbus TCP peer that misbehaves in turn, one way per connection:
/// garbage for an answer; a header announcing a 64 KiB frame, then a
/// trickle; a connection closed at once; a silent peer.
async fn hostile(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut n = 0u32;
    while let Ok((mut stream, _)) = listener.accept().await {
        n += 1;
        let way = n % 4;
        tokio::spawn(async move {
            let mut req = [0u8; 12];
            if stream.read_exact(&mut req).await.is_err() {
                return;
            }
            match way {
                1 => {
                    let _ = stream.write_all(&[0xde; 4096]).await;
                }
                2 => {
                    // Transaction id echoed, protocol 0, length 0xffff.
                    let _ = stream
                        .write_all(&[req[0], req[1], 0, 0, 0xff, 0xff, 1, 3])
                        .await;
                    for _ in 0..100 {
                        if stream.write_all(&[0]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                }
                3 => drop(stream),
                _ => {
                    let mut sink = Vec::new();
                    let _ = stream.read_to_end(&mut sink).await;
                }
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_modbus_peer_is_counted_and_never_holds_up_a_healthy_meter() {
    let bad = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad_addr = bad.local_addr().unwrap();
    let peer = tokio::spawn(hostile(bad));
    let good_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = serve(good_addr).await;
    let source = |name: &str, addr: SocketAddr| {
        format!(
            "[[sources]]\nkind = \"modbus\"\nname = \"{name}\"\nurl = \"tcp://{addr}\"\ninterval_ms = 20\ntimeout_ms = 300\ntopic = \"meters/{name}\"\n{METER_REGISTERS}"
        )
    };
    let toml = format!(
        "{}{}{}{}",
        gateway_header("gw-modbus-hostile"),
        echo_function(),
        source("bad", bad_addr),
        source("good", good_addr)
    );
    let (gw, _dir) = gateway(&toml).await;
    let bad = gw.source_stats("bad").unwrap().clone();
    let good = gw.source_stats("good").unwrap().clone();
    // Every misbehaviour once: the trickle is an invalid answer,
    // the silent peer times out, garbage followed by a close and a closed
    // connection are lost connections; each connection is made afresh.
    let counted =
        |f: fn(&edgefn::sources::SourceStats) -> &AtomicU64| f(&bad).load(Ordering::Relaxed);
    let counts = || {
        ["opened", "invalid", "timeouts", "failures"].map(|k| match k {
            "opened" => counted(|s| &s.opened),
            "invalid" => counted(|s| &s.invalid),
            "timeouts" => counted(|s| &s.timeouts),
            _ => counted(|s| &s.failures),
        })
    };
    let deadline = std::time::Instant::now() + WAIT;
    while !matches!(counts(), [_, i, t, f] if i >= 1 && t >= 1 && f >= 4) {
        assert!(
            std::time::Instant::now() < deadline,
            "every misbehaviour not counted: opened, invalid, timeouts, failures = {:?}",
            counts()
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(counted(|s| &s.opened) >= 4);
    assert_eq!(counted(|s| &s.frames), 0);
    // Meanwhile the healthy meter was polled on time.
    assert!(
        good.frames.load(Ordering::Relaxed) >= 20,
        "the healthy meter kept its pace"
    );
    assert_eq!(good.failures.load(Ordering::Relaxed), 0);
    peer.abort();
    server.abort();
    assert!(gw.shutdown(WAIT).await);
}

/// A `misbehave` function in `mode` with `modbus = [grant]`, writing at
/// `address` of the grant's device.
fn writer(name: &str, mode: &str, grant: &str, address: u16) -> String {
    let device = grant.split(':').next().unwrap_or(grant);
    format!(
        "[[functions]]\nname = \"{name}\"\ncomponent = {}\ntriggers = [\"meters/#\"]\npublish = [\"allowed/#\"]\nmodbus = [\"{grant}\"]\nconfig = {{ mode = \"{mode}\", address = \"{address}\", device = \"{device}\" }}\n",
        lit(&guest("misbehave"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_write_registers_and_coils_only_on_ok_and_within_their_range() {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let meter = Meter::default();
    let server = serve_meter(addr, meter.clone()).await;
    let toml = format!(
        "{}{}{}{}[[sources]]\nkind = \"modbus\"\nname = \"meter\"\nurl = \"tcp://{addr}\"\ninterval_ms = 50\ntopic = \"meters/meter\"\n{METER_REGISTERS}",
        gateway_header("gw-modbus-write"),
        writer("writer", "modbus-write", "meter:10-11", 10),
        writer("failer", "modbus-write-then-fail", "meter", 20),
        writer("outside", "modbus-write", "meter:10-11", 11),
    );
    let (gw, _dir) = gateway(&toml).await;
    let (host, port) = gw.local_broker();
    let mut reports = Subscriber::connect(host, port, &["allowed/modbus"]).await;
    // `outside` asked for 11..=12 with 10..=11 allowed: refused, and said so.
    let refused = async {
        loop {
            let (_, report) = reports.next().await;
            let report = String::from_utf8_lossy(&report).into_owned();
            if report != "ok" {
                return report;
            }
        }
    };
    let refused = tokio::time::timeout(WAIT, refused)
        .await
        .expect("a refusal");
    assert!(
        refused.contains(
            "addresses 11..=12 of Modbus device `meter` is not allowed (allowed: 10..=11)"
        ),
        "{refused}"
    );
    // `writer`'s writes reach the device, in call order.
    let stats = gw.source_stats("meter").unwrap().clone();
    eventually("writes sent", || stats.written.load(Ordering::Relaxed) >= 6).await;
    let writes = meter.writes();
    assert_eq!(writes[..2], ["registers 10 [7, 8]", "coils 10 [true]"]);
    // Only `writer`'s: nothing from the failed handler (20) or the refused
    // call (11), however many events all three handled.
    assert!(
        writes
            .iter()
            .all(|w| w.starts_with("registers 10 ") || w.starts_with("coils 10 ")),
        "{writes:?}"
    );
    server.abort();
    assert!(gw.shutdown(WAIT).await);
}
