//! A database of its own per test, on the PostgreSQL server the tests use:
//! `DATABASE_URL` (a `postgres://` URL), else
//! `postgres://postgres@localhost:5432/postgres`. `./scripts/test.sh`
//! starts a throwaway server when none is running. No server: the test
//! fails, loudly, saying so.

use std::sync::atomic::{AtomicU32, Ordering};

/// The server's URL.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@localhost:5432/postgres".into())
}

/// `url` pointing at database `db` instead.
pub fn with_database(url: &str, db: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .expect("DATABASE_URL is a postgres:// URL");
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let query = tail
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{scheme}://{authority}/{db}{query}")
}

async fn admin() -> tokio_postgres::Client {
    let url = server_url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no PostgreSQL server at {url} ({e}): start one, or run ./scripts/test.sh, which does"
            )
        });
    tokio::spawn(conn);
    client
}

/// A fresh, empty database; dropped (with any connection left) when this
/// is dropped.
pub struct Database {
    /// Its URL.
    pub url: String,
    name: String,
}

impl Database {
    /// Creates it.
    pub async fn create() -> Database {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "sendbox_test_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        );
        admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        Database {
            url: with_database(&server_url(), &name),
            name,
        }
    }

    /// Runs `sql` on it and returns the first column of each row as text.
    pub async fn query(&self, sql: &str) -> Vec<String> {
        let (client, conn) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .simple_query(sql)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .collect()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Dropped inside a test's runtime: a thread with its own.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let _ = admin()
                        .await
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                })
        })
        .join();
    }
}
