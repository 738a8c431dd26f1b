//! What webhooks cost the publish path: 1,000 events/s for one user whose webhook's receiver
//! accepts the connection and never answers (every attempt runs into its timeout), against the
//! same load with no webhook at all.
//!
//! The server's own state (`AppState`: the bus, the stream index with one open stream of the
//! user, the webhook service) on a two-worker runtime, as the server runs; the receiver is a
//! real TCP listener on 127.0.0.1. Figures: the latency of `bus.publish` (what a publisher
//! waits for) and from publish to the frame in the user's stream body (what an SSE client
//! waits for, without the socket), and the webhook queue at the end.
//! Run: `cargo bench --bench webhook_cost` (`-- --smoke` for a quick check).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use artifact_events::config::Config;
use artifact_events::server::AppState;
use artifact_events::webhooks::{SigningKey, Subscription, DEFAULT_QUEUE_CAPACITY};
use artifact_events::{EventBus, EventType};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Events per second, as the issue asks.
const RATE: u64 = 1000;

struct Figures {
    publish: Vec<Duration>,
    to_stream: Vec<Duration>,
    metrics: String,
}

/// Publishes `events` at `RATE` to a user with (or without) a webhook that never answers.
async fn run(events: u64, webhook: bool) -> Figures {
    let mut config = Config::with_secret("bench");
    config.webhooks.allow_private = true;
    let state = AppState::new(config, Arc::new(EventBus::new()));
    let mut stream = state
        .streams
        .open("target", None, Arc::new(Notify::new()))
        .unwrap();
    stream.frame().await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    // Accepts every connection and keeps it, never reading or answering.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    if webhook {
        let subscription = Subscription {
            id: "wh_bench".to_owned(),
            user_id: "target".to_owned(),
            url,
            event_types: None,
            key: SigningKey::generate(),
            created_at: "2026-12-02T00:00:00.000Z".to_owned(),
            disabled: false,
        };
        state.webhooks.add_unchecked(subscription).unwrap();
    }

    let start = Instant::now();
    let to_stream = Arc::new(Mutex::new(Vec::with_capacity(events as usize)));
    let reader = {
        let to_stream = to_stream.clone();
        tokio::spawn(async move {
            let mut seen = 0;
            while seen < events {
                let Some(Ok(frame)) = stream.frame().await else {
                    break;
                };
                let Ok(chunk) = frame.into_data() else {
                    continue;
                };
                let now = start.elapsed();
                for line in String::from_utf8_lossy(&chunk).lines() {
                    let Some(data) = line.strip_prefix("data: ") else {
                        continue;
                    };
                    let data: Value = serde_json::from_str(data).unwrap();
                    let sent = Duration::from_nanos(data["sent_ns"].as_u64().unwrap());
                    to_stream.lock().unwrap().push(now - sent);
                    seen += 1;
                }
            }
        })
    };
    let mut publish = Vec::with_capacity(events as usize);
    for n in 0..events {
        let due = start + Duration::from_micros(n * 1_000_000 / RATE);
        tokio::time::sleep_until(due.into()).await;
        let sent = start.elapsed();
        let data = json!({"user_id": "target", "job_id": "job", "n": n, "sent_ns": sent.as_nanos() as u64});
        let began = Instant::now();
        state.bus.publish(&EventType::COMPLETED, data).await;
        publish.push(began.elapsed());
    }
    reader.await.unwrap();
    let metrics = state.webhooks.render_metrics();
    let to_stream = std::mem::take(&mut *to_stream.lock().unwrap());
    Figures {
        publish,
        to_stream,
        metrics,
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * fraction).round() as usize]
}

fn summary(mut latencies: Vec<Duration>) -> String {
    latencies.sort();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    format!(
        "p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs  max {:>8.1} µs",
        micros(percentile(&latencies, 0.5)),
        micros(percentile(&latencies, 0.99)),
        micros(percentile(&latencies, 0.999)),
        micros(*latencies.last().unwrap())
    )
}

fn main() {
    let smoke = std::env::args().any(|arg| arg == "--smoke");
    // The attempts' failures are logged at info; the figures are the point here.
    artifact_events::set_log_level(artifact_events::LogLevel::Error);
    let seconds = if smoke { 1 } else { 30 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{RATE} events/s for {seconds} s to one user with one open stream (webhook timeout 10 s, \
         the default)"
    );
    for (label, webhook) in [
        ("no webhook", false),
        ("webhook, receiver never answers", true),
    ] {
        let figures = runtime.block_on(run(RATE * seconds, webhook));
        println!("{label}:");
        // Each event is one delivery: the queue is full from the event numbered its capacity.
        let filling = figures.publish.len().min(DEFAULT_QUEUE_CAPACITY);
        let (first, rest) = figures.publish.split_at(filling);
        println!("  bus.publish       {}", summary(figures.publish.clone()));
        if webhook && !rest.is_empty() {
            println!("    queue filling   {}", summary(first.to_vec()));
            println!("    queue full      {}", summary(rest.to_vec()));
        }
        println!("  publish → stream  {}", summary(figures.to_stream));
        if webhook {
            for line in figures
                .metrics
                .lines()
                .filter(|line| !line.starts_with('#'))
            {
                println!("  {line}");
            }
        }
    }
}
