//! `sendbox deliver`: run the delivery workers for every account until
//! stopped (or, with `--until-empty`, until nothing is left to send).
//!
//! On start, messages a previous process left in `sending` are queued again
//! with their Message-ID. On SIGTERM or SIGINT the workers stop claiming and
//! finish what is in flight; a second signal quits at once (whatever was in
//! flight is recovered at the next start).

use std::process::ExitCode;

use clap::Args;

use crate::daemon::run::{Daemon, Mode, Shutdown};
use crate::daemon::setup::tokio_runtime;

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
        let mode = Mode::DeliverOnly {
            until_empty: self.until_empty,
        };
        let stopped = tokio_runtime()?.block_on(async {
            let daemon = Daemon::open(&self.config, "sendbox deliver").await?;
            daemon.run(mode, Shutdown::on_signals()?).await
        })?;
        Ok(stopped.exit_code())
    }
}
