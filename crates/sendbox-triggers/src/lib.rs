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

/// One event for one plugin.
#[derive(Debug, Clone)]
pub struct Job {
    /// The plugin's name.
    pub plugin: String,
    /// The event.
    pub event: Event,
    /// The event's id, for logs and the audit trail.
    pub event_id: String,
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
