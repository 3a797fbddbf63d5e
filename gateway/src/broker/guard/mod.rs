//! The enforcement layer in front of rumqttd: the embedded broker's
//! listeners when `[broker]` asks for logins.
//!
//! rumqttd 0.20 can check a password on CONNECT, but has no hook for a
//! publish or a subscribe, so it cannot keep a device inside its own
//! topics. The guard accepts each device (plain TCP or TLS), reads its
//! CONNECT, logs it in ([`session`]: password file, client certificate, or
//! anonymous where allowed), and opens one connection to rumqttd on an
//! internal loopback port with the gateway's internal login. From then on
//! it forwards the device's packets ([`pump`]), checking every PUBLISH,
//! SUBSCRIBE and the will against the device's rights; what is refused
//! never reaches rumqttd and is answered the way MQTT 3.1.1 allows (a
//! PUBACK for a dropped QoS 1 publish, a `0x80` return code in the SUBACK).
//!
//! Logged-in devices get client ids of their own (`user:id`), so no device
//! can take over another device's session or the gateway's.
//!
//! Failed logins and refused publishes and subscribes are counted
//! (`edgefn_broker_login_failures_total`, `edgefn_broker_refused_total`)
//! and logged, at most [`WARNINGS_PER_S`] lines a second.

mod pump;
mod session;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use rand::RngCore;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::BrokerError;
use super::acl::AclRule;
use super::passwd::{PasswdError, Passwords};
use crate::config::Access;
use crate::metrics::GatewayMetrics;
use crate::runtime::logs::LogRate;

/// Connections the guard serves at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 1024;
/// Password checks (argon2id, 7 MiB and tens of ms each) run at once; a
/// flood of logins queues here instead of exhausting memory and CPU.
const CONCURRENT_VERIFICATIONS: usize = 2;
/// Warning lines a second about refused clients, before they are summed up.
pub const WARNINGS_PER_S: u32 = 5;
/// The user name of the gateway's own clients on the internal listener.
const INTERNAL_USER: &str = "edgefn-internal";

/// A fresh login for rumqttd's internal listener: never written anywhere.
pub fn internal_login() -> (String, String) {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
    (INTERNAL_USER.to_owned(), password)
}

/// The running enforcement layer.
#[derive(Debug)]
pub struct Guard {
    upstream: SocketAddr,
    login: (String, String),
    acl: Vec<AclRule>,
    password_file: Option<PathBuf>,
    passwords: watch::Sender<Arc<Passwords>>,
    verifying: Semaphore,
    metrics: Arc<GatewayMetrics>,
    warnings: Arc<Mutex<LogRate>>,
    /// The bound listeners: `plain`, and `tls` if configured.
    listeners: Vec<(&'static str, SocketAddr)>,
}

/// One listener's rules.
struct Entry {
    /// `plain` or `tls`, for logs.
    name: &'static str,
    anonymous: bool,
    tls: Option<TlsAcceptor>,
}

impl Guard {
    /// Loads the password file, binds the listeners `access` names, and
    /// starts serving them; devices are forwarded to rumqttd at `upstream`
    /// with `login`.
    pub async fn start(
        access: &Access,
        upstream: SocketAddr,
        login: (String, String),
        metrics: Arc<GatewayMetrics>,
    ) -> Result<Arc<Self>, BrokerError> {
        let passwords = match &access.password_file {
            Some(path) => Passwords::load(path).map_err(BrokerError::Passwords)?,
            None => Passwords::default(),
        };
        let mut entries = vec![(
            access.plain.addr,
            Entry {
                name: "plain",
                anonymous: access.plain.anonymous,
                tls: None,
            },
        )];
        if let Some(t) = &access.tls {
            let acceptor = super::tls::acceptor(&t.cert, &t.key, t.client_ca.as_deref())
                .map_err(BrokerError::Tls)?;
            let entry = Entry {
                name: "tls",
                anonymous: t.listener.anonymous,
                tls: Some(acceptor),
            };
            entries.push((t.listener.addr, entry));
        }
        let mut bound = Vec::new();
        for (addr, entry) in entries {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| BrokerError::Bind {
                    addr,
                    reason: e.to_string(),
                })?;
            bound.push((listener, entry));
        }
        let listeners = bound
            .iter()
            .filter_map(|(l, e)| Some((e.name, l.local_addr().ok()?)))
            .collect();
        let guard = Arc::new(Self {
            upstream,
            login,
            acl: access.acl.clone(),
            password_file: access.password_file.clone(),
            passwords: watch::Sender::new(Arc::new(passwords)),
            verifying: Semaphore::new(CONCURRENT_VERIFICATIONS),
            metrics,
            warnings: LogRate::new(WARNINGS_PER_S),
            listeners,
        });
        let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        for (listener, entry) in bound {
            let addr = listener.local_addr().ok();
            if !entry.anonymous || entry.tls.is_some() || addr.is_some_and(|a| a.ip().is_loopback())
            {
                tracing::info!(listener = entry.name, addr = ?addr, anonymous = entry.anonymous, "Embedded broker listening (logins and topic rights enforced).");
            } else {
                tracing::warn!(listener = entry.name, addr = ?addr, "broker.allow_anonymous = true: anyone who can reach this listener may publish and read every topic without logging in.");
            }
            if entry.tls.is_none()
                && !entry.anonymous
                && !addr.is_some_and(|a| a.ip().is_loopback())
            {
                tracing::warn!(listener = entry.name, addr = ?addr, "Passwords cross the network in the clear on this plain listener: prefer [broker.tls] on the LAN.");
            }
            tokio::spawn(accept(
                guard.clone(),
                listener,
                Arc::new(entry),
                connections.clone(),
            ));
        }
        Ok(guard)
    }

    /// Where the listener `name` (`plain` or `tls`) is bound (its port when
    /// the configuration said 0).
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
    }

    /// Re-reads the password file (SIGHUP). Devices whose entry changed or
    /// went are disconnected; on an error the old entries stay. Returns the
    /// number of users, or `None` without a password file.
    pub fn reload_passwords(&self) -> Result<Option<usize>, PasswdError> {
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let passwords = Passwords::load(path)?;
        let users = passwords.len();
        self.passwords.send_replace(Arc::new(passwords));
        Ok(Some(users))
    }

    /// Logs `warn` unless refusals are flooding the log, in which case they
    /// are summed up at most every few seconds.
    fn warn(&self, warn: impl FnOnce()) {
        let mut rate = self.warnings.lock().unwrap_or_else(|p| p.into_inner());
        if rate.take() {
            drop(rate);
            warn();
        } else if let Some(suppressed) = rate.suppressed() {
            drop(rate);
            tracing::warn!(
                suppressed,
                "More refused broker clients than the log shows; see edgefn_broker_login_failures_total and edgefn_broker_refused_total."
            );
        }
    }

    fn count(&self, counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }
}

/// Accepts connections on one listener until the process ends.
async fn accept(
    guard: Arc<Guard>,
    listener: TcpListener,
    entry: Arc<Entry>,
    connections: Arc<Semaphore>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(listener = entry.name, error = %e, "Embedded broker: accept failed.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            guard.warn(|| tracing::warn!(%peer, max = MAX_CONNECTIONS, "Embedded broker: too many connections; closing a new one."));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (guard, entry) = (guard.clone(), entry.clone());
        tokio::spawn(async move {
            session::serve(&guard, stream, peer, &entry).await;
            drop(permit);
        });
    }
}
