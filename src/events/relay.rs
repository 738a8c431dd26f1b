//! The seam through which events cross processes: once a bus has a [`Relay`], publishing hands
//! every event to it, and the relay runs each process's handlers for every event of any
//! process. The Redis backend implements it; the bus knows no backend.

use std::future::Future;
use std::pin::Pin;

use super::{EventData, EventType};

/// A boxed future, as [`Relay`] and the job generators return, so that they can be used as
/// trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Carries events between processes (Redis). Once a bus has one, `publish` hands every event
/// to it, and the relay calls [`EventBus::dispatch`](super::EventBus::dispatch) once for each event of any process.
pub trait Relay: Send + Sync + 'static {
    /// Sends the event on; resolves with how many local handlers ran, once they have.
    fn forward(&self, event_type: EventType, event_data: EventData)
        -> BoxFuture<'_, PublishResult>;
}

/// What [`EventBus::try_publish`](super::EventBus::try_publish) returns: how many local handlers ran, or why it failed.
pub type PublishResult = Result<usize, PublishError>;

/// A publish that could not reach every process; the message says what happened to the event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishError(pub String);

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PublishError {}
