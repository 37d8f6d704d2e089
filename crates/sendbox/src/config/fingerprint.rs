//! Hashes of each section, so a reload can tell what changed (hashes, so an
//! inline secret never shows in `Debug`).

use std::collections::BTreeMap;

use super::*;

pub(super) struct Fingerprints {
    pub(super) restart: String,
    pub(super) accounts: BTreeMap<String, String>,
    pub(super) plugins: BTreeMap<String, Fingerprint>,
}

pub(super) fn hash(text: &str) -> String {
    sendbox_runtime::content_hash(text.as_bytes())
}

/// Hashes of each section's canonical text (comments and layout do not
/// count).
pub(super) fn fingerprints(source: &str) -> Fingerprints {
    let mut table: toml::Table = toml::from_str(source).unwrap_or_default();
    let text = |v: Option<toml::Value>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut plugins = BTreeMap::new();
    if let Some(toml::Value::Table(ps)) = table.remove("plugins") {
        for (name, p) in ps {
            let toml::Value::Table(p) = p else {
                continue;
            };
            plugins.insert(name, plugin_fingerprint(p));
        }
    }
    let mut accounts = BTreeMap::new();
    if let Some(toml::Value::Table(accts)) = table.remove("accounts") {
        for (name, a) in accts {
            accounts.insert(name, a.to_string());
        }
    }
    // Listeners restart with the daemon (their sockets and TLS state).
    let restart = hash(&format!(
        "{}\n{}",
        // `plugins_dir` is applied by a reload, not a restart.
        text(table.remove("daemon").map(|mut d| {
            if let toml::Value::Table(t) = &mut d {
                t.remove("plugins_dir");
            }
            d
        })),
        text(table.remove("listeners"))
    ));
    Fingerprints {
        restart,
        accounts,
        plugins,
    }
}

/// A plugin section's hashes: everything but the triggers, and the
/// triggers.
pub(super) fn plugin_fingerprint(mut p: toml::Table) -> Fingerprint {
    let mut triggers = toml::Table::new();
    for key in ["webhook", "watch", "schedule"] {
        if let Some(v) = p.remove(key) {
            triggers.insert(key.into(), v);
        }
    }
    Fingerprint {
        plugin: hash(&p.to_string()),
        triggers: hash(&triggers.to_string()),
    }
}
