//! `[daemon]`: where sendbox listens and keeps its outbox, the webhook
//! server's caps and timeouts, retention.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::secrets::secret_bytes;

use super::*;

/// `[daemon]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    /// Where compiled plugin code is cached, e.g. `"var/cache"`. Default:
    /// `$XDG_CACHE_HOME/sendbox` or `~/.cache/sendbox`.
    pub cache_dir: Option<PathBuf>,
    /// The outbox: a SQLite file, relative to this file (default
    /// `"var/sendbox.db"`), or a PostgreSQL database several nodes share,
    /// `"postgres://USER@HOST:PORT/DATABASE"` (no password here: see
    /// `[daemon.postgres]`).
    pub store: Option<PathBuf>,
    /// A folder of drop-in plugins, relative to this file, e.g.
    /// `"/etc/sendbox/plugins.d"`: each `NAME.toml` there holds what a
    /// `[plugins.NAME]` section would (`account`, `config`, `policy`,
    /// `limits`, `webhook`, `watch`, `schedule`), and its component is
    /// `NAME.wasm` beside it. Adding, changing or removing a pair is picked
    /// up by the running daemon like an edit of this file.
    pub plugins_dir: Option<PathBuf>,
    /// `[daemon.postgres]`: how this node uses a `postgres://` store.
    pub postgres: Option<Spanned<RawPostgres>>,
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
    /// Most bytes of webhook request bodies held at once, over every
    /// connection (a body is read before its signature can be checked);
    /// a request past it is answered `503` with `Retry-After`. At least
    /// every route's `max_body_bytes`. Default 67108864 (64 MiB).
    pub webhook_max_held_body_bytes: Option<usize>,
    /// Most bytes of plugin outcomes (emails, webhook answers, state
    /// writes) held at once while they wait for their commit, over every
    /// plugin. A route's slot (`concurrency`) is let go once its plugin has
    /// run, so requests waiting for the commit do not hold one; their
    /// outcomes are held here instead, and a run past it waits, slot in
    /// hand, for earlier ones to commit. An outcome larger than this waits
    /// for all of it. Default 268435456 (256 MiB).
    pub max_held_outcome_bytes: Option<u64>,
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

/// `[daemon.postgres]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgres {
    /// The role's password, by reference (`{ env = "..." }` or
    /// `{ file = "..." }`); none for `trust` or `peer` authentication.
    pub password: Option<Spanned<RawSecretRef>>,
    /// This node's name, written on the messages it holds and shown by
    /// `sendbox check` on every node. Unique per node. Default: the host
    /// name.
    pub node: Option<String>,
    /// Connections this node keeps to the database. Default 8.
    pub pool: Option<usize>,
    /// Seconds a message this node claimed stays its own without being
    /// renewed (renewed every third of it while the node lives); a node
    /// that dies has its messages sent by another after this. Default 60.
    pub lease_secs: Option<u64>,
}

/// A `postgres://` store, validated.
#[derive(Clone)]
pub struct PostgresStore {
    /// The connection URL, without a password.
    pub url: String,
    /// The password, if the role needs one.
    pub password: Option<sendbox_auth::Secret>,
    /// This node's name.
    pub node: String,
    /// Connections to keep.
    pub pool: usize,
    /// A claimed message's lease.
    pub lease: std::time::Duration,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("node", &self.node)
            .field("pool", &self.pool)
            .field("lease", &self.lease)
            .finish()
    }
}

/// Whether `store` names a PostgreSQL database rather than a file.
pub fn is_postgres_url(store: &Path) -> bool {
    let s = store.to_string_lossy();
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// This machine's host name (the default node name).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "sendbox".into())
}

/// Validates a `postgres://` store and its `[daemon.postgres]` table.
pub(super) fn postgres_store(
    cx: &mut Ctx<'_>,
    url: &str,
    raw: Option<Spanned<RawPostgres>>,
) -> Option<PostgresStore> {
    let offset = raw.as_ref().map_or(0, |r| r.span().start);
    let raw = raw.map(Spanned::into_inner).unwrap_or_default();
    let authority = url
        .split_once("://")
        .map_or("", |(_, rest)| rest.split(['/', '?']).next().unwrap_or(""));
    if authority
        .rsplit_once('@')
        .is_some_and(|(user, _)| user.contains(':'))
    {
        cx.error(
            0,
            "daemon.store",
            "the URL holds a password: remove it, and give it by reference as              `[daemon.postgres] password = { env = \"...\" }` (or `{ file = \"...\" }`)",
        );
        return None;
    }
    // TLS parameters (`sslmode`, `sslrootcert`): checked, and the CA file
    // read, now rather than at the first connection.
    if let Err(e) = sendbox_outbox::PgAddress::check(url) {
        cx.error(0, "daemon.store", &e);
        return None;
    }
    let password = match &raw.password {
        Some(r) => {
            let only_form = !cx.resolve_secrets;
            cx.resolve_secrets |= cx.resolve_store_secret;
            let bytes = secret_bytes(cx, r.span().start, "daemon.postgres.password", r.get_ref());
            cx.resolve_secrets = !only_form;
            let bytes = bytes?;
            Some(sendbox_auth::Secret::new(
                String::from_utf8_lossy(&bytes).trim().to_owned(),
            ))
        }
        None => None,
    };
    if raw.pool == Some(0) {
        cx.error(offset, "daemon.postgres.pool", "must be at least 1");
        return None;
    }
    if raw.lease_secs.is_some_and(|s| s < 3) {
        cx.error(
            offset,
            "daemon.postgres.lease_secs",
            "must be at least 3 (leases are renewed every third of it)",
        );
        return None;
    }
    Some(PostgresStore {
        url: url.to_owned(),
        password,
        node: raw.node.unwrap_or_else(host_name),
        pool: raw.pool.unwrap_or(8),
        lease: std::time::Duration::from_secs(raw.lease_secs.unwrap_or(60)),
    })
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

/// Whether a listen address only takes connections from this machine.
pub(super) fn is_loopback(listen: &str) -> bool {
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
    Ok(if store.is_absolute() || is_postgres_url(&store) {
        store
    } else {
        path.parent().unwrap_or(Path::new(".")).join(store)
    })
}
