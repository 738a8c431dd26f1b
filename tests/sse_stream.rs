//! The SSE stream over real TCP: frames, routing by user, keepalives, cleanup, backpressure.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use artifact_events::delivery::EventId;
use artifact_events::EventType;
use common::{config, publish_http, SseClient, TestServer, PATIENCE};
use serde_json::json;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn connected_frame_is_byte_exact_with_event_stream_headers() {
    let server = TestServer::start(config()).await;
    let mut client = SseClient::connect(server.addr, &server.token("alice")).await;

    assert_eq!(client.status, 200);
    assert_eq!(client.headers["content-type"], "text/event-stream");
    assert_eq!(client.headers["cache-control"], "no-cache");
    assert_eq!(client.headers["x-accel-buffering"], "no");
    assert_eq!(client.headers["transfer-encoding"], "chunked");
    assert_eq!(
        client.next_frame().await.unwrap(),
        "retry: 2000\ndata: {\"type\":\"connected\",\"user_id\":\"alice\"}\n\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn own_events_arrive_in_publish_order_as_compact_json_data_frames() {
    let server = TestServer::start(config()).await;
    let mut client = SseClient::connected(server.addr, &server.token("alice")).await;

    let bus = &server.state.bus;
    bus.publish(&EventType::STARTED, json!({"user_id": "alice", "n": 1}))
        .await;
    publish_http(
        &server,
        "artifact.completed",
        json!({"user_id": "alice", "n": 2, "result": {"a": [1, 2]}}),
    )
    .await;
    bus.publish(
        &EventType::from("custom.kind"),
        json!({"user_id": "alice", "n": 3}),
    )
    .await;

    let first = client.next_frame().await.unwrap();
    let (id_line, data) = first.split_once('\n').unwrap();
    let first_id = EventId::parse(id_line.strip_prefix("id: ").unwrap()).unwrap();
    assert_eq!(data, "data: {\"n\":1,\"user_id\":\"alice\"}\n\n");
    let second_id = EventId {
        seq: first_id.seq + 1,
        ..first_id
    };
    assert_eq!(
        client.next_frame().await.unwrap(),
        format!("id: {second_id}\ndata: {{\"n\":2,\"result\":{{\"a\":[1,2]}},\"user_id\":\"alice\"}}\n\n")
    );
    let (third_id, third) = client.next_event_with_id().await;
    assert_eq!(third["n"], 3);
    assert_eq!(
        EventId::parse(&third_id.unwrap()).unwrap().seq,
        first_id.seq + 2
    );
    server.stop().await;
}

#[tokio::test]
async fn other_users_events_are_never_delivered() {
    const USERS: usize = 10;
    const CLIENTS_PER_USER: usize = 10;
    const EVENTS: usize = 3_000;
    let mut settings = config();
    // This test is about routing; a queue deep enough for every event keeps backpressure out.
    settings.stream_queue_capacity = EVENTS;
    let server = TestServer::start(settings).await;

    let mut readers = Vec::new();
    for user in 0..USERS {
        for _ in 0..CLIENTS_PER_USER {
            let mut client =
                SseClient::connect(server.addr, &server.token(&format!("user-{user}"))).await;
            client.next_frame().await;
            readers.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                for _ in 0..EVENTS / USERS {
                    let event = client.next_event().await;
                    assert_eq!(event["user_id"], format!("user-{user}"), "leak: {event}");
                    seen.push(event["seq"].as_u64().unwrap());
                }
                // Nothing more may arrive: every event of this user has been seen.
                assert!(client
                    .next_frame_within(Duration::from_millis(200))
                    .await
                    .is_err());
                (user, seen)
            }));
        }
    }
    assert_eq!(
        server.state.streams.stream_count(),
        USERS * CLIENTS_PER_USER
    );

    for seq in 0..EVENTS {
        let event_type = [
            EventType::PROGRESS,
            EventType::COMPLETED,
            EventType::from("x.y"),
        ][seq % 3]
            .clone();
        let data = json!({"user_id": format!("user-{}", seq % USERS), "seq": seq});
        server.state.bus.publish(&event_type, data).await;
    }

    let mut deliveries: HashMap<usize, usize> = HashMap::new();
    for reader in readers {
        let (user, seen) = reader.await.unwrap();
        let expected: Vec<u64> = (0..EVENTS)
            .filter(|seq| seq % USERS == user)
            .map(|seq| seq as u64)
            .collect();
        assert_eq!(seen, expected, "user-{user} lost or reordered events");
        *deliveries.entry(user).or_default() += seen.len();
    }
    assert_eq!(
        deliveries.values().sum::<usize>(),
        EVENTS * CLIENTS_PER_USER
    );
    server.stop().await;
}

#[tokio::test]
async fn events_without_a_string_user_id_go_to_nobody() {
    let server = TestServer::start(config()).await;
    let mut client = SseClient::connected(server.addr, &server.token("42")).await;

    server
        .state
        .bus
        .publish(&EventType::COMPLETED, json!({"user_id": 42}))
        .await;
    server
        .state
        .bus
        .publish(&EventType::COMPLETED, json!({"job_id": "no user"}))
        .await;
    server
        .state
        .bus
        .publish(&EventType::COMPLETED, json!("not an object"))
        .await;
    server
        .state
        .bus
        .publish(&EventType::COMPLETED, json!({"user_id": "42", "ok": true}))
        .await;

    assert_eq!(client.next_event().await["ok"], true);
    server.stop().await;
}

#[tokio::test]
async fn keepalive_comments_arrive_at_the_configured_interval() {
    let mut settings = config();
    settings.keepalive = Duration::from_secs(1);
    let server = TestServer::start(settings).await;
    let mut client = SseClient::connected(server.addr, &server.token("alice")).await;

    let started = tokio::time::Instant::now();
    assert_eq!(client.next_frame().await.unwrap(), ": keepalive\n\n");
    assert_eq!(client.next_frame().await.unwrap(), ": keepalive\n\n");
    // Two keepalives take about two intervals: neither a burst nor a long silence.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_goes_away_is_removed_from_the_index() {
    let mut settings = config();
    settings.keepalive = Duration::from_secs(1);
    let server = TestServer::start(settings).await;
    let mut staying = SseClient::connected(server.addr, &server.token("alice")).await;
    let leaving = SseClient::connected(server.addr, &server.token("alice")).await;
    assert_eq!(server.state.streams.stream_count(), 2);

    drop(leaving);
    server
        .wait_until("the closed stream is unregistered", |state| {
            state.streams.stream_count() == 1
        })
        .await;
    server
        .state
        .bus
        .publish(&EventType::COMPLETED, json!({"user_id": "alice", "n": 1}))
        .await;
    assert_eq!(staying.next_event().await["n"], 1);

    drop(staying);
    server
        .wait_until("the index is empty", |state| {
            state.streams.stream_count() == 0
        })
        .await;
    server.stop().await;
}

/// Opens `user`'s stream on a socket that never reads, with a tiny receive window so that the
/// kernel's buffers fill quickly; returns once the server has registered the stream.
async fn open_stalled_stream(server: &TestServer, user: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(server.addr).await.unwrap();
    let head = format!(
        "GET /ai/artifact/events/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\r\n",
        server.token(user)
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    server
        .wait_until("the stream is open", |state| {
            state.streams.stream_count() == 1
        })
        .await;
    stalled
}

#[tokio::test]
async fn a_stalled_client_of_large_events_is_disconnected_by_bytes_long_before_frames() {
    let mut settings = config();
    // Out of reach: only the byte bound can disconnect this client.
    settings.stream_queue_capacity = 1_000_000;
    settings.stream_queue_max_bytes = 256 * 1024;
    let server = TestServer::start(settings).await;
    let _stalled = open_stalled_stream(&server, "sleepy").await;
    let padding = "x".repeat(64 * 1024);
    let mut published = 0;
    while server.state.metrics.slow_consumer_disconnects() == 0 {
        assert!(
            published < 2_000,
            "the byte bound never disconnected the stalled client"
        );
        let event = json!({"user_id": "sleepy", "pad": padding});
        server.state.bus.publish(&EventType::PROGRESS, event).await;
        published += 1;
        tokio::task::yield_now().await;
    }
    server
        .wait_until("the stalled stream is gone", |state| {
            state.streams.stream_count() == 0
        })
        .await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_instead_of_growing_memory() {
    let mut settings = config();
    settings.stream_queue_capacity = 16;
    let server = TestServer::start(settings).await;
    let mut stalled = open_stalled_stream(&server, "sleepy").await;

    let mut reader = SseClient::connected(server.addr, &server.token("awake")).await;
    let padding = "x".repeat(16 * 1024);
    let mut published = 0;
    while server.state.metrics.slow_consumer_disconnects() == 0 {
        assert!(
            published < 10_000,
            "the stalled client was never disconnected"
        );
        server
            .state
            .bus
            .publish(
                &EventType::PROGRESS,
                json!({"user_id": "sleepy", "pad": padding}),
            )
            .await;
        published += 1;
        tokio::task::yield_now().await;
    }
    server
        .wait_until("only the reading client is left", |state| {
            state.streams.stream_count() == 1
        })
        .await;
    assert_eq!(server.state.metrics.slow_consumer_disconnects(), 1);

    // The server closed the stalled connection: reading it to the end terminates.
    let drained = tokio::time::timeout(PATIENCE, async {
        let mut sink = tokio::io::sink();
        tokio::io::copy(&mut stalled, &mut sink).await
    })
    .await;
    assert!(drained.is_ok(), "the stalled connection was not closed");

    // Other users are unaffected.
    server
        .state
        .bus
        .publish(&EventType::COMPLETED, json!({"user_id": "awake", "n": 1}))
        .await;
    assert_eq!(reader.next_event().await["n"], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_user_beyond_the_stream_limit_gets_429() {
    let mut settings = config();
    settings.max_streams_per_user = 2;
    let server = TestServer::start(settings).await;
    let token = server.token("alice");
    let _first = SseClient::connect(server.addr, &token).await;
    let _second = SseClient::connect(server.addr, &token).await;
    let third = common::send(
        server.addr,
        common::request("GET", "/ai/artifact/events/stream", Some(&token), ""),
    )
    .await;
    let message = third.expect_error(hyper::StatusCode::TOO_MANY_REQUESTS);
    assert!(message.contains("max 2"), "{message}");
    assert!(third.headers.contains_key("retry-after"));
    // Another user is not limited by alice's streams.
    let mut bob = SseClient::connect(server.addr, &server.token("bob")).await;
    assert_eq!(bob.status, 200);
    bob.next_frame().await;
    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams_cleanly() {
    let server = TestServer::start(config()).await;
    let mut client = SseClient::connected(server.addr, &server.token("alice")).await;
    let addr = server.addr;

    server.stop().await;
    // The body ends with its terminating chunk, not a broken connection.
    assert_eq!(client.next_frame().await, None);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}
