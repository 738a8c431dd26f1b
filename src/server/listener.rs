//! The accept loop, in named steps as in mini-redis: [`run`] serves until shutdown and then
//! winds down; `Listener` accepts connections within the connection limit; `Handler` serves
//! one connection, over TLS when the server has a [`TlsAcceptor`], as HTTP/1.1 or HTTP/2.
//!
//! The protocol is chosen before hyper reads anything: by ALPN over TLS, by the first bytes in
//! cleartext (h2c with prior knowledge), within the header read timeout; then hyper's HTTP/1.1
//! or HTTP/2 builder serves the connection. (hyper-util's auto builder does both, but its
//! detection read has no timeout, and its connection type holds an HTTP/2 connection's size
//! inline, about 1 KiB more per HTTP/1.1 connection.)

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::interrupt::{Ended, Interruptible, Shutdown, ShutdownWatch};
use super::request::ConnectionInfo;
use super::response::ResponseBody;
use super::router::{handle, over_capacity};
use super::state::AppState;
use crate::config::MAX_HEADER_BYTES;
use crate::delivery::StreamIndex;
use crate::events::BoxFuture;
use crate::http_client::Connection;
use crate::log;
use crate::sse::encoder::KEEPALIVE;

/// How long to wait after a failed accept (usually EMFILE) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// `SETTINGS_MAX_CONCURRENT_STREAMS`: the open streams one HTTP/2 connection may have. A browser
/// carries all of an origin's tabs on one connection, so this must stay above
/// `MAX_STREAMS_PER_USER`'s default (32); 100 is the smallest value RFC 9113 recommends. It
/// also caps how many of the `MAX_CONNECTIONS` slots one connection can take.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;

/// Bytes hyper may buffer per HTTP/2 stream beyond the client's flow-control window: one
/// coalesced chunk of queued frames. More would only move a slow stream's backlog from its
/// bounded queue, where it is counted, into hyper, where it is not.
const MAX_SEND_BUFFER_PER_STREAM: usize = 64 * 1024;

/// HTTP/2's client connection preface (RFC 9113, 3.4). Its first three bytes, `PRI`, tell it
/// from every HTTP/1.1 method (`POST`, `PUT`, `PATCH`, `PROPFIND` …).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The application protocol of a connection, as ALPN or its first bytes chose it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 (also what a TLS client that offers no ALPN gets).
    Http1,
    /// HTTP/2.
    Http2,
}

/// Wraps accepted TCP connections in TLS. The seam keeps the listener free of any TLS library:
/// the `tls` cargo feature implements it (`backends::tls`).
pub trait TlsAcceptor: Send + Sync {
    /// Runs the server side of the handshake over `stream`; returns the encrypted connection
    /// and the protocol the client chose by ALPN.
    fn accept(
        &self,
        stream: TcpStream,
    ) -> BoxFuture<'static, io::Result<(Box<dyn Connection>, Protocol)>>;

    /// Reads the certificate and key again: later handshakes use them, open connections keep
    /// theirs. On failure the previous certificate stays.
    fn reload(&self) -> Result<(), String>;
}

/// Runs the job workers, resumes pending webhook deliveries, and serves `listener` until
/// `shutdown` completes; then ends every stream and waits (at most `config.shutdown_grace`)
/// for connections and running jobs.
pub async fn run(listener: TcpListener, state: Arc<AppState>, shutdown: impl Future<Output = ()>) {
    let workers = state.jobs.start();
    state.webhooks.resume();
    let keepalives = tokio::spawn(send_keepalives(
        Arc::downgrade(&state.streams),
        state.config.keepalive,
    ));
    // Registered before the address is logged, so a SIGHUP sent once it is logged is seen.
    let reloads = state.tls.clone().map(reload_on_hangup);
    let scheme = if state.tls.is_some() { "https" } else { "http" };
    match listener.local_addr() {
        Ok(addr) => log::info!("listening on {scheme}://{addr}"),
        Err(error) => log::warning!("listening on an unknown address: {error}"),
    }
    let mut server = Listener::new(listener, state.clone());
    tokio::select! {
        () = server.run() => {}
        () = shutdown => {}
    }
    state.start_draining();
    if let Some(reloads) = reloads {
        reloads.abort();
    }
    // Dropping the listener stops accepting; the connections go on until wound down.
    let Listener { shutdown, .. } = server;
    wind_down(&state, workers, keepalives, shutdown).await;
}

/// Accepts connections and hands each to a [`Handler`] task.
struct Listener {
    listener: TcpListener,
    state: Arc<AppState>,
    http: Arc<Builders>,
    /// One permit per open connection, and one more per open HTTP/2 stream (`MAX_CONNECTIONS`):
    /// a connection or stream that finds none is answered 503 rather than left waiting.
    slots: Arc<Semaphore>,
    /// Tracks every connection, so shutdown can wait for them.
    shutdown: Shutdown,
}

/// The builder for each protocol, configured once.
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(state: &AppState) -> Builders {
        let config = &state.config;
        let mut http1 = http1::Builder::new();
        // The timer is what makes header_read_timeout take effect at all.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .max_buf_size(MAX_HEADER_BYTES);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        // Pings after a keepalive interval without a frame from the client, and a connection
        // whose client answers none within the header read timeout is closed: that is how a
        // client that stopped reading altogether loses its connection (a slow stream alone
        // only ends itself).
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_send_buf_size(MAX_SEND_BUFFER_PER_STREAM)
            .keep_alive_interval(config.keepalive)
            .keep_alive_timeout(config.header_read_timeout);
        Builders { http1, http2 }
    }
}

impl Listener {
    fn new(listener: TcpListener, state: Arc<AppState>) -> Self {
        let connection_limit = state.config.connection_limit();
        if connection_limit < state.config.max_connections {
            log::warning!(
                "MAX_CONNECTIONS lowered from {} to {connection_limit} to fit the open-file limit",
                state.config.max_connections
            );
        }
        Listener {
            listener,
            http: Arc::new(Builders::new(&state)),
            state,
            slots: Arc::new(Semaphore::new(connection_limit)),
            shutdown: Shutdown::new(),
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
                slot: self.slots.clone().try_acquire_owned().ok(),
                slots: self.slots.clone(),
            };
            let (http, shutdown) = (self.http.clone(), self.shutdown.watch());
            tokio::spawn(handler.start(socket, http, shutdown));
        }
    }

    /// The next connection; a failed accept (usually EMFILE) is logged and retried after a
    /// pause instead of spinning until descriptors free up.
    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((socket, peer)) => {
                    // Each event is one small write; Nagle's algorithm would hold it back until
                    // the previous one is acknowledged, which is latency and nothing gained.
                    if let Err(error) = socket.set_nodelay(true) {
                        log::debug!("TCP_NODELAY on the connection from {peer}: {error}");
                    }
                    return (socket, peer);
                }
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
    /// Where each HTTP/2 stream takes its own slot.
    slots: Arc<Semaphore>,
}

impl Handler {
    /// Finds the protocol (the TLS handshake's ALPN, or the first bytes), within the header
    /// read timeout, then serves the connection in a task of its own: the handshake's and the
    /// timer's state are gone by then, rather than kept for the connection's whole life.
    async fn start(self, socket: TcpStream, http: Arc<Builders>, shutdown: ShutdownWatch) {
        let peer = self.connection.peer;
        let patience = self.state.config.header_read_timeout;
        match self.state.tls.clone() {
            Some(tls) => match tokio::time::timeout(patience, tls.accept(socket)).await {
                // hyper reads HTTP/2's preface without a timeout: read it here, within one.
                Ok(Ok((stream, Protocol::Http2))) => {
                    match tokio::time::timeout(patience, read_preface(stream)).await {
                        Ok(Ok(stream)) => {
                            self.serve(stream, Protocol::Http2, http, shutdown);
                        }
                        Ok(Err(error)) => log::debug!("HTTP/2 preface from {peer}: {error}"),
                        Err(_) => log::debug!("{peer} sent no HTTP/2 preface in time"),
                    }
                }
                Ok(Ok((stream, protocol))) => {
                    self.serve(stream, protocol, http, shutdown);
                }
                Ok(Err(error)) => log::debug!("TLS handshake with {peer} failed: {error}"),
                Err(_) => log::debug!("TLS handshake with {peer} timed out"),
            },
            None => match tokio::time::timeout(patience, sniff(&socket)).await {
                Ok(Ok(protocol)) => {
                    self.serve(socket, protocol, http, shutdown);
                }
                Ok(Err(error)) => log::debug!("connection from {peer} ended early: {error}"),
                Err(_) => log::debug!("connection from {peer} sent nothing in time"),
            },
        }
    }

    /// Starts the connection's task. Everything but the serving itself is set up first, so
    /// that the task holds only what it needs while the connection lives.
    fn serve<I: Connection + 'static>(
        self,
        io: I,
        protocol: Protocol,
        http: Arc<Builders>,
        shutdown: ShutdownWatch,
    ) {
        let Handler {
            state,
            connection,
            slot,
            slots,
        } = self;
        let (peer, disconnect) = (connection.peer, connection.disconnect.clone());
        let at_capacity = slot.is_none();
        let service = service_fn(move |mut request: Request<Incoming>| {
            let state = state.clone();
            let (connection, stream_slot) = match request.version() {
                // A stream of its own to disconnect, so that one slow stream ends alone rather
                // than with its connection's other streams; and a slot of its own, so that the
                // connection limit bounds streams and not only connections.
                Version::HTTP_2 => (
                    ConnectionInfo {
                        peer: connection.peer,
                        disconnect: Arc::new(Notify::new()),
                    },
                    slots.clone().try_acquire_owned().ok(),
                ),
                _ => (connection.clone(), None),
            };
            let refused =
                at_capacity || (request.version() == Version::HTTP_2 && stream_slot.is_none());
            request.extensions_mut().insert(connection);
            // Boxed here because hyper keeps its own box, sized for this future, for the
            // connection's whole life; boxing makes that one pointer-sized and frees the
            // request's state as soon as a stream's response head is ready.
            Box::pin(async move {
                let response = match refused {
                    true => over_capacity(&state, &request),
                    false => handle(state, request).await,
                };
                Ok::<_, Infallible>(response.map(|body| SlotBody {
                    body,
                    _slot: stream_slot,
                }))
            })
        });
        let io = TokioIo::new(io);
        match protocol {
            Protocol::Http1 => {
                let connection = http.http1.serve_connection(io, service);
                let serving = Interruptible::new(connection, disconnect, shutdown);
                tokio::spawn(ConnectionTask::new(serving, peer, slot));
            }
            // An HTTP/2 connection without a slot answers the streams already sent with 503
            // and is told to go away (GOAWAY), as an HTTP/1.1 one is by `Connection: close`.
            Protocol::Http2 => {
                let connection = http.http2.serve_connection(io, service);
                let serving = match at_capacity {
                    true => Interruptible::shutting_down(connection, disconnect, shutdown),
                    false => Interruptible::new(connection, disconnect, shutdown),
                };
                tokio::spawn(ConnectionTask::new(serving, peer, slot));
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: the connection inline in the task (an `async` block would hold it
    /// twice, as the variable it captures and as the future it awaits), and the connection
    /// slot, held until the connection ends.
    struct ConnectionTask<C> {
        #[pin]
        serving: Interruptible<C>,
        peer: SocketAddr,
        _slot: Option<OwnedSemaphorePermit>,
    }
}

impl<C> ConnectionTask<C> {
    fn new(
        serving: Interruptible<C>,
        peer: SocketAddr,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Self {
        ConnectionTask {
            serving,
            peer,
            _slot: slot,
        }
    }
}

impl<C: GracefulConnection<Error = hyper::Error>> Future for ConnectionTask<C> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let peer = *this.peer;
        match std::task::ready!(this.serving.poll(cx)) {
            Ok(Ended::Closed) => {}
            Ok(Ended::Disconnected) => log::debug!("closed the connection of {peer}"),
            Err(error) => log::debug!("connection from {peer} ended with an error: {error}"),
        }
        Poll::Ready(())
    }
}

pin_project_lite::pin_project! {
    /// A response body that holds its HTTP/2 stream's connection slot for as long as hyper
    /// holds the body, which is as long as the stream is open.
    struct SlotBody {
        #[pin]
        body: ResponseBody,
        _slot: Option<OwnedSemaphorePermit>,
    }
}

impl Body for SlotBody {
    type Data = Bytes;
    type Error = <ResponseBody as Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Whether a cleartext connection starts with HTTP/2's preface (h2c with prior knowledge) or
/// is HTTP/1.1, without consuming anything: HTTP/1.1 as soon as a byte differs from the
/// preface, HTTP/2 once the whole preface is there (so hyper, which reads it without a timeout,
/// finds it waiting).
async fn sniff(socket: &TcpStream) -> io::Result<Protocol> {
    let mut start = [0; H2_PREFACE.len()];
    loop {
        let read = socket.peek(&mut start).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if start[..read] != H2_PREFACE[..read] {
            return Ok(Protocol::Http1);
        }
        if read == start.len() {
            return Ok(Protocol::Http2);
        }
        // Part of the preface so far: peek would return the same bytes at once, so wait a
        // moment for the rest.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads HTTP/2's connection preface from `stream` and gives it back in front of the rest.
async fn read_preface(mut stream: Box<dyn Connection>) -> io::Result<ReadAhead> {
    let mut preface = [0; H2_PREFACE.len()];
    stream.read_exact(&mut preface).await?;
    if preface != *H2_PREFACE {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not HTTP/2"));
    }
    Ok(ReadAhead {
        preface,
        given: 0,
        stream,
    })
}

/// A connection whose HTTP/2 preface was read ahead (to time it): reads give it back first.
struct ReadAhead {
    preface: [u8; H2_PREFACE.len()],
    given: usize,
    stream: Box<dyn Connection>,
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let rest = &this.preface[this.given..];
        if rest.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let count = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..count]);
        this.given += count;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Reloads the TLS certificate on every SIGHUP, for as long as the task runs.
fn reload_on_hangup(tls: Arc<dyn TlsAcceptor>) -> JoinHandle<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let hangups = signal(SignalKind::hangup())
        .inspect_err(|error| log::warning!("cannot listen for SIGHUP: {error}"))
        .ok();
    tokio::spawn(async move {
        let Some(mut hangups) = hangups else { return };
        while hangups.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => {
                    log::info!("SIGHUP: reloaded the TLS certificate; open connections keep theirs")
                }
                Err(error) => log::error!("SIGHUP: kept the previous TLS certificate: {error}"),
            }
        }
    })
}

/// Stops the workers and waits for their running jobs (so their events still go out), then
/// ends every stream (an open SSE response would keep graceful shutdown pending forever) and
/// waits for the connections; both waits share one deadline, `SHUTDOWN_GRACE_SECS`.
async fn wind_down(
    state: &AppState,
    workers: Vec<JoinHandle<()>>,
    keepalives: JoinHandle<()>,
    shutdown: Shutdown,
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
    if tokio::time::timeout_at(deadline, shutdown.shut_down())
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
