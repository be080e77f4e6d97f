use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_core::{EventStore, Position, RecordedEvent, StartFrom, StoreError, Timestamp};
use futures_util::FutureExt;
use tokio::sync::watch;

use crate::{ProjectionError, Sink, Source};

/// What a runner is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Applying history faster than it arrives.
    CatchingUp,
    /// Applied everything the store had; waiting for new events.
    Live,
    Paused,
    /// The projection's code failed on an event; it stays stopped there.
    Failed(String),
    Stopped,
}

/// A runner's figures, as last updated.
#[derive(Debug, Clone)]
pub struct Status {
    pub name: String,
    pub state: State,
    /// Position of the last event applied (the checkpoint).
    pub position: Option<Position>,
    /// When that event was appended.
    pub last_event_time: Option<Timestamp>,
    /// Events applied since the runner started.
    pub applied: u64,
    pub started: Instant,
}

/// How far a projection is behind the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    pub position: Option<Position>,
    /// The store's newest event.
    pub head: Option<Position>,
    /// Events in the store after the checkpoint (counted up to 100,000).
    pub events: u64,
    /// Append time of the last applied event vs now, when behind; 0 when caught up.
    pub seconds: f64,
    /// False when `seconds` is over the alert threshold.
    pub healthy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Pause,
    Stop,
}

/// How often a runner reads the requests stored with its read model.
const REQUEST_POLL: Duration = Duration::from_millis(250);

/// A projection counting deposits into memory:
///
/// ```
/// use std::sync::Arc;
/// use cairn_core::{EventStore, ExpectedVersion, NewEvent, RecordedEvent};
/// use cairn_cqrs::{MemoryModel, MemoryProjection, Runner, Source};
///
/// struct Deposits;
/// impl MemoryProjection for Deposits {
///     type State = u64;
///     fn name(&self) -> &str { "deposits" }
///     fn apply(&self, n: &mut u64, e: &RecordedEvent) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///         if e.event_type == "MoneyDeposited" { *n += 1 }
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store: Arc<dyn EventStore> = Arc::new(cairn_log::EmbeddedStore::open(dir.path())?);
/// let deposit = || NewEvent::json("MoneyDeposited", &serde_json::json!({"amount": 5}));
/// store.append("account-1", ExpectedVersion::Any, vec![deposit()?, deposit()?]).await?;
///
/// let model = MemoryModel::new(Deposits);
/// let runner = Runner::new(store.clone(), Source::All, model.clone()).spawn();
/// let written = store.append("account-2", ExpectedVersion::Any, vec![deposit()?]).await?;
/// runner.wait_for(written.position).await?; // catch-up, then live
/// assert_eq!(model.read(|n| *n), 3);
/// runner.stop().await.1?;
/// # Ok(())
/// # }
/// ```
/// Follows the store for one projection: from its checkpoint, catch-up then live.
pub struct Runner {
    store: Arc<dyn EventStore>,
    source: Source,
    sink: Box<dyn Sink>,
    batch: usize,
}

/// Controls a spawned runner and reads its status.
pub struct RunnerHandle {
    status: Arc<Mutex<Status>>,
    applied: watch::Receiver<Option<Position>>,
    source: Source,
    control: watch::Sender<Control>,
    task: tokio::task::JoinHandle<(Box<dyn Sink>, Result<(), ProjectionError>)>,
    store: Arc<dyn EventStore>,
    alert: Duration,
}

impl Runner {
    pub fn new(store: Arc<dyn EventStore>, source: Source, sink: impl Sink) -> Self {
        Runner { store, source, sink: Box::new(sink), batch: 1000 }
    }

    /// Most events applied in one transaction (default 1,000).
    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// Starts following the store on the current tokio runtime.
    pub fn spawn(self) -> RunnerHandle {
        let status = Arc::new(Mutex::new(Status {
            name: self.sink.name().to_string(),
            state: State::CatchingUp,
            position: None,
            last_event_time: None,
            applied: 0,
            started: Instant::now(),
        }));
        let (control, rx) = watch::channel(Control::Run);
        let (applied_tx, applied) = watch::channel(None);
        let store = self.store.clone();
        let source = self.source.clone();
        let shared = status.clone();
        let task = tokio::spawn(async move {
            let mut runner = self;
            let result = runner.run(&shared, &applied_tx, rx).await;
            let mut s = shared.lock().unwrap();
            s.state = match &result {
                Err(e @ ProjectionError::Handler { .. }) => State::Failed(e.to_string()),
                Err(e) => State::Failed(e.to_string()),
                Ok(()) => State::Stopped,
            };
            drop(s);
            // Wakes waiters: the runner has ended.
            applied_tx.send_modify(|_| {});
            (runner.sink, result)
        });
        RunnerHandle {
            status,
            applied,
            source,
            control,
            task,
            store,
            alert: Duration::from_secs(5),
        }
    }

    async fn run(
        &mut self,
        status: &Mutex<Status>,
        applied: &watch::Sender<Option<Position>>,
        mut control: watch::Receiver<Control>,
    ) -> Result<(), ProjectionError> {
        // Requests stored with the read model by other processes are polled this often.
        let mut poll = tokio::time::interval(REQUEST_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'subscribe: loop {
            self.sink.follows(&self.source).await?;
            let checkpoint = self.sink.checkpoint().await?;
            {
                let mut s = status.lock().unwrap();
                s.position = checkpoint.map(|c| c.0);
                s.last_event_time = checkpoint.map(|c| c.1);
            }
            applied.send_replace(checkpoint.map(|c| c.0));
            let from = checkpoint.map_or(StartFrom::Start, |(p, _)| StartFrom::After(p.0));
            let mut sub = self.store.subscribe(self.source.target(), from).await?;
            let mut batch: Vec<RecordedEvent> = Vec::with_capacity(self.batch);
            loop {
                let wanted = *control.borrow_and_update();
                if wanted == Control::Stop {
                    return Ok(());
                }
                let requested = self.sink.requested().await?;
                if requested.reset {
                    self.sink.reset().await?;
                    continue 'subscribe;
                }
                if wanted == Control::Pause || requested.paused {
                    status.lock().unwrap().state = State::Paused;
                    tokio::select! {
                        changed = control.changed() => if changed.is_err() { return Ok(()) },
                        _ = poll.tick() => {}
                    }
                    continue;
                }
                {
                    let mut s = status.lock().unwrap();
                    if s.state == State::Paused {
                        s.state = State::CatchingUp;
                    }
                }
                // Control first: a pause or reset given before an event
                // arrives takes effect before that event is applied.
                let first = tokio::select! {
                    biased;
                    // The handle is gone (Err): nobody can stop it any more, so it ends.
                    changed = control.changed() => if changed.is_err() { return Ok(()) } else { continue },
                    next = sub.next() => next,
                    _ = poll.tick() => continue,
                };
                let Some(first) = first else { return Ok(()) };
                let first = first?;
                // Take what is already there, up to a batch, without waiting.
                batch.clear();
                let mut checkpoint = (first.position, first.timestamp);
                if self.source.wants(&first) {
                    batch.push(first);
                }
                let (mut taken, mut caught_up, mut ended) = (1, false, false);
                while taken < self.batch {
                    match sub.next().now_or_never() {
                        Some(Some(Ok(e))) => {
                            checkpoint = (e.position, e.timestamp);
                            if self.source.wants(&e) {
                                batch.push(e);
                            }
                            taken += 1;
                        }
                        Some(Some(Err(e))) => return Err(e.into()),
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => {
                            caught_up = true;
                            break;
                        }
                    }
                }
                self.sink.apply(&batch, checkpoint).await?;
                let mut s = status.lock().unwrap();
                s.position = Some(checkpoint.0);
                s.last_event_time = Some(checkpoint.1);
                s.applied += batch.len() as u64;
                s.state = if caught_up { State::Live } else { State::CatchingUp };
                drop(s);
                applied.send_replace(Some(checkpoint.0));
                if ended {
                    return Ok(());
                }
            }
        }
    }
}

impl RunnerHandle {
    pub fn status(&self) -> Status {
        self.status.lock().unwrap().clone()
    }

    pub fn pause(&self) {
        let _ = self.control.send(Control::Pause);
    }

    pub fn resume(&self) {
        let _ = self.control.send(Control::Run);
    }

    /// Lag above this many seconds marks the projection unhealthy (default 5 s).
    pub fn alert_after(mut self, threshold: Duration) -> Self {
        self.alert = threshold;
        self
    }

    /// How far behind the store the projection is now.
    pub async fn lag(&self) -> Result<Lag, StoreError> {
        let status = self.status();
        lag(self.store.as_ref(), &self.source, status.position, status.last_event_time, self.alert)
            .await
    }

    /// Waits until the projection has applied every event of its source up to
    /// `position` (an event's position, such as an append's), or fails if the
    /// runner ends first.
    pub async fn wait_for(&self, position: Position) -> Result<(), ProjectionError> {
        let Some(target) = self.source.last_at(self.store.as_ref(), Some(position)).await? else {
            return Ok(());
        };
        let mut applied = self.applied.clone();
        loop {
            if applied.borrow_and_update().is_some_and(|p| p >= target) {
                return Ok(());
            }
            let s = self.status();
            if let State::Failed(reason) = s.state {
                return Err(ProjectionError::Stopped(format!("{}: {reason}", s.name)));
            }
            if self.task.is_finished() || applied.changed().await.is_err() {
                return Err(ProjectionError::Stopped(s.name));
            }
        }
    }

    /// Stops the runner after its current batch and gives the read model back.
    pub async fn stop(self) -> (Box<dyn Sink>, Result<(), ProjectionError>) {
        let _ = self.control.send(Control::Stop);
        match self.task.await {
            Ok(done) => done,
            Err(e) => panic!("projection runner panicked: {e}"),
        }
    }
}

/// Most events counted behind a projection (a count past it says "at least").
pub(crate) const LAG_COUNT_MAX: usize = 100_000;

/// The lag of a projection of `source` at `position` (whose last event was
/// appended at `time`).
pub async fn lag(
    store: &dyn EventStore,
    source: &Source,
    position: Option<Position>,
    time: Option<Timestamp>,
    alert: Duration,
) -> Result<Lag, StoreError> {
    let head = store.last_position().await?;
    let newest = source.last_at(store, head).await?;
    let behind = match (newest, position) {
        (Some(n), Some(p)) if n <= p => 0,
        (None, _) => 0,
        _ => source
            .read(store, position, LAG_COUNT_MAX)
            .await?
            .iter()
            .filter(|e| source.wants(e))
            .count() as u64,
    };
    let seconds = if behind == 0 {
        0.0
    } else {
        // Nothing applied yet: behind by the age of the oldest event it needs.
        let since = match time {
            Some(t) => t,
            None => {
                source.read(store, None, 1).await?.first().map_or(Timestamp::now(), |e| e.timestamp)
            }
        };
        (Timestamp::now().0 - since.0).max(0) as f64 / 1e6
    };
    Ok(Lag { position, head, events: behind, seconds, healthy: seconds <= alert.as_secs_f64() })
}

/// Progress of a rebuild.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub events: u64,
    pub position: Position,
    /// The store's newest event when the rebuild started.
    pub target: Position,
    pub elapsed: Duration,
}

impl Progress {
    pub fn events_per_s(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Share of the way to the target (by position, which grows with bytes written).
    pub fn fraction(&self) -> f64 {
        if self.target.0 == 0 {
            1.0
        } else {
            (self.position.0 as f64 / self.target.0 as f64).min(1.0)
        }
    }

    /// Estimated time left at the current rate.
    pub fn eta(&self) -> Duration {
        let f = self.fraction();
        if f <= 0.0 { Duration::ZERO } else { self.elapsed.mul_f64((1.0 - f) / f) }
    }
}

/// Brings `sink` up to the store's newest event from its checkpoint (from the
/// start for a fresh or reset model), in batches of `batch` events each
/// committed with its checkpoint; `progress` is told after every batch. Use it
/// to rebuild into a fresh model while the old one keeps serving, then swap.
/// The next batch is read on another task while this one is applied.
pub async fn rebuild(
    store: Arc<dyn EventStore>,
    source: &Source,
    sink: &mut dyn Sink,
    batch: usize,
    mut progress: impl FnMut(Progress),
) -> Result<Progress, ProjectionError> {
    let started = Instant::now();
    let target = store.last_position().await?.unwrap_or(Position::START);
    let at = sink.checkpoint().await?;
    let mut report = Progress {
        events: 0,
        position: at.map_or(Position::START, |c| c.0),
        target,
        elapsed: Duration::ZERO,
    };
    let batch = batch.max(1);
    let (pages, mut next_page) = tokio::sync::mpsc::channel(2);
    let reader = {
        let source = source.clone();
        tokio::spawn(async move {
            let mut after = at.map(|c| c.0);
            loop {
                let page = source.read(store.as_ref(), after, batch).await;
                let last = page.as_ref().ok().and_then(|p| p.last().map(|e| e.position));
                let full = page.as_ref().is_ok_and(|p| p.len() == batch);
                if pages.send(page).await.is_err() || !full {
                    return;
                }
                after = last;
            }
        })
    };
    let result = async {
        while let Some(page) = next_page.recv().await {
            let page = page?;
            let Some(last) = page.last() else { break };
            let checkpoint = (last.position, last.timestamp);
            let wanted: Vec<RecordedEvent> = page.into_iter().filter(|e| source.wants(e)).collect();
            sink.apply(&wanted, checkpoint).await?;
            report.events += wanted.len() as u64;
            report.position = checkpoint.0;
            report.elapsed = started.elapsed();
            progress(report);
        }
        Ok::<(), ProjectionError>(())
    }
    .await;
    reader.abort();
    result?;
    report.elapsed = started.elapsed();
    Ok(report)
}
