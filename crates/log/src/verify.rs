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
    /// Events the durable mark says were acknowledged (all found), if there is a mark.
    pub durable_events: Option<u64>,
}

/// Checks every record's checksum and every stream's version sequence, and
/// that the log still holds every event the durable mark says was acknowledged.
/// `progress` is called after each segment with (done, total).
pub fn verify(dir: &Path, mut progress: impl FnMut(usize, usize)) -> Result<VerifyReport, StoreError> {
    let log_dir = dir.join("log");
    if !log_dir.is_dir() {
        return Err(StoreError::io(&log_dir, std::io::Error::new(std::io::ErrorKind::NotFound, "no Cairn log here")));
    }
    // Read before the log, so that it never claims more than the log holds.
    let mark = crate::checkpoint::read(dir)?;
    // An unfinished roll is left out here; the next open removes it.
    let (segments, _) = segment::open_chain(&log_dir, false, &crate::storage::OsStorage)?;
    let mut index = Index::default();
    let mut report = VerifyReport { segments: segments.len(), ..Default::default() };
    let mut last_end = 0;
    for (i, seg) in segments.iter().enumerate() {
        let scan = scan_segment(seg, 0, 0, i + 1 == segments.len(), Some(&mut index))?;
        report.events += scan.events;
        report.bytes += scan.valid_end;
        last_end = scan.valid_end;
        if let Some(at) = scan.torn_at {
            report.torn_tail = Some((seg.path.clone(), at, scan.torn_bytes));
        }
        progress(i + 1, segments.len());
    }
    if let Some(m) = mark {
        let path = crate::checkpoint::path(dir);
        let (end_file, end_offset) = match (&report.torn_tail, segments.last()) {
            (Some((file, at, _)), _) => (file.clone(), *at),
            (None, Some(seg)) => (seg.path.clone(), last_end),
            (None, None) => (log_dir.clone(), 0),
        };
        let torn = report.torn_tail.as_ref().map(|_| "damaged or cut short, with nothing valid after them");
        crate::store::check_claim((&path, m.events, m.last_id), &index, (&end_file, end_offset), torn)?;
        report.durable_events = Some(m.events);
    }
    report.streams = index.streams.keys().filter(|s| !s.starts_with('$')).count();
    Ok(report)
}
