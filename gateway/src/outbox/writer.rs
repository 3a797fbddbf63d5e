//! The outbox's writer thread: owns the write connection, groups appends
//! and confirmations into one transaction per commit window, applies the
//! per-sink limits and the TTL, and keeps everything of a failed commit for
//! the next attempt (see the module docs of [`super`]).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, watch};

use super::*;

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) path: PathBuf,
    pub(super) limits: Vec<SinkLimits>,
    pub(super) sink_index: HashMap<String, usize>,
    pub(super) stats: Vec<Arc<SinkStats>>,
    pub(super) totals: Arc<OutboxStats>,
    pub(super) committed: Vec<watch::Sender<u64>>,
    pub(super) min_interval: Duration,
    pub(super) warned: Vec<bool>,
    pub(super) health: health::Health,
}

type Confirms = Vec<(usize, Vec<u64>)>;
type Flushes = Vec<tokio::sync::oneshot::Sender<()>>;

/// How often the TTL is enforced.
const TTL_SWEEP: Duration = Duration::from_secs(1);

impl Writer {
    pub(super) fn run(
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
        // Change of each sink's high-lane rows.
        let mut high: Vec<i64> = vec![0; self.limits.len()];
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
                    "DELETE FROM records WHERE seq = ?1 AND sink = ?2 RETURNING LENGTH(payload), lane",
                )
                .map_err(&err)?;
            for (sink, seqs) in confirms {
                for seq in seqs {
                    let gone: Option<(i64, i64)> = del
                        .query_row(params![*seq as i64, self.limits[*sink].sink], |r| {
                            Ok((r.get(0)?, r.get(1)?))
                        })
                        .optional()
                        .map_err(&err)?;
                    if let Some((len, lane)) = gone {
                        high[*sink] -= i64::from(Lane::from_db(lane) == Lane::High);
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
                let (n, bytes, n_high): (i64, i64, i64) = tx
                    .query_row(
                        "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0), COALESCE(SUM(lane = 0), 0) FROM records WHERE sink = ?1 AND ts_ms < ?2",
                        params![l.sink, cutoff as i64],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
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
                    high[i] -= n_high;
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
                    "INSERT INTO records (sink, function, topic, payload, ts_ms, lane) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
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
                                // The oldest normal row; a high one only
                                // when no normal row is left (see `lane`).
                                let gone: Option<(i64, i64)> = tx
                                    .query_row(
                                        "DELETE FROM records WHERE seq = (SELECT seq FROM records WHERE sink = ?1 AND lane = (SELECT MAX(lane) FROM records WHERE sink = ?1) ORDER BY seq LIMIT 1) RETURNING LENGTH(payload), lane",
                                        params![l.sink],
                                        |r| Ok((r.get(0)?, r.get(1)?)),
                                    )
                                    .optional()
                                    .map_err(&err)?;
                                let Some((len, lane)) = gone else { break };
                                high[i] -= i64::from(Lane::from_db(lane) == Lane::High);
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
                        r.ts_ms as i64,
                        r.lane.as_db()
                    ])
                    .map_err(&err)?;
                    high[i] += i64::from(r.lane == Lane::High);
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
            let new_high = (s.high_rows.load(Ordering::Relaxed) as i64 + high[i]).max(0) as u64;
            s.high_rows.store(new_high, Ordering::Relaxed);
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
