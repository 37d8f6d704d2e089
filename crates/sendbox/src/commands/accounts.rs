//! `sendbox check`, `sendbox send-test` and `sendbox login`: the commands
//! that touch accounts, tokens and SMTP servers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Args;
use sendbox_mail::Transport;
use sendbox_mail::message::{self, Envelope};
use sendbox_types::Email;

use crate::config::{self, AccountConfig, AccountKind};
use crate::daemon::setup::{load_config, token_provider, tokio_runtime, transport};
use crate::exit::{self, coded};

/// One line per trigger of a plugin: what `sendbox run` will serve, watch
/// and fire (with each schedule's next run, in its zone).
fn trigger_summary(p: &crate::config::PluginConfig) -> Vec<String> {
    let mut lines = Vec::new();
    if let (Some(path), Some(route)) = (&p.webhook_path, &p.webhook) {
        let auth = route.auth.describe();
        lines.push(format!(
            "webhook {path} ({auth}; {} at once)",
            route.concurrency
        ));
    }
    for w in &p.watches {
        lines.push(format!(
            "watch {}: {}{}",
            w.name,
            w.dir.display(),
            if w.recursive { " (recursive)" } else { "" }
        ));
    }
    for s in &p.schedules {
        let next = s
            .cron
            .upcoming(s.tz)
            .next()
            .map_or("never".to_owned(), |t| {
                t.format("%Y-%m-%d %H:%M:%S %Z").to_string()
            });
        lines.push(format!(
            "schedule {}: next run {next} (missed runs: {})",
            s.name,
            match s.catch_up {
                sendbox_triggers::cron::CatchUp::Skip => "skip",
                sendbox_triggers::cron::CatchUp::Once => "once",
            }
        ));
    }
    lines
}

/// `sendbox check --config FILE`
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
    /// Only validate the file and load plugins; do not contact token
    /// endpoints or SMTP servers.
    #[arg(long)]
    pub no_environment: bool,
    /// Treat warnings (e.g. inline secrets) as failures.
    #[arg(long)]
    pub deny_warnings: bool,
}

impl CheckArgs {
    /// Runs the stages, printing √ or x for each.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let mut failed = false;
        // Without the environment, secrets are not needed: their references
        // are checked for form, not read.
        let loaded = if self.no_environment {
            config::load_without_secrets(&self.config)
        } else {
            config::load(&self.config)
        };
        let cfg = match loaded {
            Ok(c) => {
                println!("√ config {} parsed and validated", self.config.display());
                if self.no_environment {
                    println!("    secrets not read (--no-environment)");
                }
                c
            }
            Err(e) => {
                println!("x config {}", self.config.display());
                for line in &e.errors {
                    println!("    {line}");
                }
                return Ok(ExitCode::from(exit::EX_CONFIG));
            }
        };
        for w in &cfg.warnings {
            println!("! warning: {w}");
        }
        if self.deny_warnings && !cfg.warnings.is_empty() {
            failed = true;
        }

        // Plugins.
        let rt = sendbox_runtime::Runtime::new(sendbox_runtime::RuntimeOptions {
            cache_dir: cfg.cache_dir.clone().or_else(crate::cli::default_cache_dir),
            max_concurrent_instances: 4,
        })
        .map_err(|e| coded(exit::EX_SOFTWARE, e.to_string()))?;
        for p in cfg.plugins.values() {
            match rt.load_file(&p.name, &p.wasm, p.settings.clone()) {
                Ok(plugin) => {
                    println!("√ plugin {} loads ({})", p.name, p.wasm.display());
                    if let Some(m) = plugin.manifest() {
                        println!(
                            "    {} {}{}",
                            m.name,
                            m.version,
                            m.description
                                .as_deref()
                                .map(|d| format!(": {d}"))
                                .unwrap_or_default()
                        );
                    }
                    for key in plugin.undeclared_config_keys() {
                        let declared: Vec<&str> = plugin
                            .manifest()
                            .map(|m| m.config.keys().map(String::as_str).collect())
                            .unwrap_or_default();
                        println!(
                            "! warning: plugin {}: config key `{key}` is not one it reads (a typo?); it reads: {}",
                            p.name,
                            declared.join(", ")
                        );
                        failed |= self.deny_warnings;
                    }
                    for line in trigger_summary(p) {
                        println!("    {line}");
                    }
                }
                Err(e) => {
                    failed = true;
                    println!("x plugin {}: {e}", p.name);
                }
            }
        }

        // SMTP listeners: who may submit, how.
        for l in cfg.listeners.values() {
            let s = &l.settings;
            let tls = match &s.tls {
                sendbox_submission::Tls::None => "no TLS",
                sendbox_submission::Tls::StartTls(_) => "STARTTLS",
                sendbox_submission::Tls::Implicit(_) => "implicit TLS",
            };
            let users = s.users.as_ref().map_or(0, |u| u.len());
            let networks: Vec<String> = s.allow_networks.iter().map(|n| n.to_string()).collect();
            println!(
                "√ listener {} on {} ({tls}) -> account {}: {users} user(s) may log in; no login from [{}]",
                l.name,
                l.listen,
                l.account,
                networks.join(", ")
            );
        }

        // Delivery pauses recorded by a running `sendbox deliver`/`run`;
        // on PostgreSQL, by any node, and the nodes seen.
        if let Some(pg) = cfg.postgres.as_ref().filter(|_| !self.no_environment) {
            match tokio_runtime()?.block_on(shared_store_status(pg)) {
                Ok(lines) => {
                    for (ok, line) in lines {
                        failed |= !ok;
                        println!("{} {line}", if ok { "√" } else { "x" });
                    }
                }
                Err(e) => {
                    failed = true;
                    println!("x outbox {}: {e}", pg.url);
                }
            }
        } else if cfg.postgres.is_none() && cfg.store.exists() {
            match sendbox_outbox::Outbox::open(&cfg.store).and_then(|o| o.paused_accounts()) {
                Ok(paused) => {
                    for (account, _since, reason) in paused {
                        failed = true;
                        println!("x account {account}: delivery is paused: {reason}");
                    }
                }
                Err(e) => {
                    failed = true;
                    println!("x outbox {}: {e}", cfg.store.display());
                }
            }
        }

        if !self.no_environment {
            let tokio = tokio_runtime()?;
            for (name, account) in cfg.accounts {
                let mailbox = account.mailbox.clone();
                let ok = tokio.block_on(check_account(account));
                match ok {
                    Ok(lines) => {
                        for l in lines {
                            println!("√ account {name} ({mailbox}): {l}");
                        }
                    }
                    Err(lines) => {
                        failed = true;
                        for l in lines {
                            println!("x account {name} ({mailbox}): {l}");
                        }
                    }
                }
            }
        }
        Ok(ExitCode::from(if failed {
            exit::EX_CONFIG
        } else {
            exit::OK
        }))
    }
}

/// Token, then SMTP connect + TLS + AUTH + QUIT, per account.
/// A shared PostgreSQL outbox as `sendbox check` reports it: reachable,
/// the accounts paused by any node, and the nodes seen with their leases.
/// Each line says whether it is fine.
async fn shared_store_status(
    pg: &crate::config::PostgresStore,
) -> Result<Vec<(bool, String)>, sendbox_outbox::OutboxError> {
    use sendbox_outbox::Store;
    // Checking, not delivering: no node registered, no lease touched.
    let store = sendbox_outbox::PgOutbox::connect_as_tool(
        &pg.url,
        pg.password.as_ref().map(sendbox_auth::Secret::expose),
    )
    .await?;
    let mut lines = vec![(true, format!("outbox {} reachable", store.server()))];
    for (account, _since, reason) in store.paused_accounts().await? {
        lines.push((
            false,
            format!("account {account}: delivery is paused: {reason}"),
        ));
    }
    let now = sendbox_outbox::now_ms();
    for n in store.nodes().await? {
        let ago = (now - n.seen_ms).max(0) / 1000;
        let alive = ago <= pg.lease.as_secs() as i64;
        lines.push((
            true,
            format!(
                "node {}{}: seen {ago} s ago ({}), holds {} message(s) under lease{}",
                n.node,
                if n.node == pg.node { " (this one)" } else { "" },
                n.detail,
                n.leases,
                if alive {
                    ""
                } else {
                    "; not seen for a lease: its messages go to the others"
                }
            ),
        ));
    }
    Ok(lines)
}

async fn check_account(account: AccountConfig) -> Result<Vec<String>, Vec<String>> {
    let mut done = Vec::new();
    let name = account.name.clone();
    let (transport, tokens) = match transport(account) {
        Ok(t) => t,
        Err(e) => return Err(vec![e.to_string()]),
    };
    if let Some(tokens) = &tokens {
        match tokens.token().await {
            Ok(t) => done.push(format!(
                "token obtained, expires in {} min",
                t.expires_in().as_secs() / 60
            )),
            Err(e) => return Err(vec![format!("token: {e}")]),
        }
    }
    match &transport {
        Transport::Smtp(smtp) => {
            let s = smtp.settings();
            match smtp.check().await {
                Ok(()) => done.push(format!(
                    "SMTP {}:{} TLS and XOAUTH2 login accepted",
                    s.host, s.port
                )),
                Err(e) => {
                    let mut lines = done;
                    lines.push(format!("SMTP {}:{}: {e}", s.host, s.port));
                    return Err(lines);
                }
            }
        }
        Transport::File(f) => done.push(format!("writes .eml files to {}", f.dir().display())),
    }
    tracing::debug!(account = %name, "check passed");
    Ok(done)
}

/// `sendbox send-test --config FILE --account NAME --to ADDR`
#[derive(Debug, Args)]
pub struct SendTestArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
    /// The account to send from.
    #[arg(long)]
    pub account: String,
    /// The recipient.
    #[arg(long)]
    pub to: String,
}

impl SendTestArgs {
    /// Sends one message now, bypassing the outbox.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let mut cfg = load_config(&self.config)?;
        let account = cfg.accounts.remove(&self.account).ok_or_else(|| {
            let known: Vec<String> = cfg.accounts.keys().cloned().collect();
            coded(
                exit::EX_CONFIG,
                format!(
                    "no account named {:?} in {}; known: {}",
                    self.account,
                    self.config.display(),
                    known.join(", ")
                ),
            )
        })?;
        let mailbox = account.mailbox.clone();
        let email = Email {
            to: vec![self.to.clone()],
            subject: format!("sendbox test message from account {}", self.account),
            text: Some(format!(
                "This is a test message sent by `sendbox send-test` through account `{}` ({mailbox}).\n",
                self.account
            )),
            ..Email::default()
        };
        let id = message::new_message_id(message::domain_of(&mailbox));
        let prepared = message::build(
            &email,
            &Envelope {
                account_mailbox: &mailbox,
                allowed_from: &[],
                message_id: &id,
                date: SystemTime::now(),
            },
        )
        .map_err(|e| coded(exit::EX_DATAERR, e.to_string()))?;
        let (transport, _) = transport(account)?;
        let result = tokio_runtime()?.block_on(transport.send(prepared));
        match result {
            Ok(receipt) => {
                println!("sent {id} to {}: {}", self.to, receipt.reply);
                for r in &receipt.refused {
                    println!("refused {}: {}", r.address, r.error);
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: not sent: {e}");
                Ok(ExitCode::from(if e.pauses_account() {
                    exit::EX_CONFIG
                } else {
                    exit::EX_SOFTWARE
                }))
            }
        }
    }
}

/// `sendbox login --config FILE NAME`
#[derive(Debug, Args)]
pub struct LoginArgs {
    #[command(flatten)]
    pub config: crate::cli::ConfigArg,
    /// The delegated account to log in (one with `token_file`).
    pub account: String,
}

impl LoginArgs {
    /// Runs the device authorization grant and saves the refresh token.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        let mut cfg = load_config(&self.config)?;
        let account = cfg.accounts.remove(&self.account).ok_or_else(|| {
            coded(
                exit::EX_CONFIG,
                format!(
                    "no account named {:?} in {}",
                    self.account,
                    self.config.display()
                ),
            )
        })?;
        let AccountKind::Smtp(a) = account.kind else {
            return Err(coded(
                exit::EX_CONFIG,
                format!(
                    "account `{}` writes files; it has nothing to log in to",
                    self.account
                ),
            ));
        };
        let (tokens, _) = token_provider(&self.account, *a)?;
        let tokio = tokio_runtime()?;
        let result: Result<PathBuf, sendbox_auth::AuthError> = tokio.block_on(async {
            let (prompt, details) = tokens.start_device_login().await?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "To sign in account `{}`, open {}",
                self.account, prompt.verification_uri
            );
            let _ = writeln!(out, "and enter the code: {}", prompt.user_code);
            if let Some(c) = &prompt.verification_uri_complete {
                let _ = writeln!(out, "(or open {c})");
            }
            let _ = writeln!(
                out,
                "Waiting up to {} minutes...",
                prompt.expires_in.as_secs() / 60
            );
            let _ = out.flush();
            drop(out);
            tokens.finish_device_login(&details).await
        });
        match result {
            Ok(path) => {
                println!(
                    "Signed in. Refresh token saved to {} (mode 0600).",
                    path.display()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("error: login failed: {e}");
                Ok(ExitCode::from(exit::EX_CONFIG))
            }
        }
    }
}
