//! Where jobs live: the `JobStore` trait and its in-memory implementation.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use super::{Job, JobStatus};

/// Why a store operation did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// A new job does not fit: the store holds as many jobs, or bytes, as it may, and none
    /// of the finished ones it could forget makes room.
    Full(String),
    /// The user already has this many unfinished jobs, the most allowed.
    UserAtLimit(usize),
    /// The store could not do it (I/O for a durable store; the memory store never fails).
    Failed(String),
    /// The store is out of reach for now (a shared store's server is down): try again later.
    Unavailable(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Full(why) => write!(f, "job store is full: {why}"),
            StoreError::UserAtLimit(max) => write!(f, "the user has {max} unfinished jobs"),
            StoreError::Failed(why) => write!(f, "job store: {why}"),
            StoreError::Unavailable(why) => write!(f, "job store unreachable: {why}"),
        }
    }
}

/// How much a job store keeps. Finished jobs are forgotten, oldest first, to make room; a new
/// job that still does not fit is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobLimits {
    /// Jobs kept in all (`MAX_JOBS`).
    pub max_jobs: usize,
    /// Unfinished (queued or running) jobs one user may have (`MAX_JOBS_PER_USER`).
    pub max_unfinished_per_user: usize,
    /// Bytes kept in all, as [`Job::stored_bytes`] counts them (`JOB_STORE_MAX_BYTES`). A
    /// result stored when nothing finished is left to forget may go past it, by at most the
    /// unfinished jobs' results.
    pub max_bytes: usize,
}

impl JobLimits {
    /// At most `max_jobs` jobs, and no other bound.
    pub fn jobs(max_jobs: usize) -> Self {
        JobLimits {
            max_jobs,
            max_unfinished_per_user: usize::MAX,
            max_bytes: usize::MAX,
        }
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

/// What a worker listens to when other processes share its store: jobs they queue, cancels of
/// jobs this process runs, and when to look for jobs whose worker died.
pub struct SharedSignals {
    /// Notified when another process queued a job.
    pub queued: Arc<Notify>,
    /// Ids of jobs this process runs that another process cancelled: this process announces
    /// the cancel, so that nothing of the job follows its `artifact.cancelled`.
    pub cancels: mpsc::UnboundedReceiver<String>,
    /// How often to take over the jobs of dead workers (`requeue_interrupted`).
    pub takeover_every: Duration,
}

/// Persists jobs; the worker and routes use only this trait, so a durable store can replace
/// the memory one. Methods are synchronous and must be quick (a local lookup or transaction).
pub trait JobStore: Send + Sync + 'static {
    /// Stores a new job (queued), forgetting the oldest finished jobs to make room; refuses it
    /// (`UserAtLimit`, `Full`) when its owner has too many unfinished jobs or it cannot fit.
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
    /// Hands the cancel of a job to the process running it, when that is another process
    /// sharing the store; true when that process took over announcing it.
    fn forward_cancel(&self, _job_id: &str) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// The signals of a store that processes share, for the worker to take once; `None` for a
    /// store of one process. Such a store's `requeue_interrupted` may be called at any time:
    /// it takes over only jobs whose worker stopped renewing its claim.
    fn take_shared_signals(&self) -> Option<SharedSignals> {
        None
    }
}

/// Keeps jobs in memory; they are gone when the process exits.
pub struct MemoryJobStore {
    /// Guards all jobs and the queue together, so claiming and updating are atomic. A std
    /// `Mutex`: no operation awaits or does I/O while holding it.
    state: Mutex<MemoryState>,
    limits: JobLimits,
}

#[derive(Default)]
struct MemoryState {
    jobs: HashMap<String, Job>,
    /// The jobs' [`Job::stored_bytes`] in all.
    bytes: usize,
    /// Queued and running jobs, by owner; a user with none has no entry.
    unfinished: HashMap<String, usize>,
    /// Ids of queued jobs, oldest first; cancelled ones are skipped when claimed.
    queue: VecDeque<String>,
    /// Ids in creation order, for eviction of the oldest finished jobs.
    created: VecDeque<String>,
}

impl MemoryJobStore {
    /// A store within `limits`, forgetting the oldest finished jobs first.
    pub fn new(limits: JobLimits) -> Self {
        MemoryJobStore {
            state: Mutex::new(MemoryState::default()),
            limits: JobLimits {
                max_jobs: limits.max_jobs.max(1),
                ..limits
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemoryState> {
        crate::panic::lock(&self.state)
    }
}

impl JobStore for MemoryJobStore {
    fn create(&self, job: Job) -> Result<(), StoreError> {
        let mut state = self.lock();
        let limits = self.limits;
        if state.unfinished.get(&job.user_id).copied().unwrap_or(0)
            >= limits.max_unfinished_per_user
        {
            return Err(StoreError::UserAtLimit(limits.max_unfinished_per_user));
        }
        let size = job.stored_bytes();
        let fits = |state: &MemoryState| {
            state.jobs.len() < limits.max_jobs
                && state.bytes.saturating_add(size) <= limits.max_bytes
        };
        while !fits(&state) && state.evict_oldest_finished(None) {}
        if !fits(&state) {
            return Err(StoreError::Full(format!(
                "{} jobs of {} bytes, none of them finished",
                state.jobs.len(),
                state.bytes
            )));
        }
        state.bytes += size;
        *state.unfinished.entry(job.user_id.clone()).or_default() += 1;
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
        let state = &mut *state;
        let Some(job) = state.jobs.get_mut(job_id) else {
            return Ok(Updated::Missing);
        };
        if !expected.contains(&job.status) {
            return Ok(Updated::Refused(job.status));
        }
        let (size_before, was_finished) = (job.stored_bytes(), job.status.is_finished());
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
        let updated = Box::new(job.clone());
        state.bytes = state.bytes - size_before + updated.stored_bytes();
        if updated.status.is_finished() && !was_finished {
            state.finish(&updated.user_id);
        }
        // A large result may take the store past its budget: other finished jobs make room.
        while state.bytes > self.limits.max_bytes && state.evict_oldest_finished(Some(job_id)) {}
        Ok(Updated::Applied(updated))
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
    /// Forgets the oldest finished job other than `keep`; false when there is none.
    fn evict_oldest_finished(&mut self, keep: Option<&str>) -> bool {
        let Some(position) = self.created.iter().position(|id| {
            Some(id.as_str()) != keep
                && self
                    .jobs
                    .get(id)
                    .is_some_and(|job| job.status.is_finished())
        }) else {
            return false;
        };
        if let Some(job) = self
            .created
            .remove(position)
            .and_then(|id| self.jobs.remove(&id))
        {
            self.bytes -= job.stored_bytes();
        }
        true
    }

    /// Counts one of the user's jobs as no longer unfinished.
    fn finish(&mut self, user_id: &str) {
        if let Some(count) = self.unfinished.get_mut(user_id) {
            *count -= 1;
            if *count == 0 {
                self.unfinished.remove(user_id);
            }
        }
    }
}
