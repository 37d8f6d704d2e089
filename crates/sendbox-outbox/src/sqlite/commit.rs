//! The body of one call's commit, inside its savepoint: the reads it made
//! still hold, the policy (shape, then rates), suppressed recipients
//! dropped, duplicate idempotency keys skipped, the emails queued with their
//! audit rows, the state changes applied.

use rusqlite::{Connection, OptionalExtension, params};
use sendbox_types::bare_address;

use crate::{Call, Committed, OutboxError, Queued, now_ms};

fn count_since(c: &Connection, plugin: &str, since_ms: i64) -> rusqlite::Result<u64> {
    c.prepare_cached("SELECT COUNT(*) FROM messages WHERE plugin = ?1 AND created_ms > ?2")?
        .query_row(params![plugin, since_ms], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
}

/// Checks the call against its policy and stores it. Runs inside a
/// savepoint: on `Err` the caller rolls back.
pub(crate) fn apply(c: &Connection, call: &Call) -> Result<Committed, OutboxError> {
    let p = &call.policy;
    let mailbox = bare_address(&call.account_mailbox);
    let mut done = Committed::default();

    // First: is what the call read still what is stored? If not, its
    // outcome may be wrong; the caller runs the event again.
    super::plugin_state::validate(c, &call.plugin, &call.reads)?;

    // The shape first (pure, shared by every backend); any violation
    // refuses the whole call.
    crate::policy::check(call)?;
    let now = now_ms();
    let new = call.emails.len() as u64;
    for (limit, window_ms, key, span) in crate::policy::rates(p) {
        if let Some(limit) = limit {
            let used = count_since(c, &call.plugin, now - window_ms)?;
            if let Some(refused) =
                crate::policy::over_rate(&call.plugin, (used, new), (limit, key, span))
            {
                return Err(refused);
            }
        }
    }

    let retention_start = now - i64::from(p.idempotency_hours) * 3_600_000;
    for email in &call.emails {
        let mut email = email.clone();
        // Suppressed addresses are removed; an email left without
        // recipients is not queued.
        for list in [&mut email.to, &mut email.cc, &mut email.bcc] {
            let mut kept = Vec::with_capacity(list.len());
            for r in list.drain(..) {
                let bare = bare_address(&r);
                let suppressed: bool = c
                    .prepare_cached("SELECT 1 FROM suppressions WHERE address = ?1")?
                    .query_row([&bare], |_| Ok(true))
                    .optional()?
                    .unwrap_or(false);
                if suppressed {
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
        if let Some(key) = &email.idempotency_key {
            let earlier: Option<(i64, i64)> = c
                .prepare_cached(
                    "SELECT message, created_ms FROM idempotency WHERE plugin = ?1 AND key = ?2",
                )?
                .query_row(params![call.plugin, key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((id, created)) = earlier
                && created > retention_start
            {
                let message_id: String = c
                    .query_row("SELECT message_id FROM messages WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })
                    .optional()?
                    .unwrap_or_default();
                done.duplicates.push(Queued { id, message_id });
                continue;
            }
        }
        let message_id = sendbox_types::new_message_id(sendbox_types::domain_of(&mailbox));
        let recipients: Vec<String> = email.recipients().map(bare_address).collect();
        let json = serde_json::to_string(&email)
            .map_err(|e| OutboxError::Policy(format!("email cannot be stored: {e}")))?;
        c.prepare_cached("INSERT INTO messages (message_id, plugin, trigger, event_id, account, state, attempts, \
             next_attempt_ms, created_ms, updated_ms, recipients, bytes, idempotency_key) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'queued', 0, ?6, ?6, ?6, ?7, ?8, ?9)")?
            .execute(params![
                message_id,
                call.plugin,
                call.trigger,
                call.event_id,
                call.account,
                now,
                recipients.join(", "),
                email.content_bytes() as i64,
                email.idempotency_key
            ])?;
        let id = c.last_insert_rowid();
        c.prepare_cached("INSERT INTO message_bodies (message, email_json) VALUES (?1, ?2)")?
            .execute(params![id, json])?;
        c.prepare_cached("INSERT INTO audit (message, at_ms, from_state, to_state, detail) VALUES (?1, ?2, NULL, 'queued', ?3)")?
            .execute(params![id, now, format!("plugin {} event {} ({})", call.plugin, call.event_id, call.trigger)])?;
        if let Some(key) = &email.idempotency_key {
            c.prepare_cached("INSERT INTO idempotency (plugin, key, message, created_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (plugin, key) DO UPDATE SET message = excluded.message, created_ms = excluded.created_ms")?
            .execute(params![call.plugin, key, id, now])?;
        }
        done.queued.push(Queued { id, message_id });
    }

    super::plugin_state::apply(c, &call.plugin, &call.state_changes, call.state_quota_bytes)?;
    Ok(done)
}
