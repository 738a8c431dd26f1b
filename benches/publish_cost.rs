//! What one publish costs with 10 vs 10,000 other users' streams open.
//!
//! Streams are opened on the real `StreamIndex` (no sockets, so the figure is the publish path
//! alone: bus, index lookup, id and history, one encode, queueing). One recipient stream is drained as it goes.
//! CPU time is the publishing thread's own, read from `/proc/thread-self/schedstat`.
//! Run: `cargo bench --bench publish_cost` (`-- --smoke` for a quick check).

use std::sync::Arc;
use std::time::Instant;

use artifact_events::config::Config;
use artifact_events::delivery::StreamIndex;
use artifact_events::{EventBus, EventType};
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::Notify;

fn thread_cpu_nanos() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Average CPU and wall nanoseconds per publish to one recipient with `others` streams open.
async fn measure(others: usize, publishes: usize) -> (f64, f64) {
    let bus = EventBus::new();
    let index = StreamIndex::new(
        Config::with_secret("bench").stream_settings(),
        Arc::default(),
    );
    let _subscription = index.attach(&bus);
    let mut idle = Vec::with_capacity(others);
    for n in 0..others {
        let user = format!("other-{n}");
        idle.push(index.open(&user, None, Arc::new(Notify::new())).unwrap());
    }
    let mut recipient = index.open("target", None, Arc::new(Notify::new())).unwrap();
    recipient.frame().await;
    let event_type = EventType::COMPLETED;
    let cpu_start = thread_cpu_nanos();
    let wall_start = Instant::now();
    for n in 0..publishes {
        let data = json!({"user_id": "target", "job_id": "job-1", "n": n, "result": {"ok": true}});
        bus.publish(&event_type, data).await;
        recipient.frame().await;
    }
    let wall = wall_start.elapsed().as_nanos() as f64 / publishes as f64;
    let cpu = (thread_cpu_nanos() - cpu_start) as f64 / publishes as f64;
    assert_eq!(index.stream_count(), others + 1);
    (cpu, wall)
}

fn main() {
    let smoke = std::env::args().any(|arg| arg == "--smoke");
    let publishes = if smoke { 2_000 } else { 200_000 };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Warm up allocator and caches so the first measured case is not penalised.
        measure(10, publishes / 10).await;
        let (cpu_10, wall_10) = measure(10, publishes).await;
        let (cpu_10k, wall_10k) = measure(10_000, publishes).await;
        println!("publish cost, {publishes} publishes to one recipient stream:");
        println!("  other streams open   cpu ns/publish   wall ns/publish");
        println!("  {:>18}   {cpu_10:>14.0}   {wall_10:>15.0}", 10);
        println!("  {:>18}   {cpu_10k:>14.0}   {wall_10k:>15.0}", 10_000);
        println!("  ratio 10,000 / 10: {:.2}x (target <= 1.2x)", cpu_10k / cpu_10);
        println!(
            "{}",
            json!({"bench": "publish_cost", "publishes": publishes, "cpu_ns_10": cpu_10.round(),
                "cpu_ns_10000": cpu_10k.round(), "ratio": (cpu_10k / cpu_10 * 100.0).round() / 100.0})
        );
    });
}
