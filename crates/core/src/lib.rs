//! Cairn's core: the event envelope, expected versions, positions, errors and the
//! [`EventStore`] trait that every backend implements.
//!
//! Backends prove themselves against the same conformance suite (module `conformance`, feature
//! `conformance`), so code written against the trait behaves the same on the
//! embedded engine, PostgreSQL or a remote server.

mod backoff;
mod checkpoint;
mod error;
mod event;
mod limits;
mod metadata;
mod query;
mod store;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use backoff::Backoff;
pub use checkpoint::{CHECKPOINTS_KEPT, CheckpointStream};
pub use error::{Result, StoreError};
pub use event::{ContentType, Metadata, NewEvent, RecordedEvent, Timestamp};
pub use limits::{
    GROUP_STREAM_PREFIX, Limits, PARKED_STREAM_PREFIX, QUERY_ITEM_TERMS_MAX, QUERY_ITEMS_MAX,
    RELAY_STREAM_PREFIX, SAGA_STREAM_PREFIX, SNAPSHOT_STREAM_PREFIX, STREAM_NAME_BYTES_MAX,
    TAG_BYTES_MAX, TIMER_STREAM_PREFIX, WRITABLE_SYSTEM_PREFIXES, snapshot_stream_name,
    validate_category, validate_stream_name, validate_tag,
};
pub use metadata::{StreamMetadata, StreamState, metadata_stream_name};
pub use query::{AppendCondition, Query, QueryItem, stream_category};
pub use store::{
    Append, AppendResult, Direction, EventStore, ExpectedVersion, Position, ReadAllOptions,
    ReadStreamOptions, StartFrom, StreamInfo, Subscription, SubscriptionTarget,
};
