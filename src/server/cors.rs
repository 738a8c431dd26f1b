//! Cross-origin access: which browser origins may read responses, and the preflight answer.

use bytes::Bytes;
use hyper::header::{
    HeaderMap, HeaderValue, ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS,
    ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, ALLOW,
    ORIGIN, VARY,
};
use hyper::{Response, StatusCode};

use super::response::{full_response, ResponseBody};

/// What a request's `Origin` may do with the response.
pub enum CorsGrant {
    /// Not a cross-origin request we allow.
    None,
    /// A listed origin: it may read responses, with the user's cookies.
    Listed(HeaderValue),
    /// Any origin (`*` is listed), without credentials: browsers refuse `*` with cookies.
    Any,
}

impl CorsGrant {
    /// What the request's `Origin` is granted: a listed origin is echoed, `*` allows any.
    pub fn for_request(allowed: &[String], headers: &HeaderMap) -> CorsGrant {
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

    /// Adds the grant's headers to a response.
    pub fn apply(self, allowed: &[String], headers: &mut HeaderMap) {
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

/// The answer to a CORS preflight (`OPTIONS`) for a path that allows `allow`.
pub fn preflight(allow: &'static str) -> Response<ResponseBody> {
    let mut response = full_response(Bytes::new());
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
