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

use sendbox_auth::{Credentials, Endpoints, Secret, SecretSource};
use sendbox_runtime::Limits;

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
}

/// `[daemon]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    /// Where compiled plugin code is cached, e.g. `"var/cache"`. Default:
    /// `$XDG_CACHE_HOME/sendbox` or `~/.cache/sendbox`.
    pub cache_dir: Option<PathBuf>,
    /// The outbox database (SQLite), relative to this file. Default
    /// `"var/sendbox.db"`.
    pub store: Option<PathBuf>,
    /// Where webhooks are served, e.g. `"127.0.0.1:8025"`. Default
    /// `"127.0.0.1:8025"`; port 0 picks a free one.
    pub listen: Option<String>,
    /// How long `sendbox run` waits for in-flight work on SIGTERM, in
    /// seconds. Default 10.
    pub shutdown_grace_secs: Option<u64>,
    /// Most webhook connections open at once; more wait to be accepted.
    /// Default 1024.
    pub webhook_max_connections: Option<usize>,
    /// Time a webhook client has to send its request headers (and an idle
    /// kept-alive connection is kept), in ms. Default 10000.
    pub webhook_header_timeout_ms: Option<u64>,
    /// Time a webhook client has to send its request body, in ms. Default
    /// 30000.
    pub webhook_body_timeout_ms: Option<u64>,
    /// Serve routes with `unauthenticated = true` on an address other than
    /// loopback: anyone who can reach it can make sendbox send mail. Refused
    /// unless this is set. Default false.
    #[serde(default)]
    pub dangerously_allow_unauthenticated_webhooks_on_public_address: bool,
    /// Days a `sent` message (and its history) is kept in the outbox.
    /// Default 30.
    pub keep_sent_days: Option<u32>,
    /// Days a `dead` message (and its history) is kept. Default 90.
    pub keep_dead_days: Option<u32>,
}

/// How long finished work stays in the outbox; pruned hourly by `sendbox
/// run` and on demand by `sendbox outbox prune`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// `sent` messages.
    pub sent: std::time::Duration,
    /// `dead` messages.
    pub dead: std::time::Duration,
    /// Idempotency keys: the longest `idempotency_hours` of any plugin (an
    /// older key cannot suppress anything).
    pub idempotency: std::time::Duration,
}

impl Retention {
    /// The cutoffs as of `now_ms`.
    pub fn before(&self, now_ms: i64) -> sendbox_outbox::PruneBefore {
        let ago =
            |d: std::time::Duration| now_ms - i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2);
        sendbox_outbox::PruneBefore {
            sent_ms: ago(self.sent),
            dead_ms: ago(self.dead),
            idempotency_ms: ago(self.idempotency),
        }
    }
}

/// `[accounts.NAME]`: one mailbox and how to get its tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccount {
    /// `microsoft365`, `google`, `generic` (explicit endpoints) or `file`
    /// (write `.eml` files; no OAuth, no SMTP).
    pub provider: Spanned<String>,
    /// The mailbox to send as, e.g. `"alerts@contoso.com"`: the XOAUTH2
    /// user and the default From.
    pub mailbox: Spanned<String>,
    /// Microsoft 365: the tenant, e.g. `"contoso.onmicrosoft.com"` or the
    /// directory id.
    pub tenant: Option<Spanned<String>>,
    /// The app registration's client id.
    pub client_id: Option<Spanned<String>>,
    /// The client secret, by reference: `{ file = "/etc/sendbox/alerts.secret" }`
    /// or `{ env = "ALERTS_CLIENT_SECRET" }`.
    pub client_secret: Option<Spanned<RawSecret>>,
    /// Certificate credentials: the RSA private key (PEM) ...
    pub private_key_file: Option<Spanned<PathBuf>>,
    /// ... and the certificate uploaded to the app registration (PEM).
    pub certificate_file: Option<Spanned<PathBuf>>,
    /// Delegated credentials: where `sendbox login` keeps the refresh token,
    /// e.g. `"var/alerts.token.json"` (written with mode 0600).
    pub token_file: Option<Spanned<PathBuf>>,
    /// `generic`: the token endpoint.
    pub token_url: Option<Spanned<String>>,
    /// `generic`: the device authorization endpoint, for `sendbox login`.
    pub device_url: Option<Spanned<String>>,
    /// Scopes to request; presets fill this in.
    pub scopes: Option<Vec<String>>,
    /// SMTP server; presets fill this in (`smtp.office365.com`,
    /// `smtp.gmail.com`).
    pub smtp_host: Option<String>,
    /// SMTP port. Default 587 (465 with `security = "implicit_tls"`).
    pub smtp_port: Option<u16>,
    /// `starttls` (default) or `implicit_tls`.
    pub security: Option<Spanned<String>>,
    /// Extra CA certificate (PEM) to trust, for a private relay.
    pub ca_file: Option<PathBuf>,
    /// Most SMTP connections at once. Default 3 for `microsoft365`, else 5.
    pub max_connections: Option<u32>,
    /// Connect and command timeout in seconds. Default 30.
    pub timeout_secs: Option<u64>,
    /// `file`: the folder `.eml` files go to, e.g. `"var/mail"`.
    pub dir: Option<PathBuf>,
    /// Most messages per minute through this account. Default 30 for
    /// `microsoft365` (Exchange's limit), none otherwise.
    pub rate_per_minute: Option<u32>,
    /// A message still failing this many hours after it was queued goes
    /// dead. Default 24.
    pub max_age_hours: Option<u32>,
    /// Accept `client_secret = "..."` written inline (warned about).
    #[serde(default)]
    pub allow_inline_secret: bool,
}

/// A secret reference, or (refused unless opted in) an inline value.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSecret {
    /// `client_secret = "..."`
    Inline(String),
    /// `{ file = ... }` or `{ env = ... }`
    Reference(RawSecretRef),
}

/// `{ file = "..." }` or `{ env = "..." }`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecretRef {
    /// Read the secret from this file.
    pub file: Option<PathBuf>,
    /// Read the secret from this environment variable.
    pub env: Option<String>,
}

/// `[plugins.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    /// The component file, e.g. `"plugins/file_alert.wasm"`.
    pub wasm: Spanned<PathBuf>,
    /// The account its emails go out through.
    pub account: Spanned<String>,
    /// Non-secret values the plugin reads with `config::get`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Resource limits; see `sendbox_runtime::Limits`.
    #[serde(default)]
    pub limits: Limits,
    /// What the plugin may send: allowed From addresses and recipients,
    /// sizes and rates, checked at enqueue (`[plugins.NAME.policy]`).
    #[serde(default)]
    pub policy: sendbox_outbox::Policy,
    /// A webhook route for this plugin.
    pub webhook: Option<Spanned<RawWebhook>>,
    /// Folders to watch: `[[plugins.NAME.watch]]`.
    #[serde(default)]
    pub watch: Vec<Spanned<RawWatch>>,
    /// Schedules: `[[plugins.NAME.schedule]]`.
    #[serde(default)]
    pub schedule: Vec<Spanned<RawSchedule>>,
}

/// `[plugins.NAME.webhook]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    /// The route, e.g. `"/hooks/alerts"`.
    pub path: Spanned<String>,
    /// HMAC-SHA256 secret, by reference (`{ env = "..." }` or `{ file = "..." }`).
    pub secret: Option<Spanned<RawSecretRef>>,
    /// How the secret signs requests: `github` (default: hex HMAC of the
    /// body in `signature_header`), `standard-webhooks` (`webhook-id`,
    /// `webhook-timestamp`, `webhook-signature`; secret `whsec_...`),
    /// `stripe` (`Stripe-Signature`) or `slack` (`X-Slack-Signature`).
    pub scheme: Option<Spanned<String>>,
    /// `github` scheme: header carrying the signature. Default
    /// `X-Hub-Signature-256`.
    pub signature_header: Option<String>,
    /// `github` scheme: prefix before the hex digest. Default `sha256=`.
    pub signature_prefix: Option<String>,
    /// Timestamped schemes: how far a request's timestamp may be from now,
    /// in seconds; a delivery seen within it is not run again. Default 300.
    pub tolerance_secs: Option<u64>,
    /// `github` scheme: a header with the sender's delivery id, e.g.
    /// `X-GitHub-Delivery`; a delivery id seen within `dedupe_secs` is not
    /// run again. Default: none (the body-only signature has no replay
    /// window).
    pub dedupe_header: Option<String>,
    /// How long a delivery id from `dedupe_header` is remembered, in
    /// seconds. Default 86400.
    pub dedupe_secs: Option<u64>,
    /// Bearer token, by reference, instead of a signature.
    pub bearer_token: Option<Spanned<RawSecretRef>>,
    /// Accept unauthenticated requests (only sensible on loopback).
    #[serde(default)]
    pub unauthenticated: bool,
    /// Largest body, in bytes. Default 1 MiB.
    pub max_body_bytes: Option<usize>,
    /// Requests handled at once. Default 16.
    pub concurrency: Option<usize>,
    /// How long a request beyond `concurrency` waits for a slot before it
    /// is answered `503` with `Retry-After`, in ms. Default 2000.
    pub queue_ms: Option<u64>,
}

/// `[[plugins.NAME.watch]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatch {
    /// The watch's name, passed to the plugin, e.g. `"incoming"`.
    pub name: String,
    /// The folder, relative to this file.
    pub dir: PathBuf,
    /// Watch subfolders too. Default false.
    #[serde(default)]
    pub recursive: bool,
    /// Only paths matching these globs, e.g. `["*.csv"]`. Default: all.
    pub include: Option<Spanned<Vec<String>>>,
    /// Never paths matching these globs, e.g. `["*.tmp", ".*"]`.
    pub exclude: Option<Spanned<Vec<String>>>,
    /// Quiet time after the last write before the event fires, ms. Default 500.
    pub debounce_ms: Option<u64>,
    /// Files up to this size are passed with their contents. Default 5 MiB.
    pub max_contents_bytes: Option<u64>,
    /// Emit `created` for files present at start. Default false.
    #[serde(default)]
    pub process_existing: bool,
}

/// `[[plugins.NAME.schedule]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    /// The schedule's name, passed to the plugin, e.g. `"daily"`.
    pub name: String,
    /// Cron expression: 5 fields (`"0 8 * * *"`) or 6 with seconds first.
    pub cron: Spanned<String>,
    /// IANA time zone. Default `"UTC"`.
    pub timezone: Option<Spanned<String>>,
    /// Runs missed while the daemon was down: `"skip"` them (default) or
    /// run the latest one `"once"` at start.
    pub catch_up: Option<Spanned<String>>,
}

/// A validated account.
#[derive(Debug)]
pub struct Account {
    /// Its name in the config.
    pub name: String,
    /// The mailbox.
    pub mailbox: String,
    /// Messages per minute, if limited.
    pub rate_per_minute: Option<u32>,
    /// Hours before a failing message goes dead.
    pub max_age_hours: u32,
    /// How it sends.
    pub kind: AccountKind,
    /// Hash of its section and of the secrets it resolved: a reload
    /// restarts the account's worker when this changes.
    pub fingerprint: SecretHash,
}

/// A hash that covers secret material: compared, never shown (`Debug`
/// prints no digits).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretHash(String);

impl std::fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHash([redacted])")
    }
}

/// How an account sends.
#[derive(Debug)]
pub enum AccountKind {
    /// Into a folder of `.eml` files.
    File {
        /// The folder.
        dir: PathBuf,
    },
    /// SMTP with XOAUTH2.
    Smtp(Box<SmtpAccount>),
}

/// The OAuth and SMTP side of an account.
#[derive(Debug)]
pub struct SmtpAccount {
    /// The preset, for messages.
    pub provider: String,
    /// Where tokens come from.
    pub endpoints: Endpoints,
    /// The client id.
    pub client_id: String,
    /// How the client proves itself.
    pub credentials: Credentials,
    /// SMTP settings.
    pub smtp: sendbox_mail::smtp::SmtpSettings,
}

/// A validated plugin.
#[derive(Debug)]
pub struct Plugin {
    /// Its name.
    pub name: String,
    /// The component file, resolved against the config's folder.
    pub wasm: PathBuf,
    /// The account.
    pub account: String,
    /// Runtime settings.
    pub settings: sendbox_runtime::PluginSettings,
    /// What it may send.
    pub policy: sendbox_outbox::Policy,
    /// Its webhook route.
    pub webhook: Option<sendbox_triggers::webhook::Route>,
    /// The webhook path.
    pub webhook_path: Option<String>,
    /// Its watched folders.
    pub watches: Vec<sendbox_triggers::watch::Watch>,
    /// Its schedules.
    pub schedules: Vec<sendbox_triggers::cron::Schedule>,
    /// What a reload compares to tell whether this plugin changed: hashes
    /// of its section without the triggers, and of the triggers.
    pub fingerprint: Fingerprint,
}

/// SHA-256 of a config section's canonical text, for telling what a
/// reload changed (a hash, so an inline secret never shows in `Debug`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprint {
    /// Everything but the triggers (wasm path, account, config, limits, policy).
    pub plugin: String,
    /// `webhook`, `watch` and `schedule`.
    pub triggers: String,
}

/// The validated config.
#[derive(Debug)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// Compiled-code cache.
    pub cache_dir: Option<PathBuf>,
    /// The outbox database.
    pub store: PathBuf,
    /// Webhook listen address.
    pub listen: String,
    /// Caps and timeouts of the webhook server.
    pub webhook_limits: sendbox_triggers::webhook::ServerLimits,
    /// How long finished work is kept.
    pub retention: Retention,
    /// Drain deadline on SIGTERM.
    pub shutdown_grace: std::time::Duration,
    /// Accounts by name.
    pub accounts: BTreeMap<String, Account>,
    /// Plugins by name.
    pub plugins: BTreeMap<String, Plugin>,
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

struct Ctx<'a> {
    path: &'a Path,
    /// Read the secrets references point at; when false, references are
    /// checked for form only and their values left empty.
    resolve_secrets: bool,
    source: &'a str,
    errors: Vec<String>,
    warnings: Vec<String>,
}

impl Ctx<'_> {
    fn at(&self, offset: usize) -> String {
        let before = &self.source[..offset.min(self.source.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.len(), |i| before.len() - i - 1)
            + 1;
        format!("{}:{line}:{col}", self.path.display())
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
    parse_with(path, &read_source(path)?, false)
}

/// Parses and validates config text (`path` is used for messages and to
/// resolve relative paths).
pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigErrors> {
    parse_with(path, source, true)
}

fn parse_with(path: &Path, source: &str, resolve_secrets: bool) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = toml::from_str(source).map_err(|e| {
        let at = e
            .span()
            .map(|s| {
                let before = &source[..s.start.min(source.len())];
                let line = before.matches('\n').count() + 1;
                let col = before
                    .rfind('\n')
                    .map_or(before.len(), |i| before.len() - i - 1)
                    + 1;
                format!("{}:{line}:{col}", path.display())
            })
            .unwrap_or_else(|| path.display().to_string());
        ConfigErrors {
            errors: vec![format!("{at}: {}", e.message())],
        }
    })?;
    let mut cx = Ctx {
        path,
        resolve_secrets,
        source,
        errors: Vec::new(),
        warnings: Vec::new(),
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
        let p = p.into_inner();
        let account_name = p.account.get_ref().clone();
        if !accounts.contains_key(&account_name) {
            let known: Vec<&str> = accounts.keys().map(String::as_str).collect();
            cx.error(
                p.account.span().start,
                &format!("plugins.{name}.account"),
                format!(
                    "no account named {account_name:?}; define [accounts.{account_name}] or use one of: {}",
                    if known.is_empty() { "(none defined)".into() } else { known.join(", ") }
                ),
            );
        }
        if let Err(e) = p.limits.validate() {
            cx.error(offset, &format!("plugins.{name}.limits"), e);
        }
        let triggers = triggers(&mut cx, &name, &p);
        plugins.insert(
            name.clone(),
            Plugin {
                wasm: cx.resolve_path(p.wasm.get_ref()),
                account: account_name,
                settings: sendbox_runtime::PluginSettings {
                    config: p.config,
                    limits: p.limits,
                },
                policy: p.policy,
                webhook_path: p
                    .webhook
                    .as_ref()
                    .map(|w| w.get_ref().path.get_ref().clone()),
                webhook: triggers.0,
                watches: triggers.1,
                schedules: triggers.2,
                fingerprint: fingerprints.plugins.remove(&name).unwrap_or_default(),
                name,
            },
        );
    }
    let mut paths = std::collections::HashMap::new();
    for p in plugins.values() {
        if let Some(path) = &p.webhook_path
            && let Some(other) = paths.insert(path.clone(), p.name.clone())
        {
            cx.errors.push(format!(
                "{}: `plugins.{}.webhook.path`: {path} is also the path of plugin `{other}`; give each plugin its own path",
                path_display(cx.path),
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
                    path_display(cx.path),
                    p.name
                ));
            }
        }
    }
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
        },
        shutdown_grace: std::time::Duration::from_secs(
            raw.daemon.shutdown_grace_secs.unwrap_or(10),
        ),
        store: cx.resolve_path(
            raw.daemon
                .store
                .as_deref()
                .unwrap_or(Path::new("var/sendbox.db")),
        ),
        accounts,
        plugins,
        warnings: cx.warnings,
        restart_fingerprint: fingerprints.restart,
    })
}

struct Fingerprints {
    restart: String,
    accounts: BTreeMap<String, String>,
    plugins: BTreeMap<String, Fingerprint>,
}

fn hash(text: &str) -> String {
    sendbox_runtime::content_hash(text.as_bytes())
}

/// Hashes of each section's canonical text (comments and layout do not
/// count).
fn fingerprints(source: &str) -> Fingerprints {
    let mut table: toml::Table = toml::from_str(source).unwrap_or_default();
    let text = |v: Option<toml::Value>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut plugins = BTreeMap::new();
    if let Some(toml::Value::Table(ps)) = table.remove("plugins") {
        for (name, p) in ps {
            let toml::Value::Table(mut p) = p else {
                continue;
            };
            let mut triggers = toml::Table::new();
            for key in ["webhook", "watch", "schedule"] {
                if let Some(v) = p.remove(key) {
                    triggers.insert(key.into(), v);
                }
            }
            plugins.insert(
                name,
                Fingerprint {
                    plugin: hash(&p.to_string()),
                    triggers: hash(&triggers.to_string()),
                },
            );
        }
    }
    let mut accounts = BTreeMap::new();
    if let Some(toml::Value::Table(accts)) = table.remove("accounts") {
        for (name, a) in accts {
            accounts.insert(name, a.to_string());
        }
    }
    let restart = hash(&text(table.remove("daemon")));
    Fingerprints {
        restart,
        accounts,
        plugins,
    }
}

/// Whether a listen address only takes connections from this machine.
fn is_loopback(listen: &str) -> bool {
    let host = match listen.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => listen,
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The outbox database a config names, read without validating the rest:
/// the `outbox` and `suppress` commands need nothing else, so they work
/// where secrets the daemon gets from its environment do not resolve.
pub fn store_path(path: &Path) -> Result<PathBuf, ConfigErrors> {
    #[derive(Deserialize)]
    struct OnlyDaemon {
        #[serde(default)]
        daemon: RawDaemon,
    }
    let source = read_source(path)?;
    let raw: OnlyDaemon = toml::from_str(&source).map_err(|e| ConfigErrors {
        errors: vec![format!("{}: {}", path.display(), e.message())],
    })?;
    let store = raw
        .daemon
        .store
        .unwrap_or_else(|| PathBuf::from("var/sendbox.db"));
    Ok(if store.is_absolute() {
        store
    } else {
        path.parent().unwrap_or(Path::new(".")).join(store)
    })
}

fn path_display(p: &Path) -> String {
    p.display().to_string()
}

/// The source a `{ file = ... }` / `{ env = ... }` reference names.
fn secret_ref(
    cx: &mut Ctx<'_>,
    offset: usize,
    key: &str,
    r: &RawSecretRef,
) -> Option<SecretSource> {
    match (&r.file, &r.env) {
        (Some(f), None) => Some(SecretSource::File(cx.resolve_path(f))),
        (None, Some(v)) => Some(SecretSource::Env(v.clone())),
        _ => {
            cx.error(offset, key, "give exactly one of `file` or `env`");
            None
        }
    }
}

fn secret_bytes(cx: &mut Ctx<'_>, offset: usize, key: &str, r: &RawSecretRef) -> Option<Vec<u8>> {
    let src = secret_ref(cx, offset, key, r)?;
    if !cx.resolve_secrets {
        return Some(Vec::new());
    }
    match src.resolve() {
        Ok(s) => Some(s.expose().as_bytes().to_vec()),
        Err(e) => {
            cx.error(offset, key, e);
            None
        }
    }
}

type Triggers = (
    Option<sendbox_triggers::webhook::Route>,
    Vec<sendbox_triggers::watch::Watch>,
    Vec<sendbox_triggers::cron::Schedule>,
);

fn globs(cx: &mut Ctx<'_>, key: &str, pats: Option<&Spanned<Vec<String>>>) -> globset::GlobSet {
    let mut b = globset::GlobSetBuilder::new();
    let Some(pats) = pats else {
        return globset::GlobSet::empty();
    };
    let offset = pats.span().start;
    for p in pats.get_ref() {
        match globset::Glob::new(p) {
            Ok(g) => {
                b.add(g);
            }
            Err(e) => cx.error(offset, key, format!("bad glob {p:?}: {e}")),
        }
    }
    b.build().unwrap_or_else(|_| globset::GlobSet::empty())
}

fn triggers(cx: &mut Ctx<'_>, name: &str, p: &RawPlugin) -> Triggers {
    use sendbox_triggers::webhook::{Auth, Route};
    let webhook = p.webhook.as_ref().and_then(|w| {
        let offset = w.span().start;
        let w = w.get_ref();
        let key = format!("plugins.{name}.webhook");
        let path = w.path.get_ref();
        if !path.starts_with('/') || path == "/healthz" || path == "/metrics" {
            cx.error(w.path.span().start, &format!("{key}.path"), "must start with `/` and not be /healthz or /metrics, e.g. \"/hooks/alerts\"");
            return None;
        }
        let scheme = w.scheme.as_ref().map_or("github", |s| s.get_ref().as_str());
        if let Some(s) = &w.scheme
            && (w.secret.is_none() || !["github", "standard-webhooks", "stripe", "slack"].contains(&scheme))
        {
            cx.error(s.span().start, &format!("{key}.scheme"), "must be one of \"github\", \"standard-webhooks\", \"stripe\", \"slack\", and goes with `secret`");
            return None;
        }
        if scheme != "github" && (w.signature_header.is_some() || w.signature_prefix.is_some() || w.dedupe_header.is_some()) {
            cx.error(offset, &key, format!("`signature_header`, `signature_prefix` and `dedupe_header` belong to the `github` scheme; scheme {scheme:?} fixes its own headers and has its own replay window (`tolerance_secs`)"));
            return None;
        }
        let auth = match (&w.secret, &w.bearer_token, w.unauthenticated) {
            (Some(s), None, false) => {
                let secret = secret_bytes(cx, s.span().start, &format!("{key}.secret"), s.get_ref())?;
                match scheme {
                    "standard-webhooks" => {
                        use base64::Engine as _;
                        let text = String::from_utf8_lossy(&secret);
                        let b64 = text.trim().strip_prefix("whsec_").unwrap_or(text.trim());
                        match base64::engine::general_purpose::STANDARD.decode(b64) {
                            Ok(key) if !key.is_empty() => Auth::StandardWebhooks { secret: key },
                            _ => {
                                cx.error(s.span().start, &format!("{key}.secret"), "a Standard Webhooks secret is `whsec_` followed by base64, as the sender shows it");
                                return None;
                            }
                        }
                    }
                    "stripe" => Auth::Stripe { secret },
                    "slack" => Auth::Slack { secret },
                    _ => Auth::Hmac {
                        secret,
                        header: w.signature_header.clone().unwrap_or_else(|| "X-Hub-Signature-256".into()).to_ascii_lowercase(),
                        prefix: w.signature_prefix.clone().unwrap_or_else(|| "sha256=".into()),
                    },
                }
            }
            (None, Some(t), false) => Auth::Bearer {
                token: secret_bytes(cx, t.span().start, &format!("{key}.bearer_token"), t.get_ref())?,
            },
            (None, None, true) => Auth::None,
            _ => {
                cx.error(offset, &key, "choose one of `secret` (HMAC signature), `bearer_token`, or `unauthenticated = true`");
                return None;
            }
        };
        Some(Route {
            plugin: name.to_owned(),
            auth,
            replay: sendbox_triggers::webhook::Replay {
                tolerance: std::time::Duration::from_secs(w.tolerance_secs.unwrap_or(300)),
                dedupe_header: w.dedupe_header.as_ref().map(|h| h.to_ascii_lowercase()),
                dedupe_window: std::time::Duration::from_secs(w.dedupe_secs.unwrap_or(86_400)),
            },
            max_body_bytes: w.max_body_bytes.unwrap_or(1 << 20),
            concurrency: w.concurrency.unwrap_or(16),
            queue_wait: std::time::Duration::from_millis(w.queue_ms.unwrap_or(2000)),
        })
    });
    let mut watches = Vec::new();
    for (i, w) in p.watch.iter().enumerate() {
        let w = w.get_ref();
        let key = format!("plugins.{name}.watch[{i}]");
        // Created and resolved when the watch starts, not while checking.
        let dir = cx.resolve_path(&w.dir);
        watches.push(sendbox_triggers::watch::Watch {
            plugin: name.to_owned(),
            name: w.name.clone(),
            dir,
            recursive: w.recursive,
            include: globs(cx, &format!("{key}.include"), w.include.as_ref()),
            exclude: globs(cx, &format!("{key}.exclude"), w.exclude.as_ref()),
            debounce: std::time::Duration::from_millis(w.debounce_ms.unwrap_or(500)),
            max_contents_bytes: w.max_contents_bytes.unwrap_or(5 << 20),
            process_existing: w.process_existing,
        });
    }
    let mut schedules = Vec::new();
    for (i, s) in p.schedule.iter().enumerate() {
        let s = s.get_ref();
        let key = format!("plugins.{name}.schedule[{i}]");
        let cron = match sendbox_triggers::cron::parse_expr(s.cron.get_ref()) {
            Ok(cron) => Some(cron),
            Err(e) => {
                cx.error(s.cron.span().start, &format!("{key}.cron"), e);
                None
            }
        };
        let tz = match &s.timezone {
            None => sendbox_triggers::cron::parse_zone("UTC").ok(),
            Some(tz) => match sendbox_triggers::cron::parse_zone(tz.get_ref()) {
                Ok(tz) => Some(tz),
                Err(e) => {
                    cx.error(tz.span().start, &format!("{key}.timezone"), e);
                    None
                }
            },
        };
        let catch_up = match &s.catch_up {
            None => Some(sendbox_triggers::cron::CatchUp::Skip),
            Some(c) => match c.get_ref().parse() {
                Ok(c) => Some(c),
                Err(e) => {
                    cx.error(c.span().start, &format!("{key}.catch_up"), e);
                    None
                }
            },
        };
        if let (Some(cron), Some(tz), Some(catch_up)) = (cron, tz, catch_up) {
            schedules.push(sendbox_triggers::cron::Schedule {
                plugin: name.to_owned(),
                name: s.name.clone(),
                cron,
                tz,
                catch_up,
            });
        }
    }
    (webhook, watches, schedules)
}

fn required<T: Clone>(
    cx: &mut Ctx<'_>,
    v: &Option<Spanned<T>>,
    offset: usize,
    key: &str,
    fix: &str,
) -> Option<T> {
    match v {
        Some(s) => Some(s.get_ref().clone()),
        None => {
            cx.error(offset, key, format!("is required: {fix}"));
            None
        }
    }
}

fn account(cx: &mut Ctx<'_>, name: &str, a: RawAccount, offset: usize) -> Option<Account> {
    let key = |k: &str| format!("accounts.{name}.{k}");
    let mailbox = a.mailbox.get_ref().clone();
    if !mailbox.contains('@') {
        cx.error(
            a.mailbox.span().start,
            &key("mailbox"),
            "is not an email address, e.g. \"alerts@contoso.com\"",
        );
    }
    let provider = a.provider.get_ref().as_str();
    if provider == "file" {
        let Some(dir) = a.dir.as_ref() else {
            cx.error(offset, &key("dir"), "is required for provider = \"file\": the folder .eml files go to, e.g. dir = \"var/mail\"");
            return None;
        };
        return Some(Account {
            name: name.to_owned(),
            mailbox,
            rate_per_minute: a.rate_per_minute,
            max_age_hours: a.max_age_hours.unwrap_or(24),
            kind: AccountKind::File {
                dir: cx.resolve_path(dir),
            },
            fingerprint: SecretHash::default(),
        });
    }
    let client_id = required(
        cx,
        &a.client_id,
        offset,
        &key("client_id"),
        "the app registration's client (application) id",
    )?;

    // Credentials: exactly one kind.
    let secret = match &a.client_secret {
        None => None,
        Some(s) => {
            let at = s.span().start;
            match s.get_ref() {
                RawSecret::Inline(v) if a.allow_inline_secret => {
                    cx.warnings.push(format!(
                        "{}: `{}` is written inline in the config; move it to a file (client_secret = {{ file = \"...\" }}) or an environment variable",
                        cx.at(at),
                        key("client_secret")
                    ));
                    Some(SecretSource::Inline(Secret::new(v.clone())))
                }
                RawSecret::Inline(_) => {
                    cx.error(at, &key("client_secret"), "secrets are not written into the config: use client_secret = { file = \"/etc/sendbox/NAME.secret\" } or { env = \"VAR\" } (or set allow_inline_secret = true to accept it, with a warning)");
                    return None;
                }
                RawSecret::Reference(r) => Some(secret_ref(cx, at, &key("client_secret"), r)?),
            }
        }
    };
    let cert = match (&a.private_key_file, &a.certificate_file) {
        (Some(k), Some(c)) => Some((
            cx.resolve_path(k.get_ref()),
            cx.resolve_path(c.get_ref()),
            k.span().start,
        )),
        (Some(k), None) => {
            cx.error(k.span().start, &key("certificate_file"), "is required with private_key_file: the certificate uploaded to the app registration");
            return None;
        }
        (None, Some(c)) => {
            cx.error(
                c.span().start,
                &key("private_key_file"),
                "is required with certificate_file",
            );
            return None;
        }
        (None, None) => None,
    };
    let token_file = a.token_file.as_ref().map(|t| cx.resolve_path(t.get_ref()));
    let resolve_secret = |cx: &mut Ctx<'_>, s: &SecretSource| match s.resolve() {
        _ if !cx.resolve_secrets => Some(Secret::new(String::new())),
        Ok(v) => Some(v),
        Err(e) => {
            let at = a.client_secret.as_ref().map_or(offset, |s| s.span().start);
            cx.error(at, &format!("accounts.{name}.client_secret"), e);
            None
        }
    };
    let (credentials, delegated) = match (&secret, &cert, &token_file) {
        (_, Some(_), Some(_)) | (_, Some(_), _) if secret.is_some() => {
            cx.error(
                offset,
                &key("client_secret"),
                "give either client_secret or private_key_file/certificate_file, not both",
            );
            return None;
        }
        (_, Some((k, c, at)), None) => {
            let read = |p: &Path| {
                std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
            };
            match read(k).and_then(|kp| read(c).map(|cp| (kp, cp))) {
                Ok((kp, cp)) => match sendbox_auth::jwt::CertificateKey::from_pem(&kp, &cp) {
                    Ok(key_pair) => (Credentials::Certificate(Box::new(key_pair)), false),
                    Err(e) => {
                        cx.error(*at, &key("private_key_file"), e);
                        return None;
                    }
                },
                Err(e) => {
                    cx.error(*at, &key("private_key_file"), e);
                    return None;
                }
            }
        }
        (s, None, Some(tf)) => {
            let client_secret = match s {
                Some(s) => Some(resolve_secret(cx, s)?),
                None => None,
            };
            (
                Credentials::RefreshToken {
                    token_file: tf.clone(),
                    client_secret,
                },
                true,
            )
        }
        (Some(s), None, None) => (Credentials::ClientSecret(resolve_secret(cx, s)?), false),
        (None, None, None) => {
            cx.error(offset, &key("client_secret"), "no credentials: give client_secret (app-only), private_key_file + certificate_file (app-only with a certificate), or token_file (delegated, filled by `sendbox login`)");
            return None;
        }
        _ => {
            cx.error(offset, &key("client_secret"), "conflicting credentials");
            return None;
        }
    };

    let (endpoints, host, default_conns) = match provider {
        "microsoft365" => {
            let tenant = required(
                cx,
                &a.tenant,
                offset,
                &key("tenant"),
                "the tenant, e.g. \"contoso.onmicrosoft.com\"",
            )?;
            let e = if delegated {
                Endpoints::microsoft365_delegated(&tenant)
            } else {
                Endpoints::microsoft365_app_only(&tenant)
            };
            (
                e,
                "smtp.office365.com".to_string(),
                sendbox_mail::smtp::MICROSOFT365_MAX_CONNECTIONS,
            )
        }
        "google" => (Endpoints::google(), "smtp.gmail.com".to_string(), 5),
        "generic" => {
            let token_url = required(
                cx,
                &a.token_url,
                offset,
                &key("token_url"),
                "the token endpoint URL",
            )?;
            let Some(host) = a.smtp_host.clone() else {
                cx.error(
                    offset,
                    &key("smtp_host"),
                    "is required for provider = \"generic\"",
                );
                return None;
            };
            (
                Endpoints {
                    token_url,
                    device_url: a.device_url.as_ref().map(|d| d.get_ref().clone()),
                    scopes: a.scopes.clone().unwrap_or_default(),
                },
                host,
                5,
            )
        }
        other => {
            cx.error(
                a.provider.span().start,
                &key("provider"),
                format!("unknown provider {other:?}: use microsoft365, google, generic or file"),
            );
            return None;
        }
    };
    let mut endpoints = endpoints;
    if let Some(scopes) = &a.scopes {
        endpoints.scopes = scopes.clone();
    }
    if let Some(d) = &a.device_url {
        endpoints.device_url = Some(d.get_ref().clone());
    }
    if let Some(t) = &a.token_url {
        endpoints.token_url = t.get_ref().clone();
    }
    let security = match a.security.as_ref().map(|s| s.get_ref().as_str()) {
        None | Some("starttls") => sendbox_mail::smtp::Security::StartTls,
        Some("implicit_tls") => sendbox_mail::smtp::Security::ImplicitTls,
        Some(other) => {
            let at = a.security.as_ref().map_or(offset, |s| s.span().start);
            cx.error(at, &key("security"), format!("unknown value {other:?}: use \"starttls\" (port 587) or \"implicit_tls\" (port 465)"));
            return None;
        }
    };
    let port = a.smtp_port.unwrap_or(match security {
        sendbox_mail::smtp::Security::StartTls => 587,
        sendbox_mail::smtp::Security::ImplicitTls => 465,
    });
    Some(Account {
        name: name.to_owned(),
        mailbox: mailbox.clone(),
        rate_per_minute: a
            .rate_per_minute
            .or((provider == "microsoft365").then_some(30)),
        max_age_hours: a.max_age_hours.unwrap_or(24),
        kind: AccountKind::Smtp(Box::new(SmtpAccount {
            provider: provider.to_owned(),
            endpoints,
            client_id,
            credentials,
            smtp: sendbox_mail::smtp::SmtpSettings {
                host: a.smtp_host.clone().unwrap_or(host),
                port,
                security,
                mailbox,
                max_connections: a.max_connections.unwrap_or(default_conns),
                timeout: std::time::Duration::from_secs(a.timeout_secs.unwrap_or(30)),
                ca_file: a.ca_file.as_ref().map(|c| cx.resolve_path(c)),
            },
        })),
        fingerprint: SecretHash::default(),
    })
}

/// What an account's credentials resolved to, for its fingerprint only
/// (hashed, never kept or shown).
fn secret_material(kind: &AccountKind) -> String {
    use sendbox_auth::Credentials;
    match kind {
        AccountKind::File { .. } => String::new(),
        AccountKind::Smtp(a) => match &a.credentials {
            Credentials::ClientSecret(s) => s.expose().to_owned(),
            Credentials::Certificate(k) => k.thumbprint_s256().to_owned(),
            Credentials::RefreshToken { client_secret, .. } => client_secret
                .as_ref()
                .map(|s| s.expose().to_owned())
                .unwrap_or_default(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<String> {
        parse(Path::new("sendbox.toml"), src).unwrap_err().errors
    }

    const PLUGIN: &str = "[accounts.a]\nprovider = \"file\"\nmailbox = \"a@b.c\"\ndir = \"m\"\n\
                          [plugins.p]\nwasm = \"p.wasm\"\naccount = \"a\"\n";

    #[test]
    fn unauthenticated_routes_stay_on_loopback_unless_loudly_allowed() {
        let open = format!("{PLUGIN}[plugins.p.webhook]\npath = \"/h\"\nunauthenticated = true\n");
        let public = format!("[daemon]\nlisten = \"0.0.0.0:8025\"\n{open}");
        let e = errors(&public);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].contains("`plugins.p.webhook.unauthenticated`"),
            "{e:?}"
        );
        assert!(
            e[0].contains("dangerously_allow_unauthenticated_webhooks_on_public_address"),
            "{e:?}"
        );
        for listen in ["127.0.0.1:8025", "[::1]:8025", "localhost:8025"] {
            let local = format!("[daemon]\nlisten = \"{listen}\"\n{open}");
            assert!(parse(Path::new("s.toml"), &local).is_ok(), "{listen}");
        }
        let allowed = public.replace(
            "[daemon]\n",
            "[daemon]\ndangerously_allow_unauthenticated_webhooks_on_public_address = true\n",
        );
        assert!(parse(Path::new("s.toml"), &allowed).is_ok());
    }

    #[test]
    fn signature_schemes_are_checked() {
        // SAFETY: tests in this module set only their own variable.
        unsafe { std::env::set_var("SENDBOX_CONFIG_TEST_WHSEC", "whsec_c2VjcmV0IGtleQ==") };
        let route = |extra: &str| {
            format!(
                "{PLUGIN}[plugins.p.webhook]\npath = \"/h\"\nsecret = {{ env = \"SENDBOX_CONFIG_TEST_WHSEC\" }}\n{extra}"
            )
        };
        let c = parse(
            Path::new("s.toml"),
            &route("scheme = \"standard-webhooks\"\ntolerance_secs = 60\n"),
        )
        .unwrap();
        let w = c.plugins["p"].webhook.as_ref().unwrap();
        assert_eq!(
            w.auth,
            sendbox_triggers::webhook::Auth::StandardWebhooks {
                secret: b"secret key".to_vec()
            }
        );
        assert_eq!(w.replay.tolerance, std::time::Duration::from_secs(60));
        let e = errors(&route("scheme = \"hmac-md5\"\n"));
        assert!(e[0].contains("`plugins.p.webhook.scheme`"), "{e:?}");
        let e = errors(&route("scheme = \"stripe\"\ndedupe_header = \"X-Id\"\n"));
        assert!(e[0].contains("belong to the `github` scheme"), "{e:?}");
        let c = parse(
            Path::new("s.toml"),
            &route("dedupe_header = \"X-GitHub-Delivery\"\n"),
        )
        .unwrap();
        let w = c.plugins["p"].webhook.as_ref().unwrap();
        assert_eq!(w.replay.dedupe_header.as_deref(), Some("x-github-delivery"));
    }

    #[test]
    fn unknown_keys_name_file_line_and_column() {
        let e = errors(
            "[accounts.a]\nprovider = \"file\"\nmailbox = \"a@b.c\"\ndir = \"m\"\ncolour = 1\n",
        );
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("sendbox.toml:"), "{e:?}");
        assert!(e[0].contains("unknown field `colour`"), "{e:?}");
    }

    #[test]
    fn inline_secrets_are_refused_with_the_fix() {
        let e = errors(
            "[accounts.m]\nprovider = \"microsoft365\"\nmailbox = \"a@b.c\"\ntenant = \"t\"\nclient_id = \"id\"\nclient_secret = \"hunter2\"\n",
        );
        assert!(
            e[0].starts_with("sendbox.toml:6:17: `accounts.m.client_secret`"),
            "{e:?}"
        );
        assert!(e[0].contains("{ file ="), "{e:?}");
        assert!(!e[0].contains("hunter2"));
    }

    #[test]
    fn inline_secret_opt_in_is_warned_about() {
        let c = parse(
            Path::new("s.toml"),
            "[accounts.m]\nprovider = \"microsoft365\"\nmailbox = \"a@b.c\"\ntenant = \"t\"\nclient_id = \"id\"\nclient_secret = \"hunter2\"\nallow_inline_secret = true\n",
        )
        .unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(!c.warnings[0].contains("hunter2"));
        assert!(
            !format!("{c:?}").contains("hunter2"),
            "Debug hides the secret"
        );
    }

    #[test]
    fn trigger_errors_point_at_the_key() {
        let e = errors(concat!(
            "[accounts.local]\nprovider = \"file\"\nmailbox = \"a@b.c\"\ndir = \"mail\"\n",
            "[plugins.p]\nwasm = \"p.wasm\"\naccount = \"local\"\n",
            "[plugins.p.webhook]\npath = \"hooks\"\nunauthenticated = true\n",
            "[[plugins.p.watch]]\nname = \"in\"\ndir = \"in\"\nexclude = [\"[\"]\n",
            "[[plugins.p.schedule]]\nname = \"s\"\ncron = \"0 8 * *\"\n",
            "[[plugins.p.schedule]]\nname = \"t\"\ncron = \"0 8 * * *\"\ntimezone = \"Mars/Base\"\ncatch_up = \"always\"\n",
        ));
        let has = |at: &str, key: &str| e.iter().any(|l| l.starts_with(at) && l.contains(key));
        assert!(
            has("sendbox.toml:9:8:", "`plugins.p.webhook.path`"),
            "{e:?}"
        );
        assert!(
            has("sendbox.toml:14:11:", "`plugins.p.watch[0].exclude`"),
            "{e:?}"
        );
        assert!(
            has("sendbox.toml:17:8:", "`plugins.p.schedule[0].cron`"),
            "{e:?}"
        );
        assert!(
            has("sendbox.toml:21:12:", "`plugins.p.schedule[1].timezone`"),
            "{e:?}"
        );
        assert!(
            has("sendbox.toml:22:12:", "`plugins.p.schedule[1].catch_up`"),
            "{e:?}"
        );
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let e = errors(
            "[accounts.a]\nprovider = \"nope\"\nmailbox = \"x\"\nclient_id = \"i\"\nclient_secret = { env = \"SENDBOX_UNSET_FOR_TEST\" }\n\n[plugins.p]\nwasm = \"p.wasm\"\naccount = \"missing\"\n",
        );
        assert!(
            e.iter().any(|l| l.contains("`accounts.a.mailbox`")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.contains("`plugins.p.account`: no account named \"missing\"")),
            "{e:?}"
        );
    }

    #[test]
    fn microsoft365_preset_fills_endpoints_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "x\n").unwrap();
        let cfg = format!(
            "[accounts.m]\nprovider = \"microsoft365\"\nmailbox = \"a@contoso.com\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"id\"\nclient_secret = {{ file = \"{}\" }}\n",
            dir.path().join("s").display()
        );
        let c = parse(Path::new("s.toml"), &cfg).unwrap();
        let AccountKind::Smtp(s) = &c.accounts["m"].kind else {
            panic!()
        };
        assert_eq!(s.smtp.host, "smtp.office365.com");
        assert_eq!(s.smtp.port, 587);
        assert_eq!(s.smtp.max_connections, 3);
        assert_eq!(
            s.endpoints.scopes,
            ["https://outlook.office365.com/.default"]
        );
        assert!(
            s.endpoints
                .token_url
                .contains("/contoso.onmicrosoft.com/oauth2/v2.0/token")
        );
    }
}

#[cfg(test)]
mod example_files {
    use super::*;

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name)
    }

    #[test]
    fn every_example_config_loads() {
        // SAFETY: set once, before anything reads them, in this test binary.
        unsafe {
            std::env::set_var("M365_CLIENT_SECRET", "example-secret");
            std::env::set_var("GOOGLE_CLIENT_SECRET", "example-secret");
        }
        let m365 = load(&example("microsoft365-app-only.toml")).unwrap();
        let AccountKind::Smtp(a) = &m365.accounts["alerts"].kind else {
            panic!()
        };
        assert_eq!(a.smtp.host, "smtp.office365.com");
        assert!(matches!(a.credentials, Credentials::ClientSecret(_)));

        let delegated = load(&example("microsoft365-delegated.toml")).unwrap();
        let AccountKind::Smtp(a) = &delegated.accounts["alerts"].kind else {
            panic!()
        };
        assert_eq!(
            a.endpoints.scopes,
            ["https://outlook.office.com/SMTP.Send", "offline_access"]
        );
        assert!(
            a.endpoints
                .device_url
                .as_deref()
                .unwrap()
                .ends_with("/devicecode")
        );

        let quick = load(&example("quickstart.toml")).unwrap();
        assert_eq!(quick.plugins.len(), 3);
        assert!(matches!(
            quick.accounts["local"].kind,
            AccountKind::File { .. }
        ));
        assert_eq!(quick.plugins["file-alert"].watches.len(), 1);
        assert_eq!(quick.plugins["daily-digest"].schedules.len(), 1);
        assert_eq!(
            quick.plugins["webhook-bridge"].webhook_path.as_deref(),
            Some("/hooks/alerts")
        );

        let gmail = load(&example("gmail.toml")).unwrap();
        let AccountKind::Smtp(a) = &gmail.accounts["gmail"].kind else {
            panic!()
        };
        assert_eq!(a.smtp.host, "smtp.gmail.com");
        assert_eq!(a.endpoints.scopes, ["https://mail.google.com/"]);
        assert!(matches!(
            a.credentials,
            Credentials::RefreshToken {
                client_secret: Some(_),
                ..
            }
        ));
    }
}
