//! Outcomes committed per second with fsync on (WAL, synchronous = FULL),
//! one email and one state write each, from 1 and from 64 concurrent
//! callers, side by side: group commit is what makes the second fast.
//!
//! Full run:   cargo bench -p sendbox-outbox --bench commit
//! Smoke run:  cargo test -p sendbox-outbox --bench commit

use std::sync::Arc;
use std::time::{Duration, Instant};

use sendbox_outbox::{Call, Outbox, Policy};
use sendbox_types::{Bytes, Email, StateChange};

fn call(i: usize) -> Call {
    Call {
        plugin: "bench".into(),
        trigger: "webhook".into(),
        event_id: format!("evt-{i}"),
        account: "alerts".into(),
        account_mailbox: "alerts@example.com".into(),
        policy: Policy::default(),
        emails: vec![Email {
            to: vec!["ops@example.com".into()],
            subject: format!("alert {i}"),
            text: Some("x".repeat(500)),
            ..Email::default()
        }],
        state_changes: vec![StateChange::Set {
            key: format!("k{}", i % 100),
            value: Bytes(vec![1; 32]),
        }],
        ..Default::default()
    }
}

fn run(outbox: &Arc<Outbox>, threads: usize, per_thread: usize) -> (f64, Duration, Duration) {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let outbox = outbox.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(per_thread);
                for i in 0..per_thread {
                    let s = Instant::now();
                    outbox.commit(call(t * per_thread + i)).unwrap();
                    lat.push(s.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let elapsed = start.elapsed();
    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    (
        (threads * per_thread) as f64 / elapsed.as_secs_f64(),
        p(0.5),
        p(0.99),
    )
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(Outbox::open(&dir.path().join("bench.db")).unwrap());
    let (serial_n, par_n) = if full { (500, 300) } else { (20, 5) };
    println!("outbox commit, fsync on (WAL, synchronous=FULL), 1 email + 1 state write per call");
    let (rate, p50, p99) = run(&outbox, 1, serial_n);
    println!("   1 caller : {rate:>8.0} commits/s  p50 {p50:>8.2?}  p99 {p99:>8.2?}");
    let (rate, p50, p99) = run(&outbox, 64, par_n);
    println!(
        "  64 callers: {rate:>8.0} commits/s  p50 {p50:>8.2?}  p99 {p99:>8.2?}   (group commit)"
    );
}
