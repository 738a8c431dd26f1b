//! The accept loop, in named steps as in mini-redis: [`run`] serves until shutdown and then
//! winds down; `Listener` accepts connections within the connection limit; `Handler` serves
//! one connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::request::ConnectionInfo;
use super::router::{handle, over_capacity};
use super::state::AppState;
use crate::config::MAX_HEADER_BYTES;
use crate::delivery::StreamIndex;
use crate::log;
use crate::sse::encoder::KEEPALIVE;

/// How long to wait after a failed accept (usually EMFILE) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Runs the job workers and serves `listener` until `shutdown` completes; then ends every
/// stream and waits (at most `config.shutdown_grace`) for connections and running jobs.
pub async fn run(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let workers = state.jobs.start();
    let keepalives = tokio::spawn(send_keepalives(
        Arc::downgrade(&state.streams),
        state.config.keepalive,
    ));
    match listener.local_addr() {
        Ok(addr) => log::info!("listening on http://{addr}"),
        Err(error) => log::warning!("listening on an unknown address: {error}"),
    }
    let mut server = Listener::new(listener, state.clone());
    tokio::select! {
        () = server.run() => {}
        () = shutdown => {}
    }
    state.start_draining();
    // Dropping the listener stops accepting; the connections go on until wound down.
    let Listener { graceful, .. } = server;
    wind_down(&state, workers, keepalives, graceful).await;
}

/// Accepts connections and hands each to a [`Handler`] task.
struct Listener {
    listener: TcpListener,
    state: Arc<AppState>,
    http: http1::Builder,
    /// One permit per open connection (`MAX_CONNECTIONS`); a connection that finds none is
    /// answered 503 and closed rather than left waiting.
    connection_slots: Arc<Semaphore>,
    /// Tracks every connection, so shutdown can wait for them.
    graceful: GracefulShutdown,
}

impl Listener {
    fn new(listener: TcpListener, state: Arc<AppState>) -> Self {
        let mut http = http1::Builder::new();
        // The timer is what makes header_read_timeout take effect at all.
        http.timer(TokioTimer::new())
            .header_read_timeout(state.config.header_read_timeout)
            .max_buf_size(MAX_HEADER_BYTES);
        let connection_limit = state.config.connection_limit();
        if connection_limit < state.config.max_connections {
            log::warning!(
                "MAX_CONNECTIONS lowered from {} to {connection_limit} to fit the open-file limit",
                state.config.max_connections
            );
        }
        Listener {
            listener,
            state,
            http,
            connection_slots: Arc::new(Semaphore::new(connection_limit)),
            graceful: GracefulShutdown::new(),
        }
    }

    /// Accepts connections until the task is dropped.
    async fn run(&mut self) {
        loop {
            let (socket, peer) = self.accept().await;
            let handler = Handler {
                state: self.state.clone(),
                connection: ConnectionInfo {
                    peer,
                    disconnect: Arc::new(Notify::new()),
                },
                slot: self.connection_slots.clone().try_acquire_owned().ok(),
            };
            handler.spawn(socket, &self.http, &self.graceful);
        }
    }

    /// The next connection; a failed accept (usually EMFILE) is logged and retried after a
    /// pause instead of spinning until descriptors free up.
    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => return accepted,
                Err(error) => {
                    log::warning!("accept failed: {error}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    }
}

/// Serves one connection; holds its connection slot for as long as it is open.
struct Handler {
    state: Arc<AppState>,
    connection: ConnectionInfo,
    /// `None` when the server is at its connection limit: every request is then answered 503.
    slot: Option<OwnedSemaphorePermit>,
}

impl Handler {
    fn spawn(self, socket: TcpStream, http: &http1::Builder, graceful: &GracefulShutdown) {
        let Handler {
            state,
            connection,
            slot,
        } = self;
        let (peer, disconnect) = (connection.peer, connection.disconnect.clone());
        let at_capacity = slot.is_none();
        let service = service_fn(move |mut request| {
            let state = state.clone();
            request.extensions_mut().insert(connection.clone());
            // Boxed here because hyper keeps its own box, sized for this future, for the
            // connection's whole life; boxing makes that one pointer-sized and frees the
            // request's state as soon as a stream's response head is ready.
            Box::pin(async move {
                Ok::<_, Infallible>(match at_capacity {
                    true => over_capacity(&state, &request),
                    false => handle(state, request).await,
                })
            })
        });
        // Boxed because the task's state machine would otherwise hold the connection twice (as
        // the captured variable and inside `select!`).
        let serving =
            Box::pin(graceful.watch(http.serve_connection(TokioIo::new(socket), service)));
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                result = serving => if let Err(error) = result {
                    log::debug!("connection from {peer} ended with an error: {error}");
                },
                () = disconnect.notified() => log::debug!("closed the connection of {peer}"),
            }
        });
    }
}

/// Stops the workers and waits for their running jobs (so their events still go out), then
/// ends every stream (an open SSE response would keep graceful shutdown pending forever) and
/// waits for the connections; both waits share one deadline, `SHUTDOWN_GRACE_SECS`.
async fn wind_down(
    state: &AppState,
    workers: Vec<JoinHandle<()>>,
    keepalives: JoinHandle<()>,
    graceful: GracefulShutdown,
) {
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
            "{} queued jobs were not started: {}{}",
            queued.len(),
            queued[..queued.len().min(10)].join(", "),
            if queued.len() > 10 { ", …" } else { "" }
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

/// Every `period`, queues a keepalive on every stream, until the index is gone.
async fn send_keepalives(streams: Weak<StreamIndex>, period: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // After a stall, one keepalive is enough; a burst of them would be noise.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match streams.upgrade() {
            Some(streams) => streams.send_to_all(&Bytes::from_static(KEEPALIVE)),
            None => return,
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM, the two ways a server is asked to stop. The handlers are
/// registered when this is called, not when the future is first polled, so a signal sent the
/// moment the server says it is listening is not missed (and does not kill the process).
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let signals = [SignalKind::terminate(), SignalKind::interrupt()].map(|kind| {
        signal(kind)
            .inspect_err(|error| log::warning!("cannot listen for {kind:?}: {error}"))
            .ok()
    });
    async move {
        let [terminate, interrupt] = signals;
        let received = |signal: Option<tokio::signal::unix::Signal>| async move {
            match signal {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = received(terminate) => {},
            () = received(interrupt) => {},
        }
    }
}
