//! The TLS listener: client certificates (their CN is the user name) or
//! passwords, and nothing else.

use std::path::Path;
use std::process::Command;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_listener_takes_client_certificates_or_passwords() {
    if mosquitto_missing() {
        return;
    }
    let pki = crate::tls::make_pki();
    let rogue = crate::tls::make_pki();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = write(d, "ca.pem", &pki.ca);
    let (cert, key) = (
        write(d, "server.pem", &pki.server.0),
        write(d, "server.key", &pki.server.1),
    );
    // The client certificate's CN, `edgefn-gateway`, is the device's user name.
    let (ccert, ckey) = (
        write(d, "client.pem", &pki.client.0),
        write(d, "client.key", &pki.client.1),
    );
    let (rcert, rkey) = (
        write(d, "rogue.pem", &rogue.client.0),
        write(d, "rogue.key", &rogue.client.1),
    );
    let pw = d.join("broker.passwd");
    passwd(&pw, "alice", "alice-secret");
    let toml = secured(
        "127.0.0.1:0",
        &format!(
            "allow_anonymous = false\npassword_file = {}\n\n[broker.tls]\nlisten = \"127.0.0.1:0\"\ncert = {}\nkey = {}\nclient_ca = {}\n",
            lit(&pw),
            lit(&cert),
            lit(&key),
            lit(&ca)
        ),
    );
    let (gw, _dir) = gateway(&toml).await;
    let port = gw.broker_listener("tls").expect("TLS listener").port();
    let mut alerts = alerts(&gw).await;
    let tls_pub = |extra: &[&str], topic: &str, value: f64| {
        let payload = format!(r#"{{"value": {value}}}"#);
        Command::new("mosquitto_pub")
            .args([
                "-h",
                "localhost",
                "-p",
                &port.to_string(),
                "-V",
                "mqttv311",
                "--cafile",
            ])
            .arg(&ca)
            .args(extra)
            .args(["-q", "1", "-t", topic, "-m", &payload])
            .output()
            .unwrap()
    };
    let s = |p: &Path| p.to_str().unwrap().to_owned();

    // With a client certificate: logged in as its CN, no password.
    let out = tls_pub(
        &["--cert", &s(&ccert), "--key", &s(&ckey)],
        "sensors/edgefn-gateway/temperature",
        60.0,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (topic, _) = alerts.next_json().await;
    assert_eq!(topic, "alerts/edgefn-gateway/temperature");
    // Without one: a password logs in; nothing at all does not.
    let out = tls_pub(
        &["-u", "alice", "-P", "alice-secret"],
        "sensors/alice/temperature",
        61.0,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (topic, _) = alerts.next_json().await;
    assert_eq!(topic, "alerts/alice/temperature");
    let before = metric(&gw).0;
    // A bare connect and close (a port scan, a health check) is no login.
    drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    let out = tls_pub(&[], "sensors/alice/temperature", 62.0);
    assert!(!out.status.success(), "anonymous TLS client accepted");
    // A certificate from another CA fails the handshake.
    let out = tls_pub(
        &["--cert", &s(&rcert), "--key", &s(&rkey)],
        "sensors/edgefn-gateway/temperature",
        63.0,
    );
    assert!(!out.status.success(), "a foreign certificate was accepted");
    eventually("both refusals counted", || metric(&gw).0 >= before + 2).await;
    assert_eq!(
        metric(&gw).0,
        before + 2,
        "the bare connect counted as a login"
    );
    assert!(alerts.try_next().is_none());
    assert!(gw.shutdown(WAIT).await);
}
