//! `sendbox run`: the daemon. Loads the plugins, opens the outbox, starts a
//! delivery worker per account and every trigger (webhooks, watched
//! folders, schedules), and hands each event to its plugin: fresh instance,
//! then one outbox commit of its emails and state, then (for a webhook) the
//! answer.
//!
//! Changes to the config file or a plugin's `.wasm` (or SIGHUP) reload only
//! what changed; see [`crate::reload`].
//!
//! Shutdown, in pipeline order: SIGTERM/SIGINT stops the triggers, in-flight
//! events finish and commit, then the delivery workers finish their sends,
//! all within `shutdown_grace_secs`; a second signal quits at once.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use sendbox_outbox::{Call, Outbox, OutboxError};
use sendbox_runtime::{Runtime, RuntimeOptions, StateError, StateStore, Versioned};
use sendbox_triggers::{Dispatch, Dispatched, Job};

use crate::commands::accounts::load_config;
use crate::commands::deliver::{Signals, open_and_recover};
use crate::exit::{self, coded};
use crate::reload::{FileChanges, Registry, Shared, Supervisor, Wakers};

/// `sendbox run --config FILE`
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
}

/// Plugin state, read from the outbox's database.
pub struct OutboxState(pub Arc<Outbox>);

fn state_err(e: OutboxError) -> StateError {
    StateError(e.to_string())
}

impl StateStore for OutboxState {
    fn get(&self, plugin: &str, key: &str) -> Result<Option<Versioned>, StateError> {
        Ok(self
            .0
            .state_get(plugin, key)
            .map_err(state_err)?
            .map(|(value, version)| Versioned { value, version }))
    }
    fn keys(&self, plugin: &str, prefix: &str, limit: usize) -> Result<Vec<String>, StateError> {
        self.0.state_keys(plugin, prefix, limit).map_err(state_err)
    }
    fn usage_bytes(&self, plugin: &str) -> Result<u64, StateError> {
        self.0.state_usage(plugin).map_err(state_err)
    }
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
        let outbox = open_and_recover(&cfg.store, "sendbox run")?;
        let listen = cfg.listen.clone();
        let server_limits = cfg.webhook_limits.clone();
        let retention = cfg.retention.clone();
        let grace = cfg.shutdown_grace;
        let config_path = self.config.to_path_buf();

        let rt = crate::commands::accounts::tokio_runtime()?;
        let outbox_for_run = outbox.clone();
        rt.block_on(async move {
            let outbox = outbox_for_run;
            let mut cfg = cfg;
            let (stop_server_tx, mut stop_server_rx) = tokio::sync::watch::channel(false);
            let shared = Shared::default();
            let dispatch = dispatcher(shared.registry.clone(), outbox.clone(), shared.wakers.clone(), shared.metrics.clone());
            let render: sendbox_triggers::webhook::MetricsFn = {
                let (m, o) = (shared.metrics.clone(), outbox.clone());
                Arc::new(move || m.render(&o))
            };
            let mut supervisor = Supervisor::new(runtime, outbox.clone(), &shared, dispatch.clone(), cfg.restart_fingerprint.clone());
            // Accounts must all work at start; after that a bad change keeps
            // the running worker.
            let accounts = supervisor.apply_accounts(std::mem::take(&mut cfg.accounts)).await;
            if let Some((name, e)) = accounts.failed.into_iter().next() {
                supervisor.stop_delivery().await;
                return Err(coded(exit::EX_CONFIG, format!("account `{name}`: {e}")));
            }
            // Plugins: a bad one is logged and skipped; the rest serve.
            supervisor.apply(std::mem::take(&mut cfg.plugins)).await;
            let routes = shared.routes.clone();

            let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
                coded(exit::EX_CONFIG, format!("cannot listen on {listen}: {e} (set [daemon] listen)"))
            })?;
            let addr = listener.local_addr()?;
            let server = tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop_server_rx.wait_for(|s| *s).await;
                };
                if let Err(e) = sendbox_triggers::webhook::serve(listener, routes, dispatch, Some(render), server_limits, stopped).await {
                    tracing::error!(error = %e, "webhook server stopped");
                }
            });
            let pruner = tokio::spawn(prune_every(PRUNE_EVERY, outbox.clone(), retention));
            let mut changes = FileChanges::new(&supervisor.watched_files(&config_path));
            // The line scripts and tests wait for.
            println!("sendbox ready in {} ms: webhooks on http://{addr}", started.elapsed().as_millis());
            use std::io::Write;
            let _ = std::io::stdout().flush();

            let mut signals = Signals::new()?;
            let mut hangup = Hangup::new()?;
            loop {
                tokio::select! {
                    _ = signals.recv() => break,
                    _ = changes.next(RELOAD_QUIET) => {
                        tracing::info!(config = %config_path.display(), "files changed: reloading");
                    }
                    _ = hangup.recv() => {
                        tracing::info!(config = %config_path.display(), "SIGHUP: reloading");
                    }
                }
                if let Some(applied) = supervisor.reload(&config_path).await {
                    tracing::info!(accounts = ?applied.accounts, loaded = ?applied.loaded, retriggered = ?applied.retriggered, removed = ?applied.removed, failed = ?applied.failed, "reload done");
                }
                changes.set_files(&supervisor.watched_files(&config_path));
            }
            tracing::info!("stopping: triggers first, then delivery (signal again to quit now)");
            pruner.abort();
            let drain = async {
                let _ = stop_server_tx.send(true);
                supervisor.stop_triggers().await;
                let _ = server.await;
                supervisor.stop_delivery().await;
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

/// How often finished work past its retention is deleted.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Prunes the outbox now and then every `period`, in batches that never
/// hold up commits for long.
async fn prune_every(
    period: std::time::Duration,
    outbox: Arc<Outbox>,
    retention: crate::config::Retention,
) {
    let mut ticks = tokio::time::interval(period);
    loop {
        ticks.tick().await;
        let (o, cutoffs) = (outbox.clone(), retention.before(sendbox_outbox::now_ms()));
        match tokio::task::spawn_blocking(move || o.prune(cutoffs)).await {
            Ok(Ok(p)) if p.messages + p.idempotency_keys > 0 => {
                tracing::info!(
                    messages = p.messages,
                    idempotency_keys = p.idempotency_keys,
                    "outbox pruned"
                );
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot prune the outbox; will try again"),
            _ => {}
        }
    }
}

/// How long the config and plugin files must be quiet after a change
/// before a reload reads them.
const RELOAD_QUIET: std::time::Duration = std::time::Duration::from_millis(300);

/// SIGHUP, the conventional "reload your config".
struct Hangup {
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Hangup {
    fn new() -> anyhow::Result<Self> {
        Ok(Hangup {
            #[cfg(unix)]
            hup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        self.hup.recv().await;
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    }
}

/// Runs a job: plugin in a blocking thread, then one outbox commit, then a
/// nudge to the account's delivery worker.
pub fn dispatcher(
    plugins: Arc<Registry>,
    outbox: Arc<Outbox>,
    wakers: Arc<Wakers>,
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
            let tick = match &job.event {
                sendbox_types::Event::Schedule(t) => Some(t.clone()),
                _ => None,
            };
            let result = run_job(job, &plugins, &outbox, &wakers, &metrics).await;
            if let Some(tick) = tick {
                // Remembered so a restart can catch up on runs it missed.
                let (o, p) = (outbox.clone(), plugin_name.clone());
                let saved = tokio::task::spawn_blocking(move || {
                    o.set_schedule_run(&p, &tick.schedule, tick.scheduled_at_ms)
                })
                .await;
                if let Ok(Err(e)) = saved {
                    tracing::warn!(plugin = %plugin_name, error = %e, "cannot record the schedule's run");
                }
            }
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

/// Attempts that run in parallel with the plugin's other events before an
/// event whose state keeps changing under it runs alone.
const OPTIMISTIC_ATTEMPTS: u32 = 2;
/// Attempts in all. Running alone cannot conflict with the plugin's own
/// events, only with an older version still finishing after a reload, so
/// this is never reached in practice; if it is, the event is refused
/// (not acknowledged), never half-done.
const MAX_ATTEMPTS: u32 = 8;

/// A plugin event's hold on its plugin's serial lock.
enum Turn<'a> {
    Shared(#[allow(dead_code)] tokio::sync::RwLockReadGuard<'a, ()>),
    Alone(#[allow(dead_code)] tokio::sync::RwLockWriteGuard<'a, ()>),
}

async fn run_job(
    job: Job,
    plugins: &Registry,
    outbox: &Arc<Outbox>,
    wakers: &Wakers,
    metrics: &crate::metrics::Metrics,
) -> Dispatched {
    let Job {
        plugin: name,
        event,
        event_id,
    } = job;
    // This version serves the event to the end, even if a reload
    // replaces it meanwhile.
    let Some(loaded) = plugins.get(&name) else {
        return Dispatched::NoPlugin;
    };
    let state: Arc<dyn StateStore> = Arc::new(OutboxState(outbox.clone()));
    let trigger = event.kind().to_owned();
    let event = Arc::new(event);
    // Optimistic first: events of one plugin run in parallel and each
    // commit checks that the state it read is unchanged. On a conflict the
    // event runs again on fresh state; after OPTIMISTIC_ATTEMPTS it runs
    // alone (no other event of the plugin runs or commits meanwhile), so it
    // cannot conflict again and an event is never dropped for contention.
    let mut attempt = 0;
    let (committed, response) = loop {
        attempt += 1;
        let _turn = if attempt <= OPTIMISTIC_ATTEMPTS {
            Turn::Shared(loaded.serial.read().await)
        } else {
            Turn::Alone(loaded.serial.write().await)
        };
        let ran = {
            let (plugin, event, event_id, state) = (
                loaded.plugin.clone(),
                event.clone(),
                event_id.clone(),
                state.clone(),
            );
            tokio::task::spawn_blocking(move || plugin.run(&event, &event_id, state)).await
        };
        let report = match ran {
            Ok(Ok(r)) => {
                metrics.duration(&name, r.duration_us as f64 / 1e6);
                r
            }
            Ok(Err(e)) => return Dispatched::PluginFailed(e.to_string()),
            Err(e) => return Dispatched::PluginFailed(format!("plugin task failed: {e}")),
        };
        let call = Call {
            plugin: name.clone(),
            trigger: trigger.clone(),
            event_id: event_id.clone(),
            account: loaded.account.clone(),
            account_mailbox: loaded.mailbox.clone(),
            policy: loaded.policy.clone(),
            emails: report.outcome.emails,
            state_changes: report.state_changes,
            reads: report.reads,
            state_quota_bytes: Some(loaded.plugin.settings().limits.state_bytes),
        };
        match outbox.commit_async(call).await {
            Err(OutboxError::Conflict(why)) if attempt < MAX_ATTEMPTS => {
                tracing::debug!(plugin = %name, event_id = %event_id, attempt, %why, "state changed meanwhile: running the event again");
                metrics.rerun(&name);
                continue;
            }
            other => break (other, report.outcome.response),
        }
    };
    match committed {
        Ok(done) => {
            if !done.queued.is_empty()
                && let Some(w) = wakers.get(&loaded.account)
            {
                w.notify_one();
            }
            tracing::info!(plugin = %name, event_id = %event_id, queued = done.queued.len(), duplicates = done.duplicates.len(), suppressed = done.suppressed.len(), "event committed");
            Dispatched::Committed {
                queued: done.queued.iter().map(|q| q.id).collect(),
                duplicates: done.duplicates.iter().map(|q| q.id).collect(),
                response,
            }
        }
        Err(OutboxError::Policy(mut reason)) => {
            sendbox_types::truncate_text(&mut reason, sendbox_runtime::MAX_ERROR_BYTES);
            tracing::warn!(plugin = %name, event_id = %event_id, %reason, "outcome refused by policy; nothing queued");
            Dispatched::Refused(reason)
        }
        Err(e) => {
            tracing::error!(plugin = %name, event_id = %event_id, error = %e, "outbox commit failed; nothing queued");
            Dispatched::StoreFailed(e.to_string())
        }
    }
}
