//! The embedded broker's access control, with `mosquitto_pub` and
//! `mosquitto_sub` as the independent clients: anonymous only on loopback,
//! logins from a password file made by `edgefn passwd`, topic rights per
//! device, a TLS listener with and without client certificates, and a
//! changed password file applied on reload. The gateway's own clients (its
//! source and publisher) keep working throughout: every test's alerts come
//! from the `threshold` function.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};

use crate::support::*;

mod abuse;
mod reload;
mod tls;

/// Adds `user` with `password` to the password file at `path`, through
/// `edgefn passwd` reading the password from stdin.
fn passwd(path: &Path, user: &str, password: &str) {
    let mut child = Command::new(edgefn_bin())
        .arg("passwd")
        .arg(path)
        .arg(user)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    assert!(child.wait().unwrap().success(), "edgefn passwd {user}");
}

/// A gateway whose embedded broker has `broker_extra` keys, with the
/// `threshold` function on `sensors/+/temperature`.
fn secured(listen: &str, broker_extra: &str) -> String {
    format!(
        r#"
[gateway]
id = "gw-sec"
data_dir = "data"

[broker]
kind = "embedded"
listen = "{listen}"
{broker_extra}

[[functions]]
name = "threshold"
component = {threshold}
triggers = ["sensors/+/temperature"]
publish = ["alerts/#"]
config = {{ limit = "30" }}
"#,
        threshold = lit(&guest("threshold")),
    )
}

/// Runs a mosquitto client with `args` against `port` on 127.0.0.1.
fn mosquitto(tool: &str, port: u16, args: &[&str]) -> Output {
    Command::new(tool)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .args(args)
        .output()
        .unwrap()
}

fn publish(port: u16, login: &[&str], topic: &str, value: f64) -> Output {
    let payload = format!(r#"{{"value": {value}}}"#);
    let mut args = login.to_vec();
    args.extend(["-q", "1", "-t", topic, "-m", &payload]);
    mosquitto("mosquitto_pub", port, &args)
}

/// A subscriber on the gateway's internal listener, as local functions see
/// the broker: every alert the function raises.
async fn alerts(gw: &edgefn::supervisor::Gateway) -> Subscriber {
    internal(gw, "alerts/#").await
}

/// A subscriber to `filter` on the gateway's internal listener.
async fn internal(gw: &edgefn::supervisor::Gateway, filter: &str) -> Subscriber {
    let (host, port) = gw.local_broker();
    let mut opts = MqttOptions::new(client_id("internal"), host, port);
    if let Some((user, password)) = gw.local_login() {
        opts.set_credentials(user, password);
    }
    Subscriber::connect_with(opts, &[filter]).await
}

fn metric(gw: &edgefn::supervisor::Gateway) -> (u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    let m = gw.metrics();
    (
        m.broker_login_failures.load(Relaxed),
        m.broker_refused_publishes.load(Relaxed),
        m.broker_refused_subscribes.load(Relaxed),
    )
}

fn mosquitto_missing() -> bool {
    if has_mosquitto_clients() {
        return false;
    }
    skip("mosquitto_pub is not installed (apt-get install mosquitto-clients)");
    true
}

#[test]
fn check_and_run_refuse_an_anonymous_network_listener_and_accept_an_explicit_choice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    let run = |cmd: &str, toml: &str| {
        std::fs::write(&path, toml).unwrap();
        Command::new(edgefn_bin())
            .args([cmd, "-c"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let open = secured(&format!("0.0.0.0:{}", free_port()), "");
    for cmd in ["check", "run"] {
        let out = run(cmd, &open);
        let stderr = said(&out);
        assert!(!out.status.success(), "{cmd} accepted an open broker");
        assert!(
            stderr.contains("edgefn.toml: broker.listen:")
                && stderr.contains("is not a loopback address"),
            "{cmd}: {stderr}"
        );
    }
    let explicit = secured(
        &format!("0.0.0.0:{}", free_port()),
        "allow_anonymous = true",
    );
    let out = run("check", &explicit);
    assert!(out.status.success(), "{}", said(&out));
    // Refusing anonymous clients with no way to log in is refused too.
    let nobody = secured("127.0.0.1:0", "allow_anonymous = false");
    let out = run("check", &nobody);
    assert!(
        said(&out).contains("broker.allow_anonymous:"),
        "{}",
        said(&out)
    );
}

/// A gateway of [`secured`] whose broker checks logins against a password
/// file of `users` (made with `edgefn passwd`), plus `extra` `[broker]` keys.
struct Guarded {
    gw: edgefn::supervisor::Gateway,
    /// The guard's plain listener.
    port: u16,
    /// Every alert the function raises.
    alerts: Subscriber,
    /// The password file.
    pw: PathBuf,
    /// The configuration file.
    config: PathBuf,
    /// The folders of the configuration (and data) and the password file:
    /// bind them (`_keep`) for as long as the gateway runs.
    _keep: (tempfile::TempDir, tempfile::TempDir),
}

async fn guarded(listen: &str, users: &[(&str, &str)], extra: &str) -> Guarded {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("broker.passwd");
    for (user, password) in users {
        passwd(&pw, user, password);
    }
    let toml = secured(listen, &format!("password_file = {}\n{extra}", lit(&pw)));
    let (gw, config_dir) = gateway(&toml).await;
    let port = gw.broker_listener("plain").expect("guarded").port();
    let alerts = alerts(&gw).await;
    Guarded {
        gw,
        port,
        alerts,
        pw,
        config: config_dir.path().join("edgefn.toml"),
        _keep: (config_dir, dir),
    }
}

/// A command's stdout and stderr together.
fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_listener_refuses_anonymous_clients_and_wrong_passwords() {
    if mosquitto_missing() {
        return;
    }
    let Guarded {
        gw,
        port,
        mut alerts,
        _keep,
        ..
    } = guarded("0.0.0.0:0", &[("alice", "alice-secret")], "").await;

    // Anonymous: refused (CONNACK 5), for a publisher and a subscriber.
    let out = publish(port, &[], "sensors/alice/temperature", 40.0);
    assert!(!out.status.success(), "anonymous publish accepted");
    let out = mosquitto("mosquitto_sub", port, &["-t", "#", "-C", "1", "-W", "5"]);
    assert!(!out.status.success(), "anonymous subscribe accepted");
    // Wrong password, unknown user: refused (CONNACK 4).
    let out = publish(
        port,
        &["-u", "alice", "-P", "wrong"],
        "sensors/alice/temperature",
        41.0,
    );
    assert!(!out.status.success(), "wrong password accepted");
    let out = publish(
        port,
        &["-u", "mallory", "-P", "alice-secret"],
        "sensors/alice/temperature",
        42.0,
    );
    assert!(!out.status.success(), "unknown user accepted");
    assert!(
        alerts.try_next().is_none(),
        "a refused client's reading got through"
    );
    assert_eq!(metric(&gw).0, 4, "failed logins counted");

    // The right password: the reading reaches the function.
    let out = publish(
        port,
        &["-u", "alice", "-P", "alice-secret"],
        "sensors/alice/temperature",
        43.0,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (topic, alert) = alerts.next_json().await;
    assert_eq!(topic, "alerts/alice/temperature");
    assert_eq!(alert["value"], 43.0);
    assert!(gw.shutdown(WAIT).await);
}

/// A device logged in with rumqttc, to see the broker's answers exactly.
async fn device(
    port: u16,
    user: &str,
    password: &str,
    id: &str,
) -> (AsyncClient, rumqttc::EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_credentials(user, password);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let connack = tokio::time::timeout(WAIT, eventloop.poll())
        .await
        .expect("CONNACK in time");
    assert!(
        matches!(connack, Ok(Event::Incoming(Packet::ConnAck(_)))),
        "{user} logged in: {connack:?}"
    );
    (client, eventloop)
}

/// Polls `eventloop` until `pick` returns something.
async fn until<T>(
    eventloop: &mut rumqttc::EventLoop,
    mut pick: impl FnMut(&Packet) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Incoming(p)) = eventloop.poll().await
                && let Some(t) = pick(&p)
            {
                return t;
            }
        }
    })
    .await
    .expect("the packet arrives in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_publishes_and_reads_only_inside_its_rights() {
    if mosquitto_missing() {
        return;
    }
    let acl = r#"allow_anonymous = false

[[broker.acl]]
publish = ["sensors/{user}/#"]
subscribe = ["alerts/{user}/#"]
"#;
    let users = [("alice", "alice-secret"), ("bob", "bob-secret")];
    let Guarded {
        gw,
        port,
        mut alerts,
        _keep,
        ..
    } = guarded("127.0.0.1:0", &users, acl).await;
    let alice = ["-u", "alice", "-P", "alice-secret"];

    // Alice spoofing Bob's sensor: acknowledged (MQTT 3.1.1 has no refusal)
    // but dropped; her own sensor goes through.
    let out = publish(port, &alice, "sensors/bob/temperature", 50.0);
    assert!(out.status.success());
    let out = publish(port, &alice, "sensors/alice/temperature", 51.0);
    assert!(out.status.success());
    let (topic, alert) = alerts.next_json().await;
    assert_eq!(
        (topic.as_str(), alert["value"].as_f64()),
        ("alerts/alice/temperature", Some(51.0))
    );
    assert_eq!(metric(&gw).1, 1, "the spoofed publish is counted");

    // A will outside her prefix: the login is refused.
    let out = mosquitto(
        "mosquitto_pub",
        port,
        &[
            "-u",
            "alice",
            "-P",
            "alice-secret",
            "--will-topic",
            "sensors/bob/status",
            "--will-payload",
            "x",
            "-t",
            "sensors/alice/x",
            "-m",
            "1",
        ],
    );
    assert!(!out.status.success(), "a will on Bob's topic was accepted");

    // Subscribing: her own alerts yes, Bob's and everything no, in one SUBSCRIBE.
    let (client, mut events) = device(port, "alice", "alice-secret", "alice-1").await;
    client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("alerts/alice/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("alerts/bob/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("#".into(), QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let codes = until(&mut events, |p| match p {
        Packet::SubAck(a) => Some(a.return_codes.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure
        ]
    );
    assert_eq!(metric(&gw).2, 2);
    // mosquitto_sub as Bob sees his own alert, never Alice's.
    let mut bob_sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-V", "mqttv311"])
        .args([
            "-u",
            "bob",
            "-P",
            "bob-secret",
            "-t",
            "alerts/bob/#",
            "-t",
            "alerts/alice/#",
            "-v",
            "-C",
            "1",
            "-W",
            "15",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let bob = ["-u", "bob", "-P", "bob-secret"];
    // mosquitto_sub has no readiness signal: Alice's alert first, then
    // Bob's until he has one; the first line he prints must be his.
    let started = std::time::Instant::now();
    let out = loop {
        publish(port, &alice, "sensors/alice/temperature", 52.0);
        publish(port, &bob, "sensors/bob/temperature", 53.0);
        if bob_sub.try_wait().unwrap().is_some() {
            break bob_sub.wait_with_output().unwrap();
        }
        assert!(started.elapsed() < WAIT, "mosquitto_sub saw nothing");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.starts_with("alerts/bob/temperature "),
        "bob read: {line:?}"
    );
    // Alice's rumqttc session receives her alerts (the granted filter works).
    let topic = until(&mut events, |p| match p {
        Packet::Publish(p) => Some(p.topic.clone()),
        _ => None,
    })
    .await;
    assert_eq!(topic, "alerts/alice/temperature");
    assert!(gw.shutdown(WAIT).await);
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
