//! The HTTP server: the accept loop, the router and its routes, JWT auth, and the one place
//! errors become responses.

mod auth;
mod cors;
mod error;
mod interrupt;
mod listener;
mod metrics_listener;
mod request;
mod response;
mod router;
pub(crate) mod routes;
mod state;

pub use auth::{
    from_jwks, from_pem, Authenticator, ClaimRules, Claims, Identity, Jwks, VerifyingKey,
    MIN_REFETCH_INTERVAL, PUBLISHER_ROLE,
};
pub use error::ApiError;
pub use listener::{run, shutdown_signal, Protocol, TlsAcceptor, MAX_CONCURRENT_STREAMS};
pub use metrics_listener::serve_metrics;
pub use request::{ConnectionInfo, RequestBody};
pub use response::{json_response, ResponseBody};
pub use router::handle;
pub use state::AppState;
