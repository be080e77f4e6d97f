//! The JSON shapes of the HTTP API, shared by the server and the client so
//! that the two cannot drift apart: events in and out, and errors as
//! `{"error": code, "message": ..., fields}` with a fixed HTTP status each.

use base64::Engine;
use bytes::Bytes;
use cairn_core::{
    AppendCondition, AppendResult, ContentType, Direction, ExpectedVersion, Metadata, NewEvent,
    Position, Query, QueryItem, RecordedEvent, StoreError, StreamMetadata, Timestamp,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Most events one read returns (`GET /all`, `POST /query`, a stream, and
/// their gRPC calls); a larger `limit` is lowered to this, and the answer's
/// `next` says where the following page starts.
pub const EVENTS_PAGE_MAX: usize = 10_000;

/// Most streams `GET /streams` (and gRPC `ListStreams`) returns.
pub const STREAMS_PAGE_MAX: usize = 10_000;

/// A JSON object as `T`. serde fills structs from arrays too (`[1, 2, 3]` as
/// the first three fields), which no client means and which gets round the
/// refusal of unknown fields; this refuses anything but an object.
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Object<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        deserializer.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A request body: a JSON object as `T` (see [`Object`]).
pub fn from_body<T: DeserializeOwned>(body: &[u8]) -> serde_json::Result<T> {
    serde_json::from_slice::<Object<T>>(body).map(|o| o.0)
}

fn objects<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Vec::<Object<T>>::deserialize(d)?.into_iter().map(|o| o.0).collect())
}

/// A query as requests carry it: objects only and unknown fields refused
/// (the core's own shape ignores them, so a misspelt `typs` would leave an
/// item that matches every event).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryIn {
    #[serde(deserialize_with = "objects")]
    items: Vec<ItemIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemIn {
    #[serde(default)]
    types: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    categories: Vec<String>,
}

impl From<QueryIn> for Query {
    fn from(q: QueryIn) -> Query {
        Query {
            items: q
                .items
                .into_iter()
                .map(|i| QueryItem { types: i.types, tags: i.tags, categories: i.categories })
                .collect(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionIn {
    fail_if_events_match: Object<QueryIn>,
    #[serde(default, deserialize_with = "whole::opt_u64")]
    after: Option<u64>,
}

fn strict_query<'de, D: Deserializer<'de>>(d: D) -> Result<Query, D::Error> {
    Ok(Object::<QueryIn>::deserialize(d)?.0.into())
}

fn strict_condition<'de, D: Deserializer<'de>>(d: D) -> Result<Option<AppendCondition>, D::Error> {
    let condition = Option::<Object<ConditionIn>>::deserialize(d)?;
    Ok(condition.map(|Object(c)| AppendCondition {
        fail_if_events_match: c.fail_if_events_match.0.into(),
        after: c.after.map(Position),
    }))
}

/// An append condition as JSON text (gRPC's `condition_json`), as strictly
/// as in a request body.
pub fn parse_condition(text: &str) -> serde_json::Result<AppendCondition> {
    serde_json::from_str::<Object<ConditionIn>>(text).map(|Object(c)| AppendCondition {
        fail_if_events_match: c.fail_if_events_match.0.into(),
        after: c.after.map(Position),
    })
}

/// Stream metadata as JSON (the body of `PUT /streams/{s}/metadata`, gRPC's
/// `metadata_json`): an object with only the known settings.
pub fn parse_metadata(json: &[u8]) -> serde_json::Result<StreamMetadata> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MetadataIn {
        #[serde(default, deserialize_with = "whole::opt_u64")]
        max_age_secs: Option<u64>,
        #[serde(default, deserialize_with = "whole::opt_u64")]
        max_count: Option<u64>,
        #[serde(default, deserialize_with = "whole::opt_u64")]
        truncate_before: Option<u64>,
    }
    serde_json::from_slice::<Object<MetadataIn>>(json).map(|Object(m)| StreamMetadata {
        max_age_secs: m.max_age_secs,
        max_count: m.max_count,
        truncate_before: m.truncate_before,
    })
}

/// A query as JSON text (a subscription's `query` parameter), as strictly as
/// in a request body.
pub fn parse_query(text: &str) -> serde_json::Result<Query> {
    serde_json::from_str::<Object<QueryIn>>(text).map(|o| o.0.into())
}

/// Body of `POST /streams/{stream}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendRequest {
    /// `"any"` (the default), `"no_stream"`, `"exists"` or a version number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<Value>,
    #[serde(deserialize_with = "objects")]
    pub events: Vec<EventIn>,
    /// A Dynamic Consistency Boundary condition, checked with the append.
    #[serde(
        default,
        deserialize_with = "strict_condition",
        skip_serializing_if = "Option::is_none"
    )]
    pub condition: Option<AppendCondition>,
}

/// One line of `POST /appends` (NDJSON): an append with its stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendLine {
    pub stream: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<Value>,
    #[serde(deserialize_with = "objects")]
    pub events: Vec<EventIn>,
    #[serde(
        default,
        deserialize_with = "strict_condition",
        skip_serializing_if = "Option::is_none"
    )]
    pub condition: Option<AppendCondition>,
}

/// One line of the answer to `POST /appends`: the result, or the error
/// body an append of its own would have had (with `error`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AppendLineResult {
    Done(AppendResult),
    Failed(Value),
}

/// Most appends in one `POST /appends` body or one batch of a gRPC append stream.
pub const APPENDS_MAX: usize = 10_000;

/// The content type of NDJSON bodies.
pub const NDJSON: &str = "application/x-ndjson";

/// One event to append.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    /// Chosen by the client (a UUIDv7 if left out) so that a retry is recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Uuid>,
    #[serde(rename = "type")]
    pub event_type: String,
    /// Any JSON value; for `content_type: "binary"`, the bytes in base64.
    pub data: Box<RawValue>,
    #[serde(default)]
    pub content_type: ContentType,
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    #[serde(default = "one", deserialize_with = "whole::u32", skip_serializing_if = "is_one")]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

fn one() -> u32 {
    1
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

/// The expected version as the API writes it.
pub fn expected_to_wire(expected: ExpectedVersion) -> Value {
    match expected {
        ExpectedVersion::Any => json!("any"),
        ExpectedVersion::NoStream => json!("no_stream"),
        ExpectedVersion::StreamExists => json!("exists"),
        ExpectedVersion::Exact(v) => json!(v),
    }
}

/// Reads an expected version: a word or a version number. Says why not.
pub fn expected_from_wire(value: &Value) -> Result<ExpectedVersion, String> {
    match value {
        Value::String(s) => parse_expected(s),
        Value::Number(n) => whole::of(n).map(ExpectedVersion::Exact).ok_or_else(|| {
            format!("expected_version: {n} is not a version; use a whole number from 0, or \"any\", \"no_stream\", \"exists\"")
        }),
        other => Err(format!("expected_version: {other} is neither a version number nor \"any\", \"no_stream\", \"exists\"")),
    }
}

/// `any`, `no_stream`, `exists` or a number, as in a query string.
pub fn parse_expected(s: &str) -> Result<ExpectedVersion, String> {
    match s {
        "any" => Ok(ExpectedVersion::Any),
        "no_stream" | "no-stream" => Ok(ExpectedVersion::NoStream),
        "exists" | "stream_exists" => Ok(ExpectedVersion::StreamExists),
        n => n.parse().map(ExpectedVersion::Exact).map_err(|_| {
            format!("expected_version: {n:?} is not a version; use a whole number from 0, or \"any\", \"no_stream\", \"exists\"")
        }),
    }
}

impl EventIn {
    pub fn from_new(e: &NewEvent) -> Result<EventIn, StoreError> {
        let data = match e.content_type {
            ContentType::Json => {
                let text = String::from_utf8(e.data.to_vec())
                    .map_err(|_| StoreError::InvalidEvent("data is not UTF-8 JSON".into()))?;
                RawValue::from_string(text).map_err(|err| {
                    StoreError::InvalidEvent(format!("data is not valid JSON: {err}"))
                })?
            }
            ContentType::Binary => RawValue::from_string(json!(B64.encode(&e.data)).to_string())
                .expect("a JSON string"),
        };
        Ok(EventIn {
            id: Some(e.id),
            event_type: e.event_type.clone(),
            data,
            content_type: e.content_type,
            metadata: e.metadata.clone(),
            schema_version: e.schema_version,
            tags: e.tags.clone(),
        })
    }

    /// The event to append; `index` names it in errors.
    pub fn into_new(self, index: usize) -> Result<NewEvent, String> {
        let data = match self.content_type {
            ContentType::Json => Bytes::from(self.data.get().as_bytes().to_vec()),
            ContentType::Binary => {
                let text: String = serde_json::from_str(self.data.get()).map_err(|_| {
                    format!("events[{index}].data: a binary event's data is a base64 string")
                })?;
                Bytes::from(
                    B64.decode(text)
                        .map_err(|e| format!("events[{index}].data: not base64: {e}"))?,
                )
            }
        };
        let event = match self.content_type {
            ContentType::Json => NewEvent::json_bytes(self.event_type, data),
            ContentType::Binary => NewEvent::binary(self.event_type, data),
        };
        let event = event
            .with_metadata(self.metadata)
            .with_schema_version(self.schema_version)
            .with_tags(self.tags);
        Ok(match self.id {
            Some(id) => event.with_id(id),
            None => event,
        })
    }
}

/// An event as the API returns it.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventOut {
    pub id: Uuid,
    pub stream: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u64,
    pub position: u64,
    /// RFC 3339, UTC, microseconds.
    pub timestamp: String,
    pub schema_version: u32,
    pub content_type: ContentType,
    pub data: Box<RawValue>,
    pub metadata: Metadata,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl EventOut {
    pub fn from_recorded(e: &RecordedEvent) -> EventOut {
        let data = match e.content_type {
            ContentType::Json => match std::str::from_utf8(&e.data)
                .ok()
                .and_then(|s| RawValue::from_string(s.to_string()).ok())
            {
                Some(raw) => raw,
                // Stored JSON is checked on append; shown as a string if ever not.
                None => RawValue::from_string(json!(String::from_utf8_lossy(&e.data)).to_string())
                    .expect("a JSON string"),
            },
            ContentType::Binary => RawValue::from_string(json!(B64.encode(&e.data)).to_string())
                .expect("a JSON string"),
        };
        EventOut {
            id: e.id,
            stream: e.stream.clone(),
            event_type: e.event_type.clone(),
            version: e.version,
            position: e.position.0,
            timestamp: e.timestamp.to_rfc3339(),
            schema_version: e.schema_version,
            content_type: e.content_type,
            data,
            metadata: e.metadata.clone(),
            tags: e.tags.clone(),
        }
    }

    pub fn into_recorded(self) -> Result<RecordedEvent, String> {
        let time = humantime::parse_rfc3339(&self.timestamp)
            .map_err(|e| format!("timestamp {:?}: {e}", self.timestamp))?;
        let data = match self.content_type {
            ContentType::Json => Bytes::from(self.data.get().as_bytes().to_vec()),
            ContentType::Binary => {
                let text: String = serde_json::from_str(self.data.get())
                    .map_err(|e| format!("binary data: {e}"))?;
                Bytes::from(B64.decode(text).map_err(|e| format!("binary data: {e}"))?)
            }
        };
        Ok(RecordedEvent {
            id: self.id,
            stream: self.stream,
            version: self.version,
            position: Position(self.position),
            event_type: self.event_type,
            data,
            content_type: self.content_type,
            metadata: self.metadata,
            schema_version: self.schema_version,
            tags: self.tags,
            timestamp: Timestamp::from_system_time(time),
        })
    }
}

/// `{"events": [...], "next": ...}`: `next` is there when the page is full
/// (as many events as the limit, or [`EVENTS_PAGE_MAX`]), so more may follow.
#[derive(Debug, Serialize, Deserialize)]
pub struct Events {
    pub events: Vec<EventOut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Next>,
}

/// Where the next page of a read starts: `{"after": position}` for `$all`
/// and queries (the `after` of the next request, in the same direction),
/// `{"from": version}` for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Next {
    After(u64),
    From(u64),
}

/// Body of `POST /query`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    #[serde(deserialize_with = "strict_query")]
    pub query: Query,
    /// Start here, inclusive (a bound; need not be an event's position).
    #[serde(default, deserialize_with = "whole::opt_u64", skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    /// Start just past here (paging).
    #[serde(default, deserialize_with = "whole::opt_u64", skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// Most events returned; a number too large for a `usize` reads as the largest.
    #[serde(
        default,
        deserialize_with = "whole::opt_usize",
        skip_serializing_if = "Option::is_none"
    )]
    pub limit: Option<usize>,
    #[serde(default)]
    pub direction: Direction,
}

/// Whole numbers as JSON Schema counts them: `5` and `5.0` alike (its
/// `integer` takes both, so clients and tools may send either), from 0 to
/// `u64::MAX`; `null` is none.
pub mod whole {
    use serde::de::{Deserializer, Error, Unexpected, Visitor};

    struct Whole;

    impl Visitor<'_> for Whole {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a whole number from 0 to {}", u64::MAX)
        }
        fn visit_unit<E>(self) -> Result<Option<u64>, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, v: u64) -> Result<Option<u64>, E> {
            Ok(Some(v))
        }
        fn visit_i64<E: Error>(self, v: i64) -> Result<Option<u64>, E> {
            u64::try_from(v).map(Some).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }
        fn visit_f64<E: Error>(self, v: f64) -> Result<Option<u64>, E> {
            float(v).map(Some).ok_or_else(|| E::invalid_value(Unexpected::Float(v), &self))
        }
    }

    /// A float that is a whole number in range. serde_json reads floats to
    /// within a unit in the last place, so `1971688239649487.0` may arrive as
    /// `…487.2`: a few units' difference still counts as whole.
    fn float(v: f64) -> Option<u64> {
        let whole = v.round();
        // 2^64 is the first float past u64::MAX.
        let in_range = (0.0..18_446_744_073_709_551_616.0).contains(&whole);
        (in_range && (v - whole).abs() <= whole * 4.0 * f64::EPSILON).then_some(whole as u64)
    }

    pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(Whole)
    }

    pub fn opt_usize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        Ok(opt_u64(d)?.map(|v| usize::try_from(v).unwrap_or(usize::MAX)))
    }

    pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        match opt_u64(d)? {
            Some(v) => u32::try_from(v).map_err(|_| {
                D::Error::invalid_value(
                    Unexpected::Unsigned(v),
                    &"a whole number from 0 to 4294967295",
                )
            }),
            None => Err(D::Error::invalid_type(
                Unexpected::Unit,
                &"a whole number from 0 to 4294967295",
            )),
        }
    }

    /// The number a JSON value holds, if it is a whole one.
    pub fn of(n: &serde_json::Number) -> Option<u64> {
        n.as_u64().or_else(|| n.as_f64().and_then(float))
    }
}

/// `GET /head`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Head {
    /// Where the next event goes.
    pub head: u64,
    /// The newest event, if any.
    pub last: Option<u64>,
}

/// The HTTP status and JSON body of a store error.
pub fn error_body(e: &StoreError) -> (u16, Value) {
    use StoreError::*;
    let (status, code, mut fields) = match e {
        WrongExpectedVersion { stream, expected, actual_version } => (
            409,
            "wrong_expected_version",
            json!({"stream": stream, "expected_version": expected_to_wire(*expected), "actual_version": actual_version}),
        ),
        AppendConditionFailed { first_conflict, after } => (
            409,
            "append_condition_failed",
            json!({"first_conflict": first_conflict.0, "after": after.map(|p| p.0)}),
        ),
        StreamDeleted { stream } => (410, "stream_deleted", json!({"stream": stream})),
        StreamNotFound { stream } => (404, "stream_not_found", json!({"stream": stream})),
        EventTooLarge { index, size_bytes, limit_bytes } => (
            413,
            "event_too_large",
            json!({"index": index, "size_bytes": size_bytes, "limit_bytes": limit_bytes}),
        ),
        AppendTooLarge { size_bytes, limit_bytes } => {
            (413, "append_too_large", json!({"size_bytes": size_bytes, "limit_bytes": limit_bytes}))
        }
        InvalidStreamName { name, reason } => {
            (400, "invalid_stream_name", json!({"name": name, "reason": reason}))
        }
        InvalidEvent(detail) => (400, "invalid_event", json!({"detail": detail})),
        InvalidArgument(detail) => (400, "invalid_argument", json!({"detail": detail})),
        IdempotencyConflict { id, detail } => {
            (409, "idempotency_conflict", json!({"id": id, "detail": detail}))
        }
        // No event there, as a stream that does not exist is a 404.
        InvalidPosition(p) => (404, "invalid_position", json!({"position": p.0})),
        Busy(detail) => (503, "busy", json!({"detail": detail})),
        Closed { reason } => (503, "closed", json!({"reason": reason, "retryable": true})),
        OutcomeUnknown { reason } => {
            (503, "outcome_unknown", json!({"reason": reason, "retryable": true}))
        }
        Corrupt { file, offset, reason } => {
            (500, "corrupt", json!({"file": file, "offset": offset, "reason": reason}))
        }
        Locked { dir } => (500, "locked", json!({"dir": dir})),
        AccessDenied { code, reason } => {
            (if code == "forbidden" { 403 } else { 401 }, code.as_str(), json!({"reason": reason}))
        }
        Io { path, source } => (500, "io", json!({"path": path, "detail": source.to_string()})),
        _ => (500, "internal", json!({})),
    };
    fields["error"] = json!(code);
    fields["message"] = json!(e.to_string());
    (status, fields)
}

/// The store error an API error body stands for (`where_` names the server
/// for errors that are not the store's own).
pub fn error_from(status: u16, body: &Value, where_: &str) -> StoreError {
    let s = |k: &str| body[k].as_str().unwrap_or_default().to_string();
    let n = |k: &str| body[k].as_u64().unwrap_or_default();
    let message = s("message");
    match body["error"].as_str().unwrap_or_default() {
        "wrong_expected_version" => StoreError::WrongExpectedVersion {
            stream: s("stream"),
            expected: expected_from_wire(&body["expected_version"]).unwrap_or(ExpectedVersion::Any),
            actual_version: n("actual_version"),
        },
        "append_condition_failed" => StoreError::AppendConditionFailed {
            first_conflict: Position(n("first_conflict")),
            after: body["after"].as_u64().map(Position),
        },
        "stream_deleted" => StoreError::StreamDeleted { stream: s("stream") },
        "stream_not_found" => StoreError::StreamNotFound { stream: s("stream") },
        "event_too_large" => StoreError::EventTooLarge {
            index: n("index") as usize,
            size_bytes: n("size_bytes") as usize,
            limit_bytes: n("limit_bytes") as usize,
        },
        "append_too_large" => StoreError::AppendTooLarge {
            size_bytes: n("size_bytes") as usize,
            limit_bytes: n("limit_bytes") as usize,
        },
        "invalid_stream_name" => {
            StoreError::InvalidStreamName { name: s("name"), reason: s("reason") }
        }
        "invalid_event" => StoreError::InvalidEvent(s("detail")),
        "invalid_argument" => StoreError::InvalidArgument(s("detail")),
        "invalid_request" => StoreError::InvalidArgument(message),
        "idempotency_conflict" => StoreError::IdempotencyConflict {
            id: s("id").parse().unwrap_or_default(),
            detail: s("detail"),
        },
        "invalid_position" => StoreError::InvalidPosition(Position(n("position"))),
        "busy" | "too_many_requests" => {
            StoreError::Busy(if message.is_empty() { s("detail") } else { message })
        }
        "closed" => StoreError::Closed { reason: body["reason"].as_str().map(String::from) },
        "outcome_unknown" => StoreError::OutcomeUnknown { reason: s("reason") },
        "corrupt" => {
            StoreError::Corrupt { file: s("file"), offset: n("offset"), reason: s("reason") }
        }
        "locked" => StoreError::Locked { dir: s("dir") },
        code @ ("unauthorized" | "forbidden" | "too_many_failed_logins") => {
            StoreError::AccessDenied {
                code: code.to_string(),
                reason: if body["reason"].is_string() { s("reason") } else { message },
            }
        }
        _ => {
            let detail = if message.is_empty() {
                format!("HTTP status {status}: {body}")
            } else {
                format!("HTTP status {status}: {message}")
            };
            StoreError::Io { path: where_.to_string(), source: std::io::Error::other(detail) }
        }
    }
}

/// What to do when a client cannot reach the server, from the innermost
/// cause of the failure (for HTTP and gRPC alike).
pub fn connect_hint(cause: &str) -> &'static str {
    if cause.contains("CaUsedAsEndEntity") {
        // What `openssl req -x509` makes by default: trusting it does not help.
        "the server's certificate says it is a CA (basicConstraints CA:TRUE), which a server's own certificate must not; \
         make it with `-addext basicConstraints=critical,CA:FALSE` (a self-signed one then works with `--ca` set to it), or sign it with a CA of yours"
    } else if cause.contains("certificate") {
        "trust the CA that signed the server's certificate (`--ca FILE`, `with_tls_root`); \
         for a self-signed certificate, `--ca` the certificate itself"
    } else {
        "is `cairn serve` running there?"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_as_json_schema_counts_them() {
        let parse = |text: &str| {
            serde_json::from_str::<QueryRequest>(&format!(
                r#"{{"query":{{"items":[{{}}]}},"from":{text}}}"#
            ))
            .map(|q| q.from)
        };
        assert_eq!(parse("5").unwrap(), Some(5));
        assert_eq!(parse("5.0").unwrap(), Some(5));
        assert_eq!(parse("1971688239649487.0").unwrap(), Some(1971688239649487));
        assert_eq!(parse("18446744073709551615").unwrap(), Some(u64::MAX));
        assert_eq!(parse("null").unwrap(), None);
        for bad in ["2.5", "-1", "18446744073709551616", "1e20", "\"5\"", "0.3"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grpc_json_fields_are_as_strict_as_bodies() {
        assert!(
            parse_condition(
                r#"{"fail_if_events_match": {"items": [{"types": ["A"]}]}, "after": 3}"#
            )
            .is_ok()
        );
        assert!(
            parse_condition(r#"{"fail_if_events_match": {"items": [{"typs": ["A"]}]}}"#).is_err(),
            "a misspelt item field"
        );
        assert!(parse_condition(r#"[{"items": []}, 3]"#).is_err(), "an array for an object");
        assert_eq!(parse_metadata(br#"{"max_count": 3}"#).unwrap().max_count, Some(3));
        assert!(parse_metadata(b"[1, 2, 3]").is_err(), "an array sets no fields");
        assert!(parse_metadata(br#"{"max_cont": 3}"#).is_err(), "an unknown setting");
    }

    #[test]
    fn bodies_are_objects_all_the_way_down() {
        assert!(
            from_body::<QueryRequest>(br#"[{"items":[{}]}]"#)
                .unwrap_err()
                .to_string()
                .contains("expected a JSON object")
        );
        assert!(from_body::<QueryRequest>(br#"{"query":{"items":[[]]}}"#).is_err());
        assert!(
            from_body::<QueryRequest>(br#"{"query":{"items":[{"typs":[]}]}}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown field `typs`")
        );
        assert!(from_body::<AppendRequest>(br#"{"events":[["X",1]]}"#).is_err());
        let ok: AppendRequest = from_body(br#" {"events":[{"type":"X","data":1,"schema_version":2.0}],"condition":{"fail_if_events_match":{"items":[{"tags":["t"]}]},"after":3}}"#).unwrap();
        assert_eq!(
            (ok.events[0].schema_version, ok.condition.unwrap().after),
            (2, Some(Position(3)))
        );
    }
}
