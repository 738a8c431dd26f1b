//! Durable jobs and history (`DATABASE_PATH`), with the real binary: a server killed mid-job
//! or stopped with jobs queued is started again on the same file, and every job completes and
//! reaches the client that reconnects with its last event id.
#![cfg(feature = "sqlite")]

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::{binary_token, open, request, send, RunningServer, SseClient, TempDir, PATIENCE};
use hyper::StatusCode;
use serde_json::{json, Value};

const CONTENT: &str = "Photosynthesis is the process by which green plants convert light energy into chemical energy. It takes place mainly in the chloroplasts of leaf cells. Chlorophyll, the green pigment in chloroplasts, absorbs red and blue light. During the light reactions, water molecules are split and oxygen is released as a byproduct. The Calvin cycle then uses carbon dioxide from the air to build glucose. Plants store this glucose as starch or use it to fuel cellular respiration.";

/// Long enough that a job is still planning when the test stops the server.
const SLOW_GENERATOR_MS: &str = "60000";

async fn submit(server: &RunningServer, token: &str) -> String {
    let body = json!({"notebook_id": "nb", "artifact_type": "quiz", "content": CONTENT, "options": {"num_questions": 3}});
    common::generate(server.addr, token, &body).await
}

async fn get_job(server: &RunningServer, token: &str, job_id: &str) -> Value {
    let path = format!("/ai/artifact/jobs/{job_id}");
    let reply = send(server.addr, request("GET", &path, Some(token), "")).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.json()
}

async fn wait_for_status(server: &RunningServer, token: &str, job_id: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let job = get_job(server, token, job_id).await;
        if job["status"] == status {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {job_id} never became {status}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the event `id` is in the database file, read as any other process would.
async fn wait_until_stored(database: &Path, id: &str) {
    let (epoch, seq) = id.split_once('-').unwrap();
    let connection = rusqlite::Connection::open(database).unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let stored: bool = connection
            .query_row(
                "SELECT count(*) > 0 FROM events WHERE epoch = ?1 AND seq = ?2",
                [epoch, seq],
                |row| row.get(0),
            )
            .unwrap();
        if stored {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "event {id} never stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Opens the user's stream with `Last-Event-ID`, and reads past the connected frame.
async fn reconnect(server: &RunningServer, token: &str, last_event_id: &str) -> SseClient {
    let mut request = request(
        "GET",
        "/ai/artifact/events/stream",
        Some(token),
        Bytes::new(),
    );
    request
        .headers_mut()
        .insert("last-event-id", last_event_id.parse().unwrap());
    let mut client = SseClient::from_response(open(server.addr, request).await);
    assert_eq!(client.status, StatusCode::OK);
    let connected = client.next_event().await;
    assert_eq!(connected["type"], "connected");
    client
}

/// Reads events until each of `job_ids` has completed, asserting that none is incomplete or
/// failed; returns the completed events in arrival order.
async fn read_until_completed(client: &mut SseClient, job_ids: &[&str]) -> Vec<Value> {
    let mut completed = Vec::new();
    while completed.len() < job_ids.len() {
        let event = client.next_event().await;
        assert_ne!(event["type"], "replay_incomplete", "nothing was lost");
        assert!(event.get("error").is_none(), "{event}");
        if event.get("result").is_some() {
            completed.push(event);
        }
    }
    completed
}

/// No further event arrives for a while: in particular no second `artifact.completed`.
async fn assert_quiet(client: &mut SseClient) {
    if let Ok(frame) = client.next_frame_within(Duration::from_millis(500)).await {
        assert_eq!(frame, None, "an unexpected frame: {frame:?}");
    }
}

#[tokio::test]
async fn a_job_running_when_the_server_is_killed_completes_after_a_restart_and_reaches_the_reconnecting_client(
) {
    let directory = TempDir::new("killed");
    let database = directory.join("artifact-events.db");
    let database_path = database.to_str().unwrap();
    let server = RunningServer::start(&[
        ("DATABASE_PATH", database_path),
        ("GENERATOR_DELAY_MS", SLOW_GENERATOR_MS),
    ]);
    let token = binary_token("alice");
    let mut client = SseClient::connected(server.addr, &token).await;
    let job_id = submit(&server, &token).await;
    let (started_id, started) = client.next_event_with_id().await;
    assert_eq!(started["job_id"], job_id.as_str());
    assert_eq!(started["status"], "running");
    let started_id = started_id.expect("events carry ids");
    wait_for_status(&server, &token, &job_id, "running").await;
    wait_until_stored(&database, &started_id).await;

    server.kill();
    drop(client);
    let server = RunningServer::start(&[
        ("DATABASE_PATH", database_path),
        ("GENERATOR_DELAY_MS", "100"),
    ]);
    let mut client = reconnect(&server, &token, &started_id).await;

    let completed = read_until_completed(&mut client, &[&job_id]).await;
    assert_eq!(completed[0]["job_id"], job_id.as_str());
    assert_eq!(
        completed[0]["result"]["questions"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    assert_quiet(&mut client).await;
    let job = wait_for_status(&server, &token, &job_id, "completed").await;
    assert_eq!(job["retry_count"], 1, "the killed attempt counts: {job}");
    // An event the killed server had sent but not yet stored: the client is told.
    let (epoch, seq) = started_id.split_once('-').unwrap();
    let unstored = format!("{epoch}-{}", seq.parse::<u64>().unwrap() + 1);
    let mut lost = reconnect(&server, &token, &unstored).await;
    assert_eq!(lost.next_event().await["type"], "replay_incomplete");
    let (exit, log) = server.terminate();
    assert!(exit.success(), "{log}");
    assert!(
        log.contains(&format!(
            "job {job_id} was interrupted by a restart: now queued (retry 1)"
        )),
        "{log}"
    );
}

#[tokio::test]
async fn queued_jobs_survive_a_restart_and_run_in_creation_order() {
    let directory = TempDir::new("queued");
    let database = directory.join("artifact-events.db");
    let database_path = database.to_str().unwrap();
    let server = RunningServer::start(&[
        ("DATABASE_PATH", database_path),
        ("GENERATOR_DELAY_MS", SLOW_GENERATOR_MS),
        ("WORKERS", "1"),
        ("SHUTDOWN_GRACE_SECS", "1"),
    ]);
    let token = binary_token("alice");
    let mut client = SseClient::connected(server.addr, &token).await;
    let mut job_ids = Vec::new();
    for _ in 0..3 {
        job_ids.push(submit(&server, &token).await);
    }
    let (started_id, _) = client.next_event_with_id().await;
    wait_for_status(&server, &token, &job_ids[0], "running").await;

    // A graceful stop: the running job outlasts the grace period, the queued ones wait.
    let (exit, log) = server.terminate();
    assert!(exit.success(), "{log}");
    assert!(log.contains("2 queued jobs were not started"), "{log}");
    drop(client);

    let server = RunningServer::start(&[("DATABASE_PATH", database_path), ("WORKERS", "1")]);
    let mut client = reconnect(&server, &token, &started_id.unwrap()).await;
    let completed =
        read_until_completed(&mut client, &[&job_ids[0], &job_ids[1], &job_ids[2]]).await;
    let order: Vec<&str> = completed
        .iter()
        .map(|event| event["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(order, job_ids);
    assert_quiet(&mut client).await;
    for (job_id, retries) in job_ids.iter().zip([1, 0, 0]) {
        let job = get_job(&server, &token, job_id).await;
        assert_eq!(job["status"], "completed");
        assert_eq!(job["retry_count"], retries, "{job}");
    }
    server.terminate();
}

#[tokio::test]
async fn events_replay_after_a_restart_and_ids_never_repeat() {
    let directory = TempDir::new("replay");
    let database = directory.join("artifact-events.db");
    let database_path = database.to_str().unwrap();
    let environment = [("DATABASE_PATH", database_path)];
    let server = RunningServer::start(&environment);
    let token = binary_token("alice");
    let mut client = SseClient::connected(server.addr, &token).await;
    let first_job = submit(&server, &token).await;
    let mut before: Vec<(String, Value)> = Vec::new();
    while before
        .last()
        .is_none_or(|(_, event)| event.get("result").is_none())
    {
        let (id, event) = client.next_event_with_id().await;
        before.push((id.unwrap(), event));
    }
    let (exit, log) = server.terminate();
    assert!(exit.success(), "{log}");

    let server = RunningServer::start(&environment);
    // From the first event: the rest of that job's events, exactly as they were sent.
    let mut client = reconnect(&server, &token, &before[0].0).await;
    for (id, event) in &before[1..] {
        let replayed = client.next_event_with_id().await;
        assert_eq!(
            (replayed.0.as_deref(), &replayed.1),
            (Some(id.as_str()), event)
        );
    }
    let second_job = submit(&server, &token).await;
    let (id, started) = client.next_event_with_id().await;
    assert_eq!(started["job_id"], second_job.as_str());
    let parse = |id: &str| {
        let (epoch, seq) = id.split_once('-').unwrap();
        (epoch.parse::<u64>().unwrap(), seq.parse::<u64>().unwrap())
    };
    assert!(
        parse(&id.unwrap()) > parse(&before.last().unwrap().0),
        "a restarted server's ids are later"
    );
    assert_ne!(first_job, second_job);
    server.terminate();
}

#[test]
fn a_second_server_on_the_same_file_refuses_to_start_until_the_first_is_gone() {
    let directory = TempDir::new("claim");
    let database = directory.join("artifact-events.db");
    let environment = [("DATABASE_PATH", database.to_str().unwrap())];
    let first = RunningServer::start(&environment);

    let mut second = std::process::Command::new(common::BINARY)
        .env_remove("REDIS_URL")
        .env("ADDR", "127.0.0.1:0")
        .env("JWT_SECRET", common::SECRET)
        .envs(environment)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let exit = loop {
        if let Some(exit) = second.try_wait().unwrap() {
            break exit;
        }
        if started.elapsed() > PATIENCE {
            second.kill().unwrap();
            panic!("a second server on the same file kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(1), "a runtime failure, not a usage error");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("another artifact-events process is using it"),
        "{stderr}"
    );

    // The claim dies with its process, however it ends: no stale lock to clean up by hand.
    first.kill();
    RunningServer::start(&environment).terminate();
}
