//! Message intake shared by the MQTT source and the MQTT sinks' cloud
//! commands: received messages become events, go to the router in receive
//! order, and are acknowledged (PUBACK) strictly in receive order once done.
//!
//! The task polling the connection's event loop only calls
//! [`Intaker::take`], which never waits: a dispatcher task hands the events
//! to the router (waiting on full queues), and an acker task sends the
//! acknowledgements (acking from the poll loop can deadlock once the request
//! channel is full). Messages of a connection that was lost are never acked
//! on the next one: the broker redelivers them. Once stopped, messages are
//! neither dispatched nor acknowledged (the broker redelivers them to the
//! next run), and the dispatcher drops its router handle, which lets the
//! function workers drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::held::Held;
use super::sequencer::AckSequencer;
use super::{AckPoint, MAX_HELD_QOS0, MAX_HELD_QOS1};
use crate::event::{AckGuard, Event, SourceKind};
use crate::metrics::GatewayMetrics;
use crate::router::Router;

/// Counts what an intake takes in and acknowledges, besides the gateway-wide
/// counters.
pub(crate) trait IntakeCounters: Send + Sync + 'static {
    /// A message was taken in (handed to the dispatcher).
    fn taken(&self, metrics: &GatewayMetrics);
    /// A message was acknowledged to its broker.
    fn acked(&self) {}
    /// A QoS 0 message was dropped while the functions held the intake back.
    fn dropped(&self, metrics: &GatewayMetrics) {
        metrics.source_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// The MQTT source's counters: its events count as the gateway's MQTT
/// input (`edgefn_source_events_total{source="mqtt"}`).
pub(crate) struct SourceCounters;

impl IntakeCounters for SourceCounters {
    fn taken(&self, metrics: &GatewayMetrics) {
        metrics.events_in.fetch_add(1, Ordering::Relaxed);
    }
}

/// What differs between the users of an intake.
pub(crate) struct IntakeOptions {
    /// When a message is acknowledged.
    pub ack_point: AckPoint,
    /// Attributes added to every event (after `qos`, `retain`, `dup`).
    pub attributes: Vec<(String, String)>,
    /// Extra counters.
    pub counters: Arc<dyn IntakeCounters>,
    /// Defer QoS 1 and 2 messages beyond [`MAX_HELD_QOS1`] waiting for the
    /// dispatcher, for the broker to redeliver after a resync (the MQTT
    /// source); `false` holds every one (cloud commands).
    pub defer_when_full: bool,
}

/// The client a message is acknowledged through: of either protocol
/// version (the MQTT source is 3.1.1; a sink may be 5).
#[derive(Clone)]
pub(crate) enum AckClient {
    /// MQTT 3.1.1.
    V4(AsyncClient),
    /// MQTT 5.
    V5(rumqttc::v5::AsyncClient),
}

impl AckClient {
    /// Queues the acknowledgement of message `pkid` (at `qos`). rumqttc
    /// reads only those two of the message it is given, so no topic is kept
    /// per message waiting for its turn.
    async fn ack(&self, qos: QoS, pkid: u16) -> Result<(), String> {
        let topic = "";
        match self {
            Self::V4(c) => {
                let mut p = Publish::new(topic, qos, Vec::new());
                p.pkid = pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
            Self::V5(c) => {
                use rumqttc::v5::mqttbytes::QoS as Qos5;
                let qos = match qos {
                    QoS::AtMostOnce => Qos5::AtMostOnce,
                    QoS::AtLeastOnce => Qos5::AtLeastOnce,
                    QoS::ExactlyOnce => Qos5::ExactlyOnce,
                };
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new(topic, qos, Vec::new(), None);
                p.pkid = pkid;
                c.ack(&p).await.map_err(|e| e.to_string())
            }
        }
    }
}

/// A received message awaiting its turn to be acknowledged.
struct Pending {
    n: u64,
    generation: u64,
    /// The client of the connection it came on; the QoS and packet id of
    /// the message.
    ack: Option<(AckClient, QoS, u16)>,
}

/// A received message on its way to the router.
struct Intake {
    n: u64,
    /// `None` for a message refused at intake (acknowledged, not
    /// dispatched).
    event: Option<Event>,
    /// Whether it is a QoS 0 message, and its payload bytes (counted in
    /// [`Held`] until it reaches the dispatcher).
    qos0: bool,
    len: usize,
}

/// The acker task and how far it got.
pub(crate) struct Acker {
    /// Ends once the [`Intaker`] is dropped and every message taken in has
    /// had its turn.
    pub task: JoinHandle<()>,
    /// How many messages have had their turn (acknowledged or left).
    pub handled: watch::Receiver<u64>,
}

/// Starts the dispatcher and acker tasks of one intake; messages are
/// acknowledged through `client` until [`Intaker::connected`] names another
/// (`None`: not connected yet).
pub(crate) fn start(
    router: Arc<Router>,
    cancel: CancellationToken,
    client: Option<AckClient>,
    metrics: Arc<GatewayMetrics>,
    options: IntakeOptions,
) -> (Intaker, Acker) {
    let generation = Arc::new(AtomicU64::new(0));
    let (received_tx, received_rx) = mpsc::unbounded_channel::<Pending>();
    let (done_tx, done_rx) = mpsc::unbounded_channel::<(u64, bool)>();
    let (handled_tx, handled) = watch::channel(0u64);
    let task = tokio::spawn(ack_in_order(
        generation.clone(),
        received_rx,
        done_rx,
        handled_tx,
        options.counters.clone(),
    ));
    let held = Arc::new(Held::default());
    let (intake_tx, intake_rx) = mpsc::unbounded_channel::<Intake>();
    tokio::spawn(dispatch(
        router,
        intake_rx,
        done_tx,
        cancel,
        options.ack_point,
        held.clone(),
    ));
    let intaker = Intaker {
        intake: Some(intake_tx),
        received: received_tx,
        generation,
        held,
        metrics,
        client,
        attributes: options.attributes,
        counters: options.counters,
        next: 0,
        dropping: false,
        drop_warned: None,
        drop_warnings: 0,
        defer: options.defer_when_full,
        deferring: false,
        defer_warned: None,
    };
    (intaker, Acker { task, handled })
}

/// Takes received messages in: counts them, queues their acknowledgement
/// turn and hands them to the dispatcher. Never waits.
pub(crate) struct Intaker {
    /// `None` once stopping: later messages stay unacknowledged.
    intake: Option<mpsc::UnboundedSender<Intake>>,
    received: mpsc::UnboundedSender<Pending>,
    generation: Arc<AtomicU64>,
    held: Arc<Held>,
    metrics: Arc<GatewayMetrics>,
    /// The client of the current connection.
    client: Option<AckClient>,
    attributes: Vec<(String, String)>,
    counters: Arc<dyn IntakeCounters>,
    /// Messages taken in so far.
    next: u64,
    /// QoS 0 messages are being dropped (logged once per stall).
    dropping: bool,
    /// When the last drop warning was logged.
    drop_warned: Option<Instant>,
    /// Drop warnings logged so far.
    drop_warnings: u64,
    /// Whether QoS 1 and 2 messages beyond the limit are deferred (the MQTT
    /// source) or held however many arrive (cloud commands, whose connection
    /// also carries the sink's deliveries).
    defer: bool,
    /// QoS 1 and 2 messages are being deferred until the next resync.
    deferring: bool,
    /// When the last deferral warning was logged.
    defer_warned: Option<Instant>,
}

/// Least time between two warnings about dropped QoS 0 messages.
const DROP_WARNING_EVERY: Duration = Duration::from_secs(10);

impl Intaker {
    /// Stops taking messages in; the dispatcher drops the router once it has
    /// passed on what it holds.
    pub(crate) fn stop(&mut self) {
        self.intake = None;
    }

    /// Whether [`Intaker::stop`] was called.
    pub(crate) fn stopped(&self) -> bool {
        self.intake.is_none()
    }

    /// How many messages were taken in.
    pub(crate) fn taken(&self) -> u64 {
        self.next
    }

    /// The connection was lost (or replaced by a resync): acknowledgements
    /// of its messages are void, and the next one redelivers the deferred
    /// ones.
    pub(crate) fn connection_lost(&mut self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.deferring = false;
    }

    /// Messages from now on come on the connection of `client`.
    pub(crate) fn connected(&mut self, client: AckClient) {
        self.client = Some(client);
    }

    /// Whether the QoS 1 and 2 messages waiting for the dispatcher reached
    /// their limit: the poller should stop reading (see the MQTT source's
    /// Back-pressure).
    pub(crate) fn full(&self) -> bool {
        self.held.full()
    }

    /// Waits until half of the held QoS 1 and 2 messages have gone to the
    /// dispatcher. Cancel-safe.
    pub(crate) async fn room(&self) {
        self.held.room().await;
    }

    /// From now on, defers every QoS 1 and 2 message until the next
    /// connection: the poller must read on (a pause has lasted too long).
    pub(crate) fn defer(&mut self) {
        self.start_deferring(None);
    }

    /// Whether QoS 1 and 2 messages are being deferred: left unacknowledged
    /// and not dispatched, for the broker to send again on the next
    /// connection ([`Intaker::connection_lost`]).
    pub(crate) fn deferring(&self) -> bool {
        self.deferring
    }

    /// Takes one received message in.
    pub(crate) fn take(&mut self, p: Publish) {
        let Some(intake) = &self.intake else {
            // Stopping: leave it unacknowledged; the broker redelivers it to
            // the next run.
            return;
        };
        let (qos0, len) = (p.qos == QoS::AtMostOnce, p.payload.len());
        if qos0 && !self.held.admit(len) {
            self.counters.dropped(&self.metrics);
            // Once per stall, and at most every DROP_WARNING_EVERY: under a
            // flood the held count hovers at its limit, and every message
            // admitted in between would start a new "stall". The metric
            // counts every drop.
            let due = self
                .drop_warned
                .is_none_or(|at| at.elapsed() >= DROP_WARNING_EVERY);
            if !self.dropping && due {
                tracing::warn!(topic = %p.topic, held = MAX_HELD_QOS0, "Functions are held back: QoS 0 messages dropped until they catch up (counted in the dropped-messages metric).");
                self.drop_warned = Some(Instant::now());
                self.drop_warnings += 1;
            }
            self.dropping = true;
            return;
        }
        self.dropping = false;
        if !qos0 && (self.deferring || !self.held.hold(len, self.defer)) {
            self.metrics.source_deferred.fetch_add(1, Ordering::Relaxed);
            self.start_deferring(Some(&p.topic));
            return;
        }
        self.counters.taken(&self.metrics);
        let n = self.next;
        self.next += 1;
        let ack = match &self.client {
            Some(client) if p.qos != QoS::AtMostOnce => Some((client.clone(), p.qos, p.pkid)),
            _ => None,
        };
        let _ = self.received.send(Pending {
            n,
            generation: self.generation.load(Ordering::Relaxed),
            ack,
        });
        // An empty topic is not MQTT: the intake's callers hand one in for a
        // message they could not read (a topic that is not UTF-8), so that
        // it is acknowledged in its turn instead of coming back forever.
        let event = (!p.topic.is_empty()).then(|| {
            let mut event = event_of(p);
            event.attributes.extend(self.attributes.iter().cloned());
            event
        });
        let _ = intake.send(Intake {
            n,
            event,
            qos0,
            len,
        });
    }
}

impl Intaker {
    /// Leaves QoS 1 and 2 messages unacknowledged and undispatched from now
    /// on, until the next connection (the broker redelivers them all, in
    /// order, on the resumed session).
    fn start_deferring(&mut self, topic: Option<&str>) {
        if !self.deferring
            && self
                .defer_warned
                .is_none_or(|at| at.elapsed() >= DROP_WARNING_EVERY)
        {
            tracing::warn!(
                topic,
                held = MAX_HELD_QOS1,
                "Functions are behind: QoS 1 messages are left with the broker and fetched again once they catch up."
            );
            self.defer_warned = Some(Instant::now());
        }
        self.deferring = true;
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
    while let Some(Intake {
        n,
        event,
        qos0,
        len,
    }) = intake.recv().await
    {
        if qos0 {
            held.release(len);
        } else {
            held.dispatched(len);
        }
        if cancel.is_cancelled() {
            let _ = done.send((n, false));
            continue;
        }
        let Some(mut event) = event else {
            // Refused at intake: acknowledged in its turn, never dispatched.
            let _ = done.send((n, true));
            continue;
        };
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
/// done; reports how many it has handled. Runs until the intaker closes
/// `received` and the queue is empty.
async fn ack_in_order(
    generation: Arc<AtomicU64>,
    mut received: mpsc::UnboundedReceiver<Pending>,
    mut done: mpsc::UnboundedReceiver<(u64, bool)>,
    handled: watch::Sender<u64>,
    counters: Arc<dyn IntakeCounters>,
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
            let Some((client, qos, pkid)) = p.ack else {
                continue;
            };
            if p.generation != generation.load(Ordering::Relaxed) {
                continue;
            }
            match client.ack(qos, pkid).await {
                Ok(()) => counters.acked(),
                Err(e) => tracing::warn!(error = %e, "Acknowledgement could not be queued."),
            }
        }
        handled.send_replace(order.released());
        if !received_open && order.is_empty() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schema::QueuePolicy;
    use crate::router::Route;
    use crate::runtime::queue::queue;
    use crate::sinks::DeliveryStats;

    /// An intake whose router sends `filter` to a one-slot `block` queue
    /// that no worker drains, counting into `counters`.
    fn stuck_intake(
        filter: &str,
        counters: Arc<dyn IntakeCounters>,
        defer_when_full: bool,
    ) -> (Intaker, Acker, Arc<GatewayMetrics>) {
        let metrics = Arc::new(GatewayMetrics::default());
        let (tx, _rx) = queue(1, QueuePolicy::Block, Arc::default());
        let route = Route {
            function: "f".into(),
            triggers: crate::topic::FilterSet::new(vec![
                crate::topic::TopicFilter::parse(filter).expect("filter"),
            ]),
            queue: Arc::new(tx),
        };
        let router = Arc::new(Router::new(vec![route], metrics.clone()));
        let options = IntakeOptions {
            ack_point: AckPoint::Handled,
            attributes: Vec::new(),
            counters,
            defer_when_full,
        };
        let (intaker, acker) = start(
            router,
            CancellationToken::new(),
            None,
            metrics.clone(),
            options,
        );
        (intaker, acker, metrics)
    }

    /// QoS 0 cloud commands dropped while a full `block` queue holds the
    /// intake back count for their sink, not as the MQTT source's drops.
    #[tokio::test]
    async fn dropped_qos0_commands_count_for_their_sink() {
        let stats = Arc::new(DeliveryStats::default());
        let (mut intaker, _acker, metrics) = stuck_intake("commands/#", stats.clone(), false);
        let extra = 10usize;
        for _ in 0..MAX_HELD_QOS0 + 2 + extra {
            intaker.take(Publish::new("commands/gw/set", QoS::AtMostOnce, "x"));
        }
        // Taken without a pause, so the dispatcher has not run yet: the
        // first MAX_HELD_QOS0 wait for it, the rest are dropped.
        let dropped = stats.commands_dropped.load(Ordering::Relaxed);
        assert_eq!(dropped, 2 + extra as u64);
        assert_eq!(metrics.source_dropped.load(Ordering::Relaxed), 0);

        // A flood keeps the held count at its limit: each slot the
        // dispatcher frees is taken by the next message and the one after
        // is dropped. That is one stall to the log, not one per slot.
        for _ in 0..100 {
            intaker.held.release(1);
            intaker.take(Publish::new("commands/gw/set", QoS::AtMostOnce, "x"));
            intaker.take(Publish::new("commands/gw/set", QoS::AtMostOnce, "x"));
        }
        assert_eq!(
            stats.commands_dropped.load(Ordering::Relaxed),
            2 + extra as u64 + 100
        );
        assert_eq!(intaker.drop_warnings, 1, "one warning per 10 s");
    }

    /// QoS 1 messages beyond the held limit are deferred: neither taken in
    /// nor dispatched, counted; so is every QoS 1 message after them, until
    /// the next connection. QoS 0 messages still go through.
    #[tokio::test]
    async fn qos1_beyond_the_limit_is_deferred_until_the_next_connection() {
        let (mut intaker, _acker, metrics) =
            stuck_intake("sensors/#", Arc::new(SourceCounters), true);
        let qos1 = || Publish::new("sensors/a", QoS::AtLeastOnce, "x");
        let deferred = || metrics.source_deferred.load(Ordering::Relaxed);
        // Taken without a pause: the dispatcher has not run yet.
        for _ in 0..MAX_HELD_QOS1 {
            intaker.take(qos1());
        }
        assert!(intaker.full() && !intaker.deferring());
        intaker.take(qos1());
        assert!(intaker.deferring());
        assert_eq!((intaker.taken(), deferred()), (MAX_HELD_QOS1 as u64, 1));

        // Room again, but nothing after a deferred message may be taken
        // in: its ack would pass the deferred one.
        for _ in 0..10 {
            intaker.held.dispatched(1);
        }
        intaker.take(qos1());
        assert_eq!((intaker.taken(), deferred()), (MAX_HELD_QOS1 as u64, 2));
        intaker.take(Publish::new("sensors/a", QoS::AtMostOnce, "x"));
        assert_eq!(intaker.taken(), MAX_HELD_QOS1 as u64 + 1, "QoS 0 goes on");

        // The next connection redelivers the deferred ones.
        intaker.connection_lost();
        assert!(!intaker.deferring());
        intaker.take(qos1());
        assert_eq!((intaker.taken(), deferred()), (MAX_HELD_QOS1 as u64 + 2, 2));
    }
}
