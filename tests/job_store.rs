//! The `JobStore` contract, checked against every store: the same calls give the same jobs, in
//! the same order, with the same JSON. The SQLite store's own promises (restarts, recovery,
//! atomic claims across connections) follow.

mod common;

use artifact_events::jobs::{
    ArtifactType, Job, JobChange, JobFilter, JobLimits, JobStatus, JobStore, MemoryJobStore,
    StoreError, Updated,
};
use serde_json::json;

fn job(user_id: &str, notebook_id: &str) -> Job {
    Job::new(
        user_id,
        notebook_id,
        ArtifactType::Quiz,
        "Some content.".to_owned(),
        5,
    )
}

fn all(limit: usize) -> JobFilter {
    JobFilter {
        limit,
        ..JobFilter::default()
    }
}

fn ids(jobs: &[Job]) -> Vec<&str> {
    jobs.iter().map(|job| job.id.as_str()).collect()
}

/// Everything a store must do, given a way to open an empty one within some limits.
fn behaves_like_a_job_store(open: &dyn Fn(JobLimits) -> Box<dyn JobStore>) {
    let open_jobs = |max_jobs| open(JobLimits::jobs(max_jobs));
    let store = open_jobs(100);
    let first = job("alice", "nb1");
    let second = job("alice", "nb2");
    let bobs = job("bob", "nb1");
    for job in [&first, &second, &bobs] {
        store.create(job.clone()).unwrap();
    }
    assert_eq!(store.get(&first.id).unwrap().as_ref(), Some(&first));
    assert_eq!(store.get("no-such-job").unwrap(), None);
    assert_eq!(
        store.queued_ids().unwrap(),
        [first.id.clone(), second.id.clone(), bobs.id.clone()]
    );

    // Listing: the user's own, newest first, filtered, limited.
    assert_eq!(
        ids(&store.list("alice", &all(10)).unwrap()),
        [&second.id, &first.id]
    );
    let in_nb1 = JobFilter {
        notebook_id: Some("nb1".to_owned()),
        ..all(10)
    };
    assert_eq!(ids(&store.list("alice", &in_nb1).unwrap()), [&first.id]);
    assert_eq!(ids(&store.list("alice", &all(1)).unwrap()), [&second.id]);

    // Claiming takes the oldest queued job and marks it running.
    let claimed = store.claim_next().unwrap().expect("a queued job");
    assert_eq!(claimed.id, first.id);
    assert_eq!(claimed.status, JobStatus::Running);
    let running = JobFilter {
        status: Some(JobStatus::Running),
        ..all(10)
    };
    assert_eq!(ids(&store.list("alice", &running).unwrap()), [&first.id]);

    // A cancelled queued job is never claimed.
    let cancelled = store
        .update(
            &second.id,
            &[JobStatus::Queued],
            JobChange::to(JobStatus::Cancelled),
        )
        .unwrap();
    assert!(matches!(cancelled, Updated::Applied(ref job) if job.status == JobStatus::Cancelled));
    assert_eq!(store.claim_next().unwrap().unwrap().id, bobs.id);
    assert_eq!(store.claim_next().unwrap(), None);
    assert!(store.queued_ids().unwrap().is_empty());

    // Compare-and-set: applied from an expected status, refused from another, missing.
    let completed = JobChange {
        result: Some(json!({"questions": [{"question": "q", "answer_index": 0}]})),
        retry_count: Some(1),
        ..JobChange::to(JobStatus::Completed)
    };
    let Updated::Applied(done) = store
        .update(&first.id, &[JobStatus::Running], completed.clone())
        .unwrap()
    else {
        panic!("the running job completes");
    };
    assert_eq!(done.result, completed.result);
    assert_eq!(done.retry_count, 1);
    assert_eq!(done.error, None);
    assert_eq!(done.created_at, first.created_at);
    assert_eq!(store.get(&first.id).unwrap().as_ref(), Some(&*done));
    assert_eq!(
        store
            .update(&first.id, &[JobStatus::Running], completed)
            .unwrap(),
        Updated::Refused(JobStatus::Completed)
    );
    assert_eq!(
        store
            .update(
                "no-such-job",
                &[JobStatus::Running],
                JobChange::to(JobStatus::Failed)
            )
            .unwrap(),
        Updated::Missing
    );
    let failed = JobChange {
        error: Some("it broke".to_owned()),
        ..JobChange::to(JobStatus::Failed)
    };
    let Updated::Applied(failed) = store
        .update(&bobs.id, &[JobStatus::Running], failed)
        .unwrap()
    else {
        panic!("the running job fails");
    };
    assert_eq!(
        failed.to_json(),
        json!({
            "job_id": bobs.id, "status": "failed", "artifact_type": "quiz",
            "notebook_id": "nb1", "created_at": bobs.created_at,
            "updated_at": failed.updated_at, "result": null, "error": "it broke",
            "retry_count": 0,
        })
    );
    let counts = store.count_by_status().unwrap();
    assert_eq!(
        counts,
        [
            (JobStatus::Queued, 0),
            (JobStatus::Running, 0),
            (JobStatus::Completed, 1),
            (JobStatus::Failed, 1),
            (JobStatus::Cancelled, 1),
        ]
    );

    // Bounded: the oldest finished job makes room; with none finished, the store is full.
    let small = open_jobs(2);
    let (oldest, newer) = (job("carol", "nb"), job("carol", "nb"));
    small.create(oldest.clone()).unwrap();
    small.create(newer.clone()).unwrap();
    assert!(
        small.create(job("carol", "nb")).is_err(),
        "full of unfinished jobs"
    );
    small.claim_next().unwrap();
    small
        .update(
            &oldest.id,
            &[JobStatus::Running],
            JobChange::to(JobStatus::Failed),
        )
        .unwrap();
    let third = job("carol", "nb");
    small.create(third.clone()).unwrap();
    assert_eq!(
        small.get(&oldest.id).unwrap(),
        None,
        "the finished one went"
    );
    assert_eq!(
        ids(&small.list("carol", &all(10)).unwrap()),
        [&third.id, &newer.id]
    );

    // A finished job keeps its result but lets go of its content, which only ran it.
    let store = open_jobs(10);
    let done = job("dave", "nb");
    store.create(done.clone()).unwrap();
    assert_eq!(
        store.claim_next().unwrap().unwrap().content,
        "Some content."
    );
    let change = JobChange {
        result: Some(json!({"summary": "s"})),
        ..JobChange::to(JobStatus::Completed)
    };
    store
        .update(&done.id, &[JobStatus::Running], change)
        .unwrap();
    let stored = store.get(&done.id).unwrap().unwrap();
    assert_eq!(stored.content, "");
    assert_eq!(stored.result, Some(json!({"summary": "s"})));

    // A user has at most so many unfinished jobs; others are not held back by them.
    let per_user = open(JobLimits {
        max_unfinished_per_user: 2,
        ..JobLimits::jobs(100)
    });
    let (first, second) = (job("erin", "nb"), job("erin", "nb"));
    per_user.create(first.clone()).unwrap();
    per_user.create(second.clone()).unwrap();
    assert_eq!(
        per_user.create(job("erin", "nb")),
        Err(StoreError::UserAtLimit(2))
    );
    per_user.create(job("frank", "nb")).unwrap();
    per_user
        .update(
            &first.id,
            &[JobStatus::Queued],
            JobChange::to(JobStatus::Cancelled),
        )
        .unwrap();
    per_user.create(job("erin", "nb")).unwrap();

    // A byte budget: finished jobs are forgotten, oldest first, to make room; a job that still
    // does not fit is refused; a large result makes room but keeps its own job.
    let sized = |user: &str, bytes: usize| {
        Job::new(user, "nb", ArtifactType::Summary, "x".repeat(bytes), 3)
    };
    let one = sized("gina", 10_000).stored_bytes();
    let budget = open(JobLimits {
        max_bytes: 3 * one,
        ..JobLimits::jobs(100)
    });
    let jobs: Vec<Job> = (0..3).map(|_| sized("gina", 10_000)).collect();
    for job in &jobs {
        budget.create(job.clone()).unwrap();
    }
    assert!(matches!(
        budget.create(sized("gina", 10_000)),
        Err(StoreError::Full(_))
    ));
    for job in &jobs[..2] {
        budget
            .update(
                &job.id,
                &[JobStatus::Queued],
                JobChange::to(JobStatus::Failed),
            )
            .unwrap();
    }
    // Two finished jobs dropped their content: room for one more without forgetting any.
    let fourth = sized("gina", 10_000);
    budget.create(fourth.clone()).unwrap();
    assert!(budget.get(&jobs[0].id).unwrap().is_some());
    let stored = |job: &Job| budget.get(&job.id).unwrap().unwrap().stored_bytes();
    let held: usize = [&jobs[0], &jobs[1], &jobs[2], &fourth]
        .map(stored)
        .iter()
        .sum();
    // One byte more than is free: it fits once the oldest finished job is forgotten.
    let overhead = sized("gina", 0).stored_bytes();
    let big = sized("gina", 3 * one - held + 1 - overhead);
    budget.create(big.clone()).unwrap();
    assert_eq!(
        budget.get(&jobs[0].id).unwrap(),
        None,
        "the oldest finished went first"
    );
    let huge_result = JobChange {
        result: Some(json!({"summary": "y".repeat(3 * one)})),
        ..JobChange::to(JobStatus::Completed)
    };
    budget
        .update(&jobs[2].id, &[JobStatus::Queued], huge_result)
        .unwrap();
    assert!(
        budget.get(&jobs[2].id).unwrap().is_some(),
        "its own job stays"
    );
    assert_eq!(
        budget.get(&jobs[1].id).unwrap(),
        None,
        "other finished jobs made room"
    );
}

/// Seeds 300 jobs through `seeding`, then has two more stores on the same data (from `open`)
/// claim at the same moment until none is left: no job may be claimed twice, or not at all.
#[cfg(any(feature = "sqlite", feature = "redis"))]
fn two_stores_claiming_at_once_take_each_job_once<S: JobStore>(seeding: &S, open: impl Fn() -> S) {
    use std::collections::HashSet;
    use std::sync::{Arc, Barrier};

    let created: HashSet<String> = (0..300)
        .map(|_| {
            let job = job("alice", "nb");
            seeding.create(job.clone()).unwrap();
            job.id
        })
        .collect();
    let together = Arc::new(Barrier::new(2));
    let claimers: Vec<_> = (0..2)
        .map(|_| {
            let store = open();
            let together = together.clone();
            std::thread::spawn(move || {
                together.wait();
                std::iter::from_fn(|| store.claim_next().unwrap())
                    .map(|job| job.id)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let claimed: Vec<String> = claimers
        .into_iter()
        .flat_map(|claimer| claimer.join().unwrap())
        .collect();
    let distinct: HashSet<String> = claimed.iter().cloned().collect();
    assert_eq!(claimed.len(), distinct.len(), "a job was claimed twice");
    assert_eq!(distinct, created);
}

#[test]
fn the_memory_store_keeps_the_contract() {
    behaves_like_a_job_store(&|limits| Box::new(MemoryJobStore::new(limits)));
}

#[test]
fn the_memory_store_has_nothing_to_requeue() {
    let store = MemoryJobStore::new(JobLimits::jobs(10));
    store.create(job("alice", "nb")).unwrap();
    store.claim_next().unwrap();
    assert!(store.requeue_interrupted(1).unwrap().is_empty());
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use artifact_events::backends::sqlite::{SqliteJobStore, SCHEMA_VERSION};

    use super::*;
    use crate::common::TempDir;

    #[test]
    fn the_sqlite_store_keeps_the_contract() {
        let directory = TempDir::new("contract");
        let opened = std::cell::Cell::new(0);
        behaves_like_a_job_store(&|limits| {
            opened.set(opened.get() + 1);
            let path = directory.join(&format!("jobs-{}.db", opened.get()));
            Box::new(SqliteJobStore::open(&path, limits).unwrap())
        });
    }

    #[test]
    fn jobs_survive_reopening_the_file_exactly() {
        let directory = TempDir::new("reopen");
        let path = directory.join("jobs.db");
        let store = SqliteJobStore::open(&path, JobLimits::jobs(100)).unwrap();
        let finished = job("alice", "nb");
        store.create(finished.clone()).unwrap();
        store.claim_next().unwrap();
        let change = JobChange {
            result: Some(json!({"summary": "s", "key_points": ["a", "b"]})),
            ..JobChange::to(JobStatus::Completed)
        };
        let Updated::Applied(finished) = store
            .update(&finished.id, &[JobStatus::Running], change)
            .unwrap()
        else {
            panic!("completes");
        };
        let queued = job("alice", "nb");
        store.create(queued.clone()).unwrap();
        drop(store);

        let reopened = SqliteJobStore::open(&path, JobLimits::jobs(100)).unwrap();
        assert_eq!(
            reopened.get(&finished.id).unwrap().as_ref(),
            Some(&*finished)
        );
        assert_eq!(reopened.get(&queued.id).unwrap(), Some(queued.clone()));
        assert_eq!(reopened.queued_ids().unwrap(), [queued.id]);
        let version: usize = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn running_jobs_of_a_dead_process_are_requeued_in_creation_order_or_failed() {
        let directory = TempDir::new("requeue");
        let path = directory.join("jobs.db");
        let store = SqliteJobStore::open(&path, JobLimits::jobs(100)).unwrap();
        let jobs: Vec<Job> = (0..4).map(|_| job("alice", "nb")).collect();
        for job in &jobs {
            store.create(job.clone()).unwrap();
        }
        // Jobs 0 and 1 are running, 1 already on its retry; 2 and 3 are still queued.
        store.claim_next().unwrap();
        store.claim_next().unwrap();
        let retrying = JobChange {
            retry_count: Some(1),
            ..JobChange::to(JobStatus::Running)
        };
        store
            .update(&jobs[1].id, &[JobStatus::Running], retrying)
            .unwrap();
        drop(store); // the process dies

        let store = SqliteJobStore::open(&path, JobLimits::jobs(100)).unwrap();
        let changed = store.requeue_interrupted(1).unwrap();
        assert_eq!(ids(&changed), [&jobs[0].id, &jobs[1].id]);
        assert_eq!(changed[0].status, JobStatus::Queued);
        assert_eq!(changed[0].retry_count, 1, "the interrupted attempt counts");
        assert_eq!(changed[1].status, JobStatus::Failed);
        assert_eq!(changed[1].retry_count, 1);
        assert_eq!(
            changed[1].error.as_deref(),
            Some("interrupted by a server restart during attempt 2, and no retries were left")
        );
        assert_eq!(store.get(&jobs[1].id).unwrap().as_ref(), Some(&changed[1]));
        let claims: Vec<Job> = std::iter::from_fn(|| store.claim_next().unwrap()).collect();
        assert_eq!(ids(&claims), [&jobs[0].id, &jobs[2].id, &jobs[3].id]);
    }

    #[test]
    fn two_connections_claiming_at_once_never_take_the_same_job() {
        let directory = TempDir::new("claims");
        let path = directory.join("jobs.db");
        let open = || SqliteJobStore::open(&path, JobLimits::jobs(1000)).unwrap();
        two_stores_claiming_at_once_take_each_job_once(&open(), open);
    }
}

#[cfg(feature = "redis")]
mod redis {
    //! The Redis store, on the Redis at `REDIS_URL` (skipped without one), each store under a
    //! key prefix of its own.

    use std::time::Duration;

    use artifact_events::backends::RedisJobStore;
    use artifact_events::config::RedisSettings;

    use super::*;
    use crate::common::redis::shared_url;

    fn settings(url: &str) -> RedisSettings {
        RedisSettings {
            url: url.to_owned(),
            stream_key: format!("job-store-test-{}", common::unique_suffix()),
            max_len: 100,
            outbox_capacity: 100,
        }
    }

    fn open_with(settings: &RedisSettings, limits: JobLimits, claim: Duration) -> RedisJobStore {
        RedisJobStore::open(settings, limits, claim, Duration::from_secs(3600)).unwrap()
    }

    #[test]
    fn the_redis_store_keeps_the_contract() {
        let Some(url) = shared_url() else { return };
        behaves_like_a_job_store(&|limits| {
            Box::new(open_with(&settings(&url), limits, Duration::from_secs(30)))
        });
    }

    #[test]
    fn processes_sharing_a_prefix_share_jobs_and_never_claim_one_twice() {
        let Some(url) = shared_url() else { return };
        let settings = settings(&url);
        let open = || open_with(&settings, JobLimits::jobs(1000), Duration::from_secs(30));
        let seeding = open();
        two_stores_claiming_at_once_take_each_job_once(&seeding, open);
        let counts = seeding.count_by_status().unwrap();
        assert_eq!(
            counts[1],
            (JobStatus::Running, 300),
            "seen from any process"
        );
    }

    #[test]
    fn a_dead_workers_job_is_taken_over_with_a_retry_counted_or_failed_when_retries_are_spent() {
        let Some(url) = shared_url() else { return };
        let settings = settings(&url);
        let claim = Duration::from_millis(300);
        let dead = open_with(&settings, JobLimits::jobs(100), claim);
        let (first, second) = (job("alice", "nb"), job("alice", "nb"));
        dead.create(first.clone()).unwrap();
        dead.create(second.clone()).unwrap();
        dead.claim_next().unwrap();
        dead.claim_next().unwrap();
        let retrying = JobChange {
            retry_count: Some(1),
            ..JobChange::to(JobStatus::Running)
        };
        dead.update(&second.id, &[JobStatus::Running], retrying)
            .unwrap();
        drop(dead); // its renewals stop

        let live = open_with(&settings, JobLimits::jobs(100), claim);
        assert!(
            live.requeue_interrupted(1).unwrap().is_empty(),
            "claims younger than the timeout are left alone"
        );
        std::thread::sleep(claim * 2);
        let changed = live.requeue_interrupted(1).unwrap();
        assert_eq!(ids(&changed), [&first.id, &second.id]);
        assert_eq!(changed[0].status, JobStatus::Queued);
        assert_eq!(changed[0].retry_count, 1, "the interrupted attempt counts");
        assert_eq!(changed[1].status, JobStatus::Failed);
        assert_eq!(
            changed[1].error.as_deref(),
            Some("interrupted by a server restart during attempt 2, and no retries were left")
        );
        let taken = live.claim_next().unwrap().expect("the requeued job");
        assert_eq!(
            (taken.id.as_str(), taken.retry_count),
            (first.id.as_str(), 1)
        );
        assert_eq!(live.claim_next().unwrap(), None);
    }

    #[test]
    fn a_live_worker_keeps_its_claim_past_the_timeout_and_a_stale_claim_stores_nothing() {
        let Some(url) = shared_url() else { return };
        let settings = settings(&url);
        let claim = Duration::from_millis(300);
        let slow = open_with(&settings, JobLimits::jobs(100), claim);
        let other = open_with(&settings, JobLimits::jobs(100), claim);
        let kept = job("alice", "nb");
        slow.create(kept.clone()).unwrap();
        slow.claim_next().unwrap();
        // Three timeouts while `slow` lives: its thread renews the claim.
        for _ in 0..6 {
            std::thread::sleep(claim / 2);
            assert!(other.requeue_interrupted(1).unwrap().is_empty());
        }
        let Updated::Applied(done) = slow
            .update(
                &kept.id,
                &[JobStatus::Running],
                JobChange::to(JobStatus::Completed),
            )
            .unwrap()
        else {
            panic!("the claim is still the slow worker's");
        };
        assert_eq!(done.status, JobStatus::Completed);

        // A claim taken over (by a process that waits less than this one renews): the first
        // worker's outcome is refused, the job is the new claimant's.
        let patient = open_with(&settings, JobLimits::jobs(100), Duration::from_secs(30));
        let lost = job("alice", "nb");
        patient.create(lost.clone()).unwrap();
        patient.claim_next().unwrap();
        std::thread::sleep(claim * 2);
        assert_eq!(ids(&other.requeue_interrupted(1).unwrap()), [&lost.id]);
        assert_eq!(other.claim_next().unwrap().unwrap().id, lost.id);
        assert_eq!(
            patient
                .update(
                    &lost.id,
                    &[JobStatus::Running],
                    JobChange::to(JobStatus::Completed)
                )
                .unwrap(),
            Updated::Refused(JobStatus::Running)
        );
        assert!(matches!(
            other
                .update(
                    &lost.id,
                    &[JobStatus::Running],
                    JobChange::to(JobStatus::Completed)
                )
                .unwrap(),
            Updated::Applied(_)
        ));
    }

    #[test]
    fn finished_jobs_are_forgotten_after_the_retention_period() {
        let Some(url) = shared_url() else { return };
        let settings = settings(&url);
        let retention = Duration::from_millis(200);
        let store = RedisJobStore::open(
            &settings,
            JobLimits::jobs(100),
            Duration::from_secs(30),
            retention,
        )
        .unwrap();
        let (finished, queued) = (job("alice", "nb"), job("alice", "nb"));
        store.create(finished.clone()).unwrap();
        store.create(queued.clone()).unwrap();
        store
            .update(
                &finished.id,
                &[JobStatus::Queued],
                JobChange::to(JobStatus::Failed),
            )
            .unwrap();
        std::thread::sleep(retention * 2);
        store.requeue_interrupted(1).unwrap();
        assert_eq!(store.get(&finished.id).unwrap(), None);
        assert!(
            store.get(&queued.id).unwrap().is_some(),
            "unfinished jobs stay"
        );
        assert_eq!(ids(&store.list("alice", &all(10)).unwrap()), [&queued.id]);
        assert!(store.list("nobody", &all(10)).unwrap().is_empty());
        assert_eq!(store.count_by_status().unwrap()[3], (JobStatus::Failed, 0));
    }
}
