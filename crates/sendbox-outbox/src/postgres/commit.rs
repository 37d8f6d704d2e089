//! The commit of one plugin call in one PostgreSQL transaction, with the
//! same rules as SQLite's (`sqlite::commit`): the reads still hold, the
//! policy (shape, then rates), suppressed recipients dropped, duplicate
//! idempotency keys skipped, the emails queued with their audit rows, the
//! state changes applied with their byte usage.
//!
//! A call that reads or writes plugin state or is rate-limited first takes
//! its plugin's advisory lock, so no other commit of that plugin, on any
//! node, runs between its checks and its writes: the same serializable
//! guarantee SQLite gets from its one writer. An idempotency key takes a
//! lock of its own (plugin and key), so two commits of one key are one
//! after the other but different keys commit side by side — and share the
//! server's WAL flush (a lock held across the flush would let one commit
//! through per flush). Other calls need no lock.
//!
//! Statements whose plan cannot depend on their values (an insert, a
//! lookup or update by primary key, the locks) are prepared once per
//! connection (`pool::Statements`): after the first commit on a connection
//! each is bound and run in one round trip, and the server neither parses
//! nor plans it again. Lookups of several values (`= ANY($1)`) and ranges
//! are sent with their text and types at every run, and planned for their
//! values: a prepared statement's one plan is made from the statistics of
//! the moment, and one made while a table was empty (a new database, before
//! its first analyze) reads the whole table at every commit once it is not.

use sendbox_types::{ReadSet, StateChange, bare_address};
use tokio_postgres::Transaction;
use tokio_postgres::types::Type;

use super::pg_err;
use super::pool::Statements;
use crate::{Call, Committed, OutboxError, Queued, now_ms};

/// Whether the call's checks read something another commit of the same
/// plugin could change meanwhile (its state, its counts).
fn needs_plugin_lock(call: &Call) -> bool {
    !call.reads.keys.is_empty()
        || !call.reads.prefixes.is_empty()
        || !call.state_changes.is_empty()
        || call.policy.emails_per_hour.is_some()
        || call.policy.emails_per_day.is_some()
}

/// The advisory locks a call takes, in the one order every commit takes
/// them (the plugin's first, then its keys sorted), so two commits never
/// wait on each other in a circle.
pub(super) fn locks(call: &Call) -> Vec<String> {
    let mut keys: Vec<String> = call
        .emails
        .iter()
        .filter_map(|e| e.idempotency_key.as_ref())
        .map(|k| format!("{}\u{1f}{k}", call.plugin))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    if needs_plugin_lock(call) {
        keys.insert(0, call.plugin.clone());
    }
    keys
}

/// Takes the advisory locks of its one parameter, a text array, in its
/// order, waiting for each.
pub(super) const LOCK_ALL: &str = "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) \
     FROM unnest($1::text[]) WITH ORDINALITY AS l(k, n) ORDER BY n";

async fn count_since(
    tx: &Transaction<'_>,
    plugin: &str,
    since_ms: i64,
) -> Result<u64, OutboxError> {
    // Planned for its values at every run (see the module's note).
    let row = tx
        .query_typed_one(
            "SELECT COUNT(*) FROM messages WHERE plugin = $1 AND created_ms > $2",
            &[(&plugin, Type::TEXT), (&since_ms, Type::INT8)],
        )
        .await
        .map_err(pg_err)?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}

/// An idempotency key already stored: its message, when it was stored, and
/// the message's Message-ID.
type Earlier = (i64, i64, Option<String>);

/// Checks the call against its policy and stores it inside `tx`; on `Err`
/// the caller rolls back.
pub(super) async fn apply(
    tx: &Transaction<'_>,
    st: &mut Statements,
    call: &Call,
) -> Result<Committed, OutboxError> {
    let locks = locks(call);
    // Every recipient and every idempotency key of the call, looked up at
    // once.
    let all: Vec<String> = call
        .emails
        .iter()
        .flat_map(|e| e.recipients().map(bare_address))
        .collect();
    let mut keys: Vec<&str> = call
        .emails
        .iter()
        .filter_map(|e| e.idempotency_key.as_deref())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    // Prepared before the three go out, so they go out in one round trip.
    // The lookups are not prepared (see the module's note).
    let lock = st.get(tx, LOCK_ALL, &[Type::TEXT_ARRAY]).await?;
    // The locks and both lookups go out together (one round trip instead
    // of three): the server runs them in the order sent, each lookup with a
    // snapshot taken once the locks are held, so it sees every commit that
    // held them before. `biased` polls, and so sends, in that order.
    let (locked, suppressed, earlier) = tokio::join!(
        biased;
        async {
            if locks.is_empty() {
                return Ok(0);
            }
            tx.execute(&lock, &[&locks]).await
        },
        async {
            tx.query_typed(
                "SELECT address FROM suppressions WHERE address = ANY($1)",
                &[(&all, Type::TEXT_ARRAY)],
            )
            .await
        },
        async {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            tx.query_typed(
                "SELECT i.key, i.message, i.created_ms, m.message_id FROM idempotency i \
                 LEFT JOIN messages m ON m.id = i.message WHERE i.plugin = $1 AND i.key = ANY($2)",
                &[(&call.plugin, Type::TEXT), (&keys, Type::TEXT_ARRAY)],
            )
            .await
        },
    );
    // The first failure is the cause; after it the transaction refuses
    // the rest.
    locked.map_err(pg_err)?;
    let suppressed: std::collections::HashSet<String> = suppressed
        .map_err(pg_err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let earlier: std::collections::HashMap<String, Earlier> = earlier
        .map_err(pg_err)?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    // Is what the call read still what is stored? If not, its outcome may
    // be wrong; the caller runs the event again.
    validate(tx, st, &call.plugin, &call.reads).await?;
    // The shape (pure, shared by every backend); any violation refuses the
    // whole call.
    crate::policy::check(call)?;

    let p = &call.policy;
    let mailbox = bare_address(&call.account_mailbox);
    let mut done = Committed::default();
    let now = now_ms();
    let new = call.emails.len() as u64;
    for (limit, window_ms, key, span) in crate::policy::rates(p) {
        if let Some(limit) = limit {
            let used = count_since(tx, &call.plugin, now - window_ms).await?;
            if let Some(refused) =
                crate::policy::over_rate(&call.plugin, (used, new), (limit, key, span))
            {
                return Err(refused);
            }
        }
    }

    let retention_start = now - i64::from(p.idempotency_hours) * 3_600_000;
    // Keys this call queued: a later email of the call with the same key
    // is its duplicate (with no retention, a key is never a duplicate).
    let mut queued_keys: std::collections::HashMap<&str, Queued> = Default::default();
    for original in &call.emails {
        let mut email = original.clone();
        // Suppressed addresses are removed; an email left without
        // recipients is not queued.
        for list in [&mut email.to, &mut email.cc, &mut email.bcc] {
            let mut kept = Vec::with_capacity(list.len());
            for r in list.drain(..) {
                let bare = bare_address(&r);
                if suppressed.contains(&bare) {
                    done.suppressed.push(bare);
                } else {
                    kept.push(r);
                }
            }
            *list = kept;
        }
        if email.recipients().next().is_none() {
            continue;
        }
        if let Some(key) = email.idempotency_key.as_deref() {
            if let Some(q) = queued_keys.get(key) {
                done.duplicates.push(q.clone());
                continue;
            }
            if let Some((id, created, message_id)) = earlier.get(key)
                && *created > retention_start
            {
                done.duplicates.push(Queued {
                    id: *id,
                    message_id: message_id.clone().unwrap_or_default(),
                });
                continue;
            }
        }
        let message_id = sendbox_types::new_message_id(sendbox_types::domain_of(&mailbox));
        let recipients: Vec<String> = email.recipients().map(bare_address).collect();
        let json = serde_json::to_string(&email)
            .map_err(|e| OutboxError::Policy(format!("email cannot be stored: {e}")))?;
        let bytes = email.content_bytes() as i64;
        let detail = format!(
            "plugin {} event {} ({})",
            call.plugin, call.event_id, call.trigger
        );
        // The message, its first audit row and its idempotency key in one
        // statement (the key's lock is held, so no other commit writes it).
        let insert = st
            .get(
                tx,
                "WITH m AS (INSERT INTO messages (message_id, plugin, trigger, event_id, account, state, attempts, \
                 next_attempt_ms, created_ms, updated_ms, recipients, bytes, idempotency_key, email_json) \
                 VALUES ($1, $2, $3, $4, $5, 'queued', 0, $6, $6, $6, $7, $8, $9, $10) RETURNING id), \
                 a AS (INSERT INTO audit (message, at_ms, from_state, to_state, detail) \
                 SELECT id, $6, NULL, 'queued', $11 FROM m), \
                 i AS (INSERT INTO idempotency (plugin, key, message, created_ms) \
                 SELECT $2, $9, id, $6 FROM m WHERE $9 IS NOT NULL \
                 ON CONFLICT (plugin, key) DO UPDATE SET message = excluded.message, created_ms = excluded.created_ms) \
                 SELECT id FROM m",
                &[
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::INT8,
                    Type::TEXT,
                    Type::INT8,
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                ],
            )
            .await?;
        let row = tx
            .query_one(
                &insert,
                &[
                    &message_id,
                    &call.plugin,
                    &call.trigger,
                    &call.event_id,
                    &call.account,
                    &now,
                    &recipients.join(", "),
                    &bytes,
                    &email.idempotency_key,
                    &json,
                    &detail,
                ],
            )
            .await
            .map_err(pg_err)?;
        let queued = Queued {
            id: row.get(0),
            message_id,
        };
        if let Some(key) = original.idempotency_key.as_deref()
            && p.idempotency_hours > 0
        {
            queued_keys.insert(key, queued.clone());
        }
        done.queued.push(queued);
    }

    apply_state(
        tx,
        st,
        &call.plugin,
        &call.state_changes,
        call.state_quota_bytes,
    )
    .await?;
    Ok(done)
}

/// Keys of `plugin` starting with `prefix`, in byte order, at most `limit`.
pub(super) async fn keys(
    c: &impl tokio_postgres::GenericClient,
    plugin: &str,
    prefix: &str,
    limit: usize,
) -> Result<Vec<String>, OutboxError> {
    let rows = c
        .query(
            "SELECT key FROM plugin_state WHERE plugin = $1 AND key >= $2 AND starts_with(key, $2) \
             ORDER BY key LIMIT $3",
            &[&plugin, &prefix, &(limit as i64)],
        )
        .await
        .map_err(pg_err)?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Refuses the call with [`OutboxError::Conflict`] if anything it read
/// changed since: a key's version, or the keys under a listed prefix.
async fn validate(
    tx: &Transaction<'_>,
    st: &mut Statements,
    plugin: &str,
    reads: &ReadSet,
) -> Result<(), OutboxError> {
    for (key, seen) in &reads.keys {
        let version = st
            .get(
                tx,
                "SELECT version FROM plugin_state WHERE plugin = $1 AND key = $2",
                &[Type::TEXT, Type::TEXT],
            )
            .await?;
        let now = tx
            .query_opt(&version, &[&plugin, key])
            .await
            .map_err(pg_err)?
            .map_or(0, |r| r.get::<_, i64>(0) as u64);
        if now != *seen {
            return Err(OutboxError::Conflict(format!("key {key:?} was written")));
        }
    }
    for (prefix, seen) in &reads.prefixes {
        let now = keys(tx, plugin, prefix, seen.len() + 1).await?;
        if &now != seen {
            return Err(OutboxError::Conflict(format!(
                "keys under {prefix:?} were added or removed"
            )));
        }
    }
    Ok(())
}

/// Applies a call's state changes and its plugin's usage, stamping every
/// key written with the plugin's next sequence number (versions only grow,
/// even across a delete and a re-create). Growing past `quota` is refused
/// as a conflict, as in SQLite.
async fn apply_state(
    tx: &Transaction<'_>,
    st: &mut Statements,
    plugin: &str,
    changes: &[StateChange],
    quota: Option<u64>,
) -> Result<(), OutboxError> {
    if changes.is_empty() {
        return Ok(());
    }
    let usage = st
        .get(
            tx,
            "INSERT INTO plugin_usage (plugin, bytes, seq) VALUES ($1, 0, 1) \
             ON CONFLICT (plugin) DO UPDATE SET seq = plugin_usage.seq + 1 RETURNING seq, bytes",
            &[Type::TEXT],
        )
        .await?;
    let row = tx.query_one(&usage, &[&plugin]).await.map_err(pg_err)?;
    let (seq, before): (i64, i64) = (row.get(0), row.get(1));
    let mut delta: i64 = 0;
    for change in changes {
        let key = match change {
            StateChange::Set { key, .. } | StateChange::Delete { key } => key,
        };
        let length = st
            .get(
                tx,
                "SELECT octet_length(value) FROM plugin_state WHERE plugin = $1 AND key = $2",
                &[Type::TEXT, Type::TEXT],
            )
            .await?;
        let old: Option<i32> = tx
            .query_opt(&length, &[&plugin, key])
            .await
            .map_err(pg_err)?
            .map(|r| r.get(0));
        delta -= old.map_or(0, |n| key.len() as i64 + i64::from(n));
        match change {
            StateChange::Set { key, value } => {
                let set = st
                    .get(
                        tx,
                        "INSERT INTO plugin_state (plugin, key, value, version) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value, version = excluded.version",
                        &[Type::TEXT, Type::TEXT, Type::BYTEA, Type::INT8],
                    )
                    .await?;
                tx.execute(&set, &[&plugin, key, &value.0, &seq])
                    .await
                    .map_err(pg_err)?;
                delta += (key.len() + value.0.len()) as i64;
            }
            StateChange::Delete { key } => {
                let delete = st
                    .get(
                        tx,
                        "DELETE FROM plugin_state WHERE plugin = $1 AND key = $2",
                        &[Type::TEXT, Type::TEXT],
                    )
                    .await?;
                tx.execute(&delete, &[&plugin, key]).await.map_err(pg_err)?;
            }
        }
    }
    let after = before + delta;
    if let Some(refused) = crate::policy::over_quota(delta, after, quota) {
        return Err(refused);
    }
    let update = st
        .get(
            tx,
            "UPDATE plugin_usage SET bytes = $2 WHERE plugin = $1",
            &[Type::TEXT, Type::INT8],
        )
        .await?;
    tx.execute(&update, &[&plugin, &after])
        .await
        .map_err(pg_err)?;
    Ok(())
}
