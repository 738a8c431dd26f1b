//! The `user_id → open streams` index: gives each event an id, records it in the user's
//! history, and queues it on that user's streams only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::encoder::{self, Event, KEEPALIVE};
use super::history::{EventId, History, HistoryLimits, RecordedEvent};
use super::stream::{FrameQueue, QueueFull};
use super::SseBody;
use crate::events::{EventBus, EventType, Handler};
use crate::log;
use crate::metrics::Metrics;

/// How streams behave; built from the server's configuration.
#[derive(Clone, Copy, Debug)]
pub struct StreamSettings {
    /// Frames one stream may have queued before its client counts as too slow.
    pub queue_capacity: usize,
    /// Open streams allowed per user.
    pub max_streams_per_user: usize,
    /// Interval between keepalive comments.
    pub keepalive: Duration,
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

/// Routes events to the open streams of the event's `user_id`.
///
/// Publishing costs in proportion to the recipients: one bus subscription (to every event type)
/// looks the user up in a map, encodes the frame once, and hands each of that user's streams a
/// reference-counted copy of the same bytes.
pub struct StreamIndex {
    /// Guards the streams, the history and the id counter together, so that an id's order,
    /// its place in the history and its place in every live queue agree; that is what makes a
    /// replay followed by live events gap- and duplicate-free. A std `Mutex`: it is held for map
    /// edits and non-blocking `try_send`s only, never across an `.await`.
    state: Mutex<IndexState>,
    next_stream_id: AtomicU64,
    settings: StreamSettings,
    metrics: Arc<Metrics>,
}

struct IndexState {
    by_user: HashMap<Arc<str>, Vec<StreamEntry>>,
    history: History,
    /// Set at shutdown: every stream has ended and new ones are refused.
    closed: bool,
    /// Stores each recorded event in the database, when history is kept there.
    #[cfg(feature = "sqlite")]
    history_writer: Option<super::history_store::HistoryWriter>,
}

struct StreamEntry {
    id: u64,
    frames: Arc<FrameQueue>,
    /// Closes the stream's connection; dropping `frames` alone cannot end a response whose
    /// client stopped reading, because hyper no longer polls the body.
    disconnect: Arc<Notify>,
}

impl StreamIndex {
    /// An empty index; its event ids start a new epoch at the current time.
    pub fn new(settings: StreamSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        Self::with_state(
            settings,
            metrics,
            IndexState {
                by_user: HashMap::new(),
                history: History::new(epoch, settings.history),
                closed: false,
                #[cfg(feature = "sqlite")]
                history_writer: None,
            },
        )
    }

    /// An index whose history is kept in the SQLite file at `path` too: it starts with the
    /// events retained there, so clients resume across a restart, and stores what it records.
    #[cfg(feature = "sqlite")]
    pub fn persisted(
        settings: StreamSettings,
        metrics: Arc<Metrics>,
        path: &std::path::Path,
    ) -> Result<Arc<Self>, crate::database::DatabaseError> {
        let (history, writer) = super::history_store::open(path, settings.history)?;
        Ok(Self::with_state(
            settings,
            metrics,
            IndexState {
                by_user: HashMap::new(),
                history,
                closed: false,
                history_writer: Some(writer),
            },
        ))
    }

    fn with_state(settings: StreamSettings, metrics: Arc<Metrics>, state: IndexState) -> Arc<Self> {
        Arc::new(StreamIndex {
            state: Mutex::new(state),
            next_stream_id: AtomicU64::new(0),
            settings,
            metrics,
        })
    }

    /// Stores every event recorded so far and stops storing (at shutdown, after the last
    /// publish); without a database it does nothing.
    pub fn finish_persisting(&self) {
        #[cfg(feature = "sqlite")]
        {
            // Taken out first: the writer is joined without the index lock held.
            let writer = self.lock().history_writer.take();
            if let Some(writer) = writer {
                writer.finish();
            }
        }
    }

    /// Subscribes the index to every event type on `bus`; returns the handler, to unsubscribe.
    pub fn attach(self: &Arc<Self>, bus: &EventBus) -> Handler {
        let index = Arc::downgrade(self);
        let handler = Handler::with_event_type(move |event_type, event_data| {
            if let Some(index) = index.upgrade() {
                index.deliver(event_type, &event_data);
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
    ) -> Result<SseBody, StreamLimitError> {
        let connected = json!({"type": "connected", "user_id": user_id}).to_string();
        let connected = encoder::encode(&Event {
            retry: Some(self.settings.reconnect_delay.as_millis() as u64),
            data: &connected,
            ..Event::default()
        })
        .expect("a retry field and data always encode");
        let id = self.next_stream_id.fetch_add(1, Ordering::Relaxed);
        let user: Arc<str> = Arc::from(user_id);
        let (queue, replayed) = {
            let mut state = self.lock();
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
            let mut first_frames = vec![connected];
            if let Some(replay) = &replay {
                if !replay.complete {
                    let notice =
                        json!({"type": "replay_incomplete", "last_event_id": last_event_id});
                    first_frames.push(encoder::encode_data(&notice.to_string()));
                }
                first_frames.extend(replay.events.iter().map(|event| event.frame.clone()));
            }
            // Room for the replay on top of the usual bound, so a reconnect never overflows.
            let queue = FrameQueue::new(self.settings.queue_capacity + first_frames.len());
            for frame in first_frames {
                queue
                    .push(frame)
                    .expect("the queue was sized for the first frames");
            }
            state
                .by_user
                .entry(user.clone())
                .or_default()
                .push(StreamEntry {
                    id,
                    frames: queue.clone(),
                    disconnect,
                });
            (
                queue,
                replay.map(|replay| replay.events).unwrap_or_default(),
            )
        };
        for event in &replayed {
            self.metrics.count_replay(&event.event_type);
        }
        let registration = Registration {
            index: self.clone(),
            user,
            id,
        };
        Ok(SseBody::new(queue, registration))
    }

    /// Gives the event an id, records it for its `user_id` and queues it on every stream of
    /// that user; returns how many streams got it. Events without a string `user_id` go nowhere.
    pub fn deliver(&self, event_type: &EventType, event_data: &Value) -> usize {
        self.deliver_as(event_type, event_data, Numbering::Next)
    }

    /// Delivers an event published while Redis is unreachable, under an id only this process
    /// gives out (`tag` is its own): a client that takes that id to another process is told
    /// its replay is incomplete there, rather than skipping events numbered the same there.
    pub fn deliver_during_outage(
        &self,
        event_type: &EventType,
        event_data: &Value,
        tag: u32,
    ) -> usize {
        self.deliver_as(event_type, event_data, Numbering::Outage(tag))
    }

    /// Delivers an event whose id was given elsewhere (by Redis, the same on every process).
    /// An id not after the last one recorded (possible only after events were numbered
    /// locally during a Redis outage) is replaced by the next local id, so nothing is dropped.
    pub fn deliver_identified(
        &self,
        event_type: &EventType,
        event_data: &Value,
        id: EventId,
    ) -> usize {
        self.deliver_as(event_type, event_data, Numbering::Given(id))
    }

    /// Records an event in the history without delivering or counting it: how a process
    /// learns what other processes published before it started.
    pub fn remember(&self, event_type: &EventType, event_data: &Value, id: EventId) {
        if let Some(user_id) = event_data.get("user_id").and_then(Value::as_str) {
            let data = event_data.to_string();
            let mut state = self.lock();
            record(&mut state, user_id, event_type, &data, Numbering::Given(id));
        }
    }

    /// Declares that events up to `id` are unknown here, before any is recorded; a replay
    /// from an earlier id is then reported incomplete.
    pub fn resume_after(&self, id: EventId) {
        self.lock().history.resume_after(id);
    }

    /// The newest event id recorded.
    pub fn last_event_id(&self) -> EventId {
        self.lock().history.last_id()
    }

    fn deliver_as(
        &self,
        event_type: &EventType,
        event_data: &Value,
        numbering: Numbering,
    ) -> usize {
        let Some(user_id) = event_data.get("user_id").and_then(Value::as_str) else {
            self.metrics.count_publish(event_type, 0, 0);
            return 0;
        };
        let data = event_data.to_string();
        let (mut delivered, mut dropped) = (0, 0);
        {
            let mut state = self.lock();
            let state = &mut *state;
            let frame = record(state, user_id, event_type, &data, numbering);
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

    /// Queues a keepalive comment on every open stream; streams whose queue is full are
    /// disconnected as slow. One pass every keepalive interval keeps a timer per stream away.
    pub fn send_keepalives(&self) {
        let keepalive = Bytes::from_static(KEEPALIVE);
        let mut state = self.lock();
        state.by_user.retain(|user_id, streams| {
            streams.retain(|stream| match stream.frames.push(keepalive.clone()) {
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
        let mut state = self.lock();
        state.closed = true;
        for stream in state.by_user.drain().flat_map(|(_, streams)| streams) {
            stream.frames.close();
        }
    }

    /// The interval between keepalive comments.
    pub fn keepalive_interval(&self) -> Duration {
        self.settings.keepalive
    }

    fn disconnect_slow(&self, user_id: &str, stream: &StreamEntry) {
        self.metrics.count_slow_consumer_disconnect();
        log::warning!(
            "disconnecting a slow SSE client of user {user_id}: its queue of {} frames is full",
            self.settings.queue_capacity
        );
        stream.frames.close();
        stream.disconnect.notify_one();
    }

    /// How many streams are open.
    pub fn stream_count(&self) -> usize {
        self.lock().by_user.values().map(Vec::len).sum()
    }

    /// How many events the history holds.
    pub fn history_len(&self) -> usize {
        self.lock().history.len()
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

/// Where a recorded event's id comes from.
#[derive(Clone, Copy)]
enum Numbering {
    /// The history's next id.
    Next,
    /// Given by Redis.
    Given(EventId),
    /// Numbered by this process during a Redis outage; the process's tag.
    Outage(u32),
}

/// The top bit of an outage id's `seq`; below it, the 31-bit process tag, then a counter.
const OUTAGE_SEQ: u64 = 1 << 63;
/// The counter bits of an outage id's `seq`.
const OUTAGE_COUNTER: u64 = 0xffff_ffff;

/// Encodes the event's frame once under its id (as `numbering` says, or the next local one)
/// and records it.
fn record(
    state: &mut IndexState,
    user_id: &str,
    event_type: &EventType,
    data: &str,
    numbering: Numbering,
) -> Bytes {
    let last = state.history.last_id();
    let id = match numbering {
        Numbering::Given(id) if id > last => id,
        Numbering::Outage(tag) => {
            let base = OUTAGE_SEQ | (u64::from(tag & !(1 << 31)) << 32);
            let counting =
                last.seq & !OUTAGE_COUNTER == base && last.seq & OUTAGE_COUNTER < OUTAGE_COUNTER;
            let this_ms = EventId {
                epoch: last.epoch,
                seq: if counting { last.seq + 1 } else { base },
            };
            // Past the end of this process's range (its counter ran out), the next millisecond
            // starts it again: an outage id never leaves the process's range.
            if this_ms > last {
                this_ms
            } else {
                EventId {
                    epoch: last.epoch + 1,
                    seq: base,
                }
            }
        }
        _ => state.history.next_id(),
    };
    let frame = encoder::encode(&Event {
        id: Some(&id.to_string()),
        data,
        ..Event::default()
    })
    .expect("numeric ids and data always encode");
    let user = match state.by_user.get_key_value(user_id) {
        Some((user, _)) => user.clone(),
        None => Arc::from(user_id),
    };
    let recorded = RecordedEvent {
        id,
        event_type: event_type.clone(),
        frame: frame.clone(),
    };
    #[cfg(feature = "sqlite")]
    if let Some(writer) = &mut state.history_writer {
        writer.offer(&user, &recorded);
    }
    state.history.record(&user, recorded, Instant::now());
    frame
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn recorded_id(index: &StreamIndex, numbering: Numbering) -> EventId {
        let mut state = index.lock();
        record(&mut state, "alice", &EventType::COMPLETED, "{}", numbering);
        state.history.last_id()
    }

    #[test]
    fn outage_ids_carry_the_process_tag_and_count_on_until_the_counter_runs_out() {
        let settings = crate::config::Config::with_secret("s").stream_settings();
        let index = StreamIndex::new(settings, Arc::new(Metrics::default()));
        let shared = EventId {
            epoch: index.last_event_id().epoch + 5,
            seq: 3,
        };
        index.deliver_identified(&EventType::COMPLETED, &json!({"user_id": "alice"}), shared);

        let first = recorded_id(&index, Numbering::Outage(7));
        assert_eq!(first.epoch, shared.epoch);
        assert_eq!(first.seq, OUTAGE_SEQ | 7 << 32);
        let second = recorded_id(&index, Numbering::Outage(7));
        assert_eq!(second.seq, first.seq + 1);

        let exhausted = EventId {
            seq: OUTAGE_SEQ | 7 << 32 | OUTAGE_COUNTER,
            ..first
        };
        index.deliver_identified(
            &EventType::COMPLETED,
            &json!({"user_id": "alice"}),
            exhausted,
        );
        let after = recorded_id(&index, Numbering::Outage(7));
        assert_eq!(
            after,
            EventId {
                epoch: exhausted.epoch + 1,
                seq: OUTAGE_SEQ | 7 << 32
            },
            "the next millisecond, not a count carried into the tag bits"
        );
    }
}
