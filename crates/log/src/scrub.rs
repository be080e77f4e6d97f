//! The scrubber: a background thread that re-reads every sealed segment and
//! its index file at a bounded rate, checking every record's CRC and every
//! index block, so that bit rot in old data is found without a full check at
//! open. A damaged index file is rebuilt from its segment; a damaged segment
//! is reported (`/metrics`, the UI, stderr) and left for the operator: reads
//! of the damaged records fail with `Corrupt` regardless.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::index::Part;
use crate::indexer;
use crate::recovery::scan_segment;
use crate::segment::SEGMENT_HEADER_BYTES;
use crate::shared::Shared;

/// How the scrubber paces itself.
#[derive(Debug, Clone)]
pub struct ScrubOptions {
    /// Bytes of segments and index files read per second, on average; 0 turns the scrubber off.
    pub bytes_per_sec: u64,
    /// Wait before the first pass (so a short-lived process, a CLI command,
    /// never scrubs) and between passes.
    pub pause: Duration,
}

impl Default for ScrubOptions {
    fn default() -> Self {
        ScrubOptions { bytes_per_sec: 32 << 20, pause: Duration::from_secs(60) }
    }
}

pub(crate) fn spawn(
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    if shared.options.scrub.bytes_per_sec == 0 {
        return Ok(None);
    }
    std::thread::Builder::new()
        .name("cairn-scrub".into())
        .spawn(move || run(&shared, &stop))
        .map(Some)
}

/// Sleeps up to `d`, waking early when the store closes; false if it did.
fn rest(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::park_timeout(until - now);
    }
    false
}

fn run(shared: &Shared, stop: &AtomicBool) {
    indexer::background_priority();
    let options = shared.options.scrub.clone();
    while rest(stop, options.pause) {
        let sealed: Vec<_> = {
            let segments = shared.segments.read().unwrap();
            segments[..segments.len() - 1].to_vec()
        };
        let total: u64 = sealed.iter().map(|s| s.capacity()).sum::<u64>().max(1);
        let mut done = 0u64;
        let started = Instant::now();
        for seg in sealed {
            if stop.load(Ordering::Acquire) {
                return;
            }
            // What readers had cached stays; what only the scrub brought in goes.
            let cached = seg.resident_pages();
            if let Err(e) = scan_segment(&seg, SEGMENT_HEADER_BYTES, u64::MAX, false, None) {
                shared.stats.scrub_errors.fetch_add(1, Ordering::Relaxed);
                *shared.stats.scrub_last_error.lock().unwrap() = Some(e.to_string());
                eprintln!("cairn: the scrubber found damage: {e}");
            }
            if let Some(cached) = cached {
                seg.uncache_except(&cached);
            }
            let file = shared.index.read().unwrap().parts.iter().find_map(|p| match p {
                Part::Disk(f) if f.base() == seg.base => Some(f.clone()),
                _ => None,
            });
            if let Some(file) = file
                && let Err(d) = file.check_all()
            {
                shared.stats.scrub_errors.fetch_add(1, Ordering::Relaxed);
                *shared.stats.scrub_last_error.lock().unwrap() =
                    Some(format!("{}: {} (rebuilt)", d.file.display(), d.reason));
                if let Err(e) = indexer::rebuild_file(shared, &d.file) {
                    eprintln!("cairn: could not rebuild {}: {e}", d.file.display());
                }
            }
            done += seg.capacity();
            shared.stats.scrub_bytes.fetch_add(seg.capacity(), Ordering::Relaxed);
            shared.stats.scrub_progress_permille.store(done * 1000 / total, Ordering::Relaxed);
            // Average rate: sleep until this many bytes were due.
            let due = Duration::from_secs_f64(done as f64 / options.bytes_per_sec as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed())
                && !rest(stop, ahead)
            {
                return;
            }
        }
        // The stream tables too: a damaged one is rebuilt from the log.
        let tables = shared.index.read().unwrap().streams.tables.clone();
        for t in tables {
            if let Err(d) = t.check_all() {
                shared.stats.scrub_errors.fetch_add(1, Ordering::Relaxed);
                *shared.stats.scrub_last_error.lock().unwrap() =
                    Some(format!("{}: {} (rebuilt)", d.file.display(), d.reason));
                if let Err(e) = crate::summaries::rebuild_table(shared, &shared.data_dir, &d.file) {
                    eprintln!("cairn: could not rebuild {}: {e}", d.file.display());
                }
            }
        }
        shared.stats.scrub_passes.fetch_add(1, Ordering::Relaxed);
    }
}
