//! Command-line arguments. Flag doc comments are the `--help` text.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands;

/// sendbox: a mail-sending daemon whose "what to send" logic lives in
/// sandboxed WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "sendbox", version, about, long_about = None)]
pub struct Cli {
    /// Options for every command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every command.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SENDBOX_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `sendbox_runtime=debug`.
    #[arg(long, global = true, default_value = "warn", env = "SENDBOX_LOG")]
    pub log: String,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work with plugin components: dry-run an event, inspect imports.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Validate the config, load the plugins, and for every account fetch a
    /// token and log in to SMTP without sending.
    Check(commands::accounts::CheckArgs),
    /// Send one test message through an account, now.
    SendTest(commands::accounts::SendTestArgs),
    /// Sign in a delegated account with the device code flow and save its
    /// refresh token.
    Login(commands::accounts::LoginArgs),
    /// Run the daemon: triggers, plugins, outbox and delivery.
    Run(commands::run::RunArgs),
    /// Deliver queued messages through every account until stopped.
    Deliver(commands::deliver::DeliverArgs),
    /// Look into the outbox: list, show, retry, drop messages.
    #[command(subcommand)]
    Outbox(commands::outbox::OutboxCommand),
    /// Addresses never to mail: add, remove, list.
    #[command(subcommand)]
    Suppress(commands::outbox::SuppressCommand),
    /// Hash a password (read from standard input) for an SMTP listener's
    /// `users_file`.
    HashPassword(commands::hash_password::HashPasswordArgs),
}

/// `sendbox plugin ...`
#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Run one event through a plugin and print the outcome as JSON, without
    /// sending anything.
    Run(commands::plugin::RunArgs),
    /// Print the world a component implements and its imports.
    Inspect(commands::plugin::InspectArgs),
    /// Build a plugin folder (Rust, Python or JavaScript) into a component.
    Build(commands::plugin_build::BuildArgs),
    /// Create a plugin folder: source, sample event, expected outcome.
    New(commands::plugin_new::NewArgs),
    /// Run a plugin folder's cases and compare with their expectations.
    Test(commands::plugin_test::TestArgs),
}

impl Command {
    /// Runs the chosen command.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            Command::Plugin(PluginCommand::Run(c)) => c.run(),
            Command::Plugin(PluginCommand::Inspect(c)) => c.run(),
            Command::Plugin(PluginCommand::Build(c)) => c.run(),
            Command::Plugin(PluginCommand::New(c)) => c.run(),
            Command::Plugin(PluginCommand::Test(c)) => c.run(),
            Command::Check(c) => c.run(),
            Command::SendTest(c) => c.run(),
            Command::Login(c) => c.run(),
            Command::Run(c) => c.run(),
            Command::Deliver(c) => c.run(),
            Command::Outbox(c) => c.run(),
            Command::Suppress(c) => c.run(),
            Command::HashPassword(c) => c.run(),
        }
    }
}

/// Where compiled plugin code is cached when no config says otherwise:
/// `$XDG_CACHE_HOME/sendbox` or `~/.cache/sendbox`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("sendbox"))
}

/// Sets up tracing on stderr.
pub fn init_logging(global: &GlobalArgs) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&global.log).unwrap_or_else(|e| {
        eprintln!(
            "warning: bad --log filter {:?} ({e}); using `warn`",
            global.log
        );
        EnvFilter::new("warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match global.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// `--config FILE`, shared by every command that reads the config file.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// The config file.
    #[arg(long, short, env = "SENDBOX_CONFIG")]
    pub config: PathBuf,
}

impl std::ops::Deref for ConfigArg {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.config
    }
}
