//! Routing: each event goes to every function whose trigger filters match its
//! topic, through that function's bounded queue.
//!
//! A full queue applies the function's policy: the source waits
//! (back-pressure, the default) or the oldest queued event is dropped and
//! counted. Events for one function are handled in arrival order; different
//! functions run in parallel.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::event::Event;
use crate::metrics::GatewayMetrics;
use crate::runtime::queue::{Pushed, QueueSender};
use crate::topic::{FilterSet, TopicFilter};

/// One function's entry in the routing table.
#[derive(Debug)]
pub struct Route {
    /// The function's name.
    pub function: String,
    /// Its trigger filters.
    pub triggers: FilterSet,
    /// Its queue.
    pub queue: QueueSender,
}

/// The routing table. Dropping it closes every function's queue, which lets
/// the workers drain and stop.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    metrics: Arc<GatewayMetrics>,
}

impl Router {
    /// A router over `routes`.
    pub fn new(routes: Vec<Route>, metrics: Arc<GatewayMetrics>) -> Self {
        Self { routes, metrics }
    }

    /// Queues `event` for every matching function, waiting while a queue is
    /// full. Returns how many functions it was queued for.
    pub async fn dispatch(&self, event: Event) -> usize {
        let event = Arc::new(event);
        let mut matched = 0;
        for route in &self.routes {
            if route.triggers.matches(&event.topic) {
                matched += 1;
                match route.queue.push(event.clone()).await {
                    Pushed::Queued => {}
                    Pushed::DroppedOldest => {
                        tracing::debug!(function = %route.function, "Queue full: dropped the oldest event.");
                    }
                    Pushed::Closed => {
                        tracing::warn!(function = %route.function, topic = %event.topic, "Function worker has stopped; event not queued.");
                    }
                }
            }
        }
        if matched == 0 {
            self.metrics.unmatched.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(topic = %event.topic, "No function matches the topic.");
        }
        matched
    }

    /// The subscriptions that cover every function's triggers, with no two
    /// matching the same topic (see [`crate::topic::disjoint_subscriptions`]).
    pub fn subscriptions(&self) -> Vec<String> {
        let all: Vec<TopicFilter> = self
            .routes
            .iter()
            .flat_map(|r| r.triggers.filters().iter().cloned())
            .collect();
        crate::topic::disjoint_subscriptions(&all)
            .into_iter()
            .map(|f| f.as_str().to_owned())
            .collect()
    }
}
