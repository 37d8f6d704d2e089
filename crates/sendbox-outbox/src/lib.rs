//! The durable outbox: every accepted email is stored before anyone is told
//! it was accepted, and every state change after that is on record.
//!
//! This crate owns the SQLite file: schema migrations, the one-transaction
//! commit of a plugin call (its emails *and* its state writes, or none of
//! them), policy at enqueue, idempotency keys, the suppression list, message
//! states (`queued → sending → sent`, or `retry`, or `dead`) and the audit
//! trail. It must not know about wasmtime, SMTP or tokens: delivery workers
//! claim messages here and report back what the transport said.
//!
//! # Durability
//!
//! The database runs in WAL mode with `synchronous = FULL`: a commit returns
//! only after the WAL is fsynced, so an acknowledged outcome survives power
//! loss. To keep that affordable under load, commits go through one writer
//! thread that groups whatever is waiting into one transaction (each call in
//! its own savepoint) and pays one fsync for the group.
//!
//! ```no_run
//! use sendbox_outbox::{Call, Outbox, Policy};
//! let outbox = Outbox::open("var/sendbox.db".as_ref())?;
//! let committed = outbox.commit(Call {
//!     plugin: "file-alert".into(),
//!     trigger: "file".into(),
//!     event_id: "evt-1".into(),
//!     account: "alerts".into(),
//!     account_mailbox: "alerts@example.com".into(),
//!     policy: Policy::default(),
//!     emails: vec![],
//!     state_changes: vec![],
//!     ..Default::default()
//! })?;
//! println!("queued {:?}", committed.queued);
//! # Ok::<(), sendbox_outbox::OutboxError>(())
//! ```

#![deny(missing_docs)]

mod policy;
mod schema;
mod state;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, mpsc};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use sendbox_types::{Email, ReadSet, StateChange};
use serde::Serialize;

pub use policy::{Policy, default_idempotency_hours};

/// Why the outbox refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The outcome breaks the plugin's policy; nothing of it was stored.
    #[error("policy: {0}")]
    Policy(String),
    /// SQLite failed (disk full, unwritable file, corruption...). Nothing of
    /// the call was stored.
    #[error("outbox storage: {0}")]
    Storage(#[from] rusqlite::Error),
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
    fn parse(s: &str) -> State {
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

/// Rows deleted per transaction by [`Outbox::prune`].
const PRUNE_BATCH: i64 = 1000;

/// Cutoffs for [`Outbox::prune`], in ms since the epoch: what last changed
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

/// What [`Outbox::prune`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Pruned {
    /// Messages, with their audit rows.
    pub messages: u64,
    /// Idempotency keys.
    pub idempotency_keys: u64,
}

pub use sendbox_types::now_ms;

type Reply<T> = mpsc::SyncSender<Result<T, OutboxError>>;

/// A write run on the writer thread's connection.
type WriteFn = Box<dyn FnOnce(&mut Connection) -> Result<(), OutboxError> + Send>;

enum Write {
    Commit(Box<Call>, CommitReply),
    Run(WriteFn),
}

/// Where a commit's result goes: a blocked thread or an awaiting task.
enum CommitReply {
    Blocking(Reply<Committed>),
    Async(tokio::sync::oneshot::Sender<Result<Committed, OutboxError>>),
}

impl CommitReply {
    fn send(self, r: Result<Committed, OutboxError>) {
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
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("path", &self.path).finish()
    }
}

fn open_conn(path: &Path) -> Result<Connection, OutboxError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| OutboxError::Open {
        path: path.to_owned(),
        message: format!("{e} (check that the folder exists and is writable by sendbox)"),
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: the WAL is fsynced at every commit; see the crate docs.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Largest group of calls committed in one transaction.
const MAX_GROUP: usize = 512;

impl Outbox {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Outbox, OutboxError> {
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
        let reader = open_conn(path)?;
        let (tx, rx) = mpsc::sync_channel::<Write>(4096);
        let thread = std::thread::Builder::new()
            .name("sendbox-outbox-writer".into())
            .spawn(move || writer_loop(writer, rx))
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
        })
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
        self.send(Write::Commit(Box::new(call), CommitReply::Blocking(tx)))?;
        rx.recv().map_err(|_| OutboxError::Closed)?
    }

    /// [`Outbox::commit`] for async code: the same commit, awaited without
    /// holding a thread (a blocking thread is used only if thousands of
    /// commits are already waiting).
    pub async fn commit_async(
        self: &std::sync::Arc<Self>,
        call: Call,
    ) -> Result<Committed, OutboxError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let w = Write::Commit(Box::new(call), CommitReply::Async(tx));
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
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(Write::Run(Box::new(move |conn| {
            let _ = tx.send(f(conn));
            Ok(())
        })))?;
        rx.recv().map_err(|_| OutboxError::Closed)?
    }

    /// Makes this process the one that delivers from this database, until
    /// it exits or drops the outbox: an exclusive lock on `<db>.lock`, which
    /// the kernel releases when the process dies (kill -9 included). A
    /// second process is refused with [`OutboxError::Locked`], naming the
    /// holder. `holder` describes this process, e.g. `sendbox run`.
    pub fn lock_for_delivery(&self, holder: &str) -> Result<(), OutboxError> {
        use std::io::{Read, Seek, Write};
        let mut slot = self
            .delivery_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_some() {
            return Ok(());
        }
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let lock_path = PathBuf::from(lock_path);
        let open_err = |e: std::io::Error| OutboxError::Open {
            path: lock_path.clone(),
            message: format!("cannot open the lock file: {e}"),
        };
        let mut file = sendbox_fs::private_file(&lock_path).map_err(open_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(OutboxError::Locked {
                    path: self.path.clone(),
                    holder: if holder.is_empty() {
                        "another process".into()
                    } else {
                        holder.into()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(open_err(e)),
        }
        let me = format!(
            "{holder} (pid {}) since {}",
            std::process::id(),
            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
        );
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()))
            .and_then(|()| file.flush());
        written.map_err(open_err)?;
        *slot = Some(file);
        Ok(())
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
                tx.execute(
                    "UPDATE messages SET state = 'queued', updated_ms = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
                audit(
                    &tx,
                    *id,
                    Some("sending"),
                    "queued",
                    Some("recovered after restart: was being sent when sendbox stopped"),
                )?;
            }
            tx.commit()?;
            Ok(ids.len())
        })
    }

    /// Claims up to `limit` due messages of `account` (queued, or retry whose
    /// time has come), moving them to `sending`.
    pub fn claim(&self, account: &str, limit: usize) -> Result<Vec<Message>, OutboxError> {
        let account = account.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let now = now_ms();
            let msgs: Vec<Message> = {
                let mut st = tx.prepare(&format!(
                    "SELECT {COLUMNS} FROM messages WHERE account = ?1 AND state IN ('queued','retry') \
                     AND next_attempt_ms <= ?2 ORDER BY next_attempt_ms, id LIMIT ?3"
                ))?;
                st.query_map(params![account, now, limit as i64], row_to_message)?
                    .collect::<Result<_, _>>()?
            };
            for m in &msgs {
                tx.execute(
                    "UPDATE messages SET state = 'sending', attempts = attempts + 1, updated_ms = ?2 WHERE id = ?1",
                    params![m.id, now],
                )?;
                audit(&tx, m.id, Some(m.state.as_str()), "sending", None)?;
            }
            tx.commit()?;
            Ok(msgs
                .into_iter()
                .map(|mut m| {
                    m.state = State::Sending;
                    m.attempts += 1;
                    m
                })
                .collect())
        })
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
            let tx = conn.transaction()?;
            let from: Option<String> = tx
                .query_row("SELECT state FROM messages WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(from) = from else {
                return Err(OutboxError::NotFound(id));
            };
            if !from_any.iter().any(|s| s.as_str() == from) {
                let expected: Vec<&str> = from_any.iter().map(|s| s.as_str()).collect();
                return Err(OutboxError::WrongState {
                    id,
                    state: from,
                    expected: expected.join(" or "),
                });
            }
            let now = now_ms();
            tx.execute(
                "UPDATE messages SET state = ?2, updated_ms = ?3, last_reply = ?4, \
                 next_attempt_ms = COALESCE(?5, next_attempt_ms) WHERE id = ?1",
                params![id, to.as_str(), now, detail, next_attempt_ms],
            )?;
            audit(&tx, id, Some(&from), to.as_str(), Some(&detail))?;
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

    /// When a schedule last ran (its tick's `scheduled_at_ms`), if ever.
    pub fn schedule_run(&self, plugin: &str, schedule: &str) -> Result<Option<i64>, OutboxError> {
        let (plugin, schedule) = (plugin.to_owned(), schedule.to_owned());
        self.read(move |c| {
            c.query_row(
                "SELECT last_ms FROM schedule_runs WHERE plugin = ?1 AND schedule = ?2",
                params![plugin, schedule],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Paused accounts: (account, since ms, reason).
    pub fn paused_accounts(&self) -> Result<Vec<(String, i64, String)>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT account, paused_ms, reason FROM account_status ORDER BY account",
            )?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
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

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, OutboxError> {
        let conn = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(f(&conn)?)
    }

    /// The suppression list.
    pub fn suppressions(&self) -> Result<Vec<(String, Option<String>)>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare("SELECT address, reason FROM suppressions ORDER BY address")?;
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
        })
    }

    /// Messages, newest first, optionally in one state.
    pub fn list(&self, state: Option<State>, limit: usize) -> Result<Vec<Message>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {COLUMNS} FROM messages WHERE (?1 IS NULL OR state = ?1) ORDER BY id DESC LIMIT ?2"
            ))?;
            st.query_map(params![state.map(State::as_str), limit as i64], row_to_message)?
                .collect()
        })
    }

    /// One message.
    pub fn get(&self, id: i64) -> Result<Message, OutboxError> {
        self.read(|c| {
            c.query_row(
                &format!("SELECT {COLUMNS} FROM messages WHERE id = ?1"),
                [id],
                row_to_message,
            )
            .optional()
        })?
        .ok_or(OutboxError::NotFound(id))
    }

    /// A message's audit trail, oldest first.
    pub fn audit_trail(&self, id: i64) -> Result<Vec<AuditEntry>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT at_ms, from_state, to_state, detail FROM audit WHERE message = ?1 ORDER BY id",
            )?;
            st.query_map([id], |r| {
                Ok(AuditEntry {
                    at_ms: r.get(0)?,
                    from: r.get(1)?,
                    to: r.get(2)?,
                    detail: r.get(3)?,
                })
            })?
            .collect()
        })
    }

    /// Count of messages per state, from counters kept at every change
    /// (five rows read, never a table scan).
    pub fn depth(&self) -> Result<Vec<(State, u64)>, OutboxError> {
        self.read(|c| {
            let mut st = c.prepare_cached("SELECT state, n FROM message_counts WHERE n > 0")?;
            st.query_map([], |r| {
                Ok((
                    State::parse(&r.get::<_, String>(0)?),
                    r.get::<_, i64>(1)? as u64,
                ))
            })?
            .collect()
        })
    }

    /// Reads one plugin state value with its version (see
    /// [`ReadSet`]).
    pub fn state_get(
        &self,
        plugin: &str,
        key: &str,
    ) -> Result<Option<(Vec<u8>, u64)>, OutboxError> {
        self.read(|c| state::get(c, plugin, key))
    }

    /// Plugin state keys with a prefix, in byte order, at most `limit`.
    pub fn state_keys(
        &self,
        plugin: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<String>, OutboxError> {
        self.read(|c| state::keys(c, plugin, prefix, limit))
    }

    /// Bytes of keys and values a plugin keeps.
    pub fn state_usage(&self, plugin: &str) -> Result<u64, OutboxError> {
        self.read(|c| state::usage(c, plugin))
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
                for (state, before) in [("sent", cutoffs.sent_ms), ("dead", cutoffs.dead_ms)] {
                    n += tx
                        .prepare_cached(
                            "DELETE FROM messages WHERE id IN (SELECT id FROM messages \
                             WHERE state = ?1 AND updated_ms < ?2 LIMIT ?3)",
                        )?
                        .execute(params![state, before, PRUNE_BATCH])?;
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

const COLUMNS: &str = "id, message_id, plugin, trigger, event_id, account, state, attempts, \
                       next_attempt_ms, created_ms, recipients, last_reply, email_json";

fn row_to_message(r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    let json: String = r.get(12)?;
    let email: Email = serde_json::from_str(&json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(12, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(Message {
        id: r.get(0)?,
        message_id: r.get(1)?,
        plugin: r.get(2)?,
        trigger: r.get(3)?,
        event_id: r.get(4)?,
        account: r.get(5)?,
        state: State::parse(&r.get::<_, String>(6)?),
        attempts: r.get(7)?,
        next_attempt_ms: r.get(8)?,
        created_ms: r.get(9)?,
        recipients: r.get(10)?,
        last_reply: r.get(11)?,
        email,
    })
}

fn audit(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    from: Option<&str>,
    to: &str,
    detail: Option<&str>,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO audit (message, at_ms, from_state, to_state, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, now_ms(), from, to, detail],
    )?;
    Ok(())
}

fn writer_loop(mut conn: Connection, rx: mpsc::Receiver<Write>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let mut commits = Vec::new();
        let mut others = Vec::new();
        for w in batch {
            match w {
                Write::Commit(c, r) => commits.push((c, r)),
                Write::Run(f) => others.push(f),
            }
        }
        if !commits.is_empty() {
            commit_group(&mut conn, commits);
        }
        for f in others {
            let _ = f(&mut conn);
        }
    }
}

/// Commits a group of calls in one transaction, each in its own savepoint
/// so a policy refusal drops only that call.
fn commit_group(conn: &mut Connection, group: Vec<(Box<Call>, CommitReply)>) {
    let mut results: Vec<Result<Committed, OutboxError>> = Vec::with_capacity(group.len());
    let outcome = (|| -> rusqlite::Result<()> {
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (call, _) in &group {
            let mut sp = tx.savepoint()?;
            match policy::apply(&sp, call) {
                Ok(done) => {
                    sp.commit()?;
                    results.push(Ok(done));
                }
                // A storage failure (disk full, I/O) may already have rolled
                // the whole transaction back: fail the group with it.
                Err(OutboxError::Storage(e)) => return Err(e),
                Err(e) => {
                    sp.rollback()?;
                    drop(sp);
                    results.push(Err(e));
                }
            }
        }
        tx.commit()
    })();
    match outcome {
        Ok(()) => {
            for ((_, reply), r) in group.into_iter().zip(results) {
                reply.send(r);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, calls = group.len(), "outbox commit failed; nothing of these calls was stored");
            for (_, reply) in group {
                reply.send(Err(OutboxError::Storage(clone_err(&e))));
            }
        }
    }
}

fn clone_err(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            rusqlite::Error::SqliteFailure(*code, msg.clone())
        }
        other => rusqlite::Error::ToSqlConversionFailure(other.to_string().into()),
    }
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
