//! Segment files: `log/<base position, 20 digits>.seg`, each a 24-byte header
//! (`CAIRNSEG`, format version, base position) followed by records. The active
//! segment is preallocated (sparse) to its capacity and mapped read-only whole;
//! the writer writes with `pwrite`, readers read the map (one page cache).
//! A sealed segment is trimmed to its used length.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use cairn_core::StoreError;

use memmap2::Mmap;

use crate::storage::Storage;

/// The page size the page cache works in, here.
const PAGE: usize = 4096;

pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"CAIRNSEG";
pub(crate) const SEGMENT_FORMAT_VERSION: u32 = 1;
pub(crate) const SEGMENT_HEADER_BYTES: u64 = 24;

pub(crate) struct Segment {
    /// Global position of the segment's first byte (its header).
    pub base: u64,
    pub path: PathBuf,
    pub file: File,
    /// The whole file, mapped; shared with the events whose payloads point into it.
    map: Bytes,
}

impl Segment {
    pub(crate) fn file_name(base: u64) -> String {
        format!("{base:020}.seg")
    }

    /// Creates a new segment with room for `capacity` bytes and makes both the
    /// file and its directory entry durable. The file is prepared under a
    /// temporary name and renamed into place, so a crash never leaves a
    /// segment without its header (a leftover `.tmp` is removed at open).
    pub(crate) fn create(
        dir: &Path,
        base: u64,
        capacity: u64,
        storage: &dyn Storage,
    ) -> Result<Segment, StoreError> {
        let path = dir.join(Self::file_name(base));
        let tmp = dir.join(format!("{}.tmp", Self::file_name(base)));
        let file = storage.create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
        let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
        header.extend_from_slice(SEGMENT_MAGIC);
        header.extend_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&base.to_le_bytes());
        storage
            .set_len(&file, capacity.max(SEGMENT_HEADER_BYTES))
            .map_err(|e| StoreError::io(&tmp, e))?;
        storage.write_at(&file, &header, 0).map_err(|e| StoreError::io(&tmp, e))?;
        storage.sync_all(&file).map_err(|e| StoreError::io(&tmp, e))?;
        storage.rename(&tmp, &path).map_err(|e| StoreError::io(&path, e))?;
        sync_dir(dir, storage)?;
        Self::map(base, path, file)
    }

    /// Opens an existing segment and checks its header.
    pub(crate) fn open(
        path: &Path,
        writable: bool,
        storage: &dyn Storage,
    ) -> Result<Segment, StoreError> {
        let file = storage.open(path, writable).map_err(|e| StoreError::io(path, e))?;
        let corrupt = |offset: u64, reason: String| StoreError::Corrupt {
            file: path.display().to_string(),
            offset,
            reason,
        };
        let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|_| corrupt(0, "file is shorter than a segment header".into()))?;
        if &header[0..8] != SEGMENT_MAGIC {
            return Err(corrupt(0, "not a Cairn segment (bad magic bytes)".into()));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap());
        if version != SEGMENT_FORMAT_VERSION {
            return Err(corrupt(
                8,
                format!(
                    "segment format version {version} is not supported (this build reads {SEGMENT_FORMAT_VERSION})"
                ),
            ));
        }
        let base = u64::from_le_bytes(header[16..24].try_into().unwrap());
        Self::map(base, path.to_path_buf(), file)
    }

    fn map(base: u64, path: PathBuf, file: File) -> Result<Segment, StoreError> {
        // SAFETY: the file is only ever appended to by this process's writer
        // (the data directory lock keeps other writers out), readers only
        // look at bytes below the durable end, which never change again, and
        // no file is ever made shorter (recovery zeroes a torn tail in
        // place), so a map held by `cairn verify` in another process never
        // loses a page under it.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| StoreError::io(&path, e))?;
        Ok(Segment { base, path, file, map: Bytes::from_owner(map) })
    }

    /// Length of the file (and the map) in bytes.
    pub(crate) fn capacity(&self) -> u64 {
        self.map.len() as u64
    }

    /// The file's bytes from `offset` up to `end` (file offsets).
    pub(crate) fn bytes(&self, offset: u64, end: u64) -> &[u8] {
        &self.map[offset as usize..end as usize]
    }

    /// Which of the file's 4 KiB pages are in the page cache now (one flag
    /// per page), or `None` if the kernel does not say.
    pub(crate) fn resident_pages(&self) -> Option<Vec<bool>> {
        let pages = self.map.len().div_ceil(PAGE);
        let mut flags = vec![0u8; pages];
        // SAFETY: the mapping is live and page-aligned, and `flags` has one
        // byte for each of its pages, as mincore(2) writes.
        let rc = unsafe {
            libc::mincore(
                self.map.as_ptr() as *mut libc::c_void,
                self.map.len(),
                flags.as_mut_ptr(),
            )
        };
        (rc == 0).then(|| flags.iter().map(|f| f & 1 == 1).collect())
    }

    /// Drops from the page cache the pages that `before` (from
    /// [`Segment::resident_pages`]) says were not there, so that a pass over
    /// cold data (the scrubber's) does not push out what readers use. Only
    /// a hint; sealed segments' pages are clean, so nothing is written.
    pub(crate) fn uncache_except(&self, before: &[bool]) {
        let mut page = 0;
        while page < before.len() {
            if before[page] {
                page += 1;
                continue;
            }
            let start = page;
            while page < before.len() && !before[page] {
                page += 1;
            }
            let (off, len) =
                (start * PAGE, (page.min(self.map.len().div_ceil(PAGE)) - start) * PAGE);
            // SAFETY: the range lies in this segment's live, read-only, shared
            // file mapping: MADV_DONTNEED only drops this process's page table
            // entries (the next access maps the same file bytes again), which
            // the page cache needs before it lets the pages go.
            unsafe {
                libc::madvise(
                    self.map.as_ptr().add(off) as *mut libc::c_void,
                    len.min(self.map.len() - off),
                    libc::MADV_DONTNEED,
                );
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    off as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
    }

    /// Asks the kernel to start reading `len` bytes at file offset `offset`
    /// into the page cache now, without waiting: a long forward read then
    /// finds its next pages in memory instead of faulting on each in turn.
    /// Only a hint; cached pages cost a system call.
    pub(crate) fn will_need(&self, offset: u64, len: u64) {
        let start = (offset as usize / PAGE) * PAGE;
        let end = ((offset + len) as usize).min(self.map.len());
        if end <= start {
            return;
        }
        // SAFETY: the range lies in this segment's live, read-only file
        // mapping; mincore only reports on its pages, and MADV_WILLNEED
        // only schedules reads of them.
        unsafe {
            // Cached already (its first and last pages are): skip the advice,
            // which would walk every page of the range.
            let resident = |at: usize| {
                let mut flag = 0u8;
                libc::mincore(
                    self.map.as_ptr().add(at) as *mut libc::c_void,
                    PAGE.min(self.map.len() - at),
                    &mut flag,
                ) == 0
                    && flag & 1 == 1
            };
            if resident(start) && resident((end - 1) / PAGE * PAGE) {
                return;
            }
            libc::madvise(
                self.map.as_ptr().add(start) as *mut libc::c_void,
                end - start,
                libc::MADV_WILLNEED,
            );
        }
    }

    /// A shared handle on `sub`, which must lie inside this segment's bytes.
    pub(crate) fn share(&self, sub: &[u8]) -> Bytes {
        self.map.slice_ref(sub)
    }
}

/// Creates `dir` (and missing parents) readable by its owner only: events
/// are nobody else's business. An existing directory is left as it is.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::io(dir, e))
}

pub(crate) fn sync_dir(dir: &Path, storage: &dyn Storage) -> Result<(), StoreError> {
    storage.sync_dir(dir).map_err(|e| StoreError::io(dir, e))
}

/// Removes segments whose creation a crash interrupted (`*.seg.tmp`): they never held data.
pub(crate) fn remove_leftovers(dir: &Path, storage: &dyn Storage) -> Result<(), StoreError> {
    for entry in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        if entry.file_name().to_str().is_some_and(|n| n.ends_with(".seg.tmp")) {
            storage.remove(&entry.path()).map_err(|e| StoreError::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// Whether a segment file is empty or all zeros, header included: a roll a
/// crash cut short, on a filesystem that reordered the rename. No event was in it.
pub(crate) fn never_written(path: &Path) -> Result<bool, StoreError> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| StoreError::io(path, e))?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| StoreError::io(path, e))?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
    }
}

/// The log's segments, opened in order, each checked to start where the one
/// before ended. An all-zero newest segment (an unfinished roll) is left out
/// and returned apart, for the caller to remove or ignore.
pub(crate) fn open_chain(
    dir: &Path,
    writable_last: bool,
    storage: &dyn Storage,
) -> Result<(Vec<Segment>, Option<PathBuf>), StoreError> {
    let mut files = list(dir)?;
    let unfinished = if files.len() > 1 && never_written(&files[files.len() - 1].1)? {
        files.pop().map(|(_, p)| p)
    } else {
        None
    };
    let mut opened = Vec::with_capacity(files.len());
    let mut expected_base = 0;
    for (i, (name_base, path)) in files.iter().enumerate() {
        let seg = Segment::open(path, writable_last && i + 1 == files.len(), storage)?;
        if seg.base != *name_base || seg.base != expected_base {
            return Err(StoreError::Corrupt {
                file: path.display().to_string(),
                offset: 16,
                reason: format!(
                    "segment starts at position {} but {expected_base} was expected (a segment is missing or renamed)",
                    seg.base
                ),
            });
        }
        expected_base = seg.base + seg.capacity();
        opened.push(seg);
    }
    Ok((opened, unfinished))
}

/// Segment files in `dir`, sorted by base position.
pub(crate) fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".seg") else { continue };
        let base = stem.parse::<u64>().map_err(|_| StoreError::Corrupt {
            file: entry.path().display().to_string(),
            offset: 0,
            reason: "segment file name is not a position".into(),
        })?;
        out.push((base, entry.path()));
    }
    out.sort();
    Ok(out)
}
