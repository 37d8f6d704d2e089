//! Plugin state as the runtime sees it: a read-only view of what is stored,
//! and the changes one call makes on top of it.
//!
//! The runtime never writes state itself. A successful call returns its
//! changes in [`RunReport::state_changes`](crate::RunReport) and what it read
//! from the store in [`RunReport::reads`](crate::RunReport); the caller (the
//! outbox) commits the changes in the same transaction as the call's emails,
//! after checking that nothing in the read set changed meanwhile. A failed
//! call's changes are dropped with its store.
//!
//! Everything a plugin can make the host hold here is capped: key size on
//! every call, the number of pending changes, the number of keys read and
//! listed. Values are capped by the plugin's quota.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};

use sendbox_types::{Bytes, state_key_problem};
pub use sendbox_types::{MAX_STATE_KEY_BYTES as MAX_KEY_BYTES, ReadSet, StateChange};

/// Most distinct keys one call may change.
pub const MAX_PENDING_CHANGES: usize = 10_000;
/// Most distinct keys one call may read from the store.
pub const MAX_KEYS_READ: usize = 10_000;
/// Most keys one call may list from the store, over all its `keys` calls.
pub const MAX_KEYS_LISTED: usize = 100_000;

/// A failure reading stored state.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state store: {0}")]
pub struct StateError(pub String);

/// A stored value and its version (see [`ReadSet`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The value.
    pub value: Vec<u8>,
    /// Its version, always at least 1.
    pub version: u64,
}

/// Read access to the committed state of every plugin.
pub trait StateStore: Send + Sync {
    /// Reads one value with its version.
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Versioned>, StateError>;
    /// Lists keys starting with `prefix`, in byte order, at most `limit`
    /// of them (the runtime asks for one more than it allows, to tell).
    fn keys(&self, plugin: &str, prefix: &str, limit: usize) -> Result<Vec<String>, StateError>;
    /// Total bytes of keys and values the plugin keeps.
    fn usage_bytes(&self, plugin: &str) -> Result<u64, StateError>;
}

/// A state store in memory, for dry runs and tests.
#[derive(Debug, Default)]
pub struct MemoryState {
    map: Mutex<MemoryMap>,
}

#[derive(Debug, Default)]
struct MemoryMap {
    entries: BTreeMap<(String, String), Versioned>,
    next_version: u64,
}

impl MemoryState {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a successful call's changes.
    pub fn apply(&self, plugin: &str, changes: &[StateChange]) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.next_version += 1;
        let version = map.next_version;
        for change in changes {
            match change {
                StateChange::Set { key, value } => {
                    map.entries.insert(
                        (plugin.to_owned(), key.clone()),
                        Versioned {
                            value: value.0.clone(),
                            version,
                        },
                    );
                }
                StateChange::Delete { key } => {
                    map.entries.remove(&(plugin.to_owned(), key.clone()));
                }
            }
        }
    }

    /// A copy of one plugin's entries.
    pub fn entries(&self, plugin: &str) -> BTreeMap<String, Vec<u8>> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.entries
            .iter()
            .filter(|((p, _), _)| p == plugin)
            .map(|((_, k), v)| (k.clone(), v.value.clone()))
            .collect()
    }
}

impl StateStore for MemoryState {
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Versioned>, StateError> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(map
            .entries
            .get(&(plugin.to_owned(), key.to_owned()))
            .cloned())
    }

    fn keys(&self, plugin: &str, prefix: &str, limit: usize) -> Result<Vec<String>, StateError> {
        Ok(self
            .entries(plugin)
            .into_keys()
            .filter(|k| k.starts_with(prefix))
            .take(limit)
            .collect())
    }

    fn usage_bytes(&self, plugin: &str) -> Result<u64, StateError> {
        Ok(self
            .entries(plugin)
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum())
    }
}

/// Why a state call was stopped: the store failed, or the plugin passed a
/// cap. Either way the call traps and commits nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum StateFailure {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StateError),
    /// A cap on what the host holds for the plugin was passed.
    #[error("{detail}")]
    Limit {
        /// The cap's name.
        limit: &'static str,
        /// What was seen.
        detail: String,
    },
}

/// The state one call sees: the committed store plus this call's writes.
pub(crate) struct Overlay {
    store: Arc<dyn StateStore>,
    plugin: String,
    quota_bytes: u64,
    /// `Some(value)` for a write, `None` for a delete.
    changes: BTreeMap<String, Option<Vec<u8>>>,
    /// What was read from the store, for validation at commit.
    reads: ReadSet,
    /// Keys listed so far, against [`MAX_KEYS_LISTED`].
    listed: usize,
    /// Usage in the store before this call, read on first write.
    base_usage: Option<u64>,
    /// Change in usage caused by this call's writes.
    usage_delta: i64,
}

impl Overlay {
    pub(crate) fn new(store: Arc<dyn StateStore>, plugin: String, quota_bytes: u64) -> Self {
        Overlay {
            store,
            plugin,
            quota_bytes,
            changes: BTreeMap::new(),
            reads: ReadSet::default(),
            listed: 0,
            base_usage: None,
            usage_delta: 0,
        }
    }

    /// Reads the committed value and records the version seen.
    fn read_stored(&mut self, key: &str) -> Result<Option<Vec<u8>>, StateFailure> {
        let found = self.store.get(&self.plugin, key)?;
        if !self.reads.keys.contains_key(key) {
            if self.reads.keys.len() >= MAX_KEYS_READ {
                return Err(StateFailure::Limit {
                    limit: "state_reads",
                    detail: format!(
                        "read more than {MAX_KEYS_READ} distinct state keys in one event"
                    ),
                });
            }
            self.reads
                .keys
                .insert(key.to_owned(), found.as_ref().map_or(0, |v| v.version));
        }
        Ok(found.map(|v| v.value))
    }

    pub(crate) fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, StateFailure> {
        // No such key can have been stored.
        if state_key_problem(key).is_some() {
            return Ok(None);
        }
        match self.changes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.read_stored(key),
        }
    }

    /// The committed size of `key`, for quota accounting. Not a read the
    /// plugin's outcome depends on (the commit re-checks the quota), so it
    /// is not recorded.
    fn stored_len(&self, key: &str) -> Result<u64, StateFailure> {
        let len = match self.changes.get(key) {
            Some(v) => v.as_ref().map(Vec::len),
            None => self.store.get(&self.plugin, key)?.map(|v| v.value.len()),
        };
        Ok(len.map_or(0, |n| (key.len() + n) as u64))
    }

    fn check_pending(&self, key: &str) -> Result<(), StateFailure> {
        if self.changes.len() >= MAX_PENDING_CHANGES && !self.changes.contains_key(key) {
            return Err(StateFailure::Limit {
                limit: "state_changes",
                detail: format!("changed more than {MAX_PENDING_CHANGES} state keys in one event"),
            });
        }
        Ok(())
    }

    /// Records a write. `Ok(Err(reason))` is a refusal the plugin sees.
    pub(crate) fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> Result<Result<(), String>, StateFailure> {
        if let Some(problem) = state_key_problem(&key) {
            return Ok(Err(problem));
        }
        self.check_pending(&key)?;
        let base = match self.base_usage {
            Some(b) => b,
            None => {
                let b = self.store.usage_bytes(&self.plugin)?;
                self.base_usage = Some(b);
                b
            }
        };
        let old = self.stored_len(&key)? as i64;
        let new = (key.len() + value.len()) as i64;
        let after = base as i64 + self.usage_delta - old + new;
        if new > old && after > self.quota_bytes as i64 {
            return Ok(Err(format!(
                "state quota exceeded: this write would bring the plugin to {after} bytes, \
                 quota is {} bytes (limit `state_bytes`)",
                self.quota_bytes
            )));
        }
        self.usage_delta += new - old;
        self.changes.insert(key, Some(value));
        Ok(Ok(()))
    }

    pub(crate) fn delete(&mut self, key: String) -> Result<(), StateFailure> {
        if state_key_problem(&key).is_some() {
            return Ok(());
        }
        let old = self.stored_len(&key)?;
        if old == 0 && !self.changes.contains_key(&key) {
            // Nothing stored, nothing pending: deleting changes nothing.
            return Ok(());
        }
        self.check_pending(&key)?;
        self.usage_delta -= old as i64;
        self.changes.insert(key, None);
        Ok(())
    }

    pub(crate) fn keys(&mut self, prefix: &str) -> Result<Vec<String>, StateFailure> {
        if prefix.len() > MAX_KEY_BYTES || prefix.contains('\0') {
            return Ok(Vec::new());
        }
        let room = MAX_KEYS_LISTED.saturating_sub(self.listed);
        let stored = self.store.keys(&self.plugin, prefix, room + 1)?;
        if stored.len() > room {
            return Err(StateFailure::Limit {
                limit: "state_keys",
                detail: format!("listed more than {MAX_KEYS_LISTED} state keys in one event"),
            });
        }
        self.listed += stored.len();
        let mut keys: BTreeSet<String> = stored.iter().cloned().collect();
        self.reads
            .prefixes
            .entry(prefix.to_owned())
            .or_insert(stored);
        for (k, v) in self.changes.range(prefix.to_owned()..) {
            if !k.starts_with(prefix) {
                break;
            }
            if v.is_some() {
                keys.insert(k.clone());
            } else {
                keys.remove(k);
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// The call's changes and what it read.
    pub(crate) fn finish(self) -> (Vec<StateChange>, ReadSet) {
        let changes = self
            .changes
            .into_iter()
            .map(|(key, v)| match v {
                Some(value) => StateChange::Set {
                    key,
                    value: Bytes(value),
                },
                None => StateChange::Delete { key },
            })
            .collect();
        (changes, self.reads)
    }
}

// ---- the `state` interface a plugin imports ----

impl crate::wit::state::Host for crate::host::HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let got = self.overlay.get(&key);
        got.map_err(|e| self.state_failed(e))
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        self.overlay
            .set(key, value)
            .map_err(|e| self.state_failed(e))
    }

    fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.overlay.delete(key).map_err(|e| self.state_failed(e))
    }

    fn keys(&mut self, prefix: String) -> wasmtime::Result<Vec<String>> {
        let listed = self.overlay.keys(&prefix);
        listed.map_err(|e| self.state_failed(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(key: &str, value: &[u8]) -> StateChange {
        StateChange::Set {
            key: key.into(),
            value: Bytes(value.to_vec()),
        }
    }

    #[test]
    fn overlay_sees_its_own_writes_and_deletes() {
        let store = Arc::new(MemoryState::new());
        store.apply("p", &[set("a", b"1")]);
        let mut o = Overlay::new(store.clone(), "p".into(), 1000);
        assert_eq!(o.get("a").unwrap(), Some(b"1".to_vec()));
        o.set("b".into(), b"2".to_vec()).unwrap().unwrap();
        o.delete("a".into()).unwrap();
        assert_eq!(o.get("a").unwrap(), None);
        assert_eq!(o.keys("").unwrap(), vec!["b".to_string()]);
        // The store itself is untouched until the caller applies the changes.
        assert_eq!(store.get("p", "b").unwrap(), None);
    }

    #[test]
    fn quota_counts_committed_bytes_and_replacements() {
        let store = Arc::new(MemoryState::new());
        store.apply("p", &[set("k", &[0; 90])]);
        let mut o = Overlay::new(store, "p".into(), 100);
        // Replacing k (91 bytes) by a 99-byte value stays at 100: allowed.
        assert!(o.set("k".into(), vec![0; 99]).unwrap().is_ok());
        let refused = o.set("x".into(), vec![0; 1]).unwrap().unwrap_err();
        assert!(refused.contains("state_bytes"), "{refused}");
        o.delete("k".into()).unwrap();
        assert!(o.set("x".into(), vec![0; 50]).unwrap().is_ok());
    }

    #[test]
    fn reads_are_recorded_with_versions_and_listings() {
        let store = Arc::new(MemoryState::new());
        store.apply("p", &[set("seq", b"1"), set("e/1", b"x")]);
        let mut o = Overlay::new(store, "p".into(), 1000);
        o.get("seq").unwrap();
        o.get("missing").unwrap();
        o.keys("e/").unwrap();
        // A key written before it is read is not a store read.
        o.set("own".into(), b"v".to_vec()).unwrap().unwrap();
        o.get("own").unwrap();
        let (_, reads) = o.finish();
        assert_eq!(reads.keys.get("seq"), Some(&1));
        assert_eq!(reads.keys.get("missing"), Some(&0));
        assert!(!reads.keys.contains_key("own"));
        assert_eq!(reads.prefixes.get("e/"), Some(&vec!["e/1".to_string()]));
    }

    #[test]
    fn keys_that_cannot_be_stored_cost_nothing() {
        let store = Arc::new(MemoryState::new());
        let mut o = Overlay::new(store, "p".into(), 1 << 20);
        let huge = "k".repeat(1 << 20);
        assert_eq!(o.get(&huge).unwrap(), None);
        o.delete(huge.clone()).unwrap();
        assert!(o.keys(&huge).unwrap().is_empty());
        assert!(o.set(huge, vec![]).unwrap().is_err());
        assert!(o.set("a\0b".into(), vec![]).unwrap().is_err());
        // Deleting what is not there records nothing.
        for i in 0..(MAX_PENDING_CHANGES * 2) {
            o.delete(format!("nothing-{i}")).unwrap();
        }
        let (changes, reads) = o.finish();
        assert!(changes.is_empty());
        assert!(reads.is_empty());
    }

    #[test]
    fn pending_changes_are_capped() {
        let store = Arc::new(MemoryState::new());
        let mut o = Overlay::new(store, "p".into(), u64::MAX / 2);
        for i in 0..MAX_PENDING_CHANGES {
            o.set(format!("k{i}"), vec![]).unwrap().unwrap();
        }
        // Rewriting a pending key is fine; a new one is not.
        o.set("k0".into(), vec![1]).unwrap().unwrap();
        assert!(matches!(
            o.set("one-more".into(), vec![]),
            Err(StateFailure::Limit {
                limit: "state_changes",
                ..
            })
        ));
    }
}
