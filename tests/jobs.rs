//! Artifact jobs end to end over real TCP: generate, the worker's lifecycle events, job status,
//! failure after retry, cancel, ownership, validation, and a burst across many users.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use artifact_events::config::Config;
use artifact_events::jobs::{
    generator::{BoxFuture, GenerationError},
    ArtifactGenerator, DelayedGenerator, GenerationRequest, JobStatus, OfflineGenerator,
};
use artifact_events::{EventType, Handler};
use common::{config, request, send, SseClient, TestServer};
use hyper::StatusCode;
use serde_json::{json, Value};

const PHOTOSYNTHESIS: &str = "Photosynthesis is the process by which green plants convert light energy into chemical energy. It takes place mainly in the chloroplasts of leaf cells. Chlorophyll, the green pigment in chloroplasts, absorbs red and blue light. During the light reactions, water molecules are split and oxygen is released as a byproduct. The Calvin cycle then uses carbon dioxide from the air to build glucose. Plants store this glucose as starch or use it to fuel cellular respiration. Without photosynthesis, most life on Earth would lack both food and oxygen.";
const FRENCH_REVOLUTION: &str = "The French Revolution began in 1789 when the Estates-General met at Versailles. Deep debt from foreign wars had left the monarchy unable to pay its obligations. The Third Estate declared itself the National Assembly and swore the Tennis Court Oath. Crowds in Paris stormed the Bastille fortress on the fourteenth of July. The Assembly abolished feudal privileges and issued the Declaration of the Rights of Man. King Louis XVI was tried for treason and executed in January 1793. The Reign of Terror under Robespierre sent thousands of suspected enemies to the guillotine. Napoleon Bonaparte seized power in 1799 and ended the revolutionary decade.";
const TCP_CONGESTION: &str = "TCP congestion control keeps senders from overwhelming the network. A sender maintains a congestion window that limits how much unacknowledged data it may transmit. During slow start the window doubles every round trip until it reaches the threshold. After the threshold, congestion avoidance grows the window by one segment per round trip. When a packet loss is detected through duplicate acknowledgements, fast retransmit resends the missing segment. The sender then halves its window, a reaction called multiplicative decrease. A timeout signals severe congestion and sends the connection back to slow start. Modern variants such as CUBIC and BBR estimate bandwidth to use fast links more efficiently.";

fn generate_body(artifact_type: &str, content: &str, options: Value) -> String {
    json!({"notebook_id": "nb-1", "artifact_type": artifact_type, "content": content, "options": options}).to_string()
}

async fn submit(server: &TestServer, token: &str, body: String) -> String {
    let reply = send(
        server.addr,
        request("POST", "/ai/artifact/generate", Some(token), body),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "body: {:?}", reply.body);
    let answer = reply.json();
    assert_eq!(answer["status"], "queued");
    let job_id = answer["job_id"].as_str().unwrap().to_owned();
    assert!(
        job_id.len() >= 24 && job_id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{job_id}"
    );
    job_id
}

async fn get_job(server: &TestServer, token: &str, job_id: &str) -> Value {
    let reply = send(
        server.addr,
        request(
            "GET",
            &format!("/ai/artifact/jobs/{job_id}"),
            Some(token),
            "",
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "body: {:?}", reply.body);
    reply.json()
}

/// Starts a server whose jobs use `generator`, and opens alice's event stream: returns the
/// server, alice's token and her stream, past its connected frame.
async fn start_with_alice_listening(
    settings: Config,
    generator: impl ArtifactGenerator + 'static,
) -> (TestServer, String, SseClient) {
    let server = TestServer::start_with_generator(settings, Arc::new(generator)).await;
    let token = server.token("alice");
    let client = SseClient::connected(server.addr, &token).await;
    (server, token, client)
}

/// The next event that ends a job (completed: `result`; failed: `error`; cancelled: `status`).
async fn next_terminal_event(client: &mut SseClient) -> Value {
    loop {
        let event = client.next_event().await;
        let running = event["status"] == "running";
        if !running {
            return event;
        }
    }
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[tokio::test]
async fn every_artifact_type_completes_with_progress_then_the_seeds_payload() {
    let (server, token, mut client) = start_with_alice_listening(config(), OfflineGenerator).await;

    for (artifact_type, content, options) in [
        ("quiz", PHOTOSYNTHESIS, json!({"num_questions": 5})),
        ("flashcards", FRENCH_REVOLUTION, json!({"num_cards": 5})),
        ("summary", TCP_CONGESTION, json!({})),
        ("quiz", TCP_CONGESTION, json!({"num_questions": 3})),
        ("flashcards", PHOTOSYNTHESIS, json!({"num_cards": 4})),
        ("summary", FRENCH_REVOLUTION, json!(null)),
    ] {
        let job_id = submit(
            &server,
            &token,
            generate_body(artifact_type, content, options.clone()),
        )
        .await;
        let started = client.next_event().await;
        assert_eq!(
            (started["job_id"].as_str(), started["status"].as_str()),
            (Some(job_id.as_str()), Some("running"))
        );
        for (percent, stage) in [(20, "planned"), (60, "generated"), (90, "validated")] {
            let progress = client.next_event().await;
            assert_eq!(progress["progress"], percent);
            assert_eq!(progress["stage"], stage);
        }
        let completed = client.next_event().await;
        assert_eq!(
            keys(&completed),
            [
                "artifact_type",
                "job_id",
                "notebook_id",
                "result",
                "timestamp",
                "user_id"
            ]
        );
        assert_eq!(completed["job_id"], job_id.as_str());
        assert_eq!(completed["user_id"], "alice");
        assert_eq!(completed["artifact_type"], artifact_type);
        assert_eq!(completed["notebook_id"], "nb-1");
        let timestamp = completed["timestamp"].as_str().unwrap();
        assert!(
            timestamp.len() == 24 && timestamp.ends_with('Z') && timestamp.as_bytes()[10] == b'T',
            "{timestamp}"
        );

        let result = &completed["result"];
        match artifact_type {
            "quiz" => {
                let questions = result["questions"].as_array().unwrap();
                assert_eq!(
                    questions.len() as u64,
                    options["num_questions"].as_u64().unwrap()
                );
                for question in questions {
                    let options = question["options"].as_array().unwrap();
                    let answer = options[question["answer_index"].as_u64().unwrap() as usize]
                        .as_str()
                        .unwrap();
                    let explanation = question["explanation"].as_str().unwrap();
                    assert!(
                        content.contains(answer) && explanation.contains(answer),
                        "{question}"
                    );
                    assert!(question["question"].as_str().unwrap().contains("_____"));
                    let distinct: HashSet<String> = options
                        .iter()
                        .map(|o| o.as_str().unwrap().to_lowercase())
                        .collect();
                    assert_eq!(distinct.len(), 4, "options repeat: {question}");
                }
            }
            "flashcards" => {
                let cards = result["cards"].as_array().unwrap();
                assert_eq!(cards.len() as u64, options["num_cards"].as_u64().unwrap());
                for card in cards {
                    let back = card["back"].as_str().unwrap();
                    assert!(
                        content.contains(back) && back.contains(card["front"].as_str().unwrap()),
                        "{card}"
                    );
                }
            }
            _ => {
                assert!(!result["summary"].as_str().unwrap().is_empty());
                for point in result["key_points"].as_array().unwrap() {
                    assert!(content.contains(point.as_str().unwrap()), "{point}");
                }
            }
        }
        let stored = get_job(&server, &token, &job_id).await;
        assert_eq!(stored["status"], "completed");
        assert_eq!(&stored["result"], result);
        assert_eq!(stored["retry_count"], 0);
        assert_eq!(stored["error"], Value::Null);
    }
    server.stop().await;
}

#[tokio::test]
async fn a_bare_instruction_fails_after_one_retry_with_an_actionable_error() {
    let (server, token, mut client) = start_with_alice_listening(config(), OfflineGenerator).await;

    // The seed's literal request: an instruction, no source material.
    let body =
        json!({"notebook_id": "nb-1", "artifact_type": "quiz", "content": "Create quiz on cells"});
    let job_id = submit(&server, &token, body.to_string()).await;
    let failed = next_terminal_event(&mut client).await;
    assert_eq!(
        keys(&failed),
        [
            "artifact_type",
            "error",
            "job_id",
            "notebook_id",
            "retry_count",
            "timestamp",
            "user_id"
        ]
    );
    assert_eq!(failed["job_id"], job_id.as_str());
    assert_eq!(failed["retry_count"], 1);
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.starts_with("Validation failed after 2 repair attempts: expected 5 questions, got "),
        "{error}"
    );
    assert!(
        error.ends_with("send source text, or configure an LLM generator"),
        "{error}"
    );

    let stored = get_job(&server, &token, &job_id).await;
    assert_eq!(stored["status"], "failed");
    assert_eq!(stored["error"], error);
    assert_eq!(stored["retry_count"], 1);
    server.stop().await;
}

#[tokio::test]
async fn the_store_holds_the_final_status_before_the_event_is_published() {
    let server = TestServer::start(config()).await;
    // (event type, the job's stored status when its handler ran)
    type Observed = Vec<(String, Option<JobStatus>)>;
    let seen: Arc<Mutex<Observed>> = Arc::default();
    for event_type in [EventType::COMPLETED, EventType::FAILED] {
        let jobs = server.state.jobs.clone();
        let seen = seen.clone();
        server.state.bus.subscribe(
            event_type.clone(),
            Handler::new(move |data| {
                let job_id = data["job_id"].as_str().unwrap().to_owned();
                let status = jobs.store().get(&job_id).unwrap().map(|job| job.status);
                seen.lock().unwrap().push((event_type.to_string(), status));
                async {}
            }),
        );
    }
    let token = server.token("alice");
    submit(
        &server,
        &token,
        generate_body("quiz", PHOTOSYNTHESIS, json!({})),
    )
    .await;
    submit(
        &server,
        &token,
        generate_body("quiz", "Create quiz on cells", json!({})),
    )
    .await;
    server
        .wait_until("both jobs finished", |_| seen.lock().unwrap().len() == 2)
        .await;

    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        [
            ("artifact.completed".to_owned(), Some(JobStatus::Completed)),
            ("artifact.failed".to_owned(), Some(JobStatus::Failed)),
        ]
    );
    server.stop().await;
}

/// Misbehaves on request: content starting `panic:`, `hang:`, `error:`, `slow:` (takes 300 ms),
/// `block:` (blocks its thread for 300 ms, like CPU-bound work that never yields) or `flaky:`
/// (fails its first attempt only); the rest goes to the offline generator.
#[derive(Default)]
struct ScriptedGenerator {
    flaky_attempts: AtomicUsize,
}

impl ArtifactGenerator for ScriptedGenerator {
    fn plan<'a>(
        &'a self,
        request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move {
            let content = request.content.as_str();
            if content.starts_with("panic:") {
                panic!("scripted generator panic");
            }
            if content.starts_with("hang:") {
                std::future::pending::<()>().await;
            }
            if content.starts_with("slow:") {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if content.starts_with("block:") {
                // The rest of the runtime moves to another thread meanwhile.
                tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(300)));
            }
            if content.starts_with("error:") {
                return Err(GenerationError("scripted upstream outage".to_owned()));
            }
            if content.starts_with("flaky:")
                && self.flaky_attempts.fetch_add(1, Ordering::SeqCst) == 0
            {
                return Err(GenerationError("scripted transient error".to_owned()));
            }
            let (_, source) = content.split_once(':').unwrap_or(("", content));
            let request = GenerationRequest {
                content: source.to_owned(),
                ..request.clone()
            };
            let plan = OfflineGenerator.plan(&request).await?;
            Ok(json!({"content": source, "plan": plan}))
        })
    }

    fn generate<'a>(
        &'a self,
        request: &'a GenerationRequest,
        plan: &'a Value,
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move {
            let request = GenerationRequest {
                content: plan["content"].as_str().unwrap().to_owned(),
                ..request.clone()
            };
            OfflineGenerator.generate(&request, &plan["plan"]).await
        })
    }

    fn repair<'a>(
        &'a self,
        _: &'a GenerationRequest,
        _: &'a Value,
        output: &'a Value,
        _: &'a [String],
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move { Ok(output.clone()) })
    }
}

fn scripted_config() -> Config {
    let mut settings = config();
    settings.workers = 1;
    settings.retry_backoff = Duration::from_millis(10);
    settings.job_timeout = Duration::from_millis(300);
    settings
}

#[tokio::test]
async fn generator_errors_panics_and_timeouts_fail_attempts_and_the_worker_survives() {
    let (server, token, mut client) =
        start_with_alice_listening(scripted_config(), ScriptedGenerator::default()).await;

    for (content, expected) in [
        ("panic:", "the generator panicked: scripted generator panic"),
        ("hang:", "the attempt timed out after 300ms"),
        ("error:", "generation failed: scripted upstream outage"),
    ] {
        let job_id = submit(
            &server,
            &token,
            generate_body("summary", content, json!({})),
        )
        .await;
        let failed = next_terminal_event(&mut client).await;
        assert_eq!(failed["job_id"], job_id.as_str());
        assert_eq!(failed["error"], expected);
        assert_eq!(failed["retry_count"], 1);
        assert_eq!(get_job(&server, &token, &job_id).await["status"], "failed");
    }
    // The single worker task is still alive and takes the next job.
    let job_id = submit(
        &server,
        &token,
        generate_body("summary", PHOTOSYNTHESIS, json!({})),
    )
    .await;
    let completed = next_terminal_event(&mut client).await;
    assert_eq!(completed["job_id"], job_id.as_str());
    assert!(completed["result"]["summary"].is_string());
    server.stop().await;
}

#[tokio::test]
async fn a_failed_first_attempt_is_retried_and_can_still_complete() {
    let (server, token, mut client) =
        start_with_alice_listening(scripted_config(), ScriptedGenerator::default()).await;

    let job_id = submit(
        &server,
        &token,
        generate_body("quiz", &format!("flaky:{PHOTOSYNTHESIS}"), json!({})),
    )
    .await;
    let completed = next_terminal_event(&mut client).await;
    assert_eq!(completed["job_id"], job_id.as_str());
    assert_eq!(
        completed["result"]["questions"].as_array().unwrap().len(),
        5
    );
    let stored = get_job(&server, &token, &job_id).await;
    assert_eq!(
        (stored["status"].as_str(), stored["retry_count"].as_u64()),
        (Some("completed"), Some(1))
    );
    server.stop().await;
}

#[tokio::test]
async fn queued_and_running_jobs_can_be_cancelled_finished_ones_cannot() {
    let mut settings = scripted_config();
    settings.job_timeout = Duration::from_secs(60);
    let (server, token, mut client) =
        start_with_alice_listening(settings, ScriptedGenerator::default()).await;
    let cancel = |job_id: &str| {
        request(
            "POST",
            &format!("/ai/artifact/jobs/{job_id}/cancel"),
            Some(&token),
            "",
        )
    };

    // The only worker is stuck on the first job, so the second stays queued.
    let running = submit(
        &server,
        &token,
        generate_body("summary", "hang:", json!({})),
    )
    .await;
    assert_eq!(client.next_event().await["job_id"], running.as_str());
    let queued = submit(
        &server,
        &token,
        generate_body("summary", PHOTOSYNTHESIS, json!({})),
    )
    .await;
    assert_eq!(get_job(&server, &token, &queued).await["status"], "queued");

    let reply = send(server.addr, cancel(&queued)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["status"], "cancelled");
    let event = client.next_event().await;
    assert_eq!(
        (event["job_id"].as_str(), event["status"].as_str()),
        (Some(queued.as_str()), Some("cancelled"))
    );

    let reply = send(server.addr, cancel(&running)).await;
    assert_eq!(reply.json()["status"], "cancelled");
    let event = client.next_event().await;
    assert_eq!(
        (event["job_id"].as_str(), event["status"].as_str()),
        (Some(running.as_str()), Some("cancelled"))
    );
    assert_eq!(
        get_job(&server, &token, &running).await["status"],
        "cancelled"
    );

    let again = send(server.addr, cancel(&running)).await;
    assert_eq!(
        again.expect_error(StatusCode::CONFLICT),
        "job is already cancelled"
    );

    // The worker let go of the cancelled job and neither cancelled job ever runs to an end.
    let next = submit(
        &server,
        &token,
        generate_body("summary", PHOTOSYNTHESIS, json!({})),
    )
    .await;
    let event = next_terminal_event(&mut client).await;
    assert_eq!(event["job_id"], next.as_str(), "unexpected event {event}");
    assert!(event["result"].is_object());
    let finished = send(server.addr, cancel(&next)).await;
    assert_eq!(
        finished.expect_error(StatusCode::CONFLICT),
        "job is already completed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_a_job_is_published_after_its_cancelled_event() {
    let (server, token, mut client) =
        start_with_alice_listening(scripted_config(), ScriptedGenerator::default()).await;
    let job = submit(
        &server,
        &token,
        generate_body("summary", &format!("block:{PHOTOSYNTHESIS}"), json!({})),
    )
    .await;
    let started = client.next_event().await;
    assert_eq!(started["job_id"], job.as_str());
    // The worker's thread is blocked inside the generator: the cancel is served by the other.
    let reply = send(
        server.addr,
        request(
            "POST",
            &format!("/ai/artifact/jobs/{job}/cancel"),
            Some(&token),
            "",
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let cancelled = client.next_event().await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    match client.next_frame_within(Duration::from_millis(800)).await {
        Err(()) => {}
        Ok(frame) => panic!("an event after artifact.cancelled: {frame:?}"),
    }
    assert_eq!(get_job(&server, &token, &job).await["status"], "cancelled");
    server.stop().await;
}

#[tokio::test]
async fn jobs_are_visible_only_to_their_owner() {
    let server = TestServer::start(config()).await;
    let alice = server.token("alice");
    let bob = server.token("bob");
    let mut bobs_stream = SseClient::connected(server.addr, &bob).await;
    let job_id = submit(
        &server,
        &alice,
        generate_body("summary", PHOTOSYNTHESIS, json!({})),
    )
    .await;

    let path = format!("/ai/artifact/jobs/{job_id}");
    let reply = send(server.addr, request("GET", &path, Some(&bob), "")).await;
    reply.expect_error(StatusCode::NOT_FOUND);
    let reply = send(
        server.addr,
        request("POST", &format!("{path}/cancel"), Some(&bob), ""),
    )
    .await;
    reply.expect_error(StatusCode::NOT_FOUND);
    let listed = send(
        server.addr,
        request("GET", "/ai/artifact/jobs", Some(&bob), ""),
    )
    .await;
    assert_eq!(listed.json(), json!({"jobs": []}));
    let unknown = send(
        server.addr,
        request("GET", "/ai/artifact/jobs/no-such-job", Some(&alice), ""),
    )
    .await;
    unknown.expect_error(StatusCode::NOT_FOUND);
    let anonymous = send(server.addr, request("GET", &path, None, "")).await;
    anonymous.expect_error(StatusCode::UNAUTHORIZED);
    // Bob's stream never hears of alice's job.
    assert!(bobs_stream
        .next_frame_within(Duration::from_millis(300))
        .await
        .is_err());
    assert_eq!(
        get_job(&server, &alice, &job_id).await["job_id"],
        job_id.as_str()
    );
    server.stop().await;
}

#[tokio::test]
async fn every_invalid_generate_request_is_refused_naming_the_field() {
    let server = TestServer::start(config()).await;
    let token = server.token("alice");
    let valid = json!({"notebook_id": "nb", "artifact_type": "quiz", "content": PHOTOSYNTHESIS});
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body.to_string()
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(field);
        body.to_string()
    };
    let cases: Vec<(String, StatusCode, &str)> = vec![
        ("{\"notebook_id\": ".into(), StatusCode::BAD_REQUEST, "malformed JSON"),
        ("[1, 2]".into(), StatusCode::UNPROCESSABLE_ENTITY, "JSON object"),
        (without("notebook_id"), StatusCode::UNPROCESSABLE_ENTITY, "`notebook_id` is required"),
        (with("notebook_id", json!("  ")), StatusCode::UNPROCESSABLE_ENTITY, "`notebook_id` must not be empty"),
        (with("notebook_id", json!(7)), StatusCode::UNPROCESSABLE_ENTITY, "`notebook_id` must be a string"),
        (with("notebook_id", json!("n".repeat(300))), StatusCode::UNPROCESSABLE_ENTITY, "`notebook_id` is longer"),
        (without("artifact_type"), StatusCode::UNPROCESSABLE_ENTITY, "`artifact_type` is required"),
        (with("artifact_type", json!("essay")), StatusCode::UNPROCESSABLE_ENTITY, "`artifact_type` must be"),
        (with("artifact_type", json!(["quiz"])), StatusCode::UNPROCESSABLE_ENTITY, "`artifact_type` must be a string"),
        (without("content"), StatusCode::UNPROCESSABLE_ENTITY, "`content` is required"),
        (with("content", json!("")), StatusCode::UNPROCESSABLE_ENTITY, "`content` must not be empty"),
        (with("content", json!(null)), StatusCode::UNPROCESSABLE_ENTITY, "`content` is required"),
        (with("content", json!("x".repeat(100 * 1024 + 1))), StatusCode::PAYLOAD_TOO_LARGE, "`content` is larger than 102400 bytes"),
        (with("extra", json!(1)), StatusCode::UNPROCESSABLE_ENTITY, "unknown field `extra`"),
        (with("options", json!([])), StatusCode::UNPROCESSABLE_ENTITY, "`options` must be an object"),
        (with("options", json!({"num_questions": 0})), StatusCode::UNPROCESSABLE_ENTITY, "`options.num_questions` must be an integer from 1 to 50"),
        (with("options", json!({"num_questions": 51})), StatusCode::UNPROCESSABLE_ENTITY, "`options.num_questions`"),
        (with("options", json!({"num_questions": 2.5})), StatusCode::UNPROCESSABLE_ENTITY, "`options.num_questions`"),
        (with("options", json!({"num_questions": "5"})), StatusCode::UNPROCESSABLE_ENTITY, "`options.num_questions`"),
        (with("options", json!({"num_cards": 5})), StatusCode::UNPROCESSABLE_ENTITY, "unknown field `options.num_cards`: quiz takes only options.num_questions"),
        (
            json!({"notebook_id": "nb", "artifact_type": "summary", "content": "x", "options": {"num_cards": 2}}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "summary takes no options",
        ),
        (
            json!({"notebook_id": "nb", "artifact_type": "flashcards", "content": "x", "options": {"num_cards": 51}}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "`options.num_cards` must be an integer from 1 to 50",
        ),
    ];
    for (body, status, mentions) in cases {
        let reply = send(
            server.addr,
            request("POST", "/ai/artifact/generate", Some(&token), body.clone()),
        )
        .await;
        let message = reply.expect_error(status);
        assert!(
            message.contains(mentions),
            "{mentions:?} not in {message:?} for {}",
            &body[..body.len().min(120)]
        );
    }
    let over_body_limit = "x".repeat(900 * 1024);
    let reply = send(
        server.addr,
        request(
            "POST",
            "/ai/artifact/generate",
            Some(&token),
            over_body_limit,
        ),
    )
    .await;
    reply.expect_error(StatusCode::PAYLOAD_TOO_LARGE);
    let anonymous = send(
        server.addr,
        request("POST", "/ai/artifact/generate", None, valid.to_string()),
    )
    .await;
    anonymous.expect_error(StatusCode::UNAUTHORIZED);
    // Nothing was queued by any refused request.
    let listed = send(
        server.addr,
        request("GET", "/ai/artifact/jobs", Some(&token), ""),
    )
    .await;
    assert_eq!(listed.json(), json!({"jobs": []}));
    server.stop().await;
}

#[tokio::test]
async fn a_user_past_the_unfinished_job_cap_gets_429_while_others_are_served() {
    let mut settings = config();
    settings.max_jobs_per_user = 2;
    settings.shutdown_grace = Duration::from_millis(100);
    // Slow enough that every job stays unfinished for the whole test.
    let slow = DelayedGenerator::new(Arc::new(OfflineGenerator), Duration::from_secs(60));
    let server = TestServer::start_with_generator(settings, Arc::new(slow)).await;
    let mallory = server.token("mallory");
    let body = || generate_body("quiz", PHOTOSYNTHESIS, json!({}));
    submit(&server, &mallory, body()).await;
    let second = submit(&server, &mallory, body()).await;
    let generate = |token: &str| request("POST", "/ai/artifact/generate", Some(token), body());
    let refused = send(server.addr, generate(&mallory)).await;
    assert_eq!(
        refused.expect_error(StatusCode::TOO_MANY_REQUESTS),
        "too many unfinished jobs for this user (max 2); retry when one ends"
    );
    assert!(refused.headers.contains_key("retry-after"));
    submit(&server, &server.token("alice"), body()).await;
    let cancel = format!("/ai/artifact/jobs/{second}/cancel");
    let cancelled = send(server.addr, request("POST", &cancel, Some(&mallory), "")).await;
    assert_eq!(cancelled.status, StatusCode::OK);
    submit(&server, &mallory, body()).await;
    server.stop().await;
}

#[tokio::test]
async fn a_count_written_with_a_zero_fraction_is_the_integer_it_equals() {
    // schemathesis sent `"options": {"num_cards": 29.0}`, which openapi.json's
    // `"type": "integer"` accepts (JSON Schema compares values, not spellings), and the server
    // refused it with 422.
    let (server, token, mut client) = start_with_alice_listening(config(), OfflineGenerator).await;
    submit(
        &server,
        &token,
        generate_body("quiz", PHOTOSYNTHESIS, json!({"num_questions": 3.0})),
    )
    .await;
    let completed = next_terminal_event(&mut client).await;
    assert_eq!(
        completed["result"]["questions"].as_array().unwrap().len(),
        3
    );
    submit(
        &server,
        &token,
        generate_body("flashcards", PHOTOSYNTHESIS, json!({"num_cards": 2.0})),
    )
    .await;
    let completed = next_terminal_event(&mut client).await;
    assert_eq!(completed["result"]["cards"].as_array().unwrap().len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn jobs_are_listed_newest_first_and_filtered() {
    let (server, token, mut client) = start_with_alice_listening(config(), OfflineGenerator).await;
    let mut ids = Vec::new();
    for (notebook, content) in [
        ("a", PHOTOSYNTHESIS),
        ("b", "Create quiz on cells"),
        ("a", TCP_CONGESTION),
    ] {
        let body = json!({"notebook_id": notebook, "artifact_type": "quiz", "content": content})
            .to_string();
        ids.push(submit(&server, &token, body).await);
    }
    for _ in 0..3 {
        next_terminal_event(&mut client).await;
    }
    let list = |query: &str| {
        let path = format!("/ai/artifact/jobs{query}");
        let token = token.clone();
        let addr = server.addr;
        async move { send(addr, request("GET", &path, Some(&token), "")).await }
    };
    let job_ids = |reply: common::Reply| -> Vec<String> {
        reply.json()["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|job| job["job_id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        job_ids(list("").await),
        [ids[2].clone(), ids[1].clone(), ids[0].clone()]
    );
    assert_eq!(
        job_ids(list("?notebook_id=a").await),
        [ids[2].clone(), ids[0].clone()]
    );
    assert_eq!(job_ids(list("?status=failed").await), [ids[1].clone()]);
    assert_eq!(
        job_ids(list("?notebook_id=a&status=completed&limit=1").await),
        [ids[2].clone()]
    );
    assert_eq!(job_ids(list("?notebook_id=&status=&limit=").await).len(), 3);
    assert_eq!(job_ids(list("?notebook_id=%61").await).len(), 2);
    list("?status=done")
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY);
    list("?limit=0")
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY);
    list("?limit=101")
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY);
    list("?sort=asc")
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY);
    list("?notebook_id=%zz")
        .await
        .expect_error(StatusCode::UNPROCESSABLE_ENTITY);
    server.stop().await;
}

#[tokio::test]
async fn a_burst_of_200_jobs_across_20_users_ends_each_in_one_terminal_event_to_its_owner() {
    const USERS: usize = 20;
    const JOBS_PER_USER: usize = 10;
    let mut settings = config();
    settings.retry_backoff = Duration::from_millis(5);
    let server = TestServer::start(settings).await;
    let contents = [
        PHOTOSYNTHESIS,
        FRENCH_REVOLUTION,
        TCP_CONGESTION,
        "Create quiz on cells",
    ];
    let mut readers = Vec::new();
    let mut owners: HashMap<String, usize> = HashMap::new();
    for user in 0..USERS {
        let token = server.token(&format!("user-{user}"));
        let mut client = SseClient::connected(server.addr, &token).await;
        for n in 0..JOBS_PER_USER {
            let artifact_type = ["quiz", "flashcards", "summary"][n % 3];
            let body = generate_body(
                artifact_type,
                contents[(user + n) % contents.len()],
                json!({}),
            );
            owners.insert(submit(&server, &token, body).await, user);
        }
        readers.push(tokio::spawn(async move {
            let mut terminal: Vec<Value> = Vec::new();
            while terminal.len() < JOBS_PER_USER {
                let event = next_terminal_event(&mut client).await;
                assert_eq!(event["user_id"], format!("user-{user}"), "leak: {event}");
                terminal.push(event);
            }
            // No second terminal event for any job.
            while let Ok(Some(frame)) = client.next_frame_within(Duration::from_millis(300)).await {
                assert!(
                    frame.contains("\"status\":\"running\"") || frame.starts_with(':'),
                    "extra: {frame}"
                );
            }
            terminal
        }));
    }
    assert_eq!(owners.len(), USERS * JOBS_PER_USER);
    let mut ended = HashSet::new();
    for (user, reader) in readers.into_iter().enumerate() {
        for event in reader.await.unwrap() {
            let job_id = event["job_id"].as_str().unwrap().to_owned();
            assert_eq!(owners[&job_id], user, "job delivered to the wrong user");
            assert!(
                event.get("result").is_some() != event.get("error").is_some(),
                "{event}"
            );
            assert!(ended.insert(job_id), "two terminal events for one job");
        }
    }
    assert_eq!(ended.len(), USERS * JOBS_PER_USER);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_the_running_job_finish_and_announce_itself_and_leaves_queued_ones_queued() {
    let (server, token, mut client) =
        start_with_alice_listening(scripted_config(), ScriptedGenerator::default()).await;
    let running = submit(
        &server,
        &token,
        generate_body("summary", &format!("slow:{PHOTOSYNTHESIS}"), json!({})),
    )
    .await;
    assert_eq!(client.next_event().await["job_id"], running.as_str());
    let queued = submit(
        &server,
        &token,
        generate_body("summary", PHOTOSYNTHESIS, json!({})),
    )
    .await;
    let state = server.state.clone();

    server.stop().await;
    // The stream stayed open until the running job had finished, so its client heard of it.
    let mut seen = Vec::new();
    while let Some(frame) = client.next_frame().await {
        seen.push(frame);
    }
    assert!(
        seen.iter()
            .any(|frame| frame.contains(&running) && frame.contains("\"result\"")),
        "the completed event reached the client before its stream ended: {seen:?}"
    );
    let store = state.jobs.store();
    assert_eq!(
        store.get(&running).unwrap().unwrap().status,
        JobStatus::Completed
    );
    assert_eq!(
        store.get(&queued).unwrap().unwrap().status,
        JobStatus::Queued
    );
    assert_eq!(store.queued_ids().unwrap(), [queued]);
}
