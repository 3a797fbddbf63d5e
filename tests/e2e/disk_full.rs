//! A full disk under the outbox: commits fail and are retried, nothing is
//! acknowledged that is not committed, `/readyz` and `/metrics` say so, and
//! the gateway recovers by itself when space returns.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::durability::{collect_range, enrich_config, events};
use crate::support::*;

/// A tmpfs mounted on a directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `16m`) on `dir`; `Err` says why not
    /// (not root, no `CAP_SYS_ADMIN`, no `mount`).
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Fills the filesystem to the last byte; returns the filler file.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write_all(&chunk) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the gateway's writer thread may still hold the file open.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// How the test takes the space away and gives it back.
enum Full {
    /// A really full filesystem: a tmpfs filled by a file.
    Tmpfs(Tmpfs, Option<PathBuf>),
    /// Where mounting is not permitted: the outbox's page limit (SQLite's
    /// `max_page_count`), which fails commits the same way.
    PageLimit,
}

impl Full {
    fn take_space(&mut self, gw: &edgefn::supervisor::Gateway) {
        match self {
            Self::Tmpfs(t, filler) => *filler = Some(t.fill()),
            Self::PageLimit => gw.outbox().limit_pages(1),
        }
    }

    fn give_space_back(&mut self, gw: &edgefn::supervisor::Gateway) {
        match self {
            Self::Tmpfs(_, filler) => {
                if let Some(f) = filler.take() {
                    std::fs::remove_file(f).unwrap();
                }
            }
            Self::PageLimit => gw.outbox().limit_pages(1 << 30),
        }
    }
}

/// GETs `path` from the admin endpoint; returns status and body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let resp = tokio::time::timeout(
        WAIT,
        reqwest::Client::new()
            .get(format!("http://{addr}{path}"))
            .send(),
    )
    .await
    .expect("admin answered in time")
    .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The value of the sample line starting with `name ` in a scrape.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
        .parse()
        .unwrap()
}

/// Waits until `/readyz` answers `status`; returns its body.
async fn readyz(addr: std::net::SocketAddr, status: u16) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (got, body) = get(addr, "/readyz").await;
        if got == status {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz stayed {got} ({body:?}), expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Readings go through a persistent Mosquitto to a gateway whose data dir
/// is full and whose cloud is down: commits fail, the gateway holds its
/// intake back (Mosquitto keeps the readings), is not ready and says why.
/// Space returns: it recovers by itself, and once the cloud is up every
/// reading Mosquitto accepted arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_loses_nothing_and_recovers_by_itself() {
    let broker_port = free_port();
    let Some(_broker) = Mosquitto::start_persistent(broker_port) else {
        return;
    };
    let cloud_port = free_port();
    let Some(mut cloud) = Mosquitto::start_persistent(cloud_port) else {
        return;
    };
    let mut cloud_sub = persistent_subscriber(cloud_port, "cloud-watcher-disk", &["cloud/#"]).await;
    cloud.stop();

    let dir = tempfile::tempdir().unwrap();
    let mut full = match Tmpfs::mount(&dir.path().join("data"), "16m") {
        Ok(t) => {
            eprintln!("note: full disk = a 16 MiB tmpfs filled to the last byte");
            Full::Tmpfs(t, None)
        }
        Err(why) => {
            eprintln!(
                "note: cannot mount a tmpfs here ({why}); full disk = the outbox's page limit (SQLite max_page_count)"
            );
            Full::PageLimit
        }
    };
    let header = format!(
        "[gateway]\nid = \"gw-disk\"\ndata_dir = \"data\"\n\n[broker]\nkind = \"external\"\nurl = \"mqtt://127.0.0.1:{broker_port}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    let path = dir.path().join("edgefn.toml");
    std::fs::write(&path, enrich_config(&header, cloud_port, "")).unwrap();
    let config = edgefn::config::load(&path).unwrap();
    let gw = edgefn::supervisor::Gateway::start(&config).await.unwrap();
    let admin = gw.admin_addr().unwrap();
    readyz(admin, 200).await;

    full.take_space(&gw);
    let n = events(2000);
    let mut sensor = Publisher::connect("127.0.0.1", broker_port).await;
    for i in 0..n {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
            .await;
    }
    // Mosquitto accepted all n. The gateway fails, backs off and retries.
    let stats = gw.outbox().stats().clone();
    eventually("five failed commits", || {
        stats.commit_failures.load(Ordering::Relaxed) >= 5
    })
    .await;
    let why = readyz(admin, 503).await;
    assert_eq!(why, "outbox: commit failing: database or disk is full\n");
    let metrics = get(admin, "/metrics").await.1;
    assert_eq!(sample(&metrics, "edgefn_outbox_writable"), 0.0);
    assert!(sample(&metrics, "edgefn_outbox_commit_failures_total") >= 5.0);
    assert_eq!(sample(&metrics, "edgefn_ready"), 0.0);

    full.give_space_back(&gw);
    readyz(admin, 200).await;
    let metrics = get(admin, "/metrics").await.1;
    assert_eq!(sample(&metrics, "edgefn_outbox_writable"), 1.0);

    cloud.restart();
    let seen = collect_range(&mut cloud_sub, 0, n, Duration::from_secs(120)).await;
    assert_eq!(seen.len() as u64, n);
    assert!(gw.shutdown(WAIT).await);
}
