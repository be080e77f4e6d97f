//! Durable timers: "cancel this order if it is still unpaid in 15 minutes"
//! must survive a restart, so a [`Scheduler`] keeps its timers as events in
//! `$timer-<name>` and arms them again from there when it starts.
//!
//! - Scheduling, cancelling, a failed attempt and the firing are each an
//!   event ([`TimerEvent`]). Their ids are derived from the timer id, so a
//!   retried write is recognised by the store; a timer id is used once (the
//!   first schedule wins, even after the timer fired or was cancelled).
//! - An action runs first, then `TimerFired` is written: a process that dies
//!   in between runs the action again on restart. An [`TimerAction::Append`]
//!   uses an event id derived from the timer id, so the store keeps it once;
//!   a [`TimerAction::Callback`] runs at least once and gets the timer id as
//!   its idempotency key. A failed action is retried with backoff.
//! - Recovery stays bounded: every [`DEFAULT_SNAPSHOT_EVERY`] events the
//!   pending set is written as a `TimersPending` snapshot, and a starting
//!   scheduler reads the stream backward only as far as the newest one.
//!
//! One scheduler runs per name (it assumes it is the stream's only writer).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use cairn_core::{
    EventStore, ExpectedVersion, Metadata, NewEvent, Position, ReadStreamOptions, RecordedEvent,
    StoreError, TIMER_STREAM_PREFIX, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Mutex, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use uuid::Uuid;

use crate::history::derived_id;

/// Timer events between two `TimersPending` snapshots.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 1000;

/// What a timer does when it is due.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TimerAction {
    /// Appends one JSON event to `stream`; its id is derived from the timer,
    /// so the store holds it once however often the timer fires.
    Append {
        stream: String,
        event_type: String,
        data: Value,
        #[serde(default, skip_serializing_if = "Metadata::is_empty")]
        metadata: Metadata,
    },
    /// Calls the callback registered for `kind` ([`SchedulerBuilder::on`]).
    Callback {
        kind: String,
        #[serde(default)]
        payload: Value,
    },
}

impl TimerAction {
    pub fn append(stream: impl Into<String>, event_type: impl Into<String>, data: Value) -> Self {
        TimerAction::Append {
            stream: stream.into(),
            event_type: event_type.into(),
            data,
            metadata: Metadata::default(),
        }
    }

    pub fn callback(kind: impl Into<String>, payload: Value) -> Self {
        TimerAction::Callback { kind: kind.into(), payload }
    }

    /// Metadata for the appended event (ignored by callbacks).
    pub fn with_metadata(mut self, m: Metadata) -> Self {
        if let TimerAction::Append { metadata, .. } = &mut self {
            *metadata = m;
        }
        self
    }
}

/// A pending timer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    pub id: String,
    /// When it fires next: when it is due, or after a failure when it is retried.
    pub due: Timestamp,
    pub action: TimerAction,
    /// Failed attempts so far.
    #[serde(default)]
    pub failures: u32,
}

/// When a timer is due: a time, or a delay from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    At(SystemTime),
    In(Duration),
}

impl From<SystemTime> for Due {
    fn from(t: SystemTime) -> Self {
        Due::At(t)
    }
}

impl From<Duration> for Due {
    fn from(d: Duration) -> Self {
        Due::In(d)
    }
}

impl Due {
    fn timestamp(self) -> Timestamp {
        match self {
            Due::At(t) => Timestamp::from_system_time(t),
            Due::In(d) => Timestamp::from_system_time(SystemTime::now() + d),
        }
    }
}

/// What a callback is given.
#[derive(Debug, Clone)]
pub struct FiredTimer {
    /// The timer id: the callback's idempotency key (it may run more than once).
    pub id: String,
    pub kind: String,
    pub payload: Value,
    pub due: SystemTime,
    /// 1 for the first attempt.
    pub attempt: u32,
}

/// One event of `$timer-<name>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum TimerEvent {
    TimerScheduled {
        id: String,
        due: Timestamp,
        action: TimerAction,
    },
    TimerCancelled {
        id: String,
    },
    /// One failed attempt; the timer fires again at `retry_at`.
    TimerFailed {
        id: String,
        attempt: u32,
        error: String,
        retry_at: Timestamp,
    },
    TimerFired {
        id: String,
        attempt: u32,
    },
    /// Every pending timer at this point: recovery starts here.
    TimersPending {
        timers: Vec<Timer>,
    },
}

impl TimerEvent {
    pub fn type_name(&self) -> &'static str {
        match self {
            TimerEvent::TimerScheduled { .. } => "TimerScheduled",
            TimerEvent::TimerCancelled { .. } => "TimerCancelled",
            TimerEvent::TimerFailed { .. } => "TimerFailed",
            TimerEvent::TimerFired { .. } => "TimerFired",
            TimerEvent::TimersPending { .. } => "TimersPending",
        }
    }

    /// Reads one stored event back; `None` for a type this version does not know.
    pub fn from_recorded(event: &RecordedEvent) -> Option<TimerEvent> {
        let data: Value = event.json().ok()?;
        serde_json::from_value(serde_json::json!({ "type": event.event_type, "data": data })).ok()
    }

    fn to_new_event(&self, stream: &str) -> NewEvent {
        let body = serde_json::to_value(self).expect("timer events serialise");
        let data = body.get("data").cloned().unwrap_or(Value::Null);
        let id = match self {
            TimerEvent::TimerScheduled { id, .. } => {
                derived_id(&format!("{stream}/{id}/scheduled"))
            }
            TimerEvent::TimerCancelled { id } => derived_id(&format!("{stream}/{id}/cancelled")),
            TimerEvent::TimerFailed { id, attempt, .. } => {
                derived_id(&format!("{stream}/{id}/failed/{attempt}"))
            }
            TimerEvent::TimerFired { id, .. } => derived_id(&format!("{stream}/{id}/fired")),
            TimerEvent::TimersPending { .. } => Uuid::now_v7(),
        };
        NewEvent::json_bytes(self.type_name(), data.to_string()).with_id(id)
    }
}

/// `$timer-<name>`.
pub fn timer_stream(name: &str) -> String {
    format!("{TIMER_STREAM_PREFIX}{name}")
}

#[derive(Debug, thiserror::Error)]
pub enum TimerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid scheduler: {0}")]
    Invalid(String),
    #[error("no callback is registered for timer kind {0:?}")]
    UnknownKind(String),
    #[error("the scheduler has stopped")]
    Stopped,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Callback = Arc<dyn Fn(FiredTimer) -> BoxFuture<Result<(), String>> + Send + Sync>;

/// Builds a [`Scheduler`]: register the callbacks first, since timers that
/// are already due fire as soon as it starts.
pub struct SchedulerBuilder {
    store: Arc<dyn EventStore>,
    name: String,
    callbacks: HashMap<String, Callback>,
    backoff: (Duration, Duration),
    timeout: Duration,
    snapshot_every: u64,
    max_firing: usize,
}

impl SchedulerBuilder {
    /// The callback for timers of `kind`. Return an error to have it retried.
    pub fn on<F, Fut, E>(mut self, kind: impl Into<String>, callback: F) -> Self
    where
        F: Fn(FiredTimer) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: fmt::Display,
    {
        let callback = Arc::new(callback);
        self.callbacks.insert(
            kind.into(),
            Arc::new(move |timer| {
                let fut = callback(timer);
                Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
            }),
        );
        self
    }

    /// Wait after the first failed attempt (default 500 ms), doubled after each up to `max` (default 60 s).
    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.backoff = (first, max);
        self
    }

    /// How long one attempt may take before it counts as failed (default 30 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Timer events between snapshots of the pending set (default 1,000).
    pub fn snapshot_every(mut self, events: u64) -> Self {
        self.snapshot_every = events.max(1);
        self
    }

    /// Timers whose actions run at once (default 64).
    pub fn max_firing(mut self, n: usize) -> Self {
        self.max_firing = n.max(1);
        self
    }

    /// Reads the pending timers from the stream (from its newest snapshot
    /// on), arms them and starts firing.
    pub async fn start(self) -> Result<Scheduler, TimerError> {
        let stream = timer_stream(&self.name);
        cairn_core::validate_stream_name(&stream)
            .map_err(|e| TimerError::Invalid(e.to_string()))?;
        let (state, recovery) = recover(self.store.as_ref(), &stream).await?;
        let inner = Arc::new(Inner {
            store: self.store,
            stream,
            callbacks: self.callbacks,
            backoff: self.backoff,
            timeout: self.timeout,
            snapshot_every: self.snapshot_every,
            state: Mutex::new(state),
            wake: Notify::new(),
            permits: Arc::new(Semaphore::new(self.max_firing)),
            stopping: AtomicBool::new(false),
            firings: std::sync::Mutex::new(JoinSet::new()),
        });
        let main = tokio::spawn(run(inner.clone()));
        Ok(Scheduler {
            life: Arc::new(Life { inner: inner.clone(), main: std::sync::Mutex::new(Some(main)) }),
            inner,
            recovery,
        })
    }
}

/// What a scheduler found when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub pending: usize,
    /// Events folded after the newest snapshot (or from the start without one).
    pub events_read: usize,
    pub from_snapshot: bool,
}

/// Fires durable timers. Clone it freely; the last clone dropped stops it.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
    life: Arc<Life>,
    recovery: Recovery,
}

struct Inner {
    store: Arc<dyn EventStore>,
    stream: String,
    callbacks: HashMap<String, Callback>,
    backoff: (Duration, Duration),
    timeout: Duration,
    snapshot_every: u64,
    /// Held across the appends to the stream: writes and state move together.
    state: Mutex<State>,
    wake: Notify,
    permits: Arc<Semaphore>,
    stopping: AtomicBool,
    firings: std::sync::Mutex<JoinSet<()>>,
}

/// Stops the firing loop and the running actions when the last handle goes.
struct Life {
    inner: Arc<Inner>,
    main: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Life {
    /// Ends the firing loop; `abort` also ends the running actions.
    fn stop(&self, abort: bool) -> Option<JoinHandle<()>> {
        self.inner.stopping.store(true, Ordering::Release);
        if abort {
            self.inner.firings.lock().unwrap().abort_all();
        }
        let main = self.main.lock().unwrap().take();
        main.inspect(|m| m.abort())
    }
}

impl Drop for Life {
    fn drop(&mut self) {
        self.stop(true);
    }
}

#[derive(Default)]
struct State {
    pending: HashMap<String, Timer>,
    /// Pending timers not firing right now, by when they fire.
    queue: BTreeSet<(Timestamp, String)>,
    /// The newest event of the stream: an append that returns a position
    /// not after it was a retry of an earlier write.
    last: Position,
    since_snapshot: u64,
}

impl State {
    fn apply(&mut self, event: TimerEvent) {
        match event {
            TimerEvent::TimerScheduled { id, due, action } => {
                self.queue.insert((due, id.clone()));
                self.pending.insert(id.clone(), Timer { id, due, action, failures: 0 });
            }
            TimerEvent::TimerCancelled { id } | TimerEvent::TimerFired { id, .. } => {
                if let Some(t) = self.pending.remove(&id) {
                    self.queue.remove(&(t.due, id));
                }
            }
            TimerEvent::TimerFailed { id, attempt, retry_at, .. } => {
                self.requeue(&id, retry_at, Some(attempt))
            }
            TimerEvent::TimersPending { timers } => {
                self.queue = timers.iter().map(|t| (t.due, t.id.clone())).collect();
                self.pending = timers.into_iter().map(|t| (t.id.clone(), t)).collect();
            }
        }
    }

    fn requeue(&mut self, id: &str, at: Timestamp, failures: Option<u32>) {
        if let Some(t) = self.pending.get_mut(id) {
            self.queue.remove(&(t.due, id.to_string()));
            t.due = at;
            t.failures = failures.unwrap_or(t.failures);
            self.queue.insert((at, id.to_string()));
        }
    }
}

/// Reads back from the newest event to the newest snapshot, then folds forward.
async fn recover(store: &dyn EventStore, stream: &str) -> Result<(State, Recovery), StoreError> {
    const PAGE: usize = 256;
    let mut tail = Vec::new();
    let mut snapshot = None;
    let mut last = Position::START;
    let mut from = u64::MAX;
    'pages: loop {
        let page = store
            .read_stream_or_empty(
                stream,
                ReadStreamOptions::backward().from_version(from).limit(PAGE),
            )
            .await?;
        for event in &page {
            last = last.max(event.position);
            match TimerEvent::from_recorded(event) {
                Some(e @ TimerEvent::TimersPending { .. }) => {
                    snapshot = Some(e);
                    break 'pages;
                }
                Some(e) => tail.push(e),
                None => {}
            }
        }
        match page.last() {
            Some(oldest) if oldest.version > 1 && page.len() == PAGE => from = oldest.version - 1,
            _ => break,
        }
    }
    let recovery_read = tail.len();
    let from_snapshot = snapshot.is_some();
    let mut state = State { last, since_snapshot: recovery_read as u64, ..State::default() };
    for event in snapshot.into_iter().chain(tail.into_iter().rev()) {
        state.apply(event);
    }
    let recovery =
        Recovery { pending: state.pending.len(), events_read: recovery_read, from_snapshot };
    Ok((state, recovery))
}

impl Scheduler {
    /// A scheduler named `name`, its timers in `$timer-<name>`.
    pub fn builder(store: Arc<dyn EventStore>, name: impl Into<String>) -> SchedulerBuilder {
        SchedulerBuilder {
            store,
            name: name.into(),
            callbacks: HashMap::new(),
            backoff: (Duration::from_millis(500), Duration::from_secs(60)),
            timeout: Duration::from_secs(30),
            snapshot_every: DEFAULT_SNAPSHOT_EVERY,
            max_firing: 64,
        }
    }

    /// Schedules timer `id`. When it returns `Ok(true)` the timer is in the
    /// store and will fire even if this process dies; `Ok(false)`: a timer
    /// with this id exists or existed (pending, fired or cancelled), and
    /// nothing changed.
    pub async fn schedule(
        &self,
        id: &str,
        due: impl Into<Due>,
        action: TimerAction,
    ) -> Result<bool, TimerError> {
        if let TimerAction::Callback { kind, .. } = &action
            && !self.inner.callbacks.contains_key(kind)
        {
            return Err(TimerError::UnknownKind(kind.clone()));
        }
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(TimerError::Stopped);
        }
        let mut state = self.inner.state.lock().await;
        if state.pending.contains_key(id) {
            return Ok(false);
        }
        let due = due.into().timestamp();
        let new = self
            .inner
            .write(&mut state, TimerEvent::TimerScheduled { id: id.to_string(), due, action })
            .await?;
        drop(state);
        self.inner.wake.notify_one();
        Ok(new)
    }

    /// Cancels a pending timer: `Ok(true)` if it will not fire. `Ok(false)`
    /// if there is no such pending timer, or it is firing right now.
    pub async fn cancel(&self, id: &str) -> Result<bool, TimerError> {
        let mut state = self.inner.state.lock().await;
        let Some(timer) = state.pending.get(id) else { return Ok(false) };
        if !state.queue.contains(&(timer.due, id.to_string())) {
            return Ok(false);
        }
        self.inner.write(&mut state, TimerEvent::TimerCancelled { id: id.to_string() }).await?;
        Ok(true)
    }

    /// The pending timers, soonest first.
    pub async fn pending(&self) -> Vec<Timer> {
        let state = self.inner.state.lock().await;
        let mut timers: Vec<Timer> = state.pending.values().cloned().collect();
        timers.sort_by(|a, b| (a.due, &a.id).cmp(&(b.due, &b.id)));
        timers
    }

    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    pub fn stream(&self) -> &str {
        &self.inner.stream
    }

    /// Stops firing now; running actions are aborted. Timers stay pending in
    /// the store: the next scheduler of this name fires them.
    pub fn stop(&self) {
        self.life.stop(true);
    }

    /// Stops taking due timers and lets the running actions finish (each
    /// within the action timeout) so their outcome is recorded: a timer whose
    /// action completed is not fired again by the next scheduler.
    pub async fn shutdown(&self) {
        if let Some(main) = self.life.stop(false) {
            let _ = main.await;
        }
        let mut firings = std::mem::take(&mut *self.inner.firings.lock().unwrap());
        while firings.join_next().await.is_some() {}
    }
}

impl Inner {
    /// The wait after failed attempt `attempt` (1-based), without jitter
    /// (it is recomputed from the timer's history).
    fn delay(&self, attempt: u32) -> Duration {
        cairn_core::Backoff::new(self.backoff.0, self.backoff.1).base(attempt.saturating_sub(1))
    }

    /// Appends one event and applies it; false if the store had it already.
    /// Writes the snapshot when it is time.
    async fn write(&self, state: &mut State, event: TimerEvent) -> Result<bool, StoreError> {
        let result = match self
            .store
            .append(&self.stream, ExpectedVersion::Any, vec![event.to_new_event(&self.stream)])
            .await
        {
            Ok(result) => result,
            // The event's id comes from the timer's: this step of this timer
            // was written before (scheduled again with another due time, say),
            // and the first one stands.
            Err(StoreError::IdempotencyConflict { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if result.position <= state.last {
            return Ok(false);
        }
        state.last = result.position;
        state.apply(event);
        state.since_snapshot += 1;
        if state.since_snapshot >= self.snapshot_every {
            let snapshot =
                TimerEvent::TimersPending { timers: state.pending.values().cloned().collect() };
            // A snapshot that fails (too large, store busy) only makes the next recovery longer.
            if let Ok(r) = self
                .store
                .append(
                    &self.stream,
                    ExpectedVersion::Any,
                    vec![snapshot.to_new_event(&self.stream)],
                )
                .await
            {
                state.last = r.position;
                state.since_snapshot = 0;
            }
        }
        Ok(true)
    }

    async fn act(&self, timer: &Timer, attempt: u32) -> Result<(), String> {
        match &timer.action {
            TimerAction::Append { stream, event_type, data, metadata } => {
                let event = NewEvent::json(event_type.as_str(), data)
                    .map_err(|e| e.to_string())?
                    .with_id(derived_id(&format!("{}/{}", self.stream, timer.id)))
                    .with_metadata(metadata.clone());
                self.store
                    .append(stream, ExpectedVersion::Any, vec![event])
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            TimerAction::Callback { kind, payload } => {
                let callback = self
                    .callbacks
                    .get(kind)
                    .ok_or_else(|| format!("no callback is registered for timer kind {kind:?}"))?;
                let fired = FiredTimer {
                    id: timer.id.clone(),
                    kind: kind.clone(),
                    payload: payload.clone(),
                    due: timer.due.to_system_time(),
                    attempt,
                };
                callback(fired).await
            }
        }
    }
}

/// The firing loop: takes the soonest timer when it is due and fires it in a
/// task of its own, so a slow action does not hold the others back.
async fn run(inner: Arc<Inner>) {
    loop {
        let permit = inner.permits.clone().acquire_owned().await.expect("never closed");
        let now = Timestamp::now();
        let next = {
            let mut state = inner.state.lock().await;
            match state.queue.first().cloned() {
                Some((due, id)) if due <= now => {
                    state.queue.remove(&(due, id.clone()));
                    Ok(state.pending[&id].clone())
                }
                other => Err(other.map(|(due, _)| due)),
            }
        };
        match next {
            Ok(timer) => {
                let mut firings = inner.firings.lock().unwrap();
                if inner.stopping.load(Ordering::Acquire) {
                    return;
                }
                while firings.try_join_next().is_some() {}
                firings.spawn(fire(inner.clone(), timer, permit));
            }
            Err(due) => {
                drop(permit);
                // Woken by a new schedule or a retry; wake at least once a
                // minute in case the wall clock jumped.
                let wait = due.map_or(Duration::from_secs(60), |d| {
                    Duration::from_micros((d.0 - now.0).max(0) as u64).min(Duration::from_secs(60))
                });
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = inner.wake.notified() => {}
                }
            }
        }
    }
}

async fn fire(inner: Arc<Inner>, timer: Timer, _permit: tokio::sync::OwnedSemaphorePermit) {
    let attempt = timer.failures + 1;
    let outcome = match tokio::time::timeout(inner.timeout, inner.act(&timer, attempt)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("timed out after {} ms", inner.timeout.as_millis())),
    };
    let retry_at = Timestamp::from_system_time(SystemTime::now() + inner.delay(attempt));
    let event = match outcome {
        Ok(()) => TimerEvent::TimerFired { id: timer.id.clone(), attempt },
        Err(error) => TimerEvent::TimerFailed { id: timer.id.clone(), attempt, error, retry_at },
    };
    let mut state = inner.state.lock().await;
    if inner.write(&mut state, event).await.is_err() {
        // Not recorded: fire again later (the action is idempotent or at-least-once).
        state.requeue(&timer.id, retry_at, None);
    }
    drop(state);
    inner.wake.notify_one();
}
