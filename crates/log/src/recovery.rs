//! Opening the log: check every segment, rebuild the index, and cut a torn
//! tail. The rules (see docs/design.md):
//! - a sealed segment must hold whole, valid records up to its last byte, the
//!   last of them ending an append;
//! - in the last segment, the log ends at the first unwritten (zero) byte or at
//!   damage after which no valid record follows: a torn tail. Everything after
//!   the last complete append is cut (it was never acknowledged);
//! - damage followed by a valid record is corruption: opening fails, naming the
//!   file and offset.

use cairn_core::StoreError;

use crate::index::IndexError;
use crate::record::{self, DecodeError};
use crate::segment::{SEGMENT_HEADER_BYTES, Segment};

/// What recovery found in one segment.
#[derive(Debug, Clone, Default)]
pub(crate) struct SegmentScan {
    /// File offset just past the last complete append.
    pub valid_end: u64,
    pub events: u64,
    /// Bytes after `valid_end` that held a torn or incomplete append.
    pub torn_bytes: u64,
    /// File offset where the torn tail starts, if there is one.
    pub torn_at: Option<u64>,
}

fn corrupt(seg: &Segment, offset: u64, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt { file: seg.path.display().to_string(), offset, reason: reason.into() }
}

/// What a scan hands each record of a whole append: the record and its position.
pub(crate) type Sink<'s> =
    &'s mut dyn FnMut(&record::RecordView<'_>, u64) -> Result<(), IndexError>;

/// Scans `seg` from file offset `from` (a record boundary), checking every
/// record and handing whole appends at or after `apply_from` to `sink` (if
/// given); `events` counts those. `last` says whether it is the newest
/// segment, where a torn tail is allowed.
pub(crate) fn scan_segment(
    seg: &Segment,
    from: u64,
    apply_from: u64,
    last: bool,
    sink: Option<Sink<'_>>,
) -> Result<SegmentScan, StoreError> {
    scan(seg, from, apply_from, last, sink, record::decode)
}

/// [`scan_segment`] of a sealed segment whose every record was checked a
/// moment ago (its index file was just rebuilt from it): no CRCs again.
pub(crate) fn scan_checked_segment(
    seg: &Segment,
    from: u64,
    apply_from: u64,
    sink: Option<Sink<'_>>,
) -> Result<SegmentScan, StoreError> {
    scan(seg, from, apply_from, false, sink, record::decode_trusted)
}

type Decode = for<'a> fn(&'a [u8]) -> Result<record::RecordView<'a>, DecodeError>;

fn scan(
    seg: &Segment,
    from: u64,
    apply_from: u64,
    last: bool,
    mut sink: Option<Sink<'_>>,
    decode: Decode,
) -> Result<SegmentScan, StoreError> {
    let end = seg.capacity();
    let bytes = seg.bytes(0, end);
    let mut offset = from.max(SEGMENT_HEADER_BYTES);
    let mut scan = SegmentScan { valid_end: offset, ..Default::default() };
    // Records of the append in progress, applied once its last record is seen.
    let mut pending: Vec<(u64, record::RecordView<'_>)> = Vec::new();
    let stop = loop {
        if offset >= end {
            break None;
        }
        match decode(&bytes[offset as usize..]) {
            Ok(view) => {
                let len = view.len as u64;
                let batch_end = view.batch_end();
                pending.push((offset, view));
                offset += len;
                if batch_end {
                    for (at, view) in pending.drain(..).filter(|(at, _)| *at >= apply_from) {
                        if let Some(sink) = sink.as_deref_mut() {
                            sink(&view, seg.base + at).map_err(|e| e.into_store(&seg.path, at))?;
                        }
                        scan.events += 1;
                    }
                    scan.valid_end = offset;
                }
            }
            Err(e) => break Some(e),
        }
    };
    let damaged_at = offset;
    // Only the parts of the file that hold data need looking at: the rest of
    // a preallocated segment is a hole and reads as zeros.
    let regions = data_regions(seg, scan.valid_end);
    let all_zero = || {
        regions
            .iter()
            .all(|&(a, b)| bytes[a.max(offset).min(b) as usize..b as usize].iter().all(|x| *x == 0))
    };
    match stop {
        None if pending.is_empty() => return Ok(scan),
        Some(DecodeError::Empty) if pending.is_empty() && all_zero() => return Ok(scan),
        _ => {}
    }
    let reason = match &stop {
        None | Some(DecodeError::Empty) if !pending.is_empty() => {
            "the last append is incomplete".to_string()
        }
        None | Some(DecodeError::Empty) => "unexpected bytes after the end of the log".to_string(),
        Some(DecodeError::Truncated) => "record is cut short".to_string(),
        Some(DecodeError::Invalid(why)) => why.clone(),
    };
    if !last {
        return Err(corrupt(seg, damaged_at, format!("{reason} inside a sealed segment")));
    }
    let found = regions
        .iter()
        .filter(|&&(_, b)| b > damaged_at + 1)
        .find_map(|&(a, b)| find_valid_record(&bytes[..b as usize], a.max(damaged_at + 1)));
    if let Some(valid_at) = found {
        return Err(corrupt(
            seg,
            damaged_at,
            format!(
                "{reason}, yet a valid record follows at offset {valid_at}: this is not a torn write; restore the file from a backup"
            ),
        ));
    }
    scan.torn_at = Some(scan.valid_end);
    let last_non_zero = regions.iter().rev().find_map(|&(a, b)| {
        bytes[a as usize..b as usize].iter().rposition(|x| *x != 0).map(|i| a + i as u64)
    });
    scan.torn_bytes = last_non_zero.map_or(0, |nz| (nz + 1).saturating_sub(scan.valid_end));
    Ok(scan)
}

/// The file ranges at or after `from` that may hold data, found with
/// `SEEK_DATA`/`SEEK_HOLE`; the whole rest of the file where those are not supported.
fn data_regions(seg: &Segment, from: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let end = seg.capacity();
    let fd = seg.file.as_raw_fd();
    let mut regions = Vec::new();
    let mut at = from;
    while at < end {
        // SAFETY: lseek on a file descriptor we own; it only moves the offset,
        // which nothing else in the engine uses (all I/O is positional).
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let unsupported = std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO);
            if unsupported && regions.is_empty() {
                return vec![(from, end)];
            }
            break; // ENXIO: only holes from here on
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (start, stop) = (data as u64, if hole < 0 { end } else { (hole as u64).min(end) });
        if stop <= start {
            break;
        }
        regions.push((start.max(from), stop));
        at = stop;
    }
    regions
}

/// The first offset at or after `from` where a whole valid record starts.
fn find_valid_record(bytes: &[u8], from: u64) -> Option<u64> {
    let mut at = from as usize;
    while at + record::RECORD_OVERHEAD_BYTES <= bytes.len() {
        if bytes[at] == 0 && bytes[at..].iter().take(64).all(|b| *b == 0) {
            // Skip runs of zeros quickly: no record starts with a zero length.
            match bytes[at..].iter().position(|b| *b != 0) {
                Some(n) => at += n.saturating_sub(3).max(1),
                None => return None,
            }
            continue;
        }
        if record::decode(&bytes[at..]).is_ok() {
            return Some(at as u64);
        }
        at += 1;
    }
    None
}
