//! The local publisher: how the gateway itself publishes on its local
//! broker (functions' publishes and dead letters, sources' mirrors, sinks'
//! dead letters). With the embedded broker it is an in-process link
//! ([`crate::broker::link`]); with an external broker, a rumqttc
//! connection of its own. [`LocalPublisher`] hides which.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, EventLoop, QoS};
use tokio_util::sync::CancellationToken;

use crate::broker::link::{LinkError, LinkPublisher};
use crate::config::MqttEndpoint;
use crate::metrics::GatewayMetrics;

/// Why a publish could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The rumqttc client's request queue is gone.
    #[error(transparent)]
    Client(#[from] rumqttc::ClientError),
    /// The topic name has wildcards.
    #[error("invalid topic name")]
    InvalidTopic,
    /// The in-process link is closed or lost.
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// A cheap, cloneable handle on the local publisher.
#[derive(Debug, Clone)]
pub enum LocalPublisher {
    /// A rumqttc connection (external broker).
    Mqtt(AsyncClient),
    /// The embedded broker's in-process link.
    Link(LinkPublisher),
}

impl LocalPublisher {
    /// Queues a publish (not retained); waits while the queue is full.
    /// Returning is the delivery point, as for rumqttc's `publish()`: the
    /// packet is queued for the connection or for the embedded router.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        qos: QoS,
        payload: impl Into<Bytes>,
    ) -> Result<(), PublishError> {
        let topic = topic.into();
        match self {
            // `publish_bytes` skips the topic check `publish` makes.
            Self::Mqtt(_) if !rumqttc::valid_topic(&topic) => Err(PublishError::InvalidTopic),
            Self::Mqtt(client) => Ok(client
                .publish_bytes(topic, qos, false, payload.into())
                .await?),
            Self::Link(link) => Ok(link
                .publish(topic, qos as u8, false, payload.into())
                .await?),
        }
    }

    /// Asks the publisher to stop once what is queued has gone out,
    /// without waiting.
    pub fn try_disconnect(&self) -> Result<(), PublishError> {
        match self {
            Self::Mqtt(client) => Ok(client.try_disconnect()?),
            Self::Link(link) => Ok(link.try_close()?),
        }
    }

    /// Whether this publisher uses the embedded broker's in-process link.
    pub fn is_link(&self) -> bool {
        matches!(self, Self::Link(_))
    }
}

/// The local publisher and the task that runs it until it has stopped
/// (after [`LocalPublisher::try_disconnect`], or, unconnected, `stop`):
/// through `link` when the broker is embedded, else over a connection to
/// `endpoint`.
pub fn local_publisher(
    endpoint: &MqttEndpoint,
    link: Option<LinkPublisher>,
    stop: CancellationToken,
    metrics: Arc<GatewayMetrics>,
) -> (
    LocalPublisher,
    std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>,
) {
    if let Some(link) = link {
        tracing::info!("Local publisher uses the embedded broker's in-process link.");
        return (
            LocalPublisher::Link(link.clone()),
            Box::pin(run_link(link, stop)),
        );
    }
    let mut opts = crate::mqtt::options(endpoint, "out", Duration::from_secs(30));
    opts.set_clean_session(true);
    let (client, eventloop) = AsyncClient::new(opts, 1024);
    (
        LocalPublisher::Mqtt(client),
        Box::pin(poll_publisher(eventloop, stop, metrics)),
    )
}

/// Until the link has closed: after `stop`, closes it (what was queued
/// before goes first) in case the supervisor's close could not be queued.
async fn run_link(link: LinkPublisher, stop: CancellationToken) {
    tokio::select! {
        () = link.closed() => {}
        () = stop.cancelled() => link.close().await,
    }
}

async fn poll_publisher(
    mut eventloop: EventLoop,
    stop: CancellationToken,
    metrics: Arc<GatewayMetrics>,
) {
    // Runs until the supervisor, after the last worker has finished, asks the
    // client to disconnect: requests are handled in order, so every publish
    // queued before that goes out first.
    let mut failures = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => failures = 0,
            Ok(_) => {}
            Err(_) if stop.is_cancelled() => break,
            Err(e) => {
                metrics.publisher_reconnects.fetch_add(1, Ordering::Relaxed);
                if failures == 0 {
                    tracing::warn!(error = %e, "Local publisher lost its connection; reconnecting.");
                }
                let wait = crate::mqtt::backoff(failures);
                failures = failures.saturating_add(1);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
