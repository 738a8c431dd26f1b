//! The in-process publish/subscribe bus.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;

use serde_json::Value;

use super::EventType;
use crate::log;
use crate::panic::{catch_unwind, panic_message, CatchUnwind};

type HandlerFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// An async function of the event data; clones are the same handler for `unsubscribe`.
#[derive(Clone)]
pub struct Handler(Arc<dyn Fn(Arc<Value>) -> HandlerFuture + Send + Sync>);

impl Handler {
    /// Wraps an async function or closure taking the shared event data.
    pub fn new<F, Fut>(handler: F) -> Self
    where
        F: Fn(Arc<Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Handler(Arc::new(move |data| Box::pin(handler(data))))
    }
}

impl PartialEq for Handler {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handler({:p})", Arc::as_ptr(&self.0))
    }
}

/// Routes published events to the handlers subscribed to their type.
#[derive(Default)]
pub struct EventBus {
    /// Guards only the handler lists. A std `Mutex` is right because it is never held across an
    /// `.await` or while a handler runs: `publish` clones the list out and unlocks first, so a
    /// handler may itself subscribe, unsubscribe or publish.
    handlers: Mutex<HashMap<EventType, Vec<Handler>>>,
}

impl EventBus {
    /// An empty bus, independent of the process-wide one (for tests and embedding).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `handler` for `event_type`; [`EventType::ANY`] receives every event.
    pub fn subscribe(&self, event_type: EventType, handler: Handler) {
        self.lock().entry(event_type).or_default().push(handler);
    }

    /// Removes one subscription of exactly this handler; says whether it was subscribed.
    pub fn unsubscribe(&self, event_type: &EventType, handler: &Handler) -> bool {
        let mut handlers = self.lock();
        let Some(list) = handlers.get_mut(event_type) else {
            return false;
        };
        let Some(position) = list.iter().position(|h| h == handler) else {
            return false;
        };
        list.remove(position);
        if list.is_empty() {
            handlers.remove(event_type);
        }
        true
    }

    /// Runs every handler of `event_type` (and of [`EventType::ANY`]) concurrently and returns,
    /// with how many ran, when all have finished. A handler that panics is logged and skipped.
    pub async fn publish(&self, event_type: &EventType, event_data: Value) -> usize {
        let handlers = self.handlers_for(event_type);
        let data = Arc::new(event_data);
        let mut running: Vec<CatchUnwind<HandlerFuture>> = Vec::with_capacity(handlers.len());
        for handler in &handlers {
            // Calling the handler can panic before it returns a future.
            match std::panic::catch_unwind(AssertUnwindSafe(|| (handler.0)(data.clone()))) {
                Ok(future) => running.push(catch_unwind(future)),
                Err(payload) => log_panic(event_type, &panic_message(payload.as_ref())),
            }
        }
        std::future::poll_fn(|cx| {
            running.retain_mut(|future| match Pin::new(future).poll(cx) {
                Poll::Pending => true,
                Poll::Ready(Ok(())) => false,
                Poll::Ready(Err(message)) => {
                    log_panic(event_type, &message);
                    false
                }
            });
            if running.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        handlers.len()
    }

    /// How many handlers are subscribed to `event_type` itself.
    pub fn handler_count(&self, event_type: &EventType) -> usize {
        self.lock().get(event_type).map_or(0, Vec::len)
    }

    fn handlers_for(&self, event_type: &EventType) -> Vec<Handler> {
        let handlers = self.lock();
        let own = handlers.get(event_type).into_iter().flatten();
        let any = match *event_type == EventType::ANY {
            true => None,
            false => handlers.get(&EventType::ANY),
        };
        own.chain(any.into_iter().flatten()).cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<EventType, Vec<Handler>>> {
        // No code panics while holding the lock, so a poisoned map is still consistent.
        self.handlers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn log_panic(event_type: &EventType, message: &str) {
    log::error!("event handler for {event_type} panicked: {message}");
}
