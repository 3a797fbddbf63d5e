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
//! This machinery lives in [`intake`], shared with the MQTT sinks' cloud
//! commands.
//!
//! # Back-pressure
//! The task polling rumqttc's event loop never waits on the functions: it
//! hands each message to a dispatcher task and polls on, so keep-alive pings
//! go out however long a full queue or a full outbox (`refuse`) holds the
//! intake back. Holding back means not dispatching and not acknowledging:
//! the broker stops sending QoS 1 messages once its in-flight window of
//! unacknowledged ones is full, and keeps the rest. QoS 0 messages have no
//! such window: at most [`MAX_HELD_QOS0`] of them ([`MAX_HELD_QOS0_BYTES`]
//! of payload) wait for the dispatcher; beyond that they are dropped,
//! counted and logged (QoS 0 is at-most-once by contract).
//!
//! # Subscriptions follow the function set
//! The source watches the router's subscriptions
//! ([`crate::router::Router::watch_subscriptions`]). When a reload changes
//! them, it first SUBSCRIBEs the new filters and only once the broker has
//! acknowledged that does it UNSUBSCRIBE the ones no longer needed, so no
//! message is missed in between. A topic matched by both an old narrow
//! filter and a new broad one may be delivered twice during the switch (a
//! duplicate, like any QoS 1 redelivery). After a reconnect it subscribes to
//! the current set.
//!
//! This connection only receives; functions publish through a separate
//! connection ([`crate::output`]), so a function whose queue is full can never
//! block the connection its own publishes go through.

pub(crate) mod intake;
mod sequencer;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, Packet, QoS, SubscribeFilter};
use tokio::sync::watch;

use super::{Source, SourceContext, SourceError};
use crate::config::MqttEndpoint;
use intake::IntakeOptions;

/// QoS 0 messages waiting for the dispatcher at most (see Back-pressure).
pub const MAX_HELD_QOS0: usize = 1024;
/// Payload bytes of the QoS 0 messages waiting for the dispatcher at most.
pub const MAX_HELD_QOS0_BYTES: usize = 16 * 1024 * 1024;

/// Settings of the MQTT source.
#[derive(Debug, Clone)]
pub struct MqttSourceConfig {
    /// The local broker.
    pub endpoint: MqttEndpoint,
    /// Keep-alive of the connection (`broker.keep_alive_s`).
    pub keep_alive: Duration,
    /// When a message is acknowledged.
    pub ack: AckPoint,
    /// The subscriptions the broker has acknowledged on the current
    /// connection (empty while disconnected), so a caller can wait until a
    /// changed function set's triggers are live.
    pub live: Arc<watch::Sender<Vec<String>>>,
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
    /// The subscriptions the function set needs now.
    filters: Vec<String>,
    /// The router's subscriptions; `None` once the router is gone.
    subs: Option<watch::Receiver<Vec<String>>>,
    /// Filters no longer needed, unsubscribed once the broker has
    /// acknowledged the new ones.
    stale: Vec<String>,
    /// SUBSCRIBE requests of this connection not yet acknowledged.
    unacked: usize,
    /// See [`MqttSourceConfig::live`].
    live: Arc<watch::Sender<Vec<String>>>,
    ack_point: AckPoint,
}

impl Source for MqttSource {
    type Config = MqttSourceConfig;

    fn build(config: Self::Config, ctx: &SourceContext) -> Result<Self, SourceError> {
        let mut subs = ctx.router.watch_subscriptions();
        let filters = subs.borrow_and_update().clone();
        let mut opts = crate::mqtt::options(&config.endpoint, "in", config.keep_alive);
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
        let (client, eventloop) = AsyncClient::new(opts, 1024);
        Ok(Self {
            client,
            eventloop,
            filters,
            subs: Some(subs),
            stale: Vec::new(),
            unacked: 0,
            live: config.live,
            ack_point: config.ack,
        })
    }

    async fn run(mut self, ctx: SourceContext) {
        let (mut intaker, mut acker) = intake::start(
            ctx.router.clone(),
            ctx.cancel.clone(),
            Some(intake::AckClient::V4(self.client.clone())),
            ctx.metrics.clone(),
            IntakeOptions {
                ack_point: self.ack_point,
                attributes: Vec::new(),
                counters: Arc::new(intake::SourceCounters),
            },
        );
        drop(ctx.router);
        let mut failures = 0u32;
        loop {
            let stopping = intaker.stopped();
            let polled = tokio::select! {
                () = ctx.cancel.cancelled(), if !stopping => {
                    // Stop dispatching: the dispatcher drops the router once
                    // it has passed on what it holds, which lets the workers
                    // drain. Keep polling so the acks of what is in flight
                    // still reach the broker.
                    intaker.stop();
                    continue;
                }
                // Every dispatched message has had its turn at the acker.
                r = acker.handled.wait_for(|handled| *handled >= intaker.taken()), if stopping => {
                    let _ = r;
                    break;
                }
                changed = changed(&mut self.subs), if !stopping => {
                    match changed {
                        Some(next) => self.follow(next),
                        None => self.subs = None,
                    }
                    continue;
                }
                polled = self.eventloop.poll() => polled,
            };
            match polled {
                Ok(MqttEvent::Incoming(Packet::Publish(p))) => intaker.take(p),
                Ok(MqttEvent::Incoming(Packet::ConnAck(c))) => {
                    failures = 0;
                    self.subscribe(&ctx.ready, c.session_present);
                }
                Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                    ctx.ready.send_replace(true);
                    self.acknowledged();
                }
                Ok(MqttEvent::Incoming(Packet::UnsubAck(_))) => self.acknowledged(),
                Ok(_) => {}
                Err(e) => {
                    // Acks of this connection's messages are void now.
                    intaker.connection_lost();
                    ctx.ready.send_replace(false);
                    self.live.send_replace(Vec::new());
                    if intaker.stopped() {
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
                        () = ctx.cancel.cancelled() => { intaker.stop(); }
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        drop(intaker);
        // Flush the last acks before disconnecting: requests go out in order.
        let _ = acker.task.await;
        self.disconnect().await;
        tracing::debug!("MQTT source stopped.");
    }
}

impl MqttSource {
    /// Disconnects cleanly, waiting up to 2 s for the DISCONNECT to go out.
    async fn disconnect(&mut self) {
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
    }
}

/// The next set of subscriptions; `None` once the router is gone (never
/// resolves without a watch).
async fn changed(subs: &mut Option<watch::Receiver<Vec<String>>>) -> Option<Vec<String>> {
    match subs {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

impl MqttSource {
    /// Switches to the subscriptions `next`: new filters are subscribed now,
    /// the ones no longer needed unsubscribed once the broker has
    /// acknowledged them (at once if nothing is new).
    fn follow(&mut self, next: Vec<String>) {
        let added: Vec<String> = next
            .iter()
            .filter(|f| !self.filters.contains(f))
            .cloned()
            .collect();
        let gone = self.filters.iter().filter(|f| !next.contains(f)).cloned();
        self.stale.extend(gone);
        self.stale.retain(|f| !next.contains(f));
        self.filters = next;
        if added.is_empty() {
            if self.unacked == 0 {
                self.unsubscribe_stale();
            }
            return;
        }
        let subs = added
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        match self.client.try_subscribe_many(subs) {
            Ok(()) => {
                self.unacked += 1;
                tracing::info!(added = ?added, stale = ?self.stale, "MQTT source: the function set changed; subscribing to the new filters.");
            }
            Err(e) => {
                tracing::error!(error = %e, "MQTT source could not subscribe to the new filters.");
            }
        }
    }

    /// A SUBACK or UNSUBACK: once every SUBSCRIBE of this connection is
    /// acknowledged the stale filters go, and once those are acknowledged
    /// too the broker's subscriptions are exactly the current filters.
    fn acknowledged(&mut self) {
        self.unacked = self.unacked.saturating_sub(1);
        if self.unacked == 0 {
            self.unsubscribe_stale();
        }
        if self.unacked == 0 {
            if self.live.borrow().as_slice() != self.filters.as_slice() {
                tracing::info!(filters = ?self.filters, "MQTT source: subscriptions acknowledged; every trigger is live.");
            }
            self.live.send_replace(self.filters.clone());
        }
    }

    /// Unsubscribes the filters no longer needed.
    fn unsubscribe_stale(&mut self) {
        for filter in self.stale.drain(..) {
            if let Err(e) = self.client.try_unsubscribe(filter.clone()) {
                tracing::warn!(filter = %filter, error = %e, "MQTT source could not unsubscribe.");
            } else {
                self.unacked += 1;
                tracing::info!(filter = %filter, "MQTT source: unsubscribed a filter no function needs any more.");
            }
        }
    }

    /// Subscribes to the triggers after a CONNACK.
    fn subscribe(&mut self, ready: &watch::Sender<bool>, session_present: bool) {
        // A new connection: earlier requests are void.
        self.unacked = 0;
        let subs = self
            .filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        if self.filters.is_empty() {
            ready.send_replace(true);
            self.live.send_replace(Vec::new());
            tracing::info!("MQTT source connected; no function has a trigger.");
        } else if let Err(e) = self.client.try_subscribe_many(subs) {
            tracing::error!(error = %e, "MQTT source could not subscribe.");
        } else {
            self.unacked = 1;
            tracing::info!(filters = ?self.filters, session_present, "MQTT source connected and subscribing.");
        }
    }
}
