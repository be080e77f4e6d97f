use async_trait::async_trait;
use cairn_core::{Position, RecordedEvent, Timestamp};

use crate::{ProjectionError, Source};

/// A read model with its checkpoint: applies a batch of events and moves the
/// checkpoint to the batch's last position, all or nothing.
///
/// Async, so that a model in a database with an async client (PostgreSQL)
/// waits without holding a thread; a model with a blocking client (SQLite)
/// runs its work through [`blocking`].
#[async_trait]
pub trait Sink: Send + 'static {
    /// The projection's name (the checkpoint's key).
    fn name(&self) -> &str;

    /// Position of the last event applied, and when that event was appended.
    async fn checkpoint(&mut self) -> Result<Option<(Position, Timestamp)>, ProjectionError>;

    /// Applies `events` in order and records the last one's position, atomically.
    /// `checkpoint` may be past the last event (events skipped by the source).
    async fn apply(
        &mut self,
        events: &[RecordedEvent],
        checkpoint: (Position, Timestamp),
    ) -> Result<(), ProjectionError>;

    /// Empties the read model and forgets the checkpoint.
    async fn reset(&mut self) -> Result<(), ProjectionError>;

    /// Records which events the projection follows, so that operators' tools
    /// can tell its lag without the code (called when a runner starts).
    async fn follows(&mut self, _source: &Source) -> Result<(), ProjectionError> {
        Ok(())
    }

    /// What an operator asked of this projection from outside the process
    /// (`cairn projections pause|resume|reset`), read between batches.
    async fn requested(&mut self) -> Result<Requested, ProjectionError> {
        Ok(Requested::default())
    }
}

/// Runs blocking work (a SQLite transaction) from a sink's async method:
/// on a multi-thread runtime the worker thread hands its other tasks to
/// another thread while it blocks (`block_in_place`), so nothing else
/// stalls; on a current-thread runtime it simply runs.
pub fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Requests stored with a read model by another process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requested {
    /// Stay paused until this is cleared.
    pub paused: bool,
    /// Empty the model and replay from the start (cleared by the reset).
    pub reset: bool,
}

/// A projection's checkpoint as a read model stores it (a row in a SQLite
/// file or a PostgreSQL table), for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub projection: String,
    pub position: Position,
    /// Append time of the last event applied.
    pub event_time: Timestamp,
    /// When the checkpoint last moved.
    pub updated_at: Timestamp,
    pub requested: Requested,
    /// Which events it follows, as its runner last recorded.
    pub source: Option<Source>,
}
