//! What every route shares: who is asking, the app, and the answer a
//! request gets instead of its result.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cairn_core::StoreError;
use cairn_wire::error_body;
use serde_json::json;

use crate::App;
use crate::auth::Principal;
use crate::params::Params;

pub(crate) type Who = Extension<Principal>;

pub(crate) fn forbidden(reason: Option<String>) -> ApiResult<()> {
    match reason {
        Some(reason) => {
            Err(ApiError::Store(StoreError::AccessDenied { code: "forbidden".into(), reason }))
        }
        None => Ok(()),
    }
}

pub(crate) type Shared = State<Arc<App>>;

/// What a request gets instead of its answer.
pub(crate) enum ApiError {
    Store(StoreError),
    /// The request itself is malformed (400), with what is wrong.
    Request(String),
    /// What the request names is not there (404), with what is missing.
    NotFound(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match self {
            ApiError::Store(e) => error_body(&e),
            ApiError::Request(message) => {
                (400, json!({"error": "invalid_request", "message": message}))
            }
            ApiError::NotFound(message) => (404, json!({"error": "not_found", "message": message})),
        };
        (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), Json(body))
            .into_response()
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

pub(crate) fn params(map: HashMap<String, String>, allowed: &[&str]) -> ApiResult<Params> {
    Params::new(map, allowed).map_err(ApiError::Request)
}
