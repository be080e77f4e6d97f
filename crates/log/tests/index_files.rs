//! Index files of sealed segments: reads cross them, and one that is
//! missing, damaged, cut short or copied from another segment is never
//! trusted: open rebuilds it from its segment and says so, and damage that
//! only a lookup can see is rebuilt at that lookup.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use cairn_core::{
    EventStore, ExpectedVersion, NewEvent, Query, ReadAllOptions, ReadStreamOptions, StoreError,
    StreamMetadata,
};
use cairn_log::{EmbeddedStore, Options};

use crate::common::segment_files;

fn options() -> Options {
    Options { segment_bytes: 16 * 1024, ..Options::default() }
}

fn index_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = segment_files(dir)
        .into_iter()
        .map(|s| PathBuf::from(format!("{}.idx", s.display())))
        .collect();
    files.retain(|f| f.exists());
    files
}

/// Everything a reader can ask, as text: every stream, `$all`, and queries
/// by tag, type and category, forward and backward.
async fn answers(store: &EmbeddedStore) -> Vec<String> {
    let ids = |r: Result<Vec<cairn_core::RecordedEvent>, StoreError>| match r {
        Ok(events) => events
            .iter()
            .map(|e| format!("{}@{}:{}", e.stream, e.version, e.position.0))
            .collect::<Vec<_>>()
            .join(","),
        Err(e) => format!("error: {e}"),
    };
    let mut out = vec![ids(store.read_all(ReadAllOptions::forward()).await)];
    for s in 0..6 {
        out.push(ids(store.read_stream(&format!("acct-{s}"), ReadStreamOptions::forward()).await));
        out.push(ids(store
            .read_stream(
                &format!("acct-{s}"),
                ReadStreamOptions::backward().from_version(17).limit(5),
            )
            .await));
    }
    for q in [
        Query::tags(["customer:1"]),
        Query::tags(["customer:2"]),
        Query::types(["Deposited"]),
        Query::types(["Opened", "Closed"]),
    ] {
        out.push(ids(store.read_query(&q, ReadAllOptions::forward()).await));
        out.push(ids(store.read_query(&q, ReadAllOptions::backward().limit(7)).await));
    }
    out.push(ids(store.read_category("acct", ReadAllOptions::forward()).await));
    out.push(format!(
        "{:?}",
        store
            .list_streams("", 100)
            .await
            .map(|l| l.into_iter().map(|i| (i.stream, i.version, i.state)).collect::<Vec<_>>())
    ));
    out
}

async fn fill(store: &EmbeddedStore) {
    for i in 0..600u64 {
        let s = i % 6;
        let kind = if i % 50 == 0 { "Opened" } else { "Deposited" };
        let e = NewEvent::json(
            kind,
            &serde_json::json!({ "amount": i, "pad": "x".repeat((i % 40) as usize) }),
        )
        .unwrap()
        .with_tags([format!("customer:{}", i % 4)]);
        store.append(&format!("acct-{s}"), ExpectedVersion::Any, vec![e]).await.unwrap();
        if i == 300 {
            // A deleted incarnation and metadata that hides old events, across segments.
            store.delete_stream("acct-5", ExpectedVersion::Any, false).await.unwrap();
            store
                .set_stream_metadata(
                    "acct-4",
                    StreamMetadata { max_count: Some(30), ..Default::default() },
                )
                .await
                .unwrap();
        }
    }
}

fn flip(path: &Path, at: u64) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at as usize] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn reads_cross_index_files_and_bad_ones_are_rebuilt_from_their_segment() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
    fill(&store).await;
    let live = answers(&store).await;
    drop(store);
    let segments = segment_files(dir.path());
    assert!(segments.len() >= 5, "several segments: {}", segments.len());
    assert_eq!(
        index_files(dir.path()).len(),
        segments.len() - 1,
        "every sealed segment has its index file after a clean close"
    );

    let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
    let report = store.open_report().clone();
    assert_eq!(
        (report.index_files, report.rebuilt_indexes.len()),
        (segments.len() - 1, 0),
        "{report:?}"
    );
    assert!(report.from_snapshot);
    assert_eq!(
        answers(&store).await,
        live,
        "reads through the index files answer as the memtables did"
    );
    drop(store);

    // What open can see: each is rebuilt, reported, and answers stay the same.
    let victim = index_files(dir.path())[1].clone();
    let other = index_files(dir.path())[2].clone();
    let good = fs::read(&victim).unwrap();
    type Damage<'a> = Box<dyn Fn() + 'a>;
    let cases: Vec<(&str, Damage<'_>)> = vec![
        ("missing", Box::new(|| fs::remove_file(&victim).unwrap())),
        ("header checksum", Box::new(|| flip(&victim, 20))),
        ("length", Box::new(|| fs::write(&victim, &good[..good.len() - 9]).unwrap())),
        (
            "another segment",
            Box::new(|| {
                fs::copy(&other, &victim).unwrap();
            }),
        ),
        (
            "magic",
            Box::new(|| fs::write(&victim, "not an index file at all, ".repeat(40)).unwrap()),
        ),
    ];
    for (why, damage) in cases {
        damage();
        let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
        let rebuilt = &store.open_report().rebuilt_indexes;
        assert_eq!(rebuilt.len(), 1, "{why}: {rebuilt:?}");
        assert_eq!(rebuilt[0].0, victim, "{why}");
        assert!(rebuilt[0].1.contains(why), "{why}: the report says why: {}", rebuilt[0].1);
        assert_eq!(answers(&store).await, live, "{why}");
        drop(store);
        assert_eq!(
            fs::read(&victim).unwrap(),
            good,
            "{why}: the rebuilt file is the same as the one written at seal"
        );
    }

    // Damage inside a block: open cannot see it without reading every file,
    // so the first lookup that touches the block finds it, rebuilds the file
    // and answers from the new one.
    for at in [good.len() / 2, 600, good.len() / 3] {
        flip(&victim, at as u64);
        let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
        assert!(store.open_report().rebuilt_indexes.is_empty());
        assert_eq!(answers(&store).await, live, "damage at offset {at}");
        let rebuilt = store.stats().index_rebuilds.load(Ordering::Relaxed);
        assert!(rebuilt >= 1, "damage at offset {at} was found and the file rebuilt ({rebuilt})");
        drop(store);
        assert_eq!(fs::read(&victim).unwrap(), good, "damage at offset {at}: rebuilt");
    }

    // `cairn verify` checks every index file against its segment.
    let report = cairn_log::verify(dir.path(), |_, _| {}).unwrap();
    assert_eq!(report.index_files, segments.len() - 1);
    flip(&victim, good.len() as u64 / 2);
    match cairn_log::verify(dir.path(), |_, _| {}) {
        Err(StoreError::Corrupt { file, reason, .. }) => {
            assert_eq!(Path::new(&file), victim);
            assert!(reason.contains("cairn reindex"), "{reason}");
        }
        other => panic!("verify of a damaged index file: {other:?}"),
    }
    // reindex rebuilds them all.
    EmbeddedStore::reindex(dir.path()).unwrap();
    assert_eq!(fs::read(&victim).unwrap(), good);

    // A damaged segment whose index file must be rebuilt is refused loudly.
    fs::remove_file(&victim).unwrap();
    let seg = segments[1].clone();
    assert_eq!(PathBuf::from(format!("{}.idx", seg.display())), victim);
    flip(&seg, 100);
    match EmbeddedStore::open_with(dir.path(), options()) {
        Err(StoreError::Corrupt { file, .. }) => assert_eq!(Path::new(&file), seg),
        Err(e) => panic!("expected Corrupt naming {}, got {e}", seg.display()),
        Ok(_) => panic!("a damaged segment without its index file must not open"),
    }
    flip(&seg, 100);
    let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
    assert_eq!(answers(&store).await, live);
}

#[tokio::test]
async fn after_a_crash_open_scans_the_newest_segment_and_the_sealed_ones_without_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
    fill(&store).await;
    let live = answers(&store).await;
    // As if the process died now: no clean close, the snapshot may be behind.
    std::mem::forget(store);
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    // Without the snapshot and with no index files, open rebuilds everything.
    for f in index_files(copy.path()) {
        fs::remove_file(f).unwrap();
    }
    crate::common::remove_stream_tables(copy.path());
    let _ = fs::remove_file(copy.path().join("LOCK"));
    let store = EmbeddedStore::open_with(copy.path(), options()).unwrap();
    let report = store.open_report().clone();
    assert!(!report.from_snapshot);
    assert_eq!(report.rebuilt_indexes.len(), segment_files(copy.path()).len() - 1);
    assert_eq!(answers(&store).await, live);
    drop(store);
    let store = EmbeddedStore::open_with(copy.path(), options()).unwrap();
    assert!(store.open_report().from_snapshot && store.open_report().rebuilt_indexes.is_empty());
    assert_eq!(answers(&store).await, live);
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to.join("log")).unwrap();
    for sub in ["", "log"] {
        for e in fs::read_dir(from.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                fs::copy(&p, to.join(sub).join(p.file_name().unwrap())).unwrap();
            }
        }
    }
}

#[tokio::test]
async fn the_scrubber_finds_damage_in_sealed_segments_and_rebuilds_damaged_index_files() {
    let dir = tempfile::tempdir().unwrap();
    let scrub = cairn_log::ScrubOptions {
        bytes_per_sec: 1 << 30,
        pause: std::time::Duration::from_millis(20),
    };
    let options = Options { scrub, ..options() };
    let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
    fill(&store).await;
    let live = answers(&store).await;
    let stats = store.stats();
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "the scrubber did not get to: {what}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    };
    wait_for("a whole clean pass", &|| stats.scrub_passes.load(Ordering::Relaxed) >= 2);
    assert_eq!(
        stats.scrub_errors.load(Ordering::Relaxed),
        0,
        "{:?}",
        stats.scrub_last_error.lock().unwrap()
    );
    assert!(stats.prometheus().contains("cairn_engine_scrub_passes_total"));

    // An index file damaged in the middle: found and rebuilt.
    let victim = index_files(dir.path())[2].clone();
    let good = fs::read(&victim).unwrap();
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    // Written in place: the store has the file mapped, and sees the change.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &bad[mid..mid + 1], mid as u64))
        .unwrap();
    wait_for("the damaged index file", &|| stats.index_rebuilds.load(Ordering::Relaxed) >= 1);
    assert_eq!(fs::read(&victim).unwrap(), good);
    assert!(stats.scrub_last_error.lock().unwrap().as_deref().unwrap().contains(".idx"));

    // A damaged record in a sealed segment: reported, naming the file.
    let seg = segment_files(dir.path())[1].clone();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&seg).unwrap();
    let mut byte = [0u8; 1];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut byte, 200).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[byte[0] ^ 0x10], 200).unwrap();
    let errors = stats.scrub_errors.load(Ordering::Relaxed);
    wait_for("the damaged segment", &|| stats.scrub_errors.load(Ordering::Relaxed) > errors);
    let found = stats.scrub_last_error.lock().unwrap().clone().unwrap();
    assert!(found.contains(&seg.display().to_string()), "{found}");
    std::os::unix::fs::FileExt::write_all_at(&f, &byte, 200).unwrap();
    assert_eq!(answers(&store).await, live, "nothing else changed");
}

/// A new time-ordered id is checked against the newest parts only (old
/// segments' ids are all below it), so ids out of time order must still be
/// found wherever they are: one from a clock far ahead and one from far
/// back, both in old segments, and one from the middle of the log.
#[tokio::test]
async fn ids_out_of_time_order_in_old_segments_are_still_found_by_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let v7_at =
        |ms: u64, r: u8| uuid::Builder::from_unix_timestamp_millis(ms, &[r; 10]).into_uuid();
    let ahead = v7_at(4_102_444_800_000, 1); // 2100
    let behind = v7_at(1_000, 2); // 1970
    let event = |id: uuid::Uuid, n: u64| {
        NewEvent::json("Deposited", &serde_json::json!({ "amount": n, "pad": "x".repeat(100) }))
            .unwrap()
            .with_id(id)
    };
    let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
    let first = store
        .append("early", ExpectedVersion::Any, vec![event(ahead, 1), event(behind, 2)])
        .await
        .unwrap();
    let mut middle = None;
    for i in 0..600u64 {
        let id = uuid::Uuid::now_v7();
        let r = store
            .append(&format!("acct-{}", i % 6), ExpectedVersion::Any, vec![event(id, i)])
            .await
            .unwrap();
        if i == 300 {
            middle = Some((id, i, r));
        }
    }
    let (mid_id, mid_n, mid_result) = middle.unwrap();
    assert!(segment_files(dir.path()).len() >= 5, "the test needs many sealed segments");
    let mut first_store = Some(store);
    for reopen in [false, true] {
        let store = match first_store.take() {
            Some(store) => store,
            None => EmbeddedStore::open_with(dir.path(), options()).unwrap(),
        };
        let head = store.head_position().await.unwrap();
        // Identical retries give the first result and write nothing.
        let again = store
            .append("early", ExpectedVersion::Any, vec![event(ahead, 1), event(behind, 2)])
            .await
            .unwrap();
        assert_eq!(again, first, "reopened: {reopen}");
        let again = store
            .append(
                &format!("acct-{}", mid_n % 6),
                ExpectedVersion::Any,
                vec![event(mid_id, mid_n)],
            )
            .await
            .unwrap();
        assert_eq!(again, mid_result, "reopened: {reopen}");
        // The same ids with other content are refused, each of them.
        for id in [ahead, behind, mid_id] {
            let refused = store.append("other", ExpectedVersion::Any, vec![event(id, 999)]).await;
            assert!(
                matches!(refused, Err(StoreError::IdempotencyConflict { .. })),
                "{id} reopened {reopen}: {refused:?}"
            );
        }
        assert_eq!(store.head_position().await.unwrap(), head, "nothing was written");
        drop(store);
    }
}

/// A rebuild applies each sealed segment's change to the stream summaries
/// without reading its records again; metadata written in a segment without
/// any delete (where that shortcut is taken) must come through it, also for
/// a stream that has no events, and so must versions and positions.
#[tokio::test]
async fn a_rebuild_from_the_log_keeps_metadata_versions_and_positions() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
    let event = |n: u64| {
        NewEvent::json("Deposited", &serde_json::json!({ "amount": n, "pad": "x".repeat(60) }))
            .unwrap()
    };
    for i in 0..600u64 {
        store
            .append(&format!("acct-{}", i % 5), ExpectedVersion::Any, vec![event(i)])
            .await
            .unwrap();
        if i == 120 {
            store
                .set_stream_metadata(
                    "acct-1",
                    StreamMetadata { max_count: Some(5), ..Default::default() },
                )
                .await
                .unwrap();
            store
                .set_stream_metadata(
                    "quiet",
                    StreamMetadata { truncate_before: Some(3), ..Default::default() },
                )
                .await
                .unwrap();
        }
    }
    assert!(segment_files(dir.path()).len() >= 4, "the test needs sealed segments");
    let infos = |store: EmbeddedStore| async move {
        let mut out = Vec::new();
        for s in ["acct-0", "acct-1", "acct-4", "quiet", "$$acct-1"] {
            let i = store.stream_info(s).await.unwrap();
            let read = store
                .read_stream(s, ReadStreamOptions::forward())
                .await
                .map(|e| e.len())
                .unwrap_or(usize::MAX);
            out.push(format!(
                "{s}: v{} {:?} {:?} at {:?}, reads {read}",
                i.version, i.state, i.metadata, i.last_position
            ));
        }
        out
    };
    let before = infos(store.clone()).await;
    assert!(
        before[1].contains("max_count: Some(5)") && before[1].ends_with("reads 5"),
        "{before:?}"
    );
    drop(store);
    let report = EmbeddedStore::reindex(dir.path()).unwrap();
    assert!(!report.from_snapshot && !report.rebuilt_indexes.is_empty(), "{report:?}");
    let store = EmbeddedStore::open_with(dir.path(), options()).unwrap();
    assert_eq!(infos(store.clone()).await, before);
    // Appends go on at the right versions.
    let next = store.append("acct-1", ExpectedVersion::Exact(120), vec![event(1)]).await.unwrap();
    assert_eq!(next.next_version, 121);
}

/// The scrubber reads every sealed segment, but what it alone brought into
/// the page cache is dropped again, while pages readers had cached stay.
#[tokio::test]
async fn the_scrubber_leaves_the_page_cache_as_readers_had_it() {
    let dir = tempfile::tempdir().unwrap();
    // The first pass starts a second after open: time to make the cache cold.
    let scrub = cairn_log::ScrubOptions {
        bytes_per_sec: 1 << 30,
        pause: std::time::Duration::from_secs(1),
    };
    let options = Options { segment_bytes: 4 << 20, scrub, ..options() };
    let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
    for i in 0..400u64 {
        let batch = (0..100)
            .map(|k| {
                NewEvent::json(
                    "Deposited",
                    &serde_json::json!({ "amount": i * 100 + k, "pad": "x".repeat(200) }),
                )
                .unwrap()
            })
            .collect();
        store.append(&format!("acct-{}", i % 6), ExpectedVersion::Any, batch).await.unwrap();
    }
    drop(store);
    let sealed: Vec<PathBuf> = {
        let s = segment_files(dir.path());
        s[..s.len() - 1].to_vec()
    };
    assert!(sealed.len() >= 2, "the test needs sealed segments");
    let resident = |path: &Path| -> Vec<bool> {
        let f = fs::File::open(path).unwrap();
        // SAFETY: a read-only map of a file nothing writes while the test runs.
        let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let mut flags = vec![0u8; map.len().div_ceil(4096)];
        // SAFETY: one byte per page of a live mapping.
        assert_eq!(
            unsafe {
                libc::mincore(map.as_ptr() as *mut libc::c_void, map.len(), flags.as_mut_ptr())
            },
            0
        );
        flags.iter().map(|f| f & 1 == 1).collect()
    };
    let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
    // Opening reads each segment's header, and the kernel's read-ahead (8 MiB
    // on some disks) brings much more in: drop it all again, as if cold.
    for path in &sealed {
        let f = fs::File::open(path).unwrap();
        // SAFETY: advice on an open file.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
                0,
                libc::POSIX_FADV_DONTNEED,
            )
        };
    }
    // What stays is what the store keeps mapped (pages around the segment's
    // last one, which open reads); a file system that cannot drop pages
    // (tmpfs) keeps everything.
    let cold = resident(&sealed[0]);
    if cold.iter().filter(|r| **r).count() * 4 > cold.len() {
        eprintln!("skipped: this file system keeps files in the page cache regardless (tmpfs?)");
        return;
    }
    // A reader's page, read without read-ahead (which would bring in megabytes).
    let reader = fs::File::open(&sealed[0]).unwrap();
    // SAFETY: advice on an open file.
    unsafe {
        libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&reader), 0, 0, libc::POSIX_FADV_RANDOM)
    };
    let mut page = [0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&reader, &mut page, 40 * 4096).unwrap();
    assert!(resident(&sealed[0])[40], "the reader's page is cached");
    let stats = store.stats();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while stats.scrub_passes.load(Ordering::Relaxed) < 1 {
        assert!(std::time::Instant::now() < deadline, "no scrub pass");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(stats.scrub_errors.load(Ordering::Relaxed), 0);
    for path in &sealed {
        let after = resident(path);
        let pages = after.len();
        let cached = after.iter().filter(|r| **r).count();
        // Only pages readers had cached stay (and what the store keeps mapped).
        assert!(
            cached * 4 < pages,
            "{}: {cached} of {pages} pages still cached after the scrub",
            path.display()
        );
    }
    assert!(resident(&sealed[0])[40], "the reader's page stayed cached");
}

/// Merged index files in the log directory: (path, first base, end).
fn merged_files(dir: &Path) -> Vec<(PathBuf, u64, u64)> {
    let mut out: Vec<_> = fs::read_dir(dir.join("log"))
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name()?.to_str()?.strip_suffix(".idx")?.to_string();
            let (a, b) = name.split_once('-')?;
            Some((path.clone(), a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    out.sort();
    out
}

fn merging(fanout: usize) -> Options {
    Options {
        segment_bytes: 8 * 1024,
        merge: cairn_log::MergeOptions { fanout, max_segments: 4 },
        ..options()
    }
}

/// Neighbouring index files are merged in the background, tiered (two
/// singles into one of two, two of those into one of four); lookups, ids,
/// queries, reopen and verify go through the merged file; a crash that left
/// both a merged file and the files it covers is settled at open; damage
/// in a merged file splits it into one file per segment again.
#[tokio::test]
async fn neighbouring_index_files_are_merged_and_answer_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open_with(dir.path(), merging(2)).unwrap();
    let first_id = uuid::Uuid::now_v7();
    let early = NewEvent::json("Opened", &serde_json::json!({ "n": 0 })).unwrap().with_id(first_id);
    let first = store.append("early", ExpectedVersion::Any, vec![early.clone()]).await.unwrap();
    fill(&store).await;
    let live = answers(&store).await;
    let sealed = segment_files(dir.path()).len() - 1;
    assert!(sealed >= 5, "the test needs five sealed segments: {sealed}");
    // Tiered: each run of four segments gets one file, two left over one of two, one left over its own.
    let parts = sealed / 4 + (sealed % 4) / 2 + sealed % 2;
    let all_index_files = || {
        fs::read_dir(dir.path().join("log"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "idx"))
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while all_index_files() != parts {
        assert!(
            std::time::Instant::now() < deadline,
            "{sealed} sealed segments, {parts} files expected: {:?}",
            merged_files(dir.path())
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        store.stats().index_merges.load(Ordering::Relaxed) as usize,
        sealed - parts,
        "each merge of two makes one file less"
    );
    assert_eq!(answers(&store).await, live, "reads through the merged files answer as before");
    // An identical retry of the first event, now in a merged file, writes nothing; another use of its id is refused.
    assert_eq!(
        store.append("early", ExpectedVersion::Any, vec![early.clone()]).await.unwrap(),
        first
    );
    let other = NewEvent::json("Opened", &serde_json::json!({ "n": 1 })).unwrap().with_id(first_id);
    assert!(matches!(
        store.append("other", ExpectedVersion::Any, vec![other]).await,
        Err(StoreError::IdempotencyConflict { .. })
    ));
    drop(store);
    let (merged_path, start, end) = merged_files(dir.path())[0].clone();
    let covered: Vec<PathBuf> = segment_files(dir.path())
        .into_iter()
        .filter(|s| {
            let base: u64 = s.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            (start..end).contains(&base)
        })
        .collect();
    assert_eq!((start, covered.len()), (0, 4), "the oldest four segments are in one file");
    assert!(
        covered.iter().all(|s| !PathBuf::from(format!("{}.idx", s.display())).exists()),
        "the covered segments' own files are gone"
    );

    // Reopen: the merged file is used as it is, and verify checks it against its four segments.
    let store = EmbeddedStore::open_with(dir.path(), merging(0)).unwrap();
    let report = store.open_report().clone();
    assert!(report.rebuilt_indexes.is_empty(), "{report:?}");
    assert_eq!(
        report.index_files, parts,
        "a merged file stands for the segments it covers: {report:?}"
    );
    assert_eq!(answers(&store).await, live);
    drop(store);
    assert_eq!(cairn_log::verify(dir.path(), |_, _| {}).unwrap().index_files, parts);

    // A crash after the merged file was renamed into place but before the
    // files it covers were removed: open prefers the merged file and removes them.
    let merged_bytes = fs::read(&merged_path).unwrap();
    fs::remove_file(&merged_path).unwrap();
    let store = EmbeddedStore::open_with(dir.path(), merging(0)).unwrap();
    assert_eq!(
        store.open_report().rebuilt_indexes.len(),
        4,
        "the four segments get their own files again"
    );
    drop(store);
    fs::write(&merged_path, &merged_bytes).unwrap();
    let store = EmbeddedStore::open_with(dir.path(), merging(0)).unwrap();
    assert_eq!(
        (store.open_report().index_files, store.open_report().rebuilt_indexes.len()),
        (parts, 0)
    );
    assert_eq!(answers(&store).await, live);
    drop(store);
    for s in &covered {
        assert!(
            !PathBuf::from(format!("{}.idx", s.display())).exists(),
            "{} was removed",
            s.display()
        );
    }

    // verify names a damaged merged file.
    let good = merged_bytes;
    flip(&merged_path, good.len() as u64 / 2);
    match cairn_log::verify(dir.path(), |_, _| {}) {
        Err(StoreError::Corrupt { file, .. }) => assert_eq!(Path::new(&file), merged_path),
        other => panic!("verify of a damaged merged file: {other:?}"),
    }
    // Damage a lookup finds: the merged file is split into one file per segment.
    let store = EmbeddedStore::open_with(dir.path(), merging(0)).unwrap();
    assert_eq!(answers(&store).await, live);
    assert!(store.stats().index_rebuilds.load(Ordering::Relaxed) >= 1);
    drop(store);
    assert!(!merged_path.exists());
    assert!(covered.iter().all(|s| PathBuf::from(format!("{}.idx", s.display())).exists()));
    // Damage open sees (its header): reported, and the segments indexed one by one.
    fs::write(&merged_path, &good).unwrap();
    flip(&merged_path, 20);
    let store = EmbeddedStore::open_with(dir.path(), merging(0)).unwrap();
    let rebuilt = &store.open_report().rebuilt_indexes;
    assert!(
        rebuilt.iter().any(|(p, why)| *p == merged_path && why.contains("header checksum")),
        "{rebuilt:?}"
    );
    assert_eq!(answers(&store).await, live);
    drop(store);
    assert!(!merged_path.exists(), "a damaged merged file is removed");
    // Merging again gives the same file, byte for byte.
    let store = EmbeddedStore::open_with(dir.path(), merging(2)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !merged_path.exists() {
        assert!(std::time::Instant::now() < deadline, "merged again");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(answers(&store).await, live);
    drop(store);
    assert_eq!(fs::read(&merged_path).unwrap(), good, "a merge is deterministic");
}

/// Waits (a few seconds at most) until `f` holds; the flushes run on the indexer thread.
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{what} did not happen");
}

#[tokio::test]
async fn stream_summaries_live_in_stream_tables_and_memory_holds_only_recent_ones() {
    const STREAMS: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let options = Options { summaries_in_memory: 100, ..Options::default() };
    let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
    let name = |i: usize| format!("acct-{i:05}");
    for i in 0..STREAMS {
        let events = (0..1 + i % 3).map(|_| NewEvent::json_bytes("Deposited", "{}")).collect();
        store.append(&name(i), ExpectedVersion::NoStream, events).await.unwrap();
        if i % 500 == 7 {
            store
                .set_stream_metadata(
                    &name(i),
                    StreamMetadata { max_count: Some(1), ..Default::default() },
                )
                .await
                .unwrap();
        }
        if i % 700 == 3 {
            store.delete_stream(&name(i), ExpectedVersion::Any, i % 1400 == 3).await.unwrap();
        }
    }
    eventually("a flush", || store.summaries_layout().0 < 300).await;
    let (in_memory, tables) = store.summaries_layout();
    assert!((1..=9).contains(&tables), "{tables} tables");
    assert!(store.stats().stream_tables_written.load(Ordering::Relaxed) >= 10);
    assert!(store.stats().stream_table_merges.load(Ordering::Relaxed) >= 1);
    eprintln!("{STREAMS} streams: {in_memory} summaries in memory, {tables} tables");

    let check = |store: EmbeddedStore| async move {
        for i in (0..STREAMS).step_by(37).chain([7, 507, 3, 703, STREAMS - 1]) {
            let got = store.stream_info(&name(i)).await;
            match i {
                _ if i % 1400 == 3 => assert!(matches!(
                    store.read_stream(&name(i), ReadStreamOptions::forward()).await,
                    Err(StoreError::StreamDeleted { .. })
                )),
                _ if i % 700 == 3 => assert!(
                    matches!(
                        store.read_stream(&name(i), ReadStreamOptions::forward()).await,
                        Err(StoreError::StreamNotFound { .. })
                    ),
                    "{i}"
                ),
                _ => {
                    let info = got.unwrap();
                    assert_eq!(info.version, 1 + i as u64 % 3, "{i}");
                    assert_eq!(info.metadata.max_count, (i % 500 == 7).then_some(1), "{i}");
                    let read =
                        store.read_stream(&name(i), ReadStreamOptions::forward()).await.unwrap();
                    assert_eq!(read.len(), if i % 500 == 7 { 1 } else { 1 + i % 3 }, "{i}");
                }
            }
        }
        // Listing walks the tables and memory at once, in name order.
        let listed: Vec<String> = store
            .list_streams("acct-01", 20)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.stream)
            .collect();
        assert_eq!(listed, (1000..1020).map(name).collect::<Vec<_>>());
        assert_eq!(store.list_streams("acct-", usize::MAX).await.unwrap().len(), STREAMS);
        assert!(store.list_streams("$$", usize::MAX).await.unwrap().len() >= 6);
        assert!(matches!(
            store.stream_info("acct-x").await,
            Err(StoreError::StreamNotFound { .. })
        ));
    };
    check(store.clone()).await;
    drop(store);

    // Reopened: from the tables, nothing replayed, little in memory.
    let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
    let report = store.open_report().clone();
    assert!(
        report.from_snapshot && report.scanned_events == 0 && report.stream_tables >= 1,
        "{report:?}"
    );
    assert_eq!(store.summaries_layout().0, 0);
    check(store.clone()).await;
    drop(store);
    assert!(cairn_log::verify(dir.path(), |_, _| {}).unwrap().stream_tables >= 1);

    // Damage in a block open does not read (the first entries of the
    // base): found by the lookup that touches it, rebuilt from the log,
    // and the lookup answers.
    let base = crate::common::stream_tables(dir.path())
        .into_iter()
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with("00000000000000000000-"))
        .unwrap();
    let mut bytes = fs::read(&base).unwrap();
    bytes[512 + 30] ^= 0x10;
    fs::write(&base, &bytes).unwrap();
    let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
    assert!(store.open_report().rebuilt_indexes.is_empty(), "{:?}", store.open_report());
    assert_eq!(store.stream_info(&name(1)).await.unwrap().version, 2);
    assert_eq!(store.stats().index_rebuilds.load(Ordering::Relaxed), 1);
    check(store.clone()).await;
    drop(store);
    cairn_log::verify(dir.path(), |_, _| {}).unwrap();
}
