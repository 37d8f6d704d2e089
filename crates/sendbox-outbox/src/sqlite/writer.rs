//! The one writer thread: every write runs there, and the commits, delivery
//! results and claims waiting together are grouped into one transaction
//! (a refused call writes nothing; a claim runs in its own savepoint; the
//! commits that arrive while the group's own are applied join it) that
//! pays one fsync — and a group with no commit in it pays none (see
//! `SyncLevel`) — so delivery's writes never make the commits behind
//! them wait for fsyncs of their own.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use rusqlite::Connection;

use super::checkpoint::CatchUp;
use super::rates::RateCounts;
use super::{Claim, claim_in, commit, take_back_attempt, transition_in};
use crate::{Committed, Mark, Message, OutboxError, State, StorageError};

pub(super) type Reply<T> = mpsc::SyncSender<Result<T, OutboxError>>;

/// A write run on the writer thread's connection, or told why it cannot
/// run (and answering for itself either way).
pub(super) type WriteFn = Box<dyn FnOnce(Result<&mut Connection, OutboxError>) + Send>;

pub(super) enum Write {
    Commit(Box<commit::Prepared>, Answer<Committed>),
    /// Delivery results: each mark's own answer, or the group's failure.
    Marks(Vec<Mark>, Answer<Vec<Result<(), OutboxError>>>),
    /// A delivery worker's claim.
    Claim(Claim, Answer<Vec<Message>>),
    Run(WriteFn),
    /// A test's look at the connection, run at once (see `Outbox::peek`).
    #[cfg(test)]
    Peek(WriteFn),
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

/// Groups with a commit in them (one fsync each) and the commits they
/// held, counted by the writer.
#[derive(Default)]
pub(super) struct SyncedGroups {
    groups: AtomicU64,
    commits: AtomicU64,
}

impl SyncedGroups {
    fn add(&self, commits: usize) {
        self.groups.fetch_add(1, Ordering::Relaxed);
        self.commits.fetch_add(commits as u64, Ordering::Relaxed);
    }

    pub(super) fn read(&self) -> (u64, u64) {
        (
            self.groups.load(Ordering::Relaxed),
            self.commits.load(Ordering::Relaxed),
        )
    }
}

pub(super) fn writer_loop(
    mut conn: Connection,
    rx: mpsc::Receiver<Write>,
    catch_up: CatchUp,
    synced: &SyncedGroups,
) {
    let mut rates = RateCounts::default();
    // The connection opens with `synchronous = FULL`.
    let mut sync = SyncLevel { full: true };
    let mut arrivals = Arrivals {
        rx,
        deferred: VecDeque::new(),
    };
    while let Some(first) = arrivals.wait() {
        catch_up.finish_on_writer(&conn);
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match arrivals.next() {
                Some(w) => batch.push(w),
                None => break,
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
                #[cfg(test)]
                Write::Peek(f) => f(Ok(&mut conn)),
            }
        }
        if !group.is_empty() {
            // Only a commit is acknowledged to someone who was promised
            // durability; see `SyncLevel`.
            let durable = !group.commits.is_empty();
            let level_set = sync.set(&conn, durable);
            let commits = write_group(
                &conn,
                group,
                &mut rates,
                durable && !level_set,
                &mut arrivals,
            );
            if durable {
                synced.add(commits);
            }
        }
        // An operator's change (retry, drop, pause, ...) is kept durably,
        // or not made: answered as a group with commits would be.
        let durable = others.is_empty() || sync.set(&conn, true);
        for f in others {
            // It may drop or prune messages: counts cannot follow.
            rates.forget();
            if durable {
                f(Ok(&mut conn));
            } else {
                f(Err(sync_failed()));
            }
        }
    }
}

/// The writer's queue, and the writes it took off it while a group was
/// being written but left for the next group (everything but commits; see
/// [`Arrivals::join_late_commits`]), first in first out.
struct Arrivals {
    rx: mpsc::Receiver<Write>,
    deferred: VecDeque<Write>,
}

impl Arrivals {
    /// The next write, waiting for one; `None` once every sender is gone.
    fn wait(&mut self) -> Option<Write> {
        self.deferred.pop_front().or_else(|| self.rx.recv().ok())
    }

    /// The next write if there is one now.
    fn next(&mut self) -> Option<Write> {
        self.deferred
            .pop_front()
            .or_else(|| self.rx.try_recv().ok())
    }

    /// Commits that arrived while the group's own were being applied join
    /// it, up to [`MAX_GROUP`]; any other write waits for the next group.
    /// A group's replies go out only after its fsync, so the calls they
    /// wake reach the queue just after the writer has taken the next
    /// group: without this they would wait for all of that group's cycle
    /// (statements, sync) before theirs began.
    fn join_late_commits(&mut self, commits: &mut Vec<(Box<commit::Prepared>, Answer<Committed>)>) {
        while commits.len() < MAX_GROUP {
            match self.rx.try_recv() {
                Ok(Write::Commit(c, r)) => commits.push((c, r)),
                Ok(other) => self.deferred.push_back(other),
                Err(_) => break,
            }
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

/// Whether the writer's connection syncs the WAL at each commit, changed
/// only when a group needs the other level: claims and delivery results
/// alone are written without an fsync (a crash of sendbox loses nothing,
/// the OS has the pages; a power cut loses at most what came after the
/// last fsync — the next commit's, or the checkpointer's within 100 ms — and
/// a claim that is lost leaves its message queued, a result that is lost
/// sends it again with the same Message-ID, as after any crash), a group
/// with a commit in it pays one. Setting the level is a `PRAGMA` that
/// SQLite parses again at every run, so a run of groups of one kind does
/// not pay it at each group. In WAL mode the two levels differ only in
/// that sync: checkpoints and a new WAL's header are synced at both.
struct SyncLevel {
    full: bool,
}

impl SyncLevel {
    /// Sets the level; `false` if it could not be changed (and stays as
    /// it was).
    fn set(&mut self, conn: &Connection, full: bool) -> bool {
        if self.full == full {
            return true;
        }
        let sql = if full {
            "PRAGMA synchronous = FULL"
        } else {
            "PRAGMA synchronous = NORMAL"
        };
        match run(conn, sql) {
            Ok(()) => {
                self.full = full;
                true
            }
            // Left as it was: FULL stays FULL (never less durable); a
            // failed switch back to FULL fails the group, or the
            // operator's writes, that needed it, and is tried again at
            // the next.
            Err(e) => {
                tracing::error!(error = %e, "{sql} failed");
                false
            }
        }
    }
}

/// Runs one statement that returns no rows, prepared once per connection:
/// what begins and ends a group runs a few times per group, and rusqlite's
/// `Transaction`, `Savepoint` and `pragma_update` parse their SQL each time.
fn run(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Why a write that must be synced was not made.
fn sync_failed() -> OutboxError {
    OutboxError::Storage(StorageError(
        "the database cannot be set to sync at commit (PRAGMA synchronous = FULL failed)".into(),
    ))
}

/// A group's transaction: rolled back when dropped before [`GroupTx::commit`]
/// (a failure on the way), as rusqlite's `Transaction` would be.
struct GroupTx<'c>(&'c Connection);

impl<'c> GroupTx<'c> {
    fn begin(conn: &'c Connection) -> rusqlite::Result<Self> {
        run(conn, "BEGIN IMMEDIATE")?;
        Ok(GroupTx(conn))
    }

    fn commit(self) -> rusqlite::Result<()> {
        let r = run(self.0, "COMMIT");
        // A failed COMMIT leaves the transaction open: dropping rolls it back.
        if r.is_ok() {
            std::mem::forget(self);
        }
        r
    }

    /// Runs `f` in a savepoint of its own, kept when it returns `Ok` and
    /// undone when it returns `Err` (the transaction goes on either way).
    fn savepoint<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, OutboxError>,
    ) -> Result<Result<T, OutboxError>, OutboxError> {
        run(self.0, "SAVEPOINT one")?;
        let r = f(self.0);
        if r.is_err() {
            run(self.0, "ROLLBACK TO one")?;
        }
        run(self.0, "RELEASE one")?;
        Ok(r)
    }
}

impl std::ops::Deref for GroupTx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.0
    }
}

impl Drop for GroupTx<'_> {
    fn drop(&mut self) {
        // An I/O failure may already have rolled it back.
        if !self.0.is_autocommit() {
            let _ = run(self.0, "ROLLBACK");
        }
    }
}

/// Writes a group in one transaction, with the commits that join it
/// meanwhile, and says how many commits it held. A refused call or mark
/// writes nothing, so it needs no savepoint; a claim runs in its own, so
/// an unreadable row fails only that claim; a storage failure fails the
/// group, as does `not_durable` (its commits could not be synced).
fn write_group(
    conn: &Connection,
    mut group: Group,
    rates: &mut RateCounts,
    not_durable: bool,
    arrivals: &mut Arrivals,
) -> usize {
    let mut committed: Vec<Result<Committed, OutboxError>> =
        Vec::with_capacity(group.commits.len());
    let mut marked: Vec<Vec<Result<(), OutboxError>>> = Vec::with_capacity(group.marks.len());
    let mut claimed: Vec<Result<Vec<Message>, OutboxError>> =
        Vec::with_capacity(group.claims.len());
    let outcome = (|| -> Result<(), OutboxError> {
        if not_durable {
            return Err(sync_failed());
        }
        let tx = GroupTx::begin(conn)?;
        // Read before the first commit with a rate limit (no other
        // connection can commit while this transaction holds the lock).
        let mut rates_current = false;
        // No recipient is looked up while the list is empty (no other
        // process can add to it while this transaction holds the lock).
        let any_suppressed = !group.commits.is_empty()
            && tx
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM suppressions)")?
                .query_row([], |r| r.get::<_, bool>(0))?;
        // What the group queues and moves, counted once for all of it.
        let mut counts = super::Moves::default();
        let mut next = 0;
        while let Some((prepared, _)) = group.commits.get_mut(next) {
            next += 1;
            let p = &prepared.call.policy;
            if !rates_current && (p.emails_per_hour.is_some() || p.emails_per_day.is_some()) {
                rates.begin_group(&tx)?;
                rates_current = true;
            }
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
            if next == group.commits.len() {
                arrivals.join_late_commits(&mut group.commits);
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
                )
                .and_then(|()| {
                    if !m.attempted {
                        take_back_attempt(&tx, m.id)?;
                    }
                    Ok(())
                });
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
            claimed.push(tx.savepoint(|c| claim_in(c, claim))?);
        }
        Ok(tx.commit()?)
    })();
    let Group {
        commits,
        marks,
        claims,
    } = group;
    let held = commits.len();
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
    held
}

#[cfg(test)]
mod tests {
    use crate::Outbox;
    use crate::behaviour::{call, email};

    /// The writer connection's `synchronous` level: 2 FULL, 1 NORMAL.
    fn synchronous(o: &Outbox) -> i64 {
        o.peek(|c| Ok(c.pragma_query_value(None, "synchronous", |r| r.get(0))?))
            .unwrap()
    }

    #[test]
    fn commits_and_operators_writes_are_synced_and_claims_and_results_alone_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.db")).unwrap();
        assert_eq!(synchronous(&o), 2, "FULL from the start");
        o.claim("alerts", 10).unwrap();
        o.mark_many(vec![]).unwrap();
        assert_eq!(synchronous(&o), 1, "claims and results: no fsync");
        o.claim("alerts", 10).unwrap();
        assert_eq!(synchronous(&o), 1, "and it stays so for the next");
        assert_eq!(o.synced_groups(), (0, 0), "claims and results: none");
        o.commit(call(vec![email("a@x.org", "s")], vec![])).unwrap();
        assert_eq!(synchronous(&o), 2, "a commit is synced");
        assert_eq!(o.synced_groups(), (1, 1), "one synced group of one commit");
        o.claim("alerts", 10).unwrap();
        assert_eq!(synchronous(&o), 1);
        o.write(|_| Ok(())).unwrap();
        assert_eq!(synchronous(&o), 2, "an operator's write is synced");
    }

    /// Makes SQLite refuse (or, with `false`, allow again) every
    /// `PRAGMA synchronous` on the writer's connection: an authorizer, and
    /// the statements already prepared forgotten so the next is prepared
    /// (and refused) anew.
    fn refuse_sync_changes(o: &Outbox, refuse: bool) {
        use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
        o.peek(move |c| {
            if refuse {
                c.authorizer(Some(|ctx: AuthContext<'_>| match ctx.action {
                    AuthAction::Pragma {
                        pragma_name: "synchronous",
                        ..
                    } => Authorization::Deny,
                    _ => Authorization::Allow,
                }));
            } else {
                c.authorizer(None::<fn(AuthContext<'_>) -> Authorization>);
            }
            c.flush_prepared_statement_cache();
            Ok(())
        })
        .unwrap();
    }

    /// Messages stored, counted by an operator's write.
    fn messages(o: &Outbox) -> Result<i64, crate::OutboxError> {
        o.write(|c| Ok(c.query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))?))
    }

    #[test]
    fn when_the_writer_cannot_sync_commits_and_operators_writes_fail_and_claims_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.db")).unwrap();
        o.claim("alerts", 10).unwrap();
        assert_eq!(synchronous(&o), 1, "NORMAL after a claim");
        refuse_sync_changes(&o, true);

        let committed = o.commit(call(vec![email("a@x.org", "s")], vec![]));
        let err = committed.expect_err("a commit that cannot be synced fails");
        assert!(
            err.to_string().contains("synchronous = FULL failed"),
            "{err}"
        );
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let written = o.write(move |_| {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        });
        let err = written.expect_err("an operator's write that cannot be synced fails");
        assert!(
            err.to_string().contains("synchronous = FULL failed"),
            "{err}"
        );
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "and is not run"
        );
        assert_eq!(o.synced_groups(), (1, 1), "the commit's group was tried");
        assert!(o.claim("alerts", 10).is_ok(), "claims need no sync: go on");
        let err = messages(&o).expect_err("still refused while the level cannot be raised");
        assert!(
            err.to_string().contains("synchronous = FULL failed"),
            "{err}"
        );

        refuse_sync_changes(&o, false);
        assert_eq!(
            messages(&o).unwrap(),
            0,
            "nothing of the failed commit was stored"
        );
        assert_eq!(synchronous(&o), 2, "raised again at the next write");
        o.commit(call(vec![email("a@x.org", "s")], vec![]))
            .expect("and commits go through again");
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

    #[test]
    fn a_groups_transaction_and_savepoints_run_prepared_statements() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.db")).unwrap();
        for limit in 1..=5 {
            o.claim("alerts", limit).unwrap();
        }
        let runs = o
            .write(|c| {
                let mut runs = Vec::new();
                for sql in ["BEGIN IMMEDIATE", "SAVEPOINT one", "RELEASE one", "COMMIT"] {
                    let st = c.prepare_cached(sql)?;
                    runs.push(st.get_status(rusqlite::StatementStatus::Run));
                }
                Ok(runs)
            })
            .unwrap();
        assert_eq!(
            runs,
            [5, 5, 5, 5],
            "one prepared statement each, run per claim"
        );
        assert!(
            o.write(|c| Ok(c.is_autocommit())).unwrap(),
            "no transaction is left open"
        );
    }

    /// A commit for the queue, and where its answer would go.
    fn queued_commit() -> super::Write {
        let prepared = super::commit::Prepared::new(call(vec![email("a@x.org", "s")], vec![]));
        let (tx, _rx) = tokio::sync::oneshot::channel();
        super::Write::Commit(Box::new(prepared), super::Answer::Async(tx))
    }

    fn is_run(w: &super::Write) -> bool {
        matches!(w, super::Write::Run(_))
    }

    #[test]
    fn commits_that_arrive_during_a_group_join_it_and_other_writes_wait_their_turn() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut arrivals = super::Arrivals {
            rx,
            deferred: Default::default(),
        };
        let mut group = Vec::new();
        tx.send(queued_commit()).unwrap();
        tx.send(super::Write::Run(Box::new(|_| {}))).unwrap();
        tx.send(queued_commit()).unwrap();
        arrivals.join_late_commits(&mut group);
        assert_eq!(group.len(), 2, "both commits joined the group");
        assert_eq!(arrivals.deferred.len(), 1, "the operator's write waits");
        // What waited comes before anything that arrived after it.
        tx.send(queued_commit()).unwrap();
        assert!(arrivals.next().as_ref().is_some_and(is_run));
        assert!(matches!(arrivals.next(), Some(super::Write::Commit(..))));
        assert!(arrivals.next().is_none());

        // A full group takes no more.
        let mut full: Vec<_> = (0..super::MAX_GROUP)
            .map(|_| match queued_commit() {
                super::Write::Commit(c, r) => (c, r),
                _ => unreachable!(),
            })
            .collect();
        tx.send(queued_commit()).unwrap();
        arrivals.join_late_commits(&mut full);
        assert_eq!(full.len(), super::MAX_GROUP);
        assert!(
            matches!(arrivals.wait(), Some(super::Write::Commit(..))),
            "left for the next group"
        );
    }

    #[test]
    fn every_commit_of_a_busy_queue_is_answered_once_whatever_group_it_joined() {
        let dir = tempfile::tempdir().unwrap();
        let o = std::sync::Arc::new(Outbox::open(&dir.path().join("o.db")).unwrap());
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let o = o.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|i| {
                            let done = o
                                .commit(call(vec![email("a@x.org", &format!("{t}-{i}"))], vec![]))
                                .unwrap();
                            done.queued.len()
                        })
                        .sum::<usize>()
                })
            })
            .collect();
        let answered: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(answered, 16 * 50);
        assert_eq!(messages(&o).unwrap(), 16 * 50, "each stored once");
        let (groups, commits) = o.synced_groups();
        assert_eq!(commits, 16 * 50, "every commit synced in a group");
        assert!(
            groups < commits,
            "16 callers share groups ({groups} for {commits})"
        );
    }
}
