//! Events across processes: every publish is appended to one Redis stream, and every process
//! reads that stream and delivers each entry to its own streams and handlers, under the
//! entry's Redis id, so ids (and `Last-Event-ID` replay) are the same on every process.
//!
//! When Redis is unreachable, publishing goes on locally: the event is delivered to this
//! process at once (under a local id) and kept in a bounded outbox, which is appended to
//! Redis when it is back, for the other processes; this process skips those entries when it
//! reads them back. A publish that finds the outbox full is still delivered locally but
//! reported as an error, since the other processes will never see it. An append that failed
//! is handled as an outage publish; if Redis had applied it after all, the entry is found when
//! reading on and replaces the outbox copy, so the event is delivered once everywhere.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, Client, RedisError};
use serde_json::Value;
use tokio::sync::oneshot;

use super::{BoxFuture, EventBus, EventType, PublishError, PublishResult, Relay};
use crate::config::RedisSettings;
use crate::log;
use crate::metrics::Metrics;
use crate::sse::{EventId, StreamIndex};

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
    /// Connects to Redis, loads the stream's recent events into `streams`' replay history,
    /// makes `bus` publish through Redis, and starts reading. Fails if Redis is unreachable.
    pub async fn start(
        settings: RedisSettings,
        bus: Arc<EventBus>,
        streams: Arc<StreamIndex>,
        metrics: Arc<Metrics>,
        history_events: usize,
    ) -> Result<Arc<RedisRelay>, String> {
        let client = Client::open(settings.url.as_str())
            .map_err(|error| format!("REDIS_URL {}: {error}", settings.url))?;
        let relay = Arc::new(RedisRelay {
            client,
            origin: crate::random::hex_token(8),
            outage_tag: u32::from_str_radix(&crate::random::hex_token(4), 16)
                .expect("hex_token gives hex digits"),
            bus: bus.clone(),
            streams,
            metrics,
            writer: Mutex::new(None),
            outage: Mutex::new(Outage::default()),
            next_publish: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            settings,
        });
        let unreachable =
            |error: RedisError| format!("Redis at {} is unreachable: {error}", relay.settings.url);
        let mut writer = relay.connect(COMMAND_TIMEOUT).await.map_err(unreachable)?;
        let reader = relay
            .connect(COMMAND_TIMEOUT + READ_BLOCK)
            .await
            .map_err(unreachable)?;
        let last_read = relay
            .load_history(&mut writer, history_events)
            .await
            .map_err(unreachable)?;
        *lock(&relay.writer) = Some(writer);
        relay.metrics.set_redis_state(true, 0);
        if !bus.set_relay(relay.clone()) {
            return Err("the event bus already has a relay".to_owned());
        }
        log::info!(
            "events cross processes through Redis stream {:?} at {}",
            relay.settings.stream_key,
            relay.settings.url
        );
        tokio::spawn(relay.clone().read_loop(reader, last_read));
        Ok(relay)
    }

    async fn connect(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Records the stream's newest events (up to what the history keeps) so that replay works
    /// for clients coming from another process; returns the id to read on from.
    async fn load_history(
        &self,
        connection: &mut MultiplexedConnection,
        history_events: usize,
    ) -> Result<String, RedisError> {
        let count = history_events.min(self.settings.max_len);
        let reply: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&self.settings.stream_key)
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
            self.streams.resume_after(EventId {
                epoch: redis_now.saturating_sub(1),
                seq: 0,
            });
            return Ok("0-0".to_owned());
        };
        if let Some(oldest) = reply.ids.last().and_then(|entry| EventId::parse(&entry.id)) {
            // Older entries may have been trimmed: a replay from before the oldest loaded one
            // cannot be known complete.
            self.streams.resume_after(just_before(oldest));
        }
        for entry in reply.ids.iter().rev() {
            if let Some((event_type, data, id)) = decode(entry) {
                self.streams.remember(&event_type, &data, id);
            }
        }
        Ok(newest)
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
        self.streams.deliver_identified(&event_type, &data, id);
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
                self.settings.url
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
        let mut writer = self.connect(COMMAND_TIMEOUT).await?;
        let mut reader = self.connect(COMMAND_TIMEOUT + READ_BLOCK).await?;
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
            self.settings.url
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
        self.streams
            .deliver_during_outage(&event_type, &event_data, self.outage_tag);
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held, so a poisoned value is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
