//! What every request handler can reach, built once at start-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::backends::{self, Backends};
use crate::config::Config;
use crate::delivery::StreamIndex;
use crate::events::{EventBus, EventType, Handler};
use crate::jobs::{ArtifactGenerator, ArtifactWorker, JobStore, MemoryJobStore, OfflineGenerator};
use crate::log;
use crate::metrics::Metrics;
use crate::server::auth::Authenticator;
use crate::server::listener::TlsAcceptor;
use crate::webhooks::{MemoryWebhookStore, Webhooks};

/// What every request handler can reach.
pub struct AppState {
    /// The server's settings.
    pub config: Config,
    /// The bus that events are published on.
    pub bus: Arc<EventBus>,
    /// The open SSE streams, by user.
    pub streams: Arc<StreamIndex>,
    /// Verifies bearer tokens.
    pub auth: Authenticator,
    /// Queues and runs artifact jobs.
    pub jobs: Arc<ArtifactWorker>,
    /// Counters for `GET /metrics`.
    pub metrics: Arc<Metrics>,
    /// Users' webhooks and `WEBHOOK_URL`: registration, and delivery off the publish path.
    pub webhooks: Arc<Webhooks>,
    /// The webhooks' bus subscription, removed on drop.
    webhook_subscription: Handler,
    /// Wraps every connection in TLS, when `TLS_CERT_FILE` is set.
    pub tls: Option<Arc<dyn TlsAcceptor>>,
    /// Set when shutdown begins: the server still finishes what it has, but is not ready.
    draining: AtomicBool,
    /// The index's bus subscription (none when a relay feeds it), removed on drop.
    bus_subscription: Option<Handler>,
    /// Keeps other servers off the database file while this state lives.
    _database_claim: Option<std::fs::File>,
}

impl AppState {
    /// Builds the state with an in-memory job store and the offline generator.
    pub fn new(config: Config, bus: Arc<EventBus>) -> Arc<Self> {
        let store = Arc::new(MemoryJobStore::new(config.job_limits()));
        Self::with_jobs(config, bus, store, Arc::new(OfflineGenerator))
    }

    /// Builds the state on the backends that `config` names (see [`backends::open`]).
    pub async fn open(config: Config, bus: Arc<EventBus>) -> Result<Arc<Self>, String> {
        if config.development_secret {
            log::warning!("JWT_SECRET is not set: development mode, tokens are signed with a random secret for this run only");
        }
        let auth = Authenticator::from_config(&config, backends::tls_connector()).await?;
        let metrics = Arc::new(Metrics::default());
        let backends = backends::open(&config, &bus, &metrics).await?;
        let webhooks = Webhooks::new(
            config.webhooks.clone(),
            backends.webhook_store.clone(),
            backends::tls_connector(),
        )
        .map_err(|error| error.to_string())?;
        Ok(Self::assemble(
            config, bus, metrics, backends, auth, webhooks,
        ))
    }

    /// Builds the state around the given job store and generator, in memory otherwise. Job
    /// workers start with [`crate::server::run`]. Tokens are checked against the HMAC secret
    /// and the claim rules only: key files and JWKS URLs are read by [`AppState::open`].
    pub fn with_jobs(
        config: Config,
        bus: Arc<EventBus>,
        store: Arc<dyn JobStore>,
        generator: Arc<dyn ArtifactGenerator>,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let streams = StreamIndex::new(config.stream_settings(), metrics.clone());
        let backends = Backends {
            store,
            generator,
            bus_subscription: Some(streams.attach(&bus)),
            streams,
            database_claim: None,
            webhook_store: Arc::new(MemoryWebhookStore::new()),
            tls: None,
        };
        let auth = Authenticator::for_config(&config, None, None);
        let webhooks = Webhooks::new(
            config.webhooks.clone(),
            backends.webhook_store.clone(),
            backends::tls_connector(),
        )
        .expect("the memory webhook store never fails");
        Self::assemble(config, bus, metrics, backends, auth, webhooks)
    }

    fn assemble(
        config: Config,
        bus: Arc<EventBus>,
        metrics: Arc<Metrics>,
        backends: Backends,
        auth: Authenticator,
        webhooks: Arc<Webhooks>,
    ) -> Arc<Self> {
        let webhook_subscription = webhooks.attach(&bus);
        let jobs = ArtifactWorker::new(
            backends.store,
            backends.generator,
            bus.clone(),
            config.worker_config(),
        );
        Arc::new(AppState {
            config,
            bus,
            streams: backends.streams,
            auth,
            jobs,
            metrics,
            webhooks,
            webhook_subscription,
            tls: backends.tls,
            draining: AtomicBool::new(false),
            bus_subscription: backends.bus_subscription,
            _database_claim: backends.database_claim,
        })
    }
}

impl AppState {
    /// Marks the server as shutting down, for `/readyz`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Why the server cannot take work now, if it cannot: shutting down, Redis in an outage,
    /// or the job store failing.
    pub fn unready_reason(&self) -> Option<String> {
        if self.draining.load(Ordering::Relaxed) {
            return Some("the server is shutting down".to_owned());
        }
        if self.metrics.redis_outage() {
            return Some("Redis is unreachable".to_owned());
        }
        let error = self.jobs.store().count_by_status().err()?;
        log::error!("readiness: the job store is failing: {error}");
        Some("the job store is failing".to_owned())
    }
}

impl Drop for AppState {
    fn drop(&mut self) {
        if let Some(handler) = &self.bus_subscription {
            self.bus.unsubscribe(&EventType::ANY, handler);
        }
        self.bus
            .unsubscribe(&EventType::ANY, &self.webhook_subscription);
    }
}
