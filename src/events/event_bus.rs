//! The in-process publish/subscribe bus.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;

use serde_json::Value;

use super::relay::{BoxFuture, PublishResult, Relay};
use super::{EventData, EventType};
use crate::log;
use crate::panic::{catch_unwind, lock, panic_message, CatchUnwind};

type HandlerFuture = BoxFuture<'static, ()>;
type HandlerFn = dyn Fn(&EventType, &Arc<EventData>) -> HandlerFuture + Send + Sync;

/// An async function of the event data; clones are the same handler for `unsubscribe`.
#[derive(Clone)]
pub struct Handler(Arc<HandlerFn>);

impl Handler {
    /// Wraps an async function or closure taking the shared event data.
    pub fn new<F, Fut>(handler: F) -> Self
    where
        F: Fn(Arc<Value>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Handler(Arc::new(move |_, data| {
            Box::pin(handler(data.value().clone()))
        }))
    }

    /// Wraps a function that also needs the type the event was published as (useful with
    /// [`EventType::ANY`]), or the data's JSON text, which it gets without a parse.
    pub fn with_event_data<F, Fut>(handler: F) -> Self
    where
        F: Fn(&EventType, &Arc<EventData>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Handler(Arc::new(move |event_type, data| {
            Box::pin(handler(event_type, data))
        }))
    }
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Handler({:p})", Arc::as_ptr(&self.0))
    }
}

impl PartialEq for Handler {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.0), Arc::as_ptr(&other.0))
    }
}

/// Routes published events to the handlers subscribed to their type.
#[derive(Default)]
pub struct EventBus {
    /// Guards only the handler lists. A std `Mutex` is right because it is never held across an
    /// `.await` or while a handler runs: `publish` clones the list out and unlocks first, so a
    /// handler may itself subscribe, unsubscribe or publish.
    handlers: Mutex<HashMap<EventType, Vec<Handler>>>,
    /// Set once when events cross processes; without it, publishing is dispatching.
    relay: OnceLock<Arc<dyn Relay>>,
}

impl EventBus {
    /// An empty bus, independent of the process-wide one (for tests and embedding).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `handler` for `event_type`; [`EventType::ANY`] receives every event.
    pub fn subscribe(&self, event_type: EventType, handler: Handler) {
        lock(&self.handlers)
            .entry(event_type)
            .or_default()
            .push(handler);
    }

    /// Removes one subscription of exactly this handler; says whether it was subscribed.
    pub fn unsubscribe(&self, event_type: &EventType, handler: &Handler) -> bool {
        let mut handlers = lock(&self.handlers);
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
    /// with how many ran, when all have finished. A handler that panics is logged, does not
    /// stop the others, and still counts as run.
    /// With a relay, the handlers of every process run; a relay failure is logged.
    pub async fn publish(&self, event_type: &EventType, event_data: impl Into<EventData>) -> usize {
        self.try_publish(event_type, event_data.into())
            .await
            .unwrap_or_else(|error| {
                log::error!("publishing {event_type}: {error}");
                0
            })
    }

    /// Like [`EventBus::publish`], but says when the relay could not take the event.
    pub async fn try_publish(&self, event_type: &EventType, data: EventData) -> PublishResult {
        match self.relay.get() {
            Some(relay) => relay.forward(event_type.clone(), data).await,
            None => Ok(self.dispatch(event_type, Arc::new(data)).await),
        }
    }

    /// Makes `publish` go through `relay`; false if the bus already has one.
    pub fn set_relay(&self, relay: Arc<dyn Relay>) -> bool {
        self.relay.set(relay).is_ok()
    }

    /// Runs this process's handlers for an event, as `publish` does without a relay; relays
    /// call it for each event they carry.
    pub async fn dispatch(&self, event_type: &EventType, data: Arc<EventData>) -> usize {
        let handlers = self.handlers_for(event_type);
        let mut running: Vec<CatchUnwind<HandlerFuture>> = Vec::with_capacity(handlers.len());
        for handler in &handlers {
            // Calling the handler can panic before it returns a future.
            match std::panic::catch_unwind(AssertUnwindSafe(|| (handler.0)(event_type, &data))) {
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

    fn handlers_for(&self, event_type: &EventType) -> Vec<Handler> {
        let handlers = lock(&self.handlers);
        let own = handlers.get(event_type).into_iter().flatten();
        let any = match *event_type == EventType::ANY {
            true => None,
            false => handlers.get(&EventType::ANY),
        };
        own.chain(any.into_iter().flatten()).cloned().collect()
    }
}

fn log_panic(event_type: &EventType, message: &str) {
    log::error!("event handler for {event_type} panicked: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::mpsc;

    fn recorder() -> (Handler, mpsc::UnboundedReceiver<Value>) {
        let (sender, receiver) = mpsc::unbounded_channel();
        let handler = Handler::new(move |data: Arc<Value>| {
            let _ = sender.send((*data).clone());
            async {}
        });
        (handler, receiver)
    }

    #[tokio::test]
    async fn handlers_receive_only_their_event_type() {
        let bus = EventBus::new();
        let (completed, mut completed_rx) = recorder();
        let (failed, mut failed_rx) = recorder();
        bus.subscribe(EventType::COMPLETED, completed);
        bus.subscribe(EventType::FAILED, failed);

        assert_eq!(bus.publish(&EventType::COMPLETED, json!({"n": 1})).await, 1);
        assert_eq!(completed_rx.try_recv().unwrap(), json!({"n": 1}));
        assert!(failed_rx.try_recv().is_err());
        assert_eq!(
            bus.publish(&EventType::from("custom.thing"), json!({}))
                .await,
            0
        );
    }

    #[tokio::test]
    async fn every_handler_runs_and_publish_waits_for_all() {
        let bus = EventBus::new();
        let finished = Arc::new(AtomicUsize::new(0));
        for delay_ms in [30, 10, 20] {
            let finished = finished.clone();
            bus.subscribe(
                EventType::STARTED,
                Handler::new(move |_| {
                    let finished = finished.clone();
                    async move {
                        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
                        finished.fetch_add(1, Ordering::SeqCst);
                    }
                }),
            );
        }
        assert_eq!(bus.publish(&EventType::STARTED, json!({})).await, 3);
        assert_eq!(finished.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn handlers_run_concurrently_not_one_after_another() {
        let bus = EventBus::new();
        for _ in 0..10 {
            bus.subscribe(
                EventType::PROGRESS,
                Handler::new(|_| tokio::time::sleep(std::time::Duration::from_secs(1))),
            );
        }
        let started = tokio::time::Instant::now();
        bus.publish(&EventType::PROGRESS, json!({})).await;
        assert_eq!(started.elapsed().as_secs(), 1);
    }

    #[tokio::test]
    async fn any_subscribers_see_every_type_once() {
        let bus = EventBus::new();
        let (all, mut all_rx) = recorder();
        bus.subscribe(EventType::ANY, all);
        bus.publish(&EventType::COMPLETED, json!({"a": 1})).await;
        bus.publish(&EventType::from("my.own.type"), json!({"b": 2}))
            .await;
        bus.publish(&EventType::ANY, json!({"c": 3})).await;
        assert_eq!(all_rx.try_recv().unwrap(), json!({"a": 1}));
        assert_eq!(all_rx.try_recv().unwrap(), json!({"b": 2}));
        assert_eq!(all_rx.try_recv().unwrap(), json!({"c": 3}));
        assert!(all_rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn unsubscribe_removes_exactly_that_handler() {
        let bus = EventBus::new();
        let (first, mut first_rx) = recorder();
        let (second, mut second_rx) = recorder();
        bus.subscribe(EventType::COMPLETED, first.clone());
        bus.subscribe(EventType::COMPLETED, second.clone());

        assert!(bus.unsubscribe(&EventType::COMPLETED, &first));
        assert!(!bus.unsubscribe(&EventType::COMPLETED, &first));
        assert!(!bus.unsubscribe(&EventType::FAILED, &second));
        bus.publish(&EventType::COMPLETED, json!({})).await;
        assert!(first_rx.try_recv().is_err());
        assert!(second_rx.try_recv().is_ok());
        assert_eq!(bus.publish(&EventType::COMPLETED, json!({})).await, 1);
    }

    #[tokio::test]
    async fn unsubscribing_during_a_publish_affects_only_later_publishes() {
        let bus = Arc::new(EventBus::new());
        let (other, mut other_rx) = recorder();
        let self_removing: Arc<std::sync::OnceLock<Handler>> = Arc::default();
        let handler = {
            let bus = bus.clone();
            let me = self_removing.clone();
            Handler::new(move |_| {
                // Runs while publish is in progress: must not deadlock on the bus's lock.
                let removed = bus.unsubscribe(&EventType::COMPLETED, me.get().unwrap());
                assert!(removed);
                async {}
            })
        };
        self_removing.set(handler.clone()).unwrap();
        bus.subscribe(EventType::COMPLETED, handler);
        bus.subscribe(EventType::COMPLETED, other);

        assert_eq!(bus.publish(&EventType::COMPLETED, json!({"n": 1})).await, 2);
        assert_eq!(bus.publish(&EventType::COMPLETED, json!({"n": 2})).await, 1);
        assert_eq!(other_rx.try_recv().unwrap(), json!({"n": 1}));
        assert_eq!(other_rx.try_recv().unwrap(), json!({"n": 2}));
    }

    #[tokio::test]
    async fn a_panicking_handler_does_not_stop_the_others() {
        let bus = EventBus::new();
        let (before, mut before_rx) = recorder();
        let (after, mut after_rx) = recorder();
        bus.subscribe(EventType::FAILED, before);
        bus.subscribe(
            EventType::FAILED,
            Handler::new(|_| async { panic!("handler bug") }),
        );
        bus.subscribe(
            EventType::FAILED,
            Handler::new(|_| -> std::future::Ready<()> {
                panic!("panics before returning a future")
            }),
        );
        bus.subscribe(EventType::FAILED, after);

        assert_eq!(bus.publish(&EventType::FAILED, json!({"x": 1})).await, 4);
        assert!(before_rx.try_recv().is_ok());
        assert!(after_rx.try_recv().is_ok());
        // The bus is still usable afterwards.
        assert_eq!(bus.publish(&EventType::FAILED, json!({"x": 2})).await, 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_tasks_publish_and_subscribe_at_once() {
        let bus = Arc::new(EventBus::new());
        let received = Arc::new(AtomicUsize::new(0));
        let counting = {
            let received = received.clone();
            Handler::new(move |_| {
                received.fetch_add(1, Ordering::Relaxed);
                async {}
            })
        };
        bus.subscribe(EventType::COMPLETED, counting);
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..16 {
            let bus = bus.clone();
            tasks.spawn(async move {
                for i in 0..500 {
                    let churn = Handler::new(|_| async {});
                    bus.subscribe(EventType::COMPLETED, churn.clone());
                    bus.publish(&EventType::COMPLETED, json!({"task": task, "i": i}))
                        .await;
                    assert!(bus.unsubscribe(&EventType::COMPLETED, &churn));
                }
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        assert_eq!(received.load(Ordering::Relaxed), 16 * 500);
        assert_eq!(bus.publish(&EventType::COMPLETED, json!({})).await, 1);
    }
}
