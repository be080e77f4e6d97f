//! NATS JetStream: one message per event on `<prefix>.<category>.<type>`,
//! with `Nats-Msg-Id` set to the event id so that JetStream drops a repeat
//! within its duplicate window.

use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::HeaderMap;
use async_trait::async_trait;
use cairn_core::{stream_category, RecordedEvent};

use crate::{Sink, SinkError};

pub struct NatsSink {
    js: jetstream::Context,
    prefix: String,
    ack_timeout: std::time::Duration,
}

/// A subject token from free text: NATS tokens may not hold spaces, dots or wildcards.
fn token(text: &str) -> String {
    let t: String = text.chars().map(|c| if c.is_whitespace() || matches!(c, '.' | '*' | '>') { '_' } else { c }).collect();
    if t.is_empty() { "_".into() } else { t }
}

impl NatsSink {
    /// Publishes to JetStream through `client`, on subjects under `prefix`
    /// (a stream must capture `<prefix>.>`; see [`NatsSink::ensure_stream`]).
    pub fn new(client: async_nats::Client, prefix: impl Into<String>) -> Self {
        NatsSink { js: jetstream::new(client), prefix: prefix.into(), ack_timeout: std::time::Duration::from_secs(5) }
    }

    /// How long to wait for JetStream to confirm a batch before trying it
    /// again (default 5 s). While the broker is away, this is how soon the
    /// relay notices and reports it.
    pub fn ack_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// The subject of an event: `<prefix>.<category or "none">.<type>`.
    pub fn subject(&self, e: &RecordedEvent) -> String {
        let category = stream_category(&e.stream).unwrap_or("none");
        format!("{}.{}.{}", self.prefix, token(category), token(&e.event_type))
    }

    /// Creates (or finds) a JetStream stream named `name` capturing `<prefix>.>`.
    pub async fn ensure_stream(&self, name: &str) -> Result<(), SinkError> {
        let config = jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{}.>", self.prefix)],
            duplicate_window: std::time::Duration::from_secs(120),
            ..Default::default()
        };
        self.js.get_or_create_stream(config).await.map(drop).map_err(|e| SinkError(format!("JetStream stream {name}: {e}")))
    }
}

#[async_trait]
impl Sink for NatsSink {
    async fn publish(&mut self, events: &[RecordedEvent]) -> Result<(), SinkError> {
        tokio::time::timeout(self.ack_timeout, self.send(events))
            .await
            .map_err(|_| SinkError(format!("JetStream did not confirm within {:?}", self.ack_timeout)))?
    }
}

impl NatsSink {
    async fn send(&self, events: &[RecordedEvent]) -> Result<(), SinkError> {
        // Send the whole batch, then wait for the acks: in order, pipelined.
        let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(events.len());
        for e in events {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", e.id.to_string().as_str());
            headers.insert("Cairn-Stream", e.stream.as_str());
            headers.insert("Cairn-Version", e.version.to_string().as_str());
            headers.insert("Cairn-Position", e.position.0.to_string().as_str());
            headers.insert("Cairn-Type", e.event_type.as_str());
            let ack = self
                .js
                .publish_with_headers(self.subject(e), headers, e.data.clone())
                .await
                .map_err(|err| SinkError(format!("NATS publish: {err}")))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(|err| SinkError(format!("JetStream did not confirm: {err}")))?;
        }
        Ok(())
    }
}
