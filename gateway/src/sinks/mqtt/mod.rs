//! The MQTT sink: delivers forwarded records to a (cloud) broker at QoS 1,
//! over TCP or TLS (rustls, custom CA, optional client certificate for mutual
//! TLS, optional ALPN), on a topic rendered from the sink's template.
//!
//! One task feeds records into the rumqttc client; another polls its event
//! loop (reconnecting with back-off) and counts PUBACKs. When the record
//! queue closes at shutdown, the sink waits a short grace period for
//! outstanding acknowledgements before disconnecting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, Packet, QoS};

use super::{Sink, SinkContext, envelope};
use crate::config::{SinkSpec, render_topic};

/// How long a stopping sink waits for outstanding PUBACKs.
const ACK_GRACE: Duration = Duration::from_secs(5);

/// The MQTT sink.
pub struct MqttSink {
    spec: SinkSpec,
}

impl Sink for MqttSink {
    type Config = SinkSpec;

    fn build(config: &SinkSpec) -> Self {
        Self {
            spec: config.clone(),
        }
    }

    async fn run(self, mut ctx: SinkContext) {
        let spec = self.spec;
        let mut opts = crate::mqtt::options(&spec.endpoint, "", spec.keep_alive);
        opts.set_inflight(spec.max_inflight);
        opts.set_clean_session(true);
        let (client, mut eventloop) =
            AsyncClient::new(opts, usize::from(spec.max_inflight).max(16));
        let acked = Arc::new(AtomicU64::new(0));
        let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0u64);

        let name = spec.name.clone();
        let metrics = ctx.metrics.clone();
        let poll_acked = acked.clone();
        let poller = async move {
            let mut failures = 0u32;
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::PubAck(_))) => {
                        let n = poll_acked.fetch_add(1, Ordering::Relaxed) + 1;
                        metrics.sink_acked.fetch_add(1, Ordering::Relaxed);
                        let _ = acked_tx.send(n);
                    }
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                        failures = 0;
                        tracing::info!(sink = %name, "Sink connected.");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                        if failures == 0 {
                            tracing::warn!(sink = %name, error = %e, "Sink lost its connection; reconnecting.");
                        }
                        let wait = crate::mqtt::backoff(failures);
                        failures = failures.saturating_add(1);
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        };

        let feeder = async {
            let mut seq = 0u64;
            let mut sent = 0u64;
            while let Some(record) = ctx.records.recv().await {
                seq += 1;
                let topic = render_topic(
                    &spec.topic_template,
                    &ctx.gateway_id,
                    &record.function,
                    &spec.name,
                    &record.source_topic,
                );
                let body = envelope::encode(spec.format, &ctx.gateway_id, seq, &record);
                match client.publish(topic, QoS::AtLeastOnce, false, body).await {
                    Ok(()) => sent += 1,
                    Err(e) => {
                        ctx.metrics.sink_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(sink = %spec.name, seq, error = %e, "Sink could not queue a record.");
                    }
                }
            }
            // Shutdown: give outstanding acknowledgements a grace period.
            let waited = tokio::time::timeout(ACK_GRACE, acked_rx.wait_for(|n| *n >= sent)).await;
            let unacked = sent.saturating_sub(acked.load(Ordering::Relaxed));
            if waited.is_err() && unacked > 0 {
                tracing::warn!(sink = %spec.name, unacked, "Sink stopped with records not acknowledged.");
            }
            let _ = client.try_disconnect();
        };

        tokio::select! {
            () = poller => {}
            () = feeder => {}
        }
        tracing::debug!(sink = %spec.name, "Sink stopped.");
    }
}
