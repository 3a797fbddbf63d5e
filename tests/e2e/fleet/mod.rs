//! Fleet deploy end to end: three gateways (the real binary, each with its
//! embedded broker) and Mosquitto as the cloud; bundles built and deployed
//! with the real CLI (`keygen`, `bundle`, `deploy`) and `PUT /bundle`.

mod harness;

use std::time::Duration;

use crate::support::{Publisher, Subscriber, guest, lit, signal};
use harness::{Fleet, TOKEN, cli, relay, version_of};

/// A deploy reaches all three gateways and their functions run; a version
/// that traps on every event is rolled back on the canary and never reaches
/// the other two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_reaches_three_gateways_and_a_trapping_version_is_rolled_back_on_the_canary() {
    let Some(mut fleet) = Fleet::new(&["gw-a", "gw-b", "gw-c"]) else {
        return;
    };
    for b in &mut fleet.boards {
        b.start();
    }
    let key = fleet.key.clone();
    let v1 = fleet.bundle("v1", 1, &relay("echo"), &key);
    let out = fleet
        .deploy(
            &v1,
            "gw-a,gw-b,gw-c",
            &["--canary", "gw-a", "--bake-s", "1"],
        )
        .success();
    assert!(out.text().contains("3 gateways"), "{}", out.text());
    for b in &fleet.boards {
        let r = fleet.reported(&b.id, |r| version_of(r) == Some(1)).await;
        assert_eq!(r["state"], "running", "{r:#}");
        assert!(b.echoes("v1").await, "{} does not run v1", b.id);
    }

    // v2 traps on every event; the canary gets traffic during its bake.
    let v2 = fleet.bundle("v2", 2, &relay("trap"), &key);
    let port = fleet.boards[0].port;
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut sensor = Publisher::connect("127.0.0.1", port).await;
            let mut i = 0u64;
            while !stop.is_cancelled() {
                sensor.publish(&format!("in/{i}"), "x").await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let out = fleet.deploy(
        &v2,
        "gw-a,gw-b,gw-c",
        &["--canary", "gw-a", "--bake-s", "3"],
    );
    stop.cancel();
    let _ = traffic.await;
    assert!(!out.0.status.success(), "{}", out.text());
    assert!(
        out.text().contains("gw-a") && out.text().contains("unhealthy"),
        "{}",
        out.text()
    );
    let a = fleet.reported("gw-a", |r| version_of(r) == Some(1)).await;
    assert_eq!(a["state"], "running", "{a:#}");
    assert!(fleet.boards[0].echoes("back").await, "gw-a runs v1 again");
    for b in &fleet.boards[1..] {
        let r = fleet.reported(&b.id, |r| version_of(r).is_some()).await;
        assert_eq!(version_of(&r), Some(1), "{} must never get v2: {r:#}", b.id);
        assert!(r["desired"]["version"].as_u64() != Some(2), "{r:#}");
    }
}

/// A tampered bundle and one signed by an unknown key are refused (over
/// `PUT /bundle` and over the cloud) and the refusal is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_unknown_key_bundles_are_refused_and_reported() {
    let Some(mut fleet) = Fleet::new(&["gw-t"]) else {
        return;
    };
    fleet.boards[0].start();
    let key = fleet.key.clone();
    let good = fleet.bundle("good", 1, &relay("echo"), &key);

    // Tampered: one byte of the component changed.
    let mut bytes = std::fs::read(&good).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x55;
    let tampered = fleet.root.path().join("tampered.bundle");
    std::fs::write(&tampered, bytes).unwrap();
    let (status, body) = fleet.boards[0].put_bundle(&tampered, false).await;
    assert_eq!(status, 422, "{body:#}");
    assert!(
        body["reason"].as_str().unwrap().contains("tamper")
            || body["reason"].as_str().unwrap().contains("signature"),
        "{body:#}"
    );

    // Signed by a key the gateway does not trust.
    let other = fleet.root.path().join("other");
    cli(&["keygen", "--out", other.to_str().unwrap()]).success();
    let foreign = fleet.bundle("foreign", 5, &relay("echo"), &other.join("edgefn.key"));
    let (status, body) = fleet.boards[0].put_bundle(&foreign, false).await;
    assert_eq!(status, 422, "{body:#}");
    assert!(
        body["reason"].as_str().unwrap().contains("unknown key"),
        "{body:#}"
    );
    let r = fleet
        .reported("gw-t", |r| {
            r["last_refusal"]["reason"]
                .as_str()
                .is_some_and(|s| s.contains("unknown key"))
        })
        .await;
    assert_eq!(r["last_refusal"]["version"], 5, "{r:#}");
    assert!(fleet.boards[0].functions().await.is_empty());

    // Over the cloud: the deploy names the gateway and the reason.
    let out = fleet.deploy(&foreign, "gw-t", &["--timeout-s", "20"]);
    assert!(!out.0.status.success(), "{}", out.text());
    assert!(
        out.text().contains("gw-t") && out.text().contains("unknown key"),
        "{}",
        out.text()
    );

    // The good one still applies.
    let (status, body) = fleet.boards[0].put_bundle(&good, false).await;
    assert_eq!(status, 200, "{body:#}");
    assert!(fleet.boards[0].echoes("good").await);
    let metrics = fleet.boards[0].get("/metrics").await;
    assert!(
        metrics.contains("edgefn_fleet_bundle_version 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgefn_fleet_bundles_total{result=\"applied\"} 1\n"),
        "{metrics}"
    );
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("edgefn_fleet_bundles_total{result=\"refused\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(refused >= 3, "{metrics}");
}

/// A gateway stopped during the deploy converges after it starts again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_stopped_during_the_deploy_converges_when_it_starts_again() {
    let Some(mut fleet) = Fleet::new(&["gw-on", "gw-off"]) else {
        return;
    };
    fleet.boards[0].start();
    let key = fleet.key.clone();
    let v1 = fleet.bundle("v1", 1, &relay("echo"), &key);
    let out = fleet.deploy(&v1, "gw-on,gw-off", &["--timeout-s", "8"]);
    assert!(!out.0.status.success(), "{}", out.text());
    assert!(out.text().contains("gw-off"), "{}", out.text());
    fleet.reported("gw-on", |r| version_of(r) == Some(1)).await;

    fleet.boards[1].start();
    fleet.reported("gw-off", |r| version_of(r) == Some(1)).await;
    assert!(fleet.boards[1].echoes("late").await);
    let status = cli(&[
        "status",
        "--via",
        &fleet.via(),
        "--gateways",
        "gw-on,gw-off",
    ])
    .success();
    assert!(status.text().contains("gw-off"), "{}", status.text());
}

/// A bundle's functions run beside the configuration file's: a bundle
/// function named like a file function is refused, and `SIGHUP` applies the
/// file's changes and keeps the bundle's functions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_functions_live_beside_the_files_and_survive_sighup() {
    let Some(mut fleet) = Fleet::new(&["gw-h"]) else {
        return;
    };
    let local = |name: &str| {
        format!(
            "\n[[functions]]\nname = \"{name}\"\ncomponent = {}\ntriggers = [\"{name}/#\"]\npublish = [\"echo/#\"]\nconfig = {{ mode = \"echo\" }}\n",
            lit(&guest("misbehave"))
        )
    };
    fleet.boards[0].append_config(&local("local"));
    fleet.boards[0].start();
    let key = fleet.key.clone();
    let v1 = fleet.bundle("v1", 1, &relay("echo"), &key);
    let (status, body) = fleet.boards[0].put_bundle(&v1, false).await;
    assert_eq!(status, 200, "{body:#}");
    assert_eq!(body["added"], serde_json::json!(["relay"]), "{body:#}");
    assert_eq!(fleet.boards[0].functions().await, ["local", "relay"]);

    let clash = fleet.bundle(
        "clash",
        2,
        &relay("echo").replace("\"relay\"", "\"local\""),
        &key,
    );
    let (status, body) = fleet.boards[0].put_bundle(&clash, false).await;
    assert_eq!(status, 422, "{body:#}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("duplicate function name `local`"),
        "{body:#}"
    );

    fleet.boards[0].append_config(&local("local2"));
    signal(&fleet.boards[0].child.as_ref().unwrap().0, "HUP");
    fleet.boards[0].wait_log(&["Configuration reloaded."]);
    assert_eq!(
        fleet.boards[0].functions().await,
        ["local", "local2", "relay"]
    );
    assert!(
        fleet.boards[0].echoes("after-hup").await,
        "relay still runs"
    );
}

/// A replayed desired document, even a forced one, cannot roll a gateway
/// back: not after a later deploy, not after a bundle came by `PUT /bundle`,
/// not after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_forced_desired_document_is_refused() {
    let Some(mut fleet) = Fleet::new(&["gw-r"]) else {
        return;
    };
    fleet.boards[0].start();
    let key = fleet.key.clone();
    let v1 = fleet.bundle("v1", 1, &relay("echo"), &key);
    fleet.deploy(&v1, "gw-r", &["--force"]).success();
    // What anyone with the broker's read rights can record.
    let desired = "edgefn/fleet/gw-r/desired";
    let mut recorder = Subscriber::connect("127.0.0.1", fleet.cloud.port, &[desired]).await;
    let (_, recorded) = recorder.next().await;
    drop(recorder);
    let v2 = fleet.bundle("v2", 2, &relay("echo"), &key);
    fleet.deploy(&v2, "gw-r", &[]).success();
    let v3 = fleet.bundle("v3", 3, &relay("echo"), &key);
    let (status, body) = fleet.boards[0].put_bundle(&v3, false).await;
    assert_eq!(status, 200, "{body:#}");

    // After a restart the retained (already applied) v2 document comes
    // again: the bundle put since then stays.
    fleet.boards[0].kill();
    fleet.boards[0].start();
    let mut attacker = Publisher::connect("127.0.0.1", fleet.cloud.port).await;
    attacker.publish(desired, recorded).await;
    let r = fleet
        .reported("gw-r", |r| {
            r["last_refusal"]["reason"]
                .as_str()
                .is_some_and(|s| s.contains("older than one already applied"))
        })
        .await;
    assert_eq!(version_of(&r), Some(3), "{r:#}");
    assert_eq!(r["last_refusal"]["version"], 1, "{r:#}");
}

/// Without `admin.token`, `PUT /bundle` is refused (reading the metrics on
/// loopback needs no token; changing what runs does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_bundle_needs_the_admin_token() {
    let Some(mut fleet) = Fleet::new(&["gw-n"]) else {
        return;
    };
    let path = fleet.boards[0].dir.join("edgefn.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace(&format!("token = \"{TOKEN}\"\n"), "")).unwrap();
    fleet.boards[0].start();
    let key = fleet.key.clone();
    let v1 = fleet.bundle("v1", 1, &relay("echo"), &key);
    let (status, body) = fleet.boards[0].put_bundle(&v1, false).await;
    assert_eq!(status, 403, "{body:#}");
    assert!(
        body["reason"].as_str().unwrap().contains("admin.token"),
        "{body:#}"
    );
}

/// Ten functions counting their events in durable state.
fn counters(mode: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[functions]]\nname = \"f{i}\"\ncomponent = {}\ntriggers = [\"in/{i}\"]\npublish = [\"echo/#\", \"count/#\"]\nconfig = {{ mode = \"{mode}\" }}\n",
                lit(&guest("misbehave"))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `kill -9` during an apply leaves, after a restart, the old set or the new
/// one (never a mix), with the functions' state intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_apply_leaves_the_old_set_or_the_new_one() {
    let Some(mut fleet) = Fleet::new(&["gw-k"]) else {
        return;
    };
    let key = fleet.key.clone();
    let old = fleet.bundle("old", 1, &relay("count"), &key);
    let new = fleet.bundle("new", 2, &counters("echo", 10), &key);
    let board = &mut fleet.boards[0];
    board.start();
    let (status, body) = board.put_bundle(&old, false).await;
    assert_eq!(status, 200, "{body:#}");
    // `count` keeps a counter in the durable key-value state.
    let mut counts = Subscriber::connect("127.0.0.1", board.port, &["count/#"]).await;
    let mut sensor = Publisher::connect("127.0.0.1", board.port).await;
    for _ in 0..3 {
        sensor.publish("in/x", "x").await;
        counts.next().await;
    }
    drop(sensor);
    drop(counts);

    let admin = board.admin;
    let bytes = std::fs::read(&new).unwrap();
    let put = tokio::spawn(async move {
        let _ = reqwest::Client::new()
            .put(format!("http://127.0.0.1:{admin}/bundle"))
            .bearer_auth(TOKEN)
            .body(bytes)
            .send()
            .await;
    });
    board.wait_log(&["Fleet: applying bundle"]);
    board.kill();
    let _ = put.await;

    board.start();
    let names = board.functions().await;
    let old_set = vec!["relay".to_owned()];
    let new_set: Vec<String> = {
        let mut v: Vec<String> = (0..10).map(|i| format!("f{i}")).collect();
        v.sort();
        v
    };
    assert!(names == old_set || names == new_set, "a mix: {names:?}");
    if names == old_set {
        let mut counts = Subscriber::connect("127.0.0.1", board.port, &["count/#"]).await;
        let mut sensor = Publisher::connect("127.0.0.1", board.port).await;
        sensor.publish("in/x", "x").await;
        let (_, payload) = counts.next().await;
        assert_eq!(String::from_utf8_lossy(&payload), "4", "state lost");
    }
}
