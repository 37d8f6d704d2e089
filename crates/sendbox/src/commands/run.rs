//! `sendbox run`: the daemon (see [`crate::daemon::run`]). Loads the
//! plugins, opens the outbox, starts a delivery worker per account and
//! every trigger, and reloads what changed when the config or a plugin
//! changes (or on SIGHUP). SIGTERM/SIGINT drains; a second signal quits.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;

use crate::daemon::run::{Daemon, Mode, Ready, Shutdown};
use crate::daemon::setup::tokio_runtime;

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
        let on_ready = Box::new(move |ready: Ready| {
            // The line scripts and tests wait for.
            println!(
                "sendbox ready in {} ms: {ready}",
                started.elapsed().as_millis()
            );
            let _ = std::io::stdout().flush();
        });
        let stopped = tokio_runtime()?.block_on(async {
            let daemon = Daemon::open(&self.config, "sendbox run").await?;
            daemon
                .run(Mode::Serve { on_ready }, Shutdown::on_signals()?)
                .await
        })?;
        Ok(stopped.exit_code())
    }
}
