//! Plugin state as the runtime sees it: a read-only view of what is stored,
//! and the changes one call makes on top of it.
//!
//! The runtime never writes state itself. A successful call returns its
//! changes in [`RunReport::state_changes`](crate::RunReport); the caller (the
//! outbox) commits them in the same transaction as the call's emails. A failed
//! call's changes are dropped with its store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use sendbox_types::Bytes;
pub use sendbox_types::StateChange;

/// Longest key a plugin may use, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// A failure reading stored state.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state store: {0}")]
pub struct StateError(pub String);

/// Read access to the committed state of every plugin.
pub trait StateStore: Send + Sync {
    /// Reads one value.
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, StateError>;
    /// Lists keys starting with `prefix`, in byte order.
    fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, StateError>;
    /// Total bytes of keys and values the plugin keeps.
    fn usage_bytes(&self, plugin: &str) -> Result<u64, StateError>;
}

/// A state store in memory, for dry runs and tests.
#[derive(Debug, Default)]
pub struct MemoryState {
    map: Mutex<BTreeMap<(String, String), Vec<u8>>>,
}

impl MemoryState {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a successful call's changes.
    pub fn apply(&self, plugin: &str, changes: &[StateChange]) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        for change in changes {
            match change {
                StateChange::Set { key, value } => {
                    map.insert((plugin.to_owned(), key.clone()), value.0.clone());
                }
                StateChange::Delete { key } => {
                    map.remove(&(plugin.to_owned(), key.clone()));
                }
            }
        }
    }

    /// A copy of one plugin's entries.
    pub fn entries(&self, plugin: &str) -> BTreeMap<String, Vec<u8>> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.iter()
            .filter(|((p, _), _)| p == plugin)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl StateStore for MemoryState {
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(map.get(&(plugin.to_owned(), key.to_owned())).cloned())
    }

    fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, StateError> {
        Ok(self
            .entries(plugin)
            .into_keys()
            .filter(|k| k.starts_with(prefix))
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

/// The state one call sees: the committed store plus this call's writes.
pub(crate) struct Overlay {
    store: Arc<dyn StateStore>,
    plugin: String,
    quota_bytes: u64,
    /// `Some(value)` for a write, `None` for a delete.
    changes: BTreeMap<String, Option<Vec<u8>>>,
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
            base_usage: None,
            usage_delta: 0,
        }
    }

    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        match self.changes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(&self.plugin, key),
        }
    }

    fn stored_len(&self, key: &str) -> Result<u64, StateError> {
        Ok(self.get(key)?.map_or(0, |v| (key.len() + v.len()) as u64))
    }

    /// Records a write. `Ok(Err(reason))` is a refusal the plugin sees.
    pub(crate) fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> Result<Result<(), String>, StateError> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Ok(Err(format!(
                "state key must be 1 to {MAX_KEY_BYTES} bytes, got {}",
                key.len()
            )));
        }
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
        if after > self.quota_bytes as i64 {
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

    pub(crate) fn delete(&mut self, key: String) -> Result<(), StateError> {
        let old = self.stored_len(&key)? as i64;
        self.usage_delta -= old;
        self.changes.insert(key, None);
        Ok(())
    }

    pub(crate) fn keys(&self, prefix: &str) -> Result<Vec<String>, StateError> {
        let mut keys: std::collections::BTreeSet<String> =
            self.store.keys(&self.plugin, prefix)?.into_iter().collect();
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

    pub(crate) fn into_changes(self) -> Vec<StateChange> {
        self.changes
            .into_iter()
            .map(|(key, v)| match v {
                Some(value) => StateChange::Set {
                    key,
                    value: Bytes(value),
                },
                None => StateChange::Delete { key },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_sees_its_own_writes_and_deletes() {
        let store = Arc::new(MemoryState::new());
        store.apply(
            "p",
            &[StateChange::Set {
                key: "a".into(),
                value: Bytes(b"1".to_vec()),
            }],
        );
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
        store.apply(
            "p",
            &[StateChange::Set {
                key: "k".into(),
                value: Bytes(vec![0; 90]),
            }],
        );
        let mut o = Overlay::new(store, "p".into(), 100);
        // Replacing k (91 bytes) by a 99-byte value stays at 100: allowed.
        assert!(o.set("k".into(), vec![0; 99]).unwrap().is_ok());
        let refused = o.set("x".into(), vec![0; 1]).unwrap().unwrap_err();
        assert!(refused.contains("state_bytes"), "{refused}");
        o.delete("k".into()).unwrap();
        assert!(o.set("x".into(), vec![0; 50]).unwrap().is_ok());
    }
}
