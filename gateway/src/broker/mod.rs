//! The embedded MQTT broker (rumqttd), so sensors can connect to the gateway
//! itself without any other service on the board.
//!
//! rumqttd runs on threads of its own and has no shutdown call: the broker
//! lives until the process exits. Its sessions live in memory only; a
//! device's QoS 1 publish is acknowledged by the broker on receipt (see the
//! README's delivery guarantees).
//!
//! rumqttd keeps an in-memory log per subscription filter, whether or not
//! anyone reads it. Its size is bounded by `broker.retention_bytes_per_filter`,
//! cut into [`RETENTION_SEGMENTS`] segments: when the log is full the oldest
//! segment goes. rumqttd cannot hold a publisher back for a slow subscriber;
//! a subscriber whose position was in a dropped segment jumps ahead. rumqttd
//! reports each jump as an alert, which [`watch_skips`] counts
//! (`edgefn_broker_subscriber_skips_total`) and logs.
//!
//! rumqttd authenticates a CONNECT but cannot authorize a publish or a
//! subscribe. When `[broker]` asks for logins (a password file or a TLS
//! listener), rumqttd listens only on an internal loopback port that
//! requires a password generated at start, and the [`guard`] serves the
//! configured listeners: it logs devices in, checks every publish and
//! subscribe against their rights, and forwards what is allowed.
//! [`start`] chooses between the two shapes.

pub mod acl;
pub mod guard;
pub mod passwd;
pub mod tls;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttd::{
    Config, ConnectionSettings, MetricSettings, MetricType, RouterConfig, ServerSettings,
};

use crate::config::{Access, MqttEndpoint};
use crate::metrics::GatewayMetrics;

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The listen address is taken or not local.
    #[error("embedded broker: cannot listen on {addr}: {reason}")]
    Bind {
        /// The address from `broker.listen`.
        addr: SocketAddr,
        /// The OS error.
        reason: String,
    },
    /// `broker.password_file` could not be read.
    #[error("embedded broker: {0}")]
    Passwords(#[source] passwd::PasswdError),
    /// `[broker.tls]` could not be set up.
    #[error("embedded broker: {0}")]
    Tls(#[source] tls::TlsSetupError),
    /// The broker's thread did not come up.
    #[error("embedded broker: did not start on {addr}: {reason}")]
    Start {
        /// The address from `broker.listen`.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
}

/// Largest MQTT packet payload the embedded broker accepts.
pub const MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Segments each filter's log is cut into: a subscriber that falls behind
/// is always at least `(RETENTION_SEGMENTS - 1) / RETENTION_SEGMENTS` of the
/// retention away from losing anything.
pub const RETENTION_SEGMENTS: u64 = 4;

/// Default `broker.retention_bytes_per_filter`: 1 MiB per filter, a few MB
/// for a typical configuration, and at 500 readings/s several seconds of
/// slack for a subscriber that pauses.
pub const DEFAULT_RETENTION_BYTES: u64 = 1024 * 1024;

/// Smallest `broker.retention_bytes_per_filter` (rumqttd needs segments of
/// at least 1 KiB; smaller logs only lose more).
pub const MIN_RETENTION_BYTES: u64 = 64 * 1024;

/// Largest `broker.retention_bytes_per_filter`.
pub const MAX_RETENTION_BYTES: u64 = 1024 * 1024 * 1024;

/// How often rumqttd hands its alerts (cursor jumps) over, in seconds.
const ALERT_INTERVAL_S: u64 = 1;

/// The running embedded broker, as the gateway's own clients reach it.
#[derive(Debug, Clone)]
pub struct Running {
    /// Where the gateway's own clients connect (rumqttd itself).
    pub addr: SocketAddr,
    /// The internal login they use, when rumqttd sits behind the guard.
    pub login: Option<(String, String)>,
    /// The enforcement layer, when `[broker]` asks for logins.
    pub guard: Option<Arc<guard::Guard>>,
}

impl Running {
    /// `endpoint` as the gateway's own client should reach the embedded
    /// broker: an MQTT sink pointed at the guard's plain listener without
    /// credentials of its own is sent to rumqttd directly with the internal
    /// login, so it keeps working when that listener requires logins.
    pub fn own_client(&self, endpoint: &MqttEndpoint) -> Option<MqttEndpoint> {
        let (login, guard) = (self.login.as_ref()?, self.guard.as_ref()?);
        let plain = guard.listener("plain")?;
        let host_ip = match endpoint.host.as_str() {
            "localhost" => Some(std::net::IpAddr::from([127, 0, 0, 1])),
            host => host.parse().ok(),
        };
        let ours = host_ip.is_some_and(|ip| {
            ip == plain.ip()
                || (ip.is_loopback() && (plain.ip().is_loopback() || plain.ip().is_unspecified()))
        });
        (ours
            && endpoint.port == plain.port()
            && endpoint.tls.is_none()
            && endpoint.credentials.is_none())
        .then(|| MqttEndpoint {
            host: self.addr.ip().to_string(),
            port: self.addr.port(),
            credentials: Some(login.clone()),
            ..endpoint.clone()
        })
    }
}

/// Starts the embedded broker as `access` asks: rumqttd alone on
/// `broker.listen` when everyone is anonymous, else rumqttd on an internal
/// loopback port behind the [`guard`]'s listeners.
pub async fn start(
    access: &Access,
    retention_bytes_per_filter: u64,
    metrics: Arc<GatewayMetrics>,
) -> Result<Running, BrokerError> {
    let (listen, login) = if access.guarded() {
        (free_loopback_port()?, Some(guard::internal_login()))
    } else {
        if !access.plain.addr.ip().is_loopback() {
            tracing::warn!(listen = %access.plain.addr, "broker.allow_anonymous = true: anyone who can reach the embedded broker may publish and read every topic.");
        }
        (access.plain.addr, None)
    };
    let (m, l) = (metrics.clone(), login.clone());
    let broker = tokio::task::spawn_blocking(move || {
        EmbeddedBroker::start(listen, l, retention_bytes_per_filter, m)
    })
    .await
    .map_err(|e| BrokerError::Start {
        addr: listen,
        reason: e.to_string(),
    })??;
    let guard = match &login {
        Some(login) => {
            Some(guard::Guard::start(access, broker.addr(), login.clone(), metrics).await?)
        }
        None => None,
    };
    Ok(Running {
        addr: broker.addr(),
        login,
        guard,
    })
}

/// A loopback port free right now, for rumqttd's internal listener
/// (rumqttd cannot report the port it bound for port 0).
fn free_loopback_port() -> Result<SocketAddr, BrokerError> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    TcpListener::bind(any)
        .and_then(|l| l.local_addr())
        .map_err(|e| BrokerError::Bind {
            addr: any,
            reason: e.to_string(),
        })
}

/// A running rumqttd.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `listen`, keeping `retention_bytes_per_filter` per
    /// subscription filter, and waits (up to 10 s) until it accepts
    /// connections. With `login`, rumqttd accepts only that user name and
    /// password. Subscribers that skip messages are counted in `metrics`.
    pub fn start(
        listen: SocketAddr,
        login: Option<(String, String)>,
        retention_bytes_per_filter: u64,
        metrics: Arc<GatewayMetrics>,
    ) -> Result<Self, BrokerError> {
        // rumqttd only logs a bind failure from its own thread: check first so
        // the user gets a clear error (a small race remains).
        let addr = TcpListener::bind(listen)
            .and_then(|l| l.local_addr())
            .map_err(|e| BrokerError::Bind {
                addr: listen,
                reason: e.to_string(),
            })?;
        let start_error = |reason: String| BrokerError::Start { addr, reason };
        let probe_login = login.clone();
        let config =
            rumqttd_config(addr, login, retention_bytes_per_filter).map_err(start_error)?;
        let mut broker = rumqttd::Broker::new(config);
        let alerts = broker.alerts().map_err(|e| start_error(e.to_string()))?;
        std::thread::Builder::new()
            .name("edgefn-broker-alerts".into())
            .spawn(move || watch_skips(&alerts, &metrics, retention_bytes_per_filter))
            .map_err(|e| start_error(e.to_string()))?;
        std::thread::Builder::new()
            .name("edgefn-broker".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "Embedded broker stopped.");
                }
            })
            .map_err(|e| start_error(e.to_string()))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match probe(addr, probe_login.as_ref()) {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => return Err(start_error(e.to_string())),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        tracing::info!(%addr, retention_bytes_per_filter, "Embedded MQTT broker listening.");
        Ok(Self { addr })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// rumqttd's configuration: one MQTT 3.1.1 listener on `addr`, each
/// filter's log bounded to `retention` bytes, alerts handed over every
/// second.
fn rumqttd_config(
    addr: SocketAddr,
    login: Option<(String, String)>,
    retention: u64,
) -> Result<Config, String> {
    let server = ServerSettings {
        name: "edgefn-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD_BYTES,
            max_inflight_count: 500,
            auth: login.map(|(user, password)| HashMap::from([(user, password)])),
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let segment = usize::try_from(retention / RETENTION_SEGMENTS)
        .map_err(|_| format!("retention of {retention} bytes does not fit this platform"))?;
    // rumqttd's timer thread needs both intervals (it unwraps each);
    // `MetricSettings` can only be built by deserializing.
    let every = |s: u64| {
        toml::from_str::<MetricSettings>(&format!("push_interval = {s}")).map_err(|e| e.to_string())
    };
    Ok(Config {
        id: 0,
        // A default RouterConfig is all zeros and fails silently: every
        // field is set explicitly.
        router: RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: segment,
            max_segment_count: RETENTION_SEGMENTS as usize,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        metrics: Some(HashMap::from([
            (MetricType::Alerts, every(ALERT_INTERVAL_S)?),
            (MetricType::Meters, every(3600)?),
        ])),
        ..Default::default()
    })
}

/// Counts and logs rumqttd's cursor-jump alerts: a subscriber fell further
/// behind than the retention and skipped the oldest messages. Runs until
/// the broker's router goes away.
fn watch_skips(alerts: &rumqttd::alerts::AlertsLink, metrics: &GatewayMetrics, retention: u64) {
    while let Ok(batch) = alerts.router_rx.recv() {
        for alert in batch {
            // rumqttd does not export the alert kind's type: match its name.
            if alert.kind.name() != "cursor_jump" {
                continue;
            }
            metrics.broker_skips.fetch_add(1, Ordering::Relaxed);
            let filter = serde_json::to_value(&alert.kind)
                .ok()
                .and_then(|v| v.pointer("/CursorJump/filter")?.as_str().map(cut))
                .unwrap_or_default();
            tracing::warn!(
                client = %cut(&alert.client_id),
                %filter,
                retention_bytes_per_filter = retention,
                "A subscriber of the embedded broker fell further behind than its retention and skipped the oldest messages."
            );
        }
    }
}

/// A client id or filter from outside, cut for a log line.
fn cut(s: &str) -> String {
    s.chars().take(128).collect()
}

/// Readiness: a real MQTT 3.1.1 CONNECT (with `login` when rumqttd
/// requires one) answered by an accepting CONNACK, then a clean DISCONNECT
/// (a bare TCP connect makes rumqttd log an error).
fn probe(addr: SocketAddr, login: Option<&(String, String)>) -> std::io::Result<()> {
    use rumqttc::mqttbytes::v4::{Connect, Disconnect};
    let mut connect = Connect::new("edgeprob");
    connect.keep_alive = 10;
    if let Some((user, password)) = login {
        connect.set_login(user, password);
    }
    let mut out = bytes::BytesMut::new();
    connect.write(&mut out).map_err(std::io::Error::other)?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(&out)?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other(format!(
            "unexpected CONNACK {connack:02x?}"
        )));
    }
    out.clear();
    Disconnect.write(&mut out).map_err(std::io::Error::other)?;
    s.write_all(&out)?;
    Ok(())
}
