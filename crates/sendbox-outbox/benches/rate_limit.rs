//! Commits of a plugin with rate limits (`emails_per_hour` and
//! `emails_per_day`) on an outbox that already holds many of its emails in
//! both windows, against the same commits without limits (the anchor),
//! alternated; 64 concurrent callers, fsync on. Also times one count of
//! the window's rows, which every limited commit paid before the writer
//! kept the windows' counts.
//!
//! Full run:   cargo bench -p sendbox-outbox --bench rate_limit
//! Smoke run:  cargo test -p sendbox-outbox --bench rate_limit

use std::sync::Arc;
use std::time::{Duration, Instant};

use sendbox_outbox::{Call, Outbox};

mod common;

/// A commit of plugin `bench` with limits far above what the bench queues
/// (so none is refused and every commit counts its windows).
fn limited(i: usize) -> Call {
    let mut c = common::call(i, "bench".into());
    c.policy.emails_per_hour = Some(100_000_000);
    c.policy.emails_per_day = Some(100_000_000);
    c
}

/// The same commit without limits.
fn unlimited(i: usize) -> Call {
    common::call(i, "bench".into())
}

/// Commits/s and the writer thread's CPU per commit.
fn run(outbox: &Arc<Outbox>, per_thread: usize, limits: bool) -> (f64, Duration) {
    let call = if limits { limited } else { unlimited };
    let (rate, _, _, writer) = common::commit_from(outbox, 64, per_thread, call);
    (rate, writer)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (prefill, per_thread, rounds) = if full { (20_000, 200, 4) } else { (640, 5, 1) };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let outbox = Arc::new(Outbox::open(&path).unwrap());
    run(&outbox, prefill / 64, false);
    let rows: u64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM messages WHERE plugin = 'bench'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    println!(
        "rate-limited commits, 64 callers, fsync on; the plugin has {rows} emails in both windows at the start"
    );
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for limited in [round % 2 == 0, round % 2 == 1] {
            let (rate, writer) = run(&outbox, per_thread, limited);
            println!(
                "  {:<16} {rate:>7.0} commits/s  writer CPU/commit {:>6.1} µs",
                if limited {
                    "hour + day limit"
                } else {
                    "no limit"
                },
                writer.as_secs_f64() * 1e6
            );
            if limited { &mut with } else { &mut without }.push((rate, writer));
        }
    }
    let mean = |v: &[(f64, Duration)]| {
        let n = v.len() as f64;
        (
            v.iter().map(|r| r.0).sum::<f64>() / n,
            v.iter().map(|r| r.1.as_secs_f64()).sum::<f64>() / n * 1e6,
        )
    };
    let (w, wo) = (mean(&with), mean(&without));
    println!(
        "  limited / unlimited: {:.2}x the commits/s, writer CPU {:+.1} µs per commit",
        w.0 / wo.0,
        w.1 - wo.1
    );
    // What each limited commit paid before: one count per window.
    let c = rusqlite::Connection::open(&path).unwrap();
    let since = sendbox_outbox::now_ms() - 86_400_000;
    let k = if full { 50 } else { 2 };
    let t = Instant::now();
    for _ in 0..k {
        let _: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM messages WHERE plugin = 'bench' AND created_ms > ?1",
                [since],
                |r| r.get(0),
            )
            .unwrap();
    }
    println!(
        "  one count of the day's {} rows (what each window cost every limited commit before): {:.1} µs",
        rows + (with.len() + without.len()) as u64 * 64 * per_thread as u64,
        t.elapsed().as_secs_f64() / f64::from(k) * 1e6
    );
}
