//! The stream summaries in layers, newest first:
//! - `dirty`, in memory: the summaries changed since the last flush (the
//!   memtable; it holds at most about [`crate::Options::summaries_in_memory`]
//!   streams before it is flushed);
//! - `frozen`, in memory: a former `dirty` being written to a new table;
//! - the chain of stream tables on disk ([`crate::table`]), newest first.
//!
//! A lookup takes the first layer that has the stream. An update copies the
//! summary into `dirty` first. Memory holds the streams changed lately, not
//! every stream.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cairn_core::StoreError;

use crate::idx::Damaged;
use crate::index::{FastMap, StreamEntry};
use crate::merge::MergeError;
use crate::shared::Shared;
use crate::table::{self, Head, Source, Table};

/// Deltas the chain holds at most before they are merged into a new base.
const MAX_DELTAS: usize = 8;

/// Summaries being written to a table, with where in the log they stand.
pub(crate) struct Frozen {
    pub entries: FastMap<String, StreamEntry>,
    pub head: Head,
}

#[derive(Default)]
pub(crate) struct Streams {
    pub dirty: FastMap<String, StreamEntry>,
    pub frozen: Option<Arc<Frozen>>,
    /// The chain, oldest (the base) first.
    pub tables: Vec<Arc<Table>>,
}

pub(crate) fn table_error(d: Damaged) -> StoreError {
    StoreError::Corrupt {
        file: d.file.display().to_string(),
        offset: d.offset,
        reason: format!(
            "the stream table is damaged ({}); it is not used again, and the next open rebuilds it from the log",
            d.reason
        ),
    }
}

impl Streams {
    /// The newest summary of `name`, if the store has the stream.
    pub(crate) fn get(&self, name: &str) -> Result<Option<Cow<'_, StreamEntry>>, StoreError> {
        if let Some(e) = self.dirty.get(name) {
            return Ok(Some(Cow::Borrowed(e)));
        }
        if let Some(e) = self.frozen.as_ref().and_then(|f| f.entries.get(name)) {
            return Ok(Some(Cow::Borrowed(e)));
        }
        for t in self.tables.iter().rev() {
            if let Some(e) = t.get(name).map_err(table_error)? {
                return Ok(Some(Cow::Owned(e)));
            }
        }
        Ok(None)
    }

    /// The summary of `name` to change (a new stream's is the default).
    pub(crate) fn get_mut(&mut self, name: &str) -> Result<&mut StreamEntry, StoreError> {
        if self.dirty.contains_key(name) {
            return Ok(self.dirty.get_mut(name).expect("just found"));
        }
        self.load(name)
    }

    /// [`Streams::get_mut`] of a stream not in `dirty`: copies it there from
    /// the layer that has it.
    pub(crate) fn load(&mut self, name: &str) -> Result<&mut StreamEntry, StoreError> {
        let e = self.get(name)?.map(Cow::into_owned).unwrap_or_default();
        Ok(self.dirty.entry(name.to_string()).or_insert(e))
    }

    /// Summaries held in memory.
    pub(crate) fn in_memory(&self) -> usize {
        self.dirty.len() + self.frozen.as_ref().map_or(0, |f| f.entries.len())
    }

    /// Calls `f` with every stream whose name starts with `prefix`, in name
    /// order, with its newest summary, until `f` returns false.
    pub(crate) fn walk(
        &self,
        prefix: &str,
        f: impl FnMut(&str, Cow<'_, StreamEntry>) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut mems: Vec<&FastMap<String, StreamEntry>> = Vec::new();
        if let Some(frozen) = &self.frozen {
            mems.push(&frozen.entries);
        }
        mems.push(&self.dirty);
        walk(&self.tables, &mems, prefix, f)
    }
}

enum Layer<'a> {
    Mem(Vec<(&'a str, &'a StreamEntry)>),
    Table(&'a Table),
}

/// Walks `tables` (oldest first) and then `mems` (oldest first) at once in
/// name order, the newest layer's summary winning; see [`Streams::walk`].
fn walk<'a>(
    tables: &'a [Arc<Table>],
    mems: &[&'a FastMap<String, StreamEntry>],
    prefix: &str,
    mut f: impl FnMut(&str, Cow<'_, StreamEntry>) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut layers: Vec<(Layer<'a>, usize)> = Vec::with_capacity(tables.len() + mems.len());
    for t in tables {
        layers.push((Layer::Table(t), t.lower_bound(prefix).map_err(table_error)?));
    }
    for m in mems {
        let mut v: Vec<(&str, &StreamEntry)> =
            m.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, e)| (k.as_str(), e)).collect();
        v.sort_unstable_by(|a, b| a.0.cmp(b.0));
        layers.push((Layer::Mem(v), 0));
    }
    let name = |layer: &(Layer<'a>, usize)| -> Result<Option<&'a str>, StoreError> {
        match layer {
            (Layer::Mem(v), at) => Ok(v.get(*at).map(|(n, _)| *n)),
            (Layer::Table(t), at) if *at < t.len() => {
                Ok(Some(t.name_at(*at).map_err(table_error)?).filter(|n| n.starts_with(prefix)))
            }
            _ => Ok(None),
        }
    };
    loop {
        let mut least: Option<&'a str> = None;
        for layer in &layers {
            if let Some(n) = name(layer)?
                && least.is_none_or(|l| n < l)
            {
                least = Some(n);
            }
        }
        let Some(least) = least else { return Ok(()) };
        let mut winner = None;
        for (i, layer) in layers.iter_mut().enumerate() {
            if name(layer)? == Some(least) {
                winner = Some((i, layer.1));
                layer.1 += 1;
            }
        }
        let (i, at) = winner.expect("the least name is in a layer");
        let entry = match &layers[i].0 {
            Layer::Mem(v) => Cow::Borrowed(v[at].1),
            Layer::Table(t) => Cow::Owned(t.entry_at(at).map_err(table_error)?),
        };
        if !f(least, entry)? {
            return Ok(());
        }
    }
}

/// A table source: the layers' merged summaries.
struct Layers<'a> {
    tables: &'a [Arc<Table>],
    mems: Vec<&'a FastMap<String, StreamEntry>>,
}

impl Source for Layers<'_> {
    fn each(
        &self,
        f: &mut dyn FnMut(&str, &StreamEntry) -> Result<(), MergeError>,
    ) -> Result<(), MergeError> {
        let mut failed = None;
        walk(self.tables, &self.mems, "", |name, e| match f(name, &e) {
            Ok(()) => Ok(true),
            Err(err) => {
                failed = Some(err);
                Ok(false)
            }
        })
        .map_err(MergeError::Failed)?;
        failed.map_or(Ok(()), Err)
    }
}

/// Writes the summaries changed since the last table to a new one (merging
/// the chain into a new base when its deltas grew), off the append path:
/// appends go on into a fresh `dirty` meanwhile. True if a table was written.
pub(crate) fn flush(shared: &Shared, data_dir: &Path) -> Result<bool, StoreError> {
    let frozen = {
        let mut index = shared.index.write().unwrap();
        let from = index.streams.tables.last().map_or(0, |t| t.head().to);
        let head = shared.head.load(Ordering::Acquire);
        if index.streams.frozen.is_some() || index.streams.dirty.is_empty() || head <= from {
            return Ok(false);
        }
        let last_id = shared.last_id_before(head).unwrap_or(0);
        shared.flush_asked.store(false, Ordering::Release);
        let entries = std::mem::take(&mut index.streams.dirty);
        let frozen = Arc::new(Frozen {
            entries,
            head: Head { from, to: head, events: index.events, last_id },
        });
        index.streams.frozen = Some(frozen.clone());
        frozen
    };
    let never = AtomicBool::new(false);
    let storage = &*shared.options.storage;
    let source = Layers { tables: &[], mems: vec![&frozen.entries] };
    let written =
        table::write(data_dir, frozen.head, frozen.entries.len(), &source, storage, &never);
    {
        let mut index = shared.index.write().unwrap();
        let streams = &mut index.streams;
        streams.frozen = None;
        match written {
            Ok(t) => streams.tables.push(Arc::new(t)),
            Err(e) => {
                // Back into memory, under what changed since.
                for (k, v) in &frozen.entries {
                    if !streams.dirty.contains_key(k) {
                        streams.dirty.insert(k.clone(), v.clone());
                    }
                }
                return Err(e);
            }
        }
    }
    shared.stats.stream_tables_written.fetch_add(1, Ordering::Relaxed);
    compact(shared, data_dir)?;
    Ok(true)
}

/// Merges the chain into one base when it holds [`MAX_DELTAS`] deltas or
/// when they hold half as many streams as the base: each summary is
/// rewritten a few times on average, and a lookup touches a few tables.
fn compact(shared: &Shared, data_dir: &Path) -> Result<(), StoreError> {
    let tables = shared.index.read().unwrap().streams.tables.clone();
    let (Some(base), Some(last)) = (tables.first(), tables.last()) else { return Ok(()) };
    let deltas: usize = tables[1..].iter().map(|t| t.len()).sum();
    if tables.len() < 2 || (tables.len() - 1 < MAX_DELTAS && deltas * 2 < base.len()) {
        return Ok(());
    }
    let head = Head { from: 0, ..last.head() };
    let never = AtomicBool::new(false);
    let storage = &*shared.options.storage;
    let merged = table::write(
        data_dir,
        head,
        base.len() + deltas,
        &Layers { tables: &tables, mems: Vec::new() },
        storage,
        &never,
    )?;
    {
        let mut index = shared.index.write().unwrap();
        let current = &index.streams.tables;
        if current.len() < tables.len()
            || !current.iter().zip(&tables).all(|(a, b)| Arc::ptr_eq(a, b))
        {
            // Not expected (only this thread changes the chain); keep what is in use.
            return Ok(());
        }
        let newer: Vec<Arc<Table>> = current[tables.len()..].to_vec();
        index.streams.tables = std::iter::once(Arc::new(merged)).chain(newer).collect();
    }
    for t in &tables {
        let _ = storage.remove(t.path());
    }
    let _ = crate::segment::sync_dir(&table::dir(data_dir), storage);
    shared.stats.stream_table_merges.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Rebuilds the damaged table at `path` from the log: the records of its
/// range replayed on top of the tables before it give exactly what it held.
/// It then takes its place. False if the chain holds no table at `path`.
pub(crate) fn rebuild_table(
    shared: &Shared,
    data_dir: &Path,
    path: &Path,
) -> Result<bool, StoreError> {
    let _one = shared.healing.lock().unwrap();
    let (damaged, older) = {
        let index = shared.index.read().unwrap();
        let Some(k) = index.streams.tables.iter().position(|t| t.path() == path) else {
            return Ok(false);
        };
        (index.streams.tables[k].clone(), index.streams.tables[..k].to_vec())
    };
    eprintln!("cairn: stream table {} is damaged; rebuilding it from the log", path.display());
    let Head { from, to, .. } = damaged.head();
    let mut replay = crate::index::Index::default();
    replay.streams.tables = older;
    let segments: Vec<_> = shared.segments.read().unwrap().clone();
    let newest = segments.last().map(|s| s.base);
    for seg in segments.iter().filter(|s| s.base + s.capacity() > from && s.base < to) {
        let start = from.saturating_sub(seg.base).max(crate::segment::SEGMENT_HEADER_BYTES);
        let mut apply = |v: &crate::record::RecordView<'_>, p: u64| {
            if p < to { replay.apply_summary(v, p) } else { Ok(()) }
        };
        crate::recovery::scan_segment(
            seg,
            start,
            start,
            Some(seg.base) == newest,
            Some(&mut apply),
        )?;
    }
    let never = AtomicBool::new(false);
    let storage = &*shared.options.storage;
    let source = Layers { tables: &[], mems: vec![&replay.streams.dirty] };
    let rebuilt = Arc::new(table::write(
        data_dir,
        damaged.head(),
        replay.streams.dirty.len(),
        &source,
        storage,
        &never,
    )?);
    {
        let mut index = shared.index.write().unwrap();
        if let Some(k) = index.streams.tables.iter().position(|t| Arc::ptr_eq(t, &damaged)) {
            index.streams.tables[k] = rebuilt;
        }
    }
    shared.stats.index_rebuilds.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}
