//! Retention: finished work deleted in batches, every hour.

use sendbox_outbox::{AnyStore, Store};

/// How often finished work past its retention is deleted.
pub const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Prunes the outbox now and then every `period`, in batches that never
/// hold up commits for long.
pub async fn prune_every(
    period: std::time::Duration,
    outbox: AnyStore,
    retention: crate::config::Retention,
) {
    let mut ticks = tokio::time::interval(period);
    loop {
        ticks.tick().await;
        match outbox
            .prune(retention.before(sendbox_outbox::now_ms()))
            .await
        {
            Ok(p) if p.messages + p.idempotency_keys > 0 => {
                tracing::info!(
                    messages = p.messages,
                    idempotency_keys = p.idempotency_keys,
                    "outbox pruned"
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot prune the outbox; will try again"),
            _ => {}
        }
    }
}
