//! The five brokers of the access-control benchmark, each started as its
//! own process from a configuration written into the run's temp dir.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use super::common::free_port;

/// The user the bench's clients log in as, and its password.
pub const USER: &str = "bench";
const PASSWORD: &str = "bench-secret-1";

/// Bytes each subscription filter of the embedded broker keeps: the flood
/// outruns the subscriber and rumqttd acknowledges the publisher at once,
/// so the default 1 MiB would make the subscriber skip (counted) instead
/// of measuring the access layer. Same for all three edgefn variants.
const RETENTION: u64 = 64 * 1024 * 1024;

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One running broker, as the bench's clients reach it.
pub struct Broker {
    pub label: &'static str,
    pub proc: Proc,
    pub port: u16,
    /// The CA to trust, for a TLS listener (clients connect to `localhost`).
    pub tls_ca: Option<String>,
    /// Whether the clients must log in as [`USER`].
    pub login: bool,
}

impl Broker {
    pub fn credentials(&self) -> Option<(&'static str, &'static str)> {
        self.login.then_some((USER, PASSWORD))
    }
}

/// What every broker of a run shares: the temp dir, the release binary, the
/// password file and the server certificate.
pub struct Setup {
    pub dir: PathBuf,
    pub edgefn: PathBuf,
    password_file: PathBuf,
    ca: String,
    cert: PathBuf,
    key: PathBuf,
}

impl Setup {
    /// Writes a CA plus a `localhost` server certificate and, if `logins`,
    /// the edgefn password file (with `edgefn passwd`, the password on
    /// stdin).
    pub fn new(dir: &Path, edgefn: PathBuf, logins: bool) -> Self {
        let password_file = dir.join("edgefn.passwd");
        if logins {
            set_password(&edgefn, &password_file);
        }
        let (ca, (cert_pem, key_pem)) = pki();
        let cert = dir.join("broker.pem");
        let key = dir.join("broker.key");
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        Self {
            dir: dir.to_owned(),
            edgefn,
            password_file,
            ca,
            cert,
            key,
        }
    }

    /// Starts broker `which` (1..=5, see the module doc of the bench).
    pub fn start(&self, which: char) -> Broker {
        match which {
            '1' => self.edgefn("edgefn (rumqttd alone, anonymous)", false, false),
            '2' => self.edgefn("edgefn guard, plain, password + ACL", true, false),
            '3' => self.edgefn("edgefn guard, TLS, password + ACL", true, true),
            '4' => self.mosquitto("Mosquitto, password + ACL", true),
            '5' => self.mosquitto("Mosquitto, anonymous", false),
            other => panic!("no broker {other:?}: EDGEFN_BENCH_BROKERS takes digits 1-5"),
        }
    }

    fn edgefn(&self, label: &'static str, guarded: bool, tls: bool) -> Broker {
        let port = free_port();
        let mut toml = format!(
            "[gateway]\nid = \"bench-{port}\"\ndata_dir = {:?}\n\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\nretention_bytes_per_filter = {RETENTION}\n",
            self.dir.join(format!("data-{port}")).display().to_string(),
        );
        let mut device_port = port;
        if guarded {
            toml += &format!(
                "allow_anonymous = false\npassword_file = {:?}\n",
                self.password_file.display().to_string()
            );
        }
        if tls {
            device_port = free_port();
            toml += &format!(
                "\n[broker.tls]\nlisten = \"127.0.0.1:{device_port}\"\ncert = {:?}\nkey = {:?}\n",
                self.cert.display().to_string(),
                self.key.display().to_string()
            );
        }
        if guarded {
            toml += &format!(
                "\n[[broker.acl]]\nusers = [\"{USER}\"]\npublish = [\"bench/{{user}}/#\"]\nsubscribe = [\"bench/#\"]\n"
            );
        }
        let cfg = self.dir.join(format!("edgefn-{port}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let check = Command::new(&self.edgefn)
            .args(["check", "-c"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "edgefn check {}: {}{}",
            cfg.display(),
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        // Started means listening, the guard's listeners included (no TCP
        // probe: on the TLS port it would log a failed handshake).
        let proc = start_edgefn(&self.edgefn, &cfg);
        Broker {
            label,
            proc,
            port: device_port,
            tls_ca: tls.then(|| self.ca.clone()),
            login: guarded,
        }
    }

    /// Mosquitto, not the bottleneck by configuration: no queue limit (its
    /// default 1000 drops messages for a subscriber behind a flood), the
    /// same in-flight window as the embedded broker (500), no persistence.
    fn mosquitto(&self, label: &'static str, auth: bool) -> Broker {
        let port = free_port();
        let mut conf = format!(
            "user root\nlistener {port} 127.0.0.1\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 500\nlog_dest none\n"
        );
        if auth {
            let pw = self.dir.join("mosquitto.passwd");
            if !pw.exists() {
                let status = Command::new("mosquitto_passwd")
                    .args(["-c", "-b"])
                    .arg(&pw)
                    .args([USER, PASSWORD])
                    .status()
                    .unwrap();
                assert!(status.success(), "mosquitto_passwd failed");
            }
            // `pattern` lines apply to every user; a `topic` line before any
            // `user` line would apply to anonymous clients only.
            let acl = self.dir.join("mosquitto.acl");
            std::fs::write(
                &acl,
                format!("pattern write bench/%u/#\n\nuser {USER}\ntopic read bench/#\n"),
            )
            .unwrap();
            conf += &format!(
                "allow_anonymous false\npassword_file {}\nacl_file {}\n",
                pw.display(),
                acl.display()
            );
        } else {
            conf += "allow_anonymous true\n";
        }
        let path = self.dir.join(format!("mosquitto-{port}.conf"));
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto 2 is installed (apt-get install mosquitto)");
        let proc = Proc(child);
        wait_port(port);
        Broker {
            label,
            proc,
            port,
            tls_ca: None,
            login: auth,
        }
    }
}

/// `edgefn passwd FILE bench`, the password on stdin.
fn set_password(edgefn: &Path, file: &Path) {
    let mut child = Command::new(edgefn)
        .arg("passwd")
        .arg(file)
        .arg(USER)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    assert!(child.wait().unwrap().success(), "edgefn passwd failed");
}

/// `edgefn run -c cfg`; returns once it logged that it started. Its
/// warnings and errors are echoed.
fn start_edgefn(edgefn: &Path, cfg: &Path) -> Proc {
    let mut child = Command::new(edgefn)
        .args(["run", "--config"])
        .arg(cfg)
        .env("EDGEFN_LOG", "warn,edgefn::supervisor=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut started = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("Gateway started.") {
                if let Some(tx) = started.take() {
                    let _ = tx.send(());
                }
            } else if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("edgefn: {line}");
            }
        }
    });
    let proc = Proc(child);
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the gateway started");
    proc
}

fn wait_port(port: u16) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A CA (PEM) and a `localhost` server certificate and key signed by it.
fn pki() -> (String, (String, String)) {
    let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "edgefn bench CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut p = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "localhost");
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    (ca.pem(), (cert.pem(), key.serialize_pem()))
}
