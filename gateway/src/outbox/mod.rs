//! The durable outbox: every forwarded record is a row in SQLite before the
//! event that produced it is acknowledged anywhere, and stays there until its
//! sink confirms delivery.
//!
//! # Design
//! - **One file** `outbox.sqlite` in the data dir, WAL mode,
//!   `synchronous = FULL`: a commit returns only after the WAL is on stable
//!   storage, so an acknowledged event survives `kill -9` *and* power loss.
//!   FULL costs one fsync per commit, which is why commits are grouped.
//! - **Group commit**: one writer thread owns the write connection. It takes
//!   every append and confirmation that arrives within a commit window and
//!   writes them in one transaction, at most `max_commits_per_sec` times a
//!   second (default 20: an SD card sees at most 20 fsyncs per second,
//!   whatever the event rate).
//! - **Acknowledgement rides on ownership**: an append carries an [`AckHold`]
//!   (the event's acknowledgement guard); the writer drops it only after the
//!   commit, so the input is acknowledged only once its forwards are durable.
//! - **Sequence numbers** come from `AUTOINCREMENT`: increasing, never
//!   reused, even after deletes or restarts. `<gateway id>-<seq>` is the
//!   record's idempotency key in the cloud.
//! - **Limits per sink**: rows, bytes and age (TTL). When full, the sink's
//!   policy applies: `drop_oldest` deletes the oldest rows (counted), or
//!   `refuse` holds the append back until deliveries free space — the writer
//!   stops taking appends, the bounded append queue fills, workers wait, and
//!   the sources stop acknowledging (back-pressure all the way to the
//!   devices). A warning is logged when a sink's outbox passes 80 %.
//! - **Readers** (the delivery tasks) use their own connections: WAL lets
//!   them read while the writer writes.
//! - **A failed commit loses nothing** (disk full, I/O error): the
//!   transaction is rolled back, its appends keep their holds and its
//!   confirmations are kept, and both are retried with a back-off (50 ms
//!   doubling to 5 s). Until a commit succeeds the writer takes no new
//!   appends (back-pressure as under `refuse`); confirmations are retried
//!   on their own too, since deletes may fit where inserts do not. See
//!   [`health`].

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, watch};

use crate::event::now_ms;

mod health;

/// What to do when a sink's outbox is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Delete the oldest rows to make room (each counted as dropped).
    DropOldest,
    /// Hold new records back until deliveries make room (back-pressure to
    /// the sources; nothing is dropped).
    Refuse,
}

/// Limits of one sink's part of the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkLimits {
    /// Sink name.
    pub sink: String,
    /// Rows at most.
    pub max_rows: u64,
    /// Payload bytes at most.
    pub max_bytes: u64,
    /// Rows older than this are deleted (counted as expired).
    pub ttl: Duration,
    /// What to do when full.
    pub policy: FullPolicy,
}

/// Outbox settings.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// The SQLite file.
    pub path: PathBuf,
    /// Ceiling on commits (and so fsyncs) per second.
    pub max_commits_per_sec: u32,
    /// Per-sink limits.
    pub sinks: Vec<SinkLimits>,
}

/// Why the outbox failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// SQLite refused.
    #[error("outbox `{path}`: {reason}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        reason: String,
    },
    /// The writer thread is gone (shutting down or failed).
    #[error("the outbox writer has stopped")]
    Stopped,
}

/// A record to store.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Destination sink.
    pub sink: String,
    /// The function that forwarded it.
    pub function: String,
    /// The topic of the event the function handled.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// Forward time, ms since the Unix epoch.
    pub ts_ms: u64,
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Sequence number (unique per gateway, increasing).
    pub seq: u64,
    /// The function that forwarded it.
    pub function: String,
    /// The topic of the event the function handled.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
    /// Forward time, ms since the Unix epoch.
    pub ts_ms: u64,
}

/// Something whose drop acknowledges an input (the event's guard). Held by
/// the writer until the commit that makes the append durable.
pub type AckHold = Box<dyn Send + Sync + 'static>;

/// Per-sink counters.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Rows stored now.
    pub rows: AtomicU64,
    /// Payload bytes stored now.
    pub bytes: AtomicU64,
    /// Rows appended since start.
    pub appended: AtomicU64,
    /// Rows deleted after delivery since start.
    pub delivered: AtomicU64,
    /// Rows dropped by the `drop_oldest` policy since start.
    pub dropped_full: AtomicU64,
    /// Rows deleted by the TTL since start.
    pub expired: AtomicU64,
    /// Appends held back by the `refuse` policy since start.
    pub refused: AtomicU64,
}

/// Gateway-wide outbox counters.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Transactions committed (each one fsync of the WAL).
    pub commits: AtomicU64,
    /// Rows written.
    pub rows_committed: AtomicU64,
    /// Transactions that failed and were rolled back (their work is kept
    /// and retried).
    pub commit_failures: AtomicU64,
    /// While commits are failing: SQLite's reason (e.g. `database or disk
    /// is full`); `None` while they succeed.
    pub failure: std::sync::Mutex<Option<String>>,
}

impl OutboxStats {
    /// Why commits are failing, while they are.
    pub fn failing(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

enum Control {
    Confirm {
        sink: usize,
        seqs: Vec<u64>,
    },
    /// Answered after the next commit (which includes every confirmation
    /// and every committable append sent before it).
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Test knob: SQLite's `max_page_count` for the writer's connection.
    MaxPages(u64),
}

struct Append {
    records: Vec<NewRecord>,
    /// Dropped after the commit: acknowledges the input.
    _hold: Option<AckHold>,
}

/// The outbox handle: cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    appends: mpsc::Sender<Append>,
    control: mpsc::UnboundedSender<Control>,
    sinks: HashMap<String, usize>,
    committed: Vec<watch::Receiver<u64>>,
    stats: Vec<Arc<SinkStats>>,
    totals: Arc<OutboxStats>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// Appends waiting for the writer; when full, workers wait.
const APPEND_QUEUE: usize = 4096;

fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> OutboxError + '_ {
    move |e| OutboxError::Sqlite {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Opens (or creates) the database with the outbox's settings.
fn open_connection(path: &Path) -> Result<Connection, OutboxError> {
    let conn = Connection::open(path).map_err(sql_err(path))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(sql_err(path))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         CREATE TABLE IF NOT EXISTS records (
             seq      INTEGER PRIMARY KEY AUTOINCREMENT,
             sink     TEXT    NOT NULL,
             function TEXT    NOT NULL,
             topic    TEXT    NOT NULL,
             payload  BLOB    NOT NULL,
             ts_ms    INTEGER NOT NULL
         );
         CREATE INDEX IF NOT EXISTS records_by_sink ON records (sink, seq);",
    )
    .map_err(sql_err(path))?;
    Ok(conn)
}

impl Outbox {
    /// Opens the outbox and starts its writer thread. Rows of sinks that are
    /// no longer configured are kept (and reported), not deleted.
    pub fn open(config: OutboxConfig) -> Result<Self, OutboxError> {
        let path = config.path.clone();
        let conn = open_connection(&path)?;
        let mut sinks = HashMap::new();
        let mut stats = Vec::new();
        let mut committed_tx = Vec::new();
        let mut committed = Vec::new();
        for (i, limits) in config.sinks.iter().enumerate() {
            sinks.insert(limits.sink.clone(), i);
            let s = Arc::new(SinkStats::default());
            let (rows, bytes): (u64, u64) = conn
                .query_row(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records WHERE sink = ?1",
                    params![limits.sink],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
                )
                .map_err(sql_err(&path))?;
            s.rows.store(rows, Ordering::Relaxed);
            s.bytes.store(bytes, Ordering::Relaxed);
            if rows > 0 {
                tracing::info!(sink = %limits.sink, rows, bytes, "Outbox holds records from before the restart; they will be delivered.");
            }
            stats.push(s);
            let max_seq: u64 = conn
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map_err(sql_err(&path))? as u64;
            let (tx, rx) = watch::channel(max_seq);
            committed_tx.push(tx);
            committed.push(rx);
        }
        warn_about_orphans(&conn, &path, &config.sinks)?;
        let totals = Arc::new(OutboxStats::default());
        let (appends_tx, appends_rx) = mpsc::channel(APPEND_QUEUE);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let writer = Writer {
            conn,
            path: path.clone(),
            limits: config.sinks.clone(),
            sink_index: sinks.clone(),
            stats: stats.clone(),
            totals: totals.clone(),
            committed: committed_tx,
            min_interval: Duration::from_secs(1) / config.max_commits_per_sec.max(1),
            warned: vec![false; config.sinks.len()],
            health: health::Health::new(totals.clone()),
        };
        std::thread::Builder::new()
            .name("edgefn-outbox".into())
            .spawn(move || writer.run(appends_rx, control_rx))
            .map_err(|e| OutboxError::Sqlite {
                path: path.clone(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                appends: appends_tx,
                control: control_tx,
                sinks,
                committed,
                stats,
                totals,
            }),
        })
    }

    /// Queues `records` for the next group commit. `hold` is dropped only
    /// after that commit (or if the outbox stops). Waits while the append
    /// queue is full.
    pub async fn append(
        &self,
        records: Vec<NewRecord>,
        hold: Option<AckHold>,
    ) -> Result<(), OutboxError> {
        self.inner
            .appends
            .send(Append {
                records,
                _hold: hold,
            })
            .await
            .map_err(|_| OutboxError::Stopped)
    }

    /// Records that `sink` delivered `seqs`; their rows are deleted in the
    /// next commit.
    pub fn confirm(&self, sink: &str, seqs: Vec<u64>) {
        if let Some(&i) = self.inner.sinks.get(sink) {
            let _ = self.inner.control.send(Control::Confirm { sink: i, seqs });
        }
    }

    /// Waits until everything sent to the outbox before this call (appends
    /// that fit, and confirmations) is committed. Never waits on a full
    /// outbox's held-back appends, nor on appends held back while commits
    /// fail; waits while even confirmations cannot be committed.
    pub async fn flush(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.inner.control.send(Control::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// A receiver that changes after each commit that added rows (any sink);
    /// delivery tasks wait on it for new work.
    pub fn committed(&self, sink: &str) -> Option<watch::Receiver<u64>> {
        self.inner
            .sinks
            .get(sink)
            .map(|&i| self.inner.committed[i].clone())
    }

    /// A sink's counters.
    pub fn sink_stats(&self, sink: &str) -> Option<Arc<SinkStats>> {
        self.inner
            .sinks
            .get(sink)
            .map(|&i| self.inner.stats[i].clone())
    }

    /// Commit counters.
    pub fn stats(&self) -> &Arc<OutboxStats> {
        &self.inner.totals
    }

    /// A read connection for a delivery task.
    pub fn reader(&self) -> Result<Reader, OutboxError> {
        let path = &self.inner.path;
        let conn = Connection::open(path).map_err(sql_err(path))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(sql_err(path))?;
        Ok(Reader {
            conn,
            path: path.clone(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Test knob: caps the database at `pages` pages (SQLite's
    /// `max_page_count`, never below its current size), so that commits
    /// fail with `database or disk is full` where a full filesystem cannot
    /// be arranged. Not part of the configuration.
    #[doc(hidden)]
    pub fn limit_pages(&self, pages: u64) {
        let _ = self.inner.control.send(Control::MaxPages(pages));
    }
}

/// Rows of sinks no longer in the configuration are kept, and said so.
fn warn_about_orphans(
    conn: &Connection,
    path: &Path,
    sinks: &[SinkLimits],
) -> Result<(), OutboxError> {
    let mut stmt = conn
        .prepare("SELECT sink, COUNT(*) FROM records GROUP BY sink")
        .map_err(sql_err(path))?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(sql_err(path))?;
    for row in rows {
        let (sink, count) = row.map_err(sql_err(path))?;
        if !sinks.iter().any(|s| s.sink == sink) {
            tracing::warn!(sink = %sink, rows = count, "Outbox holds records for a sink that is no longer configured; they are kept.");
        }
    }
    Ok(())
}

/// A read connection (one per delivery task).
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

impl Reader {
    /// Up to `limit` records of `sink` with `seq > after`, oldest first.
    pub fn next_batch(
        &self,
        sink: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, function, topic, payload, ts_ms FROM records
                 WHERE sink = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(sql_err(&self.path))?;
        let rows = stmt
            .query_map(params![sink, after as i64, limit as i64], |r| {
                Ok(StoredRecord {
                    seq: r.get::<_, i64>(0)? as u64,
                    function: r.get(1)?,
                    topic: r.get(2)?,
                    payload: Bytes::from(r.get::<_, Vec<u8>>(3)?),
                    ts_ms: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(sql_err(&self.path))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql_err(&self.path))
    }

    /// The oldest record's forward time for `sink`, if any.
    pub fn oldest_ts(&self, sink: &str) -> Result<Option<u64>, OutboxError> {
        self.conn
            .query_row(
                "SELECT ts_ms FROM records WHERE sink = ?1 ORDER BY seq LIMIT 1",
                params![sink],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|o| o.map(|v| v as u64))
            .map_err(sql_err(&self.path))
    }
}

struct Writer {
    conn: Connection,
    path: PathBuf,
    limits: Vec<SinkLimits>,
    sink_index: HashMap<String, usize>,
    stats: Vec<Arc<SinkStats>>,
    totals: Arc<OutboxStats>,
    committed: Vec<watch::Sender<u64>>,
    min_interval: Duration,
    warned: Vec<bool>,
    health: health::Health,
}

type Confirms = Vec<(usize, Vec<u64>)>;
type Flushes = Vec<tokio::sync::oneshot::Sender<()>>;

/// How often the TTL is enforced.
const TTL_SWEEP: Duration = Duration::from_secs(1);

impl Writer {
    fn run(
        mut self,
        mut appends: mpsc::Receiver<Append>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "Outbox writer could not start.");
                return;
            }
        };
        rt.block_on(async move {
            let mut last_commit = Instant::now() - self.min_interval;
            let mut last_sweep = Instant::now();
            // Appends that wait for room under the `refuse` policy, or for
            // a commit to succeed again.
            let mut waiting: VecDeque<Append> = VecDeque::new();
            // Confirmations and flushes of a failed commit wait here too.
            let mut confirms: Confirms = Vec::new();
            let mut flushes: Flushes = Vec::new();
            let mut appends_open = true;
            let mut control_open = true;
            loop {
                let mut batch: Vec<Append> = Vec::new();
                // While commits fail, no new appends are taken (back-pressure)
                // and the next attempt waits for the back-off.
                let retry_at = self.health.retry_at();
                let taking = |open: bool, waiting: &VecDeque<Append>| {
                    open && waiting.is_empty() && retry_at.is_none()
                };
                if retry_at.is_none() {
                    // Wait for the first piece of work (or the TTL sweep).
                    let sweep_due = tokio::time::sleep_until((last_sweep + TTL_SWEEP).into());
                    tokio::select! {
                        biased;
                        c = control.recv(), if control_open => match c {
                            Some(c) => self.take(c, &mut confirms, &mut flushes),
                            None if !appends_open => break,
                            None => control_open = false,
                        },
                        a = appends.recv(), if taking(appends_open, &waiting) => match a {
                            Some(a) => batch.push(a),
                            None => appends_open = false,
                        },
                        () = sweep_due => {}
                    }
                }
                if !appends_open
                    && waiting.is_empty()
                    && batch.is_empty()
                    && confirms.is_empty()
                    && flushes.is_empty()
                {
                    while let Ok(c) = control.try_recv() {
                        self.take(c, &mut confirms, &mut flushes);
                    }
                    if confirms.is_empty() && flushes.is_empty() {
                        break;
                    }
                }
                // Gather everything else that arrives within the window (or
                // the back-off).
                let deadline =
                    (last_commit + self.min_interval).max(retry_at.unwrap_or(last_commit));
                loop {
                    while let Ok(c) = control.try_recv() {
                        self.take(c, &mut confirms, &mut flushes);
                    }
                    if taking(appends_open, &waiting) {
                        while batch.len() < 10_000 {
                            match appends.try_recv() {
                                Ok(a) => batch.push(a),
                                Err(mpsc::error::TryRecvError::Empty) => break,
                                Err(mpsc::error::TryRecvError::Disconnected) => {
                                    appends_open = false;
                                    break;
                                }
                            }
                        }
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    tokio::select! {
                        () = tokio::time::sleep_until(deadline.into()) => break,
                        c = control.recv(), if control_open => match c {
                            Some(c) => self.take(c, &mut confirms, &mut flushes),
                            None => control_open = false,
                        },
                        a = appends.recv(), if taking(appends_open, &waiting) => match a {
                            Some(a) => batch.push(a),
                            None => appends_open = false,
                        },
                    }
                }
                // Appends held back earlier come first, in order.
                let mut pending: VecDeque<Append> = std::mem::take(&mut waiting);
                pending.extend(batch);
                let sweep = last_sweep.elapsed() >= TTL_SWEEP;
                if sweep {
                    last_sweep = Instant::now();
                }
                self.attempt(&mut pending, &mut confirms, &mut flushes, sweep);
                last_commit = Instant::now();
                waiting = pending;
            }
            tracing::debug!("Outbox writer stopped.");
        });
    }

    fn take(&self, c: Control, confirms: &mut Confirms, flushes: &mut Flushes) {
        match c {
            Control::Confirm { sink, seqs } => confirms.push((sink, seqs)),
            Control::Flush(tx) => flushes.push(tx),
            Control::MaxPages(pages) => {
                let set =
                    self.conn
                        .query_row(&format!("PRAGMA max_page_count = {pages}"), [], |r| {
                            r.get::<_, i64>(0)
                        });
                tracing::debug!(pages, result = ?set, "Outbox page limit set (test knob).");
            }
        }
    }

    /// Commits `pending` and `confirms`. On success the confirmations are
    /// done and the flushes answered. On failure everything is kept for the
    /// retry; the confirmations are then tried on their own (deletes may
    /// fit where inserts do not, and deliveries wait on them), and the
    /// flushes are answered once no confirmation is left.
    fn attempt(
        &mut self,
        pending: &mut VecDeque<Append>,
        confirms: &mut Confirms,
        flushes: &mut Flushes,
        sweep: bool,
    ) {
        let had_appends = !pending.is_empty();
        match self.commit(pending, confirms, sweep) {
            Ok(()) => self.health.succeeded(),
            Err(e) => {
                self.health.failed(&e, pending.len());
                // Flushes do not wait on held appends, only on confirmations.
                let confirmed = confirms.is_empty()
                    || (had_appends && self.commit(&mut VecDeque::new(), confirms, false).is_ok());
                if !confirmed {
                    return;
                }
            }
        }
        confirms.clear();
        for f in flushes.drain(..) {
            let _ = f.send(());
        }
    }

    /// One transaction (see [`Writer::transaction`]). If it fails, it is
    /// rolled back and the appends it took go back to the front of
    /// `pending`, in order, with their holds: nothing is acknowledged.
    fn commit(
        &mut self,
        pending: &mut VecDeque<Append>,
        confirms: &[(usize, Vec<u64>)],
        sweep: bool,
    ) -> Result<(), OutboxError> {
        let mut taken: Vec<Append> = Vec::new();
        let result = self.transaction(pending, &mut taken, confirms, sweep);
        if result.is_err() {
            while let Some(a) = taken.pop() {
                pending.push_front(a);
            }
        }
        // Durable now (or back in `pending`): release the inputs'
        // acknowledgements.
        drop(taken);
        result
    }

    /// One transaction: confirmations, TTL, then as many appends as limits
    /// allow (the rest stay in `pending`). The appends it wrote are moved to
    /// `taken`; the caller drops them (releasing their holds) only if this
    /// returns `Ok`.
    fn transaction(
        &mut self,
        pending: &mut VecDeque<Append>,
        taken: &mut Vec<Append>,
        confirms: &[(usize, Vec<u64>)],
        sweep: bool,
    ) -> Result<(), OutboxError> {
        let path = self.path.clone();
        let err = sql_err(&path);
        let tx = self.conn.transaction().map_err(&err)?;
        let mut deltas: Vec<(i64, i64)> = vec![(0, 0); self.limits.len()];
        let mut delivered = vec![0u64; self.limits.len()];
        let mut expired = vec![0u64; self.limits.len()];
        let mut dropped = vec![0u64; self.limits.len()];
        // Counters are published after the commit, all together, so a
        // reader never sees one change without the others.
        let mut refused = vec![0u64; self.limits.len()];
        let mut appended = vec![0u64; self.limits.len()];
        {
            let mut del = tx
                .prepare_cached(
                    "DELETE FROM records WHERE seq = ?1 AND sink = ?2 RETURNING LENGTH(payload)",
                )
                .map_err(&err)?;
            for (sink, seqs) in confirms {
                for seq in seqs {
                    let len: Option<i64> = del
                        .query_row(params![*seq as i64, self.limits[*sink].sink], |r| r.get(0))
                        .optional()
                        .map_err(&err)?;
                    if let Some(len) = len {
                        deltas[*sink].0 -= 1;
                        deltas[*sink].1 -= len;
                        delivered[*sink] += 1;
                    }
                }
            }
        }
        if sweep {
            let now = now_ms();
            for (i, l) in self.limits.iter().enumerate() {
                let cutoff =
                    now.saturating_sub(u64::try_from(l.ttl.as_millis()).unwrap_or(u64::MAX));
                let (n, bytes): (i64, i64) = tx
                    .query_row(
                        "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records WHERE sink = ?1 AND ts_ms < ?2",
                        params![l.sink, cutoff as i64],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(&err)?;
                if n > 0 {
                    tx.execute(
                        "DELETE FROM records WHERE sink = ?1 AND ts_ms < ?2",
                        params![l.sink, cutoff as i64],
                    )
                    .map_err(&err)?;
                    deltas[i].0 -= n;
                    deltas[i].1 -= bytes;
                    expired[i] += n as u64;
                    tracing::warn!(sink = %l.sink, rows = n, ttl_s = l.ttl.as_secs(), "Outbox records expired undelivered (TTL).");
                }
            }
        }
        let mut added = false;
        let mut inserted = 0u64;
        let mut max_seq = 0u64;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO records (sink, function, topic, payload, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(&err)?;
            'appends: while let Some(append) = pending.pop_front() {
                // In `taken` from here on: if anything below fails, the
                // caller puts it back into `pending`, hold and all.
                taken.push(append);
                let Some(append) = taken.last() else { break };
                let mut refuse = false;
                // Check room for the whole append first (it is all or nothing).
                'room: for r in &append.records {
                    let Some(&i) = self.sink_index.get(&r.sink) else {
                        continue;
                    };
                    let l = &self.limits[i];
                    let rows = self.stats[i].rows.load(Ordering::Relaxed) as i64 + deltas[i].0;
                    let bytes = self.stats[i].bytes.load(Ordering::Relaxed) as i64 + deltas[i].1;
                    let need = r.payload.len() as i64;
                    if rows < l.max_rows as i64 && bytes + need <= l.max_bytes as i64 {
                        continue;
                    }
                    match l.policy {
                        FullPolicy::Refuse => {
                            refused[i] += 1;
                            tracing::warn!(sink = %l.sink, rows, bytes, "Outbox full: holding new records back until deliveries make room.");
                            refuse = true;
                            break 'room;
                        }
                        FullPolicy::DropOldest => {
                            let mut rows = rows;
                            let mut bytes = bytes;
                            while rows > 0
                                && (rows >= l.max_rows as i64 || bytes + need > l.max_bytes as i64)
                            {
                                let gone: Option<i64> = tx
                                    .query_row(
                                        "DELETE FROM records WHERE seq = (SELECT seq FROM records WHERE sink = ?1 ORDER BY seq LIMIT 1) RETURNING LENGTH(payload)",
                                        params![l.sink],
                                        |r| r.get(0),
                                    )
                                    .optional()
                                    .map_err(&err)?;
                                let Some(len) = gone else { break };
                                rows -= 1;
                                bytes -= len;
                                deltas[i].0 -= 1;
                                deltas[i].1 -= len;
                                dropped[i] += 1;
                            }
                        }
                    }
                }
                if refuse {
                    if let Some(append) = taken.pop() {
                        pending.push_front(append);
                    }
                    break 'appends;
                }
                for r in &append.records {
                    let Some(&i) = self.sink_index.get(&r.sink) else {
                        tracing::error!(sink = %r.sink, "Record for an unknown sink not stored.");
                        continue;
                    };
                    ins.execute(params![
                        r.sink,
                        r.function,
                        r.topic,
                        r.payload.as_ref(),
                        r.ts_ms as i64
                    ])
                    .map_err(&err)?;
                    max_seq = max_seq.max(tx.last_insert_rowid() as u64);
                    deltas[i].0 += 1;
                    deltas[i].1 += r.payload.len() as i64;
                    appended[i] += 1;
                    added = true;
                    inserted += 1;
                }
            }
        }
        tx.commit().map_err(&err)?;
        self.totals.commits.fetch_add(1, Ordering::Relaxed);
        for (i, (rows, bytes)) in deltas.iter().enumerate() {
            let s = &self.stats[i];
            let new_rows = (s.rows.load(Ordering::Relaxed) as i64 + rows).max(0) as u64;
            let new_bytes = (s.bytes.load(Ordering::Relaxed) as i64 + bytes).max(0) as u64;
            s.rows.store(new_rows, Ordering::Relaxed);
            s.bytes.store(new_bytes, Ordering::Relaxed);
            s.delivered.fetch_add(delivered[i], Ordering::Relaxed);
            s.expired.fetch_add(expired[i], Ordering::Relaxed);
            s.dropped_full.fetch_add(dropped[i], Ordering::Relaxed);
            s.refused.fetch_add(refused[i], Ordering::Relaxed);
            s.appended.fetch_add(appended[i], Ordering::Relaxed);
            if dropped[i] > 0 {
                tracing::warn!(sink = %self.limits[i].sink, rows = dropped[i], "Outbox full: oldest records dropped.");
            }
            let l = &self.limits[i];
            let high = new_rows * 5 >= l.max_rows * 4 || new_bytes * 5 >= l.max_bytes * 4;
            if high && !self.warned[i] {
                tracing::warn!(sink = %l.sink, rows = new_rows, bytes = new_bytes, max_rows = l.max_rows, max_bytes = l.max_bytes, "Outbox above 80% for this sink.");
            }
            self.warned[i] = high;
        }
        self.totals
            .rows_committed
            .fetch_add(inserted, Ordering::Relaxed);
        if added {
            for tx in &self.committed {
                tx.send_replace(max_seq);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
