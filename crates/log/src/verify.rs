//! `cairn verify`: checks every record of every segment without changing anything.

use std::path::{Path, PathBuf};


use cairn_core::StoreError;

use crate::idx::IdxFile;
use crate::index::{FastMap, Index, MemIndex};
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
    /// Index files checked block by block and against their segment.
    pub index_files: usize,
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
    // Ids across segments: what keeps `verify` from running in bounded memory (issue 17).
    let mut ids: FastMap<u128, u64> = FastMap::default();
    let mut report = VerifyReport { segments: segments.len(), ..Default::default() };
    let mut last_end = 0;
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let mut mem = MemIndex::new(seg.base);
        let mut apply = |v: &crate::record::RecordView<'_>, p: u64| {
            index.apply_summary(v, p)?;
            if ids.insert(v.id.as_u128(), p).is_some() {
                return Err(crate::index::IndexError(format!("event id {} at position {p} was already used", v.id)));
            }
            mem.apply(v, p)
        };
        let scan = scan_segment(seg, 0, 0, last, Some(&mut apply))?;
        if !last && let Ok(file) = IdxFile::open(seg) {
            // An index file that fits its segment must say what the segment says.
            crate::idx::check_against(&file, &mem).map_err(|why| StoreError::Corrupt {
                file: file.path().display().to_string(),
                offset: 0,
                reason: format!("{why}; it is only a cache: `cairn reindex` rebuilds it"),
            })?;
            report.index_files += 1;
        }
        report.events += scan.events;
        report.bytes += scan.valid_end;
        last_end = scan.valid_end;
        if let Some(at) = scan.torn_at {
            report.torn_tail = Some((seg.path.clone(), at, scan.torn_bytes));
        }
        progress(i + 1, segments.len());
    }
    index.parts = vec![crate::index::Part::Mem(std::sync::Arc::new(MemIndex { ids, ..Default::default() }))];
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
