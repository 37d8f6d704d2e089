//! The body of one call's commit, decided before it is written: first
//! every check, reading only — the reads the call made still hold, the
//! policy (shape, then rates), suppressed recipients dropped, duplicate
//! idempotency keys found, the state quota — then the writes: the emails
//! queued (their first audit entry is their own row), the state changes
//! applied.
//!
//! Because a refusal can only come before the first write, a refused call
//! leaves nothing behind and the writer needs no savepoint per call (a
//! savepoint copies every page the call touches once more).
//!
//! What needs no store — the policy's shape check, each email's Message-ID
//! and bare recipients — is worked out by the caller ([`Prepared::new`])
//! before the call reaches the writer thread, the one thread every commit
//! waits on. The email's JSON is made on the writer, as it is stored: made
//! earlier, every commit waiting for the writer would hold its emails
//! twice (and more, for text JSON escapes), past what the daemon's outcome
//! budget counts.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};
use sendbox_types::{StateChange, bare_address};

use super::counts::Moves;
use super::rates::RateCounts;
use crate::{Call, Committed, OutboxError, Queued, State, now_ms};

/// A call with what its commit needs that does not depend on what is
/// stored, worked out on the caller's thread.
pub(crate) struct Prepared {
    pub(crate) call: Call,
    /// The policy's shape check's refusal, if any; the writer reports it
    /// only after the call's reads are found to hold (a stale call is run
    /// again first).
    shape: Option<OutboxError>,
    /// One per email of the call when the shape passed; none otherwise.
    emails: Vec<PreparedEmail>,
}

/// One email's store-independent parts.
struct PreparedEmail {
    /// Its recipients' bare addresses (to, cc, bcc in order).
    bare: Vec<String>,
    /// The Message-ID it carries if it is queued.
    message_id: String,
}

impl Prepared {
    pub(crate) fn new(call: Call) -> Self {
        let shape = crate::policy::check(&call).err();
        let emails = if shape.is_none() {
            let mailbox = bare_address(&call.account_mailbox);
            let domain = sendbox_types::domain_of(&mailbox);
            call.emails
                .iter()
                .map(|e| PreparedEmail {
                    bare: e.recipients().map(bare_address).collect(),
                    message_id: sendbox_types::new_message_id(domain),
                })
                .collect()
        } else {
            Vec::new()
        };
        Prepared {
            call,
            shape,
            emails,
        }
    }
}

/// What becomes of one email of the call.
enum Fate {
    /// Queued: the email's index in the call, its JSON (without its
    /// suppressed recipients), its recipients joined, its Message-ID.
    Queue {
        index: usize,
        json: String,
        recipients: String,
        message_id: String,
    },
    /// Its idempotency key names a message already stored.
    Duplicate(Queued),
    /// Its idempotency key is that of an earlier email of this call (the
    /// index among the queued ones).
    DuplicateOfQueued(usize),
    /// Every recipient is suppressed.
    Dropped,
}

/// A call that passed every check, ready to be written.
struct Decided {
    fates: Vec<Fate>,
    suppressed: Vec<String>,
    /// The plugin's state usage after the call, when it changes state.
    usage_after: Option<i64>,
}

/// Checks the call against its policy and stores it. Every refusal comes
/// before the first write; an error after it is a storage failure (which
/// fails the writer's whole group). `rates` counts what the plugin queued
/// in its rate limits' windows, and learns what this call queues.
/// The emails it queues are added to `counts`, for the writer to apply
/// once per group. `any_suppressed`: whether the suppression list has any
/// address (read once per group; when it is empty no recipient is looked
/// up).
pub(crate) fn apply(
    c: &Connection,
    prepared: &mut Prepared,
    any_suppressed: bool,
    rates: &mut RateCounts,
    counts: &mut Moves,
) -> Result<Committed, OutboxError> {
    let decided = decide(c, prepared, any_suppressed, rates)?;
    write(c, &prepared.call, decided, rates, counts)
}

/// Every check of the call, reading only.
fn decide(
    c: &Connection,
    prepared: &mut Prepared,
    any_suppressed: bool,
    rates: &mut RateCounts,
) -> Result<Decided, OutboxError> {
    let call = &prepared.call;
    let p = &call.policy;
    // First: is what the call read still what is stored? If not, its
    // outcome may be wrong; the caller runs the event again.
    super::plugin_state::validate(c, &call.plugin, &call.reads)?;

    // The shape next (pure, shared by every backend, checked by the
    // caller); any violation refuses the whole call.
    if let Some(refused) = prepared.shape.take() {
        return Err(refused);
    }
    let now = now_ms();
    let new = call.emails.len() as u64;
    for (limit, window_ms, key, span) in crate::policy::rates(p) {
        if let Some(limit) = limit {
            let used = rates.since(c, &call.plugin, window_ms, now - window_ms)?;
            if let Some(refused) =
                crate::policy::over_rate(&call.plugin, (used, new), (limit, key, span))
            {
                return Err(refused);
            }
        }
    }

    let retention_start = now - i64::from(p.idempotency_hours) * 3_600_000;
    let mut fates = Vec::with_capacity(call.emails.len());
    let mut suppressed = Vec::new();
    // Keys of this call's emails already to be queued: index among them.
    let mut keys_queued: HashMap<&str, usize> = HashMap::new();
    let mut queued = 0usize;
    for (index, (original, pre)) in call.emails.iter().zip(&mut prepared.emails).enumerate() {
        // Suppressed addresses are removed; an email left without
        // recipients is not queued.
        let mut suppressed_here = Vec::new();
        if any_suppressed {
            for bare in &pre.bare {
                let is_suppressed: bool = c
                    .prepare_cached("SELECT 1 FROM suppressions WHERE address = ?1")?
                    .query_row([bare], |_| Ok(true))
                    .optional()?
                    .unwrap_or(false);
                if is_suppressed {
                    suppressed_here.push(bare.clone());
                }
            }
        }
        let trimmed = if suppressed_here.is_empty() {
            None
        } else {
            let mut email = original.clone();
            for list in [&mut email.to, &mut email.cc, &mut email.bcc] {
                list.retain(|r| !suppressed_here.contains(&bare_address(r)));
            }
            suppressed.append(&mut suppressed_here);
            Some(Box::new(email))
        };
        let no_recipients = match &trimmed {
            Some(email) => email.recipients().next().is_none(),
            None => pre.bare.is_empty(),
        };
        if no_recipients {
            fates.push(Fate::Dropped);
            continue;
        }
        if let Some(key) = original.idempotency_key.as_deref() {
            if let Some(&i) = keys_queued.get(key) {
                fates.push(Fate::DuplicateOfQueued(i));
                continue;
            }
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
                    .prepare_cached("SELECT message_id FROM messages WHERE id = ?1")?
                    .query_row([id], |r| r.get(0))
                    .optional()?
                    .unwrap_or_default();
                fates.push(Fate::Duplicate(Queued { id, message_id }));
                continue;
            }
            // With no retention, a key is never a duplicate, even of an
            // email of the same call.
            if p.idempotency_hours > 0 {
                keys_queued.insert(key, queued);
            }
        }
        let (stored, recipients) = match &trimmed {
            None => (original, pre.bare.join(", ")),
            Some(email) => (
                &**email,
                email
                    .recipients()
                    .map(bare_address)
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        };
        let json = serde_json::to_string(stored)
            .map_err(|e| OutboxError::Policy(format!("email cannot be stored: {e}")))?;
        fates.push(Fate::Queue {
            index,
            json,
            recipients,
            message_id: std::mem::take(&mut pre.message_id),
        });
        queued += 1;
    }

    let usage_after = state_usage_after(c, call)?;
    Ok(Decided {
        fates,
        suppressed,
        usage_after,
    })
}

/// The plugin's state usage in bytes once the call's changes are applied,
/// or `None` when it changes nothing; refused if that grows the state past
/// its quota (as a conflict: the plugin checked its quota against state
/// that has changed since). Usage counts key and value bytes as Rust does.
fn state_usage_after(c: &Connection, call: &Call) -> Result<Option<i64>, OutboxError> {
    if call.state_changes.is_empty() {
        return Ok(None);
    }
    let before = super::plugin_state::usage(c, &call.plugin)? as i64;
    // Value lengths as the call leaves them, for keys it wrote already.
    let mut written: HashMap<&str, Option<usize>> = HashMap::new();
    let mut delta: i64 = 0;
    for change in &call.state_changes {
        let key = match change {
            StateChange::Set { key, .. } | StateChange::Delete { key } => key.as_str(),
        };
        let old = match written.get(key) {
            Some(len) => len.map(|n| n as i64),
            None => super::plugin_state::stored_len(c, &call.plugin, key)?,
        };
        delta -= old.map_or(0, |n| key.len() as i64 + n);
        match change {
            StateChange::Set { value, .. } => {
                delta += (key.len() + value.0.len()) as i64;
                written.insert(key, Some(value.0.len()));
            }
            StateChange::Delete { .. } => {
                written.insert(key, None);
            }
        }
    }
    let after = before + delta;
    if let Some(refused) = crate::policy::over_quota(delta, after, call.state_quota_bytes) {
        return Err(refused);
    }
    Ok(Some(after))
}

/// The writes of a decided call. Fails only when storage fails.
fn write(
    c: &Connection,
    call: &Call,
    decided: Decided,
    rates: &mut RateCounts,
    counts: &mut Moves,
) -> Result<Committed, OutboxError> {
    let now = now_ms();
    let mut done = Committed {
        suppressed: decided.suppressed,
        ..Committed::default()
    };
    for fate in decided.fates {
        let (email, json, recipients, message_id) = match fate {
            // Its size and idempotency key are the plugin's email's (a
            // suppressed recipient changes neither).
            Fate::Queue {
                index,
                json,
                recipients,
                message_id,
            } => (&call.emails[index], json, recipients, message_id),
            Fate::Duplicate(earlier) => {
                done.duplicates.push(earlier);
                continue;
            }
            Fate::DuplicateOfQueued(i) => {
                if let Some(q) = done.queued.get(i) {
                    done.duplicates.push(q.clone());
                }
                continue;
            }
            Fate::Dropped => continue,
        };
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
                recipients,
                email.content_bytes() as i64,
                email.idempotency_key
            ])?;
        let id = c.last_insert_rowid();
        c.prepare_cached("INSERT INTO message_bodies (message, email_json) VALUES (?1, ?2)")?
            .execute(params![id, json])?;
        // No audit row: a message's first entry ("queued by plugin P,
        // event E") is read off its own row (see `audit_trail`).
        if let Some(key) = &email.idempotency_key {
            c.prepare_cached("INSERT INTO idempotency (plugin, key, message, created_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (plugin, key) DO UPDATE SET message = excluded.message, created_ms = excluded.created_ms")?
            .execute(params![call.plugin, key, id, now])?;
        }
        done.queued.push(Queued { id, message_id });
    }
    // The queued count, kept by the writer rather than by a trigger (see
    // schema v7).
    counts.added(State::Queued, done.queued.len() as i64);
    rates.queued(&call.plugin, done.queued.len() as u64, now);
    if let Some(after) = decided.usage_after {
        super::plugin_state::apply(c, &call.plugin, &call.state_changes, after)?;
    }
    Ok(done)
}
