//! The `user_id → open streams` index: records each event in the replay history (which gives
//! it its id) and queues its frame on that user's streams only.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::history::{EventId, History, HistoryLimits, HistorySink};
use super::stream::{FrameQueue, QueueFull, SseBody};
use crate::events::{EventBus, EventData, EventType, Handler};
use crate::log;
use crate::metrics::Metrics;
use crate::panic::lock;
use crate::sse::encoder::{self, Event};

/// How streams behave; built from the server's configuration.
#[derive(Clone, Copy, Debug)]
pub struct StreamSettings {
    /// Frames one stream may have queued before its client counts as too slow.
    pub queue_capacity: usize,
    /// Bytes one stream may have queued before its client counts as too slow.
    pub queue_max_bytes: usize,
    /// Open streams allowed per user.
    pub max_streams_per_user: usize,
    /// The reconnection delay sent to clients in the first frame's `retry:` field.
    pub reconnect_delay: Duration,
    /// What is kept for `Last-Event-ID` replay.
    pub history: HistoryLimits,
}

/// Why a stream could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamLimitError {
    /// The user already has the maximum number of open streams.
    TooManyForUser(usize),
    /// The server is shutting down.
    ShuttingDown,
}

/// An open stream's response body, as [`StreamIndex::open`] returns it.
pub type EventStream = SseBody<Registration>;

/// Routes events to the open streams of the event's `user_id`, at a cost in proportion to the
/// recipients: one map lookup, one encode, and a shared copy of the bytes for each stream.
pub struct StreamIndex {
    /// Guards the streams and the history together, so that an id's order, its place in the
    /// history and its place in every live queue agree; that is what makes a replay followed
    /// by live events gap- and duplicate-free. A std `Mutex`: it is held for map edits and
    /// non-blocking queue pushes only (and counting replays, whose lock is a leaf), never
    /// across an `.await`.
    state: Mutex<IndexState>,
    next_stream_id: AtomicU64,
    settings: StreamSettings,
    metrics: Arc<Metrics>,
}

struct IndexState {
    by_user: HashMap<Arc<str>, Vec<StreamEntry>>,
    history: History,
    /// Where recorded events are also stored, when history survives restarts.
    sink: Option<Box<dyn HistorySink>>,
    /// Set at shutdown: every stream has ended and new ones are refused.
    closed: bool,
}

struct StreamEntry {
    id: u64,
    frames: Arc<FrameQueue>,
    /// Closes the stream's connection; dropping `frames` alone cannot end a response whose
    /// client stopped reading, because hyper no longer polls the body.
    disconnect: Arc<Notify>,
}

impl StreamIndex {
    /// An empty index with an empty history, whose event ids start at the current time.
    pub fn new(settings: StreamSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        let history = History::new(crate::time::unix_millis(), settings.history);
        Self::with_history(settings, metrics, history, None)
    }

    /// An index that starts from `history` (loaded by a backend) and offers every event it
    /// records to `sink`, if any.
    pub fn with_history(
        settings: StreamSettings,
        metrics: Arc<Metrics>,
        history: History,
        sink: Option<Box<dyn HistorySink>>,
    ) -> Arc<Self> {
        let state = IndexState {
            by_user: HashMap::new(),
            history,
            sink,
            closed: false,
        };
        Arc::new(StreamIndex {
            state: Mutex::new(state),
            next_stream_id: AtomicU64::new(0),
            settings,
            metrics,
        })
    }

    /// Subscribes the index to every event type on `bus`; returns the handler, to unsubscribe.
    pub fn attach(self: &Arc<Self>, bus: &EventBus) -> Handler {
        let index = Arc::downgrade(self);
        let handler = Handler::with_event_data(move |event_type, event_data| {
            if let Some(index) = index.upgrade() {
                index.deliver(event_type, event_data);
            }
            std::future::ready(())
        });
        bus.subscribe(EventType::ANY, handler.clone());
        handler
    }

    /// Opens a stream for `user_id`: the connected frame, then (after `last_event_id`) the
    /// user's missed events, then live ones. `disconnect` fires if the client falls behind.
    pub fn open(
        self: &Arc<Self>,
        user_id: &str,
        last_event_id: Option<&str>,
        disconnect: Arc<Notify>,
    ) -> Result<EventStream, StreamLimitError> {
        let connected = json!({"type": "connected", "user_id": user_id}).to_string();
        let connected = encoder::encode(&Event {
            retry: Some(self.settings.reconnect_delay.as_millis() as u64),
            data: &connected,
            ..Event::default()
        })
        .expect("a retry field and data always encode");
        let id = self.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let user: Arc<str> = Arc::from(user_id);
        let queue = {
            let mut state = lock(&self.state);
            if state.closed {
                return Err(StreamLimitError::ShuttingDown);
            }
            let open_streams = state.by_user.get(user_id).map_or(0, Vec::len);
            if open_streams >= self.settings.max_streams_per_user {
                return Err(StreamLimitError::TooManyForUser(
                    self.settings.max_streams_per_user,
                ));
            }
            let replay =
                last_event_id.map(|last| state.history.since(user_id, last, Instant::now()));
            let mut first_frames = VecDeque::from([connected]);
            if let Some(replay) = &replay {
                if !replay.complete {
                    let notice =
                        json!({"type": "replay_incomplete", "last_event_id": last_event_id});
                    first_frames.push_back(encoder::encode_data(&notice.to_string()));
                }
                for event in &replay.events {
                    first_frames.push_back(event.frame.clone());
                    self.metrics.count_replay(&event.event_type);
                }
            }
            // The replay comes on top of the usual bounds, so a reconnect never overflows.
            let (max_frames, max_bytes) =
                (self.settings.queue_capacity, self.settings.queue_max_bytes);
            let queue = FrameQueue::new(first_frames, max_frames, max_bytes);
            state
                .by_user
                .entry(user.clone())
                .or_default()
                .push(StreamEntry {
                    id,
                    frames: queue.clone(),
                    disconnect,
                });
            queue
        };
        let index = self.clone();
        let registration = Registration { index, user, id };
        Ok(SseBody {
            queue,
            _registration: registration,
        })
    }

    /// Records the event for its `user_id` under the history's next id and queues it on every
    /// stream of that user; returns how many streams got it. Events without a string
    /// `user_id` go nowhere.
    pub fn deliver(&self, event_type: &EventType, event_data: &EventData) -> usize {
        self.deliver_numbered(event_type, event_data, |_| None)
    }

    /// Like [`StreamIndex::deliver`], under the id `choose` proposes given the newest id
    /// recorded (a relay's ids come from elsewhere); the history takes it if it is later than
    /// that one, else numbers the event itself.
    pub fn deliver_numbered(
        &self,
        event_type: &EventType,
        event_data: &EventData,
        choose: impl FnOnce(EventId) -> Option<EventId>,
    ) -> usize {
        let Some(user_id) = event_data.user_id() else {
            self.metrics.count_publish(event_type, 0, 0);
            return 0;
        };
        let data = event_data.json();
        let (mut delivered, mut dropped) = (0, 0);
        {
            let mut state = lock(&self.state);
            let state = &mut *state;
            let user = match state.by_user.get_key_value(user_id) {
                Some((user, _)) => user.clone(),
                None => Arc::from(user_id),
            };
            let proposed = choose(state.history.last_id());
            let sink = state.sink.as_deref_mut();
            let frame =
                state
                    .history
                    .record(&user, event_type, data, proposed, Instant::now(), sink);
            if let Some(streams) = state.by_user.get_mut(user_id) {
                streams.retain(|stream| match stream.frames.push(frame.clone()) {
                    Ok(()) => {
                        delivered += 1;
                        true
                    }
                    Err(QueueFull) => {
                        dropped += 1;
                        self.disconnect_slow(user_id, stream);
                        false
                    }
                });
                if streams.is_empty() {
                    state.by_user.remove(user_id);
                }
            }
        }
        self.metrics.count_publish(event_type, delivered, dropped);
        delivered as usize
    }

    /// Queues `frame` on every open stream (the keepalive comment, or a relay's notice that
    /// events were lost); streams whose queue is full are disconnected as slow. One pass every
    /// keepalive interval keeps a timer per stream away.
    pub fn send_to_all(&self, frame: &Bytes) {
        let mut state = lock(&self.state);
        state.by_user.retain(|user_id, streams| {
            streams.retain(|stream| match stream.frames.push(frame.clone()) {
                Ok(()) => true,
                Err(QueueFull) => {
                    self.disconnect_slow(user_id, stream);
                    false
                }
            });
            !streams.is_empty()
        });
    }

    /// Ends every open stream (after the frames already queued) and refuses new ones.
    pub fn close_all(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        for stream in state.by_user.drain().flat_map(|(_, streams)| streams) {
            stream.frames.close();
        }
    }

    /// Stores every event recorded so far and stops storing (at shutdown, after the last
    /// publish); without a history sink it does nothing.
    pub fn finish_persisting(&self) {
        // Taken out first: the sink is finished without the index lock held.
        let sink = lock(&self.state).sink.take();
        if let Some(sink) = sink {
            sink.finish();
        }
    }

    /// How many streams are open.
    pub fn stream_count(&self) -> usize {
        lock(&self.state).by_user.values().map(Vec::len).sum()
    }

    fn disconnect_slow(&self, user_id: &str, stream: &StreamEntry) {
        self.metrics.count_slow_consumer_disconnect();
        log::warning!(
            "disconnecting a slow SSE client of user {user_id}: its queue ({} frames, {} bytes) is full",
            self.settings.queue_capacity,
            self.settings.queue_max_bytes
        );
        stream.frames.close();
        stream.disconnect.notify_one();
    }

    fn remove(&self, user: &str, id: u64) {
        let mut state = lock(&self.state);
        if let Some(streams) = state.by_user.get_mut(user) {
            streams.retain(|stream| stream.id != id);
            if streams.is_empty() {
                state.by_user.remove(user);
            }
        }
    }
}

/// A stream's place in the index, given up when the stream's body is dropped.
pub struct Registration {
    index: Arc<StreamIndex>,
    user: Arc<str>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.index.remove(&self.user, self.id);
    }
}
