//! Runs sagas: each one a task that reads what to do next from its state,
//! does it, and appends the transition to the saga's stream (checked against
//! the version it read) before it goes on. A runner that starts finds the
//! sagas an earlier one left unfinished and resumes them.
//!
//! Finding them cheaply: the runner's checkpoint stream (`$saga-<runner>`)
//! holds, now and then, a position below which every saga it started has
//! finished or is parked (and the parked ones by name). On start it reads the
//! `SagaStarted` events after that position, and the parked sagas, and drives
//! every one whose stream does not say it is over.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_core::{
    CheckpointStream, EventStore, ExpectedVersion, NewEvent, Position, ReadAllOptions,
    ReadStreamOptions, RecordedEvent, SAGA_STREAM_PREFIX, StartFrom, StoreError,
    SubscriptionTarget,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, Semaphore, oneshot};

use crate::definition::{Saga, StepContext, Undo};
use crate::history::{SagaEvent, SagaState, Status, derived_id, saga_stream};

/// What went wrong starting or asking about a saga.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid saga definition: {0}")]
    Definition(String),
    #[error("no saga named {0} is registered with this runner")]
    UnknownSaga(String),
    #[error("saga {0} does not exist")]
    NotFound(String),
    #[error("invalid saga id {0:?}: {1}")]
    InvalidId(String, String),
    #[error("the saga's input cannot be stored: {0}")]
    InvalidInput(String),
    #[error("saga {0} is {1}, not waiting for attention: nothing to resume")]
    NotParked(String, &'static str),
    #[error("the saga runner has stopped")]
    Stopped,
}

const CHECKPOINT_TYPE: &str = "RunnerCheckpoint";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    /// Every saga whose `SagaStarted` is at or before this position (0: none)
    /// is over, or listed in `parked`.
    after: u64,
    /// Sagas that are (or were, while this runner ran) parked: named, since
    /// they may have started long before `after`.
    parked: Vec<String>,
}

struct Open {
    /// Positions up to here were assigned before this saga's start: recovery
    /// scanning after it finds the saga.
    floor: u64,
    /// Named in the checkpoint instead (it was parked, or found through the
    /// checkpoint's list): its start may lie before any floor.
    listed: bool,
    parked: bool,
    waiters: Vec<oneshot::Sender<SagaState>>,
}

struct Inner {
    store: Arc<dyn EventStore>,
    name: String,
    sagas: HashMap<String, Arc<Saga>>,
    open: Mutex<HashMap<String, Open>>,
    /// The position of the newest event this runner appended (or the checkpoint it started from).
    last_seen: AtomicU64,
    changed: AtomicBool,
    permits: Arc<Semaphore>,
    stopping: AtomicBool,
    stop: Notify,
    tasks: Mutex<tokio::task::JoinSet<()>>,
}

/// Builds a [`SagaRunner`].
pub struct SagaRunnerBuilder {
    store: Arc<dyn EventStore>,
    name: String,
    sagas: Vec<Saga>,
    max_running: usize,
    checkpoint_every: Duration,
}

impl SagaRunnerBuilder {
    /// Registers a saga definition (by its name).
    pub fn saga(mut self, saga: Saga) -> Self {
        self.sagas.push(saga);
        self
    }

    /// Sagas driven at once (default 1,024); more wait their turn.
    pub fn max_running(mut self, n: usize) -> Self {
        self.max_running = n.max(1);
        self
    }

    /// How often the recovery checkpoint is written while sagas start and end (default 1 s).
    pub fn checkpoint_every(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    /// Checks the definitions, resumes every saga an earlier runner of this
    /// name left unfinished, and starts taking new ones.
    pub async fn run(self) -> Result<SagaRunner, SagaError> {
        cairn_core::validate_category(&self.name)
            .map_err(|e| SagaError::Definition(format!("runner name {:?}: {e}", self.name)))?;
        let mut sagas = HashMap::new();
        for saga in self.sagas {
            saga.check().map_err(SagaError::Definition)?;
            if sagas.insert(saga.name.clone(), Arc::new(saga)).is_some() {
                return Err(SagaError::Definition(
                    "two sagas with the same name are registered".into(),
                ));
            }
        }
        let inner = Arc::new(Inner {
            store: self.store,
            name: self.name,
            sagas,
            open: Mutex::new(HashMap::new()),
            last_seen: AtomicU64::new(0),
            changed: AtomicBool::new(true),
            permits: Arc::new(Semaphore::new(self.max_running)),
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
            tasks: Mutex::new(tokio::task::JoinSet::new()),
        });
        let recovered = recover(&inner).await?;
        inner.write_checkpoint().await?;
        let every = self.checkpoint_every;
        let weak = Arc::downgrade(&inner);
        inner.tasks.lock().unwrap().spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(inner) = weak.upgrade() else { return };
                if inner.stopping.load(Ordering::Acquire) {
                    return;
                }
                if inner.changed.swap(false, Ordering::AcqRel)
                    && inner.write_checkpoint().await.is_err()
                {
                    inner.changed.store(true, Ordering::Release);
                }
            }
        });
        Ok(SagaRunner { inner, recovered })
    }
}

/// Drives sagas to their end, durably. Clone it freely.
#[derive(Clone)]
pub struct SagaRunner {
    inner: Arc<Inner>,
    recovered: usize,
}

/// What [`SagaRunner::start`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub stream: String,
    /// The saga existed already (a retried start): nothing new was written.
    pub existed: bool,
}

impl SagaRunner {
    /// A runner named `name` (its checkpoint is `$saga-<name>`): one running
    /// runner per name. Add sagas, then [`SagaRunnerBuilder::run`].
    pub fn builder(store: Arc<dyn EventStore>, name: impl Into<String>) -> SagaRunnerBuilder {
        SagaRunnerBuilder {
            store,
            name: name.into(),
            sagas: Vec::new(),
            max_running: 1024,
            checkpoint_every: Duration::from_secs(1),
        }
    }

    /// Unfinished sagas found (and resumed) when the runner started.
    pub fn recovered(&self) -> usize {
        self.recovered
    }

    /// Starts saga `saga` with this id and input. When it returns, the saga is
    /// in the store and will run to its end, even if this process dies (the
    /// next runner resumes it). Starting an id that exists changes nothing.
    pub async fn start(
        &self,
        saga: &str,
        id: &str,
        input: &impl Serialize,
    ) -> Result<Started, SagaError> {
        let inner = &self.inner;
        if inner.stopping.load(Ordering::Acquire) {
            return Err(SagaError::Stopped);
        }
        let definition =
            inner.sagas.get(saga).ok_or_else(|| SagaError::UnknownSaga(saga.to_string()))?.clone();
        let stream = saga_stream(saga, id);
        cairn_core::validate_stream_name(&stream)
            .map_err(|e| SagaError::InvalidId(id.to_string(), e.to_string()))?;
        if id.is_empty() {
            return Err(SagaError::InvalidId(id.to_string(), "it is empty".into()));
        }
        let input =
            serde_json::to_value(input).map_err(|e| SagaError::InvalidInput(e.to_string()))?;
        let started = SagaEvent::SagaStarted {
            saga: saga.to_string(),
            input,
            steps: definition.steps.iter().map(|s| s.name.clone()).collect(),
        };
        if !inner.register(&stream) {
            return Ok(Started { stream, existed: true });
        }
        // A fresh id: starting an existing saga must meet `NoStream` and be
        // told so, not be taken for a retry of the first start.
        let event = started.to_event();
        match inner.store.append(&stream, ExpectedVersion::NoStream, vec![event]).await {
            Ok(result) => {
                inner.saw(result.position);
                let state = SagaState::fold_new(&stream, started);
                inner.spawn(definition, state);
                Ok(Started { stream, existed: false })
            }
            Err(StoreError::WrongExpectedVersion { .. }) => {
                // It exists: drive it here unless it is over.
                match load_stream(inner.store.as_ref(), &stream).await {
                    Ok(Some(state)) if !state.status.is_final() => inner.spawn(definition, state),
                    _ => inner.finish(&stream, None),
                }
                Ok(Started { stream, existed: true })
            }
            Err(e) => {
                inner.finish(&stream, None);
                Err(e.into())
            }
        }
    }

    /// Waits until the saga is over (completed or compensated) or needs
    /// attention, and returns its state.
    pub async fn wait(&self, saga: &str, id: &str) -> Result<SagaState, SagaError> {
        let stream = saga_stream(saga, id);
        let receiver = {
            let mut open = self.inner.open.lock().unwrap();
            match open.get_mut(&stream) {
                Some(o) if !o.parked && !self.inner.stopping.load(Ordering::Acquire) => {
                    let (tx, rx) = oneshot::channel();
                    o.waiters.push(tx);
                    Some(rx)
                }
                _ => None,
            }
        };
        match receiver {
            Some(rx) => rx.await.map_err(|_| SagaError::Stopped),
            None => load_stream(self.inner.store.as_ref(), &stream)
                .await?
                .ok_or(SagaError::NotFound(stream)),
        }
    }

    /// Sagas this runner is driving or holding parked right now.
    pub fn open(&self) -> usize {
        self.inner.open.lock().unwrap().len()
    }

    /// Stops driving sagas (they stay where their streams say; the next
    /// runner resumes them) and writes the checkpoint.
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.stop.notify_waiters();
        let mut tasks = std::mem::take(&mut *self.inner.tasks.lock().unwrap());
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        // Nobody will finish these sagas here: their waiters get `Stopped`.
        for open in self.inner.open.lock().unwrap().values_mut() {
            open.waiters.clear();
        }
        let _ = self.inner.write_checkpoint().await;
    }
}

impl Inner {
    /// Marks `stream` open (before its start is appended); false if it already is.
    fn register(&self, stream: &str) -> bool {
        let floor = self.last_seen.load(Ordering::Acquire);
        let mut open = self.open.lock().unwrap();
        if open.contains_key(stream) {
            return false;
        }
        open.insert(
            stream.to_string(),
            Open { floor, listed: false, parked: false, waiters: Vec::new() },
        );
        self.changed.store(true, Ordering::Release);
        true
    }

    fn saw(&self, position: Position) {
        self.last_seen.fetch_max(position.0, Ordering::AcqRel);
    }

    /// The saga is over (or was never started): tell its waiters.
    fn finish(&self, stream: &str, state: Option<&SagaState>) {
        let entry = self.open.lock().unwrap().remove(stream);
        self.changed.store(true, Ordering::Release);
        if let (Some(entry), Some(state)) = (entry, state) {
            for waiter in entry.waiters {
                let _ = waiter.send(state.clone());
            }
        }
    }

    fn set_parked(&self, stream: &str, state: Option<&SagaState>) {
        let mut open = self.open.lock().unwrap();
        if let Some(entry) = open.get_mut(stream) {
            entry.parked = state.is_some();
            entry.listed |= entry.parked;
            if let Some(state) = state {
                for waiter in entry.waiters.drain(..) {
                    let _ = waiter.send(state.clone());
                }
            }
        }
        self.changed.store(true, Ordering::Release);
    }

    fn spawn(self: &Arc<Self>, saga: Arc<Saga>, state: SagaState) {
        let inner = self.clone();
        let mut tasks = self.tasks.lock().unwrap();
        // Reap finished tasks so the set does not grow with every saga.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(async move { drive(inner, saga, state).await });
    }

    async fn write_checkpoint(&self) -> Result<(), StoreError> {
        let checkpoint = {
            let open = self.open.lock().unwrap();
            let floor = open.values().filter(|o| !o.listed).map(|o| o.floor).min();
            Checkpoint {
                after: floor.unwrap_or_else(|| self.last_seen.load(Ordering::Acquire)),
                parked: open.iter().filter(|(_, o)| o.listed).map(|(s, _)| s.clone()).collect(),
            }
        };
        checkpoints(&self.name).save(self.store.as_ref(), &checkpoint).await?;
        Ok(())
    }

    /// Appends transitions at the state's version, retrying what may be a
    /// passing store error with the same event ids (so a retry of a write
    /// that landed is recognised). `None`: the stream moved on without us.
    async fn record(&self, state: &SagaState, events: &[SagaEvent]) -> Option<()> {
        let batch: Vec<NewEvent> = events
            .iter()
            .enumerate()
            .map(|(i, e)| e.to_new_event(&state.stream, state.version + 1 + i as u64))
            .collect();
        let mut failures = 0u32;
        loop {
            match self
                .store
                .append(&state.stream, ExpectedVersion::Exact(state.version), batch.clone())
                .await
            {
                Ok(result) => {
                    self.saw(result.position);
                    return Some(());
                }
                Err(StoreError::WrongExpectedVersion { .. }) => return None,
                Err(_) if !self.stopping.load(Ordering::Acquire) => {
                    tokio::time::sleep(crate::STORE_RETRY.delay(failures)).await;
                    failures = failures.saturating_add(1);
                }
                Err(_) => return None,
            }
        }
    }
}

/// A runner's checkpoints (bounded: see [`CheckpointStream`]).
fn checkpoints(runner: &str) -> CheckpointStream<Checkpoint> {
    CheckpointStream::new(checkpoint_stream(runner), CHECKPOINT_TYPE)
}

fn checkpoint_stream(runner: &str) -> String {
    format!("{SAGA_STREAM_PREFIX}{runner}")
}

/// Reads one saga's state; `None` if the saga does not exist.
pub async fn load(
    store: &dyn EventStore,
    saga: &str,
    id: &str,
) -> Result<Option<SagaState>, StoreError> {
    load_stream(store, &saga_stream(saga, id)).await
}

async fn load_stream(
    store: &dyn EventStore,
    stream: &str,
) -> Result<Option<SagaState>, StoreError> {
    match read_history(store, stream).await {
        Ok(events) => Ok(SagaState::fold(stream, &events)),
        Err(StoreError::StreamNotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every event of a saga's (or any) stream, read in pages: a remote store
/// caps one read.
pub async fn read_history(
    store: &dyn EventStore,
    stream: &str,
) -> Result<Vec<RecordedEvent>, StoreError> {
    const PAGE: usize = 1000;
    let mut events: Vec<RecordedEvent> = Vec::new();
    loop {
        let from = events.last().map_or(1, |e| e.version + 1);
        let page = store
            .read_stream(stream, ReadStreamOptions::forward().from_version(from).limit(PAGE))
            .await?;
        let full = page.len() == PAGE;
        events.extend(page);
        if !full {
            return Ok(events);
        }
    }
}

/// Every saga in the store (all types, all runners), up to `limit` streams
/// looked at, in stream-name order: for `cairn sagas list`.
pub async fn list(store: &dyn EventStore, limit: usize) -> Result<Vec<SagaState>, StoreError> {
    let mut sagas = Vec::new();
    for info in store.list_streams(SAGA_STREAM_PREFIX, limit).await? {
        // `$saga-<runner>` checkpoints have no second '-'.
        let rest = &info.stream[SAGA_STREAM_PREFIX.len()..];
        if !rest.contains('-') {
            continue;
        }
        if let Some(state) = load_stream(store, &info.stream).await? {
            sagas.push(state);
        }
    }
    Ok(sagas)
}

async fn recover(inner: &Arc<Inner>) -> Result<usize, SagaError> {
    let store = inner.store.as_ref();
    let checkpoint = match store
        .read_stream(&checkpoint_stream(&inner.name), ReadStreamOptions::backward().limit(1))
        .await
    {
        Ok(events) => events.first().and_then(|e| e.json::<Checkpoint>().ok()).unwrap_or_default(),
        // A runner writes its first checkpoint before it takes any saga: without
        // one there is nothing of ours to find, and no reason to read `$all`.
        Err(StoreError::StreamNotFound { .. }) => Checkpoint {
            after: store.last_position().await?.map_or(0, |p| p.0),
            parked: Vec::new(),
        },
        Err(e) => return Err(e.into()),
    };
    let listed: std::collections::HashSet<String> = checkpoint.parked.iter().cloned().collect();
    let mut candidates: Vec<String> = checkpoint.parked;
    let mut options = if checkpoint.after == 0 {
        ReadAllOptions::forward()
    } else {
        ReadAllOptions::forward().after(Position(checkpoint.after))
    };
    let mut newest = checkpoint.after;
    loop {
        let page = store.read_all(options.limit(4096)).await?;
        let Some(last) = page.last() else { break };
        options = ReadAllOptions::forward().after(last.position);
        newest = newest.max(last.position.0);
        for event in &page {
            if event.event_type == "SagaStarted" && event.stream.starts_with(SAGA_STREAM_PREFIX) {
                candidates.push(event.stream.clone());
            }
        }
    }
    inner.last_seen.store(newest, Ordering::Release);
    candidates.sort();
    candidates.dedup();
    let mut resumed = 0;
    for stream in candidates {
        let Some(state) = load_stream(store, &stream).await? else { continue };
        let Some(saga) = inner.sagas.get(&state.saga).cloned() else { continue };
        if state.status.is_final() || !inner.register(&stream) {
            continue;
        }
        // Found by a scan that starts after the checkpoint: the next
        // checkpoint must not move past it while it is open.
        let mut open = inner.open.lock().unwrap();
        let entry = open.get_mut(&stream).expect("registered");
        entry.floor = checkpoint.after;
        entry.listed = listed.contains(&stream);
        drop(open);
        inner.spawn(saga, state);
        resumed += 1;
    }
    Ok(resumed)
}

fn context(saga: &Saga, state: &SagaState, step: &str, suffix: &str, attempt: u32) -> StepContext {
    let outputs: BTreeMap<String, Value> = state.completed.iter().cloned().collect();
    StepContext {
        saga: saga.name.clone(),
        saga_id: state.id.clone(),
        step: step.to_string(),
        key: format!("{}/{step}{suffix}", state.stream),
        attempt,
        input: Arc::new(state.input.clone()),
        outputs: Arc::new(outputs),
        correlation: derived_id(&state.stream),
    }
}

/// The compensation plan: completed steps newest first (after the timed-out
/// one, whose effect is unknown), split by whether they can be undone.
fn compensating(
    saga: &Saga,
    state: &SagaState,
    reason: String,
    timed_out: Option<&str>,
) -> SagaEvent {
    let mut undo = Vec::new();
    let mut not_undoable = Vec::new();
    let done = state.completed.iter().rev().map(|(s, _)| s.as_str());
    for step in timed_out.into_iter().chain(done) {
        match saga.find(step).map(|s| &s.undo) {
            Some(Undo::Compensate(_)) => undo.push(step.to_string()),
            _ => not_undoable.push(step.to_string()),
        }
    }
    SagaEvent::Compensating { reason, undo, not_undoable }
}

/// Runs one saga until it is over, parked (then waits to be resumed), or
/// taken over by someone else.
async fn drive(inner: Arc<Inner>, saga: Arc<Saga>, mut state: SagaState) {
    let mut permit = Some(inner.permits.clone().acquire_owned().await.expect("never closed"));
    loop {
        let events = match state.status {
            Status::Completed | Status::Compensated => {
                inner.finish(&state.stream, Some(&state));
                return;
            }
            Status::NeedsAttention => {
                inner.set_parked(&state.stream, Some(&state));
                drop(permit.take());
                match wait_for_resume(&inner, &state).await {
                    Some(resumed) => state = resumed,
                    None => return,
                }
                inner.set_parked(&state.stream, None);
                permit = Some(inner.permits.clone().acquire_owned().await.expect("never closed"));
                continue;
            }
            Status::Running => match state.next_step().map(str::to_string) {
                None => vec![SagaEvent::SagaCompleted {}],
                Some(name) => run_action(&saga, &state, &name).await,
            },
            Status::Compensating => match state.next_undo().map(str::to_string) {
                None => vec![SagaEvent::SagaCompensated {}],
                Some(name) => run_compensation(&saga, &state, &name).await,
            },
        };
        debug_assert!(permit.is_some());
        if inner.record(&state, &events).await.is_none() {
            // Someone else moved the saga (an operator, another runner): read it again.
            if inner.stopping.load(Ordering::Acquire) {
                return;
            }
            match load_stream(inner.store.as_ref(), &state.stream).await {
                Ok(Some(fresh)) => state = fresh,
                _ => return,
            }
            continue;
        }
        for event in &events {
            state.apply(event);
        }
        state.version += events.len() as u64;
        let backoff = match events.first() {
            Some(SagaEvent::CompensationFailed { attempt, .. })
                if state.status == Status::Compensating =>
            {
                Some(saga.retry.delay(*attempt))
            }
            Some(SagaEvent::StepAttemptFailed { step, attempt, .. }) => {
                saga.find(step).map(|s| s.retry_delay(*attempt))
            }
            _ => None,
        };
        if let Some(wait) = backoff {
            // Back off before the next attempt, without holding a slot.
            drop(permit.take());
            tokio::time::sleep(wait).await;
            permit = Some(inner.permits.clone().acquire_owned().await.expect("never closed"));
        }
    }
}

async fn run_action(saga: &Saga, state: &SagaState, name: &str) -> Vec<SagaEvent> {
    let Some(step) = saga.find(name) else {
        let error = format!("step {name} is not in this version of saga {}", saga.name);
        return vec![
            SagaEvent::StepFailed { step: name.into(), error: error.clone() },
            compensating(saga, state, error, None),
        ];
    };
    let attempt = state.attempts + 1;
    let ctx = context(saga, state, name, "", attempt);
    let outcome = tokio::time::timeout(step.timeout, (step.action)(ctx)).await;
    if attempt <= step.retries {
        let error = match &outcome {
            Ok(Err(error)) => Some(error.0.clone()),
            Err(_) => Some(format!("timed out after {} ms", step.timeout.as_millis())),
            Ok(Ok(_)) => None,
        };
        if let Some(error) = error {
            return vec![SagaEvent::StepAttemptFailed { step: name.into(), attempt, error }];
        }
    }
    match outcome {
        Ok(Ok(output)) => {
            let mut events = vec![SagaEvent::StepCompleted { step: name.into(), output }];
            if state.completed.len() + 1 == state.steps.len() {
                events.push(SagaEvent::SagaCompleted {});
            }
            events
        }
        Ok(Err(error)) => {
            let reason = format!("{name} failed: {error}");
            vec![
                SagaEvent::StepFailed { step: name.into(), error: error.0 },
                compensating(saga, state, reason, None),
            ]
        }
        Err(_) => {
            let after_ms = step.timeout.as_millis() as u64;
            let reason = format!("{name} timed out after {after_ms} ms");
            vec![
                SagaEvent::StepTimedOut { step: name.into(), after_ms },
                compensating(saga, state, reason, Some(name)),
            ]
        }
    }
}

async fn run_compensation(saga: &Saga, state: &SagaState, name: &str) -> Vec<SagaEvent> {
    let attempt = state.attempts + 1;
    let outcome = match saga.find(name).map(|s| (&s.undo, s.timeout)) {
        Some((Undo::Compensate(undo), timeout)) => {
            let ctx = context(saga, state, name, "/undo", attempt);
            match tokio::time::timeout(timeout, undo(ctx)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.0),
                Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
            }
        }
        _ => Err(format!("step {name} has no compensation in this version of saga {}", saga.name)),
    };
    match outcome {
        Ok(()) => {
            let mut events = vec![SagaEvent::StepCompensated { step: name.into() }];
            if state.undone.len() + 1 == state.undo.len() {
                events.push(SagaEvent::SagaCompensated {});
            }
            events
        }
        Err(error) if attempt >= saga.retry.attempts => vec![
            SagaEvent::CompensationFailed { step: name.into(), attempt, error: error.clone() },
            SagaEvent::SagaParked { step: name.into(), attempts: attempt, error },
        ],
        Err(error) => vec![SagaEvent::CompensationFailed { step: name.into(), attempt, error }],
    }
}

/// Follows a parked saga's stream until an operator resumes it.
async fn wait_for_resume(inner: &Inner, state: &SagaState) -> Option<SagaState> {
    let mut subscription = inner
        .store
        .subscribe(
            SubscriptionTarget::Stream(state.stream.clone()),
            StartFrom::After(state.version),
        )
        .await
        .ok()?;
    loop {
        tokio::select! {
            next = subscription.next() => match next {
                Some(Ok(event)) if event.event_type == "SagaResumed" => {
                    return load_stream(inner.store.as_ref(), &state.stream).await.ok().flatten();
                }
                Some(Ok(_)) => continue,
                _ => return None,
            },
            _ = inner.stop.notified() => return None,
        }
    }
}

/// Asks a parked saga to try its compensations again (what `cairn sagas
/// resume` does): its runner, wherever it runs, picks it up.
pub async fn resume(
    store: &dyn EventStore,
    saga: &str,
    id: &str,
    by: &str,
) -> Result<SagaState, SagaError> {
    let stream = saga_stream(saga, id);
    let mut state =
        load_stream(store, &stream).await?.ok_or_else(|| SagaError::NotFound(stream.clone()))?;
    if state.status != Status::NeedsAttention {
        return Err(SagaError::NotParked(stream, state.status.as_str()));
    }
    let event = SagaEvent::SagaResumed { by: by.to_string() };
    store
        .append(
            &stream,
            ExpectedVersion::Exact(state.version),
            vec![event.to_new_event(&stream, state.version + 1)],
        )
        .await?;
    state.apply(&event);
    state.version += 1;
    Ok(state)
}
