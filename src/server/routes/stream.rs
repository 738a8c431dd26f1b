//! `GET /ai/artifact/events/stream`: the caller's own events as Server-Sent Events.

use http_body_util::Either;
use hyper::header::{HeaderName, HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{HeaderMap, Request, Response};

use crate::server::auth::stream_token;
use crate::server::error::ApiError;
use crate::server::request::{query_param, ConnectionInfo, RequestBody};
use crate::server::response::{ExpiringStream, ResponseBody};
use crate::server::state::AppState;

/// The header an `EventSource` sends when it reconnects.
const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// Opens the caller's event stream: the connected frame, any events missed since
/// `Last-Event-ID`, then every new event of its user.
pub(in crate::server) async fn open(
    state: &AppState,
    request: &Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = state.auth.verify(&stream_token(request)?).await?;
    let last_event_id = match request.headers().get(LAST_EVENT_ID) {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::BadRequest("Last-Event-ID is not visible ASCII".to_owned()))?
                .to_owned(),
        ),
        None => query_param(request, "last_event_id")?,
    }
    // An empty id is what `EventSource` sends before it has seen one: no replay asked for.
    .filter(|id| !id.is_empty());
    // A request that came through no listener (the fuzz checks') has no connection to close.
    let connection = request.extensions().get::<ConnectionInfo>();
    let disconnect = connection.map_or_else(Default::default, |c| c.disconnect.clone());
    let body = state
        .streams
        .open(&identity.user_id, last_event_id.as_deref(), disconnect)?;
    let body = ExpiringStream::new(body, identity.valid_until);
    let mut response = Response::new(Either::Right(body));
    // hyper keeps a connection's last response header map for reuse, for as long as the
    // stream is open: sized for these three headers, it holds no more than they need.
    *response.headers_mut() = HeaderMap::with_capacity(3);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}
