//! The index: derived from the log, never the source of truth. It has two
//! layers:
//! - a summary per stream (version, state, metadata, where its current
//!   incarnation starts), which grows with the number of streams, not events;
//! - one part per segment, in log order: a sealed segment's part is its index
//!   file on disk ([`crate::idx`]), mapped and checked block by block; the
//!   newest segment's part (and a sealed one whose file is not written yet) is
//!   a [`MemIndex`] in memory, the memtable.
//!
//! Each part maps the segment's streams to their events' positions, its event
//! ids to positions, and its tags, event types and stream categories to the
//! positions of the user events that carry them. Recovery and the writer
//! apply records with the same [`Index::apply`], so both paths agree.

use std::collections::HashMap;
use std::sync::Arc;

use cairn_core::{StoreError, StreamMetadata, StreamState, stream_category};

use crate::idx::{Damaged, IdxFile, Kind};
use crate::record::RecordView;

pub(crate) const METADATA_EVENT: &str = "$metadata";
pub(crate) const DELETED_EVENT: &str = "$deleted";
pub(crate) const TOMBSTONE_EVENT: &str = "$tombstone";

pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// What the index keeps of a stream, whatever the length of its history.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StreamEntry {
    /// Events of the current incarnation (its last version).
    pub version: u64,
    pub state: StreamState,
    pub metadata: StreamMetadata,
    /// Lowest position the current incarnation's events can have: events of
    /// the stream before it belong to an incarnation deleted since.
    pub since: u64,
    pub last_position: Option<u64>,
}

impl Default for StreamEntry {
    fn default() -> Self {
        StreamEntry {
            version: 0,
            state: StreamState::Live,
            metadata: StreamMetadata::default(),
            since: 0,
            last_position: None,
        }
    }
}

impl StreamEntry {
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// First version reads may return, given the metadata and the time
    /// `now_us`; `older_than(t)` counts the incarnation's events before `t`.
    pub(crate) fn first_visible_version(
        &self,
        now_us: i64,
        older_than: impl FnOnce(i64) -> u64,
    ) -> u64 {
        let version = self.version();
        let mut first = self.metadata.truncate_before.unwrap_or(1).max(1);
        if let Some(max_count) = self.metadata.max_count {
            first = first.max(version.saturating_sub(max_count) + 1);
        }
        if let Some(max_age) = self.metadata.max_age_secs {
            // A max age past i64 microseconds (about 292,000 years) hides nothing.
            let max_age_us = i64::try_from(max_age).unwrap_or(i64::MAX).saturating_mul(1_000_000);
            let oldest_us = now_us.saturating_sub(max_age_us);
            first = first.max(older_than(oldest_us) + 1);
        }
        first
    }
}

/// One segment's events of one stream, in log order (all incarnations).
#[derive(Debug, Clone, Default)]
pub(crate) struct Run {
    pub positions: Vec<u64>,
    /// Timestamp (µs) of each event, for max-age lookups.
    pub timestamps: Vec<i64>,
    /// Version of the first event, and whether each later one's is its
    /// predecessor's plus one (false after a reset by a delete): what the
    /// stream summaries need of the segment.
    pub first_version: u64,
    pub regular: bool,
}

/// The memtable: one segment's part of the index, in memory.
#[derive(Debug, Default)]
pub(crate) struct MemIndex {
    pub base: u64,
    pub streams: FastMap<String, Run>,
    /// Event id → global position, for idempotent retries and unique ids.
    pub ids: Ids,
    /// Tag → positions of the events of user streams that carry it, ascending.
    pub tags: FastMap<String, Vec<u64>>,
    /// Event type → positions of the events of user streams of that type, ascending.
    pub types: FastMap<String, Vec<u64>>,
    /// Stream category → positions of the events of its streams, ascending.
    pub categories: FastMap<String, Vec<u64>>,
    pub events: u64,
    pub last_position: Option<u64>,
    /// Stream metadata written in this segment, in log order: (target
    /// stream, position, the `$metadata` event's data).
    pub metadata: Vec<(String, u64, Vec<u8>)>,
    /// Whether a stream was deleted or tombstoned in this segment.
    pub resets: bool,
}

/// What a sealed segment changes in the stream summaries, taken from its
/// memtable while it is rebuilt, so that recovery applies a line per stream
/// instead of reading every record again. Only for segments without a
/// delete (a reset's place among the stream's events matters).
pub(crate) struct Delta {
    streams: Vec<StreamDelta>,
    metadata: Vec<(String, u64, Vec<u8>)>,
    pub events: u64,
}

/// One stream's events in a segment, all of one incarnation, versions in a row.
struct StreamDelta {
    name: String,
    first_version: u64,
    first_position: u64,
    last_position: u64,
    events: u64,
}

/// A memtable's event ids. The active segment's are hashed, since every
/// append looks them up; a sealed segment rebuilt from its records only
/// lists them and sorts the list once at the end, which is the order its
/// index file stores anyway (a hash map of a million ids costs twice the
/// memory and most of a rebuild's time).
#[derive(Debug)]
pub(crate) enum Ids {
    Hashed(FastMap<u128, u64>),
    /// In log order until [`Ids::sort`], then by id.
    Listed(Vec<(u128, u64)>, bool),
}

impl Default for Ids {
    fn default() -> Self {
        Ids::Hashed(FastMap::default())
    }
}

impl Ids {
    /// A list for a rebuild, with room for about `n` ids.
    pub(crate) fn listed(n: usize) -> Self {
        Ids::Listed(Vec::with_capacity(n), true)
    }

    /// Adds an id; false if a hashed set held it already (a list finds that in [`Ids::sort`]).
    fn insert(&mut self, id: u128, position: u64) -> bool {
        match self {
            Ids::Hashed(map) => map.insert(id, position).is_none(),
            Ids::Listed(list, sorted) => {
                *sorted = *sorted && list.last().is_none_or(|last| last.0 < id);
                list.push((id, position));
                true
            }
        }
    }

    /// Sorts a list by id; `Err` names an id used twice and its later position.
    pub(crate) fn sort(&mut self) -> Result<(), (u128, u64)> {
        if let Ids::Listed(list, sorted) = self {
            if !*sorted {
                list.sort_unstable();
                *sorted = true;
            }
            if let Some(w) = list.windows(2).find(|w| w[0].0 == w[1].0) {
                return Err((w[0].0, w[0].1.max(w[1].1)));
            }
        }
        Ok(())
    }

    pub(crate) fn get(&self, id: u128) -> Option<u64> {
        match self {
            Ids::Hashed(map) => map.get(&id).copied(),
            Ids::Listed(list, true) => {
                list.binary_search_by_key(&id, |e| e.0).ok().map(|i| list[i].1)
            }
            Ids::Listed(list, false) => list.iter().find(|e| e.0 == id).map(|e| e.1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Ids::Hashed(map) => map.len(),
            Ids::Listed(list, _) => list.len(),
        }
    }

    /// (id, position) pairs in no particular order.
    pub(crate) fn iter(&self) -> Box<dyn Iterator<Item = (u128, u64)> + '_> {
        match self {
            Ids::Hashed(map) => Box::new(map.iter().map(|(id, p)| (*id, *p))),
            Ids::Listed(list, _) => Box::new(list.iter().copied()),
        }
    }

    /// (id, position) pairs sorted by id.
    pub(crate) fn sorted(&self) -> std::borrow::Cow<'_, [(u128, u64)]> {
        match self {
            Ids::Listed(list, true) => std::borrow::Cow::Borrowed(list),
            Ids::Listed(list, false) => {
                let mut v = list.clone();
                v.sort_unstable();
                std::borrow::Cow::Owned(v)
            }
            Ids::Hashed(map) => {
                let mut v: Vec<(u128, u64)> = map.iter().map(|(id, p)| (*id, *p)).collect();
                v.sort_unstable();
                std::borrow::Cow::Owned(v)
            }
        }
    }
}

/// Appends `position` to the list of `key`, creating it if needed. Positions
/// arrive in log order, so lists stay sorted; a tag written twice on one
/// event (possible in logs older than the tag checks) is indexed once.
fn push_position(map: &mut FastMap<String, Vec<u64>>, key: &str, position: u64) {
    match map.get_mut(key) {
        Some(list) => {
            debug_assert!(
                list.last().is_none_or(|p| *p <= position),
                "positions strictly increase"
            );
            if list.last() != Some(&position) {
                list.push(position);
            }
        }
        None => {
            map.insert(key.to_string(), vec![position]);
        }
    }
}

/// An index update that does not fit the log: a bug or undetected corruption.
#[derive(Debug)]
pub(crate) struct IndexError(pub String, Option<Box<StoreError>>);

impl IndexError {
    pub(crate) fn new(why: impl Into<String>) -> Self {
        IndexError(why.into(), None)
    }

    /// A lookup that failed (a damaged stream table): kept as it is, so
    /// that recovery knows which file to do without.
    pub(crate) fn from_store(e: StoreError) -> Self {
        IndexError(e.to_string(), Some(Box::new(e)))
    }

    /// As a store error: the failed lookup's own, or corruption of the log at `file`, `offset`.
    pub(crate) fn into_store(self, file: &std::path::Path, offset: u64) -> StoreError {
        match self.1 {
            Some(e) => *e,
            None => {
                StoreError::Corrupt { file: file.display().to_string(), offset, reason: self.0 }
            }
        }
    }
}

fn out_of_order(position: u64, version: u64, stream: &str, expected: u64) -> IndexError {
    IndexError::new(format!(
        "event at position {position} has version {version} in stream '{stream}', expected {expected}"
    ))
}

impl MemIndex {
    pub(crate) fn new(base: u64) -> Self {
        MemIndex { base, ..Default::default() }
    }

    pub(crate) fn apply(&mut self, r: &RecordView<'_>, position: u64) -> Result<(), IndexError> {
        debug_assert!(
            position >= self.base,
            "an event at {position} before its segment at {}",
            self.base
        );
        debug_assert!(
            self.last_position.is_none_or(|last| position > last),
            "positions strictly increase: {position} after {:?}",
            self.last_position
        );
        if !self.ids.insert(r.id.as_u128(), position) {
            return Err(IndexError::new(format!(
                "event id {} at position {position} was already used",
                r.id
            )));
        }
        let run = match self.streams.get_mut(r.stream) {
            Some(run) => run,
            None => self.streams.entry(r.stream.to_string()).or_default(),
        };
        if run.positions.is_empty() {
            (run.first_version, run.regular) = (r.version, true);
        } else if r.version != run.first_version + run.positions.len() as u64 {
            run.regular = false;
        }
        run.positions.push(position);
        run.timestamps.push(r.timestamp.0);
        self.events += 1;
        if let Some(target) = r.stream.strip_prefix("$$") {
            match r.event_type {
                METADATA_EVENT => {
                    self.metadata.push((target.to_string(), position, r.data.to_vec()))
                }
                DELETED_EVENT | TOMBSTONE_EVENT => self.resets = true,
                _ => {}
            }
        }
        self.last_position = Some(position);
        // Queries match the events of user streams only.
        if !r.stream.starts_with('$') {
            push_position(&mut self.types, r.event_type, position);
            if let Some(category) = stream_category(r.stream) {
                push_position(&mut self.categories, category, position);
            }
            for tag in r.tags() {
                push_position(&mut self.tags, tag, position);
            }
        }
        Ok(())
    }

    /// The segment's change to the stream summaries, if it can be applied
    /// without its records (see [`Delta`]).
    pub(crate) fn delta(&self) -> Option<Delta> {
        if self.resets || self.streams.values().any(|r| !r.regular) {
            return None;
        }
        let streams = self.streams.iter().map(|(name, r)| StreamDelta {
            name: name.clone(),
            first_version: r.first_version,
            first_position: r.positions[0],
            last_position: *r.positions.last().expect("a run has events"),
            events: r.positions.len() as u64,
        });
        Some(Delta {
            streams: streams.collect(),
            metadata: self.metadata.clone(),
            events: self.events,
        })
    }

    fn map(&self, kind: Kind) -> &FastMap<String, Vec<u64>> {
        match kind {
            Kind::Tag => &self.tags,
            Kind::Type => &self.types,
            Kind::Category => &self.categories,
        }
    }
}

/// One segment's part of the index.
pub(crate) enum Part {
    Mem(Arc<MemIndex>),
    Disk(Arc<IdxFile>),
}

/// The events of one stream in one part: positions and timestamps.
pub(crate) type RunRef<'a> = (&'a [u64], &'a [i64]);

impl Part {
    pub(crate) fn base(&self) -> u64 {
        match self {
            Part::Mem(m) => m.base,
            Part::Disk(f) => f.base(),
        }
    }

    pub(crate) fn last_position(&self) -> Option<u64> {
        match self {
            Part::Mem(m) => m.last_position,
            Part::Disk(f) => f.last_position(),
        }
    }

    pub(crate) fn stream(&self, name: &str) -> Result<Option<RunRef<'_>>, Damaged> {
        match self {
            Part::Mem(m) => {
                Ok(m.streams.get(name).map(|r| (r.positions.as_slice(), r.timestamps.as_slice())))
            }
            Part::Disk(f) => f.stream(name),
        }
    }

    /// No UUIDv7 id of this part is above this (a memtable: unbounded).
    fn v7_max(&self) -> u128 {
        match self {
            Part::Mem(_) => u128::MAX,
            Part::Disk(f) => f.v7_max(),
        }
    }

    pub(crate) fn id(&self, id: u128) -> Result<Option<u64>, Damaged> {
        match self {
            Part::Mem(m) => Ok(m.ids.get(id)),
            Part::Disk(f) => f.id(id),
        }
    }

    /// Positions of the user events with this tag, type or category.
    pub(crate) fn term(&self, kind: Kind, name: &str) -> Result<&[u64], Damaged> {
        match self {
            Part::Mem(m) => Ok(m.map(kind).get(name).map_or(&[][..], |l| l.as_slice())),
            Part::Disk(f) => f.term(kind, name),
        }
    }

    /// The position lists of every term of `kind`.
    pub(crate) fn all_terms(&self, kind: Kind) -> Result<Vec<&[u64]>, Damaged> {
        match self {
            Part::Mem(m) => Ok(m.map(kind).values().map(|l| l.as_slice()).collect()),
            Part::Disk(f) => f.all_terms(kind),
        }
    }
}

/// Where one stream's current incarnation lives: its runs, oldest first.
pub(crate) struct StreamView<'a> {
    runs: Vec<RunRef<'a>>,
}

impl StreamView<'_> {
    pub(crate) fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.0.len() as u64).sum()
    }

    /// Positions of versions `from..=to`, ascending.
    pub(crate) fn positions(&self, from: u64, to: u64) -> Vec<u64> {
        let mut out =
            Vec::with_capacity(to.saturating_sub(from).saturating_add(1).min(1 << 16) as usize);
        let mut first = from.saturating_sub(1) as usize;
        let mut count = to.saturating_sub(from.max(1) - 1) as usize;
        for (positions, _) in &self.runs {
            if count == 0 {
                break;
            }
            if first >= positions.len() {
                first -= positions.len();
                continue;
            }
            let take = (positions.len() - first).min(count);
            out.extend_from_slice(&positions[first..first + take]);
            count -= take;
            first = 0;
        }
        out
    }

    /// Events older than `t`: timestamps never decrease within the log, so
    /// a binary search in each run works.
    pub(crate) fn older_than(&self, t: i64) -> u64 {
        let mut n = 0;
        for (_, timestamps) in &self.runs {
            let k = timestamps.partition_point(|x| *x < t);
            n += k as u64;
            if k < timestamps.len() {
                break;
            }
        }
        n
    }
}

/// The whole index: stream summaries and one part per segment.
#[derive(Default)]
pub(crate) struct Index {
    pub streams: crate::summaries::Streams,
    /// One per segment, in log order; the last is the active segment's memtable.
    pub parts: Vec<Part>,
    /// `v7_upto[i]`: the largest UUIDv7 id of `parts[..=i]`, so that a new
    /// time-ordered id, above every old segment's, is checked against the
    /// newest parts only, however many there are. Kept by [`Index::parts_changed`];
    /// while its length differs from `parts`', every part is checked.
    v7_upto: Vec<u128>,
    pub events: u64,
}

/// A damaged index file found while answering: it is not trusted, and is rebuilt.
pub(crate) fn damaged_error(d: &Damaged) -> StoreError {
    StoreError::Corrupt {
        file: d.file.display().to_string(),
        offset: d.offset,
        reason: format!("index file is damaged ({}); it is rebuilt from its segment", d.reason),
    }
}

impl Index {
    /// An index whose only part is the memtable of the segment at `base`.
    pub(crate) fn new(base: u64) -> Self {
        let mut index =
            Index { parts: vec![Part::Mem(Arc::new(MemIndex::new(base)))], ..Default::default() };
        index.parts_changed();
        index
    }

    /// Version and state a new append to `stream` sees.
    pub(crate) fn current(&self, stream: &str) -> Result<(u64, StreamState), StoreError> {
        Ok(match self.streams.get(stream)? {
            Some(e) => (e.version, e.state),
            None => (0, StreamState::Live),
        })
    }

    /// Applies a record to the summaries and to the newest part (a memtable).
    pub(crate) fn apply(&mut self, r: &RecordView<'_>, position: u64) -> Result<(), IndexError> {
        self.apply_summary(r, position)?;
        match self.parts.last_mut() {
            Some(Part::Mem(mem)) => {
                Arc::get_mut(mem).expect("the active memtable is not shared").apply(r, position)
            }
            _ => Err(IndexError::new("the newest part of the index is not a memtable")),
        }
    }

    /// Applies a record to the stream summaries only.
    pub(crate) fn apply_summary(
        &mut self,
        r: &RecordView<'_>,
        position: u64,
    ) -> Result<(), IndexError> {
        // One hash lookup for a stream written lately (the common case).
        let entry = match self.streams.dirty.get_mut(r.stream) {
            Some(e) => e,
            None => self.streams.load(r.stream).map_err(IndexError::from_store)?,
        };
        debug_assert!(
            entry.last_position.is_none_or(|last| position > last),
            "a stream's events are in position order ('{}': {position} after {:?})",
            r.stream,
            entry.last_position
        );
        let expected = entry.version + 1;
        if r.version != expected {
            return Err(out_of_order(position, r.version, r.stream, expected));
        }
        if entry.version == 0 {
            entry.since = position;
        }
        entry.version += 1;
        entry.last_position = Some(position);
        entry.state = StreamState::Live;
        self.events += 1;
        if let Some(target) = r.stream.strip_prefix("$$") {
            let entry = self.streams.get_mut(target).map_err(IndexError::from_store)?;
            match r.event_type {
                METADATA_EVENT => {
                    entry.metadata = serde_json::from_slice(r.data).map_err(|e| {
                        IndexError::new(format!(
                            "stream metadata at position {position} does not parse: {e}"
                        ))
                    })?;
                }
                DELETED_EVENT | TOMBSTONE_EVENT => {
                    entry.version = 0;
                    entry.since = position + 1;
                    entry.last_position = None;
                    entry.metadata = StreamMetadata::default();
                    entry.state = if r.event_type == DELETED_EVENT {
                        StreamState::Deleted
                    } else {
                        StreamState::Tombstoned
                    };
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Applies a sealed segment's [`Delta`]: the same summaries as
    /// [`Index::apply_summary`] of each of its records. `Err` gives the
    /// position of an event that does not fit.
    pub(crate) fn apply_delta(&mut self, delta: &Delta) -> Result<(), (u64, IndexError)> {
        for d in &delta.streams {
            let entry = self
                .streams
                .get_mut(&d.name)
                .map_err(|e| (d.first_position, IndexError::from_store(e)))?;
            let expected = entry.version + 1;
            if d.first_version != expected {
                return Err((
                    d.first_position,
                    out_of_order(d.first_position, d.first_version, &d.name, expected),
                ));
            }
            if entry.version == 0 {
                entry.since = d.first_position;
            }
            entry.version = d.first_version + d.events - 1;
            entry.last_position = Some(d.last_position);
            entry.state = StreamState::Live;
            self.events += d.events;
        }
        for (target, position, data) in &delta.metadata {
            let metadata = serde_json::from_slice(data).map_err(|e| {
                (
                    *position,
                    IndexError::new(format!(
                        "stream metadata at position {position} does not parse: {e}"
                    )),
                )
            })?;
            self.streams
                .get_mut(target)
                .map_err(|e| (*position, IndexError::from_store(e)))?
                .metadata = metadata;
        }
        Ok(())
    }

    /// Starts the memtable of a new active segment at `base`; returns the
    /// previous one, now sealed, for its index file to be written.
    pub(crate) fn push_mem(&mut self, base: u64) -> Option<Arc<MemIndex>> {
        let sealed = match self.parts.last() {
            Some(Part::Mem(m)) => Some(m.clone()),
            _ => None,
        };
        self.parts.push(Part::Mem(Arc::new(MemIndex::new(base))));
        self.parts_changed();
        sealed
    }

    /// Call after changing `parts`: recomputes what id lookups skip by.
    pub(crate) fn parts_changed(&mut self) {
        let mut upto = 0u128;
        self.v7_upto = self
            .parts
            .iter()
            .map(|p| {
                upto = upto.max(p.v7_max());
                upto
            })
            .collect();
    }

    /// Puts `part` in place of the part of the segment at its base.
    pub(crate) fn replace_part(&mut self, part: Part) {
        let base = part.base();
        if let Some(slot) = self.parts.iter_mut().find(|p| p.base() == base) {
            *slot = part;
        }
        self.parts_changed();
    }

    /// Puts `new` in place of the parts at `range` (a merge, or a merged file split up again).
    pub(crate) fn replace_parts(&mut self, range: std::ops::Range<usize>, new: Vec<Part>) {
        self.parts.splice(range, new);
        self.parts_changed();
    }

    /// Where the part mapping `file` is, if it still is in the index.
    pub(crate) fn position_of(&self, file: &Arc<IdxFile>) -> Option<usize> {
        self.parts.iter().position(|p| matches!(p, Part::Disk(f) if Arc::ptr_eq(f, file)))
    }

    /// The position of the event with this id, if the log holds it.
    pub(crate) fn id(&self, id: u128) -> Result<Option<u64>, StoreError> {
        let skip = crate::idx::is_v7(id) && self.v7_upto.len() == self.parts.len();
        for (i, part) in self.parts.iter().enumerate().rev() {
            if let Some(p) = part.id(id).map_err(|d| damaged_error(&d))? {
                return Ok(Some(p));
            }
            if skip && i > 0 && id > self.v7_upto[i - 1] {
                break;
            }
        }
        Ok(None)
    }

    pub(crate) fn contains_id(&self, id: u128) -> Result<bool, StoreError> {
        self.id(id).map(|p| p.is_some())
    }

    /// The parts that may hold positions in `lo..=hi`.
    pub(crate) fn parts_within(&self, lo: u64, hi: u64) -> impl Iterator<Item = &Part> {
        let start = self
            .parts
            .partition_point(|p| p.last_position().map_or(p.base() < lo, |last| last < lo));
        self.parts[start..].iter().take_while(move |p| p.base() <= hi)
    }

    /// The runs of `entry`'s current incarnation. Fails if the parts do not
    /// hold as many events as the summary says (damage or a bug).
    pub(crate) fn stream_view(
        &self,
        name: &str,
        entry: &StreamEntry,
    ) -> Result<StreamView<'_>, StoreError> {
        let mut runs = Vec::new();
        if entry.version > 0 {
            let hi = entry.last_position.unwrap_or(u64::MAX);
            for part in self.parts_within(entry.since, hi) {
                let Some((positions, timestamps)) =
                    part.stream(name).map_err(|d| damaged_error(&d))?
                else {
                    continue;
                };
                let start = positions.partition_point(|p| *p < entry.since);
                if start < positions.len() {
                    runs.push((&positions[start..], &timestamps[start..]));
                }
            }
        }
        let view = StreamView { runs };
        if view.len() != entry.version {
            return Err(StoreError::Corrupt {
                file: String::new(),
                offset: entry.last_position.unwrap_or(0),
                reason: format!(
                    "the index holds {} event(s) of stream '{name}', its summary says {}; run `cairn reindex`",
                    view.len(),
                    entry.version
                ),
            });
        }
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_max_age_hides_nothing() {
        let timestamps = [1i64, 2, 3];
        let runs = vec![(&[10u64, 20, 30][..], &timestamps[..])];
        let view = StreamView { runs };
        let mut entry = StreamEntry { version: 3, ..Default::default() };
        for max_age in [1u64 << 62, 1 << 63, u64::MAX] {
            entry.metadata.max_age_secs = Some(max_age);
            assert_eq!(
                entry.first_visible_version(1_000_000_000, |t| view.older_than(t)),
                1,
                "max_age_secs {max_age}"
            );
        }
        entry.metadata.max_age_secs = Some(1);
        assert_eq!(
            entry.first_visible_version(10_000_000, |t| view.older_than(t)),
            4,
            "a short max age still hides old events"
        );
    }

    #[test]
    fn listed_ids_sort_once_and_find_one_used_twice() {
        let mut ids = Ids::listed(4);
        for (id, p) in [(5u128, 10u64), (3, 20), (9, 30)] {
            assert!(ids.insert(id, p));
        }
        assert_eq!(ids.sort(), Ok(()));
        assert_eq!((ids.get(3), ids.get(9), ids.get(4), ids.len()), (Some(20), Some(30), None, 3));
        assert_eq!(ids.sorted().to_vec(), vec![(3, 20), (5, 10), (9, 30)]);
        // The second use is named by the later of its two positions.
        let mut twice = Ids::listed(4);
        for (id, p) in [(7u128, 40u64), (2, 50), (7, 60)] {
            twice.insert(id, p);
        }
        assert_eq!(twice.sort(), Err((7, 60)));
        let mut hashed = Ids::default();
        assert!(hashed.insert(1, 1) && !hashed.insert(1, 2));
    }

    #[test]
    fn a_view_over_several_runs_finds_versions_and_ranges() {
        let (a, b, c) = ([1u64, 2, 3], [10u64], [20u64, 21]);
        let (ta, tb, tc) = ([1i64, 1, 2], [3i64], [4i64, 9]);
        let view = StreamView { runs: vec![(&a, &ta), (&b, &tb), (&c, &tc)] };
        assert_eq!(view.len(), 6);
        assert_eq!(view.positions(3, 5), vec![3, 10, 20]);
        assert_eq!(view.positions(1, 100), vec![1, 2, 3, 10, 20, 21]);
        assert_eq!(view.positions(6, 6), vec![21]);
        assert!(view.positions(7, 9).is_empty());
        assert_eq!((view.older_than(2), view.older_than(4), view.older_than(100)), (2, 4, 6));
    }
}
