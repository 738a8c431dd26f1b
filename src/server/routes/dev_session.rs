//! `POST /ai/dev/session`: in development mode only, a session cookie for any user id, so the
//! demo page works with no setup. The router does not route it otherwise: in production it is
//! a 404, and the application that owns the users sets the `access_token` cookie itself.

use std::time::Duration;

use hyper::header::{HeaderValue, SET_COOKIE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::log;
use crate::server::error::ApiError;
use crate::server::request::{read_json, require_json_content_type, RequestBody};
use crate::server::response::{json_response, ResponseBody};
use crate::server::state::AppState;

/// Lifetime of a development session's token, and of its cookie.
const SESSION_TTL_SECS: u64 = 86_400;
/// Longest accepted user id, in characters.
const MAX_USER_ID_LEN: usize = 256;
/// Largest accepted body: a user id and a little JSON around it.
const MAX_BODY_BYTES: usize = 4 * 1024;

/// Answers `{"user_id"}` and sets the `access_token` cookie to a token for that user.
pub(in crate::server) async fn create(
    state: &AppState,
    request: Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    // Even a development login must not be forgeable by a cross-site form (login CSRF).
    require_json_content_type(request.headers())?;
    let body = read_json(request, MAX_BODY_BYTES, state.config.body_read_timeout).await?;
    let user_id = parse_user_id(&body)?;
    let token = state
        .auth
        .issue(user_id, false, Duration::from_secs(SESSION_TTL_SECS));
    // HttpOnly: the page's script never sees the token. SameSite=Strict: no other site's
    // request carries it. No `Secure`: development mode serves plain http on localhost.
    let cookie = format!(
        "access_token={token}; Path=/; Max-Age={SESSION_TTL_SECS}; HttpOnly; SameSite=Strict"
    );
    let mut response = json_response(StatusCode::OK, &json!({ "user_id": user_id }));
    response.headers_mut().insert(
        SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("a JWT is base64url and dots"),
    );
    log::info!("development session for user {user_id}");
    Ok(response)
}

/// The body's `user_id`, checked as a token's `sub` would be: a non-blank string of at most
/// `MAX_USER_ID_LEN` characters, none of them a control character.
fn parse_user_id(body: &Value) -> Result<&str, ApiError> {
    let invalid = |message: String| Err(ApiError::Unprocessable(message));
    let Value::Object(fields) = body else {
        return invalid("the body must be a JSON object".to_owned());
    };
    if let Some(unknown) = fields.keys().find(|key| *key != "user_id") {
        return invalid(format!(
            "unknown field `{unknown}`; the one field is user_id"
        ));
    }
    match fields.get("user_id") {
        Some(Value::String(user_id)) if user_id.trim().is_empty() => {
            invalid("`user_id` must not be blank".to_owned())
        }
        Some(Value::String(user_id)) if user_id.chars().count() > MAX_USER_ID_LEN => invalid(
            format!("`user_id` is longer than {MAX_USER_ID_LEN} characters"),
        ),
        Some(Value::String(user_id)) if user_id.chars().any(char::is_control) => {
            invalid("`user_id` must not contain control characters".to_owned())
        }
        Some(Value::String(user_id)) => Ok(user_id),
        Some(_) => invalid("`user_id` must be a string".to_owned()),
        None => invalid("`user_id` is required".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_id_is_a_printable_non_blank_bounded_string() {
        assert_eq!(parse_user_id(&json!({"user_id": "ada"})), Ok("ada"));
        let longest = "é".repeat(MAX_USER_ID_LEN);
        assert_eq!(parse_user_id(&json!({ "user_id": longest })), Ok(&*longest));
        for body in [
            json!({"user_id": ""}),
            json!({"user_id": " \t"}),
            json!({"user_id": "a\u{0}b"}),
            json!({"user_id": "a\nb"}),
            json!({"user_id": "a\u{7f}"}),
            json!({"user_id": "x".repeat(MAX_USER_ID_LEN + 1)}),
            json!({"user_id": 7}),
            json!({"user_id": null}),
            json!({}),
            json!({"user_id": "ada", "admin": true}),
            json!(["ada"]),
        ] {
            let error = parse_user_id(&body).unwrap_err();
            assert_eq!(error.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        }
    }
}
