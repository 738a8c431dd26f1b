//! `GET /ai/artifact/events/stream` and `POST /ai/events/publish`.

use std::sync::Arc;

use http_body_util::Either;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, COOKIE};
use hyper::{HeaderMap, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::config::MAX_PUBLISH_BODY_BYTES;
use crate::events::EventType;
use crate::server::auth::bearer_token;
use crate::server::error::MISSING_TOKEN;
use crate::server::router::{query_pairs, read_json, RequestBody};
use crate::server::{json_response, ApiError, AppState, ResponseBody};
use crate::sse::StreamLimitError;

/// The header an `EventSource` sends when it reconnects.
const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
/// Longest accepted `event_type` in a publish request, in characters.
const MAX_EVENT_TYPE_LEN: usize = 128;

/// Opens the caller's event stream: the connected frame, any events missed since
/// `Last-Event-ID`, then every new event of its user.
pub(in crate::server) fn stream(
    state: &AppState,
    disconnect: Arc<Notify>,
    request: &Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = state.auth.verify(&stream_token(request)?)?;
    let last_event_id = match request.headers().get(LAST_EVENT_ID) {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::BadRequest("Last-Event-ID is not visible ASCII".to_owned()))?
                .to_owned(),
        ),
        None => query_param(request, "last_event_id")?,
    }
    // An empty id is what `EventSource` sends before it has seen one: no replay asked for.
    .filter(|id| !id.is_empty());
    let body = state
        .streams
        .open(&identity.user_id, last_event_id.as_deref(), disconnect)
        .map_err(|error| match error {
            StreamLimitError::TooManyForUser(max) => ApiError::TooManyStreams(max),
            StreamLimitError::ShuttingDown => ApiError::Unavailable("server is shutting down"),
        })?;
    let mut response = Response::new(Either::Right(body));
    // hyper keeps a connection's last response header map for reuse, for as long as the
    // stream is open: sized for these three headers it holds about 300 bytes, not 600.
    *response.headers_mut() = HeaderMap::with_capacity(3);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// The stream's token: the `Authorization: Bearer` header, else (for `EventSource`, which
/// cannot send headers) the `access_token` query parameter, else the `access_token` cookie.
fn stream_token(request: &Request<impl RequestBody>) -> Result<String, ApiError> {
    if request.headers().contains_key(AUTHORIZATION) {
        return bearer_token(request.headers()).map(str::to_owned);
    }
    if let Some(token) = query_param(request, "access_token")? {
        return Ok(token);
    }
    let cookie = request
        .headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix("access_token="));
    match cookie {
        Some(token) if !token.is_empty() => Ok(token.to_owned()),
        _ => Err(ApiError::Unauthorized(MISSING_TOKEN)),
    }
}

fn query_param(
    request: &Request<impl RequestBody>,
    name: &str,
) -> Result<Option<String>, ApiError> {
    for (key, value) in query_pairs(request.uri().query().unwrap_or("")) {
        if key == name {
            return value.map(Some).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "query parameter `{name}` is not valid percent-encoding"
                ))
            });
        }
    }
    Ok(None)
}

/// Publishes `{"event_type", "event_data"}` on the bus, for callers with the publisher role.
pub(in crate::server) async fn publish(
    state: &AppState,
    request: Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = state.auth.authenticate(request.headers())?;
    if !identity.publisher {
        return Err(ApiError::Forbidden("token lacks the publisher role"));
    }
    let mut body = read_json(request, MAX_PUBLISH_BODY_BYTES).await?;
    let event_type = match body.get("event_type") {
        Some(Value::String(name)) if valid_event_type(name) => EventType::from(name.as_str()),
        _ => {
            return Err(ApiError::BadRequest(format!(
                "event_type must be a non-empty string of at most {MAX_EVENT_TYPE_LEN} printable characters, not \"*\""
            )))
        }
    };
    let event_data = match body.get_mut("event_data").map(Value::take) {
        Some(data @ Value::Object(_)) if data.get("user_id").is_some_and(Value::is_string) => data,
        _ => {
            return Err(ApiError::BadRequest(
                "event_data must be an object with a string user_id".to_owned(),
            ))
        }
    };
    let handlers = state
        .bus
        .try_publish(&event_type, event_data)
        .await
        .map_err(|error| ApiError::NotRelayed(error.to_string()))?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"status": "published", "event_type": event_type.as_str(), "handlers": handlers}),
    ))
}

fn valid_event_type(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= MAX_EVENT_TYPE_LEN
        && name != EventType::ANY.as_str()
        && !name.chars().any(char::is_control)
}
