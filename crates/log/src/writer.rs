//! The writer. One group at a time, written by whoever holds the [`Lead`]:
//! an appender that finds it free (on its own thread) or the writer thread.
//! It takes every append request waiting in its queue,
//! checks each (expected version, append condition) against the index plus
//! the appends already accepted into the same group, encodes them into one buffer, writes it with one `pwrite` and
//! makes it durable with one `fdatasync` (group commit). Only then does it
//! publish the group to the index and the durable head, and answer the callers.
//! After a failed write or sync it answers the group "outcome unknown",
//! refuses appends, and recovers by itself once the disk takes writes again:
//! it discards everything past the last durable offset, syncs that, and only
//! then goes on (a failed fsync is never retried and trusted). It also keeps
//! the durable mark (`checkpoint.rs`) up to date.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use cairn_core::{
    AppendCondition, AppendResult, ExpectedVersion, NewEvent, Position, StoreError, StreamState,
    Timestamp,
};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::checkpoint::MarkFile;
use crate::index::{DELETED_EVENT, TOMBSTONE_EVENT};
use crate::record::{self, RECORD_OVERHEAD_BYTES};
use crate::segment::{self, SEGMENT_HEADER_BYTES, Segment};
use crate::shared::Shared;

/// Most bytes gathered into one group commit before it is written.
const GROUP_BYTES_MAX: usize = 16 * 1024 * 1024;

pub(crate) enum AppendKind {
    User,
    /// A `$metadata` event in `$$target`; `expected` applies to `$$target`.
    Metadata {
        target: String,
    },
    /// A `$deleted`/`$tombstone` event in `$$target`; `expected` applies to `target`.
    Delete {
        target: String,
    },
}

pub(crate) struct AppendRequest {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub kind: AppendKind,
    /// A DCB condition (user appends only), checked after the expected version.
    pub condition: Option<AppendCondition>,
    /// Encoded size, computed by the caller while checking limits.
    pub bytes: usize,
    pub reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

/// An event of the group not yet durable, for idempotency checks inside the group.
struct PendingId {
    stream: Arc<str>,
    /// Where its record starts in the group's buffer.
    at: usize,
    version: u64,
    position: u64,
    batch_start: bool,
    batch_end: bool,
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

struct Group {
    buf: Vec<u8>,
    /// Stream → (version, state) after the accepted appends of this group.
    streams: FastMap<String, (u64, StreamState)>,
    ids: FastMap<Uuid, PendingId>,
    /// (position, offset in `buf`) of each event of a user stream in this
    /// group, in order: conditions must see them before they are durable.
    user_events: Vec<(u64, usize)>,
    replies: Vec<(Reply, Result<AppendResult, StoreError>)>,
}

/// Where an append's answer goes.
type Reply = oneshot::Sender<Result<AppendResult, StoreError>>;

impl Group {
    /// Forgets the group's records (written, or discarded after a failure); its replies stay.
    fn clear_records(&mut self) {
        self.buf.clear();
        self.streams.clear();
        self.ids.clear();
        self.user_events.clear();
    }
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    active: Arc<Segment>,
    /// File offset in `active` where the next group goes.
    offset: u64,
    last_timestamp: i64,
    group: Group,
    /// How long a group may wait for stragglers (see `group`).
    linger: Duration,
    /// Requests in the last group.
    previous_group: usize,
    mark_file: MarkFile,
    /// Id of the newest durable event (0 if none).
    last_id: u128,
    /// (events, newest id) of the last mark written, and when.
    marked: Option<(u64, u128)>,
    marked_at: Instant,
}

/// Zero bytes written and synced at the log's end to test that the disk
/// takes writes again before the writer goes on after a failure.
const PROBE_BYTES: u64 = 64 * 1024;
const RECOVERY_BACKOFF_MIN: Duration = Duration::from_millis(50);

/// The writer and its queue, taken by whoever writes the next group. An
/// appender that finds it free writes the group on its own thread: one
/// thread hand-off to the writer and one back cost more CPU than the
/// group's fsync on a virtual machine. When it is taken, the holder writes
/// the request with its own group or hands it to the writer thread, which
/// also lingers for fuller groups, keeps the durable mark up to date and
/// recovers after a failed write.
pub(crate) struct Lead {
    duty: Mutex<Duty>,
    /// Requests sent and not yet taken from the queue (below zero for a
    /// moment when one is taken before its sender counted it).
    queued: AtomicIsize,
    /// The writer thread waits for stragglers of its group: a sender wakes it.
    lingering: AtomicBool,
    thread: OnceLock<std::thread::Thread>,
    shared: Arc<Shared>,
}

struct Duty {
    writer: Writer,
    rx: mpsc::Receiver<AppendRequest>,
    /// A write failed: the writer thread repairs the log before anything else is written.
    failed: Option<String>,
}

enum Taken {
    Empty,
    Closed,
    Group(Result<(), StoreError>),
}

/// Takes a request from the queue, counting it.
fn take(
    rx: &mut mpsc::Receiver<AppendRequest>,
    queued: &AtomicIsize,
) -> Result<AppendRequest, mpsc::error::TryRecvError> {
    let req = rx.try_recv();
    if req.is_ok() {
        queued.fetch_sub(1, Ordering::SeqCst);
    }
    req
}

impl Lead {
    pub(crate) fn new(
        shared: Arc<Shared>,
        writer: Writer,
        rx: mpsc::Receiver<AppendRequest>,
    ) -> Arc<Lead> {
        Arc::new(Lead {
            duty: Mutex::new(Duty { writer, rx, failed: None }),
            queued: AtomicIsize::new(0),
            lingering: AtomicBool::new(false),
            thread: OnceLock::new(),
            shared,
        })
    }

    /// Starts the writer thread.
    pub(crate) fn spawn(self: &Arc<Lead>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let lead = self.clone();
        let handle =
            std::thread::Builder::new().name("cairn-writer".into()).spawn(move || lead.run())?;
        let _ = self.thread.set(handle.thread().clone());
        Ok(handle)
    }

    pub(crate) fn wake_thread(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// Counts a request just sent to the queue.
    pub(crate) fn sent(&self) {
        self.queued.fetch_add(1, Ordering::SeqCst);
    }

    /// After sends: writes one group here if no one else is writing and no
    /// fuller group is worth waiting for, so that a lone appender needs no
    /// other thread. Otherwise the holder
    /// sees the requests when it lets go (the fences make sure that either
    /// this `try_lock` or the holder's check of `queued` sees the other).
    pub(crate) fn lead(&self) {
        fence(Ordering::SeqCst);
        let mut duty = match self.duty.try_lock() {
            Ok(duty) => duty,
            Err(TryLockError::WouldBlock) => {
                if self.lingering.load(Ordering::SeqCst)
                    || self.shared.stats.unavailable.load(Ordering::Relaxed) != 0
                {
                    self.wake_thread();
                }
                return;
            }
            Err(TryLockError::Poisoned(_)) => {
                self.shared
                    .poison("the writer stopped on an internal error; restart the store".into());
                self.wake_thread();
                return;
            }
        };
        // Fewer waiting than the last group had: the others are probably on
        // their way, and the writer thread lingers for them (one fsync for all).
        if (duty.writer.previous_group as isize) > self.queued.load(Ordering::SeqCst)
            && !duty.writer.linger.is_zero()
            && duty.failed.is_none()
        {
            drop(duty);
            self.wake_thread();
            return;
        }
        if duty.failed.is_none() {
            let Duty { writer, rx, failed } = &mut *duty;
            if let Taken::Group(Err(e)) = writer.group(rx, &self.queued, None) {
                *failed = Some(writer.fail(e));
            }
        }
        let failed = duty.failed.is_some();
        drop(duty);
        fence(Ordering::SeqCst);
        if failed || self.queued.load(Ordering::SeqCst) > 0 {
            self.wake_thread();
        }
    }

    /// The writer thread: takes what appenders left, lingers for fuller
    /// groups, writes the durable mark when due, and recovers after a
    /// failed write; ends when the store closes.
    fn run(self: Arc<Lead>) {
        // Lingers are tens of microseconds: ask the kernel for timers that
        // precise on this thread (the default slack is 50 µs).
        // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000u64) };
        loop {
            let mut duty = match self.duty.lock() {
                Ok(duty) => duty,
                Err(poisoned) => {
                    // An appender panicked while writing: refuse everything from now on.
                    let mut duty = poisoned.into_inner();
                    self.shared.poison(
                        "the writer stopped on an internal error; restart the store".into(),
                    );
                    while let Ok(req) = duty.rx.try_recv() {
                        let _ = req
                            .reply
                            .send(Err(StoreError::Closed { reason: self.shared.poisoned() }));
                    }
                    return;
                }
            };
            let Duty { writer, rx, failed } = &mut *duty;
            if let Some(reason) = failed.take()
                && !writer.retry_until_repaired(&reason, rx, &self.queued)
            {
                return;
            }
            let wait = loop {
                match writer.group(rx, &self.queued, Some(&self.lingering)) {
                    Taken::Group(Ok(())) => continue,
                    Taken::Group(Err(e)) => {
                        if !writer.recover(e, rx, &self.queued) {
                            return;
                        }
                    }
                    Taken::Empty => match writer.mark_due_in() {
                        Some(wait) if wait.is_zero() => {
                            if let Err(e) = writer.write_mark_if_due()
                                && !writer.recover(e, rx, &self.queued)
                            {
                                return;
                            }
                        }
                        wait => break wait,
                    },
                    Taken::Closed => {
                        // Closing: the mark covers everything, so the next open checks it all.
                        if let Err(e) = writer.write_mark() {
                            eprintln!(
                                "cairn: could not write the durable mark at close ({e}); the next open checks the log against an older one"
                            );
                        }
                        return;
                    }
                }
            };
            drop(duty);
            fence(Ordering::SeqCst);
            if self.queued.load(Ordering::SeqCst) > 0 {
                continue;
            }
            // Woken by an appender that leaves requests, or by the close; at
            // least once per mark interval, for a mark an appender's group made due.
            std::thread::park_timeout(wait.unwrap_or(self.shared.options.checkpoint_interval));
        }
    }
}

impl Writer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shared: Arc<Shared>,
        active: Arc<Segment>,
        offset: u64,
        last_timestamp: i64,
        linger: Duration,
        mark_file: MarkFile,
        last_id: u128,
        marked: Option<(u64, u128)>,
    ) -> Self {
        let group = Group {
            buf: Vec::with_capacity(1 << 20),
            streams: FastMap::default(),
            ids: FastMap::default(),
            user_events: Vec::new(),
            replies: Vec::new(),
        };
        Writer {
            shared,
            active,
            offset,
            last_timestamp,
            group,
            linger,
            previous_group: 0,
            mark_file,
            last_id,
            marked,
            marked_at: Instant::now(),
        }
    }

    /// (events, newest id) now durable. The count comes from the stats,
    /// which `publish` sets under the index lock: no lock on this path.
    fn durable(&self) -> (u64, u128) {
        (self.shared.stats.events_written.load(std::sync::atomic::Ordering::Acquire), self.last_id)
    }

    /// Rewrites the durable mark if it is behind the log.
    fn write_mark(&mut self) -> Result<(), StoreError> {
        let (events, last_id) = self.durable();
        if self.marked == Some((events, last_id)) {
            return Ok(());
        }
        let head = self.shared.head.load(std::sync::atomic::Ordering::Acquire);
        self.mark_file.write(&*self.shared.options.storage, head, events, last_id)?;
        self.marked = Some((events, last_id));
        self.marked_at = Instant::now();
        Ok(())
    }

    /// Rewrites the durable mark if it is behind the log and due.
    fn write_mark_if_due(&mut self) -> Result<(), StoreError> {
        if self.mark_due_in().is_some_and(|w| w.is_zero()) { self.write_mark() } else { Ok(()) }
    }

    /// How long until the mark is due, if it is behind the log.
    fn mark_due_in(&self) -> Option<Duration> {
        if self.marked == Some(self.durable()) {
            return None;
        }
        Some(self.shared.options.checkpoint_interval.saturating_sub(self.marked_at.elapsed()))
    }

    /// Takes the waiting requests into one group and commits it. With
    /// `linger` (the writer thread only), when the queue runs dry before the
    /// group has as many requests as the previous one, it waits briefly
    /// (parked) for the rest: the callers the last fsync released are
    /// usually just computing their next append, and one fsync for all of
    /// them beats one for the first alone and another for the others.
    fn group(
        &mut self,
        rx: &mut mpsc::Receiver<AppendRequest>,
        queued: &AtomicIsize,
        linger: Option<&AtomicBool>,
    ) -> Taken {
        let first = match take(rx, queued) {
            Ok(req) => req,
            Err(mpsc::error::TryRecvError::Empty) => return Taken::Empty,
            Err(mpsc::error::TryRecvError::Disconnected) => return Taken::Closed,
        };
        let mut next = Some(first);
        let mut failed = None;
        let mut requests = 0;
        let mut lingered: Option<Instant> = None;
        while let Some(req) = next.take() {
            if let Err(e) = self.accept(req) {
                failed = Some(e);
                break;
            }
            requests += 1;
            if self.group.buf.len() >= GROUP_BYTES_MAX {
                break;
            }
            next = take(rx, queued).ok();
            if let Some(flag) = linger.filter(|_| {
                next.is_none() && requests < self.previous_group && !self.linger.is_zero()
            }) {
                let since = *lingered.get_or_insert_with(Instant::now);
                flag.store(true, Ordering::SeqCst);
                while next.is_none() {
                    let Some(left) = self.linger.checked_sub(since.elapsed()) else { break };
                    // Appenders that see `flag` unpark this thread after their send.
                    if queued.load(Ordering::SeqCst) <= 0 {
                        std::thread::park_timeout(left);
                    }
                    next = take(rx, queued).ok();
                }
                flag.store(false, Ordering::SeqCst);
            }
        }
        self.previous_group = requests;
        let result = match failed {
            Some(e) => Err(e),
            None => self.commit(),
        };
        Taken::Group(result.and_then(|()| self.write_mark_if_due()))
    }

    /// After an I/O failure: answers the group (its appends may or may not be
    /// durable: "outcome unknown"), refuses appends, and retries with backoff
    /// until the log can be written again. Returns false if the store closed
    /// meanwhile.
    fn recover(
        &mut self,
        e: StoreError,
        rx: &mut mpsc::Receiver<AppendRequest>,
        queued: &AtomicIsize,
    ) -> bool {
        let reason = self.fail(e);
        self.retry_until_repaired(&reason, rx, queued)
    }

    /// Answers the group after a failed write ("outcome unknown") and
    /// refuses appends from now on; returns why.
    fn fail(&mut self, e: StoreError) -> String {
        let reason = format!("a write to the log failed ({e})");
        eprintln!(
            "cairn: {reason}; appends are refused until the disk takes writes again (retrying with backoff)"
        );
        self.shared.poison(format!("{reason}; the store is recovering by itself"));
        self.shared.stats.write_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for (reply, result) in self.group.replies.drain(..) {
            // A request refused before the write (a conflict, say) keeps its own answer.
            let answer = match result {
                Ok(_) => Err(StoreError::OutcomeUnknown { reason: reason.clone() }),
                Err(e) => Err(e),
            };
            let _ = reply.send(answer);
        }
        self.group.clear_records();
        reason
    }

    /// Refuses what is queued and retries with backoff until the log can be
    /// written again. Returns false if the store closed meanwhile.
    fn retry_until_repaired(
        &mut self,
        reason: &str,
        rx: &mut mpsc::Receiver<AppendRequest>,
        queued: &AtomicIsize,
    ) -> bool {
        let backoff = cairn_core::Backoff::new(
            RECOVERY_BACKOFF_MIN,
            self.shared.options.recovery_backoff_max.max(RECOVERY_BACKOFF_MIN),
        );
        let mut failed = 0;
        let mut attempt_at = Instant::now() + backoff.delay(0);
        loop {
            loop {
                match take(rx, queued) {
                    Ok(req) => {
                        let _ = req
                            .reply
                            .send(Err(StoreError::Closed { reason: self.shared.poisoned() }));
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return false,
                }
            }
            let now = Instant::now();
            if now < attempt_at {
                std::thread::park_timeout(attempt_at - now);
                continue;
            }
            match self.repair() {
                Ok(()) => {
                    self.shared.recovered();
                    self.shared.stats.recoveries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    eprintln!(
                        "cairn: the log takes writes again; appends resumed (nothing acknowledged was lost)"
                    );
                    return true;
                }
                Err(e) => {
                    self.shared.poison(format!("{reason}; recovery failed too ({e}), retrying; the store is recovering by itself"));
                    failed += 1;
                    attempt_at = Instant::now() + backoff.delay(failed);
                }
            }
        }
    }

    /// Brings the log back to its last durable state, as an open after a
    /// crash would: removes any segment a failed roll left after the active
    /// one, zeroes the active segment past the last durable offset, syncs,
    /// then checks that the disk takes a write, a sync and an open again.
    fn repair(&mut self) -> Result<(), StoreError> {
        let storage = &*self.shared.options.storage;
        let dir = &self.shared.log_dir;
        segment::remove_leftovers(dir, storage)?;
        for (base, path) in segment::list(dir)? {
            if base > self.active.base {
                storage.remove(&path).map_err(|e| StoreError::io(&path, e))?;
            }
        }
        let seg = &self.active;
        let io = |e| StoreError::io(&seg.path, e);
        let capacity = seg.capacity();
        storage
            .set_len(&seg.file, self.offset)
            .and_then(|_| storage.set_len(&seg.file, capacity))
            .map_err(io)?;
        let probe = PROBE_BYTES.min(capacity - self.offset) as usize;
        storage.write_at(&seg.file, &vec![0u8; probe], self.offset).map_err(io)?;
        storage.sync_all(&seg.file).map_err(io)?;
        drop(storage.open(&seg.path, false).map_err(io)?);
        segment::sync_dir(dir, storage)?;
        self.marked = None;
        self.write_mark()
    }

    /// Checks one request and, if it passes, encodes it into the group.
    /// Only I/O errors (from rolling the segment) are returned.
    fn accept(&mut self, req: AppendRequest) -> Result<(), StoreError> {
        let size = req.bytes;
        if self.offset + (self.group.buf.len() + size) as u64 > self.active.capacity()
            && let Err(e) = self.commit().and_then(|()| self.roll(size))
        {
            // Nothing of this request was written.
            self.group.replies.push((
                req.reply,
                Err(StoreError::Closed {
                    reason: Some(format!("a write to the log failed ({e})")),
                }),
            ));
            return Err(e);
        }
        let result = self.check_and_encode(&req);
        self.group.replies.push((req.reply, result));
        Ok(())
    }

    fn current(&self, stream: &str) -> Result<(u64, StreamState), StoreError> {
        if let Some(s) = self.group.streams.get(stream) {
            return Ok(*s);
        }
        self.shared.indexed(|index| index.current(stream))
    }

    fn check_and_encode(&mut self, req: &AppendRequest) -> Result<AppendResult, StoreError> {
        if let Some(done) = self.already_written(req)? {
            return Ok(done);
        }
        match &req.kind {
            AppendKind::User | AppendKind::Metadata { .. } => {
                let (version, state) = self.current(&req.stream)?;
                if let AppendKind::Metadata { target } = &req.kind
                    && self.current(target)?.1 == StreamState::Tombstoned
                {
                    return Err(StoreError::StreamDeleted { stream: target.clone() });
                }
                if state == StreamState::Tombstoned {
                    return Err(StoreError::StreamDeleted { stream: req.stream.clone() });
                }
                if !req.expected.accepts(version) {
                    return Err(StoreError::WrongExpectedVersion {
                        stream: req.stream.clone(),
                        expected: req.expected,
                        actual_version: version,
                    });
                }
                if let Some(condition) = &req.condition {
                    self.check_condition(condition)?;
                }
            }
            AppendKind::Delete { target } => {
                let (version, state) = self.current(target)?;
                let hard = req.events[0].event_type == TOMBSTONE_EVENT;
                match state {
                    StreamState::Tombstoned => {
                        return Err(StoreError::StreamDeleted { stream: target.clone() });
                    }
                    StreamState::Deleted if !hard => {
                        return Err(StoreError::StreamNotFound { stream: target.clone() });
                    }
                    StreamState::Live if version == 0 && !hard => {
                        return Err(StoreError::StreamNotFound { stream: target.clone() });
                    }
                    _ => {}
                }
                if !req.expected.accepts(version) {
                    return Err(StoreError::WrongExpectedVersion {
                        stream: target.clone(),
                        expected: req.expected,
                        actual_version: version,
                    });
                }
                let new_state = if hard { StreamState::Tombstoned } else { StreamState::Deleted };
                self.group.streams.insert(target.clone(), (0, new_state));
            }
        }
        self.encode(req)
    }

    /// Fails if an event matching the condition's query lies after its
    /// position: first among the durable events (the index), then among the
    /// events of this group, which are all newer. Only positions past the
    /// condition's are looked at.
    fn check_condition(&self, condition: &AppendCondition) -> Result<(), StoreError> {
        let query = &condition.fail_if_events_match;
        let after = condition.after.map(|p| p.0);
        let durable =
            self.shared.indexed(|index| crate::query::first_match_after(index, query, after))?;
        let first_conflict = durable.or_else(|| {
            let start =
                self.group.user_events.partition_point(|(p, _)| after.is_some_and(|a| *p <= a));
            self.group.user_events[start..].iter().find_map(|&(position, at)| {
                let view = record::decode_trusted(&self.group.buf[at..])
                    .expect("the writer encodes valid records");
                crate::query::matches_record(query, &view).then_some(position)
            })
        });
        match first_conflict {
            Some(p) => Err(StoreError::AppendConditionFailed {
                first_conflict: Position(p),
                after: condition.after,
            }),
            None => Ok(()),
        }
    }

    fn encode(&mut self, req: &AppendRequest) -> Result<AppendResult, StoreError> {
        let now = Timestamp::now().0.max(self.last_timestamp);
        self.last_timestamp = now;
        let (mut version, _) = self.current(&req.stream)?;
        let mut position = 0;
        let stream: Arc<str> = Arc::from(req.stream.as_str());
        let count = req.events.len();
        let user = !req.stream.starts_with('$');
        for (i, event) in req.events.iter().enumerate() {
            version += 1;
            position = self.active.base + self.offset + self.group.buf.len() as u64;
            let batch_end = i + 1 == count;
            let batch_start = i == 0;
            let at = self.group.buf.len();
            if user {
                self.group.user_events.push((position, at));
            }
            record::encode(
                &mut self.group.buf,
                &req.stream,
                version,
                Timestamp(now),
                event,
                batch_end,
            );
            self.group.ids.insert(
                event.id,
                PendingId { stream: stream.clone(), at, version, position, batch_start, batch_end },
            );
        }
        self.group.streams.insert(req.stream.clone(), (version, StreamState::Live));
        Ok(AppendResult { next_version: version, position: Position(position) })
    }

    /// Idempotent retries: if the batch's ids were all written, in this order,
    /// with the same content, as one whole earlier append to this stream's
    /// current incarnation, returns that append's result. Any other reuse of
    /// an id is a conflict, and nothing is written.
    fn already_written(&self, req: &AppendRequest) -> Result<Option<AppendResult>, StoreError> {
        struct Hit {
            stream: String,
            version: u64,
            position: u64,
            batch_end: bool,
            same: bool,
        }
        // Positions of the ids the log holds already (not those of this group).
        let durable: Vec<Option<u64>> = self.shared.indexed(|index| {
            req.events
                .iter()
                .map(|e| {
                    if self.group.ids.contains_key(&e.id) {
                        Ok(None)
                    } else {
                        index.id(e.id.as_u128())
                    }
                })
                .collect()
        })?;
        let index = self.shared.index.read().unwrap();
        let lookup =
            |(event, durable): (&NewEvent, &Option<u64>)| -> Result<Option<Hit>, StoreError> {
                if let Some(p) = self.group.ids.get(&event.id) {
                    let view = record::decode_trusted(&self.group.buf[p.at..])
                        .expect("the writer encodes valid records");
                    let same = view.same_content(event);
                    return Ok(Some(Hit {
                        stream: p.stream.to_string(),
                        version: p.version,
                        position: p.position,
                        batch_end: p.batch_end,
                        same,
                    }));
                }
                let Some(position) = *durable else { return Ok(None) };
                let found = self.shared.with_record(position, |v| {
                    (v.stream.to_string(), v.version, v.batch_end(), v.same_content(event))
                });
                Ok(found.map(|(stream, version, batch_end, same)| Hit {
                    stream,
                    version,
                    position,
                    batch_end,
                    same,
                }))
            };
        let found: Vec<_> =
            req.events.iter().zip(&durable).map(lookup).collect::<Result<_, _>>()?;
        let Some(first_found) =
            req.events.iter().zip(&found).find(|(_, h)| h.is_some()).map(|(e, _)| e.id)
        else {
            return Ok(None);
        };
        let conflict =
            |id: Uuid, detail: String| Err(StoreError::IdempotencyConflict { id, detail });
        let mut last = None;
        for (event, hit) in req.events.iter().zip(&found) {
            let Some(hit) = hit else {
                return conflict(
                    first_found,
                    format!("but event {} of the same batch was not", event.id),
                );
            };
            if hit.stream != req.stream {
                return conflict(event.id, format!("to stream '{}'", hit.stream));
            }
            if !hit.same {
                return conflict(event.id, "with a different type, payload or tags".into());
            }
            if let Some((prev_version, _, _)) = last
                && hit.version != prev_version + 1
            {
                return conflict(event.id, "but not as part of the same append".into());
            }
            // Soft-deleted since: the event is no longer part of the stream.
            let pending = self.group.ids.contains_key(&event.id);
            let current = pending
                || index
                    .streams
                    .get(&hit.stream)?
                    .is_some_and(|s| hit.position >= s.since && hit.version <= s.version);
            if !current {
                return conflict(
                    event.id,
                    format!(
                        "to stream '{}', which was deleted since; send new ids to write it again",
                        hit.stream
                    ),
                );
            }
            last = Some((hit.version, hit.position, hit.batch_end));
        }
        let (version, position, batch_end) = last.expect("batch is not empty");
        let first = &req.events[0].id;
        let batch_start = match self.group.ids.get(first) {
            Some(p) => p.batch_start,
            None => found[0].as_ref().is_some_and(|h| self.shared.starts_append(h.position)),
        };
        if !batch_end || !batch_start {
            return conflict(req.events[0].id, "as part of a larger append".into());
        }
        Ok(Some(AppendResult { next_version: version, position: Position(position) }))
    }

    /// Writes and syncs the group, then publishes it and answers the callers.
    fn commit(&mut self) -> Result<(), StoreError> {
        if !self.group.buf.is_empty() {
            let seg = &self.active;
            let storage = &*self.shared.options.storage;
            storage
                .write_at(&seg.file, &self.group.buf, self.offset)
                .map_err(|e| StoreError::io(&seg.path, e))?;
            let started = std::time::Instant::now();
            storage.sync_data(&seg.file).map_err(|e| StoreError::io(&seg.path, e))?;
            self.shared.stats.record_sync(started.elapsed(), self.group.buf.len());
            let start = self.offset;
            self.offset += self.group.buf.len() as u64;
            self.last_id = last_record_id(&self.group.buf);
            self.shared.publish(&self.active, start, &self.group.buf);
        }
        self.group.clear_records();
        for (reply, result) in self.group.replies.drain(..) {
            let _ = reply.send(result);
        }
        Ok(())
    }

    /// Seals the active segment and starts a new one with room for at least `size` bytes.
    fn roll(&mut self, size: usize) -> Result<(), StoreError> {
        let old = self.active.clone();
        let storage = &*self.shared.options.storage;
        storage.set_len(&old.file, self.offset).map_err(|e| StoreError::io(&old.path, e))?;
        storage.sync_all(&old.file).map_err(|e| StoreError::io(&old.path, e))?;
        let sealed = Arc::new(Segment::open(&old.path, false, storage)?);
        let base = old.base + self.offset;
        let capacity = self
            .shared
            .options
            .segment_bytes
            .max(SEGMENT_HEADER_BYTES + (size + RECORD_OVERHEAD_BYTES) as u64);
        let fresh = Arc::new(Segment::create(&self.shared.log_dir, base, capacity, storage)?);
        self.shared.replace_active(sealed.clone(), fresh.clone());
        // Appends to the new segment go to a new memtable; the sealed one's
        // index file is written off the append path.
        let mem = self.shared.index.write().unwrap().push_mem(fresh.base);
        if let Some(mem) = mem {
            self.shared.sealed(sealed, mem);
        }
        self.active = fresh;
        self.offset = SEGMENT_HEADER_BYTES;
        // The mark now says the log goes on past the sealed segment, so a
        // lost newest segment is noticed at open.
        self.marked = None;
        self.write_mark()
    }
}

/// Id of the last record in a buffer of whole records.
fn last_record_id(buf: &[u8]) -> u128 {
    let body_len =
        u32::from_le_bytes(buf[buf.len() - 4..].try_into().expect("a record ends the buffer"))
            as usize;
    let start = buf.len() - body_len - RECORD_OVERHEAD_BYTES;
    record::decode_trusted(&buf[start..]).expect("the writer encodes valid records").id.as_u128()
}

/// The event written by a delete.
pub(crate) fn delete_event(hard: bool) -> NewEvent {
    NewEvent::json_bytes(if hard { TOMBSTONE_EVENT } else { DELETED_EVENT }, "{}")
}
