//! What every route answers with: a whole JSON document, or an open event stream that ends
//! when the token that opened it expires.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use tokio::time::{Instant, Sleep};

use crate::delivery::EventStream;

/// A response body: a whole document, or an open event stream.
pub type ResponseBody = Either<Full<Bytes>, ExpiringStream>;

/// The last frame of a stream whose token expired: the client gets a fresh token and
/// reconnects with its `Last-Event-ID`, and the replay fills the gap.
pub const TOKEN_EXPIRED_FRAME: &[u8] = b"data: {\"type\":\"token_expired\"}\n\n";

/// The longest wait for a token's expiry (a year): longer sleeps exceed the timer's range, and
/// the stream of a token valid for longer just ends once a year and is reopened.
const MAX_WAIT: Duration = Duration::from_secs(365 * 86_400);

pin_project_lite::pin_project! {
    /// An event stream that ends at its token's expiry (plus the leeway), after one last
    /// [`TOKEN_EXPIRED_FRAME`]: a revoked user's stream does not outlive their token.
    ///
    /// The timer is held inline, not boxed: hyper pins the body inside the connection's own
    /// allocation, so a stream's timer costs its 96 bytes and no allocation of its own.
    pub struct ExpiringStream {
        stream: EventStream,
        #[pin]
        expiry: Sleep,
        // Whether the timer has been polled, and so holds this task's waker.
        armed: bool,
        expired: bool,
    }
}

impl ExpiringStream {
    /// `stream`, ended at `valid_until` (seconds since the Unix epoch).
    pub fn new(stream: EventStream, valid_until: u64) -> Self {
        let remaining = valid_until.saturating_sub(crate::time::unix_seconds());
        let wait = Duration::from_secs(remaining).min(MAX_WAIT);
        ExpiringStream {
            stream,
            expiry: tokio::time::sleep_until(Instant::now() + wait),
            armed: false,
            expired: false,
        }
    }
}

impl Body for ExpiringStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        // Armed at the first poll; from then on the timer holds this task's waker (a body is
        // always polled from the same task), so a look at it is one atomic load, not a poll.
        let expired = match *this.armed {
            true => this.expiry.is_elapsed(),
            false => {
                *this.armed = true;
                this.expiry.poll(cx).is_ready()
            }
        };
        if expired {
            *this.expired = true;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                TOKEN_EXPIRED_FRAME,
            )))));
        }
        Pin::new(this.stream).poll_frame(cx)
    }
}

/// A JSON response with `status` and `body`.
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<ResponseBody> {
    // `to_vec` rather than `Display`, which goes through `fmt` for every token.
    let (status, json) = match serde_json::to_vec(body) {
        Ok(json) => (status, json),
        // Only a map with keys that are not strings fails; no route answers with one.
        Err(error) => {
            crate::log::error!("a response body did not serialize: {error}");
            let json = br#"{"error":"internal server error"}"#.to_vec();
            (StatusCode::INTERNAL_SERVER_ERROR, json)
        }
    };
    let mut response = full_response(Bytes::from(json));
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::BodyExt;
    use serde_json::json;
    use tokio::sync::Notify;

    use super::*;
    use crate::config::Config;
    use crate::delivery::StreamIndex;
    use crate::events::{EventData, EventType};
    use crate::metrics::Metrics;

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_always_has_an_event_waiting_still_ends_at_its_expiry() {
        let config = Config::from_lookup(|_| None).unwrap();
        let index = StreamIndex::new(config.stream_settings(), Arc::new(Metrics::default()));
        let stream = index.open("ada", None, Arc::new(Notify::new())).unwrap();
        let body = ExpiringStream::new(stream, crate::time::unix_seconds() + 60);
        let mut body = std::pin::pin!(body);
        let event = EventData::from(json!({"user_id": "ada"}));
        let mut seconds = 0;
        loop {
            // An event is always queued when the body is asked for a frame.
            index.deliver(&EventType::COMPLETED, &event);
            let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
            if frame == TOKEN_EXPIRED_FRAME {
                break;
            }
            tokio::time::advance(Duration::from_secs(1)).await;
            seconds += 1;
            assert!(seconds < 90, "the stream outlived its token");
        }
        assert!(seconds >= 59, "ended after {seconds} s");
        assert!(body.frame().await.is_none());
    }
}
