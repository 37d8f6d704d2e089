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
];

/// The schema version this build writes.
pub const CURRENT: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to [`CURRENT`], one transaction per step.
pub fn migrate(conn: &mut Connection) -> Result<i64, OutboxError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > CURRENT {
        return Err(OutboxError::Schema(format!(
            "the database is at schema version {version}, newer than this sendbox ({CURRENT}): upgrade sendbox or restore a backup"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "outbox schema migrated");
    }
    Ok(CURRENT)
}
