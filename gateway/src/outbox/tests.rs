use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Instant;

use super::*;

fn limits(sink: &str, max_rows: u64, policy: FullPolicy) -> SinkLimits {
    SinkLimits {
        sink: sink.into(),
        max_rows,
        max_bytes: 1 << 30,
        ttl: Duration::from_secs(3600),
        policy,
    }
}

fn open(dir: &Path, sinks: Vec<SinkLimits>) -> Outbox {
    Outbox::open(OutboxConfig {
        path: dir.join("outbox.sqlite"),
        max_commits_per_sec: 20,
        sinks,
    })
    .expect("outbox opens")
}

fn record(sink: &str, n: u64) -> NewRecord {
    NewRecord {
        sink: sink.into(),
        function: "f".into(),
        topic: "t".into(),
        payload: Bytes::from(format!("{{\"n\":{n}}}")),
        ts_ms: now_ms(),
        lane: Lane::Normal,
    }
}

struct OnDrop(Option<Box<dyn FnOnce() + Send + Sync>>);
impl Drop for OnDrop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

#[tokio::test]
async fn records_survive_a_restart_and_sequence_numbers_are_never_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = open(dir.path(), vec![limits("cloud", 100, FullPolicy::Refuse)]);
    ob.append(vec![record("cloud", 1), record("cloud", 2)], None)
        .await
        .expect("append");
    ob.flush().await;
    let rows = ob
        .reader()
        .expect("reader")
        .next_batch("cloud", &Cursor::default(), 10)
        .expect("read");
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
    ob.confirm("cloud", vec![2]);
    ob.flush().await;
    drop(ob);

    let ob = open(dir.path(), vec![limits("cloud", 100, FullPolicy::Refuse)]);
    let stats = ob.sink_stats("cloud").expect("sink");
    assert_eq!(stats.rows.load(Ordering::Relaxed), 1);
    ob.append(vec![record("cloud", 3)], None)
        .await
        .expect("append");
    ob.flush().await;
    let rows = ob
        .reader()
        .expect("reader")
        .next_batch("cloud", &Cursor::default(), 10)
        .expect("read");
    // Row 2 was deleted; the new row gets 3, not 2.
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3]);
    assert_eq!(rows[0].payload, Bytes::from("{\"n\":1}"));
}

#[tokio::test]
async fn the_hold_is_released_only_after_the_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = open(dir.path(), vec![limits("cloud", 100, FullPolicy::Refuse)]);
    let path = ob.path().to_owned();
    let saw_row = Arc::new(AtomicBool::new(false));
    let flag = saw_row.clone();
    let hold = OnDrop(Some(Box::new(move || {
        // Another connection sees the row the moment the input is released.
        let conn = Connection::open(&path).expect("open");
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))
            .expect("count");
        flag.store(n == 1, Ordering::SeqCst);
    })));
    ob.append(vec![record("cloud", 1)], Some(Box::new(hold)))
        .await
        .expect("append");
    ob.flush().await;
    assert!(saw_row.load(Ordering::SeqCst));
}

#[tokio::test]
async fn appends_are_grouped_into_few_commits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = open(
        dir.path(),
        vec![limits("cloud", 1_000_000, FullPolicy::Refuse)],
    );
    for n in 0..2000 {
        ob.append(vec![record("cloud", n)], None)
            .await
            .expect("append");
    }
    ob.flush().await;
    let commits = ob.stats().commits.load(Ordering::Relaxed);
    assert_eq!(ob.stats().rows_committed.load(Ordering::Relaxed), 2000);
    assert!(commits <= 10, "2000 appends took {commits} commits");
}

#[tokio::test]
async fn drop_oldest_keeps_the_newest_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = open(dir.path(), vec![limits("cloud", 3, FullPolicy::DropOldest)]);
    for n in 0..5 {
        ob.append(vec![record("cloud", n)], None)
            .await
            .expect("append");
    }
    ob.flush().await;
    let rows = ob
        .reader()
        .expect("reader")
        .next_batch("cloud", &Cursor::default(), 10)
        .expect("read");
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
    let stats = ob.sink_stats("cloud").expect("sink");
    assert_eq!(stats.dropped_full.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn refuse_holds_appends_until_deliveries_make_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = open(dir.path(), vec![limits("cloud", 2, FullPolicy::Refuse)]);
    let released = Arc::new(AtomicBool::new(false));
    let flag = released.clone();
    ob.append(vec![record("cloud", 1), record("cloud", 2)], None)
        .await
        .expect("append");
    let hold = OnDrop(Some(Box::new(move || flag.store(true, Ordering::SeqCst))));
    ob.append(vec![record("cloud", 3)], Some(Box::new(hold)))
        .await
        .expect("append");
    ob.flush().await;
    let stats = ob.sink_stats("cloud").expect("sink");
    assert_eq!(stats.rows.load(Ordering::Relaxed), 2);
    assert!(stats.refused.load(Ordering::Relaxed) >= 1);
    assert!(
        !released.load(Ordering::SeqCst),
        "a held-back append is not acknowledged"
    );
    ob.confirm("cloud", vec![1]);
    ob.flush().await;
    ob.flush().await;
    assert!(
        released.load(Ordering::SeqCst),
        "room made: the append commits"
    );
    let rows = ob
        .reader()
        .expect("reader")
        .next_batch("cloud", &Cursor::default(), 10)
        .expect("read");
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3]);
}

#[tokio::test]
async fn expired_records_are_deleted_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut l = limits("cloud", 100, FullPolicy::Refuse);
    l.ttl = Duration::from_secs(60);
    let ob = open(dir.path(), vec![l]);
    let mut old = record("cloud", 1);
    old.ts_ms = now_ms() - 3_600_000;
    ob.append(vec![old, record("cloud", 2)], None)
        .await
        .expect("append");
    let stats = ob.sink_stats("cloud").expect("sink");
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.expired.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "TTL sweep did not run");
        ob.flush().await;
    }
    assert_eq!(stats.rows.load(Ordering::Relaxed), 1);
}

/// A record that needs new pages whatever the free space in existing ones
/// (its payload spills to overflow pages).
fn big_record(sink: &str, n: u64) -> NewRecord {
    let mut r = record(sink, n);
    let mut payload = format!("{{\"n\":{n},\"pad\":\"").into_bytes();
    payload.resize(8 * 1024, b'x');
    payload.extend_from_slice(b"\"}");
    r.payload = Bytes::from(payload);
    r
}

/// Polls `cond` (a counter, which has no event to wait on) for up to 10 s.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_failed_commit_keeps_its_holds_and_retries_until_it_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = open(dir.path(), vec![limits("cloud", 1000, FullPolicy::Refuse)]);
    ob.append(vec![record("cloud", 0)], None)
        .await
        .expect("append");
    ob.flush().await;
    // The database may not grow any more: every insert fails with SQLITE_FULL.
    ob.limit_pages(1);
    let released = Arc::new(AtomicU64::new(0));
    for n in 1..=20 {
        let count = released.clone();
        let hold = OnDrop(Some(Box::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
        })));
        ob.append(vec![big_record("cloud", n)], Some(Box::new(hold)))
            .await
            .expect("append");
    }
    let stats = ob.stats().clone();
    until("three failed commits", || {
        stats.commit_failures.load(Ordering::Relaxed) >= 3
    })
    .await;
    assert_eq!(
        released.load(Ordering::SeqCst),
        0,
        "nothing is acknowledged while its commit fails"
    );
    assert_eq!(stats.failing().as_deref(), Some("database or disk is full"));
    assert_eq!(stats.rows_committed.load(Ordering::Relaxed), 1);
    // Confirmations still commit on their own (a delete needs no new page),
    // so deliveries are not stuck behind the failing appends.
    ob.confirm("cloud", vec![1]);
    ob.flush().await;
    let sink = ob.sink_stats("cloud").expect("sink");
    assert_eq!(sink.delivered.load(Ordering::Relaxed), 1);
    assert_eq!(released.load(Ordering::SeqCst), 0);
    assert!(stats.failing().is_some(), "the appends still fail");

    // Space returns: the writer recovers by itself, in order, and only now
    // releases the holds.
    ob.limit_pages(1 << 30);
    until("the held appends commit", || {
        released.load(Ordering::SeqCst) == 20
    })
    .await;
    assert_eq!(stats.failing(), None);
    let rows = ob
        .reader()
        .expect("reader")
        .next_batch("cloud", &Cursor::default(), 100)
        .expect("read");
    let readings: Vec<u64> = rows
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
            v["n"].as_u64().expect("n")
        })
        .collect();
    assert_eq!(readings, (1..=20).collect::<Vec<_>>());
    assert_eq!(sink.rows.load(Ordering::Relaxed), 20);
}
