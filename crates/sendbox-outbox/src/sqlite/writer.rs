//! The one writer thread: every write runs there, and the commits, delivery
//! results and claims waiting together are grouped into one transaction
//! (a refused call writes nothing; a claim runs in its own savepoint) that
//! pays one fsync — and a group with no commit in it pays none (see
//! `commit_group`) — so delivery's writes never make the commits behind
//! them wait for fsyncs of their own.

use std::sync::mpsc;

use rusqlite::{Connection, TransactionBehavior};

use super::checkpoint::CatchUp;
use super::rates::RateCounts;
use super::{Claim, claim_in, commit, transition_in};
use crate::{Committed, Mark, Message, OutboxError, State, StorageError};

pub(super) type Reply<T> = mpsc::SyncSender<Result<T, OutboxError>>;

/// A write run on the writer thread's connection.
pub(super) type WriteFn = Box<dyn FnOnce(&mut Connection) -> Result<(), OutboxError> + Send>;

pub(super) enum Write {
    Commit(Box<commit::Prepared>, Answer<Committed>),
    /// Delivery results: each mark's own answer, or the group's failure.
    Marks(Vec<Mark>, Answer<Vec<Result<(), OutboxError>>>),
    /// A delivery worker's claim.
    Claim(Claim, Answer<Vec<Message>>),
    Run(WriteFn),
}

/// Where a write's result goes: a blocked thread or an awaiting task (which
/// then needs no thread of its own while it waits).
pub(super) enum Answer<T> {
    Blocking(Reply<T>),
    Async(tokio::sync::oneshot::Sender<Result<T, OutboxError>>),
}

impl<T> Answer<T> {
    pub(super) fn send(self, r: Result<T, OutboxError>) {
        match self {
            Answer::Blocking(tx) => {
                let _ = tx.send(r);
            }
            Answer::Async(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// Largest group of calls committed in one transaction.
pub(super) const MAX_GROUP: usize = 512;

pub(super) fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Write>, catch_up: CatchUp) {
    let mut rates = RateCounts::default();
    while let Ok(first) = rx.recv() {
        catch_up.finish_on_writer(&conn);
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let mut group = Group::default();
        let mut others = Vec::new();
        for w in batch {
            match w {
                Write::Commit(c, r) => group.commits.push((c, r)),
                Write::Marks(m, r) => group.marks.push((m, r)),
                Write::Claim(c, r) => group.claims.push((c, r)),
                Write::Run(f) => others.push(f),
            }
        }
        if !group.is_empty() {
            commit_group(&mut conn, group, &mut rates);
        }
        for f in others {
            // It may drop or prune messages: counts cannot follow.
            rates.forget();
            let _ = f(&mut conn);
        }
    }
}

/// Each delivery result of one batch, answered in order.
type MarkResults = Vec<Result<(), OutboxError>>;

/// What goes into one transaction: commits, then delivery results, then
/// claims (which may take what the commits just queued).
#[derive(Default)]
struct Group {
    commits: Vec<(Box<commit::Prepared>, Answer<Committed>)>,
    marks: Vec<(Vec<Mark>, Answer<MarkResults>)>,
    claims: Vec<(Claim, Answer<Vec<Message>>)>,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.commits.is_empty() && self.marks.is_empty() && self.claims.is_empty()
    }
}

/// Writes a group in one transaction (one fsync). A refused call or mark
/// writes nothing, so it needs no savepoint; a claim runs in its own, so
/// an unreadable row fails only that claim; a storage failure fails the
/// group.
fn commit_group(conn: &mut Connection, group: Group, rates: &mut RateCounts) {
    // Only a commit is acknowledged to someone who was promised
    // durability. Claims and results alone are written without an fsync:
    // a crash of sendbox loses nothing (the OS has the pages), and a power
    // cut loses at most what came after the last fsync (the next commit's,
    // or the checkpointer's within 100 ms) — a claim that is lost leaves
    // its message queued, a result that is lost sends it again with the
    // same Message-ID, as after any crash.
    let durable = !group.commits.is_empty();
    if !durable {
        let _ = conn.pragma_update(None, "synchronous", "NORMAL");
    }
    write_group(conn, group, rates);
    if !durable {
        let _ = conn.pragma_update(None, "synchronous", "FULL");
    }
}

fn write_group(conn: &mut Connection, mut group: Group, rates: &mut RateCounts) {
    let mut committed: Vec<Result<Committed, OutboxError>> =
        Vec::with_capacity(group.commits.len());
    let mut marked: Vec<Vec<Result<(), OutboxError>>> = Vec::with_capacity(group.marks.len());
    let mut claimed: Vec<Result<Vec<Message>, OutboxError>> =
        Vec::with_capacity(group.claims.len());
    let outcome = (|| -> Result<(), OutboxError> {
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if group.commits.iter().any(|(prepared, _)| {
            let p = &prepared.call.policy;
            p.emails_per_hour.is_some() || p.emails_per_day.is_some()
        }) {
            rates.begin_group(&tx)?;
        }
        // No recipient is looked up while the list is empty (no other
        // process can add to it while this transaction holds the lock).
        let any_suppressed = !group.commits.is_empty()
            && tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM suppressions)")?
                .query_row([], |r| r.get::<_, bool>(0))?;
        // What the group queues and moves, counted once for all of it.
        let mut counts = super::Moves::default();
        for (prepared, _) in &mut group.commits {
            // No savepoint: a call is refused before its first write (see
            // `commit`), so a refusal leaves nothing to roll back.
            let changes_before = tx.total_changes();
            match commit::apply(&tx, prepared, any_suppressed, rates, &mut counts) {
                Ok(done) => committed.push(Ok(done)),
                // A storage failure (disk full, I/O) may already have rolled
                // the whole transaction back: fail the group with it.
                Err(e @ OutboxError::Storage(_)) => return Err(e),
                // A refusal after a write would leave half a call: never
                // kept — the group fails instead (its callers may retry).
                Err(e) if tx.total_changes() != changes_before => {
                    return Err(OutboxError::Storage(StorageError(format!(
                        "a call was refused after it had written ({e}); nothing of its group was kept"
                    ))));
                }
                Err(e) => committed.push(Err(e)),
            }
        }
        for (marks, _) in &group.marks {
            let mut answers = Vec::with_capacity(marks.len());
            for m in marks {
                let answer = transition_in(
                    &tx,
                    m.id,
                    &[State::Sending],
                    m.to,
                    m.next_attempt_ms,
                    &m.detail,
                    &mut counts,
                );
                if let Err(e @ OutboxError::Storage(_)) = answer {
                    return Err(e);
                }
                answers.push(answer);
            }
            marked.push(answers);
        }
        // Every email queued and result recorded, in one counter update per
        // state.
        counts.apply(&tx)?;
        // A claim that fails (an unreadable row) fails alone; after an I/O
        // failure the rollback or the commit fails, and with it the group.
        for (claim, _) in &group.claims {
            let mut sp = tx.savepoint()?;
            match claim_in(&sp, claim) {
                Ok(messages) => {
                    sp.commit()?;
                    claimed.push(Ok(messages));
                }
                Err(e) => {
                    sp.rollback()?;
                    drop(sp);
                    claimed.push(Err(e));
                }
            }
        }
        Ok(tx.commit()?)
    })();
    let Group {
        commits,
        marks,
        claims,
    } = group;
    match outcome {
        Ok(()) => {
            for ((_, reply), r) in commits.into_iter().zip(committed) {
                reply.send(r);
            }
            for ((_, reply), a) in marks.into_iter().zip(marked) {
                reply.send(Ok(a));
            }
            for ((_, reply), c) in claims.into_iter().zip(claimed) {
                reply.send(c);
            }
        }
        Err(e) => {
            // What the counts learned from this group was rolled back.
            rates.forget();
            tracing::error!(error = %e, calls = commits.len(), results = marks.len(), claims = claims.len(), "outbox write failed; nothing of this group was stored");
            let failed = || match &e {
                OutboxError::Storage(s) => OutboxError::Storage(s.clone()),
                other => OutboxError::Storage(StorageError(other.to_string())),
            };
            for (_, reply) in commits {
                reply.send(Err(failed()));
            }
            for (_, reply) in marks {
                reply.send(Err(failed()));
            }
            for (_, reply) in claims {
                reply.send(Err(failed()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Outbox;

    fn synchronous(o: &Outbox) -> i64 {
        o.write(|c| Ok(c.pragma_query_value(None, "synchronous", |r| r.get(0))?))
            .unwrap()
    }

    #[test]
    fn commits_are_fsynced_again_after_a_group_of_claims_and_results() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.db")).unwrap();
        assert_eq!(synchronous(&o), 2, "FULL");
        o.claim("alerts", 10).unwrap();
        o.mark_many(vec![]).unwrap();
        assert_eq!(synchronous(&o), 2, "back to FULL for the next commit");
    }

    #[test]
    fn a_claim_of_another_size_is_not_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.db")).unwrap();
        // Delivery claims as many as it has room for: the bound LIMIT
        // changes from one claim to the next.
        for limit in [1, 3, 2, 64, 1, 5] {
            o.claim("alerts", limit).unwrap();
        }
        let (runs, recompiled) = o
            .write(|c| {
                let st = c.prepare_cached(&super::super::claim_query())?;
                Ok((
                    st.get_status(rusqlite::StatementStatus::Run),
                    st.get_status(rusqlite::StatementStatus::RePrepare),
                ))
            })
            .unwrap();
        assert_eq!(
            runs, 6,
            "the writer's cached claim statement ran each claim"
        );
        assert_eq!(recompiled, 0, "and was never compiled again");
    }
}
