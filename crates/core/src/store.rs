use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures_core::Stream;
use serde::{Deserialize, Serialize};

use crate::{AppendCondition, NewEvent, Query, RecordedEvent, Result, StreamMetadata, StreamState};

/// A place in the global order of all events (`$all`). Positions strictly
/// increase with every event but are not contiguous: the embedded engine uses
/// byte offsets into its log. `Position::START` (0) is before every event.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    pub const START: Position = Position(0);
    pub const END: Position = Position(u64::MAX);
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Position::END { f.write_str("end") } else { write!(f, "{}", self.0) }
    }
}

/// The condition an append puts on the stream's current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpectedVersion {
    /// No condition.
    Any,
    /// The stream must not exist (version 0). Same as `Exact(0)`.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's version (its event count) must be exactly this.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream at `current` version satisfies the condition.
    pub fn accepts(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::StreamExists => current > 0,
            ExpectedVersion::Exact(v) => current == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("stream exists"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// What a successful append returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    /// The stream's version after the append (the version of its last event).
    pub next_version: u64,
    /// Global position of the last event written.
    pub position: Position,
}

/// One append of [`EventStore::append_each`]: what [`EventStore::append`]
/// (or, with a condition, [`EventStore::append_if`]) takes.
#[derive(Debug, Clone)]
pub struct Append {
    pub stream: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
    pub condition: Option<AppendCondition>,
}

impl Append {
    pub fn new(
        stream: impl Into<String>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Self {
        Append { stream: stream.into(), expected, events, condition: None }
    }

    pub fn with_condition(mut self, condition: AppendCondition) -> Self {
        self.condition = Some(condition);
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Forward,
    Backward,
}

/// Which events of one stream to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStreamOptions {
    /// First version to return (inclusive). Forward reads start at 1 by default,
    /// backward reads at the newest event (`u64::MAX`).
    pub from_version: u64,
    pub direction: Direction,
    pub limit: usize,
}

impl ReadStreamOptions {
    pub fn forward() -> Self {
        ReadStreamOptions { from_version: 1, direction: Direction::Forward, limit: usize::MAX }
    }
    pub fn backward() -> Self {
        ReadStreamOptions {
            from_version: u64::MAX,
            direction: Direction::Backward,
            limit: usize::MAX,
        }
    }
    pub fn from_version(mut self, version: u64) -> Self {
        self.from_version = version;
        self
    }
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

/// Which events of the global order to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAllOptions {
    /// Forward: events at or after this position. Backward: events at or before
    /// it (`Position::END` for the newest). Must be `START`, `END`, the head, or
    /// the position of an event.
    pub from: Position,
    /// Leave out the event at `from` itself: forward reads start strictly
    /// after it, backward reads strictly before it (for paging).
    pub exclusive: bool,
    pub direction: Direction,
    pub limit: usize,
}

impl ReadAllOptions {
    pub fn forward() -> Self {
        ReadAllOptions {
            from: Position::START,
            exclusive: false,
            direction: Direction::Forward,
            limit: usize::MAX,
        }
    }
    pub fn backward() -> Self {
        ReadAllOptions {
            from: Position::END,
            exclusive: false,
            direction: Direction::Backward,
            limit: usize::MAX,
        }
    }
    /// Start at `position`, inclusive.
    pub fn from(mut self, position: Position) -> Self {
        self.from = position;
        self.exclusive = false;
        self
    }
    /// Start just past `position` (the last event of the previous page):
    /// after it going forward, before it going backward.
    pub fn after(mut self, position: Position) -> Self {
        self.from = position;
        self.exclusive = true;
        self
    }
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

/// What a subscription follows. Event types and stream categories are
/// queries ([`SubscriptionTarget::category`], [`Query::types`]), served by the
/// store's indexes; any other predicate is [`Subscription::filter`] over `All`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscriptionTarget {
    Stream(String),
    All,
    /// The events matching a query, in global order (never events of `$` streams).
    Query(Query),
}

impl SubscriptionTarget {
    /// The events of every stream of `category` (`account` follows
    /// `account-1`, `account-2`, …), in global order: [`Query::category`].
    pub fn category(category: impl Into<String>) -> Self {
        SubscriptionTarget::Query(Query::category(category))
    }
}

/// Where a subscription starts. For a stream the number is a version, for `$all`
/// and queries a position; the subscription delivers the events strictly after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    Start,
    After(u64),
    /// Only events appended after the subscription was made.
    End,
}

/// A stream's current state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    pub stream: String,
    /// Number of events appended since the stream was (re)created, including
    /// those that reads now hide because of its metadata.
    pub version: u64,
    pub state: StreamState,
    pub metadata: StreamMetadata,
    /// Position of its newest event, if any.
    pub last_position: Option<Position>,
}

/// Events delivered by a subscription: first the history (catch-up), then live
/// events as they become durable, with no gap and no duplicate at the switch.
pub struct Subscription {
    inner: Pin<Box<dyn Stream<Item = Result<RecordedEvent>> + Send>>,
}

impl Subscription {
    pub fn new(stream: impl Stream<Item = Result<RecordedEvent>> + Send + 'static) -> Self {
        Subscription { inner: Box::pin(stream) }
    }

    /// The next event; `None` once the store is closed.
    pub async fn next(&mut self) -> Option<Result<RecordedEvent>> {
        std::future::poll_fn(|cx| self.inner.as_mut().poll_next(cx)).await
    }

    /// Only the events for which `predicate` holds; errors pass through.
    /// This filters on the client: the store still reads and delivers every
    /// event of the target (a predicate over `All` reads all of `$all`), so
    /// prefer a query target when types, tags or categories say it. To
    /// resume, checkpoint the last delivered event's position; the events
    /// skipped after it are read (and skipped) again.
    pub fn filter(
        self,
        predicate: impl Fn(&RecordedEvent) -> bool + Send + 'static,
    ) -> Subscription {
        Subscription::new(Filtered { inner: self.inner, predicate: Box::new(predicate) })
    }
}

/// Events skipped in one poll before [`Filtered`] yields to the executor: a
/// long run of non-matching history must not hold a worker thread.
const FILTER_SKIPS_PER_POLL: usize = 1024;

struct Filtered {
    inner: Pin<Box<dyn Stream<Item = Result<RecordedEvent>> + Send>>,
    predicate: Box<dyn Fn(&RecordedEvent) -> bool + Send>,
}

impl Stream for Filtered {
    type Item = Result<RecordedEvent>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        for _ in 0..FILTER_SKIPS_PER_POLL {
            match self.inner.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(event))) if !(self.predicate)(&event) => continue,
                other => return other,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Stream for Subscription {
    type Item = Result<RecordedEvent>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// The event store. Every backend (embedded, PostgreSQL, remote server)
/// implements this and passes the conformance suite.
///
/// Code that takes a `&dyn EventStore` runs on all of them:
///
/// ```
/// use cairn_core::{EventStore, ExpectedVersion, NewEvent, ReadStreamOptions, StoreError};
///
/// /// Opens an account unless it exists, and returns its events.
/// async fn open(store: &dyn EventStore, id: &str) -> Result<usize, StoreError> {
///     let stream = format!("account-{id}");
///     let opened = NewEvent::json_bytes("AccountOpened", format!(r#"{{"owner": "{id}"}}"#));
///     match store.append(&stream, ExpectedVersion::NoStream, vec![opened]).await {
///         Ok(_) | Err(StoreError::WrongExpectedVersion { .. }) => {}
///         Err(e) => return Err(e),
///     }
///     Ok(store.read_stream(&stream, ReadStreamOptions::forward()).await?.len())
/// }
/// ```
#[async_trait]
pub trait EventStore: Send + Sync {
    /// Appends `events` to `stream` atomically (all or none) if the stream's
    /// version satisfies `expected`. Re-sending a batch whose event ids were all
    /// written by one earlier append returns that append's result and writes nothing.
    async fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult>;

    /// [`EventStore::append`] plus a Dynamic Consistency Boundary condition:
    /// both the expected version and `condition` are checked, atomically with
    /// the append and against every append ordered before it; if either fails
    /// nothing is written. A failed condition is
    /// [`crate::StoreError::AppendConditionFailed`], naming the first
    /// conflicting position (the expected version is checked first). A retry
    /// of an append that was written returns its result, like `append`.
    async fn append_if(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
        condition: AppendCondition,
    ) -> Result<AppendResult>;

    /// Several appends, each atomic and on its own (one that fails, say on
    /// its expected version, does not stop the others), applied in the
    /// order given: each sees the ones before it, so a stream can be
    /// extended with exact versions in one call. The answers come in the
    /// same order. The embedded engine queues them all at once, so they
    /// share fsyncs; the servers take them in one request (a gRPC stream,
    /// an NDJSON body); the default appends them one after the other.
    async fn append_each(&self, appends: Vec<Append>) -> Vec<Result<AppendResult>> {
        let mut out = Vec::with_capacity(appends.len());
        for a in appends {
            out.push(match a.condition {
                Some(c) => self.append_if(&a.stream, a.expected, a.events, c).await,
                None => self.append(&a.stream, a.expected, a.events).await,
            });
        }
        out
    }

    /// Whether a caller may start the next [`EventStore::append_each`]
    /// before the answers of the last and still have them applied in the
    /// order the calls were first polled (a pipeline: the server's
    /// `AppendStream` then queues one batch while the one before it is
    /// written). The embedded engine queues a call's appends when it is
    /// first polled, in that order; the default, one after the other, does
    /// not, so a caller waits for each call's answers first.
    fn append_each_pipelines(&self) -> bool {
        false
    }

    /// Reads the events matching `query` in global order, forward or backward,
    /// with `options` as for [`EventStore::read_all`], except that `from` is
    /// only a bound and need not be an event's position. Events of `$` streams
    /// never match; events of deleted or truncated streams do (like `$all`).
    async fn read_query(
        &self,
        query: &Query,
        options: ReadAllOptions,
    ) -> Result<Vec<RecordedEvent>>;

    /// Reads the events of the streams of `category` (the part of a stream's
    /// name before its first `-`: see [`crate::stream_category`]) in global
    /// order, with `options` as for [`EventStore::read_query`]; the same as
    /// `read_query(&Query::category(category), options)`. `$` streams belong
    /// to no category.
    async fn read_category(
        &self,
        category: &str,
        options: ReadAllOptions,
    ) -> Result<Vec<RecordedEvent>> {
        self.read_query(&Query::category(category), options).await
    }

    /// Reads a stream's events, honouring its metadata (max age, max count,
    /// truncate-before). A stream that does not exist or was soft-deleted gives
    /// `StreamNotFound`; a tombstoned one `StreamDeleted`.
    async fn read_stream(
        &self,
        stream: &str,
        options: ReadStreamOptions,
    ) -> Result<Vec<RecordedEvent>>;

    /// [`EventStore::read_stream`], with a stream that does not exist (or
    /// was soft-deleted) read as no events: for bookkeeping streams
    /// (checkpoints, snapshots, saga histories) that are missing until the
    /// first write. A tombstoned stream is still `StreamDeleted`.
    async fn read_stream_or_empty(
        &self,
        stream: &str,
        options: ReadStreamOptions,
    ) -> Result<Vec<RecordedEvent>> {
        match self.read_stream(stream, options).await {
            Err(crate::StoreError::StreamNotFound { .. }) => Ok(Vec::new()),
            other => other,
        }
    }

    /// Reads the global order: every event of every stream, system events included.
    async fn read_all(&self, options: ReadAllOptions) -> Result<Vec<RecordedEvent>>;

    /// A stream's version, state and metadata; `StreamNotFound` if it never existed.
    async fn stream_info(&self, stream: &str) -> Result<StreamInfo>;

    /// Streams whose name starts with `prefix` (all user streams for ""), by name.
    async fn list_streams(&self, prefix: &str, limit: usize) -> Result<Vec<StreamInfo>>;

    /// Replaces a stream's metadata; takes effect on the next read.
    async fn set_stream_metadata(
        &self,
        stream: &str,
        metadata: StreamMetadata,
    ) -> Result<AppendResult>;

    /// Soft delete (`hard = false`): the stream reads as gone and a later append
    /// starts it over at version 1. Hard delete: a tombstone; the name can never
    /// be written again. Both honour `expected`.
    async fn delete_stream(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        hard: bool,
    ) -> Result<AppendResult>;

    /// Catch-up then live subscription.
    async fn subscribe(&self, target: SubscriptionTarget, from: StartFrom) -> Result<Subscription>;

    /// Whether the store can take appends now (readiness): `Err` with the
    /// reason while it cannot, e.g. after a failed write until it has recovered.
    async fn health(&self) -> Result<()> {
        self.head_position().await.map(|_| ())
    }

    /// The position just after the newest durable event (where the next goes).
    async fn head_position(&self) -> Result<Position>;

    /// The position of the newest event in the store (of any stream, system
    /// events included), or `None` while the store is empty. This, not the
    /// head, is what an [`AppendCondition`]'s `after` takes when a decision's
    /// query matched nothing; read it *before* the query.
    async fn last_position(&self) -> Result<Option<Position>> {
        Ok(self.read_all(ReadAllOptions::backward().limit(1)).await?.first().map(|e| e.position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(version: u64) -> RecordedEvent {
        RecordedEvent {
            id: uuid::Uuid::new_v4(),
            stream: "s".into(),
            version,
            position: Position(version),
            event_type: "T".into(),
            data: bytes::Bytes::new(),
            content_type: crate::ContentType::Json,
            metadata: crate::Metadata::default(),
            schema_version: 1,
            tags: Vec::new(),
            timestamp: crate::Timestamp(0),
        }
    }

    #[test]
    fn filter_skips_passes_errors_and_yields_on_long_skips() {
        let items = (1..=3000).map(|v| {
            if v == 2000 {
                Err(crate::StoreError::InvalidArgument("x".into()))
            } else {
                Ok(event(v))
            }
        });
        let mut sub = Subscription::new(futures_util::stream::iter(items))
            .filter(|e| e.version.is_multiple_of(1500));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let (mut got, mut errors, mut pending) = (Vec::new(), 0, 0);
        loop {
            match Pin::new(&mut sub).poll_next(&mut cx) {
                Poll::Ready(Some(Ok(e))) => got.push(e.version),
                Poll::Ready(Some(Err(_))) => errors += 1,
                Poll::Ready(None) => break,
                Poll::Pending => pending += 1,
            }
        }
        assert_eq!((got, errors), (vec![1500, 3000], 1));
        assert!(pending > 0, "1,499 skipped events in a row: it yields to the executor in between");
    }
}
