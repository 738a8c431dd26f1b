//! Counters for `GET /metrics`, rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::events::EventType;

/// Distinct event types counted by name; further ones are counted as `other`, so a publisher
/// inventing types cannot grow the metrics without bound.
pub const MAX_EVENT_TYPES_TRACKED: usize = 64;

/// Process-wide counters; cheap to update from the publish path.
#[derive(Default)]
pub struct Metrics {
    /// Guards the per-type counters. A std `Mutex`: each update is a map lookup and an add.
    events: Mutex<BTreeMap<String, EventCounts>>,
    slow_consumer_disconnects: AtomicU64,
    /// Responses by status class, 1xx to 5xx.
    responses: [AtomicU64; 5],
    /// Set once events cross processes through Redis; the Redis gauges are shown from then.
    redis_in_use: AtomicBool,
    redis_reachable: AtomicBool,
    redis_outbox: AtomicU64,
    redis_outages: AtomicU64,
    /// Whether a durable outbox keeps what is published during an outage (else it is refused).
    redis_durable: AtomicBool,
    redis_durable_outbox: AtomicI64,
    redis_refused: AtomicU64,
    redis_appended_on_recovery: AtomicU64,
    redis_losses_detected: AtomicU64,
}

/// What happened to the events of one type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventCounts {
    /// Events published.
    pub published: u64,
    /// Frames queued to live streams.
    pub delivered: u64,
    /// Frames sent again to clients reconnecting with `Last-Event-ID`.
    pub replayed: u64,
    /// Frames not queued because the stream's client had fallen behind.
    pub dropped: u64,
}

impl Metrics {
    /// Adds one published event of `event_type` and what became of it.
    pub fn count_publish(&self, event_type: &EventType, delivered: u64, dropped: u64) {
        self.update(event_type, |counts| {
            counts.published += 1;
            counts.delivered += delivered;
            counts.dropped += dropped;
        });
    }

    /// Adds one replayed frame of `event_type`.
    pub fn count_replay(&self, event_type: &EventType) {
        self.update(event_type, |counts| counts.replayed += 1);
    }

    /// Adds one stream closed because its client stopped reading.
    pub fn count_slow_consumer_disconnect(&self) {
        self.slow_consumer_disconnects
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Adds one HTTP response with `status`.
    pub fn count_response(&self, status: u16) {
        if let Some(class) = self
            .responses
            .get(usize::from(status / 100).wrapping_sub(1))
        {
            class.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records the state of the Redis relay: whether Redis is reachable, and how many events
    /// wait in the outbox for it.
    pub fn set_redis_state(&self, reachable: bool, outbox: usize) {
        self.redis_in_use.store(true, Ordering::Relaxed);
        let was_reachable = self.redis_reachable.swap(reachable, Ordering::Relaxed);
        if was_reachable && !reachable {
            self.redis_outages.fetch_add(1, Ordering::Relaxed);
        }
        self.redis_outbox.store(outbox as u64, Ordering::Relaxed);
    }

    /// Records whether a durable outbox backs the Redis relay's.
    pub fn set_redis_durable_outbox(&self, durable: bool) {
        self.redis_durable.store(durable, Ordering::Relaxed);
    }

    /// Adds `change` (one row kept, or minus one removed) to the durable outbox's length.
    pub fn change_redis_durable_outbox(&self, change: i64) {
        self.redis_durable_outbox
            .fetch_add(change, Ordering::Relaxed);
    }

    /// Adds one publish refused because Redis was unreachable and nothing durable could keep it.
    pub fn count_redis_refused_publish(&self) {
        self.redis_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `count` events appended to Redis after an outage (or by a restart) from an outbox.
    pub fn count_redis_appended_on_recovery(&self, count: u64) {
        self.redis_appended_on_recovery
            .fetch_add(count, Ordering::Relaxed);
    }

    /// Adds one recovery that found Redis had lost entries this process had not read.
    pub fn count_redis_loss_detected(&self) {
        self.redis_losses_detected.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether events cross processes through Redis and Redis is unreachable now.
    pub fn redis_outage(&self) -> bool {
        self.redis_in_use.load(Ordering::Relaxed) && !self.redis_reachable.load(Ordering::Relaxed)
    }

    /// Streams closed so far because their clients stopped reading.
    pub fn slow_consumer_disconnects(&self) -> u64 {
        self.slow_consumer_disconnects.load(Ordering::Relaxed)
    }

    /// The counts of one event type (or `other`).
    pub fn event_counts(&self, event_type: &str) -> EventCounts {
        self.lock().get(event_type).copied().unwrap_or_default()
    }

    /// The Prometheus text exposition, with the gauges the caller read just now.
    pub fn render(&self, open_streams: usize, jobs_by_status: &[(&str, usize)]) -> String {
        let mut out = String::new();
        gauge(
            &mut out,
            "artifact_events_open_streams",
            "Open SSE streams.",
            open_streams,
        );
        let events = self.lock().clone();
        for (metric, help, field) in [
            (
                "published",
                "Events published, by type.",
                (|c: &EventCounts| c.published) as fn(&EventCounts) -> u64,
            ),
            (
                "delivered",
                "Frames queued to live streams, by type.",
                |c| c.delivered,
            ),
            (
                "replayed",
                "Frames replayed after Last-Event-ID, by type.",
                |c| c.replayed,
            ),
            (
                "dropped",
                "Frames dropped for clients that fell behind, by type.",
                |c| c.dropped,
            ),
        ] {
            let name = format!("artifact_events_events_{metric}_total");
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (event_type, counts) in &events {
                let _ = writeln!(
                    out,
                    "{name}{{type=\"{}\"}} {}",
                    escape_label(event_type),
                    field(counts)
                );
            }
        }
        let name = "artifact_events_slow_consumer_disconnects_total";
        let _ = writeln!(
            out,
            "# HELP {name} Streams closed because their client stopped reading.\n# TYPE {name} counter\n{name} {}",
            self.slow_consumer_disconnects()
        );
        let name = "artifact_events_jobs";
        let _ = writeln!(
            out,
            "# HELP {name} Stored jobs, by status.\n# TYPE {name} gauge"
        );
        for (status, count) in jobs_by_status {
            let _ = writeln!(out, "{name}{{status=\"{status}\"}} {count}");
        }
        let name = "artifact_events_http_responses_total";
        let _ = writeln!(
            out,
            "# HELP {name} HTTP responses, by status class.\n# TYPE {name} counter"
        );
        for (class, count) in self.responses.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{class=\"{}xx\"}} {}",
                class + 1,
                count.load(Ordering::Relaxed)
            );
        }
        if self.redis_in_use.load(Ordering::Relaxed) {
            let reachable = self.redis_reachable.load(Ordering::Relaxed);
            let outbox = self.redis_outbox.load(Ordering::Relaxed) as usize;
            gauge(
                &mut out,
                "artifact_events_redis_reachable",
                "1 while Redis is reachable, 0 during an outage.",
                usize::from(reachable),
            );
            let name = "artifact_events_redis_outbox_events";
            let durable = self.redis_durable_outbox.load(Ordering::Relaxed).max(0);
            let _ = writeln!(
                out,
                "# HELP {name} Events acknowledged during an outage, waiting to be appended to Redis: queued in memory, and rows in the durable outbox.\n# TYPE {name} gauge\n{name}{{kind=\"memory\"}} {outbox}\n{name}{{kind=\"durable\"}} {durable}"
            );
            let _ = writeln!(
                out,
                "# HELP artifact_events_redis_durable_outbox 1 when a durable outbox keeps what is published during an outage, 0 when such publishes are refused.\n# TYPE artifact_events_redis_durable_outbox gauge\nartifact_events_redis_durable_outbox {}",
                u8::from(self.redis_durable.load(Ordering::Relaxed))
            );
            for (name, help, value) in [
                (
                    "artifact_events_redis_outages_total",
                    "Times Redis became unreachable.",
                    &self.redis_outages,
                ),
                (
                    "artifact_events_redis_publishes_refused_total",
                    "Publishes refused (503) because Redis was unreachable and no durable outbox could keep them.",
                    &self.redis_refused,
                ),
                (
                    "artifact_events_redis_appended_on_recovery_total",
                    "Events appended to Redis from an outbox once it was back, or by a restarted process.",
                    &self.redis_appended_on_recovery,
                ),
                (
                    "artifact_events_redis_losses_detected_total",
                    "Recoveries that found Redis had lost entries this process had not read; every open stream got replay_incomplete.",
                    &self.redis_losses_detected,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                    value.load(Ordering::Relaxed)
                );
            }
        }
        out
    }

    fn update(&self, event_type: &EventType, change: impl FnOnce(&mut EventCounts)) {
        let mut events = self.lock();
        let name = match events.contains_key(event_type.as_str())
            || events.len() < MAX_EVENT_TYPES_TRACKED
        {
            true => event_type.as_str(),
            false => "other",
        };
        match events.get_mut(name) {
            Some(counts) => change(counts),
            None => change(events.entry(name.to_owned()).or_default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, EventCounts>> {
        crate::panic::lock(&self.events)
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: usize) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// Escapes a label value as the text format requires (backslash, quote, newline).
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
