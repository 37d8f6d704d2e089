//! Crash safety of the real `sendbox deliver` process against the real
//! peers: kill -9 at moments spread over the delivery of 1,000 messages,
//! restart, and check at the SMTP peer that every message arrived, counting
//! the ones that arrived twice. Also: SIGTERM drains gracefully.

use sendbox_test_support::peers;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peers::Peers;
use sendbox_outbox::{Call, Outbox, Policy, State};
use sendbox_types::Email;

fn config(p: &Peers, dir: &Path) -> String {
    let path = dir.join("sendbox.toml");
    let text = format!("[daemon]\nstore = \"var/outbox.db\"\n{}", p.app_account());
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn enqueue(store: &Path, n: usize) -> Vec<String> {
    let outbox = Outbox::open(store).unwrap();
    let mut ids = Vec::new();
    for chunk in 0..(n / 100) {
        let emails = (0..100)
            .map(|i| Email {
                to: vec!["ops@example.com".into()],
                subject: format!("message {}", chunk * 100 + i),
                text: Some("body".into()),
                ..Email::default()
            })
            .collect();
        let done = outbox
            .commit(Call {
                plugin: "p".into(),
                trigger: "cli".into(),
                event_id: format!("evt-{chunk}"),
                account: "app".into(),
                account_mailbox: "alerts@example.com".into(),
                policy: Policy {
                    recipients_per_email: 10,
                    ..Policy::default()
                },
                emails,
                state_changes: vec![],
                ..Default::default()
            })
            .unwrap();
        ids.extend(done.queued.into_iter().map(|q| q.message_id));
    }
    ids
}

fn deliver(cfg: &str, p: &Peers, until_empty: bool) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sendbox"));
    cmd.args(["deliver", "--config", cfg])
        .env(
            "SENDBOX_TEST_APP_SECRET",
            &p.info.clients.secret.client_secret,
        )
        .env("SENDBOX_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if until_empty {
        cmd.arg("--until-empty");
    }
    cmd.spawn().expect("sendbox starts")
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("sendbox did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_delivery_loses_nothing() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&p, dir.path());
    let store = dir.path().join("var/outbox.db");
    let ids = enqueue(&store, 1000);

    // Kill at moments spread over the run (deterministic spread, not
    // wall-clock dependent for correctness: any kill point must be safe).
    let mut kills = 0;
    for delay_ms in [150u64, 300, 80, 450, 220, 600] {
        let mut child = deliver(&cfg, &p, true);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            let _ = child.wait();
            kills += 1;
        }
    }
    let mut child = deliver(&cfg, &p, true);
    let status = tokio::task::spawn_blocking(move || wait(&mut child, Duration::from_secs(120)))
        .await
        .unwrap();
    assert!(status.success());

    let received = p.messages().await;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for id in &ids {
        let n = received
            .iter()
            .filter(|m| m.raw.contains(id.as_str()))
            .count();
        seen.insert(id, n);
    }
    let lost: Vec<&&str> = seen
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(id, _)| id)
        .collect();
    let twice = seen.values().filter(|n| **n > 1).count();
    println!(
        "kill -9 test: {kills} kills, {} messages, {} received, {} lost, {twice} arrived more than once",
        ids.len(),
        received.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "lost {} messages", lost.len());
    let outbox = Outbox::open(&store).unwrap();
    assert_eq!(outbox.list(Some(State::Sent), 10_000).unwrap().len(), 1000);
    // A duplicate is recognisable: same Message-ID.
    assert_eq!(
        received.len(),
        1000 + seen.values().map(|n| n.saturating_sub(1)).sum::<usize>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_leaves_nothing_sending() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&p, dir.path());
    let store = dir.path().join("var/outbox.db");
    enqueue(&store, 300);
    let mut child = deliver(&cfg, &p, false);
    let start = Instant::now();
    while p.messages().await.len() < 20 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nothing delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || wait(&mut child, Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let outbox = Outbox::open(&store).unwrap();
    assert!(
        outbox.list(Some(State::Sending), 10).unwrap().is_empty(),
        "nothing left mid-send"
    );
    let sent = outbox.list(Some(State::Sent), 1000).unwrap().len();
    assert_eq!(
        sent,
        p.messages().await.len(),
        "every sent message is recorded as sent"
    );
}
