//! A generator backed by any server that speaks OpenAI's chat-completions API: OpenAI itself,
//! Ollama, llama.cpp's `llama-server`, vLLM.
//!
//! - **Plan** writes the conversation (no request): a system message, and a user message that
//!   states the artifact's JSON shape, the validator's rules and the job's content, which may be
//!   source material or an instruction. The plan also holds the artifact's JSON schema.
//! - **Generate** sends it with `response_format` `json_schema`, so servers that constrain
//!   decoding return the shape outright. A server that refuses `response_format` (a 400 or 422
//!   naming it) is asked again without it, and from then on by instructions alone; the first
//!   JSON object in the answer is taken. An answer with none comes back as a JSON string, which
//!   the validator rejects ("output is not a JSON object"), so the repair loop handles it too.
//! - **Repair** continues the conversation with the rejected answer and the validator's errors,
//!   verbatim, one per line.
//!
//! Invariants: every request ends within `LLM_TIMEOUT_SECS` (the HTTP client's total timeout),
//! and dropping a call's future drops its connection at once (the client drives it inside the
//! call), which is how a cancel or the job's timeout aborts it. The API key goes into one
//! header, marked sensitive, and into nothing else: no error, log line or `Debug` output holds
//! it, and a provider's error message is quoted only with the key cut out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::StatusCode;
use serde_json::{json, Value};

use super::{
    ArtifactGenerator, ArtifactType, BoxFuture, GenerationError, GenerationRequest,
    OPTIONS_PER_QUESTION,
};
use crate::config::OpenAiSettings;
use crate::http_client::{self, Client, Limits, Request, Response, TlsConnector};
use crate::log;

/// Waits on `429 Too Many Requests` within one call; the next 429 fails the call.
const MAX_RATE_LIMIT_WAITS: usize = 3;
/// The wait after a 429 without a usable `Retry-After`.
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);
/// Characters of a provider's error message quoted in a job's error.
const MAX_QUOTED_CHARS: usize = 300;
/// `{` positions tried when looking for a JSON object in an answer: enough for prose around
/// one object, and a bound on the work an answer full of braces can cause.
const MAX_OBJECT_STARTS: usize = 32;

/// Generates artifacts with a model behind an OpenAI-compatible chat-completions endpoint.
#[derive(Debug)]
pub struct OpenAiGenerator {
    settings: OpenAiSettings,
    /// `<base>/chat/completions`.
    url: String,
    /// `HOST:PORT` of the server, the only part of the URL that errors name.
    server: String,
    client: Client,
    /// The longest `Retry-After` worth waiting for: past it the job would time out anyway.
    max_rate_limit_wait: Duration,
    /// Set once the server refused `response_format`; later requests ask by instructions alone.
    schema_refused: AtomicBool,
}

impl OpenAiGenerator {
    /// A generator for `settings`, speaking TLS through `tls` for an `https://` base URL, and
    /// waiting on a 429 at most `max_rate_limit_wait` (the job's timeout).
    pub fn new(
        settings: OpenAiSettings,
        tls: Option<Arc<dyn TlsConnector>>,
        max_rate_limit_wait: Duration,
    ) -> OpenAiGenerator {
        let limits = Limits {
            connect_timeout: settings.timeout.min(http_client::DEFAULT_CONNECT_TIMEOUT),
            total_timeout: settings.timeout,
            max_response_bytes: http_client::DEFAULT_MAX_RESPONSE_BYTES,
        };
        // The model server is the operator's choice, typically on this machine or network.
        let client = Client {
            limits,
            address_policy: None,
            tls,
        };
        let after_scheme = settings
            .base_url
            .split_once("://")
            .map_or("", |(_, rest)| rest);
        let authority = after_scheme
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default();
        let server = authority.rsplit('@').next().unwrap_or_default().to_owned();
        OpenAiGenerator {
            url: format!("{}/chat/completions", settings.base_url),
            server,
            settings,
            client,
            max_rate_limit_wait,
            schema_refused: AtomicBool::new(false),
        }
    }

    /// `HOST:PORT` of the model server, as logs and errors name it.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Sends the conversation and returns the answer's artifact, within the error policy above.
    async fn complete(&self, messages: &[Value], schema: &Value) -> Result<Value, GenerationError> {
        let mut rate_limit_waits = 0;
        loop {
            let structured = !self.schema_refused.load(Ordering::Relaxed);
            let response = self.send(messages, schema, structured).await?;
            let status = response.status;
            if status == StatusCode::OK {
                return self.artifact_from(&response.body);
            }
            let message = self.provider_message(&response.body);
            let names_response_format =
                message.contains("response_format") || message.contains("json_schema");
            let refused_schema =
                structured && names_response_format && matches!(status.as_u16(), 400 | 422);
            if refused_schema {
                log::warning!(
                    "the model server at {} refused response_format ({status}); asking for JSON by instructions alone",
                    self.server
                );
                self.schema_refused.store(true, Ordering::Relaxed);
                continue;
            }
            if status == StatusCode::TOO_MANY_REQUESTS && rate_limit_waits < MAX_RATE_LIMIT_WAITS {
                let wait = retry_after(&response).unwrap_or(DEFAULT_RATE_LIMIT_WAIT);
                if wait > self.max_rate_limit_wait {
                    return Err(GenerationError(format!(
                        "the model server is rate limiting (HTTP 429) and asks to retry after {} s, longer than the job may take ({} s)",
                        wait.as_secs_f64().ceil(),
                        self.max_rate_limit_wait.as_secs()
                    )));
                }
                rate_limit_waits += 1;
                log::info!(
                    "the model server at {} is rate limiting: retrying in {wait:?}",
                    self.server
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(self.status_error(status, &message));
        }
    }

    async fn send(
        &self,
        messages: &[Value],
        schema: &Value,
        structured: bool,
    ) -> Result<Response, GenerationError> {
        let mut body = json!({
            "model": self.settings.model,
            "messages": messages,
            "max_tokens": self.settings.max_tokens,
            "stream": false,
        });
        if structured {
            body["response_format"] = json!({"type": "json_schema", "json_schema": schema});
        }
        let mut request = Request::post(&self.url, body.to_string())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(key) = &self.settings.api_key {
            let mut value =
                HeaderValue::try_from(format!("Bearer {}", key.expose())).map_err(|_| {
                    GenerationError(
                        "OPENAI_API_KEY holds a character a header cannot carry".to_owned(),
                    )
                })?;
            value.set_sensitive(true);
            request = request.header(AUTHORIZATION, value);
        }
        self.client
            .send(request)
            .await
            .map_err(|error| match error {
                http_client::Error::Timeout(limit) => GenerationError(format!(
                    "the model server at {} did not answer within {} s (LLM_TIMEOUT_SECS)",
                    self.server,
                    limit.as_secs()
                )),
                error => GenerationError(format!("the model server is unreachable: {error}")),
            })
    }

    /// The artifact in a 200 answer: its first JSON object, or its text as a JSON string.
    fn artifact_from(&self, body: &[u8]) -> Result<Value, GenerationError> {
        let not_chat = |why: &str| {
            GenerationError(format!(
                "the model server at {} answered 200 without a chat completion ({why})",
                self.server
            ))
        };
        let answer: Value = serde_json::from_slice(body).map_err(|_| not_chat("not JSON"))?;
        let choice = &answer["choices"][0];
        let message = &choice["message"];
        if let Some(refusal) = message["refusal"].as_str().filter(|text| !text.is_empty()) {
            let refusal = quote(
                refusal,
                self.settings.api_key.as_ref().map(|key| key.expose()),
            );
            return Err(GenerationError(format!("the model refused: {refusal}")));
        }
        let text = message["content"]
            .as_str()
            .ok_or_else(|| not_chat("no choices[0].message.content"))?;
        match first_json_object(text) {
            Some(object) => Ok(object),
            None if choice["finish_reason"] == "length" => Err(GenerationError(format!(
                "the model's answer was cut off at LLM_MAX_TOKENS ({}) before its JSON ended",
                self.settings.max_tokens
            ))),
            None => Ok(Value::String(text.to_owned())),
        }
    }

    /// The provider's own error message, if its body has one, quoted safely.
    fn provider_message(&self, body: &[u8]) -> String {
        let parsed: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        // OpenAI and llama.cpp: {"error": {"message": …}}; Ollama also {"error": "…"}.
        let message = parsed["error"]["message"]
            .as_str()
            .or(parsed["error"].as_str())
            .or(parsed["message"].as_str())
            .unwrap_or_default();
        quote(
            message,
            self.settings.api_key.as_ref().map(|key| key.expose()),
        )
    }

    fn status_error(&self, status: StatusCode, message: &str) -> GenerationError {
        let server = &self.server;
        let quoted = if message.is_empty() {
            String::new()
        } else {
            format!(": {message}")
        };
        GenerationError(match status.as_u16() {
            // Not quoted: OpenAI's message for a wrong key repeats part of it.
            401 | 403 => format!("the model server refused the API key (HTTP {})", status.as_u16()),
            404 => format!(
                "model \"{}\" not found at {server} (HTTP 404): check OPENAI_MODEL, and that OPENAI_BASE_URL ends where the API starts (e.g. /v1)",
                self.settings.model
            ),
            429 => format!("the model server is still rate limiting (HTTP 429) after {MAX_RATE_LIMIT_WAITS} waits{quoted}"),
            500..=599 => format!("the model server at {server} failed (HTTP {}){quoted}", status.as_u16()),
            code => format!("the model server at {server} rejected the request (HTTP {code}){quoted}"),
        })
    }
}

impl ArtifactGenerator for OpenAiGenerator {
    fn plan<'a>(
        &'a self,
        request: &'a GenerationRequest,
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move {
            Ok(json!({
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": instructions(request)},
                ],
                "schema": json_schema(request),
            }))
        })
    }

    fn generate<'a>(
        &'a self,
        _request: &'a GenerationRequest,
        plan: &'a Value,
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move {
            let messages = plan_messages(plan)?;
            self.complete(messages, &plan["schema"]).await
        })
    }

    fn repair<'a>(
        &'a self,
        _request: &'a GenerationRequest,
        plan: &'a Value,
        output: &'a Value,
        errors: &'a [String],
    ) -> BoxFuture<'a, Result<Value, GenerationError>> {
        Box::pin(async move {
            let mut messages = plan_messages(plan)?.clone();
            let previous = match output {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            messages.push(json!({"role": "assistant", "content": previous}));
            messages.push(json!({"role": "user", "content": repair_instructions(errors)}));
            self.complete(&messages, &plan["schema"]).await
        })
    }
}

const SYSTEM_PROMPT: &str = "You write study material for a learning app. You answer with exactly one JSON object and nothing else: no prose, no Markdown, no code fences.";

/// The user turn: the artifact's shape and rules (the validator's), then the job's content.
fn instructions(request: &GenerationRequest) -> String {
    let count = request.count;
    let task = match request.artifact_type {
        ArtifactType::Quiz => format!(
            "Write a multiple-choice quiz of exactly {count} questions, as JSON of this shape:\n\
             {{\"questions\": [{{\"question\": \"…\", \"options\": [\"…\", \"…\", \"…\", \"…\"], \"answer_index\": 0, \"explanation\": \"…\"}}]}}\n\
             Rules: \"questions\" has exactly {count} items, each asking something different; each has exactly {OPTIONS_PER_QUESTION} options, distinct and non-empty, exactly one of them correct; \"answer_index\" is the 0-based index of the correct option (0 to {}); \"explanation\" says in a sentence why that option is right. No other keys.",
            OPTIONS_PER_QUESTION - 1
        ),
        ArtifactType::Flashcards => format!(
            "Write exactly {count} study flashcards, as JSON of this shape:\n\
             {{\"cards\": [{{\"front\": \"…\", \"back\": \"…\"}}]}}\n\
             Rules: \"cards\" has exactly {count} items; \"front\" is a term or question, different on every card; \"back\" explains or answers it. Neither is empty. No other keys."
        ),
        ArtifactType::Summary => format!(
            "Write a summary, as JSON of this shape:\n\
             {{\"summary\": \"…\", \"key_points\": [\"…\"]}}\n\
             Rules: \"summary\" is a short paragraph; \"key_points\" lists {count} key points, none empty. No other keys."
        ),
    };
    format!(
        "{task}\n\nThe content below is either source material or a request (such as a topic to cover). \
         If it is source material, base everything on it; if it is a request, follow it using your own knowledge.\n\n\
         Content:\n{}",
        request.content
    )
}

/// The repair turn: the validator's errors exactly as it wrote them, one per line.
fn repair_instructions(errors: &[String]) -> String {
    let listed: Vec<String> = errors.iter().map(|error| format!("- {error}")).collect();
    format!(
        "That answer was rejected by the validator:\n{}\nSend the whole corrected JSON object again, following every rule above.",
        listed.join("\n")
    )
}

/// `response_format.json_schema` for the artifact: its name, strict mode and the schema, in
/// the subset that OpenAI's strict mode accepts (every property required, no others).
fn json_schema(request: &GenerationRequest) -> Value {
    let count = request.count;
    let text = json!({"type": "string"});
    let object = |properties: Value, required: &[&str]| {
        json!({
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": false,
        })
    };
    let list = |items: Value, min: usize, max: Option<usize>| {
        let mut list = json!({"type": "array", "items": items, "minItems": min});
        if let Some(max) = max {
            list["maxItems"] = json!(max);
        }
        list
    };
    let (name, schema) = match request.artifact_type {
        ArtifactType::Quiz => {
            let question = object(
                json!({
                    "question": text,
                    "options": list(text.clone(), OPTIONS_PER_QUESTION, Some(OPTIONS_PER_QUESTION)),
                    "answer_index": {"type": "integer", "minimum": 0, "maximum": OPTIONS_PER_QUESTION - 1},
                    "explanation": text,
                }),
                &["question", "options", "answer_index", "explanation"],
            );
            let questions = list(question, count, Some(count));
            (
                "quiz",
                object(json!({"questions": questions}), &["questions"]),
            )
        }
        ArtifactType::Flashcards => {
            let card = object(json!({"front": text, "back": text}), &["front", "back"]);
            let cards = list(card, count, Some(count));
            ("flashcards", object(json!({"cards": cards}), &["cards"]))
        }
        ArtifactType::Summary => {
            let points = list(text.clone(), 1, None);
            let properties = json!({"summary": text, "key_points": points});
            ("summary", object(properties, &["summary", "key_points"]))
        }
    };
    json!({"name": name, "strict": true, "schema": schema})
}

fn plan_messages(plan: &Value) -> Result<&Vec<Value>, GenerationError> {
    plan["messages"]
        .as_array()
        .ok_or_else(|| GenerationError("malformed plan: no messages".to_owned()))
}

/// The first JSON object in `text`: the whole text, or one inside prose or a code fence.
fn first_json_object(text: &str) -> Option<Value> {
    text.match_indices('{')
        .take(MAX_OBJECT_STARTS)
        .find_map(|(start, _)| {
            let mut values =
                serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
            match values.next() {
                Some(Ok(value)) if value.is_object() => Some(value),
                _ => None,
            }
        })
}

/// How long a 429 asks to wait: OpenAI's `retry-after-ms`, else `Retry-After` in seconds. (The
/// HTTP-date form is not read; the default wait stands in for it.)
fn retry_after(response: &Response) -> Option<Duration> {
    let header = |name: &str| {
        let value = response.headers.get(name)?.to_str().ok()?;
        value
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    let seconds = header("retry-after-ms").map(|millis| millis / 1000.0);
    // Past `Duration`'s range means "much longer than any job", which a day stands for.
    seconds
        .or_else(|| header("retry-after"))
        .map(|seconds| Duration::try_from_secs_f64(seconds).unwrap_or(Duration::from_secs(86_400)))
}

/// `message` with `secret` (if any) cut out, on one line, cut to [`MAX_QUOTED_CHARS`].
fn quote(message: &str, secret: Option<&str>) -> String {
    let mut message = message.to_owned();
    // Before cutting, so that no part of the secret survives at the cut.
    if let Some(secret) = secret.filter(|secret| !secret.is_empty()) {
        message = message.replace(secret, "[redacted]");
    }
    let quoted: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_QUOTED_CHARS)
        .collect();
    quoted.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::validator;

    fn request(artifact_type: ArtifactType, count: usize) -> GenerationRequest {
        GenerationRequest {
            artifact_type,
            content: "Create quiz on cells".to_owned(),
            count,
        }
    }

    #[test]
    fn the_first_json_object_is_found_in_prose_and_code_fences() {
        let object = json!({"cards": [{"front": "a {brace}", "back": "b"}]});
        let cases = [
            object.to_string(),
            format!("Here you go:\n```json\n{object:#}\n```\nEnjoy!"),
            format!("{{not json}} then {object}"),
        ];
        for text in cases {
            assert_eq!(first_json_object(&text), Some(object.clone()), "{text}");
        }
        assert_eq!(first_json_object("no JSON here"), None);
        assert_eq!(first_json_object("[1, 2]"), None);
        assert_eq!(first_json_object("{\"cut\": [1, 2"), None);
    }

    #[test]
    fn the_schema_asks_for_what_the_validator_accepts() {
        let quiz = json_schema(&request(ArtifactType::Quiz, 3));
        assert_eq!(quiz["name"], "quiz");
        assert_eq!(quiz["strict"], true);
        let questions = &quiz["schema"]["properties"]["questions"];
        assert_eq!(
            (
                questions["minItems"].as_u64(),
                questions["maxItems"].as_u64()
            ),
            (Some(3), Some(3))
        );
        let item = &questions["items"];
        assert_eq!(
            item["required"],
            json!(["question", "options", "answer_index", "explanation"])
        );
        assert_eq!(
            item["properties"]["options"]["maxItems"],
            OPTIONS_PER_QUESTION
        );
        assert_eq!(item["additionalProperties"], false);

        let cards = json_schema(&request(ArtifactType::Flashcards, 2));
        assert_eq!(cards["schema"]["required"], json!(["cards"]));
        let summary = json_schema(&request(ArtifactType::Summary, 5));
        assert_eq!(
            summary["schema"]["required"],
            json!(["summary", "key_points"])
        );
    }

    #[test]
    fn an_answer_in_the_example_shape_passes_the_validator() {
        // The shapes the prompt shows, filled in: what a model that follows it sends.
        let quiz = request(ArtifactType::Quiz, 1);
        let answer = json!({"questions": [{"question": "What do mitochondria make?", "options": ["ATP", "DNA", "Starch", "Chlorophyll"], "answer_index": 0, "explanation": "Mitochondria make ATP."}]});
        assert_eq!(validator::validate(&quiz, &answer), Ok(()));
        assert!(instructions(&quiz).contains("exactly 1 questions"));
        assert!(instructions(&quiz).ends_with("Content:\nCreate quiz on cells"));
        let summary = request(ArtifactType::Summary, 5);
        let answer = json!({"summary": "Cells are the units of life.", "key_points": ["Cells have membranes."]});
        assert_eq!(validator::validate(&summary, &answer), Ok(()));
    }

    #[test]
    fn the_repair_turn_quotes_every_validator_error_verbatim() {
        let errors = vec![
            "expected 3 questions, got 2".to_owned(),
            "question 1: answer_index 7 is out of range 0..4".to_owned(),
        ];
        let turn = repair_instructions(&errors);
        for error in &errors {
            assert!(turn.contains(&format!("- {error}\n")), "{turn}");
        }
    }

    #[test]
    fn quoted_provider_messages_are_short_single_lines_without_the_key() {
        let quoted = quote(
            "Incorrect API key provided: sk-abc123.\nSee docs",
            Some("sk-abc123"),
        );
        assert_eq!(quoted, "Incorrect API key provided: [redacted]. See docs");
        assert_eq!(quote(&"x".repeat(1000), None).len(), MAX_QUOTED_CHARS);
    }
}
