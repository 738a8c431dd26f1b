//! Never lose an event: ids, Last-Event-ID replay (header and query), the reconnect race,
//! slow-consumer recovery, browser tokens, CORS and metrics, over real TCP.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use artifact_events::delivery::EventId;
use artifact_events::EventType;
use common::{config, open, request, send, SseClient, TestServer};
use hyper::StatusCode;
use serde_json::json;

const STREAM: &str = "/ai/artifact/events/stream";

/// Connects with a `Last-Event-ID` header.
async fn reconnect(server: &TestServer, user: &str, last_event_id: &str) -> SseClient {
    let mut request = request("GET", STREAM, Some(&server.token(user)), "");
    request
        .headers_mut()
        .insert("last-event-id", last_event_id.parse().unwrap());
    SseClient::from_response(open(server.addr, request).await)
}

async fn publish(server: &TestServer, user: &str, n: u64) {
    let data = json!({"user_id": user, "n": n});
    server.state.bus.publish(&EventType::PROGRESS, data).await;
}

/// Reads events until one with `n == last`, returning every `(id, n)` seen.
async fn read_through(client: &mut SseClient, last: u64) -> Vec<(String, u64)> {
    let mut seen = Vec::new();
    loop {
        let (id, event) = client.next_event_with_id().await;
        let n = event["n"]
            .as_u64()
            .unwrap_or_else(|| panic!("unexpected event {event}"));
        seen.push((id.expect("events carry ids"), n));
        if n == last {
            return seen;
        }
    }
}

fn numbers(seen: &[(String, u64)]) -> Vec<u64> {
    seen.iter().map(|(_, n)| *n).collect()
}

#[tokio::test]
async fn ids_increase_and_a_reconnect_with_last_event_id_gets_exactly_the_missed_events() {
    let server = TestServer::start(config()).await;
    let mut client = SseClient::connected(server.addr, &server.token("alice")).await;
    for n in 1..=3 {
        publish(&server, "alice", n).await;
    }
    let seen = read_through(&mut client, 3).await;
    let ids: Vec<EventId> = seen
        .iter()
        .map(|(id, _)| EventId::parse(id).unwrap())
        .collect();
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]), "{ids:?}");
    drop(client);

    for n in 4..=6 {
        publish(&server, "alice", n).await;
        publish(&server, "bob", n).await;
    }
    let mut again = reconnect(&server, "alice", &seen[1].0).await;
    assert!(again.next_frame().await.unwrap().contains("\"connected\""));
    publish(&server, "alice", 7).await;
    // Event 3 again (the client said it had only up to 2), then 4-6 missed, then 7 live.
    assert_eq!(numbers(&read_through(&mut again, 7).await), [3, 4, 5, 6, 7]);
    // A sentinel: a duplicate of any event above would arrive before it.
    publish(&server, "alice", 8).await;
    assert_eq!(
        numbers(&read_through(&mut again, 8).await),
        [8],
        "duplicate"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_last_event_id_query_parameter_works_like_the_header() {
    let server = TestServer::start(config()).await;
    let mut client = SseClient::connected(server.addr, &server.token("alice")).await;
    publish(&server, "alice", 1).await;
    let seen = read_through(&mut client, 1).await;
    publish(&server, "alice", 2).await;

    let path = format!("{STREAM}?last_event_id={}", seen[0].0);
    let mut again = SseClient::from_response(
        open(
            server.addr,
            request("GET", &path, Some(&server.token("alice")), ""),
        )
        .await,
    );
    again.next_frame().await;
    assert_eq!(numbers(&read_through(&mut again, 2).await), [2]);
    server.stop().await;
}

#[tokio::test]
async fn an_empty_last_event_id_asks_for_no_replay() {
    let server = TestServer::start(config()).await;
    publish(&server, "alice", 1).await;
    for path in [STREAM.to_owned(), format!("{STREAM}?last_event_id=")] {
        let mut request = request("GET", &path, Some(&server.token("alice")), "");
        if path == STREAM {
            request
                .headers_mut()
                .insert("last-event-id", "".parse().unwrap());
        }
        let mut client = SseClient::from_response(open(server.addr, request).await);
        assert!(client.next_frame().await.unwrap().contains("connected"));
        publish(&server, "alice", 2).await;
        let frame = client.next_frame().await.unwrap();
        assert!(
            frame.contains("\"n\":2"),
            "live events only, no replay_incomplete ({path}): {frame}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn an_unreadable_last_event_id_is_a_400() {
    let server = TestServer::start(config()).await;
    let token = server.token("alice");
    let mut non_ascii = request("GET", STREAM, Some(&token), "");
    non_ascii.headers_mut().insert(
        "last-event-id",
        hyper::header::HeaderValue::from_bytes(b"1-\xff").unwrap(),
    );
    let bad_escape = request(
        "GET",
        &format!("{STREAM}?last_event_id=1-%ZZ"),
        Some(&token),
        "",
    );
    for request in [non_ascii, bad_escape] {
        let reply = send(server.addr, request).await;
        let error = reply.expect_error(StatusCode::BAD_REQUEST);
        assert!(error.to_lowercase().contains("last"), "{error}");
    }
    server.stop().await;
}

#[tokio::test]
async fn an_id_older_than_the_history_first_gets_replay_incomplete() {
    let mut settings = config();
    settings.history.events_per_user = 3;
    let server = TestServer::start(settings).await;
    let mut client = SseClient::connected(server.addr, &server.token("alice")).await;
    publish(&server, "alice", 1).await;
    let first_id = read_through(&mut client, 1).await.remove(0).0;
    drop(client);
    for n in 2..=6 {
        publish(&server, "alice", n).await;
    }
    let mut again = reconnect(&server, "alice", &first_id).await;
    again.next_frame().await;
    assert_eq!(
        again.next_event().await,
        json!({"type": "replay_incomplete", "last_event_id": first_id})
    );
    assert_eq!(numbers(&read_through(&mut again, 6).await), [4, 5, 6]);

    for foreign in ["1-1", "not-an-id"] {
        let mut client = reconnect(&server, "alice", foreign).await;
        client.next_frame().await;
        assert_eq!(
            client.next_event().await["type"],
            "replay_incomplete",
            "{foreign}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_restarted_server_never_reuses_ids_and_reports_older_ones_incomplete() {
    let first = TestServer::start(config()).await;
    let mut client = SseClient::connected(first.addr, &first.token("alice")).await;
    publish(&first, "alice", 1).await;
    let old_id = read_through(&mut client, 1).await.remove(0).0;
    first.stop().await;
    tokio::time::sleep(Duration::from_millis(5)).await;

    let second = TestServer::start(config()).await;
    let mut client = reconnect(&second, "alice", &old_id).await;
    client.next_frame().await;
    assert_eq!(client.next_event().await["type"], "replay_incomplete");
    publish(&second, "alice", 2).await;
    let new_id = read_through(&mut client, 2).await.remove(0).0;
    assert!(EventId::parse(&new_id).unwrap() > EventId::parse(&old_id).unwrap());
    second.stop().await;
}

#[tokio::test]
async fn reconnecting_while_events_are_published_loses_and_repeats_nothing() {
    const EVENTS: u64 = 2_000;
    let mut settings = config();
    // The race is the subject here: bounds large enough that neither history nor queue runs out.
    settings.history.events_per_user = EVENTS as usize;
    settings.stream_queue_capacity = EVENTS as usize;
    let server = TestServer::start(settings).await;
    let mut client = SseClient::connected(server.addr, &server.token("alice")).await;
    let publisher = {
        let bus = server.state.bus.clone();
        tokio::spawn(async move {
            for n in 1..=EVENTS {
                bus.publish(&EventType::PROGRESS, json!({"user_id": "alice", "n": n}))
                    .await;
                if n % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut received = Vec::new();
    // Drop and reconnect the stream every 100 events while publishing goes on.
    while received.last().is_none_or(|(_, n)| *n < EVENTS) {
        let (id, event) = client.next_event_with_id().await;
        received.push((id.unwrap(), event["n"].as_u64().unwrap()));
        if received.len() % 100 == 0 {
            drop(client);
            client = reconnect(&server, "alice", &received.last().unwrap().0).await;
            client.next_frame().await;
        }
    }
    publisher.await.unwrap();
    assert_eq!(numbers(&received), (1..=EVENTS).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn a_disconnected_slow_consumer_recovers_everything_with_last_event_id() {
    let mut settings = config();
    settings.stream_queue_capacity = 8;
    let server = TestServer::start(settings).await;
    let mut client = SseClient::connected(server.addr, &server.token("alice")).await;
    publish(&server, "alice", 1).await;
    let last_id = read_through(&mut client, 1).await.remove(0).0;

    // The client stops reading; large events fill every buffer until the server gives up on it.
    let padding = "x".repeat(64 * 1024);
    let mut n = 1;
    while server.state.metrics.slow_consumer_disconnects() == 0 {
        n += 1;
        assert!(n < 5_000, "never disconnected");
        let data = json!({"user_id": "alice", "n": n, "pad": padding});
        server.state.bus.publish(&EventType::PROGRESS, data).await;
        tokio::task::yield_now().await;
    }
    drop(client);
    let mut again = reconnect(&server, "alice", &last_id).await;
    again.next_frame().await;
    assert_eq!(
        numbers(&read_through(&mut again, n).await),
        (2..=n).collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test]
async fn browsers_can_authenticate_with_a_query_token_or_a_cookie() {
    let server = TestServer::start(config()).await;
    let token = server.token("alice");
    let by_query = format!("{STREAM}?access_token={token}");
    let mut client =
        SseClient::from_response(open(server.addr, request("GET", &by_query, None, "")).await);
    assert_eq!(client.status, StatusCode::OK);
    assert!(client.next_frame().await.unwrap().contains("\"alice\""));

    let mut with_cookie = request("GET", STREAM, None, "");
    with_cookie.headers_mut().insert(
        "cookie",
        format!("theme=dark; access_token={token}").parse().unwrap(),
    );
    let mut client = SseClient::from_response(open(server.addr, with_cookie).await);
    assert_eq!(client.status, StatusCode::OK);
    assert!(client.next_frame().await.unwrap().contains("\"alice\""));

    let bad = send(
        server.addr,
        request("GET", &format!("{STREAM}?access_token=nope"), None, ""),
    )
    .await;
    bad.expect_error(StatusCode::UNAUTHORIZED);
    // Other endpoints do not take tokens from the URL.
    let jobs = send(
        server.addr,
        request(
            "GET",
            &format!("/ai/artifact/jobs?access_token={token}"),
            None,
            "",
        ),
    )
    .await;
    jobs.expect_error(StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test]
async fn cors_answers_preflights_and_marks_responses_for_allowed_origins_only() {
    let mut settings = config();
    settings.cors_allow_origins = vec!["https://app.example".to_owned()];
    let server = TestServer::start(settings).await;
    let with_origin = |method: &str, path: &str, origin: &str| {
        let mut request = request(method, path, None, "");
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
        request
    };

    let preflight = send(
        server.addr,
        with_origin("OPTIONS", "/ai/artifact/generate", "https://app.example"),
    )
    .await;
    assert_eq!(preflight.status, StatusCode::NO_CONTENT);
    assert_eq!(
        preflight.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        preflight.headers["access-control-allow-credentials"],
        "true"
    );
    assert_eq!(preflight.headers["access-control-allow-methods"], "POST");
    assert!(preflight.headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("authorization"));

    let stranger = send(
        server.addr,
        with_origin("OPTIONS", STREAM, "https://evil.example"),
    )
    .await;
    assert_eq!(stranger.status, StatusCode::NO_CONTENT);
    assert!(!stranger.headers.contains_key("access-control-allow-origin"));
    assert_eq!(
        stranger.headers["vary"], "origin",
        "caches must not serve this answer to the allowed origin"
    );

    let actual = send(
        server.addr,
        with_origin("GET", "/healthz", "https://app.example"),
    )
    .await;
    assert_eq!(
        actual.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(actual.headers["vary"], "origin");
    let unknown = send(
        server.addr,
        with_origin("OPTIONS", "/nope", "https://app.example"),
    )
    .await;
    unknown.expect_error(StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn cors_star_allows_any_origin_without_credentials() {
    let mut settings = config();
    settings.cors_allow_origins = vec!["*".to_owned()];
    let server = TestServer::start(settings).await;
    for method in ["OPTIONS", "GET"] {
        let mut request = request(method, "/healthz", None, "");
        request
            .headers_mut()
            .insert("origin", "https://anyone.example".parse().unwrap());
        let reply = send(server.addr, request).await;
        assert_eq!(
            reply.headers["access-control-allow-origin"], "*",
            "{method}"
        );
        assert!(
            !reply
                .headers
                .contains_key("access-control-allow-credentials"),
            "`*` must never let any site read with the user's cookies ({method})"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn metrics_count_streams_events_jobs_and_responses() {
    let mut settings = config();
    settings.stream_queue_capacity = 1;
    let server = TestServer::start(settings).await;
    let mut client = SseClient::connected(server.addr, &server.token("alice")).await;
    publish(&server, "alice", 1).await;
    read_through(&mut client, 1).await;
    server
        .state
        .bus
        .publish(&EventType::from("custom.type"), json!({"user_id": "bob"}))
        .await;
    let mut again = reconnect(&server, "alice", &format!("{}-0", u64::MAX)).await;
    again.next_frame().await;
    send(server.addr, request("GET", "/nope", None, "")).await;

    let reply = send(server.addr, request("GET", "/metrics", None, "")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(reply.body.to_vec()).unwrap();
    let value = |line_start: &str| -> u64 {
        let line = text
            .lines()
            .find(|line| line.starts_with(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert_eq!(value("artifact_events_open_streams "), 2);
    assert_eq!(
        value("artifact_events_events_published_total{type=\"artifact.progress\"}"),
        1
    );
    assert_eq!(
        value("artifact_events_events_delivered_total{type=\"artifact.progress\"}"),
        1
    );
    assert_eq!(
        value("artifact_events_events_published_total{type=\"custom.type\"}"),
        1
    );
    assert_eq!(
        value("artifact_events_events_delivered_total{type=\"custom.type\"}"),
        0
    );
    assert_eq!(value("artifact_events_jobs{status=\"queued\"}"), 0);
    assert!(value("artifact_events_http_responses_total{class=\"4xx\"}") >= 1);
    assert!(value("artifact_events_http_responses_total{class=\"2xx\"}") >= 2);
    assert_eq!(value("artifact_events_slow_consumer_disconnects_total"), 0);
    server.stop().await;
}

/// A client's view in the randomized test: what it should receive, and what it did.
struct Session {
    user: usize,
    client: SseClient,
    expected: Vec<u64>,
    received: Vec<(String, u64)>,
}

impl Session {
    /// Reads until everything expected so far has arrived, checking order and identity.
    async fn catch_up(&mut self) {
        while self.received.len() < self.expected.len() {
            let (id, event) = self.client.next_event_with_id().await;
            assert_eq!(
                event["user_id"],
                format!("user-{}", self.user),
                "leak: {event}"
            );
            let n = event["n"].as_u64().unwrap();
            assert_eq!(
                n,
                self.expected[self.received.len()],
                "user-{} out of order or duplicated",
                self.user
            );
            self.received.push((id.unwrap(), n));
        }
    }
}

/// A small deterministic generator (xorshift64*), so a failure can be replayed by its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

#[tokio::test]
async fn random_interleavings_deliver_every_event_exactly_once_to_exactly_its_users_streams() {
    const USERS: usize = 50;
    const OPERATIONS: usize = 1_500;
    let seed = std::env::var("DELIVERY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    eprintln!("seed {seed} (set DELIVERY_SEED to replay)");
    let mut rng = Rng(seed);
    let server = TestServer::start(config()).await;
    let mut published: Vec<Vec<u64>> = vec![Vec::new(); USERS];
    let mut sessions: Vec<Session> = Vec::new();
    // What each closed session had seen, to reconnect from (ids with the event number).
    let mut closed: Vec<(usize, Vec<(String, u64)>)> = Vec::new();
    let mut next_n = 0;

    for _ in 0..OPERATIONS {
        match rng.below(10) {
            0..=4 => {
                let user = rng.below(USERS);
                next_n += 1;
                publish(&server, &format!("user-{user}"), next_n).await;
                published[user].push(next_n);
                for session in sessions.iter_mut().filter(|session| session.user == user) {
                    session.expected.push(next_n);
                }
            }
            5 | 6 => {
                let user = rng.below(USERS);
                let mut client =
                    SseClient::connect(server.addr, &server.token(&format!("user-{user}"))).await;
                client.next_frame().await;
                sessions.push(Session {
                    user,
                    client,
                    expected: Vec::new(),
                    received: Vec::new(),
                });
            }
            7 | 8 if !sessions.is_empty() => {
                let mut session = sessions.swap_remove(rng.below(sessions.len()));
                session.catch_up().await;
                closed.push((session.user, session.received));
            }
            _ if !closed.is_empty() => {
                // Reconnect from some event this client had seen (not always the last one).
                let (user, seen) = closed.swap_remove(rng.below(closed.len()));
                let Some(from) = (!seen.is_empty()).then(|| rng.below(seen.len())) else {
                    continue;
                };
                let (last_id, last_n) = seen[from].clone();
                let mut client = reconnect(&server, &format!("user-{user}"), &last_id).await;
                client.next_frame().await;
                let expected = published[user]
                    .iter()
                    .copied()
                    .filter(|n| *n > last_n)
                    .collect();
                sessions.push(Session {
                    user,
                    client,
                    expected,
                    received: Vec::new(),
                });
            }
            _ => {}
        }
    }
    assert!(
        next_n > 500 && closed.len() + sessions.len() > 100,
        "the mix exercised too little"
    );
    // A sentinel for every user with an open session: `catch_up` then fails on anything that
    // arrives before it other than the expected events (a duplicate, or another user's).
    let listening: BTreeSet<usize> = sessions.iter().map(|session| session.user).collect();
    for user in listening {
        next_n += 1;
        publish(&server, &format!("user-{user}"), next_n).await;
        for session in sessions.iter_mut().filter(|session| session.user == user) {
            session.expected.push(next_n);
        }
    }
    for session in &mut sessions {
        session.catch_up().await;
    }
    server.stop().await;
}
