//! Cloud commands: messages an MQTT sink receives on its `subscribe`
//! filters, on the same connection it delivers on. Each one triggers the
//! functions whose triggers match its topic, exactly like a message of the
//! local broker (an MQTT event with the extra attribute `sink = "<name>"`),
//! and is acknowledged to the cloud broker only once those functions are
//! done and their forwards are committed to the outbox, in receive order
//! (the MQTT source's [`intake`] machinery).
//!
//! The connection then uses a persistent session (`clean_session = false`;
//! over MQTT 5 `clean_start = false` with a session that never expires, as
//! far as the broker allows) with manual acknowledgements and subscribes at
//! QoS 1 on every CONNACK, so
//! what the cloud sends while the gateway is away waits at the cloud broker.
//! Intake stops (and lets go of the router) when the gateway starts
//! stopping; what was not dispatched by then stays unacknowledged and comes
//! again on the next run. Delivery of outbox records is unaffected: every
//! connection is a fresh client, so rumqttc has no pending publishes of its
//! own to resend; the outbox drives every re-send.

use std::time::Duration;

use rumqttc::{Publish, QoS, SubscribeFilter};
use tokio_util::sync::CancellationToken;

use super::{Client, SinkContext};
use crate::sources::mqtt::AckPoint;
use crate::sources::mqtt::intake::{self, AckClient, Acker, IntakeOptions, Intaker};
use crate::topic::TopicFilter;

/// How long a stopping sink waits for the last command acknowledgements.
const ACK_GRACE: Duration = Duration::from_secs(2);

/// The command intake of one MQTT sink.
pub(super) struct Commands {
    sink: String,
    filters: Vec<TopicFilter>,
    intaker: Intaker,
    acker: Acker,
    cancel: CancellationToken,
}

impl Commands {
    /// The intake of sink `sink`, if it subscribes to anything; takes the
    /// router out of `ctx`.
    pub(super) fn start(
        ctx: &mut SinkContext,
        sink: &str,
        filters: &[TopicFilter],
    ) -> Option<Self> {
        let router = ctx.router.take()?;
        if filters.is_empty() {
            return None;
        }
        let (intaker, acker) = intake::start(
            router,
            ctx.cancel.clone(),
            None,
            ctx.metrics.clone(),
            IntakeOptions {
                ack_point: AckPoint::Handled,
                attributes: vec![("sink".to_owned(), sink.to_owned())],
                counters: ctx.stats.clone(),
                // The connection also carries the sink's deliveries: it
                // cannot be replaced to fetch deferred commands again.
                defer_when_full: false,
            },
        );
        Some(Self {
            sink: sink.to_owned(),
            filters: filters.to_vec(),
            intaker,
            acker,
            cancel: ctx.cancel.clone(),
        })
    }

    /// A connection was made (CONNACK): acknowledge its messages through
    /// `client`, and subscribe (again: the session may be new).
    pub(super) async fn connected(&mut self, client: &Client, session_present: bool) {
        let names = self.filters.iter().map(|f| f.as_str().to_owned());
        let subscribed = match client {
            Client::V4(c) => {
                self.intaker.connected(AckClient::V4(c.clone()));
                let subs = names.map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
                c.subscribe_many(subs).await.map_err(|e| e.to_string())
            }
            Client::V5(c) => {
                use rumqttc::v5::mqttbytes::{QoS as Qos5, v5::Filter};
                self.intaker.connected(AckClient::V5(c.clone()));
                let subs = names.map(|f| Filter::new(f, Qos5::AtLeastOnce));
                c.subscribe_many(subs).await.map_err(|e| e.to_string())
            }
        };
        match subscribed {
            Ok(()) => {
                tracing::info!(sink = %self.sink, filters = ?self.filters.iter().map(TopicFilter::as_str).collect::<Vec<_>>(), session_present, "Sink subscribing to cloud commands.");
            }
            Err(e) => {
                tracing::error!(sink = %self.sink, error = %e, "Sink could not subscribe to cloud commands.");
            }
        }
    }

    /// The broker answered the subscription.
    pub(super) fn subscribed(&self, granted: bool) {
        if !granted {
            tracing::error!(sink = %self.sink, filters = ?self.filters.iter().map(TopicFilter::as_str).collect::<Vec<_>>(), "The cloud broker refused a command subscription (check its ACL or policy).");
        }
    }

    /// A command arrived.
    pub(super) fn take(&mut self, p: Publish) {
        self.intaker.take(p);
    }

    /// The connection was lost: its commands are not acknowledged any more
    /// (the cloud broker sends them again).
    pub(super) fn connection_lost(&mut self) {
        self.intaker.connection_lost();
    }

    /// Whether intake still runs (the gateway is not stopping).
    pub(super) fn open(&self) -> bool {
        !self.intaker.stopped()
    }

    /// Waits until the gateway starts stopping.
    pub(super) async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Stops intake: later commands stay unacknowledged.
    pub(super) fn stop(&mut self) {
        if self.open() {
            tracing::debug!(sink = %self.sink, "Sink stops taking cloud commands.");
        }
        self.intaker.stop();
    }

    /// Ends intake and waits (briefly) until every command taken in has had
    /// its acknowledgement queued, so they go out before the disconnect.
    pub(super) async fn finish(self) {
        let Self {
            mut intaker,
            acker,
            sink,
            ..
        } = self;
        intaker.stop();
        drop(intaker);
        if tokio::time::timeout(ACK_GRACE, acker.task).await.is_err() {
            tracing::warn!(sink = %sink, "Cloud command acknowledgements still pending at stop; the cloud broker sends those commands again.");
        }
    }
}

/// A command received over MQTT 5, as the intake takes it (topic and
/// payload, QoS, packet id, flags). A topic that is not UTF-8, which MQTT
/// forbids, becomes the empty topic: the intake acknowledges such a message
/// in its turn without dispatching it (unacknowledged, the broker would send
/// it again at every reconnect).
pub(super) fn command_v5(p: rumqttc::v5::mqttbytes::v5::Publish) -> rumqttc::Publish {
    use rumqttc::v5::mqttbytes::QoS as Qos5;
    let topic = String::from_utf8(p.topic.to_vec()).unwrap_or_else(|_| {
        tracing::warn!(
            pkid = p.pkid,
            "Cloud command with a topic that is not UTF-8: acknowledged and dropped."
        );
        String::new()
    });
    let qos = match p.qos {
        Qos5::AtMostOnce => QoS::AtMostOnce,
        Qos5::AtLeastOnce => QoS::AtLeastOnce,
        Qos5::ExactlyOnce => QoS::ExactlyOnce,
    };
    let mut out = rumqttc::Publish::from_bytes(topic, qos, p.payload);
    out.pkid = p.pkid;
    out.dup = p.dup;
    out.retain = p.retain;
    out
}

/// Waits until the gateway starts stopping, if the sink takes commands.
pub(super) async fn cancelled(commands: &Option<Commands>) {
    match commands {
        Some(c) => c.cancelled().await,
        None => std::future::pending().await,
    }
}
