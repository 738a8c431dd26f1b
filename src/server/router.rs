//! The hand-rolled router: one `match` over the path's segments, then the method.

use std::sync::Arc;

use bytes::Bytes;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::cors::{preflight, CorsGrant};
use super::error::ApiError;
use super::request::RequestBody;
use super::response::{full_response, json_response, ResponseBody};
use super::routes::{artifact, dev_session, openapi, page, publish, stream, webhooks};
use super::state::AppState;
use crate::jobs::StoreError;
use crate::log;
use crate::panic::catch_unwind;

/// Answers one request; every error, and any panic in a route, becomes a JSON response.
pub async fn handle(
    state: Arc<AppState>,
    request: Request<impl RequestBody>,
) -> Response<ResponseBody> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let cors = CorsGrant::for_request(&state.config.cors_allow_origins, request.headers());
    let response = match catch_unwind(route(state.clone(), request)).await {
        Ok(Ok(response)) => response,
        // A known path answers OPTIONS with what it allows: the CORS preflight.
        Ok(Err(ApiError::MethodNotAllowed(allow))) if method == Method::OPTIONS => preflight(allow),
        Ok(Err(error)) => error.into_response(),
        Err(panic) => {
            log::error!("{method} {path} panicked: {panic}");
            ApiError::Internal.into_response()
        }
    };
    finish(&state, cors, &method, &path, response)
}

/// Answers a request on a connection over `MAX_CONNECTIONS`: 503, and the connection closes.
pub fn over_capacity(
    state: &AppState,
    request: &Request<impl RequestBody>,
) -> Response<ResponseBody> {
    let cors = CorsGrant::for_request(&state.config.cors_allow_origins, request.headers());
    let mut response = ApiError::Unavailable("server is at its connection limit").into_response();
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    let (method, path) = (request.method(), request.uri().path());
    finish(state, cors, method, path, response)
}

/// What every answer gets: CORS headers, a count in the metrics, a debug log line.
fn finish(
    state: &AppState,
    cors: CorsGrant,
    method: &Method,
    path: &str,
    mut response: Response<ResponseBody>,
) -> Response<ResponseBody> {
    cors.apply(&state.config.cors_allow_origins, response.headers_mut());
    state.metrics.count_response(response.status().as_u16());
    log::debug!("{method} {path} -> {}", response.status().as_u16());
    response
}

/// A path the router answers, named as `openapi.json` names it, and the methods it allows.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Route {
    /// The path template, e.g. `/ai/artifact/jobs/{job_id}`.
    // Read only by the tests that hold `ROUTES` against the document.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) path: &'static str,
    /// The methods, as a 405's `Allow` header lists them.
    pub(crate) allow: &'static str,
}

impl Route {
    const fn new(path: &'static str, allow: &'static str) -> Route {
        Route { path, allow }
    }

    /// The 405 for a method this route does not allow.
    fn not_allowed(self) -> ApiError {
        ApiError::MethodNotAllowed(self.allow)
    }
}

const PAGE: Route = Route::new("/", "GET");
const HEALTHZ: Route = Route::new("/healthz", "GET");
const READYZ: Route = Route::new("/readyz", "GET");
const METRICS: Route = Route::new("/metrics", "GET");
const OPENAPI: Route = Route::new("/openapi.json", "GET");
const STREAM: Route = Route::new("/ai/artifact/events/stream", "GET");
const PUBLISH: Route = Route::new("/ai/events/publish", "POST");
const GENERATE: Route = Route::new("/ai/artifact/generate", "POST");
const JOBS: Route = Route::new("/ai/artifact/jobs", "GET");
const JOB: Route = Route::new("/ai/artifact/jobs/{job_id}", "GET");
const CANCEL: Route = Route::new("/ai/artifact/jobs/{job_id}/cancel", "POST");
const WEBHOOKS: Route = Route::new("/ai/webhooks", "GET, POST");
const WEBHOOK: Route = Route::new("/ai/webhooks/{webhook_id}", "DELETE");
const WEBHOOK_DELIVERIES: Route = Route::new("/ai/webhooks/{webhook_id}/deliveries", "GET");
/// Routed in development mode only; in production it answers 404.
const DEV_SESSION: Route = Route::new("/ai/dev/session", "POST");

/// Every route of `route`'s `match`, whose 405 arms take their `Allow` from these same
/// constants; a test holds the table against `openapi.json` and the router, so the three cannot
/// drift apart: a new arm needs its `Route` here.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const ROUTES: [Route; 15] = [
    PAGE,
    HEALTHZ,
    READYZ,
    METRICS,
    OPENAPI,
    STREAM,
    PUBLISH,
    GENERATE,
    JOBS,
    JOB,
    CANCEL,
    WEBHOOKS,
    WEBHOOK,
    WEBHOOK_DELIVERIES,
    DEV_SESSION,
];

async fn route(
    state: Arc<AppState>,
    request: Request<impl RequestBody>,
) -> Result<Response<ResponseBody>, ApiError> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = request.method();
    match segments.as_slice() {
        // `/` trims to one empty segment.
        [""] if method == Method::GET => Ok(page::page(&state, &request).await),
        [""] => Err(PAGE.not_allowed()),
        ["healthz"] if method == Method::GET => {
            Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
        }
        ["healthz"] => Err(HEALTHZ.not_allowed()),
        ["readyz"] if method == Method::GET => ready(&state),
        ["readyz"] => Err(READYZ.not_allowed()),
        // With METRICS_ADDR, the counters are served there only.
        ["metrics"] if state.config.metrics_addr.is_some() => Err(ApiError::NotFound),
        ["metrics"] if method == Method::GET => metrics(&state),
        ["metrics"] => Err(METRICS.not_allowed()),
        ["openapi.json"] if method == Method::GET => Ok(openapi::document()),
        ["openapi.json"] => Err(OPENAPI.not_allowed()),
        ["ai", "artifact", "events", "stream"] if method == Method::GET => {
            stream::open(&state, &request).await
        }
        ["ai", "artifact", "events", "stream"] => Err(STREAM.not_allowed()),
        ["ai", "events", "publish"] if method == Method::POST => {
            publish::publish(&state, request).await
        }
        ["ai", "events", "publish"] => Err(PUBLISH.not_allowed()),
        ["ai", "artifact", "generate"] if method == Method::POST => {
            artifact::generate(&state, request).await
        }
        ["ai", "artifact", "generate"] => Err(GENERATE.not_allowed()),
        ["ai", "artifact", "jobs"] if method == Method::GET => {
            artifact::list_jobs(&state, &request).await
        }
        ["ai", "artifact", "jobs"] => Err(JOBS.not_allowed()),
        ["ai", "artifact", "jobs", job_id] if method == Method::GET => {
            artifact::get_job(&state, &request, job_id).await
        }
        ["ai", "artifact", "jobs", _] => Err(JOB.not_allowed()),
        ["ai", "artifact", "jobs", job_id, "cancel"] if method == Method::POST => {
            artifact::cancel_job(&state, &request, job_id).await
        }
        ["ai", "artifact", "jobs", _, "cancel"] => Err(CANCEL.not_allowed()),
        ["ai", "webhooks"] if method == Method::POST => webhooks::create(&state, request).await,
        ["ai", "webhooks"] if method == Method::GET => webhooks::list(&state, &request).await,
        ["ai", "webhooks"] => Err(WEBHOOKS.not_allowed()),
        ["ai", "webhooks", webhook_id] if method == Method::DELETE => {
            webhooks::delete(&state, &request, webhook_id).await
        }
        ["ai", "webhooks", _] => Err(WEBHOOK.not_allowed()),
        ["ai", "webhooks", webhook_id, "deliveries"] if method == Method::GET => {
            webhooks::deliveries(&state, &request, webhook_id).await
        }
        ["ai", "webhooks", _, "deliveries"] => Err(WEBHOOK_DELIVERIES.not_allowed()),
        // Only in development mode: in production the route does not exist.
        ["ai", "dev", "session"] if !state.config.dev_sessions() => Err(ApiError::NotFound),
        ["ai", "dev", "session"] if method == Method::POST => {
            dev_session::create(&state, request).await
        }
        ["ai", "dev", "session"] => Err(DEV_SESSION.not_allowed()),
        _ => Err(ApiError::NotFound),
    }
}

/// `GET /readyz`: 200 while the server can take work; 503 while it is shutting down, Redis is
/// in an outage or the job store fails (`/healthz` stays a liveness check).
fn ready(state: &AppState) -> Result<Response<ResponseBody>, ApiError> {
    match state.unready_reason() {
        None => Ok(json_response(StatusCode::OK, &json!({"status": "ready"}))),
        Some(reason) => Err(ApiError::NotReady(reason)),
    }
}

/// Answers a request on the `METRICS_ADDR` listener, where `/metrics` is the only route.
pub(super) fn answer_metrics_request<B>(
    state: &AppState,
    request: &Request<B>,
) -> Response<ResponseBody> {
    let answer = match (request.uri().path(), request.method()) {
        ("/metrics", &Method::GET) => metrics(state),
        ("/metrics", _) => Err(METRICS.not_allowed()),
        _ => Err(ApiError::NotFound),
    };
    answer.unwrap_or_else(ApiError::into_response)
}

/// `GET /metrics`: counters and gauges in the Prometheus text format.
fn metrics(state: &AppState) -> Result<Response<ResponseBody>, ApiError> {
    let jobs = match state.jobs.store().count_by_status() {
        Ok(jobs) => jobs,
        // A shared store out of reach: the other metrics (the outage's among them) still answer.
        Err(error @ StoreError::Unavailable(_)) => {
            log::warning!("metrics without the job gauges: {error}");
            Vec::new()
        }
        Err(error) => {
            log::error!("{error}");
            return Err(ApiError::Internal);
        }
    };
    let jobs: Vec<(&str, usize)> = jobs
        .iter()
        .map(|(status, count)| (status.as_str(), *count))
        .collect();
    let mut text = state.metrics.render(state.streams.stream_count(), &jobs);
    text.push_str(&state.webhooks.render_metrics());
    let mut response = full_response(Bytes::from(text));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    //! `ROUTES`, `openapi.json` and the router agree: every route is documented with exactly
    //! its methods, every documented operation is routed, and any other method answers 405.

    use std::collections::BTreeSet;
    use std::net::SocketAddr;
    use std::time::Duration;

    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use serde_json::Value;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::config::Config;
    use crate::events::EventBus;
    use crate::server::routes::openapi::DOCUMENT;

    /// The methods an OpenAPI path item can hold, but `OPTIONS`: every known path answers it
    /// as the CORS preflight, and the document leaves it out.
    const METHODS: [&str; 7] = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "TRACE"];
    /// How long any one answer may take before the test fails.
    const PATIENCE: Duration = Duration::from_secs(10);
    /// Stands for `{job_id}` where no job is needed.
    const ANY_JOB_ID: &str = "00000000000000000000000000000000";
    /// Stands for `{webhook_id}` where no webhook is needed.
    const ANY_WEBHOOK_ID: &str = "wh_000000000000000000000000";

    /// A new webhook of the test's user, so that each operation on one finds it (a delete
    /// before the listing of its deliveries included).
    fn webhook(state: &AppState) -> String {
        let id = format!("wh_{}", crate::random::hex_token(12));
        let subscription = crate::webhooks::Subscription {
            id: id.clone(),
            user_id: "router-test".to_owned(),
            url: "http://192.0.2.1/hooks".to_owned(),
            event_types: None,
            key: crate::webhooks::SigningKey::generate(),
            created_at: crate::time::now_rfc3339(),
            disabled: false,
        };
        state.webhooks.add_unchecked(subscription).unwrap();
        id
    }

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("openapi.json is JSON")
    }

    /// The methods the document lists for `path`, upper-case.
    fn documented_methods(document: &Value, path: &str) -> BTreeSet<String> {
        let item = document["paths"][path].as_object().expect("a path item");
        item.keys()
            .map(|key| key.to_uppercase())
            .filter(|method| METHODS.contains(&method.as_str()) || method == "OPTIONS")
            .collect()
    }

    fn allow_list(value: &str) -> BTreeSet<String> {
        value.split(", ").map(str::to_owned).collect()
    }

    /// The example JSON body of an operation, if it takes one.
    fn example_body(operation: &Value) -> Option<&Value> {
        operation
            .pointer("/requestBody/content/application~1json/example")
            .filter(|example| !example.is_null())
    }

    /// The real server, on 127.0.0.1:0, until the test's runtime ends.
    async fn serve() -> (SocketAddr, Arc<AppState>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Development mode, where every route exists (`/ai/dev/session` only answers there).
        let mut config = Config::with_secret("router-test-secret-of-32-bytes-at-least");
        config.development_secret = true;
        let state = AppState::new(config, Arc::new(EventBus::new()));
        tokio::spawn(crate::server::run(
            listener,
            state.clone(),
            std::future::pending(),
        ));
        (addr, state)
    }

    /// Sends one request on a new connection; the body stays unread (a stream never ends).
    async fn send(
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: &str,
        body: Option<&Value>,
    ) -> Response<Incoming> {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from(
                body.map(Value::to_string).unwrap_or_default(),
            )))
            .unwrap();
        tokio::time::timeout(PATIENCE, sender.send_request(request))
            .await
            .expect("an answer in time")
            .unwrap()
    }

    #[test]
    fn every_route_is_documented_with_exactly_its_methods() {
        let document = document();
        let paths = document["paths"].as_object().expect("paths");
        for route in ROUTES {
            assert!(
                paths.contains_key(route.path),
                "{} is routed but not documented",
                route.path
            );
            assert_eq!(
                documented_methods(&document, route.path),
                allow_list(route.allow),
                "the methods of {}",
                route.path
            );
        }
        for path in paths.keys() {
            assert!(
                ROUTES.iter().any(|route| route.path == path),
                "{path} is documented but not in ROUTES"
            );
        }
    }

    #[tokio::test]
    async fn every_documented_operation_is_routed_and_answers_a_documented_status() {
        let document = document();
        let (addr, state) = serve().await;
        // A publisher's token is a valid token on every route, publish included.
        let token = state
            .auth
            .issue("router-test", true, Duration::from_secs(600));
        // A real job, so that the job routes answer with it, not with a 404 for a missing job.
        let generate = &document["paths"]["/ai/artifact/generate"]["post"];
        let queued = send(
            addr,
            "POST",
            "/ai/artifact/generate",
            &token,
            example_body(generate),
        )
        .await;
        assert_eq!(queued.status(), StatusCode::ACCEPTED);
        let queued = queued.into_body().collect().await.unwrap().to_bytes();
        let queued: Value = serde_json::from_slice(&queued).unwrap();
        let job_id = queued["job_id"].as_str().expect("a job id");

        let mut operations = 0;
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let method = method.to_uppercase();
                if !METHODS.contains(&method.as_str()) {
                    continue;
                }
                let target = path
                    .replace("{job_id}", job_id)
                    .replace("{webhook_id}", &webhook(&state));
                let response = send(addr, &method, &target, &token, example_body(operation)).await;
                let status = response.status();
                assert!(
                    status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is documented but answers {status}"
                );
                assert!(
                    operation["responses"].get(status.as_str()).is_some(),
                    "{method} {path} answers {status}, which its responses do not list"
                );
                operations += 1;
            }
        }
        let routed: usize = ROUTES
            .iter()
            .map(|route| allow_list(route.allow).len())
            .sum();
        assert_eq!(operations, routed);
    }

    #[tokio::test]
    async fn a_documented_path_answers_other_methods_with_405_and_its_methods_in_allow() {
        let document = document();
        let (addr, state) = serve().await;
        let token = state
            .auth
            .issue("router-test", true, Duration::from_secs(600));
        for path in document["paths"].as_object().unwrap().keys() {
            let documented = documented_methods(&document, path);
            let target = path
                .replace("{job_id}", ANY_JOB_ID)
                .replace("{webhook_id}", ANY_WEBHOOK_ID);
            for method in METHODS
                .iter()
                .filter(|method| !documented.contains(**method))
            {
                let response = send(addr, method, &target, &token, None).await;
                assert_eq!(
                    response.status(),
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}"
                );
                let allow = response.headers()["allow"].to_str().unwrap();
                assert_eq!(allow_list(allow), documented, "Allow of {method} {path}");
            }
            let preflight = send(addr, "OPTIONS", &target, &token, None).await;
            assert_eq!(preflight.status(), StatusCode::NO_CONTENT, "OPTIONS {path}");
            let allow = preflight.headers()["allow"].to_str().unwrap();
            assert_eq!(allow_list(allow), documented, "Allow of OPTIONS {path}");
        }
    }
}
