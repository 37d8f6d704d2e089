//! [`AnyStore`]: the backend the config chose, as one type the daemon and
//! the delivery workers hold; every [`Store`] method goes to the backend.

use std::future::Future;
use std::sync::Arc;

use crate::store::{Store, Versioned};
use crate::{
    AuditEntry, Call, Committed, Mark, Message, Outbox, OutboxError, PgOutbox, PruneBefore, Pruned,
    State,
};

/// Either backend, chosen at start: a SQLite file of this node's own, or a
/// PostgreSQL database several nodes share.
#[derive(Clone, Debug)]
pub enum AnyStore {
    /// One node, one file.
    Sqlite(Arc<Outbox>),
    /// Several nodes, one database.
    Postgres(Arc<PgOutbox>),
}

impl From<Arc<Outbox>> for AnyStore {
    fn from(o: Arc<Outbox>) -> Self {
        AnyStore::Sqlite(o)
    }
}

impl From<Arc<PgOutbox>> for AnyStore {
    fn from(o: Arc<PgOutbox>) -> Self {
        AnyStore::Postgres(o)
    }
}

impl AnyStore {
    /// Finishes what is queued for the store and lets go of it (SQLite:
    /// the writer thread drains and stops; PostgreSQL: nothing waits).
    pub fn close(&self) {
        if let AnyStore::Sqlite(o) = self {
            o.close();
        }
    }
}

/// One [`Store`] method on whichever backend `$me` is: arguments are moved
/// into the future first, so it borrows nothing.
macro_rules! on_backend {
    ($me:expr, $method:ident ( $($arg:expr),* )) => {{
        let me = $me.clone();
        async move {
            match me {
                AnyStore::Sqlite(s) => Store::$method(&s, $($arg),*).await,
                AnyStore::Postgres(s) => Store::$method(&s, $($arg),*).await,
            }
        }
    }};
}

impl Store for AnyStore {
    fn commit(&self, call: Call) -> impl Future<Output = Result<Committed, OutboxError>> + Send {
        on_backend!(self, commit(call))
    }

    fn lock_for_delivery(
        &self,
        holder: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let holder = holder.to_owned();
        on_backend!(self, lock_for_delivery(&holder))
    }

    fn recover(&self) -> impl Future<Output = Result<usize, OutboxError>> + Send {
        on_backend!(self, recover())
    }

    fn claim_within(
        &self,
        account: &str,
        limit: usize,
        max_bytes: u64,
    ) -> impl Future<Output = Result<Vec<Message>, OutboxError>> + Send {
        let account = account.to_owned();
        on_backend!(self, claim_within(&account, limit, max_bytes))
    }

    fn mark(
        &self,
        id: i64,
        to: State,
        next_attempt_ms: Option<i64>,
        detail: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let detail = detail.to_owned();
        on_backend!(self, mark(id, to, next_attempt_ms, &detail))
    }

    fn mark_many(
        &self,
        marks: Vec<Mark>,
    ) -> impl Future<Output = Result<Vec<Result<(), OutboxError>>, OutboxError>> + Send {
        on_backend!(self, mark_many(marks))
    }

    fn retry_now(&self, id: i64) -> impl Future<Output = Result<(), OutboxError>> + Send {
        on_backend!(self, retry_now(id))
    }

    fn drop_message(&self, id: i64) -> impl Future<Output = Result<(), OutboxError>> + Send {
        on_backend!(self, drop_message(id))
    }

    fn get(&self, id: i64) -> impl Future<Output = Result<Message, OutboxError>> + Send {
        on_backend!(self, get(id))
    }

    fn list(
        &self,
        state: Option<State>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>, OutboxError>> + Send {
        on_backend!(self, list(state, limit))
    }

    fn audit_trail(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, OutboxError>> + Send {
        on_backend!(self, audit_trail(id))
    }

    fn depth(&self) -> impl Future<Output = Result<Vec<(State, u64)>, OutboxError>> + Send {
        on_backend!(self, depth())
    }

    fn suppress(
        &self,
        address: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (address, reason) = (address.to_owned(), reason.map(str::to_owned));
        on_backend!(self, suppress(&address, reason.as_deref()))
    }

    fn unsuppress(&self, address: &str) -> impl Future<Output = Result<bool, OutboxError>> + Send {
        let address = address.to_owned();
        on_backend!(self, unsuppress(&address))
    }

    fn suppressions(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, Option<String>)>, OutboxError>> + Send {
        on_backend!(self, suppressions())
    }

    fn set_account_paused(
        &self,
        account: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (account, reason) = (account.to_owned(), reason.map(str::to_owned));
        on_backend!(self, set_account_paused(&account, reason.as_deref()))
    }

    fn paused_accounts(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, i64, String)>, OutboxError>> + Send {
        on_backend!(self, paused_accounts())
    }

    fn set_schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
        scheduled_at_ms: i64,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (plugin, schedule) = (plugin.to_owned(), schedule.to_owned());
        on_backend!(self, set_schedule_run(&plugin, &schedule, scheduled_at_ms))
    }

    fn claim_schedule_tick(
        &self,
        plugin: &str,
        schedule: &str,
        scheduled_at_ms: i64,
    ) -> impl Future<Output = Result<bool, OutboxError>> + Send {
        let (plugin, schedule) = (plugin.to_owned(), schedule.to_owned());
        on_backend!(
            self,
            claim_schedule_tick(&plugin, &schedule, scheduled_at_ms)
        )
    }

    fn shared(&self) -> bool {
        match self {
            AnyStore::Sqlite(s) => Store::shared(s),
            AnyStore::Postgres(s) => Store::shared(s),
        }
    }

    fn take_send_turn(
        &self,
        account: &str,
        step: std::time::Duration,
    ) -> impl Future<Output = Result<std::time::Duration, OutboxError>> + Send {
        let account = account.to_owned();
        on_backend!(self, take_send_turn(&account, step))
    }

    fn hold_connections(
        &self,
        account: &str,
        want: u32,
        max: u32,
    ) -> impl Future<Output = Result<u32, OutboxError>> + Send {
        let account = account.to_owned();
        on_backend!(self, hold_connections(&account, want, max))
    }

    fn take_pause_probe(
        &self,
        account: &str,
        since_ms: i64,
    ) -> impl Future<Output = Result<bool, OutboxError>> + Send {
        let account = account.to_owned();
        on_backend!(self, take_pause_probe(&account, since_ms))
    }

    fn release_connections(
        &self,
        account: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let account = account.to_owned();
        on_backend!(self, release_connections(&account))
    }

    fn schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
    ) -> impl Future<Output = Result<Option<i64>, OutboxError>> + Send {
        let (plugin, schedule) = (plugin.to_owned(), schedule.to_owned());
        on_backend!(self, schedule_run(&plugin, &schedule))
    }

    fn plugin_state_get(
        &self,
        plugin: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Versioned>, OutboxError>> + Send {
        let (plugin, key) = (plugin.to_owned(), key.to_owned());
        on_backend!(self, plugin_state_get(&plugin, &key))
    }

    fn plugin_state_keys(
        &self,
        plugin: &str,
        prefix: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, OutboxError>> + Send {
        let (plugin, prefix) = (plugin.to_owned(), prefix.to_owned());
        on_backend!(self, plugin_state_keys(&plugin, &prefix, limit))
    }

    fn plugin_state_usage(
        &self,
        plugin: &str,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send {
        let plugin = plugin.to_owned();
        on_backend!(self, plugin_state_usage(&plugin))
    }

    fn prune(
        &self,
        cutoffs: PruneBefore,
    ) -> impl Future<Output = Result<Pruned, OutboxError>> + Send {
        on_backend!(self, prune(cutoffs))
    }
}
