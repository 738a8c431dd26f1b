//! Artifact jobs: `POST /ai/artifact/generate`, `GET /ai/artifact/jobs[/{id}]`, and cancel.
//!
//! The caller is the bearer token's `sub`, or the `access_token` cookie's for the demo page
//! (see `auth::user_identity`).

use hyper::{Request, Response, StatusCode};
use serde_json::{json, Map, Value};

use crate::config::{MAX_CONTENT_BYTES, MAX_GENERATE_BODY_BYTES};
use crate::jobs::{ArtifactType, CancelOutcome, Job, JobFilter, JobStatus, StoreError};
use crate::log;
use crate::server::auth::user_identity;
use crate::server::error::ApiError;
use crate::server::request::{query_pairs, read_json, RequestBody};
use crate::server::response::{json_response, ResponseBody};
use crate::server::state::AppState;

/// The fields a generate request may have.
const GENERATE_FIELDS: [&str; 4] = ["notebook_id", "artifact_type", "content", "options"];
/// Longest accepted `notebook_id`.
const MAX_NOTEBOOK_ID_LEN: usize = 256;
/// Most questions or cards one job may ask for.
const MAX_ITEMS: u64 = 50;
/// Questions in a quiz unless `options.num_questions` says otherwise.
const DEFAULT_NUM_QUESTIONS: usize = 5;
/// Cards in a flashcard set unless `options.num_cards` says otherwise.
const DEFAULT_NUM_CARDS: usize = 10;
/// Key points a summary aims for.
const SUMMARY_KEY_POINTS: usize = 5;
/// Jobs listed unless `limit` says otherwise, and the most it may say.
const DEFAULT_LIST_LIMIT: usize = 20;
const MAX_LIST_LIMIT: usize = 100;

/// Validates the request, queues the job, and answers 202 with its id.
pub(in crate::server) async fn generate(
    state: &AppState,
    request: Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = user_identity(&state.auth, &request).await?;
    let timeout = state.config.body_read_timeout;
    let body = read_json(request, MAX_GENERATE_BODY_BYTES, timeout).await?;
    let job = parse_generate_request(&identity.user_id, body)?;
    let job_id = job.id.clone();
    let artifact_type = job.artifact_type.as_str();
    state.jobs.submit(job).map_err(|error| match error {
        StoreError::UserAtLimit(max) => ApiError::TooManyJobs(max),
        StoreError::Full(why) => {
            log::warning!("cannot queue a job: the job store is full: {why}");
            ApiError::Unavailable("the job store cannot take more jobs now")
        }
        error => store_failure(error),
    })?;
    log::info!(
        "job {job_id} ({artifact_type}) queued for user {}",
        identity.user_id
    );
    Ok(json_response(
        StatusCode::ACCEPTED,
        &json!({"job_id": job_id, "status": JobStatus::Queued.as_str()}),
    ))
}

/// One of the caller's jobs; another user's job is 404, as if it did not exist.
pub(in crate::server) async fn get_job(
    state: &AppState,
    request: &Request<impl RequestBody>,
    job_id: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = user_identity(&state.auth, request).await?;
    match state.jobs.store().get(job_id).map_err(store_failure)? {
        Some(job) if job.user_id == identity.user_id => {
            Ok(json_response(StatusCode::OK, &job.to_json()))
        }
        _ => Err(ApiError::NotFound),
    }
}

/// The caller's jobs, newest first, filtered by `notebook_id` and `status`, at most `limit`.
pub(in crate::server) async fn list_jobs(
    state: &AppState,
    request: &Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = user_identity(&state.auth, request).await?;
    let filter = parse_job_filter(request.uri().query().unwrap_or(""))?;
    let jobs = state
        .jobs
        .store()
        .list(&identity.user_id, &filter)
        .map_err(store_failure)?;
    let jobs: Vec<Value> = jobs.iter().map(Job::to_json).collect();
    Ok(json_response(StatusCode::OK, &json!({ "jobs": jobs })))
}

/// Cancels a queued or running job of the caller: 200 with the job, 409 if already finished.
pub(in crate::server) async fn cancel_job(
    state: &AppState,
    request: &Request<impl RequestBody>,
    job_id: &str,
) -> Result<Response<ResponseBody>, ApiError> {
    let identity = user_identity(&state.auth, request).await?;
    match state
        .jobs
        .cancel(&identity.user_id, job_id)
        .await
        .map_err(store_failure)?
    {
        CancelOutcome::Cancelled(job) => Ok(json_response(StatusCode::OK, &job.to_json())),
        CancelOutcome::AlreadyFinished(status) => Err(ApiError::Conflict(format!(
            "job is already {}",
            status.as_str()
        ))),
        CancelOutcome::NotFound => Err(ApiError::NotFound),
    }
}

/// A store that is out of reach answers 503 with `Retry-After` (never a job accepted that
/// cannot be stored); any other failure is a 500.
fn store_failure(error: StoreError) -> ApiError {
    log::error!("{error}");
    match error {
        StoreError::Unavailable(_) => {
            ApiError::Unavailable("the job store is unreachable; retry shortly")
        }
        _ => ApiError::Internal,
    }
}

/// Checks every field of a generate request and builds the queued job.
pub(crate) fn parse_generate_request(user_id: &str, body: Value) -> Result<Job, ApiError> {
    let Value::Object(fields) = body else {
        return Err(invalid("the body must be a JSON object"));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|key| !GENERATE_FIELDS.contains(&key.as_str()))
    {
        return Err(invalid(format!(
            "unknown field `{unknown}`; the fields are notebook_id, artifact_type, content and options"
        )));
    }
    let notebook_id = required_string(&fields, "notebook_id")?;
    if notebook_id.chars().count() > MAX_NOTEBOOK_ID_LEN {
        return Err(invalid(format!(
            "`notebook_id` is longer than {MAX_NOTEBOOK_ID_LEN} characters"
        )));
    }
    let type_name = required_string(&fields, "artifact_type")?;
    let artifact_type = ArtifactType::parse(type_name).ok_or_else(|| {
        invalid(format!(
            "`artifact_type` must be \"quiz\", \"flashcards\" or \"summary\", not {type_name:?}"
        ))
    })?;
    let content = required_string(&fields, "content")?;
    if content.len() > MAX_CONTENT_BYTES {
        return Err(ApiError::PayloadTooLarge("`content`", MAX_CONTENT_BYTES));
    }
    let count = parse_options(artifact_type, fields.get("options"))?;
    Ok(Job::new(
        user_id,
        notebook_id,
        artifact_type,
        content.to_owned(),
        count,
    ))
}

fn required_string<'a>(fields: &'a Map<String, Value>, name: &str) -> Result<&'a str, ApiError> {
    match fields.get(name) {
        None | Some(Value::Null) => Err(invalid(format!("`{name}` is required"))),
        Some(Value::String(text)) if text.trim().is_empty() => {
            Err(invalid(format!("`{name}` must not be empty")))
        }
        Some(Value::String(text)) => Ok(text),
        Some(_) => Err(invalid(format!("`{name}` must be a string"))),
    }
}

/// The number of items asked for: `options.num_questions` (quiz), `options.num_cards`
/// (flashcards), or the type's default.
fn parse_options(artifact_type: ArtifactType, options: Option<&Value>) -> Result<usize, ApiError> {
    let (allowed, default) = match artifact_type {
        ArtifactType::Quiz => (Some("num_questions"), DEFAULT_NUM_QUESTIONS),
        ArtifactType::Flashcards => (Some("num_cards"), DEFAULT_NUM_CARDS),
        ArtifactType::Summary => (None, SUMMARY_KEY_POINTS),
    };
    let options = match options {
        None | Some(Value::Null) => return Ok(default),
        Some(Value::Object(options)) => options,
        Some(_) => return Err(invalid("`options` must be an object")),
    };
    let mut count = default;
    for (key, value) in options {
        if Some(key.as_str()) != allowed {
            let expected = match allowed {
                Some(name) => format!("{} takes only options.{name}", artifact_type.as_str()),
                None => format!("{} takes no options", artifact_type.as_str()),
            };
            return Err(invalid(format!(
                "unknown field `options.{key}`: {expected}"
            )));
        }
        // Any number without a fraction, `3.0` too: JSON Schema's `integer`, as openapi.json
        // promises it, is a value, not a spelling.
        count = value
            .as_f64()
            .filter(|n| n.fract() == 0.0 && (1.0..=MAX_ITEMS as f64).contains(n))
            .map(|n| n as usize)
            .ok_or_else(|| {
                invalid(format!(
                    "`options.{key}` must be an integer from 1 to {MAX_ITEMS}"
                ))
            })?;
    }
    Ok(count)
}

/// Parses `notebook_id`, `status` and `limit` from a query string; empty values are absent.
fn parse_job_filter(query: &str) -> Result<JobFilter, ApiError> {
    let mut filter = JobFilter {
        limit: DEFAULT_LIST_LIMIT,
        ..JobFilter::default()
    };
    for (key, value) in query_pairs(query) {
        let value =
            value.ok_or_else(|| invalid(format!("`{key}` is not valid percent-encoded UTF-8")))?;
        if value.is_empty() {
            continue;
        }
        match key {
            "notebook_id" => filter.notebook_id = Some(value),
            "status" => {
                filter.status = Some(JobStatus::parse(&value).ok_or_else(|| {
                    invalid("`status` must be one of queued, running, completed, failed, cancelled")
                })?)
            }
            "limit" => {
                filter.limit = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=MAX_LIST_LIMIT).contains(limit))
                    .ok_or_else(|| invalid(format!("`limit` must be an integer from 1 to {MAX_LIST_LIMIT}")))?
            }
            other => {
                return Err(invalid(format!(
                    "unknown query parameter `{other}`; the parameters are notebook_id, status and limit"
                )))
            }
        }
    }
    Ok(filter)
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::Unprocessable(message.into())
}
