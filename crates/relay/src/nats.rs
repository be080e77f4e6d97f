//! NATS JetStream: one message per event on `<prefix>.<category>.<type>`,
//! with `Nats-Msg-Id` set to the event id so that JetStream drops a repeat
//! within its duplicate window.
//!
//! Chained (the default): each message also carries
//! `Nats-Expected-Last-Msg-Id`, the id of the message sent before it to the
//! same JetStream stream since the last failure, so JetStream refuses a
//! message whose predecessor never arrived. The client reconnects by
//! itself and then sends what it had queued, while what was on the lost
//! connection is gone: without the chain a later event could be stored
//! before an earlier one's repeat. (JetStream checks for a duplicate first,
//! so repeats are still acknowledged as such.) The chain needs the stream to
//! be this relay's alone; see [`NatsSink::chained`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::header::HeaderName;
use async_nats::jetstream::{self, context::PublishAckFuture};
use async_nats::{HeaderMap, Subject};
use async_trait::async_trait;
use cairn_core::{RecordedEvent, stream_category};
use tokio::time::Instant;

use crate::{Confirm, Sink, SinkError};

pub struct NatsSink {
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
    ack_timeout: Duration,
    chained: bool,
    /// Subject and JetStream stream by `<category length>:<category><type>`.
    subjects: HashMap<String, (Subject, Arc<str>)>,
    key: String,
    /// Per JetStream stream, the id of the last message sent since the last
    /// failure (reset): what the next one expects.
    last_sent: HashMap<Arc<str>, String>,
}

const MSG_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");
const STREAM: HeaderName = HeaderName::from_static("Cairn-Stream");
const VERSION: HeaderName = HeaderName::from_static("Cairn-Version");
const POSITION: HeaderName = HeaderName::from_static("Cairn-Position");
const TYPE: HeaderName = HeaderName::from_static("Cairn-Type");
const EXPECTED_LAST: HeaderName = HeaderName::from_static("Nats-Expected-Last-Msg-Id");

/// A subject token from free text: NATS tokens may not hold spaces, dots or wildcards.
fn token(text: &str) -> String {
    let t: String = text
        .chars()
        .map(|c| if c.is_whitespace() || matches!(c, '.' | '*' | '>') { '_' } else { c })
        .collect();
    if t.is_empty() { "_".into() } else { t }
}

impl NatsSink {
    /// Publishes to JetStream through `client`, on subjects under `prefix`
    /// (a stream must capture `<prefix>.>`; see [`NatsSink::ensure_stream`]).
    pub fn new(client: async_nats::Client, prefix: impl Into<String>) -> Self {
        NatsSink {
            js: jetstream::new(client.clone()),
            client,
            prefix: prefix.into(),
            ack_timeout: Duration::from_secs(5),
            chained: true,
            subjects: HashMap::new(),
            key: String::new(),
            last_sent: HashMap::new(),
        }
    }

    /// Whether each message names its predecessor in the JetStream stream
    /// (default: yes). Only this relay may publish to the stream(s) its
    /// subjects are captured by, or JetStream refuses its messages (the
    /// relay reports `wrong last msg ID` and retries). Off, a reconnect of
    /// the client while batches are in flight can store a later event
    /// before the repeat of an earlier one: keep `max_in_flight(1)` then to
    /// narrow that to one batch, as before pipelining.
    pub fn chained(mut self, chained: bool) -> Self {
        self.chained = chained;
        self
    }

    /// How long JetStream may take to confirm a batch, from its sending,
    /// before it is sent again (default 5 s). While the broker is away, this
    /// is how soon the relay notices and reports it.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// The subject of an event: `<prefix>.<category or "none">.<type>`.
    pub fn subject(&self, e: &RecordedEvent) -> String {
        let category = stream_category(&e.stream).unwrap_or("none");
        format!("{}.{}.{}", self.prefix, token(category), token(&e.event_type))
    }

    /// [`NatsSink::subject`] and the JetStream stream that captures it,
    /// from a small cache (the stream is asked for once per subject).
    async fn destination(&mut self, e: &RecordedEvent) -> Result<(Subject, Arc<str>), SinkError> {
        let category = stream_category(&e.stream).unwrap_or("");
        self.key.clear();
        let _ = write!(self.key, "{}:{category}{}", category.len(), e.event_type);
        if let Some(found) = self.subjects.get(self.key.as_str()) {
            return Ok(found.clone());
        }
        let subject = self.subject(e);
        let stream: Arc<str> = if self.chained {
            let name = self.js.stream_by_subject(subject.as_str()).await;
            name.map_err(|err| SinkError(format!("no JetStream stream captures {subject}: {err}")))?
                .into()
        } else {
            Arc::from("")
        };
        if self.subjects.len() >= 4096 {
            self.subjects.clear();
        }
        let found = (Subject::from(subject), stream);
        self.subjects.insert(self.key.clone(), found.clone());
        Ok(found)
    }

    /// Creates (or finds) a JetStream stream named `name` capturing `<prefix>.>`.
    pub async fn ensure_stream(&self, name: &str) -> Result<(), SinkError> {
        let config = jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{}.>", self.prefix)],
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map(drop)
            .map_err(|e| SinkError(format!("JetStream stream {name}: {e}")))
    }
}

#[async_trait]
impl Sink for NatsSink {
    async fn send(&mut self, events: &[RecordedEvent]) -> Result<Confirm, SinkError> {
        // Queue nothing behind a lost connection: fail at once instead.
        if self.client.connection_state() != State::Connected {
            return Err(SinkError("NATS is not connected".into()));
        }
        let deadline = Instant::now() + self.ack_timeout;
        let timeout = self.ack_timeout;
        // Queue the whole batch; its acks are awaited later, in order.
        let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(events.len());
        for e in events {
            let (subject, stream) =
                tokio::time::timeout_at(deadline, self.destination(e)).await.map_err(|_| {
                    SinkError(format!("JetStream did not answer within {timeout:?}"))
                })??;
            let id = e.id.to_string();
            let mut headers = HeaderMap::new();
            if self.chained
                && let Some(previous) = self.last_sent.insert(stream, id.clone())
            {
                headers.insert(EXPECTED_LAST, previous);
            }
            headers.insert(MSG_ID, id);
            headers.insert(STREAM, e.stream.clone());
            headers.insert(VERSION, e.version.to_string());
            headers.insert(POSITION, e.position.0.to_string());
            headers.insert(TYPE, e.event_type.clone());
            let ack = tokio::time::timeout_at(
                deadline,
                self.js.publish_with_headers(subject, headers, e.data.clone()),
            )
            .await
            .map_err(|_| SinkError(format!("NATS did not take the messages within {timeout:?}")))?
            .map_err(|err| SinkError(format!("NATS publish: {err}")))?;
            acks.push(ack);
        }
        Ok(Box::pin(async move {
            let all = async {
                for ack in acks {
                    ack.await
                        .map_err(|err| SinkError(format!("JetStream did not confirm: {err}")))?;
                }
                Ok(())
            };
            tokio::time::timeout_at(deadline, all)
                .await
                .map_err(|_| SinkError(format!("JetStream did not confirm within {timeout:?}")))?
        }))
    }

    async fn reset(&mut self) {
        // After a failure the unconfirmed events go again: a new chain,
        // whose first message expects nothing.
        self.last_sent.clear();
    }
}
