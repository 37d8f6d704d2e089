//! [`Store`] for the SQLite backend: commits go to the writer thread and
//! are awaited; everything else runs on tokio's blocking threads (each is a
//! short statement on the reader connection or the writer thread).

use std::future::Future;
use std::sync::Arc;

use super::Outbox;
use crate::store::{Store, Versioned};
use crate::{
    AuditEntry, Call, Committed, Mark, Message, OutboxError, PruneBefore, Pruned, State,
    StorageError,
};

/// Runs `f` on a blocking thread with the outbox.
fn blocking<T: Send + 'static>(
    outbox: &Arc<Outbox>,
    f: impl FnOnce(&Outbox) -> Result<T, OutboxError> + Send + 'static,
) -> impl Future<Output = Result<T, OutboxError>> + Send + 'static {
    let outbox = outbox.clone();
    async move {
        tokio::task::spawn_blocking(move || f(&outbox))
            .await
            .map_err(|e| OutboxError::Storage(StorageError(format!("outbox task failed: {e}"))))?
    }
}

impl Store for Arc<Outbox> {
    fn commit(&self, call: Call) -> impl Future<Output = Result<Committed, OutboxError>> + Send {
        let outbox = self.clone();
        async move { outbox.commit_async(call).await }
    }

    fn lock_for_delivery(
        &self,
        holder: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let holder = holder.to_owned();
        blocking(self, move |o| o.lock_for_delivery(&holder))
    }

    fn recover(&self) -> impl Future<Output = Result<usize, OutboxError>> + Send {
        blocking(self, Outbox::recover)
    }

    fn claim_within(
        &self,
        account: &str,
        limit: usize,
        max_bytes: u64,
    ) -> impl Future<Output = Result<Vec<Message>, OutboxError>> + Send {
        let (outbox, account) = (self.clone(), account.to_owned());
        async move { outbox.claim_within_async(&account, limit, max_bytes).await }
    }

    fn mark(
        &self,
        id: i64,
        to: State,
        next_attempt_ms: Option<i64>,
        detail: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let detail = detail.to_owned();
        blocking(self, move |o| o.mark(id, to, next_attempt_ms, &detail))
    }

    fn mark_many(
        &self,
        marks: Vec<Mark>,
    ) -> impl Future<Output = Result<Vec<Result<(), OutboxError>>, OutboxError>> + Send {
        let outbox = self.clone();
        async move { outbox.mark_many_async(marks).await }
    }

    fn retry_now(&self, id: i64) -> impl Future<Output = Result<(), OutboxError>> + Send {
        blocking(self, move |o| o.retry_now(id))
    }

    fn drop_message(&self, id: i64) -> impl Future<Output = Result<(), OutboxError>> + Send {
        blocking(self, move |o| o.drop_message(id))
    }

    fn get(&self, id: i64) -> impl Future<Output = Result<Message, OutboxError>> + Send {
        blocking(self, move |o| o.get(id))
    }

    fn list(
        &self,
        state: Option<State>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>, OutboxError>> + Send {
        blocking(self, move |o| o.list(state, limit))
    }

    fn audit_trail(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, OutboxError>> + Send {
        blocking(self, move |o| o.audit_trail(id))
    }

    fn depth(&self) -> impl Future<Output = Result<Vec<(State, u64)>, OutboxError>> + Send {
        blocking(self, Outbox::depth)
    }

    fn suppress(
        &self,
        address: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (address, reason) = (address.to_owned(), reason.map(str::to_owned));
        blocking(self, move |o| o.suppress(&address, reason.as_deref()))
    }

    fn unsuppress(&self, address: &str) -> impl Future<Output = Result<bool, OutboxError>> + Send {
        let address = address.to_owned();
        blocking(self, move |o| o.unsuppress(&address))
    }

    fn suppressions(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, Option<String>)>, OutboxError>> + Send {
        blocking(self, Outbox::suppressions)
    }

    fn set_account_paused(
        &self,
        account: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (account, reason) = (account.to_owned(), reason.map(str::to_owned));
        blocking(self, move |o| {
            o.set_account_paused(&account, reason.as_deref())
        })
    }

    fn paused_accounts(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, i64, String)>, OutboxError>> + Send {
        blocking(self, Outbox::paused_accounts)
    }

    fn set_schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
        scheduled_at_ms: i64,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (plugin, schedule) = (plugin.to_owned(), schedule.to_owned());
        blocking(self, move |o| {
            o.set_schedule_run(&plugin, &schedule, scheduled_at_ms)
        })
    }

    fn schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
    ) -> impl Future<Output = Result<Option<i64>, OutboxError>> + Send {
        let (plugin, schedule) = (plugin.to_owned(), schedule.to_owned());
        blocking(self, move |o| o.schedule_run(&plugin, &schedule))
    }

    fn plugin_state_get(
        &self,
        plugin: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Versioned>, OutboxError>> + Send {
        let (plugin, key) = (plugin.to_owned(), key.to_owned());
        blocking(self, move |o| o.plugin_state_get(&plugin, &key))
    }

    fn plugin_state_keys(
        &self,
        plugin: &str,
        prefix: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, OutboxError>> + Send {
        let (plugin, prefix) = (plugin.to_owned(), prefix.to_owned());
        blocking(self, move |o| o.plugin_state_keys(&plugin, &prefix, limit))
    }

    fn plugin_state_usage(
        &self,
        plugin: &str,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send {
        let plugin = plugin.to_owned();
        blocking(self, move |o| o.plugin_state_usage(&plugin))
    }

    fn prune(
        &self,
        cutoffs: PruneBefore,
    ) -> impl Future<Output = Result<Pruned, OutboxError>> + Send {
        blocking(self, move |o| o.prune(cutoffs))
    }
}
