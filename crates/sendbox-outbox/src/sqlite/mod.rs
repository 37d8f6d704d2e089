//! The SQLite backend: one file in WAL mode with `synchronous = FULL`, one
//! writer thread that group-commits, a reader connection, versioned
//! migrations (`schema`), the commit of a call (`commit`) with the writer's
//! counts of each rate limit's window (`rates`), plugin state
//! (`plugin_state`), each commit's WAL frames written in one call
//! (`wal_writes`), and [`crate::Store`] on `Arc<Outbox>` (`store`).

mod checkpoint;
mod commit;
mod counts;
mod lock;
mod plugin_state;
mod rates;
mod read;
mod schema;
mod store;
mod wal_writes;
mod writer;

use counts::Moves;
use read::{COLUMNS, MESSAGES, row_to_message};
use writer::{Answer, SyncedGroups, Write, WriteFn, writer_loop};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};

use crate::{
    Call, Committed, Mark, Message, OutboxError, PruneBefore, Pruned, State, StorageError, now_ms,
};

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        OutboxError::Storage(StorageError(e.to_string()))
    }
}

/// Rows deleted per transaction by [`Outbox::prune`].
const PRUNE_BATCH: i64 = 1000;
/// One batch of `sent` / `dead` messages past their cutoff.
const PRUNE_SENT: &str = "DELETE FROM messages WHERE id IN (SELECT id FROM messages \
     WHERE state = 'sent' AND updated_ms < ?1 LIMIT ?2)";
const PRUNE_DEAD: &str = "DELETE FROM messages WHERE id IN (SELECT id FROM messages \
     WHERE state = 'dead' AND updated_ms < ?1 LIMIT ?2)";

/// The outbox. Cheap to share behind an `Arc`; all methods block briefly
/// (call them from blocking-capable threads).
pub struct Outbox {
    path: PathBuf,
    /// Held while this process delivers from the database (see
    /// [`Outbox::lock_for_delivery`]).
    delivery_lock: Mutex<Option<std::fs::File>>,
    writer: Mutex<Option<mpsc::SyncSender<Write>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    reader: Mutex<Connection>,
    checkpointer: Mutex<Option<checkpoint::Checkpointer>>,
    /// What the writer's synced groups held, for benchmarks.
    synced: Arc<SyncedGroups>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("path", &self.path).finish()
    }
}

fn open_conn(path: &Path) -> Result<Connection, OutboxError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    // SQLite's own VFS, with each commit's WAL frames written in one call.
    wal_writes::register().map_err(|e| OutboxError::Open {
        path: path.to_owned(),
        message: format!("cannot set up SQLite's file access: {e}"),
    })?;
    let conn =
        Connection::open_with_flags_and_vfs(path, flags, wal_writes::VFS_NAME).map_err(|e| {
            OutboxError::Open {
                path: path.to_owned(),
                message: format!("{e} (check that the folder exists and is writable by sendbox)"),
            }
        })?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Every statement the writer and the reader run stays prepared.
    conn.set_prepared_statement_cache_capacity(64);
    // Plans never look at bound values (no statistics are gathered, and no
    // query matches a bound pattern): otherwise a statement whose `LIMIT ?`
    // takes another value — a claim's, each time — is compiled again.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: the WAL is fsynced at every commit; see the crate docs.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // A claim's savepoint journal stays in memory instead of spilling to
    // a temporary file (a write syscall per page it touches).
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

impl Outbox {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Outbox, OutboxError> {
        Outbox::open_with_catch_up(path, true)
    }

    /// [`Outbox::open`] with the writer finishing the checkpointer's passes
    /// (`true`, as sendbox runs) or not (the benchmark's baseline).
    #[doc(hidden)]
    pub fn open_with_catch_up(path: &Path, catch_up: bool) -> Result<Outbox, OutboxError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            sendbox_fs::private_dir(dir).map_err(|e| OutboxError::Open {
                path: path.to_owned(),
                message: format!("cannot create the folder {}: {e}", dir.display()),
            })?;
        }
        // The database, its WAL and shared-memory files are created 0600
        // whatever the umask: they hold every queued message. SQLite gives
        // its -wal and -shm files the database file's mode.
        sendbox_fs::private_file(path).map_err(|e| OutboxError::Open {
            path: path.to_owned(),
            message: format!("cannot create the database file: {e}"),
        })?;
        let mut writer = open_conn(path)?;
        schema::migrate(&mut writer).map_err(|e| match e {
            OutboxError::Storage(s) => OutboxError::Open {
                path: path.to_owned(),
                message: format!("{s} (is the file writable?)"),
            },
            other => other,
        })?;
        // Checkpoints are the checkpointer's job; the writer's own only a
        // backstop.
        writer.pragma_update(None, "wal_autocheckpoint", checkpoint::BACKSTOP_PAGES)?;
        let reader = open_conn(path)?;
        let catch_up = checkpoint::CatchUp::new(catch_up);
        let checkpointer = checkpoint::Checkpointer::start(path, catch_up.clone())?;
        let (tx, rx) = mpsc::sync_channel::<Write>(4096);
        let synced = Arc::new(SyncedGroups::default());
        let thread = std::thread::Builder::new()
            .name("outbox-writer".into())
            .spawn({
                let synced = synced.clone();
                move || writer_loop(writer, rx, catch_up, &synced)
            })
            .map_err(|e| OutboxError::Open {
                path: path.to_owned(),
                message: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Outbox {
            path: path.to_owned(),
            delivery_lock: Mutex::new(None),
            writer: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            reader: Mutex::new(reader),
            checkpointer: Mutex::new(Some(checkpointer)),
            synced,
        })
    }

    /// How many groups the writer has synced (one fsync each) and how many
    /// commits they held, since it opened: a benchmark's view of group
    /// commit.
    #[doc(hidden)]
    pub fn synced_groups(&self) -> (u64, u64) {
        self.synced.read()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn send(&self, w: Write) -> Result<(), OutboxError> {
        let guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        guard
            .as_ref()
            .ok_or(OutboxError::Closed)?
            .send(w)
            .map_err(|_| OutboxError::Closed)
    }

    /// Commits one plugin call: checks policy, drops suppressed recipients,
    /// skips duplicate idempotency keys, queues the emails and applies the
    /// state writes — all in one transaction, durable when this returns
    /// `Ok`. On `Err` nothing of the call was stored.
    pub fn commit(&self, call: Call) -> Result<Committed, OutboxError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let prepared = Box::new(commit::Prepared::new(call));
        self.send(Write::Commit(prepared, Answer::Blocking(tx)))?;
        rx.recv().map_err(|_| OutboxError::Closed)?
    }

    /// [`Outbox::commit`] for async code: the same commit, awaited without
    /// holding a thread (a blocking thread is used only if thousands of
    /// commits are already waiting).
    pub async fn commit_async(
        self: &std::sync::Arc<Self>,
        call: Call,
    ) -> Result<Committed, OutboxError> {
        let prepared = Box::new(commit::Prepared::new(call));
        self.write_async(|tx| Write::Commit(prepared, Answer::Async(tx)))
            .await
    }

    /// [`Outbox::claim_within`] for async code, without holding a thread.
    pub async fn claim_within_async(
        self: &std::sync::Arc<Self>,
        account: &str,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Message>, OutboxError> {
        let claim = Claim {
            account: account.to_owned(),
            limit,
            max_bytes,
        };
        self.write_async(|tx| Write::Claim(claim, Answer::Async(tx)))
            .await
    }

    /// [`Outbox::mark_many`] for async code, without holding a thread.
    pub async fn mark_many_async(
        self: &std::sync::Arc<Self>,
        marks: Vec<Mark>,
    ) -> Result<Vec<Result<(), OutboxError>>, OutboxError> {
        self.write_async(|tx| Write::Marks(marks, Answer::Async(tx)))
            .await
    }

    /// Queues a write for the writer thread and awaits its answer; a
    /// blocking thread is used only if thousands of writes already wait.
    async fn write_async<T: Send + 'static>(
        self: &std::sync::Arc<Self>,
        write: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, OutboxError>>) -> Write,
    ) -> Result<T, OutboxError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let w = write(tx);
        let full = {
            let guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            match guard.as_ref().ok_or(OutboxError::Closed)?.try_send(w) {
                Ok(()) => None,
                Err(mpsc::TrySendError::Full(w)) => Some(w),
                Err(mpsc::TrySendError::Disconnected(_)) => return Err(OutboxError::Closed),
            }
        };
        if let Some(w) = full {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.send(w))
                .await
                .map_err(|_| OutboxError::Closed)??;
        }
        rx.await.map_err(|_| OutboxError::Closed)?
    }

    /// Runs a write on the writer thread and waits for it.
    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        self.on_writer(Write::Run, f)
    }

    /// Sends `f` to the writer thread as `kind` and waits for its result.
    fn on_writer<T: Send + 'static>(
        &self,
        kind: fn(WriteFn) -> Write,
        f: impl FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(kind(Box::new(move |conn| {
            let _ = tx.send(conn.and_then(f));
        })))?;
        rx.recv().map_err(|_| OutboxError::Closed)?
    }

    /// Runs `f` on the writer's connection as the groups before it left
    /// it (unlike `write`, which first sets `synchronous = FULL`): for
    /// tests.
    #[cfg(test)]
    fn peek<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        self.on_writer(Write::Peek, f)
    }

    /// After a crash: messages left in `sending` go back to `queued`, keeping
    /// their Message-ID, so they are sent again and a duplicate is
    /// recognisable. Returns how many. Only the process holding the delivery
    /// lock may do this (a live process's `sending` messages are its own).
    pub fn recover(&self) -> Result<usize, OutboxError> {
        if self
            .delivery_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none()
        {
            return Err(OutboxError::Open {
                path: self.path.clone(),
                message: "recover needs the delivery lock: call lock_for_delivery first".into(),
            });
        }
        self.write(|conn| {
            let tx = conn.transaction()?;
            let ids: Vec<i64> = {
                let mut st = tx.prepare("SELECT id FROM messages WHERE state = 'sending'")?;
                st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            let now = now_ms();
            for id in &ids {
                // The audit row first: it keeps when the message went
                // `sending`, off its row (see `leave_sending`). The reply
                // of its last attempt stays its `last_reply`.
                tx.prepare_cached(AUDIT_LEAVING_SENDING)?.execute(params![
                    id,
                    now,
                    "queued",
                    "recovered after restart: was being sent when sendbox stopped"
                ])?;
                tx.execute(
                    "UPDATE messages SET state = 'queued', updated_ms = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
            }
            let mut moves = Moves::default();
            moves.moved_n(State::Sending, State::Queued, ids.len() as i64);
            moves.apply(&tx)?;
            tx.commit()?;
            Ok(ids.len())
        })
    }

    /// Claims up to `limit` due messages of `account` (queued, or retry whose
    /// time has come), moving them to `sending`.
    pub fn claim(&self, account: &str, limit: usize) -> Result<Vec<Message>, OutboxError> {
        self.claim_within(account, limit, u64::MAX)
    }

    /// [`Outbox::claim`], stopping before the claimed emails' content would
    /// pass `max_bytes` (the first due message is always claimed, whatever
    /// its size): what a worker holds in memory stays bounded.
    pub fn claim_within(
        &self,
        account: &str,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Vec<Message>, OutboxError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let claim = Claim {
            account: account.to_owned(),
            limit,
            max_bytes,
        };
        self.send(Write::Claim(claim, Answer::Blocking(tx)))?;
        rx.recv().map_err(|_| OutboxError::Closed)?
    }

    /// Records a delivery attempt's result: moves a message this process
    /// claimed (`sending`) to its new state with the reply. A message no
    /// longer `sending` (retried or dropped by the operator meanwhile) is
    /// left alone: [`OutboxError::WrongState`].
    pub fn mark(
        &self,
        id: i64,
        to: State,
        next_attempt_ms: Option<i64>,
        detail: &str,
    ) -> Result<(), OutboxError> {
        self.transition(id, &[State::Sending], to, next_attempt_ms, detail)
    }

    /// [`Outbox::mark`] for many messages in one transaction (one fsync):
    /// `Err` if none was recorded, else each mark's own answer in order.
    pub fn mark_many(&self, marks: Vec<Mark>) -> Result<Vec<Result<(), OutboxError>>, OutboxError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Write::Marks(marks, Answer::Blocking(tx)))?;
        rx.recv().map_err(|_| OutboxError::Closed)?
    }

    fn transition(
        &self,
        id: i64,
        from_any: &'static [State],
        to: State,
        next_attempt_ms: Option<i64>,
        detail: &str,
    ) -> Result<(), OutboxError> {
        let detail = detail.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut moves = Moves::default();
            transition_in(&tx, id, from_any, to, next_attempt_ms, &detail, &mut moves)?;
            moves.apply(&tx)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Puts a dead (or retrying, or sent) message back in the queue now.
    /// A message being sent right now is refused.
    pub fn retry_now(&self, id: i64) -> Result<(), OutboxError> {
        self.transition(
            id,
            &[State::Dead, State::Retry, State::Queued, State::Sent],
            State::Queued,
            Some(now_ms()),
            "retry requested by the operator",
        )
    }

    /// Deletes a message and its audit trail.
    pub fn drop_message(&self, id: i64) -> Result<(), OutboxError> {
        self.write(move |conn| {
            let n = conn.execute("DELETE FROM messages WHERE id = ?1", [id])?;
            if n == 0 {
                return Err(OutboxError::NotFound(id));
            }
            Ok(())
        })
    }

    /// Records that delivery for `account` is paused (`Some(reason)`) or
    /// running again (`None`), so `sendbox check` can say so.
    pub fn set_account_paused(
        &self,
        account: &str,
        reason: Option<&str>,
    ) -> Result<(), OutboxError> {
        let account = account.to_owned();
        let reason = reason.map(str::to_owned);
        self.write(move |conn| {
            match reason {
                Some(r) => conn.execute(
                    "INSERT INTO account_status (account, paused_ms, reason) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (account) DO UPDATE SET paused_ms = excluded.paused_ms, reason = excluded.reason",
                    params![account, now_ms(), r],
                )?,
                None => conn.execute("DELETE FROM account_status WHERE account = ?1", [account])?,
            };
            Ok(())
        })
    }

    /// Records that a schedule ran for the tick due at `scheduled_at_ms`, so
    /// a restart can tell which runs it missed.
    pub fn set_schedule_run(
        &self,
        plugin: &str,
        schedule: &str,
        scheduled_at_ms: i64,
    ) -> Result<(), OutboxError> {
        let (plugin, schedule) = (plugin.to_owned(), schedule.to_owned());
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO schedule_runs (plugin, schedule, last_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (plugin, schedule) DO UPDATE SET last_ms = max(last_ms, excluded.last_ms)",
                params![plugin, schedule, scheduled_at_ms],
            )?;
            Ok(())
        })
    }

    /// Adds an address to the suppression list.
    pub fn suppress(&self, address: &str, reason: Option<&str>) -> Result<(), OutboxError> {
        let address = address.trim().to_ascii_lowercase();
        let reason = reason.map(str::to_owned);
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO suppressions (address, added_ms, reason) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (address) DO UPDATE SET reason = excluded.reason",
                params![address, now_ms(), reason],
            )?;
            Ok(())
        })
    }

    /// Removes an address from the suppression list; whether it was there.
    pub fn unsuppress(&self, address: &str) -> Result<bool, OutboxError> {
        let address = address.trim().to_ascii_lowercase();
        self.write(move |conn| {
            Ok(conn.execute("DELETE FROM suppressions WHERE address = ?1", [address])? > 0)
        })
    }

    /// Deletes what is past its retention: `sent` and `dead` messages (with
    /// their audit trails) whose last change is older than the cutoffs, and
    /// idempotency keys recorded before `idempotency_before_ms`. Works in
    /// batches so commits are never held up for long. Returns what went.
    pub fn prune(&self, cutoffs: PruneBefore) -> Result<Pruned, OutboxError> {
        let mut pruned = Pruned::default();
        loop {
            let batch = self.write(move |conn| {
                let tx = conn.transaction()?;
                let mut n = 0;
                // The states are written out so the partial index
                // `messages_final` serves these reads.
                for (sql, before) in [(PRUNE_SENT, cutoffs.sent_ms), (PRUNE_DEAD, cutoffs.dead_ms)]
                {
                    n += tx
                        .prepare_cached(sql)?
                        .execute(params![before, PRUNE_BATCH])?;
                }
                let keys = tx
                    .prepare_cached(
                        "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency \
                         WHERE created_ms < ?1 LIMIT ?2)",
                    )?
                    .execute(params![cutoffs.idempotency_ms, PRUNE_BATCH])?;
                tx.commit()?;
                Ok((n, keys))
            })?;
            pruned.messages += batch.0 as u64;
            pruned.idempotency_keys += batch.1 as u64;
            if batch.0 < PRUNE_BATCH as usize && batch.1 < PRUNE_BATCH as usize {
                return Ok(pruned);
            }
        }
    }

    /// Stops the writer thread after the writes already queued.
    pub fn close(&self) {
        self.checkpointer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.close();
    }
}

/// What [`Outbox::claim_within`] asks of the writer.
pub(super) struct Claim {
    pub(super) account: String,
    pub(super) limit: usize,
    pub(super) max_bytes: u64,
}

/// The messages a claim takes, due first: (account, now, limit).
pub(super) fn claim_query() -> String {
    format!(
        "SELECT {COLUMNS}, bytes FROM {MESSAGES} WHERE account = ?1 AND state IN ('queued','retry') \
         AND next_attempt_ms <= ?2 ORDER BY next_attempt_ms, id LIMIT ?3"
    )
}

/// Claims inside `tx` (see [`Outbox::claim_within`]).
pub(super) fn claim_in(tx: &Connection, claim: &Claim) -> Result<Vec<Message>, OutboxError> {
    let now = now_ms();
    // Messages whose stored email cannot be read (a damaged file, or one
    // written by a newer sendbox): (id, state, why).
    let mut unreadable: Vec<(i64, String, String)> = Vec::new();
    let msgs: Vec<Message> = {
        // `bytes` comes last, after the message's columns, so a row past
        // the budget is never decoded.
        let mut st = tx.prepare_cached(&claim_query())?;
        let mut rows = st.query(params![claim.account, now, claim.limit as i64])?;
        let (mut msgs, mut total) = (Vec::new(), 0u64);
        while let Some(row) = rows.next()? {
            let bytes = row.get::<_, i64>(13)?.max(0) as u64;
            total = total.saturating_add(bytes);
            if total > claim.max_bytes && !msgs.is_empty() {
                break;
            }
            match row_to_message(row) {
                Ok(m) => msgs.push(m),
                Err(e) => unreadable.push((row.get(0)?, row.get(6)?, e.to_string())),
            }
        }
        msgs
    };
    // Such a message would block its account's queue at every claim: it
    // goes dead, with the reason, instead.
    let mut moves = Moves::default();
    for (id, from, why) in unreadable {
        moves.moved(State::parse(&from), State::Dead);
        let detail = format!("the stored email cannot be read: {why}");
        tracing::error!(id, %detail, "message cannot be read; dead");
        tx.prepare_cached(
            "UPDATE messages SET state = 'dead', updated_ms = ?2, last_reply = ?3 WHERE id = ?1",
        )?
        .execute(params![id, now, detail])?;
        audit(tx, id, Some(&from), "dead", Some(&detail))?;
    }
    let mut update = tx.prepare_cached(
        "UPDATE messages SET state = 'sending', attempts = attempts + 1, updated_ms = ?2 WHERE id = ?1",
    )?;
    // No audit row: while a message is `sending` its row says since when,
    // and the row written when it leaves `sending` keeps that time (schema
    // v9, `audit_trail`).
    for m in &msgs {
        update.execute(params![m.id, now])?;
        moves.moved(m.state, State::Sending);
    }
    moves.apply(tx)?;
    Ok(msgs
        .into_iter()
        .map(|mut m| {
            m.state = State::Sending;
            m.attempts += 1;
            m
        })
        .collect())
}

/// Moves message `id` from one of `from_any` to `to` inside `tx`, on record,
/// and adds the move to `moves` (for the caller to apply); checks before it
/// writes, so a refusal leaves `tx` untouched.
fn transition_in(
    tx: &Connection,
    id: i64,
    from_any: &[State],
    to: State,
    next_attempt_ms: Option<i64>,
    detail: &str,
    moves: &mut Moves,
) -> Result<(), OutboxError> {
    let now = now_ms();
    let from = match from_any {
        // A delivery result: the row leaving `sending` is written first,
        // with the time the message went `sending` read off its row (see
        // `claim_in`); it finds no row when the message is no longer
        // `sending`, and only then is the message read again.
        [State::Sending] => {
            if leave_sending(tx, id, to, next_attempt_ms, detail, now)? {
                moves.moved(State::Sending, to);
                return Ok(());
            }
            return Err(refusal(tx, id, from_any));
        }
        // One state it may come from: the update checks it, and only a
        // refusal reads the row.
        [only] => {
            let n = tx
                .prepare_cached(
                    "UPDATE messages SET state = ?2, updated_ms = ?3, last_reply = ?4, \
                     next_attempt_ms = COALESCE(?5, next_attempt_ms) WHERE id = ?1 AND state = ?6",
                )?
                .execute(params![
                    id,
                    to.as_str(),
                    now,
                    detail,
                    next_attempt_ms,
                    only.as_str()
                ])?;
            if n == 0 {
                return Err(refusal(tx, id, from_any));
            }
            *only
        }
        _ => {
            let from: Option<String> = tx
                .prepare_cached("SELECT state FROM messages WHERE id = ?1")?
                .query_row([id], |r| r.get(0))
                .optional()?;
            let Some(from) = from else {
                return Err(OutboxError::NotFound(id));
            };
            if !from_any.iter().any(|s| s.as_str() == from) {
                return Err(crate::policy::wrong_state(id, from, from_any));
            }
            if from == State::Sending.as_str()
                && leave_sending(tx, id, to, next_attempt_ms, detail, now)?
            {
                moves.moved(State::Sending, to);
                return Ok(());
            }
            move_message(tx, id, to, now, detail, next_attempt_ms)?;
            State::parse(&from)
        }
    };
    moves.moved(from, to);
    audit(tx, id, Some(from.as_str()), to.as_str(), Some(detail))?;
    Ok(())
}

/// Moves message `id` out of `sending` to `to`, if it is `sending`: its
/// audit row first, keeping when it went `sending` (read off its row, see
/// `claim_in`), then the row. Whether it was.
fn leave_sending(
    tx: &Connection,
    id: i64,
    to: State,
    next_attempt_ms: Option<i64>,
    detail: &str,
    now: i64,
) -> Result<bool, OutboxError> {
    let n =
        tx.prepare_cached(AUDIT_LEAVING_SENDING)?
            .execute(params![id, now, to.as_str(), detail])?;
    if n == 0 {
        return Ok(false);
    }
    move_message(tx, id, to, now, detail, next_attempt_ms)?;
    Ok(true)
}

/// Takes back the attempt a claim counted for message `id`, which was
/// handed back unattempted.
pub(super) fn take_back_attempt(tx: &Connection, id: i64) -> rusqlite::Result<usize> {
    tx.prepare_cached("UPDATE messages SET attempts = MAX(attempts - 1, 0) WHERE id = ?1")?
        .execute([id])
}

/// Moves message `id` to `to` at `now` with its reply, and its next
/// attempt when given.
fn move_message(
    tx: &Connection,
    id: i64,
    to: State,
    now: i64,
    detail: &str,
    next_attempt_ms: Option<i64>,
) -> rusqlite::Result<usize> {
    tx.prepare_cached(
        "UPDATE messages SET state = ?2, updated_ms = ?3, last_reply = ?4, \
         next_attempt_ms = COALESCE(?5, next_attempt_ms) WHERE id = ?1",
    )?
    .execute(params![id, to.as_str(), now, detail, next_attempt_ms])
}

/// Why message `id` could not move from one of `from_any`: it is gone, or
/// in another state.
fn refusal(tx: &Connection, id: i64, from_any: &[State]) -> OutboxError {
    let now: Result<Option<String>, _> = tx
        .prepare_cached("SELECT state FROM messages WHERE id = ?1")
        .and_then(|mut st| st.query_row([id], |r| r.get(0)).optional());
    match now {
        Ok(Some(state)) => crate::policy::wrong_state(id, state, from_any),
        Ok(None) => OutboxError::NotFound(id),
        Err(e) => e.into(),
    }
}

/// The audit row of message ?1 leaving `sending`, written only if it is
/// `sending`, with the time it went so off its row: ?2 now, ?3 the state it
/// goes to, ?4 the reply or the reason.
const AUDIT_LEAVING_SENDING: &str = "INSERT INTO audit (message, at_ms, from_state, to_state, detail, started_ms) \
     SELECT id, ?2, 'sending', ?3, ?4, updated_ms FROM messages WHERE id = ?1 AND state = 'sending'";

fn audit(
    tx: &Connection,
    id: i64,
    from: Option<&str>,
    to: &str,
    detail: Option<&str>,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO audit (message, at_ms, from_state, to_state, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id, now_ms(), from, to, detail])?;
    Ok(())
}

impl Outbox {
    /// Caps the database at `pages` pages, so tests can make the disk "full"
    /// and check that nothing unstored is acknowledged.
    #[doc(hidden)]
    pub fn limit_pages_for_tests(&self, pages: u64) -> Result<(), OutboxError> {
        self.write(move |conn| {
            conn.pragma_update(None, "max_page_count", pages as i64)?;
            Ok(())
        })
    }
}
