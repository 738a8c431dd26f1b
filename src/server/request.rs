//! Reading requests: any body the router accepts, JSON bodies within a limit, query strings,
//! and what hyper's connection leaves in each request's extensions.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::Request;
use serde_json::Value;
use tokio::sync::Notify;

use super::error::ApiError;

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

/// The connection a request arrived on, put in the request's extensions by the listener.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// Notified to close the connection: how an HTTP/1.1 stream whose client stopped reading
    /// ends. An HTTP/2 request gets one of its own that closes nothing: its stream ends
    /// through its closed queue, and the connection stays open for its other streams.
    pub disconnect: Arc<Notify>,
}

/// Reads a JSON body of at most `limit` bytes within `timeout`: 413 when larger, 408 when
/// slower, 400 when not JSON.
pub async fn read_json(
    request: Request<impl RequestBody>,
    limit: usize,
    timeout: Duration,
) -> Result<Value, ApiError> {
    let body = read_body(request, limit, timeout).await?;
    serde_json::from_slice(&body).map_err(malformed_json)
}

/// The 400 for a body that is not the JSON expected.
pub fn malformed_json(error: serde_json::Error) -> ApiError {
    ApiError::BadRequest(format!("malformed JSON: {error}"))
}

/// Reads a body of at most `limit` bytes within `timeout`: 413 when larger, 408 when slower.
pub async fn read_body(
    request: Request<impl RequestBody>,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let declared_length = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    // Refuse a declared oversize body before reading any of it.
    if declared_length.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::PayloadTooLarge("body", limit));
    }
    let reading = Limited::new(request.into_body(), limit).collect();
    let Ok(read) = tokio::time::timeout(timeout, reading).await else {
        return Err(ApiError::RequestTimeout(timeout));
    };
    match read {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge("body", limit))
        }
        Err(error) => Err(ApiError::BadRequest(format!(
            "could not read the body: {error}"
        ))),
    }
}

/// Refuses (415) a request whose `Content-Type` is not `application/json` (parameters such as
/// `charset` allowed). A cross-site HTML form can send only form and text types without a CORS
/// preflight, so a cookie-authenticated POST that must be JSON cannot be forged by one.
pub fn require_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let media_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .map(str::trim);
    match media_type {
        Some(media_type) if media_type.eq_ignore_ascii_case("application/json") => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType(
            "this request must be sent with content-type: application/json",
        )),
    }
}

/// The decoded value of the query parameter `name`, if present; 400 if it is not valid
/// percent-encoded UTF-8.
pub fn query_param<B>(request: &Request<B>, name: &str) -> Result<Option<String>, ApiError> {
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

/// The `key=value` pairs of a query string, values decoded (`None` if not valid
/// percent-encoded UTF-8).
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, Option<String>)> {
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
