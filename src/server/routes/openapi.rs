//! `GET /openapi.json`: the OpenAPI 3.1 description of every route, compiled into the binary.

use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;

use crate::server::response::{full_response, ResponseBody};

/// The document, `src/server/openapi.json`: a test holds it against the router's routes.
pub(crate) const DOCUMENT: &str = include_str!("../openapi.json");

/// The document, as `application/json`.
pub(in crate::server) fn document() -> Response<ResponseBody> {
    let mut response = full_response(Bytes::from_static(DOCUMENT.as_bytes()));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
