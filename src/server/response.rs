//! What every route answers with: a whole JSON document, or an open event stream.

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use crate::delivery::EventStream;

/// A response body: a whole document, or an open event stream.
pub type ResponseBody = Either<Full<Bytes>, EventStream>;

/// A JSON response with `status` and `body`.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = full_response(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A 200 response whose body is `bytes`, for the caller to give its headers.
pub fn full_response(bytes: Bytes) -> Response<ResponseBody> {
    Response::new(Either::Left(Full::new(bytes)))
}
