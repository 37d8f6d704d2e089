//! Versioned schema migrations. Each entry upgrades from its index to the
//! next version; the applied version lives in `PRAGMA user_version`. Never
//! edit a shipped migration: add one.

use rusqlite::Connection;

use crate::OutboxError;

const MIGRATIONS: &[&str] = &[
    // v1
    r#"
    CREATE TABLE messages (
        id              INTEGER PRIMARY KEY,
        message_id      TEXT NOT NULL UNIQUE,
        plugin          TEXT NOT NULL,
        trigger         TEXT NOT NULL,
        event_id        TEXT NOT NULL,
        account         TEXT NOT NULL,
        state           TEXT NOT NULL CHECK (state IN ('queued','sending','sent','retry','dead')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL,
        created_ms      INTEGER NOT NULL,
        updated_ms      INTEGER NOT NULL,
        recipients      TEXT NOT NULL,
        bytes           INTEGER NOT NULL,
        email_json      TEXT NOT NULL,
        idempotency_key TEXT,
        last_reply      TEXT
    );
    CREATE INDEX messages_due ON messages (account, state, next_attempt_ms);
    CREATE INDEX messages_plugin_created ON messages (plugin, created_ms);

    CREATE TABLE audit (
        id          INTEGER PRIMARY KEY,
        message     INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        at_ms       INTEGER NOT NULL,
        from_state  TEXT,
        to_state    TEXT NOT NULL,
        detail      TEXT
    );
    CREATE INDEX audit_message ON audit (message);

    CREATE TABLE idempotency (
        plugin      TEXT NOT NULL,
        key         TEXT NOT NULL,
        message     INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL,
        PRIMARY KEY (plugin, key)
    );

    CREATE TABLE plugin_state (
        plugin  TEXT NOT NULL,
        key     TEXT NOT NULL,
        value   BLOB NOT NULL,
        PRIMARY KEY (plugin, key)
    ) WITHOUT ROWID;

    CREATE TABLE suppressions (
        address   TEXT PRIMARY KEY,
        added_ms  INTEGER NOT NULL,
        reason    TEXT
    );
    "#,
    // v2
    r#"
    CREATE TABLE account_status (
        account     TEXT PRIMARY KEY,
        paused_ms   INTEGER NOT NULL,
        reason      TEXT NOT NULL
    );
    "#,
    // v3
    r#"
    CREATE TABLE schedule_runs (
        plugin      TEXT NOT NULL,
        schedule    TEXT NOT NULL,
        last_ms     INTEGER NOT NULL,
        PRIMARY KEY (plugin, schedule)
    );
    "#,
    // v4: plugin state versions (optimistic concurrency) and usage counted
    // in bytes, kept per plugin instead of summed (SQLite's length() counts
    // characters of TEXT and stops at NUL).
    r#"
    ALTER TABLE plugin_state ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE plugin_usage (
        plugin  TEXT PRIMARY KEY,
        bytes   INTEGER NOT NULL,
        seq     INTEGER NOT NULL
    );
    INSERT INTO plugin_usage (plugin, bytes, seq)
        SELECT plugin, SUM(length(CAST(key AS BLOB)) + length(CAST(value AS BLOB))), 1
        FROM plugin_state GROUP BY plugin;
    "#,
    // v5: message counts by state, kept by triggers, so `/metrics` reads
    // five rows instead of scanning the table (and stays exact whichever
    // process changes a message).
    r#"
    CREATE TABLE message_counts (
        state   TEXT PRIMARY KEY,
        n       INTEGER NOT NULL
    );
    INSERT INTO message_counts (state, n) VALUES
        ('queued', 0), ('sending', 0), ('sent', 0), ('retry', 0), ('dead', 0);
    UPDATE message_counts
        SET n = (SELECT COUNT(*) FROM messages WHERE messages.state = message_counts.state);
    CREATE TRIGGER messages_counted_in AFTER INSERT ON messages BEGIN
        UPDATE message_counts SET n = n + 1 WHERE state = NEW.state;
    END;
    CREATE TRIGGER messages_counted_out AFTER DELETE ON messages BEGIN
        UPDATE message_counts SET n = n - 1 WHERE state = OLD.state;
    END;
    CREATE TRIGGER messages_counted_moved AFTER UPDATE OF state ON messages
        WHEN OLD.state <> NEW.state BEGIN
        UPDATE message_counts SET n = n - 1 WHERE state = OLD.state;
        UPDATE message_counts SET n = n + 1 WHERE state = NEW.state;
    END;
    CREATE INDEX messages_final ON messages (state, updated_ms);
    CREATE INDEX idempotency_created ON idempotency (created_ms);
    "#,
    // v6: each email's content in its own table, so the state changes of
    // delivery (claim, result) rewrite a small row instead of one holding
    // the whole email: a few pages per group of messages, not one per
    // message.
    r#"
    CREATE TABLE message_bodies (
        message     INTEGER PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
        email_json  TEXT NOT NULL
    );
    INSERT INTO message_bodies (message, email_json) SELECT id, email_json FROM messages;
    ALTER TABLE messages DROP COLUMN email_json;
    -- Due messages in the order they are claimed: a claim reads its batch
    -- off this index instead of sorting every due message, and only
    -- queued and retrying messages are in it.
    DROP INDEX messages_due;
    CREATE INDEX messages_due_order ON messages (account, next_attempt_ms, id)
        WHERE state IN ('queued', 'retry');
    "#,
];

/// The schema version this build writes.
pub const CURRENT: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to [`CURRENT`], one transaction per step.
pub fn migrate(conn: &mut Connection) -> Result<i64, OutboxError> {
    migrate_to(conn, CURRENT)
}

/// Brings the database up to `target` (tests build older databases).
fn migrate_to(conn: &mut Connection, target: i64) -> Result<i64, OutboxError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > CURRENT {
        return Err(OutboxError::Schema(format!(
            "the database is at schema version {version}, newer than this sendbox ({CURRENT}): upgrade sendbox or restore a backup"
        )));
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target as usize)
        .skip(version as usize)
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "outbox schema migrated");
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Outbox, State};

    #[test]
    fn a_version_5_database_keeps_its_queue_through_the_body_split() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            let mut c = Connection::open(&path).unwrap();
            migrate_to(&mut c, 5).unwrap();
            let email = r#"{"to":["ops@example.com"],"subject":"from v5","text":"kept"}"#;
            for (id, state) in [(1, "queued"), (2, "sent"), (3, "retry")] {
                c.execute(
                    "INSERT INTO messages (id, message_id, plugin, trigger, event_id, account, state, \
                     next_attempt_ms, created_ms, updated_ms, recipients, bytes, email_json) \
                     VALUES (?1, ?2, 'p', 'cli', 'e', 'alerts', ?3, 0, 0, 0, 'ops@example.com', 12, ?4)",
                    rusqlite::params![id, format!("<m{id}@example.com>"), state, email],
                )
                .unwrap();
            }
        }
        let outbox = Outbox::open(&path).unwrap();
        let m = outbox.get(1).unwrap();
        assert_eq!(
            (m.email.subject.as_str(), m.email.text.as_deref()),
            ("from v5", Some("kept"))
        );
        let claimed: Vec<i64> = outbox
            .claim("alerts", 10)
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(
            claimed,
            [1, 3],
            "queued and due retries, in order; not the sent one"
        );
        let depth = outbox.depth().unwrap();
        assert!(
            depth.contains(&(State::Sending, 2)) && depth.contains(&(State::Sent, 1)),
            "{depth:?}"
        );
        outbox.drop_message(2).unwrap();
        assert!(outbox.list(None, 10).unwrap().iter().all(|m| m.id != 2));
        let bodies: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT COUNT(*) FROM message_bodies", [], |r| r.get(0))
            .unwrap();
        assert_eq!(bodies, 2, "a dropped message's body goes with it");
    }
}
