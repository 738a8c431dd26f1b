//! `POST /ai/events/publish`: other processes publish on this server's bus.

use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::MAX_PUBLISH_BODY_BYTES;
use crate::events::{EventData, EventType};
use crate::server::error::ApiError;
use crate::server::request::{malformed_json, read_body, RequestBody};
use crate::server::response::{json_response, ResponseBody};
use crate::server::state::AppState;

/// Longest accepted `event_type` in a publish request, in characters.
const MAX_EVENT_TYPE_LEN: usize = 128;

/// Publishes `{"event_type", "event_data"}` on the bus, for callers with the publisher role.
pub(in crate::server) async fn publish(
    state: &AppState,
    request: Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = state.auth.authenticate(request.headers()).await?;
    if !identity.publisher {
        return Err(ApiError::Forbidden("token lacks the publisher role"));
    }
    let timeout = state.config.body_read_timeout;
    let body = read_body(request, MAX_PUBLISH_BODY_BYTES, timeout).await?;
    let parsed: PublishRequest = serde_json::from_slice(&body).map_err(malformed_json)?;
    // A struct would also deserialize from an array.
    let object = body.trim_ascii_start().starts_with(b"{");
    let event_type = match parsed.event_type {
        Some(Value::String(name)) if object && valid_event_type(&name) => EventType::from(name),
        _ => {
            return Err(ApiError::BadRequest(format!(
                "event_type must be a non-empty string of at most {MAX_EVENT_TYPE_LEN} printable characters, not \"*\""
            )))
        }
    };
    let event_data = parsed.event_data.map(EventData::from_raw).transpose();
    let event_data = event_data
        .map_err(|error| ApiError::BadRequest(format!("malformed JSON in event_data: {error}")))?;
    let event_data = match event_data {
        Some(data) if data.user_id().is_some() => data,
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
    let published = Published {
        status: "published",
        event_type: event_type.as_str(),
        handlers,
    };
    Ok(json_response(StatusCode::ACCEPTED, &published))
}

/// A publish request. `event_data` is kept as text: parsing it into a `Value` only to
/// serialize it again for the frame would be most of what a publish costs.
#[derive(Deserialize)]
struct PublishRequest<'a> {
    #[serde(default)]
    event_type: Option<Value>,
    #[serde(borrow, default)]
    event_data: Option<&'a RawValue>,
}

/// The 202 answer; a struct rather than `json!`, which would build a map per publish.
#[derive(Serialize)]
struct Published<'a> {
    status: &'static str,
    event_type: &'a str,
    handlers: usize,
}

fn valid_event_type(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= MAX_EVENT_TYPE_LEN
        && name != EventType::ANY.as_str()
        && !name.chars().any(char::is_control)
}
