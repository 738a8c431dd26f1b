//! artifact-events: realtime notifications that a generated artifact is ready or has failed.
//!
//! In process, the bus is all there is to it: every handler of a type runs for each event.
//!
//! ```
//! use artifact_events::{EventBus, EventType, Handler};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let bus = EventBus::new();
//! let handler = Handler::new(|event_data| async move { println!("{event_data}") });
//! bus.subscribe(EventType::COMPLETED, handler.clone());
//! let event = serde_json::json!({"user_id": "u1", "job_id": "j1"});
//! assert_eq!(bus.publish(&EventType::COMPLETED, event).await, 1);
//! assert!(bus.unsubscribe(&EventType::COMPLETED, &handler));
//! # }
//! ```
//!
//! # Layout
//! - [`events`]: `EventType`, the publish/subscribe [`events::EventBus`], the `EventData` it
//!   carries, and `get_event_bus()`.
//! - [`delivery`]: the per-user stream index, the replay history (where event ids are
//!   assigned) and each stream's bounded queue and response body.
//! - [`sse`]: the SSE wire format both ways, pure: the encoder and the parser.
//! - [`jobs`]: the job record and the `JobStore` seam, the generators and validator, and
//!   `ArtifactWorker`.
//! - [`server`]: the accept loop, router, JWT auth, errors and the HTTP routes.
//! - [`backends`]: what plugs into the core's seams (SQLite, Redis), chosen once at start-up.
//! - [`metrics`]: counters for `GET /metrics`, in the Prometheus text format.
//! - [`config`]: settings with named defaults, read from the environment.
//! - [`secret`]: `Secret`, a value (API key, signing secret) whose `Debug` never prints it.
//! - [`http_client`]: the one client for outbound requests (model servers, webhooks; later
//!   JWKS): timeouts, a capped body, no redirects, an address policy against SSRF.
//! - [`webhooks`]: users' webhooks and `WEBHOOK_URL`: Standard Webhooks signing, the store
//!   seam (subscriptions, outbox), and at-least-once delivery off the publish path.
//! - [`listen`]: the `listen` command's client, which prints a user's events as they arrive.
//! - `fuzz_checks` (feature `fuzzing`): the fuzz targets' checks, shared with the corpus replay.

pub mod backends;
pub mod config;
pub mod delivery;
pub mod events;
#[cfg(feature = "fuzzing")]
pub mod fuzz_checks;
pub mod http_client;
pub mod jobs;
pub mod listen;
pub(crate) mod log;
pub mod metrics;
pub(crate) mod panic;
pub(crate) mod random;
pub mod secret;
pub mod server;
pub mod sse;
pub(crate) mod time;
pub mod webhooks;

pub use events::{get_event_bus, EventBus, EventData, EventType, Handler};
pub use log::{
    set_format as set_log_format, set_level as set_log_level, Format as LogFormat,
    Level as LogLevel,
};
