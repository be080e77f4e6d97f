//! The stream table: the stream summaries (version, state, metadata, where
//! the current incarnation starts) on disk, so that memory holds only the
//! summaries changed since the last flush, however many streams the store has.
//!
//! A table file `DATA/streams/{from:020}-{to:020}.tbl` holds the summary, as
//! it was at log position `to`, of every stream that changed between `from`
//! and `to`, sorted by name. A chain of files from position 0 to a head is
//! the whole table as of that head: the first (the base) holds every stream
//! of the log up to its end, each later one (a delta) what changed after the
//! previous one's end; a name's newest entry wins. Summaries that change are
//! flushed to a new delta ([`crate::summaries`]), and the deltas are merged
//! into a new base when they grow, so that a lookup touches a few files.
//!
//! Like the index files, the tables are a cache of the log, written to a
//! temporary name, synced and renamed, and never changed: recovery takes the
//! chain's end as the place to replay the log from, a damaged or missing
//! table only makes it replay from further back.
//!
//! Layout (little-endian): a 512-byte header (magic, version, `from`, `to`,
//! the events in the log at `to`, the entry count, the id of the record that
//! ends at `to`, the sections, the checksum table's place and CRC, and the
//! header's own CRC); fixed-size entries sorted by name; a split-block Bloom
//! filter of the names; the first name of every [`FENCE`] entries (read into
//! memory at open); the names; the metadata as JSON (none when default);
//! one CRC32C per 4 KiB block after the header, checked on first use.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use cairn_core::{StoreError, StreamMetadata, StreamState};
use memmap2::Mmap;

use crate::idx::{
    Blocks, Damaged, FENCE, HEADER, bloom_block, bloom_blocks, bloom_mask, checked_blocks,
    map_checked, mapped_slice, name_hash,
};
use crate::index::StreamEntry;
use crate::merge::{MergeError, Out};
use crate::storage::Storage;

pub(crate) const DIR: &str = "streams";
const MAGIC: &[u8; 8] = b"CAIRNSTB";
const VERSION: u32 = 1;
const SECTIONS: usize = 6;
const S_ENTRIES: usize = 0;
const S_BLOOM: usize = 1;
/// End offset (in the fence keys) of each fence key.
const S_FENCE_ENDS: usize = 2;
const S_FENCE_KEYS: usize = 3;
const S_NAMES: usize = 4;
const S_META: usize = 5;
const AT_SECTIONS: usize = 64;
const AT_TABLE: usize = AT_SECTIONS + SECTIONS * 16;
const AT_HEADER_CRC: usize = HEADER - 4;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Entry {
    name_off: u64,
    meta_off: u64,
    version: u64,
    since: u64,
    /// `u64::MAX` for none.
    last_position: u64,
    name_len: u32,
    meta_len: u32,
    state: u32,
    zero: u32,
}

/// Where a table sits in the log: the summaries it holds changed in
/// `from..to`, and are as of `to`, when the log held `events` events and
/// the record ending at `to` had the id `last_id` (0 if none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Head {
    pub from: u64,
    pub to: u64,
    pub events: u64,
    pub last_id: u128,
}

pub(crate) fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(DIR)
}

pub(crate) fn path(data_dir: &Path, from: u64, to: u64) -> PathBuf {
    dir(data_dir).join(format!("{from:020}-{to:020}.tbl"))
}

/// The range a table file's name gives, if it is one.
pub(crate) fn parse_name(path: &Path) -> Option<(u64, u64)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".tbl")?;
    let (a, b) = name.split_once('-')?;
    let digits = |s: &str| s.len() == 20 && s.bytes().all(|c| c.is_ascii_digit());
    (digits(a) && digits(b))
        .then(|| Some((a.parse().ok()?, b.parse().ok()?)))
        .flatten()
        .filter(|(a, b)| a <= b)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn state_code(s: StreamState) -> u32 {
    match s {
        StreamState::Live => 0,
        StreamState::Deleted => 1,
        StreamState::Tombstoned => 2,
    }
}

fn metadata_bytes(m: &StreamMetadata) -> Vec<u8> {
    if *m == StreamMetadata::default() {
        Vec::new()
    } else {
        serde_json::to_vec(m).expect("metadata serialises")
    }
}

/// A mapped table file.
pub(crate) struct Table {
    path: PathBuf,
    map: Mmap,
    head: Head,
    count: usize,
    sections: [(u64, u64); SECTIONS],
    fences: Vec<Box<[u8]>>,
    blocks: Blocks,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Table({})", self.path.display())
    }
}

impl Table {
    /// Opens and checks the header, lengths and fences of a table file;
    /// `Err` says why it cannot be used.
    pub(crate) fn open(path: &Path) -> Result<Table, String> {
        let path = path.to_path_buf();
        let Some((from, to)) = parse_name(&path) else {
            return Err("not a table file name".into());
        };
        let map = map_checked(&path, MAGIC)?;
        let h = &map[..HEADER];
        let version = u32_at(h, 8);
        if version != VERSION {
            return Err(format!("format version {version} (this build writes {VERSION})"));
        }
        let head = Head {
            from: u64_at(h, 16),
            to: u64_at(h, 24),
            events: u64_at(h, 32),
            last_id: u128::from_le_bytes(h[48..64].try_into().unwrap()),
        };
        if (head.from, head.to) != (from, to) {
            return Err("its header and its name give different ranges".into());
        }
        let count = u64_at(h, 40) as usize;
        let mut sections = [(0u64, 0u64); SECTIONS];
        for (i, s) in sections.iter_mut().enumerate() {
            *s = (u64_at(h, AT_SECTIONS + i * 16), u64_at(h, AT_SECTIONS + 8 + i * 16));
        }
        let blocks = checked_blocks(
            &map,
            u64_at(h, AT_TABLE) as usize,
            u32_at(h, AT_TABLE + 8),
            &sections,
            |i| i >= S_FENCE_KEYS,
        )?;
        let fences_n = count.div_ceil(FENCE);
        if sections[S_ENTRIES].1 != (count * std::mem::size_of::<Entry>()) as u64
            || sections[S_BLOOM].1 == 0
            || !sections[S_BLOOM].1.is_multiple_of(32)
            || sections[S_FENCE_ENDS].1 != fences_n as u64 * 8
        {
            return Err("a section does not hold what the header counts".into());
        }
        let mut t = Table { path, map, head, count, sections, fences: Vec::new(), blocks };
        let ends = t.slice::<u64>(S_FENCE_ENDS, 0, fences_n).map_err(|d| d.reason)?.to_vec();
        let keys = t
            .slice::<u8>(S_FENCE_KEYS, 0, t.sections[S_FENCE_KEYS].1 as usize)
            .map_err(|d| d.reason)?;
        let mut start = 0usize;
        let mut fences = Vec::with_capacity(fences_n);
        for end in ends {
            let end = end as usize;
            if end < start || end > keys.len() {
                return Err("a fence lies outside its section".into());
            }
            fences.push(keys[start..end].to_vec().into_boxed_slice());
            start = end;
        }
        t.fences = fences;
        Ok(t)
    }

    pub(crate) fn head(&self) -> Head {
        self.head
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn slice<T: Copy>(&self, s: usize, first: usize, count: usize) -> Result<&[T], Damaged> {
        mapped_slice(&self.map, &self.blocks, &self.path, self.sections[s], s, first, count)
    }

    fn entry(&self, i: usize) -> Result<Entry, Damaged> {
        Ok(self.slice::<Entry>(S_ENTRIES, i, 1)?[0])
    }

    fn damaged(&self, why: &str) -> Damaged {
        Damaged {
            file: self.path.clone(),
            offset: self.sections[S_ENTRIES].0,
            reason: why.to_string(),
        }
    }

    /// The name of entry `i`.
    pub(crate) fn name_at(&self, i: usize) -> Result<&str, Damaged> {
        let e = self.entry(i)?;
        let bytes = self.slice::<u8>(S_NAMES, e.name_off as usize, e.name_len as usize)?;
        std::str::from_utf8(bytes).map_err(|_| self.damaged("a stream name is not UTF-8"))
    }

    /// The summary of entry `i`.
    pub(crate) fn entry_at(&self, i: usize) -> Result<StreamEntry, Damaged> {
        let e = self.entry(i)?;
        let state = match e.state {
            0 => StreamState::Live,
            1 => StreamState::Deleted,
            2 => StreamState::Tombstoned,
            _ => return Err(self.damaged("a stream state is not known")),
        };
        let metadata = if e.meta_len == 0 {
            StreamMetadata::default()
        } else {
            let bytes = self.slice::<u8>(S_META, e.meta_off as usize, e.meta_len as usize)?;
            serde_json::from_slice(bytes)
                .map_err(|err| self.damaged(&format!("stream metadata does not parse: {err}")))?
        };
        Ok(StreamEntry {
            version: e.version,
            state,
            metadata,
            since: e.since,
            last_position: Some(e.last_position).filter(|p| *p != u64::MAX),
        })
    }

    /// The index of the first entry whose name is not below `key`.
    pub(crate) fn lower_bound(&self, key: &str) -> Result<usize, Damaged> {
        let k = key.as_bytes();
        let group = self.fences.partition_point(|f| &**f <= k);
        // Entries of fence group `group - 1` are the first that may be >= key.
        let (mut lo, mut hi) = (group.saturating_sub(1) * FENCE, (group * FENCE).min(self.count));
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.name_at(mid)?.as_bytes() < k { lo = mid + 1 } else { hi = mid }
        }
        Ok(lo)
    }

    /// The summary of `name`, if this table holds it.
    pub(crate) fn get(&self, name: &str) -> Result<Option<StreamEntry>, Damaged> {
        let h = name_hash(name.as_bytes());
        let blocks = (self.sections[S_BLOOM].1 / 32) as usize;
        let block = self.slice::<[u32; 8]>(S_BLOOM, bloom_block(h, blocks), 1)?[0];
        if block.iter().zip(bloom_mask(h)).any(|(w, m)| w & m == 0) {
            return Ok(None);
        }
        let i = self.lower_bound(name)?;
        if i < self.count && self.name_at(i)? == name {
            return Ok(Some(self.entry_at(i)?));
        }
        Ok(None)
    }

    /// Checks every block again: what the scrubber and `cairn verify` do.
    pub(crate) fn check_all(&self) -> Result<(), Damaged> {
        self.blocks.check_all(&self.map, &self.path)
    }
}

/// Something a table is written from: calls `f` with every summary, in name
/// order, as often as the writer asks (once per section it writes).
pub(crate) trait Source {
    fn each(
        &self,
        f: &mut dyn FnMut(&str, &StreamEntry) -> Result<(), MergeError>,
    ) -> Result<(), MergeError>;
}

/// Writes the table for `head` from `source` (at most `most` entries, to
/// size the filter), syncs and renames it into place, and opens it.
pub(crate) fn write(
    data_dir: &Path,
    head: Head,
    most: usize,
    source: &dyn Source,
    storage: &dyn Storage,
    stop: &AtomicBool,
) -> Result<Table, StoreError> {
    let dir = dir(data_dir);
    if !dir.is_dir() {
        crate::segment::create_private_dir(&dir)?;
        crate::segment::sync_dir(data_dir, storage)?;
    }
    let path = path(data_dir, head.from, head.to);
    let tmp = path.with_extension("tbl.tmp");
    let failed = |e: MergeError| match e {
        MergeError::Failed(e) => e,
        MergeError::Damaged(d) => crate::index::damaged_error(&d),
        MergeError::Stopped => StoreError::Closed {
            reason: Some("the store closed while a stream table was written".into()),
        },
    };
    let file = storage.create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    let mut out = Out::new(storage, file, tmp.clone(), stop);
    let header = match write_sections(&mut out, head, most, source) {
        Ok(h) => h,
        Err(e) => {
            let _ = storage.remove(&tmp);
            return Err(failed(e));
        }
    };
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| StoreError::io(&p, e)
    };
    storage.write_at(out.file_ref(), &header, 0).map_err(io(&tmp))?;
    storage.sync_all(out.file_ref()).map_err(io(&tmp))?;
    storage.rename(&tmp, &path).map_err(io(&path))?;
    crate::segment::sync_dir(&dir, storage)?;
    Table::open(&path).map_err(|why| StoreError::io(&path, std::io::Error::other(why)))
}

fn out_path(head: Head) -> String {
    format!("{:020}-{:020}.tbl", head.from, head.to)
}

fn write_sections(
    out: &mut Out<'_>,
    head: Head,
    most: usize,
    source: &dyn Source,
) -> Result<Vec<u8>, MergeError> {
    let bug = |why: String| {
        MergeError::Failed(StoreError::Corrupt { file: out_path(head), offset: 0, reason: why })
    };
    let mut sections = [(0u64, 0u64); SECTIONS];
    let blocks = bloom_blocks(most);
    let mut bloom = vec![0u32; blocks * 8];
    let mut fence_keys: Vec<u8> = Vec::new();
    let mut fence_ends: Vec<u64> = Vec::new();
    let (mut count, mut names, mut meta) = (0usize, 0u64, 0u64);
    let mut previous: Option<String> = None;
    let start = out.pos();
    source.each(&mut |name, s| {
        if previous.as_deref().is_some_and(|p| p >= name) {
            return Err(bug(format!("stream table entries out of order at '{name}'")));
        }
        previous = Some(name.to_string());
        let h = name_hash(name.as_bytes());
        let b = bloom_block(h, blocks);
        for (w, m) in bloom[b * 8..b * 8 + 8].iter_mut().zip(bloom_mask(h)) {
            *w |= m;
        }
        if count.is_multiple_of(FENCE) {
            fence_keys.extend_from_slice(name.as_bytes());
            fence_ends.push(fence_keys.len() as u64);
        }
        let meta_len = metadata_bytes(&s.metadata).len() as u64;
        let e = Entry {
            name_off: names,
            meta_off: meta,
            version: s.version,
            since: s.since,
            last_position: s.last_position.unwrap_or(u64::MAX),
            name_len: name.len() as u32,
            meta_len: meta_len as u32,
            state: state_code(s.state),
            zero: 0,
        };
        for v in [e.name_off, e.meta_off, e.version, e.since, e.last_position] {
            out.put(&v.to_le_bytes())?;
        }
        for v in [e.name_len, e.meta_len, e.state, e.zero] {
            out.put(&v.to_le_bytes())?;
        }
        (count, names, meta) = (count + 1, names + name.len() as u64, meta + meta_len);
        Ok(())
    })?;
    sections[S_ENTRIES] = (start, out.pos() - start);
    if count > most {
        return Err(bug(format!(
            "a stream table got {count} entries, more than the {most} it was sized for"
        )));
    }
    let start = out.pos();
    for w in &bloom {
        out.put(&w.to_le_bytes())?;
    }
    sections[S_BLOOM] = (start, out.pos() - start);
    let start = out.pos();
    for e in &fence_ends {
        out.put(&e.to_le_bytes())?;
    }
    sections[S_FENCE_ENDS] = (start, out.pos() - start);
    let start = out.pos();
    out.put(&fence_keys)?;
    sections[S_FENCE_KEYS] = (start, out.pos() - start);
    let start = out.pos();
    source.each(&mut |name, _| out.put(name.as_bytes()))?;
    sections[S_NAMES] = (start, out.pos() - start);
    let start = out.pos();
    source.each(&mut |_, s| {
        let m = metadata_bytes(&s.metadata);
        if m.is_empty() { Ok(()) } else { out.put(&m) }
    })?;
    sections[S_META] = (start, out.pos() - start);
    if sections[S_NAMES].1 != names || sections[S_META].1 != meta {
        return Err(bug("a stream table's source changed while it was written".into()));
    }
    let (table_off, table_crc) = out.finish()?;

    let mut h = Vec::with_capacity(HEADER);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    for v in [head.from, head.to, head.events, count as u64] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&head.last_id.to_le_bytes());
    for (off, len) in sections {
        h.extend_from_slice(&off.to_le_bytes());
        h.extend_from_slice(&len.to_le_bytes());
    }
    debug_assert_eq!(h.len(), AT_TABLE);
    h.extend_from_slice(&(table_off as u64).to_le_bytes());
    h.extend_from_slice(&table_crc.to_le_bytes());
    h.resize(AT_HEADER_CRC, 0);
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    Ok(h)
}

/// The chain of tables in `data_dir` from position 0, each chosen the widest
/// that starts where the previous one ends. `rejected` gets the files that
/// look like tables but cannot be used, with why.
pub(crate) fn find(data_dir: &Path, rejected: &mut Vec<(PathBuf, String)>) -> Vec<Table> {
    let Ok(entries) = std::fs::read_dir(dir(data_dir)) else { return Vec::new() };
    let mut ranges: Vec<(u64, u64, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter_map(|p| parse_name(&p).map(|(a, b)| (a, b, p)))
        .collect();
    // By start, widest first.
    ranges.sort_by_key(|r| (r.0, std::cmp::Reverse(r.1)));
    let mut chain: Vec<Table> = Vec::new();
    let mut at = 0u64;
    loop {
        let mut next = None;
        for (_, _, path) in ranges.iter().filter(|r| r.0 == at) {
            match Table::open(path) {
                Ok(t) => {
                    next = Some(t);
                    break;
                }
                Err(why) => rejected.push((path.clone(), why)),
            }
        }
        let Some(t) = next else { break };
        let end = t.head.to;
        chain.push(t);
        // A table of nothing (from == to) cannot move the chain on.
        if end == at {
            break;
        }
        at = end;
    }
    chain
}

/// Removes every file in the tables' directory that `keep` does not name.
pub(crate) fn remove_strays(
    data_dir: &Path,
    keep: &[PathBuf],
    storage: &dyn Storage,
) -> Result<(), StoreError> {
    let dir = dir(data_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(()) };
    let mut removed = false;
    for entry in entries.flatten() {
        let p = entry.path();
        if !keep.contains(&p) {
            storage.remove(&p).map_err(|e| StoreError::io(&p, e))?;
            removed = true;
        }
    }
    if removed {
        crate::segment::sync_dir(&dir, storage)?;
    }
    Ok(())
}
