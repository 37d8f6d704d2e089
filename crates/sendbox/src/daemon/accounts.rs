//! The supervisor's accounts: one delivery worker per account, replaced
//! only once a changed account's new credentials prove they work.

use std::collections::BTreeMap;

use tokio::sync::watch;

use super::supervisor::Supervisor;
use super::workers::{account_worker, run_worker};
use crate::config;

/// How long a changed account's new credentials may take to get a token.
const TOKEN_CHECK: std::time::Duration = std::time::Duration::from_secs(30);

/// What [`Supervisor::apply_accounts`] did.
#[derive(Debug, Default)]
pub struct AccountsApplied {
    /// Accounts whose worker (re)started.
    pub restarted: Vec<String>,
    /// Accounts that could not be built, with why.
    pub failed: Vec<(String, String)>,
}

/// A running delivery worker.
pub(super) struct RunningAccount {
    pub(super) fingerprint: config::SecretHash,
    pub(super) mailbox: String,
    pub(super) stop: watch::Sender<bool>,
    /// Ends the worker's pause now.
    pub(super) resume: std::sync::Arc<tokio::sync::Notify>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

impl RunningAccount {
    /// Stops claiming, and waits for the sends in flight.
    pub(super) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl Supervisor {
    /// Makes the running delivery workers match `accounts`: an account that
    /// is new or changed (its section, or a secret it resolves) gets a new
    /// worker once the old one has finished its sends; one that cannot be
    /// built keeps its old worker (if any) and is reported.
    pub async fn apply_accounts(
        &mut self,
        accounts: BTreeMap<String, config::AccountConfig>,
    ) -> AccountsApplied {
        let mut applied = AccountsApplied::default();
        let gone: Vec<String> = self
            .accounts
            .keys()
            .filter(|n| !accounts.contains_key(*n))
            .cloned()
            .collect();
        for (name, account) in accounts {
            if self
                .accounts
                .get(&name)
                .is_some_and(|r| r.fingerprint == account.fingerprint)
            {
                continue;
            }
            let (mailbox, fingerprint) = (account.mailbox.clone(), account.fingerprint.clone());
            // Registered with the metrics only once it replaces the running
            // worker: a change that fails leaves that worker's counters.
            let built = account_worker(account, &self.outbox, &self.allowed_from);
            let checked = match built {
                Ok((worker, Some(tokens))) if self.accounts.contains_key(&name) => {
                    // A changed account proves its new credentials before it
                    // replaces one that works.
                    match tokio::time::timeout(TOKEN_CHECK, tokens.token()).await {
                        Ok(Ok(_)) => Ok((worker, Some(tokens))),
                        Ok(Err(e)) => Err(anyhow::anyhow!("the new credentials were refused: {e}")),
                        Err(_) => Err(anyhow::anyhow!(
                            "the token endpoint did not answer within {TOKEN_CHECK:?}"
                        )),
                    }
                }
                other => other,
            };
            let worker = match checked {
                Ok((w, tokens)) => {
                    if let Some(t) = tokens {
                        self.metrics.token_provider(&name, t);
                    }
                    self.metrics.worker(&name, w.status());
                    w
                }
                Err(e) => {
                    if self.accounts.contains_key(&name) {
                        tracing::error!(account = %name, error = %e, "account not changed: the new settings do not work; the running worker keeps sending");
                    } else {
                        tracing::error!(account = %name, error = %e, "account not started");
                    }
                    applied.failed.push((name, e.to_string()));
                    continue;
                }
            };
            if let Some(old) = self.accounts.remove(&name) {
                tracing::info!(account = %name, "account changed: its worker restarts after the sends in flight");
                old.stop().await;
            }
            let (stop, rx) = watch::channel(false);
            self.wakers.set(&name, worker.waker());
            let resume = worker.resumer();
            let task = tokio::spawn(run_worker(worker, rx));
            self.accounts.insert(
                name.clone(),
                RunningAccount {
                    fingerprint,
                    mailbox,
                    stop,
                    resume,
                    task,
                },
            );
            applied.restarted.push(name);
        }
        for name in gone {
            if let Some(old) = self.accounts.remove(&name) {
                tracing::warn!(account = %name, "account removed from the config: its worker stops; messages queued for it wait until it is configured again");
                self.wakers.remove(&name);
                old.stop().await;
            }
        }
        applied
    }

    /// Stops every delivery worker after its sends in flight.
    pub async fn stop_delivery(&mut self) {
        for (_, a) in self.accounts.drain() {
            a.stop().await;
        }
    }
}
