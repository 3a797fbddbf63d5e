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
//! This connection only receives; functions publish through a separate
//! connection ([`crate::output`]), so a function whose queue is full can never
//! block the connection its own publishes go through.

mod sequencer;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event as MqttEvent, EventLoop, Packet, Publish, QoS, SubscribeFilter};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Source, SourceContext, SourceError};
use crate::config::MqttEndpoint;
use crate::event::{AckGuard, Event, SourceKind};
use sequencer::AckSequencer;

use crate::router::Router;

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

/// A received message on its way to the router.
struct Intake {
    n: u64,
    event: Event,
    /// Payload bytes if it is a QoS 0 message (counted in [`Held`]).
    qos0: Option<usize>,
}

/// What waits for the dispatcher without an in-flight window to bound it.
#[derive(Default)]
struct Held {
    count: AtomicUsize,
    bytes: AtomicUsize,
}

impl Held {
    /// Takes room for a QoS 0 message of `len` bytes, if there is any.
    fn admit(&self, len: usize) -> bool {
        let full = self.count.load(Ordering::Relaxed) >= MAX_HELD_QOS0
            || self.bytes.load(Ordering::Relaxed) + len > MAX_HELD_QOS0_BYTES;
        if !full {
            self.count.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(len, Ordering::Relaxed);
        }
        !full
    }

    fn release(&self, len: usize) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(len, Ordering::Relaxed);
    }
}

impl Source for MqttSource {
    type Config = MqttSourceConfig;

    fn build(config: Self::Config, ctx: &SourceContext) -> Result<Self, SourceError> {
        let filters = ctx.router.subscriptions();
        let mut opts = crate::mqtt::options(&config.endpoint, "in", config.keep_alive);
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
        let (done_tx, done_rx) = mpsc::unbounded_channel::<(u64, bool)>();
        let (acked_tx, mut acked) = watch::channel(0u64);
        let acker = tokio::spawn(ack_in_order(
            self.client.clone(),
            generation.clone(),
            received_rx,
            done_rx,
            acked_tx,
        ));
        let held = Arc::new(Held::default());
        let (intake_tx, intake_rx) = mpsc::unbounded_channel::<Intake>();
        tokio::spawn(dispatch(
            ctx.router.clone(),
            intake_rx,
            done_tx,
            ctx.cancel.clone(),
            self.ack_point,
            held.clone(),
        ));
        drop(ctx.router);
        let mut intaker = Intaker {
            intake: Some(intake_tx),
            received: received_tx,
            generation: generation.clone(),
            held,
            metrics: ctx.metrics.clone(),
            next: 0,
            dropping: false,
        };
        let mut failures = 0u32;
        loop {
            let stopping = intaker.intake.is_none();
            let polled = tokio::select! {
                () = ctx.cancel.cancelled(), if !stopping => {
                    // Stop dispatching: the dispatcher drops the router once
                    // it has passed on what it holds, which lets the workers
                    // drain. Keep polling so the acks of what is in flight
                    // still reach the broker.
                    intaker.intake = None;
                    continue;
                }
                // Every dispatched message has had its turn at the acker.
                r = acked.wait_for(|handled| *handled >= intaker.next), if stopping => {
                    let _ = r;
                    break;
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
                }
                Ok(_) => {}
                Err(e) => {
                    // Acks of this connection's messages are void now.
                    generation.fetch_add(1, Ordering::Relaxed);
                    ctx.ready.send_replace(false);
                    if intaker.intake.is_none() {
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
                        () = ctx.cancel.cancelled() => { intaker.intake = None; }
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        drop(intaker);
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

impl MqttSource {
    /// Subscribes to the triggers after a CONNACK.
    fn subscribe(&self, ready: &watch::Sender<bool>, session_present: bool) {
        let subs = self
            .filters
            .iter()
            .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
        if self.filters.is_empty() {
            ready.send_replace(true);
            tracing::info!("MQTT source connected; no function has a trigger.");
        } else if let Err(e) = self.client.try_subscribe_many(subs) {
            tracing::error!(error = %e, "MQTT source could not subscribe.");
        } else {
            tracing::info!(filters = ?self.filters, session_present, "MQTT source connected and subscribing.");
        }
    }
}

/// Takes received messages in: counts them, queues their acknowledgement
/// turn and hands them to the dispatcher.
struct Intaker {
    /// `None` once stopping: later messages stay unacknowledged.
    intake: Option<mpsc::UnboundedSender<Intake>>,
    received: mpsc::UnboundedSender<Pending>,
    generation: Arc<AtomicU64>,
    held: Arc<Held>,
    metrics: Arc<crate::metrics::GatewayMetrics>,
    /// Messages taken in so far.
    next: u64,
    /// QoS 0 messages are being dropped (logged once per stall).
    dropping: bool,
}

impl Intaker {
    fn take(&mut self, p: Publish) {
        let Some(intake) = &self.intake else {
            // Stopping: leave it unacknowledged; the broker redelivers it to
            // the next run.
            return;
        };
        let qos0 = (p.qos == QoS::AtMostOnce).then_some(p.payload.len());
        if let Some(len) = qos0
            && !self.held.admit(len)
        {
            self.metrics.source_dropped.fetch_add(1, Ordering::Relaxed);
            if !self.dropping {
                tracing::warn!(topic = %p.topic, held = MAX_HELD_QOS0, "Functions are held back: QoS 0 messages dropped until they catch up.");
                self.dropping = true;
            }
            return;
        }
        self.dropping = false;
        self.metrics.events_in.fetch_add(1, Ordering::Relaxed);
        let n = self.next;
        self.next += 1;
        let ack = (p.qos != QoS::AtMostOnce).then(|| {
            let mut a = Publish::new(p.topic.clone(), p.qos, Vec::new());
            a.pkid = p.pkid;
            a
        });
        let _ = self.received.send(Pending {
            n,
            generation: self.generation.load(Ordering::Relaxed),
            ack,
        });
        let _ = intake.send(Intake {
            n,
            event: event_of(p),
            qos0,
        });
    }
}

/// The event of a received message.
fn event_of(p: Publish) -> Event {
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
    event
}

/// Hands received messages to the router in receive order, waiting while a
/// queue is full, so the task polling the event loop never has to. Reports
/// each as done to the acker (`true`: acknowledge it), directly or through
/// the event's [`AckGuard`]. Once `cancel` fires, what it still holds is
/// reported without acknowledgement (the broker redelivers it). Dropping the
/// router at the end lets the workers drain.
async fn dispatch(
    router: Arc<Router>,
    mut intake: mpsc::UnboundedReceiver<Intake>,
    done: mpsc::UnboundedSender<(u64, bool)>,
    cancel: CancellationToken,
    ack_point: AckPoint,
    held: Arc<Held>,
) {
    while let Some(Intake { n, mut event, qos0 }) = intake.recv().await {
        if let Some(len) = qos0 {
            held.release(len);
        }
        if cancel.is_cancelled() {
            let _ = done.send((n, false));
            continue;
        }
        let done = done.clone();
        let guard = Arc::new(AckGuard::new(move || {
            let _ = done.send((n, true));
        }));
        if ack_point == AckPoint::Handled {
            event.ack = Some(guard.clone());
        }
        router.dispatch(event).await;
        drop(guard);
    }
}

/// Acknowledges received messages in receive order, each once its event is
/// done; reports how many it has handled. Runs until the source closes
/// `received` and the queue is empty.
async fn ack_in_order(
    client: AsyncClient,
    generation: Arc<AtomicU64>,
    mut received: mpsc::UnboundedReceiver<Pending>,
    mut done: mpsc::UnboundedReceiver<(u64, bool)>,
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
                Some((n, ack)) => order.finished(n, ack),
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
