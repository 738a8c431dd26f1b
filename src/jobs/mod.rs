//! Artifact jobs: the job record, the store seam (`JobStore`) with its in-memory store, the
//! generators and the validator, and the worker that drives them.

mod artifact_worker;
pub mod generator;
mod store;
pub mod validator;

pub use artifact_worker::{ArtifactWorker, CancelOutcome, WorkerConfig};
pub use generator::{
    ArtifactGenerator, ArtifactType, DelayedGenerator, GenerationRequest, OfflineGenerator,
    OpenAiGenerator,
};
pub use store::{
    JobChange, JobFilter, JobLimits, JobStore, MemoryJobStore, SharedSignals, StoreError, Updated,
};

use serde_json::{json, Value};

/// Where a job is in its life; `completed`, `failed` and `cancelled` are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker is planning, generating or validating it.
    Running,
    /// Finished with a valid artifact in `result`.
    Completed,
    /// Finished without one; `error` says why.
    Failed,
    /// Stopped by its owner.
    Cancelled,
}

impl JobStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    /// The wire name, e.g. `"queued"`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a wire name.
    pub fn parse(name: &str) -> Option<JobStatus> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == name)
    }

    /// Whether the job can no longer change.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// Memory a job costs beyond its text: the record, its map entries, timestamps, and a parsed
/// result's nodes. Counted against the byte budget so that it holds for small jobs too.
pub(crate) const JOB_OVERHEAD_BYTES: usize = 512;

/// About what a JSON value takes in memory: its text, and a node's worth per value.
pub(crate) fn json_bytes(value: &Value) -> usize {
    const NODE_BYTES: usize = 32;
    NODE_BYTES
        + match value {
            Value::String(text) => text.len(),
            Value::Array(items) => items.iter().map(json_bytes).sum(),
            Value::Object(fields) => fields
                .iter()
                .map(|(key, value)| key.len() + json_bytes(value))
                .sum(),
            _ => 0,
        }
}

/// One request to generate an artifact, and what became of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Unguessable id (128 random bits, hex).
    pub id: String,
    /// The owner: the `sub` of the token that created it.
    pub user_id: String,
    /// The notebook the artifact belongs to.
    pub notebook_id: String,
    /// Quiz, flashcards or summary.
    pub artifact_type: ArtifactType,
    /// The source text.
    pub content: String,
    /// Questions or cards asked for (key points, for a summary).
    pub count: usize,
    /// Current status.
    pub status: JobStatus,
    /// RFC 3339 UTC creation time.
    pub created_at: String,
    /// RFC 3339 UTC time of the last status change.
    pub updated_at: String,
    /// The artifact, once completed.
    pub result: Option<Value>,
    /// Why it failed, once failed.
    pub error: Option<String>,
    /// Retries made after the first attempt.
    pub retry_count: u32,
}

impl Job {
    /// A new queued job with a fresh id.
    pub fn new(
        user_id: &str,
        notebook_id: &str,
        artifact_type: ArtifactType,
        content: String,
        count: usize,
    ) -> Job {
        let now = crate::time::now_rfc3339();
        Job {
            id: crate::random::hex_token(16),
            user_id: user_id.to_owned(),
            notebook_id: notebook_id.to_owned(),
            artifact_type,
            content,
            count,
            status: JobStatus::Queued,
            created_at: now.clone(),
            updated_at: now,
            result: None,
            error: None,
            retry_count: 0,
        }
    }

    /// The job as the API shows it to its owner (without the content).
    pub fn to_json(&self) -> Value {
        json!({
            "job_id": self.id,
            "status": self.status.as_str(),
            "artifact_type": self.artifact_type.as_str(),
            "notebook_id": self.notebook_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "result": self.result,
            "error": self.error,
            "retry_count": self.retry_count,
        })
    }

    /// The fields every lifecycle event of this job carries, stamped now.
    pub fn event_data(&self) -> Value {
        json!({
            "job_id": self.id,
            "user_id": self.user_id,
            "artifact_type": self.artifact_type.as_str(),
            "notebook_id": self.notebook_id,
            "timestamp": crate::time::now_rfc3339(),
        })
    }

    /// What keeping this job costs, counted against the store's byte budget: its text (content,
    /// result, error, ids) plus a fixed allowance for the record around it.
    pub fn stored_bytes(&self) -> usize {
        JOB_OVERHEAD_BYTES
            + self.content.len()
            + self.result.as_ref().map_or(0, json_bytes)
            + self.error.as_ref().map_or(0, String::len)
            + self.id.len()
            + self.user_id.len()
            + self.notebook_id.len()
    }

    /// What the generator is asked to produce for this job.
    pub fn generation_request(&self) -> GenerationRequest {
        GenerationRequest {
            artifact_type: self.artifact_type,
            content: self.content.clone(),
            count: self.count,
        }
    }
}
