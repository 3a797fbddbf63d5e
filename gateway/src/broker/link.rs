//! The local publisher's in-process link to the embedded broker: the
//! gateway's own publishes (functions' outputs, mirrors, dead letters) are
//! handed to rumqttd's router directly instead of crossing a TCP loopback
//! connection.
//!
//! A link is a rumqttd connection without a socket: [`open`] registers it
//! with the router (`Broker::link`, which only works before the broker's
//! `start()`, so the link is opened once with the broker and lives as long
//! as it). Links bypass the guard: the device ACL and the password file are
//! for devices, not for the gateway's own connections.
//!
//! One thread (`edgefn-link-out`) owns rumqttd's `LinkTx`: callers queue
//! publishes on a bounded channel (back-pressure as with a rumqttc client's
//! request queue), the thread appends every queued packet to the link's
//! buffer and wakes the router once per batch, in queue order. Handing a
//! packet to the router is the delivery point, as rumqttc's `publish()`
//! returning is for a TCP connection. A second thread (`edgefn-link-acks`)
//! drains what the router sends back (PUBACKs, PUBRECs); when the router
//! drops the link (a device took its client id), the link is marked lost
//! and publishes fail instead of vanishing.
//!
//! rumqttd's link API only builds QoS 0 publishes (`Publish`'s QoS and
//! packet id are private); QoS 1 and 2 packets are built by encoding an
//! MQTT 3.1.1 PUBLISH and parsing it with rumqttd's own codec. A QoS 2
//! publish is followed by its PUBREL at once (the router releases it to
//! subscribers on PUBREL, in order).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{Packet, Protocol, PubRel, PubRelReason};
use tokio::sync::{mpsc, watch};

use crate::metrics::GatewayMetrics;

/// Publishes a link may have queued before a caller waits for room.
const QUEUE: usize = 1024;

/// Most packets handed to the router per wake-up.
const BATCH: usize = 256;

/// Why a publish could not be queued on the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The link was closed (the gateway is stopping).
    #[error("the in-process link to the embedded broker is closed")]
    Closed,
    /// The router dropped the link (a device connected with its client id).
    #[error("the in-process link to the embedded broker was dropped by the broker")]
    Lost,
    /// The link queue is full (only from [`LinkPublisher::try_close`]).
    #[error("the in-process link's queue is full")]
    Full,
    /// rumqttd refused the link.
    #[error("cannot open an in-process link to the embedded broker: {0}")]
    Open(String),
    /// The topic is not a valid topic name (wildcards, or too long).
    #[error("invalid topic name")]
    InvalidTopic,
    /// The packet could not be encoded (a topic longer than MQTT allows).
    #[error("cannot encode the publish: {0}")]
    Encode(String),
}

/// What the link thread is asked to do.
#[derive(Debug)]
enum Command {
    Publish(Message),
    Close,
}

/// A publish as queued; the link thread turns it into rumqttd packets.
#[derive(Debug)]
struct Message {
    topic: String,
    qos: u8,
    retain: bool,
    payload: Bytes,
}

/// A cheap, cloneable handle on the local publisher's link.
#[derive(Debug, Clone)]
pub struct LinkPublisher {
    client_id: Arc<str>,
    queue: mpsc::Sender<Command>,
    lost: Arc<AtomicBool>,
    closed: watch::Receiver<bool>,
}

/// A client id for the link that no device will guess: rumqttd drops a
/// connection when another one arrives with the same id, and a link cannot
/// reconnect.
pub fn client_id() -> String {
    use rand::RngCore as _;
    let mut id = [0u8; 8];
    rand::rng().fill_bytes(&mut id);
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("edgefn-link-{hex}")
}

/// Opens the link `client_id` on `broker` (before its `start()`) and
/// starts its two threads. Packets handed to the router are counted in
/// `metrics.link_publishes`.
pub fn open(
    broker: &rumqttd::Broker,
    client_id: &str,
    metrics: Arc<GatewayMetrics>,
) -> Result<LinkPublisher, LinkError> {
    let (tx, mut rx) = broker
        .link(client_id)
        .map_err(|e| LinkError::Open(e.to_string()))?;
    let (queue, commands) = mpsc::channel(QUEUE);
    let (closed_tx, closed) = watch::channel(false);
    let lost = Arc::new(AtomicBool::new(false));
    let flag = lost.clone();
    let id = client_id.to_owned();
    std::thread::Builder::new()
        .name("edgefn-link-acks".into())
        .spawn(move || {
            // Acks are of no use to the publisher: the router took the
            // packet. An error means the router let go of the link.
            while rx.recv().is_ok() {}
            flag.store(true, Ordering::Relaxed);
            tracing::error!(client_id = %id, "The embedded broker dropped the local publisher's link (did a device connect with its client id?); local publishes now fail.");
        })
        .map_err(|e| LinkError::Open(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| LinkError::Open(e.to_string()))?;
    std::thread::Builder::new()
        .name("edgefn-link-out".into())
        .spawn(move || {
            runtime.block_on(pump(tx, commands, &metrics));
            let _ = closed_tx.send(true);
        })
        .map_err(|e| LinkError::Open(e.to_string()))?;
    Ok(LinkPublisher {
        client_id: client_id.into(),
        queue,
        lost,
        closed,
    })
}

/// Hands queued packets to the router in order, a batch per wake-up, until
/// asked to close (everything queued before that goes first).
async fn pump(
    mut tx: rumqttd::local::LinkTx,
    mut commands: mpsc::Receiver<Command>,
    metrics: &GatewayMetrics,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        if commands.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let closing = batch.iter().any(|c| matches!(c, Command::Close));
        let mut packets: Vec<Packet> = batch
            .drain(..)
            .filter_map(|c| match c {
                Command::Publish(m) => Some(m),
                Command::Close => None,
            })
            .flat_map(|m| match packets(m) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "Local publish dropped: it cannot be encoded.");
                    Vec::new()
                }
            })
            .collect();
        let count = packets.len() as u64;
        let last = packets.pop();
        tx.buffer().extend(packets);
        // `send` appends the last packet and wakes the router once.
        if let Some(p) = last {
            if let Err(e) = tx.send(p).await {
                tracing::error!(error = %e, "The embedded broker's router is gone; local publishes stop.");
                return;
            }
            metrics.link_publishes.fetch_add(count, Ordering::Relaxed);
        }
        if closing {
            return;
        }
    }
}

impl LinkPublisher {
    /// The link's client id on the broker.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Queues a publish; waits while the queue is full. `qos` is 0, 1 or 2
    /// (anything above 2 is 2). Fails at once on a topic that rumqttc's
    /// `publish()` would refuse.
    pub async fn publish(
        &self,
        topic: String,
        qos: u8,
        retain: bool,
        payload: Bytes,
    ) -> Result<(), LinkError> {
        if self.lost.load(Ordering::Relaxed) {
            return Err(LinkError::Lost);
        }
        // As rumqttc's `publish()` checks.
        if !rumqttc::valid_topic(&topic) || topic.len() > usize::from(u16::MAX) {
            return Err(LinkError::InvalidTopic);
        }
        let message = Message {
            topic,
            qos,
            retain,
            payload,
        };
        self.queue
            .send(Command::Publish(message))
            .await
            .map_err(|_| LinkError::Closed)
    }

    /// Asks the link to close once everything queued before is handed to
    /// the router, without waiting.
    pub fn try_close(&self) -> Result<(), LinkError> {
        self.queue.try_send(Command::Close).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LinkError::Full,
            mpsc::error::TrySendError::Closed(_) => LinkError::Closed,
        })
    }

    /// Asks the link to close, waiting for room in the queue, then waits
    /// until everything queued before is handed to the router.
    pub async fn close(&self) {
        let _ = self.queue.send(Command::Close).await;
        self.closed().await;
    }

    /// Returns once the link has closed.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }
}

/// The packets of one publish: a QoS 2 publish is released at once.
fn packets(m: Message) -> Result<Vec<Packet>, LinkError> {
    let Message {
        topic,
        qos,
        retain,
        payload,
    } = m;
    if qos == 0 {
        let publish = rumqttd::protocol::Publish::new(Bytes::from(topic), payload, retain);
        return Ok(vec![Packet::Publish(publish, None)]);
    }
    // The packet id only pairs the router's ack with this packet: any
    // non-zero id does.
    let pkid = 1;
    let qos = if qos == 1 {
        rumqttc::QoS::AtLeastOnce
    } else {
        rumqttc::QoS::ExactlyOnce
    };
    let mut publish = rumqttc::mqttbytes::v4::Publish::from_bytes(topic, qos, payload);
    publish.retain = retain;
    publish.pkid = pkid;
    let mut bytes = BytesMut::new();
    publish
        .write(&mut bytes)
        .map_err(|e| LinkError::Encode(e.to_string()))?;
    let packet = rumqttd::protocol::v4::V4
        .read_mut(&mut bytes, usize::MAX)
        .map_err(|e| LinkError::Encode(format!("{e:?}")))?;
    if qos == rumqttc::QoS::AtLeastOnce {
        return Ok(vec![packet]);
    }
    let release = PubRel {
        pkid,
        reason: PubRelReason::Success,
    };
    Ok(vec![packet, Packet::PubRel(release, None)])
}

#[cfg(test)]
mod tests;
