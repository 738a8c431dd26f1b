//! Jobs across processes through a real Redis: server processes (the real binary) sharing one
//! Redis job queue. A job is read, listed and cancelled from any process; a burst is worked by
//! every process; a SIGKILLed process's job is taken over; a slow worker keeps its job; and a
//! Redis killed mid-run loses, duplicates and strands nothing.
//!
//! Uses the Redis at `REDIS_URL` (skipped without one) for the tests that leave Redis alone,
//! and a private `redis-server` with an append-only file for the one that kills it.
#![cfg(feature = "redis")]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::redis::{shared_url, Redis};
use common::{binary_token, publish_to, request, send, RunningServer, SseClient, PATIENCE};
use hyper::StatusCode;
use serde_json::{json, Value};

const CONTENT: &str = "Mitochondria are the organelles that produce most of a cell's energy. \
    They convert glucose and oxygen into adenosine triphosphate through cellular respiration. \
    Each mitochondrion has its own circular DNA, inherited from the mother. \
    The inner membrane folds into cristae, which increase the surface for the electron transport chain. \
    Ribosomes inside the matrix build some of the proteins the organelle needs.";

fn summary() -> Value {
    json!({"notebook_id": "nb1", "artifact_type": "summary", "content": CONTENT})
}

/// Processes that share a Redis and a stream key, which no other test uses.
struct Cluster {
    url: String,
    stream: String,
}

impl Cluster {
    fn new(url: &str) -> Cluster {
        Cluster {
            url: url.to_owned(),
            stream: format!("redis-jobs-test-{}", common::unique_suffix()),
        }
    }

    fn start(&self, extra: &[(&str, &str)]) -> Process {
        let mut env = vec![
            ("REDIS_URL", self.url.as_str()),
            ("REDIS_STREAM", self.stream.as_str()),
        ];
        env.extend_from_slice(extra);
        Process {
            server: RunningServer::start(&env),
            log: Vec::new(),
        }
    }
}

/// A server process and the log lines read from it so far.
struct Process {
    server: RunningServer,
    log: Vec<String>,
}

impl Process {
    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Every log line so far.
    fn log(&mut self) -> &[String] {
        self.log.extend(self.server.log_lines());
        &self.log
    }

    /// How many jobs this process's workers started, and which.
    fn processed(&mut self) -> Vec<String> {
        self.log()
            .iter()
            .filter_map(|line| line.split("processing job ").nth(1))
            .map(|rest| rest.split(' ').next().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits until this process's workers started `job_id`.
    async fn wait_until_processing(&mut self, job_id: &str) {
        let started = Instant::now();
        while !self.processed().iter().any(|id| id == job_id) {
            assert!(
                started.elapsed() < PATIENCE,
                "job {job_id} never started here"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submits a summary job here and waits until this process runs it, so that a process
    /// started afterwards finds it claimed rather than queued.
    async fn run_job(&mut self, token: &str) -> String {
        let job_id = common::generate(self.addr(), token, &summary()).await;
        self.wait_until_processing(&job_id).await;
        job_id
    }

    /// This process's `/metrics` text.
    async fn metrics(&self) -> String {
        let reply = send(self.addr(), request("GET", "/metrics", None, "")).await;
        String::from_utf8_lossy(&reply.body).into_owned()
    }
}

async fn get_job(addr: SocketAddr, token: &str, job_id: &str) -> (StatusCode, Value) {
    let path = format!("/ai/artifact/jobs/{job_id}");
    let reply = send(addr, request("GET", &path, Some(token), "")).await;
    let body = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    (reply.status, body)
}

/// Cancels the job through `addr`, asserts that it was, and returns the job as answered.
async fn cancel_job(addr: SocketAddr, token: &str, job_id: &str) -> Value {
    let path = format!("/ai/artifact/jobs/{job_id}/cancel");
    let reply = send(addr, request("POST", &path, Some(token), "")).await;
    assert_eq!(reply.status, StatusCode::OK, "body: {:?}", reply.body);
    reply.json()
}

/// Waits until the job is finished, as `addr` reports it, and returns it.
async fn finished_job(addr: SocketAddr, token: &str, job_id: &str, patience: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (status, job) = get_job(addr, token, job_id).await;
        if status == StatusCode::OK && !matches!(job["status"].as_str(), Some("queued" | "running"))
        {
            return job;
        }
        assert!(
            started.elapsed() < patience,
            "job {job_id} not finished: {status} {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The kind of a job event, from its data.
fn kind(event: &Value) -> &'static str {
    if event.get("sentinel").is_some() {
        "sentinel"
    } else if event.get("result").is_some() {
        "completed"
    } else if event.get("progress").is_some() {
        "progress"
    } else {
        match event["status"].as_str() {
            Some("running") => "started",
            Some("cancelled") => "cancelled",
            _ if event.get("error").is_some() => "failed",
            _ => "other",
        }
    }
}

/// Publishes a sentinel for `user` through `via`, and reads `client`'s events up to it: the
/// kinds of the job events before it. Everything published before the sentinel arrives first.
async fn events_until_sentinel(
    client: &mut SseClient,
    via: SocketAddr,
    user: &str,
    patience: Duration,
) -> Vec<&'static str> {
    let sentinel = common::unique_suffix();
    let reply = publish_to(
        via,
        "test.sentinel",
        json!({"user_id": user, "sentinel": sentinel}),
    )
    .await;
    assert_eq!(reply.status, 202, "body: {:?}", reply.body);
    let mut kinds = Vec::new();
    loop {
        let event = tokio::time::timeout(patience, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("the sentinel never came; before it: {kinds:?}"));
        if event["sentinel"] == sentinel.as_str() {
            return kinds;
        }
        kinds.push(kind(&event));
    }
}

/// Reads `client`'s events until one of kind `until`; returns the kinds read, it included.
async fn events_until(
    client: &mut SseClient,
    until: &str,
    patience: Duration,
) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    loop {
        let event = tokio::time::timeout(patience, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("no {until} event; got {kinds:?}"));
        kinds.push(kind(&event));
        if kinds.last() == Some(&until) {
            return kinds;
        }
    }
}

#[tokio::test]
async fn a_job_submitted_on_one_process_is_read_listed_and_cancelled_on_others() {
    let Some(url) = shared_url() else { return };
    let cluster = Cluster::new(&url);
    let slow = [("GENERATOR_DELAY_MS", "3000")];
    let mut a = cluster.start(&slow);
    let token = binary_token("alice");
    // Only A runs workers until the job is A's.
    let job_id = a.run_job(&token).await;
    let b = cluster.start(&slow);
    let c = cluster.start(&slow);
    let mut on_b = SseClient::connected(b.addr(), &token).await;

    let (status, job) = get_job(b.addr(), &token, &job_id).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["status"], "running");
    let reply = send(
        b.addr(),
        request("GET", "/ai/artifact/jobs", Some(&token), ""),
    )
    .await;
    assert_eq!(reply.json()["jobs"][0]["job_id"], job_id.as_str());
    let (status, _) = get_job(b.addr(), &binary_token("mallory"), &job_id).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "another user's job is not found"
    );
    let metrics = b.metrics().await;
    assert!(
        metrics.contains("artifact_events_jobs{status=\"running\"} 1"),
        "{metrics}"
    );

    let cancelled = cancel_job(c.addr(), &token, &job_id).await;
    assert_eq!(cancelled["status"], "cancelled");
    let before = events_until(&mut on_b, "cancelled", PATIENCE).await;
    assert!(!before.contains(&"completed"), "{before:?}");
    let after = events_until_sentinel(&mut on_b, a.addr(), "alice", PATIENCE).await;
    assert_eq!(after, Vec::<&str>::new(), "after artifact.cancelled");
    assert!(
        a.log()
            .iter()
            .any(|line| line.contains("cancelled by another process")),
        "the running process announced it"
    );
    let (_, job) = get_job(a.addr(), &token, &job_id).await;
    assert_eq!(job["status"], "cancelled");
}

#[tokio::test]
async fn a_burst_submitted_to_one_process_is_worked_by_every_process() {
    let Some(url) = shared_url() else { return };
    let cluster = Cluster::new(&url);
    let settings = [
        ("GENERATOR_DELAY_MS", "20"),
        ("MAX_JOBS_PER_USER", "1000"),
        ("LOG_LEVEL", "info"),
    ];
    let mut a = cluster.start(&settings);
    let mut b = cluster.start(&settings);
    let token = binary_token("alice");
    let mut submitted = HashSet::new();
    for _ in 0..200 {
        submitted.insert(common::generate(a.addr(), &token, &summary()).await);
    }
    let started = Instant::now();
    loop {
        let reply = send(
            b.addr(),
            request(
                "GET",
                "/ai/artifact/jobs?status=completed&limit=100",
                Some(&token),
                "",
            ),
        )
        .await;
        let metrics = b.metrics().await;
        if metrics.contains("artifact_events_jobs{status=\"completed\"} 200") {
            assert_eq!(reply.json()["jobs"].as_array().unwrap().len(), 100);
            break;
        }
        assert!(started.elapsed() < PATIENCE * 4, "not all done: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (on_a, on_b) = (a.processed(), b.processed());
    assert!(!on_a.is_empty(), "A's workers ran none");
    assert!(!on_b.is_empty(), "B's workers ran none of A's jobs");
    let ran: Vec<&String> = on_a.iter().chain(&on_b).collect();
    let distinct: HashSet<&String> = ran.iter().copied().collect();
    assert_eq!(ran.len(), 200, "every job ran once: {} runs", ran.len());
    assert_eq!(distinct, submitted.iter().collect());
    eprintln!("A ran {} jobs, B ran {}", on_a.len(), on_b.len());
}

#[tokio::test]
async fn a_sigkilled_processs_job_is_taken_over_and_completed_once() {
    let Some(url) = shared_url() else { return };
    let cluster = Cluster::new(&url);
    let claim_timeout = Duration::from_secs(2);
    // Two generator calls of 3 s: the job still runs on A when A is killed.
    let settings = [
        ("GENERATOR_DELAY_MS", "3000"),
        ("JOB_CLAIM_TIMEOUT_SECS", "2"),
    ];
    let mut a = cluster.start(&settings);
    let token = binary_token("alice");
    let job_id = a.run_job(&token).await;
    let mut b = cluster.start(&settings);
    let mut on_b = SseClient::connected(b.addr(), &token).await;
    // B has Redis for a claim timeout before it takes over anything.
    tokio::time::sleep(claim_timeout).await;

    let killed = Instant::now();
    a.server.kill();
    b.wait_until_processing(&job_id).await;
    let taken_over = killed.elapsed();
    assert!(
        taken_over < claim_timeout + Duration::from_secs(5),
        "taken over after {taken_over:?}"
    );
    let kinds = events_until(&mut on_b, "completed", PATIENCE).await;
    let after = events_until_sentinel(&mut on_b, b.addr(), "alice", PATIENCE).await;
    let completed = kinds
        .iter()
        .chain(&after)
        .filter(|kind| **kind == "completed");
    assert_eq!(completed.count(), 1, "{kinds:?} then {after:?}");
    let (_, job) = get_job(b.addr(), &token, &job_id).await;
    assert_eq!(job["status"], "completed");
    assert_eq!(job["retry_count"], 1, "the interrupted attempt counts");
}

#[tokio::test]
async fn a_worker_slower_than_the_claim_timeout_keeps_its_job() {
    let Some(url) = shared_url() else { return };
    let cluster = Cluster::new(&url);
    // Two generator calls of 2.5 s: the job runs two and a half claim timeouts, and B may take
    // claims over (it has had Redis for a timeout) during the second half of it.
    let settings = [
        ("GENERATOR_DELAY_MS", "2500"),
        ("JOB_CLAIM_TIMEOUT_SECS", "2"),
    ];
    let mut a = cluster.start(&settings);
    let token = binary_token("alice");
    let job_id = a.run_job(&token).await;
    let mut b = cluster.start(&settings);
    let mut on_b = SseClient::connected(b.addr(), &token).await;
    let kinds = events_until(&mut on_b, "completed", PATIENCE).await;
    let after = events_until_sentinel(&mut on_b, b.addr(), "alice", PATIENCE).await;
    assert_eq!(after, Vec::<&str>::new());
    assert!(!kinds.contains(&"started"), "started again: {kinds:?}");
    let (_, job) = get_job(b.addr(), &token, &job_id).await;
    assert_eq!(
        (job["status"].as_str(), job["retry_count"].as_u64()),
        (Some("completed"), Some(0))
    );
    assert_eq!(a.processed(), [job_id], "the generator ran once, on A");
    assert!(b.processed().is_empty(), "B never took it over");
}

#[tokio::test]
async fn redis_killed_and_restarted_mid_run_loses_duplicates_and_strands_no_job() {
    let mut redis = Redis::start(true);
    let cluster = Cluster::new(&redis.url());
    let settings = [
        ("GENERATOR_DELAY_MS", "300"),
        ("JOB_CLAIM_TIMEOUT_SECS", "3"),
        ("MAX_JOBS_PER_USER", "1000"),
    ];
    let mut a = cluster.start(&settings);
    let mut b = cluster.start(&settings);
    let token = binary_token("alice");
    let mut accepted = Vec::new();
    for _ in 0..20 {
        accepted.push(common::generate(a.addr(), &token, &summary()).await);
    }
    let started = Instant::now();
    while a.processed().len() + b.processed().len() < 2 {
        assert!(started.elapsed() < PATIENCE, "no job started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    redis.kill();
    let path = "/ai/artifact/generate";
    let refused = send(
        a.addr(),
        request("POST", path, Some(&token), summary().to_string()),
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        refused.body
    );
    assert!(refused.headers.contains_key("retry-after"));
    let (status, _) = get_job(b.addr(), &token, &accepted[0]).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "status reads need Redis"
    );
    // Long enough for running jobs to finish their attempts and wait to store the outcome.
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.restart();

    let mut outcomes = HashMap::new();
    for job_id in &accepted {
        let job = finished_job(b.addr(), &token, job_id, PATIENCE * 4).await;
        outcomes.insert(job_id.clone(), job["status"].as_str().unwrap().to_owned());
    }
    assert!(
        outcomes.values().all(|status| status == "completed"),
        "{outcomes:?}"
    );
    let kept = |process: &mut Process| {
        process
            .log()
            .iter()
            .any(|line| line.contains("cannot store its outcome yet"))
    };
    assert!(
        kept(&mut a) || kept(&mut b),
        "a job that finished during the outage stored its outcome afterwards"
    );
    let ran: Vec<String> = a.processed().into_iter().chain(b.processed()).collect();
    let distinct: HashSet<&String> = ran.iter().collect();
    assert_eq!(ran.len(), distinct.len(), "a job ran twice: {ran:?}");
    assert_eq!(distinct.len(), accepted.len());
    let metrics = a.metrics().await;
    assert!(
        metrics.contains("artifact_events_jobs{status=\"running\"} 0")
            && metrics.contains("artifact_events_jobs{status=\"queued\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_cancel_of_a_job_whose_process_died_is_announced_by_the_cancelling_process() {
    let Some(url) = shared_url() else { return };
    let cluster = Cluster::new(&url);
    let settings = [
        ("GENERATOR_DELAY_MS", "3000"),
        ("JOB_CLAIM_TIMEOUT_SECS", "1"),
    ];
    let mut a = cluster.start(&settings);
    let token = binary_token("alice");
    let job_id = a.run_job(&token).await;
    let mut b = cluster.start(&settings);
    let mut on_b = SseClient::connected(b.addr(), &token).await;
    a.server.kill();

    cancel_job(b.addr(), &token, &job_id).await;
    let kinds = events_until(&mut on_b, "cancelled", PATIENCE).await;
    assert_eq!(kinds.iter().filter(|kind| **kind == "cancelled").count(), 1);
    // Time for B's takeover scans to reach the dead claim (B waits a claim timeout, then looks
    // every quarter of it): a rerun would publish artifact.started before the sentinel.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = events_until_sentinel(&mut on_b, b.addr(), "alice", PATIENCE).await;
    assert_eq!(after, Vec::<&str>::new(), "after artifact.cancelled");
    assert!(b.processed().is_empty(), "B ran the cancelled job");
    let (_, job) = get_job(b.addr(), &token, &job_id).await;
    assert_eq!(job["status"], "cancelled");
}
