//! Jobs across processes, measured: job throughput (jobs/s with the offline generator) on one
//! and on two server processes sharing a Redis, and how long after a SIGKILL another process
//! takes the dead one's job over. Starts its own `redis-server` and server processes, and
//! prints one line of figures per measurement.
//!
//! ```text
//! cargo build --release --features redis --bin artifact-events --example job_throughput
//! target/release/examples/job_throughput [--binary target/release/artifact-events] [--jobs 2000]
//!     [--workers 2]
//! ```
//! `benches/redis_jobs.sh` does both.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use artifact_events::server::Authenticator;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

const SECRET: &str = "job-throughput-secret-of-at-least-32-bytes";
/// HTTP connections submitting jobs at once.
const SUBMITTERS: usize = 16;
const CONTENT: &str = "Mitochondria are the organelles that produce most of a cell's energy. \
    They convert glucose and oxygen into adenosine triphosphate through cellular respiration. \
    Each mitochondrion has its own circular DNA, inherited from the mother. \
    The inner membrane folds into cristae, which increase the surface for the electron transport chain. \
    Ribosomes inside the matrix build some of the proteins the organelle needs.";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(
    binary: &str,
    redis: &str,
    stream: &str,
    env: &[(&str, &str)],
) -> (Killed, SocketAddr) {
    let port = free_port();
    let child = Command::new(binary)
        .env_clear()
        .env("JWT_SECRET", SECRET)
        .env("ADDR", format!("127.0.0.1:{port}"))
        .env("REDIS_URL", redis)
        .env("REDIS_STREAM", stream)
        .env("LOG_LEVEL", "warn")
        .env("MAX_JOBS_PER_USER", "100000")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        // Warnings and errors only (LOG_LEVEL=warn): why a server did not start, say.
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the server binary runs (build it with --features redis)");
    wait_for_port(port);
    (Killed(child), SocketAddr::from(([127, 0, 0, 1], port)))
}

async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn call(
    sender: &mut SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    token: &str,
    body: String,
) -> (u16, Bytes) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "job-throughput")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// Jobs in `status`, from a process's `/metrics`.
async fn jobs_in(addr: SocketAddr, status: &str) -> usize {
    let mut sender = connect(addr).await;
    let (_, body) = call(&mut sender, "GET", "/metrics", "", String::new()).await;
    let line = format!("artifact_events_jobs{{status=\"{status}\"}} ");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|text| text.strip_prefix(&line)?.parse().ok())
        .unwrap_or(0)
}

/// Submits `jobs` jobs to the first process and returns jobs/s accepted (until the last
/// submit) and completed (from the first submit until every one has completed).
async fn throughput(
    binary: &str,
    redis: &str,
    processes: usize,
    workers: &str,
    jobs: usize,
) -> (f64, f64) {
    let stream = format!(
        "job-throughput-{processes}-{workers}-{}",
        std::process::id()
    );
    let servers: Vec<_> = (0..processes)
        .map(|_| start_server(binary, redis, &stream, &[("WORKERS", workers)]))
        .collect();
    let addr = servers[0].1;
    let token = Authenticator::new(SECRET.as_bytes(), Algorithm::HS256).issue(
        "bench",
        false,
        Duration::from_secs(3600),
    );
    let body =
        json!({"notebook_id": "nb", "artifact_type": "summary", "content": CONTENT}).to_string();
    let started = Instant::now();
    let submitters: Vec<_> = (0..SUBMITTERS)
        .map(|index| {
            let (token, body) = (token.clone(), body.clone());
            let count = jobs / SUBMITTERS + usize::from(index < jobs % SUBMITTERS);
            tokio::spawn(async move {
                let mut sender = connect(addr).await;
                for _ in 0..count {
                    let (status, reply) = call(
                        &mut sender,
                        "POST",
                        "/ai/artifact/generate",
                        &token,
                        body.clone(),
                    )
                    .await;
                    assert_eq!(status, 202, "{reply:?}");
                }
            })
        })
        .collect();
    for submitter in submitters {
        submitter.await.unwrap();
    }
    let accepted = jobs as f64 / started.elapsed().as_secs_f64();
    while jobs_in(addr, "completed").await < jobs {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (accepted, jobs as f64 / started.elapsed().as_secs_f64())
}

/// Seconds from SIGKILL of the process running a slow job until another process runs it
/// (its `retry_count` is 1), and until it completes.
async fn takeover(binary: &str, redis: &str, claim_timeout_secs: u64) -> (f64, f64) {
    let stream = format!("job-takeover-{}", std::process::id());
    let timeout = claim_timeout_secs.to_string();
    // Each of the job's two generator calls outlasts the wait before the kill.
    let delay = ((claim_timeout_secs + 3) * 1000).to_string();
    let env = [
        ("GENERATOR_DELAY_MS", delay.as_str()),
        ("JOB_CLAIM_TIMEOUT_SECS", timeout.as_str()),
    ];
    let (mut a, on_a) = start_server(binary, redis, &stream, &env);
    let token = Authenticator::new(SECRET.as_bytes(), Algorithm::HS256).issue(
        "bench",
        false,
        Duration::from_secs(3600),
    );
    let body = json!({"notebook_id": "nb", "artifact_type": "summary", "content": CONTENT});
    let mut sender = connect(on_a).await;
    let (_, reply) = call(
        &mut sender,
        "POST",
        "/ai/artifact/generate",
        &token,
        body.to_string(),
    )
    .await;
    let job_id = serde_json::from_slice::<Value>(&reply).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    while jobs_in(on_a, "running").await == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_b, on_b) = start_server(binary, redis, &stream, &env);
    // B takes nothing over during its first claim timeout with Redis.
    tokio::time::sleep(Duration::from_secs(claim_timeout_secs)).await;
    let killed = Instant::now();
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let path = format!("/ai/artifact/jobs/{job_id}");
    let mut taken_over = None;
    loop {
        let mut sender = connect(on_b).await;
        let (_, reply) = call(&mut sender, "GET", &path, &token, String::new()).await;
        let job: Value = serde_json::from_slice(&reply).unwrap();
        if taken_over.is_none() && job["retry_count"] == 1 && job["status"] == "running" {
            taken_over = Some(killed.elapsed().as_secs_f64());
        }
        if job["status"] == "completed" {
            let done = killed.elapsed().as_secs_f64();
            return (taken_over.unwrap_or(done), done);
        }
        assert!(
            killed.elapsed() < Duration::from_secs(120),
            "never completed: {job}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() {
    let arguments: Vec<String> = std::env::args().collect();
    let option = |name: &str, default: &str| {
        arguments
            .iter()
            .position(|argument| argument == name)
            .and_then(|at| arguments.get(at + 1).cloned())
            .unwrap_or_else(|| default.to_owned())
    };
    let binary = option("--binary", "target/release/artifact-events");
    let jobs: usize = option("--jobs", "2000")
        .parse()
        .expect("--jobs is a number");
    let redis_port = free_port();
    let _redis = Killed(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed"),
    );
    wait_for_port(redis_port);
    let redis = format!("redis://127.0.0.1:{redis_port}");
    let workers = option("--workers", "2");
    for processes in [1, 2] {
        let (accepted, completed) = throughput(&binary, &redis, processes, &workers, jobs).await;
        println!(
            "throughput: {processes} process(es), WORKERS={workers} each, {jobs} jobs submitted to one: {completed:.0} jobs/s completed ({accepted:.0} jobs/s accepted)"
        );
    }
    for claim_timeout in [2, 5] {
        let (taken_over, completed) = takeover(&binary, &redis, claim_timeout).await;
        println!(
            "takeover: JOB_CLAIM_TIMEOUT_SECS={claim_timeout}: running again on the other process {taken_over:.2} s after SIGKILL, completed at {completed:.2} s"
        );
    }
}
