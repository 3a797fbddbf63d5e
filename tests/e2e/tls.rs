//! Sinks over mutual TLS (rustls, custom CA, client certificate), as AWS IoT
//! Core and Azure IoT Hub require: the MQTT sink against a Mosquitto that
//! demands client certificates, the HTTP sink against an HTTPS server that
//! does (with the system's CAs when `tls.ca` is left out).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::{MqttOptions, Transport};

use crate::support::*;

pub(crate) struct Pki {
    pub(crate) ca: String,
    pub(crate) server: (String, String),
    pub(crate) client: (String, String),
}

pub(crate) fn make_pki() -> Pki {
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

/// An HTTPS server config for the test server: `pki`'s server certificate,
/// and a client certificate signed by `pki`'s CA required.
fn https_server_config(pki: &Pki) -> std::sync::Arc<tokio_rustls::rustls::ServerConfig> {
    use std::sync::Arc;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{self, RootCertStore, server::WebPkiClientVerifier};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.as_bytes()).unwrap())
        .unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let chain = CertificateDer::pem_slice_iter(pki.server.0.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pki.server.1.as_bytes()).unwrap();
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

/// An HTTPS sink section: `tls` is the inside of its `tls` table.
fn https_sink(name: &str, port: u16, tls: &str) -> String {
    format!(
        r#"
[[sinks]]
kind = "http"
name = "{name}"
url = "https://localhost:{port}/ingest"
timeout_ms = 2000
max_backoff_ms = 200
batch_linger_ms = 20
bearer_token = "s3cret-token"
headers = {{ X-Tenant = "barn-7", X-Trace = "on" }}
tls = {{ {tls} }}
"#
    )
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The bearer token and the custom headers reach the server; the key names
/// the batch.
fn check_request(gateway: &str, (body, key, headers): &crate::sinks::Accepted) -> f64 {
    assert_eq!(
        header(headers, "authorization"),
        Some("Bearer s3cret-token"),
        "{headers:?}"
    );
    assert_eq!(header(headers, "x-tenant"), Some("barn-7"), "{headers:?}");
    assert_eq!(header(headers, "x-trace"), Some("on"), "{headers:?}");
    let batch: serde_json::Value = serde_json::from_slice(body).unwrap();
    let (first, last) = (
        &batch[0]["seq"],
        &batch[batch.as_array().unwrap().len() - 1]["seq"],
    );
    assert_eq!(key, &format!("{gateway}-{first}-{last}"));
    batch[0]["payload"]["celsius"].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_delivers_over_mutual_tls_with_bearer_token_and_headers() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = lit(&write(dir.path(), "ca.pem", &pki.ca));
    let cert = lit(&write(dir.path(), "client.pem", &pki.client.0));
    let key = lit(&write(dir.path(), "client.key", &pki.client.1));
    let mut srv = crate::sinks::server_with(Vec::new(), Some(https_server_config(&pki))).await;
    let toml = format!(
        r#"
{header}
[[functions]]
name = "enrich"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["web"]
config = {{ sink = "web" }}

[[functions]]
name = "enrich-no-cert"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["web-no-cert"]
config = {{ sink = "web-no-cert" }}
{web}{no_cert}"#,
        header = gateway_header("gw-https"),
        enrich = lit(&guest("enrich")),
        web = https_sink(
            "web",
            srv.port,
            &format!("ca = {ca}, cert = {cert}, key = {key}")
        ),
        no_cert = https_sink("web-no-cert", srv.port, &format!("ca = {ca}")),
    );
    let (gw, _cfg_dir) = gateway(&toml).await;
    let (host, port) = gw.local_broker();
    let mut sensor = Publisher::connect(host, port).await;
    sensor
        .publish("sensors/s1/temperature", r#"{"value": 21.5}"#)
        .await;
    let request = tokio::time::timeout(WAIT, srv.accepted.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(check_request("gw-https", &request), 21.5);
    // Without a client certificate the server refuses the handshake; the
    // sink keeps retrying and delivers nothing.
    let stats = gw.sink_stats("web-no-cert").unwrap().clone();
    eventually("the sink without a certificate is refused", || {
        stats.failures.load(Ordering::Relaxed) >= 1 && *srv.refused.lock().unwrap() >= 1
    })
    .await;
    assert_eq!(stats.delivered.load(Ordering::Relaxed), 0);
    assert!(gw.shutdown(WAIT).await);
}

/// A gateway process killed when the test ends, passed or not.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tls` with a client certificate and no `ca`: the server is verified
/// against the system's CAs. The gateway runs as a process whose system CA
/// file (`SSL_CERT_FILE`) is the test CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_with_a_client_certificate_and_no_ca_trusts_the_system_cas() {
    let pki = make_pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = write(dir.path(), "ca.pem", &pki.ca);
    let cert = lit(&write(dir.path(), "client.pem", &pki.client.0));
    let key = lit(&write(dir.path(), "client.key", &pki.client.1));
    let mut srv = crate::sinks::server_with(Vec::new(), Some(https_server_config(&pki))).await;
    let broker_port = free_port();
    let toml = format!(
        r#"
[gateway]
id = "gw-https-sys"
data_dir = "data"

[broker]
kind = "embedded"
listen = "127.0.0.1:{broker_port}"

[[functions]]
name = "enrich"
component = {enrich}
triggers = ["sensors/+/temperature"]
sinks = ["web"]
config = {{ sink = "web" }}
{web}"#,
        enrich = lit(&guest("enrich")),
        web = https_sink("web", srv.port, &format!("cert = {cert}, key = {key}")),
    );
    let config = write(dir.path(), "edgefn.toml", &toml);
    let log = dir.path().join("gateway.log");
    let mut gw = Process(
        std::process::Command::new(edgefn_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env("EDGEFN_LOG", "warn")
            .env("SSL_CERT_FILE", &ca)
            .env_remove("SSL_CERT_DIR")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    // Wait for its broker (a gateway that exits, e.g. on a config error,
    // fails the test with its log).
    eventually("the gateway's broker listens", || {
        if let Ok(Some(status)) = gw.0.try_wait() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("the gateway exited ({status}):\n{text}");
        }
        std::net::TcpStream::connect(("127.0.0.1", broker_port)).is_ok()
    })
    .await;
    // Probe until it is subscribed: a reading published before that is not
    // routed to it.
    let mut sensor = Publisher::connect("127.0.0.1", broker_port).await;
    let started = std::time::Instant::now();
    let request = loop {
        sensor
            .publish("sensors/s1/temperature", r#"{"value": 23.5}"#)
            .await;
        match tokio::time::timeout(Duration::from_millis(500), srv.accepted.recv()).await {
            Ok(r) => break r.unwrap(),
            Err(_) => assert!(started.elapsed() < WAIT, "nothing delivered over HTTPS"),
        }
    };
    assert_eq!(check_request("gw-https-sys", &request), 23.5);
    assert_eq!(*srv.refused.lock().unwrap(), 0, "the server was trusted");
}
