//! The MQTT source: one client connection to the local broker, subscribed at
//! QoS 1 to the union of all functions' trigger filters. Each message becomes
//! an [`Event`] handed to the [`Router`](crate::router::Router).
//!
//! This connection only receives; functions publish through a separate
//! connection ([`crate::output`]), so a function whose queue is full can never
//! block the connection its own publishes go through.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, Packet, QoS, SubscribeFilter};

use super::{Source, SourceContext, SourceError};
use crate::config::MqttEndpoint;
use crate::event::{Event, SourceKind};

/// Settings of the MQTT source.
#[derive(Debug, Clone)]
pub struct MqttSourceConfig {
    /// The local broker.
    pub endpoint: MqttEndpoint,
}

/// The MQTT source.
pub struct MqttSource {
    client: AsyncClient,
    eventloop: EventLoop,
    filters: Vec<String>,
}

impl Source for MqttSource {
    type Config = MqttSourceConfig;

    fn build(config: &Self::Config, ctx: &SourceContext) -> Result<Self, SourceError> {
        let filters = ctx.router.subscriptions();
        let mut opts = crate::mqtt::options(&config.endpoint, "in", Duration::from_secs(30));
        opts.set_clean_session(true);
        let (client, eventloop) = AsyncClient::new(opts, 64);
        Ok(Self {
            client,
            eventloop,
            filters,
        })
    }

    async fn run(mut self, ctx: SourceContext) {
        let mut failures = 0u32;
        loop {
            let polled = tokio::select! {
                () = ctx.cancel.cancelled() => break,
                polled = self.eventloop.poll() => polled,
            };
            match polled {
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    ctx.metrics.events_in.fetch_add(1, Ordering::Relaxed);
                    let topic = p.topic;
                    let mut event = Event::new(SourceKind::Mqtt, topic, p.payload);
                    event
                        .attributes
                        .push(("qos".into(), (p.qos as u8).to_string()));
                    event
                        .attributes
                        .push(("retain".into(), p.retain.to_string()));
                    ctx.router.dispatch(event).await;
                }
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    // A clean session forgets subscriptions: subscribe again
                    // on every connect. `try_` so the poll loop never waits on
                    // its own request channel.
                    let subs = self
                        .filters
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    if self.filters.is_empty() {
                        ctx.ready.send_replace(true);
                        tracing::info!("MQTT source connected; no function has a trigger.");
                    } else if let Err(e) = self.client.try_subscribe_many(subs) {
                        tracing::error!(error = %e, "MQTT source could not subscribe.");
                    } else {
                        tracing::info!(filters = ?self.filters, "MQTT source connected and subscribing.");
                    }
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    ctx.ready.send_replace(true);
                }
                Ok(_) => {}
                Err(e) => {
                    ctx.ready.send_replace(false);
                    ctx.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
                    let wait = crate::mqtt::backoff(failures);
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(error = %e, "MQTT source lost its connection; reconnecting.");
                    } else {
                        tracing::debug!(error = %e, attempt = failures, "MQTT source reconnect failed.");
                    }
                    tokio::select! {
                        () = ctx.cancel.cancelled() => break,
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        let _ = self.client.try_disconnect();
        tracing::debug!("MQTT source stopped.");
    }
}
