//! `sendbox deliver`: run the delivery workers for every account until
//! stopped (or, with `--until-empty`, until nothing is left to send).
//!
//! On start, messages a previous process left in `sending` are queued again
//! with their Message-ID. On SIGTERM or SIGINT the workers stop claiming and
//! finish what is in flight; a second signal quits at once (whatever was in
//! flight is recovered at the next start).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use sendbox_delivery::{AccountWorker, AllowedFrom, DeliverySettings};
use sendbox_outbox::{Outbox, State};

use crate::commands::accounts::{load_config, transport};
use crate::exit::{self, coded};

/// `sendbox deliver --config FILE`
#[derive(Debug, Args)]
pub struct DeliverArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
    /// Exit once no message is queued, sending or waiting to retry.
    #[arg(long)]
    pub until_empty: bool,
}

impl DeliverArgs {
    /// Runs the workers.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let cfg = load_config(&self.config)?;
        let outbox = open_and_recover(&cfg.store, "sendbox deliver")?;
        let allowed_from = AllowedFrom::new(allowed_from(&cfg));
        let rt = crate::commands::accounts::tokio_runtime()?;
        let outbox_for_workers = outbox.clone();
        rt.block_on(async move {
            let outbox = outbox_for_workers;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let mut workers = start_workers(cfg.accounts, &outbox, &allowed_from, &stop_rx)?;
            let pending = |o: &Outbox| -> bool {
                o.depth().map_or(true, |d| {
                    d.iter().any(|(s, n)| {
                        *n > 0 && matches!(s, State::Queued | State::Sending | State::Retry)
                    })
                })
            };
            let mut signals = Signals::new()?;
            loop {
                tokio::select! {
                    _ = signals.recv() => {
                        tracing::info!("stopping: finishing messages in flight (signal again to quit now)");
                        let _ = stop_tx.send(true);
                        break;
                    }
                    _ = tokio::time::sleep(Duration::from_millis(200)), if self.until_empty => {
                        let o = outbox.clone();
                        if !tokio::task::spawn_blocking(move || pending(&o)).await.unwrap_or(true) {
                            let _ = stop_tx.send(true);
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = async { while workers.join_next().await.is_some() {} } => {}
                _ = signals.recv() => {
                    tracing::warn!("second signal: quitting now; in-flight messages are requeued at the next start");
                    std::process::exit(130);
                }
            }
            anyhow::Ok(())
        })?;
        outbox.close();
        Ok(ExitCode::SUCCESS)
    }
}

/// Opens the outbox and requeues what a previous run left in `sending`.
pub fn open_and_recover(store: &std::path::Path, holder: &str) -> anyhow::Result<Arc<Outbox>> {
    let outbox =
        Arc::new(Outbox::open(store).map_err(|e| coded(exit::EX_SOFTWARE, e.to_string()))?);
    // One delivering process per database: a second would requeue the
    // first one's messages in flight and send them twice.
    outbox
        .lock_for_delivery(holder)
        .map_err(|e| coded(exit::EX_TEMPFAIL, e.to_string()))?;
    let recovered = outbox
        .recover()
        .map_err(|e| coded(exit::EX_SOFTWARE, e.to_string()))?;
    if recovered > 0 {
        tracing::warn!(
            recovered,
            "requeued messages left in `sending` by the previous run"
        );
    }
    Ok(outbox)
}

/// Each plugin's allowed From addresses, for message building.
pub fn allowed_from(cfg: &crate::config::Config) -> HashMap<String, Vec<String>> {
    cfg.plugins
        .values()
        .map(|p| (p.name.clone(), p.policy.allowed_from.clone()))
        .collect()
}

/// An account's delivery worker (not started): its transport and its
/// settings from the config; with the account's token provider, if it has
/// one.
pub fn account_worker(
    account: crate::config::AccountConfig,
    outbox: &Arc<Outbox>,
    allowed_from: &AllowedFrom,
) -> anyhow::Result<(AccountWorker, Option<Arc<sendbox_auth::TokenProvider>>)> {
    let (name, mailbox) = (account.name.clone(), account.mailbox.clone());
    let settings = DeliverySettings {
        rate_per_minute: account.rate_per_minute,
        max_age: Duration::from_secs(u64::from(account.max_age_hours) * 3600),
        allowed_from: allowed_from.clone(),
        ..DeliverySettings::default()
    };
    let (t, tokens) = transport(account)?;
    let worker = AccountWorker::new(&name, &mailbox, t, outbox.clone(), settings);
    Ok((worker, tokens))
}

/// Runs `worker` until `stop` turns true.
pub async fn run_worker(worker: AccountWorker, mut stop: tokio::sync::watch::Receiver<bool>) {
    worker
        .run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
}

/// Starts one delivery worker per account; they stop when `stop` turns
/// true.
fn start_workers(
    accounts: std::collections::BTreeMap<String, crate::config::AccountConfig>,
    outbox: &Arc<Outbox>,
    allowed_from: &AllowedFrom,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinSet<()>> {
    let mut workers = tokio::task::JoinSet::new();
    for account in accounts.into_values() {
        let (worker, _) = account_worker(account, outbox, allowed_from)?;
        workers.spawn(run_worker(worker, stop.clone()));
    }
    Ok(workers)
}

/// SIGINT and SIGTERM as one stream.
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            #[cfg(unix)]
            term: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?,
        })
    }

    /// The next SIGINT or SIGTERM.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
