//! The one writer thread: every write runs there, and the commits and
//! delivery results waiting together are grouped into one transaction
//! (each call in its own savepoint) that pays one fsync — so a group of
//! results never makes the commits behind it wait for an fsync of its own.

use std::sync::mpsc;

use rusqlite::{Connection, TransactionBehavior};

use super::{commit, transition_in};
use crate::{Call, Committed, Mark, OutboxError, State, StorageError};

pub(super) type Reply<T> = mpsc::SyncSender<Result<T, OutboxError>>;

/// A write run on the writer thread's connection.
pub(super) type WriteFn = Box<dyn FnOnce(&mut Connection) -> Result<(), OutboxError> + Send>;

pub(super) enum Write {
    Commit(Box<Call>, CommitReply),
    /// Delivery results: each mark's own answer, or the group's failure.
    Marks(Vec<Mark>, Reply<Vec<Result<(), OutboxError>>>),
    Run(WriteFn),
}

/// Where a commit's result goes: a blocked thread or an awaiting task.
pub(super) enum CommitReply {
    Blocking(Reply<Committed>),
    Async(tokio::sync::oneshot::Sender<Result<Committed, OutboxError>>),
}

impl CommitReply {
    pub(super) fn send(self, r: Result<Committed, OutboxError>) {
        match self {
            CommitReply::Blocking(tx) => {
                let _ = tx.send(r);
            }
            CommitReply::Async(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// Largest group of calls committed in one transaction.
pub(super) const MAX_GROUP: usize = 512;

pub(super) fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let mut commits = Vec::new();
        let mut marks = Vec::new();
        let mut others = Vec::new();
        for w in batch {
            match w {
                Write::Commit(c, r) => commits.push((c, r)),
                Write::Marks(m, r) => marks.push((m, r)),
                Write::Run(f) => others.push(f),
            }
        }
        if !commits.is_empty() || !marks.is_empty() {
            commit_group(&mut conn, commits, marks);
        }
        for f in others {
            let _ = f(&mut conn);
        }
    }
}

/// Commits a group of calls and delivery results in one transaction, each
/// call in its own savepoint so a policy refusal drops only that call (a
/// refused mark writes nothing, so it needs none).
fn commit_group(
    conn: &mut Connection,
    group: Vec<(Box<Call>, CommitReply)>,
    marks: Vec<(Vec<Mark>, Reply<Vec<Result<(), OutboxError>>>)>,
) {
    let mut results: Vec<Result<Committed, OutboxError>> = Vec::with_capacity(group.len());
    let mut answers: Vec<Vec<Result<(), OutboxError>>> = Vec::with_capacity(marks.len());
    let outcome = (|| -> Result<(), OutboxError> {
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (call, _) in &group {
            let mut sp = tx.savepoint()?;
            match commit::apply(&sp, call) {
                Ok(done) => {
                    sp.commit()?;
                    results.push(Ok(done));
                }
                // A storage failure (disk full, I/O) may already have rolled
                // the whole transaction back: fail the group with it.
                Err(e @ OutboxError::Storage(_)) => return Err(e),
                Err(e) => {
                    sp.rollback()?;
                    drop(sp);
                    results.push(Err(e));
                }
            }
        }
        for (group_marks, _) in &marks {
            let mut these = Vec::with_capacity(group_marks.len());
            for m in group_marks {
                let answer = transition_in(
                    &tx,
                    m.id,
                    &[State::Sending],
                    m.to,
                    m.next_attempt_ms,
                    &m.detail,
                );
                if let Err(e @ OutboxError::Storage(_)) = answer {
                    return Err(e);
                }
                these.push(answer);
            }
            answers.push(these);
        }
        Ok(tx.commit()?)
    })();
    match outcome {
        Ok(()) => {
            for ((_, reply), r) in group.into_iter().zip(results) {
                reply.send(r);
            }
            for ((_, reply), a) in marks.into_iter().zip(answers) {
                let _ = reply.send(Ok(a));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, calls = group.len(), results = marks.len(), "outbox write failed; nothing of these calls or results was stored");
            let failed = || match &e {
                OutboxError::Storage(s) => OutboxError::Storage(s.clone()),
                other => OutboxError::Storage(StorageError(other.to_string())),
            };
            for (_, reply) in group {
                reply.send(Err(failed()));
            }
            for (_, reply) in marks {
                let _ = reply.send(Err(failed()));
            }
        }
    }
}
