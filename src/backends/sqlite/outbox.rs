//! The durable Redis outbox: events acknowledged during a Redis outage, kept in the process's
//! database file until Redis holds them, so that a crash before Redis is back loses none.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection};

use super::DatabaseError;
use crate::backends::DurableOutbox;
use crate::panic::lock;

/// The `redis_outbox` table, on a connection of its own whose every commit is fsynced.
pub struct SqliteOutbox {
    /// A std `Mutex`: each call is one short statement; callers run it off the async threads.
    connection: Mutex<Connection>,
}

impl SqliteOutbox {
    /// Opens the table in the (already claimed) database at `path`.
    pub fn open(path: &Path) -> Result<SqliteOutbox, DatabaseError> {
        let connection = super::open(path)?;
        // The database's other connections skip the fsync per commit (`NORMAL`); an outbox
        // row is what a `202` promises survives, so its commit waits for the disk.
        connection
            .pragma_update(None, "synchronous", "FULL")
            .map_err(|e| DatabaseError {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(SqliteOutbox {
            connection: Mutex::new(connection),
        })
    }
}

impl DurableOutbox for SqliteOutbox {
    fn keep(&self, event_type: &str, data: &str) -> Result<i64, String> {
        let connection = lock(&self.connection);
        connection
            .execute(
                "INSERT INTO redis_outbox (event_type, data) VALUES (?1, ?2)",
                params![event_type, data],
            )
            .map_err(|e| e.to_string())?;
        Ok(connection.last_insert_rowid())
    }

    fn remove(&self, row: i64) -> Result<(), String> {
        lock(&self.connection)
            .execute("DELETE FROM redis_outbox WHERE row = ?1", [row])
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn pending(&self) -> Result<Vec<(i64, String, String)>, String> {
        let connection = lock(&self.connection);
        let mut statement = connection
            .prepare("SELECT row, event_type, data FROM redis_outbox ORDER BY row")
            .map_err(|e| e.to_string())?;
        let rows = statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .map_err(|e| e.to_string())?;
        rows.collect::<Result<_, _>>().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_events_outlive_the_connection_in_order_until_removed() {
        let directory = std::env::temp_dir().join(format!(
            "artifact-events-outbox-{}",
            crate::random::hex_token(8)
        ));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("test.db");
        let outbox = SqliteOutbox::open(&path).unwrap();
        let first = outbox
            .keep("artifact.completed", r#"{"user_id":"a"}"#)
            .unwrap();
        let second = outbox
            .keep("artifact.failed", r#"{"user_id":"b"}"#)
            .unwrap();
        drop(outbox);

        let reopened = SqliteOutbox::open(&path).unwrap();
        let pending = reopened.pending().unwrap();
        assert_eq!(
            pending,
            [
                (
                    first,
                    "artifact.completed".to_owned(),
                    r#"{"user_id":"a"}"#.to_owned()
                ),
                (
                    second,
                    "artifact.failed".to_owned(),
                    r#"{"user_id":"b"}"#.to_owned()
                ),
            ]
        );
        reopened.remove(first).unwrap();
        assert_eq!(reopened.pending().unwrap().len(), 1);
        std::fs::remove_dir_all(directory).unwrap();
    }
}
