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
    // v7: less work per queued message. The queued count is kept by the
    // commit itself (one UPDATE per call): the insert trigger made every
    // insert a multi-row statement, which SQLite runs with a statement
    // journal and with foreign-key scans of the child tables. Queued
    // messages leave the final-state index (it serves pruning and the
    // restart's look for `sending`). The state CHECK becomes a chain of
    // comparisons (`V7_STATE_CHECK`): an IN list of five builds a
    // temporary table on every insert and state change. From v7 on, a
    // queued message has no audit row of its own: its trail's first entry
    // is read off its row (`audit_trail`).
    r#"
    DROP TRIGGER messages_counted_in;
    DROP INDEX messages_final;
    CREATE INDEX messages_final ON messages (state, updated_ms)
        WHERE state = 'sending' OR state = 'sent' OR state = 'dead';
    "#,
    // v8: state changes are counted by the writes that make them, once per
    // group like the queued count (see `counts`): the trigger ran two
    // counter updates for every row moved and made each state change a
    // statement with its own journal — about a third of the outbox's work
    // per delivered message.
    r#"
    DROP TRIGGER messages_counted_moved;
    "#,
    // v9: a claim writes no audit row. A message's row says when it went
    // `sending` (its `updated_ms`) for as long as it is; the row written
    // when it leaves `sending` keeps that time in `started_ms`, and the
    // trail shows the entry from it (`audit_trail`). One insert fewer per
    // delivery attempt, and the audit pages are no longer written by the
    // claims' transactions as well as by the results'.
    r#"
    ALTER TABLE audit ADD COLUMN started_ms INTEGER;
    "#,
];

/// The `messages.state` CHECK as v1 wrote it, and as v7 rewrites it: the
/// same states, compared one by one.
const V1_STATE_CHECK: &str = "CHECK (state IN ('queued','sending','sent','retry','dead'))";
const V7_STATE_CHECK: &str = "CHECK (state = 'queued' OR state = 'sending' OR state = 'sent' \
     OR state = 'retry' OR state = 'dead')";

/// Rewrites the state CHECK in place, as SQLite documents for a change
/// that leaves the stored rows as they are (ALTER TABLE, "making other
/// kinds of table schema changes"): edit the table's SQL in
/// `sqlite_schema`, bump `schema_version`, check integrity.
fn rewrite_state_check(tx: &rusqlite::Transaction) -> Result<(), OutboxError> {
    let version: i64 = tx.query_row("PRAGMA schema_version", [], |r| r.get(0))?;
    tx.pragma_update(None, "writable_schema", true)?;
    let edited = tx.execute(
        "UPDATE sqlite_schema SET sql = replace(sql, ?1, ?2) \
         WHERE type = 'table' AND name = 'messages' AND instr(sql, ?1) > 0",
        [V1_STATE_CHECK, V7_STATE_CHECK],
    );
    tx.pragma_update(None, "schema_version", version + 1)?;
    tx.pragma_update(None, "writable_schema", false)?;
    edited?;
    let ok: String = tx.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if ok != "ok" {
        return Err(OutboxError::Schema(format!(
            "the database failed its check after the v7 schema edit ({ok}): restore a backup"
        )));
    }
    Ok(())
}

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
        // IMMEDIATE, and the version read again inside: two processes
        // opening an old database at once take the steps one after the
        // other, and the second finds each already applied.
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now > i as i64 {
            continue;
        }
        tx.execute_batch(sql)?;
        if i + 1 == 7 {
            rewrite_state_check(&tx)?;
        }
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

    fn plan(c: &Connection, sql: &str) -> String {
        let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        // Parameters left unbound: the plan does not depend on them.
        let mut rows = st.raw_query();
        let mut plan = Vec::new();
        while let Some(r) = rows.next().unwrap() {
            plan.push(r.get::<_, String>(3).unwrap());
        }
        plan.join("; ")
    }

    #[test]
    fn processes_opening_an_old_database_at_once_migrate_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v6.db");
        migrate_to(&mut Connection::open(&path).unwrap(), 6).unwrap();
        // Every opener reads version 6 before any of them migrates.
        let mut conns: Vec<Connection> = (0..8)
            .map(|_| {
                let c = Connection::open(&path).unwrap();
                c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
                c
            })
            .collect();
        for c in &conns {
            let v: i64 = c
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, 6);
        }
        let results: Vec<Result<i64, String>> = std::thread::scope(|s| {
            let handles: Vec<_> = conns
                .iter_mut()
                .map(|c| s.spawn(move || migrate(c).map_err(|e| e.to_string())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            results.iter().all(|r| r == &Ok(CURRENT)),
            "every opener ends at the current version: {results:?}"
        );
        let c = Connection::open(&path).unwrap();
        let check_rewritten: i64 = c
            .query_row(
                "SELECT instr(sql, ?1) > 0 FROM sqlite_schema WHERE name = 'messages'",
                [V7_STATE_CHECK],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(check_rewritten, 1);
    }

    /// Message `id` in `state`, as schemas v6 and later store it (its body
    /// apart).
    fn insert_message(c: &Connection, id: i64, state: &str) {
        c.execute(
            "INSERT INTO messages (id, message_id, plugin, trigger, event_id, account, state, \
             next_attempt_ms, created_ms, updated_ms, recipients, bytes) \
             VALUES (?1, ?2, 'p', 'cli', 'e', 'alerts', ?3, 0, 0, 0, 'ops@example.com', 12)",
            rusqlite::params![id, format!("<m{id}@example.com>"), state],
        )
        .unwrap();
    }

    #[test]
    fn a_version_6_database_keeps_its_counts_and_its_state_check_through_v7() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v6.db");
        {
            let mut c = Connection::open(&path).unwrap();
            migrate_to(&mut c, 6).unwrap();
            for (id, state) in [(1, "queued"), (2, "sending"), (3, "sent"), (4, "dead")] {
                insert_message(&c, id, state);
            }
            // Before v7 the commit wrote the first entry as an audit row.
            c.execute(
                "INSERT INTO audit (message, at_ms, from_state, to_state, detail) \
                 VALUES (1, 0, NULL, 'queued', 'plugin p event e (cli)')",
                [],
            )
            .unwrap();
        }
        let outbox = Outbox::open(&path).unwrap();
        let call = crate::behaviour::call(
            vec![
                crate::behaviour::email("a@x.org", "one"),
                crate::behaviour::email("b@x.org", "two"),
            ],
            vec![],
        );
        let queued = outbox.commit(call).unwrap().queued;
        assert_eq!(queued.len(), 2);
        let old_trail = outbox.audit_trail(1).unwrap();
        assert_eq!(
            old_trail.len(),
            1,
            "the stored first entry, not a second one: {old_trail:?}"
        );
        let new_trail = outbox.audit_trail(queued[0].id).unwrap();
        assert_eq!(
            (
                new_trail.len(),
                new_trail[0].to.as_str(),
                new_trail[0].from.as_deref()
            ),
            (1, "queued", None)
        );
        assert!(
            new_trail[0]
                .detail
                .as_deref()
                .is_some_and(|d| d.starts_with("plugin ") && d.contains("evt-")),
            "{new_trail:?}"
        );
        let mut depth = outbox.depth().unwrap();
        depth.sort_by_key(|(s, _)| s.as_str());
        assert_eq!(
            depth,
            [
                (State::Dead, 1),
                (State::Queued, 3),
                (State::Sending, 1),
                (State::Sent, 1)
            ],
            "the rows of v6 and the two queued by the commit, counted once each"
        );
        drop(outbox);

        let c = Connection::open(&path).unwrap();
        let table: String = c
            .query_row(
                "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'messages'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(
            table.contains(V7_STATE_CHECK) && !table.contains(V1_STATE_CHECK),
            "{table}"
        );
        let bogus = c.execute("UPDATE messages SET state = 'bogus' WHERE id = 1", []);
        assert!(
            bogus.is_err_and(|e| e.to_string().contains("CHECK")),
            "the rewritten CHECK still refuses an unknown state"
        );
        let queued_via_sql: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM messages WHERE state = 'queued'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(queued_via_sql, 3);
        let audit_rows: i64 = c
            .query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(audit_rows, 1, "queueing writes no audit row");
        for sql in [
            super::super::PRUNE_SENT,
            super::super::PRUNE_DEAD,
            "SELECT id FROM messages WHERE state = 'sending'",
        ] {
            let p = plan(&c, sql);
            assert!(p.contains("messages_final"), "{sql}: {p}");
        }
        let p = plan(
            &c,
            "INSERT INTO messages (message_id, plugin, trigger, event_id, account, state, \
             next_attempt_ms, created_ms, updated_ms, recipients, bytes) \
             VALUES ('<x@y>', 'p', 'cli', 'e', 'alerts', 'queued', 0, 0, 0, 'a@b', 1)",
        );
        assert!(!p.contains("TEMP"), "no temporary table per insert: {p}");
        let ops: Vec<String> = c
            .prepare(
                "EXPLAIN INSERT INTO messages (message_id, plugin, trigger, event_id, account, state, \
                 next_attempt_ms, created_ms, updated_ms, recipients, bytes) \
                 VALUES ('<x@y>', 'p', 'cli', 'e', 'alerts', 'queued', 0, 0, 0, 'a@b', 1)",
            )
            .unwrap()
            .query_map([], |r| r.get::<_, String>(1))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for op in ["OpenEphemeral", "Program", "FkCounter"] {
            assert!(
                !ops.iter().any(|o| o == op),
                "an insert runs no {op} (no IN-list table, no trigger, no child scans): {ops:?}"
            );
        }
    }

    #[test]
    fn a_version_7_database_keeps_its_counts_and_state_changes_run_no_trigger_from_v8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v7.db");
        {
            let mut c = Connection::open(&path).unwrap();
            migrate_to(&mut c, 7).unwrap();
            for (id, state) in [(1, "queued"), (2, "queued"), (3, "sending"), (4, "sent")] {
                insert_message(&c, id, state);
                c.execute(
                    "INSERT INTO message_bodies (message, email_json) VALUES (?1, ?2)",
                    rusqlite::params![id, r#"{"to":["ops@example.com"],"subject":"v7"}"#],
                )
                .unwrap();
            }
            // v7 counted inserts in the commit, not by trigger.
            c.execute(
                "UPDATE message_counts SET n = CASE state WHEN 'queued' THEN 2 \
                 WHEN 'sending' THEN 1 WHEN 'sent' THEN 1 ELSE 0 END",
                [],
            )
            .unwrap();
        }
        let outbox = Outbox::open(&path).unwrap();
        let claimed = outbox.claim("alerts", 1).unwrap();
        assert_eq!(claimed.len(), 1);
        outbox.mark(3, State::Retry, Some(0), "451 later").unwrap();
        outbox.retry_now(4).unwrap();
        let mut depth = outbox.depth().unwrap();
        depth.sort_by_key(|(s, _)| s.as_str());
        assert_eq!(
            depth,
            [(State::Queued, 2), (State::Retry, 1), (State::Sending, 1)],
            "each move counted once, by the write that made it"
        );
        drop(outbox);
        let c = Connection::open(&path).unwrap();
        let triggers: Vec<String> = c
            .prepare("SELECT name FROM sqlite_schema WHERE type = 'trigger'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(triggers, ["messages_counted_out"], "deletes only");
        let ops: Vec<String> = c
            .prepare(
                "EXPLAIN UPDATE messages SET state = 'sent', updated_ms = 1, last_reply = '250' \
                 WHERE id = 1 AND state = 'sending'",
            )
            .unwrap()
            .query_map([], |r| r.get::<_, String>(1))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for op in ["Program", "OpenEphemeral"] {
            assert!(
                !ops.iter().any(|o| o == op),
                "a state change runs no {op}: {ops:?}"
            );
        }
    }

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
