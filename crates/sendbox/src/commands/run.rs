//! `sendbox run`: the daemon. Loads the plugins, opens the outbox, starts a
//! delivery worker per account and every trigger (webhooks, watched
//! folders, schedules), and hands each event to its plugin: fresh instance,
//! then one outbox commit of its emails and state, then (for a webhook) the
//! answer.
//!
//! Changes to the config file or a plugin's `.wasm` (or SIGHUP) reload only
//! what changed; see [`crate::daemon::supervisor`].
//!
//! Shutdown, in pipeline order: SIGTERM/SIGINT stops the triggers, in-flight
//! events finish and commit, then the delivery workers finish their sends,
//! all within `shutdown_grace_secs`; a second signal quits at once.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use sendbox_runtime::{Runtime, RuntimeOptions};

use crate::daemon::prune::{PRUNE_EVERY, prune_every};
use crate::daemon::setup::{load_config, open_and_recover, tokio_runtime};
use crate::daemon::signals::{Hangup, Signals};
use crate::daemon::{FileChanges, Shared, Supervisor, dispatcher};
use crate::exit::{self, coded};

/// `sendbox run --config FILE`
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
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

        let rt = tokio_runtime()?;
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

/// How long the config and plugin files must be quiet after a change
/// before a reload reads them.
const RELOAD_QUIET: std::time::Duration = std::time::Duration::from_millis(300);
