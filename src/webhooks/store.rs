//! Where webhooks live: the `WebhookStore` seam (subscriptions, the outbox of pending
//! deliveries, and the recent attempts) and `MemoryWebhookStore`, its default. The SQLite one
//! (feature `sqlite`) is `backends::sqlite::SqliteWebhookStore`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Mutex;

use super::signing::SigningKey;
use crate::panic::lock;

/// Attempts kept per subscription for `GET /ai/webhooks/{id}/deliveries`; older ones go first.
pub const RECENT_ATTEMPTS: usize = 50;

/// A user's webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// `wh_<hex>`, as the API names it.
    pub id: String,
    /// The owner, the token's `sub`: only their events are sent, and only they see it.
    pub user_id: String,
    /// Where events are POSTed.
    pub url: String,
    /// The event types sent; `None` sends every type.
    pub event_types: Option<Vec<String>>,
    /// Signs every request; shown to the owner once, at registration.
    pub key: SigningKey,
    /// When it was registered (RFC 3339).
    pub created_at: String,
    /// Set once a delivery failed for the whole retry schedule; nothing more is sent.
    pub disabled: bool,
}

impl Subscription {
    /// Whether an event of this type is sent to it.
    pub fn wants(&self, event_type: &str) -> bool {
        !self.disabled
            && self
                .event_types
                .as_ref()
                .is_none_or(|types| types.iter().any(|wanted| wanted == event_type))
    }
}

/// One event on its way to one webhook: an outbox row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The `webhook-id` header, `msg_<hex>`: the same for every attempt, so that receivers
    /// can deduplicate.
    pub id: String,
    /// The subscription's id, or [`super::SERVER_WEBHOOK_ID`] for `WEBHOOK_URL`.
    pub subscription_id: String,
    /// The JSON body, `{"type", "timestamp", "data"}`, the same bytes for every attempt.
    pub body: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due, in Unix milliseconds.
    pub next_attempt_ms: u64,
}

/// One attempt to deliver, as the owner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// The delivery's `webhook-id`.
    pub message_id: String,
    /// 1 for the first attempt of a delivery.
    pub attempt: u32,
    /// When it started (RFC 3339).
    pub at: String,
    /// The receiver's status, if it answered.
    pub status: Option<u16>,
    /// Why it failed without a status, or with one outside 2xx; `None` on success.
    pub error: Option<String>,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
}

/// A store operation failed (I/O for a durable store; the memory store never fails).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreFailure(pub String);

impl fmt::Display for StoreFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "webhook store: {}", self.0)
    }
}

impl std::error::Error for StoreFailure {}

/// Keeps subscriptions, pending deliveries and recent attempts. Every call is short and
/// synchronous: the delivery tasks call it, never the bus handler.
pub trait WebhookStore: Send + Sync {
    /// Every subscription, disabled ones included, for the service's cache at start-up.
    fn subscriptions(&self) -> Result<Vec<Subscription>, StoreFailure>;
    /// Adds a new subscription.
    fn add(&self, subscription: &Subscription) -> Result<(), StoreFailure>;
    /// Removes a subscription, its pending deliveries and its attempts; false if unknown.
    fn remove(&self, id: &str) -> Result<bool, StoreFailure>;
    /// Marks a subscription disabled.
    fn disable(&self, id: &str) -> Result<(), StoreFailure>;
    /// Stores a delivery, or its new attempt count and due time.
    fn save_delivery(&self, delivery: &Delivery) -> Result<(), StoreFailure>;
    /// Forgets a delivery that succeeded or was given up.
    fn finish_delivery(&self, id: &str) -> Result<(), StoreFailure>;
    /// The deliveries still pending, oldest first: what a restart resumes.
    fn pending_deliveries(&self) -> Result<Vec<Delivery>, StoreFailure>;
    /// Records an attempt for a subscription, keeping the latest [`RECENT_ATTEMPTS`].
    fn record_attempt(&self, subscription_id: &str, attempt: &Attempt) -> Result<(), StoreFailure>;
    /// The subscription's recent attempts, newest first.
    fn attempts(&self, subscription_id: &str) -> Result<Vec<Attempt>, StoreFailure>;
}

/// The store when there is no database: everything is lost with the process, pending
/// deliveries included.
#[derive(Default)]
pub struct MemoryWebhookStore {
    /// A std `Mutex`: each call is a few map edits, and none awaits.
    state: Mutex<MemoryState>,
}

#[derive(Default)]
struct MemoryState {
    subscriptions: Vec<Subscription>,
    /// By id, each with the order it was first saved in.
    outbox: HashMap<String, (u64, Delivery)>,
    saved: u64,
    attempts: HashMap<String, VecDeque<Attempt>>,
}

impl MemoryWebhookStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl WebhookStore for MemoryWebhookStore {
    fn subscriptions(&self) -> Result<Vec<Subscription>, StoreFailure> {
        Ok(lock(&self.state).subscriptions.clone())
    }

    fn add(&self, subscription: &Subscription) -> Result<(), StoreFailure> {
        lock(&self.state).subscriptions.push(subscription.clone());
        Ok(())
    }

    fn remove(&self, id: &str) -> Result<bool, StoreFailure> {
        let mut state = lock(&self.state);
        let before = state.subscriptions.len();
        state
            .subscriptions
            .retain(|subscription| subscription.id != id);
        state
            .outbox
            .retain(|_, (_, delivery)| delivery.subscription_id != id);
        state.attempts.remove(id);
        Ok(state.subscriptions.len() < before)
    }

    fn disable(&self, id: &str) -> Result<(), StoreFailure> {
        let mut state = lock(&self.state);
        if let Some(subscription) = state.subscriptions.iter_mut().find(|s| s.id == id) {
            subscription.disabled = true;
        }
        Ok(())
    }

    fn save_delivery(&self, delivery: &Delivery) -> Result<(), StoreFailure> {
        let mut state = lock(&self.state);
        state.saved += 1;
        let order = state.saved;
        let entry = state.outbox.entry(delivery.id.clone());
        entry.or_insert((order, delivery.clone())).1 = delivery.clone();
        Ok(())
    }

    fn finish_delivery(&self, id: &str) -> Result<(), StoreFailure> {
        lock(&self.state).outbox.remove(id);
        Ok(())
    }

    fn pending_deliveries(&self) -> Result<Vec<Delivery>, StoreFailure> {
        let state = lock(&self.state);
        let mut pending: Vec<_> = state.outbox.values().collect();
        pending.sort_by_key(|(order, _)| *order);
        Ok(pending
            .into_iter()
            .map(|(_, delivery)| delivery.clone())
            .collect())
    }

    fn record_attempt(&self, subscription_id: &str, attempt: &Attempt) -> Result<(), StoreFailure> {
        let mut state = lock(&self.state);
        let recent = state
            .attempts
            .entry(subscription_id.to_owned())
            .or_default();
        if recent.len() == RECENT_ATTEMPTS {
            recent.pop_back();
        }
        recent.push_front(attempt.clone());
        Ok(())
    }

    fn attempts(&self, subscription_id: &str) -> Result<Vec<Attempt>, StoreFailure> {
        let state = lock(&self.state);
        let recent = state.attempts.get(subscription_id).into_iter().flatten();
        Ok(recent.cloned().collect())
    }
}
