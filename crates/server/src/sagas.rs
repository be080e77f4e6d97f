//! `/sagas` and `/processes`: the views of `cairn_saga::inspect` as JSON, the
//! same documents `cairn sagas … --json` prints, for the web UI and for
//! operators' own tools. They read `$saga-` streams, so a key needs read
//! access to them.

use std::collections::HashMap;

use axum::Json;
use axum::extract::{Extension, Path, Query as QueryString, State};
use axum::response::{IntoResponse, Response};
use cairn_saga::Status;
use cairn_saga::inspect::{self, Found, InspectError, InstanceFilter};
use serde_json::json;

use crate::reply::{ApiError, ApiResult, Shared, Who, forbidden, params};

/// Most `$saga-` streams one request looks at.
const LOOK_AT_MAX: usize = 10_000;

/// `{key: rows, looked_at, truncated}`: truncated when the streams looked
/// at reached the limit, so there may be more.
fn page(key: &str, rows: Vec<serde_json::Value>, looked_at: usize, limit: usize) -> Response {
    let truncated = limit > 0 && looked_at >= limit;
    Json(json!({ key: rows, "looked_at": looked_at, "truncated": truncated })).into_response()
}

fn inspect_error(e: InspectError) -> ApiError {
    match e {
        InspectError::Store(e) => ApiError::Store(e),
        other => ApiError::NotFound(other.to_string()),
    }
}

fn saga_status(text: &str) -> Result<Status, ApiError> {
    let name = match text {
        "parked" | "needs-attention" => "needs_attention",
        other => other,
    };
    serde_json::from_value(json!(name)).map_err(|_| {
        ApiError::Request(format!(
            "unknown status '{text}'; choose from running, compensating, completed, compensated, needs_attention"
        ))
    })
}

/// `GET /sagas?saga=NAME&status=S&limit=N`: the sagas, newest first.
pub(crate) async fn list(
    State(app): Shared,
    Extension(who): Who,
    QueryString(q): QueryString<HashMap<String, String>>,
) -> ApiResult<Response> {
    let p = params(q, &["saga", "status", "limit"])?;
    let saga = p.str("saga");
    forbidden(who.denies_stream(&inspect::stream_prefix(saga), false))?;
    let status = p.str("status").map(saga_status).transpose()?;
    let limit = p.limit(1000).map_err(ApiError::Request)?.min(LOOK_AT_MAX);
    let found = inspect::sagas(app.store.as_ref(), saga, status, limit).await?;
    let sagas = found.sagas.iter().map(inspect::saga_json).collect();
    Ok(page("sagas", sagas, found.looked_at, limit))
}

/// `GET /processes?process=NAME&status=running|parked|ended&limit=N`: the
/// process-manager instances, latest change first.
pub(crate) async fn processes(
    State(app): Shared,
    Extension(who): Who,
    QueryString(q): QueryString<HashMap<String, String>>,
) -> ApiResult<Response> {
    let p = params(q, &["process", "status", "limit"])?;
    let process = p.str("process");
    forbidden(who.denies_stream(&inspect::stream_prefix(process), false))?;
    let only = match p.str("status") {
        None => None,
        Some("running") => Some(InstanceFilter::Running),
        Some("parked" | "needs_attention") => Some(InstanceFilter::Parked),
        Some("ended") => Some(InstanceFilter::Ended),
        Some(other) => {
            return Err(ApiError::Request(format!(
                "unknown status '{other}'; choose from running, parked, ended"
            )));
        }
    };
    let limit = p.limit(1000).map_err(ApiError::Request)?.min(LOOK_AT_MAX);
    let found = inspect::instances(app.store.as_ref(), process, only, limit).await?;
    let rows = found.rows.iter().map(|r| r.to_json()).collect();
    Ok(page("processes", rows, found.looked_at, limit))
}

/// `GET /sagas/{name}/{id}`: one saga (steps, timeline) or one process
/// instance (state, deadlines, reactions); `kind` says which.
pub(crate) async fn show(
    State(app): Shared,
    Extension(who): Who,
    Path((name, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    forbidden(who.denies_stream(&cairn_saga::saga_stream(&name, &id), false))?;
    let store = app.store.as_ref();
    let body = match inspect::find(store, &name, &id).await.map_err(inspect_error)? {
        Found::Saga(state, events) => inspect::saga_detail_json(&state, &events),
        Found::Process(history) => {
            inspect::process_view(store, *history).await.map_err(inspect_error)?.to_json()
        }
    };
    Ok(Json(body).into_response())
}
