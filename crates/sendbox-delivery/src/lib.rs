//! Delivery workers: one per account, taking due messages from the outbox
//! and sending them through the account's transport.
//!
//! This crate owns *when* to send: the account's rate, how many messages are
//! in flight, exponential backoff with jitter for transient failures, the
//! maximum age after which a message goes dead, and pausing an account whose
//! credentials or configuration are refused instead of burning retries. It
//! decides only from [`SendError`]'s own answers (`is_transient`,
//! `is_permanent`, `pauses_account`). It must not know SQL (the outbox's
//! methods are its whole view of storage) or SMTP (the transport's).
//!
//! ```no_run
//! # async fn demo(outbox: std::sync::Arc<sendbox_outbox::Outbox>, transport: sendbox_mail::Transport) {
//! use sendbox_delivery::{AccountWorker, DeliverySettings};
//! let worker = AccountWorker::new("alerts", "alerts@example.com", transport, outbox, DeliverySettings::default());
//! worker.run(tokio::signal::ctrl_c()).await;
//! # }
//! ```

#![deny(missing_docs)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use sendbox_mail::message::{self, Envelope};
use sendbox_mail::{SendError, Transport};
use sendbox_outbox::{Message, Outbox, State, Store, now_ms};
use tokio::sync::Notify;
use tokio::time::Instant;

/// How one account's worker behaves.
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Most messages per minute; `None` for no limit. Default 30, Exchange's
    /// per-mailbox limit.
    pub rate_per_minute: Option<u32>,
    /// Messages in flight at once. Default 3.
    pub concurrency: usize,
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
    outbox: Arc<Outbox>,
    settings: DeliverySettings,
    wake: Arc<Notify>,
    /// Ends a pause before its recheck time (an operator's reload).
    resume: Arc<Notify>,
    status: Arc<WorkerStatus>,
}

/// The outcome of one attempt.
enum Attempt {
    Sent(sendbox_mail::Receipt),
    Failed(SendError),
    Unbuildable(String),
}

impl AccountWorker {
    /// A worker; nothing runs until [`AccountWorker::run`].
    pub fn new(
        account: &str,
        mailbox: &str,
        transport: Transport,
        outbox: Arc<Outbox>,
        settings: DeliverySettings,
    ) -> Self {
        AccountWorker {
            account: account.to_owned(),
            mailbox: mailbox.to_owned(),
            transport: Arc::new(transport),
            outbox,
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

    /// Call `notify_one` on this to end a pause now (new messages do not:
    /// a paused account waits for its recheck time).
    pub fn resumer(&self) -> Arc<Notify> {
        self.resume.clone()
    }

    /// The account's status.
    pub fn status(&self) -> Arc<WorkerStatus> {
        self.status.clone()
    }

    /// Runs until `shutdown` resolves: then stops claiming, lets in-flight
    /// sends finish, and returns.
    pub async fn run(self, shutdown: impl Future) {
        tokio::pin!(shutdown);
        let mut next_slot = Instant::now();
        let interval = self
            .settings
            .rate_per_minute
            .filter(|r| *r > 0)
            .map(|r| Duration::from_secs(60) / r);
        loop {
            if let Some(reason) = self.status.paused() {
                tracing::warn!(account = %self.account, %reason, "account paused; retrying later");
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(self.settings.pause_recheck) => {}
                    // Not `wake`: newly queued messages do not end a pause.
                    _ = self.resume.notified() => {}
                }
                self.status.set(None);
                self.record_pause(None).await;
            }
            // Without a rate, claim a few rounds ahead so the connections
            // never wait on a claim; with one, claim only what can go now,
            // so nothing sits in `sending` waiting for its slot.
            let limit = self.settings.concurrency.max(1) * if interval.is_some() { 1 } else { 8 };
            let batch = match self.outbox.claim(&self.account, limit).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(account = %self.account, error = %e, "cannot claim messages");
                    Vec::new()
                }
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(self.settings.poll_interval) => {}
                    _ = self.wake.notified() => {}
                }
                continue;
            }
            let mut in_flight = tokio::task::JoinSet::new();
            let mut pause: Option<String> = None;
            for m in batch {
                if pause.is_some() {
                    self.release(m, "not attempted: the account is paused")
                        .await;
                    continue;
                }
                if let Some(step) = interval {
                    let now = Instant::now();
                    if next_slot > now {
                        tokio::time::sleep_until(next_slot).await;
                    }
                    next_slot = next_slot.max(now) + step;
                }
                let transport = self.transport.clone();
                let prepared = self.prepare(&m);
                in_flight.spawn(async move {
                    let attempt = match prepared {
                        Ok(p) => match transport.send(&p).await {
                            Ok(reply) => Attempt::Sent(reply),
                            Err(e) => Attempt::Failed(e),
                        },
                        Err(reason) => Attempt::Unbuildable(reason),
                    };
                    (m, attempt)
                });
                // Never more in flight than the concurrency.
                while in_flight.len() >= self.settings.concurrency.max(1) {
                    if let Some(Ok((m, a))) = in_flight.join_next().await
                        && let Some(p) = self.settle(m, a).await
                    {
                        pause = Some(p);
                    }
                }
            }
            while let Some(done) = in_flight.join_next().await {
                if let Ok((m, a)) = done
                    && let Some(p) = self.settle(m, a).await
                {
                    pause = Some(p);
                }
            }
            if let Some(p) = pause {
                tracing::error!(account = %self.account, reason = %p, "pausing the account's queue; fix the account and run `sendbox check`");
                self.record_pause(Some(p.clone())).await;
                self.status.set(Some(p));
            }
            // A finished batch may be followed right away by the next one.
            if futures_ready(&mut shutdown).await {
                return;
            }
        }
    }

    async fn record_pause(&self, reason: Option<String>) {
        let _ = self
            .outbox
            .set_account_paused(&self.account, reason.as_deref())
            .await;
    }

    fn prepare(&self, m: &Message) -> Result<sendbox_mail::Prepared, String> {
        let allowed = self.settings.allowed_from.of(&m.plugin);
        message::build(
            &m.email,
            &Envelope {
                account_mailbox: &self.mailbox,
                allowed_from: &allowed,
                message_id: &m.message_id,
                date: UNIX_EPOCH + Duration::from_millis(m.created_ms.max(0) as u64),
            },
        )
        .map_err(|e| e.to_string())
    }

    async fn release(&self, m: Message, why: &str) {
        let _ = self
            .outbox
            .mark(m.id, State::Queued, Some(now_ms()), why)
            .await;
    }

    /// Records an attempt's result; returns a pause reason when the account
    /// must stop.
    async fn settle(&self, m: Message, attempt: Attempt) -> Option<String> {
        let span = tracing::info_span!("deliver", account = %self.account, plugin = %m.plugin, event_id = %m.event_id, message_id = %m.message_id, id = m.id, attempt = m.attempts);
        let _e = span.enter();
        let (state, next, detail, pause) = match attempt {
            Attempt::Sent(receipt) => {
                tracing::info!(reply = %receipt.reply, refused = receipt.refused.len(), "sent");
                let mut detail = receipt.reply;
                // A refused recipient fails only itself, on record.
                for r in &receipt.refused {
                    tracing::warn!(recipient = %r.address, error = %r.error, "recipient refused; the others got the message");
                    detail.push_str(&format!("; refused {}: {}", r.address, r.error));
                }
                (State::Sent, None, detail, None)
            }
            Attempt::Unbuildable(reason) => {
                tracing::warn!(%reason, "message cannot be built; dead");
                (State::Dead, None, reason, None)
            }
            Attempt::Failed(e) if e.pauses_account() => {
                tracing::error!(error = %e, "account refused; message requeued");
                (
                    State::Queued,
                    Some(now_ms()),
                    format!("account paused: {e}"),
                    Some(e.to_string()),
                )
            }
            Attempt::Failed(e) if e.is_permanent() => {
                tracing::warn!(error = %e, "permanent failure; dead");
                (State::Dead, None, e.to_string(), None)
            }
            Attempt::Failed(e) => {
                let age = Duration::from_millis((now_ms() - m.created_ms).max(0) as u64);
                if age >= self.settings.max_age {
                    tracing::warn!(error = %e, ?age, "still failing after max_age; dead");
                    (
                        State::Dead,
                        None,
                        format!("gave up after {age:?}: {e}"),
                        None,
                    )
                } else {
                    let wait = backoff(&self.settings, m.attempts, &m.message_id);
                    tracing::info!(error = %e, retry_in = ?wait, "transient failure; will retry");
                    (
                        State::Retry,
                        Some(now_ms() + wait.as_millis() as i64),
                        e.to_string(),
                        None,
                    )
                }
            }
        };
        self.status.count(match (state, &pause) {
            (_, Some(_)) => "account_refused",
            (State::Sent, _) => "sent",
            (State::Dead, _) => "dead",
            _ => "retry",
        });
        let id = m.id;
        if let Err(e) = self.outbox.mark(id, state, next, &detail).await {
            tracing::error!(
                id,
                error = %e,
                "cannot record the delivery result; the message will be retried after a restart"
            );
        }
        pause
    }
}

/// Whether `fut` is already complete, without waiting.
async fn futures_ready<F: Future + Unpin>(fut: &mut F) -> bool {
    tokio::select! {
        biased;
        _ = fut => true,
        _ = std::future::ready(()) => false,
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
