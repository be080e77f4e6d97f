//! The storage seam: every file operation whose failure the engine must
//! survive (writes, syncs, size changes, creation, renames) goes through
//! [`Storage`], so a test can make the Nth call fail with ENOSPC or EMFILE and
//! check that the store stops taking appends, says so, recovers by itself once
//! the fault clears and loses nothing it acknowledged. Reads go through the
//! segments' memory maps and are not part of the seam.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// File operations of the engine. Files it creates are readable by their owner only.
pub trait Storage: Send + Sync + std::fmt::Debug {
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        file.write_all_at(buf, offset)
    }
    fn sync_data(&self, file: &File) -> std::io::Result<()> {
        file.sync_data()
    }
    fn sync_all(&self, file: &File) -> std::io::Result<()> {
        file.sync_all()
    }
    fn set_len(&self, file: &File, len: u64) -> std::io::Result<()> {
        file.set_len(len)
    }
    /// Creates (or truncates) `path` for reading and writing, mode 0600.
    fn create(&self, path: &Path) -> std::io::Result<File> {
        OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(path)
    }
    fn open(&self, path: &Path, writable: bool) -> std::io::Result<File> {
        OpenOptions::new().read(true).write(writable).open(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// The operating system's files.
#[derive(Debug, Default)]
pub struct OsStorage;

impl Storage for OsStorage {}

/// The default storage, shared.
pub(crate) fn os() -> Arc<dyn Storage> {
    Arc::new(OsStorage)
}

/// Which operations a [`FaultyStorage`] fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `write_at`.
    Write,
    /// `sync_data`, `sync_all` and `sync_dir`.
    Sync,
    /// `create` and `open`: what EMFILE hits.
    Open,
    /// Any of the above, plus `set_len`, `rename` and `remove`.
    Any,
}

#[derive(Debug, Clone, Copy)]
struct Fault {
    op: Op,
    /// Fails calls of `op` from this one (counted from 1 since the fault was set) on.
    from_call: u64,
    errno: i32,
    /// Only `create` and `open` of paths ending so (the other calls pass).
    suffix: Option<&'static str>,
}

/// Real files with faults on demand: fails calls of one kind, from the Nth
/// on, with an OS error number (`libc::ENOSPC`, `libc::EMFILE`, `libc::EIO`),
/// until [`FaultyStorage::clear`].
#[derive(Debug, Default)]
pub struct FaultyStorage {
    fault: Mutex<Option<Fault>>,
    calls: AtomicU64,
    failed: AtomicU64,
}

impl FaultyStorage {
    pub fn new() -> Arc<FaultyStorage> {
        Arc::new(FaultyStorage::default())
    }

    /// From the `n`th call of `op` on (1: the next one), fail with `errno`.
    pub fn fail_from(&self, op: Op, n: u64, errno: i32) {
        self.calls.store(0, Ordering::SeqCst);
        *self.fault.lock().unwrap() = Some(Fault { op, from_call: n.max(1), errno, suffix: None });
    }

    /// Fails every `create` and `open` of a path ending with `suffix` (such
    /// as `.idx.tmp`: a full disk hits new files first, since segments are
    /// allocated in full when they are created); other calls pass.
    pub fn fail_files(&self, suffix: &'static str, errno: i32) {
        self.calls.store(0, Ordering::SeqCst);
        *self.fault.lock().unwrap() =
            Some(Fault { op: Op::Open, from_call: 1, errno, suffix: Some(suffix) });
    }

    /// The fault is gone (space was freed, descriptors closed).
    pub fn clear(&self) {
        *self.fault.lock().unwrap() = None;
    }

    /// How many calls have failed so far.
    pub fn failures(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    fn check(&self, op: Op) -> std::io::Result<()> {
        self.check_path(op, None)
    }

    fn check_path(&self, op: Op, path: Option<&Path>) -> std::io::Result<()> {
        let fault = *self.fault.lock().unwrap();
        let Some(f) = fault else { return Ok(()) };
        if f.op != Op::Any && f.op != op {
            return Ok(());
        }
        if let Some(suffix) = f.suffix
            && !path.is_some_and(|p| p.as_os_str().to_string_lossy().ends_with(suffix))
        {
            return Ok(());
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= f.from_call {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Err(std::io::Error::from_raw_os_error(f.errno));
        }
        Ok(())
    }
}

impl Storage for FaultyStorage {
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.check(Op::Write)?;
        file.write_all_at(buf, offset)
    }
    fn sync_data(&self, file: &File) -> std::io::Result<()> {
        self.check(Op::Sync)?;
        file.sync_data()
    }
    fn sync_all(&self, file: &File) -> std::io::Result<()> {
        self.check(Op::Sync)?;
        file.sync_all()
    }
    fn set_len(&self, file: &File, len: u64) -> std::io::Result<()> {
        self.check(Op::Any)?;
        file.set_len(len)
    }
    fn create(&self, path: &Path) -> std::io::Result<File> {
        self.check_path(Op::Open, Some(path))?;
        OsStorage.create(path)
    }
    fn open(&self, path: &Path, writable: bool) -> std::io::Result<File> {
        self.check_path(Op::Open, Some(path))?;
        OsStorage.open(path, writable)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.check(Op::Any)?;
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.check(Op::Any)?;
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.check(Op::Sync)?;
        File::open(dir)?.sync_all()
    }
}
