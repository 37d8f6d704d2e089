//! Delivery workers, one per account, built from the config.

use std::sync::Arc;
use std::time::Duration;

use sendbox_delivery::{AccountWorker, AllowedFrom, DeliverySettings};
use sendbox_outbox::Outbox;

use super::setup::transport;

/// An account's delivery worker (not started): its transport and its
/// settings from the config; with the account's token provider, if it has
/// one.
pub fn account_worker(
    account: crate::config::AccountConfig,
    outbox: &Arc<Outbox>,
    allowed_from: &AllowedFrom,
) -> anyhow::Result<(AccountWorker, Option<Arc<sendbox_auth::TokenProvider>>)> {
    let (name, mailbox) = (account.name.clone(), account.mailbox.clone());
    let defaults = DeliverySettings::default();
    // One send per connection the account may open.
    let concurrency = match &account.kind {
        crate::config::AccountKind::Smtp(a) => a.smtp.max_connections.max(1) as usize,
        crate::config::AccountKind::File { .. } => defaults.concurrency,
    };
    let settings = DeliverySettings {
        rate_per_minute: account.rate_per_minute,
        concurrency,
        max_age: Duration::from_secs(u64::from(account.max_age_hours) * 3600),
        allowed_from: allowed_from.clone(),
        ..defaults
    };
    let (t, tokens) = transport(account)?;
    let worker = AccountWorker::new(&name, &mailbox, t, outbox.clone(), settings);
    Ok((worker, tokens))
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
    outbox: &Arc<Outbox>,
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
