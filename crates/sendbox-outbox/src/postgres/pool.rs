//! A few connections, each used by one task at a time (a transaction needs
//! its connection to itself). A connection the server dropped (a restart,
//! an idle timeout) is replaced at its next use, so the outbox recovers by
//! itself once the database is back; meanwhile every call fails with a
//! storage error (the daemon answers 503) and nothing is half-stored.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::collections::HashMap;

use tokio::sync::{Mutex, MutexGuard, Semaphore, SemaphorePermit};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Config, GenericClient, NoTls, Statement};

use super::tls::{MakeRustls, PgAddress};

use crate::{OutboxError, StorageError};

/// How long connecting may take before the call fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct Pool {
    config: Config,
    /// Set when the address asks for TLS (`sslmode=verify-full`).
    tls: Option<MakeRustls>,
    /// `host:port/database`, for messages (never the credentials).
    server: String,
    slots: Vec<Mutex<Option<Pooled>>>,
    /// One permit per slot: who holds one finds a slot free. Callers wait
    /// their turn for whichever connection frees first, never behind one
    /// that is held for long (a commit waiting on another node's lock).
    free: Semaphore,
    next: AtomicUsize,
}

/// A pooled connection and the statements prepared on it.
pub(crate) struct Pooled {
    client: Client,
    statements: Statements,
}

/// Statements prepared on one connection, by their SQL: the server parses
/// and plans each once per connection, then only binds and runs it (where
/// a statement sent with its text is parsed and planned at every run).
/// Gone with the connection.
#[derive(Default)]
pub(crate) struct Statements(HashMap<&'static str, Statement>);

impl Statements {
    /// `sql` prepared on `c`'s connection, with its parameters' types:
    /// a round trip the first time on this connection, none after.
    pub(crate) async fn get(
        &mut self,
        c: &impl GenericClient,
        sql: &'static str,
        types: &[Type],
    ) -> Result<Statement, OutboxError> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = c.prepare_typed(sql, types).await.map_err(super::pg_err)?;
        self.0.insert(sql, s.clone());
        Ok(s)
    }

    /// How many are prepared.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// A connection in use; back in the pool when dropped (the slot before
/// its permit, so a caller holding a permit always finds a slot free).
pub(crate) struct Conn<'a> {
    slot: MutexGuard<'a, Option<Pooled>>,
    _permit: SemaphorePermit<'a>,
}

impl Conn<'_> {
    fn pooled(&mut self) -> &mut Pooled {
        self.slot
            .as_mut()
            .expect("a pooled connection is connected")
    }

    /// The connection and its prepared statements, to use together.
    pub(crate) fn parts(&mut self) -> (&mut Client, &mut Statements) {
        let p = self.pooled();
        (&mut p.client, &mut p.statements)
    }
}

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self
            .slot
            .as_ref()
            .expect("a pooled connection is connected")
            .client
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.pooled().client
    }
}

impl Pool {
    pub(crate) fn new(url: &str, password: Option<&str>, size: usize) -> Result<Pool, OutboxError> {
        let address = PgAddress::parse(url).map_err(|e| {
            OutboxError::Storage(StorageError(format!("the PostgreSQL address: {e}")))
        })?;
        let tls = address.connector().map_err(|e| {
            OutboxError::Storage(StorageError(format!("the PostgreSQL address: {e}")))
        })?;
        let mut config: Config = address.url.parse().map_err(|e| OutboxError::Storage(StorageError(format!(
            "the PostgreSQL address is not a valid connection string ({e}); write it as postgres://USER@HOST:PORT/DATABASE"
        ))))?;
        if tls.is_some() {
            config.ssl_mode(SslMode::Require);
        }
        config.connect_timeout(CONNECT_TIMEOUT);
        if let Some(p) = password {
            config.password(p);
        }
        config.application_name("sendbox");
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let server = format!(
            "postgres://{host}:{port}/{}",
            config.get_dbname().unwrap_or("")
        );
        Ok(Pool {
            config,
            tls,
            server,
            slots: (0..size.max(1)).map(|_| Mutex::new(None)).collect(),
            free: Semaphore::new(size.max(1)),
            next: AtomicUsize::new(0),
        })
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// A connection of its own: a free one if any, else the first to free,
    /// callers served in the order they came; (re)connected if the server
    /// dropped it.
    pub(crate) async fn get(&self) -> Result<Conn<'_>, OutboxError> {
        let permit = self.free.acquire().await.map_err(|_| {
            OutboxError::Storage(StorageError("the connection pool is closed".into()))
        })?;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.slots.len();
        let free = (0..n).find_map(|i| self.slots[(start + i) % n].try_lock().ok());
        // Each slot taken holds a permit until it is free again.
        let Some(mut slot) = free else {
            return Err(OutboxError::Storage(StorageError(
                "no free connection although one was counted free (a bug in the pool)".into(),
            )));
        };
        if slot.as_ref().is_none_or(|p| p.client.is_closed()) {
            *slot = None;
            *slot = Some(Pooled {
                client: self.connect().await?,
                statements: Statements::default(),
            });
        }
        Ok(Conn {
            slot,
            _permit: permit,
        })
    }

    /// A connection of its own, outside the pool (closed when dropped).
    pub(crate) async fn connect(&self) -> Result<Client, OutboxError> {
        let unreachable = |e: tokio_postgres::Error| {
            // A TLS failure's reason (an untrusted certificate, a name that
            // does not match) is in the error's sources.
            let mut causes = String::new();
            if e.as_db_error().is_none() {
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    causes.push_str(&format!(": {s}"));
                    source = s.source();
                }
            }
            let first = match super::pg_err(e) {
                OutboxError::Storage(StorageError(text)) => text,
                other => other.to_string(),
            };
            let hint = if causes.contains("certificate") {
                "the server's certificate cannot be verified: name the CA that signed it with `sslrootcert=/path/to/ca.pem` in the address, and connect by the name the certificate holds"
            } else {
                "is PostgreSQL running, and may this role connect?"
            };
            OutboxError::Storage(StorageError(format!(
                "cannot reach the database at {}: {first}{causes} ({hint})",
                self.server,
            )))
        };
        let server = self.server.clone();
        let lost = move |e: tokio_postgres::Error| {
            tracing::warn!(server = %server, error = %e, "PostgreSQL connection lost; the next use reconnects");
        };
        let client = match &self.tls {
            None => {
                let (client, connection) = self.config.connect(NoTls).await.map_err(unreachable)?;
                tokio::spawn(async move { connection.await.unwrap_or_else(lost) });
                client
            }
            Some(tls) => {
                let (client, connection) = self
                    .config
                    .connect(tls.clone())
                    .await
                    .map_err(unreachable)?;
                tokio::spawn(async move { connection.await.unwrap_or_else(lost) });
                client
            }
        };
        // Acknowledged means on the server's disk, whatever the database's
        // default says.
        client
            .batch_execute("SET synchronous_commit = on")
            .await
            .map_err(super::pg_err)?;
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use crate::behaviour::{call, email};

    /// Statements prepared on the server in the session of the pool's one
    /// connection, and in its cache.
    async fn prepared(o: &super::super::PgOutbox) -> (i64, usize) {
        let mut conn = o.pool.get().await.unwrap();
        let on_server: i64 = conn
            .query_one("SELECT COUNT(*) FROM pg_prepared_statements", &[])
            .await
            .unwrap()
            .get(0);
        (on_server, conn.parts().1.len())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_held_for_long_holds_up_no_caller_while_others_free() {
        let db = sendbox_test_support::postgres::Database::create().await;
        let pool = std::sync::Arc::new(super::Pool::new(&db.url, None, 2).unwrap());
        // One connection held as a commit waiting on another node's lock
        // holds it; the other serves everyone else, one after the other.
        let held = pool.get().await.unwrap();
        let mut callers = tokio::task::JoinSet::new();
        for i in 0..8 {
            let pool = pool.clone();
            callers.spawn(async move {
                let conn = pool.get().await.unwrap();
                let n: i32 = conn
                    .query_one("SELECT $1::int", &[&i])
                    .await
                    .unwrap()
                    .get(0);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                n
            });
        }
        let mut answered =
            tokio::time::timeout(std::time::Duration::from_secs(10), callers.join_all())
                .await
                .expect("every caller got the free connection in turn");
        answered.sort_unstable();
        assert_eq!(answered, (0..8).collect::<Vec<i32>>());
        drop(held);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connections_statements_are_prepared_once_and_run_again() {
        let db = sendbox_test_support::postgres::Database::create().await;
        let o = super::super::PgOutbox::connect(&db.url, None, "a", 1, crate::DEFAULT_LEASE)
            .await
            .unwrap();
        let commit = |i: usize| {
            let mut e = email("a@x.org", &format!("m{i}"));
            e.idempotency_key = Some(format!("k{i}"));
            call(vec![e], vec![crate::behaviour::set(&format!("s{i}"), "v")])
        };
        for i in 0..3 {
            o.commit(commit(i)).await.unwrap();
        }
        let (on_server, cached) = prepared(&o).await;
        assert!(
            cached >= 4,
            "the locks, the insert and the state writes are prepared: {cached}"
        );
        // The driver keeps a statement or two of its own (type lookups).
        assert!(
            on_server >= cached as i64,
            "each on the server: {on_server} for {cached}"
        );
        for i in 3..30 {
            o.commit(commit(i)).await.unwrap();
        }
        assert_eq!(
            prepared(&o).await,
            (on_server, cached),
            "27 commits later, not one prepared again"
        );
        assert_eq!(o.list(None, 100).await.unwrap().len(), 30);
    }

    /// Rows the idempotency lookups fetched through the index, as the
    /// server counts them (this session's counts flushed first).
    async fn idempotency_rows_fetched(o: &super::super::PgOutbox) -> i64 {
        let conn = o.pool.get().await.unwrap();
        conn.batch_execute("SELECT pg_stat_force_next_flush()")
            .await
            .unwrap();
        conn.query_one(
            "SELECT COALESCE(idx_tup_fetch, 0) FROM pg_stat_user_tables WHERE relname = 'idempotency'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_lookup_planned_on_an_empty_table_does_not_read_the_table_later() {
        let db = sendbox_test_support::postgres::Database::create().await;
        let o = super::super::PgOutbox::connect(&db.url, None, "a", 1, crate::DEFAULT_LEASE)
            .await
            .unwrap();
        // A new database, never analyzed; one plugin, every email its own
        // key, one after the other on one connection.
        let n = 600;
        for i in 0..n {
            let mut e = email("a@x.org", &format!("m{i}"));
            e.idempotency_key = Some(format!("k{i}"));
            o.commit(call(vec![e], vec![])).await.unwrap();
        }
        // A plan that looks keys up by the plugin alone reads every key
        // stored so far at each commit: n²/2 = 180,000 rows here.
        let fetched = idempotency_rows_fetched(&o).await;
        assert!(
            fetched < 10 * n,
            "{fetched} rows read through the index for {n} lookups"
        );
    }
}
