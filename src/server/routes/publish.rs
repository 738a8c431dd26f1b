//! `POST /ai/events/publish`: other processes publish on this server's bus.

use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;

use crate::config::MAX_PUBLISH_BODY_BYTES;
use crate::events::EventType;
use crate::server::error::ApiError;
use crate::server::request::{read_json, RequestBody};
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
    let mut body = read_json(request, MAX_PUBLISH_BODY_BYTES, timeout).await?;
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
    let published = Published {
        status: "published",
        event_type: event_type.as_str(),
        handlers,
    };
    Ok(json_response(StatusCode::ACCEPTED, &published))
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
