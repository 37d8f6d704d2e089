//! Delivery workers, one per account, built from the config.

use std::sync::Arc;
use std::time::Duration;

use sendbox_delivery::{AccountWorker, AllowedFrom, DeliverySettings};
use sendbox_outbox::AnyStore;

use super::setup::transport;

/// An account's delivery worker (not started): its transport and its
/// settings from the config; with the account's token provider, if it has
/// one.
pub fn account_worker(
    account: crate::config::AccountConfig,
    outbox: &AnyStore,
    allowed_from: &AllowedFrom,
) -> anyhow::Result<(AccountWorker, Option<Arc<sendbox_auth::TokenProvider>>)> {
    let (name, mailbox) = (account.name.clone(), account.mailbox.clone());
    let settings = delivery_settings(&account, allowed_from);
    let (t, tokens) = transport(account)?;
    let worker = AccountWorker::new(&name, &mailbox, t, outbox.clone(), settings);
    Ok((worker, tokens))
}

/// How an account's worker delivers, from its config: one send per
/// connection the account may open, its rate and its maximum age.
fn delivery_settings(
    account: &crate::config::AccountConfig,
    allowed_from: &AllowedFrom,
) -> DeliverySettings {
    let defaults = DeliverySettings::default();
    let concurrency = match &account.kind {
        crate::config::AccountKind::Smtp(a) => a.smtp.max_connections.max(1) as usize,
        crate::config::AccountKind::File { .. } => defaults.concurrency,
    };
    DeliverySettings {
        rate_per_minute: account.rate_per_minute,
        concurrency,
        max_age: Duration::from_secs(u64::from(account.max_age_hours) * 3600),
        allowed_from: allowed_from.clone(),
        ..defaults
    }
}

/// Runs `worker` until `stop` turns true.
pub async fn run_worker(worker: AccountWorker, mut stop: tokio::sync::watch::Receiver<bool>) {
    worker
        .run(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
}

/// Starts one delivery worker per account; they stop when `stop` turns
/// true.
pub fn start_workers(
    accounts: std::collections::BTreeMap<String, crate::config::AccountConfig>,
    outbox: &AnyStore,
    allowed_from: &AllowedFrom,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinSet<()>> {
    let mut workers = tokio::task::JoinSet::new();
    for account in accounts.into_values() {
        let (worker, _) = account_worker(account, outbox, allowed_from)?;
        workers.spawn(run_worker(worker, stop.clone()));
    }
    Ok(workers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_smtp_account_sends_on_as_many_connections_as_it_may_open() {
        let account = |extra: &str| {
            let src = format!(
                "[accounts.m]\nprovider = \"microsoft365\"\nmailbox = \"a@b.c\"\ntenant = \"t\"\n\
                 client_id = \"id\"\nclient_secret = \"s\"\nallow_inline_secret = true\n{extra}"
            );
            let mut cfg = crate::config::parse(std::path::Path::new("sendbox.toml"), &src).unwrap();
            cfg.accounts.remove("m").unwrap()
        };
        let s = delivery_settings(&account(""), &AllowedFrom::default());
        assert_eq!(
            (s.concurrency, s.rate_per_minute),
            (3, Some(30)),
            "Exchange's limits"
        );
        let s = delivery_settings(
            &account("max_connections = 5\nrate_per_minute = 600\nmax_age_hours = 2\n"),
            &AllowedFrom::default(),
        );
        assert_eq!(s.concurrency, 5);
        assert_eq!(s.rate_per_minute, Some(600));
        assert_eq!(s.max_age, Duration::from_secs(7200));
    }
}
