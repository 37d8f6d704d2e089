//! The daemon under concurrency and under attack, with the real binary:
//!
//! - concurrent events of one plugin are serializable: 100 increments of
//!   one counter, 8 at a time, each see a distinct value; 200 concurrent
//!   digest events all reach the digest;
//! - idle strangers holding connections open cannot make a signed request
//!   wait (slowloris), and are cut off by the header timeout;
//! - a plugin's allocation attacks (huge keys, delete floods, NUL keys, an
//!   8 MiB error, 64 MiB of randomness) leave the daemon's peak memory
//!   under 200 MB, its logs and answers capped;
//! - strangers stalling 1 MiB bodies cannot make the daemon hold more than
//!   its `webhook_max_held_body_bytes`; a signed request past it gets
//!   `503`, and is served once the strangers time out;
//! - requests waiting for the writer do not hold their route's slots
//!   (`concurrency` bounds plugin runs), and the outcomes they hold meanwhile
//!   stay within `max_held_outcome_bytes`, in the metric and in RSS;
//! - replayed Standard Webhooks deliveries are not run again; stale ones
//!   are refused;
//! - a second delivering process on the same store is refused by name;
//! - files are private (0600/0700) whatever the umask;
//! - `outbox list` works without the daemon's secrets.

use crate::support::daemon;
use sendbox_test_support::wasm;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use daemon::{Daemon, FILE_ACCOUNT, write_config};

/// Subjects of every `.eml` in `dir`.
fn subjects(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "eml") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            if let Some(s) = text.lines().find_map(|l| l.strip_prefix("Subject: ")) {
                out.push(s.trim().to_owned());
            }
        }
    }
    out
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < Duration::from_secs(60), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hostile_plugin(name: &str, mode: &str, webhook: &str) -> String {
    format!(
        r#"
[plugins.{name}]
wasm = "{wasm}"
account = "local"
[plugins.{name}.config]
mode = "{mode}"
[plugins.{name}.webhook]
{webhook}
"#,
        wasm = wasm::hostile("hostile").display()
    )
}

/// The secret of [`signed_ok_route`]'s route.
const ROUTE_SECRET: &str = "route-secret";

/// A daemon with `daemon_lines` in its `[daemon]` table and one route,
/// `/hooks/ok`, signed with [`ROUTE_SECRET`], with `route_lines` added; its
/// plugin queues an email for every event.
fn signed_ok_route(daemon_lines: &str, route_lines: &str) -> (tempfile::TempDir, Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sendbox.toml");
    let route =
        format!("path = \"/hooks/ok\"\nsecret = {{ env = \"ROUTE_SECRET\" }}\n{route_lines}");
    std::fs::write(
        &cfg,
        format!(
            "{}{daemon_lines}{FILE_ACCOUNT}{}",
            daemon::daemon_section(),
            hostile_plugin("ok", "ok", &route)
        ),
    )
    .unwrap();
    let d = Daemon::start(&cfg, &[("ROUTE_SECRET", ROUTE_SECRET)]);
    (dir, d)
}

async fn post(url: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(url)
        .body("{}")
        .send()
        .await
        .expect("the webhook answers");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_events_of_one_plugin_are_serializable() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{FILE_ACCOUNT}{}{}",
        hostile_plugin(
            "counter",
            "counter",
            "path = \"/hooks/counter\"\nunauthenticated = true\nconcurrency = 16\nqueue_ms = 60000"
        ),
        daemon::example_plugins("local")
            .replace("cron = \"* * * * * *\"", "cron = \"*/2 * * * * *\"")
    );
    let cfg = write_config(dir.path(), &body);
    let secret = "digest-token";
    let d = Daemon::start(&cfg, &[("SENDBOX_TEST_WEBHOOK_SECRET", secret)]);

    // 100 increments, 8 at a time: each reads n, sleeps 20 ms, writes n+1.
    let url = format!("{}/hooks/counter", d.base);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (url, sem) = (url.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            post(&url).await.0
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 202);
    }
    // Every event saw a different count: n=1 .. n=100, each once.
    let mail = dir.path().join("mail");
    wait_for("100 counter emails", || {
        subjects(&mail)
            .iter()
            .filter(|s| s.starts_with("n="))
            .count()
            >= 100
    });
    let seen: BTreeSet<String> = subjects(&mail)
        .into_iter()
        .filter(|s| s.starts_with("n="))
        .collect();
    let expected: BTreeSet<String> = (1..=100).map(|n| format!("n={n}")).collect();
    assert_eq!(seen, expected);
    let metrics = d.metrics().await;
    assert!(
        metrics.contains("sendbox_state_conflicts_total{plugin=\"counter\"}"),
        "conflicts were counted:\n{metrics}"
    );

    // 200 digest events at once: every one is in some digest. The route
    // (the example's: 16 at a time, 2 s in its queue) may refuse some with
    // 503 on a loaded machine; a sender tries those again after the
    // `Retry-After` it was given, as a webhook sender does. A refused event
    // must have left nothing behind: counted twice, the sum below is over
    // 200.
    let url = format!("{}/hooks/digest", d.base);
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            for _ in 0..30 {
                let r = client
                    .post(&url)
                    .bearer_auth(secret)
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
                if r.status() != 503 {
                    return r.status().as_u16();
                }
                let wait: u64 = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .expect("a 503 says when to try again");
                tokio::time::sleep(Duration::from_secs(wait.min(2))).await;
            }
            503
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 202);
    }
    let digested = || -> u64 {
        subjects(&mail)
            .iter()
            .filter_map(|s| s.strip_prefix("Digest: "))
            .filter_map(|s| s.strip_suffix(" events"))
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    };
    wait_for("the digests count 200 events", || digested() >= 200);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(digested(), 200, "no event lost, none counted twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_strangers_cannot_hold_a_route() {
    let (_dir, d) = signed_ok_route(
        "webhook_header_timeout_ms = 1500\nwebhook_body_timeout_ms = 1500\n",
        "concurrency = 16\nqueue_ms = 500\n",
    );
    let secret = ROUTE_SECRET;
    let addr = d.base.trim_start_matches("http://").to_owned();

    // 16 strangers: headers with a body announced, then nothing (and 16
    // more that never finish their headers).
    let mut idle = Vec::new();
    for i in 0..32 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let head = if i < 16 {
            "POST /hooks/ok HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        } else {
            "POST /hooks/ok HTTP/1.1\r\nHost: x\r\n"
        };
        s.write_all(head.as_bytes()).unwrap();
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    // A signed request is served while the 32 strangers hold their sockets
    // (before, the 16 with headers held all 16 of the route's slots).
    let (status, answer) = d
        .post_signed("/hooks/ok", secret, b"{}", b"{}".to_vec())
        .await;
    assert_eq!(status, 202, "{answer}");

    // The strangers are answered or cut off by the timeouts.
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let started = Instant::now();
        let _ = s.read_to_end(&mut buf);
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "a stranger's connection was kept open"
        );
        let text = String::from_utf8_lossy(&buf);
        assert!(
            buf.is_empty() || text.starts_with("HTTP/1.1 401") || text.starts_with("HTTP/1.1 408"),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_make_the_daemon_hold_their_bodies() {
    // Bodies are read before their signature can be checked: at most
    // 4 MiB of them are held at once, however many strangers send.
    let (_dir, d) = signed_ok_route(
        "webhook_body_timeout_ms = 4000\nwebhook_max_held_body_bytes = 4194304\n",
        "max_body_bytes = 1048576\n",
    );
    let secret = ROUTE_SECRET;
    let addr = d.base.trim_start_matches("http://").to_owned();
    let pid = d.child.id();
    let before = rss(pid);

    // 64 strangers each announce a 1 MiB body, send all of it but the
    // last few bytes, and stall: 64 MB held if the daemon kept them all.
    let chunk = vec![b'x'; 64 << 10];
    let mut strangers = Vec::new();
    for _ in 0..64 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let head = format!(
            "POST /hooks/ok HTTP/1.1\r\nHost: x\r\nX-Hub-Signature-256: sha256={}\r\nContent-Length: {}\r\n\r\n",
            "0".repeat(64),
            1 << 20
        );
        s.write_all(head.as_bytes()).unwrap();
        for _ in 0..15 {
            s.write_all(&chunk).unwrap();
        }
        strangers.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    // Held, they would be 64 MB of bodies (~110 MB of RSS, measured with
    // a budget of 128 MiB); within 4 MiB, what grows is the read buffers
    // of 64 connections draining and the allocator's (~30 MB).
    let grown = rss(pid).saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "64 stalled 1 MiB bodies grew the daemon's RSS by {} MB",
        grown >> 20
    );

    // A signed request whose body does not fit in what is left is told
    // to come back, and nothing of it runs.
    let body = format!("{{\"pad\": \"{}\"}}", "y".repeat(400 << 10)).into_bytes();
    let (status, answer) = d
        .post_signed("/hooks/ok", secret, &body, body.clone())
        .await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("request bodies held")),
        "{answer}"
    );

    // Once the strangers' time is up, their bytes are let go and the same
    // request is served.
    for mut s in strangers {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(buf.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    let (status, answer) = d
        .post_signed("/hooks/ok", secret, &body, body.clone())
        .await;
    assert_eq!(status, 202, "{answer}");
    let log = d.logs();
    assert!(
        log.contains("too many request bodies held at once"),
        "the refusal is logged"
    );
}

/// Holds the outbox's write lock, as another process's long transaction
/// would, until the connection is dropped: the daemon's commits wait.
fn hold_the_writer(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.execute_batch("BEGIN IMMEDIATE").unwrap();
    c
}

/// Bytes of outcomes the daemon holds for their commit, from `/metrics`.
async fn outcome_bytes_held(d: &Daemon) -> u64 {
    daemon::metric(&d.metrics().await, "sendbox_outcome_bytes_held")
        .expect("sendbox_outcome_bytes_held in /metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_the_writer_do_not_hold_the_routes_slots() {
    // One slot, and a request waits at most 300 ms for it.
    let (dir, d) = signed_ok_route("", "concurrency = 1\nqueue_ms = 300\n");
    let (status, answer) = d
        .post_signed("/hooks/ok", ROUTE_SECRET, b"{}", b"{}".to_vec())
        .await;
    assert_eq!(status, 202, "{answer}");

    let writer = hold_the_writer(&dir.path().join("var/sendbox.db"));
    let d = std::sync::Arc::new(d);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let body = format!("{{\"n\": {i}}}").into_bytes();
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            d.post_signed("/hooks/ok", ROUTE_SECRET, &body, body.clone())
                .await
        }));
    }
    // All eight plugin runs happen, one at a time, while no commit can:
    // eight outcomes (1 KiB each as counted) wait for the writer at once.
    let start = Instant::now();
    loop {
        let held = outcome_bytes_held(&d).await;
        if held == 8 << 10 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "8 outcomes should wait for the writer together, {held} bytes held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(writer);
    let mut ids = BTreeSet::new();
    for t in tasks {
        let (status, answer) = t.await.unwrap();
        assert_eq!(status, 202, "{answer}");
        ids.insert(answer["queued"][0].as_i64().expect("a queued id"));
    }
    assert_eq!(ids.len(), 8, "eight distinct messages: {ids:?}");
    assert_eq!(outcome_bytes_held(&d).await, 0, "let go once committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_waiting_for_the_writer_stay_within_their_budget() {
    let dir = tempfile::tempdir().unwrap();
    // Outcomes of 2 MiB; 8 MiB of them may wait for the writer.
    let body = format!(
        "max_held_outcome_bytes = 8388608\n{FILE_ACCOUNT}{}",
        hostile_plugin(
            "big",
            "big-outcome",
            "path = \"/hooks/big\"\nunauthenticated = true\nconcurrency = 4\nqueue_ms = 60000"
        )
        .replace(
            "mode = \"big-outcome\"",
            "mode = \"big-outcome\"\nkib = \"2048\""
        ),
    );
    let cfg = write_config(dir.path(), &body);
    let d = Daemon::start(&cfg, &[]);
    let pid = d.child.id();
    let url = format!("{}/hooks/big", d.base);
    assert_eq!(post(&url).await.0, 202);
    assert_eq!(
        daemon::metric(&d.metrics().await, "sendbox_outcome_bytes_max"),
        Some(8 << 20)
    );
    let before = rss(pid);

    let writer = hold_the_writer(&dir.path().join("var/sendbox.db"));
    let tasks: Vec<_> = (0..48)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post(&url).await })
        })
        .collect();
    // While the writer is held back: three outcomes fit in the budget, the
    // route's four slots hold runs waiting for room, the other 41 requests
    // wait for a slot with nothing run.
    let (mut most_held, mut most_rss) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        let held = outcome_bytes_held(&d).await;
        assert!(
            held <= 8 << 20,
            "{held} bytes of outcomes held, over the budget"
        );
        most_held = most_held.max(held);
        most_rss = most_rss.max(rss(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        most_held >= 6 << 20,
        "outcomes wait in the budget: {most_held}"
    );
    // Within the budget, 7 outcomes at most are held (RSS +30 MB,
    // measured); with a budget of 1 GiB all 48 are, 96 MiB (RSS +98 to
    // +103 MB, measured).
    let grown = most_rss.saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "48 requests waiting for the writer grew the daemon's RSS by {} MB",
        grown >> 20
    );
    drop(writer);
    for t in tasks {
        let (status, answer) = t.await.unwrap();
        assert_eq!(status, 202, "{answer}");
    }
    assert_eq!(outcome_bytes_held(&d).await, 0);
}

/// Resident memory of a process now, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmRSS in /proc/PID/status")
}

/// Peak resident memory of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmHWM in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_make_the_host_hold_much() {
    let dir = tempfile::tempdir().unwrap();
    let modes = [
        "huge-keys",
        "delete-flood",
        "nul-keys",
        "big-error",
        "random-64m",
    ];
    let mut body = FILE_ACCOUNT.to_owned();
    for m in modes {
        body.push_str(&hostile_plugin(
            m,
            m,
            &format!("path = \"/hooks/{m}\"\nunauthenticated = true"),
        ));
        body.push_str(&format!("[plugins.{m}.limits]\ncpu_ms_per_event = 10000\n"));
    }
    let cfg = write_config(dir.path(), &body);
    let d = Daemon::start(&cfg, &[]);
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..2 {
        for m in modes {
            answers.insert(m, post(&format!("{}/hooks/{m}", d.base)).await);
            eprintln!(
                "after {m}: peak RSS {} MB {:?}",
                peak_rss(d.child.id()) >> 20,
                answers[m]
            );
        }
    }
    let peak = peak_rss(d.child.id());
    eprintln!(
        "daemon peak RSS after the allocation cases: {} MB",
        peak >> 20
    );
    assert!(peak < 200 << 20, "peak RSS {} MB", peak >> 20);

    assert_eq!(answers["huge-keys"].0, 202, "{:?}", answers["huge-keys"]);
    assert_eq!(
        answers["delete-flood"].0, 202,
        "{:?}",
        answers["delete-flood"]
    );
    // Every NUL key refused, none stored.
    let mail = dir.path().join("mail");
    wait_for("the nul-keys email", || {
        subjects(&mail).iter().any(|s| s.starts_with("refused="))
    });
    assert!(subjects(&mail).contains(&"refused=4000".to_string()));
    let outbox = sendbox_outbox::Outbox::open(&dir.path().join("var/sendbox.db")).unwrap();
    assert!(
        outbox
            .plugin_state_keys("nul-keys", "", 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(outbox.plugin_state_usage("nul-keys").unwrap(), 0);
    // The 8 MiB error: capped in the answer and in the log.
    let (status, text) = &answers["big-error"];
    assert_eq!(*status, 500);
    assert!(text.len() < 10_000, "answer of {} bytes", text.len());
    let longest = d.logs().lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 10_000, "a log line of {longest} bytes");
    // 64 MiB of randomness: refused as a limit, the daemon unharmed.
    assert_eq!(answers["random-64m"].0, 500, "{:?}", answers["random-64m"]);
    assert_eq!(post(&format!("{}/hooks/huge-keys", d.base)).await.0, 202);
}

fn standard_signature(key: &[u8], id: &str, ts: i64, body: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut cx = ring::hmac::Context::with_key(&k);
    cx.update(format!("{id}.{ts}.").as_bytes());
    cx.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(cx.sign().as_ref())
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_standard_webhooks_deliveries_are_not_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let key = b"standard webhooks key bytes";
    let whsec = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    std::fs::write(dir.path().join("whsec"), &whsec).unwrap();
    let body = format!(
        "{FILE_ACCOUNT}{}",
        hostile_plugin(
            "std",
            "ok",
            "path = \"/hooks/std\"\nsecret = { file = \"whsec\" }\nscheme = \"standard-webhooks\"\ntolerance_secs = 300"
        )
    );
    let cfg = write_config(dir.path(), &body);
    let d = Daemon::start(&cfg, &[]);
    let url = format!("{}/hooks/std", d.base);
    let send = |id: &'static str, ts: i64, sig: String| {
        let url = url.clone();
        async move {
            let r = reqwest::Client::new()
                .post(&url)
                .header("webhook-id", id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sig)
                .body("{}")
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    };
    let now = chrono::Utc::now().timestamp();
    let sig = standard_signature(key, "msg_1", now, b"{}");
    assert_eq!(send("msg_1", now, sig.clone()).await, 202);
    // The same delivery again: acknowledged, not run.
    assert_eq!(send("msg_1", now, sig).await, 200);
    // A forged signature, and a genuine one outside the window: refused.
    assert_eq!(
        send(
            "msg_2",
            now,
            standard_signature(b"wrong", "msg_2", now, b"{}")
        )
        .await,
        401
    );
    let old = now - 600;
    assert_eq!(
        send("msg_3", old, standard_signature(key, "msg_3", old, b"{}")).await,
        401
    );
    let committed = daemon::metric(
        &d.metrics().await,
        "sendbox_events_total{trigger=\"webhook\",plugin=\"std\",result=\"committed\"}",
    );
    assert_eq!(committed, Some(1), "the plugin ran once");
}

#[test]
fn a_second_delivering_process_on_the_store_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), FILE_ACCOUNT);
    let d = Daemon::start(&cfg, &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["deliver", "--until-empty", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("sendbox run (pid {})", d.child.id())),
        "{err}"
    );
    // Reading the queue is not delivering: it still works.
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["outbox", "list", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{FILE_ACCOUNT}{}",
        hostile_plugin("ok", "ok", "path = \"/hooks/ok\"\nunauthenticated = true")
    );
    let cfg = write_config(dir.path(), &body);
    // Our own cache folder, so the test sees it created.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("cache_dir") {
                "cache_dir = \"var/cache\"".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&cfg, text).unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "umask 000; exec {} run --config {}",
            env!("CARGO_BIN_EXE_sendbox"),
            cfg.display()
        ))
        .env("SENDBOX_LOG", "info");
    let d = Daemon::spawn(cmd);
    assert_eq!(post(&format!("{}/hooks/ok", d.base)).await.0, 202);
    let mail = dir.path().join("mail");
    daemon::wait_for_mail(&mail, "Subject: ok");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let var = dir.path().join("var");
    for f in ["sendbox.db", "sendbox.db-wal", "sendbox.db.lock"] {
        assert_eq!(mode(&var.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&var), 0o700);
    assert_eq!(mode(&mail), 0o700);
    for e in std::fs::read_dir(&mail).unwrap().flatten() {
        assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
    }
    let cache = var.join("cache");
    assert_eq!(mode(&cache), 0o700);
    for e in walk(&cache) {
        let m = mode(&e);
        assert!(m == 0o700 || m == 0o600, "{} is {m:o}", e.display());
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn outbox_commands_need_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon::write_examples_config(dir.path());
    // SENDBOX_TEST_WEBHOOK_SECRET is not set, as in an operator's shell
    // when systemd hands the daemon its secrets.
    for args in [["outbox", "list"], ["suppress", "list"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendbox"))
            .args(args)
            .arg("--config")
            .arg(&cfg)
            .env_remove("SENDBOX_TEST_WEBHOOK_SECRET")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // `check --no-environment` reads no secret either...
    let check = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sendbox"))
            .arg("check")
            .args(extra)
            .arg("--config")
            .arg(&cfg)
            .env_remove("SENDBOX_TEST_WEBHOOK_SECRET")
            .output()
            .unwrap()
    };
    let out = check(&["--no-environment"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("secrets not read"), "{text}");
    // ... while a full check needs them, and says which is missing.
    let out = check(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("SENDBOX_TEST_WEBHOOK_SECRET"), "{text}");
}

/// Sockets the process has open.
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
        })
        .count()
}

#[test]
fn connections_beyond_the_cap_wait_in_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sendbox.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}webhook_max_connections = 4\nwebhook_header_timeout_ms = 30000\n{FILE_ACCOUNT}",
            daemon::daemon_section()
        ),
    )
    .unwrap();
    let d = Daemon::start(&cfg, &[]);
    let addr = d.base.trim_start_matches("http://").to_owned();
    let before = sockets(d.child.id());
    let idle: Vec<_> = (0..20)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let held = sockets(d.child.id()) - before;
    assert_eq!(held, 4, "the daemon holds only its cap of connections");
    drop(idle);
}
