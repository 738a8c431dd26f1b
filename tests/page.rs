//! The demo page and what it relies on, over real TCP: `GET /` (HTML, test ids, a strict content
//! security policy), the development session cookie, cookie authentication of the job routes,
//! and the JSON content type that keeps cookie-authenticated POSTs safe from cross-site forms.

mod common;

use bytes::Bytes;
use common::{config, open, request, send, Reply, SseClient, TestServer};
use http_body_util::Full;
use hyper::{Request, StatusCode};
use serde_json::json;

const SESSION: &str = "/ai/dev/session";
const GENERATE: &str = "/ai/artifact/generate";
const JOBS: &str = "/ai/artifact/jobs";
const STREAM: &str = "/ai/artifact/events/stream";
const CONTENT: &str = "Photosynthesis is the process by which green plants convert light energy into chemical energy. It takes place mainly in the chloroplasts of leaf cells. Chlorophyll, the green pigment in chloroplasts, absorbs red and blue light. During the light reactions, water molecules are split and oxygen is released as a byproduct. The Calvin cycle then uses carbon dioxide from the air to build glucose.";

/// A server in development mode, as the binary is without `JWT_SECRET`.
async fn development_server() -> TestServer {
    let mut config = config();
    config.development_secret = true;
    TestServer::start(config).await
}

/// A request with no token, a `Cookie` header if given, and a `Content-Type` if given.
fn browser_request(
    method: &str,
    path: &str,
    cookie: Option<&str>,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut request = request(method, path, None, body);
    if let Some(cookie) = cookie {
        request
            .headers_mut()
            .insert("cookie", cookie.parse().unwrap());
    }
    if let Some(content_type) = content_type {
        request
            .headers_mut()
            .insert("content-type", content_type.parse().unwrap());
    }
    request
}

/// Signs in through the development session and returns the `name=value` to send back.
async fn sign_in(server: &TestServer, user_id: &str) -> String {
    let body = json!({ "user_id": user_id }).to_string();
    let reply = send(
        server.addr,
        browser_request("POST", SESSION, None, Some("application/json"), body),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "body: {:?}", reply.body);
    assert_eq!(reply.json(), json!({ "user_id": user_id }));
    let set_cookie = reply.headers["set-cookie"].to_str().unwrap();
    set_cookie.split(';').next().unwrap().to_owned()
}

fn generate_body(content: &str) -> String {
    json!({"notebook_id": "nb", "artifact_type": "quiz", "content": content}).to_string()
}

/// The `content-security-policy` directive `name`'s value.
fn directive<'a>(policy: &'a str, name: &str) -> Option<&'a str> {
    policy
        .split(';')
        .map(str::trim)
        .find_map(|directive| directive.strip_prefix(name)?.strip_prefix(' '))
}

fn page_text(reply: &Reply) -> &str {
    std::str::from_utf8(&reply.body).unwrap()
}

#[tokio::test]
async fn the_page_is_html_with_its_test_ids_under_a_strict_content_security_policy() {
    let server = development_server().await;
    let reply = send(server.addr, request("GET", "/", None, "")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(reply.headers["cache-control"], "no-cache");
    assert_eq!(reply.headers["x-content-type-options"], "nosniff");
    let policy = reply.headers["content-security-policy"].to_str().unwrap();
    assert_eq!(directive(policy, "default-src"), Some("'self'"));
    assert_eq!(directive(policy, "object-src"), Some("'none'"));
    assert_eq!(directive(policy, "frame-ancestors"), Some("'none'"));
    assert!(!policy.contains("unsafe"), "{policy}");
    let script = directive(policy, "script-src").unwrap();
    let nonce = script
        .strip_prefix("'nonce-")
        .and_then(|rest| rest.strip_suffix('\''))
        .unwrap_or_else(|| panic!("script-src is one nonce: {script}"));
    assert_eq!(directive(policy, "style-src"), Some(script));

    let page = page_text(&reply);
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains(&format!("<script nonce=\"{nonce}\">")));
    assert!(page.contains(&format!("<style nonce=\"{nonce}\">")));
    assert!(!page.contains("__"), "every placeholder is filled");
    assert!(page.contains("data-development-mode=\"true\" data-session=\"false\""));
    for (testid, tag) in [
        ("user-id", "input"),
        ("login", "button"),
        ("content", "textarea"),
        ("artifact-type", "select"),
        ("generate", "button"),
        ("connection", "span"),
        ("job", "li"),
        ("progress", "progress"),
        ("result", "div"),
        ("error", "p"),
    ] {
        let attribute = format!("data-testid=\"{testid}\"");
        let at = page
            .find(&attribute)
            .unwrap_or_else(|| panic!("no {attribute}"));
        let tag_start = page[..at].rfind('<').unwrap();
        assert!(
            page[tag_start + 1..].starts_with(tag),
            "{attribute} is on a <{tag}>"
        );
    }

    let again = send(server.addr, request("GET", "/", None, "")).await;
    let other = again.headers["content-security-policy"].to_str().unwrap();
    assert_ne!(
        directive(other, "script-src"),
        Some(script),
        "a fresh nonce"
    );

    for method in ["POST", "PUT", "DELETE"] {
        let reply = send(server.addr, request(method, "/", None, "")).await;
        reply.expect_error(StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(reply.headers["allow"], "GET");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_development_session_cookie_authenticates_the_jobs_and_the_stream() {
    let server = development_server().await;
    let body = json!({"user_id": "ada"}).to_string();
    let reply = send(
        server.addr,
        browser_request("POST", SESSION, None, Some("application/json"), body),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "body: {:?}", reply.body);
    assert_eq!(reply.json(), json!({"user_id": "ada"}));
    let set_cookie = reply.headers["set-cookie"].to_str().unwrap();
    let attributes: Vec<&str> = set_cookie.split(';').map(str::trim).collect();
    let token = attributes[0].strip_prefix("access_token=").unwrap();
    let identity = server.state.auth.verify(token).await.unwrap();
    assert_eq!(identity.user_id, "ada");
    assert!(!identity.publisher);
    for attribute in ["Path=/", "HttpOnly", "SameSite=Strict"] {
        assert!(attributes.contains(&attribute), "{set_cookie}");
    }
    let cookie = format!("theme=dark; access_token={token}");

    let page = send(
        server.addr,
        browser_request("GET", "/", Some(&cookie), None, ""),
    )
    .await;
    assert!(page_text(&page).contains("data-session=\"true\""));

    let stream = open(
        server.addr,
        browser_request("GET", STREAM, Some(&cookie), None, ""),
    )
    .await;
    let mut events = SseClient::from_response(stream);
    assert_eq!(events.status, StatusCode::OK);
    assert_eq!(
        events.next_event().await,
        json!({"type": "connected", "user_id": "ada"})
    );

    let reply = send(
        server.addr,
        browser_request(
            "POST",
            GENERATE,
            Some(&cookie),
            Some("application/json; charset=utf-8"),
            generate_body(CONTENT),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "body: {:?}", reply.body);
    let job_id = reply.json()["job_id"].as_str().unwrap().to_owned();
    let completed = loop {
        let event = events.next_event().await;
        assert_eq!(event["job_id"], job_id.as_str());
        assert_eq!(event["user_id"], "ada");
        if event.get("result").is_some() {
            break event;
        }
    };
    assert_eq!(
        completed["result"]["questions"].as_array().unwrap().len(),
        5
    );

    let list = send(
        server.addr,
        browser_request("GET", JOBS, Some(&cookie), None, ""),
    )
    .await;
    assert_eq!(list.status, StatusCode::OK);
    let jobs = list.json()["jobs"].as_array().unwrap().clone();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["job_id"], job_id.as_str());
    assert_eq!(jobs[0]["status"], "completed");
    let job = send(
        server.addr,
        browser_request("GET", &format!("{JOBS}/{job_id}"), Some(&cookie), None, ""),
    )
    .await;
    assert_eq!(job.status, StatusCode::OK);
    assert_eq!(job.json()["status"], "completed");
    let cancel = send(
        server.addr,
        browser_request(
            "POST",
            &format!("{JOBS}/{job_id}/cancel"),
            Some(&cookie),
            Some("application/json"),
            "",
        ),
    )
    .await;
    assert_eq!(
        cancel.expect_error(StatusCode::CONFLICT),
        "job is already completed"
    );

    // Another user's session sees none of ada's jobs.
    let bob = sign_in(&server, "bob").await;
    let list = send(
        server.addr,
        browser_request("GET", JOBS, Some(&bob), None, ""),
    )
    .await;
    assert_eq!(list.json(), json!({"jobs": []}));
    server.stop().await;
}

#[tokio::test]
async fn the_development_session_is_refused_for_a_bad_user_id_or_a_body_that_is_not_json() {
    let server = development_server().await;
    for user_id in [json!(""), json!("  "), json!("a\u{1b}[31m"), json!(42)] {
        let body = json!({ "user_id": user_id }).to_string();
        let reply = send(
            server.addr,
            browser_request("POST", SESSION, None, Some("application/json"), body),
        )
        .await;
        reply.expect_error(StatusCode::UNPROCESSABLE_ENTITY);
        assert!(!reply.headers.contains_key("set-cookie"), "{user_id}");
    }
    let long = json!({ "user_id": "u".repeat(257) }).to_string();
    let reply = send(
        server.addr,
        browser_request("POST", SESSION, None, Some("application/json"), long),
    )
    .await;
    reply.expect_error(StatusCode::UNPROCESSABLE_ENTITY);
    for content_type in [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("text/plain"),
    ] {
        let reply = send(
            server.addr,
            browser_request("POST", SESSION, None, content_type, "user_id=mallory"),
        )
        .await;
        reply.expect_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(!reply.headers.contains_key("set-cookie"));
    }
    let reply = send(server.addr, request("GET", SESSION, None, "")).await;
    reply.expect_error(StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.headers["allow"], "POST");
    server.stop().await;
}

#[tokio::test]
async fn the_development_session_does_not_exist_outside_development_mode() {
    let server = TestServer::start(config()).await;
    for method in ["POST", "GET", "OPTIONS"] {
        let body = json!({"user_id": "ada"}).to_string();
        let reply = send(
            server.addr,
            browser_request(method, SESSION, None, Some("application/json"), body),
        )
        .await;
        assert_eq!(reply.expect_error(StatusCode::NOT_FOUND), "not found");
        assert!(!reply.headers.contains_key("set-cookie"));
    }
    // The page still works, on the application's own cookie.
    let cookie = format!("access_token={}", server.token("ada"));
    let page = send(
        server.addr,
        browser_request("GET", "/", Some(&cookie), None, ""),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page_text(&page).contains("data-development-mode=\"false\" data-session=\"true\""));
    server.stop().await;
}

#[tokio::test]
async fn a_development_server_on_a_public_address_signs_nobody_in() {
    // JWT_SECRET forgotten on a server that listens beyond this machine: the network must not
    // be able to act as any user.
    let mut settings = config();
    settings.development_secret = true;
    settings.addr = "0.0.0.0:8000".parse().unwrap();
    let server = TestServer::start(settings).await;
    let body = json!({"user_id": "ada"}).to_string();
    let reply = send(
        server.addr,
        browser_request("POST", SESSION, None, Some("application/json"), body),
    )
    .await;
    assert_eq!(reply.expect_error(StatusCode::NOT_FOUND), "not found");
    assert!(!reply.headers.contains_key("set-cookie"));
    let page = send(server.addr, browser_request("GET", "/", None, None, "")).await;
    assert!(page_text(&page).contains("data-development-mode=\"false\""));
    server.stop().await;
}

#[tokio::test]
async fn a_cookie_authenticated_post_without_a_json_content_type_is_refused() {
    let server = development_server().await;
    let cookie = sign_in(&server, "ada").await;
    for content_type in [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("text/plain"),
    ] {
        let reply = send(
            server.addr,
            browser_request(
                "POST",
                GENERATE,
                Some(&cookie),
                content_type,
                generate_body(CONTENT),
            ),
        )
        .await;
        let error = reply.expect_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(error.contains("application/json"), "{error}");
    }
    let list = send(
        server.addr,
        browser_request("GET", JOBS, Some(&cookie), None, ""),
    )
    .await;
    assert_eq!(list.json(), json!({"jobs": []}), "no job was created");
    let cancel = send(
        server.addr,
        browser_request(
            "POST",
            &format!("{JOBS}/0123/cancel"),
            Some(&cookie),
            Some("text/plain"),
            "",
        ),
    )
    .await;
    cancel.expect_error(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    server.stop().await;
}

#[tokio::test]
async fn the_bearer_header_api_is_unchanged_and_wins_over_a_cookie() {
    let server = development_server().await;
    let token = server.token("ada");
    // As before: a header-authenticated POST needs no content type.
    let reply = send(
        server.addr,
        request("POST", GENERATE, Some(&token), generate_body(CONTENT)),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "body: {:?}", reply.body);
    let job_id = reply.json()["job_id"].as_str().unwrap().to_owned();
    let job = send(
        server.addr,
        request("GET", &format!("{JOBS}/{job_id}"), Some(&token), ""),
    )
    .await;
    assert_eq!(job.status, StatusCode::OK);

    // A bad header is reported, not replaced by a good cookie.
    let cookie = sign_in(&server, "ada").await;
    let mut with_both = browser_request("GET", JOBS, Some(&cookie), None, "");
    with_both
        .headers_mut()
        .insert("authorization", "Bearer not-a-token".parse().unwrap());
    send(server.addr, with_both)
        .await
        .expect_error(StatusCode::UNAUTHORIZED);

    // Publishing stays header-only: a cookie is not enough, even a publisher's.
    let publisher = format!("access_token={}", server.publisher_token());
    let body = json!({"event_type": "x", "event_data": {"user_id": "ada"}}).to_string();
    let reply = send(
        server.addr,
        browser_request(
            "POST",
            "/ai/events/publish",
            Some(&publisher),
            Some("application/json"),
            body,
        ),
    )
    .await;
    reply.expect_error(StatusCode::UNAUTHORIZED);

    // An invalid cookie is a 401, as a missing one is.
    let reply = send(
        server.addr,
        browser_request("GET", JOBS, Some("access_token=forged"), None, ""),
    )
    .await;
    reply.expect_error(StatusCode::UNAUTHORIZED);
    send(server.addr, request("GET", JOBS, None, ""))
        .await
        .expect_error(StatusCode::UNAUTHORIZED);
    server.stop().await;
}
