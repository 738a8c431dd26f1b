//! Event ids and the bounded per-user history that `Last-Event-ID` replays from. Every event's
//! id is chosen here, in [`History::record`], and nowhere else.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::events::EventType;
use crate::sse::encoder::{self, Event};

/// An event's id: a time in ms (the epoch) and a sequence number after it, ordered as a pair.
///
/// A single server's ids carry its start time and count up from 1, so a restarted server's ids
/// are later and never reused. Ids taken from a Redis stream (`<ms>-<seq>`) have the same shape
/// and order. The text form `<epoch>-<seq>` is what clients send back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId {
    /// Milliseconds since the Unix epoch: when the issuing server started, or when Redis
    /// appended the event.
    pub epoch: u64,
    /// Position after `epoch`.
    pub seq: u64,
}

impl EventId {
    /// Parses `<epoch>-<seq>`; anything else is `None`.
    pub fn parse(text: &str) -> Option<EventId> {
        let (epoch, seq) = text.split_once('-')?;
        let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !digits(epoch) || !digits(seq) {
            return None;
        }
        Some(EventId {
            epoch: epoch.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.epoch, self.seq)
    }
}

/// Memory an event costs beyond its frame bytes: its entries in the user's deque and in the
/// global order, the `Bytes` header and allocation, and map overhead. Counted against
/// `total_bytes`, so the bound holds for small frames too.
const ENTRY_OVERHEAD_BYTES: usize = 160;

/// How much history is kept; the oldest events go first when any bound is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Events kept per user.
    pub events_per_user: usize,
    /// Age after which an event is forgotten.
    pub max_age: Duration,
    /// Events kept over all users.
    pub total_events: usize,
    /// Memory kept over all users: frame bytes plus a fixed overhead per event.
    pub total_bytes: usize,
}

/// One recorded event, already encoded as its SSE frame.
#[derive(Clone, Debug)]
pub struct RecordedEvent {
    /// Its id.
    pub id: EventId,
    /// The type it was published as (for metrics).
    pub event_type: EventType,
    /// The frame, `id: …\ndata: …\n\n`, shared with the live streams.
    pub frame: Bytes,
}

/// Somewhere durable that recorded events are also kept (the SQLite backend implements it), so
/// that replay survives a restart.
pub trait HistorySink: Send {
    /// Takes a copy of an event just recorded for `user`. Called under the stream index's
    /// lock, on the delivery path: it must only queue, never block on I/O.
    fn offer(&mut self, user: &Arc<str>, event: &RecordedEvent);

    /// Stores everything offered so far, then stops (at shutdown, after the last publish).
    fn finish(self: Box<Self>);
}

/// What a reconnecting client gets.
#[derive(Debug, Default)]
pub struct Replay {
    /// False when events after the client's id may have been forgotten (or the id is not ours).
    pub complete: bool,
    /// The user's retained events after the client's id, oldest first.
    pub events: Vec<RecordedEvent>,
}

/// Per-user history of recent events, bounded by [`HistoryLimits`].
pub struct History {
    epoch: u64,
    last_id: EventId,
    limits: HistoryLimits,
    users: HashMap<Arc<str>, UserHistory>,
    /// Every retained event, oldest first, for global eviction by age, count and bytes.
    order: VecDeque<OrderEntry>,
    total_bytes: usize,
    /// The newest id forgotten for users whose whole history has gone since; before the
    /// first event, the start of this history (what came before it is unknown).
    forgotten_through: EventId,
    /// For a history resumed from storage, the newest id stored: ids after it and before this
    /// history's epoch were issued by a process that died before storing them, so a replay
    /// from one of them may have missed events.
    stored_through: Option<EventId>,
}

struct UserHistory {
    events: VecDeque<RecordedEvent>,
    /// The newest id of this user that was forgotten.
    evicted_through: EventId,
}

struct OrderEntry {
    user: Arc<str>,
    id: EventId,
    recorded_at: Instant,
}

impl History {
    /// An empty history whose own ids carry `epoch`; any id before `epoch-0` is unknown to it.
    pub fn new(epoch: u64, limits: HistoryLimits) -> Self {
        let start = EventId { epoch, seq: 0 };
        History {
            epoch,
            last_id: start,
            limits,
            users: HashMap::new(),
            order: VecDeque::new(),
            total_bytes: 0,
            forgotten_through: start,
            stored_through: None,
        }
    }

    /// A history that continues a stored one: `events` (user, event, when it was recorded),
    /// oldest first, all later than `forgotten_through`, the newest id whose events may be gone.
    /// `epoch` must be later than every stored id.
    pub fn resume(
        epoch: u64,
        limits: HistoryLimits,
        forgotten_through: EventId,
        events: impl IntoIterator<Item = (Arc<str>, RecordedEvent, Instant)>,
    ) -> Self {
        let mut history = History::new(epoch, limits);
        history.last_id = forgotten_through;
        history.forgotten_through = forgotten_through;
        for (user, event, recorded_at) in events {
            history.insert(&user, event, recorded_at);
        }
        history.stored_through = Some(history.last_id());
        history
    }

    /// The id the next event will get when this history numbers events itself.
    fn next_id(&self) -> EventId {
        if self.last_id.epoch < self.epoch {
            EventId {
                epoch: self.epoch,
                seq: 1,
            }
        } else {
            match self.last_id.seq.checked_add(1) {
                Some(seq) => EventId {
                    epoch: self.last_id.epoch,
                    seq,
                },
                None => EventId {
                    epoch: self.last_id.epoch + 1,
                    seq: 0,
                },
            }
        }
    }

    /// Starts this (still empty) history after `id`: ids up to it are unknown here, so a
    /// replay from one of them is incomplete, and recorded ids must come after it.
    pub fn resume_after(&mut self, id: EventId) {
        debug_assert!(
            self.order.is_empty(),
            "only an empty history can move its start"
        );
        self.last_id = id;
        self.forgotten_through = id;
    }

    /// The newest id recorded (or the start of this history).
    pub fn last_id(&self) -> EventId {
        self.last_id
    }

    /// Records an event for `user`, offers it to `sink`, and returns its encoded frame. The id
    /// is `proposed` (one given by another process, say) if that is later than every recorded
    /// id, else the next one of this history's own: ids only ever increase, and nothing is
    /// dropped.
    pub fn record(
        &mut self,
        user: &Arc<str>,
        event_type: &EventType,
        data: &str,
        proposed: Option<EventId>,
        now: Instant,
        sink: Option<&mut (dyn HistorySink + 'static)>,
    ) -> Bytes {
        let id = proposed
            .filter(|id| *id > self.last_id)
            .unwrap_or_else(|| self.next_id());
        let frame = encoder::encode(&Event {
            id: Some(&id.to_string()),
            data,
            ..Event::default()
        })
        .expect("numeric ids and data always encode");
        let event = RecordedEvent {
            id,
            event_type: event_type.clone(),
            frame: frame.clone(),
        };
        if let Some(sink) = sink {
            sink.offer(user, &event);
        }
        self.insert(user, event, now);
        frame
    }

    /// Keeps `event` (whose id must be later than [`History::last_id`]) for `user`, then
    /// evicts what the limits no longer allow.
    fn insert(&mut self, user: &Arc<str>, event: RecordedEvent, now: Instant) {
        debug_assert!(event.id > self.last_id, "ids must increase");
        self.last_id = event.id;
        self.total_bytes += retained_size(&event);
        self.order.push_back(OrderEntry {
            user: user.clone(),
            id: event.id,
            recorded_at: now,
        });
        // A user whose history was wholly forgotten may have lost events: start from the
        // global watermark, so a replay from before it is reported incomplete.
        let forgotten_through = self.forgotten_through;
        let history = self
            .users
            .entry(user.clone())
            .or_insert_with(|| UserHistory {
                events: VecDeque::new(),
                evicted_through: forgotten_through,
            });
        history.events.push_back(event);
        if history.events.len() > self.limits.events_per_user {
            if let Some(oldest) = history.events.pop_front() {
                history.evicted_through = oldest.id;
                self.total_bytes -= retained_size(&oldest);
            }
        }
        self.evict(now);
    }

    /// The user's events after `last_event_id`, and whether that is everything after it. An
    /// id this history cannot place exactly (not one this user was sent here: another
    /// process's outage id, an id from before a renumbering, or a later one) gets every event
    /// retained for the user: positioning by comparison could skip events the client never
    /// saw, and a duplicate can be dropped by the client where a miss cannot be undone.
    pub fn since(&mut self, user: &str, last_event_id: &str, now: Instant) -> Replay {
        self.evict(now);
        let Some(last) = EventId::parse(last_event_id) else {
            return Replay::default();
        };
        let lost_in_a_crash = self
            .stored_through
            .is_some_and(|stored| last > stored && last.epoch < self.epoch);
        let Some(history) = self.users.get(user) else {
            return Replay {
                complete: last == self.forgotten_through && !lost_in_a_crash,
                events: Vec::new(),
            };
        };
        let first_missed = history.events.partition_point(|event| event.id <= last);
        let theirs = last <= self.last_id
            && (last == history.evicted_through
                || first_missed
                    .checked_sub(1)
                    .is_some_and(|index| history.events[index].id == last));
        // An id the previous process of this history issued but never stored is still in this
        // history's order: what follows it is what the client missed.
        let placed = theirs || lost_in_a_crash;
        Replay {
            complete: theirs && !lost_in_a_crash,
            events: history
                .events
                .range(if placed { first_missed } else { 0 }..)
                .cloned()
                .collect(),
        }
    }

    /// Whether no event is retained.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Events retained over all users.
    pub fn len(&self) -> usize {
        self.users
            .values()
            .map(|history| history.events.len())
            .sum()
    }

    fn evict(&mut self, now: Instant) {
        let cutoff = now.checked_sub(self.limits.max_age);
        while let Some(oldest) = self.order.front() {
            let expired = cutoff.is_some_and(|cutoff| oldest.recorded_at < cutoff);
            let over = self.order.len() > self.limits.total_events
                || self.total_bytes > self.limits.total_bytes;
            if !expired && !over {
                break;
            }
            let Some(entry) = self.order.pop_front() else {
                break;
            };
            self.forget(&entry.user, entry.id);
        }
    }

    /// Forgets the user's event `id` if it is still retained (the per-user bound may have
    /// dropped it already).
    fn forget(&mut self, user: &Arc<str>, id: EventId) {
        let Some(history) = self.users.get_mut(user) else {
            return;
        };
        if history.events.front().is_some_and(|event| event.id == id) {
            if let Some(event) = history.events.pop_front() {
                self.total_bytes -= retained_size(&event);
                history.evicted_through = id;
            }
        }
        if history.events.is_empty() {
            self.forgotten_through = self.forgotten_through.max(history.evicted_through);
            self.users.remove(user);
        }
    }
}

fn retained_size(event: &RecordedEvent) -> usize {
    event.frame.len() + ENTRY_OVERHEAD_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: u64 = 1_700_000_000_000;

    fn limits() -> HistoryLimits {
        HistoryLimits {
            events_per_user: 3,
            max_age: Duration::from_secs(60),
            total_events: 100,
            total_bytes: 1 << 20,
        }
    }

    /// Records one event for `user` under the history's own numbering; returns its id.
    fn record(history: &mut History, user: &str, now: Instant) -> EventId {
        history.record(
            &Arc::from(user),
            &EventType::COMPLETED,
            "{}",
            None,
            now,
            None,
        );
        history.last_id()
    }

    fn seqs(replay: &Replay) -> Vec<u64> {
        replay.events.iter().map(|event| event.id.seq).collect()
    }

    #[test]
    fn ids_print_and_parse_as_epoch_dash_seq() {
        let id = EventId {
            epoch: EPOCH,
            seq: 42,
        };
        assert_eq!(id.to_string(), "1700000000000-42");
        assert_eq!(EventId::parse("1700000000000-42"), Some(id));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1-2-3",
            "a-1",
            "1-a",
            "+1-2",
            "1 -2",
            "99999999999999999999-1",
        ] {
            assert_eq!(EventId::parse(bad), None, "{bad:?}");
        }
        assert!(EventId { epoch: 1, seq: 9 } < EventId { epoch: 2, seq: 1 });
    }

    #[test]
    fn replay_returns_the_users_events_after_the_id_in_order() {
        let now = Instant::now();
        let mut history = History::new(EPOCH, limits());
        let first = record(&mut history, "alice", now);
        record(&mut history, "bob", now);
        let third = record(&mut history, "alice", now);
        let fourth = record(&mut history, "alice", now);

        let replay = history.since("alice", &first.to_string(), now);
        assert!(replay.complete);
        assert_eq!(seqs(&replay), [third.seq, fourth.seq]);
        let replay = history.since("alice", &fourth.to_string(), now);
        assert!(replay.complete && replay.events.is_empty());
        // An id this user was never sent still positions the replay, but says nothing about
        // what they have.
        let replay = history.since("bob", &first.to_string(), now);
        assert!(!replay.complete);
        assert_eq!(seqs(&replay), [2]);
    }

    #[test]
    fn an_id_older_than_the_users_history_is_incomplete() {
        let now = Instant::now();
        let mut history = History::new(EPOCH, limits());
        let ids: Vec<EventId> = (0..5).map(|_| record(&mut history, "alice", now)).collect();
        // Three are kept per user: events 1 and 2 are gone.
        let replay = history.since("alice", &ids[0].to_string(), now);
        assert!(!replay.complete);
        assert_eq!(seqs(&replay), [3, 4, 5]);
        let replay = history.since("alice", &ids[1].to_string(), now);
        assert!(
            replay.complete,
            "event 2 was the last one forgotten and the client has it"
        );
        assert_eq!(history.len(), 3);
    }

    #[test]
    fn ids_from_before_the_history_the_future_or_garbage_are_incomplete() {
        let now = Instant::now();
        let mut history = History::new(EPOCH, limits());
        let only = record(&mut history, "alice", now);
        // From before this history began: what it holds is replayed, but it may not be all.
        let replay = history.since("alice", &format!("{}-1", EPOCH - 1), now);
        assert!(!replay.complete);
        assert_eq!(seqs(&replay), [only.seq]);
        // A later id (another process's, say) cannot be placed: everything alice has.
        let replay = history.since("alice", &format!("{EPOCH}-2"), now);
        assert!(!replay.complete);
        assert_eq!(seqs(&replay), [only.seq]);
        let replay = history.since("alice", "garbage", now);
        assert!(!replay.complete && replay.events.is_empty());
    }

    #[test]
    fn ids_given_from_outside_order_across_epochs() {
        let now = Instant::now();
        let mut history = History::new(EPOCH, limits());
        let record_id = |history: &mut History, id: EventId| {
            let alice = Arc::from("alice");
            let frame = history.record(&alice, &EventType::COMPLETED, "{}", Some(id), now, None);
            assert_eq!(history.last_id(), id, "a later given id is taken as it is");
            assert_eq!(frame, format!("id: {id}\ndata: {{}}\n\n"));
        };
        // Redis stream ids: a later millisecond restarts the sequence at 0.
        let first = EventId {
            epoch: EPOCH + 5,
            seq: 3,
        };
        let second = EventId {
            epoch: EPOCH + 9,
            seq: 0,
        };
        record_id(&mut history, first);
        record_id(&mut history, second);
        assert_eq!(history.last_id(), second);
        assert_eq!(
            history.next_id(),
            EventId {
                epoch: EPOCH + 9,
                seq: 1
            }
        );
        let replay = history.since("alice", &first.to_string(), now);
        assert!(replay.complete);
        assert_eq!(replay.events.len(), 1);
        assert_eq!(replay.events[0].id, second);
        // An id between them that alice was never sent cannot say where she stopped (it may
        // be another process's outage id, or from before a renumbering): all she has, again.
        let replay = history.since("alice", &format!("{}-7", EPOCH + 5), now);
        assert!(!replay.complete);
        assert_eq!(replay.events.len(), 2);
    }

    #[test]
    fn a_given_id_not_after_the_last_is_renumbered_never_dropped() {
        let now = Instant::now();
        let mut history = History::new(EPOCH, limits());
        let alice: Arc<str> = Arc::from("alice");
        let given = EventId {
            epoch: EPOCH + 9,
            seq: 4,
        };
        history.record(&alice, &EventType::COMPLETED, "{}", Some(given), now, None);
        history.record(&alice, &EventType::COMPLETED, "{}", Some(given), now, None);
        assert_eq!(history.last_id(), EventId { seq: 5, ..given });
        assert_eq!(history.len(), 2);
    }

    #[test]
    fn a_resumed_history_replays_stored_events_and_knows_what_it_never_stored() {
        let now = Instant::now();
        let stored = |seq| {
            let id = EventId { epoch: EPOCH, seq };
            let event = RecordedEvent {
                id,
                event_type: EventType::COMPLETED,
                frame: Bytes::from(format!("id: {id}\ndata: {{}}\n\n")),
            };
            (Arc::from("alice"), event, now)
        };
        let forgotten = EventId {
            epoch: EPOCH,
            seq: 2,
        };
        let restarted = EPOCH + 5_000;
        let mut history = History::resume(restarted, limits(), forgotten, [stored(3), stored(4)]);
        let new = record(&mut history, "alice", now);
        assert_eq!(
            new,
            EventId {
                epoch: restarted,
                seq: 1
            }
        );

        let replay = history.since("alice", &format!("{EPOCH}-3"), now);
        assert!(
            replay.complete,
            "event 3 was stored, and so was all after it"
        );
        assert_eq!(seqs(&replay), [4, 1]);
        let replay = history.since("alice", &format!("{EPOCH}-1"), now);
        assert!(!replay.complete, "event 2 was forgotten before the restart");
        assert_eq!(seqs(&replay), [3, 4, 1]);
        // Event 5 reached a client, but the process died before storing it (or any after).
        let replay = history.since("alice", &format!("{EPOCH}-5"), now);
        assert!(!replay.complete);
        assert_eq!(seqs(&replay), [1]);
        let replay = history.since("bob", &format!("{EPOCH}-5"), now);
        assert!(!replay.complete && replay.events.is_empty());
        assert!(
            !history.since("bob", &format!("{EPOCH}-4"), now).complete,
            "bob was never sent event 4"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn events_older_than_max_age_are_forgotten() {
        let mut history = History::new(EPOCH, limits());
        let start = Instant::now();
        let old = record(&mut history, "alice", start);
        tokio::time::advance(Duration::from_secs(30)).await;
        let recent = record(&mut history, "alice", Instant::now());
        tokio::time::advance(Duration::from_secs(31)).await;

        let replay = history.since("alice", &format!("{EPOCH}-0"), Instant::now());
        assert!(!replay.complete, "the first event expired");
        assert_eq!(seqs(&replay), [recent.seq]);
        let replay = history.since("alice", &old.to_string(), Instant::now());
        assert!(replay.complete);
        tokio::time::advance(Duration::from_secs(60)).await;
        let replay = history.since("alice", &recent.to_string(), Instant::now());
        assert!(replay.complete && replay.events.is_empty());
        assert_eq!(history.len(), 0);
    }

    #[test]
    fn global_bounds_evict_the_oldest_events_of_any_user() {
        let now = Instant::now();
        let event_size = format!("id: {EPOCH}-1\ndata: {{}}\n\n").len() + ENTRY_OVERHEAD_BYTES;
        let mut history = History::new(
            EPOCH,
            HistoryLimits {
                total_events: 4,
                total_bytes: 1 << 20,
                ..limits()
            },
        );
        for user in ["a", "b", "c", "d", "e"] {
            record(&mut history, user, now);
        }
        assert_eq!(history.len(), 4);
        let replay = history.since("a", &format!("{EPOCH}-0"), now);
        assert!(
            !replay.complete && replay.events.is_empty(),
            "a's only event was evicted"
        );
        // A user first seen after an eviction cannot claim a complete replay from before it.
        let f_first = record(&mut history, "f", now);
        assert!(!history.since("f", &format!("{EPOCH}-0"), now).complete);
        assert!(history.since("f", &f_first.to_string(), now).complete);

        let mut by_bytes = History::new(
            EPOCH,
            HistoryLimits {
                total_bytes: 2 * event_size,
                ..limits()
            },
        );
        for _ in 0..3 {
            record(&mut by_bytes, "a", now);
        }
        assert_eq!(by_bytes.len(), 2);
    }
}
