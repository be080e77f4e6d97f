//! `cairn verify`: checks every record of every segment without changing anything.

use std::path::{Path, PathBuf};


use cairn_core::StoreError;

use crate::index::Index;
use crate::recovery::scan_segment;
use crate::segment;

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
    // An unfinished roll is left out here; the next open removes it.
    let (segments, _) = segment::open_chain(&log_dir, false)?;
    let mut index = Index::default();
    let mut report = VerifyReport { segments: segments.len(), ..Default::default() };
    for (i, seg) in segments.iter().enumerate() {
        let scan = scan_segment(seg, 0, 0, i + 1 == segments.len(), Some(&mut index))?;
        report.events += scan.events;
        report.bytes += scan.valid_end;
        if let Some(at) = scan.torn_at {
            report.torn_tail = Some((seg.path.clone(), at, scan.torn_bytes));
        }
        progress(i + 1, segments.len());
    }
    report.streams = index.streams.keys().filter(|s| !s.starts_with('$')).count();
    Ok(report)
}
