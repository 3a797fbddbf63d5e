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
//! limit stops it, then reports), `partial` (publishes, then fails).

use edgefn_sdk::{Event, Function, config, publish};

struct Misbehave;

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
        match mode.as_str() {
            "echo" => publish(&format!("echo/{}", event.topic), &event.payload)?,
            "error" => return Err("this function always fails".into()),
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

edgefn_sdk::export!(Misbehave);
