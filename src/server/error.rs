//! Every failure a request can meet, and the one place it becomes an HTTP response.

use std::time::Duration;

use hyper::header::{HeaderValue, ALLOW, CONNECTION, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use super::response::{json_response, ResponseBody};
use crate::delivery::StreamLimitError;

/// The 401 reason when no token was sent at all: its challenge carries no error code
/// (RFC 6750 §3.1), since nothing was wrong with a token.
pub const MISSING_TOKEN: &str = "missing bearer token";

/// A request that cannot be served, with what the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400: the body is not valid JSON, or lacks what the endpoint needs.
    BadRequest(String),
    /// 401: no valid token; the text says what was wrong with it.
    Unauthorized(&'static str),
    /// 403: a valid token without the needed role.
    Forbidden(&'static str),
    /// 404: no such route or resource (or not the caller's).
    NotFound,
    /// 405: the path exists, with these methods (the `Allow` header).
    MethodNotAllowed(&'static str),
    /// 413: this part of the request is larger than this many bytes.
    PayloadTooLarge(&'static str, usize),
    /// 408: the request body did not arrive within this time; the connection is closed.
    RequestTimeout(Duration),
    /// 409: the resource is in a state that does not allow the request.
    Conflict(String),
    /// 415: the body is not of the media type the endpoint needs; the text says which.
    UnsupportedMediaType(&'static str),
    /// 422: a field is missing or has a value the endpoint cannot use.
    Unprocessable(String),
    /// 429: the user has too many open streams.
    TooManyStreams(usize),
    /// 429: the user has this many unfinished jobs, the most allowed.
    TooManyJobs(usize),
    /// 503: the server is at its connection limit or shutting down.
    Unavailable(&'static str),
    /// 503: an event reached this process but not the others (Redis is unreachable).
    NotRelayed(String),
    /// 503: the server cannot take work now (`/readyz`); the text says why.
    NotReady(String),
    /// 500: a bug; details are in the server log, not the response.
    Internal,
}

impl From<StreamLimitError> for ApiError {
    fn from(error: StreamLimitError) -> Self {
        match error {
            StreamLimitError::TooManyForUser(max) => ApiError::TooManyStreams(max),
            StreamLimitError::ShuttingDown => ApiError::Unavailable("server is shutting down"),
        }
    }
}

impl ApiError {
    /// The status code this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(..) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyStreams(_) | ApiError::TooManyJobs(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) | ApiError::NotRelayed(_) | ApiError::NotReady(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The human-readable text of the JSON body's `error` field.
    pub fn message(&self) -> String {
        match self {
            ApiError::BadRequest(text)
            | ApiError::Unprocessable(text)
            | ApiError::Conflict(text)
            | ApiError::NotRelayed(text)
            | ApiError::NotReady(text) => text.clone(),
            ApiError::Unauthorized(text) | ApiError::Forbidden(text) => (*text).to_owned(),
            ApiError::Unavailable(text) | ApiError::UnsupportedMediaType(text) => {
                (*text).to_owned()
            }
            ApiError::NotFound => "not found".to_owned(),
            ApiError::MethodNotAllowed(allow) => format!("method not allowed; use {allow}"),
            ApiError::PayloadTooLarge(what, limit) => {
                format!("{what} is larger than {limit} bytes")
            }
            ApiError::RequestTimeout(timeout) => {
                format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs()
                )
            }
            ApiError::TooManyStreams(max) => {
                format!("too many open streams for this user (max {max})")
            }
            ApiError::TooManyJobs(max) => {
                format!("too many unfinished jobs for this user (max {max}); retry when one ends")
            }
            ApiError::Internal => "internal server error".to_owned(),
        }
    }

    /// The response: the status, `{"error": message}`, and the headers the status calls for.
    pub fn into_response(self) -> Response<ResponseBody> {
        let mut response = json_response(
            self.status(),
            &serde_json::json!({ "error": self.message() }),
        );
        let headers = response.headers_mut();
        match &self {
            ApiError::Unauthorized(reason) => {
                let challenge = match *reason {
                    MISSING_TOKEN => "Bearer realm=\"artifact-events\"".to_owned(),
                    _ => format!(
                        "Bearer realm=\"artifact-events\", error=\"invalid_token\", error_description=\"{reason}\""
                    ),
                };
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_str(&challenge).expect("reasons are static ASCII"),
                );
            }
            ApiError::MethodNotAllowed(allow) => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            // The rest of the body may still be on its way: the connection cannot be reused.
            ApiError::RequestTimeout(_) => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::Unavailable(_)
            | ApiError::NotRelayed(_)
            | ApiError::NotReady(_)
            | ApiError::TooManyStreams(_)
            | ApiError::TooManyJobs(_) => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        response
    }
}
