//! The running function set and how a reload changes it: which functions
//! are added, removed, updated in place or given a new worker
//! ([`plan`]), and spawning workers ([`Workers`]) at start and at run time.
//!
//! A function is updated **in place** when its queue (size, policy) and
//! breaker stay: its route gets the new triggers (same queue) and its
//! worker the new version through the versions watch. Otherwise it gets a
//! **new worker** on a new queue: the route switches to the new queue, the
//! old queue closes once no dispatch uses it any more, and the new worker
//! starts only when the old one has drained it ([`Worker::after`]), so no
//! event is lost or reordered. Functions a reload does not touch keep their
//! queue, worker and route.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::FunctionSpec;
use crate::output::OutputPort;
use crate::progress::{Progress, WORKER_MARGIN};
use crate::runtime::LoadedFunction;
use crate::runtime::queue::QueueReceiver;
use crate::runtime::worker::Worker;

/// What the gateway needs to spawn a function's worker, at start and when a
/// reload adds a function or replaces a worker.
#[derive(Clone)]
pub struct Workers {
    /// The workers' tracker (the drain waits for it; closed by the drain).
    pub tracker: TaskTracker,
    /// Where outputs go.
    pub port: OutputPort,
    /// The watchdog.
    pub progress: Arc<Progress>,
    /// `runtime.rollback_after`.
    pub rollback_after: u32,
}

/// A spawned worker's handles.
pub struct Running {
    /// New versions go here.
    pub versions: watch::Sender<Arc<LoadedFunction>>,
    /// Cancelled once the worker has stopped.
    pub done: CancellationToken,
}

impl Workers {
    /// Spawns the worker of `spec` running `function` on `queue`; it starts
    /// handling once `after` (the worker it replaces) has stopped.
    pub fn spawn(
        &self,
        function: Arc<LoadedFunction>,
        spec: &FunctionSpec,
        queue: QueueReceiver,
        after: Option<CancellationToken>,
    ) -> Running {
        let (versions_tx, versions) = watch::channel(function);
        let done = CancellationToken::new();
        self.tracker.spawn(
            Worker {
                versions,
                queue,
                port: self.port.clone(),
                breaker: spec.breaker.clone(),
                rollback_after: self.rollback_after,
                beat: self.progress.watch(
                    "function",
                    &spec.name,
                    spec.limits.timeout + WORKER_MARGIN,
                ),
                after,
                done: done.clone(),
            }
            .run(),
        );
        Running {
            versions: versions_tx,
            done,
        }
    }
}

/// What a reload does to one function of the new configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing changed: same queue, worker and route.
    Untouched,
    /// New triggers and/or a new version, same queue and worker.
    InPlace {
        /// Whether a new version must be loaded (settings or file changed).
        load: bool,
        /// Whether the triggers changed.
        triggers: bool,
    },
    /// New queue size or policy, or new breaker: a new worker on a new
    /// queue, after the old one has drained.
    Replace {
        /// Whether a new version must be loaded.
        load: bool,
    },
    /// Not running yet.
    Add,
}

impl Change {
    /// Whether this change needs the function loaded.
    pub fn loads(self) -> bool {
        matches!(
            self,
            Change::Add | Change::InPlace { load: true, .. } | Change::Replace { load: true }
        )
    }
}

/// Whether `a` and `b` differ only in what the routing table and the
/// worker own (triggers, queue, breaker): then no new version is needed.
pub fn same_version_settings(a: &FunctionSpec, b: &FunctionSpec) -> bool {
    let mut b = b.clone();
    b.triggers = a.triggers.clone();
    b.limits.queue = a.limits.queue;
    b.limits.queue_policy = a.limits.queue_policy;
    b.breaker = a.breaker.clone();
    *a == b
}

/// What changes for `new`, running as `running` (`None`: not running)
/// whose file changed since it was loaded if `file_changed`.
pub fn plan(running: Option<&FunctionSpec>, new: &FunctionSpec, file_changed: bool) -> Change {
    let Some(old) = running else {
        return Change::Add;
    };
    let load = file_changed || !same_version_settings(old, new);
    let replace = old.limits.queue != new.limits.queue
        || old.limits.queue_policy != new.limits.queue_policy
        || old.breaker != new.breaker;
    let triggers = old.triggers != new.triggers;
    if replace {
        Change::Replace { load }
    } else if load || triggers {
        Change::InPlace { load, triggers }
    } else {
        Change::Untouched
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{FilterSet, TopicFilter};

    fn spec() -> FunctionSpec {
        let text = "[gateway]\nid = \"gw\"\ndata_dir = \"/tmp/d\"\n[broker]\nkind = \"embedded\"\nlisten = \"127.0.0.1:1883\"\n[[functions]]\nname = \"f\"\ncomponent = \"/tmp/f.wasm\"\ntriggers = [\"a/#\"]\n";
        crate::config::parse(std::path::Path::new("/tmp/edgefn.toml"), text, &|_| None)
            .unwrap_or_else(|e| panic!("{e}"))
            .functions
            .remove(0)
    }

    #[test]
    fn each_kind_of_change_is_told_apart() {
        let old = spec();
        assert_eq!(plan(None, &old, false), Change::Add);
        assert_eq!(plan(Some(&old), &old, false), Change::Untouched);
        assert_eq!(
            plan(Some(&old), &old, true),
            Change::InPlace {
                load: true,
                triggers: false
            }
        );
        let mut t = old.clone();
        t.triggers = FilterSet::new(vec![TopicFilter::parse("b/#").expect("filter")]);
        assert_eq!(
            plan(Some(&old), &t, false),
            Change::InPlace {
                load: false,
                triggers: true
            }
        );
        let mut q = old.clone();
        q.limits.queue += 1;
        assert_eq!(plan(Some(&old), &q, false), Change::Replace { load: false });
        let mut b = old.clone();
        b.breaker.failures += 1;
        b.config.insert("k".into(), "v".into());
        assert_eq!(plan(Some(&old), &b, false), Change::Replace { load: true });
    }
}
