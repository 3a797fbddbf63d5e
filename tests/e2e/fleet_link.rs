//! The fleet transport against a real Mosquitto: bundle chunks published
//! (retained) by the deploy code before a gateway connects, the gateway's
//! retained reports (kept while offline), its desired document on every
//! (re)connect, and `edgefn status`.

use std::process::ExitCode;
use std::time::Duration;

use edgefn::cli::{Command, execute};
use edgefn::config::MqttEndpoint;
use edgefn::fleet::chunks::bundle_ref;
use edgefn::fleet::deploy::cloud::{Cloud, publish_bundle};
use edgefn::fleet::deploy::{CloudArgs, StatusArgs};
use edgefn::fleet::link::{self, Link, LinkConfig};
use edgefn::fleet::report::{Health, ReportState, Reported, RunningBundle};
use edgefn::fleet::topics;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::*;

fn endpoint(port: u16, id: &str) -> MqttEndpoint {
    MqttEndpoint {
        host: "127.0.0.1".into(),
        port,
        client_id: client_id(id),
        credentials: None,
        tls: None,
    }
}

fn start_link(port: u16, gw: &str) -> (Link, mpsc::Receiver<Vec<u8>>, CancellationToken) {
    let cancel = CancellationToken::new();
    let (link, rx) = link::start(
        LinkConfig {
            endpoint: endpoint(port, "fleet"),
            gateway_id: gw.into(),
            keep_alive: Duration::from_secs(5),
            max_bundle_bytes: 1 << 20,
        },
        cancel.clone(),
        &TaskTracker::new(),
    );
    (link, rx, cancel)
}

async fn cloud(port: u16) -> Cloud {
    Cloud::connect(&endpoint(port, "deploy"), WAIT)
        .await
        .unwrap()
}

#[tokio::test]
async fn fetch_assembles_a_bundle_published_before_the_gateway_connected() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    // 300,000 bytes: three full 96 KiB chunks and a shorter fourth.
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let r = bundle_ref(&bytes, 7, 96 * 1024).unwrap();
    assert_eq!(r.chunks, 4);
    let mut deployer = cloud(broker.port).await;
    publish_bundle(&mut deployer, &bytes, &r, WAIT)
        .await
        .unwrap();
    drop(deployer);

    let (link, _desired, cancel) = start_link(broker.port, "gw1");
    let fetched = link.fetch(&r, WAIT).await.unwrap();
    assert!(fetched == bytes, "the fetched bundle differs");
    // A bundle whose chunks are not there: a clear timeout, not a hang.
    let missing = bundle_ref(&bytes[..5000], 8, 1024).unwrap();
    let e = link
        .fetch(&missing, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("5 of 5 chunks missing"), "{e}");
    cancel.cancel();
}

#[tokio::test]
async fn reports_are_retained_and_the_latest_waits_for_the_connection() {
    let port = free_port();
    // The broker is not up yet: the gateway reports twice while offline.
    let (link, _desired, cancel) = start_link(port, "gw1");
    link.report(b"{\"n\":1}".to_vec());
    link.report(b"{\"n\":2}".to_vec());
    assert!(!link.connected());
    let Some(_broker) = Mosquitto::start_on(port) else {
        return;
    };
    eventually("the fleet link connects", || link.connected()).await;
    let mut late = Subscriber::connect("127.0.0.1", port, &[&topics::reported("gw1")]).await;
    let (topic, payload) = late.next().await;
    assert_eq!(topic, "edgefn/fleet/gw1/reported");
    assert_eq!(payload, b"{\"n\":2}", "only the latest report is published");
    // Online: each report goes out right away.
    link.report(b"{\"n\":3}".to_vec());
    assert_eq!(late.next().await.1, b"{\"n\":3}");
    cancel.cancel();
}

async fn recv(rx: &mut mpsc::Receiver<Vec<u8>>) -> Vec<u8> {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a desired payload in time")
        .expect("link alive")
}

#[tokio::test]
async fn the_retained_desired_document_arrives_on_connect_and_after_a_reconnect() {
    let Some(mut broker) = Mosquitto::start_persistent(free_port()) else {
        return;
    };
    let port = broker.port;
    let mut deployer = cloud(port).await;
    let topic = topics::desired("gw1");
    deployer
        .publish_retained(vec![(topic.clone(), b"doc-1".to_vec())], WAIT)
        .await
        .unwrap();
    drop(deployer);
    let (link, mut rx, cancel) = start_link(port, "gw1");
    assert_eq!(recv(&mut rx).await, b"doc-1");

    // The broker restarts (keeping its retained messages): the new
    // connection subscribes again and gets the document again.
    broker.stop();
    eventually("the link sees the broker gone", || !link.connected()).await;
    broker.restart();
    assert_eq!(recv(&mut rx).await, b"doc-1");

    // An empty retained payload clears the topic: not delivered.
    let mut deployer = cloud(port).await;
    deployer
        .publish_retained(vec![(topic.clone(), Vec::new())], WAIT)
        .await
        .unwrap();
    deployer
        .publish_retained(vec![(topic, b"doc-2".to_vec())], WAIT)
        .await
        .unwrap();
    assert_eq!(recv(&mut rx).await, b"doc-2");
    cancel.cancel();
}

fn report(gw: &str, version: u64, failures: u64) -> Reported {
    Reported {
        gateway: gw.into(),
        reported_ms: edgefn::fleet::deploy::status::now_ms(),
        state: ReportState::Running,
        bundle: Some(RunningBundle {
            sha256: format!("{version:02}").repeat(32),
            version,
            applied_ms: 1,
        }),
        desired: None,
        functions: vec![],
        since_apply: Health {
            invocations: 10,
            failures,
            breaker_opens: 0,
        },
        last_refusal: None,
        last_error: None,
    }
}

fn status(port: u16, gateways: &[&str]) -> (ExitCode, String) {
    let args = StatusArgs {
        cloud: CloudArgs {
            via: format!("mqtt://127.0.0.1:{port}"),
            ca: None,
            cert: None,
            client_key: None,
            username: None,
            password_file: None,
        },
        gateways: gateways.iter().map(|g| g.to_string()).collect(),
        wait_s: 2,
    };
    let mut out = Vec::new();
    let code = execute(Command::Status(args), &mut out).unwrap();
    (code, String::from_utf8(out).unwrap())
}

#[test]
fn status_prints_the_retained_reports() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut deployer = cloud(broker.port).await;
        let messages = [report("gw1", 3, 0), report("gw2", 4, 2)]
            .iter()
            .map(|r| (topics::reported(&r.gateway), serde_json::to_vec(r).unwrap()))
            .collect();
        deployer.publish_retained(messages, WAIT).await.unwrap();
    });
    let (code, out) = status(broker.port, &["gw1", "gw2"]);
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    let line = |gw: &str| {
        out.lines()
            .find(|l| l.starts_with(gw))
            .unwrap_or_else(|| panic!("no line for {gw}: {out}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        &line("gw1")[..4],
        ["gw1", "running", "3", "030303030303"],
        "{out}"
    );
    assert_eq!(
        &line("gw2")[..6],
        ["gw2", "running", "4", "040404040404", "0", "2"],
        "{out}"
    );
    // Every gateway with a report, without a list.
    let (code, all) = status(broker.port, &[]);
    assert_eq!(code, ExitCode::SUCCESS, "{all}");
    assert!(all.contains("gw1") && all.contains("gw2"), "{all}");
    // A listed gateway without a report: named, and a failure.
    let (code, out) = status(broker.port, &["gw1", "gw9"]);
    assert_eq!(code, ExitCode::FAILURE, "{out}");
    assert!(out.contains("no report from gw9"), "{out}");
}

#[tokio::test]
async fn a_fetch_survives_a_broker_restart() {
    let Some(mut broker) = Mosquitto::start_persistent(free_port()) else {
        return;
    };
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
    let r = bundle_ref(&bytes, 1, 1024).unwrap();
    let chunk = |i: u32| {
        let at = i as usize * 1024;
        (
            topics::chunk(&r.sha256, 1024, i),
            bytes[at..at + 1024].to_vec(),
        )
    };
    // Half the chunks are there when the fetch starts.
    let mut deployer = cloud(broker.port).await;
    deployer
        .publish_retained(vec![chunk(0), chunk(1)], WAIT)
        .await
        .unwrap();
    drop(deployer);
    let (link, _desired, cancel) = start_link(broker.port, "gw1");
    eventually("the fleet link connects", || link.connected()).await;
    let fetch = tokio::spawn({
        let (link, r) = (link.clone(), r.clone());
        async move { link.fetch(&r, WAIT).await }
    });
    broker.stop();
    eventually("the link sees the broker gone", || !link.connected()).await;
    broker.restart();
    let mut deployer = cloud(broker.port).await;
    deployer
        .publish_retained(vec![chunk(2), chunk(3)], WAIT)
        .await
        .unwrap();
    let fetched = fetch.await.unwrap().unwrap();
    assert!(fetched == bytes, "the fetched bundle differs");
    cancel.cancel();
}

#[test]
fn status_and_deploy_connect_over_mutual_tls() {
    let pki = crate::tls::make_pki();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca = file("ca.pem", &pki.ca);
    let server = (
        file("server.pem", &pki.server.0),
        file("server.key", &pki.server.1),
    );
    let client = (
        file("client.pem", &pki.client.0),
        file("client.key", &pki.client.1),
    );
    let Some(broker) = Mosquitto::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        ca.display(),
        server.0.display(),
        server.1.display()
    )) else {
        return;
    };
    let args = |cert: bool| CloudArgs {
        via: format!("mqtts://localhost:{}", broker.port),
        ca: Some(ca.clone()),
        cert: cert.then(|| client.0.clone()),
        client_key: cert.then(|| client.1.clone()),
        username: None,
        password_file: None,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let endpoint = args(true).endpoint("test").unwrap();
        let mut deployer = Cloud::connect(&endpoint, WAIT).await.unwrap();
        let r = report("gw1", 5, 0);
        let message = (topics::reported("gw1"), serde_json::to_vec(&r).unwrap());
        deployer
            .publish_retained(vec![message], WAIT)
            .await
            .unwrap();
    });
    let status = |cert: bool| {
        let mut out = Vec::new();
        let result = execute(
            Command::Status(StatusArgs {
                cloud: args(cert),
                gateways: vec!["gw1".into()],
                wait_s: 2,
            }),
            &mut out,
        );
        (result, String::from_utf8(out).unwrap())
    };
    let (result, out) = status(true);
    assert_eq!(result.unwrap(), ExitCode::SUCCESS, "{out}");
    assert!(out.contains("gw1") && out.contains("050505050505"), "{out}");
    // Without a client certificate the broker refuses the connection.
    let (result, out) = status(false);
    let e = result.unwrap_err().to_string();
    assert!(e.starts_with("connecting to localhost:"), "{e} {out}");
}

#[tokio::test]
async fn chunks_that_do_not_fit_are_dropped_not_fatal() {
    let Some(broker) = Mosquitto::start() else {
        return;
    };
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
    // The same bundle deployed twice: first in four 1 KiB chunks, then in
    // two 2 KiB ones (its leftovers must not mix into the second fetch).
    let small = bundle_ref(&bytes, 1, 1024).unwrap();
    let large = bundle_ref(&bytes, 1, 2048).unwrap();
    let mut deployer = cloud(broker.port).await;
    publish_bundle(&mut deployer, &bytes, &small, WAIT)
        .await
        .unwrap();
    // The second deploy's first chunk, and a retained chunk planted beyond
    // the announced count.
    let chunk = |i: u32| {
        (
            topics::chunk(&large.sha256, 2048, i),
            bytes[i as usize * 2048..][..2048].to_vec(),
        )
    };
    let planted = (topics::chunk(&large.sha256, 2048, 7), vec![0u8; 2048]);
    deployer
        .publish_retained(vec![chunk(0), planted], WAIT)
        .await
        .unwrap();

    let (link, _desired, cancel) = start_link(broker.port, "gw1");
    let fetch = tokio::spawn({
        let (link, r) = (link.clone(), large.clone());
        async move { link.fetch(&r, WAIT).await }
    });
    eventually("the planted chunk is dropped", || link.dropped() >= 1).await;
    assert!(!fetch.is_finished(), "the fetch goes on");
    deployer
        .publish_retained(vec![chunk(1)], WAIT)
        .await
        .unwrap();
    drop(deployer);
    let fetched = fetch.await.unwrap().unwrap();
    assert!(fetched == bytes, "the fetched bundle differs");
    // The 1 KiB deploy still fetches on its own topics.
    assert!(link.fetch(&small, WAIT).await.unwrap() == bytes);

    // A planted right-size chunk with the wrong content: the whole is
    // fetched again a few times, then refused with the hash named.
    let mut deployer = cloud(broker.port).await;
    let wrong = (topics::chunk(&large.sha256, 2048, 1), vec![1u8; 2048]);
    deployer.publish_retained(vec![wrong], WAIT).await.unwrap();
    let e = link.fetch(&large, WAIT).await.unwrap_err();
    assert!(e.to_string().contains("announced"), "{e}");
    cancel.cancel();
}
