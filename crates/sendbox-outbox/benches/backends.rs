//! The two backends side by side, in one run: durable commits per second
//! (one email and one state write each, as a webhook's plugin call) from 1
//! and from 64 concurrent callers, on SQLite (a file here, one writer, group
//! commit) and on PostgreSQL (the test server: `DATABASE_URL`, else
//! localhost:5432; a fresh database, a pool of 16, `synchronous_commit`
//! on); then 64 callers committing the same alert again and again (one
//! plugin, one idempotency key, no state: one email queued, the rest
//! duplicates), where every commit waits on the key's lock. Rounds
//! alternate; medians and the PostgreSQL / SQLite ratios are printed.
//!
//! Full run:   cargo bench -p sendbox-outbox --bench backends
//! Smoke run:  cargo test -p sendbox-outbox --bench backends

use std::sync::Arc;
use std::time::{Duration, Instant};

use sendbox_outbox::{AnyStore, Call, Outbox, PgOutbox, Store};
use sendbox_test_support::postgres::Database;

mod common;

fn call(i: usize) -> Call {
    common::call(i, format!("bench-{}", i % 8))
}

/// The same alert again: one plugin, one idempotency key, no state.
fn same_alert(i: usize) -> Call {
    let mut c = common::call(i, "alerts".into());
    c.state_changes.clear();
    c.emails[0].idempotency_key = Some("alert-1234-firing".into());
    c
}

/// `callers` tasks committing `each` calls made by `call`; commits/s and
/// p50/p99.
async fn run(
    store: &AnyStore,
    callers: usize,
    each: usize,
    call: fn(usize) -> Call,
) -> (f64, Duration, Duration) {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..callers {
        let store = store.clone();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(each);
            for i in 0..each {
                let s = Instant::now();
                store.commit(call(t * each + i)).await.unwrap();
                lat.push(s.elapsed());
            }
            lat
        });
    }
    let mut lat: Vec<Duration> = tasks.join_all().await.into_iter().flatten().collect();
    let rate = (callers * each) as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    (rate, p(0.5), p(0.99))
}

fn median(runs: &mut [(f64, Duration, Duration)]) -> (f64, Duration, Duration) {
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs[runs.len() / 2]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (serial_n, par_n, rounds) = if full { (1000, 100, 3) } else { (10, 2, 1) };
        let mut results: [[Vec<(f64, Duration, Duration)>; 3]; 2] = Default::default();
        for _ in 0..rounds {
            for (k, backend) in ["sqlite", "postgres"].iter().enumerate() {
                let dir = tempfile::tempdir().unwrap();
                let db = Database::create().await;
                let store: AnyStore = if *backend == "sqlite" {
                    Arc::new(Outbox::open(&dir.path().join("bench.db")).unwrap()).into()
                } else {
                    PgOutbox::connect(&db.url, None, "bench", 16, sendbox_outbox::DEFAULT_LEASE)
                        .await
                        .unwrap()
                        .into()
                };
                results[k][0].push(run(&store, 1, serial_n, call).await);
                results[k][1].push(run(&store, 64, par_n, call).await);
                results[k][2].push(run(&store, 64, par_n, same_alert).await);
                store.close();
            }
        }
        println!(
            "durable commits, 1 email + 1 state write each, SQLite (file, group commit) vs PostgreSQL ({rounds} alternated rounds, medians)"
        );
        let mut med = [[(0.0, Duration::ZERO, Duration::ZERO); 3]; 2];
        let cases = ["1 caller(s)", "64 caller(s)", "64 callers, one key"];
        for (k, name) in ["SQLite    ", "PostgreSQL"].iter().enumerate() {
            for (c, case) in cases.iter().enumerate() {
                let (rate, p50, p99) = median(&mut results[k][c]);
                med[k][c] = (rate, p50, p99);
                println!(
                    "  {name} {case:>19}: {rate:>8.0} commits/s  p50 {p50:>9.2?}  p99 {p99:>9.2?}"
                );
            }
        }
        for (c, case) in cases.iter().enumerate() {
            println!(
                "  PostgreSQL / SQLite at {case:>19}: {:.2}x commits/s",
                med[1][c].0 / med[0][c].0
            );
        }
    });
}
