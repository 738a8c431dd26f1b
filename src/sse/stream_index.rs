//! The `user_id → open streams` index that delivers each event only to its user's streams.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use super::encoder;
use super::SseBody;
use crate::events::{EventBus, EventType, Handler};
use crate::log;

/// Why a stream could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamLimitError {
    /// The user already has the maximum number of open streams.
    TooManyForUser(usize),
    /// The server is shutting down.
    ShuttingDown,
}

/// Routes events to the open streams of the event's `user_id`.
///
/// Publishing costs in proportion to the recipients: one bus subscription (to every event type)
/// looks the user up in a map, encodes the frame once, and hands each of that user's streams a
/// reference-counted copy of the same bytes.
pub struct StreamIndex {
    /// Guards the map and the closed flag. A std `Mutex` because it is held only for a map edit
    /// or a loop of non-blocking `try_send`s, never across an `.await`.
    state: Mutex<IndexState>,
    next_stream_id: AtomicU64,
    slow_consumer_disconnects: AtomicU64,
    /// Frames a stream may have queued before its client counts as too slow.
    queue_capacity: usize,
    max_streams_per_user: usize,
}

#[derive(Default)]
struct IndexState {
    by_user: HashMap<Arc<str>, Vec<StreamEntry>>,
    /// Set at shutdown: every stream has ended and new ones are refused.
    closed: bool,
}

struct StreamEntry {
    id: u64,
    frames: mpsc::Sender<Bytes>,
    /// Closes the stream's connection; dropping `frames` alone cannot end a response whose
    /// client stopped reading, because hyper no longer polls the body.
    disconnect: Arc<Notify>,
}

impl StreamIndex {
    /// An empty index whose streams queue at most `queue_capacity` frames each.
    pub fn new(queue_capacity: usize, max_streams_per_user: usize) -> Arc<Self> {
        Arc::new(StreamIndex {
            state: Mutex::new(IndexState::default()),
            next_stream_id: AtomicU64::new(0),
            slow_consumer_disconnects: AtomicU64::new(0),
            queue_capacity: queue_capacity.max(1),
            max_streams_per_user,
        })
    }

    /// Subscribes the index to every event type on `bus`; returns the handler, to unsubscribe.
    pub fn attach(self: &Arc<Self>, bus: &EventBus) -> Handler {
        let index = Arc::downgrade(self);
        let handler = Handler::new(move |event_data| {
            if let Some(index) = index.upgrade() {
                index.deliver(&event_data);
            }
            std::future::ready(())
        });
        bus.subscribe(EventType::ANY, handler.clone());
        handler
    }

    /// Opens a stream for `user_id` whose first frame is `first_frame`; `disconnect` is
    /// notified if the client falls too far behind.
    pub fn open(
        self: &Arc<Self>,
        user_id: &str,
        first_frame: Bytes,
        keepalive_every: Duration,
        disconnect: Arc<Notify>,
    ) -> Result<SseBody, StreamLimitError> {
        let (sender, receiver) = mpsc::channel(self.queue_capacity);
        let id = self.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let user: Arc<str> = Arc::from(user_id);
        {
            let mut state = self.lock();
            if state.closed {
                return Err(StreamLimitError::ShuttingDown);
            }
            let streams = state.by_user.entry(user.clone()).or_default();
            if streams.len() >= self.max_streams_per_user {
                return Err(StreamLimitError::TooManyForUser(self.max_streams_per_user));
            }
            // Queued under the lock, so no event can overtake the first frame.
            sender
                .try_send(first_frame)
                .expect("a new queue has room for one frame");
            streams.push(StreamEntry {
                id,
                frames: sender,
                disconnect,
            });
        }
        let registration = Registration {
            index: self.clone(),
            user,
            id,
        };
        Ok(SseBody::new(receiver, keepalive_every, registration))
    }

    /// Queues `event_data` on every stream of its `user_id`; returns how many got it.
    pub fn deliver(&self, event_data: &Value) -> usize {
        let Some(user_id) = event_data.get("user_id").and_then(Value::as_str) else {
            return 0;
        };
        if !self.lock().by_user.contains_key(user_id) {
            return 0;
        }
        let frame = encoder::encode_data(&event_data.to_string());
        let mut state = self.lock();
        let Some(streams) = state.by_user.get_mut(user_id) else {
            return 0;
        };
        let mut delivered = 0;
        streams.retain(|stream| match stream.frames.try_send(frame.clone()) {
            Ok(()) => {
                delivered += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.slow_consumer_disconnects
                    .fetch_add(1, Ordering::Relaxed);
                log::warning!(
                    "disconnecting a slow SSE client of user {user_id}: {} frames queued",
                    self.queue_capacity
                );
                stream.disconnect.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if streams.is_empty() {
            state.by_user.remove(user_id);
        }
        delivered
    }

    /// Ends every open stream and refuses new ones (server shutdown).
    pub fn close_all(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.by_user.clear();
    }

    /// How many streams are open.
    pub fn stream_count(&self) -> usize {
        self.lock().by_user.values().map(Vec::len).sum()
    }

    /// How many streams were closed because their client stopped reading.
    pub fn slow_consumer_disconnects(&self) -> u64 {
        self.slow_consumer_disconnects.load(Ordering::Relaxed)
    }

    fn remove(&self, user: &str, id: u64) {
        let mut state = self.lock();
        if let Some(streams) = state.by_user.get_mut(user) {
            streams.retain(|stream| stream.id != id);
            if streams.is_empty() {
                state.by_user.remove(user);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, IndexState> {
        // Nothing panics while holding the lock, so a poisoned map is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A stream's place in the index, given up when the stream's body is dropped.
pub(super) struct Registration {
    index: Arc<StreamIndex>,
    user: Arc<str>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.index.remove(&self.user, self.id);
    }
}
