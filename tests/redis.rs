//! Events across processes through a real Redis: server processes (the real binary) sharing
//! one Redis stream, replay across processes, and Redis going away in the middle of a run.
//!
//! Uses the Redis at `REDIS_URL` (as `.ci/run` starts one) for the tests that leave Redis
//! alone, and starts private `redis-server` processes for the ones that stop it.
#![cfg(feature = "redis")]

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use artifact_events::config::RedisSettings;
use artifact_events::{EventBus, EventType, Handler};
use common::redis::{free_port, Redis};
use common::{binary_token, publish_to, RunningServer, SseClient, TestServer, PATIENCE};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// The shared Redis from `REDIS_URL`, or a private one when none is given.
fn shared_redis() -> (String, Option<Redis>) {
    match std::env::var("REDIS_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let redis = Redis::start(false);
            (redis.url(), Some(redis))
        }
    }
}

/// A stream key no other test (or earlier run) uses.
fn fresh_stream_key() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "artifact-events-test-{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn start_process(url: &str, stream: &str, extra: &[(&str, &str)]) -> RunningServer {
    let mut env = vec![("REDIS_URL", url), ("REDIS_STREAM", stream)];
    env.extend_from_slice(extra);
    RunningServer::start(&env)
}

/// `count` in-process servers sharing a fresh stream on the Redis at `url`.
async fn in_process_servers(url: &str, count: usize) -> Vec<TestServer> {
    let stream = fresh_stream_key();
    let mut servers = Vec::new();
    for _ in 0..count {
        let mut config = common::config();
        config.redis = Some(RedisSettings {
            url: url.to_owned(),
            stream_key: stream.clone(),
            max_len: 1000,
            outbox_capacity: 1000,
        });
        let server = TestServer::open(config).await;
        servers.push(server);
    }
    servers
}

/// A server process on `stream` with a database file of its own in `dir`, whose durable
/// outbox keeps what is published during a Redis outage (without one, it is refused).
#[cfg(feature = "sqlite")]
fn durable_process(url: &str, stream: &str, dir: &common::TempDir) -> RunningServer {
    let path = dir.join(&format!("{}.db", common::unique_suffix()));
    start_process(url, stream, &[("DATABASE_PATH", path.to_str().unwrap())])
}

/// Two server processes with durable outboxes sharing a fresh stream on the Redis at `url`.
#[cfg(feature = "sqlite")]
fn two_durable_processes(url: &str, dir: &common::TempDir) -> (RunningServer, RunningServer) {
    let stream = fresh_stream_key();
    (
        durable_process(url, &stream, dir),
        durable_process(url, &stream, dir),
    )
}

/// Two server processes sharing a fresh stream on the Redis at `url`.
fn two_processes(url: &str) -> (RunningServer, RunningServer) {
    let stream = fresh_stream_key();
    (
        start_process(url, &stream, &[]),
        start_process(url, &stream, &[]),
    )
}

async fn publish(addr: SocketAddr, user: &str, n: u64) {
    let reply = publish_to(addr, "artifact.completed", json!({"user_id": user, "n": n})).await;
    assert_eq!(reply.status, 202, "body: {:?}", reply.body);
}

/// Reads `count` events; returns their ids and `n`s, in arrival order.
async fn read_events(client: &mut SseClient, count: usize) -> Vec<(String, u64)> {
    let mut events = Vec::new();
    while events.len() < count {
        let (id, data) = tokio::time::timeout(PATIENCE, client.next_event_with_id())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {count} events arrived: {events:?}",
                    events.len()
                )
            });
        if data["type"] == "replay_incomplete" && id.is_none() {
            // Redis restarted without its data: every stream hears that events may be lost.
            continue;
        }
        let n = data["n"]
            .as_u64()
            .unwrap_or_else(|| panic!("not a test event: {data}"));
        events.push((id.expect("every event has an id"), n));
    }
    events
}

/// Publishes event `n` for `user` through `via` as a sentinel and asserts that it is the next
/// event on each of `clients` (all `user`'s); returns the id each gave it. Published while Redis
/// is reachable, its entry follows every earlier one in the stream, so a duplicate of anything
/// before it (read back, or appended again from an outbox) would arrive first.
async fn assert_sentinel_comes_next(
    via: SocketAddr,
    user: &str,
    n: u64,
    clients: &mut [&mut SseClient],
) -> Vec<String> {
    publish(via, user, n).await;
    let mut ids = Vec::new();
    for client in clients {
        let (id, next) = read_events(client, 1).await.remove(0);
        assert_eq!(next, n, "event {next} arrived before the sentinel {n}");
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn a_client_on_one_process_gets_what_another_published_once_in_order_with_the_same_ids() {
    let (url, _redis) = shared_redis();
    let (a, b) = two_processes(&url);
    let mut alice_on_a = SseClient::connected(a.addr, &binary_token("alice")).await;
    let mut alice_on_b = SseClient::connected(b.addr, &binary_token("alice")).await;
    let mut bob_on_b = SseClient::connected(b.addr, &binary_token("bob")).await;

    for n in 0..40 {
        let via = if n % 2 == 0 { a.addr } else { b.addr };
        let user = if n % 4 < 3 { "alice" } else { "bob" };
        publish(via, user, n).await;
    }

    let alice_expected: Vec<u64> = (0..40).filter(|n| n % 4 < 3).collect();
    let on_a = read_events(&mut alice_on_a, alice_expected.len()).await;
    let on_b = read_events(&mut alice_on_b, alice_expected.len()).await;
    assert_eq!(on_a.iter().map(|e| e.1).collect::<Vec<_>>(), alice_expected);
    assert_eq!(
        on_a, on_b,
        "both processes deliver the same events under the same ids"
    );
    let bob = read_events(&mut bob_on_b, 10).await;
    assert_eq!(
        bob.iter().map(|e| e.1).collect::<Vec<_>>(),
        (0..40).filter(|n| n % 4 == 3).collect::<Vec<_>>()
    );
    assert_sentinel_comes_next(a.addr, "alice", 40, &mut [&mut alice_on_a, &mut alice_on_b]).await;
    assert_sentinel_comes_next(b.addr, "bob", 41, &mut [&mut bob_on_b]).await;
}

#[tokio::test]
async fn a_client_resumes_on_another_process_with_last_event_id() {
    let (url, _redis) = shared_redis();
    let stream = fresh_stream_key();
    let a = start_process(&url, &stream, &[]);
    let b = start_process(&url, &stream, &[]);
    let token = binary_token("alice");
    let mut on_a = SseClient::connected(a.addr, &token).await;
    for n in 0..5 {
        publish(a.addr, "alice", n).await;
    }
    let seen = read_events(&mut on_a, 5).await;
    drop(on_a);
    for n in 5..10 {
        publish(a.addr, "alice", n).await;
    }
    let last_id = seen.last().unwrap().0.clone();

    // To the other process, and to one started after all of it (which learns from Redis).
    let c = start_process(&url, &stream, &[]);
    let mut resumed_clients = Vec::new();
    for addr in [b.addr, c.addr] {
        let path = "/ai/artifact/events/stream";
        let mut request = common::request("GET", path, Some(&token), "");
        request
            .headers_mut()
            .insert("last-event-id", last_id.parse().unwrap());
        let mut resumed = SseClient::from_response(common::open(addr, request).await);
        assert!(resumed.next_frame().await.unwrap().contains("connected"));
        let replayed = read_events(&mut resumed, 5).await;
        assert_eq!(
            replayed.iter().map(|e| e.1).collect::<Vec<_>>(),
            [5, 6, 7, 8, 9],
            "exactly the missed events, without replay_incomplete"
        );
        assert!(replayed.iter().all(|(id, _)| *id > last_id));
        resumed_clients.push(resumed);
    }
    let mut resumed: Vec<&mut SseClient> = resumed_clients.iter_mut().collect();
    assert_sentinel_comes_next(a.addr, "alice", 10, &mut resumed).await;
}

#[tokio::test]
async fn in_process_subscribers_on_every_process_see_each_event_once() {
    let (url, _redis) = shared_redis();
    let servers = in_process_servers(&url, 2).await;
    let mut received = Vec::new();
    for server in &servers {
        let (sender, events) = mpsc::unbounded_channel::<Value>();
        let handler = Handler::new(move |data: Arc<Value>| {
            let _ = sender.send((*data).clone());
            async {}
        });
        server.state.bus.subscribe(EventType::COMPLETED, handler);
        received.push(events);
    }
    let bus: &EventBus = &servers[0].state.bus;
    for n in 0..10 {
        // Publish waits until this process's handlers ran: the test's and the webhooks'.
        assert_eq!(
            bus.try_publish(
                &EventType::COMPLETED,
                json!({"user_id": "u", "n": n}).into()
            )
            .await,
            Ok(2)
        );
    }
    publish(servers[1].addr, "u", 10).await;
    // A sentinel: its entry follows the others in the stream, so a duplicate of any of them
    // would reach the handlers before it.
    publish(servers[1].addr, "u", 11).await;
    for events in &mut received {
        for n in 0..=11 {
            let event = tokio::time::timeout(PATIENCE, events.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(event["n"], n, "an event arrived twice or out of order");
        }
    }
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_redis_restart_during_a_publishing_run_loses_and_duplicates_nothing() {
    let mut redis = Redis::start(false);
    let dir = common::TempDir::new("redis-restart");
    let (a, b) = two_durable_processes(&redis.url(), &dir);
    let token = binary_token("alice");
    let mut on_a = SseClient::connected(a.addr, &token).await;
    let mut on_b = SseClient::connected(b.addr, &token).await;

    const EVENTS: u64 = 120;
    for n in 0..EVENTS {
        if n == 40 {
            redis.kill();
        }
        if n == 80 {
            let unready = common::send(a.addr, common::request("GET", "/readyz", None, "")).await;
            assert_eq!(unready.status, 503, "not ready while Redis is down");
            assert!(String::from_utf8_lossy(&unready.body).contains("Redis is unreachable"));
            redis.restart();
        }
        publish(if n % 2 == 0 { a.addr } else { b.addr }, "alice", n).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    for (name, client) in [("a", &mut on_a), ("b", &mut on_b)] {
        let events = read_events(client, EVENTS as usize).await;
        let distinct: HashSet<u64> = events.iter().map(|e| e.1).collect();
        assert_eq!(
            distinct.len(),
            EVENTS as usize,
            "{name} got duplicates: {events:?}"
        );
        // Each process's own publishes keep their order, across the outage too.
        for parity in [0, 1] {
            let own: Vec<u64> = events
                .iter()
                .map(|e| e.1)
                .filter(|n| n % 2 == parity)
                .collect();
            assert!(own.windows(2).all(|w| w[0] < w[1]), "{name}: {own:?}");
        }
    }
    // Events published after the recovery are shared again under Redis ids.
    let after =
        assert_sentinel_comes_next(a.addr, "alice", EVENTS, &mut [&mut on_a, &mut on_b]).await;
    assert_eq!(after[0], after[1]);
    let metrics = common::send(a.addr, common::request("GET", "/metrics", None, "")).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    for line in [
        "artifact_events_redis_reachable 1",
        "artifact_events_redis_outbox_events{kind=\"memory\"} 0",
        "artifact_events_redis_outbox_events{kind=\"durable\"} 0",
        "artifact_events_redis_outages_total 1",
        "artifact_events_redis_publishes_refused_total 0",
    ] {
        assert!(
            metrics.lines().any(|shown| shown == line),
            "{line} not in {metrics}"
        );
    }
    let ready = common::send(a.addr, common::request("GET", "/readyz", None, "")).await;
    assert_eq!(ready.status, 200, "ready again once Redis is back");
    let logs = a.log_lines().join("\n");
    assert!(logs.contains("cannot use Redis"), "{logs}");
    assert!(logs.contains("is back"), "{logs}");
}

#[cfg(feature = "sqlite")]
#[tokio::test]
async fn publishes_beyond_the_outbox_during_an_outage_are_refused_and_delivered_nowhere() {
    let mut redis = Redis::start(false);
    let stream = fresh_stream_key();
    let dir = common::TempDir::new("outbox-full");
    let path = dir.join("a.db");
    let a = start_process(
        &redis.url(),
        &stream,
        &[
            ("REDIS_OUTBOX_CAPACITY", "3"),
            ("DATABASE_PATH", path.to_str().unwrap()),
        ],
    );
    let mut on_a = SseClient::connected(a.addr, &binary_token("alice")).await;
    redis.kill();

    let mut statuses = Vec::new();
    for n in 0..5 {
        let reply = publish_to(
            a.addr,
            "artifact.completed",
            json!({"user_id": "alice", "n": n}),
        )
        .await;
        if reply.status == 503 {
            let error = reply.expect_error(hyper::StatusCode::SERVICE_UNAVAILABLE);
            assert!(error.contains("outbox is full"), "{error}");
        }
        statuses.push(reply.status.as_u16());
    }
    assert_eq!(statuses, [202, 202, 202, 503, 503]);
    let metrics = common::send(a.addr, common::request("GET", "/metrics", None, "")).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    for line in [
        "artifact_events_redis_reachable 0",
        "artifact_events_redis_outbox_events{kind=\"memory\"} 3",
        "artifact_events_redis_outbox_events{kind=\"durable\"} 3",
        "artifact_events_redis_outages_total 1",
        "artifact_events_redis_publishes_refused_total 2",
    ] {
        assert!(
            metrics.lines().any(|shown| shown == line),
            "{line} not in {metrics}"
        );
    }
    let local = read_events(&mut on_a, 3).await;
    assert_eq!(
        local.iter().map(|e| e.1).collect::<Vec<_>>(),
        [0, 1, 2],
        "the kept events are delivered here at once"
    );
    // The refused ones never arrive: Redis comes back, the outbox is appended, and a sentinel
    // published after all of it is the next event.
    redis.restart();
    wait_until_reachable(a.addr).await;
    assert_sentinel_comes_next(a.addr, "alice", 5, &mut [&mut on_a]).await;
}

#[test]
fn a_server_whose_redis_is_unreachable_refuses_to_start_and_says_why() {
    let port = free_port();
    let output = Command::new(common::BINARY)
        .env("JWT_SECRET", common::SECRET)
        .env("ADDR", "127.0.0.1:0")
        .env("REDIS_URL", format!("redis://127.0.0.1:{port}"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "a runtime failure: {stderr}");
    assert!(stderr.contains("is unreachable"), "{stderr}");
    assert!(!stderr.contains("--help"), "not a usage error: {stderr}");
}

#[tokio::test]
async fn a_job_run_by_one_process_is_announced_to_its_owner_on_another() {
    let (url, _redis) = shared_redis();
    let (a, b) = two_processes(&url);
    let token = binary_token("alice");
    let mut on_b = SseClient::connected(b.addr, &token).await;
    let content = "Mitochondria are the organelles that produce most of a cell's energy. \
        They convert glucose and oxygen into adenosine triphosphate through cellular respiration. \
        Each mitochondrion has its own circular DNA, inherited from the mother. \
        The inner membrane folds into cristae, which increase the surface for the electron transport chain. \
        Ribosomes inside the matrix build some of the proteins the organelle needs.";
    let body = json!({"notebook_id": "nb1", "artifact_type": "summary", "content": content});
    let job_id = common::generate(a.addr, &token, &body).await;
    let completed = loop {
        let event = tokio::time::timeout(PATIENCE, on_b.next_event())
            .await
            .expect("the job's events reach the other process");
        assert_eq!(event["job_id"], job_id.as_str());
        if event.get("result").is_some() {
            break event;
        }
    };
    assert_eq!(completed["user_id"], "alice");
    assert!(completed["result"]["summary"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
}

#[cfg(feature = "sqlite")]
/// Regression: an append that Redis refused (here out of memory) started an outage that only a
/// failed read could end, and reads kept working, so the process delivered its own events
/// locally for good and the other processes never saw them.
#[tokio::test]
async fn an_outage_of_appends_alone_ends_when_redis_takes_them_again() {
    let redis = Redis::start(false);
    let dir = common::TempDir::new("appends-alone");
    let (a, b) = two_durable_processes(&redis.url(), &dir);
    let token = binary_token("alice");
    let mut on_a = SseClient::connected(a.addr, &token).await;
    let mut on_b = SseClient::connected(b.addr, &token).await;
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let set_max_memory = |bytes: &'static str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg(bytes)
            .to_owned()
    };

    let () = set_max_memory("1").query_async(&mut admin).await.unwrap();
    publish(a.addr, "alice", 0).await;
    assert_eq!(read_events(&mut on_a, 1).await[0].1, 0, "delivered locally");
    let () = set_max_memory("0").query_async(&mut admin).await.unwrap();

    assert_eq!(
        read_events(&mut on_b, 1).await[0].1,
        0,
        "appended once Redis takes appends again"
    );
    publish(a.addr, "alice", 1).await;
    let on_a_after = read_events(&mut on_a, 1).await;
    assert_eq!(
        on_a_after,
        read_events(&mut on_b, 1).await,
        "shared ids again"
    );
    assert_sentinel_comes_next(a.addr, "alice", 2, &mut [&mut on_a, &mut on_b]).await;
    let logs = a.log_lines().join("\n");
    assert!(logs.contains("OOM"), "the refusal is logged: {logs}");
}

/// Regression: a handler that published waited for this process's reader to read its event
/// back, while the reader waited for the handler: the publish failed after 5 s, and nothing
/// from other processes was delivered meanwhile.
#[tokio::test]
async fn a_handler_that_publishes_through_redis_is_not_kept_waiting() {
    let (url, _redis) = shared_redis();
    let servers = in_process_servers(&url, 2).await;
    let (results, mut published) = mpsc::unbounded_channel();
    let bus = servers[0].state.bus.clone();
    let follow_up = Handler::new(move |data: Arc<Value>| {
        let (bus, results) = (bus.clone(), results.clone());
        async move {
            let event = json!({"user_id": data["user_id"], "follows": data["n"]});
            let _ = results.send(bus.try_publish(&EventType::FAILED, event.into()).await);
        }
    });
    servers[0]
        .state
        .bus
        .subscribe(EventType::COMPLETED, follow_up);
    let mut on_b = SseClient::connected(servers[1].addr, &servers[1].token("alice")).await;

    publish(servers[1].addr, "alice", 7).await;
    let result = tokio::time::timeout(PATIENCE, published.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(on_b.next_event().await["n"], 7);
    assert_eq!(on_b.next_event().await["follows"], 7);
}

/// Regression: during an outage every process numbered its events on from the same last Redis
/// id, so a client that took such an id to another process found it there (naming another
/// event) and silently skipped what that process had published meanwhile.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_client_that_moves_process_with_an_outage_id_is_told_its_replay_is_incomplete() {
    let mut redis = Redis::start(false);
    let dir = common::TempDir::new("moves");
    let (a, b) = two_durable_processes(&redis.url(), &dir);
    let token = binary_token("alice");
    let mut on_a = SseClient::connected(a.addr, &token).await;
    publish(a.addr, "alice", 0).await;
    read_events(&mut on_a, 1).await;

    redis.kill();
    publish(b.addr, "alice", 1).await;
    publish(a.addr, "alice", 2).await;
    let (outage_id, n) = read_events(&mut on_a, 1).await.remove(0);
    assert_eq!(n, 2, "a delivers its own publish at once");
    redis.restart();
    assert_eq!(
        read_events(&mut on_a, 1).await[0].1,
        1,
        "b's publish arrives once Redis is back"
    );

    let path = "/ai/artifact/events/stream";
    let mut request = common::request("GET", path, Some(&token), "");
    request
        .headers_mut()
        .insert("last-event-id", outage_id.parse().unwrap());
    let mut moved = SseClient::from_response(common::open(b.addr, request).await);
    assert!(moved.next_frame().await.unwrap().contains("connected"));
    let first = moved.next_event().await;
    assert_eq!(
        first["type"], "replay_incomplete",
        "b cannot place a's outage id (it was {outage_id}): {first}"
    );
}

/// Waits until the server at `addr` reports Redis reachable again.
async fn wait_until_reachable(addr: SocketAddr) {
    let started = Instant::now();
    loop {
        let metrics = common::send(addr, common::request("GET", "/metrics", None, "")).await;
        let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
        if metrics
            .lines()
            .any(|line| line == "artifact_events_redis_reachable 1")
        {
            return;
        }
        assert!(started.elapsed() < PATIENCE, "Redis never reachable again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP relay in front of a Redis that can swallow Redis's replies, as a network that fails
/// after a command went through does; `swallow` applies to every connection while set.
struct ReplyDroppingProxy {
    addr: SocketAddr,
    swallow: Arc<AtomicBool>,
}

impl ReplyDroppingProxy {
    async fn start(redis: &Redis) -> ReplyDroppingProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let swallow = Arc::new(AtomicBool::new(false));
        let (port, flag) = (redis.port(), swallow.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let flag = flag.clone();
                tokio::spawn(async move {
                    let mut buffer = vec![0; 16 * 1024];
                    while let Ok(read @ 1..) = server_read.read(&mut buffer).await {
                        if flag.load(Ordering::SeqCst) {
                            continue;
                        }
                        if client_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        ReplyDroppingProxy { addr, swallow }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

/// Regression: an append that Redis applied but whose reply was lost was delivered twice: at
/// once as an outage publish, and again when read back after recovery; the other processes got
/// the entry, then its copy from the outbox.
// Multi-threaded: the proxy must run while `RunningServer::start` blocks this thread.
#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_reply_was_lost_is_delivered_once_everywhere() {
    let redis = Redis::start(false);
    let proxy = ReplyDroppingProxy::start(&redis).await;
    let stream = fresh_stream_key();
    let dir = common::TempDir::new("reply-lost");
    let a = durable_process(&proxy.url(), &stream, &dir);
    let b = start_process(&redis.url(), &stream, &[]);
    let token = binary_token("alice");
    let mut on_a = SseClient::connected(a.addr, &token).await;
    let mut on_b = SseClient::connected(b.addr, &token).await;

    proxy.swallow.store(true, Ordering::SeqCst);
    // Applied by Redis; a gives up waiting for the reply after its 2 s response timeout.
    publish(a.addr, "alice", 0).await;
    proxy.swallow.store(false, Ordering::SeqCst);
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(read_events(client, 1).await[0].1, 0);
    }
    wait_until_reachable(a.addr).await;
    publish(a.addr, "alice", 1).await;
    let after_a = read_events(&mut on_a, 1).await;
    assert_eq!(after_a, read_events(&mut on_b, 1).await, "shared ids again");
    assert_sentinel_comes_next(a.addr, "alice", 2, &mut [&mut on_a, &mut on_b]).await;
}
