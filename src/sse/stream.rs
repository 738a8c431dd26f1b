//! One client's SSE response body: frames from its bounded queue, plus periodic keepalives.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::encoder::KEEPALIVE;
use super::stream_index::Registration;

/// A chunked response body that ends when the index drops the stream's sender.
pub struct SseBody {
    frames: mpsc::Receiver<Bytes>,
    keepalive: Interval,
    /// Removes the stream from the index when hyper drops the body (the client went away).
    _registration: Registration,
}

impl SseBody {
    pub(super) fn new(
        frames: mpsc::Receiver<Bytes>,
        keepalive_every: Duration,
        registration: Registration,
    ) -> Self {
        let mut keepalive =
            tokio::time::interval_at(Instant::now() + keepalive_every, keepalive_every);
        // After a stall, one keepalive is enough; a burst of them would be noise.
        keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
        SseBody {
            frames,
            keepalive,
            _registration: registration,
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.frames.poll_recv(cx) {
            Poll::Ready(Some(frame)) => return Poll::Ready(Some(Ok(Frame::data(frame)))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        match self.keepalive.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(KEEPALIVE))))),
            Poll::Pending => Poll::Pending,
        }
    }
}
