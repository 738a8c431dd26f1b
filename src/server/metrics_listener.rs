//! `METRICS_ADDR`: `/metrics` on a listener of its own (a private interface, say), so that the
//! public listener does not expose the server's counters to everyone.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::router::answer_metrics_request;
use super::state::AppState;
use crate::log;

/// Scrapers connected at once; more are closed at once. A scraper needs one or two.
const MAX_METRICS_CONNECTIONS: usize = 16;
/// Time allowed for a scraper's request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` for as long as the process runs; any other request is
/// answered 404 (405 for another method on `/metrics`).
pub async fn serve_metrics(listener: TcpListener, state: Arc<AppState>) {
    if let Ok(addr) = listener.local_addr() {
        log::info!("metrics on http://{addr}/metrics");
    }
    let slots = Arc::new(Semaphore::new(MAX_METRICS_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                log::warning!("metrics listener: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = answer_metrics_request(&state, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                log::debug!("metrics connection ended with an error: {error}");
            }
            drop(slot);
        });
    }
}
