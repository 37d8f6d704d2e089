//! The PostgreSQL backend: one database shared by several sendbox nodes.
//! A small pool of connections, each with the statements prepared on it
//! (`pool`), versioned migrations run under an advisory lock so nodes
//! starting together migrate once (`schema`), the commit of a call
//! (`commit`) and of the calls waiting together, in one transaction
//! (`group`), claims with leases and
//! fenced results (`delivery`), an account's rate and connections shared
//! by every node (`limits`), and [`crate::Store`] on `Arc<PgOutbox>`
//! (`store`).
//!
//! What SQLite gets from its single writer, PostgreSQL gets from locks:
//! commits of one plugin take that plugin's advisory lock (so its state
//! reads are validated and its quotas counted with no other commit of it
//! in between), claims take rows `FOR UPDATE SKIP LOCKED` (so two nodes
//! never claim the same message), and every result is fenced by the lease
//! (only the node holding a message may record what happened to it).
//! `synchronous_commit` is on: a commit returns once the server has it on
//! disk.

mod commit;
mod delivery;
mod group;
mod limits;
mod pool;
mod schema;
mod store;
mod tls;

use std::sync::Arc;
use std::time::Duration;

pub use store::PluginAlone;
pub use tls::PgAddress;

use tokio_postgres::Row;

use crate::{Message, OutboxError, State, StorageError, now_ms};

pub(crate) use pool::Pool;

/// How long a claimed message stays this node's without a renewal; a node
/// that dies loses its messages to the others after this.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// The columns a [`Message`] is read from, in [`message_from_row`]'s order.
const COLUMNS: &str = "id, message_id, plugin, trigger, event_id, account, state, attempts, \
                       next_attempt_ms, created_ms, recipients, last_reply, email_json";

/// A node that has used the database, as `sendbox check` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSeen {
    /// Its name.
    pub node: String,
    /// When it last said it was alive (ms since the epoch).
    pub seen_ms: i64,
    /// What it is (command, pid).
    pub detail: String,
    /// Messages it holds under a lease now.
    pub leases: u64,
}

/// The outbox in a PostgreSQL database, as one node sees it.
pub struct PgOutbox {
    pool: Arc<Pool>,
    /// Commits waiting to be written together.
    commits: Arc<group::Commits>,
    /// This node's id: written on every lease it holds.
    node: String,
    lease: Duration,
    /// Renews this node's leases and heartbeat, and frees expired leases;
    /// stopped when the outbox is dropped.
    keeper: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for PgOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: only the node id is shown.
        f.debug_struct("PgOutbox")
            .field("node", &self.node)
            .finish()
    }
}

impl Drop for PgOutbox {
    fn drop(&mut self) {
        if let Some(k) = self
            .keeper
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            k.abort();
        }
    }
}

impl PgOutbox {
    /// Connects to the database at `url` (`postgres://user@host:port/db`)
    /// with `password` if the role needs one (kept in the connection
    /// settings only, never shown), as node `node`, migrating the schema if
    /// needed, with `pool_size` connections and leases of `lease`. Must be
    /// called inside a tokio runtime: the lease keeper runs there.
    pub async fn connect(
        url: &str,
        password: Option<&str>,
        node: &str,
        pool_size: usize,
        lease: Duration,
    ) -> Result<Arc<PgOutbox>, OutboxError> {
        let pool = Arc::new(Pool::new(url, password, pool_size)?);
        {
            let mut client = pool.get().await?;
            schema::migrate(&mut client).await?;
        }
        let outbox = Arc::new(PgOutbox {
            pool,
            commits: group::Commits::new(pool_size),
            node: node.to_owned(),
            lease,
            keeper: std::sync::Mutex::new(None),
        });
        let keeper = tokio::spawn(delivery::keep_leases(Arc::downgrade(&outbox)));
        *outbox
            .keeper
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(keeper);
        Ok(outbox)
    }

    /// Connects as a tool rather than a node (`sendbox check`, `sendbox
    /// outbox`, `sendbox suppress`): one connection, no node registered, no
    /// lease kept or freed, and nothing migrated — a database at another
    /// schema version is named as such.
    pub async fn connect_as_tool(
        url: &str,
        password: Option<&str>,
    ) -> Result<Arc<PgOutbox>, OutboxError> {
        let pool = Arc::new(Pool::new(url, password, 1)?);
        {
            let client = pool.get().await?;
            schema::check_current(&client).await?;
        }
        Ok(Arc::new(PgOutbox {
            pool,
            commits: group::Commits::new(1),
            node: String::new(),
            lease: DEFAULT_LEASE,
            keeper: std::sync::Mutex::new(None),
        }))
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The server and database, without credentials, for messages.
    pub fn server(&self) -> &str {
        self.pool.server()
    }
}

/// A driver error as the outbox reports it: the server's own message when
/// it sent one (the driver's `Display` says only "db error").
pub(crate) fn pg_err(e: tokio_postgres::Error) -> OutboxError {
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    };
    OutboxError::Storage(StorageError(format!("postgres: {text}")))
}

/// A stored message from a row of [`COLUMNS`]; `Err` says why its email
/// cannot be read.
fn message_from_row(r: &Row) -> Result<Message, String> {
    let json: String = r.get(12);
    let email: sendbox_types::Email = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    Ok(Message {
        id: r.get(0),
        message_id: r.get(1),
        plugin: r.get(2),
        trigger: r.get(3),
        event_id: r.get(4),
        account: r.get(5),
        state: State::parse(r.get::<_, &str>(6)),
        attempts: r.get::<_, i32>(7).max(0) as u32,
        next_attempt_ms: r.get(8),
        created_ms: r.get(9),
        recipients: r.get(10),
        last_reply: r.get(11),
        email,
    })
}

/// [`message_from_row`] for reads: an unreadable email is a storage error.
fn read_message(r: &Row) -> Result<Message, OutboxError> {
    message_from_row(r).map_err(|why| {
        OutboxError::Storage(StorageError(format!(
            "message {} cannot be read: {why}",
            r.get::<_, i64>(0)
        )))
    })
}

/// Appends one audit row inside `tx`.
async fn audit(
    tx: &tokio_postgres::Transaction<'_>,
    id: i64,
    from: Option<&str>,
    to: &str,
    detail: Option<&str>,
) -> Result<(), OutboxError> {
    tx.execute(
        "INSERT INTO audit (message, at_ms, from_state, to_state, detail) VALUES ($1, $2, $3, $4, $5)",
        &[&id, &now_ms(), &from, &to, &detail],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}
