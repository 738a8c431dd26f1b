//! Event types and the process-wide event bus.

mod event_bus;
mod event_data;
mod relay;

pub use event_bus::{EventBus, Handler};
pub use event_data::EventData;
pub use relay::{BoxFuture, PublishError, PublishResult, Relay};

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, OnceLock};

/// The name an event is published under; any string works, the constants are the built-in ones.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(Cow<'static, str>);

impl EventType {
    /// A job finished and its result is stored.
    pub const COMPLETED: EventType = EventType::from_static("artifact.completed");
    /// A job failed for good and its error is stored.
    pub const FAILED: EventType = EventType::from_static("artifact.failed");
    /// A worker picked a job up.
    pub const STARTED: EventType = EventType::from_static("artifact.started");
    /// A job passed a stage (plan, generate, validate).
    pub const PROGRESS: EventType = EventType::from_static("artifact.progress");
    /// A job was cancelled by its owner.
    pub const CANCELLED: EventType = EventType::from_static("artifact.cancelled");
    /// Subscribing to this type receives every event, whatever it was published as.
    pub const ANY: EventType = EventType::from_static("*");

    /// Names an event type without allocating.
    pub const fn from_static(name: &'static str) -> Self {
        EventType(Cow::Borrowed(name))
    }

    /// The event type's name, as published.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for EventType {
    fn from(name: &str) -> Self {
        EventType(Cow::Owned(name.to_owned()))
    }
}

impl From<String> for EventType {
    fn from(name: String) -> Self {
        EventType(Cow::Owned(name))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The process-wide bus, created on first use; servers and workers in one process share it.
pub fn get_event_bus() -> Arc<EventBus> {
    static BUS: OnceLock<Arc<EventBus>> = OnceLock::new();
    BUS.get_or_init(|| Arc::new(EventBus::new())).clone()
}
