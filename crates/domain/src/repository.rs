use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_core::{
    EventStore, ExpectedVersion, Metadata, NewEvent, Position, ReadStreamOptions, RecordedEvent,
    StoreError, snapshot_stream_name,
};
use uuid::Uuid;

use crate::snapshot::{SNAPSHOT_EVENT_TYPE, SnapshotBody};
use crate::travel::At;
use crate::{Aggregate, EventCodec, RepositoryError, SnapshotPolicy};

/// Events read per call while replaying, so a long stream never sits in memory whole.
const PAGE: usize = 1024;

/// How often `execute` runs load/decide/append again after a concurrency conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included (1 = no retry).
    pub attempts: u32,
    /// Upper bound of the random pause before the second attempt; doubles each time.
    pub backoff: Duration,
}

impl RetryPolicy {
    /// One attempt: a conflict is returned to the caller.
    pub fn none() -> Self {
        RetryPolicy { attempts: 1, backoff: Duration::ZERO }
    }

    /// Up to `attempts` attempts with a short random pause (1 ms, doubling) between them.
    pub fn attempts(attempts: u32) -> Self {
        RetryPolicy { attempts: attempts.max(1), backoff: Duration::from_millis(1) }
    }

    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sleeps the pause due after failed attempt number `attempt`.
    pub(crate) async fn wait(&self, attempt: u32) {
        let pause = self.pause(attempt);
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }

    fn pause(&self, attempt: u32) -> Duration {
        let cap = self.backoff.saturating_mul(1 << (attempt - 1).min(10)).as_micros() as u64;
        if cap == 0 {
            return Duration::ZERO;
        }
        // Random so that competing writers do not retry in lockstep.
        Duration::from_micros(Uuid::new_v4().as_u64_pair().0 % cap)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::none()
    }
}

/// Who asked for a command and why: its ids flow into every event it produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandContext {
    /// The command's own id: the causation id of its events.
    pub command_id: Uuid,
    /// The conversation the command belongs to; its events carry it. When
    /// absent the command starts one and its id is used.
    pub correlation_id: Option<Uuid>,
    /// Extra metadata copied to every event.
    pub extra: BTreeMap<String, String>,
    /// Overrides the repository's retry policy for this command.
    pub retry: Option<RetryPolicy>,
}

impl CommandContext {
    pub fn new() -> Self {
        CommandContext {
            command_id: Uuid::now_v7(),
            correlation_id: None,
            extra: BTreeMap::new(),
            retry: None,
        }
    }

    pub fn with_command_id(mut self, id: Uuid) -> Self {
        self.command_id = id;
        self
    }

    pub fn correlated(mut self, correlation_id: Uuid) -> Self {
        self.correlation_id = Some(correlation_id);
        self
    }

    /// A command issued in reaction to `event`: it joins the event's conversation.
    pub fn caused_by(event: &RecordedEvent) -> Self {
        Self::new().correlated(event.metadata.correlation_id.unwrap_or(event.id))
    }

    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.insert(key.into(), value.into());
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }

    pub(crate) fn metadata(&self) -> Metadata {
        Metadata {
            correlation_id: Some(self.correlation_id.unwrap_or(self.command_id)),
            causation_id: Some(self.command_id),
            extra: self.extra.clone(),
        }
    }
}

impl Default for CommandContext {
    fn default() -> Self {
        Self::new()
    }
}

/// An aggregate as loaded from its stream.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    pub stream: String,
    pub state: A,
    /// The version of the last event applied (0: no events).
    pub version: u64,
    /// Global position of the last event applied.
    pub position: Option<Position>,
    /// Version covered by the snapshot the load started from, if any.
    pub snapshot_version: Option<u64>,
    /// Whether the load started from the repository's cache.
    pub cached: bool,
    /// Events replayed on top of the snapshot or cached state (or from the start).
    pub replayed: usize,
}

/// What a successful `execute` did.
#[derive(Debug, Clone)]
pub struct Executed<A: Aggregate> {
    /// The events appended (none if the command changed nothing).
    pub events: Vec<A::Event>,
    pub state: A,
    /// The stream's version after the command.
    pub version: u64,
    /// Position of the last event appended.
    pub position: Option<Position>,
    /// Attempts used (more than 1 after retried conflicts).
    pub attempts: u32,
    /// Whether a snapshot was stored after the command.
    pub snapshotted: bool,
}

/// A state known to be the stream's at `version`, whose event has id `event`.
#[derive(Clone)]
struct Start<A> {
    version: u64,
    event: Uuid,
    state: A,
}

/// Recently loaded states, so that a load only replays what is new. Entries are
/// hints: each is checked against the stream like a snapshot before use.
struct Cache<A> {
    capacity: usize,
    entries: Mutex<HashMap<String, Start<A>>>,
}

impl<A: Clone> Cache<A> {
    fn get(&self, stream: &str) -> Option<Start<A>> {
        self.entries.lock().unwrap().get(stream).cloned()
    }

    fn put(&self, stream: &str, start: Start<A>) {
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= self.capacity && !entries.contains_key(stream) {
            // Evict an arbitrary entry: cheap, and a miss only costs a replay.
            if let Some(victim) = entries.keys().next().cloned() {
                entries.remove(&victim);
            }
        }
        match entries.get_mut(stream) {
            Some(old) if old.version > start.version => {}
            Some(old) => *old = start,
            None => {
                entries.insert(stream.to_string(), start);
            }
        }
    }
}

enum Check {
    /// The covered event's id and position.
    Holds(uuid::Uuid, cairn_core::Position),
    /// Still valid, but after the point in time asked for.
    OutOfBound,
    Stale,
}

enum Snapshot<A> {
    Missing,
    /// Written for another state shape, or unreadable: replay and replace it.
    Unusable,
    Usable(SnapshotBody<A>),
}

/// Loads aggregates of type `A` and runs commands against them.
///
/// ```
/// use std::sync::Arc;
/// use cairn_domain::{Aggregate, DomainEvent, Repository, RepositoryError};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Default, Serialize, Deserialize)]
/// struct Account { balance: u64 }
///
/// #[derive(Serialize, Deserialize)] // the variant name is the stored event type
/// enum Event { Deposited { amount: u64 }, Withdrawn { amount: u64 } }
/// impl DomainEvent for Event {}
///
/// enum Command { Deposit(u64), Withdraw(u64) }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("insufficient funds: the balance is {0}")]
/// struct Refused(u64);
///
/// impl Aggregate for Account {
///     const CATEGORY: &'static str = "account"; // streams account-<id>
///     type Command = Command;
///     type Event = Event;
///     type Error = Refused;
///     fn decide(&self, command: &Command) -> Result<Vec<Event>, Refused> {
///         match *command {
///             Command::Deposit(amount) => Ok(vec![Event::Deposited { amount }]),
///             Command::Withdraw(amount) if amount > self.balance => Err(Refused(self.balance)),
///             Command::Withdraw(amount) => Ok(vec![Event::Withdrawn { amount }]),
///         }
///     }
///     fn evolve(self, event: &Event) -> Self {
///         match event {
///             Event::Deposited { amount } => Account { balance: self.balance + amount },
///             Event::Withdrawn { amount } => Account { balance: self.balance - amount },
///         }
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// let store = Arc::new(cairn_log::EmbeddedStore::open(dir.path())?);
/// let accounts = Repository::<Account>::new(store);
/// accounts.execute("42", &Command::Deposit(100)).await?;
/// let refused = accounts.execute("42", &Command::Withdraw(250)).await;
/// assert!(matches!(refused, Err(RepositoryError::Rejected(Refused(100)))));
/// assert_eq!(accounts.load("42").await?.state.balance, 100); // replayed from account-42
/// # Ok(())
/// # }
/// ```
pub struct Repository<A: Aggregate> {
    pub(crate) store: Arc<dyn EventStore>,
    pub(crate) codec: Arc<EventCodec<A::Event>>,
    snapshots: SnapshotPolicy<A>,
    retry: RetryPolicy,
    cache: Option<Arc<Cache<A>>>,
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Repository {
            store: self.store.clone(),
            codec: self.codec.clone(),
            snapshots: self.snapshots.clone(),
            retry: self.retry,
            cache: self.cache.clone(),
        }
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository on `store` with the default snapshot policy (every 100
    /// events) and no retry on conflict.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Repository {
            store,
            codec: Arc::new(EventCodec::new()),
            snapshots: SnapshotPolicy::default(),
            retry: RetryPolicy::none(),
            cache: None,
        }
    }

    /// Keeps the states of up to `aggregates` recently used aggregates in
    /// memory, so that loading one replays only the events appended since.
    /// Clones of the repository share the cache.
    pub fn with_cache(mut self, aggregates: usize) -> Self {
        self.cache = (aggregates > 0)
            .then(|| Arc::new(Cache { capacity: aggregates, entries: Mutex::new(HashMap::new()) }));
        self
    }

    pub fn with_snapshots(mut self, policy: SnapshotPolicy<A>) -> Self {
        self.snapshots = policy;
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    pub fn codec(&self) -> &EventCodec<A::Event> {
        &self.codec
    }

    /// The aggregate's current state: the newest valid snapshot plus the events after it.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, RepositoryError<A::Error>> {
        self.load_bounded(&A::stream_name(id), None).await
    }

    /// Runs `command` with a fresh context (new command id, no correlation).
    pub async fn execute(
        &self,
        id: &str,
        command: &A::Command,
    ) -> Result<Executed<A>, RepositoryError<A::Error>> {
        self.execute_with(id, command, &CommandContext::new()).await
    }

    /// Loads, decides and appends with the exact expected version; on a
    /// conflict, does it all again while the retry policy allows.
    pub async fn execute_with(
        &self,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
    ) -> Result<Executed<A>, RepositoryError<A::Error>> {
        let stream = A::stream_name(id);
        let retry = context.retry.unwrap_or(self.retry);
        let metadata = context.metadata();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let loaded = self.load_bounded(&stream, None).await?;
            let events = loaded.state.decide(command).map_err(RepositoryError::Rejected)?;
            if events.is_empty() {
                return Ok(Executed {
                    events,
                    state: loaded.state,
                    version: loaded.version,
                    position: loaded.position,
                    attempts: attempt,
                    snapshotted: false,
                });
            }
            let mut batch = Vec::with_capacity(events.len());
            for event in &events {
                let new = self
                    .codec
                    .encode(event)
                    .map_err(|reason| RepositoryError::Encode { stream: stream.clone(), reason })?;
                batch.push(new.with_metadata(metadata.clone()));
            }
            let last_id = batch.last().map(|e| e.id).expect("not empty");
            let expected = ExpectedVersion::Exact(loaded.version);
            match self.store.append(&stream, expected, batch).await {
                Ok(result) => {
                    let state = events.iter().fold(loaded.state, |s, e| s.evolve(e));
                    if let Some(cache) = &self.cache {
                        cache.put(
                            &stream,
                            Start {
                                version: result.next_version,
                                event: last_id,
                                state: state.clone(),
                            },
                        );
                    }
                    let snapshotted =
                        self.snapshots.wants(&state, loaded.version, result.next_version)
                            && self
                                .store_snapshot(&stream, &state, result.next_version, last_id)
                                .await;
                    return Ok(Executed {
                        events,
                        state,
                        version: result.next_version,
                        position: Some(result.position),
                        attempts: attempt,
                        snapshotted,
                    });
                }
                Err(StoreError::WrongExpectedVersion { actual_version, .. }) => {
                    if attempt >= retry.attempts {
                        return Err(RepositoryError::Conflict {
                            stream,
                            expected: loaded.version,
                            actual_version,
                            attempts: attempt,
                        });
                    }
                    retry.wait(attempt).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Stores a snapshot of the aggregate's current state now, whatever the policy.
    pub async fn snapshot(&self, id: &str) -> Result<Loaded<A>, RepositoryError<A::Error>> {
        let stream = A::stream_name(id);
        let mut loaded = self.load_bounded(&stream, None).await?;
        if loaded.version > 0 {
            let last =
                self.store.read_stream(&stream, ReadStreamOptions::backward().limit(1)).await?;
            if let Some(last) = last.first().filter(|e| e.version == loaded.version) {
                let body = SnapshotBody {
                    covers_version: loaded.version,
                    covers_event: last.id,
                    state: &loaded.state,
                };
                let event = NewEvent::json(SNAPSHOT_EVENT_TYPE, &body)
                    .map_err(|e| RepositoryError::Encode {
                        stream: stream.clone(),
                        reason: e.to_string(),
                    })?
                    .with_schema_version(A::SNAPSHOT_VERSION);
                self.store
                    .append(&snapshot_stream_name(&stream), ExpectedVersion::Any, vec![event])
                    .await?;
                loaded.snapshot_version = Some(loaded.version);
            }
        }
        Ok(loaded)
    }

    /// Deletes every snapshot of the aggregate; the next load replays from the start.
    pub async fn delete_snapshots(&self, id: &str) -> Result<(), RepositoryError<A::Error>> {
        match self
            .store
            .delete_stream(&snapshot_stream_name(&A::stream_name(id)), ExpectedVersion::Any, false)
            .await
        {
            Ok(_) | Err(StoreError::StreamNotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Best effort: the command's events are durable whatever happens here, and
    /// a missing snapshot only costs a longer replay.
    async fn store_snapshot(&self, stream: &str, state: &A, version: u64, event: Uuid) -> bool {
        let body = SnapshotBody { covers_version: version, covers_event: event, state };
        let Ok(snapshot) = NewEvent::json(SNAPSHOT_EVENT_TYPE, &body) else { return false };
        let snapshot = snapshot.with_schema_version(A::SNAPSHOT_VERSION);
        self.store
            .append(&snapshot_stream_name(stream), ExpectedVersion::Any, vec![snapshot])
            .await
            .is_ok()
    }

    /// The newest snapshot, if there is one this code can use.
    async fn newest_snapshot(&self, stream: &str) -> Result<Snapshot<A>, StoreError> {
        let found = self
            .store
            .read_stream_or_empty(
                &snapshot_stream_name(stream),
                ReadStreamOptions::backward().limit(1),
            )
            .await?;
        let Some(event) = found.into_iter().next() else { return Ok(Snapshot::Missing) };
        // A snapshot of an older (or newer) state shape is never trusted.
        if event.event_type != SNAPSHOT_EVENT_TYPE || event.schema_version != A::SNAPSHOT_VERSION {
            return Ok(Snapshot::Unusable);
        }
        Ok(event.json::<SnapshotBody<A>>().map_or(Snapshot::Unusable, Snapshot::Usable))
    }

    /// Replays `stream` up to `bound` (everything when `None`), from the best
    /// starting point that lies within the bound and still matches the stream:
    /// the cached state, else the newest snapshot, else the beginning.
    pub(crate) async fn load_bounded(
        &self,
        stream: &str,
        bound: Option<At>,
    ) -> Result<Loaded<A>, RepositoryError<A::Error>> {
        let mut loaded = Loaded {
            stream: stream.to_string(),
            state: A::default(),
            version: 0,
            position: None,
            snapshot_version: None,
            cached: false,
            replayed: 0,
        };
        let mut last_event = None;
        let mut stale_snapshot = false;
        let cached =
            bound.is_none().then(|| self.cache.as_ref().and_then(|c| c.get(stream))).flatten();
        if let Some(start) = cached
            && let Check::Holds(id, position) = self.check(stream, &start, bound).await?
        {
            (loaded.state, loaded.version, loaded.position, loaded.cached) =
                (start.state, start.version, Some(position), true);
            last_event = Some(id);
        } else if self.snapshots.enabled() {
            match self.newest_snapshot(stream).await? {
                Snapshot::Usable(s) if bound.is_none_or(|b| b.admits_version(s.covers_version)) => {
                    let start =
                        Start { version: s.covers_version, event: s.covers_event, state: s.state };
                    match self.check(stream, &start, bound).await? {
                        Check::Holds(id, position) => {
                            (loaded.state, loaded.version, loaded.position) =
                                (start.state, start.version, Some(position));
                            loaded.snapshot_version = Some(start.version);
                            last_event = Some(id);
                        }
                        Check::OutOfBound => {}
                        Check::Stale => stale_snapshot = bound.is_none(),
                    }
                }
                Snapshot::Usable(_) | Snapshot::Missing => {}
                Snapshot::Unusable => stale_snapshot = bound.is_none(),
            }
        }
        'pages: loop {
            let page = self.read_page(stream, loaded.version + 1, PAGE).await?;
            let full = page.len() == PAGE;
            for stored in &page {
                if bound.is_some_and(|b| !b.admits(stored)) {
                    break 'pages;
                }
                let event = self.codec.decode(stored)?;
                loaded.state = std::mem::take(&mut loaded.state).evolve(&event);
                loaded.version = stored.version;
                loaded.position = Some(stored.position);
                last_event = Some(stored.id);
                loaded.replayed += 1;
            }
            if !full {
                break;
            }
        }
        if let (None, Some(event)) = (bound, last_event) {
            if let Some(cache) =
                self.cache.as_ref().filter(|_| !loaded.cached || loaded.replayed > 0)
            {
                cache.put(
                    stream,
                    Start { version: loaded.version, event, state: loaded.state.clone() },
                );
            }
            if stale_snapshot {
                // Replace the snapshot that could not be trusted.
                self.store_snapshot(stream, &loaded.state, loaded.version, event).await;
            }
        }
        Ok(loaded)
    }

    /// Whether `start` is still the state of `stream` at its version: reads the
    /// covered event itself, whose id differs if the stream was deleted and
    /// started over.
    async fn check(
        &self,
        stream: &str,
        start: &Start<A>,
        bound: Option<At>,
    ) -> Result<Check, StoreError> {
        let first = self.read_page(stream, start.version, 1).await?;
        Ok(match first.into_iter().next() {
            Some(e) if e.version == start.version && e.id == start.event => {
                if bound.is_some_and(|b| !b.admits(&e)) {
                    Check::OutOfBound
                } else {
                    Check::Holds(e.id, e.position)
                }
            }
            _ => Check::Stale,
        })
    }

    /// Events of `stream` from `from` on; none if the stream does not exist (yet, or any more).
    pub(crate) async fn read_page(
        &self,
        stream: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.store
            .read_stream_or_empty(
                stream,
                ReadStreamOptions::forward().from_version(from).limit(limit),
            )
            .await
    }
}
