//! Reads: messages, their history, queue depth, suppressions, paused
//! accounts, schedule runs and plugin state, on the reader connection.

use std::sync::PoisonError;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Outbox, plugin_state};
use crate::{AuditEntry, Message, OutboxError, State};

pub(super) const COLUMNS: &str = "id, message_id, plugin, trigger, event_id, account, state, attempts, \
                       next_attempt_ms, created_ms, recipients, last_reply, email_json";
/// The tables [`COLUMNS`] come from: a message's state row and its body.
pub(super) const MESSAGES: &str =
    "messages JOIN message_bodies ON message_bodies.message = messages.id";
pub(super) fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    let json: String = r.get(12)?;
    let email: sendbox_types::Email = serde_json::from_str(&json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(12, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(Message {
        id: r.get(0)?,
        message_id: r.get(1)?,
        plugin: r.get(2)?,
        trigger: r.get(3)?,
        event_id: r.get(4)?,
        account: r.get(5)?,
        state: State::parse(&r.get::<_, String>(6)?),
        attempts: r.get(7)?,
        next_attempt_ms: r.get(8)?,
        created_ms: r.get(9)?,
        recipients: r.get(10)?,
        last_reply: r.get(11)?,
        email,
    })
}

impl Outbox {
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, OutboxError> {
        let conn = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(f(&conn)?)
    }
    /// When a schedule last ran (its tick's `scheduled_at_ms`), if ever.
    pub fn schedule_run(&self, plugin: &str, schedule: &str) -> Result<Option<i64>, OutboxError> {
        let (plugin, schedule) = (plugin.to_owned(), schedule.to_owned());
        self.read(move |c| {
            c.query_row(
                "SELECT last_ms FROM schedule_runs WHERE plugin = ?1 AND schedule = ?2",
                params![plugin, schedule],
                |r| r.get(0),
            )
            .optional()
        })
    }
    /// Paused accounts: (account, since ms, reason).
    pub fn paused_accounts(&self) -> Result<Vec<(String, i64, String)>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT account, paused_ms, reason FROM account_status ORDER BY account",
            )?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
    }
    /// The suppression list.
    pub fn suppressions(&self) -> Result<Vec<(String, Option<String>)>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare("SELECT address, reason FROM suppressions ORDER BY address")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
        })
    }
    /// Messages, newest first, optionally in one state.
    pub fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Message>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLUMNS} FROM {MESSAGES} WHERE (?1 IS NULL OR state = ?1) ORDER BY id DESC LIMIT ?2"
            ))?;
            st.query_map(params![state.map(State::as_str), limit as i64], row_to_message)?
                .collect()
        })
    }
    /// One message.
    pub fn get(&self, id: i64) -> Result<Message, OutboxError> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM {MESSAGES} WHERE id = ?1"),
                [id],
                row_to_message,
            )
            .optional()
        })?
        .ok_or(OutboxError::NotFound(id))
    }
    /// A message's audit trail, oldest first. Its first entry, queued by
    /// a plugin's event, comes from the message's own row (schema v7 on:
    /// the commit writes no audit row for it); databases from before v7
    /// have it as an audit row, which is read instead. Each entry going
    /// `sending` comes from the row written when the message left
    /// `sending` (its `started_ms`), or from the message's own row while it
    /// still is (schema v9 on: a claim writes no audit row).
    pub fn audit_trail(&self, id: i64) -> Result<Vec<AuditEntry>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT at_ms, from_state, to_state, detail, started_ms FROM ( \
                   SELECT 0 AS seq, created_ms AS at_ms, NULL AS from_state, 'queued' AS to_state, \
                          'plugin ' || plugin || ' event ' || event_id || ' (' || trigger || ')' AS detail, \
                          NULL AS started_ms \
                   FROM messages WHERE id = ?1 AND NOT EXISTS \
                     (SELECT 1 FROM audit WHERE message = ?1 AND from_state IS NULL) \
                   UNION ALL \
                   SELECT id, at_ms, from_state, to_state, detail, started_ms FROM audit WHERE message = ?1 \
                 ) ORDER BY seq",
            )?;
            let rows = st
                .query_map([id], |r| {
                    Ok((
                        AuditEntry {
                            at_ms: r.get(0)?,
                            from: r.get(1)?,
                            to: r.get(2)?,
                            detail: r.get(3)?,
                        },
                        r.get(4)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let now: Option<(String, i64)> = c
                .query_row(
                    "SELECT state, updated_ms FROM messages WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(with_sending_entries(rows, now))
        })
    }
    /// Count of messages per state, from counters kept at every change
    /// (five rows read, never a table scan).
    pub fn depth(&self) -> Result<Vec<(State, u64)>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare_cached("SELECT state, n FROM message_counts WHERE n > 0")?;
            st.query_map([], |r| {
                Ok((
                    State::parse(&r.get::<_, String>(0)?),
                    r.get::<_, i64>(1)? as u64,
                ))
            })?
            .collect()
        })
    }
    /// Reads one plugin state value with its version (see
    /// [`ReadSet`](sendbox_types::ReadSet)).
    pub fn plugin_state_get(
        &self,
        plugin: &str,
        key: &str,
    ) -> Result<Option<(Vec<u8>, u64)>, OutboxError> {
        self.read(|c| plugin_state::get(c, plugin, key))
    }
    /// Plugin state keys with a prefix, in byte order, at most `limit`.
    pub fn plugin_state_keys(
        &self,
        plugin: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<String>, OutboxError> {
        self.read(|c| plugin_state::keys(c, plugin, prefix, limit))
    }
    /// Bytes of keys and values a plugin keeps.
    pub fn plugin_state_usage(&self, plugin: &str) -> Result<u64, OutboxError> {
        self.read(|c| plugin_state::usage(c, plugin))
    }
}

/// A trail's stored entries (each with the time the message went
/// `sending`, on a row written when it left `sending`) with the entries for
/// going `sending` put back in place; `now`: the message's state and its
/// time, for a message still `sending`. An entry going `sending` comes
/// from the entry before it; a row stored before schema v9 that already
/// says the message went `sending` gets no second one.
fn with_sending_entries(
    rows: Vec<(AuditEntry, Option<i64>)>,
    now: Option<(String, i64)>,
) -> Vec<AuditEntry> {
    fn went_sending(trail: &mut Vec<AuditEntry>, at_ms: i64) {
        let from = trail.last().map(|e| e.to.clone());
        if from.as_deref() != Some(State::Sending.as_str()) {
            trail.push(AuditEntry {
                at_ms,
                from,
                to: State::Sending.as_str().to_owned(),
                detail: None,
            });
        }
    }
    let mut trail = Vec::with_capacity(2 * rows.len() + 1);
    for (entry, started_ms) in rows {
        if let Some(at_ms) = started_ms {
            went_sending(&mut trail, at_ms);
        }
        trail.push(entry);
    }
    if let Some((state, since)) = now
        && state == State::Sending.as_str()
    {
        went_sending(&mut trail, since);
    }
    trail
}

#[cfg(test)]
mod tests {
    use super::with_sending_entries;
    use crate::AuditEntry;

    fn entry(at_ms: i64, from: Option<&str>, to: &str) -> AuditEntry {
        AuditEntry {
            at_ms,
            from: from.map(str::to_owned),
            to: to.to_owned(),
            detail: None,
        }
    }

    #[test]
    fn an_attempt_recorded_before_v9_is_not_shown_twice() {
        // Claimed before the upgrade (its own row), its result after (a row
        // keeping when it went sending), then claimed again and still
        // sending.
        let rows = vec![
            (entry(1, None, "queued"), None),
            (entry(2, Some("queued"), "sending"), None),
            (entry(3, Some("sending"), "retry"), Some(2)),
            (entry(4, Some("retry"), "queued"), None),
        ];
        let trail = with_sending_entries(rows, Some(("sending".into(), 5)));
        let moves: Vec<(i64, Option<&str>, &str)> = trail
            .iter()
            .map(|e| (e.at_ms, e.from.as_deref(), e.to.as_str()))
            .collect();
        assert_eq!(
            moves,
            [
                (1, None, "queued"),
                (2, Some("queued"), "sending"),
                (3, Some("sending"), "retry"),
                (4, Some("retry"), "queued"),
                (5, Some("queued"), "sending"),
            ]
        );
    }
}
