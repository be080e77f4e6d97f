use std::sync::Arc;

use cairn_core::EventStore;
use cairn_log::{EmbeddedStore, Options};
use tempfile::TempDir;

#[allow(dead_code)]
pub(crate) fn fresh() -> (EmbeddedStore, TempDir) {
    fresh_with(Options::default())
}

pub(crate) fn fresh_with(options: Options) -> (EmbeddedStore, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open_with(dir.path(), options).expect("open store");
    (store, dir)
}

pub(crate) fn fresh_dyn() -> (Arc<dyn EventStore>, TempDir) {
    // Small segments so that the suite also crosses segment boundaries.
    let (store, dir) = fresh_with(Options { segment_bytes: 64 * 1024, ..Options::default() });
    (Arc::new(store), dir)
}

/// A small deterministic PRNG (SplitMix64): the tests log their seed so a
/// failing run can be replayed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(pub u64);

impl Rng {
    /// Seeded from the clock and the process id.
    pub(crate) fn from_entropy() -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
                as u64;
        Rng(nanos ^ ((std::process::id() as u64) << 32))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// The segment files of a data directory, by base position.
pub(crate) fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("log"))
        .expect("log dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    files
}

/// Size of the segment header; the first record starts here.
pub(crate) const SEGMENT_HEADER: u64 = 24;

/// (file offset, total length) of every record in a segment's bytes, walking
/// the layout `[body_len u32][crc u32][body][body_len u32]` from offset 24 up
/// to the first zero length (preallocated space) or the end of the bytes.
pub(crate) fn walk_records(bytes: &[u8]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut at = SEGMENT_HEADER as usize;
    while at + 4 <= bytes.len() {
        let body_len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if body_len == 0 {
            break;
        }
        let len = body_len + 12;
        assert!(at + len <= bytes.len(), "record at {at} runs past the end of the segment");
        out.push((at as u64, len as u64));
        at += len;
    }
    out
}

/// Opens a data directory this process has just closed. A store releases its
/// LOCK (an flock) when dropped, but a child process that another test thread
/// is spawning at that moment (crash.rs starts children) holds a copy of every
/// open file description, the lock's included, until it execs; during that
/// short window the directory still reads as locked. A lock that is really
/// kept (a leaked store handle) still fails here, after the deadline.
pub(crate) fn reopen(
    dir: &std::path::Path,
    options: Options,
) -> Result<EmbeddedStore, cairn_core::StoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match EmbeddedStore::open_with(dir, options.clone()) {
            Err(cairn_core::StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            other => return other,
        }
    }
}

/// The durable mark (`DATA/checkpoint`) as it is now, with the store closed:
/// put back with [`as_if_crashed`] to make later appends look like ones a
/// crash caught before the mark covered them.
pub(crate) struct SavedMark(Option<Vec<u8>>);

pub(crate) fn save_mark(dir: &std::path::Path) -> SavedMark {
    SavedMark(std::fs::read(dir.join("checkpoint")).ok())
}

/// What a crash leaves, as far as the mark and the stream tables go: the
/// saved mark back in place, and no stream table (the one a clean close
/// writes is not there; the others may not be either).
pub(crate) fn as_if_crashed(dir: &std::path::Path, saved: &SavedMark) {
    match &saved.0 {
        Some(bytes) => std::fs::write(dir.join("checkpoint"), bytes).expect("restore mark"),
        None => drop(std::fs::remove_file(dir.join("checkpoint"))),
    }
    remove_stream_tables(dir);
}

/// Removes the stream tables (and a snapshot of an older store): the next
/// open replays the stream summaries from the whole log.
pub(crate) fn remove_stream_tables(dir: &std::path::Path) {
    let _ = std::fs::remove_dir_all(dir.join("streams"));
    let _ = std::fs::remove_file(dir.join("index.snap"));
}

/// The stream table files.
pub(crate) fn stream_tables(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("streams"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}
