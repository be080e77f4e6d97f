//! Process managers: choreography. A [`Process`] follows events of several
//! streams, groups them by correlation id into instances, and reacts to each
//! with [`Effect`]s: commands to send, deadlines to set, the end.
//!
//! - An instance's state is event-sourced in `$saga-<process>-<correlation>`:
//!   each reaction appends one event holding the state after it and the
//!   position of the event it handled, so loading reads back only to the
//!   newest reaction, and an event delivered again is recognised and skipped.
//! - Effects run *before* the reaction is recorded (appended at the exact
//!   version it was decided from). A crash in between delivers the event
//!   again, and the same commands go out again with the same idempotency
//!   keys: commands are sent at least once, and take effect once where the
//!   handler honours the key.
//! - Deadlines are durable timers in `$timer-<process>-deadlines`, with
//!   ids derived from the instance, its version and the deadline's name, so
//!   a repeated reaction does not set a second one. A deadline reaches
//!   `react` once (again only if that reaction parked): its firing is
//!   recorded like an event.
//! - A command the handler keeps refusing (or that hangs past its timeout)
//!   for [`ProcessManagerBuilder::command_attempts`] attempts **parks** its
//!   instance (`ProcessParked`), and the manager then goes on with the
//!   others (one message at a time: they wait while the attempts last).
//!   A parked instance's later events are not handled, and its deadlines
//!   wait (the scheduler tries them again, so after a resume they come after
//!   the replayed events); [`resume_process`] (`cairn sagas resume`) appends
//!   `ProcessResumed`, and the manager then runs the parked message again
//!   and replays the instance's events it skipped, from the store, in order
//!   (one resumed instance per second). The parked instances are listed in
//!   `$saga-<process>-$parked`, so a restarted manager still watches them;
//!   the instance's own stream is the authority (a resumed instance is
//!   replayed even if that list lost it).
//! - The subscription's position is checkpointed now and then in
//!   `$saga-<process>-$checkpoint` (correlation ids starting with `$` are
//!   refused, so no instance has that name; `$saga-<runner>`, a saga
//!   runner's checkpoint, has no second `-`). A process must not share its
//!   name with a saga type.
//!
//! One manager runs per process name.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use cairn_core::{
    CheckpointStream, Direction, EventStore, ExpectedVersion, Metadata, NewEvent, Position, Query,
    ReadAllOptions, ReadStreamOptions, RecordedEvent, StartFrom, StoreError, SubscriptionTarget,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::history::{derived_id, saga_stream};
use crate::timer::{FiredTimer, Scheduler, TimerAction, TimerError};

/// What a process reacts to.
#[derive(Debug, Clone)]
pub enum Message {
    Event(RecordedEvent),
    /// A deadline set by an earlier [`Effect::Deadline`] came due.
    Deadline {
        name: String,
    },
}

/// What a reaction asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Sent to the command handler with an idempotency key.
    Command { name: String, payload: Value },
    /// `react` gets [`Message::Deadline`] with this name after `after`,
    /// unless the instance ends or cancels it first.
    Deadline { name: String, after: Duration },
    /// Cancels the instance's pending deadlines of this name.
    CancelDeadline { name: String },
    /// The instance is over: its later events are ignored and its deadlines cancelled.
    End,
}

impl Effect {
    pub fn command(name: impl Into<String>, payload: impl Serialize) -> Effect {
        Effect::Command {
            name: name.into(),
            payload: serde_json::to_value(payload).expect("command payloads serialise"),
        }
    }
    pub fn deadline(name: impl Into<String>, after: Duration) -> Effect {
        Effect::Deadline { name: name.into(), after }
    }
    pub fn cancel_deadline(name: impl Into<String>) -> Effect {
        Effect::CancelDeadline { name: name.into() }
    }
}

/// A process: which events it follows, how they are grouped, how it reacts.
/// `react` must be deterministic (same state and message, same effects):
/// after a crash it runs again and its commands keep their keys.
pub trait Process: Send + Sync + 'static {
    type State: Default + Serialize + DeserializeOwned + Clone + Send + Sync;

    /// Its name: no `-` (as a stream category), not shared with a saga type.
    fn name(&self) -> &str;

    /// The events it follows (types, categories, tags; never `$` streams).
    fn query(&self) -> Query;

    /// The instance an event belongs to; `None` ignores the event. The default
    /// is the event's correlation id.
    fn correlate(&self, event: &RecordedEvent) -> Option<String> {
        event.metadata.correlation_id.map(|id| id.to_string())
    }

    fn react(&self, state: &mut Self::State, message: Message) -> Vec<Effect>;
}

/// A command for the handler.
#[derive(Debug, Clone)]
pub struct Command {
    pub name: String,
    pub payload: Value,
    /// The same each time this reaction runs again: pass it on as the
    /// command's idempotency key.
    pub key: String,
    pub process: String,
    pub correlation: String,
}

impl Command {
    /// An event id derived from the key, for a handler that appends.
    pub fn event_id(&self) -> Uuid {
        derived_id(&self.key)
    }

    /// The instance's correlation id (when it is a uuid), caused by this command.
    pub fn metadata(&self) -> Metadata {
        Metadata {
            correlation_id: self.correlation.parse().ok(),
            causation_id: Some(self.event_id()),
            ..Metadata::default()
        }
    }
}

/// A deadline an instance waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDeadline {
    pub timer: String,
    pub name: String,
}

/// One process instance, as its stream says.
#[derive(Debug, Clone)]
pub struct Instance<S> {
    pub correlation: String,
    pub state: S,
    /// The version of its stream (0: nothing recorded yet).
    pub version: u64,
    /// The newest event handled.
    pub position: Position,
    pub deadlines: Vec<PendingDeadline>,
    pub ended: bool,
    /// Why it waits for `resume`, when it does.
    pub parked: Option<Parked>,
    /// Resumed after this park, and the parked message not yet handled again.
    pub resumed: Option<Parked>,
}

/// `ProcessParked`: a command of this instance's reaction kept failing, so
/// the message it handled waits, with the instance's later ones, for
/// [`resume_process`]. The instance's state is its last [`Reaction`]'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parked {
    /// What it was handling, as in [`Reaction::handled`].
    pub handled: String,
    /// The deadline's timer, when it was handling a deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<String>,
    /// The event's position, when it was handling an event: the replay
    /// starts there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<Position>,
    pub command: String,
    pub key: String,
    pub attempts: u32,
    pub error: String,
}

impl Parked {
    /// Reads a `ProcessParked` event back; `None` for any other.
    pub fn from_recorded(event: &RecordedEvent) -> Option<Parked> {
        (event.event_type == PARKED).then(|| event.json().ok()).flatten()
    }
}

/// The event recorded after each reaction (`ProcessReacted`, or
/// `ProcessEnded` for the one that ended the instance), as a reader of an
/// instance's history sees it (`cairn sagas show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reaction {
    /// The instance's state after it.
    pub state: Value,
    /// The newest event handled so far.
    pub position: Position,
    /// What was handled: `<type> in <stream> at <position>`, or `deadline <name>`.
    pub handled: String,
    /// The keys of the commands it sent.
    pub commands: Vec<String>,
    /// Their names, in the same order (empty in records written before the
    /// names were kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command_names: Vec<String>,
    /// The deadlines pending after it.
    pub deadlines: Vec<PendingDeadline>,
    pub ended: bool,
}

impl Reaction {
    /// Reads a `ProcessReacted` or `ProcessEnded` event back; `None` for any other.
    pub fn from_recorded(event: &RecordedEvent) -> Option<Reaction> {
        (event.event_type == REACTED || event.event_type == ENDED)
            .then(|| event.json().ok())
            .flatten()
    }
}

const REACTED: &str = "ProcessReacted";
const ENDED: &str = "ProcessEnded";
const PARKED: &str = "ProcessParked";
const RESUMED: &str = "ProcessResumed";
const PARKED_SET: &str = "ProcessesParked";
const CHECKPOINT: &str = "ProcessCheckpoint";
const DEADLINE_KIND: &str = "deadline";
/// One read of each parked instance's newest event per poll.
const PARKED_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Timer(#[from] TimerError),
    #[error("invalid process: {0}")]
    Invalid(String),
    #[error("stream {0} does not hold this process's state: {1}")]
    State(String, String),
    #[error("no instance {0}")]
    NotFound(String),
    #[error("{0} is not parked: nothing to resume")]
    NotParked(String),
    /// The instance waits for `resume` (a deadline of it comes again later).
    #[error("{0} is parked")]
    Parked(String),
}

type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send>>;
type Handler = Arc<dyn Fn(Command) -> BoxFuture<Result<(), String>> + Send + Sync>;

/// Builds a [`ProcessManager`].
pub struct ProcessManagerBuilder<P> {
    store: Arc<dyn EventStore>,
    process: P,
    handler: Handler,
    checkpoint_every: Duration,
    attempts: u32,
    command_timeout: Duration,
}

/// Attempts at a command before its instance is parked (with backoff from
/// 100 ms doubling to 5 s between them: about 20 s in all).
pub const DEFAULT_COMMAND_ATTEMPTS: u32 = 10;
/// How long one attempt at a command may take before it counts as failed.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl<P: Process> ProcessManagerBuilder<P> {
    /// Attempts at a command before its instance is parked (default
    /// [`DEFAULT_COMMAND_ATTEMPTS`], at least 1). Parking lets the other
    /// instances go on while one waits for a person.
    pub fn command_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    /// How long one attempt may take (default [`DEFAULT_COMMAND_TIMEOUT`]).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// How often the subscription's position is written (default 1 s).
    pub fn checkpoint_every(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    /// Starts the deadlines' scheduler and follows the process's events from
    /// its checkpoint.
    pub async fn start(self) -> Result<ProcessManager<P>, ProcessError> {
        let name = self.process.name().to_string();
        cairn_core::validate_category(&name)
            .map_err(|e| ProcessError::Invalid(format!("process name {name:?}: {e}")))?;
        let from =
            checkpoints(&name).load(self.store.as_ref()).await.ok().flatten().map(|(p, _)| p);
        let parked = newest(self.store.as_ref(), &parked_stream(&name))
            .await?
            .and_then(|e| e.json::<ParkedSet>().ok())
            .map(|p| p.correlations)
            .unwrap_or_default();
        let inner = Arc::new(Inner {
            store: self.store.clone(),
            process: self.process,
            name: name.clone(),
            handler: self.handler,
            scheduler: std::sync::OnceLock::new(),
            lock: Mutex::new(()),
            position: AtomicU64::new(from.map_or(0, |p| p.0)),
            last_error: std::sync::Mutex::new(None),
            attempts: self.attempts,
            command_timeout: self.command_timeout,
            parked: std::sync::Mutex::new(parked),
        });
        // Deadlines already due fire as the scheduler starts: they wait for
        // this lock until it is set.
        let guard = inner.lock.lock().await;
        let weak: Weak<Inner<P>> = Arc::downgrade(&inner);
        let scheduler = Scheduler::builder(self.store, format!("{name}-deadlines"))
            .on(DEADLINE_KIND, move |timer: FiredTimer| {
                let weak = weak.clone();
                async move {
                    match weak.upgrade() {
                        Some(inner) => inner.deadline(timer).await,
                        None => Err("the process manager has stopped".to_string()),
                    }
                }
            })
            // A deadline's reaction may take every attempt at a command
            // (and wait for the lock): it must be allowed to, so that it parks.
            .timeout(
                (self.command_timeout + Duration::from_secs(5)) * self.attempts
                    + Duration::from_secs(30),
            )
            .start()
            .await?;
        let _ = inner.scheduler.set(scheduler);
        drop(guard);
        let main = tokio::spawn(follow(inner.clone(), from, self.checkpoint_every));
        let life = Arc::new(Life { inner: inner.clone(), main: std::sync::Mutex::new(Some(main)) });
        Ok(ProcessManager { inner, life, started_from: from })
    }
}

/// Runs a [`Process`]. Dropping the last clone stops it (what a crash
/// would do, minus the lost checkpoint); [`ProcessManager::shutdown`] stops
/// it cleanly.
pub struct ProcessManager<P: Process> {
    inner: Arc<Inner<P>>,
    life: Arc<Life<P>>,
    started_from: Option<Position>,
}

impl<P: Process> Clone for ProcessManager<P> {
    fn clone(&self) -> Self {
        ProcessManager {
            inner: self.inner.clone(),
            life: self.life.clone(),
            started_from: self.started_from,
        }
    }
}

struct Life<P: Process> {
    inner: Arc<Inner<P>>,
    main: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl<P: Process> Life<P> {
    fn stop(&self) -> Option<JoinHandle<()>> {
        let main = self.main.lock().unwrap().take();
        main.inspect(|m| m.abort())
    }
}

impl<P: Process> Drop for Life<P> {
    fn drop(&mut self) {
        self.stop();
        if let Some(scheduler) = self.inner.scheduler.get() {
            scheduler.stop();
        }
    }
}

struct Inner<P: Process> {
    store: Arc<dyn EventStore>,
    process: P,
    name: String,
    handler: Handler,
    scheduler: std::sync::OnceLock<Scheduler>,
    /// One message at a time: events and deadlines of an instance must not
    /// interleave between an instance's effects and its record.
    lock: Mutex<()>,
    /// The newest event handled or, for a parked instance, skipped (0: none).
    position: AtomicU64,
    last_error: std::sync::Mutex<Option<String>>,
    attempts: u32,
    command_timeout: Duration,
    /// Instances parked, or resumed and not yet replayed: watched for a
    /// resume, and kept in `$saga-<process>-$parked`.
    parked: std::sync::Mutex<BTreeSet<String>>,
}

/// `$saga-<process>-$parked`: the correlation ids of the parked instances,
/// as `ProcessesParked` events (the newest holds the whole set).
pub fn parked_stream(process: &str) -> String {
    saga_stream(process, "$parked")
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ParkedSet {
    correlations: BTreeSet<String>,
}

/// `ProcessResumed`: appended by [`resume_process`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Resumed {
    by: String,
}

/// `$saga-<process>-$checkpoint`: the position its manager's subscription
/// has reached, as `ProcessCheckpoint` events holding a position.
fn checkpoints(process: &str) -> CheckpointStream<Position> {
    CheckpointStream::new(process_checkpoint_stream(process), CHECKPOINT)
}

pub fn process_checkpoint_stream(process: &str) -> String {
    saga_stream(process, "$checkpoint")
}

impl<P: Process> ProcessManager<P> {
    /// A manager for `process`; `handler` executes its commands. Return an
    /// error from the handler only for what may pass: it is retried with
    /// backoff, and after [`ProcessManagerBuilder::command_attempts`] the
    /// instance is parked until resumed. A refusal is an outcome, best told
    /// to the process as an event.
    pub fn builder<F, Fut, E>(
        store: Arc<dyn EventStore>,
        process: P,
        handler: F,
    ) -> ProcessManagerBuilder<P>
    where
        F: Fn(Command) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let handler: Handler = Arc::new(move |command| {
            let fut = handler(command);
            Box::pin(async move { fut.await.map_err(|e| e.to_string()) })
        });
        ProcessManagerBuilder {
            store,
            process,
            handler,
            checkpoint_every: Duration::from_secs(1),
            attempts: DEFAULT_COMMAND_ATTEMPTS,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }

    /// The checkpoint it resumed from (`None`: from the first event).
    pub fn started_from(&self) -> Option<Position> {
        self.started_from
    }

    /// The newest event handled (or skipped, its instance being parked), by
    /// position (this run or earlier ones).
    pub fn position(&self) -> Option<Position> {
        Some(Position(self.inner.position.load(Ordering::Acquire))).filter(|p| p.0 > 0)
    }

    /// The last failure it is retrying (a command, the store), if any.
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.lock().unwrap().clone()
    }

    /// An instance's state; `None` if it has recorded nothing.
    pub async fn instance(
        &self,
        correlation: &str,
    ) -> Result<Option<Instance<P::State>>, ProcessError> {
        let instance = self.inner.load(correlation).await?;
        Ok((instance.version > 0).then_some(instance))
    }

    /// Stops following and firing deadlines, and writes the checkpoint.
    pub async fn shutdown(&self) {
        if let Some(main) = self.life.stop() {
            let _ = main.await;
        }
        if let Some(scheduler) = self.inner.scheduler.get() {
            scheduler.shutdown().await;
        }
        let _guard = self.inner.lock.lock().await;
        let position = self.inner.position.load(Ordering::Acquire);
        if position > 0 {
            let _ = self.inner.write_checkpoint(Position(position)).await;
        }
    }
}

/// Follows the process's query from `from`, handling each event in turn.
async fn follow<P: Process>(inner: Arc<Inner<P>>, from: Option<Position>, every: Duration) {
    let mut written = from;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    // Parked instances are looked at this often for a resume.
    let mut parked_tick = tokio::time::interval(PARKED_POLL);
    parked_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        let after = inner.position();
        let start = after.map_or(StartFrom::Start, |p| StartFrom::After(p.0));
        let mut subscription = match inner
            .store
            .subscribe(SubscriptionTarget::Query(inner.process.query()), start)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                inner.failed(e.to_string());
                tokio::time::sleep(crate::STORE_RETRY.delay(failures)).await;
                failures = failures.saturating_add(1);
                continue;
            }
        };
        loop {
            tokio::select! {
                next = subscription.next() => match next {
                    Some(Ok(event)) => {
                        let position = event.position;
                        inner.handle_event(event).await;
                        inner.position.store(position.0, Ordering::Release);
                        failures = 0;
                    }
                    Some(Err(e)) => {
                        inner.failed(e.to_string());
                        tokio::time::sleep(crate::STORE_RETRY.delay(failures)).await;
                        failures = failures.saturating_add(1);
                        break;
                    }
                    None => return,
                },
                _ = parked_tick.tick(), if !inner.parked.lock().unwrap().is_empty() => {
                    let _guard = inner.lock.lock().await;
                    inner.replay_resumed().await;
                }
                _ = tick.tick() => {
                    let now = inner.position();
                    if let Some(position) = now.filter(|_| now > written)
                        && inner.write_checkpoint(position).await.is_ok()
                    {
                        written = now;
                    }
                }
            }
        }
    }
}

/// A stream's newest event (none if the stream does not exist).
async fn newest(store: &dyn EventStore, stream: &str) -> Result<Option<RecordedEvent>, StoreError> {
    Ok(store
        .read_stream_or_empty(stream, ReadStreamOptions::backward().limit(1))
        .await?
        .into_iter()
        .next())
}

/// An instance as its stream says: the state from its newest reaction, and
/// whether a park (or a resume) came after it. Reads back from the newest
/// event to the newest reaction.
async fn load_instance<S: DeserializeOwned + Default>(
    store: &dyn EventStore,
    stream: &str,
    correlation: &str,
) -> Result<Instance<S>, ProcessError> {
    let bad = |e: String| ProcessError::State(stream.to_string(), e);
    let mut instance = Instance {
        correlation: correlation.to_string(),
        state: S::default(),
        version: 0,
        position: Position::START,
        deadlines: Vec::new(),
        ended: false,
        parked: None,
        resumed: None,
    };
    // Newest first: the last park, and whether a resume followed it.
    let (mut park, mut resumed_after) = (None, false);
    let mut options = ReadStreamOptions::backward().limit(64);
    loop {
        let events = store.read_stream_or_empty(stream, options).await?;
        if events.is_empty() && instance.version == 0 {
            return Ok(instance);
        }
        for event in &events {
            instance.version = instance.version.max(event.version);
            match event.event_type.as_str() {
                REACTED | ENDED => {
                    let reaction: Reaction = event.json().map_err(|e| bad(e.to_string()))?;
                    instance.state =
                        serde_json::from_value(reaction.state).map_err(|e| bad(e.to_string()))?;
                    instance.position = reaction.position;
                    instance.deadlines = reaction.deadlines;
                    instance.ended = reaction.ended;
                    return Ok(settle(instance, park, resumed_after));
                }
                PARKED if park.is_none() => {
                    park = Some(event.json::<Parked>().map_err(|e| bad(e.to_string()))?)
                }
                RESUMED if park.is_none() => resumed_after = true,
                PARKED | RESUMED => {}
                other => return Err(bad(format!("it holds a {other}"))),
            }
        }
        match events.last() {
            Some(oldest) if oldest.version > 1 => {
                options = ReadStreamOptions::backward().from_version(oldest.version - 1).limit(64)
            }
            _ => return Ok(settle(instance, park, resumed_after)),
        }
    }
}

fn settle<S>(mut instance: Instance<S>, park: Option<Parked>, resumed: bool) -> Instance<S> {
    if resumed {
        instance.resumed = park;
    } else {
        instance.parked = park;
    }
    instance
}

enum Key<'a> {
    Event(&'a RecordedEvent),
    Deadline(&'a str),
}

impl<P: Process> Inner<P> {
    fn position(&self) -> Option<Position> {
        Some(Position(self.position.load(Ordering::Acquire))).filter(|p| p.0 > 0)
    }

    fn failed(&self, error: String) {
        *self.last_error.lock().unwrap() = Some(error);
    }

    async fn write_checkpoint(&self, position: Position) -> Result<(), StoreError> {
        checkpoints(&self.name).save(self.store.as_ref(), &position).await.map(|_| ())
    }

    async fn load(&self, correlation: &str) -> Result<Instance<P::State>, ProcessError> {
        load_instance(self.store.as_ref(), &saga_stream(&self.name, correlation), correlation).await
    }

    /// Handles one event, retrying until it is recorded (or skipped).
    async fn handle_event(&self, event: RecordedEvent) {
        let Some(correlation) = self.process.correlate(&event) else { return };
        if correlation.is_empty()
            || correlation.starts_with('$')
            || cairn_core::validate_stream_name(&saga_stream(&self.name, &correlation)).is_err()
        {
            return;
        }
        let _guard = self.lock.lock().await;
        self.retry(|| self.handle(&correlation, Key::Event(&event), false)).await;
    }

    /// The deadline callback: `Err` has the scheduler try again later.
    async fn deadline(&self, timer: FiredTimer) -> Result<(), String> {
        #[derive(Deserialize)]
        struct Payload {
            correlation: String,
            name: String,
            version: u64,
        }
        let payload: Payload = serde_json::from_value(timer.payload).map_err(|e| e.to_string())?;
        let _guard = self.lock.lock().await;
        let instance = self.load(&payload.correlation).await.map_err(|e| e.to_string())?;
        if !instance.ended
            && !instance.deadlines.iter().any(|d| d.timer == timer.id)
            && instance.version < payload.version
        {
            // Set by a reaction not yet recorded (its process died in
            // between): the event comes again, and then the deadline counts.
            return Err(format!(
                "deadline {} waits for version {} of its instance",
                payload.name, payload.version
            ));
        }
        self.handle(&payload.correlation, Key::Deadline(&timer.id), false)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn retry<F, Fut>(&self, mut attempt: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<bool, ProcessError>>,
    {
        let mut failures = 0u32;
        loop {
            match attempt().await {
                Ok(true) => return,
                Ok(false) => failures = 0,
                Err(e) => {
                    self.failed(e.to_string());
                    tokio::time::sleep(crate::STORE_RETRY.delay(failures)).await;
                    failures = failures.saturating_add(1);
                }
            }
        }
    }

    /// One try: load, react, run the effects, record. `Ok(false)`: the
    /// instance moved meanwhile, try again.
    /// `replay`: from [`Inner::replay_resumed`]; otherwise a message for an
    /// instance that is parked, or resumed but not yet replayed, waits.
    async fn handle(
        &self,
        correlation: &str,
        key: Key<'_>,
        replay: bool,
    ) -> Result<bool, ProcessError> {
        let instance = self.load(correlation).await?;
        let stream = saga_stream(&self.name, correlation);
        if instance.parked.is_some()
            || (!replay
                && (instance.resumed.is_some()
                    || self.parked.lock().unwrap().contains(correlation)))
        {
            self.watch(correlation).await?;
            return match key {
                // Skipped now, replayed from the store once it is resumed.
                Key::Event(_) => Ok(true),
                Key::Deadline(_) => Err(ProcessError::Parked(stream)),
            };
        }
        let (message, message_key, position, handled) = match key {
            Key::Event(event) => {
                if instance.ended || event.position <= instance.position {
                    return Ok(true);
                }
                let handled =
                    format!("{} in {} at {}", event.event_type, event.stream, event.position);
                (Message::Event(event.clone()), event.id.to_string(), event.position, handled)
            }
            Key::Deadline(timer) => {
                let Some(deadline) = instance
                    .deadlines
                    .iter()
                    .find(|d| d.timer == timer)
                    .filter(|_| !instance.ended)
                else {
                    return Ok(true);
                };
                let message = Message::Deadline { name: deadline.name.clone() };
                (
                    message,
                    format!("deadline/{timer}"),
                    instance.position,
                    format!("deadline {}", deadline.name),
                )
            }
        };
        let mut state = instance.state.clone();
        let effects = self.process.react(&mut state, message);
        let mut deadlines = instance.deadlines.clone();
        if let Key::Deadline(timer) = key {
            deadlines.retain(|d| d.timer != timer);
        }
        let scheduler = self.scheduler.get().expect("set before any message");
        let version = instance.version + 1;
        let handled_deadline = if let Key::Deadline(timer) = key { Some(timer) } else { None };
        let mut commands = Vec::new();
        let mut command_names = Vec::new();
        let mut ended = false;
        for (i, effect) in effects.into_iter().enumerate() {
            match effect {
                Effect::Command { name, payload } => {
                    let key = format!("{stream}/{message_key}/{i}");
                    let command = Command {
                        name: name.clone(),
                        payload,
                        key: key.clone(),
                        process: self.name.clone(),
                        correlation: correlation.to_string(),
                    };
                    if let Err((attempts, error)) = self.send(command).await {
                        let deadline = handled_deadline.map(str::to_string);
                        let at = if deadline.is_none() { Some(position) } else { None };
                        let parked = Parked {
                            handled,
                            deadline,
                            position: at,
                            command: name,
                            key,
                            attempts,
                            error,
                        };
                        return self.park(correlation, &instance, parked).await;
                    }
                    commands.push(key);
                    command_names.push(name);
                }
                Effect::Deadline { name, after } => {
                    let timer = format!("{correlation}/{name}@{version}");
                    let payload = serde_json::json!({ "correlation": correlation, "name": name, "version": version });
                    scheduler
                        .schedule(&timer, after, TimerAction::callback(DEADLINE_KIND, payload))
                        .await?;
                    if !deadlines.iter().any(|d| d.timer == timer) {
                        deadlines.push(PendingDeadline { timer, name });
                    }
                }
                Effect::CancelDeadline { name } => {
                    for d in deadlines.iter().filter(|d| d.name == name) {
                        scheduler.cancel(&d.timer).await?;
                    }
                    deadlines.retain(|d| d.name != name);
                }
                Effect::End => ended = true,
            }
        }
        if ended {
            for d in deadlines.drain(..) {
                scheduler.cancel(&d.timer).await?;
            }
        }
        let reaction = Reaction {
            state: serde_json::to_value(&state)
                .map_err(|e| ProcessError::State(stream.clone(), e.to_string()))?,
            position,
            handled,
            commands,
            command_names,
            deadlines,
            ended,
        };
        let event = NewEvent::json(if ended { ENDED } else { REACTED }, &reaction)
            .expect("reactions serialise")
            .with_id(derived_id(&format!("{stream}@{version}/{message_key}")));
        match self
            .store
            .append(&stream, ExpectedVersion::Exact(instance.version), vec![event])
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::WrongExpectedVersion { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a command until the handler accepts it, or has failed (or
    /// timed out) on every attempt: then the attempts and the last error.
    async fn send(&self, command: Command) -> Result<(), (u32, String)> {
        let mut attempt = 1;
        loop {
            let error =
                match tokio::time::timeout(self.command_timeout, (self.handler)(command.clone()))
                    .await
                {
                    Ok(Ok(())) => return Ok(()),
                    Ok(Err(e)) => e,
                    Err(_) => format!("no answer within {} ms", self.command_timeout.as_millis()),
                };
            self.failed(format!(
                "command {} ({}), attempt {attempt}: {error}",
                command.name, command.key
            ));
            if attempt >= self.attempts {
                return Err((attempt, error));
            }
            tokio::time::sleep(crate::STORE_RETRY.delay(attempt - 1)).await;
            attempt += 1;
        }
    }

    /// Records that the instance waits for a person, and watches it for the
    /// resume. `Ok(true)`: the message is dealt with (for now).
    async fn park(
        &self,
        correlation: &str,
        instance: &Instance<P::State>,
        parked: Parked,
    ) -> Result<bool, ProcessError> {
        let stream = saga_stream(&self.name, correlation);
        let event = NewEvent::json(PARKED, &parked)
            .expect("parks serialise")
            .with_id(derived_id(&format!("{stream}@{}/parked", instance.version + 1)));
        match self
            .store
            .append(&stream, ExpectedVersion::Exact(instance.version), vec![event])
            .await
        {
            Ok(_) => {}
            Err(StoreError::WrongExpectedVersion { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        self.watch(correlation).await?;
        Ok(true)
    }

    /// Adds `correlation` to the parked set (and its stream) if it is new.
    /// The set is written first: kept in memory only once it is stored.
    async fn watch(&self, correlation: &str) -> Result<(), ProcessError> {
        let mut set = self.parked.lock().unwrap().clone();
        if !set.insert(correlation.to_string()) {
            return Ok(());
        }
        self.write_parked(set).await?;
        self.parked.lock().unwrap().insert(correlation.to_string());
        Ok(())
    }

    async fn write_parked(&self, correlations: BTreeSet<String>) -> Result<(), ProcessError> {
        let event =
            NewEvent::json(PARKED_SET, &ParkedSet { correlations }).expect("sets serialise");
        self.store.append(&parked_stream(&self.name), ExpectedVersion::Any, vec![event]).await?;
        Ok(())
    }

    /// Looks at the parked instances: the first resumed one has its parked
    /// message handled again, then the events it skipped, up to where the
    /// manager is, in order (each `handle` skips what it handled already);
    /// one per call, so events and deadlines go on in between. One parked
    /// again stays in the set. Called with the lock held.
    async fn replay_resumed(&self) {
        let watched: Vec<String> = self.parked.lock().unwrap().iter().cloned().collect();
        for correlation in watched {
            match self.replay(&correlation).await {
                Ok(false) => continue,
                Ok(true) => return,
                // One instance's trouble does not hold back the others.
                Err(e) => {
                    self.failed(format!("replaying {}: {e}", saga_stream(&self.name, &correlation)))
                }
            }
        }
    }

    /// Replays one watched instance if it was resumed; `Ok(false)`: it is
    /// still parked.
    async fn replay(&self, correlation: &str) -> Result<bool, ProcessError> {
        // Cheap first: still parked while its newest event is the park.
        if newest(self.store.as_ref(), &saga_stream(&self.name, correlation))
            .await?
            .is_some_and(|e| e.event_type == PARKED)
        {
            return Ok(false);
        }
        let instance = self.load(correlation).await?;
        if instance.parked.is_some() {
            return Ok(false);
        }
        // A parked deadline first: it came before the events still to replay.
        if let Some(timer) = instance.resumed.as_ref().and_then(|p| p.deadline.as_deref())
            && (!self.handle(correlation, Key::Deadline(timer), true).await?
                || self.load(correlation).await?.parked.is_some())
        {
            return Ok(true);
        }
        let upto = self.position().unwrap_or(Position::START);
        // From the parked event itself when it is known (the instance's
        // events before it were all handled), else after the last handled one.
        let (mut from, mut exclusive) = match instance.resumed.as_ref().and_then(|p| p.position) {
            Some(at) => (at, false),
            None => (instance.position, instance.position > Position::START),
        };
        let mut parked_again = false;
        'pages: while from <= upto {
            let options =
                ReadAllOptions { from, exclusive, direction: Direction::Forward, limit: 256 };
            let events = self.store.read_query(&self.process.query(), options).await?;
            if events.is_empty() {
                break;
            }
            for event in &events {
                if event.position > upto {
                    break 'pages;
                }
                (from, exclusive) = (event.position, true);
                if self.process.correlate(event).as_deref() != Some(correlation) {
                    continue;
                }
                while !self.handle(correlation, Key::Event(event), true).await? {}
                if self.load(correlation).await?.parked.is_some() {
                    parked_again = true;
                    break 'pages;
                }
            }
        }
        if !parked_again {
            let mut set = self.parked.lock().unwrap().clone();
            set.remove(correlation);
            self.write_parked(set).await?;
            self.parked.lock().unwrap().remove(correlation);
        }
        Ok(true)
    }
}

/// Lets a parked instance of `process` go on: appends `ProcessResumed`, and
/// its manager (wherever it runs) handles the parked message again, then the
/// events the instance skipped. Refused, with nothing written, unless parked.
pub async fn resume_process(
    store: &dyn EventStore,
    process: &str,
    correlation: &str,
    by: &str,
) -> Result<Parked, ProcessError> {
    let stream = saga_stream(process, correlation);
    let instance: Instance<Value> = load_instance(store, &stream, correlation).await?;
    if instance.version == 0 {
        return Err(ProcessError::NotFound(stream));
    }
    let Some(parked) = instance.parked else { return Err(ProcessError::NotParked(stream)) };
    let event =
        NewEvent::json(RESUMED, &Resumed { by: by.to_string() }).expect("resumes serialise");
    store.append(&stream, ExpectedVersion::Exact(instance.version), vec![event]).await?;
    Ok(parked)
}
