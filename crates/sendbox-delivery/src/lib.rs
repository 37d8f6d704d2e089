//! Delivery workers: one per account, taking due messages from the outbox
//! and sending them through the account's transport.
//!
//! This crate owns *when* to send: the account's rate, how many messages are
//! in flight, exponential backoff with jitter for transient failures, the
//! maximum age after which a message goes dead, and pausing an account whose
//! credentials or configuration are refused instead of burning retries. It
//! decides only from [`SendError`](sendbox_mail::SendError)'s own answers (`is_transient`,
//! `is_permanent`, `pauses_account`). It must not know SQL (the outbox's
//! methods are its whole view of storage) or SMTP (the transport's).
//!
//! # The pipeline
//!
//! A worker keeps every allowed connection busy: it claims due messages
//! ahead of the sends (a few rounds' worth without a rate, only what can go
//! now with one; never more than `claim_ahead_bytes` of content), starts the next send the moment one ends, and records
//! results in groups — whatever finished while the previous group was
//! being written goes in one transaction — so no commit ever sits between
//! two sends on a connection. At most `concurrency` sends are in flight and
//! the rate is honoured per send. After a start or a pause the first
//! message goes alone: if the account is still refused, that is one
//! refused attempt, not one per connection.
//!
//! ```no_run
//! # async fn demo(outbox: std::sync::Arc<sendbox_outbox::Outbox>, transport: sendbox_mail::Transport) {
//! use sendbox_delivery::{AccountWorker, DeliverySettings};
//! let worker = AccountWorker::new("alerts", "alerts@example.com", transport, outbox, DeliverySettings::default());
//! worker.run(tokio::signal::ctrl_c()).await;
//! # }
//! ```

#![deny(missing_docs)]

mod outcome;
mod pause;
mod pipeline;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sendbox_mail::Transport;
use sendbox_outbox::{AnyStore, Store};
use tokio::sync::Notify;

/// How one account's worker behaves.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Most messages per minute; `None` for no limit. Default 30, Exchange's
    /// per-mailbox limit.
    pub rate_per_minute: Option<u32>,
    /// Sends at once: the account's connections (SMTP's `max_connections`;
    /// the transport caps connections itself). Without a rate, up to 4×
    /// this many messages are built and waiting for a connection, so a
    /// connection that finishes a message starts the next at once.
    /// Default 3.
    pub concurrency: usize,
    /// Most email content (bodies and attachments) claimed ahead and held
    /// in memory waiting for a connection, besides one message. Default
    /// 32 MiB.
    pub claim_ahead_bytes: u64,
    /// First retry delay; doubles per attempt. Default 30 s.
    pub backoff_base: Duration,
    /// Longest retry delay. Default 30 min.
    pub backoff_max: Duration,
    /// A message still failing this long after it was queued goes dead.
    /// Default 24 h.
    pub max_age: Duration,
    /// How often to look for due messages when nothing wakes the worker.
    /// Default 1 s.
    pub poll_interval: Duration,
    /// How long a paused account waits before trying again. Default 5 min.
    pub pause_recheck: Duration,
    /// From addresses each plugin may use besides the mailbox.
    pub allowed_from: AllowedFrom,
}

/// From addresses each plugin may use besides its account's mailbox, by
/// plugin. Shared: a reload replaces them under running workers.
#[derive(Debug, Clone, Default)]
pub struct AllowedFrom(Arc<std::sync::RwLock<HashMap<String, Vec<String>>>>);

impl AllowedFrom {
    /// These addresses, by plugin name.
    pub fn new(by_plugin: HashMap<String, Vec<String>>) -> Self {
        AllowedFrom(Arc::new(std::sync::RwLock::new(by_plugin)))
    }

    /// Replaces them all.
    pub fn set(&self, by_plugin: HashMap<String, Vec<String>>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = by_plugin;
    }

    /// A plugin's addresses.
    pub fn of(&self, plugin: &str) -> Vec<String> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(plugin)
            .cloned()
            .unwrap_or_default()
    }
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            rate_per_minute: Some(30),
            concurrency: 3,
            claim_ahead_bytes: 32 << 20,
            backoff_base: Duration::from_secs(30),
            backoff_max: Duration::from_secs(30 * 60),
            max_age: Duration::from_secs(24 * 3600),
            poll_interval: Duration::from_secs(1),
            pause_recheck: Duration::from_secs(300),
            allowed_from: AllowedFrom::default(),
        }
    }
}

/// The delay before attempt `attempts + 1`: `base * 2^(attempts-1)`, capped,
/// with ±20% jitter so many failing messages do not retry in lockstep.
pub fn backoff(settings: &DeliverySettings, attempts: u32, seed: &str) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let exp = attempts.saturating_sub(1).min(20);
    let raw = settings
        .backoff_base
        .saturating_mul(1u32 << exp)
        .min(settings.backoff_max);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(seed.as_bytes());
    h.write_u32(attempts);
    let jitter = (h.finish() % 401) as f64 / 1000.0 - 0.2; // -0.2 ..= +0.2
    raw.mul_f64(1.0 + jitter)
}

/// What a worker reports about its account, for `check` and metrics.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    paused: AtomicBool,
    reason: std::sync::Mutex<Option<String>>,
    attempts: [AtomicU64; ATTEMPT_RESULTS.len()],
}

/// How a delivery attempt ended, as counted by [`WorkerStatus::attempts`]:
/// `sent`; `retry` (transient failure, tried again later); `dead`
/// (permanent failure, unbuildable, or too old); `account_refused` (the
/// server or the token endpoint refused the account: requeued, account
/// paused).
pub const ATTEMPT_RESULTS: [&str; 4] = ["sent", "retry", "dead", "account_refused"];

impl WorkerStatus {
    /// Attempts so far, by result (see [`ATTEMPT_RESULTS`]).
    pub fn attempts(&self) -> Vec<(&'static str, u64)> {
        ATTEMPT_RESULTS
            .iter()
            .zip(&self.attempts)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .collect()
    }

    fn count(&self, result: &str) {
        if let Some(i) = ATTEMPT_RESULTS.iter().position(|r| *r == result) {
            self.attempts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the account is paused, and why.
    pub fn paused(&self) -> Option<String> {
        if self.paused.load(Ordering::Relaxed) {
            self.reason
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        } else {
            None
        }
    }
    fn set(&self, reason: Option<String>) {
        self.paused.store(reason.is_some(), Ordering::Relaxed);
        *self
            .reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }
}

/// Delivers one account's messages.
pub struct AccountWorker {
    account: String,
    mailbox: String,
    transport: Arc<Transport>,
    outbox: AnyStore,
    settings: DeliverySettings,
    wake: Arc<Notify>,
    /// Ends a pause before its recheck time (an operator's reload).
    resume: Arc<Notify>,
    status: Arc<WorkerStatus>,
}

impl AccountWorker {
    /// A worker; nothing runs until [`AccountWorker::run`].
    pub fn new(
        account: &str,
        mailbox: &str,
        transport: Transport,
        outbox: impl Into<AnyStore>,
        settings: DeliverySettings,
    ) -> Self {
        AccountWorker {
            account: account.to_owned(),
            mailbox: mailbox.to_owned(),
            transport: Arc::new(transport),
            outbox: outbox.into(),
            settings,
            wake: Arc::new(Notify::new()),
            resume: Arc::new(Notify::new()),
            status: Arc::new(WorkerStatus::default()),
        }
    }

    /// Call `notify_one` on this after queueing to skip the poll delay.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Call `notify_waiters` on this to end a pause now. Only a pause
    /// under way is ended (a reload before the pause does not shorten
    /// it), and new messages never end one: a paused account waits for its
    /// recheck time.
    pub fn resumer(&self) -> Arc<Notify> {
        self.resume.clone()
    }

    /// The account's status.
    pub fn status(&self) -> Arc<WorkerStatus> {
        self.status.clone()
    }

    /// Runs until `shutdown` resolves: then stops claiming, sends what it
    /// has claimed (at most a few rounds' worth, or `concurrency` messages
    /// under a rate), records the results, and returns.
    ///
    /// Delivery goes in rounds (see the crate docs): a round ends at shutdown
    /// or when the account is refused; then the worker waits
    /// `pause_recheck` (or a resume) and starts the next round with one
    /// message alone, so a paused account costs one refused attempt per
    /// recheck, whatever is queued.
    pub async fn run(self, shutdown: impl Future) {
        tokio::pin!(shutdown);
        let shared = self.outbox.shared();
        let mut pace = pipeline::Pace::new(self.settings.rate_per_minute, shared);
        loop {
            if shared && !self.wait_out_the_clusters_pause(shutdown.as_mut()).await {
                return;
            }
            let reason = match self.round(shutdown.as_mut(), &mut pace).await {
                pipeline::RoundEnd::Shutdown => return,
                pipeline::RoundEnd::Paused(reason) => reason,
            };
            if shared {
                // The pause is every node's: recorded in the store, and
                // waited out (by one probe for the cluster) before the
                // next round.
                tracing::error!(account = %self.account, %reason, recheck = ?self.settings.pause_recheck, "pausing the account's queue on every node; fix the account and run `sendbox check` (a reload tries again at once)");
                self.record_pause(Some(&reason)).await;
                self.status.set(Some(reason));
                continue;
            }
            // Armed before the pause is visible, so a resume from then on
            // is never missed, and one from before never counts.
            let resumed = self.resume.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            tracing::error!(account = %self.account, %reason, recheck = ?self.settings.pause_recheck, "pausing the account's queue; fix the account and run `sendbox check` (a reload tries again at once)");
            self.record_pause(Some(&reason)).await;
            self.status.set(Some(reason));
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(self.settings.pause_recheck) => {}
                // Not `wake`: newly queued messages do not end a pause.
                _ = resumed => {}
            }
            tracing::info!(account = %self.account, "account pause over: trying one message");
            self.status.set(None);
            self.record_pause(None).await;
        }
    }

    async fn record_pause(&self, reason: Option<&str>) {
        if let Err(e) = self.outbox.set_account_paused(&self.account, reason).await {
            tracing::warn!(account = %self.account, error = %e, "cannot record the account's pause");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let s = DeliverySettings {
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(60),
            ..DeliverySettings::default()
        };
        let b1 = backoff(&s, 1, "m");
        assert!(
            b1 >= Duration::from_secs(8) && b1 <= Duration::from_secs(12),
            "{b1:?}"
        );
        let b3 = backoff(&s, 3, "m");
        assert!(
            b3 >= Duration::from_secs(32) && b3 <= Duration::from_secs(48),
            "{b3:?}"
        );
        let b9 = backoff(&s, 9, "m");
        assert!(b9 <= Duration::from_secs(72), "{b9:?}");
    }
}
