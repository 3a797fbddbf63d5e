//! The embedded MQTT broker (rumqttd), so sensors can connect to the gateway
//! itself without any other service on the board.
//!
//! rumqttd runs on threads of its own and has no shutdown call: the broker
//! lives until the process exits. Its sessions live in memory only; a
//! device's QoS 1 publish is acknowledged by the broker on receipt (see the
//! README's delivery guarantees).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

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

/// A running embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `listen` and waits (up to 10 s) until it accepts
    /// connections.
    pub fn start(listen: SocketAddr) -> Result<Self, BrokerError> {
        // rumqttd only logs a bind failure from its own thread: check first so
        // the user gets a clear error (a small race remains).
        let addr = TcpListener::bind(listen)
            .and_then(|l| l.local_addr())
            .map_err(|e| BrokerError::Bind {
                addr: listen,
                reason: e.to_string(),
            })?;
        let server = ServerSettings {
            name: "edgefn-v4".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: MAX_PAYLOAD_BYTES,
                max_inflight_count: 500,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = Config {
            id: 0,
            // A default RouterConfig is all zeros and fails silently: every
            // field is set explicitly.
            router: RouterConfig {
                max_connections: 10_010,
                max_outgoing_packet_count: 200,
                max_segment_size: 10 * 1024 * 1024,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
            v4: Some(HashMap::from([("1".to_owned(), server)])),
            ..Default::default()
        };
        std::thread::Builder::new()
            .name("edgefn-broker".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "Embedded broker stopped.");
                }
            })
            .map_err(|e| BrokerError::Start {
                addr,
                reason: e.to_string(),
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match probe(addr) {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(BrokerError::Start {
                        addr,
                        reason: e.to_string(),
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        tracing::info!(%addr, "Embedded MQTT broker listening.");
        Ok(Self { addr })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Readiness: a real MQTT 3.1.1 CONNECT answered by a CONNACK, then a clean
/// DISCONNECT (a bare TCP connect makes rumqttd log an error).
fn probe(addr: SocketAddr) -> std::io::Result<()> {
    const CONNECT: [u8; 22] = [
        0x10, 20, // CONNECT, remaining length
        0, 4, b'M', b'Q', b'T', b'T', 4, // protocol name and level 4 (3.1.1)
        0x02, 0, 10, // clean session, keep-alive 10 s
        0, 8, b'e', b'd', b'g', b'e', b'p', b'r', b'o', b'b', // client id
    ];
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(&CONNECT)?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other(format!(
            "unexpected CONNACK {connack:02x?}"
        )));
    }
    s.write_all(&[0xe0, 0])?;
    Ok(())
}
