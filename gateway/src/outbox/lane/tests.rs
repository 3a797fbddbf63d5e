//! The alarm lane on a real SQLite file: FIFO within a lane, high before
//! normal, lanes kept across a reopen, old files migrated, and `drop_oldest`
//! sparing alarms.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::super::*;

fn open(dir: &Path, max_rows: u64, policy: FullPolicy) -> Outbox {
    Outbox::open(OutboxConfig {
        path: dir.join("outbox.sqlite"),
        max_commits_per_sec: 50,
        sinks: vec![SinkLimits {
            sink: "cloud".into(),
            max_rows,
            max_bytes: 1 << 30,
            ttl: Duration::from_secs(3600),
            policy,
        }],
    })
    .expect("outbox opens")
}

fn record(lane: Lane, n: u64) -> NewRecord {
    NewRecord {
        sink: "cloud".into(),
        function: lane.name().into(),
        topic: "t".into(),
        payload: Bytes::from(format!("{n}")),
        ts_ms: now_ms(),
        lane,
    }
}

/// Appends `(lane, n)` one append each, in order, and waits for the commit.
async fn append(ob: &Outbox, records: &[(Lane, u64)]) {
    for &(lane, n) in records {
        ob.append(vec![record(lane, n)], None)
            .await
            .expect("append");
    }
    ob.flush().await;
}

/// Reads everything the way a sink does: batches of `limit` from a cursor
/// that moves past each batch. Returns `(lane, payload)` in read order.
fn drain(ob: &Outbox, limit: usize) -> Vec<(Lane, String)> {
    let reader = ob.reader().expect("reader");
    let mut cursor = Cursor::default();
    let mut out = Vec::new();
    loop {
        let batch = reader.next_batch("cloud", &cursor, limit).expect("read");
        if batch.is_empty() {
            return out;
        }
        let lane = batch[0].lane;
        assert!(batch.iter().all(|r| r.lane == lane), "a batch mixes lanes");
        cursor.advance_past(&batch);
        out.extend(
            batch
                .iter()
                .map(|r| (r.lane, String::from_utf8_lossy(&r.payload).into_owned())),
        );
    }
}

fn payloads(read: &[(Lane, String)]) -> Vec<&str> {
    read.iter().map(|(_, p)| p.as_str()).collect()
}

const H: Lane = Lane::High;
const N: Lane = Lane::Normal;

#[tokio::test]
async fn high_records_are_read_first_and_each_lane_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = open(dir.path(), 100, FullPolicy::Refuse);
    append(&ob, &[(N, 1), (N, 2), (H, 3), (N, 4), (H, 5), (N, 6)]).await;
    assert_eq!(payloads(&drain(&ob, 2)), ["3", "5", "1", "2", "4", "6"]);
    assert_eq!(payloads(&drain(&ob, 100)), ["3", "5", "1", "2", "4", "6"]);
    let stats = ob.sink_stats("cloud").expect("sink");
    assert_eq!(stats.rows.load(Ordering::Relaxed), 6);
    assert_eq!(stats.high_rows.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn an_alarm_appended_after_the_cursor_moved_on_is_still_read_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = open(dir.path(), 100, FullPolicy::Refuse);
    append(&ob, &[(N, 1), (N, 2), (N, 3)]).await;
    let reader = ob.reader().expect("reader");
    let mut cursor = Cursor::default();
    let first = reader.next_batch("cloud", &cursor, 1).expect("read");
    cursor.advance_past(&first);
    // The alarm gets a higher seq than every normal row, and still comes
    // before the normal rows not yet read.
    append(&ob, &[(H, 4)]).await;
    let next = reader.next_batch("cloud", &cursor, 10).expect("read");
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].lane, Lane::High);
    cursor.advance_past(&next);
    let rest = reader.next_batch("cloud", &cursor, 10).expect("read");
    assert_eq!(
        rest.iter().map(|r| r.payload.clone()).collect::<Vec<_>>(),
        [Bytes::from("2"), Bytes::from("3")]
    );
}

#[tokio::test]
async fn lanes_survive_a_reopen_and_confirmations_count_per_lane() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = open(dir.path(), 100, FullPolicy::Refuse);
    append(&ob, &[(N, 1), (H, 2), (N, 3), (H, 4)]).await;
    drop(ob);

    let ob = open(dir.path(), 100, FullPolicy::Refuse);
    let stats = ob.sink_stats("cloud").expect("sink");
    assert_eq!(stats.rows.load(Ordering::Relaxed), 4);
    assert_eq!(stats.high_rows.load(Ordering::Relaxed), 2);
    let read = drain(&ob, 10);
    assert_eq!(
        read,
        [
            (H, "2".into()),
            (H, "4".into()),
            (N, "1".into()),
            (N, "3".into())
        ]
    );
    // Confirm the first alarm (seq 2) and a normal record (seq 1).
    ob.confirm("cloud", vec![2, 1]);
    ob.flush().await;
    assert_eq!(stats.rows.load(Ordering::Relaxed), 2);
    assert_eq!(stats.high_rows.load(Ordering::Relaxed), 1);
    assert_eq!(payloads(&drain(&ob, 10)), ["4", "3"]);
}

#[tokio::test]
async fn an_outbox_file_of_the_previous_version_is_upgraded_with_normal_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.sqlite");
    {
        // The schema before lanes, as the previous version created it.
        let conn = rusqlite::Connection::open(&path).expect("sqlite");
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE records (
                 seq      INTEGER PRIMARY KEY AUTOINCREMENT,
                 sink     TEXT    NOT NULL,
                 function TEXT    NOT NULL,
                 topic    TEXT    NOT NULL,
                 payload  BLOB    NOT NULL,
                 ts_ms    INTEGER NOT NULL
             );
             CREATE INDEX records_by_sink ON records (sink, seq);
             INSERT INTO records (sink, function, topic, payload, ts_ms)
                 VALUES ('cloud', 'old', 't', X'31', 1), ('cloud', 'old', 't', X'32', 2);
             -- A lane this version does not know (a damaged or later file):
             -- the record must still be delivered, not sit unread.
             ALTER TABLE records ADD COLUMN lane INTEGER NOT NULL DEFAULT 1;
             UPDATE records SET lane = 7 WHERE seq = 2;",
        )
        .expect("old schema");
    }
    let ob = open(dir.path(), 100, FullPolicy::Refuse);
    let stats = ob.sink_stats("cloud").expect("sink");
    assert_eq!(stats.rows.load(Ordering::Relaxed), 2);
    assert_eq!(stats.high_rows.load(Ordering::Relaxed), 0);
    append(&ob, &[(N, 3), (H, 4)]).await;
    assert_eq!(payloads(&drain(&ob, 10)), ["4", "1", "2", "3"]);
    drop(ob);
    // Opening the upgraded file again changes nothing.
    let ob = open(dir.path(), 100, FullPolicy::Refuse);
    assert_eq!(payloads(&drain(&ob, 10)), ["4", "1", "2", "3"]);
}

#[tokio::test]
async fn drop_oldest_drops_normal_records_before_any_alarm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = open(dir.path(), 3, FullPolicy::DropOldest);
    // The alarm is the oldest row, yet the normal ones go first.
    append(&ob, &[(H, 1), (N, 2), (N, 3), (N, 4), (N, 5)]).await;
    assert_eq!(payloads(&drain(&ob, 10)), ["1", "4", "5"]);
    // Only when no normal row is left does the oldest alarm go.
    append(&ob, &[(H, 6), (H, 7), (H, 8)]).await;
    assert_eq!(payloads(&drain(&ob, 10)), ["6", "7", "8"]);
    let stats = ob.sink_stats("cloud").expect("sink");
    assert_eq!(stats.dropped_full.load(Ordering::Relaxed), 5);
    assert_eq!(stats.high_rows.load(Ordering::Relaxed), 3);
}
