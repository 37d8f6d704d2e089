//! What the outbox benches commit: one call of plugin `plugin` with one
//! email (500 bytes of text) and one state write (one of 100 keys).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sendbox_outbox::{Call, Outbox, Policy};
use sendbox_types::{Bytes, Email, StateChange};

pub fn call(i: usize, plugin: String) -> Call {
    Call {
        plugin,
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

/// Commits/s, p50, p99, and the writer thread's CPU time per commit.
#[allow(dead_code)] // not every bench commits from threads
pub type Measured = (f64, Duration, Duration, Duration);

/// `threads` callers each committing `per_thread` calls made by `call`
/// (given the call's number), as fast as the outbox answers.
#[allow(dead_code)]
pub fn commit_from(
    outbox: &Arc<Outbox>,
    threads: usize,
    per_thread: usize,
    call: fn(usize) -> Call,
) -> Measured {
    let writer_before = sendbox_test_support::cpu::threads_named("outbox-writer");
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
    let commits = threads * per_thread;
    let writer = (sendbox_test_support::cpu::threads_named("outbox-writer") - writer_before)
        / commits.max(1) as u32;
    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    (
        commits as f64 / elapsed.as_secs_f64(),
        p(0.5),
        p(0.99),
        writer,
    )
}
