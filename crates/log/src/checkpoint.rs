//! The durable mark (`DATA/checkpoint`): how many events the log held, and
//! the id of the newest, at some moment they were all durable. The writer
//! rewrites it after a segment roll, about once a second while appends come
//! in, and at close. Recovery compares the log against it: a log that ends
//! before the mark, or no longer holds the mark's newest event, lost
//! acknowledged events (a damaged tail, a truncated or missing segment), so
//! the store refuses to open instead of cutting them as a torn write.
//!
//! The file holds two 64-byte slots, each with its own CRC, both rewritten
//! (one, then the other) with every mark, so a torn write or later damage of
//! one leaves the other: `[magic 8][version u32][0 u32]
//! [seq u64][head u64][events u64][last id u128][crc32c u32][0 u32]`.

use std::fs::File;
use std::path::{Path, PathBuf};

use cairn_core::StoreError;

use crate::storage::Storage;

pub(crate) const FILE: &str = "checkpoint";
const MAGIC: &[u8; 8] = b"CAIRNCKP";
const VERSION: u32 = 1;
const SLOT_BYTES: usize = 64;

/// What was durable when the mark was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Mark {
    pub seq: u64,
    /// The durable head then (for messages: positions move when segments roll).
    pub head: u64,
    /// Events in the log then, system events included.
    pub events: u64,
    /// Id of the newest of them (0 while the log is empty).
    pub last_id: u128,
}

fn encode(m: &Mark) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[0..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&m.seq.to_le_bytes());
    b[24..32].copy_from_slice(&m.head.to_le_bytes());
    b[32..40].copy_from_slice(&m.events.to_le_bytes());
    b[40..56].copy_from_slice(&m.last_id.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..56]);
    b[56..60].copy_from_slice(&crc.to_le_bytes());
    b
}

/// A slot's mark; `Ok(None)` for a never-written (all zero) slot.
fn decode(b: &[u8]) -> Result<Option<Mark>, String> {
    if b.iter().all(|x| *x == 0) {
        return Ok(None);
    }
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    if &b[0..8] != MAGIC {
        return Err("bad magic bytes".into());
    }
    if crc32c::crc32c(&b[0..56]) != u32::from_le_bytes(b[56..60].try_into().unwrap()) {
        return Err("checksum mismatch".into());
    }
    let version = u32::from_le_bytes(b[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(format!(
            "format version {version} is not supported (this build reads {VERSION})"
        ));
    }
    let last_id = u128::from_le_bytes(b[40..56].try_into().unwrap());
    Ok(Some(Mark { seq: u64_at(16), head: u64_at(24), events: u64_at(32), last_id }))
}

pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The newest intact mark; `None` if there is no file (a new store, or one
/// written before marks existed). Both slots damaged is corruption.
pub(crate) fn read(dir: &Path) -> Result<Option<Mark>, StoreError> {
    let path = path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::io(&path, e)),
    };
    let mut newest: Option<Mark> = None;
    let mut damage = None;
    for (i, slot) in bytes.chunks(SLOT_BYTES).take(2).enumerate() {
        if slot.len() < SLOT_BYTES {
            damage.get_or_insert((i * SLOT_BYTES, "the slot is cut short".to_string()));
            continue;
        }
        match decode(slot) {
            Ok(Some(m)) if newest.is_none_or(|n| m.seq > n.seq) => newest = Some(m),
            Ok(_) => {}
            Err(why) => {
                damage.get_or_insert((i * SLOT_BYTES, why));
            }
        }
    }
    match (newest, damage) {
        (Some(m), _) => Ok(Some(m)),
        (None, Some((offset, why))) => Err(StoreError::Corrupt {
            file: path.display().to_string(),
            offset: offset as u64,
            reason: format!(
                "{why}: no intact copy of the durable mark is left; restore the data directory from a backup, or delete this file to open without checking the log's end against it"
            ),
        }),
        (None, None) => Ok(None),
    }
}

/// The open mark file, for the writer.
pub(crate) struct MarkFile {
    file: File,
    path: PathBuf,
    next_seq: u64,
    /// The last mark written or read: a mark never moves back (the log only grows).
    last: Option<(u64, u64)>,
}

impl MarkFile {
    /// Opens (or creates, durably) the mark file; `last` is the mark read at open.
    pub(crate) fn open(
        dir: &Path,
        last: Option<Mark>,
        storage: &dyn Storage,
    ) -> Result<MarkFile, StoreError> {
        let path = path(dir);
        let file = match storage.open(&path, true) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = storage.create(&path).map_err(|e| StoreError::io(&path, e))?;
                storage.set_len(&f, 2 * SLOT_BYTES as u64).map_err(|e| StoreError::io(&path, e))?;
                storage.sync_all(&f).map_err(|e| StoreError::io(&path, e))?;
                storage.sync_dir(dir).map_err(|e| StoreError::io(dir, e))?;
                f
            }
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        Ok(MarkFile {
            file,
            path,
            next_seq: last.map_or(1, |m| m.seq + 1),
            last: last.map(|m| (m.head, m.events)),
        })
    }

    /// Writes the mark into both slots, one after the other, each synced: a
    /// torn write leaves the other slot whole, and damage to one slot later
    /// leaves the same mark in the other. About once a second, so two syncs
    /// cost nothing that matters.
    pub(crate) fn write(
        &mut self,
        storage: &dyn Storage,
        head: u64,
        events: u64,
        last_id: u128,
    ) -> Result<Mark, StoreError> {
        debug_assert!(
            self.last.is_none_or(|(h, n)| head >= h && events >= n),
            "the durable mark moves forward only: {:?} then ({head}, {events})",
            self.last
        );
        let mark = Mark { seq: self.next_seq, head, events, last_id };
        let io = |e| StoreError::io(&self.path, e);
        for slot in [mark.seq % 2, (mark.seq + 1) % 2] {
            storage.write_at(&self.file, &encode(&mark), slot * SLOT_BYTES as u64).map_err(io)?;
            storage.sync_data(&self.file).map_err(io)?;
        }
        self.next_seq += 1;
        self.last = Some((head, events));
        Ok(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_intact_slot_wins_and_a_torn_one_is_survived() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let storage = crate::storage::OsStorage;
        let mut f = MarkFile::open(dir.path(), None, &storage).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None, "a fresh file holds no mark");
        f.write(&storage, 100, 3, 7).unwrap();
        let second = f.write(&storage, 200, 5, 9).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(second));
        // Damage one slot: the other holds the same mark.
        let mut bytes = std::fs::read(path(dir.path())).unwrap();
        bytes[30] ^= 1;
        std::fs::write(path(dir.path()), &bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(second));
        // A write torn after the first slot: the newer mark wins.
        let mut torn = std::fs::read(path(dir.path())).unwrap();
        let third = Mark { seq: second.seq + 1, head: 300, events: 8, last_id: 11 };
        torn[SLOT_BYTES..].copy_from_slice(&encode(&third));
        torn[..SLOT_BYTES].copy_from_slice(&encode(&second));
        std::fs::write(path(dir.path()), &torn).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(third));
        // Both damaged: refused, naming the file.
        bytes[SLOT_BYTES + 30] ^= 1;
        std::fs::write(path(dir.path()), &bytes).unwrap();
        assert!(matches!(read(dir.path()), Err(StoreError::Corrupt { .. })));
    }
}
