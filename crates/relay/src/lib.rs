//! The relay: moves committed events from the store to a broker, in order,
//! at least once, each message carrying the event's id so that the broker
//! (JetStream's `Nats-Msg-Id`) or the consumer (RabbitMQ's `message_id`) can
//! drop a repeat. Sinks: [`NatsSink`] (NATS JetStream) and [`RabbitSink`]
//! (a RabbitMQ topic exchange, with publisher confirms).
//!
//! It follows `$all` (user events; `$` streams are skipped) from a checkpoint
//! kept in the store itself (`$relay-<name>`), publishes in batches (default
//! 100), and moves the checkpoint only after the broker confirmed the batch.
//! A crash between the two publishes the batch again, with the same ids.
//! While the broker is down it retries with backoff, and reports its lag.

mod nats;
mod rabbitmq;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cairn_core::{
    EventStore, ExpectedVersion, NewEvent, Position, ReadAllOptions, ReadStreamOptions, RecordedEvent, StartFrom,
    StoreError, SubscriptionTarget, Timestamp, RELAY_STREAM_PREFIX,
};
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use nats::NatsSink;
pub use rabbitmq::RabbitSink;

/// Where events go. `publish` returns once the broker confirmed every event
/// of the batch, in the order given; an error means "try the batch again".
#[async_trait]
pub trait Sink: Send {
    async fn publish(&mut self, events: &[RecordedEvent]) -> Result<(), SinkError>;
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
    /// Most events per publish (default 100).
    pub batch: usize,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl RelayConfig {
    pub fn new(name: impl Into<String>) -> Self {
        RelayConfig { name: name.into(), batch: 100, first_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(5) }
    }

    pub fn batch(mut self, events: usize) -> Self {
        self.batch = events.max(1);
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
    /// Every event up to here is confirmed by the broker.
    pub checkpoint: Option<Position>,
    pub published: u64,
    /// Batches sent again after a failure.
    pub retries: u64,
    /// The broker's last refusal, while it lasts.
    pub error: Option<String>,
}

/// The stream that holds a relay's checkpoint.
pub fn checkpoint_stream(name: &str) -> String {
    format!("{RELAY_STREAM_PREFIX}{name}")
}

/// The position a relay has confirmed up to (`None`: nothing yet).
pub async fn stored_checkpoint(store: &dyn EventStore, name: &str) -> Result<Option<Position>, RelayError> {
    let stream = checkpoint_stream(name);
    let last = match store.read_stream(&stream, ReadStreamOptions::backward().limit(1)).await {
        Ok(events) => events.into_iter().next(),
        Err(StoreError::StreamNotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    match last {
        None => Ok(None),
        Some(e) => {
            let c: Checkpoint = e.json().map_err(|err| RelayError::Checkpoint { stream, reason: err.to_string() })?;
            Ok(Some(Position(c.position)))
        }
    }
}

/// Moves a relay's checkpoint (operators: to publish again from an earlier
/// position; the relay must be stopped).
pub async fn store_checkpoint(store: &dyn EventStore, name: &str, position: Position) -> Result<(), RelayError> {
    let event = NewEvent::json("RelayCheckpoint", &Checkpoint { position: position.0 }).expect("a checkpoint serialises");
    store.append(&checkpoint_stream(name), ExpectedVersion::Any, vec![event]).await?;
    Ok(())
}

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

    async fn run(mut self, status: Arc<Mutex<RelayStatus>>, mut stopped: watch::Receiver<bool>) -> Result<(), RelayError> {
        let mut checkpoint = stored_checkpoint(self.store.as_ref(), &self.config.name).await?;
        status.lock().unwrap().checkpoint = checkpoint;
        let from = checkpoint.map_or(StartFrom::Start, |p| StartFrom::After(p.0));
        let mut sub = self.store.subscribe(SubscriptionTarget::All, from).await?;
        let mut batch: Vec<RecordedEvent> = Vec::with_capacity(self.config.batch);
        loop {
            let first = tokio::select! {
                next = sub.next() => next,
                _ = stopped.wait_for(|&s| s) => return Ok(()),
            };
            let Some(first) = first else { return Ok(()) };
            let first = first?;
            batch.clear();
            let mut last = first.position;
            if !first.is_system() {
                batch.push(first);
            }
            while batch.len() < self.config.batch {
                match sub.next().now_or_never() {
                    Some(Some(Ok(e))) => {
                        last = e.position;
                        if !e.is_system() {
                            batch.push(e);
                        }
                    }
                    Some(Some(Err(e))) => return Err(e.into()),
                    _ => break,
                }
            }
            if !batch.is_empty() {
                let mut backoff = self.config.first_backoff;
                loop {
                    match self.sink.publish(&batch).await {
                        Ok(()) => {
                            let mut s = status.lock().unwrap();
                            s.published += batch.len() as u64;
                            s.error = None;
                            break;
                        }
                        Err(e) => {
                            {
                                let mut s = status.lock().unwrap();
                                s.retries += 1;
                                s.error = Some(e.0);
                            }
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = stopped.wait_for(|&s| s) => return Ok(()),
                            }
                            backoff = (backoff * 2).min(self.config.max_backoff);
                        }
                    }
                }
                // Only now is the batch the broker's: move the checkpoint.
                store_checkpoint(self.store.as_ref(), &self.config.name, last).await?;
            }
            checkpoint = Some(last);
            status.lock().unwrap().checkpoint = checkpoint;
        }
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
        let options = checkpoint.map_or(ReadAllOptions::forward(), |p| ReadAllOptions::forward().after(p)).limit(100_000);
        let events: Vec<RecordedEvent> = self.store.read_all(options).await?.into_iter().filter(|e| !e.is_system()).collect();
        let age = events.first().map_or(Duration::ZERO, |e| Duration::from_micros((Timestamp::now().0 - e.timestamp.0).max(0) as u64));
        Ok((events.len() as u64, age))
    }

    /// Stops after the batch in hand (its checkpoint written if it was confirmed).
    pub async fn stop(self) -> Result<(), RelayError> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(Ok(()))
    }
}
