//! The background worker: plan, generate, validate (with repairs), retry; store, then publish.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::generator::{ArtifactGenerator, GenerationRequest};
use super::store::{JobChange, JobStore, SharedSignals, StoreError, Updated};
use super::{validator, Job, JobStatus};
use crate::events::{EventBus, EventType};
use crate::log;
use crate::panic::catch_unwind;

/// Repairs tried on invalid output before an attempt fails; the seed's error text names it.
pub const MAX_REPAIR_ATTEMPTS: usize = 2;
/// First pause before trying again to store a finished job's outcome.
const FIRST_STORE_RETRY: Duration = Duration::from_millis(50);
/// Longest pause between attempts to store a finished job's outcome while the store is out of
/// reach; the outcome is kept until it is stored.
const STORE_RETRY_MAX: Duration = Duration::from_secs(2);

/// Pause before publishing a job's final event again after the bus refused it (Redis
/// unreachable): from the first delay, doubling up to the last.
const REPUBLISH_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(200), Duration::from_secs(5));

/// How the worker runs jobs.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Jobs processed at once (`WORKERS`).
    pub workers: usize,
    /// Retries after a failed first attempt (`MAX_RETRIES`).
    pub max_retries: u32,
    /// Pause before a retry.
    pub retry_backoff: Duration,
    /// Time one attempt may take before it counts as failed (`JOB_TIMEOUT_SECS`).
    pub attempt_timeout: Duration,
}

/// What a cancel request did.
#[derive(Clone, Debug, PartialEq)]
pub enum CancelOutcome {
    /// The job was queued or running and is now cancelled.
    Cancelled(Box<Job>),
    /// The job had already finished with this status.
    AlreadyFinished(JobStatus),
    /// No such job for this user.
    NotFound,
}

/// Takes queued jobs from the store and runs them on `workers` tasks.
pub struct ArtifactWorker {
    store: Arc<dyn JobStore>,
    generator: Arc<dyn ArtifactGenerator>,
    bus: Arc<EventBus>,
    config: WorkerConfig,
    /// Wakes an idle task when a job is queued (`notify_one`) or the worker stops (`notify_waiters`).
    wake: Notify,
    stopping: AtomicBool,
    /// Cancel signals of running jobs, by job id. A std `Mutex`: only map edits happen under it.
    running: Mutex<HashMap<String, Arc<Cancellation>>>,
}

/// How a cancel reaches a running job: the flag stops its events even where the job's
/// steps run without yielding; the notify ends its wait.
#[derive(Default)]
struct Cancellation {
    requested: AtomicBool,
    signal: Notify,
    /// Held while the job publishes and while a cancel sets the flag and publishes
    /// `artifact.cancelled`, so no event of the job can follow that one.
    publishing: tokio::sync::Mutex<()>,
}

impl Cancellation {
    fn cancel(&self) {
        self.requested.store(true, Ordering::SeqCst);
        // `notify_one` keeps a permit when nobody waits yet, so the job still sees it.
        self.signal.notify_one();
    }

    fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Waits until the job is not publishing, cancels it, and returns the publishing turn:
    /// while the caller holds it and publishes `artifact.cancelled`, no other event of the job
    /// can go out, and none goes out after.
    async fn cancel_in_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        let turn = self.publishing.lock().await;
        self.cancel();
        turn
    }
}

impl ArtifactWorker {
    /// A worker over `store` using `generator`, publishing lifecycle events on `bus`.
    pub fn new(
        store: Arc<dyn JobStore>,
        generator: Arc<dyn ArtifactGenerator>,
        bus: Arc<EventBus>,
        config: WorkerConfig,
    ) -> Arc<Self> {
        Arc::new(ArtifactWorker {
            store,
            generator,
            bus,
            config,
            wake: Notify::new(),
            stopping: AtomicBool::new(false),
            running: Mutex::new(HashMap::new()),
        })
    }

    /// The store the worker reads and updates.
    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    /// Queues `job` and wakes a task for it.
    pub fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.store.create(job)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Cancels the user's job if it is queued or running, and publishes `artifact.cancelled`.
    pub async fn cancel(&self, user_id: &str, job_id: &str) -> Result<CancelOutcome, StoreError> {
        match self.store.get(job_id)? {
            Some(job) if job.user_id == user_id => {}
            _ => return Ok(CancelOutcome::NotFound),
        }
        let expected = [JobStatus::Queued, JobStatus::Running];
        match self
            .store
            .update(job_id, &expected, JobChange::to(JobStatus::Cancelled))?
        {
            Updated::Applied(job) => {
                let cancellation = self.lock_running().get(job_id).cloned();
                if cancellation.is_none() {
                    match self.store.forward_cancel(job_id) {
                        Ok(true) => {
                            log::info!("job {job_id} cancelled; its process announces it");
                            return Ok(CancelOutcome::Cancelled(job));
                        }
                        Ok(false) => {}
                        // Cancelled, but its process may not know: announced here, once.
                        Err(error) => log::warning!(
                            "job {job_id} cancelled, but its process was not told ({error})"
                        ),
                    }
                }
                let _turn = match &cancellation {
                    Some(cancellation) => Some(cancellation.cancel_in_turn().await),
                    None => None,
                };
                log::info!("job {job_id} cancelled");
                self.publish(EventType::CANCELLED, cancelled_event_data(&job))
                    .await;
                Ok(CancelOutcome::Cancelled(job))
            }
            Updated::Refused(status) => Ok(CancelOutcome::AlreadyFinished(status)),
            Updated::Missing => Ok(CancelOutcome::NotFound),
        }
    }

    /// Takes over the jobs an earlier process left running, then starts the worker tasks; they
    /// run until [`ArtifactWorker::stop`]. With a store that processes share, also follows the
    /// jobs queued and cancelled elsewhere, and takes over those of dead workers.
    pub fn start(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        let failed = self.take_over_interrupted("a restart");
        if !failed.is_empty() {
            let worker = self.clone();
            tasks.push(tokio::spawn(async move {
                for job in failed {
                    worker
                        .publish(EventType::FAILED, failed_event_data(&job))
                        .await;
                }
            }));
        }
        if let Some(signals) = self.store.take_shared_signals() {
            // Not among the tasks a shutdown waits for: it runs no job.
            tokio::spawn(self.clone().follow_shared(signals));
        }
        tasks
            .extend((0..self.config.workers.max(1)).map(|_| tokio::spawn(self.clone().run_task())));
        tasks
    }

    /// Requeues (or fails, when its retries are spent) each job whose worker is gone, and
    /// returns the failed ones, to be announced.
    fn take_over_interrupted(&self, cause: &str) -> Vec<Job> {
        match self.store.requeue_interrupted(self.config.max_retries) {
            Ok(interrupted) => {
                for job in &interrupted {
                    log::warning!(
                        "job {} was interrupted by {cause}: now {} (retry {})",
                        job.id,
                        job.status.as_str(),
                        job.retry_count
                    );
                }
                interrupted
                    .into_iter()
                    .filter(|job| job.status == JobStatus::Failed)
                    .collect()
            }
            // The outage is logged where it starts; this runs every few seconds meanwhile.
            Err(error @ StoreError::Unavailable(_)) => {
                log::debug!("cannot look for interrupted jobs: {error}");
                Vec::new()
            }
            Err(error) => {
                log::error!("cannot requeue interrupted jobs: {error}");
                Vec::new()
            }
        }
    }

    /// Follows a shared store until the worker stops: wakes idle tasks for jobs queued
    /// elsewhere, announces cancels made elsewhere, and takes over the jobs of dead workers.
    async fn follow_shared(self: Arc<Self>, mut signals: SharedSignals) {
        let mut takeover = tokio::time::interval(signals.takeover_every);
        takeover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.stopping.load(Ordering::SeqCst) {
            tokio::select! {
                () = signals.queued.notified() => self.wake.notify_waiters(),
                Some(job_id) = signals.cancels.recv() => self.announce_cancel(&job_id).await,
                _ = takeover.tick() => {
                    for job in self.take_over_interrupted("the death of its worker") {
                        self.publish(EventType::FAILED, failed_event_data(&job)).await;
                    }
                    // Also catches a notification missed while the store was out of reach.
                    self.wake.notify_waiters();
                }
            }
        }
    }

    /// Announces the cancel, made by another process, of a job this process claimed: stops it
    /// as a local cancel does and publishes `artifact.cancelled`, after every event of the job.
    async fn announce_cancel(&self, job_id: &str) {
        let cancellation = self.lock_running().get(job_id).cloned();
        let _turn = match &cancellation {
            Some(cancellation) => Some(cancellation.cancel_in_turn().await),
            None => None,
        };
        match self.store.get(job_id) {
            Ok(Some(job)) if job.status == JobStatus::Cancelled => {
                log::info!("job {job_id} cancelled by another process");
                self.publish(EventType::CANCELLED, cancelled_event_data(&job))
                    .await;
            }
            Ok(_) => log::warning!("job {job_id}: a cancel arrived, but it is not cancelled"),
            Err(error) => log::error!("cannot announce the cancel of job {job_id}: {error}"),
        }
    }

    /// Stops taking new jobs; each task finishes the job it is running, then exits.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    async fn run_task(self: Arc<Self>) {
        loop {
            // Registered before checking for work, so a wake-up in between is not lost.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            match self.store.claim_next() {
                Ok(Some(job)) => self.process_isolated(job).await,
                Ok(None) => woken.await,
                Err(error) => {
                    log::error!("cannot claim a job: {error}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Runs one job; a panic outside the attempts still leaves the job failed, not running.
    async fn process_isolated(&self, job: Job) {
        let job_id = job.id.clone();
        if let Err(panic) = catch_unwind(self.process(job)).await {
            log::error!("worker panicked on job {job_id}: {panic}");
            self.lock_running().remove(&job_id);
            let change = JobChange {
                error: Some("internal error in the worker".to_owned()),
                ..JobChange::to(JobStatus::Failed)
            };
            match self.store.update(&job_id, &[JobStatus::Running], change) {
                Ok(Updated::Applied(stored)) => {
                    self.publish(EventType::FAILED, failed_event_data(&stored))
                        .await;
                }
                Ok(_) => {}
                Err(error) => log::error!("cannot mark job {job_id} failed: {error}"),
            }
        }
    }

    async fn process(&self, job: Job) {
        log::info!("processing job {} ({})", job.id, job.artifact_type.as_str());
        let cancellation = Arc::new(Cancellation::default());
        self.lock_running()
            .insert(job.id.clone(), cancellation.clone());
        // A cancel between claiming the job and registering it above found nothing to signal.
        if !matches!(self.store.get(&job.id), Ok(Some(stored)) if stored.status == JobStatus::Running)
        {
            self.lock_running().remove(&job.id);
            log::info!("job {} stopped: cancelled before it started", job.id);
            return;
        }
        let mut started = job.event_data();
        started["status"] = json!(JobStatus::Running.as_str());
        self.publish_unless_cancelled(&job.id, EventType::STARTED, started)
            .await;
        let outcome = tokio::select! {
            outcome = self.run_attempts(&job) => Some(outcome),
            () = cancellation.signal.notified() => None,
        };
        self.lock_running().remove(&job.id);
        let Some((outcome, retry_count)) = outcome else {
            log::info!("job {} stopped: cancelled while running", job.id);
            return;
        };
        let (change, event_type) = match outcome {
            Ok(result) => (
                JobChange {
                    result: Some(result),
                    retry_count: Some(retry_count),
                    ..JobChange::to(JobStatus::Completed)
                },
                EventType::COMPLETED,
            ),
            Err(error) => (
                JobChange {
                    error: Some(error),
                    retry_count: Some(retry_count),
                    ..JobChange::to(JobStatus::Failed)
                },
                EventType::FAILED,
            ),
        };
        // Store first: a client that reads the job on receiving the event sees the final status.
        let stored = match self.store_outcome(&job.id, change).await {
            Ok(Updated::Applied(stored)) => stored,
            Ok(other) => {
                log::info!("job {} not finished by the worker: {other:?}", job.id);
                return;
            }
            Err(error) => {
                log::error!("cannot store the outcome of job {}: {error}", job.id);
                return;
            }
        };
        let mut data = stored.event_data();
        match stored.status {
            JobStatus::Completed => {
                log::info!("job {} completed", stored.id);
                data["result"] = stored.result.unwrap_or(Value::Null);
            }
            _ => {
                log::warning!(
                    "job {} failed after {} retries: {}",
                    stored.id,
                    stored.retry_count,
                    stored.error.as_deref().unwrap_or_default()
                );
                data = failed_event_data(&stored);
            }
        }
        self.publish(event_type, data).await;
    }

    /// Stores a finished job's outcome; while the store is out of reach, keeps it and tries
    /// again, so an outage delays the outcome but does not lose it.
    async fn store_outcome(&self, job_id: &str, change: JobChange) -> Result<Updated, StoreError> {
        let mut pause = FIRST_STORE_RETRY;
        loop {
            match self
                .store
                .update(job_id, &[JobStatus::Running], change.clone())
            {
                Err(StoreError::Unavailable(why)) => {
                    if pause == FIRST_STORE_RETRY {
                        log::warning!(
                            "job {job_id}: cannot store its outcome yet ({why}); keeping it until the store is back"
                        );
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(STORE_RETRY_MAX);
                }
                stored => {
                    if pause > FIRST_STORE_RETRY {
                        log::info!("job {job_id}: its outcome is stored, the store is back");
                    }
                    return stored;
                }
            }
        }
    }

    /// Runs attempts until one succeeds or retries run out; returns the outcome and retries made
    /// (counting those of an earlier process, so a restart does not renew the budget).
    async fn run_attempts(&self, job: &Job) -> (Result<Value, String>, u32) {
        let request = job.generation_request();
        let mut retries = job.retry_count;
        loop {
            let attempt = catch_unwind(self.attempt(job, &request));
            let error = match tokio::time::timeout(self.config.attempt_timeout, attempt).await {
                Ok(Ok(Ok(result))) => return (Ok(result), retries),
                Ok(Ok(Err(error))) => error,
                Ok(Err(panic)) => format!("the generator panicked: {panic}"),
                Err(_) => format!(
                    "the attempt timed out after {:?}",
                    self.config.attempt_timeout
                ),
            };
            log::warning!("job {} attempt {} failed: {error}", job.id, retries + 1);
            if retries >= self.config.max_retries {
                return (Err(error), retries);
            }
            retries += 1;
            let change = JobChange {
                retry_count: Some(retries),
                ..JobChange::to(JobStatus::Running)
            };
            if let Err(error) = self.store.update(&job.id, &[JobStatus::Running], change) {
                log::error!("cannot record retry {retries} of job {}: {error}", job.id);
            }
            tokio::time::sleep(self.config.retry_backoff).await;
        }
    }

    /// One attempt: plan, generate, then validate with up to two repairs.
    async fn attempt(&self, job: &Job, request: &GenerationRequest) -> Result<Value, String> {
        let plan = self
            .generator
            .plan(request)
            .await
            .map_err(|error| error.to_string())?;
        log::info!("job {}: plan created", job.id);
        self.progress(job, 20, "planned").await;
        let mut output = self
            .generator
            .generate(request, &plan)
            .await
            .map_err(|error| error.to_string())?;
        log::info!("job {}: generated", job.id);
        self.progress(job, 60, "generated").await;
        let mut repairs = 0;
        loop {
            match validator::validate(request, &output) {
                Ok(()) => {
                    log::info!("job {}: validation passed", job.id);
                    self.progress(job, 90, "validated").await;
                    return Ok(output);
                }
                Err(errors) if repairs < MAX_REPAIR_ATTEMPTS => {
                    repairs += 1;
                    log::info!(
                        "job {}: validation failed, repair {repairs}: {}",
                        job.id,
                        errors.join("; ")
                    );
                    output = self
                        .generator
                        .repair(request, &plan, &output, &errors)
                        .await
                        .map_err(|error| error.to_string())?;
                }
                Err(errors) => {
                    log::info!("job {}: validation failed: {}", job.id, errors.join("; "));
                    return Err(format!(
                        "Validation failed after {MAX_REPAIR_ATTEMPTS} repair attempts: {}",
                        validator::failure_reason(request, &errors)
                    ));
                }
            }
        }
    }

    async fn progress(&self, job: &Job, percent: u8, stage: &str) {
        let mut data = job.event_data();
        data["status"] = json!(JobStatus::Running.as_str());
        data["progress"] = json!(percent);
        data["stage"] = json!(stage);
        self.publish_unless_cancelled(&job.id, EventType::PROGRESS, data)
            .await;
    }

    /// Publishes an event of a running job, unless the job was cancelled meanwhile.
    async fn publish_unless_cancelled(&self, job_id: &str, event_type: EventType, data: Value) {
        let Some(cancellation) = self.lock_running().get(job_id).cloned() else {
            return;
        };
        let _turn = cancellation.publishing.lock().await;
        if !cancellation.is_requested() {
            self.publish(event_type, data).await;
        }
    }

    /// Publishes a job's event. A final one (completed, failed, cancelled) that the bus
    /// refuses (Redis unreachable, no durable outbox) is published again, in a task of its
    /// own, until it is taken: its status is stored, so the event is never dropped. A started
    /// or progress event is not: the next event of the job supersedes it.
    async fn publish(&self, event_type: EventType, data: Value) {
        let job_id = data["job_id"].as_str().unwrap_or_default().to_owned();
        let final_event = [
            EventType::COMPLETED,
            EventType::FAILED,
            EventType::CANCELLED,
        ]
        .contains(&event_type);
        let retained = final_event.then(|| data.clone());
        match (
            self.bus.try_publish(&event_type, data.into()).await,
            retained,
        ) {
            (Ok(_), _) => log::info!("job {job_id}: published {event_type}"),
            (Err(error), None) => {
                log::warning!("job {job_id}: {event_type} not published: {error}");
            }
            (Err(error), Some(data)) => {
                log::warning!("job {job_id}: {error}; publishing it again until it is taken");
                tokio::spawn(publish_until_taken(self.bus.clone(), event_type, data));
            }
        }
    }

    fn lock_running(&self) -> MutexGuard<'_, HashMap<String, Arc<Cancellation>>> {
        crate::panic::lock(&self.running)
    }
}

/// Publishes `data` again, with backoff, until the bus takes it.
async fn publish_until_taken(bus: Arc<EventBus>, event_type: EventType, data: Value) {
    let job_id = data["job_id"].as_str().unwrap_or_default().to_owned();
    let mut backoff = REPUBLISH_BACKOFF.0;
    loop {
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(REPUBLISH_BACKOFF.1);
        match bus.try_publish(&event_type, data.clone().into()).await {
            Ok(_) => {
                log::info!("job {job_id}: published {event_type} at last");
                return;
            }
            Err(error) => log::debug!("job {job_id}: still not published: {error}"),
        }
    }
}

/// A `cancelled` job's event: its base fields, with the status it now has.
fn cancelled_event_data(job: &Job) -> Value {
    let mut data = job.event_data();
    data["status"] = json!(JobStatus::Cancelled.as_str());
    data
}

/// A `failed` job's event: its base fields, `error` and `retry_count`.
fn failed_event_data(job: &Job) -> Value {
    let mut data = job.event_data();
    data["error"] = json!(job.error.as_deref().unwrap_or_default());
    data["retry_count"] = json!(job.retry_count);
    data
}
