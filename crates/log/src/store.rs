use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use cairn_core::{
    AppendCondition, NewEvent, StoreError, StreamMetadata, metadata_stream_name,
    validate_stream_name,
};
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::{self, Mark};
use crate::idx::{self, IdxFile};
use crate::index::{Index, METADATA_EVENT, MemIndex, Part};
use crate::indexer;
use crate::options::Options;
use crate::record::{self, RECORD_OVERHEAD_BYTES};
use crate::recovery::{SegmentScan, scan_segment};
use crate::segment::{self, SEGMENT_HEADER_BYTES, Segment, create_private_dir};
use crate::shared::{Shared, last_event};
use crate::snapshot;
use crate::stats::Stats;
use crate::writer::{self, AppendKind, AppendRequest, Writer};

/// What opening the store found and did.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub segments: usize,
    pub events: u64,
    /// Bytes of a torn tail that recovery cut, and the file and offset where.
    pub truncated_bytes: u64,
    pub truncated_at: Option<(PathBuf, u64)>,
    /// Whether the stream summaries came from the stream tables (or, for a
    /// store written before them, the snapshot): then only later events were scanned.
    pub from_snapshot: bool,
    /// Stream tables used (the base and its deltas).
    pub stream_tables: usize,
    /// Events applied to the stream summaries at open: those after the tables.
    pub scanned_events: u64,
    /// Sealed segments whose index file was used as it was.
    pub index_files: usize,
    /// Index files that were missing, damaged or did not fit their segment,
    /// and were rebuilt from it: the file and why.
    pub rebuilt_indexes: Vec<(PathBuf, String)>,
}

/// Wakes the writer thread when dropped.
struct WakeOnDrop<'a>(&'a writer::Lead);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.wake_thread();
    }
}

/// Closes the store when the last handle goes: lets the writer drain, then
/// releases the directory lock.
struct CloseGuard {
    writer: Mutex<Option<JoinHandle<()>>>,
    indexer: Mutex<Option<JoinHandle<()>>>,
    scrubber: Mutex<Option<JoinHandle<()>>>,
    merger: Mutex<Option<JoinHandle<()>>>,
    /// Tells the scrubber and the merger to end.
    stop_scrub: Arc<std::sync::atomic::AtomicBool>,
    shared: Arc<Shared>,
    data_dir: PathBuf,
    _lock: File,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        self.stop_scrub.store(true, Ordering::Release);
        for thread in [&self.scrubber, &self.merger] {
            if let Some(handle) = thread.lock().unwrap().take() {
                handle.thread().unpark();
                let _ = handle.join();
            }
        }
        if let Some(handle) = self.writer.lock().unwrap().take() {
            // A writer waiting to retry a failed write notices the close at once.
            handle.thread().unpark();
            let _ = handle.join();
        }
        self.shared.head_tx.lock().unwrap().take();
        // The indexer finishes the files of segments sealed so far, then ends.
        self.shared.indexer.lock().unwrap().take();
        if let Some(handle) = self.indexer.lock().unwrap().take() {
            let _ = handle.join();
        }
        if self.shared.poisoned().is_none() {
            // A cache for the next open; losing it only costs a longer scan.
            let _ = crate::summaries::flush(&self.shared, &self.data_dir);
        }
    }
}

/// An embedded event store on a local data directory. Cheap to clone; the
/// store closes when the last clone is dropped.
///
/// ```
/// use cairn_core::{EventStore, ExpectedVersion, NewEvent, ReadStreamOptions, StoreError};
/// use cairn_log::EmbeddedStore;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let store = EmbeddedStore::open(dir.path())?;
/// let opened = NewEvent::json("AccountOpened", &serde_json::json!({"owner": "Ada"}))?;
/// store.append("account-1", ExpectedVersion::NoStream, vec![opened]).await?;
///
/// // Two tellers decided on version 1; the second is told the actual version.
/// let deposit = || NewEvent::json("MoneyDeposited", &serde_json::json!({"amount": 125}));
/// store.append("account-1", ExpectedVersion::Exact(1), vec![deposit()?]).await?;
/// let late = store.append("account-1", ExpectedVersion::Exact(1), vec![deposit()?]).await;
/// assert!(matches!(late, Err(StoreError::WrongExpectedVersion { actual_version: 2, .. })));
///
/// let events = store.read_stream("account-1", ReadStreamOptions::forward()).await?;
/// assert_eq!(events.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(), ["AccountOpened", "MoneyDeposited"]);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct EmbeddedStore {
    pub(crate) shared: Arc<Shared>,
    // Field order matters: the sender must drop before the guard joins the writer.
    tx: mpsc::Sender<AppendRequest>,
    /// Who writes the next group: an appender or the writer thread.
    lead: Arc<writer::Lead>,
    /// Held while an `append_each` queues its appends.
    ordered: Arc<tokio::sync::Mutex<()>>,
    _guard: Arc<CloseGuard>,
    report: Arc<OpenReport>,
}

impl EmbeddedStore {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(dir, Options::default())
    }

    pub fn open_with(dir: impl AsRef<Path>, options: Options) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        create_private_dir(dir)?;
        let lock = lock_dir(dir)?;
        let log_dir = dir.join("log");
        if !log_dir.exists() {
            create_private_dir(&log_dir)?;
            segment::sync_dir(dir, &*options.storage)?;
        }
        let recovered = recover_healing(dir, &log_dir, &options)?;
        let Recovered { segments, index, head, report, mark, last_id } = recovered;
        let last_timestamp = segments_last_timestamp(&segments, head);
        let mark_file = checkpoint::MarkFile::open(dir, mark, &*options.storage)?;
        let (head_tx, _) = watch::channel(head);
        let active = segments.last().expect("recovery leaves a segment").clone();
        let offset = head - active.base;
        let shared = Arc::new(Shared {
            options: options.clone(),
            log_dir,
            segments: RwLock::new(segments),
            index: RwLock::new(index),
            head: AtomicU64::new(head),
            head_tx: Mutex::new(Some(head_tx)),
            poisoned: Mutex::new(None),
            stats: Stats::default(),
            indexer: Mutex::new(None),
            flush_asked: AtomicBool::new(false),
            healing: Mutex::new(()),
            data_dir: dir.to_path_buf(),
        });
        let (jobs, indexer_handle) = indexer::spawn(shared.clone(), dir.to_path_buf())
            .map_err(|e| StoreError::io(dir, e))?;
        // Summaries replayed at open go to a table soon, so that another
        // crash does not replay them again.
        if !shared.index.read().unwrap().streams.dirty.is_empty() {
            let _ = jobs.send(indexer::Job::Flush);
        }
        *shared.indexer.lock().unwrap() = Some(jobs);
        shared.stats.events_written.store(shared.index.read().unwrap().events, Ordering::Release);
        let (tx, rx) = mpsc::channel(options.queue_depth);
        let marked = mark.map(|m| (m.events, m.last_id));
        let writer = Writer::new(
            shared.clone(),
            active,
            offset,
            last_timestamp,
            options.group_linger,
            mark_file,
            last_id,
            marked,
        );
        let lead = writer::Lead::new(shared.clone(), writer, rx);
        let handle = lead.spawn().map_err(|e| StoreError::io(dir, e))?;
        let stop_scrub = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let scrubber = crate::scrub::spawn(shared.clone(), stop_scrub.clone())
            .map_err(|e| StoreError::io(dir, e))?;
        let merger = crate::merge::spawn(shared.clone(), stop_scrub.clone())
            .map_err(|e| StoreError::io(dir, e))?;
        let guard = CloseGuard {
            writer: Mutex::new(Some(handle)),
            indexer: Mutex::new(Some(indexer_handle)),
            scrubber: Mutex::new(scrubber),
            merger: Mutex::new(merger),
            stop_scrub,
            shared: shared.clone(),
            data_dir: dir.to_path_buf(),
            _lock: lock,
        };
        Ok(EmbeddedStore {
            shared,
            tx,
            lead,
            ordered: Arc::default(),
            _guard: Arc::new(guard),
            report: Arc::new(report),
        })
    }

    /// Why appends are refused right now (a write to the log failed and the
    /// store has not recovered yet), or `None` when it takes them.
    pub fn unavailable(&self) -> Option<String> {
        self.shared.poisoned()
    }

    /// Throws the index snapshot and every index file away and rebuilds them
    /// from the whole log. Needs the data directory to be closed.
    pub fn reindex(dir: impl AsRef<Path>) -> Result<OpenReport, StoreError> {
        let dir = dir.as_ref();
        let lock = lock_dir(dir)?;
        snapshot::remove(dir)?;
        crate::table::remove_strays(dir, &[], &crate::storage::OsStorage)?;
        let log_dir = dir.join("log");
        if log_dir.is_dir() {
            idx::remove_strays(&log_dir, &[], &crate::storage::OsStorage)?;
        }
        drop(lock);
        let store = Self::open(dir)?;
        let report = store.open_report().clone();
        drop(store);
        Ok(report)
    }

    /// How the index is held now: (index files mapped, segments they cover,
    /// memtables), and whether a merge of index files is due.
    pub fn index_layout(&self) -> (usize, usize, usize, bool) {
        let index = self.shared.index.read().unwrap();
        let (mut files, mut covered, mut mem) = (0, 0, 0);
        for part in &index.parts {
            match part {
                Part::Disk(f) => (files, covered) = (files + 1, covered + f.covers().len()),
                Part::Mem(_) => mem += 1,
            }
        }
        (files, covered, mem, crate::merge::plan(&index.parts, self.shared.options.merge).is_some())
    }

    /// Stream summaries held in memory (changed since the last stream
    /// table, or being written to one), and the stream tables on disk.
    pub fn summaries_layout(&self) -> (usize, usize) {
        let index = self.shared.index.read().unwrap();
        (index.streams.in_memory(), index.streams.tables.len())
    }

    /// What recovery found when this store was opened.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn options(&self) -> &Options {
        &self.shared.options
    }

    /// Checks input, then hands the append to the writer and waits for it to be durable.
    pub(crate) async fn submit(
        &self,
        stream: String,
        expected: cairn_core::ExpectedVersion,
        events: Vec<NewEvent>,
        kind: AppendKind,
        condition: Option<AppendCondition>,
    ) -> Result<cairn_core::AppendResult, StoreError> {
        let answer = self.enqueue(stream, expected, events, kind, condition).await?;
        // Let the caller's other futures (a `join!` of appends) queue theirs
        // first, so that one group takes them all. Cancelled meanwhile, the
        // guard hands the request to the writer thread.
        let guard = WakeOnDrop(&self.lead);
        tokio::task::yield_now().await;
        std::mem::forget(guard);
        self.lead.lead();
        self.answer(answer).await
    }

    /// Checks an append and puts it in the writer's queue; its answer comes
    /// on the receiver. Appends enqueued one after the other are applied in
    /// that order.
    pub(crate) async fn enqueue(
        &self,
        stream: String,
        expected: cairn_core::ExpectedVersion,
        events: Vec<NewEvent>,
        kind: AppendKind,
        condition: Option<AppendCondition>,
    ) -> Result<oneshot::Receiver<Result<cairn_core::AppendResult, StoreError>>, StoreError> {
        let bytes = self.check_events(&stream, &events)?;
        if let Some(c) = &condition {
            self.shared.options.limits.check_query(&c.fail_if_events_match)?;
        }
        if let Some(reason) = self.shared.poisoned() {
            return Err(StoreError::Closed { reason: Some(reason) });
        }
        let (reply, rx) = oneshot::channel();
        let req = AppendRequest { stream, expected, events, kind, condition, bytes, reply };
        let req = match self.tx.try_send(req) {
            Ok(()) => {
                self.lead.sent();
                return Ok(rx);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(StoreError::Closed { reason: self.shared.poisoned() });
            }
            Err(mpsc::error::TrySendError::Full(req)) => req,
        };
        // A full queue: the writer thread drains it while this waits for room.
        self.lead.wake_thread();
        match self.tx.send_timeout(req, self.shared.options.busy_timeout).await {
            Ok(()) => self.lead.sent(),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                let waited = self.shared.options.busy_timeout;
                return Err(StoreError::Busy(format!(
                    "the write queue stayed full for {waited:?}"
                )));
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => {
                return Err(StoreError::Closed { reason: self.shared.poisoned() });
            }
        }
        Ok(rx)
    }

    /// The writer's answer to an enqueued append.
    pub(crate) async fn answer(
        &self,
        rx: oneshot::Receiver<Result<cairn_core::AppendResult, StoreError>>,
    ) -> Result<cairn_core::AppendResult, StoreError> {
        rx.await.map_err(|_| StoreError::Closed { reason: self.shared.poisoned() })?
    }

    /// Validates a batch against the limits; returns its encoded size.
    fn check_events(&self, stream: &str, events: &[NewEvent]) -> Result<usize, StoreError> {
        self.shared
            .options
            .limits
            .check_batch(stream, events, |e| record::body_size(stream, e) + RECORD_OVERHEAD_BYTES)
    }

    pub(crate) async fn append_user(
        &self,
        stream: &str,
        expected: cairn_core::ExpectedVersion,
        events: Vec<NewEvent>,
        condition: Option<AppendCondition>,
    ) -> Result<cairn_core::AppendResult, StoreError> {
        validate_stream_name(stream)?;
        self.submit(stream.to_string(), expected, events, AppendKind::User, condition).await
    }

    pub(crate) async fn append_each_user(
        &self,
        appends: Vec<cairn_core::Append>,
    ) -> Vec<Result<cairn_core::AppendResult, StoreError>> {
        // All into the queue first, in order, so that they share group commits.
        // Dropped (this call cancelled) before it leads, the guard hands them to the writer thread.
        let guard = WakeOnDrop(&self.lead);
        let mut queued = Vec::with_capacity(appends.len());
        // Calls queue whole, in the order they were first polled (a fair
        // lock, taken at once when free): a full queue that stops one
        // midway does not let the next call's appends in between.
        let in_order = self.ordered.lock().await;
        for a in appends {
            queued.push(match validate_stream_name(&a.stream) {
                Ok(()) => {
                    self.enqueue(a.stream, a.expected, a.events, AppendKind::User, a.condition)
                        .await
                }
                Err(e) => Err(e),
            });
        }
        drop(in_order);
        tokio::task::yield_now().await;
        std::mem::forget(guard);
        self.lead.lead();
        let mut out = Vec::with_capacity(queued.len());
        for q in queued {
            out.push(match q {
                Ok(rx) => self.answer(rx).await,
                Err(e) => Err(e),
            });
        }
        out
    }

    pub(crate) async fn set_metadata(
        &self,
        stream: &str,
        metadata: StreamMetadata,
    ) -> Result<cairn_core::AppendResult, StoreError> {
        validate_stream_name(stream)?;
        if metadata.max_count == Some(0) {
            return Err(StoreError::InvalidArgument(
                "max_count must be at least 1 (delete the stream to hide all of it)".into(),
            ));
        }
        let event = NewEvent::json(METADATA_EVENT, &metadata)
            .map_err(|e| StoreError::InvalidArgument(e.to_string()))?;
        let kind = AppendKind::Metadata { target: stream.to_string() };
        self.submit(
            metadata_stream_name(stream),
            cairn_core::ExpectedVersion::Any,
            vec![event],
            kind,
            None,
        )
        .await
    }

    pub(crate) async fn delete(
        &self,
        stream: &str,
        expected: cairn_core::ExpectedVersion,
        hard: bool,
    ) -> Result<cairn_core::AppendResult, StoreError> {
        validate_stream_name(stream)?;
        let kind = AppendKind::Delete { target: stream.to_string() };
        self.submit(
            metadata_stream_name(stream),
            expected,
            vec![writer::delete_event(hard)],
            kind,
            None,
        )
        .await
    }
}

/// Takes the data directory's lock. A child process that another thread is
/// spawning shares the lock's file until it execs, so a held lock is retried
/// for a moment before it counts as another process's.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| StoreError::io(&lock_path, e))?;
    for _ in 0..50 {
        if lock.try_lock().is_ok() {
            return Ok(lock);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(StoreError::Locked { dir: dir.display().to_string() })
}

/// Whether `head` is the end of the record with id `last_id` (and the
/// start of the log for no events): otherwise
/// it belongs to another log, or the log lost data it covers.
fn head_fits(segments: &[Segment], head: u64, events: u64, last_id: u128) -> bool {
    match last_event(segments, head) {
        Some((id, _)) => id == last_id && events > 0,
        None => events == 0 && head == SEGMENT_HEADER_BYTES,
    }
}

/// What recovery hands to the store it opens.
struct Recovered {
    segments: Vec<Arc<Segment>>,
    index: Index,
    head: u64,
    report: OpenReport,
    /// The durable mark read at open, if any.
    mark: Option<Mark>,
    /// Id of the newest event in the log (0 if none).
    last_id: u128,
}

fn segments_last_timestamp(segments: &[Arc<Segment>], head: u64) -> i64 {
    last_event(segments, head).map_or(0, |(_, t)| t)
}

/// Refuses a log that holds less than a durable mark says was acknowledged.
/// `claim` is (where the claim comes from, events, newest id); `end` names
/// the file and offset where the log now ends or is damaged.
pub(crate) fn check_claim(
    claim: (&Path, u64, u128),
    index: &Index,
    end: (&Path, u64),
    torn: Option<&str>,
) -> Result<(), StoreError> {
    let (from, events, last_id) = claim;
    let lost = if index.events < events {
        Some(format!(
            "the log holds {} event(s), but {events} were durable when {} was written",
            index.events,
            from.display()
        ))
    } else if last_id != 0 && !index.contains_id(last_id)? {
        Some(format!(
            "the log does not hold event {}, the newest durable one when {} was written",
            uuid::Uuid::from_u128(last_id),
            from.display()
        ))
    } else {
        None
    };
    let Some(lost) = lost else { return Ok(()) };
    let (file, offset) = end;
    let how = match torn {
        Some(why) => format!("the newest records are {why}"),
        None => "the log ends early (a segment or its end is missing or was truncated)".to_string(),
    };
    Err(StoreError::Corrupt {
        file: file.display().to_string(),
        offset,
        reason: format!(
            "{how}: {lost}, so acknowledged events are missing. Nothing was changed. Restore the log from a backup; \
             to accept the loss and open with what remains, delete {} and {}",
            from.display(),
            from.with_file_name(snapshot::FILE).display()
        ),
    })
}

/// Opens every segment, maps the index files of the sealed ones (rebuilding
/// any that is missing or damaged), takes the stream summaries from the
/// snapshot and applies the records after it, scans the newest segment into
/// its memtable, checks the log against the durable mark, and only then
/// changes anything: cuts a torn tail and readies the newest segment.
/// [`recover`], once more without a stream table whose damage it found
/// (recovery changes nothing before it succeeds): the summaries after the
/// table before it are then replayed from the log.
fn recover_healing(
    data_dir: &Path,
    log_dir: &Path,
    options: &Options,
) -> Result<Recovered, StoreError> {
    let mut damaged = Vec::new();
    loop {
        match recover(data_dir, log_dir, options) {
            Err(StoreError::Corrupt { file, reason, .. })
                if file.ends_with(".tbl")
                    && !damaged.iter().any(|(f, _)| *f == file)
                    && Path::new(&file).exists() =>
            {
                let path = PathBuf::from(&file);
                options.storage.remove(&path).map_err(|e| StoreError::io(&path, e))?;
                damaged.push((file, reason));
            }
            Ok(mut r) => {
                r.report.rebuilt_indexes.extend(damaged.into_iter().map(|(f, why)| {
                    (
                        PathBuf::from(f),
                        format!("{why}; the summaries it held were replayed from the log"),
                    )
                }));
                return Ok(r);
            }
            Err(e) => return Err(e),
        }
    }
}

fn recover(data_dir: &Path, log_dir: &Path, options: &Options) -> Result<Recovered, StoreError> {
    let storage = &*options.storage;
    segment::remove_leftovers(log_dir, storage)?;
    let mark = checkpoint::read(data_dir)?;
    let snap = snapshot::read(data_dir);
    let mark_path = checkpoint::path(data_dir);
    let snap_path = data_dir.join(snapshot::FILE);
    // The claim the log must meet: the mark, or for a store written before
    // marks existed, the snapshot (written at every clean close).
    let claim: Option<(&Path, u64, u128)> = match (&mark, &snap) {
        (Some(m), _) => Some((mark_path.as_path(), m.events, m.last_id)),
        (None, Some(s)) => Some((snap_path.as_path(), s.events, s.last_id)),
        (None, None) => None,
    };
    let mut report = OpenReport::default();
    let (opened, unfinished) = segment::open_chain(log_dir, true, storage)?;
    if opened.is_empty() {
        if let Some(claim) = claim {
            check_claim(claim, &Index::default(), (log_dir, 0), None)?;
        }
        snapshot::remove(data_dir)?;
        idx::remove_strays(log_dir, &[], storage)?;
        let seg = Segment::create(log_dir, 0, options.segment_bytes, storage)?;
        report.segments = 1;
        let segments = vec![Arc::new(seg)];
        return Ok(Recovered {
            segments,
            index: Index::new(0),
            head: SEGMENT_HEADER_BYTES,
            report,
            mark,
            last_id: 0,
        });
    }
    // Summaries: from the stream tables, then every record at or after
    // their end. A chain whose end is not a record boundary of this log
    // (a table of another copy of it) is cut back until it fits.
    let mut index = Index::default();
    let mut summaries_from = 0;
    let mut rejected_tables = Vec::new();
    let mut chain = crate::table::find(data_dir, &mut rejected_tables);
    while let Some(last) = chain.last() {
        if head_fits(&opened, last.head().to, last.head().events, last.head().last_id) {
            break;
        }
        rejected_tables
            .push((last.path().to_path_buf(), "it does not fit this log's records".into()));
        chain.pop();
    }
    for (path, why) in rejected_tables {
        report.rebuilt_indexes.push((
            path,
            format!(
                "{why}; the stream summaries after the table before it are replayed from the log"
            ),
        ));
    }
    if let Some(last) = chain.last() {
        report.from_snapshot = true;
        summaries_from = last.head().to;
        index.events = last.head().events;
        report.stream_tables = chain.len();
        index.streams.tables = chain.into_iter().map(Arc::new).collect();
    } else if let Some(snap) = snap.filter(|s| head_fits(&opened, s.head, s.events, s.last_id)) {
        // A store written before stream tables: its snapshot, flushed to a table soon after open.
        report.from_snapshot = true;
        summaries_from = snap.head;
        index.streams.dirty = snap.streams;
        index.events = snap.events;
    }
    // Read only: every segment is checked and applied before anything changes.
    let count = opened.len();
    let mut newest_scan = SegmentScan::default();
    let mut head = 0;
    // Sealed segments without a usable index file are rebuilt on every core
    // while this thread applies the segments in log order (indexer::Rebuild);
    // a damaged segment fails where the order reaches it, naming itself.
    // Merged index files first: a segment one of them covers needs no file of its own.
    let mut rejected = Vec::new();
    let merged =
        crate::merge::find(log_dir, &opened[..count - 1].iter().collect::<Vec<_>>(), &mut rejected);
    for (path, why) in rejected {
        report.rebuilt_indexes.push((path, format!("{why}; its segments are indexed one by one")));
    }
    let mut covered: Vec<Option<usize>> = vec![None; count];
    for (k, (_, range)) in merged.iter().enumerate() {
        covered[range.clone()].iter_mut().for_each(|c| *c = Some(k));
        report.index_files += 1;
    }
    let mut files: Vec<Option<IdxFile>> = Vec::with_capacity(count);
    let mut missing = Vec::new();
    for (i, seg) in opened.iter().enumerate() {
        if i + 1 == count || covered[i].is_some() {
            files.push(None);
            continue;
        }
        match IdxFile::open(seg) {
            Ok(file) => {
                report.index_files += 1;
                files.push(Some(file));
            }
            Err(why) => {
                let why = if why.starts_with("cannot open") && !idx::path_for(seg).exists() {
                    "missing".to_string()
                } else {
                    why
                };
                report.rebuilt_indexes.push((idx::path_for(seg), why));
                missing.push(i);
                files.push(None);
            }
        }
    }
    let rebuild = indexer::Rebuild::new(&missing);
    std::thread::scope(|scope| {
        for _ in 0..rebuild.workers() {
            scope.spawn(|| rebuild.work(&opened, storage));
        }
        let applied = (|| -> Result<(), StoreError> {
            for (i, seg) in opened.iter().enumerate() {
                let last = i + 1 == count;
                let end = seg.base + seg.capacity();
                let needs_summaries = end > summaries_from;
                // A rebuilt segment: its delta, and its new index file.
                let rebuilt = missing.binary_search(&i).ok();
                let mut delta = None;
                if let Some(k) = rebuilt {
                    delta = rebuild.take(k)?;
                    files[i] = IdxFile::open(seg).ok();
                }
                let whole = summaries_from <= seg.base + SEGMENT_HEADER_BYTES;
                // An index file on disk: the segment's own, or a merged one (its part comes with its first segment).
                let disk = match covered[i] {
                    Some(k) => Some((merged[k].1.start == i).then(|| merged[k].0.clone())),
                    None => files[i].take().map(|f| Some(Arc::new(f))),
                };
                match disk {
                    Some(file) => {
                        if let Some(delta) = delta.filter(|_| whole) {
                            // Its records were all checked by the rebuild a moment ago.
                            index
                                .apply_delta(&delta)
                                .map_err(|(at, e)| e.into_store(&seg.path, at - seg.base))?;
                            report.scanned_events += delta.events;
                        } else if needs_summaries || options.verify_on_open {
                            let apply_from =
                                summaries_from.saturating_sub(seg.base).max(SEGMENT_HEADER_BYTES);
                            let from = if options.verify_on_open {
                                SEGMENT_HEADER_BYTES
                            } else {
                                apply_from
                            };
                            let mut apply =
                                |v: &record::RecordView<'_>, p: u64| index.apply_summary(v, p);
                            let scan = if rebuilt.is_some() && !options.verify_on_open {
                                crate::recovery::scan_checked_segment(
                                    seg,
                                    apply_from,
                                    apply_from,
                                    Some(&mut apply),
                                )?
                            } else {
                                scan_segment(seg, from, apply_from, false, Some(&mut apply))?
                            };
                            report.scanned_events += scan.events;
                        }
                        if let Some(file) = file {
                            index.parts.push(Part::Disk(file));
                        }
                    }
                    None => {
                        let mut mem = MemIndex::new(seg.base);
                        let mut after_snapshot = 0;
                        let mut apply = |v: &record::RecordView<'_>, p: u64| {
                            if p >= summaries_from {
                                index.apply_summary(v, p)?;
                                after_snapshot += 1;
                            }
                            mem.apply(v, p)
                        };
                        let scan = scan_segment(
                            seg,
                            SEGMENT_HEADER_BYTES,
                            SEGMENT_HEADER_BYTES,
                            last,
                            Some(&mut apply),
                        )?;
                        report.scanned_events += after_snapshot;
                        if last {
                            newest_scan = scan;
                        }
                        index.parts.push(Part::Mem(Arc::new(mem)));
                        if !last {
                            // Written at once (it is a cache, so this changes nothing the
                            // checks below guard), so that a rebuild of many segments
                            // holds one segment's memtable at a time.
                            write_index_file(&mut index, seg, storage);
                        }
                    }
                }
                head = if last { seg.base + newest_scan.valid_end } else { end };
            }
            Ok(())
        })();
        rebuild.stop();
        applied
    })?;
    index.parts_changed();
    let last_id = last_event(&opened, head).map_or(0, |(id, _)| id);
    let mut segments: Vec<Segment> = opened;
    let newest = segments.pop().expect("not empty");
    if let Some(claim) = claim {
        let torn =
            newest_scan.torn_at.map(|_| "damaged or cut short, with nothing valid after them");
        loop {
            match check_claim(claim, &index, (&newest.path, newest_scan.valid_end), torn) {
                // An index file the check found damaged: rebuilt, then checked again.
                Err(StoreError::Corrupt { file, reason, .. })
                    if file.ends_with(".idx")
                        && let Some(at) = index.parts.iter().position(
                            |p| matches!(p, Part::Disk(f) if f.path().as_os_str() == file.as_str()),
                        ) =>
                {
                    let Part::Disk(damaged) = &index.parts[at] else {
                        unreachable!("found as a file")
                    };
                    let damaged = damaged.clone();
                    let segs: Vec<&Segment> = damaged
                        .covers()
                        .iter()
                        .filter_map(|(base, _)| segments.iter().find(|s| s.base == *base))
                        .collect();
                    // Written at once: they are a cache, and this keeps one memtable at a time.
                    let parts = indexer::rebuild_parts(&segs, storage)?;
                    index.replace_parts(at..at + 1, parts);
                    report.rebuilt_indexes.push((damaged.path().to_path_buf(), reason));
                }
                other => break other?,
            }
        }
    }
    // Now the changes. An all-zero newest segment (an unfinished roll) held no event.
    if let Some(path) = unfinished {
        storage.remove(&path).map_err(|e| StoreError::io(&path, e))?;
        segment::sync_dir(log_dir, storage)?;
    }
    // Index files no part uses: covered by a merged one, or left by a crash.
    let keep: Vec<PathBuf> = index
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::Disk(f) => Some(f.path().to_path_buf()),
            Part::Mem(_) => None,
        })
        .collect();
    idx::remove_strays(log_dir, &keep, storage)?;
    // Stream tables off the chain: merged into a newer base, or left by a crash.
    let keep: Vec<PathBuf> = index.streams.tables.iter().map(|t| t.path().to_path_buf()).collect();
    crate::table::remove_strays(data_dir, &keep, storage)?;
    if !keep.is_empty() {
        snapshot::remove(data_dir)?;
    }
    let mut segments: Vec<Arc<Segment>> = segments.into_iter().map(Arc::new).collect();
    let io = |e| StoreError::io(&newest.path, e);
    if let Some(at) = newest_scan.torn_at {
        // Zero everything after the last whole append, durably. Written
        // over, never cut off: a segment never shrinks, so a map of it (as
        // `cairn verify` holds of a store another process opens) never
        // loses a page under it (SIGBUS).
        let capacity = newest.capacity().max(options.segment_bytes);
        zero(storage, &newest.file, at, newest_scan.torn_bytes)
            .and_then(|_| {
                if newest.capacity() < capacity {
                    storage.set_len(&newest.file, capacity)
                } else {
                    Ok(())
                }
            })
            .and_then(|_| storage.sync_all(&newest.file))
            .map_err(io)?;
        report.truncated_bytes = newest_scan.torn_bytes;
        report.truncated_at = Some((newest.path.clone(), at));
        segments.push(Arc::new(Segment::open(&newest.path.clone(), true, storage)?));
    } else if newest_scan.valid_end == newest.capacity() && newest.capacity() > SEGMENT_HEADER_BYTES
    {
        // Full: a sealed segment (its successor's creation was cut short).
        // Sealed segments are never written again: start the next one.
        let base = newest.base + newest.capacity();
        let sealed = Arc::new(newest);
        write_index_file(&mut index, &sealed, storage);
        segments.push(sealed);
        segments.push(Arc::new(Segment::create(log_dir, base, options.segment_bytes, storage)?));
        index.push_mem(base);
        head = base + SEGMENT_HEADER_BYTES;
    } else if newest.capacity() < options.segment_bytes {
        storage
            .set_len(&newest.file, options.segment_bytes)
            .and_then(|_| storage.sync_all(&newest.file))
            .map_err(io)?;
        segments.push(Arc::new(Segment::open(&newest.path.clone(), true, storage)?));
    } else {
        segments.push(Arc::new(newest));
    }
    report.segments = segments.len();
    report.events = index.events;
    Ok(Recovered { segments, index, head, report, mark, last_id })
}

/// Writes `len` zero bytes into `file` from `offset`, a MiB at a time.
fn zero(
    storage: &dyn crate::storage::Storage,
    file: &File,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        storage.write_at(file, &zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// Writes the index file of a sealed segment whose part is a memtable and
/// puts it in its place; on failure the memtable stays (it only costs memory).
fn write_index_file(index: &mut Index, seg: &Segment, storage: &dyn crate::storage::Storage) {
    let Some(Part::Mem(mem)) = index.parts.iter().find(|p| p.base() == seg.base) else { return };
    let written = idx::write(seg, mem, storage).and_then(|_| {
        IdxFile::open(seg)
            .map_err(|why| StoreError::io(idx::path_for(seg), std::io::Error::other(why)))
    });
    match written {
        Ok(file) => index.replace_part(Part::Disk(Arc::new(file))),
        Err(e) => eprintln!(
            "cairn: could not write an index file ({e}); the segment stays indexed in memory"
        ),
    }
}

#[cfg(test)]
mod tests {
    use cairn_core::{
        EventStore, ExpectedVersion, NewEvent, ReadStreamOptions, StartFrom, SubscriptionTarget,
    };

    use super::*;
    use crate::index::FastMap;

    fn ev(n: u64) -> NewEvent {
        NewEvent::json("MoneyDeposited", &serde_json::json!({ "amount": n })).unwrap()
    }

    #[tokio::test]
    async fn subscriptions_end_when_the_store_closes() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.append("a", ExpectedVersion::Any, vec![ev(1)]).await.unwrap();
        let mut sub = store.subscribe(SubscriptionTarget::All, StartFrom::Start).await.unwrap();
        assert_eq!(sub.next().await.unwrap().unwrap().version, 1);
        drop(store);
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next())
            .await
            .expect("subscription ended");
        assert!(end.is_none());
    }

    #[tokio::test]
    async fn tag_type_and_category_indexes_survive_reopen_and_an_old_snapshot_is_rebuilt() {
        use cairn_core::{Query, ReadAllOptions};
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        for i in 0..10 {
            store
                .append(
                    &format!("s-{}", i % 3),
                    ExpectedVersion::Any,
                    vec![ev(i).with_tags([format!("t:{}", i % 2)])],
                )
                .await
                .unwrap();
        }
        let positions = |events: Vec<cairn_core::RecordedEvent>| {
            events.iter().map(|e| e.position).collect::<Vec<_>>()
        };
        store.append("t-1", ExpectedVersion::Any, vec![ev(10)]).await.unwrap();
        let tagged = positions(
            store.read_query(&Query::tags(["t:1"]), ReadAllOptions::forward()).await.unwrap(),
        );
        let typed = positions(
            store
                .read_query(&Query::types(["MoneyDeposited"]), ReadAllOptions::forward())
                .await
                .unwrap(),
        );
        let in_s = positions(store.read_category("s", ReadAllOptions::forward()).await.unwrap());
        assert_eq!((tagged.len(), typed.len(), in_s.len()), (5, 11, 10));
        drop(store);
        let check = |store: &EmbeddedStore| {
            let store = store.clone();
            let (tagged, typed, in_s) = (tagged.clone(), typed.clone(), in_s.clone());
            async move {
                assert_eq!(
                    positions(
                        store
                            .read_query(&Query::tags(["t:1"]), ReadAllOptions::forward())
                            .await
                            .unwrap()
                    ),
                    tagged
                );
                assert_eq!(
                    positions(
                        store
                            .read_query(
                                &Query::types(["MoneyDeposited"]),
                                ReadAllOptions::forward()
                            )
                            .await
                            .unwrap()
                    ),
                    typed
                );
                assert_eq!(
                    positions(store.read_category("s", ReadAllOptions::forward()).await.unwrap()),
                    in_s
                );
                assert_eq!(
                    store.read_category("t", ReadAllOptions::forward()).await.unwrap().len(),
                    1
                );
            }
        };
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert!(store.open_report().from_snapshot);
        check(&store).await;
        drop(store);
        // A store from before stream tables has a snapshot (format version 4)
        // instead: open uses it, flushes it to a table and removes it.
        // Older versions (1: no tag or type index, 2: no category index, 3:
        // indexes in the snapshot) are ignored, and the log is replayed.
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mut summaries = FastMap::default();
        let (events, head) = {
            let index = store.shared.index.read().unwrap();
            index
                .streams
                .walk("", |name, e| {
                    summaries.insert(name.to_string(), e.into_owned());
                    Ok(true)
                })
                .unwrap();
            (index.events, store.shared.head.load(Ordering::Acquire))
        };
        let last_id = store.shared.last_id_before(head).unwrap();
        drop(store);
        for version in 1..=snapshot::VERSION {
            std::fs::remove_dir_all(crate::table::dir(dir.path())).unwrap();
            let mut bytes = snapshot::encode(&summaries, events, head, last_id);
            bytes[8..12].copy_from_slice(&version.to_le_bytes());
            let body = bytes.len() - 4;
            let crc = crc32c::crc32c(&bytes[..body]);
            bytes[body..].copy_from_slice(&crc.to_le_bytes());
            std::fs::write(dir.path().join(snapshot::FILE), &bytes).unwrap();
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let used = version == snapshot::VERSION;
            assert_eq!(
                store.open_report().from_snapshot,
                used,
                "a snapshot of format version {version}"
            );
            assert_eq!(store.open_report().scanned_events, if used { 0 } else { events });
            check(&store).await;
            drop(store);
        }
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert!(
            store.open_report().from_snapshot && store.open_report().stream_tables == 1,
            "{:?}",
            store.open_report()
        );
        assert!(
            !dir.path().join(snapshot::FILE).exists(),
            "the snapshot is removed once a table holds its summaries"
        );
        drop(store);
        // `cairn reindex` rebuilds them too.
        let report = EmbeddedStore::reindex(dir.path()).unwrap();
        assert!(!report.from_snapshot);
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert!(store.open_report().from_snapshot);
        check(&store).await;
    }

    #[tokio::test]
    async fn snapshot_is_used_when_the_newest_segment_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options { segment_bytes: 8 * 1024, ..Options::default() };
        let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        let big = |n| NewEvent::json("Big", &serde_json::json!({ "pad": "x".repeat(n) })).unwrap();
        let mut version = 0;
        while store.head_position().await.unwrap().0 + 3000 < 8 * 1024 {
            version = store
                .append("a", ExpectedVersion::Exact(version), vec![big(1000)])
                .await
                .unwrap()
                .next_version;
        }
        // Does not fit: the writer rolls, then rejects it; the new segment stays empty.
        assert!(
            store.append("a", ExpectedVersion::Exact(version + 9), vec![big(3000)]).await.is_err()
        );
        drop(store);
        for _ in 0..2 {
            let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
            assert!(store.open_report().from_snapshot, "{:?}", store.open_report());
            assert_eq!(
                store.read_stream("a", ReadStreamOptions::forward()).await.unwrap().len() as u64,
                version
            );
        }
    }

    #[tokio::test]
    async fn reopen_uses_the_snapshot_and_scans_only_what_follows() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options { segment_bytes: 8 * 1024, ..Options::default() };
        let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        for i in 0..100 {
            store
                .append(&format!("s-{}", i % 7), ExpectedVersion::Any, vec![ev(i), ev(i)])
                .await
                .unwrap();
        }
        store.delete_stream("s-3", ExpectedVersion::Any, false).await.unwrap();
        store.delete_stream("s-4", ExpectedVersion::Any, true).await.unwrap();
        let expected: Vec<_> = store.list_streams("", 100).await.unwrap();
        drop(store);

        let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        assert!(store.open_report().from_snapshot);
        assert_eq!(store.open_report().scanned_events, 0);
        assert_eq!(store.list_streams("", 100).await.unwrap(), expected);
        // Tables that end before the log does: later events are scanned.
        let tables = crate::table::dir(dir.path());
        let stale: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&tables)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        store.append("s-0", ExpectedVersion::Any, vec![ev(1)]).await.unwrap();
        drop(store);
        let restore = |files: &[(PathBuf, Vec<u8>)]| {
            std::fs::remove_dir_all(&tables).unwrap();
            std::fs::create_dir(&tables).unwrap();
            for (p, b) in files {
                std::fs::write(p, b).unwrap();
            }
        };
        restore(&stale);
        let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        assert!(store.open_report().from_snapshot);
        assert_eq!(store.open_report().scanned_events, 1);
        let s0 = store.read_stream("s-0", ReadStreamOptions::forward()).await.unwrap();
        assert_eq!(s0.len(), 2 * 15 + 1);
        drop(store);

        // A table damaged inside (in the block its fences are in): not used,
        // and the log is replayed from the table before it.
        let base = |dir: &Path| {
            std::fs::read_dir(crate::table::dir(dir))
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| {
                    p.file_name().unwrap().to_str().unwrap().starts_with("00000000000000000000-")
                })
                .unwrap()
        };
        let path = base(dir.path());
        let mut bad = std::fs::read(&path).unwrap();
        bad[crate::idx::HEADER + 8] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        assert_eq!(store.read_stream("s-0", ReadStreamOptions::forward()).await.unwrap().len(), 31);
        assert!(matches!(
            store.read_stream("s-4", ReadStreamOptions::forward()).await,
            Err(StoreError::StreamDeleted { .. })
        ));
        assert_eq!(store.list_streams("", 100).await.unwrap().len(), expected.len());
        assert!(
            store
                .open_report()
                .rebuilt_indexes
                .iter()
                .any(|(p, why)| *p == path && why.contains("block 0")),
            "{:?}",
            store.open_report()
        );
        drop(store);
        crate::verify::verify(dir.path(), |_, _| {}).unwrap();

        // A damaged header: the table is not used, and the log is replayed from the start.
        let path = base(dir.path());
        let mut bad = std::fs::read(&path).unwrap();
        bad[20] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(
            crate::verify::verify(dir.path(), |_, _| {}).is_err(),
            "verify names the damaged table"
        );
        let store = EmbeddedStore::open_with(dir.path(), options.clone()).unwrap();
        assert!(!store.open_report().from_snapshot);
        assert!(
            store.open_report().rebuilt_indexes.iter().any(|(p, _)| *p == path),
            "{:?}",
            store.open_report()
        );
        assert_eq!(store.read_stream("s-0", ReadStreamOptions::forward()).await.unwrap().len(), 31);
        drop(store);

        // Tables from another store's log do not fit this one.
        let other = tempfile::tempdir().unwrap();
        let o = EmbeddedStore::open_with(other.path(), options.clone()).unwrap();
        for i in 0..250 {
            o.append("x", ExpectedVersion::Any, vec![ev(i)]).await.unwrap();
        }
        drop(o);
        let foreign: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(crate::table::dir(other.path()))
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| (tables.join(p.file_name().unwrap()), std::fs::read(&p).unwrap()))
            .collect();
        restore(&foreign);
        let store = EmbeddedStore::open_with(dir.path(), options).unwrap();
        assert!(!store.open_report().from_snapshot);
        assert!(matches!(store.stream_info("x").await, Err(StoreError::StreamNotFound { .. })));
        assert_eq!(store.list_streams("", 100).await.unwrap().len(), expected.len());
    }
}
