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
//! and acknowledgements go out while a full queue or a full outbox
//! (`refuse`) holds the intake back. Holding back means not dispatching and
//! not acknowledging.
//!
//! A broker's in-flight window does not bound what arrives: Mosquitto
//! 2.0.11 with `max_inflight_messages 1000` was measured sending a client
//! that acknowledges slowly 18,000 unacknowledged messages, and the gateway
//! held 28,679 of them in memory under a flood (138 MB). So at most
//! [`MAX_HELD_QOS1`] QoS 1 and 2 messages ([`MAX_HELD_QOS1_BYTES`] of
//! payload) wait for the dispatcher. At that limit the source stops reading
//! (`edgefn_source_paused_total`) until half of them have been dispatched:
//! the broker keeps the rest (TCP back-pressure). A pause lasts at most a
//! quarter of the keep-alive period, so that acknowledgements and pings keep
//! the connection alive; if the functions are still stalled then (a full
//! outbox under `refuse`, say), the source reads on but **defers** QoS 1
//! and 2 messages: it neither dispatches nor acknowledges them, nor any
//! after them. Once everything taken in before has been handled and
//! acknowledged, it disconnects cleanly and resumes its session, and the
//! broker sends the deferred messages again, in order
//! (`edgefn_source_deferred_total`, `edgefn_source_resyncs_total`). Nothing
//! is lost or handled twice: no acknowledgement is ever sent past a deferred
//! message. QoS 0 messages have
//! no redelivery: at most [`MAX_HELD_QOS0`] of them ([`MAX_HELD_QOS0_BYTES`]
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

mod held;
pub(crate) mod intake;
mod sequencer;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, Packet, QoS, SubscribeFilter};
use tokio::sync::watch;

use super::{Source, SourceContext, SourceError};
use crate::config::MqttEndpoint;
use intake::{IntakeOptions, Intaker};

/// QoS 0 messages waiting for the dispatcher at most (see Back-pressure).
pub const MAX_HELD_QOS0: usize = 1024;
/// Payload bytes of the QoS 0 messages waiting for the dispatcher at most.
pub const MAX_HELD_QOS0_BYTES: usize = 16 * 1024 * 1024;
/// How long the broker has to close the connection after a resync's
/// DISCONNECT.
const RESYNC_CLOSE: Duration = Duration::from_secs(5);

/// QoS 1 and 2 messages waiting for the dispatcher at most: the source
/// defers the ones beyond (see Back-pressure).
pub const MAX_HELD_QOS1: usize = 1024;
/// Payload bytes of the QoS 1 and 2 messages waiting for the dispatcher at
/// most.
pub const MAX_HELD_QOS1_BYTES: usize = 16 * 1024 * 1024;

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
        let SourceContext {
            cancel,
            router,
            metrics,
            ready,
        } = ctx;
        // The router goes to the intake alone, so that the workers drain
        // once it lets go.
        let ctx = Links {
            cancel,
            metrics,
            ready,
        };
        let (mut intaker, mut acker) = intake::start(
            router,
            ctx.cancel.clone(),
            Some(intake::AckClient::V4(self.client.clone())),
            ctx.metrics.clone(),
            IntakeOptions {
                ack_point: self.ack_point,
                attributes: Vec::new(),
                counters: Arc::new(intake::SourceCounters),
                defer_when_full: true,
            },
        );
        let mut failures = 0u32;
        // A resync's DISCONNECT is queued (until when the broker has to
        // close the connection): the connection that follows resumes the
        // session; it was not lost.
        let mut resyncing: Option<tokio::time::Instant> = None;
        // The DISCONNECT found the request channel full: try after a poll.
        let mut retry = false;
        // When reading stopped because the held messages reached their
        // limit; reading stops at most a quarter of the keep-alive, so the
        // acks and pings keep the connection alive.
        let mut paused: Option<tokio::time::Instant> = None;
        let longest_pause = self.eventloop.mqtt_options.keep_alive() / 4;
        loop {
            let stopping = intaker.stopped();
            let resync = intaker.deferring() && resyncing.is_none() && !retry && !stopping;
            let full = !stopping && !intaker.deferring() && intaker.full();
            if full && paused.is_none() {
                paused = Some(tokio::time::Instant::now());
                ctx.metrics.source_paused.fetch_add(1, Ordering::Relaxed);
            }
            let until = paused.map(|at| at + longest_pause);
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
                r = acker.handled.wait_for(|handled| *handled >= intaker.taken()), if stopping || resync => {
                    let _ = r;
                    if stopping {
                        break;
                    }
                    // Everything before the deferred messages is acked (the
                    // DISCONNECT goes out after those acks): resume the
                    // session, and the broker sends the deferred ones again.
                    retry = self.client.try_disconnect().is_err();
                    resyncing = (!retry).then(|| tokio::time::Instant::now() + RESYNC_CLOSE);
                    continue;
                }
                // The broker did not close the connection: drop it.
                () = sleep_until(resyncing) => {
                    self.eventloop.clean();
                    self.resynced(&mut intaker, &ctx);
                    resyncing = None;
                    continue;
                }
                changed = changed(&mut self.subs), if !stopping => {
                    match changed {
                        Some(next) => self.follow(next),
                        None => self.subs = None,
                    }
                    continue;
                }
                // Half the held messages have been dispatched: read again.
                () = intaker.room(), if full => {
                    paused = None;
                    continue;
                }
                // The functions are stalled: read on, deferring QoS 1.
                () = sleep_until(until), if full => {
                    paused = None;
                    intaker.defer();
                    continue;
                }
                polled = self.eventloop.poll(), if !full => polled,
            };
            paused = None;
            retry = false;
            if self
                .polled(polled, &mut intaker, &ctx, &mut resyncing, &mut failures)
                .await
            {
                break;
            }
        }
        drop(intaker);
        // Flush the last acks before disconnecting: requests go out in order.
        let _ = acker.task.await;
        self.disconnect().await;
        tracing::debug!("MQTT source stopped.");
    }
}

/// The connection was lost: counts it and waits before the next attempt.
/// Returns whether to stop (the source is stopping).
async fn lost(
    e: rumqttc::ConnectionError,
    intaker: &mut Intaker,
    ctx: &Links,
    failures: &mut u32,
) -> bool {
    if intaker.stopped() {
        return true;
    }
    ctx.metrics
        .source_reconnects
        .fetch_add(1, Ordering::Relaxed);
    let wait = crate::mqtt::backoff(*failures);
    *failures = failures.saturating_add(1);
    if *failures == 1 {
        tracing::warn!(error = %e, "MQTT source lost its connection; reconnecting.");
    } else {
        tracing::debug!(error = %e, attempt = *failures, "MQTT source reconnect failed.");
    }
    tokio::select! {
        () = ctx.cancel.cancelled() => { intaker.stop(); }
        () = tokio::time::sleep(wait) => {}
    }
    false
}

/// Sleeps until `at`; never wakes for `None`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the source's connection handling needs of its context.
struct Links {
    cancel: tokio_util::sync::CancellationToken,
    metrics: Arc<crate::metrics::GatewayMetrics>,
    ready: Arc<watch::Sender<bool>>,
}

impl MqttSource {
    /// Handles what the event loop returned. `resyncing`: set while a
    /// resync's DISCONNECT waits for the broker to close the connection.
    /// Returns whether to stop (the connection is lost and the source is
    /// stopping).
    async fn polled(
        &mut self,
        polled: Result<MqttEvent, rumqttc::ConnectionError>,
        intaker: &mut Intaker,
        ctx: &Links,
        resyncing: &mut Option<tokio::time::Instant>,
        failures: &mut u32,
    ) -> bool {
        match polled {
            Ok(MqttEvent::Incoming(Packet::Publish(p))) => intaker.take(p),
            Ok(MqttEvent::Incoming(Packet::ConnAck(c))) => {
                *failures = 0;
                self.subscribe(&ctx.ready, c.session_present);
            }
            Ok(MqttEvent::Incoming(Packet::SubAck(_))) => {
                ctx.ready.send_replace(true);
                self.acknowledged();
            }
            Ok(MqttEvent::Incoming(Packet::UnsubAck(_))) => self.acknowledged(),
            Ok(_) => {}
            // The broker closed the connection after the resync's
            // DISCONNECT, having taken every ack before it. (Dropping the
            // socket first would lose them: Mosquitto 2.0.11 stops reading
            // once a write to it fails.)
            Err(_) if resyncing.is_some() => {
                *resyncing = None;
                self.resynced(intaker, ctx);
            }
            Err(e) => {
                self.disconnected(intaker, ctx);
                return lost(e, intaker, ctx, failures).await;
            }
        }
        false
    }

    /// The connection was closed to fetch the deferred messages again.
    fn resynced(&self, intaker: &mut Intaker, ctx: &Links) {
        self.disconnected(intaker, ctx);
        ctx.metrics.source_resyncs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            "MQTT source: the functions caught up; resuming the session for the messages left with the broker."
        );
    }

    /// The connection is gone (lost, or replaced by a resync).
    fn disconnected(&self, intaker: &mut Intaker, ctx: &Links) {
        // Acks of this connection's messages are void now.
        intaker.connection_lost();
        ctx.ready.send_replace(false);
        self.live.send_replace(Vec::new());
    }

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
