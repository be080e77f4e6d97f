//! The indexer thread: writes the index file of each segment the writer
//! seals, swaps the segment's memtable for it, then flushes the stream
//! summaries changed since the last stream table to a new one; it also
//! flushes them when the writer finds too many of them in memory.
//! None of this is on the append path: a failure only keeps the memtable
//! (memory) and is counted in `index_failures`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};

use cairn_core::StoreError;

use crate::idx::{self, IdxFile};
use crate::index::{Delta, Ids, MemIndex, Part};
use crate::recovery::scan_segment;
use crate::segment::{SEGMENT_HEADER_BYTES, Segment};
use crate::shared::Shared;

pub(crate) enum Job {
    /// A segment the writer sealed, with its memtable.
    Sealed(Arc<Segment>, Arc<MemIndex>),
    /// The stream summaries in memory grew past their bound.
    Flush,
}

pub(crate) fn spawn(
    shared: Arc<Shared>,
    data_dir: std::path::PathBuf,
) -> std::io::Result<(Sender<Job>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("cairn-indexer".into())
        .spawn(move || run(&shared, &data_dir, rx))?;
    Ok((tx, handle))
}

/// Lowers the calling thread's CPU priority (nice 10), so that appends and
/// reads win the cores over background index work. Best effort.
pub(crate) fn background_priority() {
    // SAFETY: plain system calls on the calling thread; on Linux the nice
    // value is per thread, and a failure only leaves the priority as it was.
    #[cfg(target_os = "linux")]
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// How long a segment whose index file could not be written (a full disk)
/// waits before the next try; its memtable holds it in memory meanwhile.
const RETRY: std::time::Duration = std::time::Duration::from_secs(5);

fn run(shared: &Shared, data_dir: &std::path::Path, rx: Receiver<Job>) {
    use std::sync::mpsc::RecvTimeoutError;
    background_priority();
    // Sealed segments whose file could not be written yet, oldest first.
    let mut pending: Vec<(Arc<Segment>, Arc<MemIndex>)> = Vec::new();
    // A stream table flush that failed (a full disk): tried again after RETRY.
    let mut flush_failed: Option<std::time::Instant> = None;
    loop {
        let wait = if pending.is_empty() && flush_failed.is_none() {
            std::time::Duration::from_secs(3600)
        } else {
            RETRY
        };
        let mut flush = false;
        match rx.recv_timeout(wait) {
            Ok(Job::Sealed(seg, mem)) => pending.push((seg, mem)),
            Ok(Job::Flush) => flush = true,
            Err(RecvTimeoutError::Timeout) => {}
            // Every sender is gone: the store is closing.
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let mut wrote = false;
        let mut failed = Vec::new();
        for (seg, mem) in pending.drain(..) {
            match install(shared, &seg, &mem) {
                Ok(()) => wrote = true,
                Err(e) => {
                    shared.stats.index_failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!(
                        "cairn: could not write an index file ({e}); the segment stays indexed in memory, and is tried again in {} s",
                        RETRY.as_secs()
                    );
                    failed.push((seg, mem));
                }
            }
        }
        pending = failed;
        // After a failure, again once RETRY has passed, not before.
        let waited = flush_failed.is_none_or(|at| at.elapsed() >= RETRY);
        if waited && (wrote || flush || flush_failed.is_some()) {
            match crate::summaries::flush(shared, data_dir) {
                Ok(_) => flush_failed = None,
                // A merge of the tables found one damaged: rebuilt now, merged next time.
                Err(StoreError::Corrupt { file, .. }) if file.ends_with(".tbl") => {
                    if let Err(e) = crate::summaries::rebuild_table(
                        shared,
                        data_dir,
                        std::path::Path::new(&file),
                    ) {
                        eprintln!("cairn: could not rebuild {file}: {e}");
                    }
                }
                Err(e) => {
                    shared.stats.index_failures.fetch_add(1, Ordering::Relaxed);
                    // Appends stop asking until the next try.
                    shared.flush_asked.store(true, Ordering::Release);
                    flush_failed = Some(std::time::Instant::now());
                    eprintln!(
                        "cairn: could not write the stream table ({e}); the summaries stay in memory, and it is tried again in {} s",
                        RETRY.as_secs()
                    );
                }
            }
        }
    }
}

/// Writes the index file of `seg` from `mem` and puts it in the memtable's place.
pub(crate) fn install(shared: &Shared, seg: &Segment, mem: &MemIndex) -> Result<(), StoreError> {
    idx::write(seg, mem, &*shared.options.storage)?;
    let file = IdxFile::open(seg)
        .map_err(|why| StoreError::io(idx::path_for(seg), std::io::Error::other(why)))?;
    shared.index.write().unwrap().replace_part(Part::Disk(Arc::new(file)));
    shared.stats.index_files_written.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Builds a sealed segment's memtable from its records.
pub(crate) fn scan_into_mem(seg: &Segment) -> Result<MemIndex, StoreError> {
    let mut mem = MemIndex::new(seg.base);
    // A guess at the number of events (records of ~200 bytes), to spare the regrowing.
    mem.ids = Ids::listed((seg.capacity() / 256) as usize);
    scan_segment(seg, SEGMENT_HEADER_BYTES, 0, false, Some(&mut |v, p| mem.apply(v, p)))?;
    mem.ids.sort().map_err(|(id, at)| StoreError::Corrupt {
        file: seg.path.display().to_string(),
        offset: at - seg.base,
        reason: format!("event id {} at position {at} was already used", uuid::Uuid::from_u128(id)),
    })?;
    Ok(mem)
}

/// Parts for the segments `segs` rebuilt from their records, one index file
/// each (written now; a segment whose file cannot be written keeps its
/// memtable).
pub(crate) fn rebuild_parts(
    segs: &[&Segment],
    storage: &dyn crate::storage::Storage,
) -> Result<Vec<Part>, StoreError> {
    let mut parts = Vec::with_capacity(segs.len());
    for seg in segs {
        let mem = scan_into_mem(seg)?;
        let written = idx::write(seg, &mem, storage).and_then(|_| {
            IdxFile::open(seg)
                .map_err(|why| StoreError::io(idx::path_for(seg), std::io::Error::other(why)))
        });
        parts.push(match written {
            Ok(file) => Part::Disk(Arc::new(file)),
            Err(e) => {
                eprintln!("cairn: could not write an index file ({e}); the segment stays indexed in memory");
                Part::Mem(Arc::new(mem))
            }
        });
    }
    Ok(parts)
}

/// Rebuilds the index file at `path`, found damaged, from its segments: a
/// segment's own file in its place, a merged file as one file per segment
/// (merged again later). False if no part of the index maps that file.
pub(crate) fn rebuild_file(shared: &Shared, path: &std::path::Path) -> Result<bool, StoreError> {
    let file = shared.index.read().unwrap().parts.iter().find_map(|p| match p {
        Part::Disk(f) if f.path() == path => Some(f.clone()),
        _ => None,
    });
    let Some(file) = file else { return Ok(false) };
    let segs: Vec<Arc<Segment>> = file
        .covers()
        .iter()
        .filter_map(|(base, _)| shared.segment_for(*base).filter(|s| s.base == *base))
        .collect();
    if segs.len() != file.covers().len() {
        return Ok(false);
    }
    eprintln!("cairn: index file {} is damaged; rebuilding it from its segment(s)", path.display());
    let storage = &*shared.options.storage;
    let parts = rebuild_parts(&segs.iter().map(|s| &**s).collect::<Vec<_>>(), storage)?;
    {
        let mut index = shared.index.write().unwrap();
        if let Some(at) = index.position_of(&file) {
            index.replace_parts(at..at + 1, parts);
        }
    }
    if file.covers().len() > 1 {
        let _ = storage.remove(path);
    }
    shared.stats.index_rebuilds.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

/// Sealed segments without a usable index file, rebuilt at open on every
/// core while recovery applies them in log order: each worker scans one
/// segment into a memtable, writes its index file and hands recovery the
/// segment's [`Delta`] to the stream summaries, so no record is read twice.
/// Workers stay at most `LEAD` segments ahead of recovery, which bounds
/// the memory to a few memtables and deltas however long the log is.
pub(crate) struct Rebuild<'a> {
    /// Indexes (into the segments) of the ones to rebuild, ascending.
    which: &'a [usize],
    next: std::sync::atomic::AtomicUsize,
    state: std::sync::Mutex<RebuildState>,
    changed: std::sync::Condvar,
}

struct RebuildState {
    done: Vec<Option<Result<Option<Delta>, StoreError>>>,
    /// Results recovery has taken: it takes them in order.
    taken: usize,
    stopped: bool,
}

const LEAD: usize = 4;

impl<'a> Rebuild<'a> {
    pub(crate) fn new(which: &'a [usize]) -> Self {
        let state = RebuildState {
            done: (0..which.len()).map(|_| None).collect(),
            taken: 0,
            stopped: false,
        };
        Rebuild {
            which,
            next: Default::default(),
            state: std::sync::Mutex::new(state),
            changed: Default::default(),
        }
    }

    /// Worker threads worth starting on this machine.
    pub(crate) fn workers(&self) -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get()).min(self.which.len()).min(4)
    }

    /// A worker's loop, until every segment is taken or recovery stops.
    pub(crate) fn work(&self, segments: &[Segment], storage: &dyn crate::storage::Storage) {
        loop {
            let k = self.next.fetch_add(1, Ordering::Relaxed);
            if k >= self.which.len() {
                return;
            }
            {
                let mut st = self.state.lock().unwrap();
                while !st.stopped && k >= st.taken + LEAD {
                    st = self.changed.wait(st).unwrap();
                }
                if st.stopped {
                    return;
                }
            }
            let seg = &segments[self.which[k]];
            let rebuilt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                scan_into_mem(seg).map(|mem| {
                    if let Err(e) = idx::write(seg, &mem, storage) {
                        eprintln!("cairn: could not write an index file ({e}); the segment stays indexed in memory");
                    }
                    mem.delta()
                })
            }));
            // A panic (a bug) must not leave recovery waiting for this result.
            let result = rebuilt.unwrap_or_else(|_| {
                Err(StoreError::io(
                    &seg.path,
                    std::io::Error::other("rebuilding its index panicked"),
                ))
            });
            self.state.lock().unwrap().done[k] = Some(result);
            self.changed.notify_all();
        }
    }

    /// The result of the `k`-th segment to rebuild, once it is done: a
    /// damaged segment's error, or its delta (`None`: apply its records).
    pub(crate) fn take(&self, k: usize) -> Result<Option<Delta>, StoreError> {
        let mut st = self.state.lock().unwrap();
        let result = loop {
            if let Some(r) = st.done[k].take() {
                break r;
            }
            st = self.changed.wait(st).unwrap();
        };
        st.taken = k + 1;
        self.changed.notify_all();
        result
    }

    /// Ends the workers' loops (recovery failed or is done).
    pub(crate) fn stop(&self) {
        self.state.lock().unwrap().stopped = true;
        self.changed.notify_all();
    }
}
