//! Recovery from damaged files, done to the real segment files on disk: a torn
//! tail is cut back to the last whole append (and reported), corruption
//! anywhere else refuses to open and changes nothing, `verify` agrees with
//! `open`, and the LOCK file keeps a second opener out.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_core::{
    EventStore, ExpectedVersion, NewEvent, ReadAllOptions, ReadStreamOptions, RecordedEvent,
    StoreError,
};
use cairn_log::{EmbeddedStore, Options, verify};

use crate::common::{
    SEGMENT_HEADER, as_if_crashed, reopen, save_mark, segment_files, walk_records,
};

/// Small preallocated segments, so reading a whole segment file is cheap.
const SEG_BYTES: u64 = 1 << 20;

fn opts() -> Options {
    Options { segment_bytes: SEG_BYTES, ..Options::default() }
}

fn open(dir: &Path) -> EmbeddedStore {
    reopen(dir, opts()).expect("open store")
}

fn ev(n: u64, pad: usize) -> NewEvent {
    NewEvent::json("Tested", &serde_json::json!({"n": n, "pad": "p".repeat(pad)})).unwrap()
}

async fn all(store: &EmbeddedStore) -> Vec<RecordedEvent> {
    store.read_all(ReadAllOptions::forward()).await.expect("read_all")
}

async fn stream(store: &EmbeddedStore, s: &str) -> Vec<RecordedEvent> {
    store.read_stream(s, ReadStreamOptions::forward()).await.expect("read_stream")
}

#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Zero the bytes (the active segment is preallocated: this is what an
    /// unfinished write into it looks like).
    Zero,
    /// Truncate the file (a file system that lost the end of the file).
    Truncate,
}

/// Destroys the bytes `from..to` of `path` (truncating destroys everything from `from`).
fn cut(path: &Path, from: u64, to: u64, how: Cut) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    match how {
        Cut::Zero => f.write_all_at(&vec![0u8; (to - from) as usize], from).unwrap(),
        Cut::Truncate => f.set_len(from).unwrap(),
    }
    f.sync_all().unwrap();
}

fn flip(path: &Path, offset: u64) {
    let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], offset).unwrap();
    f.sync_all().unwrap();
}

/// Bytes a torn tail starting at `start` holds: up to the last non-zero byte.
fn nonzero_tail(bytes: &[u8], start: u64) -> u64 {
    bytes[start as usize..].iter().rposition(|b| *b != 0).map_or(0, |i| i as u64 + 1)
}

/// Every file of the data directory and its bytes (a snapshot of the disk).
fn disk(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    for sub in [dir.to_path_buf(), dir.join("log")] {
        for e in fs::read_dir(&sub).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                let bytes = fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}

fn assert_corrupt<T>(
    result: Result<T, StoreError>,
    file: &Path,
    offset: u64,
    what: &str,
) -> String {
    match result {
        Err(StoreError::Corrupt { file: f, offset: o, reason }) => {
            assert_eq!(
                Path::new(&f),
                file,
                "{what}: the error names the damaged segment ({reason})"
            );
            assert_eq!(o, offset, "{what}: the error gives the damaged record's offset ({reason})");
            reason
        }
        Err(e) => panic!("{what}: expected Corrupt in {} at {offset}, got {e:?}", file.display()),
        Ok(_) => {
            panic!("{what}: expected Corrupt in {} at {offset}, but it succeeded", file.display())
        }
    }
}

// ---------------------------------------------------------------------------
// (a) torn tail

/// The real disk, noting every `set_len` that would make a file shorter:
/// a map of it in another process (`cairn verify` of an open store) would
/// lose those pages and die of SIGBUS.
#[derive(Debug, Default)]
struct NoShrink {
    shrunk: std::sync::Mutex<Vec<(u64, u64)>>,
}

impl cairn_log::Storage for NoShrink {
    fn set_len(&self, file: &fs::File, len: u64) -> std::io::Result<()> {
        let was = file.metadata()?.len();
        if len < was {
            self.shrunk.lock().unwrap().push((was, len));
        }
        file.set_len(len)
    }
}

/// Appends a few events, then one last event; cuts that last record at
/// `keep` bytes into it; checks what `verify` and `open` make of it.
async fn torn_tail_case(how: Cut, keep: fn(u64) -> u64) {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = open(dir.path());
        for i in 0..3 {
            store.append("a", ExpectedVersion::Exact(i), vec![ev(i, 10)]).await.unwrap();
        }
        store.append("b", ExpectedVersion::NoStream, vec![ev(10, 50), ev(11, 5)]).await.unwrap();
        store.append("c", ExpectedVersion::Any, vec![ev(20, 0)]).await.unwrap();
        let before = all(&store).await;
        assert_eq!(before.len(), 6);
        before
    };
    // The last append is one a crash catches before the durable mark covers it.
    let mark = save_mark(dir.path());
    let p = {
        let store = open(dir.path());
        let last = store.append("a", ExpectedVersion::Exact(3), vec![ev(99, 301)]).await.unwrap();
        assert_eq!(last.next_version, 4);
        last.position.0
    };
    as_if_crashed(dir.path(), &mark);
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    let seg = &files[0];
    let original = fs::read(seg).unwrap();
    let records = walk_records(&original);
    let &(last_at, len) = records.last().unwrap();
    assert_eq!(last_at, p, "the first segment's base is 0: a position is a file offset");
    assert_eq!(records.len(), 7);
    let k = keep(len);
    assert!(k > 0 && k < len);
    cut(seg, p + k, p + len, how);

    let cut_bytes = fs::read(seg).unwrap();
    assert_ne!(cut_bytes, original, "test setup: the cut destroys bytes of the record");
    let torn = nonzero_tail(&cut_bytes, p);
    assert!(torn > 0, "test setup: the kept part of the record has non-zero bytes");

    // verify reports the torn tail and changes nothing.
    let report = verify(dir.path(), |_, _| {}).expect("a torn tail is not corruption");
    assert_eq!(report.torn_tail, Some((seg.clone(), p, torn)), "{how:?} keep {k}/{len}");
    assert_eq!(report.events, 6);
    assert_eq!(fs::read(seg).unwrap(), cut_bytes, "verify must not modify the segment");

    let watch = Arc::new(NoShrink::default());
    let store =
        reopen(dir.path(), Options { storage: watch.clone(), ..opts() }).expect("open store");
    assert_eq!(*watch.shrunk.lock().unwrap(), vec![], "the repair cut a file short");
    let r = store.open_report().clone();
    assert!(r.truncated_bytes > 0);
    assert_eq!(r.truncated_bytes, torn, "{how:?} keep {k}/{len}");
    assert_eq!(r.truncated_at, Some((seg.clone(), p)));
    assert_eq!(r.events, 6);
    assert_eq!(all(&store).await, before, "everything before the torn append is intact");
    assert_eq!(store.stream_info("a").await.unwrap().version, 3);
    assert_eq!(stream(&store, "a").await.len(), 3);
    assert_eq!(store.head_position().await.unwrap().0, p);
    // The tail is zeroed on disk, durably, up to the full segment capacity again.
    let fixed = fs::read(seg).unwrap();
    assert_eq!(fixed.len() as u64, SEG_BYTES);
    assert_eq!(
        &fixed[..p as usize],
        &original[..p as usize],
        "bytes before the tail are untouched"
    );
    assert!(fixed[p as usize..].iter().all(|b| *b == 0), "the torn tail is zeroed");

    // Appends work again; the next record goes where the torn one was.
    let again = store.append("a", ExpectedVersion::Exact(3), vec![ev(100, 7)]).await.unwrap();
    assert_eq!(again.next_version, 4);
    assert_eq!(again.position.0, p);
    let expected = all(&store).await;
    assert_eq!(expected.len(), 7);
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.open_report().truncated_bytes, 0);
    assert_eq!(store.open_report().truncated_at, None);
    assert_eq!(all(&store).await, expected, "still there after another reopen");
    assert_eq!(
        stream(&store, "a").await.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(stream(&store, "b").await.len(), 2);
}

#[tokio::test]
async fn torn_tail_zeroed_is_cut() {
    for keep in [|_| 1, |_| 4, |_| 7, |_| 8, |l| l / 2, |l| l - 4, |l| l - 3] as [fn(u64) -> u64; 7]
    {
        torn_tail_case(Cut::Zero, keep).await;
    }
}

#[tokio::test]
async fn torn_tail_truncated_file_is_cut() {
    for keep in [|_| 1, |_| 4, |_| 7, |_| 8, |l| l / 2, |l| l - 4, |l| l - 3] as [fn(u64) -> u64; 7]
    {
        torn_tail_case(Cut::Truncate, keep).await;
    }
}

// ---------------------------------------------------------------------------
// (b) an incomplete batch

/// The last append is a batch of three records; its bytes are destroyed from
/// `from_record` (0-based) at `keep` bytes into that record.
async fn incomplete_batch_case(how: Cut, from_record: usize, keep: fn(u64) -> u64) {
    let dir = tempfile::tempdir().unwrap();
    let batch = vec![ev(1, 40), ev(2, 120), ev(3, 33)];
    let before = {
        let store = open(dir.path());
        store.append("a", ExpectedVersion::NoStream, vec![ev(0, 3)]).await.unwrap();
        store.append("b", ExpectedVersion::NoStream, vec![ev(0, 3)]).await.unwrap();
        store.append("a", ExpectedVersion::Exact(1), vec![ev(0, 3), ev(0, 4)]).await.unwrap();
        all(&store).await
    };
    let mark = save_mark(dir.path());
    let result = {
        let store = open(dir.path());
        let r = store.append("b", ExpectedVersion::Exact(1), batch.clone()).await.unwrap();
        assert_eq!(r.next_version, 4);
        r
    };
    as_if_crashed(dir.path(), &mark);
    let seg = segment_files(dir.path()).remove(0);
    let original = fs::read(&seg).unwrap();
    let records = walk_records(&original);
    assert_eq!(records.len(), 7);
    let batch_records = &records[4..];
    let batch_start = batch_records[0].0;
    let (at, len) = batch_records[from_record];
    let from = at + keep(len);
    let used_end = batch_records[2].0 + batch_records[2].1;
    assert_eq!(result.position.0, batch_records[2].0);
    cut(&seg, from, used_end, how);
    let torn = nonzero_tail(&fs::read(&seg).unwrap(), batch_start);
    let what = format!("{how:?}, record {from_record} cut at {}/{len}", keep(len));

    let report = verify(dir.path(), |_, _| {}).expect("an incomplete last append is a torn tail");
    assert_eq!(report.torn_tail, Some((seg.clone(), batch_start, torn)), "{what}");

    let store = open(dir.path());
    let r = store.open_report().clone();
    assert!(r.truncated_bytes > 0, "{what}");
    assert_eq!(r.truncated_bytes, torn, "{what}");
    assert_eq!(r.truncated_at, Some((seg.clone(), batch_start)), "{what}: the whole batch is cut");
    assert_eq!(all(&store).await, before, "{what}: none of the batch, nothing else lost");
    assert_eq!(store.stream_info("b").await.unwrap().version, 1, "{what}");
    let ids: Vec<_> = all(&store).await.iter().map(|e| e.id).collect();
    assert!(batch.iter().all(|e| !ids.contains(&e.id)), "{what}");

    // The client never got an answer, so it retries the same batch: it is
    // written anew (the cut ids were forgotten), at the same versions and place.
    let retry = store.append("b", ExpectedVersion::Exact(1), batch.clone()).await.unwrap();
    assert_eq!(retry, result, "{what}");
    let b = stream(&store, "b").await;
    assert_eq!(
        b.iter().map(|e| e.id).collect::<Vec<_>>()[1..],
        batch.iter().map(|e| e.id).collect::<Vec<_>>()[..]
    );
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.open_report().truncated_bytes, 0);
    assert_eq!(stream(&store, "b").await, b, "{what}");
}

#[tokio::test]
async fn incomplete_batch_is_cut_whole() {
    for how in [Cut::Zero, Cut::Truncate] {
        // Inside the second record, at several depths.
        for keep in [|_| 2, |l| l / 2, |l| l - 4, |l| l - 1] as [fn(u64) -> u64; 4] {
            incomplete_batch_case(how, 1, keep).await;
        }
        // On record boundaries: the first one or two records are whole and
        // valid, but the record carrying the end-of-append flag is missing.
        incomplete_batch_case(how, 1, |_| 0).await;
        incomplete_batch_case(how, 2, |_| 0).await;
    }
}

// ---------------------------------------------------------------------------
// (c) a flipped byte in an early record, (e) verify agrees

async fn populate(store: &EmbeddedStore, events: u64, pad: usize) {
    let mut versions = [0u64; 3];
    let (mut i, mut appends) = (0, 0);
    while i < events {
        let s = appends % 3;
        appends += 1;
        let n = (1 + (i * 7) % 3).min(events - i);
        let batch = (0..n).map(|k| ev(i + k, pad + (i as usize * 7) % 50)).collect();
        let r = store
            .append(&format!("s{s}"), ExpectedVersion::Exact(versions[s]), batch)
            .await
            .unwrap();
        versions[s] = r.next_version;
        i += n;
    }
}

#[tokio::test]
async fn flipped_byte_in_early_record_refuses_to_open_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = open(dir.path());
        populate(&store, 24, 20).await;
        all(&store).await
    };
    let seg = segment_files(dir.path()).remove(0);
    let records = walk_records(&fs::read(&seg).unwrap());
    assert_eq!(records.len(), 24);
    for (i, &(at, len)) in [records[0], records[3], records[10]].iter().enumerate() {
        // Length field (low and high byte), checksum, body start, middle and end, trailer.
        for delta in [0, 3, 5, 8, 9, len / 2, len - 5, len - 4, len - 1] {
            let what = format!("record {i} at {at} (len {len}), byte +{delta}");
            flip(&seg, at + delta);
            let damaged = disk(dir.path());
            assert_corrupt(reopen(dir.path(), opts()), &seg, at, &what);
            assert!(disk(dir.path()) == damaged, "{what}: a failed open must not change any file");
            // verify says the same.
            assert_corrupt(verify(dir.path(), |_, _| {}), &seg, at, &format!("verify, {what}"));
            assert!(disk(dir.path()) == damaged, "{what}: verify must not change any file");
            flip(&seg, at + delta);
        }
    }
    // Nothing was touched: with the bytes restored, everything is there.
    let store = open(dir.path());
    assert_eq!(store.open_report().truncated_bytes, 0);
    assert_eq!(all(&store).await, before);
}

#[tokio::test]
async fn flipped_byte_skipped_by_open_without_verify_fails_the_read() {
    let dir = tempfile::tempdir().unwrap();
    let small = Options { segment_bytes: 8 * 1024, verify_on_open: false, ..opts() };
    {
        let store = reopen(dir.path(), small.clone()).unwrap();
        populate(&store, 150, 40).await;
    } // clean close: the stream tables cover the whole log
    let files = segment_files(dir.path());
    assert!(files.len() >= 3, "several segments: {files:?}");
    let seg = files[0].clone();
    let records = walk_records(&fs::read(&seg).unwrap());
    let (at, len) = records[2];
    flip(&seg, at + len / 2);
    let store = reopen(dir.path(), small)
        .expect("without verify_on_open the records of indexed sealed segments are not checked");
    assert!(store.open_report().from_snapshot);
    assert_eq!(
        store.open_report().rebuilt_indexes,
        vec![],
        "the damage is not near the segment's end, so its index file still fits"
    );
    let victim = {
        // Find which stream the damaged record belongs to: the one whose read fails.
        let mut failed = vec![];
        for s in ["s0", "s1", "s2"] {
            match store.read_stream(s, ReadStreamOptions::forward()).await {
                Ok(_) => {}
                Err(e) => failed.push((s, e)),
            }
        }
        assert_eq!(failed.len(), 1, "exactly one stream holds the damaged record: {failed:?}");
        failed.remove(0)
    };
    assert_corrupt(Err::<(), _>(victim.1), &seg, at, "read_stream of the damaged record");
    assert_corrupt(
        store.read_all(ReadAllOptions::forward()).await,
        &seg,
        at,
        "read_all over the damaged record",
    );
    // Reads that avoid the record still work.
    let tail = store.read_all(ReadAllOptions::backward().limit(3)).await.unwrap();
    assert_eq!(tail.len(), 3);
}

// ---------------------------------------------------------------------------
// (d) corruption in a sealed segment

#[tokio::test]
async fn corruption_in_sealed_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let small = Options { segment_bytes: 64 * 1024, ..Options::default() };
    let before = {
        let store = EmbeddedStore::open_with(dir.path(), small.clone()).unwrap();
        populate(&store, 240, 1000).await;
        all(&store).await
    };
    assert_eq!(before.len(), 240);
    let files = segment_files(dir.path());
    assert!(files.len() >= 3, "expected several segments, got {}", files.len());
    let seg0 = files[0].clone();
    let seg1 = files[1].clone();
    let bytes0 = fs::read(&seg0).unwrap();
    let records0 = walk_records(&bytes0);
    let (last_at, last_len) = *records0.last().unwrap();
    assert_eq!(
        last_at + last_len,
        bytes0.len() as u64,
        "a sealed segment is trimmed to its records"
    );
    let records1 = walk_records(&fs::read(&seg1).unwrap());
    // Open checks every record of sealed segments only when asked to;
    // otherwise `verify`, the scrubber and reads catch damage there.
    let open_small = || reopen(dir.path(), Options { verify_on_open: true, ..small.clone() });

    // A flipped byte in the last record of a sealed segment: in the last
    // segment this would look like a torn tail, here it is corruption.
    flip(&seg0, last_at + last_len / 2);
    let damaged = disk(dir.path());
    let reason =
        assert_corrupt(open_small(), &seg0, last_at, "flip in the last record of sealed segment 0");
    assert!(reason.contains("sealed"), "{reason}");
    assert_corrupt(
        verify(dir.path(), |_, _| {}),
        &seg0,
        last_at,
        "verify, flip in sealed segment 0",
    );
    assert!(disk(dir.path()) == damaged, "a failed open must not change any file");
    flip(&seg0, last_at + last_len / 2);

    // The same record zeroed from its middle: a "torn tail" inside a sealed segment.
    cut(&seg0, last_at + last_len / 2, last_at + last_len, Cut::Zero);
    let damaged = disk(dir.path());
    assert_corrupt(open_small(), &seg0, last_at, "zeroed end of sealed segment 0");
    assert_corrupt(
        verify(dir.path(), |_, _| {}),
        &seg0,
        last_at,
        "verify, zeroed end of sealed segment 0",
    );
    assert!(disk(dir.path()) == damaged);
    fs::write(&seg0, &bytes0).unwrap();

    // A flipped byte in the first record of the middle segment.
    flip(&seg1, records1[0].0 + 30);
    let damaged = disk(dir.path());
    assert_corrupt(open_small(), &seg1, SEGMENT_HEADER, "flip in sealed segment 1");
    assert_corrupt(
        verify(dir.path(), |_, _| {}),
        &seg1,
        SEGMENT_HEADER,
        "verify, flip in sealed segment 1",
    );
    {
        // Without the full check, open trusts the segment's index file, and
        // a read of the damaged record fails, naming it.
        let store = reopen(dir.path(), small.clone()).expect("open without verify_on_open");
        assert_corrupt(
            store.read_all(ReadAllOptions::forward()).await,
            &seg1,
            SEGMENT_HEADER,
            "read_all over sealed segment 1",
        );
    }
    let segments_of = |d: Vec<(PathBuf, Vec<u8>)>| {
        d.into_iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "seg")).collect::<Vec<_>>()
    };
    assert!(
        segments_of(disk(dir.path())) == segments_of(damaged),
        "neither open nor the failed read changed a segment"
    );
    flip(&seg1, records1[0].0 + 30);

    // A sealed segment that lost its end, and one that is missing altogether.
    cut(&seg0, last_at + 5, bytes0.len() as u64, Cut::Truncate);
    assert!(
        matches!(open_small(), Err(StoreError::Corrupt { .. })),
        "a shortened sealed segment must not open"
    );
    assert!(matches!(verify(dir.path(), |_, _| {}), Err(StoreError::Corrupt { .. })));
    fs::write(&seg0, &bytes0).unwrap();
    let aside = seg1.with_extension("aside");
    fs::rename(&seg1, &aside).unwrap();
    assert!(
        matches!(open_small(), Err(StoreError::Corrupt { .. })),
        "a missing segment must not open"
    );
    assert!(matches!(verify(dir.path(), |_, _| {}), Err(StoreError::Corrupt { .. })));
    fs::rename(&aside, &seg1).unwrap();

    // Everything restored: it opens with every event, and verify is clean.
    let report = verify(dir.path(), |_, _| {}).unwrap();
    assert_eq!(report.events, 240);
    assert_eq!(report.segments, files.len());
    assert_eq!(report.torn_tail, None);
    let store = open_small().unwrap();
    assert_eq!(store.open_report().truncated_bytes, 0);
    assert_eq!(all(&store).await, before);
}

// ---------------------------------------------------------------------------
// (e) verify on a clean store

#[tokio::test]
async fn verify_clean_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    populate(&store, 30, 5).await;
    store
        .set_stream_metadata(
            "s1",
            cairn_core::StreamMetadata { max_count: Some(2), ..Default::default() },
        )
        .await
        .unwrap();
    // verify needs no lock: it works while the store is open, and after
    // (no file is ever made shorter, so its maps stay whole).
    let report = verify(dir.path(), |_, _| {}).unwrap();
    assert_eq!(
        (report.segments, report.events, report.streams, report.torn_tail),
        (1, 31, 3, None)
    );
    drop(store);
    let mut calls = vec![];
    let report = verify(dir.path(), |done, total| calls.push((done, total))).unwrap();
    assert_eq!(report.events, 31);
    assert_eq!(calls, vec![(1, 1)]);
}

// ---------------------------------------------------------------------------
// (f) the LOCK file

#[tokio::test]
async fn second_open_is_locked_out() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    first.append("a", ExpectedVersion::Any, vec![ev(1, 1)]).await.unwrap();
    match EmbeddedStore::open_with(dir.path(), opts()) {
        Err(StoreError::Locked { dir: d }) => assert_eq!(Path::new(&d), dir.path()),
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(EmbeddedStore::reindex(dir.path()), Err(StoreError::Locked { .. })));
    // A clone keeps the store (and the lock) alive.
    let clone = first.clone();
    drop(first);
    assert!(matches!(EmbeddedStore::open_with(dir.path(), opts()), Err(StoreError::Locked { .. })));
    clone.append("a", ExpectedVersion::Exact(1), vec![ev(2, 1)]).await.unwrap();
    drop(clone);
    let second = open(dir.path());
    assert_eq!(stream(&second, "a").await.len(), 2);
}

// ---------------------------------------------------------------------------
// A roll cut short

/// A roll (writer.rs `roll`) seals the active segment, then creates the next
/// one. Segment::create prepares it under a temporary name and renames it into
/// place, but a filesystem may still surface an empty or all-zero newest
/// segment after a crash. Nothing in it was ever acknowledged: the store must
/// open (and `verify` must pass) as if the roll had not happened.
#[tokio::test]
async fn crash_during_segment_roll_still_opens() {
    for new_len in [0, SEG_BYTES] {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let store = open(dir.path());
            populate(&store, 10, 30).await;
            all(&store).await
        };
        // What the roll leaves on disk at that moment.
        let seg0 = segment_files(dir.path()).remove(0);
        let &(at, len) = walk_records(&fs::read(&seg0).unwrap()).last().unwrap();
        OpenOptions::new().write(true).open(&seg0).unwrap().set_len(at + len).unwrap();
        let next = dir.path().join("log").join(format!("{:020}.seg", at + len));
        fs::File::create(&next).unwrap().set_len(new_len).unwrap();
        // And a roll that died before its rename.
        let tmp = dir.path().join("log").join(format!("{:020}.seg.tmp", at + len));
        fs::write(&tmp, b"CAIRNSEG").unwrap();
        let report =
            cairn_log::verify(dir.path(), |_, _| {}).unwrap_or_else(|e| panic!("verify: {e}"));
        assert_eq!(report.events as usize, before.len());
        assert!(next.exists() && tmp.exists(), "verify changes nothing");

        let store = reopen(dir.path(), opts())
            .unwrap_or_else(|e| panic!("new segment of {new_len} bytes without a header: {e}"));
        assert_eq!(all(&store).await, before);
        assert!(!tmp.exists(), "the leftover of an unfinished roll is removed at open");
        store.append("s0", ExpectedVersion::Any, vec![ev(1, 1)]).await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// (g) damage below the durable mark: acknowledged events are never cut

/// Two appends to `acct-1`, acknowledged and closed cleanly (so the durable
/// mark covers both); then one byte flipped 20 bytes into the second record.
/// That is not a torn write: the store must refuse to open, naming the file
/// and the record's offset, and change nothing; `verify` must agree.
#[tokio::test]
async fn damage_in_the_newest_acknowledged_append_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let second = {
        let store = open(dir.path());
        store.append("acct-1", ExpectedVersion::NoStream, vec![ev(1, 10)]).await.unwrap();
        store.append("acct-1", ExpectedVersion::Exact(1), vec![ev(2, 10)]).await.unwrap().position.0
    };
    let seg = segment_files(dir.path()).remove(0);
    for how in ["flip", "zero"] {
        match how {
            "flip" => flip(&seg, second + 20),
            _ => cut(&seg, second + 20, second + 40, Cut::Zero),
        }
        let damaged = disk(dir.path());
        let reason = assert_corrupt(reopen(dir.path(), opts()), &seg, second, how);
        assert!(
            reason.contains("acknowledged") && reason.contains("checkpoint"),
            "{how}: {reason}"
        );
        assert!(disk(dir.path()) == damaged, "{how}: a refused open changes nothing");
        assert_corrupt(verify(dir.path(), |_, _| {}), &seg, second, &format!("verify, {how}"));
        assert!(disk(dir.path()) == damaged, "{how}: verify changes nothing");
        // A second attempt refuses the same way (nothing was cut the first time).
        assert_corrupt(reopen(dir.path(), opts()), &seg, second, how);
        if how == "flip" {
            flip(&seg, second + 20);
            let store = open(dir.path());
            assert_eq!(
                stream(&store, "acct-1").await.len(),
                2,
                "with the byte restored, both events are there"
            );
        }
    }
}

/// The end of the log goes missing: the active segment truncated at a record
/// boundary, the newest of three segments removed, the only segment removed.
/// Each open refuses and changes nothing; putting the files back opens with
/// every event (a sealed segment is never re-extended because a later one is
/// missing).
#[tokio::test]
async fn a_missing_log_end_refuses_to_open_and_the_files_can_be_put_back() {
    // The active segment truncated at a record boundary.
    let dir = tempfile::tempdir().unwrap();
    let before = {
        let store = open(dir.path());
        for i in 0..20 {
            store.append("s", ExpectedVersion::Any, vec![ev(i, 10)]).await.unwrap();
        }
        all(&store).await
    };
    let seg = segment_files(dir.path()).remove(0);
    let original = fs::read(&seg).unwrap();
    let records = walk_records(&original);
    let (at, _) = records[records.len() - 3];
    cut(&seg, at, 0, Cut::Truncate);
    let damaged = disk(dir.path());
    let reason =
        assert_corrupt(reopen(dir.path(), opts()), &seg, at, "truncated at a record boundary");
    assert!(reason.contains("ends early"), "{reason}");
    assert!(disk(dir.path()) == damaged, "nothing changed");
    assert!(verify(dir.path(), |_, _| {}).is_err(), "verify agrees");
    fs::write(&seg, &original).unwrap();
    assert_eq!(all(&open(dir.path())).await, before);

    // The newest of three segments removed, then put back.
    let dir = tempfile::tempdir().unwrap();
    let small = Options { segment_bytes: 16 * 1024, ..Options::default() };
    let before = {
        let store = EmbeddedStore::open_with(dir.path(), small.clone()).unwrap();
        populate(&store, 70, 500).await;
        all(&store).await
    };
    let files = segment_files(dir.path());
    assert!(files.len() >= 3, "{} segments", files.len());
    let newest = files.last().unwrap().clone();
    let aside = dir.path().join("newest.aside");
    fs::rename(&newest, &aside).unwrap();
    let damaged = disk(dir.path());
    let previous = &files[files.len() - 2];
    let previous_len = fs::metadata(previous).unwrap().len();
    match reopen(dir.path(), small.clone()) {
        Err(StoreError::Corrupt { file, reason, .. }) => {
            assert_eq!(
                Path::new(&file),
                previous.as_path(),
                "names the segment the log now ends with"
            );
            assert!(reason.contains("ends early"), "{reason}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|_| ())),
    }
    assert!(disk(dir.path()) == damaged, "nothing changed");
    assert_eq!(
        fs::metadata(previous).unwrap().len(),
        previous_len,
        "the sealed segment is not re-extended"
    );
    fs::rename(&aside, &newest).unwrap();
    let store = EmbeddedStore::open_with(dir.path(), small.clone()).unwrap();
    assert_eq!(all(&store).await, before, "with the segment back, every event is there");
    drop(store);

    // The only segment removed: not an empty store.
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        populate(&store, 5, 10).await;
    }
    let seg = segment_files(dir.path()).remove(0);
    let bytes = fs::read(&seg).unwrap();
    fs::remove_file(&seg).unwrap();
    let damaged = disk(dir.path());
    assert!(
        matches!(reopen(dir.path(), opts()), Err(StoreError::Corrupt { .. })),
        "a store whose only segment is gone must not open empty"
    );
    assert!(disk(dir.path()) == damaged, "nothing changed");
    fs::write(&seg, &bytes).unwrap();
    assert_eq!(all(&open(dir.path())).await.len(), 5);
}

/// A newest segment that is full (its successor's creation was cut short
/// after sealing it) is left as it is: the store starts the next segment.
#[tokio::test]
async fn a_full_newest_segment_is_not_written_again() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        populate(&store, 10, 30).await;
    }
    let seg0 = segment_files(dir.path()).remove(0);
    let &(at, len) = walk_records(&fs::read(&seg0).unwrap()).last().unwrap();
    OpenOptions::new().write(true).open(&seg0).unwrap().set_len(at + len).unwrap();
    let sealed = fs::read(&seg0).unwrap();
    let store = open(dir.path());
    store.append("s0", ExpectedVersion::Any, vec![ev(1, 1)]).await.unwrap();
    drop(store);
    assert_eq!(fs::read(&seg0).unwrap(), sealed, "the sealed segment is unchanged");
    assert_eq!(segment_files(dir.path()).len(), 2);
    assert_eq!(all(&open(dir.path())).await.len(), 11);
}

/// Events are nobody else's business: a new data directory is 0700 and
/// every file the store writes (segments, mark, snapshot, lock) is 0600.
#[tokio::test]
async fn a_new_store_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("data");
    {
        let store =
            EmbeddedStore::open_with(&dir, Options { segment_bytes: 8 * 1024, ..opts() }).unwrap();
        populate(&store, 40, 300).await;
    }
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "the data directory");
    assert_eq!(mode(&dir.join("log")), 0o700, "the log directory");
    let files: Vec<_> = disk(&dir).into_iter().map(|(p, _)| p).collect();
    assert!(files.len() >= 5, "{files:?}");
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}
