//! A `WebhookStore` in the SQLite file: subscriptions, the outbox and recent attempts outlive
//! the process, so a delivery pending at a crash is resumed by the next start.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};

use super::DatabaseError;
use crate::panic::lock;
use crate::webhooks::{
    Attempt, Delivery, SigningKey, StoreFailure, Subscription, WebhookStore, RECENT_ATTEMPTS,
};

/// Keeps webhooks in a SQLite file (WAL mode; each call one short transaction).
pub struct SqliteWebhookStore {
    /// A std `Mutex`: every call is one short local statement or transaction, never awaited.
    connection: Mutex<Connection>,
}

impl SqliteWebhookStore {
    /// Opens (or creates) the store in the file at `path`.
    pub fn open(path: &Path) -> Result<Self, DatabaseError> {
        Ok(SqliteWebhookStore {
            connection: Mutex::new(super::open(path)?),
        })
    }
}

fn failure(error: rusqlite::Error) -> StoreFailure {
    StoreFailure(error.to_string())
}

fn subscription_from_row(row: &Row<'_>) -> rusqlite::Result<Subscription> {
    let event_types: Option<String> = row.get(3)?;
    let secret: String = row.get(4)?;
    let text_error = |index, reason: String| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, reason.into())
    };
    Ok(Subscription {
        id: row.get(0)?,
        user_id: row.get(1)?,
        url: row.get(2)?,
        event_types: event_types
            .map(|types| serde_json::from_str(&types))
            .transpose()
            .map_err(|error| text_error(3, error.to_string()))?,
        key: SigningKey::parse(&secret).map_err(|reason| text_error(4, reason.to_owned()))?,
        created_at: row.get(5)?,
        disabled: row.get(6)?,
    })
}

impl WebhookStore for SqliteWebhookStore {
    fn subscriptions(&self) -> Result<Vec<Subscription>, StoreFailure> {
        let connection = lock(&self.connection);
        let mut statement = connection
            .prepare(
                "SELECT id, user_id, url, event_types, secret, created_at, disabled \
                 FROM webhooks ORDER BY seq",
            )
            .map_err(failure)?;
        let rows = statement
            .query_map([], subscription_from_row)
            .map_err(failure)?;
        rows.collect::<Result<_, _>>().map_err(failure)
    }

    fn add(&self, subscription: &Subscription) -> Result<(), StoreFailure> {
        let event_types = subscription
            .event_types
            .as_ref()
            .map(|types| serde_json::Value::from(types.clone()).to_string());
        lock(&self.connection)
            .execute(
                "INSERT INTO webhooks (id, user_id, url, event_types, secret, created_at, disabled) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    subscription.id,
                    subscription.user_id,
                    subscription.url,
                    event_types,
                    subscription.key.to_text(),
                    subscription.created_at,
                    subscription.disabled,
                ],
            )
            .map(drop)
            .map_err(failure)
    }

    fn remove(&self, id: &str) -> Result<bool, StoreFailure> {
        let mut connection = lock(&self.connection);
        let transaction = connection.transaction().map_err(failure)?;
        let removed = transaction
            .execute("DELETE FROM webhooks WHERE id = ?1", [id])
            .map_err(failure)?;
        transaction
            .execute("DELETE FROM webhook_outbox WHERE webhook_id = ?1", [id])
            .map_err(failure)?;
        transaction
            .execute("DELETE FROM webhook_attempts WHERE webhook_id = ?1", [id])
            .map_err(failure)?;
        transaction.commit().map_err(failure)?;
        Ok(removed > 0)
    }

    fn disable(&self, id: &str) -> Result<(), StoreFailure> {
        lock(&self.connection)
            .execute("UPDATE webhooks SET disabled = 1 WHERE id = ?1", [id])
            .map(drop)
            .map_err(failure)
    }

    fn save_delivery(&self, delivery: &Delivery) -> Result<(), StoreFailure> {
        // An upsert keeps the row's `seq`, so resumed deliveries keep their order.
        lock(&self.connection)
            .execute(
                "INSERT INTO webhook_outbox (id, webhook_id, body, attempts, next_attempt_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (id) DO UPDATE SET attempts = excluded.attempts, \
                 next_attempt_ms = excluded.next_attempt_ms",
                params![
                    delivery.id,
                    delivery.subscription_id,
                    delivery.body,
                    delivery.attempts,
                    delivery.next_attempt_ms,
                ],
            )
            .map(drop)
            .map_err(failure)
    }

    fn finish_delivery(&self, id: &str) -> Result<(), StoreFailure> {
        lock(&self.connection)
            .execute("DELETE FROM webhook_outbox WHERE id = ?1", [id])
            .map(drop)
            .map_err(failure)
    }

    fn pending_deliveries(&self) -> Result<Vec<Delivery>, StoreFailure> {
        let connection = lock(&self.connection);
        let mut statement = connection
            .prepare(
                "SELECT id, webhook_id, body, attempts, next_attempt_ms FROM webhook_outbox \
                 ORDER BY seq",
            )
            .map_err(failure)?;
        let rows = statement
            .query_map([], |row| {
                Ok(Delivery {
                    id: row.get(0)?,
                    subscription_id: row.get(1)?,
                    body: row.get(2)?,
                    attempts: row.get(3)?,
                    next_attempt_ms: row.get(4)?,
                })
            })
            .map_err(failure)?;
        rows.collect::<Result<_, _>>().map_err(failure)
    }

    fn record_attempt(&self, subscription_id: &str, attempt: &Attempt) -> Result<(), StoreFailure> {
        let mut connection = lock(&self.connection);
        let transaction = connection.transaction().map_err(failure)?;
        transaction
            .execute(
                "INSERT INTO webhook_attempts \
                 (webhook_id, message_id, attempt, at, status, error, duration_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    subscription_id,
                    attempt.message_id,
                    attempt.attempt,
                    attempt.at,
                    attempt.status,
                    attempt.error,
                    attempt.duration_ms,
                ],
            )
            .map_err(failure)?;
        // Keep the latest RECENT_ATTEMPTS: forget everything before the oldest of them.
        let oldest_kept: Option<i64> = transaction
            .query_row(
                "SELECT seq FROM webhook_attempts WHERE webhook_id = ?1 \
                 ORDER BY seq DESC LIMIT 1 OFFSET ?2",
                params![subscription_id, RECENT_ATTEMPTS - 1],
                |row| row.get(0),
            )
            .optional()
            .map_err(failure)?;
        if let Some(oldest_kept) = oldest_kept {
            transaction
                .execute(
                    "DELETE FROM webhook_attempts WHERE webhook_id = ?1 AND seq < ?2",
                    params![subscription_id, oldest_kept],
                )
                .map_err(failure)?;
        }
        transaction.commit().map_err(failure)
    }

    fn attempts(&self, subscription_id: &str) -> Result<Vec<Attempt>, StoreFailure> {
        let connection = lock(&self.connection);
        let mut statement = connection
            .prepare(
                "SELECT message_id, attempt, at, status, error, duration_ms \
                 FROM webhook_attempts WHERE webhook_id = ?1 ORDER BY seq DESC LIMIT ?2",
            )
            .map_err(failure)?;
        let rows = statement
            .query_map(params![subscription_id, RECENT_ATTEMPTS], |row| {
                Ok(Attempt {
                    message_id: row.get(0)?,
                    attempt: row.get(1)?,
                    at: row.get(2)?,
                    status: row.get(3)?,
                    error: row.get(4)?,
                    duration_ms: row.get(5)?,
                })
            })
            .map_err(failure)?;
        rows.collect::<Result<_, _>>().map_err(failure)
    }
}
