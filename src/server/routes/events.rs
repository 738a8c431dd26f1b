//! `GET /ai/artifact/events/stream` and `POST /ai/events/publish`.

use std::sync::Arc;

use http_body_util::Either;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::Notify;

use crate::config::MAX_PUBLISH_BODY_BYTES;
use crate::events::EventType;
use crate::server::router::{read_json, RequestBody};
use crate::server::{json_response, ApiError, AppState, ResponseBody};
use crate::sse::{encoder, StreamLimitError};

/// Longest accepted `event_type` in a publish request.
const MAX_EVENT_TYPE_LEN: usize = 128;

/// Opens the caller's event stream: the connected frame, then every event of its user.
pub(in crate::server) fn stream(
    state: &AppState,
    disconnect: Arc<Notify>,
    request: &Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = state.auth.authenticate(request.headers())?;
    let connected = json!({"type": "connected", "user_id": identity.user_id});
    let body = state
        .streams
        .open(
            &identity.user_id,
            encoder::encode_data(&connected.to_string()),
            state.config.keepalive,
            disconnect,
        )
        .map_err(|error| match error {
            StreamLimitError::TooManyForUser(max) => ApiError::TooManyStreams(max),
            StreamLimitError::ShuttingDown => ApiError::Unavailable("server is shutting down"),
        })?;
    let mut response = Response::new(Either::Right(body));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
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
    let handlers = state.bus.publish(&event_type, event_data).await;
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"status": "published", "event_type": event_type.as_str(), "handlers": handlers}),
    ))
}

fn valid_event_type(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_EVENT_TYPE_LEN
        && name != EventType::ANY.as_str()
        && !name.chars().any(char::is_control)
}
