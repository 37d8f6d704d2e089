//! `sendbox outbox ...` and `sendbox suppress ...`: look into and act on the
//! outbox the config names — its SQLite file, or the PostgreSQL database
//! the nodes share (from any node, while they run).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use sendbox_outbox::{AnyStore, Outbox, OutboxError, PgOutbox, State, Store};

use crate::exit::{self, coded};

use crate::cli::ConfigArg;

/// The outbox the config names, and a runtime to use it on.
fn open(c: &ConfigArg) -> anyhow::Result<(tokio::runtime::Runtime, AnyStore)> {
    // Only the store: secrets the daemon resolves from its own environment
    // need not resolve here (but a PostgreSQL store's password must).
    let store =
        crate::config::store_path(&c.config).map_err(|e| coded(exit::EX_CONFIG, e.to_string()))?;
    let rt = crate::daemon::setup::tokio_runtime()?;
    let outbox = if crate::config::is_postgres_url(&store) {
        let cfg = crate::config::load_for_store(&c.config)
            .map_err(|e| coded(exit::EX_CONFIG, e.to_string()))?;
        rt.block_on(shared_store(&cfg))?
    } else {
        let outbox = Outbox::open(&store).map_err(|e| coded(exit::EX_SOFTWARE, e.to_string()))?;
        AnyStore::from(Arc::new(outbox))
    };
    Ok((rt, outbox))
}

/// The shared PostgreSQL outbox, joined as a tool (not a node: no lease
/// held, nothing migrated).
async fn shared_store(cfg: &crate::config::Config) -> anyhow::Result<AnyStore> {
    let Some(pg) = &cfg.postgres else {
        return Err(coded(exit::EX_CONFIG, "no PostgreSQL store in the config"));
    };
    let outbox = PgOutbox::connect_as_tool(
        &pg.url,
        pg.password.as_ref().map(sendbox_auth::Secret::expose),
    )
    .await
    .map_err(|e| coded(exit::EX_TEMPFAIL, format!("outbox {}: {e}", pg.url)))?;
    Ok(AnyStore::from(outbox))
}

fn not_found(e: OutboxError) -> anyhow::Error {
    match e {
        OutboxError::NotFound(id) => coded(
            exit::EX_DATAERR,
            format!("no message with id {id} (see `sendbox outbox list`)"),
        ),
        e @ OutboxError::WrongState { .. } => coded(exit::EX_DATAERR, e.to_string()),
        other => coded(exit::EX_SOFTWARE, other.to_string()),
    }
}

/// `sendbox outbox ...`
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// List messages, newest first.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this state: queued, sending, sent, retry or dead.
        #[arg(long)]
        state: Option<State>,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one message and its audit trail.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// The message id from `list`.
        id: i64,
    },
    /// Queue a message (or every dead one) for another attempt now.
    Retry {
        #[command(flatten)]
        config: ConfigArg,
        /// The message id.
        #[arg(required_unless_present = "dead")]
        id: Option<i64>,
        /// Retry every dead message.
        #[arg(long, conflicts_with = "id")]
        dead: bool,
    },
    /// Delete sent and dead messages (with their history) and idempotency
    /// keys past their retention (`[daemon] keep_sent_days`,
    /// `keep_dead_days`; keys past the longest `idempotency_hours`).
    /// `sendbox run` does this every hour by itself.
    Prune {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Delete a message and its audit trail.
    Drop {
        #[command(flatten)]
        config: ConfigArg,
        /// The message id.
        id: i64,
    },
}

/// Text a plugin or a server wrote, safe to print on a terminal: control
/// characters (escape sequences, carriage returns, bells...) are shown as
/// `\u{1b}` and the like instead of acting on the terminal.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// An outbox timestamp (ms since the epoch) as RFC 3339 UTC.
fn ts(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

impl OutboxCommand {
    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let mut out = std::io::stdout().lock();
        match self {
            OutboxCommand::List {
                config,
                state,
                json,
                limit,
            } => {
                let (rt, outbox) = open(&config)?;
                for m in rt.block_on(outbox.list(state, limit)).map_err(not_found)? {
                    if json {
                        serde_json::to_writer(&mut out, &m)?;
                        writeln!(out)?;
                    } else {
                        writeln!(
                            out,
                            "{:>6}  {:<7}  {}  {:<14}  {:<10}  {}  {:?}",
                            m.id,
                            m.state.as_str(),
                            ts(m.created_ms),
                            m.plugin,
                            m.account,
                            printable(&m.recipients),
                            m.email.subject
                        )?;
                    }
                }
            }
            OutboxCommand::Show { config, id } => {
                let (rt, outbox) = open(&config)?;
                let m = rt.block_on(outbox.get(id)).map_err(not_found)?;
                writeln!(out, "id:          {}", m.id)?;
                writeln!(out, "message-id:  {}", printable(&m.message_id))?;
                writeln!(
                    out,
                    "state:       {} (attempts: {})",
                    m.state.as_str(),
                    m.attempts
                )?;
                writeln!(
                    out,
                    "plugin:      {} ({} event {})",
                    m.plugin, m.trigger, m.event_id
                )?;
                writeln!(out, "account:     {}", m.account)?;
                writeln!(out, "recipients:  {}", printable(&m.recipients))?;
                writeln!(out, "subject:     {}", printable(&m.email.subject))?;
                if let Some(r) = &m.last_reply {
                    writeln!(out, "last reply:  {}", printable(r))?;
                }
                writeln!(out, "history:")?;
                for a in rt.block_on(outbox.audit_trail(id)).map_err(not_found)? {
                    writeln!(
                        out,
                        "  {}  {} -> {}{}",
                        ts(a.at_ms),
                        a.from.as_deref().unwrap_or("-"),
                        a.to,
                        a.detail
                            .map(|d| format!("  {}", printable(&d)))
                            .unwrap_or_default()
                    )?;
                }
            }
            OutboxCommand::Retry { config, id, dead } => {
                let (rt, outbox) = open(&config)?;
                let ids: Vec<i64> = if dead {
                    rt.block_on(outbox.list(Some(State::Dead), usize::MAX >> 1))
                        .map_err(not_found)?
                        .into_iter()
                        .map(|m| m.id)
                        .collect()
                } else {
                    id.into_iter().collect()
                };
                for id in &ids {
                    rt.block_on(outbox.retry_now(*id)).map_err(not_found)?;
                }
                writeln!(out, "queued {} message(s) for another attempt", ids.len())?;
            }
            OutboxCommand::Prune { config } => {
                // The retention comes from the config; its secrets are not
                // needed for that.
                let cfg = crate::config::load_for_store(&config.config)
                    .map_err(|e| coded(exit::EX_CONFIG, e.to_string()))?;
                let rt = crate::daemon::setup::tokio_runtime()?;
                let outbox = if cfg.postgres.is_some() {
                    rt.block_on(shared_store(&cfg))?
                } else {
                    let outbox = Outbox::open(&cfg.store)
                        .map_err(|e| coded(exit::EX_SOFTWARE, e.to_string()))?;
                    AnyStore::from(Arc::new(outbox))
                };
                let p = rt
                    .block_on(outbox.prune(cfg.retention.before(sendbox_outbox::now_ms())))
                    .map_err(not_found)?;
                writeln!(
                    out,
                    "pruned {} message(s) and {} idempotency key(s)",
                    p.messages, p.idempotency_keys
                )?;
            }
            OutboxCommand::Drop { config, id } => {
                let (rt, outbox) = open(&config)?;
                rt.block_on(outbox.drop_message(id)).map_err(not_found)?;
                writeln!(out, "dropped message {id}")?;
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// `sendbox suppress ...`: addresses never to mail, honoured at enqueue.
#[derive(Debug, Subcommand)]
pub enum SuppressCommand {
    /// Add an address.
    Add {
        #[command(flatten)]
        config: ConfigArg,
        /// The address.
        address: String,
        /// Why (shown by `list`).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Remove an address.
    Remove {
        #[command(flatten)]
        config: ConfigArg,
        /// The address.
        address: String,
    },
    /// List the addresses.
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
}

impl SuppressCommand {
    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let mut out = std::io::stdout().lock();
        match self {
            SuppressCommand::Add {
                config,
                address,
                reason,
            } => {
                if !address.contains('@') {
                    return Err(coded(
                        exit::EX_DATAERR,
                        format!("{address:?} is not an email address"),
                    ));
                }
                let (rt, outbox) = open(&config)?;
                rt.block_on(outbox.suppress(&address, reason.as_deref()))
                    .map_err(not_found)?;
                writeln!(out, "suppressed {address}")?;
            }
            SuppressCommand::Remove { config, address } => {
                let (rt, outbox) = open(&config)?;
                if rt
                    .block_on(outbox.unsuppress(&address))
                    .map_err(not_found)?
                {
                    writeln!(out, "removed {address}")?;
                } else {
                    writeln!(out, "{address} was not suppressed")?;
                }
            }
            SuppressCommand::List { config } => {
                let (rt, outbox) = open(&config)?;
                for (a, r) in rt.block_on(outbox.suppressions()).map_err(not_found)? {
                    writeln!(
                        out,
                        "{}{}",
                        printable(&a),
                        r.map(|r| format!("  ({})", printable(&r)))
                            .unwrap_or_default()
                    )?;
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
