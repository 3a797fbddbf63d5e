//! Sink kinds: HTTP (retries with back-off, dead letters), MQTT 5 with the
//! idempotency key as a user property, and batching.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::support::*;

/// What the test HTTP server does with the next request.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Reply {
    Status(u16),
    Hang,
    Drop,
}

/// A request the test server answered 200: body, `Idempotency-Key`, and all
/// headers (names lower-cased).
pub(crate) type Accepted = (Vec<u8>, String, Vec<(String, String)>);

/// A tiny scripted HTTP/1.1 server: answers each request per the script
/// (then 200), and records the requests it answered 200 to.
pub(crate) struct Server {
    pub(crate) port: u16,
    pub(crate) accepted: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
    pub(crate) requests: Arc<Mutex<u32>>,
    /// TLS handshakes that failed (e.g. no valid client certificate).
    pub(crate) refused: Arc<Mutex<u32>>,
}

async fn server(script: Vec<Reply>) -> Server {
    server_with(script, None).await
}

/// [`server`] over TLS with `tls` when given.
pub(crate) async fn server_with(
    script: Vec<Reply>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve(listener, script, tls)
}

/// [`server`] on `port` (e.g. one a sink already retries against).
pub(crate) async fn server_on(port: u16, script: Vec<Reply>) -> Server {
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    serve(listener, script, None)
}

fn serve(
    listener: TcpListener,
    script: Vec<Reply>,
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> Server {
    let port = listener.local_addr().unwrap().port();
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let requests = Arc::new(Mutex::new(0u32));
    let refused = Arc::new(Mutex::new(0u32));
    let (tx, accepted) = tokio::sync::mpsc::unbounded_channel();
    let conn = Conn {
        script,
        tx,
        counter: requests.clone(),
    };
    let failed = refused.clone();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let conn = conn.clone();
            let acceptor = acceptor.clone();
            let failed = failed.clone();
            tokio::spawn(async move {
                match acceptor {
                    None => conn.serve(stream).await,
                    Some(a) => match a.accept(stream).await {
                        Ok(s) => conn.serve(s).await,
                        Err(_) => *failed.lock().unwrap() += 1,
                    },
                }
            });
        }
    });
    Server {
        port,
        accepted,
        requests,
        refused,
    }
}

/// One connection's share of the server.
#[derive(Clone)]
struct Conn {
    script: Arc<Mutex<VecDeque<Reply>>>,
    tx: tokio::sync::mpsc::UnboundedSender<Accepted>,
    counter: Arc<Mutex<u32>>,
}

impl Conn {
    async fn serve(self, stream: impl AsyncRead + AsyncWrite + Unpin) {
        let mut reader = BufReader::new(stream);
        loop {
            let mut len = 0usize;
            let mut key = String::new();
            let mut headers = Vec::new();
            let mut line = String::new();
            // Request line and headers.
            let mut first = true;
            loop {
                line.clear();
                if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let l = line.trim_end();
                if l.is_empty() && !first {
                    break;
                }
                first = false;
                if let Some((name, value)) = l.split_once(':') {
                    headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
                }
                let lower = l.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if let Some(v) = lower.strip_prefix("idempotency-key:") {
                    key = v.trim().to_owned();
                }
            }
            let mut body = vec![0u8; len];
            if reader.read_exact(&mut body).await.is_err() {
                return;
            }
            *self.counter.lock().unwrap() += 1;
            let reply = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Reply::Status(200));
            let status = match reply {
                Reply::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                Reply::Drop => return,
                Reply::Status(s) => s,
            };
            let text = if status == 200 {
                "ok"
            } else {
                "nope: bad record"
            };
            let resp = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
            if reader.get_mut().write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            if status == 200 {
                let _ = self.tx.send((body, key, headers));
            }
        }
    }
}

fn http_config(id: &str, port: u16, batch: &str) -> String {
    format!(
        r#"
{header}
[outbox]
max_commits_per_sec = 100

[[functions]]
name = "enrich"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["web"]
config = {{ sink = "web" }}

[[sinks]]
kind = "http"
name = "web"
url = "http://127.0.0.1:{port}/ingest"
timeout_ms = 300
max_backoff_ms = 200
bearer_token = "secret"
{batch}
"#,
        header = gateway_header(id),
        enrich = lit(&guest("enrich")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_retries_through_errors_hangs_and_drops_until_delivered() {
    let mut srv = server(vec![
        Reply::Status(500),
        Reply::Hang,
        Reply::Drop,
        Reply::Status(503),
    ])
    .await;
    let (gw, _dir) = gateway(&http_config(
        "gw-http",
        srv.port,
        "batch_max = 10\nbatch_linger_ms = 50",
    ))
    .await;
    let (host, port) = gw.local_broker();
    let mut sensor = Publisher::connect(host, port).await;
    for i in 0..3 {
        sensor
            .publish("sensors/s1/temperature", format!("{{\"value\": {i}}}"))
            .await;
    }
    let mut readings = Vec::new();
    while readings.len() < 3 {
        let (body, key, _) = tokio::time::timeout(WAIT, srv.accepted.recv())
            .await
            .unwrap()
            .unwrap();
        let batch: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let batch = batch.as_array().unwrap();
        assert!(key.starts_with("gw-http-"), "{key}");
        for e in batch {
            readings.push(e["payload"]["celsius"].as_f64().unwrap() as u64);
        }
    }
    readings.sort();
    assert_eq!(readings, [0, 1, 2]);
    assert!(
        *srv.requests.lock().unwrap() >= 5,
        "4 failures, then success"
    );
    let stats = gw.sink_stats("web").unwrap();
    assert!(stats.failures.load(std::sync::atomic::Ordering::Relaxed) >= 4);
    let outbox = gw.outbox().sink_stats("web").unwrap();
    eventually("confirmed rows deleted", || {
        outbox.rows.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_dead_letters_a_rejected_batch_and_goes_on() {
    let mut srv = server(vec![Reply::Status(400)]).await;
    let (gw, _dir) = gateway(&http_config("gw-http-dl", srv.port, "batch_max = 1")).await;
    let (host, port) = gw.local_broker();
    let mut dead = Subscriber::connect(host, port, &["edgefn/deadletter/#"]).await;
    let mut sensor = Publisher::connect(host, port).await;
    sensor
        .publish("sensors/s1/temperature", r#"{"value": 1}"#)
        .await;
    let (topic, letter) = dead.next_json().await;
    assert_eq!(topic, "edgefn/deadletter/sinks/web");
    assert!(
        letter["reason"].as_str().unwrap().starts_with("HTTP 400"),
        "{letter}"
    );
    assert!(
        letter["reason"]
            .as_str()
            .unwrap()
            .contains("nope: bad record"),
        "{letter}"
    );
    assert_eq!(letter["records"][0]["payload"]["celsius"], 1.0);
    sensor
        .publish("sensors/s1/temperature", r#"{"value": 2}"#)
        .await;
    let (body, _, _) = tokio::time::timeout(WAIT, srv.accepted.recv())
        .await
        .unwrap()
        .unwrap();
    let batch: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(batch[0]["payload"]["celsius"], 2.0);
    assert!(gw.shutdown(WAIT).await);
}

/// MQTT 5 batches: each message's `idempotency-key` names its first and last
/// record, and a batch never mixes rendered topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_sink_sends_the_idempotency_key_and_batches() {
    let Some(cloud) = Mosquitto::start() else {
        return;
    };
    let toml = format!(
        r#"
{header}
[[functions]]
name = "enrich"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["cloud"]

[[sinks]]
kind = "mqtt"
name = "cloud"
url = "mqtt://127.0.0.1:{port}"
protocol = "5"
topic = "v5/{{gateway}}/{{topic}}"
batch_max = 5
batch_linger_ms = 200
"#,
        header = gateway_header("gw-v5"),
        enrich = lit(&guest("enrich")),
        port = cloud.port,
    );
    // An MQTT 5 subscriber, to see the user property.
    use rumqttc::v5::mqttbytes::v5::Packet;
    let mut opts = rumqttc::v5::MqttOptions::new(client_id("v5-sub"), "127.0.0.1", cloud.port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 100);
    client
        .subscribe("v5/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::v5::Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(None);
                }
                Ok(rumqttc::v5::Event::Incoming(Packet::Publish(p))) => {
                    let props = p.properties.map(|p| p.user_properties).unwrap_or_default();
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let _ = tx.send(Some((topic, p.payload.to_vec(), props)));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    assert!(
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
            .is_none(),
        "suback first"
    );

    let (gw, _dir) = gateway(&toml).await;
    let (host, port) = gw.local_broker();
    let mut sensor = Publisher::connect(host, port).await;
    // Two sensors, so two rendered topics, within one linger period.
    let sensors = ["s1", "s1", "s2", "s2", "s2", "s1", "s1"];
    for (i, s) in sensors.iter().enumerate() {
        sensor
            .publish(
                &format!("sensors/{s}/temperature"),
                format!("{{\"value\": {i}}}"),
            )
            .await;
    }
    let mut readings = Vec::new();
    let mut batches = 0;
    while readings.len() < sensors.len() {
        let (topic, payload, props) = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let batch: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        let batch = batch.as_array().expect("batches are arrays").clone();
        let key = props
            .iter()
            .find(|(k, _)| k == "idempotency-key")
            .map(|(_, v)| v.clone());
        let (first, last) = (&batch[0]["seq"], &batch[batch.len() - 1]["seq"]);
        assert_eq!(
            key,
            Some(format!("gw-v5-{first}-{last}")),
            "the key names the batch's first and last record"
        );
        for e in &batch {
            assert_eq!(
                topic,
                format!("v5/gw-v5/{}", e["topic"].as_str().unwrap()),
                "a batch never mixes topics: {batch:?}"
            );
        }
        batches += 1;
        readings.extend(
            batch
                .iter()
                .map(|e| e["payload"]["celsius"].as_f64().unwrap() as u64),
        );
    }
    assert_eq!(readings, [0, 1, 2, 3, 4, 5, 6], "in order");
    assert!(batches >= 3, "one message per run of a topic at least");
    assert!(gw.shutdown(WAIT).await);
}
