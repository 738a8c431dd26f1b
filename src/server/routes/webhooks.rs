//! A user's webhooks: `POST` and `GET /ai/webhooks`, `DELETE /ai/webhooks/{webhook_id}`, and
//! `GET /ai/webhooks/{webhook_id}/deliveries`.
//!
//! The caller is the bearer token's `sub` (the header only: no cookie, so no page of another
//! site can register a webhook as a signed-in browser). Another user's webhook answers 404,
//! exactly like a missing one.

use bytes::Bytes;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::log;
use crate::server::error::ApiError;
use crate::server::request::{read_json, RequestBody};
use crate::server::response::{full_response, json_response, ResponseBody};
use crate::server::state::AppState;
use crate::webhooks::{Attempt, RegisterError, StoreFailure, Subscription};

/// Largest registration body: room for the longest URL and event types the document allows,
/// each character escaped as JSON at its longest (about 75 KB).
const MAX_REGISTER_BODY_BYTES: usize = 128 * 1024;

/// Registers a webhook: 201 with its id and its secret, which is shown only here.
pub(in crate::server) async fn create(
    state: &AppState,
    request: Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = state.auth.authenticate(request.headers()).await?;
    let timeout = state.config.body_read_timeout;
    let body = read_json(request, MAX_REGISTER_BODY_BYTES, timeout).await?;
    let (url, event_types) = parse_register_request(body)?;
    let subscription = state
        .webhooks
        .register(&identity.user_id, url, event_types)
        .await
        .map_err(|error| match error {
            RegisterError::Invalid(text) => ApiError::Unprocessable(text),
            RegisterError::TooMany(max) => ApiError::Conflict(format!(
                "this user already has {max} webhooks, the most allowed"
            )),
            RegisterError::Store(error) => store_failure(error),
        })?;
    let mut answer = to_json(&subscription);
    answer["secret"] = Value::from(subscription.key.to_text());
    Ok(json_response(StatusCode::CREATED, &answer))
}

/// The caller's webhooks, without their secrets.
pub(in crate::server) async fn list(
    state: &AppState,
    request: &Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = state.auth.authenticate(request.headers()).await?;
    let webhooks: Vec<Value> = state
        .webhooks
        .list(&identity.user_id)
        .iter()
        .map(|subscription| to_json(subscription))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "webhooks": webhooks }),
    ))
}

/// Removes one of the caller's webhooks, and what it had pending: 204.
pub(in crate::server) async fn delete(
    state: &AppState,
    request: &Request<impl RequestBody>,
    webhook_id: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = state.auth.authenticate(request.headers()).await?;
    match state.webhooks.remove(&identity.user_id, webhook_id) {
        Ok(true) => {
            let mut response = full_response(Bytes::new());
            *response.status_mut() = StatusCode::NO_CONTENT;
            Ok(response)
        }
        Ok(false) => Err(ApiError::NotFound),
        Err(error) => Err(store_failure(error)),
    }
}

/// The recent attempts to deliver to one of the caller's webhooks, newest first.
pub(in crate::server) async fn deliveries(
    state: &AppState,
    request: &Request<impl RequestBody>,
    webhook_id: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = state.auth.authenticate(request.headers()).await?;
    let attempts = state
        .webhooks
        .attempts(&identity.user_id, webhook_id)
        .map_err(store_failure)?
        .ok_or(ApiError::NotFound)?;
    let attempts: Vec<Value> = attempts.iter().map(attempt_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "deliveries": attempts }),
    ))
}

/// `{"url": "...", "event_types": [...]}`, `event_types` optional; nothing else.
fn parse_register_request(body: Value) -> Result<(String, Option<Vec<String>>), ApiError> {
    let unprocessable = |text: &str| ApiError::Unprocessable(text.to_owned());
    let Value::Object(mut fields) = body else {
        return Err(unprocessable("the body must be a JSON object"));
    };
    let url = match fields.remove("url") {
        Some(Value::String(url)) => url,
        Some(_) => return Err(unprocessable("url must be a string")),
        None => return Err(unprocessable("url is required")),
    };
    let event_types = match fields.remove("event_types") {
        None | Some(Value::Null) => None,
        Some(Value::Array(types)) => Some(
            types
                .into_iter()
                .map(|name| match name {
                    Value::String(name) => Ok(name),
                    _ => Err(unprocessable("event_types must be an array of strings")),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(unprocessable("event_types must be an array of strings")),
    };
    if let Some(field) = fields.keys().next() {
        return Err(ApiError::Unprocessable(format!("unknown field {field}")));
    }
    Ok((url, event_types))
}

fn to_json(subscription: &Subscription) -> Value {
    let mut fields = Map::new();
    fields.insert("id".into(), subscription.id.clone().into());
    fields.insert("url".into(), subscription.url.clone().into());
    fields.insert(
        "event_types".into(),
        subscription
            .event_types
            .clone()
            .map_or(Value::Null, Value::from),
    );
    fields.insert("created_at".into(), subscription.created_at.clone().into());
    fields.insert("disabled".into(), subscription.disabled.into());
    Value::Object(fields)
}

fn attempt_json(attempt: &Attempt) -> Value {
    json!({
        "message_id": attempt.message_id,
        "attempt": attempt.attempt,
        "at": attempt.at,
        "status": attempt.status,
        "error": attempt.error,
        "duration_ms": attempt.duration_ms,
    })
}

fn store_failure(error: StoreFailure) -> ApiError {
    log::error!("{error}");
    ApiError::Internal
}
