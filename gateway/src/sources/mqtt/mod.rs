//! The MQTT source: one client connection to the local broker, subscribed at
//! QoS 1 to the union of all functions' trigger filters, with a persistent
//! session (`clean_session = false`) and manual acknowledgements.
//!
//! # Acknowledgement
//! Each message becomes an [`Event`] carrying an [`AckGuard`]. The guard's
//! last holder — a function worker, or the outbox commit that made the
//! event's forwards durable — lets go only when the event is fully handled;
//! then the message is acknowledged (PUBACK) to the broker. A crash before
//! that means the broker redelivers it: a duplicate, never a loss (with a
//! broker that outlives the gateway).
//!
//! With the **embedded** broker the message is acknowledged as soon as every
//! matching function has queued it ([`AckPoint::Queued`]): rumqttd lives in
//! the gateway's process and keeps nothing on disk, so a crash loses what it
//! holds either way, and holding acks until the outbox commit would only
//! bound throughput to its fixed 100-message in-flight window per commit
//! interval (2,000 events/s at 20 commits/s). The queues still push back:
//! a full `block` queue delays the ack.
//!
//! Acknowledgements go out **strictly in receive order**: rumqttd accepts
//! acks only in order and, given one out of order, disconnects the client
//! and never redelivers the messages it skipped. An event that finishes early
//! waits for those before it. The acks are sent from a task of their own,
//! not from the one polling the event loop (acking from the poll loop can
//! deadlock once the request channel is full). Messages of a connection that
//! was lost are never acked on the next one: the broker redelivers them.
//!
//! This connection only receives; functions publish through a separate
//! connection ([`crate::output`]), so a function whose queue is full can never
//! block the connection its own publishes go through.

mod sequencer;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, Packet, Publish, QoS, SubscribeFilter};
use tokio::sync::{mpsc, watch};

use super::{Source, SourceContext, SourceError};
use crate::config::MqttEndpoint;
use crate::event::{AckGuard, Event, SourceKind};
use sequencer::AckSequencer;

/// Settings of the MQTT source.
#[derive(Debug, Clone)]
pub struct MqttSourceConfig {
    /// The local broker.
    pub endpoint: MqttEndpoint,
    /// When a message is acknowledged.
    pub ack: AckPoint,
}

/// When the source acknowledges a message to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPoint {
    /// When the event is fully handled: every function done and its
    /// forwards committed to the outbox (a broker that outlives the gateway
    /// redelivers anything unacknowledged).
    Handled,
    /// When every matching function has queued the event (the embedded
    /// broker, which does not outlive the gateway).
    Queued,
}

/// The MQTT source.
pub struct MqttSource {
    client: AsyncClient,
    eventloop: EventLoop,
    filters: Vec<String>,
    ack_point: AckPoint,
}

/// A received message awaiting its turn to be acknowledged.
struct Pending {
    n: u64,
    generation: u64,
    ack: Option<Publish>,
}

impl Source for MqttSource {
    type Config = MqttSourceConfig;

    fn build(config: Self::Config, ctx: &SourceContext) -> Result<Self, SourceError> {
        let filters = ctx.router.subscriptions();
        let mut opts = crate::mqtt::options(&config.endpoint, "in", Duration::from_secs(30));
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
        let (client, eventloop) = AsyncClient::new(opts, 1024);
        Ok(Self {
            client,
            eventloop,
            filters,
            ack_point: config.ack,
        })
    }

    async fn run(mut self, ctx: SourceContext) {
        let generation = Arc::new(AtomicU64::new(0));
        let (received_tx, received_rx) = mpsc::unbounded_channel::<Pending>();
        let (done_tx, done_rx) = mpsc::unbounded_channel::<u64>();
        let (acked_tx, mut acked) = watch::channel(0u64);
        let acker = tokio::spawn(ack_in_order(
            self.client.clone(),
            generation.clone(),
            received_rx,
            done_rx,
            acked_tx,
        ));
        let mut router = Some(ctx.router.clone());
        drop(ctx.router);
        let mut next = 0u64;
        let mut failures = 0u32;
        loop {
            let polled = tokio::select! {
                () = ctx.cancel.cancelled(), if router.is_some() => {
                    // Stop dispatching: dropping the router lets the workers
                    // drain. Keep polling so the acks of what is in flight
                    // still reach the broker.
                    router = None;
                    continue;
                }
                // Every dispatched message has had its turn at the acker.
                r = acked.wait_for(|handled| *handled >= next), if router.is_none() => {
                    let _ = r;
                    break;
                }
                polled = self.eventloop.poll() => polled,
            };
            match polled {
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => {
                    let Some(router) = &router else {
                        // Stopping: leave it unacknowledged; the broker
                        // redelivers it to the next run.
                        continue;
                    };
                    ctx.metrics.events_in.fetch_add(1, Ordering::Relaxed);
                    let n = next;
                    next += 1;
                    let ack = (p.qos != QoS::AtMostOnce).then(|| {
                        let mut a = Publish::new(p.topic.clone(), p.qos, Vec::new());
                        a.pkid = p.pkid;
                        a
                    });
                    let _ = received_tx.send(Pending {
                        n,
                        generation: generation.load(Ordering::Relaxed),
                        ack,
                    });
                    let done = done_tx.clone();
                    let mut event = Event::new(SourceKind::Mqtt, p.topic, p.payload);
                    event
                        .attributes
                        .push(("qos".into(), (p.qos as u8).to_string()));
                    event
                        .attributes
                        .push(("retain".into(), p.retain.to_string()));
                    if p.dup {
                        event.attributes.push(("dup".into(), "true".into()));
                    }
                    let guard = Arc::new(AckGuard::new(move || {
                        let _ = done.send(n);
                    }));
                    if self.ack_point == AckPoint::Handled {
                        event.ack = Some(guard.clone());
                    }
                    router.dispatch(event).await;
                    drop(guard);
                }
                Ok(MqttEvent::Incoming(Packet::ConnAck(c))) => {
                    failures = 0;
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
                        tracing::info!(filters = ?self.filters, session_present = c.session_present, "MQTT source connected and subscribing.");
                    }
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    ctx.ready.send_replace(true);
                }
                Ok(_) => {}
                Err(e) => {
                    // Acks of this connection's messages are void now.
                    generation.fetch_add(1, Ordering::Relaxed);
                    ctx.ready.send_replace(false);
                    if router.is_none() {
                        break;
                    }
                    ctx.metrics
                        .source_reconnects
                        .fetch_add(1, Ordering::Relaxed);
                    let wait = crate::mqtt::backoff(failures);
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(error = %e, "MQTT source lost its connection; reconnecting.");
                    } else {
                        tracing::debug!(error = %e, attempt = failures, "MQTT source reconnect failed.");
                    }
                    tokio::select! {
                        () = ctx.cancel.cancelled() => { router = None; }
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        drop(received_tx);
        drop(done_tx);
        // Flush the last acks before disconnecting: requests go out in order.
        let _ = acker.await;
        let _ = self.client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match self.eventloop.poll().await {
                    Ok(MqttEvent::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        tracing::debug!("MQTT source stopped.");
    }
}

/// Acknowledges received messages in receive order, each once its event is
/// done; reports how many it has handled. Runs until the source closes
/// `received` and the queue is empty.
async fn ack_in_order(
    client: AsyncClient,
    generation: Arc<AtomicU64>,
    mut received: mpsc::UnboundedReceiver<Pending>,
    mut done: mpsc::UnboundedReceiver<u64>,
    handled: watch::Sender<u64>,
) {
    let mut order = AckSequencer::new();
    let (mut received_open, mut done_open) = (true, true);
    while received_open || done_open {
        tokio::select! {
            r = received.recv(), if received_open => match r {
                Some(p) => order.received(p.n, p),
                None => received_open = false,
            },
            d = done.recv(), if done_open => match d {
                Some(n) => order.finished(n),
                None => done_open = false,
            },
        }
        for p in order.release() {
            if let Some(publish) = p.ack
                && p.generation == generation.load(Ordering::Relaxed)
                && let Err(e) = client.ack(&publish).await
            {
                tracing::warn!(error = %e, "Acknowledgement could not be queued.");
            }
        }
        handled.send_replace(order.released());
        if !received_open && order.is_empty() {
            break;
        }
    }
}
