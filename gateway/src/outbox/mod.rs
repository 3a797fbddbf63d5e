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
//! - **Two lanes**: forwards of `priority = "high"` functions go to the
//!   high lane and are read before normal ones; see [`lane`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, watch};

use crate::event::now_ms;

mod health;
pub mod lane;
mod writer;

pub use lane::{Cursor, Lane};

use writer::Writer;

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
    /// The lane it waits in (the forwarding function's priority).
    pub lane: Lane,
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
    /// The lane it waits in.
    pub lane: Lane,
}

/// Something whose drop acknowledges an input (the event's guard). Held by
/// the writer until the commit that makes the append durable.
pub type AckHold = Box<dyn Send + Sync + 'static>;

/// Per-sink counters.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Rows stored now.
    pub rows: AtomicU64,
    /// Of `rows`, those in the high lane.
    pub high_rows: AtomicU64,
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
             ts_ms    INTEGER NOT NULL,
             lane     INTEGER NOT NULL DEFAULT 1
         );
         CREATE INDEX IF NOT EXISTS records_by_sink ON records (sink, seq);",
    )
    .map_err(sql_err(path))?;
    lane::migrate(&conn).map_err(sql_err(path))?;
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
            let (rows, bytes, high): (u64, u64, u64) = conn
                .query_row(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), COALESCE(SUM(lane = 0), 0) FROM records WHERE sink = ?1",
                    params![limits.sink],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)? as u64,
                            r.get::<_, i64>(1)? as u64,
                            r.get::<_, i64>(2)? as u64,
                        ))
                    },
                )
                .map_err(sql_err(&path))?;
            s.rows.store(rows, Ordering::Relaxed);
            s.bytes.store(bytes, Ordering::Relaxed);
            s.high_rows.store(high, Ordering::Relaxed);
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
    /// Up to `limit` records of `sink` past `cursor`, of one lane: the
    /// high lane's if it has any past the cursor, else the normal lane's;
    /// oldest first within the lane.
    pub fn next_batch(
        &self,
        sink: &str,
        cursor: &Cursor,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, OutboxError> {
        for lane in Lane::ALL {
            let rows = self.lane_batch(sink, lane, cursor.after(lane), limit)?;
            if !rows.is_empty() {
                return Ok(rows);
            }
        }
        Ok(Vec::new())
    }

    /// Up to `limit` records of `sink` in `lane` with `seq > after`, oldest
    /// first.
    fn lane_batch(
        &self,
        sink: &str,
        lane: Lane,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, OutboxError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, function, topic, payload, ts_ms FROM records
                 WHERE sink = ?1 AND lane = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
            )
            .map_err(sql_err(&self.path))?;
        let rows = stmt
            .query_map(
                params![sink, lane.as_db(), after as i64, limit as i64],
                |r| {
                    Ok(StoredRecord {
                        seq: r.get::<_, i64>(0)? as u64,
                        function: r.get(1)?,
                        topic: r.get(2)?,
                        payload: Bytes::from(r.get::<_, Vec<u8>>(3)?),
                        ts_ms: r.get::<_, i64>(4)? as u64,
                        lane,
                    })
                },
            )
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

#[cfg(test)]
mod tests;
