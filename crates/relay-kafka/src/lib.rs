//! A Kafka sink for the relay (`cairn_relay::Sink`): one message per event,
//! keyed by its stream name so a stream stays in one partition and hence in
//! order, with the event id in the `cairn-id` header for consumers to drop a
//! repeat. An idempotent producer (acks=all, ordered retries) sends it.
//!
//! A failed message must not be overtaken by later ones before the relay
//! sends it again, yet librdkafka goes on with what follows it in the
//! partition (after a message timeout or a refusal). So
//! `enable.gapless.guarantee` makes a refusal fatal to the producer (a new
//! one is made on the relay's reset), and a failure purges what is still
//! queued and refuses sends until that reset. Left open: a message sent in
//! the instant between librdkafka timing out an earlier one and that purge.
//!
//! It is a crate of its own so that only those who use Kafka build librdkafka.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cairn_core::{ContentType, RecordedEvent, stream_category};
use cairn_relay::{Confirm, Sink, SinkError};
use rdkafka::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};

/// Which topic an event goes to.
#[derive(Debug, Clone)]
pub enum Topics {
    /// Every event to this topic.
    One(String),
    /// `<prefix><category>`, `<prefix>none` for streams without a category.
    /// Characters Kafka does not allow in a topic name become `_`.
    PerCategory(String),
}

pub struct KafkaSink {
    config: ClientConfig,
    producer: FutureProducer,
    topics: Topics,
    /// The first failure since the last reset: sends are refused meanwhile.
    failed: Arc<Mutex<Option<String>>>,
}

/// How long a message may wait for the broker unless `message.timeout.ms` is
/// given: librdkafka's own default (5 min) would hide an outage from the relay.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl KafkaSink {
    /// A producer for `bootstrap_servers` with `config` applied on top of the
    /// defaults (any librdkafka producer setting, e.g. `message.timeout.ms`:
    /// how long a batch may wait for the broker before the relay retries it).
    /// `enable.idempotence` and `enable.gapless.guarantee` are always on: the
    /// order guarantee rests on them.
    pub fn new<'a>(
        bootstrap_servers: &str,
        topics: Topics,
        config: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, SinkError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", bootstrap_servers)
            .set("client.id", "cairn-relay")
            .set("message.timeout.ms", DEFAULT_DELIVERY_TIMEOUT.as_millis().to_string());
        for (k, v) in config {
            c.set(k, v);
        }
        c.set("enable.idempotence", "true").set("enable.gapless.guarantee", "true");
        let producer = c.create().map_err(|e| SinkError(format!("Kafka producer: {e}")))?;
        Ok(KafkaSink { config: c, producer, topics, failed: Arc::default() })
    }

    /// The topic of an event.
    pub fn topic(&self, e: &RecordedEvent) -> String {
        match &self.topics {
            Topics::One(topic) => topic.clone(),
            Topics::PerCategory(prefix) => {
                let category: String = stream_category(&e.stream)
                    .unwrap_or("none")
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                format!("{prefix}{category}")
            }
        }
    }
}

fn headers(e: &RecordedEvent) -> OwnedHeaders {
    let content_type = match e.content_type {
        ContentType::Json => "application/json",
        ContentType::Binary => "application/octet-stream",
    };
    [
        ("cairn-id", e.id.to_string()),
        ("cairn-stream", e.stream.clone()),
        ("cairn-version", e.version.to_string()),
        ("cairn-position", e.position.0.to_string()),
        ("cairn-type", e.event_type.clone()),
        ("content-type", content_type.to_string()),
    ]
    .into_iter()
    .fold(OwnedHeaders::new_with_capacity(6), |h, (key, value)| {
        h.insert(Header { key, value: Some(value.as_str()) })
    })
}

#[async_trait]
impl Sink for KafkaSink {
    async fn send(&mut self, events: &[RecordedEvent]) -> Result<Confirm, SinkError> {
        if let Some(error) = self.failed.lock().unwrap().clone() {
            return Err(SinkError(error));
        }
        // Enqueue the whole batch; the delivery reports are awaited later, in
        // order, while the relay sends the next batches. The idempotent
        // producer keeps a partition's order across its own retries.
        let mut deliveries = Vec::with_capacity(events.len());
        for e in events {
            let topic = self.topic(e);
            let record = FutureRecord::to(&topic)
                .key(e.stream.as_str())
                .payload(&e.data[..])
                .timestamp(e.timestamp.0 / 1000)
                .headers(headers(e));
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(err, _)| SinkError(format!("Kafka enqueue: {err}")))?;
            deliveries.push(delivery);
        }
        let (producer, failed) = (self.producer.clone(), self.failed.clone());
        Ok(Box::pin(async move {
            // Wait for all of them even after a failure, so that nothing of
            // this batch is still in flight when the relay sends it again.
            let mut first_error = None;
            for delivery in deliveries {
                let (error, purged) = match delivery.await {
                    Ok(Ok(_)) => continue,
                    Ok(Err((err, _))) => (
                        format!("Kafka did not confirm: {err}"),
                        err.rdkafka_error_code() == Some(RDKafkaErrorCode::PurgeQueue),
                    ),
                    Err(_) => ("the Kafka producer dropped a delivery".to_string(), false),
                };
                if first_error.is_none() {
                    failed.lock().unwrap().get_or_insert_with(|| error.clone());
                    // Fail what is still queued (unless this failure is such
                    // a purge) rather than let it overtake this message. Not
                    // what is in flight: it may be persisted whatever we do,
                    // and cannot land past a gap (a message times out unsent
                    // only if all after it in its partition's FIFO queue are
                    // unsent too; after a refusal the broker rejects what
                    // follows as out of sequence and the producer is fatal).
                    if !purged {
                        producer.purge(PurgeConfig::default().queue());
                    }
                }
                first_error.get_or_insert(SinkError(error));
            }
            first_error.map_or(Ok(()), Err)
        }))
    }

    /// Everything sent has settled: sends are accepted again, on a new
    /// producer if this one had a fatal error (a refusal under the gapless
    /// guarantee). Otherwise the producer recovers by itself (a new epoch).
    async fn reset(&mut self) {
        *self.failed.lock().unwrap() = None;
        if self.producer.client().fatal_error().is_some() {
            // On failure keep the old one: sends fail and the relay retries.
            if let Ok(producer) = self.config.create::<FutureProducer>() {
                let old = std::mem::replace(&mut self.producer, producer);
                // Dropping a producer blocks (it flushes and joins threads).
                std::thread::spawn(move || drop(old));
            }
        }
    }
}
