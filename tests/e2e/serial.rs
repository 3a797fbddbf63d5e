//! Serial sources on real kernel pseudo-terminals: every framing reaches a
//! function and its output reaches MQTT; garbage is counted and skipped; a
//! vanished device is reopened; functions write back to the port.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use edgefn_drivers::codec::{cobs, nmea, pms5003, slip};

use crate::support::*;

/// A pseudo-terminal: the test holds the master (the "device" side); the
/// gateway opens the slave path like a real serial port.
struct Pty {
    master: File,
    path: PathBuf,
    _slave: OwnedFd,
}

fn pty() -> Pty {
    let p = nix::pty::openpty(None, None).expect("openpty");
    let path = nix::unistd::ttyname(&p.slave).expect("ttyname");
    Pty {
        master: File::from(p.master),
        path,
        _slave: p.slave,
    }
}

impl Pty {
    /// Writes from a blocking thread (a pty buffer holds only a few KiB).
    async fn write(&self, bytes: Vec<u8>) {
        let mut m = self.master.try_clone().unwrap();
        tokio::task::spawn_blocking(move || m.write_all(&bytes))
            .await
            .unwrap()
            .unwrap();
    }

    /// Reads until `n` bytes arrived (or panics after [`WAIT`]).
    async fn read(&self, n: usize) -> Vec<u8> {
        let mut m = self.master.try_clone().unwrap();
        let read = tokio::task::spawn_blocking(move || {
            let mut out = vec![0u8; n];
            m.read_exact(&mut out).map(|()| out)
        });
        tokio::time::timeout(WAIT, read)
            .await
            .expect("bytes in time")
            .unwrap()
            .unwrap()
    }
}

fn serial_source(name: &str, path: &Path, framing: &str, extra: &str) -> String {
    format!(
        "[[sources]]\nkind = \"serial\"\nname = \"{name}\"\npath = {}\nbaud = 115200\nframing = \"{framing}\"\ntopic = \"serial/{name}\"\n{extra}\n",
        lit(path)
    )
}

fn echo_function(extra: &str) -> String {
    format!(
        "[[functions]]\nname = \"echo\"\ncomponent = {}\ntriggers = [\"serial/#\"]\npublish = [\"echo/#\", \"allowed/#\"]\n{extra}\n",
        lit(&guest("misbehave"))
    )
}

async fn opened(gw: &edgefn::supervisor::Gateway, name: &str, times: u64) {
    let stats = gw.source_stats(name).unwrap().clone();
    eventually(&format!("{name} opened"), || {
        stats.opened.load(Ordering::Relaxed) >= times
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_framing_reaches_a_function_and_mqtt() {
    let framings = [
        "lines",
        "cobs",
        "slip",
        "length_prefixed",
        "nmea",
        "pms5003",
    ];
    let ptys: Vec<Pty> = framings.iter().map(|_| pty()).collect();
    let mut toml = format!("{}{}", gateway_header("gw-serial"), echo_function(""));
    for (f, p) in framings.iter().zip(&ptys) {
        let mirror = if *f == "lines" {
            "mirror_topic = \"mirror/lines\""
        } else {
            ""
        };
        toml.push_str(&serial_source(f, &p.path, f, mirror));
    }
    let (gw, _dir) = gateway(&toml).await;
    for f in framings {
        opened(&gw, f, 1).await;
    }
    let (host, port) = gw.local_broker();
    let mut out = Subscriber::connect(host, port, &["echo/#"]).await;
    let mut mirror = Subscriber::connect(host, port, &["mirror/#"]).await;

    let gga = "GPGGA,092750.000,5321.6802,N,00630.3372,W,1,8,1.03,61.7,M,55.2,M,,";
    let reading = pms5003::Reading {
        pm2_5: 12,
        pm10: 20,
        particles_0_3um: 900,
        ..Default::default()
    };
    let inputs: [Vec<u8>; 6] = [
        b"hello world\r\n".to_vec(),
        cobs::encode(&[1, 0, 2, 0]),
        slip::encode(&[0xc0, b'a', 0xdb]),
        vec![0, 3, b'x', b'y', b'z'],
        nmea::sentence(gga).into_bytes(),
        reading.encode().to_vec(),
    ];
    for (p, input) in ptys.iter().zip(inputs) {
        p.write(input).await;
    }
    let mut got = std::collections::BTreeMap::new();
    while got.len() < framings.len() {
        let (topic, payload) = out.next().await;
        got.insert(topic, payload);
    }
    assert_eq!(got["echo/serial/lines"], b"hello world");
    assert_eq!(
        mirror.next().await,
        ("mirror/lines".to_owned(), b"hello world".to_vec())
    );
    assert_eq!(got["echo/serial/cobs"], [1, 0, 2, 0]);
    assert_eq!(got["echo/serial/slip"], [0xc0, b'a', 0xdb]);
    assert_eq!(got["echo/serial/length_prefixed"], b"xyz");
    assert_eq!(got["echo/serial/nmea"], format!("${gga}*76").as_bytes());
    let pms: serde_json::Value = serde_json::from_slice(&got["echo/serial/pms5003"]).unwrap();
    assert_eq!(
        (
            pms["pm2_5"].as_u64(),
            pms["pm10"].as_u64(),
            pms["particles_0_3um"].as_u64()
        ),
        (Some(12), Some(20), Some(900))
    );
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_counted_skipped_and_good_frames_still_arrive() {
    let (lines, nmea_pty, pms) = (pty(), pty(), pty());
    let toml = format!(
        "{}{}{}{}{}",
        gateway_header("gw-garbage"),
        echo_function(""),
        serial_source("lines", &lines.path, "lines", "max_frame = 256"),
        serial_source("nmea", &nmea_pty.path, "nmea", ""),
        serial_source("pms", &pms.path, "pms5003", ""),
    );
    let (gw, _dir) = gateway(&toml).await;
    for s in ["lines", "nmea", "pms"] {
        opened(&gw, s, 1).await;
    }
    let (host, port) = gw.local_broker();
    let mut out = Subscriber::connect(host, port, &["echo/#"]).await;

    // 1 MB without a delimiter, then a good line.
    let mut flood = vec![b'z'; 1_000_000];
    flood.extend_from_slice(b"\ngood line\n");
    lines.write(flood).await;
    // A wrong checksum, garbage, a truncated sentence, then a good one.
    let good = nmea::sentence("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W");
    let bad = good.replace('A', "B");
    nmea_pty
        .write(format!("{bad}\x00\x7f$GPGSA,A,3,{good}").into_bytes())
        .await;
    // A bit flip, then a good frame.
    let r = pms5003::Reading {
        pm2_5: 33,
        ..Default::default()
    };
    let mut flipped = r.encode();
    flipped[9] ^= 0x10;
    pms.write([flipped.as_slice(), &r.encode()].concat()).await;

    let mut got = std::collections::BTreeMap::new();
    while got.len() < 3 {
        let (topic, payload) = out.next().await;
        assert!(
            got.insert(topic.clone(), payload).is_none(),
            "only the good frame of {topic}"
        );
    }
    assert_eq!(got["echo/serial/lines"], b"good line");
    assert_eq!(got["echo/serial/nmea"], good.trim_end().as_bytes());
    let v: serde_json::Value = serde_json::from_slice(&got["echo/serial/pms"]).unwrap();
    assert_eq!(v["pm2_5"], 33);
    let s = |n: &str| gw.source_stats(n).unwrap().clone();
    assert!(s("lines").oversize.load(Ordering::Relaxed) >= 1);
    assert!(s("lines").discarded_bytes.load(Ordering::Relaxed) >= 1_000_000);
    assert!(
        s("nmea").invalid.load(Ordering::Relaxed) >= 2,
        "bad checksum and truncated"
    );
    assert!(s("pms").invalid.load(Ordering::Relaxed) >= 1);
    for n in ["lines", "nmea", "pms"] {
        assert_eq!(s(n).frames.load(Ordering::Relaxed), 1, "{n}");
    }
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_port_is_reopened_and_frames_flow_again() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyEDGE");
    let first = pty();
    std::os::unix::fs::symlink(&first.path, &link).unwrap();
    let toml = format!(
        "{}{}{}",
        gateway_header("gw-reopen"),
        echo_function(""),
        serial_source("dev", &link, "lines", "")
    );
    let (gw, _cfg) = gateway(&toml).await;
    opened(&gw, "dev", 1).await;
    let (host, port) = gw.local_broker();
    let mut out = Subscriber::connect(host, port, &["echo/#"]).await;
    first.write(b"before\n".to_vec()).await;
    assert_eq!(out.next().await.1, b"before");

    // Unplug: the pty disappears.
    drop(first);
    let stats = gw.source_stats("dev").unwrap().clone();
    eventually("the loss is noticed", || {
        stats.failures.load(Ordering::Relaxed) >= 1
    })
    .await;
    // Plug back in (a new device node behind the same stable path).
    let second = pty();
    let tmp = dir.path().join("ttyEDGE.new");
    std::os::unix::fs::symlink(&second.path, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    opened(&gw, "dev", 2).await;
    second.write(b"after\n".to_vec()).await;
    assert_eq!(out.next().await.1, b"after");
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_write_back_only_to_allowed_ports() {
    let motor = pty();
    let toml = format!(
        "{}{}{}",
        gateway_header("gw-writeback"),
        echo_function(
            "serial_ports = [\"motor\"]\nconfig = { mode = \"serial-echo\", port = \"motor\" }"
        ),
        serial_source("motor", &motor.path, "lines", ""),
    );
    let (gw, _dir) = gateway(&toml).await;
    opened(&gw, "motor", 1).await;
    let (host, port) = gw.local_broker();
    let mut denied = Subscriber::connect(host, port, &["allowed/#"]).await;
    motor.write(b"spin 90\n".to_vec()).await;
    assert_eq!(motor.read(11).await, b"ack:spin 90");
    // The counter moves just after the write that delivered the bytes.
    let stats = gw.source_stats("motor").unwrap().clone();
    eventually("the write is counted", || {
        stats.written.load(Ordering::Relaxed) == 1
    })
    .await;

    // The same function asked (by payload) to write to a port it may not use.
    motor.write(b"mode:serial-denied\n".to_vec()).await;
    let (_, report) = denied.next().await;
    let report = String::from_utf8(report).unwrap();
    assert!(
        report.starts_with(
            "denied: writing to serial port `not-my-port` is not allowed (allowed: motor)"
        ),
        "{report}"
    );
    assert_eq!(gw.function_metrics("echo").unwrap().snapshot().denied, 1);
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_without_functions_mirrors_every_frame() {
    let gps = pty();
    let toml = format!(
        "{}{}",
        gateway_header("gw-bridge"),
        serial_source("gps", &gps.path, "nmea", "mirror_topic = \"bridge/gps\""),
    );
    let (gw, _dir) = gateway(&toml).await;
    opened(&gw, "gps", 1).await;
    let (host, port) = gw.local_broker();
    let mut mirror = Subscriber::connect(host, port, &["bridge/#"]).await;
    let sentences: Vec<String> = (0..3)
        .map(|i| {
            nmea::sentence(&format!(
                "GPRMC,12351{i},A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W"
            ))
        })
        .collect();
    gps.write(sentences.concat().into_bytes()).await;
    for s in &sentences {
        assert_eq!(
            mirror.next().await,
            ("bridge/gps".to_owned(), s.trim_end().as_bytes().to_vec())
        );
    }
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_alone_reach_the_metrics_within_a_second() {
    let dev = pty();
    let toml = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
        gateway_header("gw-wrong-baud"),
        serial_source("gps", &dev.path, "nmea", ""),
    );
    let (gw, _dir) = gateway(&toml).await;
    opened(&gw, "gps", 1).await;
    let addr = gw.admin_addr().unwrap();
    // What a device at the wrong speed looks like: no good frame at all.
    let good = nmea::sentence("GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W");
    dev.write(good.replace('A', "B").repeat(3).into_bytes())
        .await;
    let written = std::time::Instant::now();
    let metrics = loop {
        let m = crate::operations::parse(&crate::operations::get(addr, "/metrics", None).await.1);
        if crate::operations::value(&m, "edgefn_source_invalid_frames_total{source=\"gps\"}") >= 3.0
        {
            break m;
        }
        assert!(
            written.elapsed() < std::time::Duration::from_secs(1),
            "bad frames not in /metrics within a second: {m:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let value = |key: &str| crate::operations::value(&metrics, key);
    assert_eq!(
        value("edgefn_source_writes_dropped_total{source=\"gps\"}"),
        0.0
    );
    assert_eq!(
        gw.source_stats("gps")
            .unwrap()
            .frames
            .load(Ordering::Relaxed),
        0
    );
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_i2c_bus_is_a_counted_retried_poll() {
    let toml = format!(
        "{}{}[[sources]]\nkind = \"i2c\"\nname = \"climate\"\nbus = \"/dev/i2c-does-not-exist\"\ndriver = \"bme280\"\ninterval_ms = 20\ntopic = \"i2c/climate\"\n",
        gateway_header("gw-i2c"),
        echo_function(""),
    );
    let (gw, _dir) = gateway(&toml).await;
    let stats = gw.source_stats("climate").unwrap().clone();
    eventually("several failed polls", || {
        stats.failures.load(Ordering::Relaxed) >= 3
    })
    .await;
    assert_eq!(stats.frames.load(Ordering::Relaxed), 0);
    // The rest of the gateway is unaffected.
    let (host, port) = gw.local_broker();
    let mut out = Subscriber::connect(host, port, &["echo/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    sensor.publish("serial/manual", "still here").await;
    assert_eq!(out.next().await.1, b"still here");
    assert!(gw.shutdown(WAIT).await);
}
