//! Memory under a stream: the embedded broker keeps what
//! `broker.retention_bytes_per_filter` allows and no more, subscribers that
//! keep up lose nothing with a small retention, and one that falls behind is
//! counted and logged. The gateway runs as its own process (the debug
//! `edgefn` binary) where its RSS or its log is measured.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

use crate::support::*;

/// The gateway binary, killed on drop, with its log lines on a channel.
struct Daemon {
    child: Child,
    log: mpsc::UnboundedReceiver<String>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `edgefn run` on `toml` and waits until it logged that it
    /// started.
    async fn start(dir: &Path, toml: &str) -> Self {
        let config = dir.join("edgefn.toml");
        std::fs::write(&config, toml).unwrap();
        let mut child = Command::new(edgefn_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("EDGEFN_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, log) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Self { child, log };
        d.wait_log("Gateway started.").await;
        d
    }

    /// Waits for a log line containing `want`; returns it.
    async fn wait_log(&mut self, want: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.log.recv().await {
                if line.contains(want) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!("no log line with `{want}` in time"),
        }
    }

    /// Resident memory in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

/// A gateway config with an embedded broker on `port` keeping `retention`
/// bytes per filter, and an admin endpoint on `admin`.
fn broker_config(port: u16, admin: u16, retention: u64) -> String {
    format!(
        "[gateway]\nid = \"mem\"\ndata_dir = \"data\"\n\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\nretention_bytes_per_filter = {retention}\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[[functions]]\nname = \"idle\"\ncomponent = {}\ntriggers = [\"unused/#\"]\n",
        lit(&guest("threshold"))
    )
}

/// The value of an unlabelled counter from the admin endpoint's `/metrics`.
async fn counter(admin: u16, name: &str) -> f64 {
    let body = reqwest::get(format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {body}"))
        .parse()
        .unwrap()
}

/// 48 MiB published through a filter nobody reads any more: the broker
/// keeps 1 MiB of it, and the gateway's memory grows by far less than it
/// received (rumqttd's former 10 × 10 MiB per filter kept all of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_retention_bounds_memory_of_an_unread_filter() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let gw = Daemon::start(dir.path(), &broker_config(port, admin, 1024 * 1024)).await;
    // The filter exists from this subscription on; its subscriber leaves.
    drop(Subscriber::connect("127.0.0.1", port, &["bulk/#"]).await);

    let mut publisher = Publisher::connect("127.0.0.1", port).await;
    // 8 KiB: under rumqttc's default 10 KiB packet limit.
    let payload = vec![b'x'; 8 * 1024];
    // Warm-up: fills the retention twice and lets the allocator settle.
    for _ in 0..256 {
        publisher.publish("bulk/warm", payload.clone()).await;
    }
    let before = gw.rss_kib();
    for _ in 0..48 * 128 {
        publisher.publish("bulk/data", payload.clone()).await;
    }
    let grown = gw.rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} KiB for 48 MiB through a 1 MiB retention"
    );
}

/// A subscriber that stays within a burst of the publisher gets every
/// message through a 64 KiB retention that the stream passes 60 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_keep_up_lose_nothing_with_a_small_retention() {
    let toml = gateway_header("keepup").replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nretention_bytes_per_filter = 65536\n",
    ) + &format!(
        "\n[[functions]]\nname = \"idle\"\ncomponent = {}\ntriggers = [\"unused/#\"]\n",
        lit(&guest("threshold"))
    );
    let (gw, _dir) = gateway(&toml).await;
    let (host, port) = gw.local_broker();
    let mut sub = Subscriber::connect(host, port, &["steady/#"]).await;
    let mut publisher = Publisher::connect(host, port).await;
    let (bursts, burst) = (200, 50);
    let mut next = 0u32;
    for b in 0..bursts {
        for i in 0..burst {
            let seq = b * burst + i;
            let payload = format!("{seq:08}{}", "y".repeat(400));
            publisher.publish("steady/s1", payload).await;
        }
        while next < (b + 1) * burst {
            let (_, payload) = sub.next().await;
            let seq: u32 = std::str::from_utf8(&payload[..8]).unwrap().parse().unwrap();
            assert_eq!(seq, next, "messages arrive in order, none skipped");
            next += 1;
        }
    }
    assert_eq!(next, bursts * burst);
    assert_eq!(
        gw.metrics()
            .broker_skips
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(gw.shutdown(WAIT).await);
}

/// A QoS 1 subscriber that stops reading while 1 MiB passes a 64 KiB
/// retention: when it reads again it has skipped messages, and the gateway
/// counts the skip in `/metrics` and logs it with the client and filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_is_counted_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let mut gw = Daemon::start(dir.path(), &broker_config(port, admin, 64 * 1024)).await;
    assert_eq!(
        counter(admin, "edgefn_broker_subscriber_skips_total").await,
        0.0
    );

    let id = client_id("slow");
    let mut opts = MqttOptions::new(&id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client.subscribe("slow/#", QoS::AtLeastOnce).await.unwrap();
    tokio::time::timeout(WAIT, async {
        while !matches!(
            eventloop.poll().await,
            Ok(Event::Incoming(Packet::SubAck(_)))
        ) {}
    })
    .await
    .expect("subscribed in time");

    // The subscriber's event loop is not polled: it neither reads nor acks.
    let total = 1024;
    let mut publisher = Publisher::connect("127.0.0.1", port).await;
    for seq in 0..total {
        publisher
            .publish("slow/s1", format!("{seq:08}{}", "z".repeat(1016)))
            .await;
    }

    // Reading again: the in-flight window arrives, then the broker jumps.
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _client = client;
        while let Ok(ev) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev
                && tx.send(p.payload).is_err()
            {
                break;
            }
        }
    });
    let line = gw.wait_log("skipped the oldest messages").await;
    assert!(line.contains(&id), "{line}");
    assert!(line.contains("slow/#"), "{line}");
    let last = format!("{:08}", total - 1);
    let mut got = 0;
    loop {
        let p = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("the newest message arrives")
            .expect("subscriber alive");
        got += 1;
        if p[..8] == *last.as_bytes() {
            break;
        }
    }
    assert!(
        got < total,
        "{got} of {total} arrived: some must have been skipped"
    );
    assert!(counter(admin, "edgefn_broker_subscriber_skips_total").await >= 1.0);
}
