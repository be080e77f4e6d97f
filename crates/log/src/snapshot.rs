//! The index snapshot (`index.snap`): the index (streams, ids, tags, types, categories) as of a log position,
//! written when the store closes so the next open only scans the log after it.
//! It is a cache: checked by CRC and against the log, and thrown away (the index
//! is then rebuilt from the whole log) whenever anything about it is off.

use std::io::{BufWriter, Write};
use std::path::Path;

use cairn_core::{StoreError, StreamState};

use crate::index::{Index, StreamEntry};
use crate::storage::{OsStorage, Storage};

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    crate::segment::sync_dir(dir, &OsStorage)
}

const MAGIC: &[u8; 8] = b"CAIRNIDX";
/// 2 added the tag and event-type indexes, 3 the category index. A snapshot
/// of another version is ignored (the index is rebuilt from the log), never misread.
pub const VERSION: u32 = 3;
pub const FILE: &str = "index.snap";

pub fn write(dir: &Path, index: &Index, head: u64) -> Result<(), StoreError> {
    let tmp = dir.join("index.snap.tmp");
    let path = dir.join(FILE);
    let file = OsStorage.create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    let mut w = CrcWriter { inner: BufWriter::with_capacity(1 << 20, file), crc: 0 };
    let io = |e| StoreError::io(&tmp, e);
    w.put(MAGIC).map_err(io)?;
    w.put(&VERSION.to_le_bytes()).map_err(io)?;
    w.put(&head.to_le_bytes()).map_err(io)?;
    w.put(&index.events.to_le_bytes()).map_err(io)?;
    w.put(&(index.streams.len() as u64).to_le_bytes()).map_err(io)?;
    for (name, s) in &index.streams {
        w.put(&(name.len() as u32).to_le_bytes()).map_err(io)?;
        w.put(name.as_bytes()).map_err(io)?;
        w.put(&[match s.state { StreamState::Live => 0, StreamState::Deleted => 1, StreamState::Tombstoned => 2 }]).map_err(io)?;
        let meta = serde_json::to_vec(&s.metadata).expect("metadata serialises");
        w.put(&(meta.len() as u32).to_le_bytes()).map_err(io)?;
        w.put(&meta).map_err(io)?;
        w.put(&(s.positions.len() as u64).to_le_bytes()).map_err(io)?;
        for p in &s.positions { w.put(&p.to_le_bytes()).map_err(io)?; }
        for t in &s.timestamps { w.put(&t.to_le_bytes()).map_err(io)?; }
    }
    w.put(&(index.ids.len() as u64).to_le_bytes()).map_err(io)?;
    for (id, p) in &index.ids {
        w.put(&id.to_le_bytes()).map_err(io)?;
        w.put(&p.to_le_bytes()).map_err(io)?;
    }
    for map in [&index.tags, &index.types, &index.categories] {
        w.put(&(map.len() as u64).to_le_bytes()).map_err(io)?;
        for (key, positions) in map {
            w.put(&(key.len() as u32).to_le_bytes()).map_err(io)?;
            w.put(key.as_bytes()).map_err(io)?;
            w.put(&(positions.len() as u64).to_le_bytes()).map_err(io)?;
            for p in positions { w.put(&p.to_le_bytes()).map_err(io)?; }
        }
    }
    let crc = w.crc;
    let mut inner = w.inner;
    inner.write_all(&crc.to_le_bytes()).map_err(io)?;
    let file = inner.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
    sync_dir(dir)
}

struct CrcWriter<W: Write> {
    inner: W,
    crc: u32,
}

impl<W: Write> CrcWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.inner.write_all(bytes)
    }
}

/// The snapshot and the head it covers, or `None` if there is none or it is damaged.
pub fn read(dir: &Path) -> Option<(Index, u64)> {
    let bytes = std::fs::read(dir.join(FILE)).ok()?;
    if bytes.len() < 4 { return None; }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) { return None; }
    let mut r = body;
    let mut take = |n: usize| -> Option<&[u8]> {
        if r.len() < n { return None; }
        let (head, rest) = r.split_at(n);
        r = rest;
        Some(head)
    };
    if take(8)? != MAGIC { return None; }
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    if u32_at(take(4)?) != VERSION { return None; }
    let head = u64_at(take(8)?);
    let mut index = Index { events: u64_at(take(8)?), ..Default::default() };
    let streams = u64_at(take(8)?);
    index.streams.reserve(streams.min(1 << 24) as usize);
    for _ in 0..streams {
        let n = u32_at(take(4)?) as usize;
        let name = std::str::from_utf8(take(n)?).ok()?.to_string();
        let state = match take(1)?[0] { 0 => StreamState::Live, 1 => StreamState::Deleted, 2 => StreamState::Tombstoned, _ => return None };
        let n = u32_at(take(4)?) as usize;
        let metadata = serde_json::from_slice(take(n)?).ok()?;
        let n = u64_at(take(8)?) as usize;
        let positions = take(n.checked_mul(8)?)?.chunks_exact(8).map(u64_at).collect();
        let timestamps = take(n * 8)?.chunks_exact(8).map(|c| u64_at(c) as i64).collect();
        index.streams.insert(name, StreamEntry { positions, timestamps, state, metadata });
    }
    let ids = u64_at(take(8)?) as usize;
    index.ids.reserve(ids.min(1 << 26));
    for _ in 0..ids {
        let id = u128::from_le_bytes(take(16)?.try_into().unwrap());
        index.ids.insert(id, u64_at(take(8)?));
    }
    for map in [&mut index.tags, &mut index.types, &mut index.categories] {
        let keys = u64_at(take(8)?);
        map.reserve(keys.min(1 << 24) as usize);
        for _ in 0..keys {
            let n = u32_at(take(4)?) as usize;
            let key = std::str::from_utf8(take(n)?).ok()?.to_string();
            let n = u64_at(take(8)?) as usize;
            let positions: Vec<u64> = take(n.checked_mul(8)?)?.chunks_exact(8).map(u64_at).collect();
            if !positions.is_sorted() { return None; }
            map.insert(key, positions);
        }
    }
    if !r.is_empty() { return None; }
    Some((index, head))
}

pub fn remove(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(&path, e)),
    }
}
