//! Where events come from: watched folders ([`watch`]), webhooks
//! ([`webhook`]) and schedules ([`cron`]).
//!
//! This crate owns turning the outside world into [`Event`]s: HTTP parsing,
//! body limits and request authentication, file-system notifications with
//! debouncing and glob filters, cron arithmetic across time zones. It hands
//! each event to a [`Dispatch`] and, for webhooks, turns the result into an
//! HTTP answer. It must not know wasmtime, SQLite or SMTP: the dispatcher
//! (wired by the binary) runs the plugin and commits its outcome.

#![deny(missing_docs)]

pub mod cron;
pub mod watch;
pub mod webhook;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sendbox_types::{Event, HttpResponse};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One event for one plugin.
#[derive(Debug)]
pub struct Job {
    /// The plugin's name.
    pub plugin: String,
    /// The event.
    pub event: Event,
    /// The event's id, for logs and the audit trail.
    pub event_id: String,
    /// The trigger's slot this event's plugin run holds (a webhook route's
    /// `concurrency`), if the trigger bounds its runs that way.
    pub slot: Option<RunSlot>,
}

/// One of a trigger's slots for plugin runs, held by a [`Job`]: it bounds
/// how many of the trigger's plugin runs happen at once. The dispatcher
/// lets go of it once the plugin has run (so an outcome waiting for its
/// commit does not keep a slot from the next run) and takes it again
/// before running the plugin again.
pub struct RunSlot {
    slots: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
}

impl RunSlot {
    /// Waits up to `wait` for one of `slots`; `None` when none came free.
    pub async fn take(slots: &Arc<Semaphore>, wait: std::time::Duration) -> Option<RunSlot> {
        let permit = tokio::time::timeout(wait, slots.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(RunSlot {
            slots: slots.clone(),
            held: Some(permit),
        })
    }

    /// Lets go of the slot (another run may take it).
    pub fn release(&mut self) {
        self.held = None;
    }

    /// Takes a slot again after [`RunSlot::release`], waiting as long as it
    /// takes; a slot still held is kept.
    pub async fn retake(&mut self) {
        if self.held.is_none() {
            // The semaphore is never closed.
            self.held = self.slots.clone().acquire_owned().await.ok();
        }
    }

    /// Whether the slot is held now.
    pub fn is_held(&self) -> bool {
        self.held.is_some()
    }
}

impl std::fmt::Debug for RunSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunSlot")
            .field("held", &self.is_held())
            .finish()
    }
}

/// What became of a job.
#[derive(Debug, Clone)]
pub enum Dispatched {
    /// The outcome was committed; these message ids were queued.
    Committed {
        /// Outbox ids of the queued messages.
        queued: Vec<i64>,
        /// Outbox ids of earlier messages with the same idempotency key
        /// (not queued again).
        duplicates: Vec<i64>,
        /// The plugin's own webhook answer, if any.
        response: Option<HttpResponse>,
    },
    /// The plugin failed (trap, timeout, limit, `Err`); nothing was kept.
    PluginFailed(String),
    /// The outcome broke the plugin's policy; nothing was kept.
    Refused(String),
    /// The outbox could not commit; nothing was kept.
    StoreFailed(String),
    /// No such plugin (e.g. removed by a reload).
    NoPlugin,
}

/// Runs a job: the plugin, then the commit. Implemented by the binary.
pub type Dispatch =
    Arc<dyn Fn(Job) -> Pin<Box<dyn Future<Output = Dispatched> + Send>> + Send + Sync>;

static EVENT_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new event id: trigger kind, time and a counter, e.g. `wh-1795807345468-7`.
pub fn new_event_id(kind: &str) -> String {
    let ms = sendbox_types::now_ms();
    let n = EVENT_COUNTER.fetch_add(1, Ordering::Relaxed);
    let prefix = match kind {
        "webhook" => "wh",
        "file" => "fs",
        "schedule" => "cr",
        other => other,
    };
    format!("{prefix}-{ms}-{n}")
}
