//! `[broker]` with `kind = "embedded"`, validated: the listeners, who may
//! connect to each, and what a logged-in device may publish and read.
//!
//! The rule, as for the admin endpoint and Mosquitto 2.x: anonymous clients
//! only on loopback, unless `allow_anonymous = true` says otherwise. A
//! network listener needs a way to log in: a password file, or a TLS
//! listener with a client CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::Problems;
use crate::broker::acl::{self, AclRule};
use crate::broker::passwd::{PasswdError, Passwords};
use crate::broker::tls::BrokerTlsConfig;

/// Who may connect to the embedded broker, where, and with which rights.
#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    /// `broker.listen`: plain MQTT.
    pub plain: Listener,
    /// `[broker.tls]`: MQTT over TLS.
    pub tls: Option<TlsListener>,
    /// `broker.password_file`, resolved against the config's folder.
    pub password_file: Option<PathBuf>,
    /// `[[broker.acl]]`, or the default rule.
    pub acl: Vec<AclRule>,
}

impl Access {
    /// Whether connections go through the enforcement layer (anything but
    /// "everyone is anonymous with every right").
    pub fn guarded(&self) -> bool {
        self.password_file.is_some() || self.tls.is_some()
    }

    /// Anonymous access everywhere, on `listen` (tests and the default).
    pub fn open(listen: SocketAddr) -> Self {
        Self {
            plain: Listener {
                addr: listen,
                anonymous: true,
            },
            tls: None,
            password_file: None,
            acl: acl::default_rules(),
        }
    }
}

/// A listener and whether it takes clients that do not log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Clients without credentials are let in, with every right.
    pub anonymous: bool,
}

/// The TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Address and anonymous access.
    pub listener: Listener,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA whose client certificates log a device in as their CN.
    pub client_ca: Option<PathBuf>,
}

/// The `[broker]` keys that decide access, as written.
pub(super) struct AccessKeys<'a> {
    pub listen: SocketAddr,
    pub allow_anonymous: Option<bool>,
    pub password_file: Option<&'a Path>,
    pub tls: Option<&'a BrokerTlsConfig>,
    pub acl: Option<&'a [AclRule]>,
}

/// Validates the access keys; every problem is added to `p`. Reads the
/// password file and the TLS files so that `check` reports them.
pub(super) fn access(
    p: &mut Problems<'_>,
    resolve: &dyn Fn(&Path) -> PathBuf,
    keys: AccessKeys<'_>,
) -> Option<Access> {
    let before = p.list.len();
    let password_file = keys.password_file.map(resolve);
    if let Some(path) = &password_file {
        match Passwords::load(path) {
            Ok(pw) if pw.is_empty() => tracing::warn!(
                file = %path.display(),
                "broker.password_file has no users yet: add one with `edgefn passwd FILE USER`."
            ),
            Ok(_) => {}
            Err(e @ PasswdError::Io { .. }) => p.add(
                "broker.password_file",
                format!("{e} (create it with `edgefn passwd FILE USER`)"),
            ),
            Err(e) => p.add("broker.password_file", e.to_string()),
        }
    }
    let tls = keys
        .tls
        .and_then(|t| tls_listener(p, resolve, t, keys.allow_anonymous, password_file.is_some()));
    let can_log_in = |client_ca: bool| password_file.is_some() || client_ca;
    let plain = Listener {
        addr: keys.listen,
        anonymous: anonymous(
            p,
            "broker.listen",
            keys.listen,
            keys.allow_anonymous,
            can_log_in(false),
        ),
    };
    if keys.allow_anonymous == Some(false)
        && !can_log_in(keys.tls.is_some_and(|t| t.client_ca.is_some()))
    {
        p.add(
            "broker.allow_anonymous",
            "is false, but neither broker.password_file nor broker.tls.client_ca is set: no client could log in",
        );
    }
    let acl = match keys.acl {
        Some(rules) => {
            let mut problems = Vec::new();
            acl::validate(rules, &mut problems);
            for (key, reason) in problems {
                p.add(key, reason);
            }
            rules.to_vec()
        }
        None => acl::default_rules(),
    };
    (p.list.len() == before).then_some(Access {
        plain,
        tls,
        password_file,
        acl,
    })
}

/// Whether the listener at `key` takes anonymous clients; a network
/// listener that would otherwise take anyone is a problem.
fn anonymous(
    p: &mut Problems<'_>,
    key: &str,
    addr: SocketAddr,
    allow: Option<bool>,
    can_log_in: bool,
) -> bool {
    match allow {
        Some(allow) => allow,
        None if addr.ip().is_loopback() => true,
        None => {
            if !can_log_in {
                p.add(
                    key,
                    format!(
                        "`{addr}` is not a loopback address, and no client could log in: set broker.password_file (see `edgefn passwd`) or broker.tls.client_ca, or set broker.allow_anonymous = true to let anyone who can reach it publish and read every topic"
                    ),
                );
            }
            false
        }
    }
}

fn tls_listener(
    p: &mut Problems<'_>,
    resolve: &dyn Fn(&Path) -> PathBuf,
    t: &BrokerTlsConfig,
    allow_anonymous: Option<bool>,
    has_passwords: bool,
) -> Option<TlsListener> {
    let mut problems = Vec::new();
    let built = t.build(resolve, &mut problems);
    for (key, reason) in problems {
        p.add(key, reason);
    }
    let (addr, _) = built?;
    let (cert, key) = (resolve(&t.cert), resolve(&t.key));
    let client_ca = t.client_ca.as_deref().map(resolve);
    let anonymous = anonymous(
        p,
        "broker.tls.listen",
        addr,
        allow_anonymous,
        has_passwords || client_ca.is_some(),
    );
    Some(TlsListener {
        listener: Listener { addr, anonymous },
        cert,
        key,
        client_ca,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Broker, ConfigError, parse};

    fn load(broker: &str) -> Result<super::Access, Vec<ConfigError>> {
        let text = format!("[gateway]\nid = \"gw\"\n[broker]\nkind = \"embedded\"\n{broker}\n");
        match parse(Path::new("/etc/edgefn/e.toml"), &text, &|_| None) {
            Ok(c) => match c.broker {
                Broker::Embedded { access, .. } => Ok(access),
                Broker::External(_) => panic!("embedded"),
            },
            Err(e) => Err(e.0),
        }
    }

    fn keys(broker: &str) -> Vec<String> {
        load(broker)
            .expect_err("refused")
            .into_iter()
            .map(|e| format!("{}: {}", e.key, e.reason))
            .collect()
    }

    #[test]
    fn loopback_is_anonymous_by_default_and_unguarded() {
        let a = load("").expect("valid");
        assert!(a.plain.anonymous && !a.guarded());
        let a = load("listen = \"[::1]:1883\"").expect("valid");
        assert!(a.plain.anonymous && !a.guarded());
    }

    #[test]
    fn a_network_listener_needs_a_login_or_an_explicit_choice() {
        let k = keys("listen = \"0.0.0.0:1883\"");
        assert_eq!(k.len(), 1, "{k:?}");
        assert!(k[0].starts_with("broker.listen: `0.0.0.0:1883` is not a loopback address"));
        let k = keys("listen = \"192.168.1.5:1883\"\nallow_anonymous = false");
        assert!(k[0].starts_with("broker.allow_anonymous:"), "{k:?}");
        let a = load("listen = \"0.0.0.0:1883\"\nallow_anonymous = true").expect("valid");
        assert!(a.plain.anonymous && !a.guarded());
    }

    #[test]
    fn the_password_file_is_read_at_check_and_named_when_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.passwd");
        let k = keys(&format!(
            "listen = \"0.0.0.0:1883\"\npassword_file = {missing:?}"
        ));
        assert!(k[0].starts_with("broker.password_file:"), "{k:?}");
        assert!(k[0].contains("nope.passwd"), "{k:?}");
        let file = dir.path().join("ok.passwd");
        crate::broker::passwd::set_password(&file, "alice", b"secret").expect("set");
        let a = load(&format!(
            "listen = \"0.0.0.0:1883\"\npassword_file = {file:?}"
        ))
        .expect("valid");
        assert!(!a.plain.anonymous && a.guarded());
        assert_eq!(a.password_file.as_deref(), Some(file.as_path()));
    }

    #[test]
    fn tls_files_are_checked_and_the_listener_follows_the_same_rule() {
        let k = keys(
            "[broker.tls]\nlisten = \"0.0.0.0:8883\"\ncert = \"/nonexistent/c.pem\"\nkey = \"/nonexistent/k.pem\"",
        );
        assert!(k.iter().any(|k| k.starts_with("broker.tls")), "{k:?}");
        assert!(k.iter().any(|k| k.contains("/nonexistent/")), "{k:?}");
    }

    #[test]
    fn bad_acl_rules_are_named() {
        let k = keys("[[broker.acl]]\npublish = [\"sensors/#/x\"]");
        assert!(k[0].starts_with("broker.acl[0].publish[0]"), "{k:?}");
    }
}
