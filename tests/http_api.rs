//! Authentication and the HTTP surface over real TCP: every 401/403 case, 400/404/405/413/503.

mod common;

use std::time::Duration;

use common::{config, request, send, SseClient, TestServer, SECRET};
use hyper::StatusCode;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

const STREAM: &str = "/ai/artifact/events/stream";
const PUBLISH: &str = "/ai/events/publish";

fn sign(claims: &serde_json::Value, algorithm: Algorithm, secret: &str) -> String {
    encode(
        &Header::new(algorithm),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn in_an_hour() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now.as_secs() + 3600
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, byte)| n | u32::from(*byte) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

async fn expect_unauthorized(server: &TestServer, authorization: Option<&str>, reason: &str) {
    let mut builder = hyper::Request::builder().uri(STREAM).header("host", "x");
    if let Some(value) = authorization {
        builder = builder.header("authorization", value);
    }
    let reply = send(
        server.addr,
        builder
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    let message = reply.expect_error(StatusCode::UNAUTHORIZED);
    assert_eq!(message, reason, "for authorization {authorization:?}");
    let challenge = reply.headers["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer realm="), "{challenge}");
    assert_eq!(
        challenge.contains("error=\"invalid_token\""),
        authorization.is_some(),
        "an error code only when a token was sent: {challenge}"
    );
}

#[tokio::test]
async fn every_bad_credential_gets_401_with_a_bearer_challenge() {
    let server = TestServer::start(config()).await;
    let good_claims = json!({"sub": "alice", "exp": in_an_hour()});
    let expired = sign(
        &json!({"sub": "alice", "exp": 1_000_000}),
        Algorithm::HS256,
        SECRET,
    );
    let wrong_secret = sign(&good_claims, Algorithm::HS256, "not-the-secret");
    let other_algorithm = sign(&good_claims, Algorithm::HS512, SECRET);
    let no_sub = sign(&json!({"exp": in_an_hour()}), Algorithm::HS256, SECRET);
    let empty_sub = sign(
        &json!({"sub": "", "exp": in_an_hour()}),
        Algorithm::HS256,
        SECRET,
    );
    let blank_sub = sign(
        &json!({"sub": " \t", "exp": in_an_hour()}),
        Algorithm::HS256,
        SECRET,
    );
    let not_yet = sign(
        &json!({"sub": "alice", "exp": in_an_hour() + 3600, "nbf": in_an_hour()}),
        Algorithm::HS256,
        SECRET,
    );
    let no_exp = sign(&json!({"sub": "alice"}), Algorithm::HS256, SECRET);
    let alg_none = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(good_claims.to_string().as_bytes())
    );
    let good = sign(&good_claims, Algorithm::HS256, SECRET);
    let tampered = {
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        parts[1] = base64url(
            json!({"sub": "mallory", "exp": in_an_hour()})
                .to_string()
                .as_bytes(),
        );
        parts.join(".")
    };

    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing bearer token"),
        (
            Some(format!("Basic {good}")),
            "authorization header is not 'Bearer <token>'",
        ),
        (
            Some("Bearer ".into()),
            "authorization header is not 'Bearer <token>'",
        ),
        (Some("Bearer not.a.jwt".into()), "token is malformed"),
        (Some("Bearer garbage".into()), "token is malformed"),
        (Some(format!("Bearer {expired}")), "token has expired"),
        (
            Some(format!("Bearer {wrong_secret}")),
            "token signature is invalid",
        ),
        (
            Some(format!("Bearer {tampered}")),
            "token signature is invalid",
        ),
        (
            Some(format!("Bearer {other_algorithm}")),
            "token algorithm is not accepted",
        ),
        (
            Some(format!("Bearer {alg_none}")),
            "token algorithm is not accepted",
        ),
        (Some(format!("Bearer {no_sub}")), "token has no sub claim"),
        (
            Some(format!("Bearer {empty_sub}")),
            "token has no sub claim",
        ),
        (Some(format!("Bearer {no_exp}")), "token has no exp claim"),
        (
            Some(format!("Bearer {blank_sub}")),
            "token has no sub claim",
        ),
        (
            Some(format!("Bearer {not_yet}")),
            "token is not valid yet (nbf)",
        ),
    ];
    for (authorization, reason) in &cases {
        expect_unauthorized(&server, authorization.as_deref(), reason).await;
    }
    assert_eq!(server.state.streams.stream_count(), 0);

    // The same token, correctly signed, is accepted.
    let mut client = SseClient::connect(server.addr, &good).await;
    assert_eq!(client.status, 200);
    assert!(client.next_frame().await.unwrap().contains("\"alice\""));
    // The scheme is matched without regard to case (RFC 7235).
    let jobs = |scheme: &str| {
        let mut get = request("GET", "/ai/artifact/jobs", None, "");
        let value = format!("{scheme} {good}").parse().unwrap();
        get.headers_mut().insert("authorization", value);
        get
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        assert_eq!(
            send(server.addr, jobs(scheme)).await.status,
            StatusCode::OK,
            "{scheme}"
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn the_accepted_algorithm_comes_from_configuration() {
    let mut settings = config();
    settings.jwt_algorithm = Algorithm::HS512;
    let server = TestServer::start(settings).await;
    let claims = json!({"sub": "alice", "exp": in_an_hour()});
    let hs256 = sign(&claims, Algorithm::HS256, SECRET);
    expect_unauthorized(
        &server,
        Some(&format!("Bearer {hs256}")),
        "token algorithm is not accepted",
    )
    .await;
    let hs512 = sign(&claims, Algorithm::HS512, SECRET);
    assert_eq!(SseClient::connect(server.addr, &hs512).await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn publishing_needs_a_valid_token_with_the_publisher_role() {
    let server = TestServer::start(config()).await;
    let body =
        json!({"event_type": "artifact.completed", "event_data": {"user_id": "u"}}).to_string();

    let anonymous = send(server.addr, request("POST", PUBLISH, None, body.clone())).await;
    anonymous.expect_error(StatusCode::UNAUTHORIZED);
    let user = send(
        server.addr,
        request("POST", PUBLISH, Some(&server.token("u")), body.clone()),
    )
    .await;
    assert_eq!(
        user.expect_error(StatusCode::FORBIDDEN),
        "token lacks the publisher role"
    );
    let other_role = sign(
        &json!({"sub": "svc", "exp": in_an_hour(), "role": "admin"}),
        Algorithm::HS256,
        SECRET,
    );
    let admin = send(
        server.addr,
        request("POST", PUBLISH, Some(&other_role), body.clone()),
    )
    .await;
    admin.expect_error(StatusCode::FORBIDDEN);

    let publisher = send(
        server.addr,
        request("POST", PUBLISH, Some(&server.publisher_token()), body),
    )
    .await;
    assert_eq!(publisher.status, StatusCode::ACCEPTED);
    assert_eq!(publisher.json()["status"], "published");
    server.stop().await;
}

#[tokio::test]
async fn bad_publish_bodies_get_400_and_publish_nothing() {
    let server = TestServer::start(config()).await;
    let mut client = SseClient::connected(server.addr, &server.token("u")).await;
    let token = server.publisher_token();
    let bodies = [
        ("{not json", "malformed JSON"),
        ("[]", "event_type"),
        (r#"{"event_data": {"user_id": "u"}}"#, "event_type"),
        (
            r#"{"event_type": "", "event_data": {"user_id": "u"}}"#,
            "event_type",
        ),
        (
            r#"{"event_type": "*", "event_data": {"user_id": "u"}}"#,
            "event_type",
        ),
        (
            r#"{"event_type": 5, "event_data": {"user_id": "u"}}"#,
            "event_type",
        ),
        (
            r#"{"event_type": "a\nb", "event_data": {"user_id": "u"}}"#,
            "event_type",
        ),
        (
            &json!({"event_type": "x".repeat(129), "event_data": {"user_id": "u"}}).to_string(),
            "event_type",
        ),
        (r#"{"event_type": "t"}"#, "event_data"),
        (
            r#"{"event_type": "t", "event_data": {"job_id": "j"}}"#,
            "user_id",
        ),
        (
            r#"{"event_type": "t", "event_data": {"user_id": 7}}"#,
            "user_id",
        ),
        (r#"{"event_type": "t", "event_data": "u"}"#, "event_data"),
        // Arrays are not objects, even where a struct could be read from one.
        (r#"["t", {"user_id": "u"}]"#, "event_type"),
        (r#"{"event_type": "t", "event_data": ["u"]}"#, "event_data"),
        // A number no `f64` holds would fail whoever parses the data later.
        (
            r#"{"event_type": "t", "event_data": {"user_id": "u", "n": 1e400}}"#,
            "malformed JSON",
        ),
        (
            r#"{"event_type": "t", "event_data": {"user_id": "u", "n": 123456789012345678901234567890e300}}"#,
            "malformed JSON",
        ),
    ];
    for (body, mentions) in bodies {
        let reply = send(
            server.addr,
            request("POST", PUBLISH, Some(&token), body.to_owned()),
        )
        .await;
        let message = reply.expect_error(StatusCode::BAD_REQUEST);
        assert!(message.contains(mentions), "{body}: {message}");
    }
    // 128 characters of two bytes each is within the limit.
    let longest = json!({"event_type": "é".repeat(128), "event_data": {"user_id": "u"}});
    let reply = send(
        server.addr,
        request("POST", PUBLISH, Some(&token), longest.to_string()),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    client
        .next_frame()
        .await
        .expect("the event with the longest type arrives");
    assert!(
        client
            .next_frame_within(Duration::from_millis(200))
            .await
            .is_err(),
        "a bad body was published"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_frame_carries_the_publishers_json_as_sent_without_its_whitespace() {
    let server = TestServer::start(config()).await;
    let mut client = SseClient::connected(server.addr, &server.token("u")).await;
    // Keys out of order, escapes, spaces and line breaks inside and outside strings.
    let body = "{\"event_type\": \"t\", \"event_data\": {\n  \"z\": 1,\r\n\t\"user_id\": \"u\",\n  \"a\": [ 1, -2.5e3 ],\n  \"s\": \"a b\\\" \\u00e9\\n\"\n}\n}";
    let reply = send(
        server.addr,
        request(
            "POST",
            PUBLISH,
            Some(&server.publisher_token()),
            body.to_owned(),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{:?}", reply.body);
    let frame = client.next_frame().await.expect("the event arrives");
    let data = frame.lines().find_map(|line| line.strip_prefix("data: "));
    assert_eq!(
        data,
        Some(r#"{"z":1,"user_id":"u","a":[1,-2.5e3],"s":"a b\" \u00e9\n"}"#),
        "{frame:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn bodies_over_one_mebibyte_get_413() {
    let server = TestServer::start(config()).await;
    let token = server.publisher_token();
    let padding = "x".repeat(1024 * 1024);
    let body =
        json!({"event_type": "t", "event_data": {"user_id": "u", "pad": padding}}).to_string();
    let declared = send(
        server.addr,
        request("POST", PUBLISH, Some(&token), body.clone()),
    )
    .await;
    declared.expect_error(StatusCode::PAYLOAD_TOO_LARGE);

    // Without a Content-Length (chunked), the limit is enforced while reading.
    let chunks = body
        .into_bytes()
        .chunks(64 * 1024)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method("POST")
        .uri(PUBLISH)
        .header("host", "x")
        .header("authorization", format!("Bearer {token}"))
        .body(ChunkedBody(chunks))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    server.stop().await;
}

/// A body of unknown length, so hyper sends it with chunked transfer-encoding.
struct ChunkedBody(std::collections::VecDeque<bytes::Bytes>);

impl hyper::body::Body for ChunkedBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.0
                .pop_front()
                .map(|chunk| Ok(hyper::body::Frame::data(chunk))),
        )
    }
}

#[tokio::test]
async fn unknown_paths_get_404_and_wrong_methods_get_405_with_allow() {
    let server = TestServer::start(config()).await;
    for path in [
        "/nope",
        "/ai/artifact/events",
        "/ai/artifact/events/stream/extra",
        "/healthz/x",
    ] {
        let reply = send(server.addr, request("GET", path, None, "")).await;
        assert_eq!(
            reply.expect_error(StatusCode::NOT_FOUND),
            "not found",
            "{path}"
        );
    }
    for (method, path, allow) in [
        ("POST", "/", "GET"),
        ("POST", "/healthz", "GET"),
        ("POST", "/readyz", "GET"),
        ("DELETE", STREAM, "GET"),
        ("POST", STREAM, "GET"),
        ("GET", PUBLISH, "POST"),
    ] {
        let reply = send(server.addr, request(method, path, None, "")).await;
        reply.expect_error(StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(reply.headers["allow"], allow, "{method} {path}");
    }
    let health = send(server.addr, request("GET", "/healthz", None, "")).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json(), json!({"status": "ok"}));
    server.stop().await;
}

#[tokio::test]
async fn the_openapi_document_is_served_as_json_without_a_token() {
    let server = TestServer::start(config()).await;
    let reply = send(server.addr, request("GET", "/openapi.json", None, "")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.body, include_str!("../src/server/openapi.json"));
    assert_eq!(reply.json()["openapi"], "3.1.0");
    server.stop().await;
}

#[tokio::test]
async fn readiness_ends_when_shutdown_begins_while_liveness_stays() {
    let server = TestServer::start(config()).await;
    let ready = send(server.addr, request("GET", "/readyz", None, "")).await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.json(), json!({"status": "ready"}));
    server.state.start_draining();
    let draining = send(server.addr, request("GET", "/readyz", None, "")).await;
    assert_eq!(
        draining.expect_error(StatusCode::SERVICE_UNAVAILABLE),
        "the server is shutting down"
    );
    assert!(draining.headers.contains_key("retry-after"));
    let health = send(server.addr, request("GET", "/healthz", None, "")).await;
    assert_eq!(health.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let server = TestServer::start(config()).await;
    let huge = "a".repeat(64 * 1024);
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {huge}\r\n\r\n");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.write_all(head.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(common::PATIENCE, stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_head_is_cut_off() {
    let mut settings = config();
    settings.header_read_timeout = Duration::from_secs(1);
    let server = TestServer::start(settings).await;
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let read = tokio::time::timeout(common::PATIENCE, stream.read_to_end(&mut response)).await;
    assert!(read.is_ok(), "the connection stayed open");
    server.stop().await;
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408_and_frees_its_slot_while_others_are_served() {
    let mut settings = config();
    settings.body_read_timeout = Duration::from_secs(1);
    settings.max_connections = 3;
    let server = TestServer::start(settings).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Two connections that declare a large body and send one byte of it: the M2 attack.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "POST /ai/artifact/generate HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
             content-type: application/json\r\ncontent-length: 800000\r\n\r\n{{",
            server.token("mallory")
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        slow.push(stream);
    }
    // Meanwhile the third slot serves everyone else.
    let health = send(server.addr, request("GET", "/healthz", None, "")).await;
    assert_eq!(health.status, StatusCode::OK);
    for mut stream in slow {
        let mut response = Vec::new();
        let read = tokio::time::timeout(common::PATIENCE, stream.read_to_end(&mut response)).await;
        assert!(read.is_ok(), "the connection stayed open");
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("connection: close"), "{text}");
        assert!(
            text.contains(r#"{"error":"the request body did not arrive within 1 s"}"#),
            "{text}"
        );
    }
    // Their slots are free again (as soon as their tasks end): two streams and a request fit
    // the three slots.
    let mut streams = Vec::new();
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    while streams.len() < 2 {
        let stream = SseClient::connect(server.addr, &server.token("a")).await;
        if stream.status == StatusCode::OK {
            streams.push(stream);
        }
        assert!(tokio::time::Instant::now() < deadline, "slots never freed");
    }
    let health = send(server.addr, request("GET", "/healthz", None, "")).await;
    assert_eq!(health.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_get_503_with_retry_after() {
    let mut settings = config();
    settings.max_connections = 2;
    let server = TestServer::start(settings).await;
    let _first = SseClient::connect(server.addr, &server.token("a")).await;
    let _second = SseClient::connect(server.addr, &server.token("b")).await;
    let third = send(server.addr, request("GET", "/healthz", None, "")).await;
    third.expect_error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.headers["retry-after"], "5");
    assert_eq!(third.headers["connection"], "close");
    let metrics = server.state.metrics.render(0, &[]);
    assert!(
        metrics.contains("class=\"5xx\"} 1"),
        "the refusal is counted like any answer: {metrics}"
    );
    drop(_first);
    // A freed slot is usable again.
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        let reply = send(server.addr, request("GET", "/healthz", None, "")).await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}
