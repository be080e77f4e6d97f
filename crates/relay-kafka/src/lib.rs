//! A Kafka sink for the relay (`cairn_relay::Sink`): one message per event,
//! keyed by its stream name so a stream stays in one partition and hence in
//! order, with the event id in the `cairn-id` header for consumers to drop a
//! repeat. An idempotent producer (acks=all, ordered retries) sends it.
//!
//! It is a crate of its own so that only those who use Kafka build librdkafka.

use std::time::Duration;

use async_trait::async_trait;
use cairn_core::{stream_category, ContentType, RecordedEvent};
use cairn_relay::{Confirm, Sink, SinkError};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

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
    producer: FutureProducer,
    topics: Topics,
}

/// How long a message may wait for the broker unless `message.timeout.ms` is
/// given: librdkafka's own default (5 min) would hide an outage from the relay.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl KafkaSink {
    /// A producer for `bootstrap_servers` with `config` applied on top of the
    /// defaults (any librdkafka producer setting, e.g. `message.timeout.ms`:
    /// how long a batch may wait for the broker before the relay retries it).
    /// `enable.idempotence` is always on: the order guarantee rests on it.
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
        c.set("enable.idempotence", "true");
        let producer = c.create().map_err(|e| SinkError(format!("Kafka producer: {e}")))?;
        Ok(KafkaSink { producer, topics })
    }

    /// The topic of an event.
    pub fn topic(&self, e: &RecordedEvent) -> String {
        match &self.topics {
            Topics::One(topic) => topic.clone(),
            Topics::PerCategory(prefix) => {
                let category: String = stream_category(&e.stream)
                    .unwrap_or("none")
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
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
    .fold(OwnedHeaders::new_with_capacity(6), |h, (key, value)| h.insert(Header { key, value: Some(value.as_str()) }))
}

#[async_trait]
impl Sink for KafkaSink {
    async fn send(&mut self, events: &[RecordedEvent]) -> Result<Confirm, SinkError> {
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
            let delivery = self.producer.send_result(record).map_err(|(err, _)| SinkError(format!("Kafka enqueue: {err}")))?;
            deliveries.push(delivery);
        }
        Ok(Box::pin(async move {
            // Wait for all of them even after a failure, so that nothing of
            // this batch is still in flight when the relay sends it again.
            let mut first_error = None;
            for delivery in deliveries {
                let error = match delivery.await {
                    Ok(Ok(_)) => continue,
                    Ok(Err((err, _))) => format!("Kafka did not confirm: {err}"),
                    Err(_) => "the Kafka producer dropped a delivery".to_string(),
                };
                first_error.get_or_insert(SinkError(error));
            }
            first_error.map_or(Ok(()), Err)
        }))
    }
}
