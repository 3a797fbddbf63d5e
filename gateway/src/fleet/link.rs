//! The gateway's fleet connection: its own MQTT 3.1.1 client to the cloud
//! broker (the endpoint, TLS and credentials of an MQTT sink), with a clean
//! session, since the retained messages carry the state. It receives the
//! gateway's desired document, fetches bundle chunks on demand and
//! publishes the reported state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::chunks::{Assembly, ChunkError};
use super::desired::BundleRef;
use super::topics;

/// Requests rumqttc queues between the client handles and the event loop.
const REQUESTS: usize = 64;

/// Chunks queued for a fetch (each at most 1 MiB); more are dropped and come
/// back with the next re-subscription.
const CHUNK_QUEUE: usize = 8;

/// A fetch that received nothing for this long subscribes again, which
/// makes the broker send the retained chunks again.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(5);

/// Times a fetch whose assembled whole has the wrong sha256 starts over
/// (re-subscribing: the retained chunks come again) before it fails.
const HASH_RETRIES: u32 = 3;

/// What the fleet connection needs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The cloud broker (an MQTT sink's endpoint: TLS and credentials).
    pub endpoint: crate::config::MqttEndpoint,
    /// This gateway's id (its topics).
    pub gateway_id: String,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Largest bundle this gateway fetches.
    pub max_bundle_bytes: u64,
}

/// Why a bundle could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The announcement or a chunk does not fit.
    #[error("bundle {sha256}: {source}")]
    Chunk {
        /// The bundle.
        sha256: String,
        /// What does not fit.
        source: ChunkError,
    },
    /// Not every chunk arrived in time.
    #[error(
        "bundle {sha256}: {missing} of {chunks} chunks missing after {secs} s (are they published on edgefn/fleet/bundles/{sha256}/{chunk_size}/?)"
    )]
    Timeout {
        /// The bundle.
        sha256: String,
        /// Its chunk size (part of the chunk topics).
        chunk_size: u32,
        /// Chunks not received.
        missing: u32,
        /// Chunks announced.
        chunks: u32,
        /// The time allowed.
        secs: u64,
    },
    /// The subscription could not be requested.
    #[error("subscribing to the chunks: {0}")]
    Client(#[from] rumqttc::ClientError),
    /// The connection task has stopped.
    #[error("the fleet connection has stopped")]
    Stopped,
}

type ChunkSender = mpsc::Sender<(u32, Bytes)>;

struct Shared {
    client: AsyncClient,
    gateway_id: String,
    max_bundle_bytes: u64,
    connected: AtomicBool,
    /// Chunk or desired messages that were malformed or unwanted.
    dropped: AtomicU64,
    /// The latest report; published on every (re)connect.
    report: watch::Sender<Option<Vec<u8>>>,
    /// Fetches under way, by bundle hash: their chunk size and queue.
    fetches: Mutex<HashMap<String, (u32, ChunkSender)>>,
}

/// A handle on the fleet connection.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

/// Spawns the connection task on `tracker`; returns the handle and a
/// receiver of raw desired payloads (each retained or live publish on the
/// desired topic, empty ones skipped; a new connection delivers the retained
/// one again — the receiver side de-duplicates).
pub fn start(
    config: LinkConfig,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> (Link, mpsc::Receiver<Vec<u8>>) {
    let mut opts = crate::mqtt::options(&config.endpoint, "fleet", config.keep_alive);
    opts.set_clean_session(true);
    let (client, eventloop) = AsyncClient::new(opts, REQUESTS);
    let (report, _) = watch::channel(None);
    let shared = Arc::new(Shared {
        client,
        gateway_id: config.gateway_id,
        max_bundle_bytes: config.max_bundle_bytes,
        connected: AtomicBool::new(false),
        dropped: AtomicU64::new(0),
        report,
        fetches: Mutex::new(HashMap::new()),
    });
    let (desired_tx, desired_rx) = mpsc::channel(4);
    let (latest_tx, latest_rx) = watch::channel(None);
    tracker.spawn(forward_desired(latest_rx, desired_tx, cancel.clone()));
    tracker.spawn(run(shared.clone(), eventloop, latest_tx, cancel));
    (Link { shared }, desired_rx)
}

/// Hands each desired payload to the agent; while the agent is busy, only
/// the latest one waits.
async fn forward_desired(
    mut latest: watch::Receiver<Option<Vec<u8>>>,
    tx: mpsc::Sender<Vec<u8>>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = latest.changed() => if changed.is_err() { return },
        }
        let Some(doc) = latest.borrow_and_update().clone() else {
            continue;
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            sent = tx.send(doc) => if sent.is_err() { return },
        }
    }
}

/// The connection task: polls the event loop, reconnects with back-off.
async fn run(
    shared: Arc<Shared>,
    mut eventloop: EventLoop,
    desired: watch::Sender<Option<Vec<u8>>>,
    cancel: CancellationToken,
) {
    let mut reports = shared.report.subscribe();
    let mut failures = 0u32;
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            changed = reports.changed() => {
                if changed.is_ok() && shared.connected.load(Ordering::Relaxed) {
                    shared.publish_report(reports.borrow_and_update().clone());
                }
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                shared.connected.store(true, Ordering::Relaxed);
                tracing::info!(gateway = %shared.gateway_id, "Fleet connection up.");
                shared.on_connect(reports.borrow_and_update().clone());
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                shared.on_publish(&p.topic, p.payload, &desired)
            }
            Ok(_) => {}
            Err(e) => {
                shared.connected.store(false, Ordering::Relaxed);
                if failures == 0 {
                    tracing::warn!(gateway = %shared.gateway_id, error = %e, "Fleet connection lost; reconnecting.");
                } else {
                    tracing::debug!(gateway = %shared.gateway_id, error = %e, attempt = failures, "Fleet connection still down.");
                }
                let wait = crate::mqtt::backoff(failures);
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    shared.connected.store(false, Ordering::Relaxed);
    let _ = shared.client.try_disconnect();
}

impl Shared {
    /// Subscribes to the desired topic and every wanted chunk topic again
    /// (a clean session forgets them) and re-publishes the latest report.
    fn on_connect(&self, report: Option<Vec<u8>>) {
        let mut filters = vec![topics::desired(&self.gateway_id)];
        filters.extend(
            self.fetches
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|(sha, (size, _))| topics::chunks_filter(sha, *size)),
        );
        for f in filters {
            if let Err(e) = self.client.try_subscribe(f.clone(), QoS::AtLeastOnce) {
                tracing::warn!(filter = %f, error = %e, "Fleet subscription not requested.");
            }
        }
        self.publish_report(report);
    }

    fn publish_report(&self, report: Option<Vec<u8>>) {
        let Some(json) = report else { return };
        let topic = topics::reported(&self.gateway_id);
        if let Err(e) = self.client.try_publish(topic, QoS::AtLeastOnce, true, json) {
            // The report is kept: the next (re)connect publishes it.
            tracing::warn!(gateway = %self.gateway_id, error = %e, "Fleet report not queued.");
        }
    }

    fn on_publish(&self, topic: &str, payload: Bytes, desired: &watch::Sender<Option<Vec<u8>>>) {
        if topic == topics::desired(&self.gateway_id) {
            // An empty retained payload clears the document: nothing to do.
            if !payload.is_empty() {
                desired.send_replace(Some(payload.to_vec()));
            }
            return;
        }
        let Some((sha, size, index)) = topics::parse_chunk(topic) else {
            // Logged at 1, 2, 4, 8… so a flood cannot flood the log.
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(topic = %topic.escape_debug(), bytes = payload.len(), dropped = n, "Unexpected message on the fleet connection dropped.");
            }
            return;
        };
        let fetches = self.fetches.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(tx) = fetches
            .get(sha)
            .filter(|(s, _)| *s == size)
            .map(|(_, tx)| tx)
        else {
            // A chunk of a finished fetch (or a retained delivery racing the
            // unsubscription): nobody wants it.
            return;
        };
        if tx.try_send((index, payload)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(sha256 = %sha, index, "Chunk dropped (the fetch is behind); it comes back on re-subscription.");
        }
    }
}

/// Takes a fetch out of the table (and unsubscribes) when it ends.
struct FetchGuard<'a> {
    shared: &'a Shared,
    sha256: String,
    chunk_size: u32,
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .fetches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.sha256);
        let _ = self
            .shared
            .client
            .try_unsubscribe(topics::chunks_filter(&self.sha256, self.chunk_size));
    }
}

impl Link {
    /// Subscribes to the bundle's chunk topic, assembles exactly `chunks`
    /// chunks of the announced sizes, checks the sha256 of the whole,
    /// unsubscribes. A chunk that does not fit the announcement (index out
    /// of range, wrong size: leftovers or a planted message) is dropped and
    /// counted; a whole with the wrong sha256 starts over (the retained
    /// chunks come again) up to [`HASH_RETRIES`] times, then fails.
    /// Survives reconnects (re-subscribes). Bounded by `timeout`.
    pub async fn fetch(&self, r: &BundleRef, timeout: Duration) -> Result<Vec<u8>, FetchError> {
        let chunk_error = |source| FetchError::Chunk {
            sha256: r.sha256.clone(),
            source,
        };
        let mut assembly = Assembly::new(r, self.shared.max_bundle_bytes).map_err(chunk_error)?;
        let (tx, mut rx) = mpsc::channel(CHUNK_QUEUE);
        self.shared
            .fetches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(r.sha256.clone(), (r.chunk_size, tx));
        let _guard = FetchGuard {
            shared: &self.shared,
            sha256: r.sha256.clone(),
            chunk_size: r.chunk_size,
        };
        let filter = topics::chunks_filter(&r.sha256, r.chunk_size);
        self.shared
            .client
            .subscribe(filter.clone(), QoS::AtLeastOnce)
            .await?;
        let now = tokio::time::Instant::now();
        let deadline = now
            .checked_add(timeout)
            .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
        let mut retries = 0;
        loop {
            let quiet = tokio::time::sleep(RESUBSCRIBE_AFTER);
            tokio::select! {
                chunk = rx.recv() => {
                    let Some((index, payload)) = chunk else { return Err(FetchError::Stopped) };
                    if !self.take_chunk(&mut assembly, r, index, &payload) {
                        continue;
                    }
                    match assembly.finish() {
                        Ok(bytes) => return Ok(bytes),
                        Err(e) if retries < HASH_RETRIES => {
                            retries += 1;
                            tracing::warn!(sha256 = %r.sha256, error = %e, retry = retries, "Assembled bundle has the wrong hash; fetching its chunks again.");
                            self.shared.client.subscribe(filter.clone(), QoS::AtLeastOnce).await?;
                        }
                        Err(e) => return Err(chunk_error(e)),
                    }
                }
                _ = quiet => {
                    // Nothing for a while (dropped chunks, or a reconnect
                    // whose subscriptions were lost): ask for them again.
                    self.shared.client.subscribe(filter.clone(), QoS::AtLeastOnce).await?;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(FetchError::Timeout {
                        sha256: r.sha256.clone(),
                        chunk_size: r.chunk_size,
                        missing: assembly.missing(),
                        chunks: r.chunks,
                        secs: timeout.as_secs(),
                    });
                }
            }
        }
    }

    /// Adds a chunk to `assembly`; one that does not fit is dropped and
    /// counted (logged at the 1st, 2nd, 4th… drop). Returns whether every
    /// chunk is in.
    fn take_chunk(
        &self,
        assembly: &mut Assembly,
        r: &BundleRef,
        index: u32,
        payload: &[u8],
    ) -> bool {
        match assembly.accept(index, payload) {
            Ok(complete) => complete,
            Err(e) => {
                let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(sha256 = %r.sha256, index, error = %e, dropped = n, "Chunk that does not fit the announced bundle dropped.");
                }
                false
            }
        }
    }

    /// Publishes `json` retained at QoS 1 on the reported topic; if the
    /// connection is down, keeps only the latest and publishes it on
    /// (re)connect.
    pub fn report(&self, json: Vec<u8>) {
        self.shared.report.send_replace(Some(json));
    }

    /// Whether the connection is up.
    pub fn connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// Messages dropped so far: unexpected topics, chunks a fetch could not
    /// take in time, and chunks that do not fit the announced bundle.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}
