//! What several commands need before they do anything: the config loaded,
//! the tokio runtime, an account's transport, the outbox opened, locked
//! and recovered.

use std::collections::HashMap;
use std::sync::Arc;

use sendbox_auth::TokenProvider;
use sendbox_mail::Transport;
use sendbox_mail::file::FileTransport;
use sendbox_mail::smtp::SmtpTransport;
use sendbox_outbox::{AnyStore, Outbox, PgOutbox, Store};

use crate::config::{self, AccountConfig, AccountKind, Config};
use crate::exit::{self, coded};

/// Loads the config, turning errors into exit code 78.
pub fn load_config(path: &std::path::Path) -> anyhow::Result<Config> {
    config::load(path).map_err(|e| coded(exit::EX_CONFIG, e.to_string()))
}

pub fn token_provider(
    account: &str,
    a: config::SmtpAccount,
) -> anyhow::Result<(Arc<TokenProvider>, sendbox_mail::smtp::SmtpSettings)> {
    let provider = TokenProvider::new(account, a.endpoints, &a.client_id, a.credentials)
        .map_err(|e| coded(exit::EX_CONFIG, format!("account `{account}`: {e}")))?;
    Ok((Arc::new(provider), a.smtp))
}

/// Builds the transport for an account.
pub fn transport(
    account: AccountConfig,
) -> anyhow::Result<(Transport, Option<Arc<TokenProvider>>)> {
    match account.kind {
        AccountKind::File { dir } => Ok((
            Transport::File(
                FileTransport::new(dir).map_err(|e| coded(exit::EX_CONFIG, e.to_string()))?,
            ),
            None,
        )),
        AccountKind::Smtp(a) => {
            let (tokens, settings) = token_provider(&account.name, *a)?;
            let smtp = SmtpTransport::new(settings, tokens.clone())
                .map_err(|e| coded(exit::EX_CONFIG, format!("account `{}`: {e}", account.name)))?;
            Ok((Transport::Smtp(Box::new(smtp)), Some(tokens)))
        }
    }
}

/// The most worker threads `TOKIO_WORKER_THREADS` may ask for.
const MAX_WORKER_THREADS: usize = 1024;

/// The tokio runtime every async command uses: one worker per core this
/// process may run on (its CPU affinity and cgroup quota count), or as many
/// as `TOKIO_WORKER_THREADS` says. `/metrics` shows the number
/// (`sendbox_worker_threads`).
pub fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = match std::env::var_os("TOKIO_WORKER_THREADS") {
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        Some(asked) => {
            worker_threads(&asked.to_string_lossy()).map_err(|e| coded(exit::EX_CONFIG, e))?
        }
    };
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

/// `TOKIO_WORKER_THREADS` read as a number of threads, or why not (tokio
/// itself would panic on a bad value).
fn worker_threads(asked: &str) -> Result<usize, String> {
    match asked.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_WORKER_THREADS).contains(&n) => Ok(n),
        _ => Err(format!(
            "TOKIO_WORKER_THREADS={asked:?}: expected a whole number of worker threads \
             from 1 to {MAX_WORKER_THREADS}; unset it for one per core"
        )),
    }
}

/// Opens the outbox the config names — its SQLite file, or the shared
/// PostgreSQL database as this node — and requeues what a previous run
/// left in `sending` (on PostgreSQL: this node's, and any node's whose
/// lease expired).
pub async fn open_and_recover(cfg: &Config, holder: &str) -> anyhow::Result<AnyStore> {
    let outbox: AnyStore = match &cfg.postgres {
        None => {
            Arc::new(Outbox::open(&cfg.store).map_err(|e| coded(exit::EX_SOFTWARE, e.to_string()))?)
                .into()
        }
        Some(pg) => PgOutbox::connect(
            &pg.url,
            pg.password.as_ref().map(sendbox_auth::Secret::expose),
            &pg.node,
            pg.pool,
            pg.lease,
        )
        .await
        .map_err(|e| coded(exit::EX_TEMPFAIL, e.to_string()))?
        .into(),
    };
    // SQLite: one delivering process per database (a second would requeue
    // the first one's messages in flight and send them twice). PostgreSQL:
    // this node registers; leases keep the nodes apart.
    outbox
        .lock_for_delivery(holder)
        .await
        .map_err(|e| coded(exit::EX_TEMPFAIL, e.to_string()))?;
    let recovered = outbox
        .recover()
        .await
        .map_err(|e| coded(exit::EX_SOFTWARE, e.to_string()))?;
    if recovered > 0 {
        tracing::warn!(
            recovered,
            "requeued messages left in `sending` by the previous run"
        );
    }
    Ok(outbox)
}

/// Each plugin's allowed From addresses, for message building.
pub fn allowed_from(cfg: &crate::config::Config) -> HashMap<String, Vec<String>> {
    cfg.plugins
        .values()
        .map(|p| (p.name.clone(), p.policy.allowed_from.clone()))
        .chain(listener_senders(cfg))
        .collect()
}

/// Each SMTP listener's allowed From addresses, by `listener:NAME`.
pub fn listener_senders(cfg: &crate::config::Config) -> HashMap<String, Vec<String>> {
    cfg.listeners
        .values()
        .map(|l| (l.source(), l.policy.allowed_from.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_takes_a_number_in_range_and_names_the_variable_otherwise() {
        assert_eq!(worker_threads("3"), Ok(3));
        assert_eq!(worker_threads(" 1 "), Ok(1));
        assert_eq!(worker_threads("1024"), Ok(1024));
        for bad in [
            "",
            "0",
            "-1",
            "two",
            "1.5",
            "1025",
            "99999999999999999999999",
        ] {
            let e = worker_threads(bad).unwrap_err();
            assert!(
                e.contains("TOKIO_WORKER_THREADS") && e.contains("1 to 1024"),
                "{bad}: {e}"
            );
        }
    }
}
