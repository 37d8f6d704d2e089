//! `[daemon]`: where sendbox listens and keeps its outbox, the webhook
//! server's caps and timeouts, retention.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::*;

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
    Ok(if store.is_absolute() {
        store
    } else {
        path.parent().unwrap_or(Path::new(".")).join(store)
    })
}
