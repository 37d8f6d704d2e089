//! What the outbox stores and answers, whatever the backend: a plugin
//! call to commit, messages and their states, audit entries, what a commit
//! or a prune did, and the errors (none of which exposes the backend's
//! driver).

use std::path::PathBuf;

use sendbox_types::{Email, ReadSet, StateChange};
use serde::Serialize;

use crate::Policy;

/// A failure of the store itself, as the backend described it (the
/// backend's own error type stays inside the backend).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct StorageError(pub String);

/// Why the outbox refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The outcome breaks the plugin's policy; nothing of it was stored.
    #[error("policy: {0}")]
    Policy(String),
    /// The store failed (disk full, unwritable file, corruption...).
    /// Nothing of the call was stored.
    #[error("outbox storage: {0}")]
    Storage(StorageError),
    /// The database file cannot be used.
    #[error("outbox {path}: {message}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
    /// The schema is from a newer sendbox.
    #[error("outbox schema: {0}")]
    Schema(String),
    /// The writer thread has stopped.
    #[error("the outbox is shut down")]
    Closed,
    /// No such message.
    #[error("no message with id {0}")]
    NotFound(i64),
    /// Plugin state the call read changed before it could commit (another
    /// event of the same plugin committed first). Nothing of the call was
    /// stored; run the event again on fresh state.
    #[error("plugin state changed meanwhile: {0}")]
    Conflict(String),
    /// Another live process delivers from this database.
    #[error(
        "{path} is in use by {holder}: only one `sendbox run` or `sendbox deliver` may use an \
         outbox at a time (stop that one, or give this one its own `[daemon] store`)"
    )]
    Locked {
        /// The database.
        path: PathBuf,
        /// Who holds it, as that process wrote it (pid, command, since).
        holder: String,
    },
    /// The message is not in a state this change may move it from (e.g. a
    /// worker's result for a message the operator retried or dropped).
    #[error("message {id} is {state}, not {expected}")]
    WrongState {
        /// The message.
        id: i64,
        /// Its state now.
        state: String,
        /// What the change expected.
        expected: String,
    },
}

/// Everything one successful plugin call wants done.
#[derive(Debug, Clone, Default)]
pub struct Call {
    /// The plugin's name.
    pub plugin: String,
    /// `file`, `webhook`, `schedule` or `cli`.
    pub trigger: String,
    /// The event's id, for the audit trail.
    pub event_id: String,
    /// The account the emails go out through.
    pub account: String,
    /// That account's mailbox (the default From; Message-ID domain).
    pub account_mailbox: String,
    /// The plugin's policy.
    pub policy: Policy,
    /// The emails to queue.
    pub emails: Vec<Email>,
    /// The state writes to apply.
    pub state_changes: Vec<StateChange>,
    /// What the call read from plugin state: if any of it changed since,
    /// the commit is refused with [`OutboxError::Conflict`].
    pub reads: ReadSet,
    /// The plugin's state quota in bytes: a commit that would grow its
    /// state past it is refused with [`OutboxError::Conflict`] (the quota
    /// was checked against state that changed meanwhile). `None`: no check.
    pub state_quota_bytes: Option<u64>,
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Queued {
    /// The outbox row id (what `sendbox outbox show ID` takes).
    pub id: i64,
    /// The Message-ID it will carry on every attempt.
    pub message_id: String,
}

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Committed {
    /// Newly queued messages.
    pub queued: Vec<Queued>,
    /// Emails skipped because their idempotency key was seen before; the
    /// earlier message's id is given.
    pub duplicates: Vec<Queued>,
    /// Recipients removed because they are on the suppression list.
    pub suppressed: Vec<String>,
}

/// A message's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Waiting for its first attempt.
    Queued,
    /// Claimed by a delivery worker.
    Sending,
    /// Accepted by the server.
    Sent,
    /// Waiting for another attempt.
    Retry,
    /// Given up on.
    Dead,
}

impl State {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Sending => "sending",
            State::Sent => "sent",
            State::Retry => "retry",
            State::Dead => "dead",
        }
    }
    pub(crate) fn parse(s: &str) -> State {
        match s {
            "queued" => State::Queued,
            "sending" => State::Sending,
            "sent" => State::Sent,
            "retry" => State::Retry,
            _ => State::Dead,
        }
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "queued" | "sending" | "sent" | "retry" | "dead" => Ok(State::parse(s)),
            _ => Err(format!(
                "unknown state {s:?}: use queued, sending, sent, retry or dead"
            )),
        }
    }
}

/// A message as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// Row id.
    pub id: i64,
    /// Message-ID.
    pub message_id: String,
    /// Plugin.
    pub plugin: String,
    /// Trigger kind.
    pub trigger: String,
    /// Event id.
    pub event_id: String,
    /// Account.
    pub account: String,
    /// State.
    pub state: State,
    /// Attempts so far.
    pub attempts: u32,
    /// When the next attempt is due (ms since epoch).
    pub next_attempt_ms: i64,
    /// When it was queued (ms since epoch).
    pub created_ms: i64,
    /// Recipients, comma-separated.
    pub recipients: String,
    /// The last server reply or failure.
    pub last_reply: Option<String>,
    /// The email itself.
    pub email: Email,
}

/// A delivery attempt's result for a message in `sending`, as recorded by
/// [`Store::mark_many`](crate::Store::mark_many).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    /// The message's row id.
    pub id: i64,
    /// Its new state.
    pub to: State,
    /// When the next attempt is due, for `queued`/`retry` (ms since epoch);
    /// `None` keeps the current value.
    pub next_attempt_ms: Option<i64>,
    /// The server's reply or the reason, kept as `last_reply` and in the
    /// audit trail.
    pub detail: String,
    /// Whether it was attempted. `false` for a message handed back before
    /// its turn (the account paused meanwhile): the attempt its claim
    /// counted is taken back, so `attempts` counts only real attempts.
    pub attempted: bool,
}

/// One entry of a message's audit trail.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// When (ms since epoch).
    pub at_ms: i64,
    /// From state (none for the enqueue).
    pub from: Option<String>,
    /// To state.
    pub to: String,
    /// The server's reply or the reason.
    pub detail: Option<String>,
}

/// Cutoffs for [`Outbox::prune`](crate::Outbox::prune), in ms since the epoch: what last changed
/// before them goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneBefore {
    /// `sent` messages.
    pub sent_ms: i64,
    /// `dead` messages.
    pub dead_ms: i64,
    /// Idempotency keys.
    pub idempotency_ms: i64,
}

/// What [`Outbox::prune`](crate::Outbox::prune) deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Messages, with their audit rows.
    pub messages: u64,
    /// Idempotency keys.
    pub idempotency_keys: u64,
}
