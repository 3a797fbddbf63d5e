//! The broker's TLS listener: the `[broker.tls]` table and the rustls
//! acceptor built from it (aws-lc-rs, as rumqttc and the HTTP sink use;
//! TLS 1.2 and 1.3; no ALPN).
//!
//! With `client_ca`, a device MAY present a client certificate. If it does,
//! the certificate must be signed by that CA (the handshake fails
//! otherwise), and its subject CommonName becomes the device's user name,
//! with no password needed: [`peer_user`]. The CN must follow the rule of
//! password-file user names (1 to 64 characters of `[A-Za-z0-9_.-]`), and a
//! certificate with no CN, or more than one, is refused. Devices without a
//! certificate log in with a password, as on a plain listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::{self, PemObject};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig, ServerConnection};

use super::passwd::check_user_name;

/// The `[broker.tls]` table: a TLS listener beside the plain one, e.g. TLS
/// on the LAN and plain on loopback for local functions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerTlsConfig {
    /// Address of the TLS listener, such as `0.0.0.0:8883`, so devices on
    /// the network connect encrypted and can check the gateway's identity.
    pub listen: String,
    /// The server certificate chain (PEM) devices verify the gateway by.
    pub cert: PathBuf,
    /// The private key of `cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA (PEM) whose client certificates log devices in without a
    /// password, the certificate's CN being the user name. Optional, and a
    /// certificate stays optional for devices when it is set.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

impl BrokerTlsConfig {
    /// Validates the table and builds its acceptor: the listen address
    /// parses, and every file reads and fits (see [`acceptor`]). Relative
    /// paths go through `resolve`. Problems are pushed as `(key, reason)`
    /// with keys like `broker.tls.cert`.
    pub fn build(
        &self,
        resolve: &dyn Fn(&Path) -> PathBuf,
        problems: &mut Vec<(String, String)>,
    ) -> Option<(SocketAddr, TlsAcceptor)> {
        let addr = match self.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(e) => {
                problems.push((
                    "broker.tls.listen".to_owned(),
                    format!(
                        "`{}` is not an address like `0.0.0.0:8883`: {e}",
                        self.listen
                    ),
                ));
                None
            }
        };
        let client_ca = self.client_ca.as_deref().map(resolve);
        match acceptor(
            &resolve(&self.cert),
            &resolve(&self.key),
            client_ca.as_deref(),
        ) {
            Ok(acceptor) => Some((addr?, acceptor)),
            Err(e) => {
                problems.push((format!("broker.tls.{}", e.field()), e.to_string()));
                None
            }
        }
    }
}

/// Why the TLS acceptor could not be built. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read.
    #[error("cannot read the {what} `{}`: {source}", path.display())]
    Read {
        /// Which file: `cert`, `key` or `client_ca`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid PEM.
    #[error("the {what} `{}` is not valid PEM: {source}", path.display())]
    Pem {
        /// Which file: `cert`, `key` or `client_ca`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The PEM parser's error.
        #[source]
        source: pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("the {what} `{}` contains no PEM certificate", path.display())]
    NoCertificate {
        /// Which file: `cert` or `client_ca`.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The key file holds no private key.
    #[error("the key `{}` contains no PEM private key (PKCS#8, PKCS#1 or SEC1)", path.display())]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// The key does not belong to the certificate, or is not usable.
    #[error("the key `{}` does not fit the certificate `{}`: {source}", key.display(), cert.display())]
    Key {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// A client CA certificate is not usable as a trust anchor.
    #[error("the client_ca `{}` holds a certificate that is not a usable CA: {source}", path.display())]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// rustls's error.
        #[source]
        source: rustls::Error,
    },
    /// The client certificate verifier could not be built from the CA.
    #[error("the client_ca `{}` cannot verify client certificates: {source}", path.display())]
    Verifier {
        /// The file.
        path: PathBuf,
        /// rustls's error.
        #[source]
        source: VerifierBuilderError,
    },
    /// The crypto provider lacks TLS 1.2 or 1.3 (a build problem).
    #[error("TLS 1.2 and 1.3 are not available: {0}")]
    Provider(#[source] rustls::Error),
}

impl TlsSetupError {
    /// The `[broker.tls]` field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Read { what, .. } | Self::Pem { what, .. } | Self::NoCertificate { what, .. } => {
                what
            }
            Self::NoKey { .. } | Self::Key { .. } => "key",
            Self::ClientCa { .. } | Self::Verifier { .. } => "client_ca",
            Self::Provider(_) => "listen",
        }
    }
}

/// Builds the acceptor: `cert` and `key` as the server's identity; with
/// `client_ca`, client certificates signed by it are requested but not
/// required (verified if presented). TLS 1.2 and 1.3.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<TlsAcceptor, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = read_certs("cert", cert)?;
    let private_key = read_key(key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsSetupError::Provider)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in read_certs("client_ca", ca)? {
                roots.add(c).map_err(|source| TlsSetupError::ClientCa {
                    path: ca.to_owned(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|source| TlsSetupError::Verifier {
                    path: ca.to_owned(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsSetupError::Key {
            key: key.to_owned(),
            cert: cert.to_owned(),
            source,
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The certificates of a PEM file: at least one.
fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_slice_iter(&read(what, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsSetupError::Pem {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_slice(&read("key", path)?).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsSetupError::NoKey {
            path: path.to_owned(),
        },
        source => TlsSetupError::Pem {
            what: "key",
            path: path.to_owned(),
            source,
        },
    })
}

/// After the handshake: the user name from the client certificate's subject
/// CommonName, if the client presented one (it was verified against
/// `client_ca` during the handshake). `Err(reason)` if the certificate has
/// no CN, several, or one that is not a valid user name.
pub fn peer_user(conn: &ServerConnection) -> Result<Option<String>, String> {
    match conn.peer_certificates().and_then(|chain| chain.first()) {
        None => Ok(None),
        Some(leaf) => user_of(leaf).map(Some),
    }
}

/// The user name a certificate's subject CN gives.
fn user_of(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the client certificate cannot be parsed: {e}"))?;
    let mut names = cert.subject().iter_common_name();
    let Some(cn) = names.next() else {
        return Err("the client certificate's subject has no CommonName (CN)".to_owned());
    };
    if names.next().is_some() {
        return Err("the client certificate's subject has more than one CommonName".to_owned());
    }
    let name = cn
        .as_str()
        .map_err(|e| format!("the client certificate's CommonName is not text: {e}"))?;
    check_user_name(name)
        .map_err(|reason| format!("the client certificate's CommonName {reason}"))?;
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::{ClientConfig, SupportedProtocolVersion};

    use super::*;

    /// A test CA: its PEM and what signs its leaves.
    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf signed by `ca`: (certificate PEM, key PEM). `cn: None` leaves
    /// the subject without a CommonName.
    fn leaf(ca: &Ca, cn: Option<&str>, server: bool) -> (String, String) {
        let names = if server {
            vec!["localhost".into()]
        } else {
            vec![]
        };
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// The server side: the CA, the files and the acceptor.
    struct Server {
        ca: Ca,
        dir: tempfile::TempDir,
        acceptor: TlsAcceptor,
    }

    fn server(with_client_ca: bool) -> Server {
        let ca = ca("edgefn test CA");
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = leaf(&ca, Some("localhost"), true);
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let cert = write("broker.pem", &cert);
        let key = write("broker.key", &key);
        let client_ca = with_client_ca.then(|| write("devices-ca.pem", &ca.pem));
        let acceptor = acceptor(&cert, &key, client_ca.as_deref()).unwrap();
        Server { ca, dir, acceptor }
    }

    /// One TLS handshake over loopback: the server's outcome, `Err` if its
    /// handshake failed, else what [`peer_user`] says.
    async fn handshake(
        server: &Server,
        client_cert: Option<(String, String)>,
        version: &'static SupportedProtocolVersion,
    ) -> Result<Result<Option<String>, String>, std::io::Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = server.acceptor.clone();
        let accepted = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await?;
            let tls = acceptor.accept(tcp).await?;
            Ok::<_, std::io::Error>(peer_user(tls.get_ref().1))
        });
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(server.ca.pem.as_bytes()).unwrap())
            .unwrap();
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots);
        let config = match client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        };
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = "localhost".try_into().unwrap();
        // With TLS 1.3 the client may finish before the server has judged
        // its certificate: keep the connection open until it has.
        let _client = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await;
        tokio::time::timeout(Duration::from_secs(10), accepted)
            .await
            .unwrap()
            .unwrap()
    }

    const VERSIONS: [&SupportedProtocolVersion; 2] =
        [&rustls::version::TLS12, &rustls::version::TLS13];

    #[tokio::test]
    async fn without_client_ca_a_client_connects_without_a_certificate() {
        let server = server(false);
        for version in VERSIONS {
            let got = handshake(&server, None, version).await;
            assert_eq!(got.unwrap(), Ok(None), "{version:?}");
        }
    }

    #[tokio::test]
    async fn a_client_certificate_signed_by_client_ca_gives_its_cn_as_user() {
        let server = server(true);
        for version in VERSIONS {
            let cert = leaf(&server.ca, Some("alice"), false);
            let got = handshake(&server, Some(cert), version).await;
            assert_eq!(got.unwrap(), Ok(Some("alice".to_owned())), "{version:?}");
        }
    }

    #[tokio::test]
    async fn with_client_ca_a_certificate_stays_optional() {
        let server = server(true);
        for version in VERSIONS {
            let got = handshake(&server, None, version).await;
            assert_eq!(got.unwrap(), Ok(None), "{version:?}");
        }
    }

    #[tokio::test]
    async fn a_client_certificate_from_another_ca_fails_the_handshake() {
        let server = server(true);
        let rogue = ca("edgefn test CA");
        for version in VERSIONS {
            let cert = leaf(&rogue, Some("alice"), false);
            let got = handshake(&server, Some(cert), version).await;
            assert!(got.is_err(), "{version:?}: {got:?}");
        }
    }

    #[tokio::test]
    async fn a_cn_that_is_no_valid_user_name_is_refused() {
        let server = server(true);
        for (cn, expected) in [
            (Some("bad/name"), "'/'"),
            (Some("#"), "'#'"),
            (None, "no CommonName"),
        ] {
            let cert = leaf(&server.ca, cn, false);
            let got = handshake(&server, Some(cert), &rustls::version::TLS13).await;
            let reason = got.unwrap().unwrap_err();
            assert!(reason.contains(expected), "{cn:?}: {reason}");
        }
    }

    #[test]
    fn setup_errors_name_the_file_at_fault() {
        let s = server(true);
        let ca = ca("other");
        let dir = s.dir.path();
        let (other_cert, other_key) = leaf(&ca, Some("localhost"), true);
        let files = [
            ("garbage.pem", "this is not PEM\n".to_owned()),
            ("empty.pem", String::new()),
            ("other.pem", other_cert),
            ("other.key", other_key),
            (
                "broken.pem",
                "-----BEGIN CERTIFICATE-----\nAAAA\n".to_owned(),
            ),
        ];
        for (name, text) in &files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let (cert, key, ca_file) = ("broker.pem", "broker.key", "devices-ca.pem");
        let cases: &[(&str, &str, Option<&str>, &str, &str)] = &[
            ("missing.pem", key, None, "cert", "missing.pem"),
            (cert, "missing.key", None, "key", "missing.key"),
            (
                cert,
                key,
                Some("missing-ca.pem"),
                "client_ca",
                "missing-ca.pem",
            ),
            ("empty.pem", key, None, "cert", "empty.pem"),
            ("garbage.pem", key, None, "cert", "garbage.pem"),
            ("broken.pem", key, None, "cert", "broken.pem"),
            (cert, "empty.pem", None, "key", "empty.pem"),
            (cert, "garbage.pem", None, "key", "garbage.pem"),
            (cert, "other.key", None, "key", "other.key"),
            (cert, key, Some("empty.pem"), "client_ca", "empty.pem"),
            (cert, key, Some("garbage.pem"), "client_ca", "garbage.pem"),
            (cert, key, Some(ca_file), "", ""),
            ("other.pem", "other.key", None, "", ""),
        ];
        for &(c, k, ca, field, named) in cases {
            let got = acceptor(
                &dir.join(c),
                &dir.join(k),
                ca.map(|f| dir.join(f)).as_deref(),
            );
            match got {
                Ok(_) => assert!(field.is_empty(), "{c} {k} {ca:?} should fail"),
                Err(e) => {
                    assert_eq!(e.field(), field, "{c} {k} {ca:?}: {e}");
                    assert!(e.to_string().contains(named), "{c} {k} {ca:?}: {e}");
                    assert!(!named.is_empty(), "{c} {k} {ca:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn the_table_reports_problems_under_broker_tls() {
        let s = server(true);
        let config: BrokerTlsConfig = toml::from_str(
            "listen = \"0.0.0.0:8883\"\ncert = \"broker.pem\"\nkey = \"broker.key\"\nclient_ca = \"devices-ca.pem\"\n",
        )
        .unwrap();
        let resolve = |p: &Path| s.dir.path().join(p);
        let mut problems = Vec::new();
        let built = config.build(&resolve, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(built.unwrap().0, "0.0.0.0:8883".parse().unwrap());
        let bad = BrokerTlsConfig {
            listen: "everywhere".to_owned(),
            key: "nope.key".into(),
            client_ca: None,
            ..config
        };
        assert!(bad.build(&resolve, &mut problems).is_none());
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["broker.tls.listen", "broker.tls.key"],
            "{problems:?}"
        );
        assert!(
            toml::from_str::<BrokerTlsConfig>(
                "listen = \"x\"\ncert = \"c\"\nkey = \"k\"\nca = \"x\""
            )
            .is_err()
        );
    }
}
