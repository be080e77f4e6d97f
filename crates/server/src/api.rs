//! The HTTP routes. Every error is `{"error": code, "message": ...}` with a
//! status that says whose fault it was; bad input never reaches the store.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, Extension, Path, Query as QueryString, Request, State,
};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_core::{
    Direction, Position, Query, ReadAllOptions, ReadStreamOptions, StartFrom, StoreError,
    SubscriptionTarget,
};
use cairn_wire::{
    AppendRequest, EVENTS_PAGE_MAX, EventOut, Events, Head, Next as NextPage, QueryRequest,
    STREAMS_PAGE_MAX, error_body, expected_from_wire, from_body, parse_expected, parse_query,
};
use futures_util::StreamExt;
use serde_json::json;

use crate::App;
use crate::auth::{Principal, Refusal};
use crate::params::Params;

use crate::reply::{ApiError, ApiResult, Shared, Who, forbidden, params};

pub(crate) fn router(app: Arc<App>) -> Router {
    let limit = app.config.body_limit;
    let api = Router::new()
        .route("/streams", get(list_streams))
        .route("/streams/{stream}", post(append).get(read_stream).delete(delete_stream))
        // An empty name gets the store's own "invalid stream name" answer.
        .route(
            "/streams/",
            post(|app: Shared, who: Who, body: Bytes| append(app, who, Path(String::new()), body)),
        )
        .route("/appends", post(append_lines))
        .route("/streams/{stream}/info", get(stream_info))
        .route("/streams/{stream}/metadata", get(get_metadata).put(set_metadata))
        .route("/streams/{stream}/subscribe", get(subscribe_stream))
        .route("/all", get(read_all))
        .route("/all/subscribe", get(subscribe_all))
        .route("/query", post(read_query))
        .route("/head", get(head))
        .route("/groups", get(groups))
        .route("/sagas", get(crate::sagas::list))
        .route("/sagas/{name}/{id}", get(crate::sagas::show))
        .route("/processes", get(crate::sagas::processes))
        .route_layer(middleware::from_fn_with_state(app.clone(), authenticate));
    let http = Router::new()
        .merge(api)
        .route("/", get(|| async { axum::response::Html(include_str!("ui.html")) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|| async { Json(crate::openapi::document()) }))
        .fallback(|| async {
            let body = json!({"error": "not_found", "message": "no such endpoint; the API is described at /openapi.json"});
            (StatusCode::NOT_FOUND, Json(body))
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(app.clone(), count_status))
        .with_state(app.clone());
    // gRPC on the same port: its routes first, everything else is the HTTP API.
    crate::grpc::routes(app).fallback_service(http)
}

/// Who is asking: the key's principal, or an admin when auth is off.
async fn authenticate(
    State(app): Shared,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    // Browsers' EventSource cannot send headers, so the two subscribe routes
    // take the key as `access_token`; anywhere else it would only leak into logs.
    let decode =
        |text: &str| percent_encoding::percent_decode_str(text).decode_utf8_lossy().into_owned();
    let from_query = request.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (name, value) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(name) == "access_token").then(|| format!("Bearer {}", decode(value)))
        })
    });
    let subscribe = request.method() == axum::http::Method::GET
        && request.extensions().get::<axum::extract::MatchedPath>().is_some_and(|p| {
            matches!(p.as_str(), "/streams/{stream}/subscribe" | "/all/subscribe")
        });
    if from_query.is_some() && !subscribe {
        let message = "the access_token parameter is only for subscriptions (EventSource); send the key as `Authorization: Bearer <key>`";
        return ApiError::Request(message.into()).into_response();
    }
    let principal = match &app.auth {
        None => Principal::anonymous_admin(),
        Some(auth) => {
            let header = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
                .or(from_query);
            match auth.check(header.as_deref(), peer.ip()).await {
                Ok(principal) => principal,
                Err(Refusal::Unauthorized(reason)) => {
                    let body = json!({"error": "unauthorized", "message": format!("access denied: {reason}"), "reason": reason});
                    return (
                        StatusCode::UNAUTHORIZED,
                        [(header::WWW_AUTHENTICATE, "Bearer")],
                        Json(body),
                    )
                        .into_response();
                }
                Err(Refusal::TooManyFailures) => {
                    let reason = "too many failed logins from this address; wait a minute";
                    let body = json!({"error": "too_many_failed_logins", "message": reason, "reason": reason});
                    return (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
                }
                Err(Refusal::Busy) => {
                    let busy = StoreError::Busy(
                        "too many API keys are being checked at once; retry in a second".into(),
                    );
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::RETRY_AFTER, "1")],
                        Json(error_body(&busy).1),
                    )
                        .into_response();
                }
            }
        }
    };
    request.extensions_mut().insert(principal);
    next.run(request).await
}

/// Counts answers by status class, and turns axum's own plain-text
/// rejections (a body over the limit, a bad path) into the API's JSON errors.
/// A declared Content-Length over the limit is refused before any of the
/// body is read; `Connection: close`, as the rest of it is never read.
async fn count_status(State(app): Shared, request: Request, next: Next) -> Response {
    let too_large = |limit: usize| {
        (
            "body_too_large",
            format!(
                "the request body is over the server's limit of {limit} bytes; send less per request"
            ),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.config.body_limit as u64) {
        app.metrics.status(413);
        let (code, message) = too_large(app.config.body_limit);
        let mut response =
            (StatusCode::PAYLOAD_TOO_LARGE, Json(json!({"error": code, "message": message})))
                .into_response();
        if request.version() < axum::http::Version::HTTP_2 {
            response
                .headers_mut()
                .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        return response;
    }
    let response = next.run(request).await;
    let status = response.status();
    app.metrics.status(status.as_u16());
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.is_success() || is_json {
        return response;
    }
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(app.config.body_limit),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this endpoint does not take that method; see /openapi.json".to_string(),
        ),
        _ => {
            let body =
                axum::body::to_bytes(response.into_body(), 64 * 1024).await.unwrap_or_default();
            let text = String::from_utf8_lossy(&body).into_owned();
            return (status, Json(json!({"error": "invalid_request", "message": text})))
                .into_response();
        }
    };
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

async fn append(
    State(app): Shared,
    Extension(who): Who,
    Path(stream): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    forbidden(who.denies_stream(&stream, true))?;
    let request: AppendRequest = from_body(&body)
        .map_err(|e| ApiError::Request(format!("the body is not a valid append: {e}")))?;
    let expected = match &request.expected_version {
        None => cairn_core::ExpectedVersion::Any,
        Some(v) => expected_from_wire(v).map_err(ApiError::Request)?,
    };
    if let Some(condition) = &request.condition {
        forbidden(who.denies_condition(condition))?;
    }
    let mut events = Vec::with_capacity(request.events.len());
    for (i, e) in request.events.into_iter().enumerate() {
        events.push(e.into_new(i).map_err(ApiError::Request)?);
    }
    let (count, bytes) = (events.len(), events.iter().map(|e| e.data.len()).sum::<usize>());
    let started = Instant::now();
    let result = match request.condition {
        Some(condition) => app.store.append_if(&stream, expected, events, condition).await,
        None => app.store.append(&stream, expected, events).await,
    };
    match result {
        Ok(done) => {
            app.metrics.append_ok(count, bytes, started.elapsed());
            Ok(Json(done).into_response())
        }
        Err(e) => {
            app.metrics.append_failed();
            Err(e.into())
        }
    }
}

/// `POST /appends`: NDJSON, one append a line (`{"stream", "expected_version"?,
/// "events", "condition"?}`), each atomic and on its own, applied in order
/// and sharing fsyncs. The answer is NDJSON too, a line per append in the
/// same order: its result, or the error body it would have had alone. A
/// line that is not a valid append refuses the whole body (400, naming
/// the line) and nothing is written.
async fn append_lines(State(app): Shared, Extension(who): Who, body: Bytes) -> ApiResult<Response> {
    let mut appends = Vec::new();
    for (n, line) in body.split(|b| *b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if appends.len() >= crate::appends::BATCH_MAX {
            return Err(ApiError::Request(format!(
                "more than {} appends in one body; send them in several",
                crate::appends::BATCH_MAX
            )));
        }
        let bad = |e: String| ApiError::Request(format!("line {}: {e}", n + 1));
        let request: cairn_wire::AppendLine =
            from_body(line).map_err(|e| bad(format!("not a valid append: {e}")))?;
        let expected = match &request.expected_version {
            None => cairn_core::ExpectedVersion::Any,
            Some(v) => expected_from_wire(v).map_err(bad)?,
        };
        let events = request
            .events
            .into_iter()
            .enumerate()
            .map(|(i, e)| e.into_new(i))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let mut append = cairn_core::Append::new(request.stream, expected, events);
        append.condition = request.condition;
        appends.push(Ok(append));
    }
    if appends.is_empty() {
        return Err(ApiError::Request("the body has no appends: send NDJSON, a line {\"stream\": ..., \"events\": [...]} per append".into()));
    }
    let mut out = Vec::new();
    for result in crate::appends::run(&app, &who, appends).await {
        let written = match result {
            Ok(done) => serde_json::to_writer(&mut out, &done),
            Err(e) => serde_json::to_writer(&mut out, &error_body(&e).1),
        };
        written.expect("JSON of plain values");
        out.push(b'\n');
    }
    Ok(([(axum::http::header::CONTENT_TYPE, cairn_wire::NDJSON)], out).into_response())
}

/// Events as `{"events": [...], "next": ...}`, serialised once with the
/// store's payload bytes as they are: never parsed again, so no stored
/// payload can make the answer fail. `next` gives the cursor after the last
/// event when the page is full (`limit` events).
fn events_response(
    events: &[cairn_core::RecordedEvent],
    limit: usize,
    next: impl Fn(&cairn_core::RecordedEvent) -> Option<NextPage>,
) -> Response {
    let next = events.last().filter(|_| events.len() >= limit).and_then(next);
    Json(Events { events: events.iter().map(EventOut::from_recorded).collect(), next })
        .into_response()
}

/// A page of `$all` or a query continues after its last event, either way.
fn after_last(e: &cairn_core::RecordedEvent) -> Option<NextPage> {
    Some(NextPage::After(e.position.0))
}

/// The `limit` of a read: 1000 by default, at most [`EVENTS_PAGE_MAX`] (a
/// larger one is lowered, not refused: the answer's `next` says so).
fn page_limit(p: &Params) -> ApiResult<usize> {
    Ok(p.limit(1000).map_err(ApiError::Request)?.min(EVENTS_PAGE_MAX))
}

async fn read_stream(
    State(app): Shared,
    Extension(who): Who,
    Path(stream): Path<String>,
    QueryString(q): QueryString<HashMap<String, String>>,
) -> ApiResult<Response> {
    forbidden(who.denies_stream(&stream, false))?;
    let p = params(q, &["from", "limit", "direction"])?;
    let direction = p.direction().map_err(ApiError::Request)?;
    let mut options = if direction == Direction::Backward {
        ReadStreamOptions::backward()
    } else {
        ReadStreamOptions::forward()
    };
    if let Some(from) = p.u64("from").map_err(ApiError::Request)? {
        options = options.from_version(from);
    }
    let limit = page_limit(&p)?;
    let events = app.store.read_stream(&stream, options.limit(limit)).await?;
    let next = |e: &cairn_core::RecordedEvent| match direction {
        Direction::Forward => e.version.checked_add(1).map(NextPage::From),
        Direction::Backward => e.version.checked_sub(1).filter(|&v| v > 0).map(NextPage::From),
    };
    Ok(events_response(&events, limit, next))
}

/// `from` (inclusive) or `after` (exclusive), `limit`, `direction`.
fn all_options(p: &Params) -> ApiResult<ReadAllOptions> {
    let direction = p.direction().map_err(ApiError::Request)?;
    let mut options = if direction == Direction::Backward {
        ReadAllOptions::backward()
    } else {
        ReadAllOptions::forward()
    };
    match (p.u64("from").map_err(ApiError::Request)?, p.u64("after").map_err(ApiError::Request)?) {
        (Some(_), Some(_)) => return Err(ApiError::Request("give from or after, not both".into())),
        (Some(from), None) => options = options.from(Position(from)),
        (None, Some(after)) => options = options.after(Position(after)),
        (None, None) => {}
    }
    Ok(options.limit(page_limit(p)?))
}

async fn read_all(
    State(app): Shared,
    Extension(who): Who,
    QueryString(q): QueryString<HashMap<String, String>>,
) -> ApiResult<Response> {
    forbidden(who.denies_all())?;
    let p = params(q, &["from", "after", "limit", "direction"])?;
    let options = all_options(&p)?;
    Ok(events_response(&app.store.read_all(options).await?, options.limit, after_last))
}

async fn read_query(State(app): Shared, Extension(who): Who, body: Bytes) -> ApiResult<Response> {
    forbidden(who.denies_all())?;
    let request: QueryRequest = from_body(&body)
        .map_err(|e| ApiError::Request(format!("the body is not a valid query: {e}")))?;
    let mut options = if request.direction == Direction::Backward {
        ReadAllOptions::backward()
    } else {
        ReadAllOptions::forward()
    };
    match (request.from, request.after) {
        (Some(_), Some(_)) => return Err(ApiError::Request("give from or after, not both".into())),
        (Some(from), None) => options = options.from(Position(from)),
        (None, Some(after)) => options = options.after(Position(after)),
        (None, None) => {}
    }
    let limit = request.limit.unwrap_or(1000).min(EVENTS_PAGE_MAX);
    Ok(events_response(
        &app.store.read_query(&request.query, options.limit(limit)).await?,
        limit,
        after_last,
    ))
}

async fn list_streams(
    State(app): Shared,
    Extension(who): Who,
    QueryString(q): QueryString<HashMap<String, String>>,
) -> ApiResult<Response> {
    forbidden(who.denies_all())?;
    let p = params(q, &["prefix", "limit"])?;
    // At most STREAMS_PAGE_MAX; `truncated` says there may be more (the
    // store lists by name from the start, so there is no cursor yet).
    let limit = p.limit(1000).map_err(ApiError::Request)?.min(STREAMS_PAGE_MAX);
    let streams = app.store.list_streams(p.str("prefix").unwrap_or(""), limit).await?;
    let full = limit > 0 && streams.len() >= limit;
    let mut body = json!({ "streams": streams });
    if full {
        body["truncated"] = json!(true);
    }
    Ok(Json(body).into_response())
}

async fn stream_info(
    State(app): Shared,
    Extension(who): Who,
    Path(stream): Path<String>,
) -> ApiResult<Response> {
    forbidden(who.denies_stream(&stream, false))?;
    Ok(Json(app.store.stream_info(&stream).await?).into_response())
}

async fn get_metadata(
    State(app): Shared,
    Extension(who): Who,
    Path(stream): Path<String>,
) -> ApiResult<Response> {
    forbidden(who.denies_stream(&stream, false))?;
    Ok(Json(app.store.stream_info(&stream).await?.metadata).into_response())
}

async fn set_metadata(
    State(app): Shared,
    Extension(who): Who,
    Path(stream): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    forbidden(who.denies_stream(&stream, true))?;
    let metadata = cairn_wire::parse_metadata(&body)
        .map_err(|e| ApiError::Request(format!("the body is not valid stream metadata: {e}")))?;
    Ok(Json(app.store.set_stream_metadata(&stream, metadata).await?).into_response())
}

async fn delete_stream(
    State(app): Shared,
    Extension(who): Who,
    Path(stream): Path<String>,
    QueryString(q): QueryString<HashMap<String, String>>,
) -> ApiResult<Response> {
    forbidden(who.denies_stream(&stream, true))?;
    let p = params(q, &["expected_version", "hard"])?;
    let expected = match p.str("expected_version") {
        None => cairn_core::ExpectedVersion::Any,
        Some(v) => parse_expected(v).map_err(ApiError::Request)?,
    };
    let hard = p.bool("hard").map_err(ApiError::Request)?;
    Ok(Json(app.store.delete_stream(&stream, expected, hard).await?).into_response())
}

async fn head(State(app): Shared, Extension(who): Who) -> ApiResult<Response> {
    forbidden(who.denies_all())?;
    let head = app.store.head_position().await?;
    let last = app.store.last_position().await?;
    Ok(Json(Head { head: head.0, last: last.map(|p| p.0) }).into_response())
}

/// The consumer groups stored in the store, with their lag.
async fn groups(State(app): Shared, Extension(who): Who) -> ApiResult<Response> {
    forbidden(who.denies_all())?;
    let stored = cairn_cqrs::stored_groups(app.store.as_ref()).await.map_err(|e| match e {
        cairn_cqrs::GroupError::Store(e) => ApiError::Store(e),
        other => ApiError::Store(StoreError::Corrupt {
            file: "consumer group state".into(),
            offset: 0,
            reason: other.to_string(),
        }),
    })?;
    let mut out = Vec::new();
    for g in stored {
        let mut row = json!({"group": g.name, "follows": g.source, "checkpoint": g.checkpoint.map(|c| c.0 .0), "parked": g.parked.len(), "replay_pending": g.replay_pending});
        if let Some(source) = &g.source {
            let lag = cairn_cqrs::lag(
                app.store.as_ref(),
                source,
                g.checkpoint.map(|c| c.0),
                g.checkpoint.map(|c| c.1),
                std::time::Duration::from_secs(5),
            )
            .await?;
            row["behind_events"] = json!(lag.events);
            row["behind_seconds"] = json!(lag.seconds);
            row["healthy"] = json!(lag.healthy);
        }
        out.push(row);
    }
    Ok(Json(json!({ "groups": out })).into_response())
}

/// Liveness and readiness: 503 while the store cannot take appends (say,
/// after a failed write, until it has recovered by itself).
async fn health(State(app): Shared) -> Response {
    let ready = match app.store.health().await {
        Ok(()) => app.store.head_position().await,
        Err(e) => Err(e),
    };
    match ready {
        Ok(head) => Json(json!({"status": "ok", "live": true, "ready": true, "head": head.0}))
            .into_response(),
        Err(e) => {
            let body = json!({"status": "unavailable", "live": true, "ready": false, "error": e.to_string()});
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

async fn metrics(State(app): Shared) -> Response {
    let mut text = app.metrics.render(app.started.elapsed());
    if let Some(engine) = &app.config.engine_metrics {
        text.push_str(&engine());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Where a subscription starts: `Last-Event-ID` (a reconnecting client), else
/// `after=N`, else `from=start|end`.
fn start_from(p: &Params, headers: &HeaderMap) -> ApiResult<StartFrom> {
    if let Some(id) = headers.get("last-event-id") {
        let id = id.to_str().ok().and_then(|s| s.trim().parse().ok());
        return id
            .map(StartFrom::After)
            .ok_or_else(|| ApiError::Request("Last-Event-ID is not a whole number".into()));
    }
    if let Some(after) = p.u64("after").map_err(ApiError::Request)? {
        if p.str("from").is_some() {
            return Err(ApiError::Request("give from or after, not both".into()));
        }
        return Ok(StartFrom::After(after));
    }
    match p.str("from") {
        None | Some("start") => Ok(StartFrom::Start),
        Some("end") => Ok(StartFrom::End),
        Some(v) => Err(ApiError::Request(format!(
            "from: {v:?} is not start or end (use after=N to start after an event)"
        ))),
    }
}

async fn subscribe_stream(
    State(app): Shared,
    Extension(who): Who,
    Path(stream): Path<String>,
    headers: HeaderMap,
    QueryString(q): QueryString<HashMap<String, String>>,
) -> ApiResult<Response> {
    forbidden(who.denies_stream(&stream, false))?;
    let p = params(q, &["from", "after", "access_token"])?;
    let from = start_from(&p, &headers)?;
    live(app, SubscriptionTarget::Stream(stream), from, |e| e.version).await
}

async fn subscribe_all(
    State(app): Shared,
    Extension(who): Who,
    headers: HeaderMap,
    QueryString(q): QueryString<HashMap<String, String>>,
) -> ApiResult<Response> {
    forbidden(who.denies_all())?;
    let p = params(q, &["from", "after", "category", "type", "query", "access_token"])?;
    let from = start_from(&p, &headers)?;
    let target = match (p.str("query"), p.str("category"), p.str("type")) {
        (Some(q), None, None) => {
            let query: Query = parse_query(q)
                .map_err(|e| ApiError::Request(format!("query: not a valid query: {e}")))?;
            SubscriptionTarget::Query(query)
        }
        (Some(_), _, _) => {
            return Err(ApiError::Request("give query, or category and/or type, not both".into()));
        }
        (None, None, None) => SubscriptionTarget::All,
        (None, category, types) => {
            let item = cairn_core::QueryItem {
                categories: category.map(|c| vec![c.to_string()]).unwrap_or_default(),
                types: types.map(|t| t.split(',').map(String::from).collect()).unwrap_or_default(),
                ..Default::default()
            };
            SubscriptionTarget::Query(Query { items: vec![item] })
        }
    };
    live(app, target, from, |e| e.position.0).await
}

/// A Server-Sent Events response following `target`: `event: event` frames
/// whose id resumes the subscription, an `event: error` frame if the store
/// fails, and the end when the server shuts down.
async fn live(
    app: Arc<App>,
    target: SubscriptionTarget,
    from: StartFrom,
    id: fn(&cairn_core::RecordedEvent) -> u64,
) -> ApiResult<Response> {
    let subscription = app.store.subscribe(target, from).await?;
    let guard = app.metrics.subscription();
    let mut shutdown = app.shutdown.clone();
    let stopped = async move {
        let _ = shutdown.wait_for(|&stop| stop).await;
    };
    let frames = subscription
        .scan(false, move |failed, item| {
            let frame = if *failed {
                None
            } else {
                Some(match item {
                    Ok(e) => {
                        let data =
                            serde_json::to_string(&EventOut::from_recorded(&e)).unwrap_or_default();
                        SseEvent::default().id(id(&e).to_string()).event("event").data(data)
                    }
                    Err(e) => {
                        *failed = true;
                        SseEvent::default().event("error").data(error_body(&e).1.to_string())
                    }
                })
            };
            std::future::ready(frame)
        })
        .map(move |frame| {
            let _keep = &guard;
            Ok::<_, Infallible>(frame)
        })
        .take_until(Box::pin(stopped));
    Ok(Sse::new(frames).keep_alive(KeepAlive::default()).into_response())
}
