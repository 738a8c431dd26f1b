//! The hand-rolled router: one `match` over the path's segments, then the method.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::header::CONTENT_LENGTH;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::error::ApiError;
use super::routes::{artifact, events};
use super::{json_response, AppState, ResponseBody};
use crate::log;
use crate::panic::catch_unwind;

/// A request body the router can read: hyper's `Incoming` from a connection, or any other
/// body of bytes (the fuzz checks pass a `Full<Bytes>` in process).
pub trait RequestBody:
    Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}

impl<B> RequestBody for B where
    B: Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}

/// Answers one request; every error, and any panic in a route, becomes a JSON response.
pub async fn handle(
    state: Arc<AppState>,
    disconnect: Arc<Notify>,
    request: Request<impl RequestBody>,
) -> Response<ResponseBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = match catch_unwind(route(state, disconnect, request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => error.into_response(),
        Err(panic) => {
            log::error!("{method} {path} panicked: {panic}");
            ApiError::Internal.into_response()
        }
    };
    log::debug!("{method} {path} -> {}", response.status().as_u16());
    response
}

async fn route(
    state: Arc<AppState>,
    disconnect: Arc<Notify>,
    request: Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method();
    match segments.as_slice() {
        ["healthz"] if method == Method::GET => {
            Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
        }
        ["healthz"] => Err(ApiError::MethodNotAllowed("GET")),
        ["ai", "artifact", "events", "stream"] if method == Method::GET => {
            events::stream(&state, disconnect, &request)
        }
        ["ai", "artifact", "events", "stream"] => Err(ApiError::MethodNotAllowed("GET")),
        ["ai", "events", "publish"] if method == Method::POST => {
            events::publish(&state, request).await
        }
        ["ai", "events", "publish"] => Err(ApiError::MethodNotAllowed("POST")),
        ["ai", "artifact", "generate"] if method == Method::POST => {
            artifact::generate(&state, request).await
        }
        ["ai", "artifact", "generate"] => Err(ApiError::MethodNotAllowed("POST")),
        ["ai", "artifact", "jobs"] if method == Method::GET => {
            artifact::list_jobs(&state, &request)
        }
        ["ai", "artifact", "jobs"] => Err(ApiError::MethodNotAllowed("GET")),
        ["ai", "artifact", "jobs", job_id] if method == Method::GET => {
            artifact::get_job(&state, &request, job_id)
        }
        ["ai", "artifact", "jobs", _] => Err(ApiError::MethodNotAllowed("GET")),
        ["ai", "artifact", "jobs", job_id, "cancel"] if method == Method::POST => {
            artifact::cancel_job(&state, &request, job_id).await
        }
        ["ai", "artifact", "jobs", _, "cancel"] => Err(ApiError::MethodNotAllowed("POST")),
        _ => Err(ApiError::NotFound),
    }
}

/// Reads a JSON body of at most `limit` bytes: 413 when larger, 400 when not JSON.
pub(super) async fn read_json(
    request: Request<impl RequestBody>,
    limit: usize,
) -> Result<Value, ApiError> {
    let declared_length = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    // Refuse a declared oversize body before reading any of it.
    if declared_length.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge("body", limit));
    }
    let body: Bytes = match Limited::new(request.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.is::<LengthLimitError>() => {
            return Err(ApiError::PayloadTooLarge("body", limit))
        }
        Err(error) => {
            return Err(ApiError::BadRequest(format!(
                "could not read the body: {error}"
            )))
        }
    };
    serde_json::from_slice(&body)
        .map_err(|error| ApiError::BadRequest(format!("malformed JSON: {error}")))
}
