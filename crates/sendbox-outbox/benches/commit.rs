//! Outcomes committed per second with fsync on (WAL, synchronous = FULL),
//! one email and one state write each, from 1 and from 64 concurrent
//! callers, side by side: group commit is what makes the second fast.
//! Each as sendbox runs it (the writer finishes each checkpoint pass, so
//! the WAL starts over every ~100 ms and commits overwrite its file) and,
//! as the baseline, with the checkpoint thread alone (the WAL file grows to
//! the 64 MiB backstop and commits append to it), alternated; the ratios
//! are printed.
//!
//! Full run:   cargo bench -p sendbox-outbox --bench commit
//! Smoke run:  cargo test -p sendbox-outbox --bench commit

use std::sync::Arc;

use sendbox_outbox::{Call, Outbox};

mod common;
use common::Measured;

fn call(i: usize) -> Call {
    common::call(i, "bench".into())
}

fn run(outbox: &Arc<Outbox>, threads: usize, per_thread: usize) -> Measured {
    common::commit_from(outbox, threads, per_thread, call)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (serial_n, par_n) = if full { (2000, 600) } else { (20, 5) };
    println!("outbox commit, fsync on (WAL, synchronous=FULL), 1 email + 1 state write per call");
    // The same database twice, alternating: with its WAL file grown ahead
    // (as sendbox opens it), and growing as it is written (the baseline).
    let rounds = if full { 3 } else { 1 };
    let mut serial: [Vec<Measured>; 2] = Default::default();
    let mut group: [Vec<Measured>; 2] = Default::default();
    let mut wal_mib: [Vec<u64>; 2] = Default::default();
    for _ in 0..rounds {
        for (k, catch_up) in [(0, true), (1, false)] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bench.db");
            let wal = dir.path().join("bench.db-wal");
            let outbox = Arc::new(Outbox::open_with_catch_up(&path, catch_up).unwrap());
            serial[k].push(run(&outbox, 1, serial_n));
            group[k].push(run(&outbox, 64, par_n));
            wal_mib[k].push(std::fs::metadata(&wal).map_or(0, |m| m.len()) >> 20);
        }
    }
    for (k, what) in [(0, "WAL starting over"), (1, "WAL growing (baseline)")] {
        let (rate, p50, p99, cpu) = median(&mut serial[k]);
        println!(
            "   1 caller , {what:23}: {rate:>8.0} commits/s  p50 {p50:>8.2?}  p99 {p99:>8.2?}  writer CPU/commit {cpu:>8.2?}"
        );
        let (rate, p50, p99, cpu) = median(&mut group[k]);
        println!(
            "  64 callers, {what:23}: {rate:>8.0} commits/s  p50 {p50:>8.2?}  p99 {p99:>8.2?}  writer CPU/commit {cpu:>8.2?}   (group commit)"
        );
        println!("  WAL file at the end, MiB: {:?}", wal_mib[k]);
    }
    let ratio = |runs: &mut [Vec<Measured>; 2]| {
        let a = median(&mut runs[0]);
        let b = median(&mut runs[1]);
        (a.0 / b.0, a.1.as_secs_f64() / b.1.as_secs_f64())
    };
    let (rate, p50) = ratio(&mut serial);
    println!("  starting over / growing, 1 caller : {rate:.2}x commits/s, p50 {p50:.2}x");
    let (rate, p50) = ratio(&mut group);
    println!(
        "  starting over / growing, 64 callers: {rate:.2}x commits/s, p50 {p50:.2}x   ({rounds} alternated rounds, medians)"
    );
}

/// The median round by rate (its own p50 and p99).
fn median(runs: &mut [Measured]) -> Measured {
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs[runs.len() / 2]
}
