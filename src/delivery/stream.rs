//! One client's SSE response body, and the bounded frame queue that feeds it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::{Body, Frame};

use crate::panic::lock;

/// Most bytes of queued frames joined into one chunk. Joining costs a copy but saves a chunk
/// header and a socket write per frame, and the write is what dominates under load.
const MAX_COALESCED_BYTES: usize = 64 * 1024;

/// The queue was full: the client is not reading fast enough.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct QueueFull;

/// A bounded queue of encoded frames between the index (which pushes) and one stream's body
/// (which pops). Small on purpose: an idle stream holds only a few pointers and a short deque,
/// which is what keeps memory per idle stream low.
pub(super) struct FrameQueue {
    /// Guards the frames and the body's waker. A std `Mutex`: push and pop are O(1) and it is
    /// never held across an `.await`.
    state: Mutex<QueueState>,
    capacity: usize,
}

#[derive(Default)]
struct QueueState {
    frames: VecDeque<Bytes>,
    /// The body's task, woken when a frame arrives or the queue closes.
    waker: Option<Waker>,
    /// No more frames will come: the body ends once the queued ones are sent.
    closed: bool,
}

impl FrameQueue {
    /// A queue that holds at most `capacity` frames.
    pub(super) fn new(capacity: usize) -> Arc<Self> {
        Arc::new(FrameQueue {
            state: Mutex::new(QueueState::default()),
            capacity,
        })
    }

    /// Queues `frame` and wakes the body; a full queue refuses it.
    pub(super) fn push(&self, frame: Bytes) -> Result<(), QueueFull> {
        let mut state = self.lock();
        if state.frames.len() >= self.capacity {
            return Err(QueueFull);
        }
        state.frames.push_back(frame);
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        Ok(())
    }

    /// Ends the stream after the frames already queued.
    pub(super) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        lock(&self.state)
    }
}

/// A chunked response body that yields its queue's frames and ends when the queue is closed.
///
/// `R` is held for as long as the body lives: the stream index's registration, which takes
/// the stream out of the index when hyper drops the body (the client went away).
pub struct SseBody<R> {
    queue: Arc<FrameQueue>,
    _registration: R,
}

impl<R> SseBody<R> {
    /// A body fed by `queue`, holding `registration` until it is dropped.
    pub(super) fn new(queue: Arc<FrameQueue>, registration: R) -> Self {
        SseBody {
            queue,
            _registration: registration,
        }
    }
}

impl<R: Unpin> Body for SseBody<R> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let mut state = self.queue.lock();
        if let Some(first) = state.frames.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(coalesce(first, &mut state.frames)))));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            none => *none = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// `first` followed by as many queued frames as fit in [`MAX_COALESCED_BYTES`], as one chunk.
fn coalesce(first: Bytes, queued: &mut VecDeque<Bytes>) -> Bytes {
    let fits = |total: usize, next: Option<&Bytes>| {
        next.is_some_and(|next| total + next.len() <= MAX_COALESCED_BYTES)
    };
    if !fits(first.len(), queued.front()) {
        return first;
    }
    let mut chunk =
        BytesMut::with_capacity(MAX_COALESCED_BYTES.min(first.len() * (queued.len() + 1)));
    chunk.put_slice(&first);
    while fits(chunk.len(), queued.front()) {
        if let Some(frame) = queued.pop_front() {
            chunk.put_slice(&frame);
        }
    }
    chunk.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_refuses_frames_until_one_is_taken() {
        let queue = FrameQueue::new(2);
        assert_eq!(queue.push(Bytes::from_static(b"a")), Ok(()));
        assert_eq!(queue.push(Bytes::from_static(b"b")), Ok(()));
        assert_eq!(queue.push(Bytes::from_static(b"c")), Err(QueueFull));
        assert_eq!(
            queue.lock().frames.pop_front(),
            Some(Bytes::from_static(b"a"))
        );
        assert_eq!(queue.push(Bytes::from_static(b"c")), Ok(()));
    }

    #[test]
    fn queued_frames_are_joined_up_to_the_chunk_limit_in_order() {
        let mut queued: VecDeque<Bytes> = [&b"b"[..], b"c"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        assert_eq!(coalesce(Bytes::from_static(b"a"), &mut queued), &b"abc"[..]);
        assert!(queued.is_empty());

        let big = Bytes::from(vec![b'x'; MAX_COALESCED_BYTES - 1]);
        let mut queued: VecDeque<Bytes> = [&b"yy"[..], b"z"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        let chunk = coalesce(big.clone(), &mut queued);
        assert_eq!(
            chunk, big,
            "the next frame would pass the limit, so it waits"
        );
        assert_eq!(queued.len(), 2);
    }
}
