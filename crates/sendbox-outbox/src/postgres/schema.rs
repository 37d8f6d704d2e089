//! Versioned migrations of the PostgreSQL schema. Each entry moves the
//! database one version on; the applied version lives in `sendbox_schema`.
//! Nodes starting together take an advisory lock first, so one migrates and
//! the others find the work done. Never edit an entry: add the next one.

use tokio_postgres::Client;

use super::pg_err;
use crate::OutboxError;

/// The advisory lock key of migrations ("sendbox" in ASCII).
const MIGRATION_LOCK: i64 = 0x73656e64626f78;

const MIGRATIONS: &[&str] = &[
    // v1: everything the SQLite schema has at its version 6, plus the lease
    // a node holds on each message it is sending, and the nodes seen.
    r#"
    CREATE TABLE messages (
        id              BIGSERIAL PRIMARY KEY,
        message_id      TEXT NOT NULL UNIQUE,
        plugin          TEXT NOT NULL,
        trigger         TEXT NOT NULL,
        event_id        TEXT NOT NULL,
        account         TEXT NOT NULL,
        state           TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms BIGINT NOT NULL,
        created_ms      BIGINT NOT NULL,
        updated_ms      BIGINT NOT NULL,
        recipients      TEXT NOT NULL,
        last_reply      TEXT,
        bytes           BIGINT NOT NULL,
        idempotency_key TEXT,
        email_json      TEXT NOT NULL,
        lease_node      TEXT,
        lease_until_ms  BIGINT
    );
    CREATE INDEX messages_due_order ON messages (account, next_attempt_ms, id)
        WHERE state IN ('queued', 'retry');
    CREATE INDEX messages_final ON messages (state, updated_ms);
    CREATE INDEX messages_plugin_created ON messages (plugin, created_ms);
    CREATE INDEX messages_leased ON messages (lease_node, lease_until_ms)
        WHERE state = 'sending';

    CREATE TABLE audit (
        id          BIGSERIAL PRIMARY KEY,
        message     BIGINT NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        at_ms       BIGINT NOT NULL,
        from_state  TEXT,
        to_state    TEXT NOT NULL,
        detail      TEXT
    );
    CREATE INDEX audit_message ON audit (message);

    CREATE TABLE idempotency (
        plugin      TEXT NOT NULL,
        key         TEXT NOT NULL,
        message     BIGINT NOT NULL,
        created_ms  BIGINT NOT NULL,
        PRIMARY KEY (plugin, key)
    );
    CREATE INDEX idempotency_created ON idempotency (created_ms);

    -- Keys compare byte by byte (COLLATE "C"), as in SQLite: prefix
    -- listings come out in the same order on both backends.
    CREATE TABLE plugin_state (
        plugin  TEXT NOT NULL,
        key     TEXT COLLATE "C" NOT NULL,
        value   BYTEA NOT NULL,
        version BIGINT NOT NULL,
        PRIMARY KEY (plugin, key)
    );
    CREATE TABLE plugin_usage (
        plugin  TEXT PRIMARY KEY,
        bytes   BIGINT NOT NULL,
        seq     BIGINT NOT NULL
    );

    CREATE TABLE suppressions (
        address   TEXT PRIMARY KEY,
        added_ms  BIGINT NOT NULL,
        reason    TEXT
    );
    CREATE TABLE account_status (
        account     TEXT PRIMARY KEY,
        paused_ms   BIGINT NOT NULL,
        reason      TEXT NOT NULL
    );
    CREATE TABLE schedule_runs (
        plugin      TEXT NOT NULL,
        schedule    TEXT NOT NULL,
        last_ms     BIGINT NOT NULL,
        PRIMARY KEY (plugin, schedule)
    );
    CREATE TABLE nodes (
        node        TEXT PRIMARY KEY,
        started_ms  BIGINT NOT NULL,
        seen_ms     BIGINT NOT NULL,
        detail      TEXT NOT NULL
    );
    "#,
    // v2: what the nodes share to hold an account's limits together: the
    // time of the account's next send under its rate, and its connection
    // slots, each leased by the node that may hold that connection open.
    r#"
    CREATE TABLE account_pace (
        account     TEXT PRIMARY KEY,
        next_ms     BIGINT NOT NULL
    );
    CREATE TABLE account_slots (
        account     TEXT NOT NULL,
        slot        INTEGER NOT NULL,
        node        TEXT,
        until_ms    BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (account, slot)
    );
    CREATE INDEX account_slots_node ON account_slots (node) WHERE node IS NOT NULL;
    "#,
];

/// Refuses a database that is not at this sendbox's schema version,
/// without changing it: not set up yet, older, or newer.
pub(super) async fn check_current(client: &Client) -> Result<(), OutboxError> {
    let known = MIGRATIONS.len() as i32;
    let version: Option<i32> = match client
        .query_opt("SELECT version FROM sendbox_schema", &[])
        .await
    {
        Ok(row) => row.map(|r| r.get(0)),
        // No such table: no sendbox has started on this database yet.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => None,
        Err(e) => return Err(pg_err(e)),
    };
    match version {
        Some(v) if v == known => Ok(()),
        None => Err(OutboxError::Schema(
            "the database has no sendbox tables yet: the first `sendbox run` on it creates them"
                .into(),
        )),
        Some(v) => Err(OutboxError::Schema(format!(
            "the database is at schema version {v}, this sendbox is at {known}: run the sendbox the nodes run"
        ))),
    }
}

/// Brings the database to the latest version; refuses one from a newer
/// sendbox.
pub(super) async fn migrate(client: &mut Client) -> Result<(), OutboxError> {
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS sendbox_schema (version INTEGER NOT NULL)")
        .await
        .map_err(pg_err)?;
    let version: i32 = match tx
        .query_opt("SELECT version FROM sendbox_schema", &[])
        .await
        .map_err(pg_err)?
    {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO sendbox_schema (version) VALUES (0)", &[])
                .await
                .map_err(pg_err)?;
            0
        }
    };
    let known = MIGRATIONS.len() as i32;
    if version > known {
        return Err(OutboxError::Schema(format!(
            "the database is at schema version {version}, this sendbox knows up to {known}: \
             run the newer sendbox, or restore a backup taken before it ran"
        )));
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(m).await.map_err(pg_err)?;
        tracing::info!(version = i + 1, "PostgreSQL schema migrated");
    }
    tx.execute("UPDATE sendbox_schema SET version = $1", &[&known])
        .await
        .map_err(pg_err)?;
    tx.commit().await.map_err(pg_err)?;
    Ok(())
}
