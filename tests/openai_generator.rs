//! The OpenAI-compatible generator end to end: jobs submitted over the real HTTP API, followed on
//! the SSE stream, against a scripted fake model server on 127.0.0.1 that records every request.

mod common;

use std::collections::HashMap;

use artifact_events::config::Config;
use common::model_server::{quiz, ModelServer, Reply};
use common::{binary_token, request, send, RunningServer, SseClient, TestServer, SECRET};
use hyper::StatusCode;
use serde_json::{json, Value};

const API_KEY: &str = "sk-test-0123456789-do-not-log";
const PRODUCT_REQUEST: &str = "Create quiz on cells";

/// The server's settings as the environment would give them: `GENERATOR=openai` against
/// `model`, retries after 10 ms, plus `extra`.
fn openai_config(model: &ModelServer, extra: &[(&str, &str)]) -> Config {
    let base_url = model.base_url();
    let mut settings: HashMap<&str, &str> = HashMap::from([
        ("JWT_SECRET", SECRET),
        ("GENERATOR", "openai"),
        ("OPENAI_BASE_URL", base_url.as_str()),
        ("OPENAI_API_KEY", API_KEY),
        ("OPENAI_MODEL", "fake-model"),
        ("RETRY_BACKOFF_MS", "10"),
    ]);
    settings.extend(extra.iter().copied());
    Config::from_lookup(|variable| settings.get(variable).map(|value| value.to_string())).unwrap()
}

/// A server on the backends `config` names, and alice's token and open stream.
async fn start(config: Config) -> (TestServer, String, SseClient) {
    let server = TestServer::open(config).await;
    let token = server.token("alice");
    let client = SseClient::connected(server.addr, &token).await;
    (server, token, client)
}

async fn submit(
    server: &TestServer,
    token: &str,
    artifact_type: &str,
    content: &str,
    options: Value,
) -> String {
    let body = json!({"notebook_id": "nb-1", "artifact_type": artifact_type, "content": content, "options": options});
    common::generate(server.addr, token, &body).await
}

/// The events of one job up to the one that ends it (completed, failed or cancelled).
async fn events_until_the_end(client: &mut SseClient) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let event = client.next_event().await;
        let running = event["status"] == "running";
        events.push(event);
        if !running {
            return events;
        }
    }
}

async fn last_event(client: &mut SseClient) -> Value {
    events_until_the_end(client).await.pop().unwrap()
}

async fn get_job(server: &TestServer, token: &str, job_id: &str) -> Value {
    let path = format!("/ai/artifact/jobs/{job_id}");
    let reply = send(server.addr, request("GET", &path, Some(token), "")).await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()
}

#[tokio::test]
async fn the_products_own_request_completes_with_the_quiz_the_model_sent() {
    let model = ModelServer::start(
        vec![Reply::artifact(&quiz(5))],
        Reply::error(500, "unscripted"),
    )
    .await;
    let (server, token, mut client) = start(openai_config(&model, &[])).await;

    let job_id = submit(
        &server,
        &token,
        "quiz",
        PRODUCT_REQUEST,
        json!({"num_questions": 5}),
    )
    .await;

    let events = events_until_the_end(&mut client).await;
    let stages: Vec<_> = events
        .iter()
        .filter_map(|event| event["stage"].as_str())
        .collect();
    assert_eq!(stages, ["planned", "generated", "validated"]);
    let completed = events.last().unwrap();
    assert_eq!(completed["job_id"], job_id.as_str());
    assert_eq!(completed["result"], quiz(5));
    assert_eq!(
        completed["result"]["questions"].as_array().unwrap().len(),
        5
    );

    let requests = model.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent.request_line, "POST /v1/chat/completions HTTP/1.1");
    assert_eq!(
        sent.header("authorization"),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_eq!(sent.body["model"], "fake-model");
    assert_eq!(sent.body["stream"], false);
    assert!(sent.body["max_tokens"].as_u64().is_some());
    assert_eq!(sent.body["messages"][0]["role"], "system");
    assert!(
        sent.message(1).contains("exactly 5 questions"),
        "{}",
        sent.message(1)
    );
    assert!(sent.message(1).ends_with(PRODUCT_REQUEST));
    let format = &sent.body["response_format"];
    assert_eq!(format["type"], "json_schema");
    assert_eq!(format["json_schema"]["name"], "quiz");
    assert_eq!(
        format["json_schema"]["schema"]["properties"]["questions"]["minItems"],
        5
    );
    server.stop().await;
}

#[tokio::test]
async fn a_server_that_refuses_response_format_is_asked_by_instructions_and_its_json_found_in_prose(
) {
    let cards = json!({"cards": [
        {"front": "Chloroplast", "back": "Where photosynthesis takes place."},
        {"front": "Chlorophyll", "back": "The green pigment that absorbs light."},
    ]});
    let fenced = format!("Sure! Here are your cards:\n```json\n{cards:#}\n```\nGood luck.");
    let script = vec![
        Reply::error(400, "response_format type json_schema is not supported"),
        Reply::completion(&fenced),
        Reply::completion(&fenced),
    ];
    let model = ModelServer::start(script, Reply::error(500, "unscripted")).await;
    let (server, token, mut client) = start(openai_config(&model, &[])).await;

    for _ in 0..2 {
        submit(
            &server,
            &token,
            "flashcards",
            "Photosynthesis happens in chloroplasts.",
            json!({"num_cards": 2}),
        )
        .await;
        let completed = last_event(&mut client).await;
        assert_eq!(completed["result"], cards, "{completed}");
    }

    let requests = model.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests[0].body.get("response_format").is_some());
    // Asked again at once without it, and not offered again to the same server.
    assert!(requests[1].body.get("response_format").is_none());
    assert!(requests[2].body.get("response_format").is_none());
    assert_eq!(requests[1].body["messages"], requests[0].body["messages"]);
    server.stop().await;
}

#[tokio::test]
async fn the_repair_request_carries_the_validators_error_text() {
    let short = quiz(2);
    let script = vec![Reply::artifact(&short), Reply::artifact(&quiz(3))];
    let model = ModelServer::start(script, Reply::error(500, "unscripted")).await;
    let (server, token, mut client) = start(openai_config(&model, &[])).await;

    submit(
        &server,
        &token,
        "quiz",
        PRODUCT_REQUEST,
        json!({"num_questions": 3}),
    )
    .await;

    let completed = last_event(&mut client).await;
    assert_eq!(completed["result"], quiz(3));
    let requests = model.requests();
    assert_eq!(requests.len(), 2);
    let repair = &requests[1];
    assert_eq!(repair.body["messages"][1], requests[0].body["messages"][1]);
    assert_eq!(repair.body["messages"][2]["role"], "assistant");
    assert_eq!(repair.message(2), short.to_string());
    let turn = repair.message(-1);
    assert!(turn.contains("- expected 3 questions, got 2\n"), "{turn}");
    server.stop().await;
}

#[tokio::test]
async fn an_answer_that_stays_invalid_fails_with_the_documented_text() {
    let not_json = Reply::completion("I cannot write quizzes, but cells are fascinating!");
    let model = ModelServer::start(Vec::new(), not_json).await;
    let (server, token, mut client) = start(openai_config(&model, &[("MAX_RETRIES", "0")])).await;

    submit(
        &server,
        &token,
        "quiz",
        PRODUCT_REQUEST,
        json!({"num_questions": 3}),
    )
    .await;

    let failed = last_event(&mut client).await;
    let error = failed["error"].as_str().unwrap();
    assert_eq!(
        error,
        "Validation failed after 2 repair attempts: output is not a JSON object"
    );
    let requests = model.requests();
    assert_eq!(requests.len(), 3, "the answer and two repairs");
    assert!(requests[2]
        .message(-1)
        .contains("- output is not a JSON object\n"));
    assert_eq!(
        requests[2].message(-2),
        "I cannot write quizzes, but cells are fascinating!"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_server_error_is_retried_within_the_jobs_budget() {
    let script = vec![
        Reply::error(500, "the model is loading"),
        Reply::artifact(&quiz(2)),
    ];
    let model = ModelServer::start(script, Reply::error(500, "unscripted")).await;
    let (server, token, mut client) = start(openai_config(&model, &[])).await;

    let job_id = submit(
        &server,
        &token,
        "quiz",
        PRODUCT_REQUEST,
        json!({"num_questions": 2}),
    )
    .await;

    let completed = last_event(&mut client).await;
    assert_eq!(completed["result"], quiz(2));
    assert_eq!(get_job(&server, &token, &job_id).await["retry_count"], 1);
    assert_eq!(model.requests().len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn provider_errors_become_clear_job_errors_without_the_key() {
    let script = vec![
        Reply::error(401, &format!("Incorrect API key provided: {API_KEY}")),
        Reply::error(403, "forbidden"),
        Reply::error(404, "The model `fake-model` does not exist"),
        Reply::error(503, &format!("overloaded, key {API_KEY}")),
        Reply::error(400, "max_tokens is too large"),
    ];
    let model = ModelServer::start(script, Reply::error(500, "unscripted")).await;
    let (server, token, mut client) = start(openai_config(&model, &[("MAX_RETRIES", "0")])).await;
    let at = model.addr;

    let expected = [
        "generation failed: the model server refused the API key (HTTP 401)".to_owned(),
        "generation failed: the model server refused the API key (HTTP 403)".to_owned(),
        format!("generation failed: model \"fake-model\" not found at {at} (HTTP 404): check OPENAI_MODEL, and that OPENAI_BASE_URL ends where the API starts (e.g. /v1)"),
        format!("generation failed: the model server at {at} failed (HTTP 503): overloaded, key [redacted]"),
        format!("generation failed: the model server at {at} rejected the request (HTTP 400): max_tokens is too large"),
    ];
    for expected in expected {
        let job_id = submit(
            &server,
            &token,
            "quiz",
            PRODUCT_REQUEST,
            json!({"num_questions": 2}),
        )
        .await;
        let failed = last_event(&mut client).await;
        assert_eq!(failed["error"], expected.as_str());
        assert_eq!(
            get_job(&server, &token, &job_id).await["error"],
            expected.as_str()
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn a_model_that_never_answers_fails_the_job_at_the_llm_timeout() {
    let model = ModelServer::start(Vec::new(), Reply::Hang).await;
    let settings = [("MAX_RETRIES", "0"), ("LLM_TIMEOUT_SECS", "1")];
    let (server, token, mut client) = start(openai_config(&model, &settings)).await;

    submit(
        &server,
        &token,
        "quiz",
        PRODUCT_REQUEST,
        json!({"num_questions": 2}),
    )
    .await;

    let failed = last_event(&mut client).await;
    let expected = format!(
        "generation failed: the model server at {} did not answer within 1 s (LLM_TIMEOUT_SECS)",
        model.addr
    );
    assert_eq!(failed["error"], expected.as_str());
    server.stop().await;
}

#[tokio::test]
async fn the_job_timeout_aborts_a_slow_model_request() {
    let mut model = ModelServer::start(Vec::new(), Reply::Hang).await;
    let settings = [
        ("MAX_RETRIES", "0"),
        ("LLM_TIMEOUT_SECS", "30"),
        ("JOB_TIMEOUT_SECS", "1"),
    ];
    let (server, token, mut client) = start(openai_config(&model, &settings)).await;

    submit(
        &server,
        &token,
        "quiz",
        PRODUCT_REQUEST,
        json!({"num_questions": 2}),
    )
    .await;

    let failed = last_event(&mut client).await;
    assert_eq!(failed["error"], "the attempt timed out after 1s");
    model.connection_dropped().await;
    server.stop().await;
}

#[tokio::test]
async fn a_rate_limited_request_waits_for_retry_after_then_completes() {
    let script = vec![
        Reply::error(429, "slow down").with_header("retry-after", "1"),
        Reply::artifact(&quiz(2)),
    ];
    let model = ModelServer::start(script, Reply::error(500, "unscripted")).await;
    let (server, token, mut client) = start(openai_config(&model, &[])).await;

    let job_id = submit(
        &server,
        &token,
        "quiz",
        PRODUCT_REQUEST,
        json!({"num_questions": 2}),
    )
    .await;

    let completed = last_event(&mut client).await;
    assert_eq!(completed["result"], quiz(2));
    // Within the attempt, not a retry of the job.
    assert_eq!(get_job(&server, &token, &job_id).await["retry_count"], 0);
    let requests = model.requests();
    assert_eq!(requests.len(), 2);
    let waited = requests[1].at - requests[0].at;
    assert!(waited.as_millis() >= 1000, "asked again after {waited:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_retry_after_beyond_the_job_timeout_fails_at_once() {
    let limited = Reply::error(429, "quota exceeded").with_header("retry-after", "3600");
    let model = ModelServer::start(Vec::new(), limited).await;
    let (server, token, mut client) = start(openai_config(&model, &[("MAX_RETRIES", "0")])).await;

    submit(
        &server,
        &token,
        "quiz",
        PRODUCT_REQUEST,
        json!({"num_questions": 2}),
    )
    .await;

    let failed = last_event(&mut client).await;
    assert_eq!(
        failed["error"],
        "generation failed: the model server is rate limiting (HTTP 429) and asks to retry after 3600 s, longer than the job may take (60 s)"
    );
    assert_eq!(model.requests().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn cancel_drops_the_model_request_in_flight() {
    let mut model = ModelServer::start(Vec::new(), Reply::Hang).await;
    let (server, token, mut client) = start(openai_config(&model, &[])).await;
    let job_id = submit(
        &server,
        &token,
        "quiz",
        PRODUCT_REQUEST,
        json!({"num_questions": 2}),
    )
    .await;
    assert_eq!(client.next_event().await["status"], "running");
    model.next_request().await;

    let path = format!("/ai/artifact/jobs/{job_id}/cancel");
    let reply = send(server.addr, request("POST", &path, Some(&token), "")).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);

    model.connection_dropped().await;
    assert_eq!(last_event(&mut client).await["status"], "cancelled");
    assert_eq!(model.requests().len(), 1);
    server.stop().await;
}

#[tokio::test]
async fn the_api_key_never_reaches_the_log_the_events_the_errors_or_metrics() {
    let script = vec![
        Reply::artifact(&quiz(2)),
        Reply::error(401, &format!("Incorrect API key provided: {API_KEY}")),
        Reply::error(500, &format!("internal error for key {API_KEY}")),
    ];
    let model = ModelServer::start(script, Reply::error(500, "unscripted")).await;
    let base_url = model.base_url();
    let server = RunningServer::start(&[
        ("GENERATOR", "openai"),
        ("OPENAI_BASE_URL", &base_url),
        ("OPENAI_API_KEY", API_KEY),
        ("OPENAI_MODEL", "fake-model"),
        ("MAX_RETRIES", "1"),
        ("RETRY_BACKOFF_MS", "10"),
        ("LOG_LEVEL", "debug"),
    ]);
    let token = binary_token("alice");
    let mut client = SseClient::connected(server.addr, &token).await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let body = json!({"notebook_id": "nb-1", "artifact_type": "quiz", "content": PRODUCT_REQUEST, "options": {"num_questions": 2}});
        common::generate(server.addr, &token, &body).await;
        seen.extend(events_until_the_end(&mut client).await);
    }
    assert_eq!(
        seen.iter()
            .filter(|event| event.get("result").is_some())
            .count(),
        1
    );
    let failed = seen.last().unwrap();
    assert!(
        failed["error"].as_str().unwrap().contains("(HTTP 500)"),
        "{failed}"
    );
    let jobs = send(
        server.addr,
        request("GET", "/ai/artifact/jobs", Some(&token), ""),
    )
    .await;
    let metrics = send(server.addr, request("GET", "/metrics", None, "")).await;

    let (_, log) = server.terminate();
    for (what, text) in [
        ("the log", log.clone()),
        ("the events", Value::from(seen).to_string()),
        ("the jobs", String::from_utf8_lossy(&jobs.body).into_owned()),
        (
            "the metrics",
            String::from_utf8_lossy(&metrics.body).into_owned(),
        ),
    ] {
        assert!(!text.contains(API_KEY), "the key is in {what}: {text}");
        assert!(
            !text.contains("0123456789"),
            "part of the key is in {what}: {text}"
        );
    }
    assert!(
        log.contains("artifacts are generated by model fake-model"),
        "{log}"
    );
    assert!(log.contains("refused the API key"), "{log}");
    let requests = model.requests();
    assert_eq!(requests.len(), 3);
    let bearer = format!("Bearer {API_KEY}");
    assert!(requests
        .iter()
        .all(|sent| sent.header("authorization") == Some(bearer.as_str())));
}

#[test]
fn generator_openai_without_a_model_is_a_configuration_error_naming_the_variable() {
    let output = std::process::Command::new(common::BINARY)
        .env("ADDR", "127.0.0.1:0")
        .env("GENERATOR", "openai")
        .env("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")
        .env_remove("OPENAI_MODEL")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("OPENAI_MODEL: must be set when GENERATOR=openai"),
        "{stderr}"
    );
}
