//! Plugin key-value state in SQLite: versioned reads, the commit-time check
//! that a call's reads still hold, and the writes with their byte usage.
//!
//! Every key has a version. A committing call that changes state takes the
//! plugin's next sequence number and stamps it on every key it writes, so a
//! key's version only ever grows, even across a delete and a re-create.
//! Usage is kept per plugin in bytes as Rust counts them (`key.len() +
//! value.len()`), never with SQL's `length()`, which counts characters and
//! stops at NUL.

use rusqlite::{Connection, OptionalExtension, params};
use sendbox_types::{ReadSet, StateChange};

use crate::OutboxError;

pub(crate) fn get(
    c: &Connection,
    plugin: &str,
    key: &str,
) -> rusqlite::Result<Option<(Vec<u8>, u64)>> {
    c.prepare_cached("SELECT value, version FROM plugin_state WHERE plugin = ?1 AND key = ?2")?
        .query_row(params![plugin, key], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
        })
        .optional()
}

fn version(c: &Connection, plugin: &str, key: &str) -> rusqlite::Result<u64> {
    c.prepare_cached("SELECT version FROM plugin_state WHERE plugin = ?1 AND key = ?2")?
        .query_row(params![plugin, key], |r| r.get::<_, i64>(0))
        .optional()
        .map(|v| v.map_or(0, |v| v as u64))
}

/// Keys starting with `prefix` in byte order (TEXT compares with memcmp),
/// at most `limit`. A range scan on the primary key, not a table scan.
pub(crate) fn keys(
    c: &Connection,
    plugin: &str,
    prefix: &str,
    limit: usize,
) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare_cached(
        "SELECT key FROM plugin_state WHERE plugin = ?1 AND key >= ?2 ORDER BY key",
    )?;
    let mut rows = st.query(params![plugin, prefix])?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(row) = rows.next()? else { break };
        let key: String = row.get(0)?;
        if !key.starts_with(prefix) {
            break;
        }
        out.push(key);
    }
    Ok(out)
}

pub(crate) fn usage(c: &Connection, plugin: &str) -> rusqlite::Result<u64> {
    c.prepare_cached("SELECT bytes FROM plugin_usage WHERE plugin = ?1")?
        .query_row([plugin], |r| r.get::<_, i64>(0))
        .optional()
        .map(|n| n.map_or(0, |n| n.max(0) as u64))
}

/// Refuses the call with [`OutboxError::Conflict`] if anything it read
/// changed since: a key's version, or the keys under a listed prefix.
pub(crate) fn validate(c: &Connection, plugin: &str, reads: &ReadSet) -> Result<(), OutboxError> {
    for (key, seen) in &reads.keys {
        if version(c, plugin, key)? != *seen {
            return Err(OutboxError::Conflict(format!("key {key:?} was written")));
        }
    }
    for (prefix, seen) in &reads.prefixes {
        let now = keys(c, plugin, prefix, seen.len() + 1)?;
        if &now != seen {
            return Err(OutboxError::Conflict(format!(
                "keys under {prefix:?} were added or removed"
            )));
        }
    }
    Ok(())
}

/// The stored length of `key`'s value in bytes, if it is set.
pub(crate) fn stored_len(c: &Connection, plugin: &str, key: &str) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached(
        "SELECT length(CAST(value AS BLOB)) FROM plugin_state WHERE plugin = ?1 AND key = ?2",
    )?
    .query_row(params![plugin, key], |r| r.get(0))
    .optional()
}

/// Applies a call's state changes, stamping them with the plugin's next
/// sequence number, and records the plugin's usage as `usage_after` (which
/// the caller computed, and checked against the quota, before writing).
pub(crate) fn apply(
    c: &Connection,
    plugin: &str,
    changes: &[StateChange],
    usage_after: i64,
) -> Result<(), OutboxError> {
    if changes.is_empty() {
        return Ok(());
    }
    let seq: i64 = c
        .prepare_cached(
            "INSERT INTO plugin_usage (plugin, bytes, seq) VALUES (?1, 0, 1) \
             ON CONFLICT (plugin) DO UPDATE SET seq = seq + 1 RETURNING seq",
        )?
        .query_row([plugin], |r| r.get(0))?;
    for change in changes {
        match change {
            StateChange::Set { key, value } => {
                c.prepare_cached(
                    "INSERT INTO plugin_state (plugin, key, value, version) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value, version = excluded.version",
                )?
                .execute(params![plugin, key, value.0, seq])?;
            }
            StateChange::Delete { key } => {
                c.prepare_cached("DELETE FROM plugin_state WHERE plugin = ?1 AND key = ?2")?
                    .execute(params![plugin, key])?;
            }
        }
    }
    c.prepare_cached("UPDATE plugin_usage SET bytes = ?2 WHERE plugin = ?1")?
        .execute(params![plugin, usage_after])?;
    Ok(())
}
