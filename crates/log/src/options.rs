//! The settings of an embedded store.

use cairn_core::Limits;

use crate::storage::Storage;
use std::sync::Arc;

/// Settings of an embedded store.
#[derive(Debug, Clone)]
pub struct Options {
    /// Size at which a segment is sealed and a new one started.
    pub segment_bytes: u64,
    pub limits: Limits,
    /// Most append requests waiting for the writer; callers wait beyond that.
    pub queue_depth: usize,
    /// How long an append waits for room in a full queue before failing with `Busy`.
    pub busy_timeout: std::time::Duration,
    /// Check the checksum of every record of every sealed segment at open.
    /// Off (the default), open checks only the segments it scans (the newest,
    /// and any without an index file); `cairn verify` checks them all, and a
    /// damaged old record is still caught when read.
    pub verify_on_open: bool,
    /// Longest a group commit waits for more of the concurrent appenders that
    /// the previous group had (zero: never wait). A lone appender never waits.
    pub group_linger: std::time::Duration,
    /// Longest time between rewrites of the durable mark (`DATA/checkpoint`)
    /// while appends come in. Acknowledged events older than this that go
    /// missing from the log's end are detected at open rather than cut.
    pub checkpoint_interval: std::time::Duration,
    /// Longest wait between attempts to recover from a failed write.
    pub recovery_backoff_max: std::time::Duration,
    /// Where file operations go; a test puts a [`crate::FaultyStorage`] here.
    pub storage: Arc<dyn Storage>,
    /// The background check of sealed segments and index files.
    pub scrub: crate::scrub::ScrubOptions,
    /// When neighbouring index files are merged in the background.
    pub merge: crate::merge::MergeOptions,
    /// Stream summaries changed since the last stream table that are kept
    /// in memory before they are flushed to a new one (they are flushed
    /// after every sealed segment too). About 300 bytes each.
    pub summaries_in_memory: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: 256 * 1024 * 1024,
            limits: Limits::default(),
            queue_depth: 4096,
            busy_timeout: std::time::Duration::from_secs(10),
            verify_on_open: false,
            group_linger: std::time::Duration::from_micros(100),
            checkpoint_interval: std::time::Duration::from_secs(1),
            recovery_backoff_max: std::time::Duration::from_secs(2),
            storage: crate::storage::os(),
            scrub: crate::scrub::ScrubOptions::default(),
            merge: crate::merge::MergeOptions::default(),
            summaries_in_memory: 131_072,
        }
    }
}
