//! The MQTT sink over mutual TLS (rustls, custom CA, client certificate), as
//! AWS IoT Core and Azure IoT Hub require, against a Mosquitto that demands
//! client certificates.

use std::path::Path;
use std::sync::atomic::Ordering;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::{MqttOptions, Transport};

use crate::support::*;

struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn make_pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "edgefn test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![usage];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca.pem(),
        server: leaf(
            vec!["localhost".into()],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(
            vec![],
            "edgefn-gateway",
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_sink_delivers_over_mutual_tls_and_is_refused_without_a_valid_client_certificate() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", &pki.ca);
    let server_cert = write(dir.path(), "server.pem", &pki.server.0);
    let server_key = write(dir.path(), "server.key", &pki.server.1);
    let client_cert = write(dir.path(), "client.pem", &pki.client.0);
    let client_key = write(dir.path(), "client.key", &pki.client.1);
    // A client certificate from another CA: the broker must refuse it.
    let rogue = make_pki();
    let rogue_cert = write(dir.path(), "rogue.pem", &rogue.client.0);
    let rogue_key = write(dir.path(), "rogue.key", &rogue.client.1);
    let Some(cloud) = Mosquitto::start_with(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        ca.display(),
        server_cert.display(),
        server_key.display()
    )) else {
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
url = "mqtts://localhost:{port}"
topic = "devices/{{gateway}}/telemetry"
tls = {{ ca = {ca}, cert = {cert}, key = {key} }}

[[sinks]]
kind = "mqtt"
name = "no-client-cert"
url = "mqtts://localhost:{port}"
tls = {{ ca = {ca} }}

[[sinks]]
kind = "mqtt"
name = "wrong-client-cert"
url = "mqtts://localhost:{port}"
tls = {{ ca = {ca}, cert = {rogue_cert}, key = {rogue_key} }}
"#,
        header = gateway_header("gw-tls"),
        enrich = lit(&guest("enrich")),
        port = cloud.port,
        ca = lit(&ca),
        cert = lit(&client_cert),
        key = lit(&client_key),
        rogue_cert = lit(&rogue_cert),
        rogue_key = lit(&rogue_key),
    );
    let (gw, _cfg_dir) = gateway(&toml).await;

    let mut opts = MqttOptions::new(client_id("tls-sub"), "localhost", cloud.port);
    opts.set_transport(Transport::tls(
        pki.ca.clone().into_bytes(),
        Some((
            pki.client.0.clone().into_bytes(),
            pki.client.1.clone().into_bytes(),
        )),
        None,
    ));
    let mut cloud_sub = Subscriber::connect_with(opts, &["devices/#"]).await;

    let (host, port) = gw.local_broker();
    let mut sensor = Publisher::connect(host, port).await;
    sensor
        .publish("sensors/s1/temperature", r#"{"value": 22.5}"#)
        .await;
    let (topic, envelope) = cloud_sub.next_json().await;
    assert_eq!(topic, "devices/gw-tls/telemetry");
    assert_eq!(envelope["payload"]["celsius"], 22.5);

    // The sinks without a valid client certificate are refused by the
    // broker and keep retrying with back-off; they never connect.
    for sink in ["no-client-cert", "wrong-client-cert"] {
        let stats = gw.sink_stats(sink).unwrap().clone();
        eventually(sink, || stats.failures.load(Ordering::Relaxed) >= 1).await;
        assert_eq!(
            stats.connects.load(Ordering::Relaxed),
            0,
            "{sink} must not connect"
        );
    }
    let good = gw.sink_stats("cloud").unwrap();
    assert_eq!(good.connects.load(Ordering::Relaxed), 1);
    assert!(gw.shutdown(WAIT).await);
}
