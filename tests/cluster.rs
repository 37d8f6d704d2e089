//! Several `sendbox run` nodes on one PostgreSQL outbox, against the real
//! peers: webhooks spread over the nodes are each delivered once, and a
//! node killed with messages in flight loses none of them — another node
//! sends them, with their original Message-IDs, once the lease expires.

use crate::support::daemon;
use sendbox_test_support::peers;
use sendbox_test_support::postgres::{Database, Throwaway};
use sendbox_test_support::wasm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use daemon::Daemon;
use peers::Peers;

const WEBHOOK_SECRET: &str = "webhook-secret-for-cluster-tests";

/// A node's config: the shared database as node `node` (leases of
/// `lease_secs`), the peers' account, webhook-bridge on `/hooks/alerts`.
fn node_config(p: &Peers, db: &Database, dir: &Path, node: &str, lease_secs: u64) -> PathBuf {
    node_config_with(p, &db.url, dir, node, lease_secs, "")
}

/// [`node_config`] with more plugin sections.
fn node_config_with(
    p: &Peers,
    url: &str,
    dir: &Path,
    node: &str,
    lease_secs: u64,
    more: &str,
) -> PathBuf {
    node_config_limited(p, url, dir, node, lease_secs, "max_connections = 3", more)
}

/// [`node_config_with`], the account's `max_connections = 3` line replaced
/// by `limits`.
fn node_config_limited(
    p: &Peers,
    url: &str,
    dir: &Path,
    node: &str,
    lease_secs: u64,
    limits: &str,
    more: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("sendbox.toml");
    let text = format!(
        r#"[daemon]
listen = "127.0.0.1:0"
store = "{url}"
cache_dir = "{cache}"
shutdown_grace_secs = 30

[daemon.postgres]
node = "{node}"
pool = 4
lease_secs = {lease_secs}
{account}
[plugins.webhook-bridge]
wasm = "{wasm}"
account = "app"
[plugins.webhook-bridge.config]
to = "oncall@example.com"
[plugins.webhook-bridge.webhook]
path = "/hooks/alerts"
secret = {{ env = "SENDBOX_TEST_WEBHOOK_SECRET" }}
concurrency = 64
{more}"#,
        cache = wasm::wasm_target_dir().join("sendbox-cache").display(),
        account = p.app_account().replace("max_connections = 3", limits),
        wasm = wasm::example("webhook-bridge").display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// daily-digest's plugin section with one schedule (`schedule`: its
/// `name`, `cron`... lines).
fn digest_schedule(schedule: &str) -> String {
    format!(
        r#"
[plugins.daily-digest]
wasm = "{}"
account = "app"
[plugins.daily-digest.config]
to = "team@example.com"
[[plugins.daily-digest.schedule]]
{schedule}
"#,
        wasm::example("daily-digest").display()
    )
}

fn start(p: &Peers, config: &Path) -> Daemon {
    let (var, secret) = p.app_env();
    Daemon::start(
        config,
        &[
            (var, &secret),
            ("SENDBOX_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ],
    )
}

/// The sample alert in alert group `group` (each its own email).
fn alert(group: &str) -> Vec<u8> {
    String::from_utf8(
        std::fs::read(wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json")).unwrap(),
    )
    .unwrap()
    .replace(r#""groupKey": ""#, &format!(r#""groupKey": "{group}-"#))
    .into_bytes()
}

/// POSTs `n` alerts (groups `{prefix}-0..n`), 16 at a time, each to the
/// next node in turn; returns how many were answered 202.
async fn post_spread(nodes: &[&Daemon], prefix: &str, n: usize) -> usize {
    let bases: Vec<String> = nodes.iter().map(|d| d.base.clone()).collect();
    let client = reqwest::Client::new();
    let mut accepted = 0;
    for chunk in (0..n).collect::<Vec<_>>().chunks(16) {
        let mut tasks = tokio::task::JoinSet::new();
        for &i in chunk {
            let (client, base) = (client.clone(), bases[i % bases.len()].clone());
            let body = alert(&format!("{prefix}-{i}"));
            tasks.spawn(async move {
                client
                    .post(format!("{base}/hooks/alerts"))
                    .header("content-type", "application/json")
                    .header("x-hub-signature-256", daemon::sign(WEBHOOK_SECRET, &body))
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            });
        }
        for status in tasks.join_all().await {
            if status.is_ok_and(|s| s == 202) {
                accepted += 1;
            }
        }
    }
    accepted
}

/// The Message-ID of a raw message.
fn message_id(raw: &str) -> String {
    raw.split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .split("\r\n")
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("message-id"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// How many times each Message-ID arrived at the SMTP peer.
async fn arrived(p: &Peers) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in p.messages().await {
        *seen.entry(message_id(&m.raw)).or_insert(0) += 1;
    }
    seen
}

/// Waits until the SMTP peer has `n` distinct messages (or fails after
/// `limit`), then a second more for stragglers; returns how many times
/// each Message-ID arrived.
async fn arrivals(p: &Peers, n: usize, limit: Duration) -> HashMap<String, usize> {
    let start = Instant::now();
    loop {
        // The count is cheap to ask; the messages only once it is there.
        let distinct = if p.stats().await.messages >= n as u64 {
            arrived(p).await.len()
        } else {
            0
        };
        if distinct >= n {
            break;
        }
        assert!(
            start.elapsed() < limit,
            "only {distinct} of {n} messages arrived"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    arrived(p).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_one_database_deliver_every_webhook_once() {
    let p = Peers::start();
    let db = Database::create().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start(
        &p,
        &node_config(&p, &db, &dir.path().join("a"), "node-a", 60),
    );
    let b = start(
        &p,
        &node_config(&p, &db, &dir.path().join("b"), "node-b", 60),
    );
    let c = start(
        &p,
        &node_config(&p, &db, &dir.path().join("c"), "node-c", 60),
    );
    let n = 3000;
    assert_eq!(post_spread(&[&a, &b, &c], "spread", n).await, n);
    let seen = arrivals(&p, n, Duration::from_secs(300)).await;
    assert_eq!(seen.len(), n, "{n} distinct messages");
    assert!(seen.values().all(|&k| k == 1), "each exactly once");
    // The account's 3 connections held for the three nodes together.
    let most = p.stats().await.max_connections_by_user["alerts@example.com"];
    assert!((1..=3).contains(&most), "{most} connections at once");
    let claimers = db
        .query("SELECT COUNT(DISTINCT detail) FROM audit WHERE detail LIKE 'claimed by node %'")
        .await;
    eprintln!("{n} webhooks on 3 nodes: {most} connections at most, sent by {claimers:?} nodes");
    // Every node served webhooks into the one outbox, and says who it is.
    for (d, node) in [(&a, "node-a"), (&b, "node-b"), (&c, "node-c")] {
        let m = d.metrics().await;
        assert!(
            m.contains(&format!("sendbox_node_info{{node=\"{node}\"}} 1")),
            "{m}"
        );
    }
    // A result is recorded after the peer's reply, so the last few may
    // still be on their way (or retried) when the peer has them all.
    let mut sent = Vec::new();
    for _ in 0..300 {
        sent = db
            .query("SELECT COUNT(*) FROM messages WHERE state = 'sent'")
            .await;
        if sent == [n.to_string()] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sent, [n.to_string()]);
    let committed_by: Vec<String> = db.query("SELECT COUNT(DISTINCT detail) FROM nodes").await;
    assert_eq!(committed_by, ["3"], "every node registered");

    // `sendbox check` on either node sees the shared store and both nodes.
    let (var, secret) = p.app_env();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["check", "--config"])
        .arg(dir.path().join("b/sendbox.toml"))
        .env(var, &secret)
        .env("SENDBOX_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("reachable"), "{text}");
    assert!(text.contains("node node-a: seen"), "{text}");
    assert!(text.contains("node node-b (this one): seen"), "{text}");
    assert!(text.contains("holds 0 message(s) under lease"), "{text}");
    assert!(out.status.success(), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_delivery_loses_nothing() {
    let p = Peers::start();
    let db = Database::create().await;
    let dir = tempfile::tempdir().unwrap();
    // The SMTP peer answers each message 150 ms late, so node a is killed
    // with messages in flight (some already received by the peer, their
    // results not recorded); b starts only afterwards.
    p.faults(serde_json::json!([{"stage": "data", "count": 100000, "hold_ms": 150}]))
        .await;
    let mut a = start(
        &p,
        &node_config(&p, &db, &dir.path().join("a"), "node-a", 3),
    );
    let n = 60;
    assert_eq!(post_spread(&[&a], "killed", n).await, n);
    let waiting = Instant::now();
    while p.stats().await.messages < 6 {
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "node a sends nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.child.kill().unwrap(); // SIGKILL, mid-delivery
    a.child.wait().unwrap();
    let in_flight: usize = db
        .query("SELECT COUNT(*) FROM messages WHERE state = 'sending'")
        .await[0]
        .parse()
        .unwrap();
    assert!(in_flight > 0, "killed mid-delivery");
    p.faults(serde_json::json!([])).await;
    let b = start(
        &p,
        &node_config(&p, &db, &dir.path().join("b"), "node-b", 3),
    );
    let seen = arrivals(&p, n, Duration::from_secs(120)).await;
    assert_eq!(seen.len(), n, "every message arrived");
    let twice = seen.values().filter(|&&k| k > 1).count();
    assert!(
        twice <= in_flight,
        "only messages in flight at the kill may arrive twice: {twice} > {in_flight}"
    );
    assert!(seen.values().all(|&k| k <= 2));
    eprintln!("killed with {in_flight} in flight; {twice} arrived twice (same Message-ID)");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_on_three_nodes_runs_each_tick_once() {
    let p = Peers::start();
    let db = Database::create().await;
    let dir = tempfile::tempdir().unwrap();
    let digest = digest_schedule("name = \"every-second\"\ncron = \"* * * * * *\"");
    let nodes: Vec<Daemon> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| {
            start(
                &p,
                &node_config_with(&p, &db.url, &dir.path().join(n), n, 60, &digest),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(30)).await;
    // Every node logs the ticks it took, by due time.
    let mut taken: HashMap<String, Vec<&str>> = HashMap::new();
    let logs: Vec<String> = nodes.iter().map(Daemon::logs).collect();
    for (k, log) in logs.iter().enumerate() {
        for line in log
            .lines()
            .filter(|l| l.contains("schedule tick taken by this node"))
        {
            let at = line
                .split("scheduled_at_ms=")
                .nth(1)
                .and_then(|r| r.split([' ', ',', '}']).next())
                .unwrap_or_else(|| panic!("no due time in {line:?}"))
                .to_owned();
            taken.entry(at).or_default().push(["n1", "n2", "n3"][k]);
        }
    }
    assert!(taken.len() >= 25, "ticks taken over 30 s: {}", taken.len());
    let twice: Vec<_> = taken.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "ticks run on more than one node: {twice:?}"
    );
    // And the nodes share the work rather than lose it: a node computes
    // its next tick when its run ends, so a second passes unrun only when
    // every node's run of the one before took longer than a second (three
    // daemons per test and several tests on two cores can do that now
    // and then); more than one second in ten means ticks are being lost.
    let due: std::collections::BTreeSet<i64> = taken.keys().map(|t| t.parse().unwrap()).collect();
    let (first, last) = (due.first().unwrap(), due.last().unwrap());
    let expected = (last - first) / 1000 + 1;
    let missed = expected - due.len() as i64;
    assert!(
        missed * 10 <= expected,
        "{missed} of {expected} ticks missed between {first} and {last}: {due:?}"
    );
    if missed > 0 {
        eprintln!("{missed} of {expected} ticks passed while every node was busy");
    }
    let by_nodes: std::collections::HashSet<&str> = taken.values().flatten().copied().collect();
    eprintln!("{} ticks, taken by {by_nodes:?}", taken.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_state_stays_serializable_across_nodes() {
    let p = Peers::start();
    let db = Database::create().await;
    let dir = tempfile::tempdir().unwrap();
    // Each event reads n, sleeps 20 ms, writes n+1 and mails "n=<n+1>".
    let counter = format!(
        r#"
[plugins.counter]
wasm = "{}"
account = "app"
[plugins.counter.config]
mode = "counter"
[plugins.counter.webhook]
path = "/hooks/counter"
unauthenticated = true
concurrency = 16
queue_ms = 60000
"#,
        wasm::hostile("hostile").display()
    );
    let nodes: Vec<Daemon> = ["s1", "s2"]
        .iter()
        .map(|n| {
            start(
                &p,
                &node_config_with(&p, &db.url, &dir.path().join(n), n, 60, &counter),
            )
        })
        .collect();
    let client = reqwest::Client::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let (client, sem) = (client.clone(), sem.clone());
        let url = format!("{}/hooks/counter", nodes[i % 2].base);
        tasks.spawn(async move {
            let _p = sem.acquire().await.unwrap();
            client
                .post(url)
                .body("{}")
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
    }
    for status in tasks.join_all().await {
        assert_eq!(status.unwrap(), 202);
    }
    // Every event, on whichever node, saw a different count: n=1..60.
    let start_wait = Instant::now();
    let subjects = loop {
        let subjects: Vec<String> = p
            .messages()
            .await
            .iter()
            .filter_map(|m| {
                m.raw
                    .split("\r\n")
                    .find_map(|l| l.strip_prefix("Subject: ").map(str::to_owned))
            })
            .filter(|s| s.starts_with("n="))
            .collect();
        if subjects.len() >= 60 || start_wait.elapsed() > Duration::from_secs(120) {
            break subjects;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let seen: std::collections::BTreeSet<String> = subjects.iter().cloned().collect();
    let expected: std::collections::BTreeSet<String> = (1..=60).map(|n| format!("n={n}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(subjects.len(), 60, "each count once");
}

/// POSTs one alert (group `group`) to `base`; the status (0: no answer).
async fn post_one(base: &str, group: &str) -> u16 {
    let body = alert(group);
    reqwest::Client::new()
        .post(format!("{base}/hooks/alerts"))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", daemon::sign(WEBHOOK_SECRET, &body))
        .body(body)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_restarting_mid_run_loses_nothing_acknowledged() {
    let p = Peers::start();
    let pg = Throwaway::start();
    let dir = tempfile::tempdir().unwrap();
    let d = start(
        &p,
        &node_config_with(&p, &pg.url(), &dir.path().join("a"), "node-a", 60, ""),
    );
    // The SMTP peer answers 300 ms late, so the database goes away with
    // messages in flight whose results cannot be written.
    p.faults(serde_json::json!([{"stage": "data", "count": 100000, "hold_ms": 300}]))
        .await;
    let mut accepted = post_spread(&[&d], "before", 20).await;
    assert_eq!(accepted, 20);
    let sending = Instant::now();
    while p.stats().await.messages < 1 {
        assert!(sending.elapsed() < Duration::from_secs(30), "nothing sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    pg.down();
    // Meanwhile: refused with 503, so the sender retries; nothing stored.
    for i in 0..5 {
        assert_eq!(post_one(&d.base, &format!("during-{i}")).await, 503);
    }
    d.wait_logged("cannot record delivery results; trying again", 1);
    p.faults(serde_json::json!([])).await;
    pg.up();
    // The node reconnects by itself at the next use.
    let back = Instant::now();
    loop {
        let status = post_one(&d.base, &format!("back-{}", back.elapsed().as_millis())).await;
        if status == 202 {
            accepted += 1;
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "still {status} 30 s after the database came back"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    accepted += post_spread(&[&d], "after", 20).await;
    assert_eq!(accepted, 41);
    // Every acknowledged webhook arrives, and nothing refused does.
    let seen = arrivals(&p, accepted, Duration::from_secs(120)).await;
    assert_eq!(seen.len(), accepted, "exactly the acknowledged ones");
    assert!(
        d.logs().contains("PostgreSQL connection lost")
            || d.logs().contains("cannot reach the database"),
        "the outage was noticed"
    );
    // And every result is on record: results that could not be written
    // during the outage were kept and written once it was back.
    let settled = Instant::now();
    loop {
        let counts = sendbox_test_support::postgres::query(
            &pg.url(),
            "SELECT (COUNT(*) FILTER (WHERE state = 'sent'))::text || '/' || COUNT(*)::text FROM messages",
        )
        .await;
        if counts == [format!("{accepted}/{accepted}")] {
            break;
        }
        assert!(
            settled.elapsed() < Duration::from_secs(30),
            "sent/all: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_once_runs_a_missed_tick_on_one_node_of_three() {
    let p = Peers::start();
    let db = Database::create().await;
    let dir = tempfile::tempdir().unwrap();
    // The schedule last ran an hour ago (the database set up first, as a
    // node would have), so a run every minute was missed while down.
    {
        use sendbox_outbox::Store;
        let first =
            sendbox_outbox::PgOutbox::connect(&db.url, None, "setup", 1, Duration::from_secs(60))
                .await
                .unwrap();
        let hour_ago = sendbox_outbox::now_ms() / 60_000 * 60_000 - 3_600_000;
        first
            .set_schedule_run("daily-digest", "every-minute", hour_ago)
            .await
            .unwrap();
    }
    let digest =
        digest_schedule("name = \"every-minute\"\ncron = \"0 * * * * *\"\ncatch_up = \"once\"");
    // The three start at once.
    let configs: Vec<PathBuf> = ["c1", "c2", "c3"]
        .iter()
        .map(|n| node_config_with(&p, &db.url, &dir.path().join(n), n, 60, &digest))
        .collect();
    let nodes: Vec<Daemon> = std::thread::scope(|s| {
        let started: Vec<_> = configs.iter().map(|c| s.spawn(|| start(&p, c))).collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each node that still found the run missed tries it; one runs it.
    let waiting = Instant::now();
    let caught_up = |logs: &[String]| -> Vec<String> {
        logs.iter()
            .flat_map(|l| l.lines())
            .filter(|x| x.contains("catching up on a run missed while down"))
            .map(str::to_owned)
            .collect()
    };
    while caught_up(&nodes.iter().map(Daemon::logs).collect::<Vec<_>>()).is_empty() {
        assert!(
            waiting.elapsed() < Duration::from_secs(30),
            "no node caught up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs: Vec<String> = nodes.iter().map(Daemon::logs).collect();
    let missed: Vec<String> = caught_up(&logs)
        .iter()
        .filter_map(|x| {
            x.split("scheduled_at_ms=")
                .nth(1)
                .and_then(|r| r.split([' ', ',', '}']).next())
                .map(str::to_owned)
        })
        .collect();
    assert!(missed.iter().all(|m| *m == missed[0]), "{missed:?}");
    let taken = logs
        .iter()
        .flat_map(|l| l.lines())
        .filter(|x| {
            x.contains("schedule tick taken by this node")
                && x.contains(&format!("scheduled_at_ms={}", missed[0]))
        })
        .count();
    eprintln!(
        "{} node(s) found the run missed; {taken} ran it",
        missed.len()
    );
    assert_eq!(taken, 1, "the missed run ran on one node");
    let last = db
        .query("SELECT last_ms FROM schedule_runs WHERE schedule = 'every-minute'")
        .await;
    assert!(
        last[0].parse::<i64>().unwrap() >= missed[0].parse::<i64>().unwrap(),
        "{last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_rate_and_connections_hold_over_a_minute_across_three_nodes() {
    let p = Peers::start();
    let db = Database::create().await;
    let dir = tempfile::tempdir().unwrap();
    // Exchange-like limits, but 120 a minute so the test takes one minute:
    // 2 connections and 120 messages a minute for the three nodes together.
    let limits = "max_connections = 2\nrate_per_minute = 120";
    let nodes: Vec<Daemon> = ["r1", "r2", "r3"]
        .iter()
        .map(|n| {
            start(
                &p,
                &node_config_limited(&p, &db.url, &dir.path().join(n), n, 60, limits, ""),
            )
        })
        .collect();
    let n = 125;
    let refs: Vec<&Daemon> = nodes.iter().collect();
    assert_eq!(post_spread(&refs, "paced", n).await, n);
    let seen = arrivals(&p, n, Duration::from_secs(150)).await;
    assert_eq!(seen.len(), n);
    assert!(seen.values().all(|&k| k == 1), "each exactly once");
    let mut times: Vec<i64> = p.messages().await.iter().map(|m| m.at_ms).collect();
    times.sort_unstable();
    // Windows starting at each arrival.
    let most_in = |width: i64| {
        times
            .iter()
            .map(|&t| times.iter().filter(|&&u| u >= t && u < t + width).count())
            .max()
            .unwrap_or(0)
    };
    let (minute, ten) = (most_in(60_000), most_in(10_000));
    let span = times[n - 1] - times[0];
    let most = p.stats().await.max_connections_by_user["alerts@example.com"];
    let claimers = db
        .query("SELECT COUNT(DISTINCT detail) FROM audit WHERE detail LIKE 'claimed by node %'")
        .await;
    eprintln!(
        "{n} messages in {span} ms: at most {minute} in a minute, {ten} in 10 s, {most} connections; sent by {claimers:?} nodes"
    );
    // Sends start 500 ms apart across the nodes (one more on a window's
    // edge); a connection's first message may arrive late (TLS, token),
    // bunched with later ones: one more per connection.
    assert!(minute <= 123, "{minute} in one minute at 120/min");
    assert!(ten <= 23, "{ten} in 10 s at 120/min");
    assert!(span >= 61_000, "{n} messages in {span} ms at 120/min");
    assert!(
        (1..=2).contains(&most),
        "{most} connections at once (limit 2)"
    );
    assert!(
        claimers[0].parse::<u32>().unwrap() >= 2,
        "the nodes shared the sending: {claimers:?}"
    );
}

/// Runs `sendbox ARGS --config CONFIG` (the store's password in the
/// environment, nothing else); its stdout, or a failure with stderr.
fn cli(config: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("SENDBOX_TEST_PG_PASSWORD", "not-needed-with-trust")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sendbox {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_and_suppress_commands_work_on_the_shared_database() {
    use sendbox_outbox::{Call, Policy, State, Store};
    let db = Database::create().await;
    let dir = tempfile::tempdir().unwrap();
    let node = sendbox_outbox::PgOutbox::connect(&db.url, None, "n1", 1, Duration::from_secs(60))
        .await
        .unwrap();
    let queue = |subject: &str| Call {
        plugin: "file-alert".into(),
        trigger: "file".into(),
        event_id: "evt-1".into(),
        account: "local".into(),
        account_mailbox: "sendbox@localhost".into(),
        policy: Policy::default(),
        emails: vec![sendbox_types::Email {
            to: vec!["ops@example.com".into()],
            subject: subject.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let dead = node.commit(queue("disk full")).await.unwrap().queued[0].id;
    let other = node.commit(queue("cpu hot")).await.unwrap().queued[0].id;
    let claimed = node.claim("local", 1).await.unwrap();
    assert_eq!(claimed[0].id, dead);
    node.mark(dead, State::Dead, None, "550 no such user")
        .await
        .unwrap();

    // A config as on any node; the account's secrets are not needed, the
    // store's password (by reference) is read.
    let config = dir.path().join("sendbox.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nstore = \"{}\"\n[daemon.postgres]\nnode = \"cli\"\npassword = {{ env = \"SENDBOX_TEST_PG_PASSWORD\" }}\n\n\
             [accounts.local]\nprovider = \"file\"\nmailbox = \"sendbox@localhost\"\ndir = \"mail\"\n",
            db.url
        ),
    )
    .unwrap();
    let list = cli(&config, &["outbox", "list"]);
    assert!(
        list.contains("disk full") && list.contains("cpu hot"),
        "{list}"
    );
    assert!(list.contains("dead"), "{list}");
    let show = cli(&config, &["outbox", "show", &dead.to_string()]);
    assert!(show.contains("claimed by node n1"), "{show}");
    assert!(show.contains("550 no such user"), "{show}");
    let retried = cli(&config, &["outbox", "retry", "--dead"]);
    assert!(retried.contains("queued 1 message(s)"), "{retried}");
    assert_eq!(node.get(dead).await.unwrap().state, State::Queued);
    cli(&config, &["outbox", "drop", &other.to_string()]);
    assert!(node.get(other).await.is_err(), "dropped");

    cli(
        &config,
        &["suppress", "add", "ops@example.com", "--reason", "bounced"],
    );
    let listed = cli(&config, &["suppress", "list"]);
    assert!(listed.contains("ops@example.com  (bounced)"), "{listed}");
    // Every node's next commit honours it.
    let kept = node.commit(queue("after")).await.unwrap();
    assert!(kept.queued.is_empty(), "{kept:?}");
    let removed = cli(&config, &["suppress", "remove", "ops@example.com"]);
    assert!(removed.contains("removed ops@example.com"), "{removed}");
    let pruned = cli(&config, &["outbox", "prune"]);
    assert!(pruned.contains("pruned 0 message(s)"), "{pruned}");
    // The commands joined as a tool: no node registered for them.
    let nodes = db.query("SELECT node FROM nodes ORDER BY node").await;
    assert_eq!(nodes, ["n1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendbox_check_on_any_node_shows_an_account_another_node_paused() {
    use sendbox_outbox::Store;
    let p = Peers::start();
    let db = Database::create().await;
    let dir = tempfile::tempdir().unwrap();
    // Node n1 was refused and paused the account for everyone.
    let n1 = sendbox_outbox::PgOutbox::connect(&db.url, None, "n1", 1, Duration::from_secs(60))
        .await
        .unwrap();
    n1.set_account_paused(
        "app",
        Some("the token endpoint refused the client (invalid_client)"),
    )
    .await
    .unwrap();
    // `sendbox check` with node n2's config says so.
    let config = node_config(&p, &db, &dir.path().join("n2"), "n2", 60);
    let (var, secret) = p.app_env();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["check", "--config"])
        .arg(&config)
        .env(var, &secret)
        .env("SENDBOX_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("account app: delivery is paused: the token endpoint refused the client"),
        "{text}"
    );
    assert!(
        !out.status.success(),
        "a paused account fails the check: {text}"
    );
}
