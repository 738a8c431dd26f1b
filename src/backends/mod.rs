//! The backends behind the core's seams, chosen once, at start-up, in [`open`]: the job store
//! (`JobStore`), where the replay history is also kept (`HistorySink`), how events cross
//! processes (`Relay`), the generator (`ArtifactGenerator`), TLS for the outbound HTTP
//! client (`TlsConnector`) and for the server's HTTPS (`TlsAcceptor`), and where webhooks and
//! their outbox are kept (`WebhookStore`).
//!
//! This module and the backend modules below it are the only places that name a cargo
//! feature; [`check`] is the one place that refuses a setting the build cannot serve.

#[cfg(feature = "redis")]
mod redis_jobs;
#[cfg(feature = "redis")]
mod redis_relay;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "tls")]
pub mod tls;

#[cfg(feature = "redis")]
pub use redis_jobs::RedisJobStore;
#[cfg(feature = "redis")]
pub use redis_relay::{DurableOutbox, RedisRelay};

use std::fs::File;
use std::sync::Arc;

use crate::config::Config;
use crate::delivery::StreamIndex;
use crate::events::{EventBus, Handler};
use crate::http_client::TlsConnector;
use crate::jobs::{
    ArtifactGenerator, DelayedGenerator, JobStore, MemoryJobStore, OfflineGenerator,
    OpenAiGenerator,
};
use crate::metrics::Metrics;
use crate::server::TlsAcceptor;
use crate::webhooks::{MemoryWebhookStore, WebhookStore};

/// What the server runs on, as the configuration chose it.
pub struct Backends {
    /// Where jobs are kept and claimed.
    pub store: Arc<dyn JobStore>,
    /// What the workers generate artifacts with.
    pub generator: Arc<dyn ArtifactGenerator>,
    /// The stream index, with its replay history loaded and its history sink, if any.
    pub streams: Arc<StreamIndex>,
    /// The index's subscription to the bus, to remove when the server goes; `None` when a
    /// relay feeds the index instead.
    pub bus_subscription: Option<Handler>,
    /// Keeps other processes off the database file for as long as it is held.
    pub database_claim: Option<File>,
    /// Where webhook subscriptions, pending deliveries and recent attempts are kept.
    pub webhook_store: Arc<dyn WebhookStore>,
    /// The server's HTTPS, when `TLS_CERT_FILE` and `TLS_KEY_FILE` name a certificate.
    pub tls: Option<Arc<dyn TlsAcceptor>>,
}

/// Refuses a setting that this build was compiled without the feature for: refusing beats
/// silently keeping in memory what the operator expects to be durable or shared.
pub fn check(config: &Config) -> Result<(), String> {
    if config.database_path.is_some() && !cfg!(feature = "sqlite") {
        return Err("DATABASE_PATH is set, but this build has no SQLite support: rebuild with \
             `cargo build --release --features sqlite`, or unset DATABASE_PATH to keep jobs in memory"
            .to_owned());
    }
    if config.redis.is_some() && !cfg!(feature = "redis") {
        return Err(
            "REDIS_URL is set, but this build has no Redis support: rebuild with \
             `cargo build --release --features redis`, or unset REDIS_URL"
                .to_owned(),
        );
    }
    let https_model = config.openai.as_ref().is_some_and(|settings| {
        settings
            .base_url
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    });
    let https_webhook = config.webhooks.server.as_ref().is_some_and(|server| {
        server
            .url
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    });
    if https_webhook && !cfg!(feature = "tls") {
        return Err(
            "WEBHOOK_URL is https://, but this build has no TLS support: rebuild with \
             `cargo build --release --features tls`, or use an http:// URL"
                .to_owned(),
        );
    }
    if config.tls.is_some() && !cfg!(feature = "tls") {
        return Err(
            "TLS_CERT_FILE is set, but this build has no TLS support: rebuild with \
             `cargo build --release --features tls`, or unset TLS_CERT_FILE and TLS_KEY_FILE"
                .to_owned(),
        );
    }
    if https_model && !cfg!(feature = "tls") {
        return Err(
            "OPENAI_BASE_URL is https://, but this build has no TLS support: rebuild with \
             `cargo build --release --features tls`, or use a model server's http:// URL"
                .to_owned(),
        );
    }
    Ok(())
}

/// The TLS the outbound HTTP client speaks for `https://` URLs, if the build has it.
pub fn tls_connector() -> Option<Arc<dyn TlsConnector>> {
    #[cfg(feature = "tls")]
    return Some(Arc::new(tls::RustlsConnector::with_webpki_roots()));
    #[cfg(not(feature = "tls"))]
    None
}

/// The server's HTTPS, from the certificate and key files `config` names, if it names any.
pub fn tls_acceptor(config: &Config) -> Result<Option<Arc<dyn TlsAcceptor>>, String> {
    let Some(files) = &config.tls else {
        return Ok(None);
    };
    #[cfg(feature = "tls")]
    return Ok(Some(Arc::new(tls::RustlsAcceptor::open(files.clone())?)));
    #[cfg(not(feature = "tls"))]
    Err(format!(
        "cannot serve HTTPS with {}: this build has no TLS support",
        files.cert_file.display()
    ))
}

/// Opens the backends that `config` names: jobs and history in the SQLite file at
/// `DATABASE_PATH` (else in memory), or, with `REDIS_URL`, jobs in Redis and events across
/// processes through its stream (which is then the history); and the generator `GENERATOR` names (the offline one unless it
/// says `openai`), slowed by `GENERATOR_DELAY_MS`.
pub async fn open(
    config: &Config,
    bus: &Arc<EventBus>,
    metrics: &Arc<Metrics>,
) -> Result<Backends, String> {
    check(config)?;
    let mut generator: Arc<dyn ArtifactGenerator> = match &config.openai {
        Some(settings) => {
            let openai =
                OpenAiGenerator::new(settings.clone(), tls_connector(), config.job_timeout);
            crate::log::info!(
                "artifacts are generated by model {} at {}",
                settings.model,
                openai.server()
            );
            if settings.timeout >= config.job_timeout {
                crate::log::warning!(
                    "LLM_TIMEOUT_SECS ({} s) is not below JOB_TIMEOUT_SECS ({} s): a slow answer ends the whole attempt, with no time left to repair it",
                    settings.timeout.as_secs(),
                    config.job_timeout.as_secs()
                );
            }
            Arc::new(openai)
        }
        None => Arc::new(OfflineGenerator),
    };
    if !config.generator_delay.is_zero() {
        generator = Arc::new(DelayedGenerator::new(generator, config.generator_delay));
    }
    let backends = Backends {
        store: Arc::new(MemoryJobStore::new(config.job_limits())),
        generator,
        streams: StreamIndex::new(config.stream_settings(), metrics.clone()),
        bus_subscription: None,
        database_claim: None,
        webhook_store: Arc::new(MemoryWebhookStore::new()),
        tls: tls_acceptor(config)?,
    };
    #[cfg(feature = "sqlite")]
    let backends = match &config.database_path {
        Some(path) => with_sqlite(backends, path, config, metrics)?,
        None => backends,
    };
    #[cfg(feature = "redis")]
    if let Some(settings) = &config.redis {
        let store = RedisJobStore::open(
            settings,
            config.job_limits(),
            config.job_claim_timeout,
            config.job_retention,
        )?;
        crate::log::info!(
            "jobs are kept in Redis under {:?}, shared by every process on it",
            format!("{}:jobs", settings.stream_key)
        );
        let streams = RedisRelay::start(
            settings.clone(),
            bus.clone(),
            metrics.clone(),
            config.stream_settings(),
            durable_outbox(config)?,
        )
        .await?;
        return Ok(Backends {
            store: Arc::new(store),
            streams,
            ..backends
        });
    }
    Ok(Backends {
        bus_subscription: Some(backends.streams.attach(bus)),
        ..backends
    })
}

/// Where events published during a Redis outage are kept: a table in the SQLite file, if the
/// server has one (already claimed by [`with_sqlite`]); without it, such publishes are refused.
#[cfg(all(feature = "redis", feature = "sqlite"))]
fn durable_outbox(config: &Config) -> Result<Option<Arc<dyn DurableOutbox>>, String> {
    match &config.database_path {
        Some(path) => {
            let outbox = sqlite::SqliteOutbox::open(path).map_err(|error| error.to_string())?;
            Ok(Some(Arc::new(outbox)))
        }
        None => Ok(None),
    }
}

/// Without SQLite there is no durable outbox: publishes during a Redis outage are refused.
#[cfg(all(feature = "redis", not(feature = "sqlite")))]
fn durable_outbox(_config: &Config) -> Result<Option<Arc<dyn DurableOutbox>>, String> {
    Ok(None)
}

/// `backends` with the SQLite file at `path` in place of the memory job store and, unless
/// Redis keeps the history, the memory-only history.
#[cfg(feature = "sqlite")]
fn with_sqlite(
    backends: Backends,
    path: &std::path::Path,
    config: &Config,
    metrics: &Arc<Metrics>,
) -> Result<Backends, String> {
    // With Redis, the shared stream is the history every process replays from.
    let history_limits = config.redis.is_none().then_some(config.history);
    let opened = sqlite::open_backends(path, config.job_limits(), history_limits)
        .map_err(|error| error.to_string())?;
    let streams = match opened.history {
        Some((history, writer)) => {
            crate::log::info!("jobs and event history are kept in {}", path.display());
            let settings = config.stream_settings();
            StreamIndex::with_history(settings, metrics.clone(), history, Some(Box::new(writer)))
        }
        None => {
            // With Redis, jobs live there too: the file keeps the durable outbox of events
            // acknowledged during an outage, and the webhooks.
            crate::log::info!(
                "the durable outbox and webhooks are kept in {}",
                path.display()
            );
            backends.streams
        }
    };
    Ok(Backends {
        store: Arc::new(opened.store),
        streams,
        database_claim: Some(opened.claim),
        webhook_store: Arc::new(opened.webhooks),
        ..backends
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_and_sqlite_together_are_accepted_with_both_features() {
        let mut config = Config::with_secret("s");
        config.database_path = Some("/var/lib/artifact-events.db".into());
        config.redis = Some(crate::config::RedisSettings {
            url: "redis://127.0.0.1:6379".to_owned(),
            stream_key: "s".to_owned(),
            max_len: 10,
            outbox_capacity: 10,
        });
        assert_eq!(
            check(&config).is_ok(),
            cfg!(all(feature = "sqlite", feature = "redis"))
        );
    }

    #[test]
    fn a_setting_the_build_lacks_the_feature_for_is_refused_never_ignored() {
        let mut config = Config::with_secret("s");
        assert_eq!(check(&config), Ok(()));
        config.database_path = Some("/var/lib/artifact-events.db".into());
        let refused = check(&config).err();
        assert_eq!(refused.is_none(), cfg!(feature = "sqlite"));
        if let Some(error) = refused {
            assert!(error.contains("--features sqlite"), "{error}");
        }
        config.database_path = None;
        config.redis = Some(crate::config::RedisSettings {
            url: "redis://127.0.0.1:6379".to_owned(),
            stream_key: "s".to_owned(),
            max_len: 10,
            outbox_capacity: 10,
        });
        let refused = check(&config).err();
        assert_eq!(refused.is_none(), cfg!(feature = "redis"));
        if let Some(error) = refused {
            assert!(error.contains("--features redis"), "{error}");
        }
        config.redis = None;
        config.tls = Some(crate::config::TlsFiles {
            cert_file: "/etc/ssl/cert.pem".into(),
            key_file: "/etc/ssl/key.pem".into(),
        });
        let refused = check(&config).err();
        assert_eq!(refused.is_none(), cfg!(feature = "tls"));
        if let Some(error) = refused {
            assert!(error.contains("--features tls"), "{error}");
        }
        config.tls = None;
        let mut openai = crate::jobs::generator::OpenAiSettings {
            base_url: "http://127.0.0.1:11434/v1".to_owned(),
            api_key: None,
            model: "llama3.2".to_owned(),
            timeout: std::time::Duration::from_secs(30),
            max_tokens: 100,
        };
        config.openai = Some(openai.clone());
        assert_eq!(check(&config), Ok(()));
        openai.base_url = "HTTPS://api.openai.com/v1".to_owned();
        config.openai = Some(openai);
        let refused = check(&config).err();
        assert_eq!(refused.is_none(), cfg!(feature = "tls"));
        assert_eq!(tls_connector().is_some(), cfg!(feature = "tls"));
        if let Some(error) = refused {
            assert!(error.contains("--features tls"), "{error}");
        }
        config.openai = None;
        config.webhooks.server = Some(crate::webhooks::ServerWebhook {
            url: "https://backend.example.com/hooks".to_owned(),
            key: crate::webhooks::SigningKey::generate(),
        });
        let refused = check(&config).err();
        assert_eq!(refused.is_none(), cfg!(feature = "tls"));
        if let Some(error) = refused {
            assert!(error.starts_with("WEBHOOK_URL is https://"), "{error}");
        }
    }
}
