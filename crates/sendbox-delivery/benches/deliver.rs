//! Messages delivered per second from the outbox to the loopback SMTP peer
//! (STARTTLS + XOAUTH2) by one account worker through at most 3
//! connections, every state change committed (fsync on).
//!
//! Full run:   cargo bench -p sendbox-delivery --bench deliver
//! Smoke run:  cargo test -p sendbox-delivery --bench deliver
//!
//! DESIGN.md's target: ≥ 300 messages/s with ≤ 3 connections.

use sendbox_test_support::peers;
use sendbox_test_support::smtp_peer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sendbox_delivery::{AccountWorker, DeliverySettings};
use sendbox_mail::Transport;
use sendbox_outbox::{Call, Outbox, Policy, State};
use sendbox_types::Email;

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let total = if full { 3000 } else { 30 };
    let p = peers::Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(Outbox::open(&dir.path().join("bench.db")).unwrap());
    for chunk in 0..total / 10 {
        outbox
            .commit(Call {
                plugin: "bench".into(),
                trigger: "cli".into(),
                event_id: format!("e{chunk}"),
                account: "a".into(),
                account_mailbox: "bench@example.com".into(),
                policy: Policy::default(),
                emails: (0..10)
                    .map(|i| Email {
                        to: vec!["ops@example.com".into()],
                        subject: format!("n{chunk}-{i}"),
                        text: Some("x".repeat(2000)),
                        ..Email::default()
                    })
                    .collect(),
                state_changes: vec![],
                ..Default::default()
            })
            .unwrap();
    }
    let (smtp, _) = smtp_peer::starttls(
        &p,
        "bench@example.com",
        &p.info.clients.secret.client_secret,
    );
    let transport = Transport::Smtp(Box::new(smtp));
    let settings = DeliverySettings {
        rate_per_minute: None,
        concurrency: 3,
        poll_interval: Duration::from_millis(20),
        ..DeliverySettings::default()
    };
    let worker = AccountWorker::new(
        "a",
        "bench@example.com",
        transport,
        outbox.clone(),
        settings,
    );
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let start = Instant::now();
    let handle = tokio::spawn(worker.run(async move { s.notified().await }));
    loop {
        let sent = outbox.list(Some(State::Sent), total + 1).unwrap().len();
        if sent == total {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "stuck at {sent}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    stop.notify_one();
    handle.await.unwrap();
    let stats = p.stats().await;
    println!("outbox -> SMTP delivery, one account worker, 2 KB messages, fsync on");
    println!(
        "  {total} messages in {elapsed:.2?}: {:.0} messages/s, max {} connections   target ≥ 300/s, ≤ 3 connections",
        total as f64 / elapsed.as_secs_f64(),
        stats.max_connections
    );
}
