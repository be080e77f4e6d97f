//! Between the generated messages and the core's types, and between store
//! errors and gRPC statuses (which carry the HTTP API's JSON error body in
//! `x-cairn-error-bin`, so no detail is lost either way).

use cairn_core::{
    ContentType, Direction, ExpectedVersion, Metadata, NewEvent, Position, ReadAllOptions,
    RecordedEvent, StoreError, Timestamp,
};
use cairn_wire::{error_body, error_from};
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::proto;

pub const ERROR_KEY: &str = "x-cairn-error-bin";

pub fn direction_to(d: Direction) -> proto::Direction {
    match d {
        Direction::Forward => proto::Direction::Forward,
        Direction::Backward => proto::Direction::Backward,
    }
}

pub fn direction_from(d: i32) -> Result<Direction, StoreError> {
    match proto::Direction::try_from(d) {
        Ok(proto::Direction::Forward) => Ok(Direction::Forward),
        Ok(proto::Direction::Backward) => Ok(Direction::Backward),
        Err(_) => Err(StoreError::InvalidArgument(format!(
            "direction: {d} is not FORWARD (0) or BACKWARD (1)"
        ))),
    }
}

pub fn expected_to(e: ExpectedVersion) -> proto::ExpectedVersion {
    use proto::expected_version::Kind;
    let kind = match e {
        ExpectedVersion::Any => Kind::Any(proto::Empty {}),
        ExpectedVersion::NoStream => Kind::NoStream(proto::Empty {}),
        ExpectedVersion::StreamExists => Kind::StreamExists(proto::Empty {}),
        ExpectedVersion::Exact(v) => Kind::Exact(v),
    };
    proto::ExpectedVersion { kind: Some(kind) }
}

/// A missing expected version means "any".
pub fn expected_from(e: Option<proto::ExpectedVersion>) -> ExpectedVersion {
    use proto::expected_version::Kind;
    match e.and_then(|e| e.kind) {
        None | Some(Kind::Any(_)) => ExpectedVersion::Any,
        Some(Kind::NoStream(_)) => ExpectedVersion::NoStream,
        Some(Kind::StreamExists(_)) => ExpectedVersion::StreamExists,
        Some(Kind::Exact(v)) => ExpectedVersion::Exact(v),
    }
}

fn content_to(c: ContentType) -> i32 {
    match c {
        ContentType::Json => proto::ContentType::Json as i32,
        ContentType::Binary => proto::ContentType::Binary as i32,
    }
}

fn content_from(c: i32) -> Result<ContentType, String> {
    match proto::ContentType::try_from(c) {
        Ok(proto::ContentType::Json) => Ok(ContentType::Json),
        Ok(proto::ContentType::Binary) => Ok(ContentType::Binary),
        Err(_) => Err(format!("content_type: {c} is not JSON (0) or BINARY (1)")),
    }
}

fn metadata_to(m: &Metadata) -> proto::Metadata {
    proto::Metadata {
        correlation_id: m.correlation_id.map(|u| u.to_string()).unwrap_or_default(),
        causation_id: m.causation_id.map(|u| u.to_string()).unwrap_or_default(),
        extra: m.extra.clone().into_iter().collect(),
    }
}

fn metadata_from(m: Option<proto::Metadata>, what: &str) -> Result<Metadata, String> {
    let Some(m) = m else { return Ok(Metadata::default()) };
    let id = |s: &str, field: &str| -> Result<Option<Uuid>, String> {
        if s.is_empty() {
            Ok(None)
        } else {
            s.parse().map(Some).map_err(|_| format!("{what}.metadata.{field}: {s:?} is not a UUID"))
        }
    };
    Ok(Metadata {
        correlation_id: id(&m.correlation_id, "correlation_id")?,
        causation_id: id(&m.causation_id, "causation_id")?,
        extra: m.extra.into_iter().collect(),
    })
}

pub fn new_event_to(e: &NewEvent) -> proto::NewEvent {
    proto::NewEvent {
        id: e.id.to_string(),
        r#type: e.event_type.clone(),
        data: e.data.clone(),
        content_type: content_to(e.content_type),
        metadata: Some(metadata_to(&e.metadata)),
        schema_version: e.schema_version,
        tags: e.tags.clone(),
    }
}

/// The event to append; `index` names it in errors.
pub fn new_event_from(e: proto::NewEvent, index: usize) -> Result<NewEvent, String> {
    let what = format!("events[{index}]");
    let event = match content_from(e.content_type).map_err(|m| format!("{what}.{m}"))? {
        ContentType::Json => NewEvent::json_bytes(e.r#type, e.data),
        ContentType::Binary => NewEvent::binary(e.r#type, e.data),
    };
    let event = event
        .with_metadata(metadata_from(e.metadata, &what)?)
        .with_schema_version(if e.schema_version == 0 { 1 } else { e.schema_version })
        .with_tags(e.tags);
    if e.id.is_empty() {
        return Ok(event);
    }
    let id = e.id.parse().map_err(|_| format!("{what}.id: {:?} is not a UUID", e.id))?;
    Ok(event.with_id(id))
}

pub fn event_to(e: RecordedEvent) -> proto::Event {
    proto::Event {
        id: e.id.to_string(),
        metadata: Some(metadata_to(&e.metadata)),
        stream: e.stream,
        version: e.version,
        position: e.position.0,
        r#type: e.event_type,
        data: e.data,
        content_type: content_to(e.content_type),
        schema_version: e.schema_version,
        tags: e.tags,
        timestamp_us: e.timestamp.0,
    }
}

pub fn event_from(e: proto::Event) -> Result<RecordedEvent, StoreError> {
    let bad = |m: String| StoreError::Io {
        path: "gRPC".into(),
        source: std::io::Error::other(format!("the server sent a malformed event: {m}")),
    };
    Ok(RecordedEvent {
        id: e.id.parse().map_err(|_| bad(format!("id {:?}", e.id)))?,
        stream: e.stream,
        version: e.version,
        position: Position(e.position),
        event_type: e.r#type,
        data: e.data,
        content_type: content_from(e.content_type).map_err(bad)?,
        metadata: metadata_from(e.metadata, "event").map_err(bad)?,
        schema_version: e.schema_version,
        tags: e.tags,
        timestamp: Timestamp(e.timestamp_us),
    })
}

pub fn all_request(o: &ReadAllOptions) -> proto::ReadAllRequest {
    proto::ReadAllRequest {
        from: o.from.0,
        exclusive: o.exclusive,
        direction: direction_to(o.direction) as i32,
        limit: (o.limit != usize::MAX).then_some(o.limit as u64),
    }
}

/// Read options from a request (no limit when absent).
pub fn all_options(r: &proto::ReadAllRequest) -> Result<ReadAllOptions, StoreError> {
    let base = match direction_from(r.direction)? {
        Direction::Forward => ReadAllOptions::forward(),
        Direction::Backward => ReadAllOptions::backward(),
    };
    let from = Position(r.from);
    let options = if r.exclusive { base.after(from) } else { base.from(from) };
    Ok(options.limit(r.limit.map_or(usize::MAX, |l| l as usize)))
}

/// A store error as a status, with the API's JSON error body attached.
pub fn error_to_status(e: &StoreError) -> Status {
    let (http, body) = error_body(e);
    status_with_body(http, &body)
}

/// A status for an HTTP-style error `body` with HTTP status `http`.
pub fn status_with_body(http: u16, body: &serde_json::Value) -> Status {
    let code = match http {
        400 | 413 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 | 410 => Code::NotFound,
        409 => Code::FailedPrecondition,
        429 => Code::ResourceExhausted,
        503 => Code::Unavailable,
        _ => Code::Internal,
    };
    let message = body["message"].as_str().unwrap_or_default().to_string();
    let mut status = Status::new(code, message);
    status
        .metadata_mut()
        .insert_bin(ERROR_KEY, MetadataValue::from_bytes(body.to_string().as_bytes()));
    status
}

/// The response header that carries a read's next-page cursor (the HTTP
/// API's `next`, as JSON), present when the page is full.
pub const NEXT_KEY: &str = "x-cairn-next";

/// The store error a failed append's status stands for: without the
/// server's own answer, a call that may have reached it (anything but a
/// refused connection) has an unknown outcome.
pub fn append_status_to_error(s: &Status) -> StoreError {
    let has_body = s.metadata().get_bin(ERROR_KEY).is_some();
    let not_sent = s.code() == Code::Unavailable && s.message().contains("connect");
    if !has_body
        && !not_sent
        && matches!(
            s.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::Cancelled
                | Code::DeadlineExceeded
                | Code::Internal
        )
    {
        return StoreError::OutcomeUnknown {
            reason: format!(
                "the call broke before the server answered (gRPC status {:?}: {})",
                s.code(),
                s.message()
            ),
        };
    }
    status_to_error(s)
}

/// The store error a status stands for.
pub fn status_to_error(s: &Status) -> StoreError {
    if let Some(body) = s
        .metadata()
        .get_bin(ERROR_KEY)
        .and_then(|v| v.to_bytes().ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
    {
        return error_from(500, &body, "gRPC");
    }
    let detail = format!("gRPC status {:?}: {}", s.code(), s.message());
    match s.code() {
        Code::Unavailable => {
            // The transport's causes say why (a refused connection, a certificate).
            let mut causes = String::new();
            let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(s);
            while let Some(c) = cause {
                causes.push_str(&format!(": {c}"));
                cause = c.source();
            }
            let hint = cairn_wire::connect_hint(&format!("{detail}{causes}"));
            StoreError::Io {
                path: "gRPC".into(),
                source: std::io::Error::other(format!(
                    "cannot reach the server ({detail}{causes}); {hint}"
                )),
            }
        }
        _ => StoreError::Io { path: "gRPC".into(), source: std::io::Error::other(detail) },
    }
}
