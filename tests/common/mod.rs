//! Shared helpers: a real server on 127.0.0.1:0 and HTTP/SSE clients over real TCP.
#![allow(dead_code)] // each test binary uses a different subset

pub mod model_server;
pub mod receiver;
pub mod redis;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use artifact_events::config::Config;
use artifact_events::jobs::{ArtifactGenerator, MemoryJobStore, OfflineGenerator};
use artifact_events::server::{self, AppState};
use artifact_events::EventBus;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The secret every test server signs with.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
/// How long any single wait in a test may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Test defaults: the production defaults with a known secret.
pub fn config() -> Config {
    Config::with_secret(SECRET)
}

/// A server running in this process on an ephemeral port, with its own bus.
pub struct TestServer {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        Self::start_with_generator(config, Arc::new(OfflineGenerator)).await
    }

    /// A server on the backends its configuration names, as the binary opens them.
    pub async fn open(config: Config) -> Self {
        let state = AppState::open(config, Arc::new(EventBus::new()))
            .await
            .unwrap();
        Self::serve(state).await
    }

    /// A server whose jobs use `generator`, with an in-memory store.
    pub async fn start_with_generator(
        config: Config,
        generator: Arc<dyn ArtifactGenerator>,
    ) -> Self {
        let store = Arc::new(MemoryJobStore::new(config.job_limits()));
        let state = AppState::with_jobs(config, Arc::new(EventBus::new()), store, generator);
        Self::serve(state).await
    }

    /// Serves `state` on an ephemeral port.
    async fn serve(state: Arc<AppState>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, state.clone(), async {
            let _ = stop.await;
        }));
        TestServer {
            addr,
            state,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    pub fn token(&self, user_id: &str) -> String {
        self.state
            .auth
            .issue(user_id, false, Duration::from_secs(600))
    }

    pub fn publisher_token(&self) -> String {
        self.state
            .auth
            .issue("publisher", true, Duration::from_secs(600))
    }

    /// Asks the server to shut down and waits for `run` to return.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("server stops in time")
            .unwrap();
    }

    /// Waits until `condition` holds for the server state, polling it.
    pub async fn wait_until(&self, what: &str, condition: impl Fn(&AppState) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !condition(&self.state) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A plain HTTP response, body collected.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|error| panic!("body is not JSON ({error}): {:?}", self.body))
    }

    /// Asserts an error response: this status, a JSON `error` string, and returns that string.
    pub fn expect_error(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "body: {:?}", self.body);
        assert_eq!(self.headers["content-type"], "application/json");
        self.json()["error"]
            .as_str()
            .expect("error is a string")
            .to_owned()
    }
}

/// Sends one request on a new connection and collects the response.
pub async fn send(addr: SocketAddr, request: Request<Full<Bytes>>) -> Reply {
    let response = open(addr, request).await;
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("body arrives in time")
        .unwrap()
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends a request and returns the response with its body still streaming.
pub async fn open(addr: SocketAddr, request: Request<Full<Bytes>>) -> hyper::Response<Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("response head arrives in time")
        .unwrap()
}

/// A request builder with an optional bearer token.
pub fn request(
    method: &str,
    path: &str,
    token: Option<&str>,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    builder.body(Full::new(body.into())).unwrap()
}

/// Queues a job over HTTP with `token` and the generate request `body`; asserts that it was
/// accepted and returns the job's id.
pub async fn generate(addr: SocketAddr, token: &str, body: &Value) -> String {
    let path = "/ai/artifact/generate";
    let reply = send(addr, request("POST", path, Some(token), body.to_string())).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "body: {:?}", reply.body);
    reply.json()["job_id"].as_str().unwrap().to_owned()
}

/// Publishes over HTTP as a publisher and asserts it was accepted.
pub async fn publish_http(server: &TestServer, event_type: &str, event_data: Value) {
    let body = serde_json::json!({"event_type": event_type, "event_data": event_data}).to_string();
    let reply = send(
        server.addr,
        request(
            "POST",
            "/ai/events/publish",
            Some(&server.publisher_token()),
            body,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "body: {:?}", reply.body);
}

/// An open SSE response, read frame by frame (a frame ends with a blank line).
pub struct SseClient {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    buffer: Vec<u8>,
}

impl SseClient {
    pub async fn connect(addr: SocketAddr, token: &str) -> SseClient {
        let path = "/ai/artifact/events/stream";
        Self::from_response(open(addr, request("GET", path, Some(token), Bytes::new())).await)
    }

    /// Connects and reads the connected frame, asserting it names the token's user.
    pub async fn connected(addr: SocketAddr, token: &str) -> SseClient {
        let mut client = Self::connect(addr, token).await;
        assert_eq!(client.status, StatusCode::OK);
        let first = client.next_frame().await.expect("the connected frame");
        assert!(first.contains("\"type\":\"connected\""), "{first:?}");
        client
    }

    /// Wraps a response whose body is (or may be) an event stream.
    pub fn from_response(response: hyper::Response<Incoming>) -> SseClient {
        let (parts, body) = response.into_parts();
        SseClient {
            status: parts.status,
            headers: parts.headers,
            body,
            buffer: Vec::new(),
        }
    }

    /// The next whole frame's bytes (including the blank line), or None when the stream ended
    /// cleanly. Panics if none arrives within `PATIENCE` or the stream broke.
    pub async fn next_frame(&mut self) -> Option<String> {
        self.next_frame_within(PATIENCE)
            .await
            .expect("a frame arrives in time")
    }

    /// Like `next_frame`, but `Err(())` if nothing whole arrives within `wait`.
    pub async fn next_frame_within(&mut self, wait: Duration) -> Result<Option<String>, ()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\n\n") {
                let frame: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return Ok(Some(String::from_utf8(frame).expect("frames are UTF-8")));
            }
            let next = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .map_err(|_| ())?;
            match next {
                None => {
                    assert!(
                        self.buffer.is_empty(),
                        "stream ended mid-frame: {:?}",
                        self.buffer
                    );
                    return Ok(None);
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.extend_from_slice(&data);
                    }
                }
                Some(Err(error)) => panic!("stream broke: {error}"),
            }
        }
    }

    /// The next frame that is not a keepalive, parsed from its `data:` line as JSON.
    pub async fn next_event(&mut self) -> Value {
        self.next_event_with_id().await.1
    }

    /// The next event that is not a keepalive: its `id:` field (if any) and its data as JSON.
    pub async fn next_event_with_id(&mut self) -> (Option<String>, Value) {
        loop {
            let frame = self.next_frame().await.expect("stream is still open");
            if frame == ": keepalive\n\n" {
                continue;
            }
            let mut id = None;
            let mut data = None;
            for line in frame.trim_end_matches('\n').split('\n') {
                match line.split_once(": ") {
                    Some(("id", value)) => id = Some(value.to_owned()),
                    Some(("data", value)) => {
                        assert!(data.is_none(), "JSON data spans one line: {frame:?}");
                        data = Some(value.to_owned());
                    }
                    Some(("retry", _)) => {}
                    _ => panic!("unexpected line {line:?} in {frame:?}"),
                }
            }
            let data = data.unwrap_or_else(|| panic!("no data line: {frame:?}"));
            return (id, serde_json::from_str(&data).unwrap());
        }
    }
}

/// A suffix no other call in any process makes: the process id, a counter and the time.
pub fn unique_suffix() -> String {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{}-{call}-{nanos}", std::process::id())
}

/// A fresh directory under the system temp dir, removed (with its files) when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("artifact-events-{name}-{}", unique_suffix()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    /// A path inside the directory.
    pub fn join(&self, file: &str) -> std::path::PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server binary that the tests run.
pub const BINARY: &str = env!("CARGO_BIN_EXE_artifact-events");

/// The server binary on an ephemeral port, with its stderr collected line by line. Dropping it
/// kills the process, so a failed test leaves none behind.
pub struct RunningServer {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    log: std::sync::mpsc::Receiver<String>,
    /// The thread that forwards stderr to `log`; it ends when stderr closes (the process exited).
    reader: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    /// Starts the binary with `env` (on top of `ADDR=127.0.0.1:0` and the test secret) and
    /// waits until it listens.
    pub fn start(env: &[(&str, &str)]) -> RunningServer {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new(BINARY)
            // Only what the test says: CI exports REDIS_URL for the tests that ask for it.
            .env_remove("REDIS_URL")
            .env_remove("DATABASE_PATH")
            .env_remove("GENERATOR")
            .env("ADDR", "127.0.0.1:0")
            .env("JWT_SECRET", SECRET)
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let (sender, log) = std::sync::mpsc::channel();
        let addr = loop {
            let mut line = String::new();
            assert!(
                stderr.read_line(&mut line).unwrap() > 0,
                "server exited before listening"
            );
            let line = line.trim_end().to_owned();
            // The address ends the text line; in a JSON line, a quote ends it.
            let address = line.split("listening on ").nth(1).and_then(|rest| {
                rest.strip_prefix("http://")
                    .or_else(|| rest.strip_prefix("https://"))
            });
            if let Some(rest) = address {
                break rest.split('"').next().unwrap().parse().unwrap();
            }
            sender.send(line).unwrap();
        };
        let reader = std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        RunningServer {
            child,
            addr,
            log,
            reader: Some(reader),
        }
    }

    /// Sends SIGTERM and waits (at most 5 s) for the exit; returns the status and the log.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let started = std::time::Instant::now();
        let exit = loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "server did not exit within 5 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        (exit, self.rest_of_log())
    }

    /// The log lines printed since the last look.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// Sends SIGKILL, as a crash or the OOM killer would: no shutdown code runs. Returns the
    /// log up to then.
    pub fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.rest_of_log()
    }

    /// After the process exited: waits for the reader to reach the end of stderr, so the log
    /// is complete, and returns the lines not yet taken.
    fn rest_of_log(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            reader.join().expect("the log reader does not panic");
        }
        self.log.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user's token signed with the test secret, for servers run as a binary.
pub fn binary_token(user_id: &str) -> String {
    artifact_events::server::Authenticator::new(SECRET.as_bytes(), jsonwebtoken::Algorithm::HS256)
        .issue(user_id, false, Duration::from_secs(600))
}

/// A publisher token signed with the test secret, for servers run as a binary.
pub fn binary_publisher_token() -> String {
    artifact_events::server::Authenticator::new(SECRET.as_bytes(), jsonwebtoken::Algorithm::HS256)
        .issue("publisher", true, Duration::from_secs(600))
}

/// Publishes over HTTP to `addr` as a publisher and returns the reply.
pub async fn publish_to(addr: SocketAddr, event_type: &str, event_data: Value) -> Reply {
    let body = serde_json::json!({"event_type": event_type, "event_data": event_data}).to_string();
    let token = binary_publisher_token();
    send(
        addr,
        request("POST", "/ai/events/publish", Some(&token), body),
    )
    .await
}
