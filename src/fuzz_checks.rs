//! The fuzz targets' checks. They live in the library so that the cargo-fuzz targets in
//! `fuzz/` and the stable corpus-replay test (`tests/fuzz_corpus.rs`) run the same code.
//!
//! Each check takes the fuzzer's raw bytes, decodes what it needs from them by hand, and
//! panics when an invariant breaks. Structured inputs are split into parts at `0xFF`, a byte
//! that never occurs in UTF-8 text, so the parts themselves can hold any text.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full};
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::{Config, MAX_CONTENT_BYTES};
use crate::events::{EventBus, EventData};
use crate::server::routes::artifact::parse_generate_request;
use crate::server::{handle, AppState, Authenticator, Claims, ResponseBody, PUBLISHER_ROLE};
use crate::sse::encoder::{self, EncodeError, Event};
use crate::sse::{ParsedEvent, Parser};

/// A fuzz check: panics when the input breaks an invariant.
pub type Check = fn(&[u8]);

/// Every fuzz target: its name (the file in `fuzz/fuzz_targets/` and the directory in
/// `fuzz/corpus/` and `fuzz/regressions/`) and its check.
pub const TARGETS: [(&str, Check); 6] = [
    ("sse_roundtrip", sse_roundtrip),
    ("sse_parse", sse_parse),
    ("http_request", http_request),
    ("jwt_auth", jwt_auth),
    ("generate_request", generate_request),
    ("event_data", event_data),
];

/// Separates the parts of a structured input.
const SEPARATOR: u8 = 0xFF;
/// Events one `sse_roundtrip` input may describe; more adds time, not coverage.
const MAX_ROUNDTRIP_EVENTS: usize = 8;
/// The user every token in `http_request` and `jwt_auth` is issued to.
const FUZZ_USER: &str = "fuzz-user";
/// The secret of the tokens that `jwt_auth` mutates.
const KNOWN_SECRET: &[u8] = b"fuzz-known-secret";
/// An `exp` far in the future (2096), fixed so that the same input always makes the same token.
const FAR_FUTURE_EXP: u64 = 4_000_000_000;

/// `sse_roundtrip`: events (id, type, data with any characters, retry) and comments, encoded
/// and parsed back, give exactly the same events; values the format cannot carry are refused
/// with the right `EncodeError`, and add nothing to the stream.
///
/// The input is groups of five parts: flags and retry, id, event type, data, comment. Flag
/// bits: 1 id, 2 event type, 4 retry (the next 8 bytes, little-endian), 8 comment first.
pub fn sse_roundtrip(input: &[u8]) {
    let mut parts = input.split(|&byte| byte == SEPARATOR);
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    let mut last_event_id = String::new();
    let mut reconnection_time = None;
    for _ in 0..MAX_ROUNDTRIP_EVENTS {
        let Some(control) = parts.next() else { break };
        let mut text = || String::from_utf8_lossy(parts.next().unwrap_or_default());
        let (id, event_type, data, comment) = (text(), text(), text(), text());
        let flags = control.first().copied().unwrap_or(0);
        let mut retry = [0u8; 8];
        let retry_bytes = control.get(1..).unwrap_or_default();
        let retry_len = retry_bytes.len().min(8);
        retry[..retry_len].copy_from_slice(&retry_bytes[..retry_len]);

        if flags & 8 != 0 {
            let frame = encoder::encode_comment(&comment);
            match has_line_break(&comment) {
                true => assert_eq!(frame, Err(EncodeError::LineBreak("comment"))),
                false => stream.extend_from_slice(&frame.expect("a one-line comment encodes")),
            }
        }
        let event = Event {
            id: (flags & 1 != 0).then_some(&*id),
            event: (flags & 2 != 0).then_some(&*event_type),
            data: &data,
            retry: (flags & 4 != 0).then_some(u64::from_le_bytes(retry)),
        };
        let frame = encoder::encode(&event);
        if let Some(error) = refusal(&event) {
            assert_eq!(frame, Err(error), "{event:?}");
            continue;
        }
        stream.extend_from_slice(&frame.unwrap_or_else(|error| panic!("{event:?}: {error}")));
        if let Some(id) = event.id {
            id.clone_into(&mut last_event_id);
        }
        reconnection_time = event.retry.or(reconnection_time);
        expected.push(ParsedEvent {
            // An empty `event:` is sent as is; the parser then dispatches a message, exactly as
            // it does for an event with no type.
            event_type: match event.event {
                Some(event_type) if !event_type.is_empty() => event_type.to_owned(),
                _ => "message".to_owned(),
            },
            data: data.replace("\r\n", "\n").replace('\r', "\n"),
            last_event_id: last_event_id.clone(),
        });
    }
    let mut parser = Parser::new();
    let events = parser.feed(&stream);
    assert_eq!(
        events,
        expected,
        "stream: {:?}",
        String::from_utf8_lossy(&stream)
    );
    assert_eq!(parser.last_event_id(), last_event_id);
    assert_eq!(parser.reconnection_time(), reconnection_time);
}

/// `sse_parse`: any bytes, fed in any chunks, never panic and give the same events and state
/// as the whole stream fed at once, and as the stream fed one byte at a time.
///
/// The input's first byte is how many of the next bytes are chunk sizes (0–15); each size
/// byte is a chunk of 1–256 bytes, used in turn until the rest of the input is consumed.
pub fn sse_parse(input: &[u8]) {
    let (size_count, rest) = match input.split_first() {
        Some((&count, rest)) => (usize::from(count % 16).min(rest.len()), rest),
        None => (0, input),
    };
    let (sizes, stream) = rest.split_at(size_count);
    let whole = parse_in_chunks(stream, std::iter::empty());
    let chunked = parse_in_chunks(stream, sizes.iter().map(|&size| usize::from(size) + 1));
    let bytewise = parse_in_chunks(stream, std::iter::repeat(1));
    assert_eq!(chunked, whole);
    assert_eq!(bytewise, whole);
    let (events, last_event_id, _) = whole;
    assert!(!last_event_id.contains('\0'));
    for event in events {
        assert!(!event.event_type.is_empty());
        assert!(!event.last_event_id.contains('\0'));
    }
}

/// `http_request`: any method, target, headers and body through the real router in process:
/// never a panic (a 500); a JSON body with an `error` string for every 4xx and 5xx; for a 200
/// event stream a first chunk that starts with the connected event; an empty 204 only for a
/// CORS preflight, plain text only for `/metrics`, HTML only for the demo page.
///
/// The input's parts are the method, the target, `name: value` headers, and last the body. In
/// a header value, `$TOKEN` and `$PUBLISHER` become valid user and publisher tokens (`$TOKEN`
/// also in the target, for `?access_token=`).
pub fn http_request(input: &[u8]) {
    let mut parts: Vec<&[u8]> = input.split(|&byte| byte == SEPARATOR).collect();
    if parts.len() < 3 {
        return;
    }
    let body = Bytes::copy_from_slice(parts.pop().expect("three parts or more"));
    let server = fuzz_server();
    // Requests hyper's own parser could never produce are not the router's concern.
    let target = match std::str::from_utf8(parts[1]) {
        Ok(text) => text.replace("$TOKEN", &server.user_token).into_bytes(),
        Err(_) => parts[1].to_vec(),
    };
    let (Ok(method), Ok(uri)) = (Method::from_bytes(parts[0]), Uri::try_from(target)) else {
        return;
    };
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    for header in &parts[2..] {
        let Some(colon) = header.iter().position(|&byte| byte == b':') else {
            continue;
        };
        let value = header[colon + 1..].trim_ascii_start();
        let value = match std::str::from_utf8(value) {
            Ok(text) => text
                .replace("$TOKEN", &server.user_token)
                .replace("$PUBLISHER", &server.publisher_token)
                .into_bytes(),
            Err(_) => value.to_vec(),
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&header[..colon]),
            HeaderValue::from_bytes(&value),
        ) {
            request.headers_mut().append(name, value);
        }
    }
    server.runtime.block_on(async {
        let response = handle(server.state(), request).await;
        check_response(response).await;
    });
}

/// `jwt_auth`: no token is accepted unless validly signed. With an odd first byte, the rest is
/// an `Authorization` header and a token for an authenticator whose secret is random per
/// process: nothing is ever accepted. With an even one, a valid token is edited (2 bytes of
/// offset, 1 byte of how many bytes to delete, the rest inserted there): an accepted token is
/// the original, unedited, with its own identity.
pub fn jwt_auth(input: &[u8]) {
    let Some((&mode, input)) = input.split_first() else {
        return;
    };
    match mode % 2 {
        1 => reject_everything(input),
        _ => accept_only_the_original(input),
    }
}

/// `generate_request`: any JSON body through the generate request's validation: never a panic;
/// an accepted job holds exactly the request's fields, within the documented limits; a refusal
/// is a 422, or a 413 for `content` over the limit.
pub fn generate_request(input: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Value>(input) else {
        return;
    };
    match parse_generate_request(FUZZ_USER, body.clone()) {
        Ok(job) => {
            let field = |name: &str| body[name].as_str().expect("accepted fields are strings");
            assert!(body
                .as_object()
                .is_some_and(|fields| fields.keys().all(|key| [
                    "notebook_id",
                    "artifact_type",
                    "content",
                    "options"
                ]
                .contains(&key.as_str()))));
            assert_eq!(job.user_id, FUZZ_USER);
            assert_eq!(job.notebook_id, field("notebook_id"));
            assert_eq!(job.artifact_type.as_str(), field("artifact_type"));
            assert_eq!(job.content, field("content"));
            assert!(!job.notebook_id.trim().is_empty());
            assert!(job.notebook_id.chars().count() <= 256);
            assert!(!job.content.trim().is_empty());
            assert!(job.content.len() <= MAX_CONTENT_BYTES);
            assert!((1..=50).contains(&job.count), "count {}", job.count);
        }
        Err(error) if error.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            assert!(body["content"].as_str().unwrap().len() > MAX_CONTENT_BYTES);
        }
        Err(error) => assert_eq!(
            error.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{error:?}"
        ),
    }
}

fn has_line_break(text: &str) -> bool {
    text.contains(['\r', '\n'])
}

/// The error `encoder::encode` must give for a field value the parser would drop or alter.
fn refusal(event: &Event<'_>) -> Option<EncodeError> {
    match (event.id, event.event) {
        (Some(id), _) if has_line_break(id) => Some(EncodeError::LineBreak("id")),
        (Some(id), _) if id.contains('\0') => Some(EncodeError::NulInId),
        (_, Some(event_type)) if has_line_break(event_type) => {
            Some(EncodeError::LineBreak("event"))
        }
        _ => None,
    }
}

/// The events, last event id and reconnection time from feeding `stream` in chunks of `sizes`
/// (the rest at once when they run out), with an empty chunk after each.
fn parse_in_chunks(
    mut stream: &[u8],
    sizes: impl Iterator<Item = usize> + Clone,
) -> (Vec<ParsedEvent>, String, Option<u64>) {
    let mut parser = Parser::new();
    let mut events = Vec::new();
    let mut sizes = sizes.cycle();
    while !stream.is_empty() {
        let size = sizes.next().unwrap_or(stream.len()).min(stream.len());
        let (chunk, rest) = stream.split_at(size);
        events.extend(parser.feed(chunk));
        assert_eq!(parser.feed(b""), []);
        stream = rest;
    }
    parser.finish();
    (
        events,
        parser.last_event_id().to_owned(),
        parser.reconnection_time(),
    )
}

/// The runtime that `http_request` serves on and the tokens it substitutes; built once per
/// thread, since a runtime per input would dominate the fuzzing time.
struct FuzzServer {
    runtime: tokio::runtime::Runtime,
    config: Config,
    user_token: String,
    publisher_token: String,
}

fn fuzz_server() -> &'static FuzzServer {
    thread_local! {
        static SERVER: &'static FuzzServer = Box::leak(Box::new(FuzzServer::new()));
    }
    SERVER.with(|server| *server)
}

impl FuzzServer {
    fn new() -> Self {
        // Every generate request would log a line; the fuzzer sends millions.
        crate::log::set_level(crate::log::Level::Error);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime builds");
        let config = Config::with_secret("fuzz-server-secret");
        let auth = Authenticator::new(b"fuzz-server-secret", config.jwt_algorithm);
        // Outlives any fuzzing run.
        let ttl = std::time::Duration::from_secs(365 * 86_400);
        FuzzServer {
            user_token: auth.issue(FUZZ_USER, false, ttl),
            publisher_token: auth.issue(FUZZ_USER, true, ttl),
            runtime,
            config,
        }
    }

    /// A fresh state with no workers and no listener: an input's outcome never depends on the
    /// inputs before it (a failure reproduces from its file alone), and the job store, which no
    /// worker empties, never fills.
    fn state(&self) -> Arc<AppState> {
        AppState::new(self.config.clone(), Arc::new(EventBus::new()))
    }
}

async fn check_response(response: Response<ResponseBody>) {
    let status = response.status();
    assert_ne!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "a route panicked"
    );
    let content_type = response.headers().get(CONTENT_TYPE).cloned();
    match response.into_body() {
        // A CORS preflight: no body at all.
        Either::Left(empty) if status == StatusCode::NO_CONTENT => {
            assert!(content_type.is_none());
            let body = empty.collect().await.expect("infallible").to_bytes();
            assert!(body.is_empty());
        }
        Either::Left(text)
            if content_type
                .as_ref()
                .is_some_and(|t| t.as_bytes().starts_with(b"text/plain")) =>
        {
            assert_eq!(
                status,
                StatusCode::OK,
                "only /metrics answers in plain text"
            );
            let body = text.collect().await.expect("infallible").to_bytes();
            assert!(body.starts_with(b"# HELP "));
        }
        Either::Left(html)
            if content_type
                .as_ref()
                .is_some_and(|t| t.as_bytes().starts_with(b"text/html")) =>
        {
            assert_eq!(status, StatusCode::OK, "only the demo page answers in HTML");
            let body = html.collect().await.expect("infallible").to_bytes();
            assert!(body.starts_with(b"<!DOCTYPE html>"));
        }
        Either::Left(json) => {
            assert_eq!(
                content_type.expect("a JSON response has a content-type"),
                "application/json"
            );
            let body = json.collect().await.expect("infallible").to_bytes();
            let body: Value = serde_json::from_slice(&body).expect("the body is JSON");
            if status.is_client_error() || status.is_server_error() {
                assert!(body["error"].is_string(), "{status}: {body}");
            }
        }
        Either::Right(stream) => {
            let mut stream = std::pin::pin!(stream);
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                content_type.expect("a stream has a content-type"),
                "text/event-stream"
            );
            // The connected frame is queued first; a replay may be joined to it in one chunk.
            let frame = stream.frame().await.expect("the connected frame is queued");
            let frame = frame
                .expect("infallible")
                .into_data()
                .expect("a data frame");
            let events = crate::sse::parse(&frame);
            let first = events
                .first()
                .unwrap_or_else(|| panic!("no event: {frame:?}"));
            let data: Value = serde_json::from_str(&first.data).expect("the data is JSON");
            assert_eq!(data["type"], "connected");
            assert_eq!(data["user_id"], FUZZ_USER);
        }
    }
}

/// Runs a verification on the fuzz server's runtime: with an HMAC key only, it never waits.
fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    fuzz_server().runtime.block_on(future)
}

fn reject_everything(input: &[u8]) {
    static UNKNOWN: OnceLock<Authenticator> = OnceLock::new();
    let auth = UNKNOWN.get_or_init(|| {
        Authenticator::new(crate::random::hex_token(32).as_bytes(), Algorithm::HS256)
    });
    let token = String::from_utf8_lossy(input);
    assert!(block_on(auth.verify(&token)).is_err(), "accepted {token:?}");
    for value in [input.to_vec(), [b"Bearer ", input].concat()] {
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, value);
            assert!(
                block_on(auth.authenticate(&headers)).is_err(),
                "accepted {headers:?}"
            );
        }
    }
}

fn accept_only_the_original(input: &[u8]) {
    static KNOWN: OnceLock<(Authenticator, String)> = OnceLock::new();
    let (auth, original) = KNOWN.get_or_init(|| {
        let claims = Claims {
            sub: Some(FUZZ_USER.to_owned()),
            exp: FAR_FUTURE_EXP,
            role: Some(PUBLISHER_ROLE.to_owned()),
        };
        let key = EncodingKey::from_secret(KNOWN_SECRET);
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
            .expect("HMAC signing cannot fail");
        (Authenticator::new(KNOWN_SECRET, Algorithm::HS256), token)
    });
    let (offset, rest) = input.split_at(input.len().min(2));
    let offset = usize::from(u16::from_le_bytes([
        offset.first().copied().unwrap_or(0),
        offset.get(1).copied().unwrap_or(0),
    ])) % (original.len() + 1);
    let (delete, insert) = match rest.split_first() {
        Some((&delete, insert)) => (usize::from(delete), insert),
        None => (0, rest),
    };
    let end = (offset + delete).min(original.len());
    let edited = [
        &original.as_bytes()[..offset],
        insert,
        &original.as_bytes()[end..],
    ]
    .concat();

    let token = String::from_utf8_lossy(&edited);
    if let Ok(identity) = block_on(auth.verify(&token)) {
        assert_eq!(token, *original, "an edited token was accepted");
        assert_eq!(identity.user_id, FUZZ_USER);
        assert!(identity.publisher);
    }
    if let Ok(value) = HeaderValue::from_bytes(&[b"Bearer ", &edited[..]].concat()) {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, value);
        if block_on(auth.authenticate(&headers)).is_ok() {
            assert_eq!(token.trim(), original, "an edited header was accepted");
        }
    }
}

/// `event_data`: JSON that a parser accepts as text (what a publish body's `event_data` and a
/// Redis entry are read as) becomes an `EventData` exactly when a `Value` parse accepts it
/// too, and then its compact text is one line, it parses back to that `Value`, and its
/// `user_id` is the `Value`'s.
pub fn event_data(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(raw) = serde_json::from_str::<&RawValue>(text) else {
        return;
    };
    match (
        serde_json::from_str::<Value>(text),
        EventData::from_raw(raw),
    ) {
        (Err(_), Err(_)) => {}
        (Ok(value), Ok(data)) => {
            let json = data.json();
            assert!(
                !json.contains(['\r', '\n']),
                "{json:?} is more than one line"
            );
            assert_eq!(
                serde_json::from_str::<Value>(json).ok(),
                Some(value.clone())
            );
            assert_eq!(**data.value(), value);
            let user_id = value.get("user_id").and_then(Value::as_str);
            assert_eq!(data.user_id(), user_id, "{text:?}");
        }
        (parsed, data) => panic!("{text:?}: a Value parse gave {parsed:?}, EventData {data:?}"),
    }
}
