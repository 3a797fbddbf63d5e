//! A function's own bounded queue: many producers (the sources, through the
//! router), one consumer (the function's worker), events in arrival order.
//!
//! When full, `block` makes the producer wait for room (back-pressure that
//! reaches the MQTT acknowledgement); `drop_oldest` discards the oldest queued
//! event, counts it, and never waits. Dropping the last [`QueueSender`]
//! closes the queue: the worker drains what is left and stops.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::config::schema::QueuePolicy;
use crate::event::Event;
use crate::metrics::FunctionMetrics;

struct Inner {
    items: VecDeque<Arc<Event>>,
    closed: bool,
}

struct Shared {
    inner: Mutex<Inner>,
    capacity: usize,
    policy: QueuePolicy,
    /// Signalled when an event is queued or the queue closes.
    filled: Notify,
    /// Signalled when an event is taken.
    drained: Notify,
    metrics: Arc<FunctionMetrics>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; if something did, the
        // queue's contents are still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The producing side (held by the router).
pub struct QueueSender {
    shared: Arc<Shared>,
}

/// The consuming side (held by the worker).
pub struct QueueReceiver {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QueueSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSender")
            .field("capacity", &self.shared.capacity)
            .field("policy", &self.shared.policy)
            .finish()
    }
}

/// A queue of `capacity` events; events dropped under `drop_oldest` are
/// counted in the function's `dropped` metric.
pub fn queue(
    capacity: usize,
    policy: QueuePolicy,
    metrics: Arc<FunctionMetrics>,
) -> (QueueSender, QueueReceiver) {
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            items: VecDeque::with_capacity(capacity.min(1024)),
            closed: false,
        }),
        capacity: capacity.max(1),
        policy,
        filled: Notify::new(),
        drained: Notify::new(),
        metrics,
    });
    (
        QueueSender {
            shared: shared.clone(),
        },
        QueueReceiver { shared },
    )
}

/// What happened to a pushed event.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued.
    Queued,
    /// Queued; the oldest event was dropped to make room.
    DroppedOldest,
    /// The worker has stopped; not queued.
    Closed,
}

impl QueueSender {
    /// Queues `event`, applying the full-queue policy.
    pub async fn push(&self, event: Arc<Event>) -> Pushed {
        let s = &self.shared;
        loop {
            let room = s.drained.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut inner = s.lock();
                if inner.closed {
                    return Pushed::Closed;
                }
                if inner.items.len() < s.capacity {
                    inner.items.push_back(event);
                    drop(inner);
                    s.filled.notify_one();
                    return Pushed::Queued;
                }
                if s.policy == QueuePolicy::DropOldest {
                    // The dropped event is released (and acknowledged) here.
                    inner.items.pop_front();
                    inner.items.push_back(event);
                    drop(inner);
                    s.metrics.dropped.fetch_add(1, Ordering::Relaxed);
                    s.filled.notify_one();
                    return Pushed::DroppedOldest;
                }
            }
            room.await;
        }
    }
}

impl Drop for QueueSender {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.filled.notify_one();
        self.shared.drained.notify_waiters();
    }
}

impl QueueReceiver {
    /// The next event; `None` once the queue is closed and empty.
    pub async fn pop(&mut self) -> Option<Arc<Event>> {
        let s = &self.shared;
        loop {
            let filled = s.filled.notified();
            tokio::pin!(filled);
            filled.as_mut().enable();
            {
                let mut inner = s.lock();
                if let Some(e) = inner.items.pop_front() {
                    drop(inner);
                    s.drained.notify_one();
                    return Some(e);
                }
                if inner.closed {
                    return None;
                }
            }
            filled.await;
        }
    }

    /// The next event if one is waiting (never waits).
    pub fn try_pop(&mut self) -> Option<Arc<Event>> {
        let e = self.shared.lock().items.pop_front();
        if e.is_some() {
            self.shared.drained.notify_one();
        }
        e
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        // Producers blocked on a full queue must not wait forever.
        self.shared.lock().closed = true;
        self.shared.drained.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SourceKind;
    use std::time::Duration;

    fn ev(n: u32) -> Arc<Event> {
        Arc::new(Event::new(SourceKind::Manual, "t", n.to_string()))
    }

    fn num(e: &Event) -> u32 {
        std::str::from_utf8(&e.payload).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn drop_oldest_keeps_the_newest_and_counts() {
        let metrics = Arc::new(FunctionMetrics::default());
        let (tx, mut rx) = queue(3, QueuePolicy::DropOldest, metrics.clone());
        for n in 0..5 {
            tx.push(ev(n)).await;
        }
        assert_eq!(metrics.snapshot().dropped, 2);
        drop(tx);
        let mut got = Vec::new();
        while let Some(e) = rx.pop().await {
            got.push(num(&e));
        }
        assert_eq!(got, vec![2, 3, 4]);
    }

    #[tokio::test]
    async fn block_waits_for_room_and_loses_nothing() {
        let (tx, mut rx) = queue(2, QueuePolicy::Block, Arc::default());
        let producer = tokio::spawn(async move {
            for n in 0..100 {
                assert_eq!(tx.push(ev(n)).await, Pushed::Queued);
            }
        });
        let mut got = Vec::new();
        while let Some(e) = tokio::time::timeout(Duration::from_secs(5), rx.pop())
            .await
            .unwrap()
        {
            got.push(num(&e));
        }
        producer.await.unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_stopped_worker_releases_blocked_producers() {
        let (tx, rx) = queue(1, QueuePolicy::Block, Arc::default());
        assert_eq!(tx.push(ev(0)).await, Pushed::Queued);
        let blocked = tokio::spawn(async move { tx.push(ev(1)).await });
        tokio::task::yield_now().await;
        drop(rx);
        let r = tokio::time::timeout(Duration::from_secs(5), blocked)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r, Pushed::Closed);
    }
}
