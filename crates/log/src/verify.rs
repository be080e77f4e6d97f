//! `cairn verify`: checks every record of every segment without changing anything.

use std::path::{Path, PathBuf};

use cairn_core::StoreError;

use crate::index::Index;
use crate::recovery::scan_segment;
use crate::segment::{self, Segment};

#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub segments: usize,
    pub events: u64,
    pub bytes: u64,
    pub streams: usize,
    /// A torn tail the next open will cut: file, offset and byte count.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
}

/// Checks every record's checksum and every stream's version sequence.
/// `progress` is called after each segment with (done, total).
pub fn verify(dir: &Path, mut progress: impl FnMut(usize, usize)) -> Result<VerifyReport, StoreError> {
    let log_dir = dir.join("log");
    if !log_dir.is_dir() {
        return Err(StoreError::io(&log_dir, std::io::Error::new(std::io::ErrorKind::NotFound, "no Cairn log here")));
    }
    let mut files = segment::list(&log_dir)?;
    if files.len() > 1 && segment::never_written(&files[files.len() - 1].1)? {
        files.pop(); // an unfinished roll; the next open removes it
    }
    let mut index = Index::default();
    let mut report = VerifyReport { segments: files.len(), ..Default::default() };
    let mut expected_base = 0;
    for (i, (_, path)) in files.iter().enumerate() {
        let last = i + 1 == files.len();
        let seg = Segment::open(path, false)?;
        if seg.base != expected_base {
            return Err(StoreError::Corrupt { file: path.display().to_string(), offset: 16, reason: format!("segment starts at position {} but {expected_base} was expected", seg.base) });
        }
        let scan = scan_segment(&seg, 0, last, Some(&mut index))?;
        report.events += scan.events;
        report.bytes += scan.valid_end;
        if let Some(at) = scan.torn_at {
            report.torn_tail = Some((path.clone(), at, scan.torn_bytes));
        }
        expected_base = seg.base + seg.capacity();
        progress(i + 1, files.len());
    }
    report.streams = index.streams.keys().filter(|s| !s.starts_with('$')).count();
    Ok(report)
}
