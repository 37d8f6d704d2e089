//! The config file: what an operator writes (the `Raw*` structs, which are
//! the documentation of every key) and what sendbox runs on ([`Config`],
//! validated and with secrets resolved by reference).
//!
//! Every error names the file, the line and column, the key, and the fix;
//! all errors are reported at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

mod account;
mod daemon;
mod fingerprint;
mod listener;
mod plugin;
mod secrets;
#[cfg(test)]
mod tests;
mod triggers;

pub use account::{AccountConfig, AccountKind, RawAccount, SecretHash, SmtpAccount};
pub use daemon::{PostgresStore, RawDaemon, RawPostgres, Retention, is_postgres_url, store_path};

pub use listener::{ListenerConfig, RawListener};
pub use plugin::{Fingerprint, PluginConfig, RawPlugin};
pub use secrets::{RawSecret, RawSecretRef};
pub use triggers::{RawSchedule, RawWatch, RawWebhook};

use account::{account, secret_material};
use daemon::is_loopback;
use fingerprint::{fingerprints, hash};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Daemon-wide settings.
    #[serde(default)]
    pub daemon: RawDaemon,
    /// Mailboxes sendbox can send from, by name: `[accounts.alerts]`.
    #[serde(default)]
    pub accounts: BTreeMap<String, Spanned<RawAccount>>,
    /// Plugins, by name: `[plugins.file-alert]`.
    #[serde(default)]
    pub plugins: BTreeMap<String, Spanned<RawPlugin>>,
    /// SMTP submission listeners for devices and legacy apps, by name:
    /// `[listeners.scanners]`.
    #[serde(default)]
    pub listeners: BTreeMap<String, Spanned<RawListener>>,
}

/// `[daemon] max_held_outcome_bytes` when unset: 256 MiB.
pub const DEFAULT_MAX_HELD_OUTCOME_BYTES: u64 = 256 << 20;

/// The validated config.
#[derive(Debug)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Compiled-code cache.
    pub cache_dir: Option<PathBuf>,
    /// The outbox database (SQLite), when `postgres` is `None`.
    pub store: PathBuf,
    /// The shared PostgreSQL outbox, when `store` is a `postgres://` URL.
    pub postgres: Option<PostgresStore>,
    /// Webhook listen address.
    pub listen: String,
    /// Caps and timeouts of the webhook server.
    pub webhook_limits: sendbox_triggers::webhook::ServerLimits,
    /// How long finished work is kept.
    pub retention: Retention,
    /// Drain deadline on SIGTERM.
    pub shutdown_grace: std::time::Duration,
    /// Most bytes of plugin outcomes held while they wait for their commit.
    pub max_held_outcome_bytes: u64,
    /// Accounts by name.
    pub accounts: BTreeMap<String, AccountConfig>,
    /// Plugins by name (the config file's and the drop-ins').
    pub plugins: BTreeMap<String, PluginConfig>,
    /// The drop-in plugins' folder, if any.
    pub plugins_dir: Option<PathBuf>,
    /// SMTP submission listeners by name.
    pub listeners: BTreeMap<String, ListenerConfig>,
    /// Things that work but deserve attention (inline secrets...).
    pub warnings: Vec<String>,
    /// Hash of `[daemon]`: a reload that changes it needs a restart.
    pub restart_fingerprint: String,
}

/// Everything wrong with a config file, each naming where and how to fix.
#[derive(Debug, thiserror::Error)]
#[error("{}", errors.join("\n"))]
pub struct ConfigErrors {
    /// One line per problem.
    pub errors: Vec<String>,
}

/// `FILE:LINE:COLUMN` of a byte offset in the config text, for messages.
fn position(path: &Path, source: &str, offset: usize) -> String {
    let mut cut = offset.min(source.len());
    while !source.is_char_boundary(cut) {
        cut -= 1;
    }
    let before = &source[..cut];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    format!("{}:{line}:{col}", path.display())
}

struct Ctx<'a> {
    path: &'a Path,
    /// Read the secrets references point at; when false, references are
    /// checked for form only and their values left empty.
    resolve_secrets: bool,
    /// Read the store's password even when `resolve_secrets` is false.
    resolve_store_secret: bool,
    source: &'a str,
    errors: Vec<String>,
    warnings: Vec<String>,
    /// `[daemon] webhook_max_held_body_bytes`: no route's body may be
    /// larger.
    max_held_body_bytes: usize,
}

impl Ctx<'_> {
    fn at(&self, offset: usize) -> String {
        position(self.path, self.source, offset)
    }
    fn error(&mut self, offset: usize, key: &str, msg: impl std::fmt::Display) {
        let at = self.at(offset);
        self.errors.push(format!("{at}: `{key}`: {msg}"));
    }
    fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

fn read_source(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        errors: vec![format!(
            "{}: cannot read the config file: {e}",
            path.display()
        )],
    })
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    parse(path, &read_source(path)?)
}

/// Like [`load`], but secret references are checked for their form only,
/// never read: for `sendbox check --no-environment`, which loads plugins
/// and validates the file where the daemon's secrets are not at hand. The
/// result must not be used to run anything.
pub fn load_without_secrets(path: &Path) -> Result<Config, ConfigErrors> {
    parse_with(path, &read_source(path)?, false, false)
}

/// Like [`load_without_secrets`], but the store's own password (a
/// PostgreSQL store's `[daemon.postgres] password`) is read: for the
/// commands that work on the outbox (`sendbox outbox`, `sendbox suppress`),
/// which need the store and nothing else.
pub fn load_for_store(path: &Path) -> Result<Config, ConfigErrors> {
    parse_with(path, &read_source(path)?, false, true)
}

/// Parses and validates config text (`path` is used for messages and to
/// resolve relative paths).
pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigErrors> {
    parse_with(path, source, true, true)
}

fn parse_with(
    path: &Path,
    source: &str,
    resolve_secrets: bool,
    resolve_store_secret: bool,
) -> Result<Config, ConfigErrors> {
    let mut raw: RawConfig = toml::from_str(source).map_err(|e| {
        let at = e
            .span()
            .map(|s| position(path, source, s.start))
            .unwrap_or_else(|| path.display().to_string());
        ConfigErrors {
            errors: vec![format!("{at}: {}", e.message())],
        }
    })?;
    let max_held_body_bytes = raw
        .daemon
        .webhook_max_held_body_bytes
        .unwrap_or(sendbox_triggers::webhook::ServerLimits::default().max_held_body_bytes);
    let mut cx = Ctx {
        path,
        resolve_secrets,
        resolve_store_secret,
        source,
        errors: Vec::new(),
        warnings: Vec::new(),
        max_held_body_bytes,
    };
    let mut fingerprints = fingerprints(source);
    let mut accounts = BTreeMap::new();
    for (name, acct) in raw.accounts {
        let offset = acct.span().start;
        if let Some(mut a) = account(&mut cx, &name, acct.into_inner(), offset) {
            let section = fingerprints.accounts.remove(&name).unwrap_or_default();
            a.fingerprint = SecretHash(hash(&format!("{section}\n{}", secret_material(&a.kind))));
            accounts.insert(name, a);
        }
    }
    let mut plugins = BTreeMap::new();
    for (name, p) in raw.plugins {
        let offset = p.span().start;
        let fingerprint = fingerprints.plugins.remove(&name).unwrap_or_default();
        if let Some(p) = plugin::plugin(
            &mut cx,
            &name,
            p.into_inner(),
            offset,
            None,
            &accounts,
            fingerprint,
        ) {
            plugins.insert(name, p);
        }
    }
    let plugins_dir = raw.daemon.plugins_dir.as_ref().map(|d| cx.resolve_path(d));
    if let Some(dir) = &plugins_dir {
        plugin::drop_ins(&mut cx, dir, &accounts, &mut plugins);
    }
    let account_names: Vec<&str> = accounts.keys().map(String::as_str).collect();
    let plugin_names: Vec<&str> = plugins.keys().map(String::as_str).collect();
    let mut listeners = BTreeMap::new();
    for (name, l) in raw.listeners {
        if let Some(l) = listener::listener(
            &mut cx,
            &name,
            l.into_inner(),
            &account_names,
            &plugin_names,
        ) {
            listeners.insert(name, l);
        }
    }
    let mut addresses = std::collections::HashMap::new();
    // Port 0 (any free port, as tests use) never collides.
    for l in listeners.values().filter(|l| l.listen.port() != 0) {
        if let Some(other) = addresses.insert(l.listen, l.name.clone()) {
            cx.errors.push(format!(
                "{}: `listeners.{}.listen`: {} is also where listener `{other}` listens; give each its own port",
                path_display(cx.path),
                l.name,
                l.listen
            ));
        }
    }
    let mut paths = std::collections::HashMap::new();
    for p in plugins.values() {
        if let Some(path) = &p.webhook_path
            && let Some(other) = paths.insert(path.clone(), p.name.clone())
        {
            cx.errors.push(format!(
                "{}: `plugins.{}.webhook.path`: {path} is also the path of plugin `{other}`; give each plugin its own path",
                path_display(&p.defined_in),
                p.name
            ));
        }
    }
    let listen = raw
        .daemon
        .listen
        .clone()
        .unwrap_or_else(|| "127.0.0.1:8025".into());
    if !raw
        .daemon
        .dangerously_allow_unauthenticated_webhooks_on_public_address
        && !is_loopback(&listen)
    {
        for p in plugins.values() {
            if let (Some(route), Some(path)) = (&p.webhook, &p.webhook_path)
                && route.auth == sendbox_triggers::webhook::Auth::None
            {
                cx.errors.push(format!(
                    "{}: `plugins.{}.webhook.unauthenticated`: the route {path} takes requests from anyone, and `[daemon] listen = {listen:?}` is not a loopback address: \
                     give the route a `secret` or `bearer_token`, listen on 127.0.0.1, or (if a firewall really keeps strangers out) set \
                     `[daemon] dangerously_allow_unauthenticated_webhooks_on_public_address = true`",
                    path_display(&p.defined_in),
                    p.name
                ));
            }
        }
    }
    let postgres_url = (raw.daemon.store.as_deref())
        .filter(|s| daemon::is_postgres_url(s))
        .map(|s| s.to_string_lossy().into_owned());
    let postgres = match postgres_url {
        Some(url) => daemon::postgres_store(&mut cx, &url, raw.daemon.postgres.take()),
        None => {
            if let Some(p) = &raw.daemon.postgres {
                cx.error(
                    p.span().start,
                    "daemon.postgres",
                    "is only for a `postgres://` store: set `[daemon] store = \"postgres://USER@HOST:PORT/DATABASE\"`, or remove this table",
                );
            }
            None
        }
    };
    if !cx.errors.is_empty() {
        return Err(ConfigErrors { errors: cx.errors });
    }
    let server = sendbox_triggers::webhook::ServerLimits::default();
    let days = |d: u32| std::time::Duration::from_secs(u64::from(d) * 86_400);
    let retention = Retention {
        sent: days(raw.daemon.keep_sent_days.unwrap_or(30)),
        dead: days(raw.daemon.keep_dead_days.unwrap_or(90)),
        idempotency: std::time::Duration::from_secs(
            3600 * u64::from(
                plugins
                    .values()
                    .map(|p| p.policy.idempotency_hours)
                    .max()
                    .unwrap_or(sendbox_outbox::default_idempotency_hours()),
            ),
        ),
    };
    Ok(Config {
        retention,
        path: path.to_owned(),
        cache_dir: raw.daemon.cache_dir.map(|d| cx.resolve_path(&d)),
        listen,
        webhook_limits: sendbox_triggers::webhook::ServerLimits {
            max_connections: raw
                .daemon
                .webhook_max_connections
                .unwrap_or(server.max_connections),
            header_timeout: raw
                .daemon
                .webhook_header_timeout_ms
                .map_or(server.header_timeout, std::time::Duration::from_millis),
            body_timeout: raw
                .daemon
                .webhook_body_timeout_ms
                .map_or(server.body_timeout, std::time::Duration::from_millis),
            max_held_body_bytes,
        },
        shutdown_grace: std::time::Duration::from_secs(
            raw.daemon.shutdown_grace_secs.unwrap_or(10),
        ),
        max_held_outcome_bytes: raw
            .daemon
            .max_held_outcome_bytes
            .unwrap_or(DEFAULT_MAX_HELD_OUTCOME_BYTES),
        store: cx.resolve_path(
            raw.daemon
                .store
                .as_deref()
                .unwrap_or(Path::new("var/sendbox.db")),
        ),
        postgres,
        accounts,
        plugins,
        plugins_dir,
        listeners,
        warnings: cx.warnings,
        restart_fingerprint: fingerprints.restart,
    })
}

fn path_display(p: &Path) -> String {
    p.display().to_string()
}
