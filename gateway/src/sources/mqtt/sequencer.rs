//! The MQTT source's acknowledgement order: messages finish in any order
//! (a slow function on one, a fast one on the next), but are released for
//! acknowledgement strictly in receive order. rumqttd accepts acks only in
//! order, and after a crash the broker redelivers from the oldest
//! unacknowledged message, so nothing is acknowledged past an unfinished one.

use std::collections::{BTreeSet, VecDeque};

/// Received messages awaiting acknowledgement, in receive order.
#[derive(Debug)]
pub(super) struct AckSequencer<T> {
    /// Received, not yet released: (receive number, item).
    queue: VecDeque<(u64, T)>,
    /// Receive numbers that are finished but wait for an earlier one.
    finished: BTreeSet<u64>,
    /// How many have been released so far.
    released: u64,
}

impl<T> AckSequencer<T> {
    /// An empty sequencer.
    pub(super) fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            finished: BTreeSet::new(),
            released: 0,
        }
    }

    /// Message `n` (numbers increase in receive order) was received.
    pub(super) fn received(&mut self, n: u64, item: T) {
        self.queue.push_back((n, item));
    }

    /// Message `n` is fully handled (it may not have been recorded as
    /// received yet: the two reports travel on separate channels).
    pub(super) fn finished(&mut self, n: u64) {
        self.finished.insert(n);
    }

    /// The messages now due for acknowledgement, oldest first: the finished
    /// ones at the front of the queue, up to the first unfinished one.
    pub(super) fn release(&mut self) -> Vec<T> {
        let mut due = Vec::new();
        while let Some(&(n, _)) = self.queue.front() {
            if !self.finished.remove(&n) {
                break;
            }
            if let Some((_, item)) = self.queue.pop_front() {
                due.push(item);
            }
        }
        self.released += due.len() as u64;
        due
    }

    /// How many messages have been released in all.
    pub(super) fn released(&self) -> u64 {
        self.released
    }

    /// Whether every received message has been released.
    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_completions_are_released_in_receive_order() {
        let mut s = AckSequencer::new();
        for n in 0..5 {
            s.received(n, n);
        }
        // A fast function finishes the later messages first: nothing may be
        // acknowledged past the unfinished message 0.
        s.finished(3);
        s.finished(1);
        assert_eq!(s.release(), Vec::<u64>::new());
        s.finished(0);
        assert_eq!(s.release(), [0, 1]);
        s.finished(4);
        assert_eq!(s.release(), Vec::<u64>::new(), "2 is still unfinished");
        s.finished(2);
        assert_eq!(s.release(), [2, 3, 4]);
        assert_eq!(s.released(), 5);
        assert!(s.is_empty());
    }

    #[test]
    fn a_completion_may_arrive_before_its_receipt() {
        let mut s = AckSequencer::new();
        s.finished(0);
        assert_eq!(s.release(), Vec::<&str>::new());
        s.received(0, "a");
        s.received(1, "b");
        assert_eq!(s.release(), ["a"]);
        assert!(!s.is_empty());
        s.finished(1);
        assert_eq!(s.release(), ["b"]);
        assert_eq!(s.released(), 2);
    }
}
