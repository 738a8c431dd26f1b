//! Where jobs live: the `JobStore` trait and its in-memory implementation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use serde_json::Value;

use super::{Job, JobStatus};

/// A store operation that failed (I/O for a durable store; the memory store never fails).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job store: {}", self.0)
    }
}

impl std::error::Error for StoreError {}

/// A change of a job's status and the fields that come with it.
#[derive(Clone, Debug, PartialEq)]
pub struct JobChange {
    /// The new status.
    pub status: JobStatus,
    /// The artifact, for `completed`.
    pub result: Option<Value>,
    /// Why, for `failed`.
    pub error: Option<String>,
    /// Retries made so far, when it changed.
    pub retry_count: Option<u32>,
}

impl JobChange {
    /// A change of status alone.
    pub fn to(status: JobStatus) -> Self {
        JobChange {
            status,
            result: None,
            error: None,
            retry_count: None,
        }
    }
}

/// What an `update` did.
#[derive(Clone, Debug, PartialEq)]
pub enum Updated {
    /// The job was in an expected status and now holds the change.
    Applied(Box<Job>),
    /// The job was in this other status, and is unchanged.
    Refused(JobStatus),
    /// No job has that id.
    Missing,
}

/// Which of a user's jobs to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only jobs of this notebook.
    pub notebook_id: Option<String>,
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// Persists jobs; the worker and routes use only this trait, so a durable store can replace
/// the memory one. Methods are synchronous and must be quick (a local lookup or transaction).
pub trait JobStore: Send + Sync + 'static {
    /// Stores a new job (queued), or refuses it when the store is full.
    fn create(&self, job: Job) -> Result<(), StoreError>;
    /// The job with this id, whoever owns it.
    fn get(&self, job_id: &str) -> Result<Option<Job>, StoreError>;
    /// A user's jobs matching `filter`, newest first.
    fn list(&self, user_id: &str, filter: &JobFilter) -> Result<Vec<Job>, StoreError>;
    /// Atomically takes the oldest queued job and marks it running.
    fn claim_next(&self) -> Result<Option<Job>, StoreError>;
    /// Atomically applies `change` if the job's status is one of `expected`.
    fn update(
        &self,
        job_id: &str,
        expected: &[JobStatus],
        change: JobChange,
    ) -> Result<Updated, StoreError>;
    /// Ids of the jobs still queued, oldest first.
    fn queued_ids(&self) -> Result<Vec<String>, StoreError>;
    /// How many jobs are in each status.
    fn count_by_status(&self) -> Result<Vec<(JobStatus, usize)>, StoreError>;
    /// Makes the jobs that an earlier process left `running` (it died mid-attempt) runnable:
    /// each is queued again with the interrupted attempt counted as a retry, or `failed` if
    /// that exceeds `max_retries`. Returns the jobs it changed. Called before workers start.
    fn requeue_interrupted(&self, max_retries: u32) -> Result<Vec<Job>, StoreError>;
}

/// Keeps jobs in memory; they are gone when the process exits.
pub struct MemoryJobStore {
    /// Guards all jobs and the queue together, so claiming and updating are atomic. A std
    /// `Mutex`: no operation awaits or does I/O while holding it.
    state: Mutex<MemoryState>,
    max_jobs: usize,
}

#[derive(Default)]
struct MemoryState {
    jobs: HashMap<String, Job>,
    /// Ids of queued jobs, oldest first; cancelled ones are skipped when claimed.
    queue: VecDeque<String>,
    /// Ids in creation order, for eviction of the oldest finished jobs.
    created: VecDeque<String>,
}

impl MemoryJobStore {
    /// A store that keeps at most `max_jobs` jobs, forgetting the oldest finished ones first.
    pub fn new(max_jobs: usize) -> Self {
        MemoryJobStore {
            state: Mutex::new(MemoryState::default()),
            max_jobs: max_jobs.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        crate::panic::lock(&self.state)
    }
}

impl JobStore for MemoryJobStore {
    fn create(&self, job: Job) -> Result<(), StoreError> {
        let mut state = self.lock();
        if state.jobs.len() >= self.max_jobs {
            state.evict_oldest_finished();
        }
        if state.jobs.len() >= self.max_jobs {
            return Err(StoreError(format!(
                "full: {} unfinished jobs",
                self.max_jobs
            )));
        }
        state.queue.push_back(job.id.clone());
        state.created.push_back(job.id.clone());
        state.jobs.insert(job.id.clone(), job);
        Ok(())
    }

    fn get(&self, job_id: &str) -> Result<Option<Job>, StoreError> {
        Ok(self.lock().jobs.get(job_id).cloned())
    }

    fn list(&self, user_id: &str, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let state = self.lock();
        Ok(state
            .created
            .iter()
            .rev()
            .filter_map(|id| state.jobs.get(id))
            .filter(|job| job.user_id == user_id)
            .filter(|job| {
                filter
                    .notebook_id
                    .as_ref()
                    .is_none_or(|notebook| *notebook == job.notebook_id)
            })
            .filter(|job| filter.status.is_none_or(|status| status == job.status))
            .take(filter.limit)
            .cloned()
            .collect())
    }

    fn claim_next(&self) -> Result<Option<Job>, StoreError> {
        let mut state = self.lock();
        while let Some(id) = state.queue.pop_front() {
            if let Some(job) = state.jobs.get_mut(&id) {
                if job.status == JobStatus::Queued {
                    job.status = JobStatus::Running;
                    job.updated_at = crate::time::now_rfc3339();
                    return Ok(Some(job.clone()));
                }
            }
        }
        Ok(None)
    }

    fn update(
        &self,
        job_id: &str,
        expected: &[JobStatus],
        change: JobChange,
    ) -> Result<Updated, StoreError> {
        let mut state = self.lock();
        let Some(job) = state.jobs.get_mut(job_id) else {
            return Ok(Updated::Missing);
        };
        if !expected.contains(&job.status) {
            return Ok(Updated::Refused(job.status));
        }
        job.status = change.status;
        if change.result.is_some() {
            job.result = change.result;
        }
        if change.error.is_some() {
            job.error = change.error;
        }
        if let Some(retry_count) = change.retry_count {
            job.retry_count = retry_count;
        }
        job.updated_at = crate::time::now_rfc3339();
        if job.status.is_finished() {
            // The content (up to 100 KB) is needed only to run the job.
            job.content = String::new();
        }
        Ok(Updated::Applied(Box::new(job.clone())))
    }

    fn queued_ids(&self) -> Result<Vec<String>, StoreError> {
        let state = self.lock();
        let is_queued = |id: &&String| {
            state
                .jobs
                .get(*id)
                .is_some_and(|job| job.status == JobStatus::Queued)
        };
        Ok(state.queue.iter().filter(is_queued).cloned().collect())
    }

    fn count_by_status(&self) -> Result<Vec<(JobStatus, usize)>, StoreError> {
        let state = self.lock();
        let count = |status| {
            state
                .jobs
                .values()
                .filter(|job| job.status == status)
                .count()
        };
        Ok(JobStatus::ALL
            .into_iter()
            .map(|status| (status, count(status)))
            .collect())
    }

    fn requeue_interrupted(&self, _max_retries: u32) -> Result<Vec<Job>, StoreError> {
        // Every process starts with an empty memory store: nothing can have been interrupted.
        Ok(Vec::new())
    }
}

impl MemoryState {
    fn evict_oldest_finished(&mut self) {
        let Some(position) = self.created.iter().position(|id| {
            self.jobs
                .get(id)
                .is_some_and(|job| job.status.is_finished())
        }) else {
            return;
        };
        if let Some(id) = self.created.remove(position) {
            self.jobs.remove(&id);
        }
    }
}
