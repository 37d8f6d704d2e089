//! What one attempt's result means for the message and the account: the
//! [`Mark`] to record and whether to pause. Pure decisions and their log
//! lines; no I/O.

use std::time::Duration;

use sendbox_mail::{Receipt, SendError};
use sendbox_outbox::{Mark, Message, State, now_ms};

use crate::{DeliverySettings, WorkerStatus, backoff};

/// How one attempt ended.
pub(crate) enum Attempt {
    Sent(Receipt),
    Failed(SendError),
    Unbuildable(String),
}

impl Attempt {
    /// Whether the server (or the token endpoint) answered for the account
    /// as a whole: anything but a refusal of the account itself shows the
    /// account works.
    pub(crate) fn reached_the_account(&self) -> bool {
        match self {
            Attempt::Sent(_) => true,
            Attempt::Failed(e) => !e.pauses_account(),
            Attempt::Unbuildable(_) => false,
        }
    }
}

/// The mark for a claimed message that was not attempted.
pub(crate) fn released(m: &Message, why: &str) -> Mark {
    Mark {
        id: m.id,
        to: State::Queued,
        next_attempt_ms: Some(now_ms()),
        detail: why.to_owned(),
        attempted: false,
    }
}

/// Decides what `attempt` means for `m` (call inside the message's span):
/// the mark to record, and a pause reason when the account must stop.
pub(crate) fn settle(
    settings: &DeliverySettings,
    status: &WorkerStatus,
    m: &Message,
    attempt: Attempt,
) -> (Mark, Option<String>) {
    let (to, next_attempt_ms, detail, pause) = match attempt {
        Attempt::Sent(receipt) => {
            tracing::info!(reply = %receipt.reply, refused = receipt.refused.len(), "sent");
            let mut detail = receipt.reply;
            // A refused recipient fails only itself, on record.
            for r in &receipt.refused {
                tracing::warn!(recipient = %r.address, error = %r.error, "recipient refused; the others got the message");
                detail.push_str(&format!("; refused {}: {}", r.address, r.error));
            }
            (State::Sent, None, detail, None)
        }
        Attempt::Unbuildable(reason) => {
            tracing::warn!(%reason, "message cannot be built; dead");
            (State::Dead, None, reason, None)
        }
        Attempt::Failed(e) if e.pauses_account() => {
            tracing::error!(error = %e, "account refused; message requeued");
            (
                State::Queued,
                Some(now_ms()),
                format!("account paused: {e}"),
                Some(e.to_string()),
            )
        }
        Attempt::Failed(e) if e.is_permanent() => {
            tracing::warn!(error = %e, "permanent failure; dead");
            (State::Dead, None, e.to_string(), None)
        }
        Attempt::Failed(e) => {
            let age = Duration::from_millis((now_ms() - m.created_ms).max(0) as u64);
            if age >= settings.max_age {
                tracing::warn!(error = %e, ?age, "still failing after max_age; dead");
                let detail = format!("gave up after {age:?}: {e}");
                (State::Dead, None, detail, None)
            } else {
                let wait = backoff(settings, m.attempts, &m.message_id);
                tracing::info!(error = %e, retry_in = ?wait, "transient failure; will retry");
                let next = now_ms() + wait.as_millis() as i64;
                (State::Retry, Some(next), e.to_string(), None)
            }
        }
    };
    status.count(match (to, &pause) {
        (_, Some(_)) => "account_refused",
        (State::Sent, _) => "sent",
        (State::Dead, _) => "dead",
        _ => "retry",
    });
    let mark = Mark {
        id: m.id,
        to,
        next_attempt_ms,
        detail,
        attempted: true,
    };
    (mark, pause)
}
