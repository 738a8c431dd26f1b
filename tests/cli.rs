//! The `artifact-events` binary as a user runs it: token printing, listening, help, serving,
//! SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{ChildStdout, Command, Stdio};

use artifact_events::server::Authenticator;
use common::{
    binary_token as token, config, publish_http, request, send, RunningServer, SseClient,
    TestServer, BINARY, PATIENCE, SECRET,
};
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokio::sync::mpsc;

#[tokio::test]
async fn token_prints_a_jwt_the_server_accepts() {
    let output = Command::new(BINARY)
        .args(["token", "alice", "--publisher", "--ttl", "60"])
        .env("JWT_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let token = String::from_utf8(output.stdout).unwrap();
    let identity = Authenticator::new(SECRET.as_bytes(), Algorithm::HS256)
        .verify(token.trim())
        .await
        .unwrap();
    assert_eq!(identity.user_id, "alice");
    assert!(identity.publisher);
}

#[test]
fn token_without_a_secret_is_refused_with_a_reason() {
    let output = Command::new(BINARY)
        .args(["token", "alice"])
        .env_remove("JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("JWT_SECRET is not set"));
}

/// The variables of the README's configuration table, in its order.
fn readme_settings() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("## Configuration")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the README has a Configuration section");
    let names: Vec<String> = table
        .lines()
        .filter_map(|line| line.strip_prefix("| `")?.split_once('`'))
        .map(|(name, _)| name.to_owned())
        .collect();
    assert!(names.len() > 20, "the table was read: {names:?}");
    names
}

#[test]
fn help_lists_every_flag_and_environment_variable() {
    let output = Command::new(BINARY).arg("--help").output().unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    let flags = [
        "listen",
        "--addr",
        "--publisher",
        "--ttl",
        "--url",
        "--token",
        "--user",
        "--version",
    ];
    for name in flags
        .map(str::to_owned)
        .into_iter()
        .chain(readme_settings())
    {
        assert!(help.contains(&name), "--help does not mention {name}");
    }
}

#[test]
fn the_env_example_lists_exactly_the_readmes_settings() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).unwrap();
    let listed: Vec<String> = example
        .lines()
        .filter_map(|line| line.strip_prefix("# ")?.split_once('='))
        .map(|(name, _)| name.to_owned())
        // A comment may hold an `=` too ("unset = development mode").
        .filter(|name| {
            name.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        })
        .collect();
    assert_eq!(listed, readme_settings());
}

#[test]
fn version_prints_the_crates_version() {
    let output = Command::new(BINARY).arg("--version").output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        format!("artifact-events {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_port_in_use_is_a_runtime_failure_not_a_usage_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = Command::new(BINARY)
        .args(["--addr", &addr])
        .env("JWT_SECRET", SECRET)
        // Only what the test says: CI exports REDIS_URL for the tests that ask for it.
        .env_remove("REDIS_URL")
        .env_remove("DATABASE_PATH")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
    assert!(!stderr.contains("--help"), "{stderr}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let server = RunningServer::start(&[("LOG_FORMAT", "json")]);
    let (exit, log) = server.terminate();
    assert!(exit.success(), "{exit:?}");
    let lines: Vec<&str> = log.lines().filter(|line| !line.trim().is_empty()).collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let object: serde_json::Value = serde_json::from_str(line).expect(line);
        assert!(
            object["ts"].is_string() && object["msg"].is_string(),
            "{line}"
        );
        assert!(["error", "warn", "info", "debug"].contains(&object["level"].as_str().unwrap()));
    }
}

#[tokio::test]
async fn listen_prints_each_event_of_its_user_as_it_arrives() {
    let server = TestServer::start(config()).await;
    let mut child = Command::new(BINARY)
        .args(["listen", "--url", &format!("http://{}", server.addr)])
        .args(["--token", &server.token("alice")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = lines_of(child.stdout.take().unwrap());
    assert_eq!(
        next_line(&mut lines).await,
        r#"{"type":"connected","user_id":"alice"}"#
    );

    publish_http(
        &server,
        "artifact.completed",
        json!({"user_id": "bob", "job_id": "j0"}),
    )
    .await;
    publish_http(
        &server,
        "artifact.completed",
        json!({"user_id": "alice", "job_id": "j1"}),
    )
    .await;
    assert_eq!(
        next_line(&mut lines).await,
        r#"{"job_id":"j1","user_id":"alice"}"#
    );
    child.kill().unwrap();
    child.wait().unwrap();
    server.stop().await;
}

#[tokio::test]
async fn listen_with_a_refused_token_exits_1_and_prints_the_json_error() {
    let server = TestServer::start(config()).await;
    let url = format!("http://{}", server.addr);
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BINARY)
            .args(["listen", "--url", &url, "--token", "not-a-jwt"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(r#"401 Unauthorized: {"error":"token is malformed"}"#),
        "{stderr}"
    );
    server.stop().await;
}

#[test]
fn listen_with_bad_arguments_is_a_usage_error() {
    for (args, reason) in [
        (&["listen"][..], "--token JWT or --user USER_ID"),
        (
            &[
                "listen",
                "--url",
                "http://127.0.0.1:8000/events",
                "--token",
                "t",
            ],
            "give the server's root",
        ),
        (
            &["listen", "--url", "https://example.com", "--token", "t"],
            "only http://",
        ),
    ] {
        let output = Command::new(BINARY).args(args).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(reason),
            "{args:?}"
        );
    }
}

async fn next_line(lines: &mut mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(PATIENCE, lines.recv())
        .await
        .expect("a line arrives in time")
        .expect("the child is still writing")
}

/// The lines a child writes, read on a thread of their own so that the test's runtime (which
/// also runs the server) never blocks on the pipe.
fn lines_of(stdout: ChildStdout) -> mpsc::UnboundedReceiver<String> {
    let (sender, receiver) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if sender.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    receiver
}

#[test]
fn invalid_configuration_is_reported_not_ignored() {
    let output = Command::new(BINARY)
        .env("SSE_KEEPALIVE_SECS", "soon")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("SSE_KEEPALIVE_SECS"));
}

#[tokio::test]
async fn sigterm_ends_streams_and_exits_zero() {
    let server = RunningServer::start(&[]);
    let mut client = SseClient::connected(server.addr, &token("alice")).await;

    let (exit, log) = server.terminate();
    assert_eq!(
        client.next_frame().await,
        None,
        "the stream did not end cleanly"
    );
    assert!(exit.success(), "{exit:?}");
    assert!(
        log.contains("shutting down: ending 1 open streams"),
        "{log}"
    );
}

#[tokio::test]
async fn access_tokens_in_urls_never_reach_the_log() {
    let server = RunningServer::start(&[("LOG_LEVEL", "debug")]);
    let token = token("alice");
    let path = format!("/ai/artifact/events/stream?access_token={token}");
    let request = common::request("GET", &path, None, "");
    let mut client = SseClient::from_response(common::open(server.addr, request).await);
    assert!(client.next_frame().await.unwrap().contains("alice"));
    let rejected = common::request(
        "GET",
        "/ai/artifact/events/stream?access_token=secret.bad.token",
        None,
        "",
    );
    assert_eq!(common::send(server.addr, rejected).await.status, 401);

    let (_, log) = server.terminate();
    assert!(
        log.contains("GET /ai/artifact/events/stream -> 200"),
        "debug request lines are logged: {log}"
    );
    assert!(
        !log.contains(&token) && !log.contains("secret.bad.token"),
        "{log}"
    );
}

#[tokio::test]
async fn metrics_addr_serves_the_counters_on_its_own_listener_only() {
    let server = RunningServer::start(&[("METRICS_ADDR", "127.0.0.1:0")]);
    let logged_at = std::time::Instant::now();
    let metrics_addr: std::net::SocketAddr = loop {
        let lines = server.log_lines();
        let found = lines
            .iter()
            .find_map(|line| line.split("metrics on http://").nth(1))
            .and_then(|rest| rest.split('/').next());
        if let Some(addr) = found {
            break addr.parse().unwrap();
        }
        assert!(
            logged_at.elapsed() < PATIENCE,
            "the metrics address is logged"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let get = |path: &str| request("GET", path, None, bytes::Bytes::new());
    let scraped = send(metrics_addr, get("/metrics")).await;
    assert_eq!(scraped.status, hyper::StatusCode::OK);
    let text = String::from_utf8(scraped.body.to_vec()).unwrap();
    assert!(text.contains("artifact_events_open_streams"), "{text}");
    // The public listener does not show them, and the metrics listener serves nothing else.
    let public = send(server.addr, get("/metrics")).await;
    assert_eq!(
        public.expect_error(hyper::StatusCode::NOT_FOUND),
        "not found"
    );
    let other = send(metrics_addr, get("/ai/artifact/jobs")).await;
    assert_eq!(other.status, hyper::StatusCode::NOT_FOUND);
    let post = send(metrics_addr, request("POST", "/metrics", None, "")).await;
    assert_eq!(post.status, hyper::StatusCode::METHOD_NOT_ALLOWED);
}
