//! The index snapshot (`index.snap`) of stores written before stream tables
//! ([`crate::table`]): all stream summaries as of a log position, in one
//! file. Open still reads one (and flushes it to a stream table, then
//! removes it), so such a store is not replayed from the start; nothing
//! writes one any more. A damaged or foreign one is ignored.

use std::path::Path;

use cairn_core::{StoreError, StreamState};

use crate::index::{FastMap, StreamEntry};
use crate::storage::OsStorage;

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    crate::segment::sync_dir(dir, &OsStorage)
}

const MAGIC: &[u8; 8] = b"CAIRNIDX";
/// 2 added the tag and event-type indexes, 3 the category index, 4 keeps
/// only the stream summaries (the rest is in the index files). A snapshot of
/// another version is ignored (rebuilt from the log), never misread.
pub(crate) const VERSION: u32 = 4;
pub(crate) const FILE: &str = "index.snap";

/// What a snapshot holds: the summaries, the events, and the head they
/// cover with the id of the record that ends there (0 if none).
pub(crate) struct Snapshot {
    pub streams: FastMap<String, StreamEntry>,
    pub events: u64,
    pub head: u64,
    pub last_id: u128,
}

/// A snapshot's bytes, as stores before stream tables wrote them.
#[cfg(test)]
pub(crate) fn encode(
    streams: &FastMap<String, StreamEntry>,
    events: u64,
    head: u64,
    last_id: u128,
) -> Vec<u8> {
    let mut w = Vec::with_capacity(64 + streams.len() * 64);
    w.extend_from_slice(MAGIC);
    w.extend_from_slice(&VERSION.to_le_bytes());
    w.extend_from_slice(&head.to_le_bytes());
    w.extend_from_slice(&events.to_le_bytes());
    w.extend_from_slice(&last_id.to_le_bytes());
    w.extend_from_slice(&(streams.len() as u64).to_le_bytes());
    for (name, s) in streams {
        w.extend_from_slice(&(name.len() as u32).to_le_bytes());
        w.extend_from_slice(name.as_bytes());
        w.push(match s.state {
            StreamState::Live => 0,
            StreamState::Deleted => 1,
            StreamState::Tombstoned => 2,
        });
        w.extend_from_slice(&s.version.to_le_bytes());
        w.extend_from_slice(&s.since.to_le_bytes());
        w.extend_from_slice(&s.last_position.unwrap_or(u64::MAX).to_le_bytes());
        let meta = serde_json::to_vec(&s.metadata).expect("metadata serialises");
        w.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        w.extend_from_slice(&meta);
    }
    let crc = crc32c::crc32c(&w);
    w.extend_from_slice(&crc.to_le_bytes());
    w
}

/// The snapshot, or `None` if there is none or it is damaged.
pub(crate) fn read(dir: &Path) -> Option<Snapshot> {
    let bytes = std::fs::read(dir.join(FILE)).ok()?;
    if bytes.len() < 4 {
        return None;
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let mut r = body;
    let mut take = |n: usize| -> Option<&[u8]> {
        if r.len() < n {
            return None;
        }
        let (head, rest) = r.split_at(n);
        r = rest;
        Some(head)
    };
    if take(8)? != MAGIC {
        return None;
    }
    let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    if u32_at(take(4)?) != VERSION {
        return None;
    }
    let head = u64_at(take(8)?);
    let events = u64_at(take(8)?);
    let last_id = u128::from_le_bytes(take(16)?.try_into().unwrap());
    let count = u64_at(take(8)?);
    let mut streams = FastMap::default();
    streams.reserve(count.min(1 << 24) as usize);
    for _ in 0..count {
        let n = u32_at(take(4)?) as usize;
        let name = std::str::from_utf8(take(n)?).ok()?.to_string();
        let state = match take(1)?[0] {
            0 => StreamState::Live,
            1 => StreamState::Deleted,
            2 => StreamState::Tombstoned,
            _ => return None,
        };
        let version = u64_at(take(8)?);
        let since = u64_at(take(8)?);
        let last_position = Some(u64_at(take(8)?)).filter(|p| *p != u64::MAX);
        let n = u32_at(take(4)?) as usize;
        let metadata = serde_json::from_slice(take(n)?).ok()?;
        streams.insert(name, StreamEntry { version, state, metadata, since, last_position });
    }
    if !r.is_empty() {
        return None;
    }
    Some(Snapshot { streams, events, head, last_id })
}

pub(crate) fn remove(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join(FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(&path, e)),
    }
}
