//! A checkpoint kept as the newest event of a `$` stream: a relay's
//! position, a runner's progress, a process manager's position.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{
    AppendResult, EventStore, ExpectedVersion, NewEvent, ReadStreamOptions, RecordedEvent,
    StoreError, StreamMetadata,
};

/// How many checkpoints a stream shows: the newest, and a few before it for
/// an operator who wants to see how it moved. The older ones are hidden from
/// reads (and are what scavenging frees).
pub const CHECKPOINTS_KEPT: u64 = 16;

/// Checkpoints of type `T` in one stream. Saving appends an event; the first
/// save, and every 4,096th, sets the stream's `max_count` to
/// [`CHECKPOINTS_KEPT`], so a stream written every 100 ms for years still
/// reads in one step and holds no more than a few live events.
///
/// ```
/// use cairn_core::CheckpointStream;
/// let relay: CheckpointStream<u64> = CheckpointStream::new("$relay-to-nats", "RelayCheckpoint");
/// assert_eq!(relay.stream(), "$relay-to-nats");
/// ```
pub struct CheckpointStream<T> {
    stream: String,
    event_type: String,
    _value: PhantomData<fn() -> T>,
}

/// Saves between two renewals of the stream's bound (a stream bounded by an
/// older version of Cairn, or not at all, is bounded at the next renewal).
const RENEW_EVERY: u64 = 4096;

impl<T: Serialize + DeserializeOwned> CheckpointStream<T> {
    pub fn new(stream: impl Into<String>, event_type: impl Into<String>) -> Self {
        CheckpointStream {
            stream: stream.into(),
            event_type: event_type.into(),
            _value: PhantomData,
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The newest checkpoint and the event that holds it; `None` before the
    /// first save. One that does not decode as `T` is `Corrupt`.
    pub async fn load(
        &self,
        store: &dyn EventStore,
    ) -> Result<Option<(T, RecordedEvent)>, StoreError> {
        let newest = store
            .read_stream_or_empty(&self.stream, ReadStreamOptions::backward().limit(1))
            .await?
            .into_iter()
            .next();
        let Some(event) = newest else { return Ok(None) };
        match event.json::<T>() {
            Ok(value) => Ok(Some((value, event))),
            Err(e) => Err(StoreError::Corrupt {
                file: self.stream.clone(),
                offset: event.version,
                reason: format!("checkpoint {} does not decode: {e}", event.event_type),
            }),
        }
    }

    /// Appends `value` as the newest checkpoint.
    pub async fn save(
        &self,
        store: &dyn EventStore,
        value: &T,
    ) -> Result<AppendResult, StoreError> {
        self.save_expecting(store, value, ExpectedVersion::Any).await
    }

    /// Appends `value` if the stream is at `expected` (a read-modify-write
    /// of the checkpoint that must not lose a concurrent save).
    pub async fn save_expecting(
        &self,
        store: &dyn EventStore,
        value: &T,
        expected: ExpectedVersion,
    ) -> Result<AppendResult, StoreError> {
        let event = NewEvent::json(&self.event_type, value).expect("a checkpoint serialises");
        let written = store.append(&self.stream, expected, vec![event]).await?;
        if written.next_version % RENEW_EVERY == 1 {
            let bound = StreamMetadata { max_count: Some(CHECKPOINTS_KEPT), ..Default::default() };
            store.set_stream_metadata(&self.stream, bound).await?;
        }
        Ok(written)
    }
}
