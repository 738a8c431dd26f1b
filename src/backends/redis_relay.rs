//! Events across processes: every publish is appended to one Redis stream, and every process
//! reads that stream and delivers each entry to its own streams and handlers, under the
//! entry's Redis id, so ids (and `Last-Event-ID` replay) are the same on every process.
//!
//! # Outages
//!
//! An outage starts when a read or an append fails, and only `RedisRelay::recover` ends it.
//! A publish is acknowledged (`Ok`) only once it cannot be lost: Redis took it, or the durable
//! outbox (a [`DurableOutbox`], the SQLite file's) holds it, fsynced. Without a durable outbox,
//! or with the outbox full, a publish during an outage is refused (`Err`, a `503` over HTTP)
//! and delivered nowhere. A kept publish is delivered here at once, under an outage id (see
//! `outage_id`: a hybrid logical clock, the process's tag as its lowest-order part), and queued
//! in memory beside its durable row. Recovery first reads what Redis holds (an append whose
//! reply was lost is found there and replaces its outbox copy), then appends the outbox with
//! `local=1`, which the origin skips when it reads the entries back, removing each row once
//! Redis has it. A process that finds rows at start (it died during an outage) appends them
//! before it loads its history or serves anyone.
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
use serde_json::json;
use tokio::sync::oneshot;

use crate::config::RedisSettings;
use crate::delivery::{EventId, History, HistoryLimits, StreamIndex, StreamSettings};
use crate::events::{
    BoxFuture, EventBus, EventData, EventType, PublishError, PublishResult, Relay,
};
use crate::log;
use crate::metrics::Metrics;
use crate::panic::lock;
use crate::sse::encoder;

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

/// Where events acknowledged during an outage are kept until Redis has them, so that a crash
/// meanwhile loses none (the SQLite backend implements it). Calls do blocking I/O: the relay
/// makes them off the async threads.
pub trait DurableOutbox: Send + Sync + 'static {
    /// Stores an event, on disk (fsynced) before it returns; returns its row.
    fn keep(&self, event_type: &str, data: &str) -> Result<i64, String>;
    /// Forgets a row whose event Redis now holds.
    fn remove(&self, row: i64) -> Result<(), String>;
    /// Every stored event (row, type, data), oldest first.
    fn pending(&self) -> Result<Vec<(i64, String, String)>, String>;
}

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
    /// Breaks ties between the outage ids of processes (the lowest-order part of `seq`).
    outage_tag: u32,
    /// Where events published during an outage are kept; without one, they are refused.
    durable: Option<Arc<dyn DurableOutbox>>,
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
    /// Its row in the durable outbox.
    row: i64,
}

/// What a publish that could not append does, decided under the outage lock.
enum Fallback {
    /// Redis is back: append after all.
    Retry,
    /// Kept in the outbox: deliver here.
    Deliver,
    /// Neither Redis nor a durable outbox holds it; says whether the append went unanswered.
    Refuse(bool),
}

impl RedisRelay {
    /// Connects to Redis, loads the stream's recent events into a new stream index's replay
    /// history, makes `bus` publish through Redis, and starts reading; returns the index, which
    /// the relay feeds (it is not subscribed to the bus). Events left in `durable` by an earlier
    /// process are appended first. Fails if Redis is unreachable.
    pub async fn start(
        settings: RedisSettings,
        bus: Arc<EventBus>,
        metrics: Arc<Metrics>,
        stream_settings: StreamSettings,
        durable: Option<Arc<dyn DurableOutbox>>,
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
        let origin = crate::random::hex_token(8);
        if let Some(durable) = &durable {
            append_left_over(&mut writer, &settings, &origin, durable.clone(), &metrics)
                .await
                .map_err(|error| format!("cannot append the durable outbox: {error}"))?;
        }
        let (history, last_read) = load_history(&mut writer, &settings, stream_settings.history)
            .await
            .map_err(unreachable)?;
        let streams = StreamIndex::with_history(stream_settings, metrics.clone(), history, None);
        let relay = Arc::new(RedisRelay {
            client,
            origin,
            outage_tag: u32::from_str_radix(&crate::random::hex_token(4), 16)
                .expect("hex_token gives hex digits"),
            durable,
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
        relay
            .metrics
            .set_redis_durable_outbox(relay.durable.is_some());
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
        if self.lost_entries(&mut reader, last_read).await? {
            // Before what is read now, so that the streams hear of the gap before what follows.
            self.metrics.count_redis_loss_detected();
            log::error!(
                "Redis at {} no longer holds entry {last_read}, the last this process read: it lost entries (restarted without its data, or trimmed past them); telling every open stream that its events may be incomplete",
                self.settings.shown_url()
            );
            let notice = json!({"type": "replay_incomplete", "last_event_id": last_read});
            self.streams
                .send_to_all(&encoder::encode_data(&notice.to_string()));
        }
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
            self.forget_row(next.row).await;
            let mut outage = lock(&self.outage);
            outage.outbox.pop_front();
            self.metrics.set_redis_state(false, outage.outbox.len());
            drop(outage);
            self.metrics.count_redis_appended_on_recovery(1);
            flushed += 1;
        }
        log::info!(
            "Redis at {} is back: appended the {flushed} events published meanwhile",
            self.settings.shown_url()
        );
        Ok(reader)
    }

    /// Whether the entry read last is gone from the stream, so that entries after it, which
    /// this process never read, may be gone too: acknowledged events lost, not a quiet stream.
    async fn lost_entries(
        &self,
        reader: &mut MultiplexedConnection,
        last_read: &str,
    ) -> Result<bool, RedisError> {
        if last_read == "0-0" {
            return Ok(false);
        }
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.settings.stream_key)
            .arg(last_read)
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(reader)
            .await?;
        Ok(reply.ids.first().map(|entry| entry.id.as_str()) != Some(last_read))
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

    async fn publish(&self, event_type: EventType, event_data: EventData) -> PublishResult {
        let data = event_data.json();
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
                    .append(&mut writer, &event_type, data, number, false)
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
            // Kept on disk before the decision, which may then find it was not needed.
            let row = match &self.durable {
                Some(durable) => {
                    let (durable, kind, text) =
                        (durable.clone(), event_type.clone(), data.to_owned());
                    let kept = blocking(move || durable.keep(kind.as_str(), &text)).await;
                    match kept {
                        Ok(row) => {
                            self.metrics.change_redis_durable_outbox(1);
                            Some(row)
                        }
                        Err(error) => {
                            log::error!("cannot keep {event_type} in the durable outbox: {error}");
                            None
                        }
                    }
                }
                None => None,
            };
            let fallback = {
                // Decided under the outage lock, as the reader decides: either it claimed the
                // entry (and delivers it) or the entry is ours to deliver and keep.
                let mut outage = lock(&self.outage);
                let mut unsure = false;
                if let Some(mut confirmation) = unanswered.take() {
                    // Gone from `waiting`: the reader claimed the entry (Redis has it), unless
                    // an outage of the reader dropped every waiter, which says nothing.
                    let claimed = match lock(&self.waiting).contains_key(&number) {
                        true => None,
                        false => match confirmation.try_recv() {
                            Err(oneshot::error::TryRecvError::Closed) => None,
                            other => Some(other.ok()),
                        },
                    };
                    if let Some(handlers) = claimed {
                        drop(outage);
                        if let Some(row) = row {
                            self.forget_row(row).await;
                        }
                        return match handlers {
                            Some(handlers) => Ok(handlers),
                            None => Ok(confirmation.await.unwrap_or(0)),
                        };
                    }
                    if outage.down {
                        // Not delivered here unless kept: if the entry turns up, the reader
                        // delivers it as anyone's (refused) or skips it as ours (kept).
                        lock(&self.waiting).remove(&number);
                        unsure = true;
                        if row.is_some() {
                            outage.unsure.insert(number);
                        }
                    }
                }
                match row {
                    // Recovered since the writer was read: the outbox is already flushed, so
                    // an event put there now would wait for the next outage.
                    _ if !outage.down => Fallback::Retry,
                    Some(row) if outage.outbox.len() < self.settings.outbox_capacity => {
                        outage.outbox.push_back(Pending {
                            publish: number,
                            event_type: event_type.clone(),
                            data: data.to_owned(),
                            row,
                        });
                        self.metrics.set_redis_state(false, outage.outbox.len());
                        Fallback::Deliver
                    }
                    _ => {
                        outage.unsure.remove(&number);
                        Fallback::Refuse(unsure)
                    }
                }
            };
            if let (Fallback::Retry | Fallback::Refuse(_), Some(row)) = (&fallback, row) {
                self.forget_row(row).await;
            }
            return match fallback {
                Fallback::Retry => continue,
                Fallback::Deliver => Ok(self.deliver_here(event_type, event_data).await),
                Fallback::Refuse(unanswered) => Err(self.refuse(&event_type, unanswered)),
            };
        }
    }

    /// Waits until this process has read publish `number` back and run its handlers; `Ok(0)`
    /// if that does not happen in time, since Redis has the event all the same.
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
        // Redis holds it, so it cannot be lost here: acknowledged, as every process (this one
        // too, once its reader gets there) delivers it from the stream.
        log::warning!(
            "{event_type} was appended to Redis, but {unconfirmed}; every process delivers it from the stream"
        );
        Ok(0)
    }

    /// Delivers an event kept during an outage here at once; returns how many handlers ran.
    async fn deliver_here(&self, event_type: EventType, event_data: EventData) -> usize {
        let tag = self.outage_tag;
        let now = crate::time::unix_millis();
        self.streams
            .deliver_numbered(&event_type, &event_data, |last| {
                Some(outage_id(last, now, tag))
            });
        self.bus.dispatch(&event_type, Arc::new(event_data)).await
    }

    /// Counts and explains a publish refused during an outage; `unanswered` says Redis may
    /// have taken it all the same (its reply was lost).
    fn refuse(&self, event_type: &EventType, unanswered: bool) -> PublishError {
        self.metrics.count_redis_refused_publish();
        let why = match (&self.durable, unanswered) {
            (_, true) => "Redis did not answer whether it took the event: if it did, every process delivers it once Redis is back, else it is delivered nowhere".to_owned(),
            (Some(_), false) => format!(
                "Redis is unreachable and the outbox is full or failed ({} events): the event is delivered nowhere",
                self.settings.outbox_capacity
            ),
            (None, false) => "Redis is unreachable and this server keeps no durable outbox (DATABASE_PATH): the event is delivered nowhere".to_owned(),
        };
        PublishError(format!(
            "{event_type} was not published: {why}; publish it again later"
        ))
    }

    /// Removes a durable outbox row whose event Redis now holds (or that was not needed).
    async fn forget_row(&self, row: i64) {
        let Some(durable) = self.durable.clone() else {
            return;
        };
        match blocking(move || durable.remove(row)).await {
            Ok(()) => self.metrics.change_redis_durable_outbox(-1),
            // The event stays on disk: a restart appends it again, a duplicate, never a loss.
            Err(error) => log::error!("cannot remove row {row} from the durable outbox: {error}"),
        }
    }
}

impl Relay for RedisRelay {
    fn forward(
        &self,
        event_type: EventType,
        event_data: EventData,
    ) -> BoxFuture<'_, PublishResult> {
        Box::pin(self.publish(event_type, event_data))
    }
}

/// The type, data and id of a stream entry, if it is one of ours.
fn decode(entry: &StreamId) -> Option<(EventType, EventData, EventId)> {
    let event_type: String = entry.get("type")?;
    let data: String = entry.get("data")?;
    let data = serde_json::from_str(&data)
        .and_then(EventData::from_raw)
        .ok()?;
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

/// Appends what an earlier process of this database left in the durable outbox (it died during
/// an outage), oldest first, removing each row once Redis has it.
async fn append_left_over(
    writer: &mut MultiplexedConnection,
    settings: &RedisSettings,
    origin: &str,
    durable: Arc<dyn DurableOutbox>,
    metrics: &Metrics,
) -> Result<(), String> {
    let reader = durable.clone();
    let rows = blocking(move || reader.pending()).await?;
    if rows.is_empty() {
        return Ok(());
    }
    let count = rows.len();
    for (row, event_type, data) in rows {
        // Not `local`: the process that delivered it is gone, so every process delivers it.
        let _: String = redis::cmd("XADD")
            .arg(&settings.stream_key)
            .arg("MAXLEN")
            .arg("~")
            .arg(settings.max_len)
            .arg("*")
            .arg("type")
            .arg(&event_type)
            .arg("data")
            .arg(&data)
            .arg("origin")
            .arg(origin)
            .query_async(writer)
            .await
            .map_err(|error| error.to_string())?;
        let remover = durable.clone();
        blocking(move || remover.remove(row)).await?;
        metrics.count_redis_appended_on_recovery(1);
    }
    log::info!("appended the {count} events an earlier process left in the durable outbox");
    Ok(())
}

/// Runs blocking I/O (the durable outbox's) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| Err(format!("the outbox task failed: {error}")))
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
        if let Some(user) = data.user_id() {
            let user = Arc::from(user);
            history.record(&user, &event_type, data.json(), Some(id), now, None);
        }
    }
    Ok((history, newest))
}

/// The top bit of an outage id's `seq`, so that it follows every Redis id of its millisecond.
const OUTAGE_SEQ: u64 = 1 << 63;
/// Bits of the process tag, the lowest-order part of an outage id's `seq`; the counter is above.
const TAG_BITS: u32 = 31;
/// The largest counter an outage id's `seq` holds.
const MAX_COUNTER: u64 = (1 << (63 - TAG_BITS)) - 1;

/// The id this process gives an event kept during an outage, after `last`: a hybrid logical
/// clock. The wall-clock ms `now` if it is past `last`, else `last`'s ms with a counter one
/// past `last`'s; the tag breaks ties between processes. So every process orders outage ids
/// the same way (by time, then counter, then process), whoever compares them.
fn outage_id(last: EventId, now: u64, tag: u32) -> EventId {
    let tag = u64::from(tag) & ((1 << TAG_BITS) - 1);
    let at = |epoch, counter: u64| EventId {
        epoch,
        seq: OUTAGE_SEQ | counter << TAG_BITS | tag,
    };
    if now > last.epoch {
        return at(now, 0);
    }
    let counter = match last.seq & OUTAGE_SEQ {
        0 => 0,
        _ => ((last.seq & !OUTAGE_SEQ) >> TAG_BITS) + 1,
    };
    match at(last.epoch, counter) {
        id if counter <= MAX_COUNTER && id > last => id,
        _ => at(last.epoch + 1, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outage_ids_follow_the_clock_then_a_counter_with_the_tag_lowest() {
        let shared = EventId {
            epoch: 1_700_000_000_005,
            seq: 3,
        };
        let later = outage_id(shared, shared.epoch + 10, 7);
        assert_eq!(
            later,
            EventId {
                epoch: shared.epoch + 10,
                seq: OUTAGE_SEQ | 7
            }
        );
        let same_ms = outage_id(shared, shared.epoch, 7);
        assert_eq!(
            same_ms,
            EventId {
                epoch: shared.epoch,
                seq: OUTAGE_SEQ | 7
            }
        );
        assert!(same_ms > shared, "after every Redis id of its millisecond");
        let next = outage_id(same_ms, shared.epoch - 1, 7);
        assert_eq!(
            next.seq,
            OUTAGE_SEQ | 1 << TAG_BITS | 7,
            "a clock behind counts on"
        );

        // Another process's ids of the same millisecond and counter sort by tag alone, and a
        // later counter or millisecond sorts after, whatever the tags: one order everywhere.
        let other = outage_id(shared, shared.epoch, (1 << TAG_BITS) - 1);
        assert!(other > same_ms && other < next);
        assert!(outage_id(shared, shared.epoch + 1, 0) > next);

        let exhausted = EventId {
            epoch: shared.epoch,
            seq: OUTAGE_SEQ | MAX_COUNTER << TAG_BITS | 7,
        };
        assert_eq!(
            outage_id(exhausted, shared.epoch, 7),
            EventId {
                epoch: shared.epoch + 1,
                seq: OUTAGE_SEQ | 7
            },
            "the next millisecond, not a count carried into the marker bit"
        );
    }
}
