//! The hand-rolled router: one `match` over the path's segments, then the method.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use http_body_util::{Either, Full};
use hyper::body::Body;
use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, ALLOW,
    CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, ORIGIN, VARY,
};
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
    let cors = cors_grant(&state.config.cors_allow_origins, request.headers());
    let response = match catch_unwind(route(state.clone(), disconnect, request)).await {
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
pub(super) fn over_capacity(
    state: &AppState,
    request: &Request<impl RequestBody>,
) -> Response<ResponseBody> {
    let cors = cors_grant(&state.config.cors_allow_origins, request.headers());
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

/// What a request's `Origin` may do with the response.
enum CorsGrant {
    /// Not a cross-origin request we allow.
    None,
    /// A listed origin: it may read responses, with the user's cookies.
    Listed(HeaderValue),
    /// Any origin (`*` is listed), without credentials: browsers refuse `*` with cookies.
    Any,
}

impl CorsGrant {
    fn apply(self, allowed: &[String], headers: &mut HeaderMap) {
        match self {
            CorsGrant::None => {}
            CorsGrant::Listed(origin) => {
                headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                let credentials = HeaderValue::from_static("true");
                headers.insert(ACCESS_CONTROL_ALLOW_CREDENTIALS, credentials);
            }
            CorsGrant::Any => {
                headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
            }
        }
        // With named origins the answer depends on Origin, whether or not this one was
        // allowed, so caches must key on it.
        if allowed.iter().any(|origin| origin != "*") {
            headers.append(VARY, HeaderValue::from_static("origin"));
        }
    }
}

/// What the request's `Origin` is granted: a listed origin is echoed, `*` allows any.
fn cors_grant(allowed: &[String], headers: &HeaderMap) -> CorsGrant {
    let Some(origin) = headers.get(ORIGIN) else {
        return CorsGrant::None;
    };
    let text = origin.to_str().unwrap_or_default();
    if allowed.iter().any(|allowed| allowed == text) {
        CorsGrant::Listed(origin.clone())
    } else if allowed.iter().any(|allowed| allowed == "*") {
        CorsGrant::Any
    } else {
        CorsGrant::None
    }
}

fn preflight(allow: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(ALLOW, HeaderValue::from_static(allow));
    headers.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(allow),
    );
    headers.insert(
        ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type, last-event-id"),
    );
    headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
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
        ["metrics"] if method == Method::GET => metrics(&state),
        ["metrics"] => Err(ApiError::MethodNotAllowed("GET")),
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
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(text))));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
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

/// The `key=value` pairs of a query string, values decoded (`None` if not valid
/// percent-encoded UTF-8).
pub(super) fn query_pairs(query: &str) -> impl Iterator<Item = (&str, Option<String>)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key, percent_decode(value))
        })
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XX` a byte.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut input = text.bytes();
    while let Some(byte) = input.next() {
        match byte {
            b'+' => bytes.push(b' '),
            b'%' => {
                let high = (input.next()? as char).to_digit(16)?;
                let low = (input.next()? as char).to_digit(16)?;
                bytes.push((high * 16 + low) as u8);
            }
            other => bytes.push(other),
        }
    }
    String::from_utf8(bytes).ok()
}
