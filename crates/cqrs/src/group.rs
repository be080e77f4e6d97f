//! Consumer groups (persistent subscriptions): several workers share one
//! subscription and each event goes to one of them.
//!
//! A worker acks an event when done or nacks it with the error; a nacked event
//! is delivered again after a backoff, and after `max_attempts` it is parked in
//! the group's dead-letter stream `$parked-<group>` with its error. Parked
//! events can be replayed. With `pin_streams`, a stream's events go out one at
//! a time, in order: the next leaves only when the one before is acked or parked.
//!
//! Progress is stored in the event store itself (`$group-<group>`), so any
//! backend keeps it. An ack returns once it is durable: acks arriving while a
//! write is under way share the next one (group commit), and after a restart
//! no acked event is delivered again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_core::{
    CheckpointStream, EventStore, ExpectedVersion, GROUP_STREAM_PREFIX, NewEvent,
    PARKED_STREAM_PREFIX, Position, ReadStreamOptions, RecordedEvent, StartFrom, StoreError,
    Timestamp,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::runner::lag;
use crate::{GroupError, Lag, Source};

/// How a consumer group behaves.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub name: String,
    pub source: Source,
    /// Deliveries of one event before it is parked (default 5).
    pub max_attempts: u32,
    /// Wait before the second delivery; doubled for each further one (default 100 ms).
    pub first_backoff: Duration,
    /// Longest wait between deliveries (default 10 s).
    pub max_backoff: Duration,
    /// Deliver a stream's events one at a time, in order (default off).
    pub pin_streams: bool,
    /// Most events taken from the store and not yet settled (default 1,000).
    pub max_in_flight: usize,
}

impl GroupConfig {
    pub fn new(name: impl Into<String>, source: Source) -> Self {
        GroupConfig {
            name: name.into(),
            source,
            max_attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            pin_streams: false,
            max_in_flight: 1000,
        }
    }

    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.first_backoff = first;
        self.max_backoff = max;
        self
    }

    pub fn pin_streams(mut self) -> Self {
        self.pin_streams = true;
        self
    }

    pub fn max_in_flight(mut self, events: usize) -> Self {
        self.max_in_flight = events;
        self
    }

    fn check(&self) -> Result<(), GroupError> {
        cairn_core::validate_stream_name(&self.name).map_err(|e| {
            GroupError::Invalid(format!(
                "the group name {:?} cannot name its streams: {e}",
                self.name
            ))
        })?;
        if self.max_attempts == 0 {
            return Err(GroupError::Invalid("max_attempts must be at least 1".into()));
        }
        if self.max_in_flight == 0 {
            return Err(GroupError::Invalid("max_in_flight must be at least 1".into()));
        }
        Ok(())
    }

    fn backoff_after(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.first_backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Stream of a group's stored progress.
/// A group's saved progress (bounded: see [`CheckpointStream`]).
fn checkpoints(group: &str) -> CheckpointStream<Saved> {
    CheckpointStream::new(group_stream_name(group), CHECKPOINT_TYPE)
}

pub fn group_stream_name(group: &str) -> String {
    format!("{GROUP_STREAM_PREFIX}{group}")
}

/// A group's dead-letter stream.
pub fn parked_stream_name(group: &str) -> String {
    format!("{PARKED_STREAM_PREFIX}{group}")
}

const CHECKPOINT_TYPE: &str = "GroupCheckpoint";
const PARKED_TYPE: &str = "EventParked";

/// What `$group-<group>` holds, newest event wins.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Saved {
    /// Every source event at or before this position is acked or parked.
    checkpoint: Option<u64>,
    /// Acked or parked positions after the checkpoint.
    #[serde(default)]
    done: Vec<u64>,
    /// Parked entries replayed and settled: all up to `parked_through`, and these.
    #[serde(default)]
    parked_through: u64,
    #[serde(default)]
    parked_done: Vec<u64>,
    /// Parked entries up to this one are to be replayed.
    #[serde(default)]
    replay_through: u64,
    /// What the group follows, for operators' lag figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<Source>,
}

/// An event the group gave up on, as stored in `$parked-<group>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parked {
    /// Its version in the dead-letter stream.
    #[serde(skip)]
    pub entry: u64,
    pub stream: String,
    pub version: u64,
    pub position: Position,
    pub event_id: Uuid,
    pub event_type: String,
    /// The last delivery's error.
    pub error: String,
    pub attempts: u32,
    /// The earlier entry this one replaces (a replayed event that failed again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<u64>,
    #[serde(skip, default = "Timestamp::now")]
    pub parked_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    /// A source event, by position.
    Live(Position),
    /// A replayed parked event, by entry.
    Replay(u64),
}

struct Item {
    event: RecordedEvent,
    /// Deliveries so far.
    attempts: u32,
    key: Key,
}

/// A group's figures, as of now.
#[derive(Debug, Clone, Default)]
pub struct GroupStatus {
    pub name: String,
    /// Every source event up to here is acked or parked.
    pub checkpoint: Option<Position>,
    pub last_event_time: Option<Timestamp>,
    /// Events waiting for a worker.
    pub waiting: usize,
    /// Events delivered and not yet acked or nacked.
    pub in_flight: usize,
    /// Nacked events waiting for their next delivery.
    pub retrying: usize,
    /// Events in the dead-letter stream not yet replayed with success.
    pub parked: usize,
    pub delivered: u64,
    pub acked: u64,
    pub nacked: u64,
    /// The last error from the store, if the group is retrying a read or write.
    pub error: Option<String>,
}

#[derive(Default)]
struct State {
    checkpoint: Option<(Position, Timestamp)>,
    /// Source events after the checkpoint, in order, with whether each is settled.
    received: VecDeque<(Position, Timestamp, bool)>,
    /// Settled before a restart, not yet received again.
    skip: HashSet<Position>,
    ready: VecDeque<Item>,
    /// Pinned streams with an event out, waiting or retrying.
    busy: HashSet<String>,
    /// Pinned streams' next events, held back until the one out is settled.
    held: HashMap<String, VecDeque<Item>>,
    delayed: Vec<(Instant, Item)>,
    /// Unsettled parked entries, and the replays queued or out.
    parked: BTreeMap<u64, Parked>,
    replaying: HashSet<u64>,
    parked_through: u64,
    parked_done: BTreeSet<u64>,
    replay_through: u64,
    /// Bumped by each change that must be durable before an ack returns.
    changes: u64,
    stopped: bool,
    status: GroupStatus,
}

impl State {
    fn saved(&self) -> Saved {
        Saved {
            checkpoint: self.checkpoint.map(|c| c.0.0),
            done: self.received.iter().filter(|r| r.2).map(|r| r.0.0).collect(),
            parked_through: self.parked_through,
            parked_done: self.parked_done.iter().copied().collect(),
            replay_through: self.replay_through,
            source: None,
        }
    }

    fn queue(&mut self, item: Item, pin: bool) {
        if pin && matches!(item.key, Key::Live(_)) && !self.busy.insert(item.event.stream.clone()) {
            self.held.entry(item.event.stream.clone()).or_default().push_back(item);
        } else {
            self.ready.push_back(item);
        }
    }

    /// A delivered event is done with: acked, or parked.
    fn settle(&mut self, key: Key, stream: &str, pin: bool) {
        match key {
            Key::Live(position) => {
                if let Ok(i) = self.received.binary_search_by_key(&position, |r| r.0) {
                    self.received[i].2 = true;
                }
                self.advance();
                if pin {
                    match self.held.get_mut(stream).and_then(VecDeque::pop_front) {
                        Some(next) => self.ready.push_back(next),
                        None => {
                            self.busy.remove(stream);
                        }
                    }
                    if self.held.get(stream).is_some_and(VecDeque::is_empty) {
                        self.held.remove(stream);
                    }
                }
            }
            Key::Replay(entry) => self.resolve_parked(entry),
        }
        self.changes += 1;
    }

    fn resolve_parked(&mut self, entry: u64) {
        self.parked.remove(&entry);
        self.replaying.remove(&entry);
        if entry > self.parked_through {
            self.parked_done.insert(entry);
        }
        while self.parked_done.remove(&(self.parked_through + 1)) {
            self.parked_through += 1;
        }
    }

    fn advance(&mut self) {
        while let Some(&(position, time, true)) = self.received.front() {
            self.checkpoint = Some((position, time));
            self.received.pop_front();
        }
    }

    fn receive(&mut self, event: RecordedEvent, source: &Source, pin: bool) {
        let settled = !source.wants(&event) || self.skip.remove(&event.position);
        self.received.push_back((event.position, event.timestamp, settled));
        if settled {
            self.advance();
        } else {
            self.queue(Item { key: Key::Live(event.position), event, attempts: 0 }, pin);
        }
    }
}

struct Shared {
    config: GroupConfig,
    store: Arc<dyn EventStore>,
    state: Mutex<State>,
    /// Workers wait on this for events.
    work: Notify,
    /// The feeder waits on this for room and for retries.
    room: Notify,
    /// The writer waits on this for changes.
    dirty: Notify,
    /// The `changes` count last made durable.
    flushed: watch::Receiver<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Waits until the group's state, as of change `change`, is durable.
    async fn durable(&self, change: u64) -> Result<(), GroupError> {
        self.dirty.notify_one();
        let mut flushed = self.flushed.clone();
        match flushed.wait_for(|&f| f >= change).await {
            Ok(_) => Ok(()),
            Err(_) => Err(GroupError::Stopped(self.config.name.clone())),
        }
    }

    fn set_error(&self, error: Option<String>) {
        self.lock().status.error = error;
    }
}

/// Two workers sharing one subscription; each event goes to one of them:
///
/// ```
/// use std::sync::Arc;
/// use cairn_core::{EventStore, ExpectedVersion, NewEvent};
/// use cairn_cqrs::{Group, GroupConfig, Source};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store: Arc<dyn EventStore> = Arc::new(cairn_log::EmbeddedStore::open(dir.path())?);
/// for n in 0..4 {
///     let placed = NewEvent::json("OrderPlaced", &serde_json::json!({"n": n}))?;
///     store.append(&format!("order-{n}"), ExpectedVersion::NoStream, vec![placed]).await?;
/// }
/// let group = Group::start(store, GroupConfig::new("labels", Source::category("order"))).await?;
/// let (a, b) = (group.worker(), group.worker());
/// let mut handled = 0;
/// while handled < 4 {
///     let worker = if handled % 2 == 0 { &a } else { &b };
///     let delivery = worker.next().await.expect("the group runs");
///     assert_eq!(delivery.event().event_type, "OrderPlaced");
///     delivery.ack().await?; // not delivered again, to anyone
///     handled += 1;
/// }
/// group.stop().await?;
/// # Ok(())
/// # }
/// ```
/// A running consumer group. Workers come from [`Group::worker`].
pub struct Group {
    shared: Arc<Shared>,
    feeder: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Group {
    /// Loads the group's stored progress (none for a new group) and starts
    /// following its source from there.
    pub async fn start(
        store: Arc<dyn EventStore>,
        config: GroupConfig,
    ) -> Result<Group, GroupError> {
        config.check()?;
        let (saved, _) = load_saved(store.as_ref(), &config.name).await?;
        let mut state = load(store.as_ref(), &config.name, &saved).await?;
        state.status.name = config.name.clone();
        let from = state.checkpoint.map_or(StartFrom::Start, |c| StartFrom::After(c.0.0));
        let subscription = store.subscribe(config.source.target(), from).await?;
        let (flushed_tx, flushed) = watch::channel(state.changes);
        let shared = Arc::new(Shared {
            config,
            store,
            state: Mutex::new(state),
            work: Notify::new(),
            room: Notify::new(),
            dirty: Notify::new(),
            flushed,
        });
        queue_replays(&shared).await?;
        let feeder = tokio::spawn(feed(shared.clone(), subscription));
        let writer = tokio::spawn(write(shared.clone(), flushed_tx));
        Ok(Group { shared, feeder, writer })
    }

    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// A handle that takes events from the group; clone or call again for more.
    pub fn worker(&self) -> Worker {
        Worker { shared: self.shared.clone() }
    }

    pub fn status(&self) -> GroupStatus {
        let s = self.shared.lock();
        let mut status = s.status.clone();
        status.checkpoint = s.checkpoint.map(|c| c.0);
        status.last_event_time = s.checkpoint.map(|c| c.1);
        status.waiting = s.ready.len() + s.held.values().map(VecDeque::len).sum::<usize>();
        status.retrying = s.delayed.len();
        status.parked = s.parked.len();
        status
    }

    /// How far the group's checkpoint is behind the store (alert over 5 s).
    pub async fn lag(&self) -> Result<Lag, StoreError> {
        let status = self.status();
        let store = self.shared.store.as_ref();
        lag(
            store,
            &self.shared.config.source,
            status.checkpoint,
            status.last_event_time,
            Duration::from_secs(5),
        )
        .await
    }

    /// The parked events not yet replayed with success, oldest first.
    pub fn parked(&self) -> Vec<Parked> {
        self.shared.lock().parked.values().cloned().collect()
    }

    /// Delivers every parked event again (each gets `max_attempts` new tries;
    /// one that fails them all is parked anew). The request is durable: after
    /// a restart, replays not yet settled are delivered again. Returns how many
    /// were queued; events whose stream no longer holds them stay parked.
    pub async fn replay_parked(&self) -> Result<usize, GroupError> {
        let change = {
            let mut s = self.shared.lock();
            let Some(&last) = s.parked.keys().next_back() else { return Ok(0) };
            s.replay_through = s.replay_through.max(last);
            s.changes += 1;
            s.changes
        };
        self.shared.durable(change).await?;
        queue_replays(&self.shared).await
    }

    /// Stops delivering, makes the settled events' state durable and ends.
    /// Events out with workers are delivered again when the group next starts.
    pub async fn stop(self) -> Result<(), GroupError> {
        self.feeder.abort();
        self.shared.lock().stopped = true;
        self.shared.work.notify_waiters();
        self.shared.dirty.notify_one();
        let _ = self.feeder.await;
        self.writer
            .await
            .map_err(|e| GroupError::Invalid(format!("the group's writer panicked: {e}")))?;
        Ok(())
    }
}

/// The newest saved state of a group and the version of its stream (0: none).
async fn load_saved(store: &dyn EventStore, group: &str) -> Result<(Saved, u64), GroupError> {
    match checkpoints(group).load(store).await {
        Ok(Some((saved, e))) => Ok((saved, e.version)),
        Ok(None) => Ok((Saved::default(), 0)),
        Err(StoreError::Corrupt { reason, .. }) => Err(GroupError::Corrupt {
            group: group.to_string(),
            stream: group_stream_name(group),
            reason,
        }),
        Err(e) => Err(e.into()),
    }
}

/// The group's state from its saved progress and its dead-letter stream.
async fn load(store: &dyn EventStore, group: &str, saved: &Saved) -> Result<State, GroupError> {
    let mut state = State {
        parked_through: saved.parked_through,
        parked_done: saved.parked_done.iter().copied().collect(),
        replay_through: saved.replay_through,
        skip: saved.done.iter().copied().map(Position).collect(),
        ..State::default()
    };
    if let Some(p) = saved.checkpoint {
        let time = store
            .read_all(cairn_core::ReadAllOptions::forward().from(Position(p)).limit(1))
            .await?;
        let time = time.first().filter(|e| e.position.0 == p).map_or(Timestamp(0), |e| e.timestamp);
        state.checkpoint = Some((Position(p), time));
    }
    for entry in read_parked(store, group).await? {
        // An entry written just before a crash, ahead of the checkpoint that
        // would have recorded it, is settled all the same.
        if let Some(old) = entry.replaces {
            state.resolve_parked(old);
        } else if saved.checkpoint.is_none_or(|c| entry.position.0 > c) {
            state.skip.insert(entry.position);
        }
        let settled =
            entry.entry <= state.parked_through || state.parked_done.contains(&entry.entry);
        if !settled {
            state.parked.insert(entry.entry, entry);
        }
    }
    Ok(state)
}

/// A group's stored state, read without running it (for operators).
#[derive(Debug, Clone)]
pub struct StoredGroup {
    pub name: String,
    pub checkpoint: Option<(Position, Timestamp)>,
    /// What it follows, as it last recorded.
    pub source: Option<Source>,
    /// Parked events not yet replayed with success.
    pub parked: Vec<Parked>,
    /// How many of those a replay was asked for.
    pub replay_pending: usize,
}

/// The stored state of every group in the store, by name.
pub async fn stored_groups(store: &dyn EventStore) -> Result<Vec<StoredGroup>, GroupError> {
    let mut out = Vec::new();
    for info in store.list_streams(GROUP_STREAM_PREFIX, usize::MAX).await? {
        let Some(name) = info.stream.strip_prefix(GROUP_STREAM_PREFIX) else { continue };
        let (saved, _) = load_saved(store, name).await?;
        let state = load(store, name, &saved).await?;
        out.push(StoredGroup {
            name: name.to_string(),
            checkpoint: state.checkpoint,
            source: saved.source,
            replay_pending: state.parked.range(..=state.replay_through).count(),
            parked: state.parked.into_values().collect(),
        });
    }
    Ok(out)
}

/// Asks that a group replay its parked events when it next starts (or now,
/// if it is running in this process, use [`Group::replay_parked`]). Returns
/// how many. Fails with a conflict if the group moved on meanwhile.
pub async fn request_replay(store: &dyn EventStore, group: &str) -> Result<usize, GroupError> {
    let (mut saved, version) = load_saved(store, group).await?;
    let state = load(store, group, &saved).await?;
    let Some(&last) = state.parked.keys().next_back() else { return Ok(0) };
    saved.replay_through = saved.replay_through.max(last);
    let expected =
        if version == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(version) };
    checkpoints(group).save_expecting(store, &saved, expected).await?;
    Ok(state.parked.len())
}

/// Every entry of a group's dead-letter stream, oldest first.
pub async fn read_parked(store: &dyn EventStore, group: &str) -> Result<Vec<Parked>, GroupError> {
    let stream = parked_stream_name(group);
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = store
            .read_stream_or_empty(
                &stream,
                ReadStreamOptions::forward().from_version(from).limit(1000),
            )
            .await?;
        let full = page.len() == 1000;
        for e in page {
            let mut parked: Parked = e.json().map_err(|err| GroupError::Corrupt {
                group: group.to_string(),
                stream: stream.clone(),
                reason: format!("entry {}: {err}", e.version),
            })?;
            parked.entry = e.version;
            parked.parked_at = e.timestamp;
            from = e.version + 1;
            out.push(parked);
        }
        if !full {
            return Ok(out);
        }
    }
}

/// Queues the parked entries a replay asked for that are not yet queued.
async fn queue_replays(shared: &Shared) -> Result<usize, GroupError> {
    let wanted: Vec<Parked> = {
        let s = shared.lock();
        s.parked
            .range(..=s.replay_through)
            .filter(|(k, _)| !s.replaying.contains(k))
            .map(|(_, p)| p.clone())
            .collect()
    };
    let mut queued = 0;
    for parked in wanted {
        let options = ReadStreamOptions::forward().from_version(parked.version).limit(1);
        let event = match shared.store.read_stream(&parked.stream, options).await {
            Ok(events) => events.into_iter().next().filter(|e| e.id == parked.event_id),
            Err(StoreError::StreamNotFound { .. } | StoreError::StreamDeleted { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let Some(event) = event else { continue };
        let mut s = shared.lock();
        if s.replaying.insert(parked.entry) {
            s.ready.push_back(Item { event, attempts: 0, key: Key::Replay(parked.entry) });
            queued += 1;
        }
    }
    shared.work.notify_waiters();
    Ok(queued)
}

/// Takes events from the subscription while there is room, and moves
/// retries whose backoff is over back to the workers.
async fn feed(shared: Arc<Shared>, mut subscription: cairn_core::Subscription) {
    let pin = shared.config.pin_streams;
    let far = Duration::from_secs(3600);
    loop {
        let room = shared.room.notified();
        tokio::pin!(room);
        room.as_mut().enable();
        let (has_room, next_due, moved) = {
            let mut s = shared.lock();
            let now = Instant::now();
            let mut moved = false;
            let mut i = 0;
            while i < s.delayed.len() {
                if s.delayed[i].0 <= now {
                    let (_, item) = s.delayed.swap_remove(i);
                    s.ready.push_back(item);
                    moved = true;
                } else {
                    i += 1;
                }
            }
            let next_due = s.delayed.iter().map(|d| d.0).min().unwrap_or(now + far);
            (s.received.len() < shared.config.max_in_flight, next_due, moved)
        };
        if moved {
            shared.work.notify_waiters();
        }
        tokio::select! {
            next = subscription.next(), if has_room => match next {
                Some(Ok(event)) => {
                    shared.lock().receive(event, &shared.config.source, pin);
                    shared.work.notify_waiters();
                }
                Some(Err(e)) => {
                    shared.set_error(Some(format!("reading the source: {e}")));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let after = {
                        let s = shared.lock();
                        s.received.back().map(|r| r.0).or(s.checkpoint.map(|c| c.0))
                    };
                    let from = after.map_or(StartFrom::Start, |p| StartFrom::After(p.0));
                    if let Ok(fresh) = shared.store.subscribe(shared.config.source.target(), from).await {
                        subscription = fresh;
                        shared.set_error(None);
                    }
                }
                None => return,
            },
            _ = tokio::time::sleep_until(next_due) => {}
            _ = room => {}
        }
    }
}

/// Writes the group's state whenever it changed; after a stop, once more and ends.
async fn write(shared: Arc<Shared>, flushed: watch::Sender<u64>) {
    let checkpoints = checkpoints(&shared.config.name);
    loop {
        let dirty = shared.dirty.notified();
        tokio::pin!(dirty);
        dirty.as_mut().enable();
        let (change, saved, stopped) = {
            let s = shared.lock();
            (
                s.changes,
                Saved { source: Some(shared.config.source.clone()), ..s.saved() },
                s.stopped,
            )
        };
        if change > *flushed.borrow() {
            match checkpoints.save(shared.store.as_ref(), &saved).await {
                Ok(_) => {
                    flushed.send_replace(change);
                    shared.set_error(None);
                }
                Err(e) => {
                    shared.set_error(Some(format!("writing {}: {e}", checkpoints.stream())));
                    if stopped {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            continue;
        }
        if stopped {
            return;
        }
        dirty.await;
    }
}

/// Takes events from a group.
#[derive(Clone)]
pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    /// The next event for this worker; `None` once the group is stopped.
    pub async fn next(&self) -> Option<Delivery> {
        loop {
            let work = self.shared.work.notified();
            tokio::pin!(work);
            work.as_mut().enable();
            {
                let mut s = self.shared.lock();
                if s.stopped {
                    return None;
                }
                if let Some(mut item) = s.ready.pop_front() {
                    item.attempts += 1;
                    s.status.in_flight += 1;
                    s.status.delivered += 1;
                    if !s.ready.is_empty() {
                        // Another worker may be waiting for the rest.
                        self.shared.work.notify_one();
                    }
                    return Some(Delivery { item: Some(item), shared: self.shared.clone() });
                }
            }
            work.await;
        }
    }

    /// Handles events until the group stops: `Ok` acks, `Err` nacks with the error.
    pub async fn run<F, Fut, E>(&self, mut handler: F) -> Result<(), GroupError>
    where
        F: FnMut(RecordedEvent) -> Fut,
        Fut: Future<Output = Result<(), E>>,
        E: Display,
    {
        while let Some(delivery) = self.next().await {
            match handler(delivery.event().clone()).await {
                Ok(()) => delivery.ack().await?,
                Err(e) => {
                    delivery.nack(e).await?;
                }
            }
        }
        Ok(())
    }
}

/// What became of a nacked event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nacked {
    /// It will be delivered again after this wait.
    Retry { after: Duration },
    /// It used its last attempt and is now this entry of the dead-letter stream.
    Parked { entry: u64 },
}

/// One event delivered to one worker. Ack or nack it; dropping it counts as
/// a nack.
pub struct Delivery {
    item: Option<Item>,
    shared: Arc<Shared>,
}

impl Delivery {
    pub fn event(&self) -> &RecordedEvent {
        &self.item.as_ref().expect("a delivery holds its event until settled").event
    }

    /// Which delivery of this event this is (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.item.as_ref().map_or(0, |i| i.attempts)
    }

    /// Whether this is a replay of a parked event.
    pub fn is_replay(&self) -> bool {
        self.item.as_ref().is_some_and(|i| matches!(i.key, Key::Replay(_)))
    }

    /// The event is handled. Returns once that is durable: the group will not
    /// deliver it again, even after a crash.
    pub async fn ack(mut self) -> Result<(), GroupError> {
        let item = self.item.take().expect("a delivery is settled once");
        let change = {
            let mut s = self.shared.lock();
            s.status.in_flight -= 1;
            s.status.acked += 1;
            s.settle(item.key, &item.event.stream, self.shared.config.pin_streams);
            s.changes
        };
        self.shared.room.notify_one();
        self.shared.work.notify_waiters();
        self.shared.durable(change).await
    }

    /// The event could not be handled: it is delivered again after a backoff,
    /// or parked with `error` if this was its last attempt.
    pub async fn nack(mut self, error: impl Display) -> Result<Nacked, GroupError> {
        let item = self.item.take().expect("a delivery is settled once");
        nack(self.shared.clone(), item, error.to_string()).await
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        let Some(item) = self.item.take() else { return };
        let shared = self.shared.clone();
        let error = "the worker dropped the delivery without acking it".to_string();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = nack(shared, item, error).await;
                });
            }
            Err(_) => {
                let mut s = shared.lock();
                s.status.in_flight -= 1;
                s.ready.push_front(item);
            }
        }
    }
}

async fn nack(shared: Arc<Shared>, item: Item, error: String) -> Result<Nacked, GroupError> {
    let config = &shared.config;
    if item.attempts < config.max_attempts {
        let after = config.backoff_after(item.attempts);
        {
            let mut s = shared.lock();
            s.status.in_flight -= 1;
            s.status.nacked += 1;
            s.delayed.push((Instant::now() + after, item));
        }
        shared.room.notify_one();
        return Ok(Nacked::Retry { after });
    }
    let e = &item.event;
    let parked = Parked {
        entry: 0,
        stream: e.stream.clone(),
        version: e.version,
        position: e.position,
        event_id: e.id,
        event_type: e.event_type.clone(),
        error,
        attempts: item.attempts,
        replaces: match item.key {
            Key::Replay(entry) => Some(entry),
            Key::Live(_) => None,
        },
        parked_at: Timestamp::now(),
    };
    let record = NewEvent::json(PARKED_TYPE, &parked).expect("a parked entry serialises");
    let written = shared
        .store
        .append(&parked_stream_name(&config.name), ExpectedVersion::Any, vec![record])
        .await;
    let written = match written {
        Ok(written) => written,
        Err(e) => {
            // Not parked: keep it, to be tried again.
            let mut s = shared.lock();
            s.status.in_flight -= 1;
            s.delayed.push((Instant::now() + config.max_backoff, item));
            drop(s);
            shared.room.notify_one();
            return Err(e.into());
        }
    };
    let entry = written.next_version;
    let change = {
        let mut s = shared.lock();
        s.status.in_flight -= 1;
        s.status.nacked += 1;
        s.settle(item.key, &item.event.stream, config.pin_streams);
        s.parked.insert(entry, Parked { entry, ..parked });
        s.changes
    };
    shared.room.notify_one();
    shared.work.notify_waiters();
    shared.durable(change).await?;
    Ok(Nacked::Parked { entry })
}
