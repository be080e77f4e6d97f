//! Merging index files. Each sealed segment gets its own index file, so a
//! lookup in a long history (a tag's events, an id that is not a fresh
//! UUIDv7) would touch one file per segment. In the background, runs of
//! `fanout` neighbouring files that cover the same number of segments are
//! merged into one (tiered: 8 singles into one of 8, 8 of those into one of
//! 64), up to `max_segments` segments per file, so the number of files a
//! lookup touches grows with the logarithm of the log, not with its length.
//!
//! A merge streams: every section of the new file is a k-way merge of the
//! same sorted section of its sources (directories by hash and name, ids by
//! id), written block by block with its checksums, so it holds a few
//! entries per source and the Bloom filter in memory, never a memtable.
//! The file is written to a temporary name, synced and renamed; only then
//! does it take its sources' place in the index and the sources are removed.
//! A crash in between leaves both; the next open prefers the merged file and
//! removes what it covers.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use cairn_core::StoreError;

use crate::idx::{self, BLOCK, Damaged, Entry, FENCE, HEADER, Header, IdxFile, SECTIONS};
use crate::index::Part;
use crate::segment::{self, Segment};
use crate::storage::Storage;

/// When to merge: `fanout` neighbouring files of one size (0: never), into files of at most `max_segments`.
#[derive(Debug, Clone, Copy)]
pub struct MergeOptions {
    pub fanout: usize,
    pub max_segments: usize,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { fanout: 8, max_segments: 64 }
    }
}

/// Directory entries and positions are 32-bit offsets: a merged file holds fewer than this.
const MAX_EVENTS: u64 = u32::MAX as u64 / 2;

/// The parts to merge next: `fanout` neighbouring index files that cover the
/// same number of segments, the smallest such first (oldest among equals).
pub(crate) fn plan(parts: &[Part], options: MergeOptions) -> Option<Range<usize>> {
    let n = options.fanout;
    if n < 2 {
        return None;
    }
    let size = |p: &Part| match p {
        Part::Disk(f) => Some((f.covers().len(), f.events())),
        Part::Mem(_) => None,
    };
    let mut best: Option<(usize, Range<usize>)> = None;
    for start in 0..parts.len().saturating_sub(n - 1) {
        let Some((covers, _)) = size(&parts[start]) else { continue };
        if covers * n > options.max_segments || best.as_ref().is_some_and(|(c, _)| *c <= covers) {
            continue;
        }
        let window: Option<Vec<(usize, u64)>> = parts[start..start + n].iter().map(size).collect();
        let Some(window) = window else { continue };
        if window.iter().all(|(c, _)| *c == covers)
            && window.iter().map(|(_, e)| e).sum::<u64>() <= MAX_EVENTS
        {
            best = Some((covers, start..start + n));
        }
    }
    best.map(|(_, r)| r)
}

/// Why a merge did not happen.
#[derive(Debug)]
pub(crate) enum MergeError {
    /// A source file is damaged: it must be rebuilt first.
    Damaged(Damaged),
    Failed(StoreError),
    Stopped,
}

impl From<Damaged> for MergeError {
    fn from(d: Damaged) -> Self {
        MergeError::Damaged(d)
    }
}

/// The file being written: a buffer flushed in whole blocks, each block's
/// checksum taken on the way.
pub(crate) struct Out<'a> {
    storage: &'a dyn Storage,
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    /// File offset of `buf[0]`: always the start of a block until the end.
    at: u64,
    crcs: Vec<u32>,
    stop: &'a AtomicBool,
}

impl<'a> Out<'a> {
    /// Starts writing `file` (at `path`) after its header.
    pub(crate) fn new(
        storage: &'a dyn Storage,
        file: File,
        path: PathBuf,
        stop: &'a AtomicBool,
    ) -> Self {
        Out {
            storage,
            file,
            path,
            buf: Vec::with_capacity(2 << 20),
            at: HEADER as u64,
            crcs: Vec::new(),
            stop,
        }
    }

    pub(crate) fn file_ref(&self) -> &File {
        &self.file
    }

    pub(crate) fn pos(&self) -> u64 {
        self.at + self.buf.len() as u64
    }

    pub(crate) fn put(&mut self, bytes: &[u8]) -> Result<(), MergeError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= 1 << 20 {
            self.flush(false)?;
        }
        Ok(())
    }

    pub(crate) fn pad8(&mut self) -> Result<(), MergeError> {
        while !self.pos().is_multiple_of(8) {
            self.put(&[0])?;
        }
        Ok(())
    }

    /// Writes what is left and the block checksum table after it; returns
    /// the table's offset and CRC, for the header.
    pub(crate) fn finish(&mut self) -> Result<(usize, u32), MergeError> {
        self.pad8()?;
        self.flush(true)?;
        let table_off = self.pos() as usize;
        let table: Vec<u8> = self.crcs.iter().flat_map(|c| c.to_le_bytes()).collect();
        self.storage
            .write_at(&self.file, &table, table_off as u64)
            .map_err(|e| MergeError::Failed(StoreError::io(&self.path, e)))?;
        Ok((table_off, crc32c::crc32c(&table)))
    }

    fn flush(&mut self, all: bool) -> Result<(), MergeError> {
        if self.stop.load(Ordering::Relaxed) {
            return Err(MergeError::Stopped);
        }
        let n = if all { self.buf.len() } else { self.buf.len() / BLOCK * BLOCK };
        self.crcs.extend(self.buf[..n].chunks(BLOCK).map(crc32c::crc32c));
        self.storage
            .write_at(&self.file, &self.buf[..n], self.at)
            .map_err(|e| MergeError::Failed(StoreError::io(&self.path, e)))?;
        self.at += n as u64;
        self.buf.drain(..n);
        Ok(())
    }
}

/// Walks the directories (section `s`) of all sources at once in (hash,
/// name) order, calling `f` once per name with the entries of the sources
/// that have it, oldest source first.
fn groups<'a>(
    sources: &[&'a IdxFile],
    s: usize,
    mut f: impl FnMut(u64, &'a [u8], &[(usize, Entry)]) -> Result<(), MergeError>,
) -> Result<(), MergeError> {
    let dirs: Vec<&'a [Entry]> = sources
        .iter()
        .map(|src| src.slice::<Entry>(s, 0, src.count::<Entry>(s)))
        .collect::<Result<_, _>>()?;
    let mut heap = BinaryHeap::with_capacity(sources.len());
    for (i, dir) in dirs.iter().enumerate() {
        if let Some(e) = dir.first() {
            heap.push(Reverse((e.hash, sources[i].name(e)?, i, 0usize)));
        }
    }
    let mut group: Vec<(usize, Entry)> = Vec::with_capacity(sources.len());
    while let Some(Reverse((hash, name, i, k))) = heap.pop() {
        group.clear();
        let mut next = Some((i, k));
        while let Some((i, k)) = next {
            group.push((i, dirs[i][k]));
            if let Some(e) = dirs[i].get(k + 1) {
                heap.push(Reverse((e.hash, sources[i].name(e)?, i, k + 1)));
            }
            next = match heap.peek() {
                Some(Reverse((h, n, j, l))) if *h == hash && *n == name => Some((*j, *l)),
                _ => None,
            };
            if next.is_some() {
                heap.pop();
            }
        }
        f(hash, name, &group)?;
    }
    Ok(())
}

/// Writes the merged index file of `sources` (neighbouring files, in log
/// order) covering `segs`, the segments they cover, and opens it.
pub(crate) fn merge(
    sources: &[&IdxFile],
    segs: &[&Segment],
    log_dir: &Path,
    storage: &dyn Storage,
    stop: &AtomicBool,
) -> Result<IdxFile, MergeError> {
    let (first, last) =
        (segs.first().expect("a merge has segments"), segs.last().expect("a merge has segments"));
    let path = idx::merged_path(log_dir, first.base, last.base + last.capacity());
    let tmp = path.with_extension("idx.tmp");
    let failed = |p: &Path| {
        let p = p.to_path_buf();
        move |e| MergeError::Failed(StoreError::io(&p, e))
    };
    let file = storage.create(&tmp).map_err(failed(&tmp))?;
    let mut out = Out::new(storage, file, tmp.clone(), stop);
    let written = write_sections(&mut out, sources, segs);
    let header = match written {
        Ok(h) => h,
        Err(e) => {
            let _ = storage.remove(&tmp);
            return Err(e);
        }
    };
    out.storage.write_at(&out.file, &header.encode(), 0).map_err(failed(&tmp))?;
    storage.sync_all(&out.file).map_err(failed(&tmp))?;
    storage.rename(&tmp, &path).map_err(failed(&path))?;
    segment::sync_dir(log_dir, storage).map_err(MergeError::Failed)?;
    IdxFile::open_covering(&path, segs)
        .map_err(|why| MergeError::Failed(StoreError::io(&path, std::io::Error::other(why))))
}

fn write_sections(
    out: &mut Out<'_>,
    sources: &[&IdxFile],
    segs: &[&Segment],
) -> Result<Header, MergeError> {
    let mut sections = [(0u64, 0u64); SECTIONS];
    let events: u64 = sources.iter().map(|s| s.events()).sum();
    let mut names_len = 0u64;

    // Streams: directory, then positions and timestamps in directory order.
    let start = out.pos();
    let (first, stream_fences) = write_directory(out, sources, idx::S_STREAMS, &mut names_len)?;
    sections[idx::S_STREAMS] = (start, out.pos() - start);
    if first != events {
        return Err(MergeError::Failed(StoreError::Corrupt {
            file: sources[0].path().display().to_string(),
            offset: 0,
            reason: format!("the files to merge list {first} stream event(s) but count {events}"),
        }));
    }
    for s in [idx::S_POSITIONS, idx::S_TIMESTAMPS] {
        let start = out.pos();
        groups(sources, idx::S_STREAMS, |_, _, group| {
            for (i, e) in group {
                let values = sources[*i].slice::<u64>(s, e.first as usize, e.count as usize)?;
                put_u64s(out, values)?;
            }
            Ok(())
        })?;
        sections[s] = (start, out.pos() - start);
    }

    // Ids, merged in order, with their filter and fences.
    let ids_n: usize = sources.iter().map(|s| s.count::<[u64; 3]>(idx::S_IDS)).sum();
    let blocks = idx::bloom_blocks(ids_n);
    let mut bloom = vec![0u32; blocks * 8];
    let mut id_fences = Vec::new();
    let start = out.pos();
    let mut iters = Vec::with_capacity(sources.len());
    for s in sources {
        iters.push(s.ids()?);
    }
    let mut heap = BinaryHeap::with_capacity(sources.len());
    for (i, it) in iters.iter_mut().enumerate() {
        if let Some((id, p)) = it.next() {
            heap.push(Reverse((id, p, i)));
        }
    }
    let (mut k, mut previous) = (0usize, None);
    while let Some(Reverse((id, p, i))) = heap.pop() {
        if previous == Some(id) {
            return Err(MergeError::Failed(StoreError::Corrupt {
                file: sources[i].path().display().to_string(),
                offset: 0,
                reason: format!(
                    "event id {} at position {p} is in two index files",
                    uuid::Uuid::from_u128(id)
                ),
            }));
        }
        previous = Some(id);
        out.put(&(id as u64).to_le_bytes())?;
        out.put(&((id >> 64) as u64).to_le_bytes())?;
        out.put(&p.to_le_bytes())?;
        let h = idx::id_hash(id);
        let b = idx::bloom_block(h, blocks);
        for (w, m) in bloom[b * 8..b * 8 + 8].iter_mut().zip(idx::bloom_mask(h)) {
            *w |= m;
        }
        if k.is_multiple_of(FENCE) {
            id_fences.push(id);
        }
        k += 1;
        if let Some((id, p)) = iters[i].next() {
            heap.push(Reverse((id, p, i)));
        }
    }
    drop(iters);
    sections[idx::S_IDS] = (start, out.pos() - start);
    let start = out.pos();
    for w in &bloom {
        out.put(&w.to_le_bytes())?;
    }
    sections[idx::S_BLOOM] = (start, out.pos() - start);
    drop(bloom);

    // Terms: directory, then postings.
    let start = out.pos();
    let (postings, term_fences) = write_directory(out, sources, idx::S_TERMS, &mut names_len)?;
    sections[idx::S_TERMS] = (start, out.pos() - start);
    if postings > u32::MAX as u64 || names_len > u32::MAX as u64 {
        return Err(MergeError::Failed(StoreError::io(
            &out.path,
            std::io::Error::other("too much to merge into one index file"),
        )));
    }
    let start = out.pos();
    groups(sources, idx::S_TERMS, |_, _, group| {
        for (i, e) in group {
            put_u64s(
                out,
                sources[*i].slice::<u64>(idx::S_POSTINGS, e.first as usize, e.count as usize)?,
            )?;
        }
        Ok(())
    })?;
    sections[idx::S_POSTINGS] = (start, out.pos() - start);

    for (s, fences) in [(idx::S_STREAM_FENCES, &stream_fences), (idx::S_TERM_FENCES, &term_fences)]
    {
        let start = out.pos();
        put_u64s(out, fences)?;
        sections[s] = (start, out.pos() - start);
    }
    let start = out.pos();
    for id in &id_fences {
        out.put(&(*id as u64).to_le_bytes())?;
        out.put(&((*id >> 64) as u64).to_le_bytes())?;
    }
    sections[idx::S_ID_FENCES] = (start, out.pos() - start);
    let start = out.pos();
    let mut covers = Vec::with_capacity(segs.len() * 24);
    for seg in segs {
        idx::put_cover(&mut covers, seg);
    }
    out.put(&covers)?;
    sections[idx::S_COVERS] = (start, out.pos() - start);

    // Names: the streams', then the terms', in directory order.
    let start = out.pos();
    for s in [idx::S_STREAMS, idx::S_TERMS] {
        groups(sources, s, |_, name, _| out.put(name))?;
    }
    sections[idx::S_NAMES] = (start, out.pos() - start);
    let (table_off, table_crc) = out.finish()?;
    let v7 =
        sources.iter().fold((u128::MAX, 0u128), |(lo, hi), s| (lo.min(s.v7().0), hi.max(s.v7().1)));
    let last_position =
        sources.iter().filter_map(|s| s.last_position()).max().unwrap_or(segs[0].base);
    Ok(Header {
        base: segs[0].base,
        span: segs.iter().map(|s| s.capacity()).sum(),
        events,
        last_position,
        v7,
        sections,
        table_off,
        table_crc,
    })
}

/// Writes the merged directory of section `s` (streams or terms), its names
/// counted on from `names_len`; returns the entries' total count (positions
/// or postings) and the fences.
fn write_directory(
    out: &mut Out<'_>,
    sources: &[&IdxFile],
    s: usize,
    names_len: &mut u64,
) -> Result<(u64, Vec<u64>), MergeError> {
    let (mut fences, mut n, mut first) = (Vec::new(), 0usize, 0u64);
    groups(sources, s, |hash, name, group| {
        let count: u64 = group.iter().map(|(_, e)| e.count as u64).sum();
        put_entry(out, hash, *names_len, name.len(), first, count)?;
        if n.is_multiple_of(FENCE) {
            fences.push(hash);
        }
        (n, first, *names_len) = (n + 1, first + count, *names_len + name.len() as u64);
        Ok(())
    })?;
    Ok((first, fences))
}

fn put_entry(
    out: &mut Out<'_>,
    hash: u64,
    name_off: u64,
    name_len: usize,
    first: u64,
    count: u64,
) -> Result<(), MergeError> {
    let e = Entry {
        hash,
        name_off: name_off as u32,
        name_len: name_len as u32,
        first: first as u32,
        count: count as u32,
    };
    out.put(&e.hash.to_le_bytes())?;
    out.put(&e.name_off.to_le_bytes())?;
    out.put(&e.name_len.to_le_bytes())?;
    out.put(&e.first.to_le_bytes())?;
    out.put(&e.count.to_le_bytes())
}

fn put_u64s<T: Copy + Into<u64>>(out: &mut Out<'_>, values: &[T]) -> Result<(), MergeError> {
    for v in values {
        out.put(&(*v).into().to_le_bytes())?;
    }
    Ok(())
}

/// The merged files in `log_dir` that fit `sealed` (the sealed segments, in
/// order), chosen widest first and never two over one segment: each with the
/// range of segments it covers. `rejected` gets those that name segments
/// of this log but cannot be used, with why.
pub(crate) fn find(
    log_dir: &Path,
    sealed: &[&Segment],
    rejected: &mut Vec<(PathBuf, String)>,
) -> Vec<(Arc<IdxFile>, Range<usize>)> {
    let Ok(entries) = std::fs::read_dir(log_dir) else { return Vec::new() };
    let mut candidates: Vec<(PathBuf, Range<usize>)> = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some((start, end)) = idx::parse_merged(&path) else { continue };
        let a = sealed.iter().position(|s| s.base == start);
        let b = sealed.iter().position(|s| s.base + s.capacity() == end);
        match (a, b) {
            (Some(a), Some(b)) if a <= b => candidates.push((path, a..b + 1)),
            // A stray (its segments are gone or not sealed): removed at open.
            _ => {}
        }
    }
    candidates.sort_by_key(|(_, r)| (Reverse(r.len()), r.start));
    let mut chosen: Vec<(Arc<IdxFile>, Range<usize>)> = Vec::new();
    for (path, range) in candidates {
        if chosen.iter().any(|(_, r)| r.start < range.end && range.start < r.end) {
            continue;
        }
        match IdxFile::open_covering(&path, &sealed[range.clone()]) {
            Ok(file) => chosen.push((Arc::new(file), range)),
            Err(why) => rejected.push((path, why)),
        }
    }
    chosen.sort_by_key(|(_, r)| r.start);
    chosen
}

/// Starts the merger thread; it ends once `stop` is set (and it is unparked).
pub(crate) fn spawn(
    shared: Arc<crate::shared::Shared>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    if shared.options.merge.fanout < 2 {
        return Ok(None);
    }
    std::thread::Builder::new()
        .name("cairn-merger".into())
        .spawn(move || run(&shared, &stop))
        .map(Some)
}

/// How long the merger sleeps when nothing is due, and after a failure.
const IDLE: std::time::Duration = std::time::Duration::from_secs(1);
const AFTER_FAILURE: std::time::Duration = std::time::Duration::from_secs(30);

fn run(shared: &crate::shared::Shared, stop: &AtomicBool) {
    crate::indexer::background_priority();
    while !stop.load(Ordering::Acquire) {
        let wait = match merge_once(shared, stop) {
            Ok(true) => continue,
            Ok(false) => IDLE,
            Err(MergeError::Stopped) => return,
            Err(MergeError::Damaged(d)) => match crate::indexer::rebuild_file(shared, &d.file) {
                Ok(_) => continue,
                Err(e) => {
                    eprintln!(
                        "cairn: could not rebuild the damaged index file {}: {e}",
                        d.file.display()
                    );
                    AFTER_FAILURE
                }
            },
            Err(MergeError::Failed(e)) => {
                shared.stats.index_failures.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "cairn: could not merge index files ({e}); tried again in {} s",
                    AFTER_FAILURE.as_secs()
                );
                AFTER_FAILURE
            }
        };
        std::thread::park_timeout(wait);
    }
}

/// Does the next merge that is due; false if none is.
pub(crate) fn merge_once(
    shared: &crate::shared::Shared,
    stop: &AtomicBool,
) -> Result<bool, MergeError> {
    let sources: Vec<Arc<IdxFile>> = {
        let index = shared.index.read().unwrap();
        let Some(range) = plan(&index.parts, shared.options.merge) else { return Ok(false) };
        index.parts[range]
            .iter()
            .filter_map(|p| match p {
                Part::Disk(f) => Some(f.clone()),
                Part::Mem(_) => None,
            })
            .collect()
    };
    let segs: Vec<Arc<Segment>> = sources
        .iter()
        .flat_map(|f| f.covers())
        .filter_map(|(base, _)| shared.segment_for(*base).filter(|s| s.base == *base))
        .collect();
    if segs.len() != sources.iter().map(|f| f.covers().len()).sum::<usize>() {
        return Ok(false);
    }
    let storage = &*shared.options.storage;
    let refs: Vec<&IdxFile> = sources.iter().map(|f| &**f).collect();
    let merged = merge(
        &refs,
        &segs.iter().map(|s| &**s).collect::<Vec<_>>(),
        &shared.log_dir,
        storage,
        stop,
    )?;
    let path = merged.path().to_path_buf();
    let installed = {
        let mut index = shared.index.write().unwrap();
        // The sources may have been rebuilt meanwhile: then this merge is stale.
        let at = index.position_of(&sources[0]);
        let same = at.is_some_and(|at| sources.iter().enumerate().all(|(k, f)| matches!(index.parts.get(at + k), Some(Part::Disk(g)) if Arc::ptr_eq(f, g))));
        if let (true, Some(at)) = (same, at) {
            index.replace_parts(at..at + sources.len(), vec![Part::Disk(Arc::new(merged))]);
        }
        same
    };
    if !installed {
        let _ = storage.remove(&path);
        return Ok(true);
    }
    // Readers that still map a source keep it until they let go.
    for f in &sources {
        let _ = storage.remove(f.path());
    }
    let _ = segment::sync_dir(&shared.log_dir, storage);
    shared.stats.index_merges.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}
