//! A changed password file, applied on reload (in-process) and on `SIGHUP`
//! (the real binary): changed and removed entries are refused, revoked
//! connections closed, a malformed file refused with the old entries kept.

use std::process::{Command, Stdio};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_password_file_applies_on_reload_and_disconnects_revoked_devices() {
    if mosquitto_missing() {
        return;
    }
    let users = [("alice", "old-secret"), ("bob", "bob-secret")];
    let Guarded {
        gw,
        port,
        mut alerts,
        pw,
        config,
        _keep,
        ..
    } = guarded("0.0.0.0:0", &users, "").await;
    let (_alice, mut alice_events) = device(port, "alice", "old-secret", "alice-1").await;

    // Change Alice's password, remove Bob, add Carol; then reload as SIGHUP does.
    passwd(&pw, "alice", "new-secret");
    let out = Command::new(edgefn_bin())
        .args(["passwd", "--delete"])
        .arg(&pw)
        .arg("bob")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    passwd(&pw, "carol", "carol-secret");
    let config = edgefn::config::load(&config).unwrap();
    gw.reload(config).await;

    // Alice's open connection, logged in with the old password, is closed.
    tokio::time::timeout(WAIT, async { while alice_events.poll().await.is_ok() {} })
        .await
        .expect("the revoked connection is closed");
    for (login, ok) in [
        (["-u", "alice", "-P", "old-secret"], false),
        (["-u", "bob", "-P", "bob-secret"], false),
        (["-u", "alice", "-P", "new-secret"], true),
        (["-u", "carol", "-P", "carol-secret"], true),
    ] {
        let out = publish(
            port,
            &login,
            &format!("sensors/{}/temperature", login[1]),
            70.0,
        );
        assert_eq!(out.status.success(), ok, "{login:?}");
    }
    for user in ["alice", "carol"] {
        let (topic, _) = alerts.next_json().await;
        assert_eq!(topic, format!("alerts/{user}/temperature"));
    }
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_changed_password_file_in_the_running_binary() {
    use crate::runtime_cli::{stderr_lines, wait_for_line};
    if mosquitto_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("broker.passwd");
    passwd(&pw, "alice", "first-secret");
    let port = free_port();
    let config = write(
        dir.path(),
        "edgefn.toml",
        &secured(
            &format!("0.0.0.0:{port}"),
            &format!("password_file = {}", lit(&pw)),
        ),
    );
    let mut child = Command::new(edgefn_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env("EDGEFN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = stderr_lines(&mut child);
    let child = KillOnDrop(child);
    wait_for_line(&lines, &["Gateway started."]);
    let login = |password: &str| {
        let out = publish(
            port,
            &["-u", "alice", "-P", password],
            "sensors/alice/temperature",
            20.0,
        );
        out.status.success()
    };
    assert!(login("first-secret") && !login("second-secret"));

    passwd(&pw, "alice", "second-secret");
    signal(&child.0, "HUP");
    wait_for_line(&lines, &["password file re-read", "users=1"]);
    assert!(login("second-secret") && !login("first-secret"));

    // A malformed file is refused (the whole reload is: the configuration
    // names it); the entries in force stay.
    std::fs::write(&pw, "alice:plaintext\n").unwrap();
    signal(&child.0, "HUP");
    wait_for_line(&lines, &["broker.password_file:", "broker.passwd:1:"]);
    assert!(login("second-secret"));
    signal(&child.0, "TERM");
    let mut child = child;
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}
