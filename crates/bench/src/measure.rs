//! What the workloads share: the store under test, the event they append, and how they count.

use std::sync::Arc;
use std::time::Duration;

use cairn_core::{EventStore, Metadata, NewEvent};
use cairn_log::EmbeddedStore;
use uuid::Uuid;

/// A `MoneyDeposited` event of about 150 bytes with ordinary metadata.
pub(crate) fn deposit(amount: u64, correlation: Uuid) -> NewEvent {
    let data = serde_json::json!({"amount": amount, "currency": "EUR", "note": "salary for November, paid by ACME Widgets Ltd, ref 2026-11"});
    let metadata = Metadata {
        correlation_id: Some(correlation),
        causation_id: Some(Uuid::now_v7()),
        ..Default::default()
    };
    NewEvent::json("MoneyDeposited", &data).expect("serialisable").with_metadata(metadata)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize].as_micros()
}

pub(crate) fn scaled(n: u64, scale: f64) -> u64 {
    ((n as f64 * scale) as u64).max(1)
}

/// The store under test. Engine counters (fsyncs, bytes) exist only for
/// the embedded engine.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) backend: &'static str,
    pub(crate) embedded: Option<EmbeddedStore>,
    /// PostgreSQL: a second store on the same schema with a pool (and
    /// LISTEN connection) of its own, as a second server process would have.
    pub(crate) second: Option<Arc<dyn EventStore>>,
}

impl Target {
    pub(crate) fn syncs(&self) -> Option<u64> {
        self.embedded.as_ref().map(|s| s.stats().syncs.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// ` fsyncs=N` where the engine counts them.
pub(crate) fn fsyncs(before: Option<u64>, after: Option<u64>) -> String {
    before.zip(after).map(|(b, a)| format!(" fsyncs={}", a - b)).unwrap_or_default()
}
