//! The MQTT source's acknowledgement order: messages finish in any order
//! (a slow function on one, a fast one on the next), but are released for
//! acknowledgement strictly in receive order. rumqttd accepts acks only in
//! order, and after a crash the broker redelivers from the oldest
//! unacknowledged message, so nothing is acknowledged past an unfinished one.
//! A message finished without acknowledgement (left for redelivery, e.g.
//! at shutdown) withholds every later one too: an ack past the gap would make
//! rumqttd skip it for good.

use std::collections::{BTreeMap, VecDeque};

/// Received messages awaiting acknowledgement, in receive order.
#[derive(Debug)]
pub(super) struct AckSequencer<T> {
    /// Received, not yet released: (receive number, item).
    queue: VecDeque<(u64, T)>,
    /// Receive numbers that are finished but wait for an earlier one, and
    /// whether each may be acknowledged.
    finished: BTreeMap<u64, bool>,
    /// How many have been released so far.
    released: u64,
    /// Set once a message was left unacknowledged.
    withheld: bool,
}

impl<T> AckSequencer<T> {
    /// An empty sequencer.
    pub(super) fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            finished: BTreeMap::new(),
            released: 0,
            withheld: false,
        }
    }

    /// Message `n` (numbers increase in receive order) was received.
    pub(super) fn received(&mut self, n: u64, item: T) {
        self.queue.push_back((n, item));
    }

    /// Message `n` is fully handled (it may not have been recorded as
    /// received yet: the two reports travel on separate channels); `ack`:
    /// whether it may be acknowledged.
    pub(super) fn finished(&mut self, n: u64, ack: bool) {
        self.finished.insert(n, ack);
    }

    /// The messages now due for acknowledgement, oldest first: the finished
    /// ones at the front of the queue, up to the first unfinished one, none
    /// after one left unacknowledged.
    pub(super) fn release(&mut self) -> Vec<T> {
        let mut due = Vec::new();
        while let Some(&(n, _)) = self.queue.front() {
            let Some(ack) = self.finished.remove(&n) else {
                break;
            };
            self.withheld |= !ack;
            self.released += 1;
            if let Some((_, item)) = self.queue.pop_front()
                && !self.withheld
            {
                due.push(item);
            }
        }
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
        s.finished(3, true);
        s.finished(1, true);
        assert_eq!(s.release(), Vec::<u64>::new());
        s.finished(0, true);
        assert_eq!(s.release(), [0, 1]);
        s.finished(4, true);
        assert_eq!(s.release(), Vec::<u64>::new(), "2 is still unfinished");
        s.finished(2, true);
        assert_eq!(s.release(), [2, 3, 4]);
        assert_eq!(s.released(), 5);
        assert!(s.is_empty());
    }

    #[test]
    fn a_completion_may_arrive_before_its_receipt() {
        let mut s = AckSequencer::new();
        s.finished(0, true);
        assert_eq!(s.release(), Vec::<&str>::new());
        s.received(0, "a");
        s.received(1, "b");
        assert_eq!(s.release(), ["a"]);
        assert!(!s.is_empty());
        s.finished(1, true);
        assert_eq!(s.release(), ["b"]);
        assert_eq!(s.released(), 2);
    }

    #[test]
    fn nothing_after_a_message_left_unacknowledged_is_released() {
        let mut s = AckSequencer::new();
        for n in 0..4 {
            s.received(n, n);
        }
        s.finished(0, true);
        s.finished(1, false);
        s.finished(2, true);
        assert_eq!(s.release(), vec![0]);
        s.finished(3, true);
        assert_eq!(s.release(), Vec::<u64>::new());
        assert_eq!(s.released(), 4);
        assert!(s.is_empty());
    }
}
