//! `sendbox run`: the daemon. Loads the plugins, opens the outbox, starts a
//! delivery worker per account and every trigger (webhooks, watched
//! folders, schedules), and hands each event to its plugin: fresh instance,
//! then one outbox commit of its emails and state, then (for a webhook) the
//! answer.
//!
//! Shutdown, in pipeline order: SIGTERM/SIGINT stops the triggers, in-flight
//! events finish and commit, then the delivery workers finish their sends,
//! all within `shutdown_grace_secs`; a second signal quits at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use sendbox_outbox::{Call, Outbox, OutboxError};
use sendbox_runtime::{Plugin, Runtime, RuntimeOptions, StateError, StateStore};
use sendbox_triggers::{Dispatch, Dispatched, Job};
use tokio::sync::Notify;

use crate::commands::accounts::load_config;
use crate::commands::deliver::{Signals, allowed_from, open_and_recover, start_workers};
use crate::exit::{self, coded};

/// `sendbox run --config FILE`
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The config file.
    #[arg(long, short, env = "SENDBOX_CONFIG")]
    pub config: PathBuf,
}

/// Plugin state, read from the outbox's database.
pub struct OutboxState(pub Arc<Outbox>);

fn state_err(e: OutboxError) -> StateError {
    StateError(e.to_string())
}

impl StateStore for OutboxState {
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.0.state_get(plugin, key).map_err(state_err)
    }
    fn keys(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, StateError> {
        self.0.state_keys(plugin, prefix).map_err(state_err)
    }
    fn usage_bytes(&self, plugin: &str) -> Result<u64, StateError> {
        self.0.state_usage(plugin).map_err(state_err)
    }
}

/// A loaded plugin with what its commits need.
pub struct Loaded {
    /// The plugin.
    pub plugin: Plugin,
    /// Its account.
    pub account: String,
    /// The account's mailbox.
    pub mailbox: String,
    /// Its policy.
    pub policy: sendbox_outbox::Policy,
}

impl RunArgs {
    /// Runs the daemon until a signal.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let started = std::time::Instant::now();
        let cfg = load_config(&self.config)?;
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        let runtime = Runtime::new(RuntimeOptions {
            cache_dir: cfg.cache_dir.clone().or_else(crate::cli::default_cache_dir),
            ..RuntimeOptions::default()
        })
        .map_err(|e| coded(exit::EX_SOFTWARE, e.to_string()))?;
        let outbox = open_and_recover(&cfg.store)?;

        // Plugins: a bad one is logged and skipped; the rest serve.
        let mut plugins: HashMap<String, Loaded> = HashMap::new();
        let mut routes = HashMap::new();
        let mut watches = Vec::new();
        let mut schedules = Vec::new();
        for p in cfg.plugins.values() {
            match runtime.load_file(&p.name, &p.wasm, p.settings.clone()) {
                Ok(plugin) => {
                    tracing::info!(plugin = %p.name, wasm = %p.wasm.display(), "plugin loaded");
                    let mailbox = cfg
                        .accounts
                        .get(&p.account)
                        .map(|a| a.mailbox.clone())
                        .unwrap_or_default();
                    plugins.insert(
                        p.name.clone(),
                        Loaded {
                            plugin,
                            account: p.account.clone(),
                            mailbox,
                            policy: p.policy.clone(),
                        },
                    );
                    if let (Some(route), Some(path)) = (&p.webhook, &p.webhook_path) {
                        routes.insert(path.clone(), route.clone());
                    }
                    watches.extend(p.watches.iter().cloned());
                    schedules.extend(p.schedules.iter().cloned());
                }
                Err(e) => {
                    tracing::error!(plugin = %p.name, error = %e, "plugin not loaded; its triggers stay off")
                }
            }
        }
        let allowed = allowed_from(&cfg);
        let listen = cfg.listen.clone();
        let grace = cfg.shutdown_grace;

        let rt = crate::commands::accounts::runtime()?;
        let outbox_for_run = outbox.clone();
        rt.block_on(async move {
            let outbox = outbox_for_run;
            let (stop_workers_tx, stop_workers_rx) = tokio::sync::watch::channel(false);
            let (stop_triggers_tx, stop_triggers_rx) = tokio::sync::watch::channel(false);
            let metrics = Arc::new(crate::metrics::Metrics::default());
            let (mut workers, wakers) = start_workers(cfg.accounts, &outbox, &allowed, &stop_workers_rx, Some(&metrics))?;
            let dispatch = dispatcher(Arc::new(plugins), outbox.clone(), Arc::new(wakers), metrics.clone());
            let render: sendbox_triggers::webhook::MetricsFn = {
                let (m, o) = (metrics.clone(), outbox.clone());
                Arc::new(move || m.render(&o))
            };

            let stopped = |rx: &tokio::sync::watch::Receiver<bool>| {
                let mut rx = rx.clone();
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                }
            };
            let mut triggers = tokio::task::JoinSet::new();
            let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
                coded(exit::EX_CONFIG, format!("cannot listen on {listen}: {e} (set [daemon] listen)"))
            })?;
            let addr = listener.local_addr()?;
            {
                let d = dispatch.clone();
                let s = stopped(&stop_triggers_rx);
                triggers.spawn(async move {
                    if let Err(e) = sendbox_triggers::webhook::serve(listener, routes, d, Some(render), s).await {
                        tracing::error!(error = %e, "webhook server stopped");
                    }
                });
            }
            for w in watches {
                // Before `ready`, so a caller can drop files in right away.
                if let Err(e) = std::fs::create_dir_all(&w.dir) {
                    tracing::error!(plugin = %w.plugin, dir = %w.dir.display(), error = %e, "cannot create watched folder");
                }
                let (d, s) = (dispatch.clone(), stopped(&stop_triggers_rx));
                triggers.spawn(async move {
                    let (plugin, dir) = (w.plugin.clone(), w.dir.clone());
                    if let Err(e) = sendbox_triggers::watch::run(w, d, s).await {
                        tracing::error!(%plugin, dir = %dir.display(), error = %e, "cannot watch folder");
                    }
                });
            }
            for sch in schedules {
                let (d, s) = (dispatch.clone(), stopped(&stop_triggers_rx));
                triggers.spawn(sendbox_triggers::cron::run(sch, d, s));
            }
            // The line scripts and tests wait for.
            println!("sendbox ready in {} ms: webhooks on http://{addr}", started.elapsed().as_millis());
            use std::io::Write;
            let _ = std::io::stdout().flush();

            let mut signals = Signals::new()?;
            signals.recv().await;
            tracing::info!("stopping: triggers first, then delivery (signal again to quit now)");
            let _ = stop_triggers_tx.send(true);
            let drain = async {
                while triggers.join_next().await.is_some() {}
                let _ = stop_workers_tx.send(true);
                while workers.join_next().await.is_some() {}
            };
            tokio::select! {
                _ = drain => tracing::info!("stopped cleanly"),
                _ = tokio::time::sleep(grace) => tracing::warn!(?grace, "shutdown deadline passed; in-flight messages are requeued at the next start"),
                _ = signals.recv() => tracing::warn!("second signal: quitting now"),
            }
            anyhow::Ok(())
        })?;
        outbox.close();
        Ok(ExitCode::SUCCESS)
    }
}

/// Runs a job: plugin in a blocking thread, then one outbox commit, then a
/// nudge to the account's delivery worker.
pub fn dispatcher(
    plugins: Arc<HashMap<String, Loaded>>,
    outbox: Arc<Outbox>,
    wakers: Arc<HashMap<String, Arc<Notify>>>,
    metrics: Arc<crate::metrics::Metrics>,
) -> Dispatch {
    Arc::new(move |job: Job| {
        let plugins = plugins.clone();
        let outbox = outbox.clone();
        let wakers = wakers.clone();
        let metrics = metrics.clone();
        Box::pin(async move {
            let trigger = job.event.kind();
            let plugin_name = job.plugin.clone();
            let result = run_job(job, &plugins, &outbox, &wakers, &metrics).await;
            let label = match &result {
                Dispatched::Committed { .. } => "committed",
                Dispatched::PluginFailed(_) => "plugin_failed",
                Dispatched::Refused(_) => "refused",
                Dispatched::StoreFailed(_) => "store_failed",
                Dispatched::NoPlugin => "no_plugin",
            };
            metrics.event(trigger, &plugin_name, label);
            result
        })
    })
}

async fn run_job(
    job: Job,
    plugins: &HashMap<String, Loaded>,
    outbox: &Arc<Outbox>,
    wakers: &HashMap<String, Arc<Notify>>,
    metrics: &crate::metrics::Metrics,
) -> Dispatched {
    {
        let Some(loaded) = plugins.get(&job.plugin) else {
            return Dispatched::NoPlugin;
        };
        let plugin = loaded.plugin.clone();
        let state: Arc<dyn StateStore> = Arc::new(OutboxState(outbox.clone()));
        let (event, event_id) = (job.event.clone(), job.event_id.clone());
        let trigger = event.kind().to_owned();
        let ran = tokio::task::spawn_blocking(move || plugin.run(&event, &event_id, state)).await;
        let report = match ran {
            Ok(Ok(r)) => {
                metrics.duration(&job.plugin, r.duration_us as f64 / 1e6);
                r
            }
            Ok(Err(e)) => return Dispatched::PluginFailed(e.to_string()),
            Err(e) => return Dispatched::PluginFailed(format!("plugin task failed: {e}")),
        };
        let call = Call {
            plugin: job.plugin.clone(),
            trigger,
            event_id: job.event_id.clone(),
            account: loaded.account.clone(),
            account_mailbox: loaded.mailbox.clone(),
            policy: loaded.policy.clone(),
            emails: report.outcome.emails,
            state_changes: report.state_changes,
        };
        let committed = {
            let outbox = outbox.clone();
            tokio::task::spawn_blocking(move || outbox.commit(call)).await
        };
        match committed {
            Ok(Ok(done)) => {
                if !done.queued.is_empty()
                    && let Some(w) = wakers.get(&loaded.account)
                {
                    w.notify_one();
                }
                tracing::info!(plugin = %job.plugin, event_id = %job.event_id, queued = done.queued.len(), duplicates = done.duplicates.len(), suppressed = done.suppressed.len(), "event committed");
                Dispatched::Committed {
                    queued: done.queued.iter().map(|q| q.id).collect(),
                    response: report.outcome.response,
                }
            }
            Ok(Err(OutboxError::Policy(reason))) => {
                tracing::warn!(plugin = %job.plugin, event_id = %job.event_id, %reason, "outcome refused by policy; nothing queued");
                Dispatched::Refused(reason)
            }
            Ok(Err(e)) => {
                tracing::error!(plugin = %job.plugin, event_id = %job.event_id, error = %e, "outbox commit failed; nothing queued");
                Dispatched::StoreFailed(e.to_string())
            }
            Err(e) => Dispatched::StoreFailed(e.to_string()),
        }
    }
}
