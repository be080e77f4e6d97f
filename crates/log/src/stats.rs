use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters the writer keeps; read them with [`crate::EmbeddedStore::stats`].
#[derive(Default, Debug)]
pub struct Stats {
    pub syncs: AtomicU64,
    pub sync_micros_total: AtomicU64,
    pub bytes_written: AtomicU64,
    pub events_written: AtomicU64,
}

impl Stats {
    pub fn record_sync(&self, took: Duration, bytes: usize) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.sync_micros_total.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.bytes_written.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}
