//! Delivery from a shared PostgreSQL outbox by 1, 2 and 3 nodes: messages
//! per second to the loopback SMTP peer (STARTTLS + XOAUTH2), and the most
//! connections open at once per mailbox.
//!
//! - **One account** (3 connections): more nodes share the account's three
//!   connection slots, so they cannot go faster than one node — the numbers
//!   show the cluster-wide limit holding and what sharing it costs.
//! - **Three accounts** (3 connections each): one node delivering all three
//!   against three nodes each delivering all three.
//!
//! Both are measured twice: against a peer that answers at once, where
//! the nodes, the peer and PostgreSQL compete for this machine's 2 cores
//! (more nodes in one machine add no CPU), and against a peer that answers
//! DATA after 100 ms as a provider does, where an account's throughput is
//! its connections' and three nodes on three accounts should deliver
//! about three times what one node does on one.
//!
//! Each node is a `PgOutbox` of its own (own name, own connections, own
//! leases) with its own workers, in this one process: on a 2-core machine
//! the nodes, the SMTP peer and PostgreSQL share the same cores whichever
//! way they are run. Every case starts from a full outbox (2 KB messages)
//! and stops when the peer has every message.
//!
//! Full run:   cargo bench -p sendbox-delivery --bench cluster
//! Smoke run:  cargo test -p sendbox-delivery --bench cluster

/// The daemon's allocator (`crates/sendbox/src/lib.rs`), so this measures
/// what the daemon runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sendbox_test_support::peers;
use sendbox_test_support::postgres::Database;
use sendbox_test_support::smtp_peer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sendbox_delivery::{AccountWorker, DeliverySettings};
use sendbox_mail::Transport;
use sendbox_outbox::{Call, PgOutbox, Policy, Store};
use sendbox_types::Email;

/// Fills the outbox with `n` messages for each of `accounts`.
async fn fill(outbox: &Arc<PgOutbox>, accounts: &[String], n: usize) {
    for account in accounts {
        for chunk in 0..n.div_ceil(50) {
            let emails = (0..50.min(n - chunk * 50))
                .map(|i| Email {
                    to: vec!["ops@example.com".into()],
                    subject: format!("{account} {chunk}-{i}"),
                    text: Some("x".repeat(2000)),
                    ..Email::default()
                })
                .collect();
            Store::commit(
                outbox,
                Call {
                    plugin: "bench".into(),
                    trigger: "cli".into(),
                    event_id: format!("{account}-{chunk}"),
                    account: account.clone(),
                    account_mailbox: format!("{account}@example.com"),
                    policy: Policy::default(),
                    emails,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        }
    }
}

/// `nodes` nodes, each running a worker for every one of `accounts`,
/// deliver `per_account` messages of each; messages per second and the
/// most connections any mailbox had open at once.
async fn case(
    p: &peers::Peers,
    nodes: usize,
    accounts: usize,
    per_account: usize,
    provider_ms: u64,
) -> (f64, u64) {
    let db = Database::create().await;
    let names: Vec<String> = (0..accounts).map(|a| format!("acct{a}")).collect();
    let mut outboxes = Vec::new();
    for k in 0..nodes {
        outboxes.push(
            PgOutbox::connect(
                &db.url,
                None,
                &format!("node{k}"),
                4,
                Duration::from_secs(30),
            )
            .await
            .unwrap(),
        );
    }
    fill(&outboxes[0], &names, per_account).await;
    p.reset().await;
    if provider_ms > 0 {
        // Every message accepted only after this long, as a provider's
        // servers take a while to answer DATA.
        p.faults(serde_json::json!([{"stage": "data", "count": 1_000_000_000u64, "hold_ms": provider_ms}]))
            .await;
    }
    let total = (accounts * per_account) as u64;
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    let settings = DeliverySettings {
        rate_per_minute: None,
        concurrency: 3,
        poll_interval: Duration::from_millis(20),
        ..DeliverySettings::default()
    };
    let start = Instant::now();
    for outbox in &outboxes {
        for account in &names {
            let mailbox = format!("{account}@example.com");
            let smtp = smtp_peer::starttls(p, &mailbox, &p.info.clients.secret.client_secret).0;
            let worker = AccountWorker::new(
                account,
                &mailbox,
                Transport::Smtp(Box::new(smtp)),
                outbox.clone(),
                settings.clone(),
            );
            let s = stop.clone();
            tasks.spawn(worker.run(async move { s.notified().await }));
        }
    }
    loop {
        let got = p.stats().await.messages;
        if got >= total {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "stuck at {got} of {total}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed = start.elapsed();
    stop.notify_waiters();
    tasks.join_all().await;
    let stats = p.stats().await;
    assert_eq!(stats.messages, total, "every message once");
    let most = stats
        .max_connections_by_user
        .values()
        .copied()
        .max()
        .unwrap_or(0);
    assert!(most <= 3, "{most} connections to one mailbox (limit 3)");
    (total as f64 / elapsed.as_secs_f64(), most)
}

/// How long the provider takes to answer DATA in the second part: the
/// order of what Exchange Online and Gmail take for a small message.
const PROVIDER_MS: u64 = 100;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (per_account, slow_per_account, runs) = if full { (1500, 300, 3) } else { (20, 6, 1) };
    let p = peers::Peers::start();
    let mut medians = std::collections::HashMap::new();
    let parts = [
        (
            0,
            per_account,
            "a peer that answers at once (CPU-bound: every node shares these 2 cores)",
        ),
        (
            PROVIDER_MS,
            slow_per_account,
            "a peer that answers DATA after 100 ms, as a provider does (bound by connections, not CPU)",
        ),
    ];
    for (provider_ms, per_account, what) in parts {
        println!(
            "delivery from one PostgreSQL outbox by 1-3 nodes, {what}: 2 KB messages, 3 connections per account, median of {runs} run(s)"
        );
        for accounts in [1, 3] {
            for nodes in 1..=3 {
                if nodes == 2 && (accounts == 3 || provider_ms > 0) {
                    continue;
                }
                let mut rates = Vec::new();
                let mut most = 0;
                for _ in 0..runs {
                    let (r, m) = case(&p, nodes, accounts, per_account, provider_ms).await;
                    rates.push(r);
                    most = most.max(m);
                }
                rates.sort_by(f64::total_cmp);
                let median = rates[rates.len() / 2];
                medians.insert((provider_ms, accounts, nodes), median);
                println!(
                    "  {accounts} account(s), {nodes} node(s): {median:>6.0} messages/s (runs {:.0}..{:.0}), at most {most} connections per mailbox",
                    rates[0],
                    rates[rates.len() - 1]
                );
            }
        }
        let m = |a, n| medians[&(provider_ms, a, n)];
        println!(
            "  one account, 3 nodes / 1 node: {:.2}x (the account's 3 connections shared)",
            m(1, 3) / m(1, 1)
        );
        println!(
            "  three accounts, 3 nodes / 1 node: {:.2}x",
            m(3, 3) / m(3, 1)
        );
        println!(
            "  three nodes on three accounts / one node on one account: {:.2}x",
            m(3, 3) / m(1, 1)
        );
    }
}
