//! Delivery on a shared database: claims that never take a message another
//! node holds, results fenced by the lease, leases renewed while this node
//! lives and freed when a node dies.
//!
//! - A claim locks due rows `FOR UPDATE SKIP LOCKED` (rows another node is
//!   claiming right now are skipped, not waited for) and writes this node's
//!   id and a lease expiry on each.
//! - A result is recorded only if the message is still `sending` under this
//!   node's lease; otherwise it is refused (`WrongState`) and changes
//!   nothing — a node that lost its lease (paused too long, cut off) cannot
//!   overwrite what the node that took the message over recorded.
//! - The keeper renews this node's leases and heartbeat every third of the
//!   lease, and puts messages whose lease expired (their node died) back in
//!   the queue with their Message-ID.

use std::collections::HashMap;
use std::sync::Weak;

use tokio_postgres::Transaction;

use super::{COLUMNS, NodeSeen, PgOutbox, audit, message_from_row, pg_err};
use crate::{Mark, Message, OutboxError, State, now_ms};

impl PgOutbox {
    pub(super) fn lease_ms(&self) -> i64 {
        self.lease.as_millis().min(i64::MAX as u128) as i64
    }

    /// Claims up to `limit` due messages of `account` for this node, in due
    /// order, stopping before their content passes `max_bytes` (the first is
    /// always taken).
    pub async fn claim_within(
        &self,
        account: &str,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Message>, OutboxError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(pg_err)?;
        let now = now_ms();
        let due = tx
            .query(
                "SELECT id, bytes, state FROM messages WHERE account = $1 AND state IN ('queued', 'retry') \
                 AND next_attempt_ms <= $2 ORDER BY next_attempt_ms, id LIMIT $3 FOR UPDATE SKIP LOCKED",
                &[&account, &now, &(limit.min(i64::MAX as usize) as i64)],
            )
            .await
            .map_err(pg_err)?;
        let (mut ids, mut froms, mut total) = (Vec::new(), Vec::new(), 0u64);
        for r in &due {
            total = total.saturating_add(r.get::<_, i64>(1).max(0) as u64);
            if total > max_bytes && !ids.is_empty() {
                break;
            }
            ids.push(r.get::<_, i64>(0));
            froms.push(r.get::<_, String>(2));
        }
        if ids.is_empty() {
            tx.commit().await.map_err(pg_err)?;
            return Ok(Vec::new());
        }
        let until = now.saturating_add(self.lease_ms());
        let rows = tx
            .query(
                &format!(
                    "UPDATE messages SET state = 'sending', attempts = attempts + 1, updated_ms = $2, \
                     lease_node = $3, lease_until_ms = $4 WHERE id = ANY($1) RETURNING {COLUMNS}"
                ),
                &[&ids, &now, &self.node, &until],
            )
            .await
            .map_err(pg_err)?;
        let by = format!("claimed by node {}", self.node);
        tx.execute(
            "INSERT INTO audit (message, at_ms, from_state, to_state, detail) \
             SELECT m, $2, f, 'sending', $4 FROM unnest($1::bigint[], $3::text[]) AS u(m, f)",
            &[&ids, &now, &froms, &by],
        )
        .await
        .map_err(pg_err)?;
        let mut claimed: HashMap<i64, Message> = HashMap::with_capacity(rows.len());
        for r in &rows {
            match message_from_row(r) {
                Ok(m) => {
                    claimed.insert(m.id, m);
                }
                // Such a message would block its account's queue at every
                // claim: it goes dead, with the reason, instead.
                Err(why) => {
                    let id: i64 = r.get(0);
                    let detail = format!("the stored email cannot be read: {why}");
                    tracing::error!(id, %detail, "message cannot be read; dead");
                    tx.execute(
                        "UPDATE messages SET state = 'dead', updated_ms = $2, last_reply = $3, \
                         lease_node = NULL, lease_until_ms = NULL WHERE id = $1",
                        &[&id, &now, &detail],
                    )
                    .await
                    .map_err(pg_err)?;
                    audit(&tx, id, Some("sending"), "dead", Some(&detail)).await?;
                }
            }
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(ids.iter().filter_map(|id| claimed.remove(id)).collect())
    }

    /// Records results in one transaction, each fenced by this node's
    /// lease; the outer `Err` means none was recorded.
    pub async fn mark_many(
        &self,
        marks: Vec<Mark>,
    ) -> Result<Vec<Result<(), OutboxError>>, OutboxError> {
        if marks.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(pg_err)?;
        // Rows are locked in id order, as the lease keeper's renewal locks
        // them: two transactions that take the same rows in opposite
        // orders deadlock, and PostgreSQL fails one of them.
        let mut order: Vec<usize> = (0..marks.len()).collect();
        order.sort_by_key(|&i| marks[i].id);
        let mut answers: Vec<Option<Result<(), OutboxError>>> =
            std::iter::repeat_with(|| None).take(marks.len()).collect();
        for i in order {
            answers[i] = Some(self.mark_in(&tx, &marks[i]).await?);
        }
        tx.commit().await.map_err(pg_err)?;
        Ok(answers.into_iter().flatten().collect())
    }

    /// One result inside `tx`: `Ok(Err(_))` is a refusal that changed
    /// nothing, `Err(_)` a failure of the store.
    async fn mark_in(
        &self,
        tx: &Transaction<'_>,
        m: &Mark,
    ) -> Result<Result<(), OutboxError>, OutboxError> {
        let now = now_ms();
        let done = tx
            .query_opt(
                // A message handed back unattempted gets back the
                // attempt its claim counted.
                "UPDATE messages SET state = $2, updated_ms = $3, last_reply = $4, \
                 next_attempt_ms = COALESCE($5, next_attempt_ms), lease_node = NULL, lease_until_ms = NULL, \
                 attempts = CASE WHEN $7 THEN attempts ELSE GREATEST(attempts - 1, 0) END \
                 WHERE id = $1 AND state = 'sending' AND lease_node = $6 RETURNING id",
                &[
                    &m.id,
                    &m.to.as_str(),
                    &now,
                    &m.detail,
                    &m.next_attempt_ms,
                    &self.node,
                    &m.attempted,
                ],
            )
            .await
            .map_err(pg_err)?;
        if done.is_some() {
            audit(tx, m.id, Some("sending"), m.to.as_str(), Some(&m.detail)).await?;
            return Ok(Ok(()));
        }
        let now = tx
            .query_opt(
                "SELECT state, lease_node FROM messages WHERE id = $1",
                &[&m.id],
            )
            .await
            .map_err(pg_err)?;
        Ok(Err(match now {
            None => OutboxError::NotFound(m.id),
            Some(r) => {
                let state: String = r.get(0);
                let holder: Option<String> = r.get(1);
                OutboxError::WrongState {
                    id: m.id,
                    state: match holder {
                        Some(h) if state == "sending" => format!("sending under node {h}'s lease"),
                        _ => state,
                    },
                    expected: format!("sending under node {}'s lease", self.node),
                }
            }
        }))
    }

    /// Moves message `id` from one of `from_any` to `to`, on record.
    pub(super) async fn transition(
        &self,
        id: i64,
        from_any: &[State],
        to: State,
        next_attempt_ms: Option<i64>,
        detail: &str,
    ) -> Result<(), OutboxError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(pg_err)?;
        let from: Option<String> = tx
            .query_opt(
                "SELECT state FROM messages WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(pg_err)?
            .map(|r| r.get(0));
        let Some(from) = from else {
            return Err(OutboxError::NotFound(id));
        };
        if !from_any.iter().any(|s| s.as_str() == from) {
            return Err(crate::policy::wrong_state(id, from, from_any));
        }
        tx.execute(
            "UPDATE messages SET state = $2, updated_ms = $3, last_reply = $4, \
             next_attempt_ms = COALESCE($5, next_attempt_ms), lease_node = NULL, lease_until_ms = NULL \
             WHERE id = $1",
            &[&id, &to.as_str(), &now_ms(), &detail, &next_attempt_ms],
        )
        .await
        .map_err(pg_err)?;
        audit(&tx, id, Some(&from), to.as_str(), Some(detail)).await?;
        tx.commit().await.map_err(pg_err)?;
        Ok(())
    }

    /// Puts back in the queue, with their Message-IDs, the messages this
    /// node held before it restarted and those whose lease expired (their
    /// node died); returns how many.
    pub async fn recover(&self) -> Result<usize, OutboxError> {
        self.free_leases(true).await
    }

    /// Requeues expired leases (and, with `own`, this node's) in one
    /// statement, each with its audit row; returns how many.
    async fn free_leases(&self, own: bool) -> Result<usize, OutboxError> {
        let conn = self.pool.get().await?;
        let now = now_ms();
        let rows = conn
            .query(
                "WITH old AS (
                    SELECT id, lease_node FROM messages
                    WHERE state = 'sending'
                      AND (($3 AND lease_node = $1) OR lease_node IS NULL OR lease_until_ms < $2)
                    FOR UPDATE SKIP LOCKED
                 ), freed AS (
                    UPDATE messages m SET state = 'queued', updated_ms = $2, lease_node = NULL, lease_until_ms = NULL
                    FROM old WHERE m.id = old.id
                    RETURNING m.id, old.lease_node
                 )
                 INSERT INTO audit (message, at_ms, from_state, to_state, detail)
                 SELECT id, $2, 'sending', 'queued',
                        'recovered after restart: was being sent by node ' || COALESCE(lease_node, '?') ||
                        ', whose lease ' || CASE WHEN lease_node = $1 THEN 'this node held before it restarted'
                                                 ELSE 'expired' END
                 FROM freed RETURNING message",
                &[&self.node, &now, &own],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows.len())
    }

    /// Says this node is alive (for `sendbox check` on any node), with
    /// what it is (`Some`: pid, command) or keeping what it said before.
    pub async fn heartbeat(&self, detail: Option<&str>) -> Result<(), OutboxError> {
        let conn = self.pool.get().await?;
        let now = now_ms();
        conn.execute(
            "INSERT INTO nodes (node, started_ms, seen_ms, detail) VALUES ($1, $2, $2, COALESCE($3, '')) \
             ON CONFLICT (node) DO UPDATE SET seen_ms = excluded.seen_ms, \
             detail = COALESCE($3, nodes.detail)",
            &[&self.node, &now, &detail],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    /// The nodes that have used this database, most recently seen first,
    /// with how many messages each holds under a lease now.
    pub async fn nodes(&self) -> Result<Vec<NodeSeen>, OutboxError> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query(
                "SELECT n.node, n.seen_ms, n.detail, \
                 (SELECT COUNT(*) FROM messages m WHERE m.state = 'sending' AND m.lease_node = n.node) \
                 FROM nodes n ORDER BY n.seen_ms DESC, n.node",
                &[],
            )
            .await
            .map_err(pg_err)?;
        Ok(rows
            .iter()
            .map(|r| NodeSeen {
                node: r.get(0),
                seen_ms: r.get(1),
                detail: r.get(2),
                leases: r.get::<_, i64>(3).max(0) as u64,
            })
            .collect())
    }

    /// Extends this node's leases by a full lease from now.
    async fn renew_leases(&self) -> Result<u64, OutboxError> {
        let conn = self.pool.get().await?;
        let until = now_ms().saturating_add(self.lease_ms());
        conn.execute(
            // In id order, as results are recorded (see `mark_many`).
            "UPDATE messages SET lease_until_ms = $2 WHERE id IN (SELECT id FROM messages \
             WHERE state = 'sending' AND lease_node = $1 ORDER BY id FOR UPDATE)",
            &[&self.node, &until],
        )
        .await
        .map_err(pg_err)
    }
}

/// Runs until the outbox is dropped: every third of the lease, renews this
/// node's leases and heartbeat and frees expired ones. A failure (the
/// database away) is logged and tried again next round.
pub(super) async fn keep_leases(outbox: Weak<PgOutbox>) {
    loop {
        let every = match outbox.upgrade() {
            Some(o) => {
                if let Err(e) = o.renew_leases().await {
                    tracing::warn!(node = %o.node, error = %e, "renewing leases failed; trying again");
                }
                if let Err(e) = o.renew_slots().await {
                    tracing::warn!(node = %o.node, error = %e, "renewing connection slots failed; trying again");
                }
                if let Err(e) = o.heartbeat(None).await {
                    tracing::warn!(node = %o.node, error = %e, "heartbeat failed; trying again");
                }
                match o.free_leases(false).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(node = %o.node, requeued = n, "messages of a node whose lease expired are queued again")
                    }
                    Err(e) => {
                        tracing::warn!(node = %o.node, error = %e, "freeing expired leases failed; trying again")
                    }
                }
                o.lease / 3
            }
            None => return,
        };
        tokio::time::sleep(every).await;
    }
}
