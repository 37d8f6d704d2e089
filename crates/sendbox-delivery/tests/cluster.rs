//! Delivery workers of three nodes on one PostgreSQL outbox, against the
//! real SMTP/OAuth peers: the account's rate and connection limit hold for
//! the nodes together, and a refused account is paused for all of them at
//! the cost of one probe per recheck.

use sendbox_test_support::peers;
use sendbox_test_support::postgres::Database;
use sendbox_test_support::smtp_peer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use peers::Peers;
use sendbox_delivery::{AccountWorker, DeliverySettings, WorkerStatus};
use sendbox_mail::Transport;
use sendbox_outbox::{Call, PgOutbox, Policy, State, Store};
use sendbox_types::Email;

const MAILBOX: &str = "alerts@example.com";

/// Node `k`'s view of the database (leases of 10 s).
async fn node(db: &Database, k: usize) -> Arc<PgOutbox> {
    PgOutbox::connect(&db.url, None, &format!("n{k}"), 4, Duration::from_secs(10))
        .await
        .unwrap()
}

/// Queues `n` messages for the `alerts` account through `outbox`.
async fn enqueue(outbox: &Arc<PgOutbox>, n: usize, tag: &str) {
    let emails = (0..n)
        .map(|i| Email {
            to: vec!["ops@example.com".into()],
            subject: format!("{tag} {i}"),
            text: Some("body".into()),
            ..Email::default()
        })
        .collect();
    Store::commit(
        outbox,
        Call {
            plugin: "p".into(),
            trigger: "cli".into(),
            event_id: format!("evt-{tag}"),
            account: "alerts".into(),
            account_mailbox: MAILBOX.into(),
            policy: Policy::default(),
            emails,
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

/// Starts the `alerts` worker of each node, sending with `secret`; the
/// statuses and a stop that ends them all.
fn run_workers(
    p: &Peers,
    nodes: &[Arc<PgOutbox>],
    secret: &str,
    settings: &DeliverySettings,
) -> (
    Vec<Arc<WorkerStatus>>,
    Arc<tokio::sync::Notify>,
    tokio::task::JoinSet<()>,
) {
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    let mut statuses = Vec::new();
    for outbox in nodes {
        let worker = AccountWorker::new(
            "alerts",
            MAILBOX,
            Transport::Smtp(Box::new(smtp_peer::starttls(p, MAILBOX, secret).0)),
            outbox.clone(),
            settings.clone(),
        );
        statuses.push(worker.status());
        let s = stop.clone();
        tasks.spawn(worker.run(async move { s.notified().await }));
    }
    (statuses, stop, tasks)
}

/// Waits (at most 60 s) until the SMTP peer has `n` messages.
async fn wait_for_messages(p: &Peers, n: usize) {
    let started = Instant::now();
    while p.stats().await.messages < n as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {} of {n} arrived",
            p.stats().await.messages
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn settings() -> DeliverySettings {
    DeliverySettings {
        rate_per_minute: None,
        concurrency: 2,
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_millis(400),
        poll_interval: Duration::from_millis(50),
        pause_recheck: Duration::from_secs(3600),
        ..DeliverySettings::default()
    }
}

/// Counts, for each window of `width` starting at an arrival, the arrivals
/// in it; the largest.
fn most_in_any_window(times: &[i64], width: i64) -> usize {
    times
        .iter()
        .map(|&t| times.iter().filter(|&&u| u >= t && u < t + width).count())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accounts_rate_and_connections_hold_for_three_nodes_together() {
    let p = Peers::start();
    let db = Database::create().await;
    let nodes = vec![node(&db, 1).await, node(&db, 2).await, node(&db, 3).await];
    let n = 60;
    enqueue(&nodes[0], n, "paced").await;
    // 600 a minute: one send every 100 ms whichever node sends it; two
    // connections for the three nodes.
    let settings = DeliverySettings {
        rate_per_minute: Some(600),
        ..settings()
    };
    let (_, stop, tasks) = run_workers(&p, &nodes, &p.app_env().1, &settings);
    wait_for_messages(&p, n).await;
    stop.notify_waiters();
    tasks.join_all().await;

    let mut times: Vec<i64> = p.messages().await.iter().map(|m| m.at_ms).collect();
    times.sort_unstable();
    assert_eq!(times.len(), n);
    // Sends start at least 100 ms apart, whichever node sends: at most 10
    // start in any second, plus one on the window's edge. A message
    // arrives a send's time after its start: a few ms on an open
    // connection, up to a few hundred on a new one (token, TLS; a node's
    // turn that comes while its first send is still connecting is used
    // late), so the first messages of the run may arrive bunched with the
    // next ones: up to three more in a window, and the whole run up to a
    // second shorter. Three nodes pacing alone would send 30 a second.
    let busiest = most_in_any_window(&times, 1000);
    let busiest_3s = most_in_any_window(&times, 3000);
    let span = times[n - 1] - times[0];
    eprintln!(
        "{n} messages over {span} ms; at most {busiest} in any second, {busiest_3s} in any 3 s"
    );
    assert!(busiest <= 14, "{busiest} arrivals in one second at 600/min");
    assert!(busiest_3s <= 34, "{busiest_3s} arrivals in 3 s at 600/min");
    assert!(
        span >= (n as i64 - 1) * 100 - 1000,
        "{n} messages in {span} ms at 600/min"
    );
    let stats = p.stats().await;
    let most = stats.max_connections_by_user.get(MAILBOX).copied();
    assert!(
        most.is_some_and(|m| (1..=2).contains(&m)),
        "connections at once for the mailbox: {most:?} (limit 2)"
    );
    // The sends were shared: more than one node claimed messages.
    let claimers = db
        .query("SELECT COUNT(DISTINCT detail) FROM audit WHERE detail LIKE 'claimed by node %'")
        .await;
    assert!(
        claimers[0].parse::<u32>().unwrap() >= 2,
        "nodes that sent: {claimers:?}"
    );
    let sent = nodes[0].list(Some(State::Sent), 1000).await.unwrap();
    assert_eq!(sent.len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_without_a_rate_never_open_more_than_the_accounts_connections() {
    let p = Peers::start();
    let db = Database::create().await;
    let nodes = vec![node(&db, 1).await, node(&db, 2).await, node(&db, 3).await];
    let n = 600;
    for (k, outbox) in nodes.iter().enumerate() {
        enqueue(outbox, n / 3, &format!("burst-{k}")).await;
    }
    let (_, stop, tasks) = run_workers(&p, &nodes, &p.app_env().1, &settings());
    wait_for_messages(&p, n).await;
    stop.notify_waiters();
    tasks.join_all().await;
    let stats = p.stats().await;
    assert_eq!(stats.messages, n as u64, "each message once");
    let most = stats.max_connections_by_user.get(MAILBOX).copied();
    eprintln!("{n} messages; at most {most:?} connections at once");
    assert!(
        most.is_some_and(|m| (1..=2).contains(&m)),
        "connections at once for the mailbox: {most:?} (limit 2 for the three nodes)"
    );
    // Idle nodes keep no slot: every slot is free again.
    let held = db
        .query("SELECT COUNT(*) FROM account_slots WHERE node IS NOT NULL")
        .await;
    assert_eq!(held, ["0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_account_is_paused_on_every_node_for_one_probe_per_recheck() {
    let p = Peers::start();
    let db = Database::create().await;
    let nodes = vec![node(&db, 1).await, node(&db, 2).await, node(&db, 3).await];
    enqueue(&nodes[0], 3, "first").await;
    let recheck = Duration::from_millis(1000);
    let settings = DeliverySettings {
        pause_recheck: recheck,
        ..settings()
    };
    let (statuses, stop, tasks) = run_workers(&p, &nodes, "wrong-secret", &settings);
    // Every node shows the account paused, whichever was refused.
    let start = Instant::now();
    while !statuses.iter().all(|s| s.paused().is_some()) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "paused on {} of 3 nodes",
            statuses.iter().filter(|s| s.paused().is_some()).count()
        );
        // More mail on every node meanwhile: none of it ends the pause.
        for outbox in &nodes {
            enqueue(outbox, 1, "more").await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused_then = refused(&statuses);
    let paused_at = Instant::now();
    // Four periods and a half: a probe that comes a little late (a loaded
    // machine) still falls inside, where four exactly would end on one.
    while paused_at.elapsed() < recheck * 4 + recheck / 2 {
        for outbox in &nodes {
            enqueue(outbox, 1, "during").await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = paused_at.elapsed();
    stop.notify_waiters();
    tasks.join_all().await;
    // One probe per recheck for the three nodes together (one node per
    // recheck would be three).
    let probes = refused(&statuses) - refused_then;
    let periods = (elapsed.as_millis() / recheck.as_millis()) as u64;
    eprintln!("{probes} refused probes in {elapsed:?} with a {recheck:?} recheck, 3 nodes");
    assert!(
        (periods.saturating_sub(1)..=periods + 1).contains(&probes),
        "{probes} refused probes in {elapsed:?} with a {recheck:?} recheck on 3 nodes"
    );
    let paused = nodes[2].paused_accounts().await.unwrap();
    assert_eq!(paused.len(), 1, "{paused:?}");
    assert_eq!(paused[0].0, "alerts");
    assert_eq!(p.stats().await.messages, 0);
}

/// Refused attempts on all the nodes together.
fn refused(statuses: &[Arc<WorkerStatus>]) -> u64 {
    statuses
        .iter()
        .flat_map(|s| s.attempts())
        .filter(|(r, _)| *r == "account_refused")
        .map(|(_, n)| n)
        .sum()
}
