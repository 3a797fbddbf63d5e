//! `misbehave`: a guest whose behaviour is chosen by its `mode` config key,
//! used by the gateway's tests to check isolation and limits.
//!
//! The mode is the payload's `mode:<name>` if it has one, else the `mode`
//! config key. Modes: `echo` (publishes the payload on `echo/<topic>`), `slow`
//! (20 ms of work, then publishes on `slow/<topic>`), `serial-echo` (writes
//! `ack:<payload>` to the serial port named by the `port` config key),
//! `serial-denied` (writes to an unlisted port, then reports), `error` (returns
//! an error), `trap` (panics, which traps), `loop` (never returns), `alloc`
//! (grows memory without bound), `publish-denied` (publishes outside its
//! allowlist, then reports the refusal on `allowed/denied`), `forward-denied`
//! (forwards to an unlisted sink, then reports), `flood` (publishes until a
//! limit stops it, then reports), `partial` (publishes, then fails),
//! `recurse` (unbounded recursion), `huge` (hands a 10 MB string to host
//! imports, then reports what the host said on `allowed/huge`), `count`
//! (increments a `count` key in its durable state and publishes the new
//! value on `count/<topic>`), `count-then-fail` (increments, then fails: the
//! write must not be kept), `compute:<n>` (n rounds of arithmetic, for
//! benchmarks; publishes nothing), `warm` (publishes how many events this
//! instance has handled, on `warm/<topic>`), `answer` (forwards
//! `[topic, payload, attributes]` as JSON to the sink named by the `sink`
//! config key, default `cloud`), `modbus-write` (writes holding registers
//! `[7, 8]` and coil `true` at the `address` config key on the Modbus
//! source named by `device`, then publishes `ok` or the refusal on
//! `allowed/modbus`), `modbus-write-then-fail` (writes, then fails: the
//! writes must not be sent) and `gpio-set` (sets the GPIO output named by
//! the `line` config key, default `relay`, to `true`, then publishes `ok` or
//! the refusal on `allowed/gpio`).
//!
//! Waits and output: `sleep` (`std::thread::sleep` for an hour), `poll`
//! (`wasi:io/poll` on an hour-long clock pollable), `nap` (sleeps 5 ms, then
//! publishes on `allowed/nap`), `err-huge` (returns an 8 MiB error),
//! `panic` (`panic!("boom")`), `log-flood` (5,000 `log` lines and 5,000
//! stdout lines, then publishes on `allowed/logged`) and `print` (a line to
//! stdout and one to stderr, then publishes on `allowed/printed`).

use std::sync::atomic::{AtomicU64, Ordering};

use edgefn_sdk::{Event, Function, Level, config, kv, log, publish};

struct Misbehave;

/// Events this instance has handled (in `reuse` mode it keeps counting).
static HANDLED: AtomicU64 = AtomicU64::new(0);

#[inline(never)]
#[allow(unconditional_recursion, reason = "the point: a stack overflow")]
fn recurse(depth: u64, pad: &mut [u8; 64]) -> u64 {
    pad[(depth % 64) as usize] = depth as u8;
    let mut next = *pad;
    std::hint::black_box(recurse(depth + 1, &mut next)) + u64::from(next[0])
}

fn count() -> Result<u64, String> {
    let n: u64 = kv::get_json("count")?.unwrap_or(0) + 1;
    kv::set_json("count", &n)?;
    Ok(n)
}

impl Function for Misbehave {
    fn handle(event: Event) -> Result<(), String> {
        // The mode comes from a payload `mode:<name>` or else from the config,
        // so one function (one ordered queue) can misbehave on demand.
        let from_payload = std::str::from_utf8(&event.payload)
            .ok()
            .and_then(|s| s.strip_prefix("mode:"))
            .map(str::to_owned);
        let mode = from_payload
            .or_else(|| config("mode"))
            .unwrap_or_else(|| "echo".into());
        let handled = HANDLED.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(rounds) = mode.strip_prefix("compute:") {
            let rounds: u64 = rounds.parse().map_err(|_| "bad rounds".to_owned())?;
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            for _ in 0..rounds {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            std::hint::black_box(x);
            return Ok(());
        }
        if let Some(done) = waits_and_output(&mode)? {
            return publish(done, b"done").map_err(|e| e.to_string());
        }
        match mode.as_str() {
            "warm" => publish(&format!("warm/{}", event.topic), handled.to_string())?,
            "recurse" => {
                let mut pad = [0u8; 64];
                std::hint::black_box(recurse(0, &mut pad));
            }
            "huge" => {
                let big = "x".repeat(10 * 1024 * 1024);
                let payload = publish("allowed/huge", &big).err().map(|e| e.to_string());
                let topic = publish(&big, b"x").err().map(|e| e.to_string());
                let key = kv::set(&big, b"x").err().map(|e| e.to_string());
                let device = edgefn_sdk::modbus_write_registers(&big, 0, &[1])
                    .err()
                    .map(|e| e.to_string());
                let line = edgefn_sdk::gpio_set(&big, true)
                    .err()
                    .map(|e| e.to_string());
                log(Level::Info, &big);
                publish(
                    "allowed/huge",
                    format!(
                        "payload: {payload:?}; topic: {topic:?}; key: {key:?}; device: {device:?}; line: {line:?}"
                    ),
                )?;
            }
            "count" => {
                let n = count()?;
                publish(&format!("count/{}", event.topic), n.to_string())?;
            }
            "count-then-fail" => {
                count()?;
                return Err("failed after counting".into());
            }
            "echo" => publish(&format!("echo/{}", event.topic), &event.payload)?,
            "answer" => {
                let sink = config("sink").unwrap_or_else(|| "cloud".into());
                let payload = String::from_utf8_lossy(&event.payload);
                edgefn_sdk::forward_json(&sink, &(&event.topic, payload, &event.attributes))?;
            }
            "error" => return Err("this function always fails".into()),
            "modbus-write" | "modbus-write-then-fail" => {
                let device = config("device").unwrap_or_else(|| "meter".into());
                let address = edgefn_sdk::config_or("address", 10u16)?;
                let written = edgefn_sdk::modbus_write_registers(&device, address, &[7, 8])
                    .and_then(|()| edgefn_sdk::modbus_write_coils(&device, address, &[true]));
                if mode == "modbus-write-then-fail" {
                    return Err("failed after writing".into());
                }
                let report = written.map_or_else(|e| e.to_string(), |()| "ok".into());
                publish("allowed/modbus", report)?;
            }
            "gpio-set" => {
                let line = config("line").unwrap_or_else(|| "relay".into());
                let report = edgefn_sdk::gpio_set(&line, true)
                    .map_or_else(|e| e.to_string(), |()| "ok".into());
                publish("allowed/gpio", report)?;
            }
            "serial-echo" => {
                let port = config("port").unwrap_or_else(|| "motor".into());
                edgefn_sdk::serial_write(&port, [b"ack:".as_slice(), &event.payload].concat())?;
            }
            "serial-denied" => {
                let err = edgefn_sdk::serial_write("not-my-port", b"x")
                    .expect_err("writing to an unlisted port must be denied");
                publish("allowed/denied", err.to_string())?;
            }
            "slow" => {
                // Busy for 20 ms, then echo: finishes after events that
                // arrived later at faster functions.
                let start = std::time::Instant::now();
                while start.elapsed() < std::time::Duration::from_millis(20) {
                    std::hint::spin_loop();
                }
                publish(&format!("slow/{}", event.topic), &event.payload)?;
            }
            "trap" => {
                // A panic aborts, which is a trap for the host.
                let v: Vec<u8> = Vec::new();
                let i = event.payload.len() + 7;
                std::hint::black_box(v[i]);
            }
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hog: Vec<Vec<u8>> = Vec::new();
                loop {
                    hog.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hog);
                }
            }
            "publish-denied" => {
                let err = publish("forbidden/topic", b"should never arrive")
                    .expect_err("publishing outside the allowlist must be denied");
                publish("allowed/denied", err.to_string())?;
            }
            "forward-denied" => {
                let err = edgefn_sdk::forward("not-my-sink", b"x")
                    .expect_err("forwarding to an unlisted sink must be denied");
                publish("allowed/denied", err.to_string())?;
            }
            "flood" => {
                let mut sent = 0u32;
                let err = loop {
                    match publish("allowed/flood", sent.to_string()) {
                        Ok(()) => sent += 1,
                        Err(e) => break e,
                    }
                };
                let _ = sent;
                return Err(format!("stopped by the host: {err}"));
            }
            "partial" => {
                publish("allowed/partial", b"half")?;
                return Err("failed after publishing".into());
            }
            other => return Err(format!("unknown mode `{other}`")),
        }
        Ok(())
    }
}

/// The modes that wait or write output; `Some(topic)` to report on when the
/// mode returns normally.
fn waits_and_output(mode: &str) -> Result<Option<&'static str>, String> {
    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);
    match mode {
        "sleep" => {
            std::thread::sleep(HOUR);
            Ok(Some("allowed/woke"))
        }
        "poll" => {
            let nanos = u64::try_from(HOUR.as_nanos()).unwrap_or(u64::MAX);
            let pollable = wasip2::clocks::monotonic_clock::subscribe_duration(nanos);
            wasip2::io::poll::poll(&[&pollable]);
            Ok(Some("allowed/woke"))
        }
        "nap" => {
            std::thread::sleep(std::time::Duration::from_millis(5));
            Ok(Some("allowed/nap"))
        }
        "err-huge" => Err("e".repeat(8 * 1024 * 1024)),
        "panic" => panic!("boom"),
        "log-flood" => {
            for i in 0..5000 {
                log(Level::Info, &format!("flood line {i}"));
                println!("stdout flood line {i}");
            }
            Ok(Some("allowed/logged"))
        }
        "print" => {
            println!("a line on stdout");
            eprintln!("a line on stderr");
            Ok(Some("allowed/printed"))
        }
        _ => Ok(None),
    }
}

edgefn_sdk::export!(Misbehave);
