//! `cairn verify`: checks every record of every segment without changing anything.

use std::path::{Path, PathBuf};

use cairn_core::StoreError;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use crate::idx::{IdxFile, Totals, check_segment, check_totals};
use crate::index::{FastMap, Index, IndexError, MemIndex, Part, StreamEntry};
use crate::recovery::scan_segment;
use crate::segment;
use crate::summaries::Streams;
use crate::table::Table;

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
    /// Stream tables checked block by block and against the log.
    pub stream_tables: usize,
}

/// Checks every record's checksum and every stream's version sequence, and
/// that the log still holds every event the durable mark says was acknowledged.
/// `progress` is called after each segment with (done, total).
pub fn verify(
    dir: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<VerifyReport, StoreError> {
    let log_dir = dir.join("log");
    if !log_dir.is_dir() {
        return Err(StoreError::io(
            &log_dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no Cairn log here"),
        ));
    }
    // Read before the log, so that it never claims more than the log holds.
    let mark = crate::checkpoint::read(dir)?;
    // An unfinished roll is left out here; the next open removes it.
    let (segments, _) = segment::open_chain(&log_dir, false, &crate::storage::OsStorage)?;
    let mut index = Index::default();
    // What holds each segment's ids once it is checked: its index file (ids
    // sorted on disk), or, without one, its ids in memory.
    let mut parts: Vec<Part> = Vec::with_capacity(segments.len());
    let mut report = VerifyReport { segments: segments.len(), ..Default::default() };
    let mut last_end = 0;
    // A merged index file is checked segment by segment, then for its totals.
    let sealed: Vec<&segment::Segment> =
        segments.iter().take(segments.len().saturating_sub(1)).collect();
    let merged = crate::merge::find(&log_dir, &sealed, &mut Vec::new());
    let mut covered: Vec<Option<usize>> = vec![None; segments.len()];
    for (k, (_, range)) in merged.iter().enumerate() {
        covered[range.clone()].iter_mut().for_each(|c| *c = Some(k));
    }
    let mut totals = Totals::default();
    // Each stream table must hold what the log says as of its end.
    let mut rejected = Vec::new();
    let chain: Vec<Arc<Table>> =
        crate::table::find(dir, &mut rejected).into_iter().map(Arc::new).collect();
    if let Some((path, why)) = rejected.first() {
        return Err(StoreError::Corrupt {
            file: path.display().to_string(),
            offset: 0,
            reason: format!("{why}; it is only a cache: `cairn reindex` rebuilds it"),
        });
    }
    for t in &chain {
        t.check_all().map_err(|d| StoreError::Corrupt {
            file: d.file.display().to_string(),
            offset: d.offset,
            reason: format!("{}; it is only a cache: `cairn reindex` rebuilds it", d.reason),
        })?;
    }
    let mut tables_checked = 0usize;
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let mut mem = MemIndex::new(seg.base);
        let mut apply = |v: &crate::record::RecordView<'_>, p: u64| {
            while tables_checked < chain.len() && chain[tables_checked].head().to <= p {
                check_tables(&chain[..=tables_checked], &index.streams.dirty)
                    .map_err(IndexError::from_store)?;
                tables_checked += 1;
            }
            index.apply_summary(v, p)?;
            mem.apply(v, p)
        };
        let scan = scan_segment(seg, 0, 0, last, Some(&mut apply))?;
        let cache_differs = |file: &IdxFile, (offset, why): (u64, String)| StoreError::Corrupt {
            file: file.path().display().to_string(),
            offset,
            reason: format!("{why}; it is only a cache: `cairn reindex` rebuilds it"),
        };
        if let Some(k) = covered[i] {
            let (file, range) = &merged[k];
            if range.start == i {
                file.check_all().map_err(|d| cache_differs(file, (d.offset, d.reason)))?;
                totals = Totals::default();
            }
            check_segment(file, &mem, seg.base + seg.capacity())
                .map_err(|e| cache_differs(file, e))?;
            totals.add(Totals::of(&mem));
            if range.end == i + 1 {
                check_totals(file, &totals).map_err(|e| cache_differs(file, e))?;
                report.index_files += 1;
                parts.push(Part::Disk(file.clone()));
            }
        } else {
            match IdxFile::open(seg) {
                Ok(file) if !last => {
                    // An index file that fits its segment must say what the segment says.
                    crate::idx::check_against(&file, &mem).map_err(|e| cache_differs(&file, e))?;
                    report.index_files += 1;
                    parts.push(Part::Disk(Arc::new(file)));
                }
                _ => parts.push(Part::Mem(Arc::new(MemIndex {
                    base: seg.base,
                    ids: mem.ids,
                    ..Default::default()
                }))),
            }
        }
        report.events += scan.events;
        report.bytes += scan.valid_end;
        last_end = scan.valid_end;
        if let Some(at) = scan.torn_at {
            report.torn_tail = Some((seg.path.clone(), at, scan.torn_bytes));
        }
        progress(i + 1, segments.len());
    }
    let end = segments.last().map_or(0, |s| s.base + last_end);
    // A table past the log's end is one open does not use (the mark check
    // below says whether the log lost acknowledged events).
    while tables_checked < chain.len() && chain[tables_checked].head().to <= end {
        check_tables(&chain[..=tables_checked], &index.streams.dirty)?;
        tables_checked += 1;
    }
    report.stream_tables = tables_checked;
    // Ids are unique within each segment (the scan checks); across segments,
    // a merge of the sorted ids finds any used twice.
    check_unique_ids(&parts, &segments)?;
    index.parts = parts;
    index.parts_changed();
    if let Some(m) = mark {
        let path = crate::checkpoint::path(dir);
        let (end_file, end_offset) = match (&report.torn_tail, segments.last()) {
            (Some((file, at, _)), _) => (file.clone(), *at),
            (None, Some(seg)) => (seg.path.clone(), last_end),
            (None, None) => (log_dir.clone(), 0),
        };
        let torn = report
            .torn_tail
            .as_ref()
            .map(|_| "damaged or cut short, with nothing valid after them");
        crate::store::check_claim(
            (&path, m.events, m.last_id),
            &index,
            (&end_file, end_offset),
            torn,
        )?;
        report.durable_events = Some(m.events);
    }
    index.streams.walk("", |name, _| {
        report.streams += usize::from(!name.starts_with('$'));
        Ok(true)
    })?;
    Ok(report)
}

/// Fails unless the stream tables `chain` (oldest first) hold exactly the
/// summaries `log` that the log gives as of the newest one's end.
fn check_tables(
    chain: &[Arc<Table>],
    log: &FastMap<String, StreamEntry>,
) -> Result<(), StoreError> {
    let newest = chain.last().expect("a chain to check");
    let differs = |why: String| StoreError::Corrupt {
        file: newest.path().display().to_string(),
        offset: 0,
        reason: format!("{why}; it is only a cache: `cairn reindex` rebuilds it"),
    };
    let view = Streams { tables: chain.to_vec(), ..Default::default() };
    let mut n = 0usize;
    view.walk("", |name, e| {
        n += 1;
        match log.get(name) {
            Some(s) if *s == *e => Ok(true),
            Some(s) => Err(differs(format!("the stream tables say {e:?} of stream '{name}', the log {s:?} as of position {}", newest.head().to))),
            None => Err(differs(format!("the stream tables hold stream '{name}', which the log does not have as of position {}", newest.head().to))),
        }
    })?;
    if n != log.len() {
        return Err(differs(format!(
            "the stream tables hold {n} stream(s), the log {} as of position {}",
            log.len(),
            newest.head().to
        )));
    }
    Ok(())
}

/// Fails naming the second use of any event id used in two segments. Walks
/// every part's ids in order at once, so it holds one id per segment.
fn check_unique_ids(parts: &[Part], segments: &[segment::Segment]) -> Result<(), StoreError> {
    let damaged = |d: crate::idx::Damaged| StoreError::Corrupt {
        file: d.file.display().to_string(),
        offset: d.offset,
        reason: d.reason,
    };
    let mut sources: Vec<Box<dyn Iterator<Item = (u128, u64)> + '_>> =
        Vec::with_capacity(parts.len());
    for part in parts {
        sources.push(match part {
            Part::Disk(file) => Box::new(file.ids().map_err(damaged)?),
            Part::Mem(mem) => Box::new(mem.ids.sorted().into_owned().into_iter()),
        });
    }
    let mut heap = BinaryHeap::new();
    for (i, s) in sources.iter_mut().enumerate() {
        if let Some((id, p)) = s.next() {
            heap.push(Reverse((id, p, i)));
        }
    }
    let mut last: Option<(u128, u64)> = None;
    while let Some(Reverse((id, p, i))) = heap.pop() {
        if let Some((_, first)) = last.filter(|(prev, _)| *prev == id) {
            let (later, earlier) = (p.max(first), p.min(first));
            let seg =
                segments.iter().rev().find(|s| s.base <= later).expect("positions lie in segments");
            return Err(StoreError::Corrupt {
                file: seg.path.display().to_string(),
                offset: later - seg.base,
                reason: format!(
                    "event id {} at position {later} was already used at position {earlier}",
                    uuid::Uuid::from_u128(id)
                ),
            });
        }
        last = Some((id, p));
        if let Some((id, p)) = sources[i].next() {
            heap.push(Reverse((id, p, i)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use cairn_core::{NewEvent, Timestamp};

    use super::*;
    use crate::segment::{SEGMENT_HEADER_BYTES, Segment};
    use crate::storage::{OsStorage, Storage};

    /// Writes a segment at `base` holding one event of `stream` with `event`'s id.
    fn segment(log: &Path, base: u64, stream: &str, event: &NewEvent, spare: u64) -> u64 {
        let mut buf = Vec::new();
        crate::record::encode(&mut buf, stream, 1, Timestamp(base as i64), event, true);
        let len = SEGMENT_HEADER_BYTES + buf.len() as u64;
        let seg = Segment::create(log, base, len + spare, &OsStorage).unwrap();
        OsStorage.write_at(&seg.file, &buf, SEGMENT_HEADER_BYTES).unwrap();
        base + len
    }

    #[test]
    fn an_id_used_in_two_segments_is_corruption_with_or_without_index_files() {
        for with_index_file in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let log = dir.path().join("log");
            std::fs::create_dir(&log).unwrap();
            let event = NewEvent::json("Opened", &1).unwrap();
            let next = segment(&log, 0, "a", &event, 0);
            let end = segment(&log, next, "b", &event, 4096);
            if with_index_file {
                let seg =
                    Segment::open(&log.join(Segment::file_name(0)), false, &OsStorage).unwrap();
                crate::idx::write(&seg, &crate::indexer::scan_into_mem(&seg).unwrap(), &OsStorage)
                    .unwrap();
            }
            match verify(dir.path(), |_, _| {}) {
                Err(StoreError::Corrupt { file, offset, reason }) => {
                    assert!(file.ends_with(&Segment::file_name(next)), "{file}");
                    assert_eq!(offset, SEGMENT_HEADER_BYTES);
                    assert!(
                        reason.contains(&event.id.to_string())
                            && reason.contains("already used at position"),
                        "{reason}"
                    );
                }
                other => panic!("with_index_file={with_index_file}: {other:?} (log ends at {end})"),
            }
        }
    }
}
