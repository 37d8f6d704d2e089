//! An account's limits held by every node together, as a provider counts
//! them per mailbox whichever client connects:
//!
//! - **Rate**: one row per account holds when its next send may start. A
//!   node about to send moves it one step on and waits until its turn, so
//!   sends from all nodes together are at least `step` apart (at most
//!   `rate` in any minute). Times are the database server's, so nodes'
//!   clocks may disagree.
//! - **Connections**: `max_connections` slot rows per account. A node may
//!   keep a connection open only while it holds a slot under a lease; it
//!   takes slots when it has mail to send, and gives them back (after
//!   closing its connections) when it has none. The keeper renews them
//!   with the message leases; a dead node's slots are free once its lease
//!   ends (its connections died with it).

use std::time::Duration;

use super::{PgOutbox, pg_err};
use crate::{OutboxError, now_ms};

impl PgOutbox {
    /// Reserves `account`'s next send, `step` after the one before it
    /// across every node; returns how long to wait before starting it.
    pub async fn take_send_turn(
        &self,
        account: &str,
        step: Duration,
    ) -> Result<Duration, OutboxError> {
        let step_ms = step.as_millis().clamp(1, i64::MAX as u128) as i64;
        let conn = self.pool.get().await?;
        // `now()` is the transaction's start on the server: one clock for
        // every node.
        let row = conn
            .query_one(
                "WITH t AS (SELECT (extract(epoch FROM now()) * 1000)::bigint AS now_ms)
                 INSERT INTO account_pace AS p (account, next_ms)
                 SELECT $1, t.now_ms + $2 FROM t
                 ON CONFLICT (account) DO UPDATE
                   SET next_ms = GREATEST(p.next_ms, (SELECT now_ms FROM t)) + $2
                 RETURNING p.next_ms - $2 - (SELECT now_ms FROM t)",
                &[&account, &step_ms],
            )
            .await
            .map_err(pg_err)?;
        let wait_ms: i64 = row.get(0);
        Ok(Duration::from_millis(wait_ms.max(0) as u64))
    }

    /// Takes free connection slots of `account` (of `max`) until this node
    /// holds `want`; returns how many it holds now (0: every slot is
    /// another live node's).
    pub async fn hold_connections(
        &self,
        account: &str,
        want: u32,
        max: u32,
    ) -> Result<u32, OutboxError> {
        let (want, max) = (
            i64::from(want.min(max)),
            i32::try_from(max).unwrap_or(i32::MAX),
        );
        let now = now_ms();
        let until = now.saturating_add(self.lease_ms());
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await.map_err(pg_err)?;
        tx.execute(
            "INSERT INTO account_slots (account, slot) SELECT $1, s FROM generate_series(0, $2 - 1) s \
             ON CONFLICT DO NOTHING",
            &[&account, &max],
        )
        .await
        .map_err(pg_err)?;
        let row = tx
            .query_one(
                "WITH mine AS (
                    SELECT count(*) AS n FROM account_slots
                    WHERE account = $1 AND slot < $2 AND node = $3 AND until_ms >= $4
                 ), free AS (
                    SELECT slot FROM account_slots
                    WHERE account = $1 AND slot < $2 AND (node IS NULL OR until_ms < $4)
                    ORDER BY slot
                    LIMIT GREATEST($5 - (SELECT n FROM mine), 0)
                    FOR UPDATE SKIP LOCKED
                 ), taken AS (
                    UPDATE account_slots s SET node = $3, until_ms = $6
                    FROM free WHERE s.account = $1 AND s.slot = free.slot
                    RETURNING s.slot
                 )
                 SELECT (SELECT n FROM mine) + (SELECT count(*) FROM taken)",
                &[&account, &max, &self.node, &now, &want, &until],
            )
            .await
            .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        let held: i64 = row.get(0);
        Ok(held.clamp(0, i64::from(u32::MAX)) as u32)
    }

    /// Gives back every connection slot of `account` this node holds; its
    /// connections must be closed first.
    pub async fn release_connections(&self, account: &str) -> Result<(), OutboxError> {
        let conn = self.pool.get().await?;
        conn.execute(
            "UPDATE account_slots SET node = NULL, until_ms = 0 WHERE account = $1 AND node = $2",
            &[&account, &self.node],
        )
        .await
        .map_err(pg_err)?;
        Ok(())
    }

    /// Extends this node's connection slots by a full lease from now.
    pub(super) async fn renew_slots(&self) -> Result<u64, OutboxError> {
        let conn = self.pool.get().await?;
        let until = now_ms().saturating_add(self.lease_ms());
        conn.execute(
            "UPDATE account_slots SET until_ms = $2 WHERE node = $1",
            &[&self.node, &until],
        )
        .await
        .map_err(pg_err)
    }
}
