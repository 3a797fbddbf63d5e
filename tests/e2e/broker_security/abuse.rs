//! Garbage and protocol abuse on the guard's listener, and the gateway's
//! own sink through a listener that requires logins.

use super::*;

/// Sends `bytes` on a fresh connection and returns what comes back before
/// the guard closes it.
async fn raw(port: u16, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(bytes).await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut back))
        .await
        .expect("the guard closes the connection in time")
        .ok();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_protocol_abuse_close_only_the_offending_connection() {
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

    // Not MQTT at all: closed without an answer, at once.
    let started = std::time::Instant::now();
    assert!(
        raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .is_empty()
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // A remaining length far over the 1 MiB packet limit: closed.
    assert!(raw(port, &[0x10, 0xff, 0xff, 0xff, 0x7f]).await.is_empty());
    // A CONNECT announcing 100,000 bytes (over the 64 KiB a client may make
    // the guard buffer before it logs in): closed at once, not after the
    // 10 s CONNECT timeout.
    let big_connect = [0x10, 0xa0, 0x8d, 0x06];
    let started = std::time::Instant::now();
    assert!(raw(port, &big_connect).await.is_empty());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "an oversized CONNECT was buffered"
    );
    // MQTT 5: CONNACK 1 (unacceptable protocol version).
    let mqtt5 = [
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 10, 0, 0, 0,
    ];
    assert_eq!(raw(port, &mqtt5).await, [0x20, 2, 0, 1]);
    // A logged-in device that sends a second CONNECT is disconnected.
    let mut connect = bytes::BytesMut::new();
    rumqttc::mqttbytes::v4::Connect::new("again")
        .write(&mut connect)
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut login = bytes::BytesMut::new();
        let mut c = rumqttc::mqttbytes::v4::Connect::new("alice-3");
        c.set_login("alice", "alice-secret");
        c.write(&mut login).unwrap();
        s.write_all(&login).await.unwrap();
        s.write_all(&connect).await.unwrap();
    }
    let mut back = Vec::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut back),
    )
    .await
    .expect("closed in time")
    .ok();
    // Closed (read_to_end returned), at most after rumqttd's CONNACK.
    assert!(back.is_empty() || back == [0x20, 2, 0, 0], "{back:02x?}");

    // Everyone else is still served.
    let out = publish(
        port,
        &["-u", "alice", "-P", "alice-secret"],
        "sensors/alice/temperature",
        80.0,
    );
    assert!(out.status.success());
    let (topic, _) = alerts.next_json().await;
    assert_eq!(topic, "alerts/alice/temperature");
    assert!(gw.shutdown(WAIT).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_pointed_at_the_embedded_broker_keeps_working_when_logins_are_required() {
    if mosquitto_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("broker.passwd");
    passwd(&pw, "alice", "alice-secret");
    let port = free_port();
    // As in the demo, the sink `cloud` points back at the embedded broker's
    // own listener, which now refuses clients without a login.
    let toml = format!(
        r#"{base}
[[functions]]
name = "enrich"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["cloud"]

[[sinks]]
kind = "mqtt"
name = "cloud"
url = "mqtt://127.0.0.1:{port}"
topic = "cloud/{{gateway}}/{{topic}}"
"#,
        base = secured(
            &format!("127.0.0.1:{port}"),
            &format!("allow_anonymous = false\npassword_file = {}", lit(&pw))
        ),
        enrich = lit(&guest("enrich")),
    );
    let (gw, _dir) = gateway(&toml).await;
    let mut cloud = internal(&gw, "cloud/#").await;
    let out = publish(
        port,
        &["-u", "alice", "-P", "alice-secret"],
        "sensors/alice/temperature",
        21.5,
    );
    assert!(out.status.success(), "{}", said(&out));
    let (topic, envelope) = cloud.next_json().await;
    assert_eq!(topic, "cloud/gw-sec/sensors/alice/temperature");
    assert_eq!(envelope["payload"]["celsius"], 21.5, "{envelope}");
    assert_eq!(metric(&gw).0, 0, "the sink logged in without a failure");
    assert!(gw.shutdown(WAIT).await);
}
