//! The relay: moves committed events from the store to a broker, in order,
//! at least once, each message carrying the event's id so that the broker
//! (JetStream's `Nats-Msg-Id`) or the consumer (RabbitMQ's `message_id`,
//! Kafka's `cairn-id` header) can drop a repeat. Sinks: [`NatsSink`] (NATS
//! JetStream), [`RabbitSink`] (a RabbitMQ topic exchange, with publisher
//! confirms) and, in `cairn-relay-kafka`, `KafkaSink`.
//!
//! It follows `$all` (user events; `$` streams are skipped) from a checkpoint
//! kept in the store itself (`$relay-<name>`) and sends batches (default 100
//! events) **pipelined**: the next batches go out while the broker has not
//! yet confirmed the earlier ones, up to [`RelayConfig::max_in_flight`]
//! batches' worth of events (default 8 × 100), always through one connection
//! and in order. Confirms are taken in order: the checkpoint only ever moves
//! to the end of the longest confirmed prefix. On any failure (refusal, lost
//! connection, timeout) the relay lets everything in flight settle, then,
//! after a backoff, sends again everything not confirmed, from the oldest
//! unconfirmed event, with the same ids; the window restarts at one batch
//! and grows back by one batch for every `max_in_flight` batches confirmed,
//! so that a broker that just failed is not flooded. Meanwhile it reports
//! its lag and the broker's error.
//!
//! The checkpoint is **written** (one append to `$relay-<name>`, hence one
//! durable write) when the confirmed prefix has moved and either
//! [`RelayConfig::checkpoint_interval`] (100 ms) has passed since the last
//! write, or the relay has nothing left to send or confirm, or it stops; not
//! after every batch. A crash therefore publishes again, with the same ids,
//! what was confirmed since the last write (at most about one interval's
//! worth of events) plus what was in flight.
//!
//! Order on the broker: messages leave in global order on one connection,
//! and a sink never reconnects while messages sent on the old connection may
//! be unconfirmed. Two cases can still put a later event ahead of an earlier
//! one's repeat, and pipelining widens both from one batch to the window:
//! a RabbitMQ nack (an overflowing queue refuses a message, then accepts the
//! next ones) and, with [`NatsSink::chained`] turned off, a reconnect of the
//! NATS client (it sends what it had queued, while what was on the lost
//! connection is gone). Chained (the default), JetStream refuses a message
//! whose predecessor is missing, so that cannot happen on NATS. Kafka's
//! idempotent producer keeps each partition in order across its retries,
//! and after a failure `KafkaSink` fails what it still has queued (but for
//! a narrow race after a message timeout: see `cairn-relay-kafka`).
//!
//! Features (both on by default): `nats` for [`NatsSink`], `rabbitmq` for
//! [`RabbitSink`]; with neither, the relay runs any [`Sink`] of your own.

#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "rabbitmq")]
mod rabbitmq;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cairn_core::{
    CheckpointStream, EventStore, Position, RELAY_STREAM_PREFIX, ReadAllOptions, RecordedEvent,
    StartFrom, StoreError, SubscriptionTarget, Timestamp,
};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

#[cfg(feature = "nats")]
pub use nats::NatsSink;
#[cfg(feature = "rabbitmq")]
pub use rabbitmq::RabbitSink;

/// What [`Sink::send`] returns: resolves once the broker confirmed every
/// event of the batch (`Ok`), or as soon as it is known that it will not
/// (`Err`: refused, connection lost, timed out). It must resolve within a
/// bounded time (each sink has a timeout).
pub type Confirm = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'static>>;

/// Where events go.
///
/// The relay calls [`Sink::send`] for batch after batch without waiting for
/// the earlier ones to be confirmed, and awaits the returned [`Confirm`]s in
/// order. A sink must put the messages on the wire in the order of the calls
/// (one connection, one channel), and must not let later messages reach the
/// broker through a new connection while messages sent on the old one may
/// have been lost: [`RabbitSink`] fails the call instead of reconnecting,
/// [`NatsSink`] (whose client reconnects by itself) has JetStream refuse a
/// message whose predecessor is missing. After any failure the relay waits
/// for every confirm in flight to settle, calls [`Sink::reset`], and sends
/// the unconfirmed events again.
#[async_trait]
pub trait Sink: Send {
    /// Sends `events`, in order, after everything sent before, and returns
    /// without waiting for the broker's confirms. `Err`: the batch may be
    /// partly sent; it is sent again.
    async fn send(&mut self, events: &[RecordedEvent]) -> Result<Confirm, SinkError>;

    /// Called after a failure, once nothing is in flight, before the
    /// unconfirmed events are sent again: the place to drop a connection
    /// that may be unusable. The default does nothing.
    async fn reset(&mut self) {}

    /// One batch, sent and confirmed: `send`, then await its confirm.
    async fn publish(&mut self, events: &[RecordedEvent]) -> Result<(), SinkError> {
        self.send(events).await?.await
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the relay's checkpoint in {stream} is unreadable: {reason}")]
    Checkpoint { stream: String, reason: String },
}

/// How a relay runs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Names the checkpoint stream (`$relay-<name>`): one per destination.
    pub name: String,
    /// Most events per send (default 100).
    pub batch: usize,
    /// How many batches' worth of events (`max_in_flight × batch`) may be
    /// sent and not yet confirmed (default 8). Counted in events so that
    /// live events, sent as they come in batches of one or two, can be many
    /// in flight too. `1`: one batch at a time, each confirmed before the next.
    pub max_in_flight: usize,
    /// While busy, the checkpoint is written at most this often (default
    /// 100 ms); when idle or stopping, at once.
    pub checkpoint_interval: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl RelayConfig {
    pub fn new(name: impl Into<String>) -> Self {
        RelayConfig {
            name: name.into(),
            batch: 100,
            max_in_flight: 8,
            checkpoint_interval: Duration::from_millis(100),
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }

    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
        self
    }

    /// See [`RelayConfig::max_in_flight`] (at least 1).
    pub fn max_in_flight(mut self, batches: usize) -> Self {
        self.max_in_flight = batches.max(1);
        self
    }

    /// See [`RelayConfig::checkpoint_interval`].
    pub fn checkpoint_interval(mut self, interval: Duration) -> Self {
        self.checkpoint_interval = interval;
        self
    }

    pub fn backoff(mut self, first: Duration, max: Duration) -> Self {
        self.first_backoff = first;
        self.max_backoff = max;
        self
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Checkpoint {
    position: u64,
}

/// A relay's figures.
#[derive(Debug, Clone, Default)]
pub struct RelayStatus {
    /// Every event up to here is confirmed by the broker (held in memory;
    /// written to the store within [`RelayConfig::checkpoint_interval`]).
    pub checkpoint: Option<Position>,
    /// The checkpoint as last written to `$relay-<name>`: where the relay
    /// would start again after a crash.
    pub durable_checkpoint: Option<Position>,
    /// Events the broker confirmed (repeats after a failure included).
    pub published: u64,
    /// Events sent and not yet confirmed.
    pub in_flight: u64,
    /// Failures after which unconfirmed events were sent again.
    pub retries: u64,
    /// The broker's last refusal, while it lasts.
    pub error: Option<String>,
}

/// The stream that holds a relay's checkpoint.
pub fn checkpoint_stream(name: &str) -> String {
    format!("{RELAY_STREAM_PREFIX}{name}")
}

/// A relay's checkpoints (bounded: see [`CheckpointStream`]).
fn checkpoints(name: &str) -> CheckpointStream<Checkpoint> {
    CheckpointStream::new(checkpoint_stream(name), "RelayCheckpoint")
}

/// The position a relay has confirmed up to (`None`: nothing yet).
pub async fn stored_checkpoint(
    store: &dyn EventStore,
    name: &str,
) -> Result<Option<Position>, RelayError> {
    let stream = checkpoints(name);
    match stream.load(store).await {
        Ok(c) => Ok(c.map(|(c, _)| Position(c.position))),
        Err(StoreError::Corrupt { reason, .. }) => {
            Err(RelayError::Checkpoint { stream: stream.stream().to_string(), reason })
        }
        Err(e) => Err(e.into()),
    }
}

/// Moves a relay's checkpoint (operators: to publish again from an earlier
/// position; the relay must be stopped).
pub async fn store_checkpoint(
    store: &dyn EventStore,
    name: &str,
    position: Position,
) -> Result<(), RelayError> {
    checkpoints(name).save(store, &Checkpoint { position: position.0 }).await?;
    Ok(())
}

///
/// With a sink of your own (here: a list in memory):
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use cairn_core::{EventStore, ExpectedVersion, NewEvent, RecordedEvent};
/// use cairn_relay::{Confirm, Relay, RelayConfig, Sink, SinkError};
///
/// struct Collect(Arc<Mutex<Vec<String>>>);
/// #[async_trait::async_trait]
/// impl Sink for Collect {
///     async fn send(&mut self, events: &[RecordedEvent]) -> Result<Confirm, SinkError> {
///         self.0.lock().unwrap().extend(events.iter().map(|e| e.event_type.clone()));
///         Ok(Box::pin(async { Ok(()) })) // confirmed at once
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let store: Arc<dyn EventStore> = Arc::new(cairn_log::EmbeddedStore::open(dir.path())?);
/// let placed = NewEvent::json("OrderPlaced", &serde_json::json!({}))?;
/// let written = store.append("order-1", ExpectedVersion::NoStream, vec![placed]).await?;
/// let sent = Arc::new(Mutex::new(Vec::new()));
/// let relay = Relay::new(store, RelayConfig::new("outbox"), Collect(sent.clone())).spawn();
/// while relay.status().checkpoint < Some(written.position) {
///     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
/// }
/// assert_eq!(*sent.lock().unwrap(), ["OrderPlaced"]);
/// relay.stop().await?;
/// # Ok(())
/// # }
/// ```
/// A relay from a store to a sink.
pub struct Relay<S: Sink> {
    store: Arc<dyn EventStore>,
    config: RelayConfig,
    sink: S,
}

/// A running relay.
pub struct RelayHandle {
    status: Arc<Mutex<RelayStatus>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), RelayError>>,
    store: Arc<dyn EventStore>,
}

/// Events read from the subscription and sent together. `last` covers the
/// system events read with them (skipped, never sent); a batch of system
/// events only has no events and needs no confirm.
struct Batch {
    events: Vec<RecordedEvent>,
    last: Position,
}

type Settling = Pin<Box<dyn Future<Output = (u64, Result<(), SinkError>)> + Send>>;

/// A checkpoint being written; its position once written.
type Writing = Pin<Box<dyn Future<Output = Result<Position, RelayError>> + Send>>;

/// The batches sent and not yet taken as confirmed, in the order sent.
#[derive(Default)]
struct Pipeline {
    /// Each with its outcome once known (`None`: waiting for the broker).
    entries: VecDeque<(Batch, Option<Result<(), String>>)>,
    /// The sequence number of `entries[0]`.
    first: u64,
    confirms: FuturesUnordered<Settling>,
    /// User events in `entries`.
    events: usize,
}

impl Pipeline {
    fn push(&mut self, batch: Batch, confirm: Option<Confirm>) {
        let seq = self.first + self.entries.len() as u64;
        self.events += batch.events.len();
        let outcome = match confirm {
            Some(confirm) => {
                self.confirms.push(Box::pin(confirm.map(move |r| (seq, r))));
                None
            }
            None => Some(Ok(())),
        };
        self.entries.push_back((batch, outcome));
    }

    fn settled(&mut self, seq: u64, outcome: Result<(), SinkError>) {
        let i = (seq - self.first) as usize;
        self.entries[i].1 = Some(outcome.map_err(|e| e.0));
    }

    /// The oldest batch, if the broker confirmed it.
    fn pop_confirmed(&mut self) -> Option<Batch> {
        if !matches!(self.entries.front(), Some((_, Some(Ok(()))))) {
            return None;
        }
        let (batch, _) = self.entries.pop_front()?;
        self.first += 1;
        self.events -= batch.events.len();
        Some(batch)
    }

    /// The first failure among the batches in flight.
    fn failure(&self) -> Option<String> {
        self.entries.iter().find_map(|(_, outcome)| match outcome {
            Some(Err(e)) => Some(e.clone()),
            _ => None,
        })
    }

    /// Every confirm has resolved.
    fn all_settled(&self) -> bool {
        self.confirms.is_empty()
    }

    /// Everything left, to be sent again (only once all settled).
    fn take_unconfirmed(&mut self) -> Vec<Batch> {
        debug_assert!(self.confirms.is_empty());
        self.first += self.entries.len() as u64;
        self.events = 0;
        self.entries.drain(..).map(|(b, _)| b).collect()
    }
}

impl<S: Sink + 'static> Relay<S> {
    pub fn new(store: Arc<dyn EventStore>, config: RelayConfig, sink: S) -> Self {
        Relay { store, config, sink }
    }

    pub fn spawn(self) -> RelayHandle {
        let status = Arc::new(Mutex::new(RelayStatus::default()));
        let (stop, stopped) = watch::channel(false);
        let store = self.store.clone();
        let shared = status.clone();
        let task = tokio::spawn(async move { self.run(shared, stopped).await });
        RelayHandle { status, stop, task, store }
    }

    async fn run(
        mut self,
        status: Arc<Mutex<RelayStatus>>,
        mut stopped: watch::Receiver<bool>,
    ) -> Result<(), RelayError> {
        let durable = stored_checkpoint(self.store.as_ref(), &self.config.name).await?;
        {
            let mut s = status.lock().unwrap();
            s.checkpoint = durable;
            s.durable_checkpoint = durable;
        }
        let from = durable.map_or(StartFrom::Start, |p| StartFrom::After(p.0));
        let mut sub = self.store.subscribe(SubscriptionTarget::All, from).await?;

        let batch_size = self.config.batch.max(1);
        let interval = self.config.checkpoint_interval;
        let mut progress = Progress {
            status,
            checkpoint: durable,
            dirty: false,
            window: self.config.max_in_flight.max(1),
            max_window: self.config.max_in_flight.max(1),
            confirmed_in_window: 0,
            backoff: cairn_core::Backoff::new(self.config.first_backoff, self.config.max_backoff)
                .with_jitter(0.3),
            failures: 0,
        };
        let mut pipeline = Pipeline::default();
        // Sent before and not confirmed, to send again first, in order.
        let mut resend: VecDeque<Batch> = VecDeque::new();
        // An event read while waiting, not yet in a batch.
        let mut carried: Option<RecordedEvent> = None;
        let mut written_at = Instant::now();
        let mut writing: Option<Writing> = None;
        // A failure seen, waiting for everything in flight to settle.
        let mut failing: Option<String> = None;
        let mut retry_at: Option<Instant> = None;
        let mut stopping = false;
        let mut closed = false;

        loop {
            if retry_at.is_some_and(|t| Instant::now() >= t) {
                retry_at = None;
            }
            progress.advance(&mut pipeline);

            // A failure: once nothing is in flight any more, everything not
            // confirmed goes again, oldest first, after a backoff, with a
            // window of one batch that grows back as batches are confirmed.
            if failing.is_none() {
                failing = pipeline.failure();
            }
            if failing.is_some() && pipeline.all_settled() {
                for batch in pipeline.take_unconfirmed().into_iter().rev() {
                    resend.push_front(batch);
                }
                {
                    let mut s = progress.status.lock().unwrap();
                    s.retries += 1;
                    s.error = failing.take();
                    s.in_flight = 0;
                }
                self.sink.reset().await;
                progress.window = 1;
                progress.confirmed_in_window = 0;
                retry_at = Some(Instant::now() + progress.backoff.delay(progress.failures));
                progress.failures = progress.failures.saturating_add(1);
            }

            // Send while the window has room: first what must go again, then
            // what the subscription has ready, without waiting for more.
            let sending = !stopping && !closed && failing.is_none() && retry_at.is_none();
            let mut idle = false;
            while sending && failing.is_none() {
                let limit = progress.window * batch_size;
                if pipeline.events >= limit {
                    break;
                }
                let batch = if let Some(b) = resend.front() {
                    if pipeline.events > 0 && pipeline.events + b.events.len() > limit {
                        break;
                    }
                    resend.pop_front().expect("a batch to send again")
                } else {
                    let take = (limit - pipeline.events).min(batch_size);
                    let mut events = Vec::new();
                    let mut last = None;
                    let mut next = carried.take().map(Ok);
                    loop {
                        match next {
                            Some(Ok(e)) => {
                                last = Some(e.position);
                                if !e.is_system() {
                                    events.push(e);
                                }
                            }
                            Some(Err(e)) => return Err(e),
                            None => {}
                        }
                        if events.len() >= take {
                            break;
                        }
                        next = match sub.next().now_or_never() {
                            Some(Some(result)) => Some(result.map_err(RelayError::from)),
                            Some(None) => {
                                closed = true;
                                break;
                            }
                            None => {
                                idle = true;
                                break;
                            }
                        };
                    }
                    let Some(last) = last else { break };
                    Batch { events, last }
                };
                if batch.events.is_empty() {
                    pipeline.push(batch, None);
                } else {
                    match self.sink.send(&batch.events).await {
                        Ok(confirm) => pipeline.push(batch, Some(confirm)),
                        Err(e) => {
                            resend.push_front(batch);
                            failing = Some(e.0);
                        }
                    }
                }
                if idle || closed {
                    break;
                }
            }
            progress.advance(&mut pipeline);

            // Write the checkpoint: at most every `interval` while busy, at
            // once when there is nothing left to do, and when stopping.
            let finishing = (stopping || closed) && pipeline.all_settled();
            let quiet =
                idle && pipeline.entries.is_empty() && resend.is_empty() && carried.is_none();
            if progress.dirty
                && writing.is_none()
                && (finishing || quiet || written_at.elapsed() >= interval)
            {
                let (store, name) = (self.store.clone(), self.config.name.clone());
                let position = progress.checkpoint.expect("a confirmed position");
                writing = Some(Box::pin(async move {
                    store_checkpoint(store.as_ref(), &name, position).await.map(|()| position)
                }));
                progress.dirty = false;
                written_at = Instant::now();
            }
            if finishing && !progress.dirty && writing.is_none() {
                return Ok(());
            }
            if failing.is_some() && pipeline.all_settled() {
                continue; // nothing to wait for: handle the failure now
            }

            // Wait for the next thing to do.
            let can_read = sending
                && failing.is_none()
                && resend.is_empty()
                && carried.is_none()
                && pipeline.events < progress.window * batch_size;
            let next_write = written_at + interval;
            let retry = retry_at.unwrap_or_else(Instant::now);
            tokio::select! {
                biased;
                _ = stopped.wait_for(|&s| s), if !stopping => stopping = true,
                written = async { writing.as_mut().expect("a write").await }, if writing.is_some() => {
                    writing = None;
                    let position = written?;
                    progress.status.lock().unwrap().durable_checkpoint = Some(position);
                }
                Some((seq, outcome)) = pipeline.confirms.next(), if !pipeline.confirms.is_empty() => {
                    pipeline.settled(seq, outcome);
                    // Take every answer already in, so that a failure is
                    // seen before the room its predecessors leave is used.
                    while let Some(Some((seq, outcome))) = pipeline.confirms.next().now_or_never() {
                        pipeline.settled(seq, outcome);
                    }
                }
                next = sub.next(), if can_read => match next {
                    Some(Ok(e)) => carried = Some(e),
                    Some(Err(e)) => return Err(e.into()),
                    None => closed = true,
                },
                _ = tokio::time::sleep_until(next_write), if progress.dirty && writing.is_none() => {}
                _ = tokio::time::sleep_until(retry), if retry_at.is_some() => {}
            }
        }
    }
}

/// The confirmed prefix and what follows from it.
struct Progress {
    status: Arc<Mutex<RelayStatus>>,
    /// Every event up to here is confirmed.
    checkpoint: Option<Position>,
    /// Confirmed user events beyond the last checkpoint written.
    dirty: bool,
    /// Batches that may be in flight: 1 after a failure, one more for every
    /// `max_window` batches confirmed since, up to `max_window`.
    window: usize,
    max_window: usize,
    /// Batches confirmed since the window last grew.
    confirmed_in_window: usize,
    backoff: cairn_core::Backoff,
    /// Failures in a row, since a batch was last confirmed.
    failures: u32,
}

impl Progress {
    /// Takes the batches confirmed in order from the front of the pipeline.
    fn advance(&mut self, pipeline: &mut Pipeline) {
        let mut s = self.status.lock().unwrap();
        while let Some(batch) = pipeline.pop_confirmed() {
            self.checkpoint = Some(batch.last);
            s.checkpoint = self.checkpoint;
            if !batch.events.is_empty() {
                self.dirty = true;
                self.failures = 0;
                self.confirmed_in_window += 1;
                if self.confirmed_in_window >= self.max_window && self.window < self.max_window {
                    self.window += 1;
                    self.confirmed_in_window = 0;
                }
                s.published += batch.events.len() as u64;
                s.error = None;
            }
        }
        s.in_flight = pipeline.events as u64;
    }
}

impl RelayHandle {
    pub fn status(&self) -> RelayStatus {
        self.status.lock().unwrap().clone()
    }

    /// Events after the checkpoint not yet confirmed (counted up to 100,000),
    /// and how long the oldest of them has waited.
    pub async fn pending(&self) -> Result<(u64, Duration), StoreError> {
        let checkpoint = self.status().checkpoint;
        let options = checkpoint
            .map_or(ReadAllOptions::forward(), |p| ReadAllOptions::forward().after(p))
            .limit(100_000);
        let events: Vec<RecordedEvent> =
            self.store.read_all(options).await?.into_iter().filter(|e| !e.is_system()).collect();
        let age = events.first().map_or(Duration::ZERO, |e| {
            Duration::from_micros((Timestamp::now().0 - e.timestamp.0).max(0) as u64)
        });
        Ok((events.len() as u64, age))
    }

    /// Stops: sends nothing more, waits for the confirms of what is in
    /// flight (each sink bounds that wait), writes the checkpoint of
    /// everything confirmed, and returns.
    pub async fn stop(self) -> Result<(), RelayError> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(Ok(()))
    }
}
