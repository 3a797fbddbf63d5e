//! The watchdog means progress: a source or a function worker stuck past its
//! limit stops the systemd watchdog pings, says why in `STATUS=`, turns
//! `/readyz` 503 with the reason, and pings resume when it moves again.
//! The stalls are real: a serial device (a pty) that stops taking bytes,
//! and a local broker that cannot take a function's publishes.

use std::fs::File;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

fn spawn(config: &std::path::Path, notify: &NotifySocket) -> KillOnDrop {
    KillOnDrop(
        Command::new(edgefn_bin())
            .args(["run", "--config"])
            .arg(config)
            .env("EDGEFN_LOG", "warn")
            .env("NOTIFY_SOCKET", &notify.path)
            .env("WATCHDOG_USEC", "100000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn readyz(admin: u16) -> (u16, String) {
    let resp = tokio::time::timeout(
        WAIT,
        reqwest::get(format!("http://127.0.0.1:{admin}/readyz")),
    )
    .await
    .expect("admin answered in time")
    .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The master side of a pseudo-terminal (the "device") and the slave path
/// the gateway opens as its serial port.
fn pty() -> (File, std::path::PathBuf, std::os::fd::OwnedFd) {
    let p = nix::pty::openpty(None, None).expect("openpty");
    let path = nix::unistd::ttyname(&p.slave).expect("ttyname");
    (File::from(p.master), path, p.slave)
}

/// After `STATUS=stuck…`, no ping for well over ten ping periods.
async fn pings_stopped(notify: &mut NotifySocket, stuck: &str) -> String {
    let (line, _) = notify.wait_for_prefix("STATUS=stuck", WAIT).await;
    let line = line.expect("the gateway reports itself stuck");
    assert!(line.starts_with(stuck), "{line}");
    let (ping, seen) = notify
        .wait_for_prefix("WATCHDOG=1", Duration::from_millis(1500))
        .await;
    assert_eq!(ping, None, "pinged while stuck; after {seen:?}");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_device_that_stops_taking_bytes_stops_the_watchdog_until_it_moves() {
    let dir = tempfile::tempdir().unwrap();
    let (master, path, _slave) = pty();
    let (port, admin) = (free_port(), free_port());
    let config = dir.path().join("edgefn.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw-stuck-port\"\ndata_dir = \"data\"\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[[functions]]\nname = \"echo\"\ncomponent = {}\ntriggers = [\"cmd/#\"]\nserial_ports = [\"motor\"]\nconfig = {{ mode = \"serial-echo\", port = \"motor\" }}\n\n[[sources]]\nkind = \"serial\"\nname = \"motor\"\npath = {}\nbaud = 115200\nframing = \"lines\"\ntopic = \"serial/motor\"\n",
            lit(&guest("misbehave")),
            lit(&path)
        ),
    )
    .unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let mut child = spawn(&config, &notify);
    assert!(notify.wait_for_prefix("READY=1", WAIT).await.0.is_some());
    assert!(notify.wait_for_prefix("WATCHDOG=1", WAIT).await.0.is_some());
    assert_eq!(readyz(admin).await.0, 200);

    // Commands whose acknowledgements fill the pty, which nobody reads: the
    // device has stopped taking bytes, like one holding CTS low.
    let mut sensor = Publisher::connect("127.0.0.1", port).await;
    let command = "x".repeat(4000);
    for i in 0..40 {
        sensor.publish(&format!("cmd/{i}"), command.clone()).await;
    }
    pings_stopped(
        &mut notify,
        "STATUS=stuck: source motor: write to the device pending for ",
    )
    .await;
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("stuck: source motor: write to the device pending for "),
        "{body}"
    );

    // The device reads again: the source moves, the pings resume.
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while reader.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    assert!(
        notify
            .wait_for_prefix("STATUS=progressing again", WAIT)
            .await
            .0
            .is_some()
    );
    assert!(notify.wait_for_prefix("WATCHDOG=1", WAIT).await.0.is_some());
    assert_eq!(readyz(admin).await, (200, "ready\n".to_owned()));
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.0.id().to_string())
        .status();
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_outputs_cannot_leave_stops_the_watchdog_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (mut master, path, _slave) = pty();
    // The local broker is not there: the function's publishes queue up in
    // the local publisher until its queue is full, then the worker waits.
    let (broker, admin) = (free_port(), free_port());
    let config = dir.path().join("edgefn.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"gw-stuck-worker\"\ndata_dir = \"data\"\n[broker]\nkind = \"external\"\nurl = \"mqtt://127.0.0.1:{broker}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n[[functions]]\nname = \"echo\"\ncomponent = {}\ntriggers = [\"serial/#\"]\npublish = [\"echo/#\"]\nlimits = {{ queue = 16 }}\n\n[[sources]]\nkind = \"serial\"\nname = \"gps\"\npath = {}\nbaud = 115200\nframing = \"lines\"\ntopic = \"serial/gps\"\n",
            lit(&guest("misbehave")),
            lit(&path)
        ),
    )
    .unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let _child = spawn(&config, &notify);
    assert!(notify.wait_for_prefix("READY=1", WAIT).await.0.is_some());
    assert!(notify.wait_for_prefix("WATCHDOG=1", WAIT).await.0.is_some());

    // More readings than the local publisher can hold (1024 publishes).
    let lines: String = (0..1200).map(|i| format!("r{i}\n")).collect();
    master.write_all(lines.as_bytes()).unwrap();
    pings_stopped(
        &mut notify,
        "STATUS=stuck: function echo: outputs waiting to be sent for ",
    )
    .await;
    let (status, body) = readyz(admin).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("stuck: function echo: outputs waiting to be sent for "),
        "{body}"
    );
}
