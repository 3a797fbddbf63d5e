//! The command line's connection to the cloud broker (`edgefn deploy`,
//! `edgefn status`): publish retained at QoS 1 and wait for every PUBACK,
//! subscribe and read messages with a deadline. No reconnects: a lost
//! connection is an error, and the command can simply run again (every
//! message it publishes is retained and idempotent).

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::MqttEndpoint;
use crate::fleet::chunks::split;
use crate::fleet::desired::BundleRef;
use crate::fleet::topics;

/// What the event loop task saw.
enum Seen {
    Connected,
    Message(String, Bytes),
    PubAck,
    SubAck,
    Closed(String),
}

/// A connection to the cloud broker.
pub struct Cloud {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Seen>,
    /// Messages that arrived while waiting for acknowledgements.
    held: VecDeque<(String, Bytes)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        self.task.abort();
    }
}

impl Cloud {
    /// Connects (clean session); fails if the broker does not accept the
    /// connection within `wait`.
    pub async fn connect(endpoint: &MqttEndpoint, wait: Duration) -> anyhow::Result<Self> {
        let opts = crate::mqtt::options(endpoint, "", Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let seen = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => Seen::Connected,
                    Ok(Event::Incoming(Packet::Publish(p))) => Seen::Message(p.topic, p.payload),
                    Ok(Event::Incoming(Packet::PubAck(_))) => Seen::PubAck,
                    Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
                    Ok(_) => continue,
                    Err(e) => {
                        let _ = tx.send(Seen::Closed(e.to_string()));
                        return;
                    }
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        let mut cloud = Self {
            client,
            events,
            held: VecDeque::new(),
            task,
        };
        let target = format!("{}:{}", endpoint.host, endpoint.port);
        match tokio::time::timeout(wait, cloud.events.recv()).await {
            Ok(Some(Seen::Connected)) => Ok(cloud),
            Ok(Some(Seen::Closed(e))) => anyhow::bail!("connecting to {target}: {e}"),
            Ok(_) => anyhow::bail!("connecting to {target}: the connection closed"),
            Err(_) => anyhow::bail!(
                "connecting to {target}: no answer within {} s",
                wait.as_secs()
            ),
        }
    }

    /// Waits for the next event other than a message (messages are held for
    /// [`Cloud::next_message`]).
    async fn next_ack(&mut self, deadline: Instant, what: &str) -> anyhow::Result<Seen> {
        loop {
            let seen = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .map_err(|_| anyhow::anyhow!("{what}: no acknowledgement in time"))?;
            match seen {
                Some(Seen::Message(t, p)) => self.held.push_back((t, p)),
                Some(Seen::Closed(e)) => anyhow::bail!("{what}: connection lost: {e}"),
                None => anyhow::bail!("{what}: connection lost"),
                Some(other) => return Ok(other),
            }
        }
    }

    /// Subscribes to `filters` at QoS 1 and waits for the broker's SUBACK.
    pub async fn subscribe(&mut self, filters: &[String], wait: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + wait;
        for f in filters {
            self.client
                .subscribe(f.clone(), QoS::AtLeastOnce)
                .await
                .with_context(|| format!("subscribing to {f}"))?;
        }
        let mut pending = filters.len();
        while pending > 0 {
            if let Seen::SubAck = self.next_ack(deadline, "subscribing").await? {
                pending -= 1;
            }
        }
        Ok(())
    }

    /// Publishes each `(topic, payload)` retained at QoS 1 and waits until
    /// the broker has acknowledged every one.
    pub async fn publish_retained(
        &mut self,
        messages: Vec<(String, Vec<u8>)>,
        wait: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + wait;
        let mut pending = messages.len();
        for (topic, payload) in messages {
            // Queued in order; the acknowledgements are counted meanwhile so
            // a full queue cannot stall the event loop.
            tokio::time::timeout_at(
                deadline,
                self.client
                    .publish(topic.clone(), QoS::AtLeastOnce, true, payload),
            )
            .await
            .map_err(|_| anyhow::anyhow!("publishing {topic}: timed out"))?
            .with_context(|| format!("publishing {topic}"))?;
            while let Ok(seen) = self.events.try_recv() {
                match seen {
                    Seen::PubAck => pending -= 1,
                    Seen::Message(t, p) => self.held.push_back((t, p)),
                    Seen::Closed(e) => anyhow::bail!("publishing {topic}: connection lost: {e}"),
                    _ => {}
                }
            }
        }
        while pending > 0 {
            if let Seen::PubAck = self.next_ack(deadline, "publishing").await? {
                pending -= 1;
            }
        }
        Ok(())
    }

    /// The next message, or `None` at `deadline`.
    pub async fn next_message(
        &mut self,
        deadline: Instant,
    ) -> anyhow::Result<Option<(String, Bytes)>> {
        if let Some(m) = self.held.pop_front() {
            return Ok(Some(m));
        }
        loop {
            let Ok(seen) = tokio::time::timeout_at(deadline, self.events.recv()).await else {
                return Ok(None);
            };
            match seen {
                Some(Seen::Message(t, p)) => return Ok(Some((t, p))),
                Some(Seen::Closed(e)) => anyhow::bail!("connection to the cloud broker lost: {e}"),
                None => anyhow::bail!("connection to the cloud broker lost"),
                Some(_) => {}
            }
        }
    }
}

/// Publishes the chunks of `bytes` (as announced by `r`) retained at QoS 1
/// on `edgefn/fleet/bundles/<sha256>/<chunk_size>/<index>` and waits for every PUBACK.
pub async fn publish_bundle(
    cloud: &mut Cloud,
    bytes: &[u8],
    r: &BundleRef,
    wait: Duration,
) -> anyhow::Result<()> {
    let messages = split(bytes, r)
        .map(|(i, c)| (topics::chunk(&r.sha256, r.chunk_size, i), c.to_vec()))
        .collect();
    cloud
        .publish_retained(messages, wait)
        .await
        .with_context(|| {
            format!(
                "publishing the {} chunk(s) of bundle {}",
                r.chunks, r.sha256
            )
        })
}
