//! The SQLite file behind durable jobs and event history: how it is opened, its schema, and
//! the backends kept in it: the job store, the history sink, and the webhook store (with the
//! outbox of pending deliveries).

mod history;
mod job_store;
#[cfg(feature = "redis")]
mod outbox;
mod webhook_store;

pub use history::{open as open_history, HistoryWriter, WRITER_QUEUE_CAPACITY};
pub use job_store::SqliteJobStore;
#[cfg(feature = "redis")]
pub use outbox::SqliteOutbox;
pub use webhook_store::SqliteWebhookStore;

use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::delivery::{History, HistoryLimits};
use crate::jobs::JobLimits;

/// Each schema change, in order; a file at version `n` has had the first `n` applied. Append
/// new steps, never edit old ones: files written by earlier versions replay what they lack.
const MIGRATIONS: &[&str] = &[
    // 1: jobs, in creation order (`seq`), and the retained events with what was forgotten.
    "CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        notebook_id TEXT NOT NULL,
        artifact_type TEXT NOT NULL,
        content TEXT NOT NULL,
        count INTEGER NOT NULL,
        status TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        result TEXT,
        error TEXT,
        retry_count INTEGER NOT NULL
    );
    CREATE INDEX jobs_by_status ON jobs (status, seq);
    CREATE INDEX jobs_by_user ON jobs (user_id, seq);
    CREATE TABLE events (
        position INTEGER PRIMARY KEY,
        epoch INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        user_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        frame BLOB NOT NULL,
        recorded_ms INTEGER NOT NULL
    );
    CREATE TABLE event_watermark (
        name TEXT PRIMARY KEY,
        epoch INTEGER NOT NULL,
        seq INTEGER NOT NULL
    );",
    // 2: what each job costs against the store's byte budget (`Job::stored_bytes`); rows from
    // before it are estimated from their text.
    "ALTER TABLE jobs ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET size = 512 + length(id) + length(user_id) + length(notebook_id)
        + length(content) + coalesce(length(result), 0) + coalesce(length(error), 0);",
    // 3: webhooks, the outbox of their pending deliveries (in the order they were queued),
    // and each webhook's recent attempts.
    "CREATE TABLE webhooks (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        url TEXT NOT NULL,
        event_types TEXT,
        secret TEXT NOT NULL,
        created_at TEXT NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE webhook_outbox (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        webhook_id TEXT NOT NULL,
        body TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL
    );
    CREATE INDEX webhook_outbox_by_webhook ON webhook_outbox (webhook_id);
    CREATE TABLE webhook_attempts (
        seq INTEGER PRIMARY KEY,
        webhook_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        at TEXT NOT NULL,
        status INTEGER,
        error TEXT,
        duration_ms INTEGER NOT NULL
    );
    CREATE INDEX webhook_attempts_by_webhook ON webhook_attempts (webhook_id, seq);",
    // 4: events acknowledged during a Redis outage and not yet appended to Redis (issue 19).
    "CREATE TABLE redis_outbox (
        row INTEGER PRIMARY KEY,
        event_type TEXT NOT NULL,
        data TEXT NOT NULL
    );",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: usize = MIGRATIONS.len();

/// How long a statement waits for another connection's write to finish before failing. Writes
/// are single short transactions, so waiting this long means something is badly wrong.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The database file could not be opened, migrated or used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong.
    pub reason: String,
}

impl fmt::Display for DatabaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "database {}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for DatabaseError {}

/// The backends kept in one SQLite file.
pub struct SqliteBackends {
    /// Keeps other processes off the file while held (see [`claim`]).
    pub claim: File,
    /// The durable job store.
    pub store: SqliteJobStore,
    /// The stored replay history and the writer that goes on storing it, if asked for.
    pub history: Option<(History, HistoryWriter)>,
    /// The durable webhook store: subscriptions, outbox and attempts.
    pub webhooks: SqliteWebhookStore,
}

/// Claims the file at `path` and opens its job store and, with `history` limits, its stored
/// replay history.
pub fn open_backends(
    path: &Path,
    job_limits: JobLimits,
    history: Option<HistoryLimits>,
) -> Result<SqliteBackends, DatabaseError> {
    let claim = claim(path)?;
    let store = SqliteJobStore::open(path, job_limits)?;
    let history = history
        .map(|limits| open_history(path, limits))
        .transpose()?;
    let webhooks = SqliteWebhookStore::open(path)?;
    Ok(SqliteBackends {
        claim,
        store,
        history,
        webhooks,
    })
}

/// Claims the database at `path` for this process for as long as the returned file is open,
/// or says which file another process holds. Two servers on one file would each requeue the
/// other's running jobs as interrupted, and hand out event ids the other also uses.
pub fn claim(path: &Path) -> Result<File, DatabaseError> {
    // A file beside the database, not the database itself: closing any descriptor of a file
    // drops every POSIX lock SQLite holds on it, so this one must never share a file with them.
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let error = |reason: String| DatabaseError {
        path: path.to_owned(),
        reason,
    };
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| error(format!("cannot open {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(error(format!(
            "another artifact-events process is using it (it holds {}); run one server per \
             database file",
            lock_path.display()
        ))),
        Err(TryLockError::Error(e)) => {
            Err(error(format!("cannot lock {}: {e}", lock_path.display())))
        }
    }
}

/// Opens (creating if need be) the database at `path` in WAL mode, and brings its schema up to
/// [`SCHEMA_VERSION`].
pub fn open(path: &Path) -> Result<Connection, DatabaseError> {
    let error = |reason: String| DatabaseError {
        path: path.to_owned(),
        reason,
    };
    let mut connection = Connection::open(path).map_err(|e| error(e.to_string()))?;
    configure(&connection).map_err(error)?;
    migrate(&mut connection).map_err(error)?;
    Ok(connection)
}

/// WAL lets readers and the one writer proceed together and makes a commit a single append.
/// `synchronous = NORMAL` skips the fsync per commit: a commit survives the process being
/// killed (the kernel holds the write), and a power loss can lose the last commits but never
/// corrupts the file.
fn configure(connection: &Connection) -> Result<(), String> {
    connection
        .busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let mode: String = connection
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(|e| e.to_string())?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("cannot use WAL mode (journal_mode is {mode})"));
    }
    connection
        .pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| e.to_string())
}

fn migrate(connection: &mut Connection) -> Result<(), String> {
    let transaction = connection
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    transaction
        .execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .map_err(|e| e.to_string())?;
    let version: Option<usize> = transaction
        .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
        .optional()
        .map_err(|e| e.to_string())?;
    let version = version.unwrap_or(0);
    if version > SCHEMA_VERSION {
        return Err(format!(
            "schema version {version} was written by a newer artifact-events; this one knows up \
             to {SCHEMA_VERSION}"
        ));
    }
    for (step, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        transaction
            .execute_batch(sql)
            .map_err(|e| format!("migration to schema version {}: {e}", step + 1))?;
    }
    transaction
        .execute("DELETE FROM schema_version", [])
        .and_then(|_| {
            transaction.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [SCHEMA_VERSION],
            )
        })
        .and_then(|_| transaction.commit())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temporary_path(name: &str) -> PathBuf {
        let directory = std::env::temp_dir().join(format!(
            "artifact-events-{name}-{}",
            crate::random::hex_token(8)
        ));
        std::fs::create_dir_all(&directory).unwrap();
        directory.join("test.db")
    }

    #[test]
    fn a_new_file_gets_the_current_schema_in_wal_mode_and_reopens() {
        let path = temporary_path("schema");
        let connection = open(&path).unwrap();
        let version: usize = connection
            .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let mode: String = connection
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        connection
            .execute("INSERT INTO event_watermark VALUES ('kept', 1, 2)", [])
            .unwrap();
        drop(connection);

        let reopened = open(&path).unwrap();
        let rows: usize = reopened
            .query_row("SELECT count(*) FROM schema_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(
            rows, 1,
            "reopening migrates nothing and adds no version row"
        );
        let kept: u64 = reopened
            .query_row("SELECT seq FROM event_watermark", [], |row| row.get(0))
            .unwrap();
        assert_eq!(kept, 2);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_claimed_file_is_refused_until_its_claim_is_dropped() {
        let path = temporary_path("claim");
        let claim = claim(&path).unwrap();
        let refused = super::claim(&path).unwrap_err();
        assert!(
            refused.reason.contains("another artifact-events process"),
            "{refused}"
        );
        drop(claim);
        drop(super::claim(&path).unwrap());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_file_from_a_newer_version_is_refused_untouched() {
        let path = temporary_path("newer");
        drop(open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        let error = open(&path).unwrap_err();
        assert!(error.reason.contains("schema version 99"), "{error}");
        assert!(error.to_string().contains("test.db"), "{error}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
