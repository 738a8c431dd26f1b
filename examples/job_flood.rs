//! Job flood: one user submits large jobs as fast as the server takes them, and the server's
//! memory is read before, at its peak and after. It measures what `MAX_JOBS_PER_USER` and
//! `JOB_STORE_MAX_BYTES` bound (issue 13, H1), and prints one JSON line.
//!
//! ```text
//! cargo run --release --example job_flood -- --addr 127.0.0.1:8000 --pid SERVER_PID \
//!     [--jobs 20000] [--content-bytes 100000] [--concurrency 32] [--type summary]
//! ```
//! Every attempt is one `POST /ai/artifact/generate`; a `429` (the user's unfinished jobs are at
//! the cap) is counted and followed by a 2 ms pause, as a client that honours the cap would
//! wait, so the store keeps filling with finished jobs for as long as the run lasts. Tokens
//! are signed with `JWT_SECRET`, like the server's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use artifact_events::server::Authenticator;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokio::net::TcpStream;

struct Options {
    addr: SocketAddr,
    pid: u32,
    jobs: u64,
    content_bytes: usize,
    concurrency: usize,
    artifact_type: String,
}

fn options() -> Options {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        addr: "127.0.0.1:8000".parse().unwrap(),
        pid: 0,
        jobs: 20_000,
        content_bytes: 100_000,
        concurrency: 32,
        artifact_type: "summary".to_owned(),
    };
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        let number = || -> u64 {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{flag}: {value:?}"))
        };
        match flag.as_str() {
            "--addr" => options.addr = value.parse().expect("--addr HOST:PORT"),
            "--pid" => options.pid = number() as u32,
            "--jobs" => options.jobs = number(),
            "--content-bytes" => options.content_bytes = number() as usize,
            "--concurrency" => options.concurrency = number() as usize,
            "--type" => options.artifact_type = value,
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(
        options.pid != 0,
        "--pid SERVER_PID is required: the figures are its memory"
    );
    options
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} for process {pid}"))
}

/// Content of `bytes` bytes in sentences, so that the offline generator finds material.
fn content(bytes: usize) -> String {
    let sentence = "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. ";
    sentence.repeat(bytes / sentence.len() + 1)[..bytes].to_owned()
}

#[tokio::main]
async fn main() {
    let options = options();
    let secret = std::env::var("JWT_SECRET").expect("JWT_SECRET must be the server's secret");
    let token = Authenticator::new(secret.as_bytes(), Algorithm::HS256).issue(
        "flood",
        false,
        Duration::from_secs(3600),
    );
    let options_json = match options.artifact_type.as_str() {
        "summary" => json!({}),
        "quiz" => json!({"num_questions": 10}),
        _ => json!({"num_cards": 10}),
    };
    let body = Bytes::from(
        json!({
            "notebook_id": "flood",
            "artifact_type": options.artifact_type,
            "content": content(options.content_bytes),
            "options": options_json,
        })
        .to_string(),
    );
    let rss_before = memory_kib(options.pid, "VmRSS");
    let next = Arc::new(AtomicU64::new(0));
    let statuses = Arc::new(Mutex::new(BTreeMap::<u16, u64>::new()));
    let peak_rss = Arc::new(AtomicU64::new(rss_before));
    let started = Instant::now();

    let sampler = {
        let peak_rss = peak_rss.clone();
        let pid = options.pid;
        tokio::spawn(async move {
            loop {
                peak_rss.fetch_max(memory_kib(pid, "VmRSS"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let clients: Vec<_> = (0..options.concurrency)
        .map(|_| {
            let (next, statuses, body, token) =
                (next.clone(), statuses.clone(), body.clone(), token.clone());
            let (addr, jobs) = (options.addr, options.jobs);
            tokio::spawn(async move {
                let stream = TcpStream::connect(addr).await.unwrap();
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                while next.fetch_add(1, Ordering::Relaxed) < jobs {
                    let request = Request::post("/ai/artifact/generate")
                        .header("host", addr.to_string())
                        .header("authorization", format!("Bearer {token}"))
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let response = sender.send_request(request).await.unwrap();
                    let status = response.status().as_u16();
                    response.into_body().collect().await.unwrap();
                    *statuses.lock().unwrap().entry(status).or_default() += 1;
                    if status == 429 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let elapsed = started.elapsed();
    // The last accepted jobs finish, and the store settles.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sampler.abort();
    let rss_after = memory_kib(options.pid, "VmRSS");
    let hwm = memory_kib(options.pid, "VmHWM");
    let statuses = statuses.lock().unwrap().clone();
    let figures = json!({
        "scenario": "job_flood",
        "attempts": options.jobs,
        "content_bytes": options.content_bytes,
        "artifact_type": options.artifact_type,
        "statuses": statuses,
        "seconds": elapsed.as_secs_f64(),
        "rss_before_mib": rss_before as f64 / 1024.0,
        "rss_peak_sampled_mib": peak_rss.load(Ordering::Relaxed).max(rss_after) as f64 / 1024.0,
        "rss_high_water_mib": hwm as f64 / 1024.0,
        "rss_after_mib": rss_after as f64 / 1024.0,
    });
    println!("{figures}");
}
