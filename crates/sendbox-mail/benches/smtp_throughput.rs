//! Messages per second delivered to the loopback SMTP peer (smtp-server with
//! STARTTLS + XOAUTH2, every new connection's token introspected at the
//! OAuth peer) through at most 3 connections, as Exchange allows.
//!
//! Full run:   cargo bench -p sendbox-mail --bench smtp_throughput
//! Smoke run:  cargo test -p sendbox-mail --bench smtp_throughput
//!
//! DESIGN.md's target: ≥ 300 messages/s.

use sendbox_test_support::peers;
use sendbox_test_support::smtp_peer;

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use sendbox_mail::message::{self, Envelope};
use sendbox_types::Email;

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let total: usize = if full { 3000 } else { 30 };
    let p = peers::Peers::start();
    let (smtp, _) = smtp_peer::starttls(
        &p,
        "bench@example.com",
        &p.info.clients.secret.client_secret,
    );
    let smtp = Arc::new(smtp);
    let email = Email {
        to: vec!["ops@example.com".into()],
        subject: "throughput".into(),
        text: Some("x".repeat(2000)),
        ..Email::default()
    };
    let build = |i: usize| {
        let id = format!("<bench.{i}@example.com>");
        message::build(
            &email,
            &Envelope {
                account_mailbox: "bench@example.com",
                allowed_from: &[],
                message_id: &id,
                date: SystemTime::now(),
            },
        )
        .unwrap()
    };
    // Warm up: open the pool's connections.
    for i in 0..6 {
        smtp.send(build(i)).await.unwrap();
    }
    p.reset().await;

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let smtp = smtp.clone();
        let msg = build(1000 + i);
        tasks.spawn(async move { smtp.send(msg).await });
        // Keep a bounded number in flight: the transport's cap is 3.
        while tasks.len() >= 12 {
            tasks.join_next().await.unwrap().unwrap().unwrap();
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let elapsed = start.elapsed();
    let got = p.messages().await.len();
    let stats = p.stats().await;
    assert_eq!(got, total, "every message arrived");
    println!("smtp delivery to loopback smtp-server (STARTTLS + XOAUTH2), 2 KB messages");
    println!(
        "  {total} messages in {:.2?}: {:.0} messages/s, max {} connections   target ≥ 300/s, ≤ 3 connections",
        elapsed,
        total as f64 / elapsed.as_secs_f64(),
        stats.max_connections
    );
}
