//! The HTTP server: accept loop, per-connection limits and graceful shutdown.

mod auth;
mod error;
mod router;
pub(crate) mod routes;

pub use auth::{Authenticator, Claims, Identity, PUBLISHER_ROLE};
pub use error::ApiError;
pub use router::{handle, RequestBody};

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};

use crate::config::{Config, MAX_HEADER_BYTES};
use crate::events::{EventBus, Handler};
use crate::jobs::{
    ArtifactGenerator, ArtifactWorker, DelayedGenerator, JobStore, MemoryJobStore, OfflineGenerator,
};
use crate::log;
use crate::metrics::Metrics;
use crate::sse::{SseBody, StreamIndex};

/// A response body: a whole JSON document, or an open event stream.
pub type ResponseBody = Either<Full<Bytes>, SseBody>;

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
    /// The index's bus subscription, removed when the state is dropped.
    stream_handler: Handler,
    /// Keeps other servers off the database file while this state lives.
    _database_claim: Option<std::fs::File>,
}

impl AppState {
    /// Builds the state with an in-memory job store and the offline generator.
    pub fn new(config: Config, bus: Arc<EventBus>) -> Arc<Self> {
        let store = Arc::new(MemoryJobStore::new(config.max_jobs));
        Self::with_jobs(config, bus, store, Arc::new(OfflineGenerator))
    }

    /// Builds the state as `config` says: jobs and event history in the SQLite file at
    /// `database_path` if set (else in memory), and the offline generator, slowed by
    /// `generator_delay` if set.
    pub fn open(config: Config, bus: Arc<EventBus>) -> Result<Arc<Self>, String> {
        let mut generator: Arc<dyn ArtifactGenerator> = Arc::new(OfflineGenerator);
        if !config.generator_delay.is_zero() {
            generator = Arc::new(DelayedGenerator::new(generator, config.generator_delay));
        }
        let Some(path) = config.database_path.clone() else {
            let store = Arc::new(MemoryJobStore::new(config.max_jobs));
            return Ok(Self::with_jobs(config, bus, store, generator));
        };
        #[cfg(feature = "sqlite")]
        {
            let claim = crate::database::claim(&path).map_err(|error| error.to_string())?;
            let store = crate::jobs::SqliteJobStore::open(&path, config.max_jobs)
                .map_err(|error| error.to_string())?;
            let metrics = Arc::new(Metrics::default());
            // With Redis, the shared stream is the history every process replays from.
            let streams = match config.redis {
                Some(_) => {
                    log::info!("jobs are kept in {}", path.display());
                    StreamIndex::new(config.stream_settings(), metrics.clone())
                }
                None => {
                    log::info!("jobs and event history are kept in {}", path.display());
                    StreamIndex::persisted(config.stream_settings(), metrics.clone(), &path)
                        .map_err(|error| error.to_string())?
                }
            };
            Ok(Self::assemble(
                config,
                bus,
                Arc::new(store),
                generator,
                streams,
                metrics,
                Some(claim),
            ))
        }
        #[cfg(not(feature = "sqlite"))]
        Err(format!(
            "DATABASE_PATH {}: {}",
            path.display(),
            crate::config::WITHOUT_SQLITE
        ))
    }

    /// Builds the state around the given job store and generator, and subscribes its stream
    /// index to `bus`. Job workers start with [`run`].
    pub fn with_jobs(
        config: Config,
        bus: Arc<EventBus>,
        store: Arc<dyn JobStore>,
        generator: Arc<dyn ArtifactGenerator>,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::default());
        let streams = StreamIndex::new(config.stream_settings(), metrics.clone());
        Self::assemble(config, bus, store, generator, streams, metrics, None)
    }

    fn assemble(
        config: Config,
        bus: Arc<EventBus>,
        store: Arc<dyn JobStore>,
        generator: Arc<dyn ArtifactGenerator>,
        streams: Arc<StreamIndex>,
        metrics: Arc<Metrics>,
        database_claim: Option<std::fs::File>,
    ) -> Arc<Self> {
        let jobs = ArtifactWorker::new(store, generator, bus.clone(), config.worker_config());
        let stream_handler = streams.attach(&bus);
        let auth = Authenticator::new(config.jwt_secret.as_bytes(), config.jwt_algorithm);
        Arc::new(AppState {
            config,
            bus,
            streams,
            auth,
            jobs,
            metrics,
            stream_handler,
            _database_claim: database_claim,
        })
    }
}

impl AppState {
    /// Makes events cross processes through the Redis in `config.redis`, if any: the stream
    /// index then takes every event, and its id, from the Redis stream instead of the bus.
    #[cfg(feature = "redis")]
    pub async fn connect_redis(&self) -> Result<(), String> {
        let Some(settings) = self.config.redis.clone() else {
            return Ok(());
        };
        let any = crate::events::EventType::ANY;
        self.bus.unsubscribe(&any, &self.stream_handler);
        let history_events = self.config.history.total_events;
        let started = crate::events::RedisRelay::start(
            settings,
            self.bus.clone(),
            self.streams.clone(),
            self.metrics.clone(),
            history_events,
        )
        .await;
        started.map(drop).inspect_err(|_| {
            self.bus.subscribe(any, self.stream_handler.clone());
        })
    }
}

impl Drop for AppState {
    fn drop(&mut self) {
        self.bus
            .unsubscribe(&crate::events::EventType::ANY, &self.stream_handler);
    }
}

/// Runs the job workers and serves `listener` until `shutdown` completes; then ends every
/// stream and waits (at most `config.shutdown_grace`) for connections and running jobs.
pub async fn run(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let mut http = http1::Builder::new();
    // The timer is what makes header_read_timeout take effect at all.
    http.timer(TokioTimer::new())
        .header_read_timeout(state.config.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES);
    let graceful = GracefulShutdown::new();
    let workers = state.jobs.start();
    let keepalives = tokio::spawn(send_keepalives(Arc::downgrade(&state.streams)));
    let connection_limit = state.config.connection_limit();
    if connection_limit < state.config.max_connections {
        log::warning!(
            "MAX_CONNECTIONS lowered from {} to {connection_limit} to fit the open-file limit",
            state.config.max_connections
        );
    }
    let connection_slots = Arc::new(Semaphore::new(connection_limit));
    tokio::pin!(shutdown);
    match listener.local_addr() {
        Ok(addr) => log::info!("listening on http://{addr}"),
        Err(error) => log::warning!("listening on an unknown address: {error}"),
    }
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning until descriptors free up.
                    log::warning!("accept failed: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = connection_slots.clone().try_acquire_owned().ok();
        let disconnect = Arc::new(Notify::new());
        let service = {
            let state = state.clone();
            let disconnect = disconnect.clone();
            let at_capacity = slot.is_none();
            service_fn(move |request| {
                let state = state.clone();
                let disconnect = disconnect.clone();
                // Boxed here because hyper keeps its own box, sized for this future, for the
                // connection's whole life; boxing makes that one pointer-sized and frees the
                // request's state as soon as a stream's response head is ready.
                Box::pin(async move {
                    Ok::<_, Infallible>(match at_capacity {
                        true => router::over_capacity(&state, &request),
                        false => handle(state, disconnect, request).await,
                    })
                })
            })
        };
        // Boxed because the task's state machine would otherwise hold the connection twice (as
        // the captured variable and inside `select!`): 1,792 bytes become 176 plus the 816 boxed.
        let connection =
            Box::pin(graceful.watch(http.serve_connection(TokioIo::new(stream), service)));
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                result = connection => if let Err(error) = result {
                    log::debug!("connection from {peer} ended with an error: {error}");
                },
                () = disconnect.notified() => log::debug!("closed the connection of {peer}"),
            }
        });
    }
    drop(listener);
    // Jobs first, streams after: a job that finishes within the grace period still reaches
    // the clients waiting for it.
    state.jobs.stop();
    let grace = state.config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    let jobs_done = async {
        for worker in workers {
            let _ = worker.await;
        }
    };
    if tokio::time::timeout_at(deadline, jobs_done).await.is_err() {
        log::warning!("jobs still running after {grace:?}; ending them with the process");
    }
    match state.jobs.store().queued_ids() {
        Ok(queued) if queued.is_empty() => {}
        Ok(queued) => log::warning!(
            "{} queued jobs were not started: {}",
            queued.len(),
            queued.join(", ")
        ),
        Err(error) => log::error!("cannot list queued jobs: {error}"),
    }
    log::info!(
        "shutting down: ending {} open streams",
        state.streams.stream_count()
    );
    keepalives.abort();
    state.streams.close_all();
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        log::warning!("connections still open after {grace:?}; exiting anyway");
    }
    state.streams.finish_persisting();
    log::info!("stopped");
}

/// Every keepalive interval, queues a keepalive on every stream, until the index is gone.
async fn send_keepalives(streams: std::sync::Weak<StreamIndex>) {
    let Some(period) = streams
        .upgrade()
        .map(|streams| streams.keepalive_interval())
    else {
        return;
    };
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // After a stall, one keepalive is enough; a burst of them would be noise.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match streams.upgrade() {
            Some(streams) => streams.send_keepalives(),
            None => return,
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM, the two ways a server is asked to stop.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                log::warning!("cannot listen for SIGTERM: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = terminate => {},
    }
}

/// A JSON response with `status` and `body`.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
