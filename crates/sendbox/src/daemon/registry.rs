//! What the daemon's parts share: the loaded plugins (swapped whole by a
//! reload), the routes, each account's waker, the metrics and each
//! plugin's allowed From addresses.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use sendbox_delivery::AllowedFrom;
use sendbox_runtime::Plugin;
use sendbox_triggers::webhook::RouteTable;
use tokio::sync::Notify;

use crate::metrics::Metrics;

/// A loaded plugin with what its commits need.
pub struct Loaded {
    /// The plugin.
    pub plugin: Plugin,
    /// The `.wasm` file it came from.
    pub plugin_path: PathBuf,
    /// Its account.
    pub account: String,
    /// The account's mailbox.
    pub mailbox: String,
    /// Its policy.
    pub policy: sendbox_outbox::Policy,
    /// Events of this plugin run optimistically in parallel holding this
    /// shared; an event whose state reads keep conflicting runs alone,
    /// holding it exclusively. Kept across reloads of the plugin, whose
    /// versions share one state.
    pub serial: Arc<tokio::sync::RwLock<()>>,
}

/// The plugins that serve events now, by name. Readers take a snapshot of
/// one plugin; a reload swaps the whole map.
#[derive(Default)]
pub struct Registry(RwLock<Arc<HashMap<String, Arc<Loaded>>>>);

impl Registry {
    /// A registry holding these plugins.
    pub fn new(plugins: HashMap<String, Loaded>) -> Self {
        let map = plugins.into_iter().map(|(n, l)| (n, Arc::new(l))).collect();
        Registry(RwLock::new(Arc::new(map)))
    }

    /// The current version of a plugin.
    pub fn get(&self, name: &str) -> Option<Arc<Loaded>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    pub(crate) fn set(&self, map: HashMap<String, Arc<Loaded>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(map);
    }
}

/// Each account's delivery worker waker, by account name: the dispatcher
/// nudges the right worker after a commit.
#[derive(Default)]
pub struct Wakers(RwLock<HashMap<String, Arc<Notify>>>);

impl Wakers {
    /// The account's waker, if its worker runs.
    pub fn get(&self, account: &str) -> Option<Arc<Notify>> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(account)
            .cloned()
    }

    pub(crate) fn set(&self, account: &str, waker: Arc<Notify>) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(account.to_owned(), waker);
    }

    pub(crate) fn remove(&self, account: &str) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(account);
    }
}

/// What the dispatcher and the supervisor share: where plugins, routes,
/// worker wakers and allowed From addresses live.
pub struct Shared {
    /// The plugins that serve.
    pub registry: Arc<Registry>,
    /// The webhook routes.
    pub routes: RouteTable,
    /// The delivery workers' wakers.
    pub wakers: Arc<Wakers>,
    /// Allowed From addresses by plugin.
    pub allowed_from: AllowedFrom,
    /// The daemon's counters.
    pub metrics: Arc<Metrics>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            registry: Arc::new(Registry::default()),
            routes: RouteTable::default(),
            wakers: Arc::new(Wakers::default()),
            allowed_from: AllowedFrom::default(),
            metrics: Arc::new(Metrics::default()),
        }
    }
}
