//! A few connections, each used by one task at a time (a transaction needs
//! its connection to itself). A connection the server dropped (a restart,
//! an idle timeout) is replaced at its next use, so the outbox recovers by
//! itself once the database is back; meanwhile every call fails with a
//! storage error (the daemon answers 503) and nothing is half-stored.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};

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
    slots: Vec<Mutex<Option<Client>>>,
    next: AtomicUsize,
}

/// A connection in use; back in the pool when dropped.
pub(crate) struct Conn<'a>(MutexGuard<'a, Option<Client>>);

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.0.as_ref().expect("a pooled connection is connected")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().expect("a pooled connection is connected")
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
            next: AtomicUsize::new(0),
        })
    }

    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// A connection of its own: a free one if any, else the next in turn
    /// when it frees; (re)connected if the server dropped it.
    pub(crate) async fn get(&self) -> Result<Conn<'_>, OutboxError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.slots.len();
        let free = (0..n).find_map(|i| self.slots[(start + i) % n].try_lock().ok());
        let mut slot = match free {
            Some(s) => s,
            None => self.slots[start % n].lock().await,
        };
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = None;
            *slot = Some(self.connect().await?);
        }
        Ok(Conn(slot))
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
