//! One client's SSE response body, and the bounded frame queue that feeds it.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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

/// A queue of encoded frames from the index to one stream's body, bounded in frames and bytes;
/// small on purpose, since an idle stream holds little more than this.
pub(super) struct FrameQueue {
    /// Guards the frames and the body's waker. A std `Mutex`: push and pop are O(1) and it is
    /// never held across an `.await`.
    state: Mutex<QueueState>,
    max_frames: usize,
    max_bytes: usize,
}

#[derive(Default)]
struct QueueState {
    /// The connected frame and the replay: sent first, outside the bounds that `frames` keep.
    first: VecDeque<Bytes>,
    frames: VecDeque<Bytes>,
    /// The length of `frames` in all.
    bytes: usize,
    /// The body's task, woken when a frame arrives or the queue closes.
    waker: Option<Waker>,
    /// No more frames will come: the body ends once the queued ones are sent.
    closed: bool,
}

impl FrameQueue {
    /// A queue holding `first`, with room for `max_frames` more frames of `max_bytes` in all
    /// (but always for one, however large, so that no event is too big to ever be sent).
    pub(super) fn new(first: VecDeque<Bytes>, max_frames: usize, max_bytes: usize) -> Arc<Self> {
        let state = Mutex::new(QueueState {
            first,
            ..QueueState::default()
        });
        Arc::new(FrameQueue {
            state,
            max_frames,
            max_bytes,
        })
    }

    /// Queues `frame` and wakes the body; a full queue refuses it.
    pub(super) fn push(&self, frame: Bytes) -> Result<(), QueueFull> {
        let mut state = lock(&self.state);
        let too_many_bytes = !state.frames.is_empty() && state.bytes + frame.len() > self.max_bytes;
        if state.frames.len() >= self.max_frames || too_many_bytes {
            return Err(QueueFull);
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        Ok(())
    }

    /// Ends the stream after the frames already queued.
    pub(super) fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
    }
}

/// A chunked response body that yields its queue's frames and ends when the queue is closed.
///
/// `R` is held for as long as the body lives: the stream index's registration, which takes
/// the stream out of the index when hyper drops the body (the client went away).
pub struct SseBody<R> {
    pub(super) queue: Arc<FrameQueue>,
    pub(super) _registration: R,
}

impl<R: Unpin> Body for SseBody<R> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let mut guard = lock(&self.queue.state);
        let state = &mut *guard;
        let live = state.first.is_empty();
        let queue = if live {
            &mut state.frames
        } else {
            &mut state.first
        };
        if let Some(first) = queue.pop_front() {
            let chunk = coalesce(first, queue);
            state.bytes -= if live { chunk.len() } else { 0 };
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
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
        let queue = FrameQueue::new(VecDeque::new(), 2, 1024);
        assert_eq!(queue.push(Bytes::from_static(b"a")), Ok(()));
        assert_eq!(queue.push(Bytes::from_static(b"b")), Ok(()));
        assert_eq!(queue.push(Bytes::from_static(b"c")), Err(QueueFull));
        assert_eq!(
            lock(&queue.state).frames.pop_front(),
            Some(Bytes::from_static(b"a"))
        );
        assert_eq!(queue.push(Bytes::from_static(b"c")), Ok(()));
    }

    #[test]
    fn a_queue_is_bounded_in_bytes_but_always_takes_one_frame() {
        let queue = FrameQueue::new(VecDeque::new(), 100, 10);
        assert_eq!(
            queue.push(Bytes::from(vec![b'x'; 64])),
            Ok(()),
            "one frame always fits"
        );
        assert_eq!(queue.push(Bytes::from_static(b"y")), Err(QueueFull));
    }

    #[test]
    fn the_replay_comes_on_top_of_the_bounds_which_hold_again_once_it_is_sent() {
        let replay = [Bytes::from(vec![b'r'; 100]), Bytes::from_static(b"s")];
        let queue = FrameQueue::new(replay.into(), 100, 10);
        assert_eq!(queue.push(Bytes::from(vec![b'z'; 6])), Ok(()));
        assert_eq!(queue.push(Bytes::from(vec![b'z'; 4])), Ok(()));
        assert_eq!(queue.push(Bytes::from_static(b"!")), Err(QueueFull));
        let mut body = SseBody {
            queue: queue.clone(),
            _registration: (),
        };
        let mut cx = Context::from_waker(Waker::noop());
        let mut next_chunk = || match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap().len(),
            other => panic!("expected a chunk, got {other:?}"),
        };
        assert_eq!(next_chunk(), 101, "the replay first, joined");
        assert_eq!(next_chunk(), 10, "then the live frames");
        assert_eq!(
            queue.push(Bytes::from(vec![b'z'; 10])),
            Ok(()),
            "room again"
        );
        assert_eq!(queue.push(Bytes::from_static(b"!")), Err(QueueFull));
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
