//! The replay history in the SQLite file, so that `Last-Event-ID` works across a restart: read
//! into the `History` at start, and appended to by a writer thread off the delivery path.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::time::Instant;

use super::DatabaseError;
use crate::delivery::{EventId, History, HistoryLimits, HistorySink, RecordedEvent};
use crate::events::EventType;
use crate::log;

/// Events waiting for the writer: sized to absorb a long burst at the writer's speed (which
/// `benches/sqlite_cost.rs` measures); beyond it events stay replayable in memory but are not
/// stored, and the stored history records the gap (see [`HistoryWriter::offer`]).
pub const WRITER_QUEUE_CAPACITY: usize = 65_536;

/// Most events inserted in one transaction: large enough to amortize the commit, small enough
/// that the job store's transactions never wait long for the write lock.
const MAX_BATCH: usize = 1024;

/// The `event_watermark` row naming the newest id whose events may be gone from `events`.
const FORGOTTEN_THROUGH: &str = "forgotten_through";

/// Hands each recorded event to the writer thread without waiting for it.
pub struct HistoryWriter {
    queue: SyncSender<Write>,
    /// The newest event that could not be queued, until the writer has been told.
    lost_through: Option<EventId>,
    thread: JoinHandle<()>,
}

enum Write {
    /// An event to store.
    Event {
        id: EventId,
        user: Arc<str>,
        event_type: EventType,
        frame: Bytes,
    },
    /// Events through this id were delivered but will never be stored.
    Lost(EventId),
}

/// Opens the history stored in the file at `path`: the retained events as a `History` whose
/// own ids start after every stored one, and the writer that stores what it records next.
pub fn open(path: &Path, limits: HistoryLimits) -> Result<(History, HistoryWriter), DatabaseError> {
    let error = |error: rusqlite::Error| DatabaseError {
        path: path.to_owned(),
        reason: error.to_string(),
    };
    let mut connection = super::open(path)?;
    let history = load(&mut connection, limits).map_err(error)?;
    let (queue, writes) = mpsc::sync_channel(WRITER_QUEUE_CAPACITY);
    let totals = Totals::read(&connection).map_err(error)?;
    let thread = std::thread::Builder::new()
        .name("history-writer".to_owned())
        .spawn(move || write_until_closed(connection, writes, limits, totals))
        .map_err(|spawn| DatabaseError {
            path: path.to_owned(),
            reason: format!("cannot start the history writer: {spawn}"),
        })?;
    let writer = HistoryWriter {
        queue,
        lost_through: None,
        thread,
    };
    Ok((history, writer))
}

impl HistorySink for HistoryWriter {
    /// Queues `event` for storing. Never blocks: when the writer is a whole queue behind, the
    /// event is not stored, and the next write tells the store so, which then answers a replay
    /// from before it with `replay_incomplete` instead of silently skipping it.
    fn offer(&mut self, user: &Arc<str>, event: &RecordedEvent) {
        if let Some(lost) = self.lost_through {
            if self.queue.try_send(Write::Lost(lost)).is_ok() {
                self.lost_through = None;
            }
        }
        let write = Write::Event {
            id: event.id,
            user: user.clone(),
            event_type: event.event_type.clone(),
            frame: event.frame.clone(),
        };
        match self.queue.try_send(write) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.lost_through = Some(event.id),
            Err(TrySendError::Disconnected(_)) => {
                if self.lost_through.is_none() {
                    log::error!("the history writer has stopped: events are no longer stored");
                }
                self.lost_through = Some(event.id);
            }
        }
    }

    /// Stores everything queued, then stops the writer (at shutdown).
    fn finish(self: Box<Self>) {
        if let Some(lost) = self.lost_through {
            let _ = self.queue.send(Write::Lost(lost));
        }
        drop(self.queue);
        if self.thread.join().is_err() {
            log::error!("the history writer panicked");
        }
    }
}

/// Reads the retained events into a new `History`.
fn load(connection: &mut Connection, limits: HistoryLimits) -> rusqlite::Result<History> {
    let now_ms = crate::time::unix_millis();
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut forgotten_through = match read_watermark(&transaction)? {
        Some(watermark) => watermark,
        None => {
            // A new file knows nothing from before it existed.
            let start = EventId {
                epoch: now_ms,
                seq: 0,
            };
            raise_watermark(&transaction, start)?;
            start
        }
    };
    let max_age_ms = limits.max_age.as_millis() as u64;
    let mut rows = Vec::new();
    {
        let mut statement = transaction.prepare(
            "SELECT epoch, seq, user_id, event_type, frame, recorded_ms FROM events \
             ORDER BY position",
        )?;
        let mut query = statement.query([])?;
        while let Some(row) = query.next()? {
            let id = EventId {
                epoch: row.get(0)?,
                seq: row.get(1)?,
            };
            let recorded_ms: u64 = row.get(5)?;
            let age = Duration::from_millis(now_ms.saturating_sub(recorded_ms));
            if age.as_millis() as u64 >= max_age_ms {
                forgotten_through = forgotten_through.max(id);
                continue;
            }
            let user: String = row.get(2)?;
            let event_type: String = row.get(3)?;
            let frame: Vec<u8> = row.get(4)?;
            let event = RecordedEvent {
                id,
                event_type: EventType::from(event_type),
                frame: Bytes::from(frame),
            };
            rows.push((Arc::<str>::from(user), event, age));
        }
    }
    transaction.commit()?;
    let mut newest_kept = forgotten_through;
    rows.retain(|(_, event, _)| {
        let in_order = event.id > newest_kept;
        newest_kept = newest_kept.max(event.id);
        in_order
    });
    let newest = rows
        .last()
        .map_or(forgotten_through, |(_, event, _)| event.id);
    // Ids carry the start time, but a clock set back must not make them repeat.
    let epoch = now_ms.max(newest.epoch + 1);
    let now = Instant::now();
    let events = rows.into_iter().map(|(user, event, age)| {
        // Stored before this boot, perhaps: then it counts as recorded now, at worst.
        let recorded_at = now.checked_sub(age).unwrap_or(now);
        (user, event, recorded_at)
    });
    Ok(History::resume(epoch, limits, forgotten_through, events))
}

/// The writer thread: stores events in batches, one transaction each, and prunes what the
/// history limits no longer keep, until the queue's sender is dropped and it is drained.
fn write_until_closed(
    mut connection: Connection,
    writes: Receiver<Write>,
    limits: HistoryLimits,
    mut totals: Totals,
) {
    // Events whose batch failed; the next batch records them as lost.
    let mut failed_through: Option<EventId> = None;
    while let Ok(first) = writes.recv() {
        let mut batch = vec![first];
        batch.extend(writes.try_iter().take(MAX_BATCH - 1));
        let mut attempt = totals;
        match store_batch(
            &mut connection,
            &batch,
            failed_through,
            limits,
            &mut attempt,
        ) {
            Ok(()) => {
                totals = attempt;
                failed_through = None;
            }
            Err(error) => {
                log::error!("cannot store {} events: {error}", batch.len());
                failed_through = batch.iter().map(Write::id).max().max(failed_through);
            }
        }
    }
}

impl Write {
    fn id(&self) -> EventId {
        match self {
            Write::Event { id, .. } | Write::Lost(id) => *id,
        }
    }
}

/// Rows and frame bytes in `events`, kept by the writer so pruning needs no full scan.
#[derive(Clone, Copy, Debug)]
struct Totals {
    events: usize,
    bytes: usize,
}

impl Totals {
    fn read(connection: &Connection) -> rusqlite::Result<Totals> {
        connection.query_row(
            "SELECT count(*), coalesce(sum(length(frame)), 0) FROM events",
            [],
            |row| {
                Ok(Totals {
                    events: row.get(0)?,
                    bytes: row.get(1)?,
                })
            },
        )
    }
}

fn store_batch(
    connection: &mut Connection,
    batch: &[Write],
    failed_through: Option<EventId>,
    limits: HistoryLimits,
    totals: &mut Totals,
) -> rusqlite::Result<()> {
    let recorded_ms = crate::time::unix_millis();
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(lost) = failed_through {
        forget_through_id(&transaction, lost, totals)?;
    }
    {
        let mut insert = transaction.prepare_cached(
            "INSERT INTO events (epoch, seq, user_id, event_type, frame, recorded_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for write in batch {
            match write {
                Write::Event {
                    id,
                    user,
                    event_type,
                    frame,
                } => {
                    insert.execute(params![
                        id.epoch,
                        id.seq,
                        &**user,
                        event_type.as_str(),
                        &frame[..],
                        recorded_ms
                    ])?;
                    totals.events += 1;
                    totals.bytes += frame.len();
                }
                Write::Lost(id) => forget_through_id(&transaction, *id, totals)?,
            }
        }
    }
    prune(&transaction, limits, recorded_ms, totals)?;
    transaction.commit()
}

/// Deletes the oldest events that the limits no longer keep: older than `max_age`, beyond
/// `total_events`, or beyond `total_bytes` of frames.
fn prune(
    transaction: &Transaction<'_>,
    limits: HistoryLimits,
    now_ms: u64,
    totals: &mut Totals,
) -> rusqlite::Result<()> {
    // Positions grow with time, so the expired events are the oldest ones: the scan stops at
    // the first event still young enough.
    let cutoff_ms = now_ms.saturating_sub(limits.max_age.as_millis() as u64);
    let first_kept: Option<i64> = transaction
        .prepare_cached(
            "SELECT position FROM events WHERE recorded_ms >= ?1 ORDER BY position LIMIT 1",
        )?
        .query_row([cutoff_ms], |row| row.get(0))
        .optional()?;
    match first_kept {
        Some(position) => delete_through(transaction, position - 1, totals)?,
        None => delete_through(transaction, i64::MAX, totals)?,
    }
    if totals.events > limits.total_events {
        let excess = totals.events - limits.total_events;
        let last_excess: i64 = transaction.query_row(
            "SELECT position FROM events ORDER BY position LIMIT 1 OFFSET ?1",
            [excess - 1],
            |row| row.get(0),
        )?;
        delete_through(transaction, last_excess, totals)?;
    }
    if totals.bytes > limits.total_bytes {
        let mut freed = 0;
        let mut last_excess = None;
        {
            let mut oldest = transaction
                .prepare("SELECT position, length(frame) FROM events ORDER BY position")?;
            let mut rows = oldest.query([])?;
            while let Some(row) = rows.next()? {
                last_excess = Some(row.get::<_, i64>(0)?);
                freed += row.get::<_, usize>(1)?;
                if totals.bytes - freed <= limits.total_bytes {
                    break;
                }
            }
        }
        if let Some(position) = last_excess {
            delete_through(transaction, position, totals)?;
        }
    }
    Ok(())
}

/// Deletes the events stored at or before `position` and raises the watermark past them.
fn delete_through(
    transaction: &Transaction<'_>,
    position: i64,
    totals: &mut Totals,
) -> rusqlite::Result<()> {
    let newest_deleted = transaction
        .prepare_cached(
            "SELECT epoch, seq FROM events WHERE position <= ?1 ORDER BY position DESC LIMIT 1",
        )?
        .query_row([position], |row| {
            Ok(EventId {
                epoch: row.get(0)?,
                seq: row.get(1)?,
            })
        })
        .optional()?;
    let Some(newest_deleted) = newest_deleted else {
        return Ok(());
    };
    let (events, bytes): (usize, usize) = transaction
        .prepare_cached(
            "SELECT count(*), coalesce(sum(length(frame)), 0) FROM events WHERE position <= ?1",
        )?
        .query_row([position], |row| Ok((row.get(0)?, row.get(1)?)))?;
    transaction
        .prepare_cached("DELETE FROM events WHERE position <= ?1")?
        .execute([position])?;
    totals.events -= events;
    totals.bytes -= bytes;
    raise_watermark(transaction, newest_deleted)
}

/// Records that events through `id` may be missing, and deletes the stored ones up to it: a
/// replay from before `id` is incomplete whatever else is kept.
fn forget_through_id(
    transaction: &Transaction<'_>,
    id: EventId,
    totals: &mut Totals,
) -> rusqlite::Result<()> {
    let last_position: Option<i64> = transaction
        .query_row(
            "SELECT position FROM events WHERE (epoch, seq) <= (?1, ?2) \
             ORDER BY position DESC LIMIT 1",
            params![id.epoch, id.seq],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(position) = last_position {
        delete_through(transaction, position, totals)?;
    }
    raise_watermark(transaction, id)
}

fn read_watermark(transaction: &Transaction<'_>) -> rusqlite::Result<Option<EventId>> {
    transaction
        .query_row(
            "SELECT epoch, seq FROM event_watermark WHERE name = ?1",
            [FORGOTTEN_THROUGH],
            |row| {
                Ok(EventId {
                    epoch: row.get(0)?,
                    seq: row.get(1)?,
                })
            },
        )
        .optional()
}

fn raise_watermark(transaction: &Transaction<'_>, id: EventId) -> rusqlite::Result<()> {
    transaction
        .prepare_cached(
            "INSERT INTO event_watermark (name, epoch, seq) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq \
             WHERE (excluded.epoch, excluded.seq) > (event_watermark.epoch, event_watermark.seq)",
        )?
        .execute(params![FORGOTTEN_THROUGH, id.epoch, id.seq])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HistoryLimits {
        HistoryLimits {
            events_per_user: 100,
            max_age: Duration::from_secs(60),
            total_events: 1000,
            total_bytes: 1 << 20,
        }
    }

    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new() -> Scratch {
            let directory = std::env::temp_dir().join(format!(
                "artifact-events-history-{}",
                crate::random::hex_token(8)
            ));
            std::fs::create_dir_all(&directory).unwrap();
            Scratch(directory.join("history.db"))
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    /// Opens the stored history, records `count` events for `user` (as the index would), and
    /// stops the writer; returns their ids.
    fn run_once(path: &Path, limits: HistoryLimits, user: &str, count: usize) -> Vec<EventId> {
        let (mut history, mut writer) = open(path, limits).unwrap();
        let user: Arc<str> = Arc::from(user);
        let ids = (0..count)
            .map(|_| {
                let now = Instant::now();
                history.record(
                    &user,
                    &EventType::COMPLETED,
                    "{}",
                    None,
                    now,
                    Some(&mut writer),
                );
                history.last_id()
            })
            .collect();
        Box::new(writer).finish();
        ids
    }

    fn replay(path: &Path, limits: HistoryLimits, user: &str, after: EventId) -> (bool, usize) {
        let (mut history, writer) = open(path, limits).unwrap();
        Box::new(writer).finish();
        let replay = history.since(user, &after.to_string(), Instant::now());
        (replay.complete, replay.events.len())
    }

    #[test]
    fn stored_events_replay_after_reopening_and_new_ids_come_later() {
        let scratch = Scratch::new();
        let first_run = run_once(&scratch.0, limits(), "alice", 3);
        assert_eq!(
            replay(&scratch.0, limits(), "alice", first_run[0]),
            (true, 2)
        );
        let second_run = run_once(&scratch.0, limits(), "alice", 1);
        assert!(second_run[0].epoch > first_run[2].epoch);
        assert_eq!(
            replay(&scratch.0, limits(), "alice", first_run[0]),
            (true, 3)
        );
        assert_eq!(
            replay(&scratch.0, limits(), "bob", first_run[2]),
            (false, 0),
            "bob was never sent alice's event"
        );
    }

    #[test]
    fn the_file_keeps_only_what_the_limits_keep_and_says_what_it_forgot() {
        let scratch = Scratch::new();
        let few = HistoryLimits {
            total_events: 3,
            ..limits()
        };
        let ids = run_once(&scratch.0, few, "alice", 5);
        let stored: usize = Connection::open(&scratch.0)
            .unwrap()
            .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
            .unwrap();
        assert_eq!(stored, 3);
        assert_eq!(replay(&scratch.0, few, "alice", ids[0]), (false, 3));
        assert_eq!(replay(&scratch.0, few, "alice", ids[1]), (true, 3));

        let small = HistoryLimits {
            total_bytes: 2 * format!("id: {}\ndata: {{}}\n\n", ids[0]).len(),
            ..limits()
        };
        run_once(&scratch.0, small, "alice", 1);
        let stored: usize = Connection::open(&scratch.0)
            .unwrap()
            .query_row("SELECT count(*) FROM events", [], |row| row.get(0))
            .unwrap();
        assert_eq!(stored, 2, "the byte bound holds on disk too");
    }

    #[test]
    fn events_older_than_max_age_are_not_loaded() {
        let scratch = Scratch::new();
        let ids = run_once(&scratch.0, limits(), "alice", 2);
        Connection::open(&scratch.0)
            .unwrap()
            .execute(
                "UPDATE events SET recorded_ms = recorded_ms - 61000 WHERE seq = ?1",
                [ids[0].seq],
            )
            .unwrap();
        let (mut history, writer) = open(&scratch.0, limits()).unwrap();
        Box::new(writer).finish();
        let now = Instant::now();
        assert_eq!(history.len(), 1);
        assert!(
            !history
                .since("alice", &format!("{}-0", ids[0].epoch), now)
                .complete
        );
        assert!(history.since("alice", &ids[0].to_string(), now).complete);
    }

    #[test]
    fn events_the_writer_could_not_take_make_earlier_replays_incomplete() {
        let scratch = Scratch::new();
        let ids = run_once(&scratch.0, limits(), "alice", 3);
        let (_, mut writer) = open(&scratch.0, limits()).unwrap();
        // As when the queue was full: the event after the stored ones was delivered, not stored.
        let lost = EventId {
            epoch: ids[2].epoch,
            seq: ids[2].seq + 1,
        };
        writer.lost_through = Some(lost);
        Box::new(writer).finish();
        assert_eq!(replay(&scratch.0, limits(), "alice", ids[0]), (false, 0));
        assert_eq!(replay(&scratch.0, limits(), "alice", lost), (true, 0));
    }
}
