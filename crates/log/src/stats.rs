use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the fsync latency histogram's buckets, in microseconds.
pub const SYNC_BUCKETS_US: [u64; 11] =
    [50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000];

/// Counters the writer keeps; read them with [`crate::EmbeddedStore::stats`].
#[derive(Default, Debug)]
pub struct Stats {
    pub syncs: AtomicU64,
    pub sync_micros_total: AtomicU64,
    pub bytes_written: AtomicU64,
    pub events_written: AtomicU64,
    /// Syncs that took at most each of [`SYNC_BUCKETS_US`] (not cumulative).
    pub sync_buckets: [AtomicU64; SYNC_BUCKETS_US.len()],
    /// Writes or syncs of the log that failed (each made the store refuse appends until it recovered).
    pub write_failures: AtomicU64,
    /// Times the store recovered by itself from a failed write.
    pub recoveries: AtomicU64,
    /// 1 while appends are refused after a failed write, else 0.
    pub unavailable: AtomicU64,
    /// Index files written for sealed segments.
    pub index_files_written: AtomicU64,
    /// Index files found damaged while answering, and rebuilt from their segment.
    pub index_rebuilds: AtomicU64,
    /// Index files that could not be written (the segment stays indexed in memory).
    pub index_failures: AtomicU64,
    /// Merges of neighbouring index files into one.
    pub index_merges: AtomicU64,
    /// Stream tables written (flushes of the stream summaries), and merges of them into a new base.
    pub stream_tables_written: AtomicU64,
    pub stream_table_merges: AtomicU64,
    /// Bytes of sealed segments the scrubber has checked.
    pub scrub_bytes: AtomicU64,
    /// Whole passes of the scrubber over every sealed segment.
    pub scrub_passes: AtomicU64,
    /// Damage the scrubber found (segments, and index files it then rebuilt).
    pub scrub_errors: AtomicU64,
    /// How far the current pass is, in thousandths.
    pub scrub_progress_permille: AtomicU64,
    /// What the scrubber found last, if anything.
    pub scrub_last_error: std::sync::Mutex<Option<String>>,
}

impl Stats {
    pub fn record_sync(&self, took: Duration, bytes: usize) {
        let us = took.as_micros() as u64;
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_micros_total.fetch_add(us, Ordering::Relaxed);
        self.bytes_written.fetch_add(bytes as u64, Ordering::Relaxed);
        if let Some(i) = SYNC_BUCKETS_US.iter().position(|&b| us <= b) {
            self.sync_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters in Prometheus' text format.
    pub fn prometheus(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP cairn_engine_bytes_written_total Bytes the embedded engine wrote to its log."
        );
        let _ = writeln!(out, "# TYPE cairn_engine_bytes_written_total counter");
        let _ = writeln!(out, "cairn_engine_bytes_written_total {}", get(&self.bytes_written));
        let _ = writeln!(
            out,
            "# HELP cairn_engine_fsync_seconds Time of each fsync of the log (one per group commit)."
        );
        let _ = writeln!(out, "# TYPE cairn_engine_fsync_seconds histogram");
        let mut cumulative = 0;
        for (bound, count) in SYNC_BUCKETS_US.iter().zip(&self.sync_buckets) {
            cumulative += get(count);
            let _ = writeln!(
                out,
                "cairn_engine_fsync_seconds_bucket{{le=\"{}\"}} {cumulative}",
                *bound as f64 / 1e6
            );
        }
        let _ =
            writeln!(out, "cairn_engine_fsync_seconds_bucket{{le=\"+Inf\"}} {}", get(&self.syncs));
        let _ = writeln!(
            out,
            "cairn_engine_fsync_seconds_sum {}",
            get(&self.sync_micros_total) as f64 / 1e6
        );
        let _ = writeln!(out, "cairn_engine_fsync_seconds_count {}", get(&self.syncs));
        let _ = writeln!(
            out,
            "# HELP cairn_engine_write_failures_total Failed writes or syncs of the log; appends are refused until the engine recovers."
        );
        let _ = writeln!(out, "# TYPE cairn_engine_write_failures_total counter");
        let _ = writeln!(out, "cairn_engine_write_failures_total {}", get(&self.write_failures));
        let _ = writeln!(
            out,
            "# HELP cairn_engine_recoveries_total Times the engine recovered by itself after a failed write."
        );
        let _ = writeln!(out, "# TYPE cairn_engine_recoveries_total counter");
        let _ = writeln!(out, "cairn_engine_recoveries_total {}", get(&self.recoveries));
        let _ = writeln!(
            out,
            "# HELP cairn_engine_unavailable 1 while the engine refuses appends after a failed write (it retries by itself), else 0."
        );
        let _ = writeln!(out, "# TYPE cairn_engine_unavailable gauge");
        let _ = writeln!(out, "cairn_engine_unavailable {}", get(&self.unavailable));
        for (name, help, v) in [
            (
                "index_files_written_total",
                "Index files written for sealed segments.",
                &self.index_files_written,
            ),
            (
                "index_rebuilds_total",
                "Index files found damaged while answering and rebuilt from their segment.",
                &self.index_rebuilds,
            ),
            (
                "index_failures_total",
                "Index files that could not be written or merged (the segment stays indexed in memory).",
                &self.index_failures,
            ),
            (
                "index_merges_total",
                "Merges of neighbouring index files into one.",
                &self.index_merges,
            ),
            (
                "stream_tables_written_total",
                "Stream tables written: summaries changed since the last one, flushed from memory.",
                &self.stream_tables_written,
            ),
            (
                "stream_table_merges_total",
                "Merges of the stream table's deltas into a new base.",
                &self.stream_table_merges,
            ),
            (
                "scrub_bytes_total",
                "Bytes of sealed segments the background scrubber has checked.",
                &self.scrub_bytes,
            ),
            (
                "scrub_passes_total",
                "Whole passes of the scrubber over every sealed segment.",
                &self.scrub_passes,
            ),
            (
                "scrub_errors_total",
                "Damage the scrubber found in sealed segments and index files.",
                &self.scrub_errors,
            ),
        ] {
            let _ = writeln!(out, "# HELP cairn_engine_{name} {help}");
            let _ = writeln!(out, "# TYPE cairn_engine_{name} counter");
            let _ = writeln!(out, "cairn_engine_{name} {}", get(v));
        }
        let _ = writeln!(
            out,
            "# HELP cairn_engine_scrub_progress How far the scrubber's current pass is, from 0 to 1."
        );
        let _ = writeln!(out, "# TYPE cairn_engine_scrub_progress gauge");
        let _ = writeln!(
            out,
            "cairn_engine_scrub_progress {:.3}",
            get(&self.scrub_progress_permille) as f64 / 1000.0
        );
        out
    }
}
