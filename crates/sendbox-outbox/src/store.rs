//! [`Store`]: the outbox as the daemon uses it, whatever the backend —
//! async, in terms of the model only. The SQLite backend implements it on
//! `Arc<Outbox>`; a second backend implements it and runs the behavioural
//! suite ([`crate::store_behaviour_tests!`]) unchanged.
//!
//! With `Store` in scope, a method call on an `Arc<Outbox>` finds the async
//! method; code on a blocking thread calls the blocking one by its path,
//! `Outbox::plugin_state_get(&outbox, ..)`.

use std::future::Future;

use crate::{AuditEntry, Call, Committed, Mark, Message, OutboxError, PruneBefore, Pruned, State};

/// Plugin state as read: the value and its version.
pub type Versioned = (Vec<u8>, u64);

/// The outbox's operations. Every method is one atomic step: it happened
/// entirely when it returns `Ok`, and not at all on `Err`.
pub trait Store: Send + Sync + 'static {
    /// Commits one plugin call: checks policy, drops suppressed recipients,
    /// skips duplicate idempotency keys, queues the emails and applies the
    /// state writes, in one transaction, durable when this returns `Ok`.
    fn commit(&self, call: Call) -> impl Future<Output = Result<Committed, OutboxError>> + Send;

    /// Makes this process the one that delivers from this store;
    /// [`OutboxError::Locked`] names the holder otherwise.
    fn lock_for_delivery(
        &self,
        holder: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Messages left in `sending` by a previous holder go back to `queued`
    /// with their Message-ID. Only the lock holder may; returns how many.
    fn recover(&self) -> impl Future<Output = Result<usize, OutboxError>> + Send;

    /// Claims up to `limit` due messages of `account`, moving them to
    /// `sending`.
    fn claim(
        &self,
        account: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>, OutboxError>> + Send {
        self.claim_within(account, limit, u64::MAX)
    }

    /// [`Store::claim`], stopping before the claimed emails' content
    /// ([`Email::content_bytes`](sendbox_types::Email::content_bytes)) would
    /// pass `max_bytes`; the first due message is always claimed.
    fn claim_within(
        &self,
        account: &str,
        limit: usize,
        max_bytes: u64,
    ) -> impl Future<Output = Result<Vec<Message>, OutboxError>> + Send;

    /// Records a delivery attempt's result for a message in `sending`;
    /// [`OutboxError::WrongState`] if it no longer is.
    fn mark(
        &self,
        id: i64,
        to: State,
        next_attempt_ms: Option<i64>,
        detail: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Records many results in one atomic step (one transaction, one
    /// fsync). The outer `Err` means none was recorded; otherwise each mark
    /// has its own answer, in order, as [`Store::mark`] would give it.
    fn mark_many(
        &self,
        marks: Vec<Mark>,
    ) -> impl Future<Output = Result<Vec<Result<(), OutboxError>>, OutboxError>> + Send;

    /// Puts a message not being sent back in the queue now.
    fn retry_now(&self, id: i64) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Deletes a message and its audit trail.
    fn drop_message(&self, id: i64) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// One message.
    fn get(&self, id: i64) -> impl Future<Output = Result<Message, OutboxError>> + Send;

    /// Messages, newest first, optionally in one state.
    fn list(
        &self,
        state: Option<State>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>, OutboxError>> + Send;

    /// A message's state changes, oldest first.
    fn audit_trail(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, OutboxError>> + Send;

    /// How many messages are in each state.
    fn depth(&self) -> impl Future<Output = Result<Vec<(State, u64)>, OutboxError>> + Send;

    /// Adds an address to the suppression list.
    fn suppress(
        &self,
        address: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Removes an address from the suppression list; whether it was there.
    fn unsuppress(&self, address: &str) -> impl Future<Output = Result<bool, OutboxError>> + Send;

    /// The suppression list, with reasons.
    fn suppressions(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, Option<String>)>, OutboxError>> + Send;

    /// Records that `account` is paused (`Some(reason)`) or running again.
    fn set_account_paused(
        &self,
        account: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Takes the probe of `account`'s pause recorded at `since_ms` (its
    /// recheck is due): `true` for the one caller that moves the pause's
    /// time to now and tries one message, `false` when another took it or
    /// the pause changed. A store one process uses answers `true`.
    fn take_pause_probe(
        &self,
        account: &str,
        since_ms: i64,
    ) -> impl Future<Output = Result<bool, OutboxError>> + Send {
        let _ = (account, since_ms);
        async { Ok(true) }
    }

    /// Paused accounts: name, since (ms), reason.
    fn paused_accounts(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, i64, String)>, OutboxError>> + Send;

    /// Records that a schedule ran for the tick due at `scheduled_at_ms`
    /// (never moving backwards).
    fn set_schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
        scheduled_at_ms: i64,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send;

    /// Takes the schedule's tick due at `scheduled_at_ms` for this process:
    /// `true` for the first caller on the store, `false` if it was taken
    /// already (another node runs it). A backend only one process uses
    /// (SQLite, behind its delivery lock) always answers `true` and records
    /// the run afterwards with [`Store::set_schedule_run`].
    fn claim_schedule_tick(
        &self,
        plugin: &str,
        schedule: &str,
        scheduled_at_ms: i64,
    ) -> impl Future<Output = Result<bool, OutboxError>> + Send {
        let _ = (plugin, schedule, scheduled_at_ms);
        async { Ok(true) }
    }

    /// Whether several processes deliver from this store at once, so an
    /// account's rate, connections and pause are held through the store
    /// ([`Store::take_send_turn`], [`Store::hold_connections`]) rather than
    /// by each worker alone.
    fn shared(&self) -> bool {
        false
    }

    /// Under a rate every node shares: reserves `account`'s next send,
    /// `step` after the previous one whichever node made it, and says how
    /// long to wait before starting it. A store one process uses answers
    /// "now" (its worker paces itself).
    fn take_send_turn(
        &self,
        account: &str,
        step: std::time::Duration,
    ) -> impl Future<Output = Result<std::time::Duration, OutboxError>> + Send {
        let _ = (account, step);
        async { Ok(std::time::Duration::ZERO) }
    }

    /// Takes connection slots of `account` (of `max` across every node)
    /// until this process holds `want`; returns how many it holds. Until it
    /// gives them back ([`Store::release_connections`]) no other node may
    /// use them. A store one process uses grants `want` (up to `max`).
    fn hold_connections(
        &self,
        account: &str,
        want: u32,
        max: u32,
    ) -> impl Future<Output = Result<u32, OutboxError>> + Send {
        let _ = account;
        async move { Ok(want.min(max)) }
    }

    /// Gives back every connection slot of `account` this process holds;
    /// its connections to the account's server are closed by then.
    fn release_connections(
        &self,
        account: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let _ = account;
        async { Ok(()) }
    }

    /// When a schedule last ran, if ever.
    fn schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
    ) -> impl Future<Output = Result<Option<i64>, OutboxError>> + Send;

    /// One plugin state value with its version.
    fn plugin_state_get(
        &self,
        plugin: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Versioned>, OutboxError>> + Send;

    /// Plugin state keys with a prefix, in byte order, at most `limit`.
    fn plugin_state_keys(
        &self,
        plugin: &str,
        prefix: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, OutboxError>> + Send;

    /// Bytes of keys and values a plugin keeps.
    fn plugin_state_usage(
        &self,
        plugin: &str,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send;

    /// Deletes finished messages and idempotency keys past their cutoffs.
    fn prune(
        &self,
        cutoffs: PruneBefore,
    ) -> impl Future<Output = Result<Pruned, OutboxError>> + Send;
}
