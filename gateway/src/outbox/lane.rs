//! The alarm lane: every outbox row belongs to one of two lanes, `high`
//! (forwards of functions with `priority = "high"`) and `normal`. A sink
//! reads the high lane first: a waiting alarm goes out before any normal
//! record that is not already in flight.
//!
//! # Design
//! - A `lane` column (0 = high, 1 = normal, so `ORDER BY lane` puts alarms
//!   first) and an index on `(sink, lane, seq)`. Outbox files of the
//!   previous version get the column with `ALTER TABLE … DEFAULT 1`: their
//!   rows are normal.
//! - Sequence numbers stay global: the envelope `id` (`<gateway>-<seq>`)
//!   is unchanged, and within a lane `seq` order is append order (FIFO).
//! - A delivery task keeps one [`Cursor`] per connection: the last `seq`
//!   it has handed out in each lane. [`super::Reader::next_batch`] returns
//!   records of one lane only (the high one while it has any past its
//!   cursor), so a message or HTTP batch never mixes lanes and a single
//!   `seq > after` cannot skip a lane's records.
//! - A full outbox under `drop_oldest` drops the oldest *normal* row first;
//!   high rows go only when no normal row of the sink is left.

use rusqlite::Connection;

/// Which lane a record travels in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Delivered before any waiting normal record.
    High,
    /// Everything else (the default).
    #[default]
    Normal,
}

impl Lane {
    /// Both lanes, in delivery order.
    pub const ALL: [Lane; 2] = [Lane::High, Lane::Normal];

    /// The value stored in the `lane` column.
    pub fn as_db(self) -> i64 {
        match self {
            Self::High => 0,
            Self::Normal => 1,
        }
    }

    /// The lane of a stored `lane` value (anything but 0 is normal).
    pub fn from_db(v: i64) -> Self {
        if v == 0 { Self::High } else { Self::Normal }
    }

    /// `high` or `normal` (metric labels, logs).
    pub fn name(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
        }
    }
}

/// How far a delivery task has read: the last sequence number it has
/// handed out, per lane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    high: u64,
    normal: u64,
}

impl Cursor {
    /// The last sequence number handed out in `lane` (0: none yet).
    pub fn after(&self, lane: Lane) -> u64 {
        match lane {
            Lane::High => self.high,
            Lane::Normal => self.normal,
        }
    }

    /// Moves `lane`'s position to `seq` (never backwards).
    pub fn advance(&mut self, lane: Lane, seq: u64) {
        let at = match lane {
            Lane::High => &mut self.high,
            Lane::Normal => &mut self.normal,
        };
        *at = (*at).max(seq);
    }

    /// Moves past every record of `records`.
    pub fn advance_past(&mut self, records: &[super::StoredRecord]) {
        for r in records {
            self.advance(r.lane, r.seq);
        }
    }

    /// Whether `lane`'s record `seq` was handed out before.
    pub fn passed(&self, lane: Lane, seq: u64) -> bool {
        seq <= self.after(lane)
    }
}

/// Adds the `lane` column to an outbox file of the previous version (its
/// rows become normal) and the index the readers use.
pub(super) fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_lane: bool = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('records') WHERE name = 'lane'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )?;
    if !has_lane {
        conn.execute_batch("ALTER TABLE records ADD COLUMN lane INTEGER NOT NULL DEFAULT 1;")?;
        tracing::info!(
            "Outbox file upgraded: records now carry a lane (existing ones are normal)."
        );
    }
    // A lane this version does not know (a damaged or future file) would
    // never be read: such records go to the normal lane.
    let strays = conn.execute("UPDATE records SET lane = 1 WHERE lane NOT IN (0, 1)", [])?;
    if strays > 0 {
        tracing::warn!(
            records = strays,
            "Outbox records with an unknown lane moved to the normal lane."
        );
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS records_by_lane ON records (sink, lane, seq);")
}

#[cfg(test)]
mod tests;
