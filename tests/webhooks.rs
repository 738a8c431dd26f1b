//! Webhooks over real TCP: receivers on 127.0.0.1 (so `WEBHOOK_ALLOW_PRIVATE=1` where one is
//! reached), the signature checked by an independent implementation, retries with one
//! `webhook-id`, a receiver that hangs, a restart of the real binary mid-retries on SQLite,
//! the SSRF refusals, and users kept apart.

mod common;

use std::time::Duration;

use artifact_events::config::Config;
use artifact_events::webhooks::{SigningKey, Subscription};
use artifact_events::EventType;
use common::receiver::{Answer, Received, Receiver};
use common::{request, send, Reply, SseClient, TestServer, PATIENCE};
use hyper::StatusCode;
use serde_json::{json, Value};

/// A server whose webhooks may reach 127.0.0.1, retrying twice 50 ms apart.
fn config() -> Config {
    let mut config = common::config();
    config.webhooks.allow_private = true;
    config.webhooks.retry_schedule = vec![Duration::from_millis(50); 2];
    config
}

async fn register(server: &TestServer, user: &str, body: Value) -> Reply {
    let token = server.token(user);
    let request = request("POST", "/ai/webhooks", Some(&token), body.to_string());
    send(server.addr, request).await
}

/// Registers `url` for `user` and returns the answer (`id`, `secret`, ...).
async fn subscribe(server: &TestServer, user: &str, url: &str, types: Option<&[&str]>) -> Value {
    let reply = register(server, user, json!({"url": url, "event_types": types})).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    reply.json()
}

async fn get(server: &TestServer, user: &str, path: &str) -> Reply {
    send(
        server.addr,
        request("GET", path, Some(&server.token(user)), ""),
    )
    .await
}

/// The webhook's attempts once there are at least `count`, newest first.
async fn attempts(server: &TestServer, user: &str, id: &str, count: usize) -> Vec<Value> {
    let path = format!("/ai/webhooks/{id}/deliveries");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let reply = get(server, user, &path).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        let attempts = reply.json()["deliveries"].as_array().unwrap().clone();
        if attempts.len() >= count {
            return attempts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} attempts in time: {attempts:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn publish(server: &TestServer, event_type: &str, data: Value) {
    server
        .state
        .bus
        .publish(&EventType::from(event_type), data)
        .await;
}

/// Checks the Standard Webhooks headers of a request against `secret`.
fn assert_signed(received: &Received, secret: &str) {
    let id = received.header("webhook-id");
    let timestamp: u64 = received.header("webhook-timestamp").parse().unwrap();
    let expected = SigningKey::parse(secret)
        .unwrap()
        .sign(id, timestamp, &received.body);
    assert_eq!(received.header("webhook-signature"), expected);
    assert_eq!(received.header("content-type"), "application/json");
}

async fn metrics(server: &TestServer) -> String {
    let reply = send(server.addr, request("GET", "/metrics", None, "")).await;
    String::from_utf8(reply.body.to_vec()).unwrap()
}

// Two workers: the test blocks one while it waits for the verifier's next line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signature_verifies_with_the_standardwebhooks_package() {
    let Ok(python) = std::env::var("STANDARDWEBHOOKS_PYTHON") else {
        eprintln!(
            "skipped: STANDARDWEBHOOKS_PYTHON is not set (.ci/webhooks.sh sets it to a Python \
             with the standardwebhooks package)"
        );
        return;
    };
    use std::io::{BufRead, BufReader, Write};
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/webhooks/verify_receiver.py"
    );
    let mut verifier = std::process::Command::new(python)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(verifier.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let port = first.strip_prefix("port ").expect("the verifier's port");
    let (line_sender, line_receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            let _ = line_sender.send(line);
        }
    });
    let next_line = || {
        let line = line_receiver
            .recv_timeout(PATIENCE)
            .expect("the verifier answers");
        eprintln!("verifier: {line}");
        line
    };

    let server = TestServer::start(config()).await;
    let url = format!("http://127.0.0.1:{port}/hook?source=artifact-events");
    let webhook = subscribe(&server, "alice", &url, None).await;
    let secret = webhook["secret"].as_str().unwrap();
    let mut stdin = verifier.stdin.take().unwrap();
    writeln!(stdin, "{secret}").unwrap();
    let data = json!({"user_id": "alice", "job_id": "j1", "text": "é \u{2028} \"quoted\""});
    publish(&server, "artifact.completed", data.clone()).await;
    let line = next_line();
    let payload: Value = serde_json::from_str(
        line.strip_prefix("verified ")
            .unwrap_or_else(|| panic!("{line}")),
    )
    .unwrap();
    assert_eq!(payload["type"], "artifact.completed");
    assert_eq!(payload["data"], data);
    assert!(payload["timestamp"].as_str().unwrap().ends_with('Z'));
    let attempts = attempts(&server, "alice", webhook["id"].as_str().unwrap(), 1).await;
    assert_eq!(attempts[0]["status"], 204);

    // The verifier is not vacuous: the same headers over another body are refused.
    let mut received = Receiver::start(vec![], Answer::Status(200)).await;
    let own_url = received.url("/own");
    let own = Subscription {
        id: "wh_copy".to_owned(),
        user_id: "alice".to_owned(),
        url: own_url,
        event_types: None,
        key: SigningKey::parse(secret).unwrap(),
        created_at: "2026-12-02T00:00:00.000Z".to_owned(),
        disabled: false,
    };
    server.state.webhooks.add_unchecked(own).unwrap();
    publish(&server, "artifact.completed", data).await;
    assert!(next_line().starts_with("verified "));
    let copy = received.next().await;
    let mut forged = request(
        "POST",
        "/hook",
        None,
        String::from_utf8(copy.body.to_vec())
            .unwrap()
            .replace("j1", "j2"),
    );
    for name in [
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "content-type",
    ] {
        forged
            .headers_mut()
            .insert(name, copy.headers[name].clone());
    }
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(send(addr, forged).await.status, StatusCode::UNAUTHORIZED);
    assert!(next_line().starts_with("refused "));
    drop(stdin);
    verifier.wait().unwrap();
}

#[tokio::test]
async fn a_receiver_answering_500_twice_gets_three_attempts_with_one_webhook_id() {
    let server = TestServer::start(config()).await;
    let mut receiver = Receiver::start(
        vec![Answer::Status(500), Answer::Status(500)],
        Answer::Status(200),
    )
    .await;
    let webhook = subscribe(&server, "alice", &receiver.url("/hooks"), None).await;
    let secret = webhook["secret"].as_str().unwrap();
    publish(
        &server,
        "artifact.completed",
        json!({"user_id": "alice", "n": 1}),
    )
    .await;

    let first = receiver.next().await;
    let second = receiver.next().await;
    let third = receiver.next().await;
    for received in [&first, &second, &third] {
        assert_signed(received, secret);
        assert_eq!(received.path, "/hooks");
        assert_eq!(
            received.body, first.body,
            "every attempt sends the same body"
        );
    }
    let id = first.header("webhook-id");
    assert!(id.starts_with("msg_"), "{id}");
    assert_eq!(second.header("webhook-id"), id);
    assert_eq!(third.header("webhook-id"), id);

    let attempts = attempts(&server, "alice", webhook["id"].as_str().unwrap(), 3).await;
    let statuses: Vec<&Value> = attempts.iter().map(|a| &a["status"]).collect();
    assert_eq!(statuses, [&json!(200), &json!(500), &json!(500)]);
    assert_eq!(attempts[0]["error"], Value::Null);
    assert_eq!(attempts[2]["error"], "answered 500");
    let numbers: Vec<&Value> = attempts.iter().map(|a| &a["attempt"]).collect();
    assert_eq!(numbers, [&json!(3), &json!(2), &json!(1)]);
    assert!(attempts.iter().all(|a| a["message_id"] == id));

    server
        .wait_until("the delivery ends", |state| state.webhooks.pending() == 0)
        .await;
    let metrics = metrics(&server).await;
    for line in [
        "artifact_events_webhook_deliveries_total{outcome=\"delivered\"} 1",
        "artifact_events_webhook_attempts_total{outcome=\"http_error\"} 2",
        "artifact_events_webhook_attempts_total{outcome=\"success\"} 1",
        "artifact_events_webhook_queue_length 0",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn a_hanging_receiver_times_out_while_the_stream_gets_its_events() {
    let mut config = config();
    config.webhooks.timeout = Duration::from_secs(3);
    config.webhooks.retry_schedule = vec![Duration::from_secs(60)];
    let server = TestServer::start(config).await;
    let mut receiver = Receiver::start(vec![], Answer::Hang).await;
    let webhook = subscribe(&server, "alice", &receiver.url("/slow"), None).await;
    let id = webhook["id"].as_str().unwrap();
    let mut stream = SseClient::connected(server.addr, &server.token("alice")).await;

    common::publish_http(
        &server,
        "artifact.completed",
        json!({"user_id": "alice", "n": 1}),
    )
    .await;
    receiver.next().await;
    // The receiver holds the request; the stream has the event anyway, and a second one too.
    assert_eq!(stream.next_event().await["n"], 1);
    common::publish_http(
        &server,
        "artifact.completed",
        json!({"user_id": "alice", "n": 2}),
    )
    .await;
    assert_eq!(stream.next_event().await["n"], 2);
    let path = format!("/ai/webhooks/{id}/deliveries");
    let unanswered = get(&server, "alice", &path).await.json();
    assert_eq!(
        unanswered["deliveries"],
        json!([]),
        "no attempt has ended yet"
    );

    let attempts = attempts(&server, "alice", id, 2).await;
    for attempt in &attempts {
        assert_eq!(attempt["status"], Value::Null);
        let error = attempt["error"].as_str().unwrap();
        assert!(error.contains("no complete response within 3s"), "{error}");
        assert!(attempt["duration_ms"].as_u64().unwrap() >= 3000);
    }
    let metrics = metrics(&server).await;
    assert!(
        metrics.contains("artifact_events_webhook_attempts_total{outcome=\"timeout\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_hanging_receiver_holds_only_its_own_slots_and_others_are_still_served() {
    let mut config = config();
    config.webhooks.timeout = Duration::from_secs(60);
    let server = TestServer::start(config).await;
    let hanging = Receiver::start(vec![], Answer::Hang).await;
    subscribe(&server, "alice", &hanging.url("/"), None).await;
    let mut healthy = Receiver::start(vec![], Answer::Status(200)).await;
    subscribe(&server, "bob", &healthy.url("/"), None).await;
    // More than all the shared attempt slots, every one of them waiting on the hanging receiver.
    for n in 0..100 {
        publish(
            &server,
            "artifact.progress",
            json!({"user_id": "alice", "n": n}),
        )
        .await;
    }
    publish(&server, "artifact.completed", json!({"user_id": "bob"})).await;
    assert_eq!(healthy.next().await.json()["data"]["user_id"], "bob");
}

#[tokio::test]
async fn a_webhook_gets_the_data_as_published_byte_for_byte_like_the_stream() {
    let server = TestServer::start(config()).await;
    let mut receiver = Receiver::start(vec![], Answer::Status(200)).await;
    subscribe(&server, "alice", &receiver.url("/"), None).await;
    let mut stream = SseClient::connected(server.addr, &server.token("alice")).await;
    // Keys out of order and an escape a `Value` written out again would not keep.
    let data = r#"{"z": 1, "user_id": "alice", "s": "a \u00e9"}"#;
    let body = format!(r#"{{"event_type": "artifact.completed", "event_data": {data}}}"#);
    let token = server.publisher_token();
    let reply = send(
        server.addr,
        request("POST", "/ai/events/publish", Some(&token), body),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let compact = r#"{"z":1,"user_id":"alice","s":"a \u00e9"}"#;
    let frame = stream
        .next_frame()
        .await
        .expect("the stream gets the event");
    assert!(frame.contains(&format!("data: {compact}\n")), "{frame:?}");
    let received = receiver.next().await;
    let text = std::str::from_utf8(&received.body).unwrap();
    assert!(text.contains(&format!(r#""data":{compact}}}"#)), "{text}");
}

#[tokio::test]
async fn a_webhook_failing_its_whole_schedule_is_disabled_and_its_owner_told() {
    let server = TestServer::start(config()).await;
    let mut receiver = Receiver::start(vec![], Answer::Status(500)).await;
    let webhook = subscribe(&server, "alice", &receiver.url("/down"), None).await;
    let id = webhook["id"].as_str().unwrap();
    let mut stream = SseClient::connected(server.addr, &server.token("alice")).await;
    publish(
        &server,
        "artifact.completed",
        json!({"user_id": "alice", "n": 1}),
    )
    .await;
    assert_eq!(stream.next_event().await["n"], 1);

    let disabled = stream.next_event().await;
    assert_eq!(disabled["webhook_id"], id);
    assert_eq!(disabled["user_id"], "alice");
    let reason = disabled["reason"].as_str().unwrap();
    assert!(
        reason.contains("3 attempts") && reason.contains("answered 500"),
        "{reason}"
    );
    for _ in 0..3 {
        receiver.next().await;
    }
    let listed = get(&server, "alice", "/ai/webhooks").await.json();
    assert_eq!(listed["webhooks"][0]["disabled"], true);
    assert_eq!(attempts(&server, "alice", id, 3).await.len(), 3);

    // Nothing more is sent to it: the next event reaches only a new webhook.
    let mut sentinel = Receiver::start(vec![], Answer::Status(200)).await;
    subscribe(&server, "alice", &sentinel.url("/up"), None).await;
    publish(
        &server,
        "artifact.completed",
        json!({"user_id": "alice", "n": 2}),
    )
    .await;
    assert_eq!(sentinel.next().await.json()["data"]["n"], 2);
    let metrics = metrics(&server).await;
    assert!(
        metrics.contains("artifact_events_webhook_deliveries_total{outcome=\"exhausted\"} 1"),
        "{metrics}"
    );
    assert_eq!(attempts(&server, "alice", id, 3).await.len(), 3);
}

#[tokio::test]
async fn a_redirect_is_a_failed_attempt_never_followed() {
    let server = TestServer::start(config()).await;
    let mut elsewhere = Receiver::start(vec![], Answer::Status(200)).await;
    let location = elsewhere.url("/elsewhere");
    let redirecting = Receiver::start(vec![], Answer::Redirect(location)).await;
    let webhook = subscribe(&server, "alice", &redirecting.url("/moved"), None).await;
    publish(
        &server,
        "artifact.completed",
        json!({"user_id": "alice", "n": 1}),
    )
    .await;
    let attempts = attempts(&server, "alice", webhook["id"].as_str().unwrap(), 3).await;
    assert!(attempts.iter().all(|a| a["status"] == 307), "{attempts:?}");
    assert_eq!(attempts[0]["error"], "answered 307");
    // A sentinel: had any attempt been followed, its request would have reached `elsewhere`
    // before this one.
    subscribe(&server, "bob", &elsewhere.url("/sentinel"), None).await;
    publish(&server, "artifact.completed", json!({"user_id": "bob"})).await;
    assert_eq!(elsewhere.next().await.path, "/sentinel");
}

#[tokio::test]
async fn event_types_choose_what_a_webhook_receives() {
    let server = TestServer::start(config()).await;
    let mut receiver = Receiver::start(vec![], Answer::Status(200)).await;
    let only = ["artifact.completed", "artifact.failed"];
    let webhook = subscribe(&server, "alice", &receiver.url("/"), Some(&only)).await;
    assert_eq!(webhook["event_types"], json!(only));
    publish(
        &server,
        "artifact.started",
        json!({"user_id": "alice", "n": 1}),
    )
    .await;
    publish(
        &server,
        "artifact.completed",
        json!({"user_id": "bob", "n": 2}),
    )
    .await;
    publish(
        &server,
        "artifact.completed",
        json!({"user_id": "alice", "n": 3}),
    )
    .await;
    let first = receiver.next().await.json();
    assert_eq!(
        (first["type"].as_str(), &first["data"]["n"]),
        (Some("artifact.completed"), &json!(3))
    );
}

#[tokio::test]
async fn the_server_webhook_gets_every_users_events_signed_with_its_secret() {
    let mut receiver = Receiver::start(vec![], Answer::Status(204)).await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut config = common::config();
    config.webhooks.server = Some(artifact_events::webhooks::ServerWebhook {
        url: receiver.url("/backend"),
        key: SigningKey::parse(secret).unwrap(),
    });
    // Without WEBHOOK_ALLOW_PRIVATE: the operator's own URL is trusted to be internal.
    let server = TestServer::start(config).await;
    publish(&server, "artifact.completed", json!({"user_id": "alice"})).await;
    publish(&server, "artifact.failed", json!({"user_id": "bob"})).await;
    let mut users = Vec::new();
    for _ in 0..2 {
        let received = receiver.next().await;
        assert_signed(&received, secret);
        users.push(
            received.json()["data"]["user_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    users.sort();
    assert_eq!(users, ["alice", "bob"]);
}

#[tokio::test]
async fn a_full_queue_drops_counts_and_logs_instead_of_growing() {
    let mut config = config();
    config.webhooks.queue_capacity = 1;
    let server = TestServer::start(config).await;
    let mut receiver = Receiver::start(vec![], Answer::Hang).await;
    subscribe(&server, "alice", &receiver.url("/"), None).await;
    for n in 0..3 {
        publish(
            &server,
            "artifact.progress",
            json!({"user_id": "alice", "n": n}),
        )
        .await;
    }
    assert_eq!(receiver.next().await.json()["data"]["n"], 0);
    let metrics = metrics(&server).await;
    for line in [
        "artifact_events_webhook_deliveries_total{outcome=\"dropped\"} 2",
        "artifact_events_webhook_queue_length 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn private_addresses_are_refused_at_registration_without_the_flag() {
    let server = TestServer::start(common::config()).await;
    for url in [
        "http://127.0.0.1:9/hooks",
        "http://10.0.0.1/hooks",
        "http://[::1]:9/hooks",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:9/hooks",
        "http://[::ffff:192.168.0.1]/",
        "http://0.0.0.0:9/",
    ] {
        let reply = register(&server, "alice", json!({"url": url})).await;
        let error = reply.expect_error(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(error.contains("address policy refuses"), "{url}: {error}");
        assert!(
            !error.contains("/hooks") && !error.contains("meta-data"),
            "{error}"
        );
    }
    for (body, expected) in [
        (json!({"url": "ftp://example.com/"}), "scheme"),
        (json!({"url": "http://user:pw@example.com/"}), "credentials"),
        (json!({}), "url is required"),
        (json!({"url": 7}), "url must be a string"),
        (json!({"url": "http://a/", "event_types": []}), "omit it"),
        (
            json!({"url": "http://a/", "event_types": [1]}),
            "array of strings",
        ),
        (
            json!({"url": "http://a/", "secret": "mine"}),
            "unknown field",
        ),
    ] {
        let error = register(&server, "alice", body.clone())
            .await
            .expect_error(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(error.contains(expected), "{body}: {error}");
    }
    let https = register(&server, "alice", json!({"url": "https://127.0.0.1/"})).await;
    https.expect_error(StatusCode::UNPROCESSABLE_ENTITY);
    let listed = get(&server, "alice", "/ai/webhooks").await.json();
    assert_eq!(listed["webhooks"], json!([]));
}

#[tokio::test]
async fn private_addresses_are_refused_again_at_each_delivery() {
    // As if a name had resolved to a public address at registration and to 127.0.0.1 now.
    let server = TestServer::start(common::config()).await;
    let receiver = Receiver::start(vec![], Answer::Status(200)).await;
    let rebound = Subscription {
        id: "wh_rebound".to_owned(),
        user_id: "alice".to_owned(),
        url: receiver.url("/"),
        event_types: None,
        key: SigningKey::generate(),
        created_at: "2026-12-02T00:00:00.000Z".to_owned(),
        disabled: false,
    };
    server.state.webhooks.add_unchecked(rebound).unwrap();
    publish(&server, "artifact.completed", json!({"user_id": "alice"})).await;
    let attempt = &attempts(&server, "alice", "wh_rebound", 1).await[0];
    // No status: the request was never sent, though the receiver would have answered 200.
    assert_eq!(attempt["status"], Value::Null);
    let error = attempt["error"].as_str().unwrap();
    assert!(
        error.contains("127.0.0.1, which the address policy refuses"),
        "{error}"
    );
}

#[tokio::test]
async fn users_cannot_see_or_touch_each_others_webhooks() {
    let server = TestServer::start(config()).await;
    let receiver = Receiver::start(vec![], Answer::Status(200)).await;
    let alices = subscribe(&server, "alice", &receiver.url("/a"), None).await;
    let id = alices["id"].as_str().unwrap();
    assert!(alices["secret"].as_str().unwrap().starts_with("whsec_"));

    let bobs_list = get(&server, "bob", "/ai/webhooks").await.json();
    assert_eq!(bobs_list["webhooks"], json!([]));
    let path = format!("/ai/webhooks/{id}");
    let bob = server.token("bob");
    let deleted = send(server.addr, request("DELETE", &path, Some(&bob), "")).await;
    deleted.expect_error(StatusCode::NOT_FOUND);
    let deliveries = get(&server, "bob", &format!("{path}/deliveries")).await;
    deliveries.expect_error(StatusCode::NOT_FOUND);

    let alices_list = get(&server, "alice", "/ai/webhooks").await.json();
    let listed = &alices_list["webhooks"][0];
    assert_eq!(listed["id"], id);
    assert_eq!(listed["url"], receiver.url("/a"));
    assert!(listed.get("secret").is_none(), "{listed}");
    let unauthenticated = send(server.addr, request("GET", "/ai/webhooks", None, "")).await;
    unauthenticated.expect_error(StatusCode::UNAUTHORIZED);

    let alice = server.token("alice");
    let deleted = send(server.addr, request("DELETE", &path, Some(&alice), "")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let alices_list = get(&server, "alice", "/ai/webhooks").await.json();
    assert_eq!(alices_list["webhooks"], json!([]));
}

#[tokio::test]
async fn a_user_may_have_ten_webhooks() {
    let server = TestServer::start(config()).await;
    let receiver = Receiver::start(vec![], Answer::Status(200)).await;
    for n in 0..10 {
        subscribe(&server, "alice", &receiver.url(&format!("/{n}")), None).await;
    }
    let reply = register(&server, "alice", json!({"url": receiver.url("/10")})).await;
    reply.expect_error(StatusCode::CONFLICT);
    subscribe(&server, "bob", &receiver.url("/bob"), None).await;
}

/// The real binary on SQLite, SIGKILLed while an attempt is in flight after a failed one: the
/// restarted server makes the delivery, with the same `webhook-id`.
#[cfg(feature = "sqlite")]
#[tokio::test]
async fn a_delivery_interrupted_by_sigkill_is_made_after_the_restart() {
    use common::{binary_token, RunningServer, TempDir};
    let directory = TempDir::new("webhooks");
    let database = directory.join("webhooks.db");
    let database = database.to_str().unwrap();
    let env = [
        ("DATABASE_PATH", database),
        ("WEBHOOK_ALLOW_PRIVATE", "1"),
        ("WEBHOOK_RETRY_SCHEDULE_SECS", "0.1,0.1,0.1"),
        ("WEBHOOK_TIMEOUT_SECS", "60"),
    ];
    let mut receiver =
        Receiver::start(vec![Answer::Status(500), Answer::Hang], Answer::Status(200)).await;
    let server = RunningServer::start(&env);
    let alice = binary_token("alice");
    let body = json!({"url": receiver.url("/durable?token=s3cr3t-path")}).to_string();
    let reply = send(
        server.addr,
        request("POST", "/ai/webhooks", Some(&alice), body),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    let webhook_id = reply.json()["id"].as_str().unwrap().to_owned();
    let secret = reply.json()["secret"].as_str().unwrap().to_owned();
    let published = common::publish_to(
        server.addr,
        "artifact.completed",
        json!({"user_id": "alice", "job_id": "j-durable"}),
    )
    .await;
    assert_eq!(
        published.status,
        StatusCode::ACCEPTED,
        "{:?}",
        published.body
    );
    let failed = receiver.next().await;
    let in_flight = receiver.next().await;
    let message_id = failed.header("webhook-id").to_owned();
    assert_eq!(in_flight.header("webhook-id"), message_id);
    let log = server.kill();
    // What was logged of it all: never the secret, a signature, or the URL's path and query.
    let signature = failed.header("webhook-signature").trim_start_matches("v1,");
    let key = secret.trim_start_matches("whsec_");
    for hidden in [key, signature, "s3cr3t-path", "/durable"] {
        assert!(!log.contains(hidden), "{hidden} in the log:\n{log}");
    }
    assert!(
        log.contains(&webhook_id),
        "the log names the webhook:\n{log}"
    );

    let restarted = RunningServer::start(&env);
    let resumed = receiver.next().await;
    assert_eq!(resumed.header("webhook-id"), message_id);
    assert_eq!(resumed.body, failed.body);
    assert_eq!(resumed.json()["data"]["job_id"], "j-durable");
    let path = format!("/ai/webhooks/{webhook_id}/deliveries");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let reply = send(restarted.addr, request("GET", &path, Some(&alice), "")).await;
        let deliveries = reply.json()["deliveries"].clone();
        if deliveries[0]["status"] == 200 {
            assert_eq!(deliveries[0]["message_id"], message_id.as_str());
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{deliveries}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
