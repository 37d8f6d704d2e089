//! An account's pause on a store several nodes share: one pause for the
//! cluster, and one probe per recheck for the cluster, not one per node.
//!
//! The node that is refused records the pause (when, why) in the store.
//! Every node then waits until that pause's recheck is due; the first to
//! take the probe ([`Store::take_pause_probe`]) moves the pause's time to
//! now — the others wait again — and tries one message. If it goes
//! through, that node clears the pause and every node carries on; if it is
//! refused, the pause is recorded afresh. A node that dies while paused
//! leaves a pause whose recheck passes: the next node takes the probe.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use sendbox_outbox::{Store, now_ms};

use crate::AccountWorker;

/// Another node's pause is read again at least this often, so a pause
/// cleared early (its probe went through) is noticed soon.
const LOOK_AGAIN: Duration = Duration::from_secs(2);

impl AccountWorker {
    /// Waits while the account is paused in the store; returns `true` when
    /// this node may go on (no pause, or it took the probe, or an operator
    /// resumed it), `false` at shutdown.
    pub(crate) async fn wait_out_the_clusters_pause<F: Future>(
        &self,
        mut shutdown: Pin<&mut F>,
    ) -> bool {
        let resumed = self.resume.notified();
        tokio::pin!(resumed);
        resumed.as_mut().enable();
        let recheck_ms = self
            .settings
            .pause_recheck
            .as_millis()
            .min(i64::MAX as u128) as i64;
        loop {
            let paused = match self.outbox.paused_accounts().await {
                Ok(all) => all.into_iter().find(|(a, _, _)| *a == self.account),
                Err(e) => {
                    tracing::warn!(account = %self.account, error = %e, "cannot read whether the account is paused; going on");
                    None
                }
            };
            let Some((_, since_ms, reason)) = paused else {
                self.status.set(None);
                return true;
            };
            let left = since_ms.saturating_add(recheck_ms).saturating_sub(now_ms());
            if left <= 0 {
                match self.outbox.take_pause_probe(&self.account, since_ms).await {
                    Ok(true) => {
                        tracing::info!(account = %self.account, "account pause over: this node tries one message");
                        self.status.set(None);
                        return true;
                    }
                    // Another node took it: its probe decides.
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(account = %self.account, error = %e, "cannot take the paused account's probe; looking again");
                    }
                }
            }
            self.status.set(Some(reason));
            let wait = if left <= 0 {
                LOOK_AGAIN
            } else {
                Duration::from_millis(left as u64).min(LOOK_AGAIN)
            };
            tokio::select! {
                _ = &mut shutdown => return false,
                _ = tokio::time::sleep(wait) => {}
                _ = &mut resumed => {
                    tracing::info!(account = %self.account, "account resumed by a reload: trying one message");
                    self.status.set(None);
                    return true;
                }
            }
        }
    }
}
