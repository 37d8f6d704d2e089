//! Policy at enqueue and the body of one call's commit.

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use sendbox_types::{address_matches as matches, bare_address};

use crate::{Call, Committed, OutboxError, Queued, now_ms};

/// What an operator allows one plugin to send. A violation rejects the
/// whole outcome; nothing partial is queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// From addresses allowed besides the account's mailbox: exact
    /// addresses or `*@domain`. Default: none.
    #[serde(default)]
    pub allowed_from: Vec<String>,
    /// Recipients allowed: exact addresses or `*@domain`. Empty allows any.
    #[serde(default)]
    pub allowed_recipients: Vec<String>,
    /// Most recipients (to + cc + bcc) per email. Default 100 (Exchange
    /// allows 500).
    #[serde(default = "default_recipients_per_email")]
    pub recipients_per_email: u32,
    /// Largest email (bodies and attachments) in bytes. Default 20 MiB.
    #[serde(default = "default_message_bytes")]
    pub message_bytes: u64,
    /// Most emails this plugin may queue per rolling hour. Default none.
    #[serde(default)]
    pub emails_per_hour: Option<u32>,
    /// Most emails this plugin may queue per rolling day. Default none.
    #[serde(default)]
    pub emails_per_day: Option<u32>,
    /// How long an idempotency key is remembered, in hours. Default 168
    /// (a week).
    #[serde(default = "default_idempotency_hours")]
    pub idempotency_hours: u32,
}

/// 100.
pub fn default_recipients_per_email() -> u32 {
    100
}
/// 20 MiB.
pub fn default_message_bytes() -> u64 {
    20 << 20
}
/// A week.
pub fn default_idempotency_hours() -> u32 {
    168
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allowed_from: Vec::new(),
            allowed_recipients: Vec::new(),
            recipients_per_email: default_recipients_per_email(),
            message_bytes: default_message_bytes(),
            emails_per_hour: None,
            emails_per_day: None,
            idempotency_hours: default_idempotency_hours(),
        }
    }
}

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
    crate::state::validate(c, &call.plugin, &call.reads)?;

    // Shape checks first: any violation refuses the whole call.
    for (i, e) in call.emails.iter().enumerate() {
        if let Some(from) = &e.sender {
            let from = bare_address(from);
            if from != mailbox && !matches(&from, &p.allowed_from) {
                return Err(OutboxError::Policy(format!(
                    "emails[{i}]: From {from} is not allowed for plugin `{}` (allowed: {mailbox}{}{})",
                    call.plugin,
                    if p.allowed_from.is_empty() { "" } else { ", " },
                    p.allowed_from.join(", ")
                )));
            }
        }
        let n = e.to.len() + e.cc.len() + e.bcc.len();
        if n as u64 > u64::from(p.recipients_per_email) {
            return Err(OutboxError::Policy(format!(
                "emails[{i}] has {n} recipients, over recipients_per_email = {}",
                p.recipients_per_email
            )));
        }
        if !p.allowed_recipients.is_empty() {
            for r in e.recipients() {
                let r = bare_address(r);
                if !matches(&r, &p.allowed_recipients) {
                    return Err(OutboxError::Policy(format!(
                        "emails[{i}]: recipient {r} is not in allowed_recipients for plugin `{}`",
                        call.plugin
                    )));
                }
            }
        }
        if e.content_bytes() > p.message_bytes {
            return Err(OutboxError::Policy(format!(
                "emails[{i}] is {} bytes, over message_bytes = {}",
                e.content_bytes(),
                p.message_bytes
            )));
        }
    }
    let now = now_ms();
    let new = call.emails.len() as u64;
    if let Some(limit) = p.emails_per_hour {
        let used = count_since(c, &call.plugin, now - 3_600_000)?;
        if used + new > u64::from(limit) {
            return Err(OutboxError::Policy(format!(
                "plugin `{}` queued {used} emails in the last hour; {new} more would pass emails_per_hour = {limit}",
                call.plugin
            )));
        }
    }
    if let Some(limit) = p.emails_per_day {
        let used = count_since(c, &call.plugin, now - 86_400_000)?;
        if used + new > u64::from(limit) {
            return Err(OutboxError::Policy(format!(
                "plugin `{}` queued {used} emails in the last day; {new} more would pass emails_per_day = {limit}",
                call.plugin
            )));
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
             next_attempt_ms, created_ms, updated_ms, recipients, bytes, email_json, idempotency_key) \
             VALUES (?1, ?2, ?3, ?4, ?5, 'queued', 0, ?6, ?6, ?6, ?7, ?8, ?9, ?10)")?
            .execute(params![
                message_id,
                call.plugin,
                call.trigger,
                call.event_id,
                call.account,
                now,
                recipients.join(", "),
                email.content_bytes() as i64,
                json,
                email.idempotency_key
            ])?;
        let id = c.last_insert_rowid();
        c.prepare_cached("INSERT INTO audit (message, at_ms, from_state, to_state, detail) VALUES (?1, ?2, NULL, 'queued', ?3)")?
            .execute(params![id, now, format!("plugin {} event {} ({})", call.plugin, call.event_id, call.trigger)])?;
        if let Some(key) = &email.idempotency_key {
            c.prepare_cached("INSERT INTO idempotency (plugin, key, message, created_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (plugin, key) DO UPDATE SET message = excluded.message, created_ms = excluded.created_ms")?
            .execute(params![call.plugin, key, id, now])?;
        }
        done.queued.push(Queued { id, message_id });
    }

    crate::state::apply(c, &call.plugin, &call.state_changes, call.state_quota_bytes)?;
    Ok(done)
}
