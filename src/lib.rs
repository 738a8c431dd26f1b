//! artifact-events: realtime notifications that a generated artifact is ready or has failed.
//!
//! # Layout
//! - [`events`]: `EventType`, the publish/subscribe [`events::EventBus`] and `get_event_bus()`.
//! - [`sse`]: the SSE wire format both ways (pure), event ids and replay history, a client's
//!   stream body, and the per-user stream index.
//! - [`jobs`]: the job record and `JobStore`, the generator and validator, and `ArtifactWorker`.
//! - [`server`]: the accept loop, router, JWT auth, errors and the HTTP routes.
//! - [`metrics`]: counters for `GET /metrics`, in the Prometheus text format.
//! - [`config`]: settings with named defaults, read from the environment.
//! - `database` (feature `sqlite`): the SQLite file behind durable jobs and history, its schema.
//! - [`http_client`]: the one outbound HTTP client: timeouts, a capped body, no redirects.
//! - [`listen`]: the `listen` command's client, which prints a user's events as they arrive.
//! - [`log`], [`time`], [`random`]: small utilities that keep the dependency list short.
//! - `fuzz_checks` (hidden): the fuzz targets' checks, shared with the corpus-replay test.

pub mod config;
#[cfg(feature = "sqlite")]
pub mod database;
pub mod events;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod http_client;
pub mod jobs;
pub mod listen;
pub mod log;
pub mod metrics;
pub(crate) mod panic;
pub mod random;
pub mod server;
pub mod sse;
pub mod time;

pub use events::{get_event_bus, EventBus, EventType, Handler};
