//! A `JobStore` in a SQLite file: jobs outlive the process, and the ones it left running are
//! requeued when the next one starts.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

use super::DatabaseError;
use crate::jobs::{
    ArtifactType, Job, JobChange, JobFilter, JobLimits, JobStatus, JobStore, StoreError, Updated,
};
use crate::panic::lock;

/// The columns [`job_from_row`] reads, in its order.
const JOB_COLUMNS: &str = "id, user_id, notebook_id, artifact_type, content, count, status, \
                           created_at, updated_at, result, error, retry_count";

/// Keeps jobs in a SQLite file (WAL mode), so they survive restarts and crashes. One server
/// process per file: at start it takes over every job left `running`.
pub struct SqliteJobStore {
    /// The connection and the job count behind one std `Mutex`: every call is one short local
    /// transaction and none awaits while holding it.
    state: Mutex<SqliteState>,
    limits: JobLimits,
}

struct SqliteState {
    connection: Connection,
    /// Rows in `jobs`, kept here because `count(*)` walks the whole table.
    job_count: usize,
    /// The rows' `size` in all, for the same reason.
    bytes: usize,
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Failed(error.to_string())
    }
}

impl SqliteJobStore {
    /// Opens (or creates) the store in the file at `path`; like the memory store it keeps
    /// within `limits`, forgetting the oldest finished jobs first.
    pub fn open(path: &Path, limits: JobLimits) -> Result<Self, DatabaseError> {
        let connection = super::open(path)?;
        let (job_count, bytes) = connection
            .query_row(
                "SELECT count(*), coalesce(sum(size), 0) FROM jobs",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(|error| DatabaseError {
                path: path.to_owned(),
                reason: error.to_string(),
            })?;
        Ok(SqliteJobStore {
            state: Mutex::new(SqliteState {
                connection,
                job_count,
                bytes,
            }),
            limits: JobLimits {
                max_jobs: limits.max_jobs.max(1),
                ..limits
            },
        })
    }

    fn lock(&self) -> MutexGuard<'_, SqliteState> {
        // A panic under the lock drops its transaction, which rolls back: the file is intact.
        lock(&self.state)
    }
}

impl JobStore for SqliteJobStore {
    fn create(&self, job: Job) -> Result<(), StoreError> {
        let mut state = self.lock();
        let SqliteState {
            connection,
            job_count,
            bytes,
        } = &mut *state;
        let limits = self.limits;
        let transaction = write(connection)?;
        let unfinished: usize = transaction
            .prepare_cached(
                "SELECT count(*) FROM jobs WHERE user_id = ?1 AND status IN ('queued', 'running')",
            )?
            .query_row([&job.user_id], |row| row.get(0))?;
        if unfinished >= limits.max_unfinished_per_user {
            return Err(StoreError::UserAtLimit(limits.max_unfinished_per_user));
        }
        let size = job.stored_bytes();
        let (mut count, mut total) = (*job_count, *bytes);
        while count >= limits.max_jobs || total.saturating_add(size) > limits.max_bytes {
            match evict_oldest_finished(&transaction, None)? {
                Some(evicted) => (count, total) = (count - 1, total - evicted),
                None => {
                    return Err(StoreError::Full(format!(
                        "{count} jobs of {total} bytes, none of them finished"
                    )))
                }
            }
        }
        transaction.execute(
            "INSERT INTO jobs (id, user_id, notebook_id, artifact_type, content, count, status, \
             created_at, updated_at, result, error, retry_count, size) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                job.id,
                job.user_id,
                job.notebook_id,
                job.artifact_type.as_str(),
                job.content,
                job.count,
                job.status.as_str(),
                job.created_at,
                job.updated_at,
                job.result.as_ref().map(|result| result.to_string()),
                job.error,
                job.retry_count,
                size,
            ],
        )?;
        transaction.commit()?;
        (*job_count, *bytes) = (count + 1, total + size);
        Ok(())
    }

    fn get(&self, job_id: &str) -> Result<Option<Job>, StoreError> {
        let state = self.lock();
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
        let job = state
            .connection
            .prepare_cached(&sql)?
            .query_row([job_id], job_from_row)
            .optional()?;
        Ok(job)
    }

    fn list(&self, user_id: &str, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let state = self.lock();
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE user_id = ?1 \
             AND (?2 IS NULL OR notebook_id = ?2) AND (?3 IS NULL OR status = ?3) \
             ORDER BY seq DESC LIMIT ?4"
        );
        let mut statement = state.connection.prepare_cached(&sql)?;
        let status = filter.status.map(JobStatus::as_str);
        let jobs = statement
            .query_map(
                params![user_id, filter.notebook_id, status, filter.limit],
                job_from_row,
            )?
            .collect::<rusqlite::Result<Vec<Job>>>()?;
        Ok(jobs)
    }

    fn claim_next(&self) -> Result<Option<Job>, StoreError> {
        let mut state = self.lock();
        let transaction = write(&mut state.connection)?;
        let sql = format!(
            "UPDATE jobs SET status = 'running', updated_at = ?1 WHERE seq = \
             (SELECT seq FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1) \
             RETURNING {JOB_COLUMNS}"
        );
        let job = transaction
            .prepare_cached(&sql)?
            .query_row([crate::time::now_rfc3339()], job_from_row)
            .optional()?;
        transaction.commit()?;
        Ok(job)
    }

    fn update(
        &self,
        job_id: &str,
        expected: &[JobStatus],
        change: JobChange,
    ) -> Result<Updated, StoreError> {
        let mut state = self.lock();
        let SqliteState {
            connection,
            job_count,
            bytes,
        } = &mut *state;
        let transaction = write(connection)?;
        let found = transaction
            .prepare_cached("SELECT status, size FROM jobs WHERE id = ?1")?
            .query_row([job_id], |row| {
                Ok((status_at(row, 0)?, row.get::<_, usize>(1)?))
            })
            .optional()?;
        let Some((status, size_before)) = found else {
            return Ok(Updated::Missing);
        };
        if !expected.contains(&status) {
            return Ok(Updated::Refused(status));
        }
        let sql = format!(
            "UPDATE jobs SET status = ?2, result = coalesce(?3, result), \
             error = coalesce(?4, error), retry_count = coalesce(?5, retry_count), \
             updated_at = ?6, content = CASE WHEN ?7 THEN '' ELSE content END \
             WHERE id = ?1 RETURNING {JOB_COLUMNS}"
        );
        let job = transaction.prepare_cached(&sql)?.query_row(
            params![
                job_id,
                change.status.as_str(),
                change.result.map(|result| result.to_string()),
                change.error,
                change.retry_count,
                crate::time::now_rfc3339(),
                // The content is needed only to run the job: a finished job drops it.
                change.status.is_finished(),
            ],
            job_from_row,
        )?;
        let size = job.stored_bytes();
        transaction.execute(
            "UPDATE jobs SET size = ?2 WHERE id = ?1",
            params![job_id, size],
        )?;
        let (mut count, mut total) = (*job_count, *bytes - size_before + size);
        // A large result may take the store past its budget: other finished jobs make room.
        while total > self.limits.max_bytes {
            match evict_oldest_finished(&transaction, Some(job_id))? {
                Some(evicted) => (count, total) = (count - 1, total - evicted),
                None => break,
            }
        }
        transaction.commit()?;
        (*job_count, *bytes) = (count, total);
        Ok(Updated::Applied(Box::new(job)))
    }

    fn queued_ids(&self) -> Result<Vec<String>, StoreError> {
        let state = self.lock();
        let mut statement = state
            .connection
            .prepare_cached("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq")?;
        let ids = statement
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(ids)
    }

    fn count_by_status(&self) -> Result<Vec<(JobStatus, usize)>, StoreError> {
        let state = self.lock();
        let mut statement = state
            .connection
            .prepare_cached("SELECT status, count(*) FROM jobs GROUP BY status")?;
        let counted = statement
            .query_map([], |row| Ok((status_at(row, 0)?, row.get::<_, usize>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(JobStatus::ALL
            .into_iter()
            .map(|status| {
                let count = counted
                    .iter()
                    .find(|(counted, _)| *counted == status)
                    .map_or(0, |(_, count)| *count);
                (status, count)
            })
            .collect())
    }

    fn requeue_interrupted(&self, max_retries: u32) -> Result<Vec<Job>, StoreError> {
        let mut state = self.lock();
        let transaction = write(&mut state.connection)?;
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'running' ORDER BY seq");
        let interrupted = transaction
            .prepare(&sql)?
            .query_map([], job_from_row)?
            .collect::<rusqlite::Result<Vec<Job>>>()?;
        let now = crate::time::now_rfc3339();
        let mut changed = Vec::with_capacity(interrupted.len());
        for mut job in interrupted {
            // The interrupted attempt counts: a job cannot crash the server forever.
            if job.retry_count >= max_retries {
                job.status = JobStatus::Failed;
                job.error = Some(format!(
                    "interrupted by a server restart during attempt {}, and no retries were left",
                    job.retry_count + 1
                ));
            } else {
                job.status = JobStatus::Queued;
                job.retry_count += 1;
            }
            job.updated_at = now.clone();
            transaction.execute(
                "UPDATE jobs SET status = ?2, error = ?3, retry_count = ?4, updated_at = ?5 \
                 WHERE id = ?1",
                params![
                    job.id,
                    job.status.as_str(),
                    job.error,
                    job.retry_count,
                    job.updated_at
                ],
            )?;
            changed.push(job);
        }
        transaction.commit()?;
        Ok(changed)
    }
}

/// Deletes the oldest finished job other than `keep`; returns its size, or `None` when there
/// is none to forget.
fn evict_oldest_finished(
    transaction: &Transaction<'_>,
    keep: Option<&str>,
) -> rusqlite::Result<Option<usize>> {
    transaction
        .prepare_cached(
            "DELETE FROM jobs WHERE seq = (SELECT seq FROM jobs \
             WHERE status IN ('completed', 'failed', 'cancelled') AND id IS NOT ?1 \
             ORDER BY seq LIMIT 1) RETURNING size",
        )?
        .query_row([keep], |row| row.get(0))
        .optional()
}

/// Starts a write transaction that takes the write lock at once, so its reads cannot be
/// invalidated by another connection's commit before it writes.
fn write(connection: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    connection.transaction_with_behavior(TransactionBehavior::Immediate)
}

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<Job> {
    let artifact_type: String = row.get(3)?;
    let artifact_type = ArtifactType::parse(&artifact_type)
        .ok_or_else(|| invalid(3, format!("unknown artifact type {artifact_type:?}")))?;
    let result = row
        .get::<_, Option<String>>(9)?
        .map(|text| serde_json::from_str(&text))
        .transpose()
        .map_err(|error| invalid(9, format!("result is not JSON: {error}")))?;
    Ok(Job {
        id: row.get(0)?,
        user_id: row.get(1)?,
        notebook_id: row.get(2)?,
        artifact_type,
        content: row.get(4)?,
        count: row.get(5)?,
        status: status_at(row, 6)?,
        created_at: row.get(7)?,
        updated_at: row.get(8)?,
        result,
        error: row.get(10)?,
        retry_count: row.get(11)?,
    })
}

fn status_at(row: &Row<'_>, index: usize) -> rusqlite::Result<JobStatus> {
    let status: String = row.get(index)?;
    JobStatus::parse(&status).ok_or_else(|| invalid(index, format!("unknown status {status:?}")))
}

fn invalid(index: usize, problem: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, Type::Text, problem.into())
}
