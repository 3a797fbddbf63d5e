//! Cloud commands: an MQTT sink with `subscribe` receives messages from its
//! (cloud) broker on a persistent session; they trigger functions like local
//! messages (with the attribute `sink`), are acknowledged only once handled,
//! and wait at the broker while the gateway is away. Mosquitto plays the
//! cloud, in plain TCP and mutual TLS.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttc::{MqttOptions, Transport};

use crate::support::*;
use crate::tls::make_pki;

/// A gateway whose function `answer` takes `commands/+/#` and forwards
/// `[topic, payload, attributes]` to the sink `cloud`, which subscribes to
/// `commands/{gateway}/#` and publishes on `answers/{gateway}`.
fn answer_config(header: &str, url: &str, sink_extra: &str) -> String {
    format!(
        r#"
{header}
[[functions]]
name = "answer"
component = {misbehave}
triggers = ["commands/+/#"]
sinks = ["cloud"]
config = {{ mode = "answer" }}

[[sinks]]
kind = "mqtt"
name = "cloud"
url = "{url}"
topic = "answers/{{gateway}}"
subscribe = ["commands/{{gateway}}/#"]
{sink_extra}
"#,
        misbehave = lit(&guest("misbehave")),
    )
}

/// Publishes `commands/<gw>/probe-<i>` until an answer comes back (the
/// sink's subscription exists from then on); returns that answer's payload.
async fn probe(cloud: &mut Publisher, answers: &mut Subscriber, gw: &str) -> serde_json::Value {
    let started = Instant::now();
    for i in 0.. {
        cloud
            .publish(&format!("commands/{gw}/probe"), format!("probe-{i}"))
            .await;
        if let Some((_, body)) = answers.next_within(Duration::from_millis(300)).await {
            let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
            return envelope["payload"].clone();
        }
        assert!(started.elapsed() < WAIT, "no answer to any probe");
    }
    unreachable!()
}

/// The attribute `key` of an answer (`[topic, payload, [[k, v], …]]`).
fn attribute<'a>(answer: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    answer[2]
        .as_array()?
        .iter()
        .find(|kv| kv[0] == key)
        .and_then(|kv| kv[1].as_str())
}

/// A command round trip: the command triggers the function, whose forward
/// to the same sink reaches the cloud; the event says which sink it came
/// from; it is acknowledged.
async fn round_trip(gw_id: &str, toml: &str, cloud: &mut Publisher, answers: &mut Subscriber) {
    let (gw, _dir) = gateway(toml).await;
    let answer = probe(cloud, answers, gw_id).await;
    assert_eq!(answer[0], format!("commands/{gw_id}/probe"));
    assert_eq!(attribute(&answer, "sink"), Some("cloud"), "{answer}");
    assert_eq!(attribute(&answer, "qos"), Some("1"), "{answer}");

    cloud.publish(&format!("commands/{gw_id}/set"), "on").await;
    let (topic, envelope) = loop {
        let (topic, envelope) = answers.next_json().await;
        if envelope["payload"][1] == "on" {
            break (topic, envelope);
        }
    };
    assert_eq!(topic, format!("answers/{gw_id}"));
    assert_eq!(envelope["payload"][0], format!("commands/{gw_id}/set"));
    assert_eq!(envelope["gateway"], gw_id);

    let stats = gw.sink_stats("cloud").unwrap().clone();
    let received = stats.commands_received.load(Ordering::Relaxed);
    assert!(received >= 2, "commands received: {received}");
    eventually("every command acknowledged", || {
        stats.commands_acked.load(Ordering::Relaxed)
            == stats.commands_received.load(Ordering::Relaxed)
    })
    .await;
    // The plain test's gateway has an admin endpoint: the counters are
    // exposed there.
    if let Some(addr) = gw.admin_addr() {
        let (_, text) = crate::operations::get(addr, "/metrics", None).await;
        let m = crate::operations::parse(&text);
        let sample =
            |name: &str| crate::operations::value(&m, &format!("{name}{{sink=\"cloud\"}}"));
        let received = stats.commands_received.load(Ordering::Relaxed) as f64;
        assert_eq!(sample("edgefn_sink_commands_total"), received);
        assert_eq!(sample("edgefn_sink_commands_acked_total"), received);
    } else {
        assert_ne!(gw_id, "gw-cmd", "the plain test scrapes /metrics");
    }
    assert!(gw.shutdown(WAIT).await, "the gateway drains and stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_commands_trigger_functions_and_answers_go_back_to_the_cloud() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let port = mosquitto.port;
    let mut answers = Subscriber::connect("127.0.0.1", port, &["answers/#"]).await;
    let mut cloud = Publisher::connect("127.0.0.1", port).await;
    let toml = answer_config(
        &gateway_header("gw-cmd"),
        &format!("mqtt://127.0.0.1:{port}"),
        "",
    ) + "\n[admin]\nlisten = \"127.0.0.1:0\"\n";
    round_trip("gw-cmd", &toml, &mut cloud, &mut answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_commands_arrive_over_mqtt5() {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let port = mosquitto.port;
    let mut answers = Subscriber::connect("127.0.0.1", port, &["answers/#"]).await;
    let mut cloud = Publisher::connect("127.0.0.1", port).await;
    let toml = answer_config(
        &gateway_header("gw-cmd-v5"),
        &format!("mqtt://127.0.0.1:{port}"),
        "protocol = \"5\"",
    );
    round_trip("gw-cmd-v5", &toml, &mut cloud, &mut answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_commands_arrive_over_mutual_tls() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let ca = write("ca.pem", &pki.ca);
    let server_cert = write("server.pem", &pki.server.0);
    let server_key = write("server.key", &pki.server.1);
    let client_cert = write("client.pem", &pki.client.0);
    let client_key = write("client.key", &pki.client.1);
    let Some(mosquitto) = Mosquitto::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        ca.display(),
        server_cert.display(),
        server_key.display()
    )) else {
        return;
    };
    let port = mosquitto.port;
    let tls_opts = |kind: &str| {
        let mut opts = MqttOptions::new(client_id(kind), "localhost", port);
        opts.set_transport(Transport::tls(
            pki.ca.clone().into_bytes(),
            Some((
                pki.client.0.clone().into_bytes(),
                pki.client.1.clone().into_bytes(),
            )),
            None,
        ));
        opts
    };
    let mut answers = Subscriber::connect_with(tls_opts("answers"), &["answers/#"]).await;
    let mut cloud = Publisher::connect_with(tls_opts("cloud")).await;
    let toml = answer_config(
        &gateway_header("gw-cmd-tls"),
        &format!("mqtts://localhost:{port}"),
        &format!(
            "tls = {{ ca = {}, cert = {}, key = {} }}",
            lit(&ca),
            lit(&client_cert),
            lit(&client_key)
        ),
    );
    round_trip("gw-cmd-tls", &toml, &mut cloud, &mut answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_while_the_gateway_is_stopped_are_handled_after_its_restart() {
    commands_wait_for_a_restart("gw-cmd-restart", "").await;
}

/// Over MQTT 5 the session outlives the connection only with a session
/// expiry interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_wait_for_a_restart_over_mqtt5_too() {
    commands_wait_for_a_restart("gw-cmd-restart-v5", "protocol = \"5\"").await;
}

async fn commands_wait_for_a_restart(gw_id: &str, sink_extra: &str) {
    let Some(mosquitto) = Mosquitto::start() else {
        return;
    };
    let port = mosquitto.port;
    let mut answers = Subscriber::connect("127.0.0.1", port, &["answers/#"]).await;
    let mut cloud = Publisher::connect("127.0.0.1", port).await;
    let (config, _dir) = config(&answer_config(
        &gateway_header(gw_id),
        &format!("mqtt://127.0.0.1:{port}"),
        sink_extra,
    ));
    // A first run creates the persistent session on the cloud broker.
    let gw = edgefn::supervisor::Gateway::start(&config).await.unwrap();
    probe(&mut cloud, &mut answers, gw_id).await;
    assert!(gw.shutdown(WAIT).await);

    // Stopped: the cloud broker keeps the commands for the session.
    let n = 30;
    for i in 0..n {
        cloud
            .publish(&format!("commands/{gw_id}/n{i}"), format!("cmd-{i}"))
            .await;
    }
    let gw = edgefn::supervisor::Gateway::start(&config).await.unwrap();
    let mut seen = BTreeSet::new();
    while seen.len() < n {
        let (_, envelope) = answers.next_json().await;
        let payload = envelope["payload"][1]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if payload.starts_with("cmd-") {
            assert_eq!(attribute(&envelope["payload"], "sink"), Some("cloud"));
            seen.insert(payload);
        }
    }
    let stats = gw.sink_stats("cloud").unwrap().clone();
    eventually("the queued commands acknowledged", || {
        stats.commands_acked.load(Ordering::Relaxed) >= n as u64
    })
    .await;
    assert!(gw.shutdown(WAIT).await);
}

/// Runs the `edgefn` binary.
fn spawn_gateway(config: &std::path::Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(edgefn_bin())
            .args(["run", "--config"])
            .arg(config)
            .env("EDGEFN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A command is acknowledged only once handled: a gateway killed while its
/// function still works on the command gets it again on the next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_not_yet_handled_when_the_gateway_is_killed_comes_again() {
    let (Some(local), Some(cloud_broker)) = (Mosquitto::start(), Mosquitto::start()) else {
        return;
    };
    let mut echoes = Subscriber::connect("127.0.0.1", local.port, &["echo/#"]).await;
    let mut answers = Subscriber::connect("127.0.0.1", cloud_broker.port, &["answers/#"]).await;
    let mut cloud = Publisher::connect("127.0.0.1", cloud_broker.port).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    // `seen` reports each command on the local broker; `work` handles it
    // (first run: never finishes; second run: answers).
    let write_config = |mode: &str| {
        let toml = format!(
            r#"
[gateway]
id = "gw-cmd-kill"
data_dir = "data"

[broker]
kind = "external"
url = "mqtt://127.0.0.1:{local}"

[[functions]]
name = "seen"
component = {misbehave}
triggers = ["commands/+/#"]
publish = ["echo/#"]

[[functions]]
name = "work"
component = {misbehave}
triggers = ["commands/+/#"]
sinks = ["cloud"]
config = {{ mode = "{mode}" }}
limits = {{ timeout_ms = 60000 }}

[[sinks]]
kind = "mqtt"
name = "cloud"
url = "mqtt://127.0.0.1:{cloud}"
topic = "answers/{{gateway}}"
subscribe = ["commands/{{gateway}}/#"]
"#,
            local = local.port,
            cloud = cloud_broker.port,
            misbehave = lit(&guest("misbehave")),
        );
        std::fs::write(&path, toml).unwrap();
    };
    write_config("sleep");
    let mut child = spawn_gateway(&path);
    // Probe until `seen` reports a command: the gateway has taken it, and
    // `work` is stuck on it (or on an earlier one), so it is unacknowledged.
    let started = Instant::now();
    let mut i = 0;
    let taken = loop {
        cloud
            .publish("commands/gw-cmd-kill/probe", format!("probe-{i}"))
            .await;
        i += 1;
        if let Some((_, body)) = echoes.next_within(Duration::from_millis(300)).await {
            break String::from_utf8(body).unwrap();
        }
        assert!(started.elapsed() < WAIT, "the gateway never took a command");
    };
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(answers.try_next().is_none(), "nothing was answered");

    write_config("answer");
    let mut child = spawn_gateway(&path);
    let answer = loop {
        let (_, envelope) = answers.next_json().await;
        if envelope["payload"][1] == taken.as_str() {
            break envelope["payload"].clone();
        }
    };
    assert_eq!(
        attribute(&answer, "dup"),
        Some("true"),
        "redelivered: {answer}"
    );
    assert_eq!(attribute(&answer, "sink"), Some("cloud"));
    crate::support::signal(&child.0, "TERM");
    assert!(child.0.wait().unwrap().success());
}

/// Loads `toml` and returns its error text.
fn config_error(toml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edgefn.toml");
    std::fs::write(&path, toml).unwrap();
    edgefn::config::load(&path).unwrap_err().to_string()
}

#[test]
fn subscribe_errors_name_the_key() {
    let function = format!(
        "[[functions]]\nname = \"answer\"\ncomponent = {}\ntriggers = [\"commands/+/#\"]\n",
        lit(&guest("misbehave"))
    );
    let header = "[gateway]\nid = \"gw\"\n";
    let err = config_error(&format!(
        "{header}{function}\n[[sinks]]\nkind = \"http\"\nname = \"web\"\nurl = \"http://127.0.0.1:1/\"\nsubscribe = [\"commands/#\"]\n"
    ));
    assert!(
        err.contains("edgefn.toml: sinks[0].subscribe: only MQTT sinks can subscribe"),
        "{err}"
    );

    let err = config_error(&format!(
        "{header}{function}\n[[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\nurl = \"mqtt://127.0.0.1:1\"\nsubscribe = [\"commands/{{gateway}}/#\", \"commands/#/x\", \"\"]\n"
    ));
    assert!(
        err.contains(
            "edgefn.toml: sinks[0].subscribe[1]: `commands/#/x` is not a valid MQTT topic filter"
        ),
        "{err}"
    );
    assert!(
        err.contains("edgefn.toml: sinks[0].subscribe[2]: "),
        "{err}"
    );
    assert!(!err.contains("subscribe[0]"), "{err}");

    // No function would ever see these commands: refused, not discarded.
    let err = config_error(&format!(
        "{header}{function}\n[[sinks]]\nkind = \"mqtt\"\nname = \"cloud\"\nurl = \"mqtt://127.0.0.1:1\"\nsubscribe = [\"commands/{{gateway}}/#\", \"ota/{{gateway}}\"]\n"
    ));
    assert!(
        err.contains("edgefn.toml: sinks[0].subscribe[1]: no function's `triggers` match `ota/gw`"),
        "{err}"
    );
    assert!(!err.contains("subscribe[0]"), "{err}");
}

/// A cloud broker that lost the session (a restart without persistence):
/// the sink subscribes again on the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_subscribes_again_when_the_cloud_broker_lost_its_session() {
    let port = free_port();
    let Some(mut mosquitto) = Mosquitto::start_on(port) else {
        return;
    };
    let toml = answer_config(
        &gateway_header("gw-cmd-resub"),
        &format!("mqtt://127.0.0.1:{port}"),
        "",
    );
    let (gw, _dir) = gateway(&toml).await;
    {
        let mut answers = Subscriber::connect("127.0.0.1", port, &["answers/#"]).await;
        let mut cloud = Publisher::connect("127.0.0.1", port).await;
        probe(&mut cloud, &mut answers, "gw-cmd-resub").await;
    }
    let stats = gw.sink_stats("cloud").unwrap().clone();
    mosquitto.stop();
    mosquitto.restart();
    eventually("the sink reconnected", || {
        stats.connects.load(Ordering::Relaxed) >= 2
    })
    .await;
    let mut answers = Subscriber::connect("127.0.0.1", port, &["answers/#"]).await;
    let mut cloud = Publisher::connect("127.0.0.1", port).await;
    let answer = probe(&mut cloud, &mut answers, "gw-cmd-resub").await;
    assert_eq!(attribute(&answer, "sink"), Some("cloud"));
    assert!(gw.shutdown(WAIT).await);
}

/// With `subscribe` the sink's connection has a persistent session; its
/// outbox-driven delivery is unchanged: across a cloud outage every
/// forwarded reading arrives, each under one id, and commands work after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_taking_commands_loses_no_record_across_a_cloud_outage() {
    let port = free_port();
    let Some(mut mosquitto) = Mosquitto::start_persistent(port) else {
        return;
    };
    let mut cloud_sub = persistent_subscriber(port, "cloud-watcher-cmd", &["cloud/#"]).await;
    let header = format!(
        "{}\n[[functions]]\nname = \"answer\"\ncomponent = {}\ntriggers = [\"commands/+/#\"]\nsinks = [\"cloud\"]\nconfig = {{ mode = \"answer\" }}\n",
        gateway_header("gw-cmd-outage"),
        lit(&guest("misbehave"))
    );
    let toml =
        crate::durability::enrich_config(&header, port, "subscribe = [\"commands/{gateway}/#\"]");
    let (gw, _dir) = gateway(&toml).await;
    let (host, lport) = gw.local_broker();
    let mut sensor = Publisher::connect(host, lport).await;
    let n = 600;
    for i in 0..n / 2 {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
            .await;
    }
    mosquitto.stop();
    for i in n / 2..n {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
            .await;
    }
    mosquitto.restart();
    let seen =
        crate::durability::collect_range(&mut cloud_sub, 0, n, Duration::from_secs(120)).await;
    for (reading, ids) in &seen {
        assert_eq!(ids.len(), 1, "reading {reading} under several ids: {ids:?}");
    }
    let outbox = gw.outbox().sink_stats("cloud").unwrap();
    eventually("the outbox drains", || {
        outbox.rows.load(Ordering::Relaxed) == 0
    })
    .await;
    let stats = gw.sink_stats("cloud").unwrap();
    assert!(
        stats.failures.load(Ordering::Relaxed) >= 1,
        "the outage was noticed"
    );
    assert!(
        stats.delivered.load(Ordering::Relaxed) >= n,
        "delivered: {}",
        stats.delivered.load(Ordering::Relaxed)
    );
    // Commands still arrive (answers go to `cloud/…` like the readings).
    let mut cloud = Publisher::connect("127.0.0.1", port).await;
    cloud.publish("commands/gw-cmd-outage/ping", "after").await;
    loop {
        let (topic, body) = cloud_sub.next().await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if v["function"] == "answer" {
            assert_eq!(topic, "cloud/gw-cmd-outage/commands/gw-cmd-outage/ping");
            assert_eq!(attribute(&v["payload"], "sink"), Some("cloud"));
            break;
        }
    }
    assert!(gw.shutdown(WAIT).await);
}
