//! What waits between the MQTT intake's poller and its dispatcher: QoS 0
//! messages (dropped beyond their limit) and QoS 1 and 2 ones (the poller
//! pauses, then defers, beyond theirs). See the MQTT source's Back-pressure.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::{MAX_HELD_QOS0, MAX_HELD_QOS0_BYTES, MAX_HELD_QOS1, MAX_HELD_QOS1_BYTES};

/// What waits for the dispatcher: QoS 0 messages (dropped beyond their
/// limit) and QoS 1 and 2 ones (the poller pauses, then defers, beyond
/// theirs: see `Intaker::take`).
#[derive(Default)]
pub(super) struct Held {
    count: AtomicUsize,
    bytes: AtomicUsize,
    /// QoS 1 and 2 messages, and their payload bytes.
    acked_count: AtomicUsize,
    acked_bytes: AtomicUsize,
    /// Set while the poller waits for room ([`Held::room`]).
    paused: AtomicBool,
    /// Signalled when a paused poller may read again.
    room: Notify,
}

impl Held {
    /// Takes room for a QoS 0 message of `len` bytes, if there is any.
    pub(super) fn admit(&self, len: usize) -> bool {
        let full = self.count.load(Ordering::Relaxed) >= MAX_HELD_QOS0
            || self.bytes.load(Ordering::Relaxed) + len > MAX_HELD_QOS0_BYTES;
        if !full {
            self.count.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(len, Ordering::Relaxed);
        }
        !full
    }

    pub(super) fn release(&self, len: usize) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.bytes.fetch_sub(len, Ordering::Relaxed);
    }

    /// Takes room for a QoS 1 or 2 message of `len` bytes, if there is any
    /// (or always, for an intake that cannot defer).
    pub(super) fn hold(&self, len: usize, bounded: bool) -> bool {
        let full = bounded
            && (self.acked_count.load(Ordering::SeqCst) >= MAX_HELD_QOS1
                || self.acked_bytes.load(Ordering::SeqCst) + len > MAX_HELD_QOS1_BYTES);
        if !full {
            self.acked_count.fetch_add(1, Ordering::SeqCst);
            self.acked_bytes.fetch_add(len, Ordering::SeqCst);
        }
        !full
    }

    /// A QoS 1 or 2 message of `len` bytes went to the router.
    pub(super) fn dispatched(&self, len: usize) {
        self.acked_count.fetch_sub(1, Ordering::SeqCst);
        self.acked_bytes.fetch_sub(len, Ordering::SeqCst);
        if self.paused.load(Ordering::SeqCst) && self.resumable() {
            self.room.notify_one();
        }
    }

    /// Whether QoS 1 and 2 messages reached their limit.
    pub(super) fn full(&self) -> bool {
        self.acked_count.load(Ordering::SeqCst) >= MAX_HELD_QOS1
            || self.acked_bytes.load(Ordering::SeqCst) >= MAX_HELD_QOS1_BYTES
    }

    /// Whether a paused poller may read again: half of them are left.
    pub(super) fn resumable(&self) -> bool {
        self.acked_count.load(Ordering::SeqCst) <= MAX_HELD_QOS1 / 2
            && self.acked_bytes.load(Ordering::SeqCst) <= MAX_HELD_QOS1_BYTES / 2
    }

    /// Waits until [`Held::resumable`]. Cancel-safe.
    pub(super) async fn room(&self) {
        self.paused.store(true, Ordering::SeqCst);
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.resumable() {
                break;
            }
            notified.await;
        }
        self.paused.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A paused poller reads again once half the held QoS 1 messages have
    /// been dispatched, not at the first free slot.
    #[tokio::test]
    async fn a_paused_poller_resumes_at_half() {
        let held = Arc::new(Held::default());
        for _ in 0..MAX_HELD_QOS1 {
            assert!(held.hold(1, true));
        }
        assert!(held.full());
        assert!(!held.hold(1, true), "full: refused");
        assert!(held.hold(1, false), "an unbounded intake holds any number");
        held.dispatched(1);
        let waiter = tokio::spawn({
            let held = held.clone();
            async move { held.room().await }
        });
        for _ in 0..MAX_HELD_QOS1 / 2 - 1 {
            held.dispatched(1);
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "still more than half held");
        held.dispatched(1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("resumed at half")
            .expect("waiter");
        assert!(!held.full());
    }
}
