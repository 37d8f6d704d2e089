//! Commits that wait together are written together: one transaction for a
//! group of calls (each in a savepoint of its own, so a refused or failed
//! call leaves the others), one round trip for its locks, one WAL flush
//! for all of it. A call that arrives alone and takes no lock is committed
//! as it is.
//!
//! A few runner tasks (half the pool) take what is waiting, up to
//! [`MAX_GROUP`] calls, each on one pool connection. A group never waits on
//! a lock: it tries every lock its calls need at once, and the calls whose
//! locks another transaction holds (another node's commit of that key, a
//! plugin run alone on another node) are set aside while their group goes
//! on — so one busy key or plugin never holds up the calls of others.
//! Calls set aside for the same busy locks wait for them together, in one
//! transaction on one connection that takes all their locks; at most all
//! but two of the pool's connections (one, on a smaller pool) wait on
//! locks at once, and the pool serves its callers in turn, so however many
//! calls wait on a lock held for long (another node's run of a plugin, a
//! node that died holding one until the server notices), the node's other
//! commits, claims and results still get a connection.
//!
//! A caller that stops waiting does not take its call back: it is
//! committed or refused like the others of its group, as SQLite's writer
//! does.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;
use tokio_postgres::types::Type;

use super::pool::Statements;
use super::{Pool, commit, pg_err};
use crate::{Call, Committed, OutboxError, StorageError};

/// Most calls in one group: each is a subtransaction, and PostgreSQL keeps
/// the ids of at most 64 of a transaction's subtransactions where other
/// sessions' snapshots look.
pub(super) const MAX_GROUP: usize = 32;

type Answer = oneshot::Sender<Result<Committed, OutboxError>>;

/// The calls waiting to be committed, and the runners taking them.
pub(super) struct Commits {
    queue: Mutex<Queue>,
    max_runners: usize,
    /// Connections that may wait on locks held elsewhere at once.
    waiters: Arc<tokio::sync::Semaphore>,
    groups: AtomicU64,
    grouped: AtomicU64,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<(Call, Answer)>,
    runners: usize,
}

impl Commits {
    /// For a pool of `pool_size` connections: half of them may be
    /// committing groups at once, all but two waiting on locks; the pool
    /// serves claims, results and reads in turn with them.
    pub(super) fn new(pool_size: usize) -> Arc<Commits> {
        let max_runners = (pool_size / 2).max(1);
        Arc::new(Commits {
            queue: Mutex::default(),
            max_runners,
            waiters: Arc::new(tokio::sync::Semaphore::new(
                pool_size.saturating_sub(2).max(1),
            )),
            groups: AtomicU64::new(0),
            grouped: AtomicU64::new(0),
        })
    }

    /// Transactions that committed calls, and the calls they committed.
    pub(super) fn counts(&self) -> (u64, u64) {
        (
            self.groups.load(Ordering::Relaxed),
            self.grouped.load(Ordering::Relaxed),
        )
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts a transaction that stored `stored` calls.
    fn count(&self, stored: usize) {
        if stored > 0 {
            self.groups.fetch_add(1, Ordering::Relaxed);
            self.grouped.fetch_add(stored as u64, Ordering::Relaxed);
        }
    }

    /// Queues the call and waits for its group's answer.
    pub(super) async fn commit(
        self: &Arc<Self>,
        pool: &Arc<Pool>,
        call: Call,
    ) -> Result<Committed, OutboxError> {
        let (answer, answered) = oneshot::channel();
        let start_runner = {
            let mut q = self.queue();
            q.waiting.push_back((call, answer));
            let start = q.runners < self.max_runners;
            if start {
                q.runners += 1;
            }
            start
        };
        if start_runner {
            tokio::spawn(run(self.clone(), pool.clone()));
        }
        answered.await.unwrap_or_else(|_| {
            Err(storage(
                "the commit stopped before it was answered (the daemon is stopping); \
                 whether the call was stored is not known"
                    .into(),
            ))
        })
    }
}

/// Keeps the runner count right if a runner ends early (a panic): the
/// calls still waiting get a runner of their own.
struct Running(Arc<Commits>, Arc<Pool>);

impl Drop for Running {
    fn drop(&mut self) {
        let restart = {
            let mut q = self.0.queue();
            q.runners -= 1;
            let restart = !q.waiting.is_empty();
            if restart {
                q.runners += 1;
            }
            restart
        };
        if restart {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(run(self.0.clone(), self.1.clone()));
                }
                Err(_) => self.0.queue().runners -= 1,
            }
        }
    }
}

/// Takes groups off the queue until it is empty.
async fn run(commits: Arc<Commits>, pool: Arc<Pool>) {
    let _running = Running(commits.clone(), pool.clone());
    loop {
        let conn = pool.get().await;
        // What waits once the connection is ours joins this group.
        let mut group: Vec<(Call, Answer)> = {
            let mut q = commits.queue();
            let n = q.waiting.len().min(MAX_GROUP);
            q.waiting.drain(..n).collect()
        };
        if group.is_empty() {
            // `Running` counts this runner out, with the queue empty.
            return;
        }
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                for (_, answer) in group {
                    let _ = answer.send(Err(again(&e)));
                }
                continue;
            }
        };
        let calls = group.len() as u64;
        let (client, statements) = conn.parts();
        // A call alone that needs no lock cannot wait on one: it needs no
        // savepoint either.
        let (committed, deferred) = match group.as_slice() {
            [(call, _)] if commit::locks(call).is_empty() => {
                let (call, answer) = group.swap_remove(0);
                let r = alone(client, statements, &call).await;
                (vec![(answer, r)], Vec::new())
            }
            _ => together(client, statements, group, Locks::Try).await,
        };
        drop(conn);
        commits.count(committed.iter().filter(|(_, r)| r.is_ok()).count());
        tracing::trace!(calls, deferred = deferred.len(), "postgres commit group");
        for (answer, r) in committed {
            let _ = answer.send(r);
        }
        // Calls that wait on the same locks wait for them together; the
        // runner goes on with the next group meanwhile.
        for waiting in deferred {
            tokio::spawn(wait_for_locks(commits.clone(), pool.clone(), waiting));
        }
    }
}

/// Commits calls set aside for the same busy locks on one connection once
/// they are free: one call in a transaction of its own, several in one
/// transaction that waits for all their locks.
async fn wait_for_locks(commits: Arc<Commits>, pool: Arc<Pool>, waiting: Waiting) {
    let answer_all = |waiting: Waiting, e: &OutboxError| {
        for (_, answer) in waiting {
            let _ = answer.send(Err(again(e)));
        }
    };
    // The semaphore lives as long as `commits` and is never closed.
    let Ok(_permit) = commits.waiters.clone().acquire_owned().await else {
        answer_all(waiting, &storage("the commit queue closed".into()));
        return;
    };
    let mut conn = match pool.get().await {
        Ok(c) => c,
        Err(e) => return answer_all(waiting, &e),
    };
    let (client, statements) = conn.parts();
    let (committed, left) = match <[_; 1]>::try_from(waiting) {
        Ok([one]) => (Vec::new(), vec![vec![one]]),
        Err(waiting) => together(client, statements, waiting, Locks::Wait).await,
    };
    commits.count(committed.iter().filter(|(_, r)| r.is_ok()).count());
    for (answer, r) in committed {
        let _ = answer.send(r);
    }
    // One call alone, or one the group could not take (a NUL in a key).
    for (call, answer) in left.into_iter().flatten() {
        let r = alone(client, statements, &call).await;
        commits.count(usize::from(r.is_ok()));
        let _ = answer.send(r);
    }
}

/// One call in a transaction of its own, taking its locks as they come
/// free.
pub(super) async fn alone(
    conn: &mut tokio_postgres::Client,
    statements: &mut Statements,
    call: &Call,
) -> Result<Committed, OutboxError> {
    let tx = conn.transaction().await.map_err(pg_err)?;
    // On `Err` the transaction is dropped, which rolls it back.
    let done = commit::apply(&tx, statements, call).await?;
    tx.commit().await.map_err(pg_err)?;
    Ok(done)
}

/// Calls that wait on the same locks, with where each is answered.
type Waiting = Vec<(Call, Answer)>;

/// Calls answered by the group, and calls set aside for their locks, in
/// sets that wait on the same busy locks.
type Outcome = (Vec<(Answer, Result<Committed, OutboxError>)>, Vec<Waiting>);

/// How a group takes its calls' locks.
#[derive(Clone, Copy, PartialEq)]
enum Locks {
    /// Takes those that are free; a call whose locks are not all free is
    /// set aside.
    Try,
    /// Waits for all of them, in the one order every commit takes locks
    /// (`commit::locks`: sorted, the plugin before its keys), so no two
    /// transactions wait on each other in a circle.
    Wait,
}

/// Several calls in one transaction, their locks taken at once as `locks`
/// says. Each call runs in a savepoint, rolled back if it is refused or
/// fails; a failure of the transaction itself (the savepoint, its rollback,
/// the commit) fails every call the group would have stored. A call with a
/// NUL in a lock key (the server refuses it) is set aside to fail alone.
async fn together(
    conn: &mut tokio_postgres::Client,
    statements: &mut Statements,
    group: Vec<(Call, Answer)>,
    locks: Locks,
) -> Outcome {
    let failed = |group: Vec<(Call, Answer)>, e: &OutboxError| -> Outcome {
        let answered = group.into_iter().map(|(_, a)| (a, Err(again(e)))).collect();
        (answered, Vec::new())
    };
    // A key with a NUL byte is refused by the server (text cannot hold
    // one): tried with the others, it would fail the statement that locks
    // them all. Such a call fails alone.
    let (group, refused): (Vec<_>, Vec<_>) = group
        .into_iter()
        .partition(|(c, _)| commit::locks(c).iter().all(|l| !l.contains('\0')));
    let mut deferred: Vec<Vec<_>> = refused.into_iter().map(|c| vec![c]).collect();
    let tx = match conn.transaction().await {
        Ok(tx) => tx,
        Err(e) => {
            let (answered, _) = failed(group, &pg_err(e));
            return (answered, deferred);
        }
    };
    let mut wanted: Vec<String> = group.iter().flat_map(|(c, _)| commit::locks(c)).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let taken: HashSet<String> = if wanted.is_empty() {
        HashSet::new()
    } else if locks == Locks::Wait {
        let taken = match statements
            .get(&tx, commit::LOCK_ALL, &[Type::TEXT_ARRAY])
            .await
        {
            Ok(lock) => tx.execute(&lock, &[&wanted]).await.map_err(pg_err),
            Err(e) => Err(e),
        };
        if let Err(e) = taken {
            let (answered, _) = failed(group, &e);
            return (answered, deferred);
        }
        wanted.into_iter().collect()
    } else {
        // Never waits: a lock held elsewhere is simply not taken.
        match tx
            .query_typed(
                "SELECT k FROM unnest($1::text[]) AS l(k) \
                 WHERE pg_try_advisory_xact_lock(hashtextextended(k, 0))",
                &[(&wanted, Type::TEXT_ARRAY)],
            )
            .await
        {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            // Nothing is written yet: each call is committed alone, and
            // meets whatever failed on its own.
            Err(e) => {
                tracing::debug!(error = %pg_err(e), "a group's locks could not be tried; its calls commit one by one");
                deferred.extend(group.into_iter().map(|c| vec![c]));
                return (Vec::new(), deferred);
            }
        }
    };
    // Calls set aside in sets that wait on the same busy locks.
    let mut ready = Vec::with_capacity(group.len());
    let mut busy: Vec<(Vec<String>, Waiting)> = Vec::new();
    for (call, answer) in group {
        let mut not_taken = commit::locks(&call);
        not_taken.retain(|l| !taken.contains(l));
        if not_taken.is_empty() {
            ready.push((call, answer));
        } else if let Some((_, set)) = busy.iter_mut().find(|(l, _)| *l == not_taken) {
            set.push((call, answer));
        } else {
            busy.push((not_taken, vec![(call, answer)]));
        }
    }
    deferred.extend(busy.into_iter().map(|(_, set)| set));

    let mut results: Vec<Result<Committed, OutboxError>> = Vec::with_capacity(ready.len());
    for (i, (call, _)) in ready.iter().enumerate() {
        let savepoint = if i == 0 {
            "SAVEPOINT one"
        } else {
            "RELEASE SAVEPOINT one; SAVEPOINT one"
        };
        // Sent in this order, in one round trip with the call's first
        // statements.
        let (marked, applied) = tokio::join!(
            biased;
            tx.batch_execute(savepoint),
            commit::apply(&tx, statements, call),
        );
        if let Err(e) = marked {
            let (answered, _) = failed(ready, &pg_err(e));
            return (answered, deferred);
        }
        if applied.is_err()
            && let Err(e) = tx.batch_execute("ROLLBACK TO SAVEPOINT one").await
        {
            let (answered, _) = failed(ready, &pg_err(e));
            return (answered, deferred);
        }
        results.push(applied);
    }
    if let Err(e) = tx.commit().await {
        let e = pg_err(e);
        for r in results.iter_mut() {
            // A refused call stored nothing either way: its reason stands.
            if r.is_ok() {
                *r = Err(again(&e));
            }
        }
    }
    let answered = ready
        .into_iter()
        .zip(results)
        .map(|((_, answer), r)| (answer, r))
        .collect();
    (answered, deferred)
}

fn storage(text: String) -> OutboxError {
    OutboxError::Storage(StorageError(text))
}

/// The same failure, for each call it fails.
fn again(e: &OutboxError) -> OutboxError {
    match e {
        OutboxError::Storage(s) => OutboxError::Storage(s.clone()),
        other => storage(other.to_string()),
    }
}
