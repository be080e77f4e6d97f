//! What the store's handles, the writer, the readers and the background
//! threads share: the segments, the index, the durable head and the
//! store's health. Below the writer and the store, so that neither needs
//! the other to reach it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use cairn_core::StoreError;
use tokio::sync::watch;

use crate::index::{Index, MemIndex};
use crate::indexer;
use crate::options::Options;
use crate::record::{self, RECORD_OVERHEAD_BYTES};
use crate::segment::{SEGMENT_HEADER_BYTES, Segment};
use crate::stats::Stats;

/// State shared by the store handles, the writer and the subscriptions.
pub(crate) struct Shared {
    pub options: Options,
    pub log_dir: PathBuf,
    pub segments: RwLock<Vec<Arc<Segment>>>,
    pub index: RwLock<Index>,
    /// Position just past the newest durable record.
    pub head: AtomicU64,
    /// Wakes subscriptions when the head moves; taken (dropped) on close so they end.
    pub(crate) head_tx: Mutex<Option<watch::Sender<u64>>>,
    pub(crate) poisoned: Mutex<Option<String>>,
    pub stats: Stats,
    /// Jobs for the indexer thread; taken (dropped) on close so it ends.
    pub(crate) indexer: Mutex<Option<std::sync::mpsc::Sender<indexer::Job>>>,
    /// A flush of the stream summaries was asked for and has not started yet.
    pub flush_asked: AtomicBool,
    /// Held while a damaged stream table is rebuilt, so that it is rebuilt once.
    pub healing: Mutex<()>,
    pub data_dir: PathBuf,
}

impl Shared {
    /// Appends are refused with `reason` until [`Shared::recovered`].
    pub(crate) fn poison(&self, reason: String) {
        *self.poisoned.lock().unwrap() = Some(reason);
        self.stats.unavailable.store(1, Ordering::Relaxed);
    }

    pub(crate) fn recovered(&self) {
        *self.poisoned.lock().unwrap() = None;
        self.stats.unavailable.store(0, Ordering::Relaxed);
    }

    /// Why appends are refused now, if they are.
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.poisoned.lock().unwrap().clone()
    }

    /// Applies a durable group to the index, then moves the head and wakes subscribers.
    pub(crate) fn publish(&self, seg: &Segment, file_offset: u64, buf: &[u8]) {
        let mut index = self.index.write().unwrap();
        let mut at = 0usize;
        while at < buf.len() {
            let view =
                record::decode_trusted(&buf[at..]).expect("the writer encodes valid records");
            // The writer checked the append against the index; only a stream
            // table found damaged since can fail here. The events are durable,
            // the index no longer says so: no more appends until a reopen.
            if let Err(e) = index.apply(&view, seg.base + file_offset + at as u64) {
                eprintln!(
                    "cairn: the index could not take a written event ({}); appends are refused until the store is reopened",
                    e.0
                );
                self.poison(format!(
                    "the index could not take a written event ({}); reopen the store",
                    e.0
                ));
                break;
            }
            at += view.len;
        }
        if index.streams.dirty.len() >= self.options.summaries_in_memory
            && !self.flush_asked.swap(true, Ordering::AcqRel)
            && let Some(tx) = self.indexer.lock().unwrap().as_ref()
        {
            let _ = tx.send(indexer::Job::Flush);
        }
        let head = seg.base + file_offset + buf.len() as u64;
        debug_assert!(head > self.head.load(Ordering::Relaxed), "positions strictly increase");
        // Inside the lock: whoever sees the new index entries also sees the head that covers them.
        self.head.store(head, Ordering::Release);
        self.stats.events_written.store(index.events, Ordering::Release);
        drop(index);
        if let Some(tx) = self.head_tx.lock().unwrap().as_ref() {
            tx.send_replace(head);
        }
    }

    /// Hands a sealed segment and its memtable to the indexer.
    pub(crate) fn sealed(&self, seg: Arc<Segment>, mem: Arc<MemIndex>) {
        if let Some(tx) = self.indexer.lock().unwrap().as_ref() {
            let _ = tx.send(indexer::Job::Sealed(seg, mem));
        }
    }

    /// Runs `f` on the index. If it fails on a damaged index file, the file
    /// is rebuilt from its segment (never trusted) and `f` runs once more.
    pub(crate) fn indexed<T>(
        &self,
        f: impl Fn(&Index) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let first = f(&self.index.read().unwrap());
        match &first {
            Err(StoreError::Corrupt { file, .. })
                if file.ends_with(".idx") && indexer::rebuild_file(self, Path::new(file))? =>
            {
                f(&self.index.read().unwrap())
            }
            Err(StoreError::Corrupt { file, .. })
                if file.ends_with(".tbl")
                    && crate::summaries::rebuild_table(self, &self.data_dir, Path::new(file))? =>
            {
                f(&self.index.read().unwrap())
            }
            _ => first,
        }
    }

    /// The id of the event that ends at `head`, if any.
    pub(crate) fn last_id_before(&self, head: u64) -> Option<u128> {
        let segments = self.segments.read().unwrap();
        last_event(&segments, head).map(|(id, _)| id)
    }

    /// A receiver that sees every head move; `None` once the store is closed.
    pub(crate) fn watch_head(&self) -> Option<watch::Receiver<u64>> {
        self.head_tx.lock().unwrap().as_ref().map(|tx| tx.subscribe())
    }

    pub(crate) fn replace_active(&self, sealed: Arc<Segment>, fresh: Arc<Segment>) {
        let mut segments = self.segments.write().unwrap();
        let last = segments.len() - 1;
        segments[last] = sealed;
        segments.push(fresh);
    }

    pub(crate) fn segment_for(&self, position: u64) -> Option<Arc<Segment>> {
        let segments = self.segments.read().unwrap();
        let i = segments.partition_point(|s| s.base <= position);
        if i == 0 { None } else { Some(segments[i - 1].clone()) }
    }

    /// The durable bytes of the record at `position`, or `None` if no record fits there.
    pub(crate) fn with_record<T>(
        &self,
        position: u64,
        f: impl FnOnce(record::RecordView<'_>) -> T,
    ) -> Option<T> {
        let seg = self.segment_for(position)?;
        let head = self.head.load(Ordering::Acquire);
        let end = seg.capacity().min(head.saturating_sub(seg.base));
        let offset = position - seg.base;
        if offset < SEGMENT_HEADER_BYTES || offset >= end {
            return None;
        }
        record::decode(seg.bytes(offset, end)).ok().map(f)
    }

    /// Whether the durable record at `position` is the first of its append:
    /// appends are contiguous in the log and never cross a segment, so it is
    /// if the record before it ends an append or it opens its segment.
    pub(crate) fn starts_append(&self, position: u64) -> bool {
        let Some(seg) = self.segment_for(position) else { return false };
        let offset = position - seg.base;
        if offset == SEGMENT_HEADER_BYTES {
            return true;
        }
        if offset < SEGMENT_HEADER_BYTES + RECORD_OVERHEAD_BYTES as u64 || offset > seg.capacity() {
            return false;
        }
        let body_len = u32::from_le_bytes(seg.bytes(offset - 4, offset).try_into().unwrap()) as u64;
        offset
            .checked_sub(body_len + RECORD_OVERHEAD_BYTES as u64)
            .and_then(|start| self.with_record(seg.base + start, |v| v.batch_end()))
            .unwrap_or(false)
    }
}

/// The record that ends at `head`, walking back over empty segments: the
/// newest event of a log whose durable end is `head`; its id and timestamp.
pub(crate) fn last_event<S: std::borrow::Borrow<Segment>>(
    segments: &[S],
    head: u64,
) -> Option<(u128, i64)> {
    let seg: &Segment = segments
        .iter()
        .map(|s| s.borrow())
        .rev()
        .find(|s| s.base < head && head <= s.base + s.capacity())?;
    let offset = head - seg.base;
    if offset <= SEGMENT_HEADER_BYTES {
        return if seg.base == 0 { None } else { last_event(segments, seg.base) };
    }
    if offset < SEGMENT_HEADER_BYTES + RECORD_OVERHEAD_BYTES as u64 {
        return None;
    }
    let body_len = u32::from_le_bytes(seg.bytes(offset - 4, offset).try_into().unwrap()) as u64;
    let start = offset
        .checked_sub(body_len + RECORD_OVERHEAD_BYTES as u64)
        .filter(|s| *s >= SEGMENT_HEADER_BYTES)?;
    record::decode(seg.bytes(start, offset))
        .ok()
        .filter(|v| v.batch_end())
        .map(|v| (v.id.as_u128(), v.timestamp.0))
}
