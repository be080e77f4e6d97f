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

use crate::index::Index;
use crate::record::{self, DecodeError};
use crate::segment::{Segment, SEGMENT_HEADER_BYTES};

/// What recovery found in one segment.
#[derive(Debug, Clone, Default)]
pub struct SegmentScan {
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

/// Scans `seg` from file offset `from` (a record boundary), applying whole
/// appends to `index` (if given). `last` says whether it is the newest
/// segment, where a torn tail is allowed.
pub fn scan_segment(seg: &Segment, from: u64, last: bool, mut index: Option<&mut Index>) -> Result<SegmentScan, StoreError> {
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
        match record::decode(&bytes[offset as usize..]) {
            Ok(view) => {
                let len = view.len as u64;
                let batch_end = view.batch_end();
                pending.push((offset, view));
                offset += len;
                if batch_end {
                    for (at, view) in pending.drain(..) {
                        if let Some(index) = index.as_deref_mut() {
                            index.apply(&view, seg.base + at).map_err(|e| corrupt(seg, at, e.0))?;
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
    match stop {
        None if pending.is_empty() => return Ok(scan),
        Some(DecodeError::Empty) if pending.is_empty() && all_zero(&bytes[offset as usize..]) => return Ok(scan),
        _ => {}
    }
    let reason = match &stop {
        None | Some(DecodeError::Empty) if !pending.is_empty() => "the last append is incomplete".to_string(),
        None | Some(DecodeError::Empty) => "unexpected bytes after the end of the log".to_string(),
        Some(DecodeError::Truncated) => "record is cut short".to_string(),
        Some(DecodeError::Invalid(why)) => why.clone(),
    };
    if !last {
        return Err(corrupt(seg, damaged_at, format!("{reason} inside a sealed segment")));
    }
    if let Some(valid_at) = find_valid_record(bytes, damaged_at + 1) {
        return Err(corrupt(
            seg,
            damaged_at,
            format!("{reason}, yet a valid record follows at offset {valid_at}: this is not a torn write; restore the file from a backup"),
        ));
    }
    scan.torn_at = Some(scan.valid_end);
    scan.torn_bytes = last_non_zero(bytes).map_or(0, |nz| (nz as u64 + 1).saturating_sub(scan.valid_end));
    Ok(scan)
}

fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| *b == 0)
}

fn last_non_zero(bytes: &[u8]) -> Option<usize> {
    bytes.iter().rposition(|b| *b != 0)
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
