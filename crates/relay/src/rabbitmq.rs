//! RabbitMQ: one persistent message per event on a durable topic exchange,
//! with routing key `<category or "none">.<type>` and `message_id` set to the
//! event id. RabbitMQ does not drop repeats itself: consumers dedupe on
//! `message_id`. Queues get their share through bindings (`order.*`,
//! `*.PaymentFailed`); an event no binding matches is dropped by the broker.
//!
//! Batches are pipelined on one channel in confirm mode: a batch's messages
//! are handed to the channel in order without waiting, and its confirm
//! awaits their acks. A lost connection fails every later batch until the
//! relay, once nothing is in flight, resets the sink; only then does it
//! connect again. A nack (say, a queue of `x-overflow: reject-publish` that
//! is full) does not stop RabbitMQ from accepting the next messages, so a
//! later event can land before the repeat of a refused one; consumers that
//! need strict order per stream should not let the broker refuse messages.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use async_trait::async_trait;
use cairn_core::{ContentType, RecordedEvent, stream_category};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};
use tokio::time::Instant;

use crate::{Confirm, Sink, SinkError};

pub struct RabbitSink {
    uri: String,
    exchange: ShortString,
    confirm_timeout: Duration,
    /// `None` until the first use and after a reset (the relay's, after a
    /// failure): the next batch connects again. A link lost meanwhile fails
    /// each batch until then.
    link: Option<(Connection, Channel)>,
}

/// A routing-key word from free text: dots separate words, `*` and `#` are wildcards.
fn word(text: &str) -> String {
    let w: String = text
        .chars()
        .map(|c| if c.is_whitespace() || matches!(c, '.' | '*' | '#') { '_' } else { c })
        .collect();
    if w.is_empty() { "_".into() } else { w }
}

fn short(text: &str, what: &str) -> Result<ShortString, SinkError> {
    ShortString::try_new(text).map_err(|e| SinkError(format!("{what} {text:?}: {e}")))
}

fn amqp(what: &str) -> impl Fn(lapin::Error) -> SinkError + '_ {
    move |e| SinkError(format!("RabbitMQ {what}: {e}"))
}

impl RabbitSink {
    /// Publishes to the topic exchange `exchange` (declared durable by the
    /// sink) of the broker at `uri`, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`
    /// (`amqps://` for TLS). Connects on first use.
    pub fn new(uri: impl Into<String>, exchange: &str) -> Result<Self, SinkError> {
        let exchange = short(exchange, "exchange name")?;
        Ok(RabbitSink {
            uri: uri.into(),
            exchange,
            confirm_timeout: Duration::from_secs(5),
            link: None,
        })
    }

    /// How long RabbitMQ may take to confirm a batch, from its sending
    /// (connecting included), before it is sent again (default 5 s). While
    /// the broker is away, this is how soon the relay notices and reports it.
    pub fn confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// The routing key of an event: `<category or "none">.<type>`, cut to
    /// AMQP's 255 bytes.
    pub fn routing_key(e: &RecordedEvent) -> String {
        let mut key = format!(
            "{}.{}",
            word(stream_category(&e.stream).unwrap_or("none")),
            word(&e.event_type)
        );
        if key.len() > 255 {
            let mut end = 255;
            while !key.is_char_boundary(end) {
                end -= 1;
            }
            key.truncate(end);
        }
        key
    }

    /// Declares the durable queue `queue` and binds it to the exchange with
    /// `pattern` (`order.*`, `*.PaymentFailed`, `#`); call it once per
    /// pattern. Queues declared before the relay starts miss nothing.
    pub async fn bind_queue(&mut self, queue: &str, pattern: &str) -> Result<(), SinkError> {
        self.bind_queue_with(queue, pattern, FieldTable::default()).await
    }

    /// [`RabbitSink::bind_queue`] with queue arguments (`x-queue-type`,
    /// `x-max-length`...): a queue must be declared with the same ones each time.
    pub async fn bind_queue_with(
        &mut self,
        queue: &str,
        pattern: &str,
        arguments: FieldTable,
    ) -> Result<(), SinkError> {
        let (queue, pattern) = (short(queue, "queue name")?, short(pattern, "binding pattern")?);
        let exchange = self.exchange.clone();
        let result = async {
            let channel = self.channel().await?;
            channel
                .queue_declare(queue.clone(), QueueDeclareOptions::durable(), arguments)
                .await
                .map_err(amqp("queue declare"))?;
            channel
                .queue_bind(
                    queue,
                    exchange,
                    pattern,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp("queue bind"))
        }
        .await;
        if result.is_err() {
            self.link = None;
        }
        result
    }

    /// The open channel, in confirm mode, with the exchange declared;
    /// connects first if there is none or it was lost.
    async fn channel(&mut self) -> Result<Channel, SinkError> {
        if let Some((connection, channel)) = &self.link
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        self.link = None;
        let properties = ConnectionProperties::default().with_connection_name("cairn-relay".into());
        let connection =
            Connection::connect(&self.uri, properties).await.map_err(amqp("connect"))?;
        let channel = connection.create_channel().await.map_err(amqp("channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("confirm select"))?;
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        channel
            .exchange_declare(
                self.exchange.clone(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(amqp("exchange declare"))?;
        self.link = Some((connection, channel.clone()));
        Ok(channel)
    }

    /// Queues the batch's messages on the channel, in order, and returns
    /// what awaits their confirms.
    async fn queue(
        &mut self,
        events: &[RecordedEvent],
        deadline: Instant,
    ) -> Result<Confirm, SinkError> {
        // Never reconnect behind messages that may be unconfirmed on a lost
        // channel: fail, and the relay resets once everything settled.
        if let Some((connection, channel)) = &self.link
            && !(connection.status().connected() && channel.status().connected())
        {
            return Err(SinkError("RabbitMQ connection lost".into()));
        }
        let channel = self.channel().await?;
        let mut queued = Vec::with_capacity(events.len());
        let mut cx = Context::from_waker(Waker::noop());
        for e in events {
            let (channel, exchange, data) =
                (channel.clone(), self.exchange.clone(), e.data.clone());
            let (key, properties) = (short(&Self::routing_key(e), "routing key")?, properties(e));
            let mut publish: Publishing = Box::pin(async move {
                channel
                    .basic_publish(exchange, key, BasicPublishOptions::default(), &data, properties)
                    .await
            });
            // The first poll puts the frames in the channel's queue (and
            // numbers the message for its confirm), so the messages go out
            // in this order; the write itself is awaited with the confirms.
            queued.push(match publish.as_mut().poll(&mut cx) {
                Poll::Ready(Err(err)) => return Err(amqp("publish")(err)),
                Poll::Ready(Ok(confirm)) => Queued::Written(confirm),
                Poll::Pending => Queued::Writing(publish),
            });
        }
        let ids: Vec<String> = events.iter().map(|e| e.id.to_string()).collect();
        let timeout = self.confirm_timeout;
        Ok(Box::pin(async move {
            let confirms = async {
                for (q, id) in queued.into_iter().zip(ids) {
                    let confirm = match q {
                        Queued::Written(confirm) => confirm,
                        Queued::Writing(publish) => publish.await.map_err(amqp("publish"))?,
                    };
                    match confirm.await.map_err(amqp("confirm"))? {
                        Confirmation::Ack(_) => {}
                        Confirmation::Nack(_) => {
                            return Err(SinkError(format!("RabbitMQ refused event {id} (nack)")));
                        }
                        Confirmation::NotRequested => {
                            return Err(SinkError(
                                "RabbitMQ channel is not in confirm mode".into(),
                            ));
                        }
                    }
                }
                Ok(())
            };
            tokio::time::timeout_at(deadline, confirms)
                .await
                .map_err(|_| SinkError(format!("RabbitMQ did not confirm within {timeout:?}")))?
        }))
    }
}

type Publishing = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send>>;

/// A message handed to the channel: written already, or still being written.
enum Queued {
    Written(PublisherConfirm),
    Writing(Publishing),
}

fn properties(e: &RecordedEvent) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers
        .insert("cairn-stream".into(), AMQPValue::LongString(LongString::from(e.stream.as_str())));
    headers.insert("cairn-version".into(), AMQPValue::LongLongInt(e.version as i64));
    headers.insert("cairn-position".into(), AMQPValue::LongLongInt(e.position.0 as i64));
    let content_type = match e.content_type {
        ContentType::Json => "application/json",
        ContentType::Binary => "application/octet-stream",
    };
    let properties = BasicProperties::default()
        .with_message_id(e.id.to_string().into())
        .with_timestamp((e.timestamp.0.max(0) / 1_000_000) as u64) // AMQP counts seconds
        .with_delivery_mode(2) // persistent
        .with_content_type(content_type.into())
        .with_headers(headers);
    // A type of the store's maximum, 256 bytes, does not fit a short string;
    // the routing key still names it.
    match ShortString::try_new(e.event_type.as_str()) {
        Ok(t) => properties.with_type(t),
        Err(_) => properties,
    }
}

#[async_trait]
impl Sink for RabbitSink {
    async fn send(&mut self, events: &[RecordedEvent]) -> Result<Confirm, SinkError> {
        let timeout = self.confirm_timeout;
        let deadline = Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, self.queue(events, deadline)).await {
            Ok(result) => result,
            Err(_) => {
                Err(SinkError(format!("RabbitMQ did not take the messages within {timeout:?}")))
            }
        }
    }

    async fn reset(&mut self) {
        // Start afresh: the next batch connects again.
        if let Some((connection, _)) = self.link.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                connection.close(200, "cairn relay: reconnecting".into()),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::word;

    #[test]
    fn words_hold_no_separator_or_wildcard() {
        assert_eq!(word("Order.Placed v2*#"), "Order_Placed_v2__");
        assert_eq!(word(""), "_");
        assert_eq!(word("PaymentFailed"), "PaymentFailed");
    }
}
