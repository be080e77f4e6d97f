//! Injected I/O faults (the `FaultyStorage` seam): a failed write, sync or
//! open makes the store answer "outcome unknown" for the group in flight,
//! refuse appends and report itself unready; once the fault clears it
//! recovers by itself, and nothing it acknowledged is lost, before or after a
//! reopen.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn_core::{EventStore, ExpectedVersion, NewEvent, ReadAllOptions, StoreError};
use cairn_log::{EmbeddedStore, FaultOp, FaultyStorage, Options};
use uuid::Uuid;

fn ev(n: u64) -> NewEvent {
    NewEvent::json("Faulted", &serde_json::json!({ "n": n, "pad": "x".repeat(200) })).unwrap()
}

fn options(storage: &Arc<FaultyStorage>) -> Options {
    Options {
        segment_bytes: 64 * 1024,
        storage: storage.clone(),
        recovery_backoff_max: Duration::from_millis(200),
        ..Options::default()
    }
}

async fn ids(store: &EmbeddedStore) -> Vec<Uuid> {
    store
        .read_all(ReadAllOptions::forward())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| !e.stream.starts_with('$'))
        .map(|e| e.id)
        .collect()
}

/// Waits (generously) until the store says it takes appends again.
async fn until_ready(store: &EmbeddedStore) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.health().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the store did not recover within 20 s of the fault clearing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One fault of each kind: ENOSPC on the write, EIO on the sync (the bytes
/// reached the page cache), EMFILE when a roll opens the next segment.
#[tokio::test]
async fn a_failed_write_sync_or_open_fails_stop_then_recovers_and_loses_nothing() {
    for (op, errno, what) in [
        (FaultOp::Write, libc::ENOSPC, "ENOSPC on write"),
        (FaultOp::Sync, libc::EIO, "EIO on fsync"),
        (FaultOp::Open, libc::EMFILE, "EMFILE on open"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let storage = FaultyStorage::new();
        let store = EmbeddedStore::open_with(dir.path(), options(&storage)).unwrap();
        let mut acknowledged = Vec::new();
        for i in 0..5 {
            let e = ev(i);
            acknowledged.push(e.id);
            store.append("acct-1", ExpectedVersion::Any, vec![e]).await.unwrap();
        }
        storage.fail_from(op, 1, errno);
        // Appends until the fault bites (an open only happens at a roll).
        let mut unknown = None;
        for i in 0..1000 {
            let e = ev(100 + i);
            let id = e.id;
            match store.append("acct-1", ExpectedVersion::Any, vec![e.clone()]).await {
                Ok(_) => acknowledged.push(id),
                Err(StoreError::OutcomeUnknown { reason }) => {
                    assert!(reason.contains("failed"), "{what}: {reason}");
                    unknown = Some(e);
                    break;
                }
                Err(StoreError::Closed { reason }) => {
                    assert!(reason.is_some_and(|r| r.contains("failed")), "{what}");
                    break;
                }
                Err(e) => panic!("{what}: unexpected {e:?}"),
            }
        }
        assert!(storage.failures() > 0, "{what}: the fault was hit");
        // Unready, and appends are refused (retryable), while the fault lasts.
        assert!(store.health().await.is_err(), "{what}: health reports the store unready");
        assert!(store.unavailable().is_some());
        assert!(store.stats().prometheus().contains("cairn_engine_unavailable 1"));
        let refused = store.append("acct-1", ExpectedVersion::Any, vec![ev(7)]).await.unwrap_err();
        assert!(refused.is_retryable(), "{what}: {refused:?}");
        // Reads go on meanwhile.
        assert_eq!(
            ids(&store).await,
            acknowledged,
            "{what}: reads still work and show every acknowledged event"
        );
        // The retries keep failing while the fault lasts...
        let before = storage.failures();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(storage.failures() > before, "{what}: recovery is retried");
        assert!(store.health().await.is_err());
        // ...and succeed once it clears.
        storage.clear();
        until_ready(&store).await;
        assert_eq!(store.stats().recoveries.load(Ordering::Relaxed), 1);
        assert!(store.stats().prometheus().contains("cairn_engine_write_failures_total"));
        assert!(store.stats().prometheus().contains("cairn_engine_unavailable 0"));
        // The append whose outcome was unknown was discarded: a retry with the same ids writes it once.
        if let Some(e) = unknown {
            store.append("acct-1", ExpectedVersion::Any, vec![e.clone()]).await.unwrap();
            store.append("acct-1", ExpectedVersion::Any, vec![e.clone()]).await.unwrap();
            acknowledged.push(e.id);
        }
        for i in 0..50 {
            let e = ev(1000 + i);
            acknowledged.push(e.id);
            store.append("acct-1", ExpectedVersion::Any, vec![e]).await.unwrap();
        }
        assert_eq!(ids(&store).await, acknowledged, "{what}");
        drop(store);
        let store = EmbeddedStore::open_with(
            dir.path(),
            Options { segment_bytes: 64 * 1024, ..Options::default() },
        )
        .unwrap();
        assert_eq!(ids(&store).await, acknowledged, "{what}: after a reopen");
        assert!(cairn_log::verify(dir.path(), |_, _| {}).is_ok());
    }
}

/// Sixteen writers race while syncs fail for a moment, again and again:
/// every append they saw acknowledged is there, in the live store and
/// after a reopen; none is there twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_through_repeated_faults_lose_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FaultyStorage::new();
    let store = EmbeddedStore::open_with(dir.path(), options(&storage)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let (store, stop) = (store.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let batch: Vec<NewEvent> =
                    (0..1 + i % 3).map(|k| ev(t * 1_000_000 + i * 10 + k)).collect();
                let batch_ids: Vec<Uuid> = batch.iter().map(|e| e.id).collect();
                match store.append(&format!("acct-{t}"), ExpectedVersion::Any, batch).await {
                    Ok(_) => acknowledged.extend(batch_ids),
                    Err(e) if e.is_retryable() => {
                        tokio::time::sleep(Duration::from_millis(5)).await
                    }
                    Err(e) => panic!("writer {t}: {e:?}"),
                }
            }
            acknowledged
        }));
    }
    for (round, op) in
        [FaultOp::Sync, FaultOp::Write, FaultOp::Any, FaultOp::Sync].into_iter().enumerate()
    {
        tokio::time::sleep(Duration::from_millis(150)).await;
        storage.fail_from(op, 3 + round as u64, libc::ENOSPC);
        tokio::time::sleep(Duration::from_millis(150)).await;
        storage.clear();
        until_ready(&store).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for t in tasks {
        acknowledged.extend(t.await.unwrap());
    }
    assert!(storage.failures() >= 4, "the faults were hit ({})", storage.failures());
    assert!(acknowledged.len() > 100, "writers made progress: {}", acknowledged.len());
    let check = |found: Vec<Uuid>| {
        let set: HashSet<Uuid> = found.iter().copied().collect();
        assert_eq!(set.len(), found.len(), "no event is there twice");
        let missing = acknowledged.iter().filter(|id| !set.contains(id)).count();
        assert_eq!(
            missing,
            0,
            "{missing} of {} acknowledged events are missing",
            acknowledged.len()
        );
    };
    check(ids(&store).await);
    drop(store);
    let store = EmbeddedStore::open(dir.path()).unwrap();
    check(ids(&store).await);
}

/// A full disk that refuses new index files (segments are allocated whole
/// when created, so new files hit it first): appends and reads go on, the
/// sealed segments stay indexed in memory, their files are written once
/// space is back, and a reopen has nothing to rebuild.
#[tokio::test]
async fn index_files_refused_by_a_full_disk_are_written_once_it_has_room() {
    use cairn_core::Query;
    let dir = tempfile::tempdir().unwrap();
    let storage = FaultyStorage::new();
    let store = EmbeddedStore::open_with(dir.path(), options(&storage)).unwrap();
    storage.fail_files(".idx.tmp", libc::ENOSPC);
    let mut acknowledged = Vec::new();
    // About five segments of 64 KiB.
    for i in 0..1500 {
        let e = ev(i).with_tags([format!("t:{}", i % 3)]);
        acknowledged.push(e.id);
        store.append(&format!("acct-{}", i % 7), ExpectedVersion::Any, vec![e]).await.unwrap();
    }
    let stats = store.stats();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.index_failures.load(Ordering::Relaxed) < 3 {
        assert!(Instant::now() < deadline, "the indexer did not try the sealed segments");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.index_files_written.load(Ordering::Relaxed), 0);
    assert!(store.health().await.is_ok(), "a missing index file does not stop appends");
    assert_eq!(ids(&store).await, acknowledged);
    let tagged = store.read_query(&Query::tags(["t:1"]), ReadAllOptions::forward()).await.unwrap();
    assert_eq!(tagged.len(), 500);
    assert!(
        store.append("acct-1", ExpectedVersion::Exact(214), vec![ev(9_999)]).await.is_err(),
        "versions hold (acct-1 has 215 events)"
    );
    // Room again: the files are written by the next try, without a new seal.
    storage.clear();
    let deadline = Instant::now() + Duration::from_secs(30);
    while segment_count(dir.path()) - 1 > idx_count(dir.path()) {
        assert!(
            Instant::now() < deadline,
            "the index files were not written once the disk had room"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ids(&store).await, acknowledged);
    assert_eq!(
        store.read_query(&Query::tags(["t:1"]), ReadAllOptions::forward()).await.unwrap(),
        tagged
    );
    drop(store);
    let store = EmbeddedStore::open_with(
        dir.path(),
        Options { segment_bytes: 64 * 1024, ..Options::default() },
    )
    .unwrap();
    assert!(
        store.open_report().rebuilt_indexes.is_empty(),
        "{:?}",
        store.open_report().rebuilt_indexes
    );
    assert_eq!(ids(&store).await, acknowledged);
}

fn files_ending(dir: &std::path::Path, ext: &str) -> usize {
    std::fs::read_dir(dir.join("log"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(ext))
        .count()
}

fn segment_count(dir: &std::path::Path) -> usize {
    files_ending(dir, ".seg")
}

fn idx_count(dir: &std::path::Path) -> usize {
    files_ending(dir, ".idx")
}

#[tokio::test]
async fn stream_tables_refused_by_a_full_disk_are_written_once_it_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FaultyStorage::new();
    let options = Options { summaries_in_memory: 10, ..options(&storage) };
    let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
    storage.fail_files(".tbl.tmp", libc::ENOSPC);
    let mut acknowledged = Vec::new();
    for i in 0..300 {
        let e = ev(i);
        acknowledged.push(e.id);
        store.append(&format!("acct-{}", i % 50), ExpectedVersion::Any, vec![e]).await.unwrap();
    }
    let stats = store.stats();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.index_failures.load(Ordering::Relaxed) < 1 {
        assert!(Instant::now() < deadline, "the indexer did not try to flush");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Tried once, then not again before the retry: no storm of attempts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stats.index_failures.load(Ordering::Relaxed), 1);
    assert_eq!(stats.stream_tables_written.load(Ordering::Relaxed), 0);
    assert!(
        store.health().await.is_ok(),
        "a stream table that cannot be written does not stop appends"
    );
    assert_eq!(store.summaries_layout(), (50, 0), "the summaries stay in memory");
    assert_eq!(store.stream_info("acct-7").await.unwrap().version, 6);
    // Room again: the next try writes the table.
    storage.clear();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.summaries_layout().1 == 0 {
        assert!(
            Instant::now() < deadline,
            "the stream table was not written once the disk had room"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ids(&store).await, acknowledged);
    drop(store);
    let store = EmbeddedStore::open_with(
        dir.path(),
        Options { summaries_in_memory: 10, ..Options::default() },
    )
    .unwrap();
    assert!(
        store.open_report().from_snapshot && store.open_report().scanned_events == 0,
        "{:?}",
        store.open_report()
    );
    assert_eq!(store.stream_info("acct-7").await.unwrap().version, 6);
    assert_eq!(ids(&store).await, acknowledged);
}
