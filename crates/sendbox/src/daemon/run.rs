//! [`Daemon::run`]: one process's life, for `sendbox run` (everything) and
//! `sendbox deliver` (delivery workers only).
//!
//! Start: the accounts' workers (every account must build), then, when
//! serving, the plugins (a bad one is logged and skipped), the webhook
//! server, the retention pruner and the reload loop.
//!
//! Stop, in pipeline order, written once here for both modes: the first
//! shutdown request stops the triggers, in-flight events finish and
//! commit, then the workers finish their sends, all within
//! `shutdown_grace_secs`; a second request quits at once (whatever was in
//! flight is requeued at the next start).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sendbox_delivery::AllowedFrom;
use sendbox_outbox::{AnyStore, State, Store};
use sendbox_runtime::{Runtime, RuntimeOptions};

use super::prune::{PRUNE_EVERY, prune_every};
use super::setup::{allowed_from, listener_senders, load_config, open_and_recover};
use super::signals::{Hangup, Signals};
use super::submissions::Listeners;
use super::workers::start_workers;
use super::{FileChanges, OutcomeBudget, Shared, Supervisor, dispatcher};
use crate::config::Config;
use crate::exit::{self, coded};

/// How long the config and plugin files must be quiet after a change
/// before a reload reads them.
const RELOAD_QUIET: Duration = Duration::from_millis(300);

/// How often `deliver --until-empty` looks whether anything is left.
const EMPTY_POLL: Duration = Duration::from_millis(200);

/// What a daemon process serves.
pub enum Mode {
    /// Plugins, triggers, webhooks, reloads and delivery (`sendbox run`).
    /// `on_ready` is called with the webhook address once everything is
    /// started.
    Serve {
        on_ready: Box<dyn FnOnce(Ready) + Send>,
    },
    /// The delivery workers only (`sendbox deliver`); with `until_empty`,
    /// stop once nothing is queued, sending or waiting to retry.
    DeliverOnly { until_empty: bool },
}

/// Where a serving daemon can be reached, once everything has started.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The webhook server.
    pub webhooks: SocketAddr,
    /// Each SMTP listener, by name.
    pub listeners: Vec<(String, SocketAddr)>,
}

impl std::fmt::Display for Ready {
    /// `webhooks on http://ADDR[, smtp NAME on ADDR...]`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "webhooks on http://{}", self.webhooks)?;
        for (name, addr) in &self.listeners {
            write!(f, ", smtp {name} on {addr}")?;
        }
        Ok(())
    }
}

/// Requests to stop: the first drains, the second quits now.
pub struct Shutdown {
    requests: tokio::sync::mpsc::UnboundedReceiver<()>,
}

/// Asks a [`Shutdown`] to stop (what a signal does).
#[derive(Clone)]
pub struct ShutdownHandle(tokio::sync::mpsc::UnboundedSender<()>);

impl ShutdownHandle {
    /// One stop request.
    pub fn request(&self) {
        let _ = self.0.send(());
    }
}

impl Shutdown {
    /// A shutdown only `ShutdownHandle::request` triggers.
    pub fn manual() -> (ShutdownHandle, Shutdown) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (ShutdownHandle(tx), Shutdown { requests: rx })
    }

    /// A shutdown SIGTERM and SIGINT trigger. Call inside the runtime.
    pub fn on_signals() -> anyhow::Result<Shutdown> {
        let mut signals = Signals::new()?;
        let (handle, shutdown) = Shutdown::manual();
        tokio::spawn(async move {
            loop {
                signals.recv().await;
                handle.request();
            }
        });
        Ok(shutdown)
    }

    /// The next request. Never returns once every handle is gone.
    async fn requested(&mut self) {
        if self.requests.recv().await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Everything in flight finished.
    Cleanly,
    /// `shutdown_grace_secs` passed first.
    DeadlinePassed,
    /// A second request came first.
    Abandoned,
}

impl Stopped {
    /// The process exit code: 130 (as after SIGINT) when abandoned.
    pub fn exit_code(self) -> std::process::ExitCode {
        match self {
            Stopped::Cleanly | Stopped::DeadlinePassed => std::process::ExitCode::SUCCESS,
            Stopped::Abandoned => std::process::ExitCode::from(130),
        }
    }
}

/// A loaded config and its opened, locked and recovered outbox.
pub struct Daemon {
    config_path: PathBuf,
    cfg: Config,
    outbox: AnyStore,
}

impl Daemon {
    /// Loads the config (its warnings logged) and opens the outbox for
    /// delivery, as `holder` (named to whoever else tries).
    pub async fn open(config_path: &Path, holder: &str) -> anyhow::Result<Daemon> {
        let cfg = load_config(config_path)?;
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        let outbox = open_and_recover(&cfg, holder).await?;
        Ok(Daemon {
            config_path: config_path.to_owned(),
            cfg,
            outbox,
        })
    }

    /// Runs until `shutdown` (or, in `DeliverOnly { until_empty: true }`,
    /// until the outbox has nothing left to send), then closes the outbox.
    pub async fn run(self, mode: Mode, mut shutdown: Shutdown) -> anyhow::Result<Stopped> {
        let outbox = self.outbox.clone();
        let stopped = match mode {
            Mode::Serve { on_ready } => self.serve(on_ready, &mut shutdown).await,
            Mode::DeliverOnly { until_empty } => self.deliver(until_empty, &mut shutdown).await,
        };
        outbox.close();
        stopped
    }

    async fn serve(
        self,
        on_ready: Box<dyn FnOnce(Ready) + Send>,
        shutdown: &mut Shutdown,
    ) -> anyhow::Result<Stopped> {
        let Daemon {
            config_path,
            mut cfg,
            outbox,
        } = self;
        // SIGHUP is caught from here on, before readiness is announced: a
        // reload sent as soon as the daemon says it is ready (systemd's
        // `ExecReload` right after READY=1) is neither lost nor, where
        // SIGHUP's default action stands, the end of the process.
        let mut hangup = Hangup::new()?;
        let runtime = Runtime::new(RuntimeOptions {
            cache_dir: cfg.cache_dir.clone().or_else(crate::cli::default_cache_dir),
            ..RuntimeOptions::default()
        })
        .map_err(|e| coded(exit::EX_SOFTWARE, e.to_string()))?;
        let shared = Shared::default();
        let budget = Arc::new(OutcomeBudget::new(cfg.max_held_outcome_bytes));
        shared.metrics.outcome_budget(budget.clone());
        let dispatch = dispatcher(
            shared.registry.clone(),
            outbox.clone(),
            shared.wakers.clone(),
            shared.metrics.clone(),
            budget,
        );
        let render: sendbox_triggers::webhook::MetricsFn = {
            let (m, o) = (shared.metrics.clone(), outbox.clone());
            Arc::new(move || m.render(&o))
        };
        let mut supervisor = Supervisor::new(
            runtime,
            outbox.clone(),
            &shared,
            dispatch.clone(),
            cfg.restart_fingerprint.clone(),
        );
        let mailboxes: HashMap<String, String> = cfg
            .accounts
            .iter()
            .map(|(n, a)| (n.clone(), a.mailbox.clone()))
            .collect();
        supervisor.set_listener_senders(listener_senders(&cfg));
        // Watched for new plugins from the start, even while empty.
        supervisor
            .set_plugins_dir(cfg.plugins_dir.clone())
            .map_err(|e| {
                coded(
                    exit::EX_CONFIG,
                    format!("cannot create [daemon] plugins_dir: {e}"),
                )
            })?;
        // Accounts must all work at start; after that a bad change keeps
        // the running worker.
        let accounts = supervisor
            .apply_accounts(std::mem::take(&mut cfg.accounts))
            .await;
        if let Some((name, e)) = accounts.failed.into_iter().next() {
            supervisor.stop_delivery().await;
            return Err(coded(exit::EX_CONFIG, format!("account `{name}`: {e}")));
        }
        // Plugins: a bad one is logged and skipped; the rest serve.
        supervisor.apply(std::mem::take(&mut cfg.plugins)).await;

        let listen = cfg.listen.clone();
        let listener = tokio::net::TcpListener::bind(&listen).await.map_err(|e| {
            coded(
                exit::EX_CONFIG,
                format!("cannot listen on {listen}: {e} (set [daemon] listen)"),
            )
        })?;
        let addr = listener.local_addr()?;
        let (stop_server, mut server_stopped) = tokio::sync::watch::channel(false);
        let (routes, limits) = (shared.routes.clone(), cfg.webhook_limits.clone());
        let server = tokio::spawn(async move {
            let stopped = async move {
                let _ = server_stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = sendbox_triggers::webhook::serve(
                listener,
                routes,
                dispatch,
                Some(render),
                limits,
                stopped,
            )
            .await
            {
                tracing::error!(error = %e, "webhook server stopped");
            }
        });
        let listeners = std::mem::take(&mut cfg.listeners);
        let listeners = match Listeners::start(
            listeners,
            &mailboxes,
            &outbox,
            &shared.wakers,
            &shared.registry,
        )
        .await
        {
            Ok(l) => l,
            Err(e) => {
                let _ = stop_server.send(true);
                supervisor.stop_triggers().await;
                supervisor.stop_delivery().await;
                return Err(e);
            }
        };
        let pruner = tokio::spawn(prune_every(
            PRUNE_EVERY,
            outbox.clone(),
            cfg.retention.clone(),
        ));
        let mut changes = FileChanges::new(&supervisor.watched_files(&config_path));
        on_ready(Ready {
            webhooks: addr,
            listeners: listeners.addresses.clone(),
        });

        loop {
            tokio::select! {
                _ = shutdown.requested() => break,
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
            let _ = stop_server.send(true);
            listeners.stop().await;
            supervisor.stop_triggers().await;
            let _ = server.await;
            supervisor.stop_delivery().await;
        };
        Ok(drain_within(cfg.shutdown_grace, drain, shutdown).await)
    }

    async fn deliver(self, until_empty: bool, shutdown: &mut Shutdown) -> anyhow::Result<Stopped> {
        let Daemon { cfg, outbox, .. } = self;
        let allowed_from = AllowedFrom::new(allowed_from(&cfg));
        let (stop_workers, workers_stopped) = tokio::sync::watch::channel(false);
        let mut workers = start_workers(cfg.accounts, &outbox, &allowed_from, &workers_stopped)?;
        loop {
            tokio::select! {
                _ = shutdown.requested() => {
                    tracing::info!("stopping: finishing messages in flight (signal again to quit now)");
                    break;
                }
                _ = tokio::time::sleep(EMPTY_POLL), if until_empty => {
                    if !pending(&outbox).await {
                        break;
                    }
                }
            }
        }
        let _ = stop_workers.send(true);
        let drain = async { while workers.join_next().await.is_some() {} };
        Ok(drain_within(cfg.shutdown_grace, drain, shutdown).await)
    }
}

/// Whether anything is left to send (or the count could not be read).
async fn pending(outbox: &AnyStore) -> bool {
    outbox.depth().await.map_or(true, |d| {
        d.iter()
            .any(|(s, n)| *n > 0 && matches!(s, State::Queued | State::Sending | State::Retry))
    })
}

/// Waits for `drain`, at most `grace`, and gives up on a second request.
async fn drain_within(
    grace: Duration,
    drain: impl Future<Output = ()>,
    shutdown: &mut Shutdown,
) -> Stopped {
    tokio::select! {
        _ = drain => {
            tracing::info!("stopped cleanly");
            Stopped::Cleanly
        }
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "shutdown deadline passed; in-flight messages are requeued at the next start");
            Stopped::DeadlinePassed
        }
        _ = shutdown.requested() => {
            tracing::warn!("second signal: quitting now; in-flight messages are requeued at the next start");
            Stopped::Abandoned
        }
    }
}

#[cfg(test)]
mod tests {
    //! One process's life in process: start, an event through to the mail
    //! folder, a shutdown that drains; and `DeliverOnly` stopping when the
    //! outbox is empty.

    use super::*;
    use sendbox_outbox::Outbox;
    use sendbox_test_support::wasm;

    fn config(dir: &Path) -> PathBuf {
        let file = dir.join("sendbox.toml");
        let text = format!(
            "[daemon]\nstore = \"var/sendbox.db\"\nlisten = \"127.0.0.1:0\"\n\
             [accounts.local]\nprovider = \"file\"\nmailbox = \"sendbox@localhost\"\ndir = \"mail\"\n\
             [plugins.bridge]\nwasm = \"{wasm}\"\naccount = \"local\"\n\
             [plugins.bridge.config]\nto = \"ops@example.com\"\n\
             [plugins.bridge.webhook]\npath = \"/hooks/a\"\nunauthenticated = true\n",
            wasm = wasm::example("webhook-bridge").display()
        );
        std::fs::write(&file, text).unwrap();
        file
    }

    fn mails(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("mail"))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "eml"))
                })
                .count()
            })
            .unwrap_or(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serve_commits_an_event_delivers_it_and_drains_on_one_request() {
        let dir = tempfile::tempdir().unwrap();
        let file = config(dir.path());
        let daemon = Daemon::open(&file, "test").await.unwrap();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let on_ready = Box::new(move |ready: Ready| {
            let _ = ready_tx.send(ready.webhooks);
        });
        let (handle, shutdown) = Shutdown::manual();
        let run = tokio::spawn(daemon.run(Mode::Serve { on_ready }, shutdown));
        let addr: SocketAddr = ready.await.unwrap();

        let alert =
            std::fs::read(wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json"))
                .unwrap();
        let answer = reqwest::Client::new()
            .post(format!("http://{addr}/hooks/a"))
            .header("content-type", "application/json")
            .body(alert)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 202, "{:?}", answer.text().await);
        // Delivered while serving. (A drain sends what the worker has
        // claimed; a message committed just before the request may still
        // be unclaimed and then waits, queued, for the next start — so the
        // stop is requested once the message is out.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while mails(dir.path()) == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(mails(dir.path()), 1, "the accepted event was delivered");

        handle.request();
        let stopped = run.await.unwrap().unwrap();
        assert_eq!(stopped, Stopped::Cleanly);
        assert_eq!(mails(dir.path()), 1);
        // The outbox is closed and unlocked: the next process opens it, and
        // the message is recorded as sent (nothing left to send again).
        Daemon::open(&file, "next").await.unwrap();
        let outbox = Outbox::open(&dir.path().join("var/sendbox.db")).unwrap();
        let sent = outbox.list(Some(sendbox_outbox::State::Sent), 10).unwrap();
        assert_eq!(sent.len(), 1, "{sent:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deliver_only_until_empty_sends_what_is_queued_and_stops_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let file = config(dir.path());
        // 3 messages queued by an earlier run (its plugin's commit).
        let cfg = load_config(&file).unwrap();
        let outbox = Outbox::open(&cfg.store).unwrap();
        let emails = (0..3)
            .map(|i| sendbox_types::Email {
                to: vec!["ops@example.com".into()],
                subject: format!("message {i}"),
                text: Some("body".into()),
                ..Default::default()
            })
            .collect();
        let call = sendbox_outbox::Call {
            plugin: "bridge".into(),
            trigger: "cli".into(),
            event_id: "evt".into(),
            account: "local".into(),
            account_mailbox: "sendbox@localhost".into(),
            emails,
            ..Default::default()
        };
        assert_eq!(outbox.commit(call).unwrap().queued.len(), 3);
        outbox.close();
        drop(outbox);

        let daemon = Daemon::open(&file, "test").await.unwrap();
        let (_handle, shutdown) = Shutdown::manual();
        let stopped = daemon
            .run(Mode::DeliverOnly { until_empty: true }, shutdown)
            .await
            .unwrap();
        assert_eq!(stopped, Stopped::Cleanly);
        assert_eq!(mails(dir.path()), 3);
    }
}
