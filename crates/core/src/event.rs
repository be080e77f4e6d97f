use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::Position;

/// What the payload bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ContentType {
    #[default]
    Json,
    Binary,
}

/// Metadata carried by every event: the ids that tie a chain of messages together,
/// plus free key/values.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Metadata {
    /// The id shared by every message caused, directly or not, by one request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The id of the message (command or event) that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    #[serde(default, flatten)]
    pub extra: BTreeMap<String, String>,
}

impl Metadata {
    pub fn is_empty(&self) -> bool {
        self.correlation_id.is_none() && self.causation_id.is_none() && self.extra.is_empty()
    }
}

/// Wall-clock time recorded by the store, in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Timestamp(since.as_micros() as i64)
    }
    pub fn as_micros(self) -> i64 {
        self.0
    }
    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0 as u64)
        } else {
            UNIX_EPOCH - Duration::from_micros(self.0.unsigned_abs())
        }
    }
    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(d.as_micros() as i64),
            Err(e) => Timestamp(-(e.duration().as_micros() as i64)),
        }
    }
    /// RFC 3339 in UTC with microseconds, e.g. `2026-11-22T10:00:00.000123Z`.
    pub fn to_rfc3339(self) -> String {
        humantime::format_rfc3339_micros(self.to_system_time()).to_string()
    }
}

/// An event to append. Its id is chosen on the client side (a UUIDv7 unless set),
/// so that retrying the same `NewEvent` is recognised as a retry.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub id: Uuid,
    pub event_type: String,
    pub data: Bytes,
    pub content_type: ContentType,
    pub metadata: Metadata,
    pub schema_version: u32,
    pub tags: Vec<String>,
}

impl NewEvent {
    /// A JSON event from any serialisable value.
    pub fn json<T: Serialize + ?Sized>(
        event_type: impl Into<String>,
        data: &T,
    ) -> serde_json::Result<Self> {
        Ok(Self::raw(event_type, Bytes::from(serde_json::to_vec(data)?), ContentType::Json))
    }

    /// A JSON event from bytes the caller promises are JSON (checked on append).
    pub fn json_bytes(event_type: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self::raw(event_type, data.into(), ContentType::Json)
    }

    /// An event with an opaque binary payload.
    pub fn binary(event_type: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self::raw(event_type, data.into(), ContentType::Binary)
    }

    fn raw(event_type: impl Into<String>, data: Bytes, content_type: ContentType) -> Self {
        NewEvent {
            id: Uuid::now_v7(),
            event_type: event_type.into(),
            data,
            content_type,
            metadata: Metadata::default(),
            schema_version: 1,
            tags: Vec::new(),
        }
    }

    pub fn with_id(mut self, id: Uuid) -> Self {
        self.id = id;
        self
    }
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
    pub fn with_schema_version(mut self, version: u32) -> Self {
        self.schema_version = version;
        self
    }
    pub fn with_tags<I: IntoIterator<Item = S>, S: Into<String>>(mut self, tags: I) -> Self {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }
}

/// An event as stored: the appended event plus what the store assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub id: Uuid,
    pub stream: String,
    /// 1 for the first event of a stream; a stream's version is its event count.
    pub version: u64,
    /// Place in the global order (`$all`); strictly increasing, not contiguous.
    pub position: Position,
    pub event_type: String,
    pub data: Bytes,
    pub content_type: ContentType,
    pub metadata: Metadata,
    pub schema_version: u32,
    pub tags: Vec<String>,
    /// When the store wrote the event.
    pub timestamp: Timestamp,
}

impl RecordedEvent {
    /// The payload parsed as JSON into `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> serde_json::Result<T> {
        serde_json::from_slice(&self.data)
    }

    /// True for events the store writes itself (metadata, deletions).
    pub fn is_system(&self) -> bool {
        self.stream.starts_with('$')
    }
}
