//! `sendbox deliver`: run the delivery workers for every account until
//! stopped (or, with `--until-empty`, until nothing is left to send).
//!
//! On start, messages a previous process left in `sending` are queued again
//! with their Message-ID. On SIGTERM or SIGINT the workers stop claiming and
//! finish what is in flight; a second signal quits at once (whatever was in
//! flight is recovered at the next start).

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use sendbox_delivery::AllowedFrom;
use sendbox_outbox::{Outbox, State};

use crate::daemon::setup::{allowed_from, load_config, open_and_recover, tokio_runtime};
use crate::daemon::signals::Signals;
use crate::daemon::workers::start_workers;

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
        let rt = tokio_runtime()?;
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
