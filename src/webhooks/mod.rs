//! Webhooks: every event, signed by the Standard Webhooks specification, POSTed to the
//! receivers that asked for it (a user's own subscriptions, and the operator's `WEBHOOK_URL`),
//! at least once.
//!
//! The bus is the seam: [`Webhooks::attach`] subscribes one handler to every event type, and
//! that handler only counts and spawns (no I/O, no await), so a slow or dead receiver never
//! slows a publish or an SSE stream. Each delivery is then one task: it stores the delivery in
//! the outbox ([`WebhookStore`]), makes the attempts (each within `WEBHOOK_TIMEOUT_SECS`, at
//! most [`MAX_CONCURRENT_ATTEMPTS`] at once, and [`MAX_ATTEMPTS_PER_WEBHOOK`] to one webhook),
//! waits out the retry schedule between them, and
//! forgets the delivery once a receiver answered 2xx or the schedule ran out; the latter
//! disables a user's subscription and tells its owner with a [`DISABLED`] event.
//!
//! **Invariant:** deliveries pending at once never exceed `WEBHOOK_QUEUE_CAPACITY`; one that
//! does not fit is counted (`dropped`) and logged, never silently lost.
//! **Invariant:** a delivery is in the outbox before its first attempt starts, and leaves it
//! only when it succeeded or was given up: with a durable store, a restart resumes it with the
//! same `webhook-id`.
//! **Invariant:** a user's webhook is refused, at registration and again at every attempt
//! (DNS rebinding), if its host resolves to an address that is not public
//! ([`crate::http_client::is_public_address`]), unless `WEBHOOK_ALLOW_PRIVATE=1`. The
//! operator's `WEBHOOK_URL` is trusted to be internal.
//! **Invariant:** no log line or error holds a secret, a signature, or a URL's path or query.

mod signing;
mod store;

pub use signing::{SigningKey, SECRET_PREFIX};
pub use store::{
    Attempt, Delivery, MemoryWebhookStore, StoreFailure, Subscription, WebhookStore,
    RECENT_ATTEMPTS,
};

use std::collections::HashMap;
use std::fmt;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use crate::events::{EventBus, EventData, EventType, Handler};
use crate::http_client::{self, Client, Limits, TlsConnector};
use crate::log;
use crate::panic::lock;
use crate::time::{now_rfc3339, unix_millis, unix_seconds};

/// The event a subscription's owner gets on their stream when it is disabled.
pub const DISABLED: EventType = EventType::from_static("webhook.disabled");
/// The subscription id under which `WEBHOOK_URL`'s deliveries are kept in the outbox.
pub const SERVER_WEBHOOK_ID: &str = "server";
/// Seconds between attempts unless `WEBHOOK_RETRY_SCHEDULE_SECS` says otherwise: about 5 s,
/// 5 min, 30 min, 2 h and 8 h, so a receiver may be down for most of a day.
pub const DEFAULT_RETRY_SCHEDULE_SECS: [u64; 5] = [5, 300, 1800, 7200, 28800];
/// Seconds one attempt may take, connecting included, unless `WEBHOOK_TIMEOUT_SECS` says
/// otherwise; a slower receiver's attempt fails and is retried.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;
/// Deliveries pending at once (waiting for an attempt or a retry) unless
/// `WEBHOOK_QUEUE_CAPACITY` says otherwise; beyond it new deliveries are dropped and counted.
pub const DEFAULT_QUEUE_CAPACITY: usize = 10_000;
/// Attempts in flight at once over all receivers; further ones wait for a slot.
pub const MAX_CONCURRENT_ATTEMPTS: usize = 64;
/// Attempts in flight at once to one webhook, so that one receiver that hangs holds at most
/// this many of the slots and the others' deliveries go on.
pub const MAX_ATTEMPTS_PER_WEBHOOK: usize = 8;
/// Webhooks one user may have; one more is refused with 409.
pub const MAX_WEBHOOKS_PER_USER: usize = 10;
/// Longest accepted webhook URL.
pub const MAX_URL_BYTES: usize = 2048;
/// Most event types one subscription may name, and the longest name.
pub const MAX_EVENT_TYPES: usize = 32;
const MAX_EVENT_TYPE_BYTES: usize = 128;
/// The most of a receiver's answer that is read; a longer one fails the attempt.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The longest a connection to a receiver may take to open, within the attempt's timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Each wait of the schedule is stretched or shrunk by up to this fraction at random, so that
/// the retries of many deliveries that failed together do not arrive together.
const JITTER: f64 = 0.2;

/// How webhooks are delivered (`WEBHOOK_*`).
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// The operator's receiver of every event (`WEBHOOK_URL`, `WEBHOOK_SECRET`).
    pub server: Option<ServerWebhook>,
    /// The waits before each retry (`WEBHOOK_RETRY_SCHEDULE_SECS`); one attempt more than
    /// there are waits, then the delivery is given up.
    pub retry_schedule: Vec<Duration>,
    /// Time one attempt may take (`WEBHOOK_TIMEOUT_SECS`).
    pub timeout: Duration,
    /// Deliveries pending at once (`WEBHOOK_QUEUE_CAPACITY`).
    pub queue_capacity: usize,
    /// Lets users' webhooks reach private addresses (`WEBHOOK_ALLOW_PRIVATE=1`), for
    /// development and tests.
    pub allow_private: bool,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        WebhookSettings {
            server: None,
            retry_schedule: DEFAULT_RETRY_SCHEDULE_SECS
                .iter()
                .map(|secs| Duration::from_secs(*secs))
                .collect(),
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            allow_private: false,
        }
    }
}

/// The operator's own receiver of every event.
#[derive(Clone)]
pub struct ServerWebhook {
    /// Where events are POSTed (`WEBHOOK_URL`).
    pub url: String,
    /// What they are signed with (`WEBHOOK_SECRET`).
    pub key: SigningKey,
}

// The URL's path or query may hold a token, and the key is a secret.
impl fmt::Debug for ServerWebhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerWebhook {{ host: {:?}, .. }}", host_of(&self.url))
    }
}

/// Why a subscription was not registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterError {
    /// The URL or the event types cannot be used; the text says why (422).
    Invalid(String),
    /// The user already has this many webhooks, the most allowed (409).
    TooMany(usize),
    /// The store failed (500).
    Store(StoreFailure),
}

/// The webhook service: the subscriptions' cache, the bus handler and the delivery tasks.
pub struct Webhooks {
    settings: WebhookSettings,
    store: Arc<dyn WebhookStore>,
    /// For users' webhooks: only public addresses, unless `allow_private`.
    client: Client,
    /// For `WEBHOOK_URL`: any address.
    server_client: Client,
    /// Where [`DISABLED`] is published; weak, since the bus holds this service's handler.
    bus: Mutex<Weak<EventBus>>,
    /// The subscriptions by id, the delivery path's view of the store. A std `Mutex` held
    /// for map lookups and edits only, never across an `.await` or a store call.
    subscriptions: Mutex<HashMap<String, Arc<Subscription>>>,
    /// Serializes registrations and removals, so that the per-user count holds; held across
    /// the store call, which the cache lock never is.
    registering: Mutex<()>,
    /// Deliveries pending now: the queue length, bounded by `queue_capacity`.
    pending: AtomicUsize,
    attempt_slots: Semaphore,
    /// Each webhook's own slots ([`MAX_ATTEMPTS_PER_WEBHOOK`]), taken before a shared one.
    webhook_slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    counters: Counters,
    resumed: AtomicBool,
}

impl Webhooks {
    /// The service over `store`, its cache loaded; `tls` serves `https://` receivers.
    pub fn new(
        settings: WebhookSettings,
        store: Arc<dyn WebhookStore>,
        tls: Option<Arc<dyn TlsConnector>>,
    ) -> Result<Arc<Webhooks>, StoreFailure> {
        let subscriptions = store
            .subscriptions()?
            .into_iter()
            .map(|subscription| (subscription.id.clone(), Arc::new(subscription)))
            .collect();
        let limits = Limits {
            connect_timeout: CONNECT_TIMEOUT.min(settings.timeout),
            total_timeout: settings.timeout,
            max_response_bytes: MAX_RESPONSE_BYTES,
        };
        let server_client = Client {
            limits,
            address_policy: None,
            tls,
        };
        let client = Client {
            address_policy: match settings.allow_private {
                true => None,
                false => Some(http_client::is_public_address),
            },
            ..server_client.clone()
        };
        if settings.allow_private {
            log::warning!("WEBHOOK_ALLOW_PRIVATE is set: users' webhooks may reach private and loopback addresses (development only)");
        }
        Ok(Arc::new(Webhooks {
            settings,
            store,
            client,
            server_client,
            bus: Mutex::new(Weak::new()),
            subscriptions: Mutex::new(subscriptions),
            registering: Mutex::new(()),
            pending: AtomicUsize::new(0),
            attempt_slots: Semaphore::new(MAX_CONCURRENT_ATTEMPTS),
            webhook_slots: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            resumed: AtomicBool::new(false),
        }))
    }

    /// Subscribes the service to every event of `bus` and returns the handler, to unsubscribe
    /// from [`EventType::ANY`] when the service goes. The handler only enqueues.
    pub fn attach(self: &Arc<Self>, bus: &Arc<EventBus>) -> Handler {
        *lock(&self.bus) = Arc::downgrade(bus);
        let webhooks = self.clone();
        let handler = Handler::with_event_data(move |event_type, data| {
            webhooks.enqueue(event_type, data);
            std::future::ready(())
        });
        bus.subscribe(EventType::ANY, handler.clone());
        handler
    }

    /// Resumes the deliveries the store kept pending (a durable store's, after a restart);
    /// only the first call does anything.
    pub fn resume(self: &Arc<Self>) {
        if self.resumed.swap(true, Ordering::Relaxed) {
            return;
        }
        let pending = match self.store.pending_deliveries() {
            Ok(pending) => pending,
            Err(error) => {
                log::error!("cannot resume webhook deliveries: {error}");
                return;
            }
        };
        if !pending.is_empty() {
            log::info!("resuming {} pending webhook deliveries", pending.len());
        }
        for delivery in pending {
            // Past the capacity too: they were accepted once, and dropping them now would lose
            // them for good.
            self.pending.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(self.clone().deliver(delivery, true));
        }
    }

    /// Registers a webhook for `user_id`, after checking the URL (scheme, and every address
    /// it resolves to) and the event types.
    pub async fn register(
        &self,
        user_id: &str,
        url: String,
        event_types: Option<Vec<String>>,
    ) -> Result<Subscription, RegisterError> {
        let invalid = |text: String| Err(RegisterError::Invalid(text));
        if url.len() > MAX_URL_BYTES {
            return invalid(format!("url is longer than {MAX_URL_BYTES} bytes"));
        }
        if let Some(types) = &event_types {
            if types.is_empty() {
                return invalid("event_types is empty; omit it to receive every type".to_owned());
            }
            if types.len() > MAX_EVENT_TYPES {
                return invalid(format!(
                    "event_types names more than {MAX_EVENT_TYPES} types"
                ));
            }
            if types
                .iter()
                .any(|name| name.is_empty() || name.len() > MAX_EVENT_TYPE_BYTES)
            {
                return invalid(format!(
                    "each of event_types must be 1 to {MAX_EVENT_TYPE_BYTES} bytes long"
                ));
            }
        }
        if let Err(error) = self.client.check_destination(&url).await {
            return invalid(format!("url cannot receive webhooks: {error}"));
        }
        let subscription = Subscription {
            id: format!("wh_{}", crate::random::hex_token(12)),
            user_id: user_id.to_owned(),
            url,
            event_types,
            key: SigningKey::generate(),
            created_at: now_rfc3339(),
            disabled: false,
        };
        let _registering = lock(&self.registering);
        let owned = lock(&self.subscriptions)
            .values()
            .filter(|existing| existing.user_id == user_id)
            .count();
        if owned >= MAX_WEBHOOKS_PER_USER {
            return Err(RegisterError::TooMany(MAX_WEBHOOKS_PER_USER));
        }
        self.store
            .add(&subscription)
            .map_err(RegisterError::Store)?;
        lock(&self.subscriptions).insert(subscription.id.clone(), Arc::new(subscription.clone()));
        log::info!(
            "webhook {} registered for user {user_id}, to {}",
            subscription.id,
            host_of(&subscription.url)
        );
        Ok(subscription)
    }

    /// The user's webhooks, oldest first.
    pub fn list(&self, user_id: &str) -> Vec<Arc<Subscription>> {
        let mut owned: Vec<_> = lock(&self.subscriptions)
            .values()
            .filter(|subscription| subscription.user_id == user_id)
            .cloned()
            .collect();
        owned.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        owned
    }

    /// Removes one of the user's webhooks, and its pending deliveries; false if the user has
    /// no webhook with that id.
    pub fn remove(&self, user_id: &str, id: &str) -> Result<bool, StoreFailure> {
        let _registering = lock(&self.registering);
        if self.owned(user_id, id).is_none() {
            return Ok(false);
        }
        self.store.remove(id)?;
        lock(&self.subscriptions).remove(id);
        lock(&self.webhook_slots).remove(id);
        log::info!("webhook {id} of user {user_id} removed");
        Ok(true)
    }

    /// The recent attempts of one of the user's webhooks, newest first; `None` if the user
    /// has no webhook with that id.
    pub fn attempts(&self, user_id: &str, id: &str) -> Result<Option<Vec<Attempt>>, StoreFailure> {
        match self.owned(user_id, id) {
            Some(_) => self.store.attempts(id).map(Some),
            None => Ok(None),
        }
    }

    /// Adds a subscription without the registration's checks: how tests reach the checks made
    /// at each attempt (a name that resolves elsewhere by then).
    pub fn add_unchecked(&self, subscription: Subscription) -> Result<(), StoreFailure> {
        self.store.add(&subscription)?;
        lock(&self.subscriptions).insert(subscription.id.clone(), Arc::new(subscription));
        Ok(())
    }

    /// Deliveries pending now (the queue length).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The Prometheus text of the webhook counters and the queue length.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        let name = "artifact_events_webhook_deliveries_total";
        let _ = writeln!(out, "# HELP {name} Webhook deliveries by how they ended: delivered, exhausted (the whole retry schedule failed), dropped (the queue was full), abandoned (the webhook was removed or disabled).\n# TYPE {name} counter");
        for (outcome, count) in DELIVERY_OUTCOMES.iter().zip(&self.counters.deliveries) {
            let _ = writeln!(
                out,
                "{name}{{outcome=\"{outcome}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let name = "artifact_events_webhook_attempts_total";
        let _ = writeln!(
            out,
            "# HELP {name} Webhook attempts by outcome.\n# TYPE {name} counter"
        );
        for (outcome, count) in AttemptOutcome::ALL.iter().zip(&self.counters.attempts) {
            let _ = writeln!(
                out,
                "{name}{{outcome=\"{}\"}} {}",
                outcome.as_str(),
                count.load(Ordering::Relaxed)
            );
        }
        let name = "artifact_events_webhook_queue_length";
        let _ = writeln!(
            out,
            "# HELP {name} Webhook deliveries pending: waiting for an attempt or a retry.\n# TYPE {name} gauge\n{name} {}",
            self.pending()
        );
        out
    }

    /// The bus handler's whole work: pick the receivers, and spawn one delivery for each that
    /// fits in the queue.
    fn enqueue(self: &Arc<Self>, event_type: &EventType, data: &EventData) {
        let owner = data.user_id();
        let mut targets: Vec<String> = Vec::new();
        if self.settings.server.is_some() {
            targets.push(SERVER_WEBHOOK_ID.to_owned());
        }
        if let Some(owner) = owner {
            targets.extend(
                lock(&self.subscriptions)
                    .values()
                    .filter(|s| s.user_id == owner && s.wants(event_type.as_str()))
                    .map(|s| s.id.clone()),
            );
        }
        if targets.is_empty() {
            return;
        }
        let capacity = self.settings.queue_capacity;
        // With the queue full, a body would be thrown away: the drops are only counted.
        let full = self.pending.load(Ordering::Relaxed) >= capacity;
        let body = match full {
            true => String::new(),
            false => Body {
                event_type: event_type.as_str(),
                timestamp: &now_rfc3339(),
                // The same text as the stream's frame, not a `Value` written out again.
                data: serde_json::from_str(data.json()).expect("EventData holds JSON"),
            }
            .to_json(),
        };
        for subscription_id in targets {
            if full || self.pending.fetch_add(1, Ordering::Relaxed) >= capacity {
                if !full {
                    self.pending.fetch_sub(1, Ordering::Relaxed);
                }
                let dropped = self.counters.count_delivery(DeliveryOutcome::Dropped);
                // Every drop is counted; the log says so at the first and then sparingly, so
                // that a flood of drops does not become a flood of lines.
                if dropped.is_power_of_two() || dropped.is_multiple_of(1000) {
                    log::warning!(
                        "webhook queue is full ({capacity} pending): a {event_type} event for webhook {subscription_id} was dropped; {dropped} dropped so far"
                    );
                }
                continue;
            }
            let delivery = Delivery {
                id: format!("msg_{}", crate::random::hex_token(12)),
                subscription_id,
                body: body.clone(),
                attempts: 0,
                next_attempt_ms: 0,
            };
            tokio::spawn(self.clone().deliver(delivery, false));
        }
    }

    /// One delivery, from the outbox to success or giving up.
    async fn deliver(self: Arc<Self>, mut delivery: Delivery, stored: bool) {
        let _pending = PendingSlot(self.clone());
        if !stored {
            self.save(&delivery);
        }
        loop {
            let wait = delivery.next_attempt_ms.saturating_sub(unix_millis());
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            let own_slots = self.slots_of(&delivery.subscription_id);
            let own_slot = own_slots.acquire().await;
            let slot = self.attempt_slots.acquire().await;
            // Looked up once the slots are held: the webhook may have gone meanwhile.
            let Some(target) = self.target(&delivery.subscription_id) else {
                self.counters.count_delivery(DeliveryOutcome::Abandoned);
                self.finish(&delivery);
                // Made again by any other delivery of a removed webhook that gets this far.
                lock(&self.webhook_slots).remove(&delivery.subscription_id);
                return;
            };
            let attempt = self.attempt(&target, &delivery).await;
            drop((slot, own_slot));
            delivery.attempts = attempt.attempt;
            if let Err(error) = self.store.record_attempt(&target.id, &attempt) {
                log::error!("{error}");
            }
            if attempt.error.is_none() {
                self.counters.count_delivery(DeliveryOutcome::Delivered);
                self.finish(&delivery);
                return;
            }
            let failure = attempt.error.as_deref().unwrap_or_default();
            let schedule = &self.settings.retry_schedule;
            let Some(wait) = schedule.get(delivery.attempts as usize - 1) else {
                self.counters.count_delivery(DeliveryOutcome::Exhausted);
                self.finish(&delivery);
                self.give_up(&target, &delivery, failure).await;
                return;
            };
            let wait = jittered(*wait);
            log::info!(
                "webhook {} message {} attempt {} to {} failed ({failure}); retrying in {:.1} s",
                target.id,
                delivery.id,
                delivery.attempts,
                host_of(&target.url),
                wait.as_secs_f64()
            );
            delivery.next_attempt_ms = unix_millis() + wait.as_millis() as u64;
            self.save(&delivery);
        }
    }

    /// Sends one attempt, signed now, and says how it went.
    async fn attempt(&self, target: &Target, delivery: &Delivery) -> Attempt {
        let at = now_rfc3339();
        let started = Instant::now();
        // Signed at each attempt: receivers refuse a timestamp too far from their clock.
        let timestamp = unix_seconds();
        let signature = target
            .key
            .sign(&delivery.id, timestamp, delivery.body.as_bytes());
        let header = |value: &str| {
            HeaderValue::from_str(value).expect("ids, digits and base64 are valid header values")
        };
        let request = http_client::Request::post(target.url.clone(), delivery.body.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(HeaderName::from_static("webhook-id"), header(&delivery.id))
            .header(
                HeaderName::from_static("webhook-timestamp"),
                header(&timestamp.to_string()),
            )
            .header(
                HeaderName::from_static("webhook-signature"),
                header(&signature),
            );
        let client = match target.owner {
            None => &self.server_client,
            Some(_) => &self.client,
        };
        let result = client.send(request).await;
        let (outcome, status, error) = match result {
            Ok(response) if response.status.is_success() => (
                AttemptOutcome::Success,
                Some(response.status.as_u16()),
                None,
            ),
            Ok(response) => {
                let status = response.status.as_u16();
                (
                    AttemptOutcome::HttpError,
                    Some(status),
                    Some(format!("answered {status}")),
                )
            }
            Err(error) => (AttemptOutcome::of(&error), None, Some(error.to_string())),
        };
        self.counters.attempts[outcome as usize].fetch_add(1, Ordering::Relaxed);
        Attempt {
            message_id: delivery.id.clone(),
            attempt: delivery.attempts + 1,
            at,
            status,
            error,
            duration_ms: started.elapsed().as_millis() as u64,
        }
    }

    /// After the whole schedule failed: a user's webhook is disabled and its owner told.
    async fn give_up(&self, target: &Target, delivery: &Delivery, failure: &str) {
        let Some(owner) = &target.owner else {
            log::error!(
                "WEBHOOK_URL ({}) failed message {} for the whole retry schedule ({} attempts; last: {failure}); it is given up",
                host_of(&target.url),
                delivery.id,
                delivery.attempts
            );
            return;
        };
        {
            let mut subscriptions = lock(&self.subscriptions);
            let Some(subscription) = subscriptions.get_mut(&target.id) else {
                return;
            };
            if subscription.disabled {
                return;
            }
            Arc::make_mut(subscription).disabled = true;
        }
        if let Err(error) = self.store.disable(&target.id) {
            log::error!("{error}");
        }
        log::warning!(
            "webhook {} of user {owner} disabled: message {} failed {} attempts over the whole retry schedule (last: {failure})",
            target.id,
            delivery.id,
            delivery.attempts
        );
        let bus = lock(&self.bus).upgrade();
        if let Some(bus) = bus {
            let event = json!({
                "user_id": owner,
                "webhook_id": target.id,
                "url": target.url,
                "reason": format!(
                    "a delivery failed {} attempts over the whole retry schedule; the last: {failure}",
                    delivery.attempts
                ),
                "timestamp": now_rfc3339(),
            });
            bus.publish(&DISABLED, event).await;
        }
    }

    /// Where a delivery goes now; `None` once its webhook was removed or disabled.
    fn target(&self, subscription_id: &str) -> Option<Target> {
        if subscription_id == SERVER_WEBHOOK_ID {
            let server = self.settings.server.as_ref()?;
            return Some(Target {
                id: SERVER_WEBHOOK_ID.to_owned(),
                url: server.url.clone(),
                key: server.key.clone(),
                owner: None,
            });
        }
        let subscriptions = lock(&self.subscriptions);
        let subscription = subscriptions.get(subscription_id).filter(|s| !s.disabled)?;
        Some(Target {
            id: subscription.id.clone(),
            url: subscription.url.clone(),
            key: subscription.key.clone(),
            owner: Some(subscription.user_id.clone()),
        })
    }

    fn slots_of(&self, subscription_id: &str) -> Arc<Semaphore> {
        let mut slots = lock(&self.webhook_slots);
        let own = slots.entry(subscription_id.to_owned());
        own.or_insert_with(|| Arc::new(Semaphore::new(MAX_ATTEMPTS_PER_WEBHOOK)))
            .clone()
    }

    fn owned(&self, user_id: &str, id: &str) -> Option<Arc<Subscription>> {
        let subscriptions = lock(&self.subscriptions);
        subscriptions
            .get(id)
            .filter(|s| s.user_id == user_id)
            .cloned()
    }

    fn save(&self, delivery: &Delivery) {
        if let Err(error) = self.store.save_delivery(delivery) {
            log::error!("{error}; message {} is kept in memory only", delivery.id);
        }
    }

    fn finish(&self, delivery: &Delivery) {
        if let Err(error) = self.store.finish_delivery(&delivery.id) {
            log::error!("{error}");
        }
    }
}

/// The request body, serialized straight from the borrowed event data (no copy of it).
#[derive(serde::Serialize)]
struct Body<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    timestamp: &'a str,
    data: &'a RawValue,
}

impl Body<'_> {
    fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a JSON value and strings always serialize")
    }
}

/// A receiver as one attempt sees it.
struct Target {
    id: String,
    url: String,
    key: SigningKey,
    /// The subscription's owner; `None` for `WEBHOOK_URL`.
    owner: Option<String>,
}

/// Counts a delivery in the queue length for as long as its task lives, however it ends.
struct PendingSlot(Arc<Webhooks>);

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Counters {
    deliveries: [AtomicU64; 4],
    attempts: [AtomicU64; 5],
}

impl Counters {
    /// Adds one delivery that ended so; returns how many have.
    fn count_delivery(&self, outcome: DeliveryOutcome) -> u64 {
        self.deliveries[outcome as usize].fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// How a delivery ended, in the order of [`DELIVERY_OUTCOMES`].
#[derive(Clone, Copy)]
enum DeliveryOutcome {
    Delivered,
    Exhausted,
    Dropped,
    Abandoned,
}

const DELIVERY_OUTCOMES: [&str; 4] = ["delivered", "exhausted", "dropped", "abandoned"];

/// How one attempt went.
#[derive(Clone, Copy)]
enum AttemptOutcome {
    /// A 2xx answer.
    Success,
    /// Any other answer.
    HttpError,
    /// No answer within the timeout (connecting, or the whole attempt).
    Timeout,
    /// The URL or its addresses are refused (SSRF policy, scheme).
    Refused,
    /// The connection failed otherwise.
    Error,
}

impl AttemptOutcome {
    const ALL: [AttemptOutcome; 5] = [
        AttemptOutcome::Success,
        AttemptOutcome::HttpError,
        AttemptOutcome::Timeout,
        AttemptOutcome::Refused,
        AttemptOutcome::Error,
    ];

    fn of(error: &http_client::Error) -> AttemptOutcome {
        use http_client::Error;
        match error {
            Error::Timeout(_) => AttemptOutcome::Timeout,
            Error::Connect { source, .. } if source.kind() == std::io::ErrorKind::TimedOut => {
                AttemptOutcome::Timeout
            }
            Error::AddressRefused { .. } | Error::InvalidUrl(_) | Error::TlsUnavailable => {
                AttemptOutcome::Refused
            }
            _ => AttemptOutcome::Error,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Success => "success",
            AttemptOutcome::HttpError => "http_error",
            AttemptOutcome::Timeout => "timeout",
            AttemptOutcome::Refused => "refused",
            AttemptOutcome::Error => "error",
        }
    }
}

/// `wait`, stretched or shrunk at random by up to [`JITTER`].
fn jittered(wait: Duration) -> Duration {
    let mut random = [0u8; 4];
    getrandom::getrandom(&mut random).expect("the operating system's random source works");
    let unit = f64::from(u32::from_le_bytes(random)) / f64::from(u32::MAX);
    wait.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit)
}

/// The host (and port) of a URL, all a log line may say of it.
pub fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_line_names_only_the_host_of_a_url() {
        assert_eq!(
            host_of("https://hooks.example.com/t/secret?k=v"),
            "hooks.example.com"
        );
        assert_eq!(host_of("http://127.0.0.1:9000"), "127.0.0.1:9000");
        assert_eq!(host_of("http://user:pw@example.com/x"), "example.com");
    }

    #[test]
    fn jitter_stays_within_a_fifth_of_the_wait() {
        for _ in 0..1000 {
            let wait = jittered(Duration::from_secs(100));
            assert!(wait >= Duration::from_secs(80) && wait <= Duration::from_secs(120));
        }
    }
}
