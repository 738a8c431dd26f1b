//! Events across processes: every publish is appended to one Redis stream, and every process
//! reads that stream and delivers each entry to its own streams and handlers, under the
//! entry's Redis id, so ids (and `Last-Event-ID` replay) are the same on every process.
//!
//! # Outages
//!
//! An outage starts when a read or an append fails, and only `RedisRelay::recover` ends it.
//! During an outage, a publish is delivered here at once, under an outage id (see
//! `outage_id`: the process's random tag in the high bits of `seq`, so no other process
//! issues it, and a client that takes it elsewhere is told its replay is incomplete), and kept
//! in a bounded outbox. Recovery first reads what Redis holds (an append whose reply was lost
//! is found there and replaces its outbox copy), then appends the outbox with `local=1`, which
//! the origin skips when it reads the entries back. A publish that finds the outbox full is
//! still delivered here but reported as an error, since the other processes will never see it.
//!
//! A publisher whose append went unanswered and the reader that may find that entry decide
//! under the outage lock which of them delivers it, so it is delivered once everywhere.
//!
//! # Locks
//!
//! `outage` guards the outage flag, the outbox and the unsure publishes together. When more
//! than one lock is held, `outage` is taken first, then `writer` or `waiting`; `writer` and
//! `waiting` are never held together. All are std mutexes held for field edits only, never
//! across an `.await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, RedisError};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::config::RedisSettings;
use crate::delivery::{EventId, History, HistoryLimits, StreamIndex, StreamSettings};
use crate::events::{BoxFuture, EventBus, EventType, PublishError, PublishResult, Relay};
use crate::log;
use crate::metrics::Metrics;
use crate::panic::lock;

/// How long one `XREAD` blocks before asking again; also how soon a silent outage is noticed.
const READ_BLOCK: Duration = Duration::from_millis(1000);
/// Entries taken per `XREAD`.
const READ_BATCH: usize = 1024;
/// Time allowed to connect, and for a command other than the blocking read to answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a publisher waits to see its event come back from Redis and run here.
const PUBLISH_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff after an outage: from the first delay, doubling up to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

tokio::task_local! {
    /// Marks a task running this process's handlers for an entry read from the stream.
    static DISPATCHING: ();
}

/// The Redis side of an [`EventBus`]; see the module documentation.
pub struct RedisRelay {
    client: Client,
    settings: RedisSettings,
    /// Marks this process's entries, so it can match them to waiting publishers and skip the
    /// ones it already delivered during an outage.
    origin: String,
    /// Marks the ids this process gives out during an outage, which no other process has.
    outage_tag: u32,
    bus: Arc<EventBus>,
    streams: Arc<StreamIndex>,
    metrics: Arc<Metrics>,
    /// The connection publishers append with; `None` while Redis is unreachable.
    writer: Mutex<Option<MultiplexedConnection>>,
    /// Whether Redis is unreachable, and what was published meanwhile; one lock, so no
    /// publish lands between flushing the outbox and going back to Redis.
    outage: Mutex<Outage>,
    next_publish: AtomicU64,
    /// Publishers waiting for their entry to be read back and dispatched here.
    waiting: Mutex<HashMap<u64, oneshot::Sender<usize>>>,
}

#[derive(Default)]
struct Outage {
    down: bool,
    outbox: VecDeque<Pending>,
    /// Publishes whose append failed without saying whether Redis applied it (a lost reply):
    /// already delivered here and in the outbox, so if the entry turns up when reading, it is
    /// not delivered here again and the outbox copy is dropped.
    unsure: HashSet<u64>,
}

/// An event delivered here during an outage, to be appended for the other processes.
#[derive(Clone)]
struct Pending {
    publish: u64,
    event_type: EventType,
    data: String,
}

impl RedisRelay {
    /// Connects to Redis, loads the stream's recent events into a new stream index's replay
    /// history, makes `bus` publish through Redis, and starts reading; returns the index, which
    /// the relay feeds (it is not subscribed to the bus). Fails if Redis is unreachable.
    pub async fn start(
        settings: RedisSettings,
        bus: Arc<EventBus>,
        metrics: Arc<Metrics>,
        stream_settings: StreamSettings,
    ) -> Result<Arc<StreamIndex>, String> {
        let client = client(&settings)?;
        let unreachable = |error: RedisError| {
            format!("Redis at {} is unreachable: {error}", settings.shown_url())
        };
        let mut writer = connect(&client, COMMAND_TIMEOUT)
            .await
            .map_err(unreachable)?;
        let reader = connect(&client, COMMAND_TIMEOUT + READ_BLOCK)
            .await
            .map_err(unreachable)?;
        let (history, last_read) = load_history(&mut writer, &settings, stream_settings.history)
            .await
            .map_err(unreachable)?;
        let streams = StreamIndex::with_history(stream_settings, metrics.clone(), history, None);
        let relay = Arc::new(RedisRelay {
            client,
            origin: crate::random::hex_token(8),
            outage_tag: u32::from_str_radix(&crate::random::hex_token(4), 16)
                .expect("hex_token gives hex digits"),
            bus: bus.clone(),
            streams: streams.clone(),
            metrics,
            writer: Mutex::new(Some(writer)),
            outage: Mutex::new(Outage::default()),
            next_publish: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            settings,
        });
        relay.metrics.set_redis_state(true, 0);
        if !bus.set_relay(relay.clone()) {
            return Err("the event bus already has a relay".to_owned());
        }
        log::info!(
            "events cross processes through Redis stream {:?} at {}",
            relay.settings.stream_key,
            relay.settings.shown_url()
        );
        tokio::spawn(relay.read_loop(reader, last_read));
        Ok(streams)
    }

    /// Reads the stream for as long as the process runs, through outages.
    async fn read_loop(self: Arc<Self>, mut reader: MultiplexedConnection, mut last_read: String) {
        let mut backoff = BACKOFF.0;
        loop {
            let usable = match self.read_batch(&mut reader, &mut last_read, true).await {
                // Reads can go on while appends fail (Redis out of memory, a read-only replica,
                // the idle writer connection closed): the publish that failed started the
                // outage, and only recovering ends it.
                Ok(_) => !lock(&self.outage).down,
                Err(error) => {
                    self.enter_outage(&error, true);
                    false
                }
            };
            if usable {
                backoff = BACKOFF.0;
                continue;
            }
            loop {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
                match self.recover(&mut last_read).await {
                    Ok(connection) => {
                        reader = connection;
                        break;
                    }
                    Err(error) => log::debug!("Redis still unusable: {error}"),
                }
            }
        }
    }

    /// Reads and dispatches the entries after `last_read`, waiting for some if `block`;
    /// returns how many there were.
    async fn read_batch(
        &self,
        reader: &mut MultiplexedConnection,
        last_read: &mut String,
        block: bool,
    ) -> Result<usize, RedisError> {
        let mut command = redis::cmd("XREAD");
        command.arg("COUNT").arg(READ_BATCH);
        if block {
            command.arg("BLOCK").arg(READ_BLOCK.as_millis() as u64);
        }
        let reply: Option<StreamReadReply> = command
            .arg("STREAMS")
            .arg(&self.settings.stream_key)
            .arg(last_read.as_str())
            .query_async(reader)
            .await?;
        let mut read = 0;
        for entry in reply
            .into_iter()
            .flat_map(|reply| reply.keys)
            .flat_map(|key| key.ids)
        {
            last_read.clone_from(&entry.id);
            self.dispatch_entry(&entry).await;
            read += 1;
        }
        Ok(read)
    }

    /// Delivers one entry read from the stream, unless this process delivered it already.
    async fn dispatch_entry(&self, entry: &StreamId) {
        let origin: Option<String> = entry.get("origin");
        let ours = origin.as_deref() == Some(self.origin.as_str());
        let mut waiter = None;
        if ours {
            let local = entry.get::<String>("local").is_some();
            let mut outage = lock(&self.outage);
            match entry.get::<u64>("publish") {
                Some(number) if local || outage.unsure.remove(&number) => {
                    // Delivered here during an outage, and in Redis now: the other processes
                    // get it from this entry, so it must not be appended again.
                    outage.outbox.retain(|pending| pending.publish != number);
                    self.metrics
                        .set_redis_state(!outage.down, outage.outbox.len());
                    return;
                }
                // Claimed under the outage lock: see `publish`.
                Some(number) => waiter = lock(&self.waiting).remove(&number),
                None if local => return,
                None => {}
            }
        }
        let Some((event_type, data, id)) = decode(entry) else {
            log::warning!("skipping malformed Redis stream entry {}", entry.id);
            return;
        };
        self.streams
            .deliver_numbered(&event_type, &data, |_| Some(id));
        let handlers = DISPATCHING
            .scope((), self.bus.dispatch(&event_type, Arc::new(data)))
            .await;
        if let Some(waiter) = waiter {
            let _ = waiter.send(handlers);
        }
    }

    /// Starts delivering locally; `reader_failed` says the reading connection is gone too, so
    /// the publishers waiting to see their entry read back will not see it.
    fn enter_outage(&self, error: &RedisError, reader_failed: bool) {
        let mut outage = lock(&self.outage);
        self.metrics.set_redis_state(false, outage.outbox.len());
        if !outage.down {
            outage.down = true;
            log::error!(
                "cannot use Redis at {} ({error}): delivering events locally and keeping them for the other processes until it is back",
                self.settings.shown_url()
            );
        }
        drop(outage);
        *lock(&self.writer) = None;
        if reader_failed {
            lock(&self.waiting).clear();
        }
    }

    /// Reconnects, reads what was appended meanwhile, appends the outbox, and ends the outage;
    /// returns a new reading connection.
    async fn recover(&self, last_read: &mut String) -> Result<MultiplexedConnection, RedisError> {
        let mut writer = connect(&self.client, COMMAND_TIMEOUT).await?;
        let mut reader = connect(&self.client, COMMAND_TIMEOUT + READ_BLOCK).await?;
        // First, so that an append whose reply was lost is found applied, not appended twice.
        while self.read_batch(&mut reader, last_read, false).await? > 0 {}
        lock(&self.outage).unsure.clear();
        let mut flushed = 0;
        loop {
            let next = {
                let mut outage = lock(&self.outage);
                match outage.outbox.front().cloned() {
                    Some(pending) => pending,
                    None => {
                        outage.down = false;
                        *lock(&self.writer) = Some(writer);
                        self.metrics.set_redis_state(true, 0);
                        break;
                    }
                }
            };
            self.append(
                &mut writer,
                &next.event_type,
                &next.data,
                next.publish,
                true,
            )
            .await?;
            let mut outage = lock(&self.outage);
            outage.outbox.pop_front();
            self.metrics.set_redis_state(false, outage.outbox.len());
            drop(outage);
            flushed += 1;
        }
        log::info!(
            "Redis at {} is back: appended the {flushed} events published meanwhile",
            self.settings.shown_url()
        );
        Ok(reader)
    }

    /// `XADD`s one event; `publish` numbers it among this process's publishes, `local` marks an
    /// event this process already delivered itself.
    async fn append(
        &self,
        connection: &mut MultiplexedConnection,
        event_type: &EventType,
        data: &str,
        publish: u64,
        local: bool,
    ) -> Result<String, RedisError> {
        let mut command = redis::cmd("XADD");
        command
            .arg(&self.settings.stream_key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.settings.max_len)
            .arg("*")
            .arg("type")
            .arg(event_type.as_str())
            .arg("data")
            .arg(data)
            .arg("origin")
            .arg(&self.origin)
            .arg("publish")
            .arg(publish);
        if local {
            command.arg("local").arg(1);
        }
        command.query_async(connection).await
    }

    async fn publish(&self, event_type: EventType, event_data: Value) -> PublishResult {
        let data = event_data.to_string();
        let number = self.next_publish.fetch_add(1, Ordering::Relaxed);
        // An append that failed without an answer may still have been applied; its entry, if
        // the reader finds it, is confirmed through this.
        let mut unanswered: Option<oneshot::Receiver<usize>> = None;
        loop {
            let writer = lock(&self.writer).clone();
            if let Some(mut writer) = writer.filter(|_| !lock(&self.outage).down) {
                let (confirmed, confirmation) = oneshot::channel();
                lock(&self.waiting).insert(number, confirmed);
                match self
                    .append(&mut writer, &event_type, &data, number, false)
                    .await
                {
                    Ok(_) => return self.confirm(&event_type, number, confirmation).await,
                    Err(error) => {
                        self.enter_outage(&error, false);
                        unanswered = Some(confirmation);
                        continue;
                    }
                }
            }
            let kept = {
                // Decided under the outage lock, as the reader decides: either it claimed the
                // entry (and delivers it) or the entry is ours to deliver and keep.
                let mut outage = lock(&self.outage);
                if let Some(confirmation) = unanswered.take() {
                    if !lock(&self.waiting).contains_key(&number) {
                        drop(outage);
                        return self.confirm(&event_type, number, confirmation).await;
                    }
                    if outage.down {
                        lock(&self.waiting).remove(&number);
                        outage.unsure.insert(number);
                    }
                }
                if !outage.down {
                    // Recovered since the writer was read: the outbox is already flushed, so
                    // an event put there now would wait for the next outage.
                    continue;
                }
                let room = outage.outbox.len() < self.settings.outbox_capacity;
                if room {
                    outage.outbox.push_back(Pending {
                        publish: number,
                        event_type: event_type.clone(),
                        data: data.clone(),
                    });
                    self.metrics.set_redis_state(false, outage.outbox.len());
                }
                room
            };
            return self.deliver_here(event_type, event_data, kept).await;
        }
    }

    /// Waits until this process has read publish `number` back and run its handlers.
    async fn confirm(
        &self,
        event_type: &EventType,
        number: u64,
        confirmation: oneshot::Receiver<usize>,
    ) -> PublishResult {
        if DISPATCHING.try_with(|_| ()).is_ok() {
            // A handler publishing: this process's reader, which would read the entry back, is
            // waiting for that handler, so the event's handlers here run after it returns.
            lock(&self.waiting).remove(&number);
            return Ok(0);
        }
        let unconfirmed = match tokio::time::timeout(PUBLISH_CONFIRM_TIMEOUT, confirmation).await {
            Ok(Ok(handlers)) => return Ok(handlers),
            Ok(Err(_)) => "the connection to Redis was lost before it was read back".to_owned(),
            Err(_) => format!("it was not read back within {PUBLISH_CONFIRM_TIMEOUT:?}"),
        };
        lock(&self.waiting).remove(&number);
        Err(PublishError(format!(
            "{event_type} was appended to Redis, but {unconfirmed}; it is delivered everywhere if Redis kept it"
        )))
    }

    /// Delivers an event published during an outage here at once; `kept` says whether the
    /// outbox took it for the other processes.
    async fn deliver_here(
        &self,
        event_type: EventType,
        event_data: Value,
        kept: bool,
    ) -> PublishResult {
        let tag = self.outage_tag;
        self.streams
            .deliver_numbered(&event_type, &event_data, |last| Some(outage_id(last, tag)));
        let handlers = self.bus.dispatch(&event_type, Arc::new(event_data)).await;
        if kept {
            Ok(handlers)
        } else {
            Err(PublishError(format!(
                "Redis is unreachable and the outbox is full ({} events): {event_type} was delivered on this process only",
                self.settings.outbox_capacity
            )))
        }
    }
}

impl Relay for RedisRelay {
    fn forward(&self, event_type: EventType, event_data: Value) -> BoxFuture<'_, PublishResult> {
        Box::pin(self.publish(event_type, event_data))
    }
}

/// The type, data and id of a stream entry, if it is one of ours.
fn decode(entry: &StreamId) -> Option<(EventType, Value, EventId)> {
    let event_type: String = entry.get("type")?;
    let data: String = entry.get("data")?;
    let data = serde_json::from_str(&data).ok()?;
    Some((
        EventType::from(event_type),
        data,
        EventId::parse(&entry.id)?,
    ))
}

/// The greatest id before `id`.
fn just_before(id: EventId) -> EventId {
    match id.seq {
        0 => EventId {
            epoch: id.epoch.saturating_sub(1),
            seq: u64::MAX,
        },
        seq => EventId { seq: seq - 1, ..id },
    }
}

/// The client for the Redis at `REDIS_URL`, which the relay and the job store each connect
/// with; an error names the URL without its password.
pub(super) fn client(settings: &RedisSettings) -> Result<Client, String> {
    Client::open(settings.url.as_str())
        .map_err(|error| format!("REDIS_URL {}: {error}", settings.shown_url()))
}

/// Connects with `response_timeout` for each command (the reader's covers its blocking read).
async fn connect(
    client: &Client,
    response_timeout: Duration,
) -> Result<MultiplexedConnection, RedisError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(response_timeout));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// A history of the stream's newest events (up to what the history keeps), so that replay
/// works for clients coming from another process; and the id to read on from.
async fn load_history(
    connection: &mut MultiplexedConnection,
    settings: &RedisSettings,
    limits: HistoryLimits,
) -> Result<(History, String), RedisError> {
    let mut history = History::new(crate::time::unix_millis(), limits);
    let count = limits.total_events.min(settings.max_len);
    let reply: StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(&settings.stream_key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(count)
        .query_async(connection)
        .await?;
    let Some(newest) = reply.ids.first().map(|entry| entry.id.clone()) else {
        // Redis numbers the first entries by its own clock, which may be behind ours: take
        // its ids from its "now" on, rather than renumber them here and nowhere else.
        let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(connection).await?;
        let redis_now = seconds * 1000 + micros / 1000;
        history.resume_after(EventId {
            epoch: redis_now.saturating_sub(1),
            seq: 0,
        });
        return Ok((history, "0-0".to_owned()));
    };
    if let Some(oldest) = reply.ids.last().and_then(|entry| EventId::parse(&entry.id)) {
        // Older entries may have been trimmed: a replay from before the oldest loaded one
        // cannot be known complete.
        history.resume_after(just_before(oldest));
    }
    let now = tokio::time::Instant::now();
    for entry in reply.ids.iter().rev() {
        let Some((event_type, data, id)) = decode(entry) else {
            continue;
        };
        if let Some(user) = data.get("user_id").and_then(serde_json::Value::as_str) {
            let user = Arc::from(user);
            history.record(&user, &event_type, &data.to_string(), Some(id), now, None);
        }
    }
    Ok((history, newest))
}

/// The top bit of an outage id's `seq`; below it, the 31-bit process tag, then a counter.
const OUTAGE_SEQ: u64 = 1 << 63;
/// The counter bits of an outage id's `seq`.
const OUTAGE_COUNTER: u64 = 0xffff_ffff;

/// The id this process gives an event published during an outage, after `last`: in the same
/// millisecond, the process's tag with a counter; past the end of the counter, the next
/// millisecond, so an outage id never leaves the process's range.
fn outage_id(last: EventId, tag: u32) -> EventId {
    let base = OUTAGE_SEQ | (u64::from(tag & !(1 << 31)) << 32);
    let counting = last.seq & !OUTAGE_COUNTER == base && last.seq & OUTAGE_COUNTER < OUTAGE_COUNTER;
    let this_ms = EventId {
        epoch: last.epoch,
        seq: if counting { last.seq + 1 } else { base },
    };
    if this_ms > last {
        this_ms
    } else {
        EventId {
            epoch: last.epoch + 1,
            seq: base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_ids_carry_the_process_tag_and_count_on_until_the_counter_runs_out() {
        let shared = EventId {
            epoch: 1_700_000_000_005,
            seq: 3,
        };
        let first = outage_id(shared, 7);
        assert_eq!(first.epoch, shared.epoch);
        assert_eq!(first.seq, OUTAGE_SEQ | 7 << 32);
        let second = outage_id(first, 7);
        assert_eq!(second.seq, first.seq + 1);

        let exhausted = EventId {
            seq: OUTAGE_SEQ | 7 << 32 | OUTAGE_COUNTER,
            ..first
        };
        assert_eq!(
            outage_id(exhausted, 7),
            EventId {
                epoch: exhausted.epoch + 1,
                seq: OUTAGE_SEQ | 7 << 32
            },
            "the next millisecond, not a count carried into the tag bits"
        );
        let other_process = outage_id(second, 9);
        assert!(other_process > second, "ids only increase");
        assert_eq!(other_process.seq, OUTAGE_SEQ | 9 << 32);
    }
}
