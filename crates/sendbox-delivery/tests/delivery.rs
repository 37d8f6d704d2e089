//! Delivery workers between a real SQLite outbox and the real SMTP/OAuth
//! peers: delivery, retries on 4xx, dead on 5xx, waiting out an OAuth
//! outage, pausing on refused credentials, the account's rate.

use sendbox_test_support::peers;
use sendbox_test_support::smtp_peer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use peers::Peers;
use sendbox_delivery::{AccountWorker, DeliverySettings};
use sendbox_mail::Transport;
use sendbox_outbox::{Call, Outbox, Policy, State};
use sendbox_types::Email;

fn transport(p: &Peers, secret: &str) -> Transport {
    Transport::Smtp(Box::new(
        smtp_peer::starttls(p, "alerts@example.com", secret).0,
    ))
}

/// The `alerts` account's worker, sending through the peers with `secret`.
fn alerts_worker(
    p: &Peers,
    secret: &str,
    outbox: &Arc<Outbox>,
    settings: DeliverySettings,
) -> AccountWorker {
    AccountWorker::new(
        "alerts",
        "alerts@example.com",
        transport(p, secret),
        outbox.clone(),
        settings,
    )
}

fn fast() -> DeliverySettings {
    DeliverySettings {
        rate_per_minute: None,
        backoff_base: Duration::from_millis(200),
        backoff_max: Duration::from_millis(400),
        poll_interval: Duration::from_millis(50),
        pause_recheck: Duration::from_secs(3600),
        ..DeliverySettings::default()
    }
}

fn enqueue(outbox: &Outbox, n: usize) -> Vec<i64> {
    let emails = (0..n)
        .map(|i| Email {
            to: vec!["ops@example.com".into()],
            subject: format!("message {i}"),
            text: Some("body".into()),
            ..Email::default()
        })
        .collect();
    commit_emails(outbox, emails)
}

/// Queues `emails` for the `alerts` account; their outbox ids.
fn commit_emails(outbox: &Outbox, emails: Vec<Email>) -> Vec<i64> {
    outbox
        .commit(Call {
            plugin: "p".into(),
            trigger: "cli".into(),
            event_id: "evt".into(),
            account: "alerts".into(),
            account_mailbox: "alerts@example.com".into(),
            policy: Policy::default(),
            emails,
            ..Default::default()
        })
        .unwrap()
        .queued
        .into_iter()
        .map(|q| q.id)
        .collect()
}

fn open() -> (tempfile::TempDir, Arc<Outbox>) {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(Outbox::open(&dir.path().join("o.db")).unwrap());
    (dir, outbox)
}

/// Waits (at most 20 s) until the worker has paused its account.
async fn wait_paused(status: &sendbox_delivery::WorkerStatus) {
    let start = Instant::now();
    while status.paused().is_none() {
        assert!(start.elapsed() < Duration::from_secs(20), "never paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the worker until `done` holds or 20 s pass.
async fn run_until(worker: AccountWorker, outbox: &Arc<Outbox>, done: impl Fn(&Outbox) -> bool) {
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let handle = tokio::spawn(worker.run(async move { s.notified().await }));
    let start = Instant::now();
    while !done(outbox) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {:?}",
            outbox.depth().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.notify_one();
    handle.await.unwrap();
}

fn all_in(state: State, n: usize) -> impl Fn(&Outbox) -> bool {
    move |o| o.list(Some(state), 10_000).unwrap().len() == n
}

#[tokio::test]
async fn queued_messages_are_delivered_once_with_their_message_ids() {
    let p = Peers::start();
    let (_d, outbox) = open();
    let ids = enqueue(&outbox, 10);
    let worker = alerts_worker(&p, &p.info.clients.secret.client_secret, &outbox, fast());
    run_until(worker, &outbox, all_in(State::Sent, 10)).await;
    let got = p.messages().await;
    assert_eq!(got.len(), 10);
    for id in ids {
        let m = outbox.get(id).unwrap();
        assert!(
            m.last_reply.as_deref().unwrap().starts_with("250"),
            "{:?}",
            m.last_reply
        );
        assert_eq!(
            got.iter().filter(|r| r.raw.contains(&m.message_id)).count(),
            1
        );
    }
}

#[tokio::test]
async fn a_451_is_retried_until_delivered() {
    let p = Peers::start();
    p.faults(serde_json::json!([{ "stage": "rcpt", "code": 451, "message": "4.3.0 Try again later", "count": 4 }])).await;
    let (_d, outbox) = open();
    let ids = enqueue(&outbox, 2);
    let worker = alerts_worker(&p, &p.info.clients.secret.client_secret, &outbox, fast());
    run_until(worker, &outbox, all_in(State::Sent, 2)).await;
    assert_eq!(p.messages().await.len(), 2);
    let attempts: u32 = ids.iter().map(|id| outbox.get(*id).unwrap().attempts).sum();
    assert_eq!(attempts, 6, "4 refused attempts and 2 good ones");
    let trail = outbox.audit_trail(ids[0]).unwrap();
    assert!(
        trail
            .iter()
            .any(|a| a.to == "retry" && a.detail.as_deref().unwrap_or("").contains("451"))
    );
}

#[tokio::test]
async fn a_550_goes_dead_with_the_reply() {
    let p = Peers::start();
    p.faults(serde_json::json!([{ "stage": "rcpt", "code": 550, "message": "5.1.1 User unknown", "count": 1 }])).await;
    let (_d, outbox) = open();
    let ids = enqueue(&outbox, 1);
    let worker = alerts_worker(&p, &p.info.clients.secret.client_secret, &outbox, fast());
    run_until(worker, &outbox, all_in(State::Dead, 1)).await;
    let m = outbox.get(ids[0]).unwrap();
    assert!(m.last_reply.unwrap().contains("5.1.1 User unknown"));
    assert!(p.messages().await.is_empty());
}

#[tokio::test]
async fn messages_wait_out_an_oauth_outage() {
    let p = Peers::start();
    p.oauth_down(true).await;
    let (_d, outbox) = open();
    enqueue(&outbox, 3);
    let worker = alerts_worker(&p, &p.info.clients.secret.client_secret, &outbox, fast());
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let handle = tokio::spawn(worker.run(async move { s.notified().await }));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(p.messages().await.is_empty());
    assert!(
        outbox.list(Some(State::Dead), 10).unwrap().is_empty(),
        "an outage kills nothing"
    );
    assert!(
        !outbox.list(Some(State::Retry), 10).unwrap().is_empty(),
        "waiting to retry"
    );
    p.oauth_down(false).await;
    let start = Instant::now();
    while outbox.list(Some(State::Sent), 10).unwrap().len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "not delivered after the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.notify_one();
    handle.await.unwrap();
    assert_eq!(p.messages().await.len(), 3);
}

#[tokio::test]
async fn refused_credentials_pause_the_account_without_burning_the_message() {
    let p = Peers::start();
    let (_d, outbox) = open();
    // The probe goes alone; the round claims the others ahead with it.
    let ids = enqueue(&outbox, 6);
    let worker = alerts_worker(&p, "wrong-secret", &outbox, fast());
    let status = worker.status();
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let handle = tokio::spawn(worker.run(async move { s.notified().await }));
    wait_paused(&status).await;
    assert!(status.paused().unwrap().contains("invalid_client"));
    let requests = p.stats().await.token_requests;
    assert_eq!(
        requests, 1,
        "the first message goes alone: one refused attempt"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        p.stats().await.token_requests,
        requests,
        "paused: no more requests"
    );
    stop.notify_one();
    handle.await.unwrap();
    let mut attempts = Vec::new();
    for id in ids {
        let m = outbox.get(id).unwrap();
        assert_eq!(m.state, State::Queued, "kept for after the fix");
        attempts.push(m.attempts);
    }
    // Only the probe was attempted: the messages claimed with it and
    // handed back unattempted count none.
    attempts.sort();
    assert_eq!(
        attempts,
        [0, 0, 0, 0, 0, 1],
        "no retries burnt while paused"
    );
}

#[tokio::test]
async fn the_account_rate_is_honoured() {
    let p = Peers::start();
    let (_d, outbox) = open();
    enqueue(&outbox, 8);
    let settings = DeliverySettings {
        rate_per_minute: Some(300), // one every 200 ms
        ..fast()
    };
    let worker = alerts_worker(&p, &p.info.clients.secret.client_secret, &outbox, settings);
    let start = Instant::now();
    run_until(worker, &outbox, all_in(State::Sent, 8)).await;
    // 8 sends at one per 200 ms cannot finish in under 7 intervals.
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(p.messages().await.len(), 8);
}

#[tokio::test]
async fn a_pause_is_recorded_for_check_and_a_transient_failure_past_max_age_goes_dead() {
    let p = Peers::start();
    let (_d, outbox) = open();
    enqueue(&outbox, 1);
    let worker = alerts_worker(&p, "wrong-secret", &outbox, fast());
    run_until(worker, &outbox, |o| {
        !o.paused_accounts().unwrap().is_empty()
    })
    .await;
    let paused = outbox.paused_accounts().unwrap();
    assert_eq!(paused[0].0, "alerts");
    assert!(paused[0].2.contains("invalid_client"), "{paused:?}");

    // Max age: a 4xx on a message older than max_age is final.
    let (_d2, outbox) = open();
    p.faults(
        serde_json::json!([{ "stage": "rcpt", "code": 451, "message": "4.3.0 later", "count": 1 }]),
    )
    .await;
    let ids = enqueue(&outbox, 1);
    let settings = DeliverySettings {
        max_age: Duration::ZERO,
        ..fast()
    };
    let worker = alerts_worker(&p, &p.info.clients.secret.client_secret, &outbox, settings);
    run_until(worker, &outbox, all_in(State::Dead, 1)).await;
    assert!(
        outbox
            .get(ids[0])
            .unwrap()
            .last_reply
            .unwrap()
            .starts_with("gave up after")
    );
}

#[tokio::test]
async fn a_refused_recipient_is_recorded_and_the_others_get_the_message() {
    let p = Peers::start();
    p.faults(serde_json::json!([
        {"stage": "rcpt", "address": "gone@example.com", "code": 550, "message": "5.1.1 User unknown", "count": 1}
    ]))
    .await;
    let (_d, outbox) = open();
    let id = commit_emails(
        &outbox,
        vec![Email {
            to: vec!["ops@example.com".into(), "gone@example.com".into()],
            subject: "two recipients".into(),
            text: Some("body".into()),
            ..Email::default()
        }],
    )[0];
    let worker = alerts_worker(&p, &p.info.clients.secret.client_secret, &outbox, fast());
    run_until(worker, &outbox, all_in(State::Sent, 1)).await;
    let got = p.messages().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].to, ["ops@example.com"]);
    let m = outbox.get(id).unwrap();
    assert_eq!(m.attempts, 1, "not resent to the one who took it");
    let reply = m.last_reply.unwrap();
    assert!(reply.starts_with("250"), "{reply}");
    assert!(
        reply.contains("refused gone@example.com") && reply.contains("550"),
        "{reply}"
    );
}

#[tokio::test]
async fn a_paused_account_waits_for_its_recheck_whatever_arrives_meanwhile() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let p = Peers::start();
    let (_d, outbox) = open();
    enqueue(&outbox, 1);
    let recheck = Duration::from_millis(1500);
    let settings = DeliverySettings {
        pause_recheck: recheck,
        ..fast()
    };
    let worker = alerts_worker(&p, "wrong-secret", &outbox, settings);
    let (status, waker) = (worker.status(), worker.waker());
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let handle = tokio::spawn(worker.run(async move { s.notified().await }));
    wait_paused(&status).await;
    // A stream of new messages, each waking the worker, for two recheck
    // periods.
    let paused_at = Instant::now();
    while paused_at.elapsed() < recheck * 2 {
        enqueue(&outbox, 1);
        waker.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = paused_at.elapsed();
    stop.notify_one();
    handle.await.unwrap();
    let refused = status
        .attempts()
        .into_iter()
        .find(|(r, _)| *r == "account_refused")
        .map_or(0, |(_, n)| n);
    // The attempt that paused it, then exactly one per recheck period (the
    // first message of a round goes alone): never one per new message (~60
    // here) nor one per connection.
    let periods = (elapsed.as_millis() / recheck.as_millis()) as u64;
    assert!(
        (periods..=periods + 1).contains(&refused),
        "{refused} refused attempts in {elapsed:?} with a {recheck:?} recheck"
    );
}

/// Polls `cond` every millisecond for at most 10 s.
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn count(outbox: &Outbox, state: State) -> u64 {
    outbox
        .depth()
        .unwrap()
        .into_iter()
        .find(|(s, _)| *s == state)
        .map_or(0, |(_, n)| n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_go_on_while_their_results_wait_to_be_written() {
    let p = Peers::start();
    let (dir, outbox) = open();
    let ids = enqueue(&outbox, 40);
    let worker = alerts_worker(&p, &p.info.clients.secret.client_secret, &outbox, fast());
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let handle = tokio::spawn(worker.run(async move { s.notified().await }));
    // The worker claims ahead: all 40 at once, before its first send ends
    // (that one opens a connection and fetches a token).
    wait_for("the claim", || count(&outbox, State::Sending) == 40).await;
    // Another process takes the database's write lock: no result can be
    // written until it lets go.
    let other = rusqlite::Connection::open(dir.path().join("o.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let start = Instant::now();
    while p.messages().await.len() < 40 {
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "sends stopped while results could not be written: {} of 40 at the server",
            p.messages().await.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        count(&outbox, State::Sent),
        0,
        "every message reached the server before any result was on record"
    );
    other.execute_batch("COMMIT").unwrap();
    wait_for("the results", || count(&outbox, State::Sent) == 40).await;
    stop.notify_one();
    handle.await.unwrap();
    let got = p.messages().await;
    assert_eq!(got.len(), 40);
    for id in ids {
        let m = outbox.get(id).unwrap();
        assert_eq!(m.attempts, 1);
        let copies = got.iter().filter(|r| r.raw.contains(&m.message_id)).count();
        assert_eq!(copies, 1, "{} sent once", m.message_id);
    }
    let max = p.stats().await.max_connections;
    assert!(max <= 3, "the connection cap held: {max}");
}

#[tokio::test]
async fn stopping_sends_what_was_claimed_and_claims_nothing_more() {
    let p = Peers::start();
    let (_d, outbox) = open();
    enqueue(&outbox, 6);
    let settings = DeliverySettings {
        // One every 500 ms: under a rate the worker claims only what can go
        // soon (its 3 connections' worth).
        rate_per_minute: Some(120),
        ..fast()
    };
    let worker = alerts_worker(&p, &p.info.clients.secret.client_secret, &outbox, settings);
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let handle = tokio::spawn(worker.run(async move { s.notified().await }));
    wait_for("the first message", || count(&outbox, State::Sent) == 1).await;
    let claimed = count(&outbox, State::Sending);
    assert!(claimed > 0, "more were claimed, waiting for their slot");
    stop.notify_one();
    handle.await.unwrap();
    assert_eq!(count(&outbox, State::Sending), 0, "nothing left claimed");
    assert_eq!(
        count(&outbox, State::Sent),
        1 + claimed,
        "the claimed ones were sent"
    );
    assert_eq!(
        count(&outbox, State::Queued),
        6 - 1 - claimed,
        "no more were claimed"
    );
    assert_eq!(p.messages().await.len() as u64, 1 + claimed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_claimed_ahead_stays_within_its_byte_budget() {
    let p = Peers::start();
    let (dir, outbox) = open();
    let emails = (0..20)
        .map(|i| Email {
            to: vec!["ops@example.com".into()],
            subject: format!("large {i}"),
            text: Some("x".repeat(100_000)),
            ..Email::default()
        })
        .collect();
    let ids = commit_emails(&outbox, emails);
    let each = outbox.get(ids[0]).unwrap().email.content_bytes();
    let settings = DeliverySettings {
        claim_ahead_bytes: 3 * each,
        ..fast()
    };
    let worker = alerts_worker(&p, &p.info.clients.secret.client_secret, &outbox, settings);
    let stop = Arc::new(tokio::sync::Notify::new());
    let s = stop.clone();
    let handle = tokio::spawn(worker.run(async move { s.notified().await }));
    wait_for("the first claim", || count(&outbox, State::Sending) > 0).await;
    // Nothing can be written for a while: whatever the worker holds now is
    // all it claimed ahead, and it may claim no more until sends finish.
    let other = rusqlite::Connection::open(dir.path().join("o.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        count(&outbox, State::Sending),
        3,
        "3 messages' worth claimed ahead, not the 20 due"
    );
    assert!(p.messages().await.len() <= 3);
    other.execute_batch("COMMIT").unwrap();
    wait_for("all sent", || count(&outbox, State::Sent) == 20).await;
    stop.notify_one();
    handle.await.unwrap();
    assert_eq!(p.messages().await.len(), 20, "each once");
}
