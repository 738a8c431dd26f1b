//! Server settings: named defaults, overridden by environment variables.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::Algorithm;

use crate::delivery::{HistoryLimits, StreamSettings};
use crate::jobs::generator::OpenAiSettings;
use crate::log::{Format as LogFormat, Level};
use crate::secret::Secret;
use crate::server::ClaimRules;
use crate::webhooks::{ServerWebhook, SigningKey, WebhookSettings};

/// Default seconds of clock skew tolerated on a token's `exp` and `nbf`.
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 30;
/// The shortest `JWT_SECRET` accepted: 256 bits, the size of an HS256 key.
pub const MIN_JWT_SECRET_BYTES: usize = 32;
/// Where the server listens unless `ADDR` or `--addr` says otherwise.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8000";
/// Seconds between `: keepalive` comments on an idle stream; also bounds how long a vanished
/// client stays registered, since the failed write is what reveals it.
pub const DEFAULT_KEEPALIVE_SECS: u64 = 30;
/// Frames one stream may have queued; a client that falls further behind is disconnected.
pub const DEFAULT_STREAM_QUEUE_CAPACITY: usize = 256;
/// Default bytes queued per stream before a slow client is disconnected (1 MiB, Centrifugo's
/// default too): with large events, the frame bound alone would let one stalled client hold
/// 256 of them.
pub const DEFAULT_STREAM_QUEUE_MAX_BYTES: usize = 1024 * 1024;
/// Open streams per user; one more is answered 429.
pub const DEFAULT_MAX_STREAMS_PER_USER: usize = 32;
/// Open connections overall; one more is answered 503 and closed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// How long a client may take to send its request head (slowloris guard).
pub const DEFAULT_HEADER_READ_TIMEOUT_SECS: u64 = 10;
/// Default time allowed to send a request body, so that slow bodies cannot hold connection
/// slots (slowloris on the body rather than the head).
pub const DEFAULT_BODY_READ_TIMEOUT_SECS: u64 = 10;
/// How long shutdown waits for open connections to finish before exiting anyway.
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 5;
/// Milliseconds a disconnected `EventSource` waits before reconnecting (the `retry:` field).
pub const DEFAULT_RECONNECT_DELAY_MS: u64 = 2000;
/// Events kept per user for `Last-Event-ID` replay.
pub const DEFAULT_HISTORY_EVENTS_PER_USER: usize = 1000;
/// Seconds an event stays replayable.
pub const DEFAULT_HISTORY_SECS: u64 = 600;
/// Events kept for replay over all users; the oldest go first.
pub const DEFAULT_HISTORY_TOTAL_EVENTS: usize = 262_144;
/// Memory kept for replay over all users (frames plus per-event overhead); the oldest go first.
pub const DEFAULT_HISTORY_TOTAL_BYTES: usize = 32 * 1024 * 1024;
/// File descriptors kept free for the listener, logs and the store when capping connections
/// to the process's open-file limit.
const RESERVED_FILE_DESCRIPTORS: usize = 64;
/// Worker tasks processing jobs at once.
pub const DEFAULT_WORKERS: usize = 2;
/// Retries of a job after its first attempt failed.
pub const DEFAULT_MAX_RETRIES: u32 = 1;
/// Seconds one attempt (plan, generate, validate, repairs) may take.
pub const DEFAULT_JOB_TIMEOUT_SECS: u64 = 60;
/// Milliseconds to pause before retrying a failed attempt.
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 250;
/// Jobs kept in memory; beyond it the oldest finished ones are forgotten, and when none is
/// finished new jobs get 503.
pub const DEFAULT_MAX_JOBS: usize = 100_000;
/// Default unfinished (queued or running) jobs one user may have; one more gets 429.
pub const DEFAULT_MAX_JOBS_PER_USER: usize = 20;
/// Default bytes of jobs kept (content, results, errors, and an allowance per job): 64 MiB.
pub const DEFAULT_JOB_STORE_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Largest `content` of a generate request, in bytes; larger gets 413.
pub const MAX_CONTENT_BYTES: usize = 100 * 1024;
/// Largest generate request body: the content, escaped, plus room for the other fields.
pub const MAX_GENERATE_BODY_BYTES: usize = 8 * MAX_CONTENT_BYTES;
/// The Redis stream events are appended to, unless `REDIS_STREAM` names another.
pub const DEFAULT_REDIS_STREAM: &str = "artifact-events";
/// Entries the Redis stream keeps (approximately: `XADD … MAXLEN ~`).
pub const DEFAULT_REDIS_STREAM_MAX_LEN: usize = 100_000;
/// Events kept for the other processes while Redis is unreachable.
pub const DEFAULT_REDIS_OUTBOX_CAPACITY: usize = 100_000;
/// Seconds a running job's claim in Redis lasts without renewal before a live process takes
/// the job over; a live worker renews it every third of that.
pub const DEFAULT_JOB_CLAIM_TIMEOUT_SECS: u64 = 30;
/// Seconds a finished job stays in Redis.
pub const DEFAULT_JOB_RETENTION_SECS: u64 = 86_400;
/// Largest request head (request line and headers) accepted; larger ones get 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest `POST /ai/events/publish` body; larger ones get 413.
pub const MAX_PUBLISH_BODY_BYTES: usize = 1024 * 1024;
/// Seconds one request to the model server may take, from connecting to the last byte of the
/// answer; two of them (an answer and a repair) fit in the default `JOB_TIMEOUT_SECS`.
pub const DEFAULT_LLM_TIMEOUT_SECS: u64 = 30;
/// Tokens the model may write per answer (`max_tokens`): room for a 50-question quiz.
pub const DEFAULT_LLM_MAX_TOKENS: u32 = 8192;

/// Everything the server can be configured with.
#[derive(Clone, Debug)]
pub struct Config {
    /// The listening address (`ADDR`).
    pub addr: SocketAddr,
    /// The HMAC secret that signs and verifies JWTs (`JWT_SECRET`); `None` when only an
    /// identity provider's keys are accepted.
    pub jwt_secret: Option<Secret>,
    /// True when no key was configured at all and `jwt_secret` is random for this run.
    pub development_secret: bool,
    /// The HMAC algorithm of `jwt_secret` (`JWT_ALGORITHM`: HS256, HS384 or HS512).
    pub jwt_algorithm: Algorithm,
    /// A PEM file with the identity provider's public key (`JWT_PUBLIC_KEY_FILE`).
    pub jwt_public_key_file: Option<PathBuf>,
    /// The identity provider's JWKS document (`JWT_JWKS_URL`).
    pub jwt_jwks_url: Option<String>,
    /// Audience, issuer, leeway and accepted algorithms (`JWT_AUDIENCE`, `JWT_ISSUER`,
    /// `JWT_LEEWAY_SECS`, `JWT_ALGORITHMS`).
    pub jwt_rules: ClaimRules,
    /// Where `/metrics` is served instead of the public listener (`METRICS_ADDR`).
    pub metrics_addr: Option<SocketAddr>,
    /// Interval between keepalive comments (`SSE_KEEPALIVE_SECS`).
    pub keepalive: Duration,
    /// Per-stream queue bound in frames (`SSE_QUEUE_CAPACITY`).
    pub stream_queue_capacity: usize,
    /// Per-stream queue bound in bytes (`SSE_QUEUE_MAX_BYTES`).
    pub stream_queue_max_bytes: usize,
    /// Open streams allowed per user (`MAX_STREAMS_PER_USER`).
    pub max_streams_per_user: usize,
    /// Open connections allowed overall (`MAX_CONNECTIONS`), never above what the open-file
    /// limit allows.
    pub max_connections: usize,
    /// The `retry:` delay sent to clients (`SSE_RETRY_MS`).
    pub reconnect_delay: Duration,
    /// What is kept for `Last-Event-ID` replay (`SSE_HISTORY_*`).
    pub history: HistoryLimits,
    /// Origins allowed to call the API from a browser (`CORS_ALLOW_ORIGINS`).
    pub cors_allow_origins: Vec<String>,
    /// Time allowed for a request head (`HEADER_READ_TIMEOUT_SECS`).
    pub header_read_timeout: Duration,
    /// Time allowed for a request body (`BODY_READ_TIMEOUT_SECS`).
    pub body_read_timeout: Duration,
    /// Time shutdown waits for connections (`SHUTDOWN_GRACE_SECS`).
    pub shutdown_grace: Duration,
    /// Log verbosity (`LOG_LEVEL`).
    pub log_level: Level,
    /// Log line format (`LOG_FORMAT`).
    pub log_format: LogFormat,
    /// Worker tasks (`WORKERS`).
    pub workers: usize,
    /// Retries after a failed attempt (`MAX_RETRIES`).
    pub max_retries: u32,
    /// Time one attempt may take (`JOB_TIMEOUT_SECS`).
    pub job_timeout: Duration,
    /// Pause before a retry (`RETRY_BACKOFF_MS`).
    pub retry_backoff: Duration,
    /// Jobs kept in memory (`MAX_JOBS`).
    pub max_jobs: usize,
    /// Unfinished jobs one user may have (`MAX_JOBS_PER_USER`).
    pub max_jobs_per_user: usize,
    /// Bytes of jobs kept (`JOB_STORE_MAX_BYTES`).
    pub job_store_max_bytes: usize,
    /// The SQLite file that keeps jobs and event history across restarts (`DATABASE_PATH`);
    /// `None` keeps them in memory.
    pub database_path: Option<PathBuf>,
    /// Latency added to each generator call (`GENERATOR_DELAY_MS`), to demo and test what an
    /// LLM-backed generator's latency does.
    pub generator_delay: Duration,
    /// Where events and jobs cross processes (`REDIS_URL`); `None` keeps them in this process.
    pub redis: Option<RedisSettings>,
    /// How long a job's claim in Redis lasts unrenewed before another process takes the job
    /// over (`JOB_CLAIM_TIMEOUT_SECS`).
    pub job_claim_timeout: Duration,
    /// How long a finished job stays in Redis (`JOB_RETENTION_SECS`).
    pub job_retention: Duration,
    /// The certificate and key that turn on HTTPS (`TLS_CERT_FILE`, `TLS_KEY_FILE`); `None`
    /// serves cleartext HTTP/1.1 and h2c.
    pub tls: Option<TlsFiles>,
    /// The model server that generates artifacts (`GENERATOR=openai`); `None` uses the
    /// offline generator.
    pub openai: Option<OpenAiSettings>,
    /// How webhooks are delivered (`WEBHOOK_*`).
    pub webhooks: WebhookSettings,
}

/// How events cross processes through Redis.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// The server, e.g. `redis://127.0.0.1:6379` (`REDIS_URL`).
    pub url: String,
    /// The stream's key (`REDIS_STREAM`); processes that share it share events.
    pub stream_key: String,
    /// Entries the stream keeps (`REDIS_STREAM_MAX_LEN`).
    pub max_len: usize,
    /// Events kept during an outage for the other processes (`REDIS_OUTBOX_CAPACITY`).
    pub outbox_capacity: usize,
}

impl RedisSettings {
    /// The URL without its password (`redis://user:password@host` shows as
    /// `redis://user:…@host`), for log lines and errors.
    pub fn shown_url(&self) -> String {
        let Some((scheme, rest)) = self.url.split_once("://") else {
            return self.url.clone();
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                format!("{scheme}://{user}:…@{host}{path}")
            }
            None => self.url.clone(),
        }
    }
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &self.shown_url())
            .field("stream_key", &self.stream_key)
            .field("max_len", &self.max_len)
            .field("outbox_capacity", &self.outbox_capacity)
            .finish()
    }
}

/// The PEM files the server's HTTPS certificate chain and private key are read from, at
/// start-up and again on SIGHUP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (`TLS_CERT_FILE`).
    pub cert_file: PathBuf,
    /// The private key: PKCS#8, PKCS#1 or SEC1 (`TLS_KEY_FILE`).
    pub key_file: PathBuf,
}

/// An environment variable with a value the server cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The variable's name.
    pub variable: &'static str,
    /// What is wrong with its value.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.variable, self.problem)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The defaults, signing tokens with `jwt_secret`.
    pub fn with_secret(jwt_secret: impl Into<String>) -> Self {
        Config {
            addr: DEFAULT_ADDR
                .parse()
                .expect("DEFAULT_ADDR is a valid address"),
            jwt_secret: Some(Secret::new(jwt_secret)),
            development_secret: false,
            jwt_algorithm: Algorithm::HS256,
            jwt_public_key_file: None,
            jwt_jwks_url: None,
            jwt_rules: ClaimRules {
                leeway_secs: DEFAULT_JWT_LEEWAY_SECS,
                ..ClaimRules::default()
            },
            metrics_addr: None,
            keepalive: Duration::from_secs(DEFAULT_KEEPALIVE_SECS),
            stream_queue_capacity: DEFAULT_STREAM_QUEUE_CAPACITY,
            stream_queue_max_bytes: DEFAULT_STREAM_QUEUE_MAX_BYTES,
            max_streams_per_user: DEFAULT_MAX_STREAMS_PER_USER,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            reconnect_delay: Duration::from_millis(DEFAULT_RECONNECT_DELAY_MS),
            history: HistoryLimits {
                events_per_user: DEFAULT_HISTORY_EVENTS_PER_USER,
                max_age: Duration::from_secs(DEFAULT_HISTORY_SECS),
                total_events: DEFAULT_HISTORY_TOTAL_EVENTS,
                total_bytes: DEFAULT_HISTORY_TOTAL_BYTES,
            },
            cors_allow_origins: Vec::new(),
            header_read_timeout: Duration::from_secs(DEFAULT_HEADER_READ_TIMEOUT_SECS),
            body_read_timeout: Duration::from_secs(DEFAULT_BODY_READ_TIMEOUT_SECS),
            shutdown_grace: Duration::from_secs(DEFAULT_SHUTDOWN_GRACE_SECS),
            log_level: Level::Info,
            log_format: LogFormat::Text,
            workers: DEFAULT_WORKERS,
            max_retries: DEFAULT_MAX_RETRIES,
            job_timeout: Duration::from_secs(DEFAULT_JOB_TIMEOUT_SECS),
            retry_backoff: Duration::from_millis(DEFAULT_RETRY_BACKOFF_MS),
            max_jobs: DEFAULT_MAX_JOBS,
            max_jobs_per_user: DEFAULT_MAX_JOBS_PER_USER,
            job_store_max_bytes: DEFAULT_JOB_STORE_MAX_BYTES,
            database_path: None,
            generator_delay: Duration::ZERO,
            redis: None,
            job_claim_timeout: Duration::from_secs(DEFAULT_JOB_CLAIM_TIMEOUT_SECS),
            job_retention: Duration::from_secs(DEFAULT_JOB_RETENTION_SECS),
            tls: None,
            openai: None,
            webhooks: WebhookSettings::default(),
        }
    }

    /// Reads the environment; with no key at all (`JWT_SECRET`, `JWT_PUBLIC_KEY_FILE`,
    /// `JWT_JWKS_URL`), tokens are signed with a random development secret.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|variable| std::env::var(variable).ok())
    }

    /// Reads the settings as `from_env` does, from `lookup` (a variable's name to its value).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let lookup: &dyn Fn(&str) -> Option<String> = &lookup;
        let public_key_file = env_value(lookup, "JWT_PUBLIC_KEY_FILE").map(PathBuf::from);
        let jwks_url = env_value(lookup, "JWT_JWKS_URL").map(|url| url.trim().to_owned());
        let (jwt_secret, development_secret) = match env_value(lookup, "JWT_SECRET") {
            Some(secret) if secret.len() < MIN_JWT_SECRET_BYTES => {
                return Err(invalid(
                    "JWT_SECRET",
                    format!(
                        "is {} bytes, and at least {MIN_JWT_SECRET_BYTES} are needed: an HS256 \
                         secret that short can be brute-forced offline from any token it signed. \
                         Make one with `openssl rand -hex 32`, or unset JWT_SECRET for \
                         development mode",
                        secret.len()
                    ),
                ))
            }
            Some(secret) => (Some(secret), false),
            None if public_key_file.is_some() || jwks_url.is_some() => (None, false),
            None => (Some(crate::random::hex_token(32)), true),
        };
        let mut config = Config::with_secret("");
        config.jwt_secret = jwt_secret.map(Secret::new);
        config.development_secret = development_secret;
        config.jwt_public_key_file = public_key_file;
        if let Some(url) = jwks_url {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(invalid(
                    "JWT_JWKS_URL",
                    "expected an http:// or https:// URL",
                ));
            }
            config.jwt_jwks_url = Some(url);
        }
        config.jwt_rules = jwt_rules(lookup)?;
        if let Some(addr) = env_parse::<SocketAddr>(lookup, "ADDR")? {
            config.addr = addr;
        }
        config.metrics_addr = env_parse::<SocketAddr>(lookup, "METRICS_ADDR")?;
        if let Some(name) = env_value(lookup, "JWT_ALGORITHM") {
            config.jwt_algorithm = match name.as_str() {
                "HS256" => Algorithm::HS256,
                "HS384" => Algorithm::HS384,
                "HS512" => Algorithm::HS512,
                _ => return Err(invalid("JWT_ALGORITHM", "expected HS256, HS384 or HS512")),
            };
        }
        if let Some(secs) = env_positive(lookup, "SSE_KEEPALIVE_SECS")? {
            config.keepalive = Duration::from_secs(secs as u64);
        }
        if let Some(capacity) = env_positive(lookup, "SSE_QUEUE_CAPACITY")? {
            config.stream_queue_capacity = capacity;
        }
        if let Some(bytes) = env_positive(lookup, "SSE_QUEUE_MAX_BYTES")? {
            config.stream_queue_max_bytes = bytes;
        }
        if let Some(max) = env_positive(lookup, "MAX_STREAMS_PER_USER")? {
            config.max_streams_per_user = max;
        }
        if let Some(max) = env_positive(lookup, "MAX_CONNECTIONS")? {
            config.max_connections = max;
        }
        if let Some(millis) = env_parse::<u64>(lookup, "SSE_RETRY_MS")? {
            config.reconnect_delay = Duration::from_millis(millis);
        }
        if let Some(events) = env_positive(lookup, "SSE_HISTORY_EVENTS")? {
            config.history.events_per_user = events;
        }
        if let Some(secs) = env_positive(lookup, "SSE_HISTORY_SECS")? {
            config.history.max_age = Duration::from_secs(secs as u64);
        }
        if let Some(events) = env_positive(lookup, "SSE_HISTORY_TOTAL_EVENTS")? {
            config.history.total_events = events;
        }
        if let Some(bytes) = env_positive(lookup, "SSE_HISTORY_MAX_BYTES")? {
            config.history.total_bytes = bytes;
        }
        if let Some(origins) = env_value(lookup, "CORS_ALLOW_ORIGINS") {
            config.cors_allow_origins = origins
                .split(',')
                .map(|origin| origin.trim().trim_end_matches('/').to_owned())
                .filter(|origin| !origin.is_empty())
                .collect();
        }
        if let Some(secs) = env_positive(lookup, "HEADER_READ_TIMEOUT_SECS")? {
            config.header_read_timeout = Duration::from_secs(secs as u64);
        }
        if let Some(secs) = env_positive(lookup, "BODY_READ_TIMEOUT_SECS")? {
            config.body_read_timeout = Duration::from_secs(secs as u64);
        }
        if let Some(secs) = env_parse::<u64>(lookup, "SHUTDOWN_GRACE_SECS")? {
            config.shutdown_grace = Duration::from_secs(secs);
        }
        if let Some(level) = env_value(lookup, "LOG_LEVEL") {
            config.log_level = Level::parse(&level)
                .ok_or_else(|| invalid("LOG_LEVEL", "expected error, warn, info or debug"))?;
        }
        if let Some(format) = env_value(lookup, "LOG_FORMAT") {
            config.log_format = LogFormat::parse(&format)
                .ok_or_else(|| invalid("LOG_FORMAT", "expected text or json"))?;
        }
        if let Some(workers) = env_positive(lookup, "WORKERS")? {
            config.workers = workers;
        }
        if let Some(retries) = env_parse::<u32>(lookup, "MAX_RETRIES")? {
            config.max_retries = retries;
        }
        if let Some(secs) = env_positive(lookup, "JOB_TIMEOUT_SECS")? {
            config.job_timeout = Duration::from_secs(secs as u64);
        }
        if let Some(millis) = env_parse::<u64>(lookup, "RETRY_BACKOFF_MS")? {
            config.retry_backoff = Duration::from_millis(millis);
        }
        if let Some(max) = env_positive(lookup, "MAX_JOBS")? {
            config.max_jobs = max;
        }
        if let Some(max) = env_positive(lookup, "MAX_JOBS_PER_USER")? {
            config.max_jobs_per_user = max;
        }
        if let Some(bytes) = env_positive(lookup, "JOB_STORE_MAX_BYTES")? {
            config.job_store_max_bytes = bytes;
        }
        if let Some(path) = env_value(lookup, "DATABASE_PATH") {
            config.database_path = Some(PathBuf::from(path));
        }
        if let Some(millis) = env_parse::<u64>(lookup, "GENERATOR_DELAY_MS")? {
            config.generator_delay = Duration::from_millis(millis);
        }
        if let Some(url) = env_value(lookup, "REDIS_URL") {
            config.redis = Some(RedisSettings {
                url,
                stream_key: env_value(lookup, "REDIS_STREAM")
                    .unwrap_or_else(|| DEFAULT_REDIS_STREAM.into()),
                max_len: env_positive(lookup, "REDIS_STREAM_MAX_LEN")?
                    .unwrap_or(DEFAULT_REDIS_STREAM_MAX_LEN),
                outbox_capacity: env_positive(lookup, "REDIS_OUTBOX_CAPACITY")?
                    .unwrap_or(DEFAULT_REDIS_OUTBOX_CAPACITY),
            });
        }
        if let Some(secs) = env_positive(lookup, "JOB_CLAIM_TIMEOUT_SECS")? {
            config.job_claim_timeout = Duration::from_secs(secs as u64);
        }
        if let Some(secs) = env_positive(lookup, "JOB_RETENTION_SECS")? {
            config.job_retention = Duration::from_secs(secs as u64);
        }
        config.tls = tls_files(lookup)?;
        config.openai = openai_settings(lookup)?;
        config.webhooks = webhook_settings(lookup)?;
        Ok(config)
    }

    /// Connections allowed: `max_connections`, lowered to fit the open-file limit if need be.
    pub fn connection_limit(&self) -> usize {
        match open_file_limit() {
            Some(files)
                if files.saturating_sub(RESERVED_FILE_DESCRIPTORS) < self.max_connections =>
            {
                files.saturating_sub(RESERVED_FILE_DESCRIPTORS).max(1)
            }
            _ => self.max_connections,
        }
    }

    /// Whether the demo page may sign a browser in as any user (`POST /ai/dev/session`): only
    /// in development mode, and only on a loopback address, so that a server that forgot
    /// `JWT_SECRET` on `0.0.0.0` does not let the network act as anyone.
    pub fn dev_sessions(&self) -> bool {
        self.development_secret && self.addr.ip().is_loopback()
    }

    /// The stream settings within this configuration.
    pub fn stream_settings(&self) -> StreamSettings {
        StreamSettings {
            queue_capacity: self.stream_queue_capacity,
            queue_max_bytes: self.stream_queue_max_bytes,
            max_streams_per_user: self.max_streams_per_user,
            reconnect_delay: self.reconnect_delay,
            history: self.history,
        }
    }

    /// What the job store keeps, within this configuration.
    pub fn job_limits(&self) -> crate::jobs::JobLimits {
        crate::jobs::JobLimits {
            max_jobs: self.max_jobs,
            max_unfinished_per_user: self.max_jobs_per_user,
            max_bytes: self.job_store_max_bytes,
        }
    }

    /// The worker settings within this configuration.
    pub fn worker_config(&self) -> crate::jobs::WorkerConfig {
        crate::jobs::WorkerConfig {
            workers: self.workers,
            max_retries: self.max_retries,
            retry_backoff: self.retry_backoff,
            attempt_timeout: self.job_timeout,
        }
    }
}

/// The claim rules from `JWT_AUDIENCE`, `JWT_ISSUER`, `JWT_LEEWAY_SECS` and `JWT_ALGORITHMS`.
fn jwt_rules(lookup: &dyn Fn(&str) -> Option<String>) -> Result<ClaimRules, ConfigError> {
    let audience = env_value(lookup, "JWT_AUDIENCE")
        .map(|list| {
            list.split(',')
                .map(|audience| audience.trim().to_owned())
                .filter(|audience| !audience.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let algorithms = env_value(lookup, "JWT_ALGORITHMS")
        .map(|list| {
            list.split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(|name| {
                    if name.eq_ignore_ascii_case("none") {
                        return Err(invalid("JWT_ALGORITHMS", "none is never accepted"));
                    }
                    Algorithm::from_str(name).map_err(|_| {
                        invalid(
                            "JWT_ALGORITHMS",
                            format!("{name:?} is not one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    if algorithms.as_ref().is_some_and(Vec::is_empty) {
        return Err(invalid("JWT_ALGORITHMS", "names no algorithm"));
    }
    Ok(ClaimRules {
        audience,
        issuer: env_value(lookup, "JWT_ISSUER").map(|issuer| issuer.trim().to_owned()),
        leeway_secs: env_parse::<u64>(lookup, "JWT_LEEWAY_SECS")?
            .unwrap_or(DEFAULT_JWT_LEEWAY_SECS),
        algorithms,
    })
}

/// `TLS_CERT_FILE` and `TLS_KEY_FILE`: both or neither, since one alone cannot serve HTTPS.
fn tls_files(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<TlsFiles>, ConfigError> {
    match (
        env_value(lookup, "TLS_CERT_FILE"),
        env_value(lookup, "TLS_KEY_FILE"),
    ) {
        (Some(cert_file), Some(key_file)) => Ok(Some(TlsFiles {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError {
            variable: "TLS_KEY_FILE",
            problem: "must be set with TLS_CERT_FILE (the certificate's private key, PEM)"
                .to_owned(),
        }),
        (None, Some(_)) => Err(ConfigError {
            variable: "TLS_CERT_FILE",
            problem: "must be set with TLS_KEY_FILE (the certificate chain, PEM)".to_owned(),
        }),
    }
}

/// The model server's settings when `GENERATOR=openai`; `None` for the offline generator. The
/// `LLM_*` values are checked either way, so a typo is reported before it matters.
fn openai_settings(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<OpenAiSettings>, ConfigError> {
    let timeout = env_positive(lookup, "LLM_TIMEOUT_SECS")?
        .map_or(DEFAULT_LLM_TIMEOUT_SECS, |secs| secs as u64);
    let max_tokens = match env_parse::<u32>(lookup, "LLM_MAX_TOKENS")? {
        Some(0) => return Err(invalid("LLM_MAX_TOKENS", "must be at least 1")),
        value => value.unwrap_or(DEFAULT_LLM_MAX_TOKENS),
    };
    match env_value(lookup, "GENERATOR").as_deref() {
        None | Some("offline") => return Ok(None),
        Some("openai") => {}
        Some(_) => return Err(invalid("GENERATOR", "expected offline or openai")),
    }
    let required = |variable: &'static str| {
        env_value(lookup, variable)
            .ok_or_else(|| invalid(variable, "must be set when GENERATOR=openai"))
    };
    let base_url = required("OPENAI_BASE_URL")?
        .trim()
        .trim_end_matches('/')
        .to_owned();
    let scheme = base_url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase());
    let authority = base_url
        .split_once("://")
        .map_or("", |(_, rest)| rest.split('/').next().unwrap_or_default());
    if authority.contains('@') {
        return Err(invalid(
            "OPENAI_BASE_URL",
            "must not hold a user or password; put the key in OPENAI_API_KEY",
        ));
    }
    if !matches!(scheme.as_deref(), Some("http" | "https")) {
        return Err(invalid(
            "OPENAI_BASE_URL",
            "expected http://HOST[:PORT]/PATH or https://…, e.g. http://127.0.0.1:11434/v1",
        ));
    }
    Ok(Some(OpenAiSettings {
        base_url,
        api_key: env_value(lookup, "OPENAI_API_KEY").map(Secret::new),
        model: required("OPENAI_MODEL")?.trim().to_owned(),
        timeout: Duration::from_secs(timeout),
        max_tokens,
    }))
}

/// The `WEBHOOK_*` settings: the schedule, timeout and queue bound, the private-address
/// switch, and the operator's `WEBHOOK_URL` with its `WEBHOOK_SECRET` (one needs the other).
fn webhook_settings(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<WebhookSettings, ConfigError> {
    let mut settings = WebhookSettings::default();
    if let Some(schedule) = env_value(lookup, "WEBHOOK_RETRY_SCHEDULE_SECS") {
        let problem = "expected a comma list of 1 to 20 waits in seconds, each above 0 and at \
                       most 604800 (fractions allowed), e.g. 5,300,1800,7200,28800";
        let waits: Option<Vec<Duration>> = schedule
            .split(',')
            .map(|wait| match wait.trim().parse::<f64>() {
                Ok(secs) if secs > 0.0 && secs <= 604_800.0 => Some(Duration::from_secs_f64(secs)),
                _ => None,
            })
            .collect();
        settings.retry_schedule = waits
            .filter(|waits| waits.len() <= 20)
            .ok_or_else(|| invalid("WEBHOOK_RETRY_SCHEDULE_SECS", problem))?;
    }
    if let Some(secs) = env_positive(lookup, "WEBHOOK_TIMEOUT_SECS")? {
        settings.timeout = Duration::from_secs(secs as u64);
    }
    if let Some(capacity) = env_positive(lookup, "WEBHOOK_QUEUE_CAPACITY")? {
        settings.queue_capacity = capacity;
    }
    if let Some(allow) = env_value(lookup, "WEBHOOK_ALLOW_PRIVATE") {
        settings.allow_private = match allow.trim() {
            "1" | "true" => true,
            "0" | "false" => false,
            _ => return Err(invalid("WEBHOOK_ALLOW_PRIVATE", "expected 1 or 0")),
        };
    }
    let url = env_value(lookup, "WEBHOOK_URL");
    let secret = env_value(lookup, "WEBHOOK_SECRET");
    settings.server =
        match (url, secret) {
            (None, None) => None,
            (Some(_), None) => return Err(invalid(
                "WEBHOOK_SECRET",
                "must be set when WEBHOOK_URL is: whsec_ followed by base64 of 16 to 64 random \
                 bytes, e.g. from `echo whsec_$(openssl rand -base64 32)`",
            )),
            (None, Some(_)) => {
                return Err(invalid("WEBHOOK_URL", "must be set when WEBHOOK_SECRET is"));
            }
            (Some(url), Some(secret)) => {
                let url = url.trim().to_owned();
                let scheme = url
                    .split_once("://")
                    .map(|(scheme, _)| scheme.to_ascii_lowercase());
                if !matches!(scheme.as_deref(), Some("http" | "https")) {
                    return Err(invalid("WEBHOOK_URL", "expected http://… or https://…"));
                }
                let key = SigningKey::parse(secret.trim())
                    .map_err(|problem| invalid("WEBHOOK_SECRET", problem))?;
                Some(ServerWebhook { url, key })
            }
        };
    Ok(settings)
}

/// The soft `RLIMIT_NOFILE`, read from `/proc/self/limits` (no libc dependency needed).
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn env_value(lookup: &dyn Fn(&str) -> Option<String>, variable: &str) -> Option<String> {
    lookup(variable).filter(|value| !value.is_empty())
}

fn env_parse<T: FromStr>(
    lookup: &dyn Fn(&str) -> Option<String>,
    variable: &'static str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: fmt::Display,
{
    env_value(lookup, variable)
        .map(|value| {
            value
                .trim()
                .parse()
                .map_err(|error| invalid(variable, error))
        })
        .transpose()
}

fn env_positive(
    lookup: &dyn Fn(&str) -> Option<String>,
    variable: &'static str,
) -> Result<Option<usize>, ConfigError> {
    match env_parse::<usize>(lookup, variable)? {
        Some(0) => Err(invalid(variable, "must be at least 1")),
        value => Ok(value),
    }
}

fn invalid(variable: &'static str, problem: impl fmt::Display) -> ConfigError {
    ConfigError {
        variable,
        problem: problem.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn a_redis_password_is_never_shown() {
        let settings = RedisSettings {
            url: "redis://app:hunter2@redis.internal:6379/0".to_owned(),
            stream_key: "s".to_owned(),
            max_len: 1,
            outbox_capacity: 1,
        };
        assert_eq!(settings.shown_url(), "redis://app:…@redis.internal:6379/0");
        assert!(!format!("{settings:?}").contains("hunter2"));
        let plain = RedisSettings {
            url: "redis://127.0.0.1:6379".to_owned(),
            ..settings
        };
        assert_eq!(plain.shown_url(), "redis://127.0.0.1:6379");
    }

    #[test]
    fn tls_needs_both_its_files_or_neither() {
        let config = from(&[]).unwrap();
        assert_eq!(config.tls, None);
        let both = from(&[("TLS_CERT_FILE", "/c.pem"), ("TLS_KEY_FILE", "/k.pem")]).unwrap();
        let files = both.tls.unwrap();
        assert_eq!(files.cert_file, PathBuf::from("/c.pem"));
        assert_eq!(files.key_file, PathBuf::from("/k.pem"));
        let error = from(&[("TLS_CERT_FILE", "/c.pem")]).unwrap_err();
        assert_eq!(error.variable, "TLS_KEY_FILE");
        let error = from(&[("TLS_KEY_FILE", "/k.pem")]).unwrap_err();
        assert_eq!(error.variable, "TLS_CERT_FILE");
    }

    #[test]
    fn connections_never_exceed_the_open_file_limit() {
        let files = open_file_limit().expect("Linux reports an open-file limit");
        let mut config = Config::with_secret("s");
        config.max_connections = files * 2;
        assert_eq!(config.connection_limit(), files - RESERVED_FILE_DESCRIPTORS);
        config.max_connections = 10;
        assert_eq!(config.connection_limit(), 10);
    }

    #[test]
    fn settings_come_from_the_lookup_and_bad_values_name_their_variable() {
        let settings = HashMap::from([
            ("DATABASE_PATH", "/var/lib/artifact-events.db"),
            ("WORKERS", "3"),
            ("SSE_KEEPALIVE_SECS", "soon"),
        ]);
        let lookup = |variable: &str| settings.get(variable).map(|value| value.to_string());
        let error = Config::from_lookup(lookup).unwrap_err();
        assert_eq!(error.variable, "SSE_KEEPALIVE_SECS");

        let settings = HashMap::from([
            ("DATABASE_PATH", "/var/lib/artifact-events.db"),
            ("WORKERS", "3"),
        ]);
        let lookup = |variable: &str| settings.get(variable).map(|value| value.to_string());
        let config = Config::from_lookup(lookup).unwrap();
        let path = config.database_path.unwrap();
        assert_eq!(path, PathBuf::from("/var/lib/artifact-events.db"));
        assert_eq!(config.workers, 3);
    }

    #[test]
    fn the_redis_job_settings_are_read_and_a_zero_is_refused_by_name() {
        let config = from(&[
            ("JOB_CLAIM_TIMEOUT_SECS", "5"),
            ("JOB_RETENTION_SECS", "60"),
        ])
        .unwrap();
        assert_eq!(config.job_claim_timeout, Duration::from_secs(5));
        assert_eq!(config.job_retention, Duration::from_secs(60));
        let defaults = from(&[]).unwrap();
        assert_eq!(
            defaults.job_claim_timeout,
            Duration::from_secs(DEFAULT_JOB_CLAIM_TIMEOUT_SECS)
        );
        let error = from(&[("JOB_CLAIM_TIMEOUT_SECS", "0")]).unwrap_err();
        assert_eq!(error.variable, "JOB_CLAIM_TIMEOUT_SECS");
    }

    fn from(settings: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let settings: HashMap<String, String> = settings
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        Config::from_lookup(|variable| settings.get(variable).cloned())
    }

    #[test]
    fn the_openai_generator_needs_a_base_url_and_a_model_and_names_what_is_missing() {
        assert_eq!(from(&[]).unwrap().openai, None);
        assert_eq!(from(&[("GENERATOR", "offline")]).unwrap().openai, None);
        let error = from(&[("GENERATOR", "gpt")]).unwrap_err();
        assert_eq!(error.variable, "GENERATOR");

        let url = ("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1/");
        let model = ("OPENAI_MODEL", "llama3.2");
        let error = from(&[("GENERATOR", "openai"), model]).unwrap_err();
        assert_eq!(error.variable, "OPENAI_BASE_URL");
        let error = from(&[("GENERATOR", "openai"), url]).unwrap_err();
        assert_eq!(error.variable, "OPENAI_MODEL");
        assert!(error.to_string().contains("GENERATOR=openai"), "{error}");
        let error = from(&[
            ("GENERATOR", "openai"),
            model,
            ("OPENAI_BASE_URL", "127.0.0.1:11434"),
        ])
        .unwrap_err();
        assert_eq!(error.variable, "OPENAI_BASE_URL");
        let error = from(&[
            ("GENERATOR", "openai"),
            model,
            (
                "OPENAI_BASE_URL",
                "http://user:sk-secret@127.0.0.1:11434/v1",
            ),
        ])
        .unwrap_err();
        assert_eq!(error.variable, "OPENAI_BASE_URL");
        assert!(!error.to_string().contains("sk-secret"), "{error}");

        let settings = from(&[("GENERATOR", "openai"), url, model])
            .unwrap()
            .openai
            .unwrap();
        assert_eq!(settings.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(settings.model, "llama3.2");
        assert_eq!(settings.api_key, None);
        assert_eq!(
            settings.timeout,
            Duration::from_secs(DEFAULT_LLM_TIMEOUT_SECS)
        );
        assert_eq!(settings.max_tokens, DEFAULT_LLM_MAX_TOKENS);

        let error = from(&[("LLM_TIMEOUT_SECS", "0")]).unwrap_err();
        assert_eq!(error.variable, "LLM_TIMEOUT_SECS");
        let error = from(&[("LLM_MAX_TOKENS", "many")]).unwrap_err();
        assert_eq!(error.variable, "LLM_MAX_TOKENS");
    }

    #[test]
    fn webhook_settings_are_checked_and_the_secret_never_shows() {
        let defaults = from(&[]).unwrap().webhooks;
        assert_eq!(defaults.retry_schedule.len(), 5);
        assert!(defaults.server.is_none() && !defaults.allow_private);
        let settings = from(&[
            ("WEBHOOK_RETRY_SCHEDULE_SECS", "0.5, 2,60"),
            ("WEBHOOK_ALLOW_PRIVATE", "1"),
            ("WEBHOOK_URL", "http://backend.internal/hooks?token=abc"),
            ("WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ])
        .unwrap();
        let webhooks = &settings.webhooks;
        assert_eq!(
            webhooks.retry_schedule,
            [0.5, 2.0, 60.0].map(Duration::from_secs_f64)
        );
        assert!(webhooks.allow_private);
        let printed = format!("{settings:?}");
        assert!(!printed.contains("MfKQ9r8"), "{printed}");
        assert!(!printed.contains("token=abc"), "{printed}");

        for (variable, value) in [
            ("WEBHOOK_RETRY_SCHEDULE_SECS", "5,,30"),
            ("WEBHOOK_RETRY_SCHEDULE_SECS", "0"),
            ("WEBHOOK_RETRY_SCHEDULE_SECS", "soon"),
            ("WEBHOOK_TIMEOUT_SECS", "0"),
            ("WEBHOOK_QUEUE_CAPACITY", "0"),
            ("WEBHOOK_ALLOW_PRIVATE", "yes"),
        ] {
            assert_eq!(from(&[(variable, value)]).unwrap_err().variable, variable);
        }
        let url = ("WEBHOOK_URL", "http://backend.internal/hooks");
        let error = from(&[url]).unwrap_err();
        assert_eq!(error.variable, "WEBHOOK_SECRET");
        let error = from(&[url, ("WEBHOOK_SECRET", "hunter2hunter2hunter2")]).unwrap_err();
        assert_eq!(error.variable, "WEBHOOK_SECRET");
        assert!(!error.to_string().contains("hunter2"), "{error}");
        let secret = ("WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let error = from(&[secret]).unwrap_err();
        assert_eq!(error.variable, "WEBHOOK_URL");
        let error = from(&[("WEBHOOK_URL", "ftp://backend/"), secret]).unwrap_err();
        assert_eq!(error.variable, "WEBHOOK_URL");
    }

    #[test]
    fn the_api_key_never_shows_in_debug_output() {
        let config = from(&[
            ("GENERATOR", "openai"),
            ("OPENAI_BASE_URL", "https://api.openai.com/v1"),
            ("OPENAI_MODEL", "gpt-4o-mini"),
            ("OPENAI_API_KEY", "sk-very-secret-key"),
            ("LLM_TIMEOUT_SECS", "90"),
        ])
        .unwrap();
        let settings = config.openai.as_ref().unwrap();
        assert_eq!(
            settings.api_key.as_ref().unwrap().expose(),
            "sk-very-secret-key"
        );
        assert_eq!(settings.timeout, Duration::from_secs(90));
        let printed = format!("{config:?} {config:#?}");
        assert!(!printed.contains("sk-very-secret-key"), "{printed}");
        assert!(printed.contains("[redacted]"), "{printed}");
        assert!(printed.contains("gpt-4o-mini"), "{printed}");
    }
}
