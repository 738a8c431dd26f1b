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
        let metrics = Arc::new(Metrics::default());
        let backends = backends::open(&config, &bus, &metrics).await?;
        Ok(Self::assemble(config, bus, metrics, backends))
    }

    /// Builds the state around the given job store and generator, in memory otherwise. Job
    /// workers start with [`crate::server::run`].
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
            tls: None,
        };
        Self::assemble(config, bus, metrics, backends)
    }

    fn assemble(
        config: Config,
        bus: Arc<EventBus>,
        metrics: Arc<Metrics>,
        backends: Backends,
    ) -> Arc<Self> {
        let jobs = ArtifactWorker::new(
            backends.store,
            backends.generator,
            bus.clone(),
            config.worker_config(),
        );
        let auth = Authenticator::new(config.jwt_secret.expose().as_bytes(), config.jwt_algorithm);
        Arc::new(AppState {
            config,
            bus,
            streams: backends.streams,
            auth,
            jobs,
            metrics,
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
    }
}
