//! Jobs across processes: `RedisJobStore`, the `JobStore` that every process sharing a Redis
//! (and a `REDIS_STREAM`) shares, so any process answers for any job and any idle worker takes
//! the next one.
//!
//! # Keys
//!
//! Under the prefix `<REDIS_STREAM>:jobs`: `:job:<id>`, one hash per job (its fields, plus
//! `seq`, its creation number; `bytes`, its size against the budget; `worker`, the consumer
//! that claimed it; `entry`, its queue entry); `:queue`, the stream of queued jobs, read by the
//! consumer group `workers`; the sorted sets `:all`, `:queued`, `:finished` (by `seq`, for
//! eviction) and `:expiry` (by finishing time, for the retention), and `:user:<id>` (by `seq`,
//! for listing); the hashes `:unfinished` (per user) and `:counts` (per status); `:bytes`
//! and `:seq`. Every change is one call of the script in `redis_jobs.lua`, so it is atomic.
//!
//! # Claims and takeover
//!
//! A worker claims with `XREADGROUP` (the entry joins its consumer's pending list) and the
//! final status acknowledges it (`XACK`). While the job runs, a thread of the store renews the
//! claim (`XCLAIM … JUSTID` resets its idle time) every third of `JOB_CLAIM_TIMEOUT_SECS`, so
//! a slow worker keeps its job. An entry idle for longer belongs to a dead process:
//! `requeue_interrupted` takes it over with `XAUTOCLAIM` and queues the job again with one
//! more retry, or fails it when its retries are spent. A worker whose claim was taken over
//! cannot store an outcome: an update from the claiming process requires it to still hold
//! the claim.
//!
//! # Control messages
//!
//! Each process subscribes to `<prefix>:queued` (a job was queued: idle workers look) and to
//! `<prefix>:control:<consumer>` (a job it runs was cancelled elsewhere: it stops the job and
//! announces the cancel, so no event of the job follows `artifact.cancelled`).
//!
//! # Outages
//!
//! Commands go over one connection with a timeout, checked with a `PING` after it has been idle
//! (a restarted Redis closed it). When Redis is unreachable, operations fail with
//! `StoreError::Unavailable` (503 for requests) and a reconnect is tried at most every
//! `RECONNECT_EVERY`; the worker keeps a finished job's outcome until it can store it. A
//! command whose reply is lost may have run: an update sent again is then found made (each
//! change carries a token, kept with the job), but a `generate` answered 503 may have queued
//! its job.
//!
//! # Locks
//!
//! `connection`, `script_sha` and `claimed` are std mutexes, never held across an `.await`;
//! `connection` is held for a round trip to Redis (two when the script is loaded), and the
//! others only inside it, for a copy.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::{Client, Connection, RedisError, RedisResult};
use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use crate::config::RedisSettings;
use crate::jobs::{
    ArtifactType, Job, JobChange, JobFilter, JobLimits, JobStatus, JobStore, SharedSignals,
    StoreError, Updated,
};
use crate::log;
use crate::panic::lock;

/// Every operation on the jobs' keys; see the module documentation.
const SCRIPT: &str = include_str!("redis_jobs.lua");
/// Time allowed to connect, and for one command to answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an operation may try to reconnect while Redis is unreachable; in between,
/// operations fail at once rather than each wait for a connect timeout.
const RECONNECT_EVERY: Duration = Duration::from_millis(250);
/// Idle time after which the command connection is checked (`PING`) before it carries a
/// command: a Redis restarted meanwhile closed it, and a command sent on it would fail
/// without having run, where a failed check costs nothing but a reconnect.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Jobs read per round trip when listing.
const LIST_BATCH: isize = 50;

/// The shared job store; see the module documentation.
pub struct RedisJobStore {
    shared: Arc<Shared>,
    /// The worker's signals, until it takes them.
    signals: Mutex<Option<SharedSignals>>,
}

/// The connection operations go over.
struct CommandConnection {
    /// `None` after a failure, until a reconnect.
    open: Option<Connection>,
    /// When a reconnect was last tried.
    last_try: Option<Instant>,
    /// When it was last (re)connected: takeovers wait a claim timeout after it.
    since: Instant,
    /// When it last answered: after `IDLE_CHECK`, it is checked before a command is sent.
    used: Instant,
}

/// What the store and its renewing thread share.
struct Shared {
    client: Client,
    prefix: String,
    /// This process's consumer name in the group, and the `worker` of the jobs it claims.
    consumer: String,
    limits: JobLimits,
    claim_timeout: Duration,
    retention: Duration,
    /// The command connection and its state.
    connection: Mutex<CommandConnection>,
    /// The script's SHA1 once Redis has it (`SCRIPT LOAD`); empty before.
    script_sha: Mutex<String>,
    /// Jobs this process claimed and has not finished: the claims to renew.
    claimed: Mutex<HashSet<String>>,
    /// Changes whose reply was lost, by job, with the token they were sent with: the same
    /// change sent again carries the same token, so it is found made rather than refused.
    unsure: Mutex<HashMap<String, (JobChange, String)>>,
    /// Set when the store is dropped, to end its thread.
    closed: AtomicBool,
}

impl RedisJobStore {
    /// Connects to the Redis of `settings` and starts the thread that renews this process's
    /// claims and listens to the control channels. Fails if Redis is unreachable.
    pub fn open(
        settings: &RedisSettings,
        limits: JobLimits,
        claim_timeout: Duration,
        retention: Duration,
    ) -> Result<Self, String> {
        let client = super::redis_relay::client(settings)?;
        let connection = connect(&client).map_err(|error| {
            format!("Redis at {} is unreachable: {error}", settings.shown_url())
        })?;
        let shared = Arc::new(Shared {
            client,
            prefix: format!("{}:jobs", settings.stream_key),
            consumer: crate::random::hex_token(8),
            limits: JobLimits {
                max_jobs: limits.max_jobs.max(1),
                ..limits
            },
            claim_timeout,
            retention,
            connection: Mutex::new(CommandConnection {
                open: Some(connection),
                last_try: None,
                since: Instant::now(),
                used: Instant::now(),
            }),
            script_sha: Mutex::new(String::new()),
            claimed: Mutex::new(HashSet::new()),
            unsure: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        let queued = Arc::new(Notify::new());
        let (cancel_sender, cancels) = mpsc::unbounded_channel();
        let listener = Listener {
            shared: shared.clone(),
            queued: queued.clone(),
            cancels: cancel_sender,
        };
        std::thread::Builder::new()
            .name("redis-jobs".to_owned())
            .spawn(move || listener.run())
            .map_err(|error| format!("cannot start the Redis job thread: {error}"))?;
        Ok(RedisJobStore {
            shared,
            signals: Mutex::new(Some(SharedSignals {
                queued,
                cancels,
                // Often enough that a dead worker's job is taken over soon after its claim
                // times out.
                takeover_every: (claim_timeout / 4).max(Duration::from_millis(100)),
            })),
        })
    }
}

impl Drop for RedisJobStore {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
    }
}

impl JobStore for RedisJobStore {
    fn create(&self, job: Job) -> Result<(), StoreError> {
        let shared = &self.shared;
        let mut args: Vec<String> = vec![
            crate::time::unix_millis().to_string(),
            millis(shared.retention),
            shared.limits.max_unfinished_per_user.to_string(),
            shared.limits.max_jobs.to_string(),
            shared.limits.max_bytes.to_string(),
            job.stored_bytes().to_string(),
            job.id.clone(),
            job.user_id.clone(),
        ];
        for (field, value) in job_fields(&job) {
            args.push(field.to_owned());
            args.push(value);
        }
        let reply: Vec<String> = shared.script("create", &args)?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            Some("user_at_limit") => Err(StoreError::UserAtLimit(
                shared.limits.max_unfinished_per_user,
            )),
            Some("full") => Err(StoreError::Full(format!(
                "{} jobs of {} bytes, none of them finished",
                reply.get(1).map_or("?", String::as_str),
                reply.get(2).map_or("?", String::as_str)
            ))),
            _ => Err(unexpected(&reply)),
        }
    }

    fn get(&self, job_id: &str) -> Result<Option<Job>, StoreError> {
        let key = self.shared.job_key(job_id);
        let fields: Vec<String> = self
            .shared
            .run(|connection| redis::cmd("HGETALL").arg(&key).query(connection))?;
        if fields.is_empty() {
            return Ok(None);
        }
        job_from_fields(&fields).map(Some)
    }

    fn list(&self, user_id: &str, filter: &JobFilter) -> Result<Vec<Job>, StoreError> {
        let shared = &self.shared;
        let index = format!("{}:user:{user_id}", shared.prefix);
        let mut jobs = Vec::new();
        let mut start = 0;
        while jobs.len() < filter.limit {
            let batch: Vec<Vec<String>> = shared.run(|connection| {
                let ids: Vec<String> = redis::cmd("ZREVRANGE")
                    .arg(&index)
                    .arg(start)
                    .arg(start + LIST_BATCH - 1)
                    .query(connection)?;
                if ids.is_empty() {
                    // Redis refuses an empty pipeline.
                    return Ok(Vec::new());
                }
                let mut pipe = redis::pipe();
                for id in &ids {
                    pipe.cmd("HGETALL").arg(shared.job_key(id));
                }
                pipe.query(connection)
            })?;
            let read = batch.len();
            for fields in batch.iter().filter(|fields| !fields.is_empty()) {
                let job = job_from_fields(fields)?;
                let wanted = filter
                    .notebook_id
                    .as_ref()
                    .is_none_or(|notebook| *notebook == job.notebook_id)
                    && filter.status.is_none_or(|status| status == job.status);
                if wanted && jobs.len() < filter.limit {
                    jobs.push(job);
                }
            }
            if read < LIST_BATCH as usize {
                break;
            }
            start += LIST_BATCH;
        }
        Ok(jobs)
    }

    fn claim_next(&self) -> Result<Option<Job>, StoreError> {
        let shared = &self.shared;
        let args = [shared.consumer.clone(), crate::time::now_rfc3339()];
        let fields: Option<Vec<String>> = shared.script("claim", &args)?;
        let Some(fields) = fields else {
            return Ok(None);
        };
        let job = job_from_fields(&fields)?;
        lock(&shared.claimed).insert(job.id.clone());
        Ok(Some(job))
    }

    fn update(
        &self,
        job_id: &str,
        expected: &[JobStatus],
        change: JobChange,
    ) -> Result<Updated, StoreError> {
        let shared = &self.shared;
        // A change this process makes to a job it claimed, other than a cancel (which its
        // owner may make anywhere), needs the claim still to be this process's.
        let claimant =
            if change.status != JobStatus::Cancelled && lock(&shared.claimed).contains(job_id) {
                shared.consumer.clone()
            } else {
                String::new()
            };
        let token = match lock(&shared.unsure).get(job_id) {
            Some((sent, token)) if *sent == change => token.clone(),
            _ => crate::random::hex_token(8),
        };
        let expected: Vec<&str> = expected.iter().map(|status| status.as_str()).collect();
        let args = [
            job_id.to_owned(),
            claimant,
            crate::time::now_rfc3339(),
            crate::time::unix_millis().to_string(),
            shared.limits.max_bytes.to_string(),
            crate::jobs::JOB_OVERHEAD_BYTES.to_string(),
            change.status.as_str().to_owned(),
            expected.join(","),
            flag(change.result.is_some()),
            change
                .result
                .as_ref()
                .map_or(String::new(), Value::to_string),
            change
                .result
                .as_ref()
                .map_or(0, crate::jobs::json_bytes)
                .to_string(),
            flag(change.error.is_some()),
            change.error.clone().unwrap_or_default(),
            change
                .retry_count
                .map_or(String::new(), |retries| retries.to_string()),
            token.clone(),
        ];
        let reply: Vec<String> = match shared.script("update", &args) {
            Err(error @ StoreError::Unavailable(_)) => {
                lock(&shared.unsure).insert(job_id.to_owned(), (change, token));
                return Err(error);
            }
            reply => {
                lock(&shared.unsure).remove(job_id);
                reply?
            }
        };
        let updated = match reply.first().map(String::as_str) {
            Some("applied") => Updated::Applied(Box::new(job_from_fields(&reply[1..])?)),
            Some("refused" | "lost") => Updated::Refused(parse_status(reply.get(1))?),
            Some("missing") => Updated::Missing,
            _ => return Err(unexpected(&reply)),
        };
        let done = match &updated {
            Updated::Applied(job) => job.status.is_finished(),
            Updated::Refused(_) => reply[0] == "lost" || change.status.is_finished(),
            Updated::Missing => true,
        };
        if done {
            lock(&shared.claimed).remove(job_id);
        }
        Ok(updated)
    }

    fn queued_ids(&self) -> Result<Vec<String>, StoreError> {
        let key = format!("{}:queued", self.shared.prefix);
        self.shared.run(|connection| {
            redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query(connection)
        })
    }

    fn count_by_status(&self) -> Result<Vec<(JobStatus, usize)>, StoreError> {
        let key = format!("{}:counts", self.shared.prefix);
        let counts: Vec<Option<usize>> = self.shared.run(|connection| {
            let mut command = redis::cmd("HMGET");
            command.arg(&key);
            for status in JobStatus::ALL {
                command.arg(status.as_str());
            }
            command.query(connection)
        })?;
        Ok(JobStatus::ALL
            .into_iter()
            .zip(counts)
            .map(|(status, count)| (status, count.unwrap_or(0)))
            .collect())
    }

    fn requeue_interrupted(&self, max_retries: u32) -> Result<Vec<Job>, StoreError> {
        let shared = &self.shared;
        let args = [
            shared.consumer.clone(),
            // Empty: only the retention sweep.
            if shared.may_take_over() {
                millis(shared.claim_timeout)
            } else {
                String::new()
            },
            max_retries.to_string(),
            crate::time::now_rfc3339(),
            crate::time::unix_millis().to_string(),
            millis(shared.retention),
            crate::jobs::JOB_OVERHEAD_BYTES.to_string(),
        ];
        let changed: Vec<Vec<String>> = shared.script("requeue", &args)?;
        changed
            .iter()
            .map(|fields| job_from_fields(fields))
            .collect()
    }

    fn forward_cancel(&self, job_id: &str) -> Result<bool, StoreError> {
        let shared = &self.shared;
        let key = shared.job_key(job_id);
        let worker: Option<String> = shared
            .run(|connection| redis::cmd("HGET").arg(&key).arg("worker").query(connection))?;
        let Some(worker) = worker.filter(|worker| *worker != shared.consumer) else {
            return Ok(false);
        };
        let channel = format!("{}:control:{worker}", shared.prefix);
        let receivers: usize = shared.run(|connection| {
            redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(job_id)
                .query(connection)
        })?;
        // Nobody listening: the process that ran it is gone, so this one announces it.
        Ok(receivers > 0)
    }

    fn take_shared_signals(&self) -> Option<SharedSignals> {
        lock(&self.signals).take()
    }
}

impl Shared {
    fn job_key(&self, job_id: &str) -> String {
        format!("{}:job:{job_id}", self.prefix)
    }

    /// Runs `command` on the command connection, reconnecting first if it failed before.
    fn run<T>(
        &self,
        command: impl FnOnce(&mut Connection) -> RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut guard = lock(&self.connection);
        let state = &mut *guard;
        let stale = state.open.as_mut().is_some_and(|open| {
            state.used.elapsed() > IDLE_CHECK && redis::cmd("PING").query::<()>(open).is_err()
        });
        if stale {
            state.open = None;
        }
        let open = match &mut state.open {
            Some(open) => open,
            None => {
                if !stale
                    && state
                        .last_try
                        .is_some_and(|at| at.elapsed() < RECONNECT_EVERY)
                {
                    return Err(StoreError::Unavailable("Redis is unreachable".to_owned()));
                }
                state.last_try = Some(Instant::now());
                let connection = connect(&self.client).map_err(|error| classify(&error))?;
                log::info!("the job store is connected to Redis again");
                state.since = Instant::now();
                state.open.insert(connection)
            }
        };
        let done = command(open);
        state.used = Instant::now();
        done.map_err(|error| {
            let classified = classify(&error);
            if matches!(classified, StoreError::Unavailable(_)) {
                log::error!("the job store lost Redis: {error}");
                state.open = None;
                state.last_try = Some(Instant::now());
            }
            classified
        })
    }

    /// Whether this process has had Redis for a claim timeout: before that, a live worker
    /// may not have renewed its claims since Redis came back (or since this process started),
    /// so an idle entry does not yet prove its worker dead.
    fn may_take_over(&self) -> bool {
        let state = lock(&self.connection);
        state.open.is_some() && state.since.elapsed() >= self.claim_timeout
    }

    /// Calls the script's operation `op`, loading the script into Redis when it lacks it.
    fn script<T: redis::FromRedisValue>(&self, op: &str, args: &[String]) -> Result<T, StoreError> {
        let call = |connection: &mut Connection, sha: &str| {
            redis::cmd("EVALSHA")
                .arg(sha)
                .arg(0)
                .arg(op)
                .arg(&self.prefix)
                .arg(args)
                .query::<T>(connection)
        };
        let known = lock(&self.script_sha).clone();
        self.run(|connection| {
            if !known.is_empty() {
                match call(connection, &known) {
                    Err(error) if error.code() == Some("NOSCRIPT") => {}
                    done => return done,
                }
            }
            // First use, or a Redis restarted without the script.
            let sha: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(SCRIPT)
                .query(connection)?;
            lock(&self.script_sha).clone_from(&sha);
            call(connection, &sha)
        })
    }

    /// Renews the claims of the jobs this process runs, and forgets those of finished jobs (a
    /// job cancelled while it ran is never updated by its worker).
    fn renew(&self, connection: &mut Connection) -> RedisResult<()> {
        let ids: Vec<String> = lock(&self.claimed).iter().cloned().collect();
        if ids.is_empty() {
            return Ok(());
        }
        // The script text, not its SHA: this connection may be to a Redis that lost it.
        let finished: Vec<String> = redis::cmd("EVAL")
            .arg(SCRIPT)
            .arg(0)
            .arg("renew")
            .arg(&self.prefix)
            .arg(&self.consumer)
            .arg(ids)
            .query(connection)?;
        let mut claimed = lock(&self.claimed);
        for id in &finished {
            claimed.remove(id);
        }
        Ok(())
    }
}

/// The store's thread: listens to the control channels and renews the claims in between.
struct Listener {
    shared: Arc<Shared>,
    queued: Arc<Notify>,
    cancels: mpsc::UnboundedSender<String>,
}

impl Listener {
    fn run(self) {
        let shared = &self.shared;
        let renew_every = (shared.claim_timeout / 3).max(Duration::from_millis(50));
        let queued_channel = format!("{}:queued", shared.prefix);
        let control_channel = format!("{}:control:{}", shared.prefix, shared.consumer);
        let mut backoff = Duration::from_millis(100);
        while !shared.closed.load(Ordering::SeqCst) {
            let listened = self.listen(&queued_channel, &control_channel, renew_every);
            if let Err(error) = listened {
                log::debug!("the job store's listener lost Redis: {error}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
            } else {
                backoff = Duration::from_millis(100);
            }
        }
    }

    /// Listens until the store is dropped (`Ok`) or Redis fails (`Err`).
    fn listen(&self, queued: &str, control: &str, renew_every: Duration) -> RedisResult<()> {
        let shared = &self.shared;
        let mut commands = connect(&shared.client)?;
        let mut subscriber = connect(&shared.client)?;
        let mut pubsub = subscriber.as_pubsub();
        pubsub.subscribe(&[queued, control])?;
        pubsub.set_read_timeout(Some(renew_every))?;
        // Jobs queued while this thread was not listening.
        self.queued.notify_one();
        let mut renewed = Instant::now();
        shared.renew(&mut commands)?;
        while !shared.closed.load(Ordering::SeqCst) {
            match pubsub.get_message() {
                Ok(message) if message.get_channel_name() == control => {
                    if let Ok(job_id) = message.get_payload::<String>() {
                        let _ = self.cancels.send(job_id);
                    }
                }
                Ok(_) => self.queued.notify_one(),
                Err(error) if error.is_timeout() => {}
                Err(error) => return Err(error),
            }
            if renewed.elapsed() >= renew_every {
                renewed = Instant::now();
                shared.renew(&mut commands)?;
            }
        }
        Ok(())
    }
}

/// A connection whose connect and every command are bounded by `COMMAND_TIMEOUT`.
fn connect(client: &Client) -> RedisResult<Connection> {
    let connection = client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
    connection.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    connection.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(connection)
}

/// Unreachable (try later) or failed (a bug or a Redis that refuses the command).
fn classify(error: &RedisError) -> StoreError {
    let transient = error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(error.code(), Some("LOADING" | "BUSY" | "TRYAGAIN"));
    if transient {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Failed(error.to_string())
    }
}

fn unexpected(reply: &[String]) -> StoreError {
    StoreError::Failed(format!("unexpected reply from the job script: {reply:?}"))
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

fn flag(set: bool) -> String {
    if set { "1" } else { "0" }.to_owned()
}

/// The hash fields a new job is stored with.
fn job_fields(job: &Job) -> Vec<(&'static str, String)> {
    let mut fields = vec![
        ("id", job.id.clone()),
        ("user_id", job.user_id.clone()),
        ("notebook_id", job.notebook_id.clone()),
        ("artifact_type", job.artifact_type.as_str().to_owned()),
        ("content", job.content.clone()),
        ("count", job.count.to_string()),
        ("status", job.status.as_str().to_owned()),
        ("created_at", job.created_at.clone()),
        ("updated_at", job.updated_at.clone()),
        ("retry_count", job.retry_count.to_string()),
        (
            "result_bytes",
            job.result
                .as_ref()
                .map_or(0, crate::jobs::json_bytes)
                .to_string(),
        ),
    ];
    if let Some(result) = &job.result {
        fields.push(("result", result.to_string()));
    }
    if let Some(error) = &job.error {
        fields.push(("error", error.clone()));
    }
    fields
}

/// A job from its hash, as `HGETALL` gives it (field, value, field, value, …).
fn job_from_fields(flat: &[String]) -> Result<Job, StoreError> {
    let fields: HashMap<&str, &str> = flat
        .chunks_exact(2)
        .map(|pair| (pair[0].as_str(), pair[1].as_str()))
        .collect();
    let bad = |field: &str| StoreError::Failed(format!("a stored job has no valid `{field}`"));
    let text = |field: &'static str| {
        fields
            .get(field)
            .map(|value| (*value).to_owned())
            .ok_or_else(|| bad(field))
    };
    let number = |field: &'static str| {
        fields
            .get(field)
            .and_then(|value| value.parse::<u64>().ok())
            .ok_or_else(|| bad(field))
    };
    let result = match fields.get("result") {
        Some(result) => Some(serde_json::from_str(result).map_err(|_| bad("result"))?),
        None => None,
    };
    Ok(Job {
        id: text("id")?,
        user_id: text("user_id")?,
        notebook_id: text("notebook_id")?,
        artifact_type: fields
            .get("artifact_type")
            .and_then(|name| ArtifactType::parse(name))
            .ok_or_else(|| bad("artifact_type"))?,
        content: text("content")?,
        count: usize::try_from(number("count")?).map_err(|_| bad("count"))?,
        status: parse_status(
            fields
                .get("status")
                .map(|status| (*status).to_owned())
                .as_ref(),
        )?,
        created_at: text("created_at")?,
        updated_at: text("updated_at")?,
        result,
        error: fields.get("error").map(|error| (*error).to_owned()),
        retry_count: u32::try_from(number("retry_count")?).map_err(|_| bad("retry_count"))?,
    })
}

fn parse_status(name: Option<&String>) -> Result<JobStatus, StoreError> {
    name.and_then(|name| JobStatus::parse(name))
        .ok_or_else(|| StoreError::Failed(format!("a stored job has the status {name:?}")))
}
