//! Routing: each event goes to every function whose trigger filters match its
//! topic, through that function's bounded queue.
//!
//! A full queue applies the function's policy: the source waits
//! (back-pressure, the default) or the oldest queued event is dropped and
//! counted. Events for one function are handled in arrival order; different
//! functions run in parallel.
//!
//! The routing table changes at run time (functions added, removed or given
//! new triggers, see [`crate::runtime::reload`]): it is an immutable snapshot
//! swapped whole. A dispatch takes the current snapshot under a short lock
//! and never holds the lock across an `.await`; a route that is swapped out
//! keeps its queue open until the last dispatch using it has finished, so
//! nothing already matched is lost.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

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
    /// Its queue (shared by the routes of one function when only its
    /// triggers change).
    pub queue: Arc<QueueSender>,
}

impl Route {
    /// A route for `function` on `triggers` into `queue`.
    pub fn new(function: String, triggers: FilterSet, queue: QueueSender) -> Self {
        Self {
            function,
            triggers,
            queue: Arc::new(queue),
        }
    }
}

/// A snapshot of the routing table.
pub type Routes = Arc<Vec<Arc<Route>>>;

/// The routing table. Dropping it closes every function's queue, which lets
/// the workers drain and stop.
#[derive(Debug)]
pub struct Router {
    routes: RwLock<Routes>,
    /// The subscriptions covering the current routes, for the MQTT source.
    subscriptions: watch::Sender<Vec<String>>,
    metrics: Arc<GatewayMetrics>,
}

impl Router {
    /// A router over `routes`.
    pub fn new(routes: Vec<Route>, metrics: Arc<GatewayMetrics>) -> Self {
        let routes: Vec<Arc<Route>> = routes.into_iter().map(Arc::new).collect();
        let (subscriptions, _) = watch::channel(subscriptions_of(&routes));
        Self {
            routes: RwLock::new(Arc::new(routes)),
            subscriptions,
            metrics,
        }
    }

    /// The current routing table.
    pub fn routes(&self) -> Routes {
        // Nothing panics while holding the lock; a poisoned one still holds
        // a consistent snapshot.
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in a new routing table. Routes no longer in it close their
    /// queue once the dispatches still using them have finished; the
    /// subscriptions' watchers learn the new set if it differs.
    pub fn replace(&self, routes: Vec<Arc<Route>>) {
        let subs = subscriptions_of(&routes);
        let old = std::mem::replace(
            &mut *self.routes.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(routes),
        );
        drop(old);
        self.subscriptions.send_if_modified(|current| {
            let changed = *current != subs;
            *current = subs;
            changed
        });
    }

    /// Queues `event` for every matching function, waiting while a queue is
    /// full. Returns how many functions it was queued for.
    pub async fn dispatch(&self, event: Event) -> usize {
        let event = Arc::new(event);
        let routes = self.routes();
        let mut matched = 0;
        for route in routes.iter() {
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
        self.subscriptions.borrow().clone()
    }

    /// Watches [`Router::subscriptions`]: changes whenever the routing
    /// table's subscriptions do; closed when the router is dropped.
    pub fn watch_subscriptions(&self) -> watch::Receiver<Vec<String>> {
        self.subscriptions.subscribe()
    }
}

fn subscriptions_of(routes: &[Arc<Route>]) -> Vec<String> {
    let all: Vec<TopicFilter> = routes
        .iter()
        .flat_map(|r| r.triggers.filters().iter().cloned())
        .collect();
    crate::topic::disjoint_subscriptions(&all)
        .into_iter()
        .map(|f| f.as_str().to_owned())
        .collect()
}
