//! The per-function circuit breaker.
//!
//! `closed` → after `failures` consecutive crashed invocations (trap,
//! timeout, memory) → `open` for a
//! back-off (events are dead-lettered without running the function) →
//! `half-open`: the next event is a probe; success closes the breaker and
//! resets the back-off, failure opens it again for twice as long (up to the
//! maximum). A new version of the function (hot reload) closes it.

use std::time::{Duration, Instant};

use crate::config::BreakerSpec;

/// Where the breaker stands (also the value of the `breaker_state` metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Events run normally.
    Closed = 0,
    /// Events are dead-lettered until the back-off ends.
    Open = 1,
    /// The next event is a probe.
    HalfOpen = 2,
}

impl BreakerState {
    /// A short name for logs and the admin endpoint.
    pub fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

/// What to do with the next event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Run it.
    Run,
    /// Run it as the half-open probe.
    Probe,
    /// Do not run it; the breaker is open for this much longer.
    Reject(Duration),
}

/// One function's breaker.
#[derive(Debug)]
pub struct Breaker {
    spec: BreakerSpec,
    state: BreakerState,
    consecutive: u32,
    backoff: Duration,
    open_until: Option<Instant>,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(spec: BreakerSpec) -> Self {
        let backoff = spec.backoff;
        Self {
            spec,
            state: BreakerState::Closed,
            consecutive: 0,
            backoff,
            open_until: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Decides about the next event at `now`.
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            BreakerState::Closed => Admit::Run,
            BreakerState::HalfOpen => Admit::Probe,
            BreakerState::Open => match self.open_until {
                Some(until) if now < until => Admit::Reject(until - now),
                _ => {
                    self.state = BreakerState::HalfOpen;
                    Admit::Probe
                }
            },
        }
    }

    /// Records a successful invocation.
    pub fn success(&mut self) {
        self.consecutive = 0;
        self.state = BreakerState::Closed;
        self.backoff = self.spec.backoff;
        self.open_until = None;
    }

    /// Records a failed invocation; returns the open period if this failure
    /// opened the breaker.
    pub fn failure(&mut self, now: Instant) -> Option<Duration> {
        self.consecutive = self.consecutive.saturating_add(1);
        let open = match self.state {
            BreakerState::HalfOpen => {
                self.backoff = (self.backoff * 2).min(self.spec.max_backoff);
                true
            }
            _ => self.spec.failures > 0 && self.consecutive >= self.spec.failures,
        };
        if !open || self.state == BreakerState::Open {
            return None;
        }
        self.state = BreakerState::Open;
        self.open_until = Some(now + self.backoff);
        Some(self.backoff)
    }

    /// A new version was switched in: give it a clean start.
    pub fn reset(&mut self) {
        self.success();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BreakerSpec {
        BreakerSpec {
            failures: 3,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(250),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_backs_off() {
        let t0 = Instant::now();
        let mut b = Breaker::new(spec());
        assert_eq!(b.failure(t0), None);
        b.success(); // a success in between resets the count
        assert_eq!(b.failure(t0), None);
        assert_eq!(b.failure(t0), None);
        assert_eq!(b.failure(t0), Some(Duration::from_millis(100)));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.admit(t0 + Duration::from_millis(40)),
            Admit::Reject(Duration::from_millis(60))
        );
        // After the back-off: one probe; it fails, the back-off doubles.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(b.admit(t1), Admit::Probe);
        assert_eq!(b.failure(t1), Some(Duration::from_millis(200)));
        let t2 = t1 + Duration::from_millis(200);
        assert_eq!(b.admit(t2), Admit::Probe);
        // Capped at the maximum.
        assert_eq!(b.failure(t2), Some(Duration::from_millis(250)));
        let t3 = t2 + Duration::from_millis(250);
        assert_eq!(b.admit(t3), Admit::Probe);
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(t3), Admit::Run);
        // The back-off starts over.
        for _ in 0..2 {
            assert_eq!(b.failure(t3), None);
        }
        assert_eq!(b.failure(t3), Some(Duration::from_millis(100)));
    }

    #[test]
    fn zero_failures_never_opens() {
        let mut b = Breaker::new(BreakerSpec {
            failures: 0,
            ..spec()
        });
        for _ in 0..100 {
            assert_eq!(b.failure(Instant::now()), None);
        }
        assert_eq!(b.admit(Instant::now()), Admit::Run);
    }
}
