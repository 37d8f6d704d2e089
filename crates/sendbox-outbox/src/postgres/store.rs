//! [`Store`] for the PostgreSQL backend: the commit, reads and operator
//! actions as inherent methods, and the trait delegating to them.

use std::future::Future;
use std::sync::Arc;

use super::{COLUMNS, PgOutbox, commit, pg_err, read_message};
use crate::store::{Store, Versioned};
use crate::{
    AuditEntry, Call, Committed, Mark, Message, OutboxError, PruneBefore, Pruned, State, now_ms,
};

/// Rows deleted per statement by [`PgOutbox::prune`].
const PRUNE_BATCH: i64 = 1000;

impl PgOutbox {
    /// Commits one plugin call; durable (the server has fsynced it) when
    /// this returns `Ok`, nothing of it stored on `Err`. Calls committed
    /// while others are being written wait and go together, in one
    /// transaction (see `group`).
    pub async fn commit(&self, call: Call) -> Result<Committed, OutboxError> {
        self.commits.commit(&self.pool, call).await
    }

    /// Transactions that committed calls, and the calls they held: fewer
    /// transactions than calls when commits were grouped.
    pub fn commit_groups(&self) -> (u64, u64) {
        self.commits.counts()
    }

    /// Makes the next run of `plugin` the only one committing across all
    /// nodes until the returned [`PluginAlone`] is dropped: the plugin's
    /// commit lock is held, on a connection of its own, from before the
    /// event reads its state until its commit. Other nodes' commits of the
    /// plugin that need the lock wait meanwhile, so the event cannot
    /// conflict. (Within one node the dispatcher already lets no other
    /// event of the plugin run.)
    pub async fn plugin_alone(&self, plugin: &str) -> Result<PluginAlone, OutboxError> {
        let client = self.pool.connect().await?;
        client
            .execute(
                "SELECT pg_advisory_lock(hashtextextended($1, 0))",
                &[&plugin],
            )
            .await
            .map_err(pg_err)?;
        Ok(PluginAlone {
            client,
            statements: Default::default(),
        })
    }

    /// One message.
    pub async fn get(&self, id: i64) -> Result<Message, OutboxError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                &format!("SELECT {COLUMNS} FROM messages WHERE id = $1"),
                &[&id],
            )
            .await
            .map_err(pg_err)?
            .ok_or(OutboxError::NotFound(id))?;
        read_message(&row)
    }

    /// Messages, newest first, optionally in one state.
    pub async fn list(
        &self,
        state: Option<State>,
        limit: usize,
    ) -> Result<Vec<Message>, OutboxError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM messages WHERE ($1::text IS NULL OR state = $1) \
                     ORDER BY id DESC LIMIT $2"
                ),
                &[
                    &state.map(State::as_str),
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(read_message).collect()
    }

    /// A message's audit trail, oldest first.
    pub async fn audit_trail(&self, id: i64) -> Result<Vec<AuditEntry>, OutboxError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                "SELECT at_ms, from_state, to_state, detail FROM audit WHERE message = $1 ORDER BY id",
                &[&id],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                at_ms: r.get(0),
                from: r.get(1),
                to: r.get(2),
                detail: r.get(3),
            })
            .collect())
    }

    /// How many messages are in each state.
    pub async fn depth(&self) -> Result<Vec<(State, u64)>, OutboxError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query("SELECT state, COUNT(*) FROM messages GROUP BY state", &[])
            .await
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| (State::parse(r.get(0)), r.get::<_, i64>(1).max(0) as u64))
            .collect())
    }

    /// Deletes a message and its audit trail.
    pub async fn drop_message(&self, id: i64) -> Result<(), OutboxError> {
        let conn = self.pool.get().await?;
        let n = conn
            .execute("DELETE FROM messages WHERE id = $1", &[&id])
            .await
            .map_err(pg_err)?;
        if n == 0 {
            return Err(OutboxError::NotFound(id));
        }
        Ok(())
    }

    /// Adds an address to the suppression list.
    pub async fn suppress(&self, address: &str, reason: Option<&str>) -> Result<(), OutboxError> {
        let address = address.trim().to_ascii_lowercase();
        let conn = self.pool.get().await?;
        conn.execute(
            "INSERT INTO suppressions (address, added_ms, reason) VALUES ($1, $2, $3) \
             ON CONFLICT (address) DO UPDATE SET reason = excluded.reason",
            &[&address, &now_ms(), &reason],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    /// Removes an address from the suppression list; whether it was there.
    pub async fn unsuppress(&self, address: &str) -> Result<bool, OutboxError> {
        let address = address.trim().to_ascii_lowercase();
        let conn = self.pool.get().await?;
        let n = conn
            .execute("DELETE FROM suppressions WHERE address = $1", &[&address])
            .await
            .map_err(pg_err)?;
        Ok(n > 0)
    }

    /// The suppression list, with reasons.
    pub async fn suppressions(&self) -> Result<Vec<(String, Option<String>)>, OutboxError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                "SELECT address, reason FROM suppressions ORDER BY address",
                &[],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Records that `account` is paused (`Some(reason)`) or running again,
    /// for every node.
    pub async fn set_account_paused(
        &self,
        account: &str,
        reason: Option<&str>,
    ) -> Result<(), OutboxError> {
        let conn = self.pool.get().await?;
        match reason {
            Some(r) => conn
                .execute(
                    "INSERT INTO account_status (account, paused_ms, reason) VALUES ($1, $2, $3) \
                     ON CONFLICT (account) DO UPDATE SET paused_ms = excluded.paused_ms, reason = excluded.reason",
                    &[&account, &now_ms(), &r],
                )
                .await
                .map_err(pg_err)?,
            None => conn
                .execute("DELETE FROM account_status WHERE account = $1", &[&account])
                .await
                .map_err(pg_err)?,
        };
        Ok(())
    }

    /// Takes the probe of `account`'s pause recorded at `since_ms`: moves
    /// the pause's time to now if it is still that pause; whether it did.
    pub async fn take_pause_probe(
        &self,
        account: &str,
        since_ms: i64,
    ) -> Result<bool, OutboxError> {
        let conn = self.pool.get().await?;
        let n = conn
            .execute(
                "UPDATE account_status SET paused_ms = $3 WHERE account = $1 AND paused_ms = $2",
                &[&account, &since_ms, &now_ms().max(since_ms + 1)],
            )
            .await
            .map_err(pg_err)?;
        Ok(n == 1)
    }

    /// Paused accounts: name, since (ms), reason.
    pub async fn paused_accounts(&self) -> Result<Vec<(String, i64, String)>, OutboxError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                "SELECT account, paused_ms, reason FROM account_status ORDER BY account",
                &[],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Records that a schedule ran for the tick due at `scheduled_at_ms`
    /// (never moving backwards).
    pub async fn set_schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
        scheduled_at_ms: i64,
    ) -> Result<(), OutboxError> {
        let conn = self.pool.get().await?;
        conn.execute(
            "INSERT INTO schedule_runs (plugin, schedule, last_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (plugin, schedule) DO UPDATE SET last_ms = GREATEST(schedule_runs.last_ms, excluded.last_ms)",
            &[&plugin, &schedule, &scheduled_at_ms],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    /// Takes a schedule's tick for this node: the first node to ask for
    /// (schedule, due time) gets `true` and runs it, every other `false`.
    pub async fn claim_schedule_tick(
        &self,
        plugin: &str,
        schedule: &str,
        scheduled_at_ms: i64,
    ) -> Result<bool, OutboxError> {
        let conn = self.pool.get().await?;
        let taken = conn
            .query_opt(
                "INSERT INTO schedule_runs (plugin, schedule, last_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (plugin, schedule) DO UPDATE SET last_ms = excluded.last_ms \
                 WHERE schedule_runs.last_ms < excluded.last_ms RETURNING 1",
                &[&plugin, &schedule, &scheduled_at_ms],
            )
            .await
            .map_err(pg_err)?;
        Ok(taken.is_some())
    }

    /// When a schedule last ran, if ever.
    pub async fn schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
    ) -> Result<Option<i64>, OutboxError> {
        let conn = self.pool.get().await?;
        Ok(conn
            .query_opt(
                "SELECT last_ms FROM schedule_runs WHERE plugin = $1 AND schedule = $2",
                &[&plugin, &schedule],
            )
            .await
            .map_err(pg_err)?
            .map(|r| r.get(0)))
    }

    /// One plugin state value with its version.
    pub async fn plugin_state_get(
        &self,
        plugin: &str,
        key: &str,
    ) -> Result<Option<Versioned>, OutboxError> {
        let conn = self.pool.get().await?;
        Ok(conn
            .query_opt(
                "SELECT value, version FROM plugin_state WHERE plugin = $1 AND key = $2",
                &[&plugin, &key],
            )
            .await
            .map_err(pg_err)?
            .map(|r| (r.get(0), r.get::<_, i64>(1).max(0) as u64)))
    }

    /// Plugin state keys with a prefix, in byte order, at most `limit`.
    pub async fn plugin_state_keys(
        &self,
        plugin: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<String>, OutboxError> {
        let conn = self.pool.get().await?;
        commit::keys(&*conn, plugin, prefix, limit).await
    }

    /// Bytes of keys and values a plugin keeps.
    pub async fn plugin_state_usage(&self, plugin: &str) -> Result<u64, OutboxError> {
        let conn = self.pool.get().await?;
        Ok(conn
            .query_opt(
                "SELECT bytes FROM plugin_usage WHERE plugin = $1",
                &[&plugin],
            )
            .await
            .map_err(pg_err)?
            .map_or(0, |r| r.get::<_, i64>(0).max(0) as u64))
    }

    /// Deletes finished messages and idempotency keys past their cutoffs,
    /// in batches so no statement holds many rows at once.
    pub async fn prune(&self, cutoffs: PruneBefore) -> Result<Pruned, OutboxError> {
        let conn = self.pool.get().await?;
        let mut pruned = Pruned::default();
        loop {
            let mut n = 0;
            for (state, before) in [("sent", cutoffs.sent_ms), ("dead", cutoffs.dead_ms)] {
                n += conn
                    .execute(
                        "DELETE FROM messages WHERE id IN (SELECT id FROM messages \
                         WHERE state = $1 AND updated_ms < $2 LIMIT $3)",
                        &[&state, &before, &PRUNE_BATCH],
                    )
                    .await
                    .map_err(pg_err)?;
            }
            let keys = conn
                .execute(
                    "DELETE FROM idempotency WHERE (plugin, key) IN (SELECT plugin, key FROM idempotency \
                     WHERE created_ms < $1 LIMIT $2)",
                    &[&cutoffs.idempotency_ms, &PRUNE_BATCH],
                )
                .await
                .map_err(pg_err)?;
            pruned.messages += n;
            pruned.idempotency_keys += keys;
            if n < PRUNE_BATCH as u64 && keys < PRUNE_BATCH as u64 {
                return Ok(pruned);
            }
        }
    }
}

/// A plugin's commit lock held across nodes; released when dropped (its
/// connection closes).
pub struct PluginAlone {
    client: tokio_postgres::Client,
    statements: super::pool::Statements,
}

impl PluginAlone {
    /// Commits the plugin's call under the held lock (taken again by the
    /// commit in the same session, so it does not wait for itself).
    pub async fn commit(&mut self, call: Call) -> Result<Committed, OutboxError> {
        super::group::alone(&mut self.client, &mut self.statements, &call).await
    }
}

impl Store for Arc<PgOutbox> {
    fn commit(&self, call: Call) -> impl Future<Output = Result<Committed, OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::commit(&o, call).await }
    }

    /// Registers this node (several nodes deliver from one database; the
    /// leases keep them apart).
    fn lock_for_delivery(
        &self,
        holder: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (o, holder) = (
            self.clone(),
            format!("{holder} (pid {})", std::process::id()),
        );
        async move { o.heartbeat(Some(&holder)).await }
    }

    fn recover(&self) -> impl Future<Output = Result<usize, OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::recover(&o).await }
    }

    fn claim_within(
        &self,
        account: &str,
        limit: usize,
        max_bytes: u64,
    ) -> impl Future<Output = Result<Vec<Message>, OutboxError>> + Send {
        let (o, account) = (self.clone(), account.to_owned());
        async move { PgOutbox::claim_within(&o, &account, limit, max_bytes).await }
    }

    fn shared(&self) -> bool {
        true
    }

    fn take_send_turn(
        &self,
        account: &str,
        step: std::time::Duration,
    ) -> impl Future<Output = Result<std::time::Duration, OutboxError>> + Send {
        let (o, account) = (self.clone(), account.to_owned());
        async move { PgOutbox::take_send_turn(&o, &account, step).await }
    }

    fn hold_connections(
        &self,
        account: &str,
        want: u32,
        max: u32,
    ) -> impl Future<Output = Result<u32, OutboxError>> + Send {
        let (o, account) = (self.clone(), account.to_owned());
        async move { PgOutbox::hold_connections(&o, &account, want, max).await }
    }

    fn take_pause_probe(
        &self,
        account: &str,
        since_ms: i64,
    ) -> impl Future<Output = Result<bool, OutboxError>> + Send {
        let (o, account) = (self.clone(), account.to_owned());
        async move { PgOutbox::take_pause_probe(&o, &account, since_ms).await }
    }

    fn release_connections(
        &self,
        account: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (o, account) = (self.clone(), account.to_owned());
        async move { PgOutbox::release_connections(&o, &account).await }
    }

    fn mark(
        &self,
        id: i64,
        to: State,
        next_attempt_ms: Option<i64>,
        detail: &str,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let mark = Mark {
            id,
            to,
            next_attempt_ms,
            detail: detail.to_owned(),
            attempted: true,
        };
        let o = self.clone();
        async move {
            PgOutbox::mark_many(&o, vec![mark])
                .await?
                .pop()
                .unwrap_or(Err(OutboxError::NotFound(id)))
        }
    }

    fn mark_many(
        &self,
        marks: Vec<Mark>,
    ) -> impl Future<Output = Result<Vec<Result<(), OutboxError>>, OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::mark_many(&o, marks).await }
    }

    fn retry_now(&self, id: i64) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let o = self.clone();
        async move {
            o.transition(
                id,
                &[State::Dead, State::Retry, State::Queued, State::Sent],
                State::Queued,
                Some(now_ms()),
                "retry requested by the operator",
            )
            .await
        }
    }

    fn drop_message(&self, id: i64) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::drop_message(&o, id).await }
    }

    fn get(&self, id: i64) -> impl Future<Output = Result<Message, OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::get(&o, id).await }
    }

    fn list(
        &self,
        state: Option<State>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Message>, OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::list(&o, state, limit).await }
    }

    fn audit_trail(
        &self,
        id: i64,
    ) -> impl Future<Output = Result<Vec<AuditEntry>, OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::audit_trail(&o, id).await }
    }

    fn depth(&self) -> impl Future<Output = Result<Vec<(State, u64)>, OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::depth(&o).await }
    }

    fn suppress(
        &self,
        address: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (o, address, reason) = (self.clone(), address.to_owned(), reason.map(str::to_owned));
        async move { PgOutbox::suppress(&o, &address, reason.as_deref()).await }
    }

    fn unsuppress(&self, address: &str) -> impl Future<Output = Result<bool, OutboxError>> + Send {
        let (o, address) = (self.clone(), address.to_owned());
        async move { PgOutbox::unsuppress(&o, &address).await }
    }

    fn suppressions(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, Option<String>)>, OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::suppressions(&o).await }
    }

    fn set_account_paused(
        &self,
        account: &str,
        reason: Option<&str>,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (o, account, reason) = (self.clone(), account.to_owned(), reason.map(str::to_owned));
        async move { PgOutbox::set_account_paused(&o, &account, reason.as_deref()).await }
    }

    fn paused_accounts(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, i64, String)>, OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::paused_accounts(&o).await }
    }

    fn set_schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
        scheduled_at_ms: i64,
    ) -> impl Future<Output = Result<(), OutboxError>> + Send {
        let (o, plugin, schedule) = (self.clone(), plugin.to_owned(), schedule.to_owned());
        async move { PgOutbox::set_schedule_run(&o, &plugin, &schedule, scheduled_at_ms).await }
    }

    fn claim_schedule_tick(
        &self,
        plugin: &str,
        schedule: &str,
        scheduled_at_ms: i64,
    ) -> impl Future<Output = Result<bool, OutboxError>> + Send {
        let (o, plugin, schedule) = (self.clone(), plugin.to_owned(), schedule.to_owned());
        async move { PgOutbox::claim_schedule_tick(&o, &plugin, &schedule, scheduled_at_ms).await }
    }

    fn schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
    ) -> impl Future<Output = Result<Option<i64>, OutboxError>> + Send {
        let (o, plugin, schedule) = (self.clone(), plugin.to_owned(), schedule.to_owned());
        async move { PgOutbox::schedule_run(&o, &plugin, &schedule).await }
    }

    fn plugin_state_get(
        &self,
        plugin: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Versioned>, OutboxError>> + Send {
        let (o, plugin, key) = (self.clone(), plugin.to_owned(), key.to_owned());
        async move { PgOutbox::plugin_state_get(&o, &plugin, &key).await }
    }

    fn plugin_state_keys(
        &self,
        plugin: &str,
        prefix: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, OutboxError>> + Send {
        let (o, plugin, prefix) = (self.clone(), plugin.to_owned(), prefix.to_owned());
        async move { PgOutbox::plugin_state_keys(&o, &plugin, &prefix, limit).await }
    }

    fn plugin_state_usage(
        &self,
        plugin: &str,
    ) -> impl Future<Output = Result<u64, OutboxError>> + Send {
        let (o, plugin) = (self.clone(), plugin.to_owned());
        async move { PgOutbox::plugin_state_usage(&o, &plugin).await }
    }

    fn prune(
        &self,
        cutoffs: PruneBefore,
    ) -> impl Future<Output = Result<Pruned, OutboxError>> + Send {
        let o = self.clone();
        async move { PgOutbox::prune(&o, cutoffs).await }
    }
}
