//! Shared helpers for the gateway's MQTT client connections (the source, the
//! local publisher and the MQTT sinks).

use std::time::Duration;

use rumqttc::{MqttOptions, Transport};

use crate::config::MqttEndpoint;

/// Longest wait between reconnect attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Client options for `endpoint`, with `suffix` appended to the client id so
/// that one gateway's connections do not take over each other's sessions.
pub fn options(endpoint: &MqttEndpoint, suffix: &str, keep_alive: Duration) -> MqttOptions {
    let id = if suffix.is_empty() {
        endpoint.client_id.clone()
    } else {
        format!("{}-{suffix}", endpoint.client_id)
    };
    let mut opts = MqttOptions::new(id, endpoint.host.clone(), endpoint.port);
    opts.set_keep_alive(keep_alive);
    opts.set_max_packet_size(
        crate::broker::MAX_PAYLOAD_BYTES + 64 * 1024,
        crate::broker::MAX_PAYLOAD_BYTES + 64 * 1024,
    );
    if let Some((user, password)) = &endpoint.credentials {
        opts.set_credentials(user.clone(), password.clone());
    }
    if let Some(tls) = &endpoint.tls {
        let alpn = (!tls.alpn.is_empty()).then(|| tls.alpn.clone());
        opts.set_transport(Transport::tls(
            tls.ca.clone(),
            tls.client_auth.clone(),
            alpn,
        ));
    }
    opts
}

/// Exponential back-off: 100 ms doubling up to [`MAX_BACKOFF`].
pub fn backoff(attempt: u32) -> Duration {
    let ms = 100u64.saturating_mul(1u64 << attempt.min(10));
    Duration::from_millis(ms).min(MAX_BACKOFF)
}
