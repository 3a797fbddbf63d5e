//! The MQTT sink: delivers outbox records to a (cloud) broker at QoS 1, over
//! TCP or TLS (rustls, custom CA, optional client certificate for mutual TLS,
//! optional ALPN), MQTT 3.1.1 or 5, on a topic rendered from the sink's
//! template.
//!
//! # Delivery
//! rumqttc is treated as volatile: it keeps unacknowledged publishes only in
//! memory, has open loss bugs on reconnect, and drops its pending publishes
//! when a reconnect comes back without a session. So each connection is a
//! fresh client, and any connection error, or a publish left unacknowledged
//! for `ack_timeout_s`, tears it down; the next connection starts again from
//! the oldest unconfirmed record in the outbox.
//!
//! Acknowledgements are matched by packet id as the event loop assigns it:
//! publishes are handed to the client in sequence order, each
//! `Outgoing::Publish(pkid)` (emitted in that same order) binds the next
//! queued batch to `pkid`, and `Incoming::PubAck(pkid)` confirms exactly that
//! batch. Packet ids of a torn-down connection are forgotten with it, so an
//! acknowledgement is never credited across a lost session.
//!
//! # Batches
//! With `batch_max > 1` a message is an array of consecutive records that
//! share one rendered topic (a record whose topic differs starts the next
//! message). Over MQTT 5 its `idempotency-key` user property is
//! `<gateway>-<first seq>-<last seq>`, as HTTP's header: after a reconnect a
//! batch may start at the same record and carry more, so a key naming only
//! the first record would make the cloud drop the longer batch as a
//! duplicate. A single envelope's key is its `id`.
//!
//! # Lanes
//! Each fill of the window reads the outbox's high lane first (see
//! [`crate::outbox::lane`]): an alarm waits at most for the messages
//! already in flight. The read position is a [`Cursor`] (one `seq` per
//! lane), and a message never mixes lanes.
//!
//! # Commands
//! With `subscribe`, the connection also receives cloud commands
//! ([`commands`]).

mod commands;
pub mod config;
mod connection;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{BuiltSink, CommonKeys, SinkEnv, SinkError, SinkPlugin};
use super::{STOP_GRACE, Sink, SinkCommon, SinkContext, dead_letter, envelope};
use crate::config::{KeyChanges, Scope, render_topic};
use crate::outbox::{Cursor, StoredRecord};
use commands::{Commands, cancelled};
use config::{MqttSinkConfig, MqttSinkSpec};
use connection::{Client, Wire, connect};

/// Records read from the outbox per query at most.
const READ_AHEAD: usize = 1000;

/// The MQTT sink.
pub struct MqttSink {
    common: SinkCommon,
    spec: MqttSinkSpec,
}

/// One message in flight: the records it carries.
struct InFlight {
    records: Vec<StoredRecord>,
    sent_at: Instant,
}

/// `kind = "mqtt"`.
pub struct Kind;

impl SinkPlugin for Kind {
    const KIND: &'static str = "mqtt";
    type Config = MqttSinkConfig;
    type Spec = MqttSinkSpec;

    fn common(c: &MqttSinkConfig) -> CommonKeys<'_> {
        CommonKeys {
            name: &c.name,
            format: c.format,
            batch_max: c.batch_max,
            batch_linger_ms: c.batch_linger_ms,
            outbox: &c.outbox,
        }
    }

    fn validate(c: &MqttSinkConfig, scope: &mut Scope<'_, '_>) -> Option<MqttSinkSpec> {
        config::validate(c, scope)
    }

    fn changed(a: &MqttSinkSpec, b: &MqttSinkSpec, keys: &mut KeyChanges) {
        keys.endpoint(&a.endpoint, &b.endpoint);
        keys.key("topic", &a.topic_template, &b.topic_template);
        keys.key("max_inflight", &a.max_inflight, &b.max_inflight);
        keys.key("keep_alive_s", &a.keep_alive, &b.keep_alive);
        keys.key("protocol", &a.protocol, &b.protocol);
        keys.key("ack_timeout_s", &a.ack_timeout, &b.ack_timeout);
        keys.key("subscribe", &a.subscribe, &b.subscribe);
    }

    fn mqtt_connection(spec: &MqttSinkSpec) -> Option<(&crate::config::MqttEndpoint, Duration)> {
        Some((&spec.endpoint, spec.keep_alive))
    }

    fn subscriptions(spec: &MqttSinkSpec) -> &[crate::topic::TopicFilter] {
        &spec.subscribe
    }

    fn build(
        common: SinkCommon,
        spec: &MqttSinkSpec,
        env: &SinkEnv<'_>,
    ) -> Result<BuiltSink, SinkError> {
        let mut spec = spec.clone();
        // A sink pointed at the embedded broker's guarded listener connects
        // to rumqttd directly, with the internal login.
        if let Some(endpoint) = env.broker.and_then(|b| b.own_client(&spec.endpoint)) {
            spec.endpoint = endpoint;
        }
        Ok(MqttSink { common, spec }.boxed())
    }
}

impl Sink for MqttSink {
    async fn run(self, mut ctx: SinkContext) {
        let spec = self.spec.clone();
        let mut commands = Commands::start(&mut ctx, &self.common.name, &spec.subscribe);
        let Some((mut reader, mut committed)) = ctx.delivery_inputs(&self.common.name) else {
            return;
        };
        let mut failures = 0u32;
        // The highest sequence number ever handed to a client, per lane:
        // anything at or below it that is sent again counts as a re-send.
        let mut high_water = Cursor::default();
        while !ctx.stop.is_cancelled() {
            // Confirmations of the previous connection must be committed
            // before its records are read again.
            ctx.outbox.flush().await;
            let (client, mut wire, poller) = connect(&spec);
            let mut connected = false;
            let mut last_sent = Cursor::default();
            let mut queued: VecDeque<InFlight> = VecDeque::new();
            let mut by_pkid: HashMap<u16, InFlight> = HashMap::new();
            let mut stopping_since: Option<Instant> = None;
            let reason: String = 'conn: loop {
                // Fill the in-flight window from the outbox.
                if connected && stopping_since.is_none() {
                    let (reader, client) = (&mut reader, &client);
                    let w = (&mut last_sent, &mut queued, by_pkid.len(), &mut high_water);
                    if let Err(e) = self.fill(&ctx, reader, client, w).await {
                        break 'conn e;
                    }
                }
                let oldest = by_pkid
                    .values()
                    .chain(queued.iter())
                    .map(|f| f.sent_at)
                    .min();
                if let Some(since) = stopping_since
                    && (by_pkid.is_empty() && queued.is_empty() || since.elapsed() >= STOP_GRACE)
                {
                    break String::new();
                }
                let ack_deadline = oldest.map(|t| t + spec.ack_timeout);
                tokio::select! {
                    w = wire.recv() => match w {
                        Some(Wire::ConnAck { session_present }) => {
                            connected = true;
                            failures = 0;
                            ctx.stats.connects.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(sink = %self.common.name, "Sink connected.");
                            if let Some(c) = &mut commands {
                                c.connected(&client, session_present).await;
                            }
                        }
                        Some(Wire::Subscribed(granted)) => {
                            if let Some(c) = &commands {
                                c.subscribed(granted);
                            }
                        }
                        Some(Wire::Command(p)) => {
                            if let Some(c) = &mut commands {
                                c.take(p);
                            }
                        }
                        Some(Wire::Sent(pkid)) => {
                            if let Some(f) = queued.pop_front() {
                                by_pkid.insert(pkid, f);
                            }
                        }
                        Some(Wire::Acked { pkid, rejected }) => {
                            if let Some(f) = by_pkid.remove(&pkid) {
                                let seqs: Vec<u64> = f.records.iter().map(|r| r.seq).collect();
                                if let Some(reason) = rejected {
                                    dead_letter(&ctx, &self.common.name, &reason, &f.records).await;
                                } else {
                                    ctx.stats.delivered.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                                    ctx.metrics.sink_acked.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                                }
                                ctx.outbox.confirm(&self.common.name, seqs);
                            }
                        }
                        Some(Wire::Closed(e)) => break e,
                        None => break "event loop stopped".to_owned(),
                    },
                    r = committed.changed(), if stopping_since.is_none() => {
                        if r.is_err() {
                            break "outbox closed".to_owned();
                        }
                    }
                    () = sleep_until_opt(ack_deadline) => {
                        break format!("no acknowledgement within {} s", spec.ack_timeout.as_secs());
                    }
                    () = ctx.stop.cancelled(), if stopping_since.is_none() => {
                        stopping_since = Some(Instant::now());
                    }
                    () = tokio::time::sleep(STOP_GRACE), if stopping_since.is_some() => {}
                    () = cancelled(&commands), if commands.as_ref().is_some_and(Commands::open) => {
                        if let Some(c) = &mut commands {
                            c.stop();
                        }
                    }
                }
            };
            // A stopping connection is still up, for the last acks.
            if let Some(c) = &mut commands
                && stopping_since.is_none()
            {
                c.connection_lost();
            }
            if stopping_since.is_some() || ctx.stop.is_cancelled() {
                // The last command acknowledgements go out before the
                // disconnect (requests leave in order).
                if let Some(c) = commands.take() {
                    c.finish().await;
                }
                client.disconnect();
                let _ = tokio::time::timeout(STOP_GRACE, async {
                    while let Some(w) = wire.recv().await {
                        if matches!(w, Wire::Closed(_)) {
                            break;
                        }
                    }
                })
                .await;
                poller.abort();
                break;
            }
            client.disconnect();
            poller.abort();
            let unconfirmed = queued.len() + by_pkid.len();
            self.after_loss(
                &ctx,
                &mut commands,
                &mut failures,
                (connected, &reason, unconfirmed),
            )
            .await;
        }
        if let Some(c) = commands {
            c.finish().await;
        }
        tracing::debug!(sink = %self.common.name, "Sink stopped.");
    }
}

impl MqttSink {
    /// After a lost connection: says why (once per outage), then waits out
    /// the back-off, stopping command intake meanwhile if the gateway stops.
    async fn after_loss(
        &self,
        ctx: &SinkContext,
        commands: &mut Option<Commands>,
        failures: &mut u32,
        (connected, reason, unconfirmed): (bool, &str, usize),
    ) {
        ctx.stats.failures.fetch_add(1, Ordering::Relaxed);
        let spec = &self.spec;
        if !connected {
            // Refused TLS (unknown CA, bad client certificate), refused
            // credentials, or nothing listening: say so once per outage.
            if *failures == 0 {
                tracing::error!(sink = %self.common.name, host = %spec.endpoint.host, port = spec.endpoint.port, error = %reason, "Sink cannot connect; retrying with back-off.");
            }
        } else if *failures == 0 {
            tracing::warn!(sink = %self.common.name, error = %reason, unconfirmed, "Sink connection lost; unconfirmed records will be sent again.");
        } else {
            tracing::debug!(sink = %self.common.name, error = %reason, attempt = *failures, "Sink reconnect failed.");
        }
        let wait = crate::mqtt::backoff(*failures);
        *failures = failures.saturating_add(1);
        let until = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                () = ctx.stop.cancelled() => break,
                () = tokio::time::sleep_until(until) => break,
                () = cancelled(commands), if commands.as_ref().is_some_and(Commands::open) => {
                    if let Some(c) = commands {
                        c.stop();
                    }
                }
            }
        }
    }

    /// Fills the in-flight window (`queued` plus `awaiting` acknowledgement,
    /// at most `max_inflight` messages) from the outbox, high lane first,
    /// after `last_sent`; `Err` with the reason when the client is gone.
    async fn fill(
        &self,
        ctx: &SinkContext,
        // `&mut`: a reader is `Send` but not `Sync`, and this future is
        // held across awaits.
        reader: &mut crate::outbox::Reader,
        client: &Client,
        (last_sent, queued, awaiting, high_water): (
            &mut Cursor,
            &mut VecDeque<InFlight>,
            usize,
            &mut Cursor,
        ),
    ) -> Result<(), String> {
        let spec = &self.spec;
        let window = usize::from(spec.max_inflight);
        while queued.len() + awaiting < window {
            // One query for the whole free window (not one per message):
            // each SQLite read takes and drops a lock.
            let free = window - queued.len() - awaiting;
            let want = free.saturating_mul(self.common.batch_max).min(READ_AHEAD);
            let mut rows = match reader.next_batch(&self.common.name, last_sent, want) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(sink = %self.common.name, error = %e, "Outbox read failed.");
                    return Ok(());
                }
            };
            if rows.is_empty() {
                return Ok(());
            }
            if rows.len() < self.common.batch_max && !self.common.batch_linger.is_zero() {
                tokio::time::sleep(self.common.batch_linger).await;
                if let Ok(more) =
                    reader.next_batch(&self.common.name, last_sent, self.common.batch_max)
                {
                    rows = more;
                }
            }
            let mut rows = rows.into_iter().peekable();
            let topic_of = |r: &StoredRecord| {
                render_topic(
                    &spec.topic_template,
                    &ctx.gateway_id,
                    &r.function,
                    &self.common.name,
                    &r.topic,
                )
            };
            while let Some((topic, batch)) = take_batch(&mut rows, self.common.batch_max, topic_of)
            {
                let Some(last) = batch.last() else { break };
                last_sent.advance_past(&batch);
                let resent = batch
                    .iter()
                    .filter(|r| high_water.passed(r.lane, r.seq))
                    .count();
                if resent > 0 {
                    ctx.stats.resent.fetch_add(resent as u64, Ordering::Relaxed);
                }
                high_water.advance_past(&batch);
                let as_array = self.common.batch_max > 1;
                let body =
                    envelope::encode_batch(self.common.format, &ctx.gateway_id, &batch, as_array);
                let key = if as_array {
                    envelope::batch_key(&ctx.gateway_id, &batch)
                } else {
                    envelope::idempotency_key(&ctx.gateway_id, last.seq)
                };
                client.publish(topic, body, key).await?;
                queued.push_back(InFlight {
                    records: batch,
                    sent_at: Instant::now(),
                });
                if queued.len() + awaiting >= window {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// The records of the next message: up to `max` consecutive records whose
/// rendered topic is the same, and that topic. A batch never mixes topics:
/// a record whose topic differs from the one before it starts a new message.
fn take_batch(
    rows: &mut std::iter::Peekable<std::vec::IntoIter<StoredRecord>>,
    max: usize,
    topic_of: impl Fn(&StoredRecord) -> String,
) -> Option<(String, Vec<StoredRecord>)> {
    let first = rows.next()?;
    let topic = topic_of(&first);
    let mut batch = vec![first];
    while batch.len() < max {
        match rows.next_if(|r| topic_of(r) == topic) {
            Some(r) => batch.push(r),
            None => break,
        }
    }
    Some((topic, batch))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, topic: &str) -> StoredRecord {
        StoredRecord {
            seq,
            function: "f".into(),
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"{}"),
            ts_ms: 0,
            lane: crate::outbox::Lane::Normal,
        }
    }

    fn batches(topics: &[&str], max: usize) -> Vec<(String, Vec<u64>)> {
        let rows: Vec<_> = (1u64..)
            .zip(topics)
            .map(|(seq, t)| record(seq, t))
            .collect();
        let mut rows = rows.into_iter().peekable();
        let mut out = Vec::new();
        while let Some((topic, batch)) = take_batch(&mut rows, max, |r| format!("up/{}", r.topic)) {
            out.push((topic, batch.iter().map(|r| r.seq).collect()));
        }
        out
    }

    #[test]
    fn a_batch_never_mixes_topics() {
        assert_eq!(
            batches(&["a", "a", "b", "b", "b", "a"], 5),
            [
                ("up/a".to_owned(), vec![1, 2]),
                ("up/b".to_owned(), vec![3, 4, 5]),
                ("up/a".to_owned(), vec![6]),
            ]
        );
    }

    #[test]
    fn a_batch_holds_at_most_batch_max_records() {
        assert_eq!(
            batches(&["a", "a", "a"], 2),
            [
                ("up/a".to_owned(), vec![1, 2]),
                ("up/a".to_owned(), vec![3]),
            ]
        );
        assert_eq!(batches(&[], 2), []);
    }
}
