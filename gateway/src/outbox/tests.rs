use std::sync::atomic::AtomicBool;

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
        .next_batch("cloud", 0, 10)
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
        .next_batch("cloud", 0, 10)
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
        .next_batch("cloud", 0, 10)
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
        .next_batch("cloud", 0, 10)
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
