//! Index files: one per sealed segment (`<segment>.idx` beside it), written
//! once from the segment's memtable, never changed, mapped for reading; and
//! merged files (`<first base>-<end>.idx`, [`crate::merge`]) that cover a
//! run of consecutive segments with the same layout, so that a lookup in old
//! history touches one file instead of one per segment. They are a cache of
//! the log: a missing, foreign or damaged one is rebuilt from its segments,
//! and deleting them all changes nothing but speed.
//!
//! Layout (little-endian; docs/design.md has the table):
//! - a 512-byte header: magic, version, the first segment it covers, counts,
//!   the sections' offsets and lengths, and the block checksum table's place
//!   and CRC;
//! - the segments it covers: base, length and a CRC of the last 4 KiB of
//!   each, so a file from another log or an older copy of a segment does not
//!   fit (version 1 files, one segment each, kept these in the header);
//! - stream directory: `(hash, name offset, name length, first, count)`
//!   sorted by hash then name, pointing into the position and timestamp
//!   arrays (one entry per event, in log order within a stream);
//! - event ids: `(id, position)` sorted by id, plus a split-block Bloom
//!   filter (10 bits per id) so that a new id costs no search;
//! - terms (tags, event types, categories of user events): a directory like
//!   the streams', pointing into an array of positions;
//! - fences: the first key of every 128 directory entries and ids, read
//!   into memory at open, so that a lookup touches one group of entries;
//! - one CRC32C per 4 KiB block of everything after the header.
//!
//! Blocks are checked the first time a lookup touches them, so opening costs
//! one header read per file, and nothing damaged is ever used.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cairn_core::StoreError;
use memmap2::Mmap;

use crate::index::MemIndex;
use crate::segment::{self, Segment};
use crate::storage::Storage;

#[cfg(not(target_endian = "little"))]
compile_error!("index files are mapped as little-endian arrays");

const MAGIC: &[u8; 8] = b"CAIRNSIX";
pub(crate) const VERSION: u32 = 2;
pub(crate) const HEADER: usize = 512;
pub(crate) const BLOCK: usize = 4096;
const TAIL: u64 = 4096;
pub(crate) const SECTIONS: usize = 12;
/// Sections of a version 1 file (no list of covered segments).
const SECTIONS_V1: usize = 11;
/// Where the header keeps the section table, the block table's place and CRC, and its own CRC.
const AT_SECTIONS: usize = 96;
const fn at_table(sections: usize) -> usize {
    AT_SECTIONS + sections * 16
}
const AT_HEADER_CRC: usize = HEADER - 4;
/// Directory and id entries per fence: the first key of every group of this
/// many is kept in memory, so a lookup reads one group, not log2(n) pages.
pub(crate) const FENCE: usize = 128;
pub(crate) const S_STREAMS: usize = 0;
pub(crate) const S_POSITIONS: usize = 1;
pub(crate) const S_TIMESTAMPS: usize = 2;
pub(crate) const S_NAMES: usize = 3;
pub(crate) const S_IDS: usize = 4;
pub(crate) const S_BLOOM: usize = 5;
pub(crate) const S_TERMS: usize = 6;
pub(crate) const S_POSTINGS: usize = 7;
pub(crate) const S_STREAM_FENCES: usize = 8;
pub(crate) const S_TERM_FENCES: usize = 9;
pub(crate) const S_ID_FENCES: usize = 10;
/// (base, length, tail CRC, 0) of each segment the file covers.
pub(crate) const S_COVERS: usize = 11;

/// What a term is: the first byte of its key in the term directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tag = 1,
    Type = 2,
    Category = 3,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub hash: u64,
    pub name_off: u32,
    pub name_len: u32,
    pub first: u32,
    pub count: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct IdEntry {
    lo: u64,
    hi: u64,
    position: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Cover {
    base: u64,
    length: u64,
    tail_crc: u32,
    zero: u32,
}

/// An index file block whose checksum does not match.
#[derive(Debug, Clone)]
pub(crate) struct Damaged {
    pub file: PathBuf,
    pub offset: u64,
    pub reason: String,
}

pub(crate) fn path_for(seg: &Segment) -> PathBuf {
    let mut name = seg.path.file_name().expect("segments have names").to_os_string();
    name.push(".idx");
    seg.path.with_file_name(name)
}

/// The merged file covering the segments from position `start` to `end`.
pub(crate) fn merged_path(log_dir: &Path, start: u64, end: u64) -> PathBuf {
    log_dir.join(format!("{start:020}-{end:020}.idx"))
}

/// The range a merged file's name gives, if it is one.
pub(crate) fn parse_merged(path: &Path) -> Option<(u64, u64)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".idx")?;
    let (a, b) = name.split_once('-')?;
    let digits = |s: &str| s.len() == 20 && s.bytes().all(|c| c.is_ascii_digit());
    (digits(a) && digits(b))
        .then(|| Some((a.parse().ok()?, b.parse().ok()?)))
        .flatten()
        .filter(|(a, b)| a < b)
}

pub(crate) fn name_hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(key)
}

pub(crate) fn id_hash(id: u128) -> u64 {
    xxhash_rust::xxh3::xxh3_64(&id.to_le_bytes())
}

fn term_key(kind: Kind, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 1);
    key.push(kind as u8);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Whether `id` is a UUIDv7, whose leading bits are its time: fresh ids are
/// then above every id of an old segment, and the range check skips it.
pub(crate) fn is_v7(id: u128) -> bool {
    (id >> 76) & 0xf == 7
}

pub(crate) fn tail_crc(seg: &Segment) -> u32 {
    let len = seg.capacity();
    crc32c::crc32c(seg.bytes(len - len.min(TAIL), len))
}

// The split-block Bloom filter of Parquet: each id sets one bit in each of
// the eight 32-bit words of one 32-byte block.
const SALT: [u32; 8] = [
    0x47b6137b, 0x44974d91, 0x8824ad5b, 0xa2b7289d, 0x705495c7, 0x2df1424b, 0x9efc4947, 0x5c6bfb31,
];

pub(crate) fn bloom_blocks(ids: usize) -> usize {
    (ids * 10).div_ceil(256).max(1)
}

pub(crate) fn bloom_block(hash: u64, blocks: usize) -> usize {
    (((hash >> 32) * blocks as u64) >> 32) as usize
}

pub(crate) fn bloom_mask(hash: u64) -> [u32; 8] {
    let key = hash as u32;
    SALT.map(|s| 1u32 << (key.wrapping_mul(s) >> 27))
}

/// Writes the index file of the sealed segment `seg` from its memtable `mem`.
pub(crate) fn write(
    seg: &Segment,
    mem: &MemIndex,
    storage: &dyn Storage,
) -> Result<PathBuf, StoreError> {
    let path = path_for(seg);
    let tmp = path.with_extension("idx.tmp");
    let bytes = encode(seg, mem);
    let io = |e| StoreError::io(&tmp, e);
    let file = storage.create(&tmp).map_err(io)?;
    for (i, chunk) in bytes.chunks(1 << 20).enumerate() {
        storage.write_at(&file, chunk, (i << 20) as u64).map_err(io)?;
    }
    storage.sync_all(&file).map_err(io)?;
    storage.rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
    segment::sync_dir(path.parent().expect("in the log directory"), storage)?;
    Ok(path)
}

fn pad8(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(8) {
        buf.push(0);
    }
}

fn put_entry(buf: &mut Vec<u8>, e: Entry) {
    buf.extend_from_slice(&e.hash.to_le_bytes());
    buf.extend_from_slice(&e.name_off.to_le_bytes());
    buf.extend_from_slice(&e.name_len.to_le_bytes());
    buf.extend_from_slice(&e.first.to_le_bytes());
    buf.extend_from_slice(&e.count.to_le_bytes());
}

/// The file's bytes. Sorting is by (hash, key), so a lookup compares names
/// only on a hash match and colliding names stay apart.
fn encode(seg: &Segment, mem: &MemIndex) -> Vec<u8> {
    // Room for the whole file at once: growing a buffer of tens of MB by
    // doubling copies it and touches fresh pages each time.
    let postings: usize = [&mem.tags, &mem.types, &mem.categories]
        .iter()
        .flat_map(|m| m.values())
        .map(Vec::len)
        .sum();
    let terms_n = mem.tags.len() + mem.types.len() + mem.categories.len();
    let names_n: usize = mem.streams.keys().map(String::len).sum::<usize>()
        + [&mem.tags, &mem.types, &mem.categories]
            .iter()
            .flat_map(|m| m.keys())
            .map(|k| k.len() + 1)
            .sum::<usize>();
    let body = 40 * (mem.streams.len() + terms_n)
        + 16 * mem.events as usize
        + 24 * mem.ids.len()
        + bloom_blocks(mem.ids.len()) * 32
        + 24
        + 8 * postings
        + 16 * (mem.streams.len() + terms_n + mem.ids.len()).div_ceil(FENCE)
        + 48
        + names_n
        + 8;
    let mut buf = Vec::with_capacity(HEADER + body + body.div_ceil(BLOCK) * 4 + 64);
    buf.resize(HEADER, 0);
    let mut sections = [(0u64, 0u64); SECTIONS];
    let mut names: Vec<u8> = Vec::new();
    let mut mark = |buf: &mut Vec<u8>, s: usize, start: usize| {
        sections[s] = (start as u64, (buf.len() - start) as u64)
    };

    // Streams.
    let mut streams: Vec<(u64, &str)> =
        mem.streams.keys().map(|n| (name_hash(n.as_bytes()), n.as_str())).collect();
    streams.sort_unstable();
    let runs: Vec<&crate::index::Run> =
        streams.iter().map(|(_, name)| &mem.streams[*name]).collect();
    let start = buf.len();
    let mut first = 0u32;
    for ((hash, name), run) in streams.iter().zip(&runs) {
        put_entry(
            &mut buf,
            Entry {
                hash: *hash,
                name_off: names.len() as u32,
                name_len: name.len() as u32,
                first,
                count: run.positions.len() as u32,
            },
        );
        names.extend_from_slice(name.as_bytes());
        first += run.positions.len() as u32;
    }
    mark(&mut buf, S_STREAMS, start);
    let start = buf.len();
    runs.iter().flat_map(|r| &r.positions).for_each(|p| buf.extend_from_slice(&p.to_le_bytes()));
    mark(&mut buf, S_POSITIONS, start);
    let start = buf.len();
    runs.iter().flat_map(|r| &r.timestamps).for_each(|t| buf.extend_from_slice(&t.to_le_bytes()));
    mark(&mut buf, S_TIMESTAMPS, start);

    // Ids and their filter.
    let ids = mem.ids.sorted();
    let ids: &[(u128, u64)] = &ids;
    let start = buf.len();
    for (id, p) in ids {
        buf.extend_from_slice(&(*id as u64).to_le_bytes());
        buf.extend_from_slice(&((*id >> 64) as u64).to_le_bytes());
        buf.extend_from_slice(&p.to_le_bytes());
    }
    mark(&mut buf, S_IDS, start);
    let blocks = bloom_blocks(ids.len());
    let mut bloom = vec![0u32; blocks * 8];
    for (id, _) in ids {
        let h = id_hash(*id);
        let b = bloom_block(h, blocks);
        for (w, m) in bloom[b * 8..b * 8 + 8].iter_mut().zip(bloom_mask(h)) {
            *w |= m;
        }
    }
    let start = buf.len();
    bloom.iter().for_each(|w| buf.extend_from_slice(&w.to_le_bytes()));
    mark(&mut buf, S_BLOOM, start);
    let v7_min = ids.iter().map(|(id, _)| *id).find(|id| is_v7(*id)).unwrap_or(u128::MAX);
    let v7_max = ids.iter().rev().map(|(id, _)| *id).find(|id| is_v7(*id)).unwrap_or(0);

    // Terms.
    let mut terms: Vec<(u64, Vec<u8>, &Vec<u64>)> = Vec::new();
    for (kind, map) in
        [(Kind::Tag, &mem.tags), (Kind::Type, &mem.types), (Kind::Category, &mem.categories)]
    {
        for (name, list) in map {
            let key = term_key(kind, name);
            terms.push((name_hash(&key), key, list));
        }
    }
    terms.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let start = buf.len();
    let mut postings = 0u32;
    for (hash, key, list) in &terms {
        put_entry(
            &mut buf,
            Entry {
                hash: *hash,
                name_off: names.len() as u32,
                name_len: key.len() as u32,
                first: postings,
                count: list.len() as u32,
            },
        );
        names.extend_from_slice(key);
        postings += list.len() as u32;
    }
    mark(&mut buf, S_TERMS, start);
    let start = buf.len();
    for (_, _, list) in &terms {
        list.iter().for_each(|p| buf.extend_from_slice(&p.to_le_bytes()));
    }
    mark(&mut buf, S_POSTINGS, start);
    let start = buf.len();
    for (hash, _) in streams.iter().step_by(FENCE) {
        buf.extend_from_slice(&hash.to_le_bytes());
    }
    mark(&mut buf, S_STREAM_FENCES, start);
    let start = buf.len();
    for (hash, _, _) in terms.iter().step_by(FENCE) {
        buf.extend_from_slice(&hash.to_le_bytes());
    }
    mark(&mut buf, S_TERM_FENCES, start);
    let start = buf.len();
    for (id, _) in ids.iter().step_by(FENCE) {
        buf.extend_from_slice(&(*id as u64).to_le_bytes());
        buf.extend_from_slice(&((*id >> 64) as u64).to_le_bytes());
    }
    mark(&mut buf, S_ID_FENCES, start);
    let start = buf.len();
    put_cover(&mut buf, seg);
    mark(&mut buf, S_COVERS, start);
    let start = buf.len();
    buf.extend_from_slice(&names);
    mark(&mut buf, S_NAMES, start);
    pad8(&mut buf);

    // Block checksums, then the header.
    let table_off = buf.len();
    let crcs: Vec<u8> =
        buf[HEADER..].chunks(BLOCK).flat_map(|b| crc32c::crc32c(b).to_le_bytes()).collect();
    buf.extend_from_slice(&crcs);
    let h = Header {
        base: seg.base,
        span: seg.capacity(),
        events: mem.events,
        last_position: mem.last_position.unwrap_or(seg.base),
        v7: (v7_min, v7_max),
        sections,
        table_off,
        table_crc: crc32c::crc32c(&crcs),
    };
    buf[..HEADER].copy_from_slice(&h.encode());
    buf
}

pub(crate) fn put_cover(buf: &mut Vec<u8>, seg: &Segment) {
    buf.extend_from_slice(&seg.base.to_le_bytes());
    buf.extend_from_slice(&seg.capacity().to_le_bytes());
    buf.extend_from_slice(&tail_crc(seg).to_le_bytes());
    buf.extend_from_slice(&0u32.to_le_bytes());
}

/// What the 512-byte header says.
pub(crate) struct Header {
    /// The first covered segment's base, and the length of all covered.
    pub base: u64,
    pub span: u64,
    pub events: u64,
    pub last_position: u64,
    /// The smallest and largest UUIDv7 among the ids (`MAX`, 0 if none).
    pub v7: (u128, u128),
    pub sections: [(u64, u64); SECTIONS],
    pub table_off: usize,
    pub table_crc: u32,
}

impl Header {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(HEADER);
        h.extend_from_slice(MAGIC);
        h.extend_from_slice(&VERSION.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&self.base.to_le_bytes());
        h.extend_from_slice(&self.span.to_le_bytes());
        h.extend_from_slice(&[0u8; 8]);
        h.extend_from_slice(&self.events.to_le_bytes());
        h.extend_from_slice(&self.last_position.to_le_bytes());
        h.extend_from_slice(&[0u8; 8]);
        h.extend_from_slice(&self.v7.0.to_le_bytes());
        h.extend_from_slice(&self.v7.1.to_le_bytes());
        for (off, len) in self.sections {
            h.extend_from_slice(&off.to_le_bytes());
            h.extend_from_slice(&len.to_le_bytes());
        }
        debug_assert_eq!(h.len(), at_table(SECTIONS));
        h.extend_from_slice(&(self.table_off as u64).to_le_bytes());
        h.extend_from_slice(&self.table_crc.to_le_bytes());
        h.resize(AT_HEADER_CRC, 0);
        let crc = crc32c::crc32c(&h);
        h.extend_from_slice(&crc.to_le_bytes());
        h
    }
}

/// A mapped index file, checked against its segment.
pub(crate) struct IdxFile {
    path: PathBuf,
    map: Mmap,
    base: u64,
    events: u64,
    last_position: u64,
    v7: (u128, u128),
    sections: [(u64, u64); SECTIONS],
    /// (base, length) of each segment it covers, in log order.
    covers: Vec<(u64, u64)>,
    /// The first key of every [`FENCE`] entries of the stream and term
    /// directories and of the ids.
    stream_fences: Vec<u64>,
    term_fences: Vec<u64>,
    id_fences: Vec<u128>,
    blocks: Blocks,
}

/// The checksums of a mapped file's 4 KiB blocks after its header (the
/// table at its end), each block checked the first time a read touches it.
pub(crate) struct Blocks {
    crcs: Vec<u32>,
    /// One bit per block: checked already.
    checked: Vec<AtomicU64>,
}

impl Blocks {
    /// From the table of little-endian CRCs at the file's end.
    pub(crate) fn new(table: &[u8]) -> Blocks {
        let crcs: Vec<u32> =
            table.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        let checked = (0..crcs.len().div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Blocks { crcs, checked }
    }

    /// Where the table starts in `map`.
    fn table_off(&self, map: &[u8]) -> usize {
        map.len() - self.crcs.len() * 4
    }

    /// Checks the blocks under `off..off+len` (file offsets), once each.
    pub(crate) fn check(
        &self,
        map: &[u8],
        path: &Path,
        off: usize,
        len: usize,
    ) -> Result<(), Damaged> {
        if len == 0 {
            return Ok(());
        }
        let first = (off - HEADER) / BLOCK;
        let last = (off + len - 1 - HEADER) / BLOCK;
        for b in first..=last {
            let (word, bit) = (b / 64, 1u64 << (b % 64));
            if self.checked[word].load(Ordering::Relaxed) & bit != 0 {
                continue;
            }
            let start = HEADER + b * BLOCK;
            let end = (start + BLOCK).min(self.table_off(map));
            if crc32c::crc32c(&map[start..end]) != self.crcs[b] {
                return Err(Damaged {
                    file: path.to_path_buf(),
                    offset: start as u64,
                    reason: format!("block {b} fails its checksum"),
                });
            }
            self.checked[word].fetch_or(bit, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Checks every block again, also those checked before.
    pub(crate) fn check_all(&self, map: &[u8], path: &Path) -> Result<(), Damaged> {
        for word in &self.checked {
            word.store(0, Ordering::Relaxed);
        }
        self.check(map, path, HEADER, self.table_off(map) - HEADER)
    }
}

/// Opens and maps a file with a 512-byte header (`magic` first, its CRC in
/// its last 4 bytes) and checks that header; `Err` says why it cannot be used.
pub(crate) fn map_checked(path: &Path, magic: &[u8; 8]) -> Result<Mmap, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: index files and stream tables are written to a temporary name,
    // synced and renamed into place, and never written again; the data
    // directory lock keeps other processes out.
    let map =
        unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot map {}: {e}", path.display()))?;
    if map.len() < HEADER {
        return Err("shorter than its header".into());
    }
    if &map[..8] != magic {
        return Err("bad magic bytes".into());
    }
    if crc32c::crc32c(&map[..AT_HEADER_CRC]) != u32_at(&map, AT_HEADER_CRC) {
        return Err("header checksum mismatch".into());
    }
    Ok(map)
}

/// The block checksums of `map`, whose header puts their table at
/// `table_off` with CRC `table_crc`, after checking that the file ends with
/// that table and that every section lies between the header and it (at a
/// multiple of 8, unless `bytes(i)` says section `i` holds plain bytes).
pub(crate) fn checked_blocks(
    map: &[u8],
    table_off: usize,
    table_crc: u32,
    sections: &[(u64, u64)],
    bytes: impl Fn(usize) -> bool,
) -> Result<Blocks, String> {
    let blocks = table_off.saturating_sub(HEADER).div_ceil(BLOCK);
    if table_off < HEADER || !table_off.is_multiple_of(8) || map.len() != table_off + blocks * 4 {
        return Err("its length does not match its header".into());
    }
    if crc32c::crc32c(&map[table_off..]) != table_crc {
        return Err("block checksum table mismatch".into());
    }
    for (i, (off, len)) in sections.iter().enumerate() {
        let aligned = bytes(i) || off % 8 == 0;
        if !aligned || *off < HEADER as u64 || off.saturating_add(*len) > table_off as u64 {
            return Err(format!("section {i} lies outside the file"));
        }
    }
    Ok(Blocks::new(&map[table_off..]))
}

/// `count` items of type `T` from entry `first` of a section (`(offset,
/// length)` in `map`, numbered `s` for messages), its blocks checked.
pub(crate) fn mapped_slice<'a, T: Copy>(
    map: &'a [u8],
    blocks: &Blocks,
    path: &Path,
    (off, len): (u64, u64),
    s: usize,
    first: usize,
    count: usize,
) -> Result<&'a [T], Damaged> {
    let size = std::mem::size_of::<T>();
    let bad = || Damaged {
        file: path.to_path_buf(),
        offset: off,
        reason: format!("an entry points outside section {s}"),
    };
    let end = first.checked_add(count).ok_or_else(bad)?;
    if end * size > len as usize {
        return Err(bad());
    }
    let at = off as usize + first * size;
    blocks.check(map, path, at, count * size)?;
    let bytes = &map[at..at + count * size];
    // SAFETY: `T` is a plain little-endian integer or a `repr(C)` struct of
    // them, any bit pattern is valid, and the mapping is page-aligned with
    // every such section at a multiple of 8 (checked at open).
    let (pre, items, post) = unsafe { bytes.align_to::<T>() };
    debug_assert!(pre.is_empty() && post.is_empty());
    Ok(items)
}

impl std::fmt::Debug for IdxFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdxFile({})", self.path.display())
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

impl IdxFile {
    /// Opens the index file of `seg`; `Err` says why it cannot be used
    /// (missing, damaged header, or made for another segment).
    pub(crate) fn open(seg: &Segment) -> Result<IdxFile, String> {
        Self::open_covering(&path_for(seg), &[seg])
    }

    /// Opens the index file at `path`, which must cover exactly `segs`
    /// (consecutive, in log order); `Err` says why it cannot be used.
    pub(crate) fn open_covering(path: &Path, segs: &[&Segment]) -> Result<IdxFile, String> {
        let path = path.to_path_buf();
        let map = map_checked(&path, MAGIC)?;
        let h = &map[..HEADER];
        let version = u32_at(h, 8);
        let n_sections = match version {
            1 => SECTIONS_V1,
            VERSION => SECTIONS,
            v => return Err(format!("format version {v} (this build writes {VERSION})")),
        };
        let Some(first) = segs.first() else { return Err("covers no segment".into()) };
        let span: u64 = segs.iter().map(|s| s.capacity()).sum();
        let foreign = || {
            if segs.len() == 1 {
                "made for another segment or another copy of it"
            } else {
                "made for other segments or other copies of them"
            }
            .to_string()
        };
        if u64_at(h, 16) != first.base
            || u64_at(h, 24) != span
            || (version == 1 && (segs.len() != 1 || u32_at(h, 32) != tail_crc(first)))
        {
            return Err(foreign());
        }
        let mut sections = [(0u64, 0u64); SECTIONS];
        for (i, s) in sections.iter_mut().enumerate().take(n_sections) {
            *s = (u64_at(h, AT_SECTIONS + i * 16), u64_at(h, AT_SECTIONS + 8 + i * 16));
        }
        let at_table = at_table(n_sections);
        let table_off = u64_at(h, at_table) as usize;
        let blocks = checked_blocks(
            &map,
            table_off,
            u32_at(h, at_table + 8),
            &sections[..n_sections],
            |i| i == S_NAMES,
        )?;
        let entries = [
            (S_STREAMS, 24),
            (S_IDS, 24),
            (S_TERMS, 24),
            (S_POSITIONS, 8),
            (S_TIMESTAMPS, 8),
            (S_POSTINGS, 8),
            (S_BLOOM, 32),
            (S_STREAM_FENCES, 8),
            (S_TERM_FENCES, 8),
            (S_ID_FENCES, 16),
            (S_COVERS, 24),
        ];
        if entries.iter().any(|(s, size)| sections[*s].1 % size != 0) || sections[S_BLOOM].1 == 0 {
            return Err("a section is not a whole number of entries".into());
        }
        if sections[S_POSITIONS].1 != sections[S_TIMESTAMPS].1 {
            return Err("positions and timestamps differ in number".into());
        }
        let v7 = (
            u128::from_le_bytes(h[64..80].try_into().unwrap()),
            u128::from_le_bytes(h[80..96].try_into().unwrap()),
        );
        let mut file = IdxFile {
            path,
            base: first.base,
            events: u64_at(h, 40),
            last_position: u64_at(h, 48),
            v7,
            sections,
            blocks,
            map,
            covers: segs.iter().map(|s| (s.base, s.capacity())).collect(),
            stream_fences: Vec::new(),
            term_fences: Vec::new(),
            id_fences: Vec::new(),
        };
        if version > 1 {
            let covers = file
                .slice::<Cover>(S_COVERS, 0, file.count::<Cover>(S_COVERS))
                .map_err(|d| d.reason)?;
            let fits = covers.len() == segs.len()
                && covers.iter().zip(segs).all(|(c, s)| {
                    c.base == s.base && c.length == s.capacity() && c.tail_crc == tail_crc(s)
                });
            if !fits {
                return Err(foreign());
            }
        }
        let fences = |file: &IdxFile, s: usize, of: usize| -> Result<Vec<u64>, String> {
            let n = file.count::<u64>(s);
            if n != file.count::<Entry>(of).div_ceil(FENCE) {
                return Err(format!("section {s} does not hold one fence per {FENCE} entries"));
            }
            file.slice::<u64>(s, 0, n).map(|f| f.to_vec()).map_err(|d| d.reason)
        };
        file.stream_fences = fences(&file, S_STREAM_FENCES, S_STREAMS)?;
        file.term_fences = fences(&file, S_TERM_FENCES, S_TERMS)?;
        let n = file.count::<[u64; 2]>(S_ID_FENCES);
        if n != file.count::<IdEntry>(S_IDS).div_ceil(FENCE) {
            return Err("the id fences do not match the ids".into());
        }
        file.id_fences = file
            .slice::<[u64; 2]>(S_ID_FENCES, 0, n)
            .map_err(|d| d.reason)?
            .iter()
            .map(|[lo, hi]| (*hi as u128) << 64 | *lo as u128)
            .collect();
        // Small directories are mapped in now (page tables, not memory of
        // our own), so that a first lookup does not fault page by page.
        // Best effort: older kernels do not know the advice.
        for s in [S_STREAMS, S_TERMS, S_NAMES] {
            let (off, len) = file.sections[s];
            if len > 0 && len <= 1 << 20 {
                let _ = file.map.advise_range(
                    memmap2::Advice::PopulateRead,
                    off as usize,
                    len as usize,
                );
            }
        }
        Ok(file)
    }

    /// The range of entries where a key can be, given the number of fences
    /// below it and the number at or below it.
    fn fenced(below: usize, at_or_below: usize, n: usize) -> (usize, usize) {
        (below.saturating_sub(1) * FENCE, (at_or_below * FENCE).min(n))
    }

    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// (base, length) of the segments it covers, in log order.
    pub(crate) fn covers(&self) -> &[(u64, u64)] {
        &self.covers
    }

    /// Where the last covered segment ends.
    pub(crate) fn end(&self) -> u64 {
        self.covers.last().map_or(self.base, |(b, l)| b + l)
    }

    pub(crate) fn v7(&self) -> (u128, u128) {
        self.v7
    }

    pub(crate) fn events(&self) -> u64 {
        self.events
    }

    pub(crate) fn last_position(&self) -> Option<u64> {
        (self.events > 0).then_some(self.last_position)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Checks every block again, also those checked before: what the
    /// scrubber and `cairn verify` do (bit rot comes after the first read).
    pub(crate) fn check_all(&self) -> Result<(), Damaged> {
        self.blocks.check_all(&self.map, &self.path)
    }

    /// `count` items of type `T` from entry `first` of section `s`, checked.
    pub(crate) fn slice<T: Copy>(
        &self,
        s: usize,
        first: usize,
        count: usize,
    ) -> Result<&[T], Damaged> {
        mapped_slice(&self.map, &self.blocks, &self.path, self.sections[s], s, first, count)
    }

    pub(crate) fn count<T>(&self, s: usize) -> usize {
        (self.sections[s].1 as usize) / std::mem::size_of::<T>()
    }

    pub(crate) fn name(&self, e: &Entry) -> Result<&[u8], Damaged> {
        self.slice::<u8>(S_NAMES, e.name_off as usize, e.name_len as usize)
    }

    /// The directory entry of `key` in section `s`.
    fn find(&self, s: usize, key: &[u8]) -> Result<Option<Entry>, Damaged> {
        let hash = name_hash(key);
        let n = self.count::<Entry>(s);
        let fences = if s == S_STREAMS { &self.stream_fences } else { &self.term_fences };
        let (mut lo, mut hi) = Self::fenced(
            fences.partition_point(|f| *f < hash),
            fences.partition_point(|f| *f <= hash),
            n,
        );
        while lo < hi {
            let mid = (lo + hi) / 2;
            let e = self.slice::<Entry>(s, mid, 1)?[0];
            let less = match e.hash.cmp(&hash) {
                std::cmp::Ordering::Equal => self.name(&e)? < key,
                o => o == std::cmp::Ordering::Less,
            };
            if less { lo = mid + 1 } else { hi = mid }
        }
        if lo < n {
            let e = self.slice::<Entry>(s, lo, 1)?[0];
            if e.hash == hash && self.name(&e)? == key {
                return Ok(Some(e));
            }
        }
        Ok(None)
    }

    pub(crate) fn stream(&self, name: &str) -> Result<Option<crate::index::RunRef<'_>>, Damaged> {
        let Some(e) = self.find(S_STREAMS, name.as_bytes())? else { return Ok(None) };
        let positions = self.slice::<u64>(S_POSITIONS, e.first as usize, e.count as usize)?;
        let timestamps = self.slice::<i64>(S_TIMESTAMPS, e.first as usize, e.count as usize)?;
        Ok(Some((positions, timestamps)))
    }

    /// The largest UUIDv7 among the file's ids (0 if none).
    pub(crate) fn v7_max(&self) -> u128 {
        self.v7.1
    }

    pub(crate) fn id(&self, id: u128) -> Result<Option<u64>, Damaged> {
        if is_v7(id) && (id < self.v7.0 || id > self.v7.1) {
            return Ok(None);
        }
        let h = id_hash(id);
        let blocks = self.count::<[u32; 8]>(S_BLOOM);
        let block = self.slice::<[u32; 8]>(S_BLOOM, bloom_block(h, blocks), 1)?[0];
        if block.iter().zip(bloom_mask(h)).any(|(w, m)| w & m == 0) {
            return Ok(None);
        }
        let n = self.count::<IdEntry>(S_IDS);
        let (mut lo, mut hi) = Self::fenced(
            self.id_fences.partition_point(|f| *f < id),
            self.id_fences.partition_point(|f| *f <= id),
            n,
        );
        while lo < hi {
            let mid = (lo + hi) / 2;
            let e = self.slice::<IdEntry>(S_IDS, mid, 1)?[0];
            let at = (e.hi as u128) << 64 | e.lo as u128;
            match at.cmp(&id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some(e.position)),
            }
        }
        Ok(None)
    }

    pub(crate) fn term(&self, kind: Kind, name: &str) -> Result<&[u64], Damaged> {
        match self.find(S_TERMS, &term_key(kind, name))? {
            Some(e) => self.slice::<u64>(S_POSTINGS, e.first as usize, e.count as usize),
            None => Ok(&[]),
        }
    }

    /// Every event id in the file with its position, in id order.
    pub(crate) fn ids(&self) -> Result<impl Iterator<Item = (u128, u64)> + '_, Damaged> {
        let all = self.slice::<IdEntry>(S_IDS, 0, self.count::<IdEntry>(S_IDS))?;
        Ok(all.iter().map(|e| ((e.hi as u128) << 64 | e.lo as u128, e.position)))
    }

    pub(crate) fn all_terms(&self, kind: Kind) -> Result<Vec<&[u64]>, Damaged> {
        let n = self.count::<Entry>(S_TERMS);
        let entries = self.slice::<Entry>(S_TERMS, 0, n)?;
        let mut out = Vec::new();
        for e in entries {
            if self.name(e)?.first() == Some(&(kind as u8)) {
                out.push(self.slice::<u64>(S_POSTINGS, e.first as usize, e.count as usize)?);
            }
        }
        Ok(out)
    }
}

/// Whether `file` says exactly what `mem` (built from its one segment) says;
/// `Err` gives the offset (0 if none) and the first difference. Checks every block on the way.
pub(crate) fn check_against(file: &IdxFile, mem: &MemIndex) -> Result<(), (u64, String)> {
    file.check_all().map_err(|d| (d.offset, d.reason))?;
    if file.count::<Entry>(S_STREAMS) != mem.streams.len() {
        return Err((
            0,
            format!(
                "it holds {} stream(s), its segment {}",
                file.count::<Entry>(S_STREAMS),
                mem.streams.len()
            ),
        ));
    }
    let end = file.end();
    check_segment(file, mem, end)?;
    check_totals(file, &Totals::of(mem))
}

/// What the segments a file covers hold in all: events, ids and postings.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Totals {
    pub events: u64,
    pub ids: u64,
    pub postings: u64,
}

impl Totals {
    pub(crate) fn of(mem: &MemIndex) -> Totals {
        let postings = [&mem.tags, &mem.types, &mem.categories]
            .iter()
            .flat_map(|m| m.values())
            .map(|l| l.len() as u64)
            .sum();
        Totals { events: mem.events, ids: mem.ids.len() as u64, postings }
    }

    pub(crate) fn add(&mut self, other: Totals) {
        self.events += other.events;
        self.ids += other.ids;
        self.postings += other.postings;
    }
}

/// Once each covered segment passed [`check_segment`]: the file holds
/// nothing more than they do.
pub(crate) fn check_totals(file: &IdxFile, t: &Totals) -> Result<(), (u64, String)> {
    let found = Totals {
        events: file.events(),
        ids: file.count::<IdEntry>(S_IDS) as u64,
        postings: file.count::<u64>(S_POSTINGS) as u64,
    };
    if (found.events, found.ids, found.postings) != (t.events, t.ids, t.postings)
        || file.count::<u64>(S_POSITIONS) as u64 != t.events
    {
        return Err((
            0,
            format!(
                "it counts {} event(s), {} id(s) and {} posting(s); its segments hold {}, {} and {}",
                found.events, found.ids, found.postings, t.events, t.ids, t.postings
            ),
        ));
    }
    Ok(())
}

/// Whether `file` says of one segment it covers, the one that ends at
/// `end`, exactly what `mem` (built from that segment) says.
pub(crate) fn check_segment(file: &IdxFile, mem: &MemIndex, end: u64) -> Result<(), (u64, String)> {
    let damaged = |d: Damaged| (d.offset, d.reason);
    let within =
        |p: &[u64]| (p.partition_point(|x| *x < mem.base), p.partition_point(|x| *x < end));
    for (name, run) in &mem.streams {
        match file.stream(name).map_err(damaged)? {
            Some((p, t)) => {
                let (a, b) = within(p);
                if p[a..b] != run.positions[..] || t[a..b] != run.timestamps[..] {
                    return Err((
                        0,
                        format!("its events of stream '{name}' differ from the segment's"),
                    ));
                }
            }
            None => return Err((0, format!("it has no events of stream '{name}'"))),
        }
    }
    for (id, position) in mem.ids.iter() {
        if file.id(id).map_err(damaged)? != Some(position) {
            return Err((
                0,
                format!(
                    "it does not map event {} to position {position}",
                    uuid::Uuid::from_u128(id)
                ),
            ));
        }
    }
    for (kind, map) in
        [(Kind::Tag, &mem.tags), (Kind::Type, &mem.types), (Kind::Category, &mem.categories)]
    {
        for (name, list) in map {
            let found = file.term(kind, name).map_err(damaged)?;
            let (a, b) = within(found);
            if found[a..b] != list[..] {
                return Err((
                    0,
                    format!("its positions of {kind:?} '{name}' differ from the segment's"),
                ));
            }
        }
    }
    Ok(())
}

/// Removes index files (and unfinished ones) other than those in `keep`.
pub(crate) fn remove_strays(
    log_dir: &Path,
    keep: &[PathBuf],
    storage: &dyn Storage,
) -> Result<(), StoreError> {
    let owned = keep;
    let entries = std::fs::read_dir(log_dir).map_err(|e| StoreError::io(log_dir, e))?;
    let mut removed = false;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if (name.ends_with(".idx") && !owned.contains(&path)) || name.ends_with(".idx.tmp") {
            storage.remove(&path).map_err(|e| StoreError::io(&path, e))?;
            removed = true;
        }
    }
    if removed {
        segment::sync_dir(log_dir, storage)?;
    }
    Ok(())
}
