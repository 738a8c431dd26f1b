//! What durability costs (`DATABASE_PATH`): a job status change in the SQLite store against
//! the memory store, and a publish with the history stored against one without.
//!
//! The file lives in the system temp dir (on the same disk as a deployment's would, ideally).
//! Status changes are wall time on this thread (each is one transaction). For publishes, the
//! publishing thread's CPU time is the delivery path's cost; the writer thread's time to store
//! them all is the throughput the file sustains.
//! Run: `cargo bench --bench sqlite_cost --features sqlite` (`-- --smoke` for a quick check).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use artifact_events::backends::sqlite::{open_history, SqliteJobStore};
use artifact_events::config::Config;
use artifact_events::delivery::StreamIndex;
use artifact_events::jobs::{
    ArtifactType, Job, JobChange, JobLimits, JobStatus, JobStore, MemoryJobStore,
};
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

fn scratch_file(name: &str) -> PathBuf {
    let directory = std::env::temp_dir().join(format!(
        "artifact-events-bench-{name}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&directory).unwrap();
    directory.join("bench.db")
}

/// Average wall nanoseconds per status change: each job is created, claimed and completed.
fn status_change_cost(store: &dyn JobStore, jobs: usize) -> f64 {
    let result = json!({"questions": [{"question": "q", "options": ["a", "b", "c", "d"]}]});
    let new_jobs: Vec<Job> = (0..jobs)
        .map(|_| Job::new("alice", "nb", ArtifactType::Quiz, "text".to_owned(), 5))
        .collect();
    let start = Instant::now();
    for job in new_jobs {
        let id = job.id.clone();
        store.create(job).unwrap();
        store.claim_next().unwrap().unwrap();
        let change = JobChange {
            result: Some(result.clone()),
            ..JobChange::to(JobStatus::Completed)
        };
        store.update(&id, &[JobStatus::Running], change).unwrap();
    }
    start.elapsed().as_nanos() as f64 / (3 * jobs) as f64
}

/// Publishing thread CPU ns per publish, and (when stored) wall ns per event until the writer
/// has stored them all.
async fn publish_cost(index: Arc<StreamIndex>, publishes: usize) -> (f64, f64) {
    let bus = EventBus::new();
    let _subscription = index.attach(&bus);
    let mut recipient = index.open("target", None, Arc::new(Notify::new())).unwrap();
    recipient.frame().await;
    let event_type = EventType::COMPLETED;
    let wall_start = Instant::now();
    let cpu_start = thread_cpu_nanos();
    for n in 0..publishes {
        let data = json!({"user_id": "target", "job_id": "job-1", "n": n, "result": {"ok": true}});
        bus.publish(&event_type, data).await;
        recipient.frame().await;
    }
    let cpu = (thread_cpu_nanos() - cpu_start) as f64 / publishes as f64;
    index.finish_persisting();
    let stored = wall_start.elapsed().as_nanos() as f64 / publishes as f64;
    (cpu, stored)
}

fn main() {
    let smoke = std::env::args().any(|arg| arg == "--smoke");
    let (jobs, publishes) = if smoke {
        (200, 2_000)
    } else {
        (5_000, 100_000)
    };
    let database = scratch_file("jobs");
    let sqlite = SqliteJobStore::open(&database, JobLimits::jobs(jobs * 2)).unwrap();
    let memory = MemoryJobStore::new(JobLimits::jobs(jobs * 2));
    let sqlite_change = status_change_cost(&sqlite, jobs);
    let memory_change = status_change_cost(&memory, jobs);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let settings = Config::with_secret("bench").stream_settings();
    let history = scratch_file("history");
    let (memory_cpu, stored_cpu, stored_wall) = runtime.block_on(async {
        // Warm up allocator and caches so the first measured case is not penalised.
        publish_cost(StreamIndex::new(settings, Arc::default()), publishes / 10).await;
        let (memory_cpu, _) =
            publish_cost(StreamIndex::new(settings, Arc::default()), publishes).await;
        let (loaded, writer) = open_history(&history, settings.history).unwrap();
        let stored =
            StreamIndex::with_history(settings, Arc::default(), loaded, Some(Box::new(writer)));
        let (stored_cpu, stored_wall) = publish_cost(stored, publishes).await;
        (memory_cpu, stored_cpu, stored_wall)
    });
    for file in [&database, &history] {
        let _ = std::fs::remove_dir_all(file.parent().unwrap());
    }

    println!("job status change ({jobs} jobs created, claimed, completed): wall ns/change");
    println!("  memory store {memory_change:>10.0}");
    println!("  sqlite store {sqlite_change:>10.0}");
    println!("publish ({publishes} to one stream): publishing thread cpu ns/publish");
    println!("  history in memory {memory_cpu:>10.0}");
    println!("  history stored    {stored_cpu:>10.0}   (all stored after {stored_wall:.0} ns/event wall)");
    println!(
        "{}",
        json!({"bench": "sqlite_cost", "status_change_ns_memory": memory_change.round(),
            "status_change_ns_sqlite": sqlite_change.round(), "publish_cpu_ns_memory": memory_cpu.round(),
            "publish_cpu_ns_stored": stored_cpu.round(), "stored_wall_ns_per_event": stored_wall.round()})
    );
}
