//! The `artifact-events` command: parses arguments, then calls the library.

use std::process::ExitCode;
use std::time::Duration;

use artifact_events::backends;
use artifact_events::config::Config;
use artifact_events::listen::{listen, ListenError, DEFAULT_URL};
use artifact_events::server::{self, AppState, Authenticator};
use artifact_events::{get_event_bus, set_log_format, set_log_level};

const USAGE: &str = "\
artifact-events: realtime artifact job notifications over Server-Sent Events

USAGE:
    artifact-events [serve] [--addr HOST:PORT]     run the server (the default)
    artifact-events token USER_ID [--publisher] [--ttl SECS]
                                                   print a JWT signed with JWT_SECRET
    artifact-events listen [--url URL] (--token JWT | --user USER_ID)
                                                   print a user's events as they arrive, each
                                                   event's data on a line
    artifact-events --help                         print this help
    artifact-events --version                      print the version

FLAGS:
    --addr HOST:PORT   listening address (overrides ADDR)
    --publisher        token carries role=publisher (may POST /ai/events/publish)
    --ttl SECS         token lifetime in seconds (default 86400)
    --url URL          server to listen to, http only (default http://127.0.0.1:8000)
    --token JWT        listen with this token
    --user USER_ID     listen as USER_ID, with a token signed with JWT_SECRET

ENVIRONMENT:
    ADDR                       listening address                     [127.0.0.1:8000]
    METRICS_ADDR               serve /metrics here only, e.g. 127.0.0.1:9100 [none: public listener]
    JWT_SECRET                 HMAC secret for tokens, >= 32 bytes   [random per run: development mode]
    JWT_ALGORITHM              HS256, HS384 or HS512                 [HS256]
    JWT_PUBLIC_KEY_FILE        PEM public key of your identity provider (RSA, EC, Ed25519) [none]
    JWT_JWKS_URL               JWKS URL of your identity provider    [none]
    JWT_ALGORITHMS             comma list narrowing accepted algorithms [what the keys allow]
    JWT_AUDIENCE               comma list; a token's aud must name one [none]
    JWT_ISSUER                 a token's iss must be this            [none]
    JWT_LEEWAY_SECS            clock skew tolerated on exp and nbf   [30]
    SSE_KEEPALIVE_SECS         seconds between keepalive comments    [30]
    SSE_QUEUE_CAPACITY         frames queued per stream before a slow client is dropped [256]
    SSE_QUEUE_MAX_BYTES        bytes queued per stream before a slow client is dropped [1048576]
    SSE_RETRY_MS               reconnect delay sent to clients       [2000]
    SSE_HISTORY_EVENTS         events kept per user for Last-Event-ID replay [1000]
    SSE_HISTORY_SECS           seconds an event stays replayable     [600]
    SSE_HISTORY_TOTAL_EVENTS   events kept for replay, all users     [262144]
    SSE_HISTORY_MAX_BYTES      memory kept for replay, all users     [33554432]
    CORS_ALLOW_ORIGINS         comma list of browser origins (* = any) [none]
    MAX_STREAMS_PER_USER       open streams per user (429 beyond)    [32]
    MAX_CONNECTIONS            open connections plus HTTP/2 streams (503 beyond; capped by the open-file limit) [10000]
    HEADER_READ_TIMEOUT_SECS   time allowed for a request head       [10]
    BODY_READ_TIMEOUT_SECS     time allowed for a request body (408 beyond) [10]
    TLS_CERT_FILE              PEM certificate chain: serve HTTPS, HTTP/2 and HTTP/1.1 by ALPN; re-read on SIGHUP (feature tls) [none]
    TLS_KEY_FILE               PEM private key of TLS_CERT_FILE      [none]
    SHUTDOWN_GRACE_SECS        time shutdown waits for connections   [5]
    LOG_LEVEL                  error, warn, info or debug            [info]
    LOG_FORMAT                 text, or json (one object per line)   [text]
    WORKERS                    jobs processed at once                [2]
    MAX_RETRIES                retries after a failed attempt        [1]
    RETRY_BACKOFF_MS           pause before a retry                  [250]
    JOB_TIMEOUT_SECS           time one attempt may take             [60]
    MAX_JOBS                   jobs kept in memory (oldest finished forgotten first) [100000]
    MAX_JOBS_PER_USER          unfinished jobs per user (429 beyond)  [20]
    JOB_STORE_MAX_BYTES        bytes of jobs kept (oldest finished forgotten first) [67108864]
    REDIS_URL                  share events and jobs with other processes through this Redis (feature redis) [none]
    REDIS_STREAM               the Redis stream's key                [artifact-events]
    REDIS_STREAM_MAX_LEN       entries the stream keeps (approximately) [100000]
    REDIS_OUTBOX_CAPACITY      events kept for other processes while Redis is down [100000]
    JOB_CLAIM_TIMEOUT_SECS     unrenewed claim on a Redis job before another process takes it over [30]
    JOB_RETENTION_SECS         seconds a finished job stays in Redis [86400]
    DATABASE_PATH              SQLite file for durable jobs and event history (feature sqlite) [none: memory]
    GENERATOR                  offline, or openai (an OpenAI-compatible model server) [offline]
    OPENAI_BASE_URL            the model server's API root, e.g. http://127.0.0.1:11434/v1 [none]
    OPENAI_API_KEY             sent as a bearer token; never logged  [none]
    OPENAI_MODEL               the model's name on that server       [none]
    LLM_TIMEOUT_SECS           time one request to the model may take [30]
    LLM_MAX_TOKENS             tokens the model may write per answer [8192]
    GENERATOR_DELAY_MS         latency added to each generator call (demos, tests) [0]
    WEBHOOK_URL                the application's backend: receives every event, signed [none]
    WEBHOOK_SECRET             whsec_<base64>: signs WEBHOOK_URL's requests; never logged [none]
    WEBHOOK_RETRY_SCHEDULE_SECS  waits before each retry of a webhook delivery [5,300,1800,7200,28800]
    WEBHOOK_TIMEOUT_SECS       time one webhook attempt may take     [10]
    WEBHOOK_QUEUE_CAPACITY     webhook deliveries pending at once (dropped and counted beyond) [10000]
    WEBHOOK_ALLOW_PRIVATE      1 = users' webhooks may reach private addresses (development) [0]
";

/// Lifetime of tokens printed by `token` and by development mode.
const DEFAULT_TOKEN_TTL_SECS: u64 = 86_400;

/// Why a command failed, which decides its exit status.
enum Failure {
    /// Bad arguments or configuration: exit 2, with a pointer to `--help`.
    Usage(String),
    /// The server could not start or stopped working (the port is taken, the database is
    /// locked, Redis is unreachable): exit 1.
    Runtime(String),
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure::Usage(message)
    }
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure::Usage(message.to_owned())
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|arg| arg == "--help" || arg == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|arg| arg == "--version" || arg == "-V") {
        println!("artifact-events {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let result = match args.first().map(String::as_str) {
        Some("token") => print_token(&args[1..]).map_err(Failure::Usage),
        Some("listen") => return listen_command(&args[1..]),
        Some("serve") => serve(&args[1..]),
        _ => serve(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => usage_error(&message),
        Err(Failure::Runtime(message)) => {
            eprintln!("artifact-events: {message}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(message: &str) -> ExitCode {
    eprintln!("artifact-events: {message}\n(see artifact-events --help)");
    ExitCode::from(2)
}

/// Exits 2 for bad arguments, and 1 when the server refuses the stream or it breaks.
fn listen_command(args: &[String]) -> ExitCode {
    let (url, token) = match listen_arguments(args) {
        Ok(arguments) => arguments,
        Err(message) => return usage_error(&message),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return usage_error(&error.to_string()),
    };
    match runtime.block_on(listen(&url, &token, &mut std::io::stdout().lock())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ ListenError::Url(_)) => usage_error(&error.to_string()),
        Err(error) => {
            eprintln!("artifact-events listen: {error}");
            ExitCode::FAILURE
        }
    }
}

/// The URL and the token that `listen` uses, from `--url` and `--token` or `--user`.
fn listen_arguments(args: &[String]) -> Result<(String, String), String> {
    let mut url = DEFAULT_URL.to_owned();
    let mut token = None;
    let mut user_id = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url" => url = args.next().ok_or("--url needs a URL")?.clone(),
            "--token" => token = Some(args.next().ok_or("--token needs a JWT")?.clone()),
            "--user" => user_id = Some(args.next().ok_or("--user needs a USER_ID")?.clone()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let token = match (token, user_id) {
        (Some(token), None) => token,
        (None, Some(user_id)) => signed_token(&user_id, false, DEFAULT_TOKEN_TTL_SECS)?,
        _ => return Err("listen needs either --token JWT or --user USER_ID".into()),
    };
    Ok((url, token))
}

fn serve(args: &[String]) -> Result<(), Failure> {
    let mut config = Config::from_env().map_err(|error| error.to_string())?;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--addr" => {
                let value = args.next().ok_or("--addr needs HOST:PORT")?;
                config.addr = value
                    .parse()
                    .map_err(|error| format!("--addr {value}: {error}"))?;
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    backends::check(&config)?;
    set_log_level(config.log_level);
    set_log_format(config.log_format);
    let runtime = tokio::runtime::Runtime::new().map_err(runtime_failure)?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|error| {
                Failure::Runtime(format!("cannot listen on {}: {error}", config.addr))
            })?;
        let addr = listener.local_addr().map_err(runtime_failure)?;
        let metrics_listener = match config.metrics_addr {
            Some(metrics_addr) => Some(tokio::net::TcpListener::bind(metrics_addr).await.map_err(
                |error| {
                    Failure::Runtime(format!(
                        "METRICS_ADDR: cannot listen on {metrics_addr}: {error}"
                    ))
                },
            )?),
            None => None,
        };
        let state = AppState::open(config, get_event_bus())
            .await
            .map_err(Failure::Runtime)?;
        if let Some(metrics_listener) = metrics_listener {
            tokio::spawn(server::serve_metrics(metrics_listener, state.clone()));
        }
        if state.config.development_secret {
            print_development_banner(&state.auth, addr);
        }
        server::run(listener, state, server::shutdown_signal()).await;
        Ok(())
    })
}

fn runtime_failure(error: std::io::Error) -> Failure {
    Failure::Runtime(error.to_string())
}

fn print_token(args: &[String]) -> Result<(), String> {
    let mut user_id = None;
    let mut publisher = false;
    let mut ttl = DEFAULT_TOKEN_TTL_SECS;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--publisher" => publisher = true,
            "--ttl" => {
                let value = args.next().ok_or("--ttl needs SECS")?;
                ttl = value
                    .parse()
                    .map_err(|_| format!("--ttl {value}: not a whole number of seconds"))?;
            }
            flag if flag.starts_with("--") => return Err(format!("unknown flag {flag:?}")),
            user if user_id.is_none() => user_id = Some(user.to_owned()),
            extra => return Err(format!("unexpected argument {extra:?}")),
        }
    }
    let user_id = user_id.ok_or("token needs a USER_ID")?;
    println!("{}", signed_token(&user_id, publisher, ttl)?);
    Ok(())
}

/// A token for `user_id` signed with `JWT_SECRET`, which must be set.
fn signed_token(user_id: &str, publisher: bool, ttl: u64) -> Result<String, String> {
    let config = Config::from_env().map_err(|error| error.to_string())?;
    let secret = match &config.jwt_secret {
        Some(secret) if !config.development_secret => secret,
        _ => {
            return Err(
                "JWT_SECRET is not set; a token signed with a random secret would be \
                 useless (with an identity provider, get tokens from it)"
                    .into(),
            )
        }
    };
    let auth = Authenticator::new(secret.expose().as_bytes(), config.jwt_algorithm);
    Ok(auth.issue(user_id, publisher, Duration::from_secs(ttl)))
}

fn print_development_banner(auth: &Authenticator, addr: std::net::SocketAddr) {
    let ttl = Duration::from_secs(DEFAULT_TOKEN_TTL_SECS);
    let user_token = auth.issue("demo", false, ttl);
    let publisher_token = auth.issue("publisher", true, ttl);
    eprintln!(
        "\n  Open the demo page: http://{addr}/\n\n  Stream events for user demo:\n    curl -N -H 'Authorization: Bearer {user_token}' http://{addr}/ai/artifact/events/stream\n\n  Publish one:\n    curl -X POST -H 'Authorization: Bearer {publisher_token}' -H 'Content-Type: application/json' \\\n      -d '{{\"event_type\":\"artifact.completed\",\"event_data\":{{\"user_id\":\"demo\",\"job_id\":\"j1\",\"result\":{{}}}}}}' \\\n      http://{addr}/ai/events/publish\n"
    );
}
