//! The hand-rolled router: one `match` over the path's segments, then the method.

use std::sync::Arc;

use bytes::Bytes;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::cors::{preflight, CorsGrant};
use super::error::ApiError;
use super::request::RequestBody;
use super::response::{full_response, json_response, ResponseBody};
use super::routes::{artifact, dev_session, page, publish, stream};
use super::state::AppState;
use crate::log;
use crate::panic::catch_unwind;

/// Answers one request; every error, and any panic in a route, becomes a JSON response.
pub async fn handle(
    state: Arc<AppState>,
    request: Request<impl RequestBody>,
) -> Response<ResponseBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let cors = CorsGrant::for_request(&state.config.cors_allow_origins, request.headers());
    let response = match catch_unwind(route(state.clone(), request)).await {
        Ok(Ok(response)) => response,
        // A known path answers OPTIONS with what it allows: the CORS preflight.
        Ok(Err(ApiError::MethodNotAllowed(allow))) if method == Method::OPTIONS => preflight(allow),
        Ok(Err(error)) => error.into_response(),
        Err(panic) => {
            log::error!("{method} {path} panicked: {panic}");
            ApiError::Internal.into_response()
        }
    };
    finish(&state, cors, &method, &path, response)
}

/// Answers a request on a connection over `MAX_CONNECTIONS`: 503, and the connection closes.
pub fn over_capacity(
    state: &AppState,
    request: &Request<impl RequestBody>,
) -> Response<ResponseBody> {
    let cors = CorsGrant::for_request(&state.config.cors_allow_origins, request.headers());
    let mut response = ApiError::Unavailable("server is at its connection limit").into_response();
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    let (method, path) = (request.method(), request.uri().path());
    finish(state, cors, method, path, response)
}

/// What every answer gets: CORS headers, a count in the metrics, a debug log line.
fn finish(
    state: &AppState,
    cors: CorsGrant,
    method: &Method,
    path: &str,
    mut response: Response<ResponseBody>,
) -> Response<ResponseBody> {
    cors.apply(&state.config.cors_allow_origins, response.headers_mut());
    state.metrics.count_response(response.status().as_u16());
    log::debug!("{method} {path} -> {}", response.status().as_u16());
    response
}

async fn route(
    state: Arc<AppState>,
    request: Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method();
    match segments.as_slice() {
        // `/` trims to one empty segment.
        [""] if method == Method::GET => Ok(page::page(&state, &request)),
        [""] => Err(ApiError::MethodNotAllowed("GET")),
        ["healthz"] if method == Method::GET => {
            Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
        }
        ["healthz"] => Err(ApiError::MethodNotAllowed("GET")),
        ["readyz"] if method == Method::GET => ready(&state),
        ["readyz"] => Err(ApiError::MethodNotAllowed("GET")),
        ["metrics"] if method == Method::GET => metrics(&state),
        ["metrics"] => Err(ApiError::MethodNotAllowed("GET")),
        ["ai", "artifact", "events", "stream"] if method == Method::GET => {
            stream::open(&state, &request)
        }
        ["ai", "artifact", "events", "stream"] => Err(ApiError::MethodNotAllowed("GET")),
        ["ai", "events", "publish"] if method == Method::POST => {
            publish::publish(&state, request).await
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
        // Only in development mode: in production the route does not exist.
        ["ai", "dev", "session"] if !state.config.development_secret => Err(ApiError::NotFound),
        ["ai", "dev", "session"] if method == Method::POST => {
            dev_session::create(&state, request).await
        }
        ["ai", "dev", "session"] => Err(ApiError::MethodNotAllowed("POST")),
        _ => Err(ApiError::NotFound),
    }
}

/// `GET /readyz`: 200 while the server can take work; 503 while it is shutting down, Redis is
/// in an outage or the job store fails (`/healthz` stays a liveness check).
fn ready(state: &AppState) -> Result<Response<ResponseBody>, ApiError> {
    match state.unready_reason() {
        None => Ok(json_response(StatusCode::OK, &json!({"status": "ready"}))),
        Some(reason) => Err(ApiError::NotReady(reason)),
    }
}

/// `GET /metrics`: counters and gauges in the Prometheus text format.
fn metrics(state: &AppState) -> Result<Response<ResponseBody>, ApiError> {
    let jobs = state.jobs.store().count_by_status().map_err(|error| {
        log::error!("{error}");
        ApiError::Internal
    })?;
    let jobs: Vec<(&str, usize)> = jobs
        .iter()
        .map(|(status, count)| (status.as_str(), *count))
        .collect();
    let text = state.metrics.render(state.streams.stream_count(), &jobs);
    let mut response = full_response(Bytes::from(text));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}
