//! What runs, and hot reload: the loaded plugins ([`Registry`]), their
//! triggers, and swapping only what changed when the config file or a
//! plugin's `.wasm` changes (or on SIGHUP).
//!
//! [`Supervisor::apply`] compares a newly loaded config with what runs,
//! plugin by plugin:
//! - its section (wasm path, account, config, limits, policy) or its `.wasm`
//!   bytes changed → load the new version (compiled code comes from the
//!   cache when it can); if that fails, the previous version keeps serving
//!   and the reason is logged;
//! - its triggers changed → its watches and schedules restart and its
//!   webhook route is swapped in the route table;
//! - gone from the config → its triggers stop and it is removed.
//!
//! [`Supervisor::apply_accounts`] does the same for accounts: a new or
//! changed account (its section, or a secret it resolves, re-read on every
//! reload) gets a new delivery worker once the old one finished its sends;
//! settings that do not work keep the old worker. `[daemon]` changes need a
//! restart (logged as such). An event already dispatched holds the plugin
//! version it started with and finishes on it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sendbox_delivery::AllowedFrom;
use sendbox_outbox::{AnyStore, Store};
use sendbox_runtime::{Plugin, Runtime};
use sendbox_triggers::Dispatch;
use sendbox_triggers::webhook::{Route, RouteTable};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::accounts::RunningAccount;
use super::file_changes::Watched;
use super::registry::{Loaded, Registry, Shared, Wakers};
use crate::config::{self, Fingerprint};
use crate::metrics::Metrics;

/// One plugin's watches and schedules.
struct TriggerTasks {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl TriggerTasks {
    /// Tells them to stop now; `retiring` waits for each to finish the
    /// event it is handling.
    fn retire(self, retiring: &mut JoinSet<()>) {
        let TriggerTasks { stop, mut tasks } = self;
        let _ = stop.send(true);
        retiring.spawn(async move { while tasks.join_next().await.is_some() {} });
    }
}

impl TriggerTasks {
    fn idle() -> Self {
        TriggerTasks {
            stop: watch::channel(true).0,
            tasks: JoinSet::new(),
        }
    }
}

struct Running {
    loaded: Arc<Loaded>,
    fingerprint: Fingerprint,
    route: Option<(String, Route)>,
    triggers: TriggerTasks,
}

/// Owns what runs: loads plugins, starts and stops their triggers, and
/// applies config changes.
pub struct Supervisor {
    pub(super) runtime: Runtime,
    pub(super) outbox: AnyStore,
    pub(super) registry: Arc<Registry>,
    pub(super) routes: RouteTable,
    pub(super) dispatch: Dispatch,
    pub(super) metrics: Arc<Metrics>,
    /// Each account's worker waker, shared with the dispatcher.
    pub(super) wakers: Arc<Wakers>,
    /// Each plugin's allowed From addresses, shared with the workers.
    pub(super) allowed_from: AllowedFrom,
    /// The listeners' allowed From addresses (by `listener:NAME`), which
    /// a reload keeps (listeners change with a restart).
    listener_senders: HashMap<String, Vec<String>>,
    pub(super) restart_fingerprint: String,
    pub(super) accounts: HashMap<String, RunningAccount>,
    running: HashMap<String, Running>,
    /// Every configured plugin's `.wasm` (and drop-in `.toml`), loaded or
    /// not.
    wasm_files: Vec<PathBuf>,
    /// The drop-in plugins' folder.
    plugins_dir: Option<PathBuf>,
    /// Trigger tasks being stopped after a reload.
    pub(super) retiring: JoinSet<()>,
}

/// What one reload did, for logs and tests.
#[derive(Debug, Default)]
pub struct Applied {
    /// Accounts whose delivery worker (re)started.
    pub accounts: Vec<String>,
    /// Plugins loaded (new or new version).
    pub loaded: Vec<String>,
    /// Plugins whose triggers restarted.
    pub retriggered: Vec<String>,
    /// Plugins removed.
    pub removed: Vec<String>,
    /// Plugins that failed to load (the previous version, if any, serves).
    pub failed: Vec<String>,
}

/// What reading a plugin's `.wasm` for a reload gave.
enum NewVersion {
    /// Same bytes and section: keep the running version.
    Unchanged,
    /// Loaded: swap it in.
    Ready(Plugin),
    /// Did not load: the running version (if any) keeps serving.
    Failed(String),
}

impl Supervisor {
    /// A supervisor with nothing running yet: [`Supervisor::apply_accounts`]
    /// then [`Supervisor::apply`] start the workers and the plugins.
    /// `restart_fingerprint` is the config's.
    pub fn new(
        runtime: Runtime,
        outbox: AnyStore,
        shared: &Shared,
        dispatch: Dispatch,
        restart_fingerprint: String,
    ) -> Self {
        Supervisor {
            runtime,
            outbox,
            registry: shared.registry.clone(),
            routes: shared.routes.clone(),
            dispatch,
            metrics: shared.metrics.clone(),
            wakers: shared.wakers.clone(),
            allowed_from: shared.allowed_from.clone(),
            restart_fingerprint,
            listener_senders: HashMap::new(),
            accounts: HashMap::new(),
            running: HashMap::new(),
            wasm_files: Vec::new(),
            plugins_dir: None,
            retiring: JoinSet::new(),
        }
    }

    /// The SMTP listeners' allowed From addresses, kept across reloads;
    /// call before [`Supervisor::apply`].
    pub fn set_listener_senders(&mut self, senders: HashMap<String, Vec<String>>) {
        self.listener_senders = senders;
    }

    /// What a reload depends on: the config, every plugin's `.wasm` and
    /// drop-in `.toml`, and the drop-in folder (where new pairs appear).
    pub fn watched_files(&self, config_path: &Path) -> Watched {
        let mut files = vec![config_path.to_owned()];
        files.extend(self.wasm_files.iter().cloned());
        Watched {
            files,
            dirs: self.plugins_dir.iter().cloned().collect(),
        }
    }

    /// The drop-in plugins' folder to watch (the config's
    /// `[daemon] plugins_dir`), created if missing so it can be watched
    /// while still empty.
    pub fn set_plugins_dir(&mut self, dir: Option<PathBuf>) -> std::io::Result<()> {
        if let Some(d) = &dir {
            std::fs::create_dir_all(d)?;
        }
        self.plugins_dir = dir;
        Ok(())
    }

    /// Re-reads the config and applies it. A config that does not load
    /// changes nothing.
    pub async fn reload(&mut self, config_path: &Path) -> Option<Applied> {
        let path = config_path.to_owned();
        let loaded = tokio::task::spawn_blocking(move || config::load(&path)).await;
        let cfg = match loaded {
            Ok(Ok(cfg)) => cfg,
            Ok(Err(e)) => {
                for line in &e.errors {
                    tracing::error!(config = %config_path.display(), "{line}");
                }
                tracing::error!(config = %config_path.display(), "config not reloaded; everything keeps running as it was");
                self.metrics.reload("refused");
                return None;
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload failed");
                self.metrics.reload("refused");
                return None;
            }
        };
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        if cfg.restart_fingerprint != self.restart_fingerprint {
            tracing::warn!(config = %config_path.display(), "[daemon] or [listeners] changed: that takes effect at the next restart");
        }
        if let Err(e) = self.set_plugins_dir(cfg.plugins_dir.clone()) {
            tracing::error!(config = %config_path.display(), error = %e, "cannot create [daemon] plugins_dir; its drop-ins are not watched");
        }
        let accounts = self.apply_accounts(cfg.accounts).await;
        // A reload is the operator's word that something was fixed: paused
        // accounts try again now rather than at their recheck time.
        for a in self.accounts.values() {
            a.resume.notify_waiters();
        }
        let mut applied = self.apply(cfg.plugins).await;
        applied.accounts = accounts.restarted;
        applied.failed.extend(
            accounts
                .failed
                .into_iter()
                .map(|(name, _)| format!("accounts.{name}")),
        );
        self.metrics.reload(if applied.failed.is_empty() {
            "applied"
        } else {
            "partial"
        });
        Some(applied)
    }

    /// Makes the running plugins match `plugins`, changing only what
    /// differs.
    pub async fn apply(&mut self, plugins: BTreeMap<String, config::PluginConfig>) -> Applied {
        let mut applied = Applied::default();
        self.wasm_files = plugins
            .values()
            .flat_map(|p| [p.wasm.clone(), p.defined_in.clone()])
            .collect();
        self.wasm_files.sort();
        self.wasm_files.dedup();
        for (name, p) in plugins.iter() {
            let Some(mailbox) = self.accounts.get(&p.account).map(|a| a.mailbox.clone()) else {
                tracing::error!(plugin = %name, account = %p.account, "plugin not loaded: its account is not running (see the account's error above)");
                applied.failed.push(name.clone());
                continue;
            };
            let current = self.running.get(name);
            let (old_hash, same_section) = match current {
                Some(r) => (
                    Some(r.loaded.plugin.sha256().to_owned()),
                    r.fingerprint.plugin == p.fingerprint.plugin
                        && r.loaded.plugin_path == p.wasm
                        && r.loaded.mailbox == mailbox,
                ),
                None => (None, false),
            };
            let prepared = {
                let (runtime, name, wasm, settings) = (
                    self.runtime.clone(),
                    name.clone(),
                    p.wasm.clone(),
                    p.settings.clone(),
                );
                tokio::task::spawn_blocking(move || {
                    prepare(&runtime, &name, &wasm, settings, old_hash, same_section)
                })
                .await
                .unwrap_or_else(|e| NewVersion::Failed(format!("load task failed: {e}")))
            };
            let loaded = match prepared {
                NewVersion::Unchanged => None,
                NewVersion::Ready(plugin) => {
                    tracing::info!(plugin = %name, wasm = %p.wasm.display(), sha256 = %plugin.sha256(), replaced = current.is_some(), "plugin loaded");
                    for key in plugin.undeclared_config_keys() {
                        tracing::warn!(plugin = %name, key = %key, "config key is not one the plugin declares it reads (a typo?)");
                    }
                    applied.loaded.push(name.clone());
                    Some(Arc::new(Loaded {
                        plugin,
                        plugin_path: p.wasm.clone(),
                        account: p.account.clone(),
                        mailbox,
                        policy: p.policy.clone(),
                        serial: current.map(|r| r.loaded.serial.clone()).unwrap_or_default(),
                    }))
                }
                NewVersion::Failed(why) => {
                    if current.is_some() {
                        tracing::error!(plugin = %name, wasm = %p.wasm.display(), reason = %why, "new version not loaded; the previous version keeps serving");
                    } else {
                        tracing::error!(plugin = %name, wasm = %p.wasm.display(), reason = %why, "plugin not loaded; its triggers stay off");
                    }
                    applied.failed.push(name.clone());
                    continue;
                }
            };
            // The route is compared resolved too, so a rotated webhook
            // secret (its file or variable) counts as a change on reload.
            let triggers_changed = current.is_none_or(|r| {
                r.fingerprint.triggers != p.fingerprint.triggers || r.route != route_of(p)
            });
            match self.running.remove(name) {
                Some(mut r) => {
                    if let Some(l) = loaded {
                        r.loaded = l;
                    }
                    if triggers_changed {
                        // The old ones stop before the new ones start, so a
                        // folder is never watched twice.
                        let old = std::mem::replace(&mut r.triggers, TriggerTasks::idle());
                        old.retire(&mut self.retiring);
                        r.triggers = self.start_triggers(p);
                        r.route = route_of(p);
                        applied.retriggered.push(name.clone());
                    }
                    r.fingerprint = p.fingerprint.clone();
                    self.running.insert(name.clone(), r);
                }
                None => {
                    let Some(loaded) = loaded else { continue };
                    let triggers = self.start_triggers(p);
                    self.running.insert(
                        name.clone(),
                        Running {
                            loaded,
                            fingerprint: p.fingerprint.clone(),
                            route: route_of(p),
                            triggers,
                        },
                    );
                    applied.retriggered.push(name.clone());
                }
            }
        }
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|n| !plugins.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(r) = self.running.remove(&name) {
                tracing::info!(plugin = %name, "plugin removed from the config; its triggers stop");
                r.triggers.retire(&mut self.retiring);
                applied.removed.push(name);
            }
        }
        self.registry.set(
            self.running
                .iter()
                .map(|(n, r)| (n.clone(), r.loaded.clone()))
                .collect(),
        );
        self.allowed_from.set(
            self.running
                .iter()
                .map(|(n, r)| (n.clone(), r.loaded.policy.allowed_from.clone()))
                .chain(self.listener_senders.clone())
                .collect(),
        );
        self.routes.replace(
            self.running
                .values()
                .filter_map(|r| r.route.clone())
                .collect(),
        );
        // Reap retired trigger tasks that have finished.
        while self.retiring.try_join_next().is_some() {}
        applied
    }

    fn start_triggers(&self, p: &config::PluginConfig) -> TriggerTasks {
        let (stop, rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let mut tasks = JoinSet::new();
        for w in p.watches.iter().cloned() {
            // Watching before `ready`, so a caller can drop files in at once.
            let (plugin, dir) = (w.plugin.clone(), w.dir.clone());
            match sendbox_triggers::watch::Started::new(w) {
                Ok(started) => {
                    tasks.spawn(started.run(self.dispatch.clone(), stopped()));
                }
                Err(e) => {
                    tracing::error!(%plugin, dir = %dir.display(), error = %e, "cannot watch folder");
                }
            }
        }
        for sch in p.schedules.iter().cloned() {
            let (outbox, dispatch, stopped) =
                (self.outbox.clone(), self.dispatch.clone(), stopped());
            tasks.spawn(async move {
                let last = match outbox.schedule_run(&sch.plugin, &sch.name).await {
                    Ok(last) => last,
                    Err(e) => {
                        tracing::error!(plugin = %sch.plugin, schedule = %sch.name, error = %e, "cannot read the schedule's last run; missed runs are skipped");
                        None
                    }
                };
                sendbox_triggers::cron::run(sch, last, dispatch, stopped).await
            });
        }
        TriggerTasks { stop, tasks }
    }

    /// Stops every trigger; each finishes the event it is handling.
    pub async fn stop_triggers(&mut self) {
        for (_, r) in self.running.drain() {
            r.triggers.retire(&mut self.retiring);
        }
        self.routes.replace(HashMap::new());
        while self.retiring.join_next().await.is_some() {}
    }
}

fn route_of(p: &config::PluginConfig) -> Option<(String, Route)> {
    Some((p.webhook_path.clone()?, p.webhook.clone()?))
}

/// Loads `wasm` unless its bytes and section are what already runs.
fn prepare(
    runtime: &Runtime,
    name: &str,
    wasm: &Path,
    settings: sendbox_runtime::PluginSettings,
    old_hash: Option<String>,
    same_section: bool,
) -> NewVersion {
    let bytes = match std::fs::read(wasm) {
        Ok(b) => b,
        Err(e) => return NewVersion::Failed(format!("cannot read {}: {e}", wasm.display())),
    };
    if same_section && old_hash.as_deref() == Some(sendbox_runtime::content_hash(&bytes).as_str()) {
        return NewVersion::Unchanged;
    }
    match runtime.load(name, &bytes, settings) {
        Ok(p) => NewVersion::Ready(p),
        Err(e) => NewVersion::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    //! The supervisor's decisions, in process, on what `reload` returns:
    //! what a config change loads, retriggers or removes.

    use super::*;
    use sendbox_test_support::wasm;

    fn config(dir: &Path, path: &str, to: &str) -> PathBuf {
        let file = dir.join("sendbox.toml");
        let text = format!(
            "[daemon]\nstore = \"var/sendbox.db\"\n\
             [accounts.local]\nprovider = \"file\"\nmailbox = \"sendbox@localhost\"\ndir = \"mail\"\n\
             [plugins.bridge]\nwasm = \"{wasm}\"\naccount = \"local\"\n\
             [plugins.bridge.config]\nto = \"{to}\"\n\
             [plugins.bridge.webhook]\npath = \"{path}\"\nunauthenticated = true\n",
            wasm = wasm::example("webhook-bridge").display()
        );
        std::fs::write(&file, text).unwrap();
        file
    }

    fn names(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reload_loads_retriggers_or_removes_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let file = config(dir.path(), "/hooks/a", "ops@example.com");
        let cfg = config::load(&file).unwrap();
        let outbox: AnyStore = Arc::new(sendbox_outbox::Outbox::open(&cfg.store).unwrap()).into();
        let runtime = Runtime::new(sendbox_runtime::RuntimeOptions::default()).unwrap();
        let shared = Shared::default();
        let dispatch: Dispatch =
            Arc::new(|_job| Box::pin(async { sendbox_triggers::Dispatched::NoPlugin }));
        let mut sup = Supervisor::new(
            runtime,
            outbox,
            &shared,
            dispatch,
            cfg.restart_fingerprint.clone(),
        );
        let accounts = sup.apply_accounts(cfg.accounts).await;
        assert_eq!(names(&accounts.restarted), ["local"]);
        let first = sup.apply(cfg.plugins).await;
        assert_eq!(names(&first.loaded), ["bridge"]);

        // Nothing changed: nothing happens.
        let same = sup.reload(&file).await.unwrap();
        assert!(
            same.loaded.is_empty() && same.retriggered.is_empty() && same.accounts.is_empty(),
            "{same:?}"
        );

        // The plugin's config: a new version, the route untouched.
        config(dir.path(), "/hooks/a", "oncall@example.com");
        let changed = sup.reload(&file).await.unwrap();
        assert_eq!(names(&changed.loaded), ["bridge"]);
        assert!(changed.retriggered.is_empty(), "{changed:?}");

        // Its webhook path: only the triggers restart.
        config(dir.path(), "/hooks/b", "oncall@example.com");
        let moved = sup.reload(&file).await.unwrap();
        assert!(moved.loaded.is_empty(), "{moved:?}");
        assert_eq!(names(&moved.retriggered), ["bridge"]);
        assert_eq!(
            shared.routes.plugin_at("/hooks/b").as_deref(),
            Some("bridge")
        );
        assert_eq!(shared.routes.plugin_at("/hooks/a"), None);

        // A config that does not validate changes nothing.
        std::fs::write(&file, "[plugins.bridge]\nwasm = 1\n").unwrap();
        assert!(sup.reload(&file).await.is_none());
        assert!(shared.registry.get("bridge").is_some());

        // The plugin gone from the config: removed.
        std::fs::write(
            &file,
            "[daemon]\nstore = \"var/sendbox.db\"\n[accounts.local]\nprovider = \"file\"\nmailbox = \"sendbox@localhost\"\ndir = \"mail\"\n",
        )
        .unwrap();
        let removed = sup.reload(&file).await.unwrap();
        assert_eq!(names(&removed.removed), ["bridge"]);
        assert!(shared.registry.get("bridge").is_none());
        sup.stop_triggers().await;
        sup.stop_delivery().await;
    }
}
