//! `sendbox run` end to end: the real binary with the example plugins built
//! from `plugins/`, a real SQLite outbox and the file transport.
//!
//! - a file dropped into a watched folder → an email with the attachment;
//! - a signed webhook → 202 with the queued id → an email; the same alert
//!   again → an idempotent duplicate; a body the plugin rejects → its 400
//!   (bad signatures and oversized bodies: `tests/daemon_peers.rs`);
//! - a schedule every second → the digest of what was recorded;
//! - `/metrics` counts events by trigger, plugin and result;
//! - SIGTERM → a clean exit with nothing left mid-send; SIGINT the same;
//!   in-flight work is waited for only up to `shutdown_grace_secs`;
//! - runs missed while down: skipped, or once at start (`catch_up`);
//! - `sendbox check` lists what `run` will serve, watch and fire;
//! - one worker thread per core, or as many as `TOKIO_WORKER_THREADS` says
//!   (a bad number refused by name, exit 78).

use crate::support::daemon;
use sendbox_test_support::wasm;

use std::path::Path;
use std::time::Duration;

use daemon::{Daemon, wait_for_mail};
use sendbox_outbox::{Outbox, State};

const SECRET: &str = "webhook-secret-for-tests";

fn start() -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon::write_examples_config(dir.path());
    let d = Daemon::start(&cfg, &[("SENDBOX_TEST_WEBHOOK_SECRET", SECRET)]);
    (d, dir)
}

fn count(store: &Path) -> usize {
    Outbox::open(store)
        .unwrap()
        .list(None, 10_000)
        .unwrap()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_turns_files_webhooks_and_schedules_into_mail() {
    let (mut d, dir) = start();
    let mail = dir.path().join("mail");
    let store = dir.path().join("var/sendbox.db");
    let http = reqwest::Client::new();

    // Health.
    let ok = http
        .get(format!("{}/healthz", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    // A file dropped into the watched folder: written, then settled.
    let incoming = dir.path().join("incoming");
    std::fs::write(incoming.join("ignored.tmp"), "x").unwrap();
    std::fs::write(incoming.join("report.csv"), "region,orders\nnorth,1\n").unwrap();
    let text = wait_for_mail(&mail, "report.csv");
    assert!(text.contains("To: ops@example.com"), "{text}");
    assert!(text.contains("filename=\"report.csv\""), "{text}");
    assert!(!std::fs::read_dir(&mail).unwrap().flatten().any(|e| {
        std::fs::read_to_string(e.path())
            .unwrap_or_default()
            .contains("ignored.tmp")
    }));

    // A signed webhook: 202 with the queued id, then the email.
    let body =
        std::fs::read(wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json")).unwrap();
    let (status, v) = d
        .post_signed("/hooks/alerts", SECRET, &body, body.clone())
        .await;
    assert_eq!(status, 202);
    let id = v["queued"][0].as_i64().expect("a queued id");
    let text = wait_for_mail(&mail, "DiskFull");
    assert!(text.contains("To: oncall@example.com"), "{text}");
    assert_eq!(
        Outbox::open(&store).unwrap().get(id).unwrap().state,
        State::Sent
    );
    // The same alert again: accepted, but an idempotent duplicate of the
    // first (webhook-bridge keys alerts by group and status).
    let (status, v) = d
        .post_signed("/hooks/alerts", SECRET, &body, body.clone())
        .await;
    assert_eq!(status, 202);
    assert_eq!(v["queued"], serde_json::json!([]));
    assert_eq!(v["duplicates"], serde_json::json!([id]));

    // (Bad signatures and oversized bodies: tests/daemon_peers.rs.)
    let before = count(&store);
    // A body the plugin cannot parse: its own 400, nothing queued.
    let junk = b"not json".to_vec();
    let (status, _) = d
        .post_signed("/hooks/alerts", SECRET, &junk, junk.clone())
        .await;
    assert_eq!(status, 400);
    assert_eq!(count(&store), before, "nothing queued by refused requests");

    // The digest: record an event (bearer-authenticated), then the
    // every-second schedule sends it.
    assert_eq!(d.post_bearer("/hooks/digest", SECRET).await, 202);
    let text = wait_for_mail(&mail, "Digest: 1 events");
    assert!(text.contains("webhook POST /hooks/digest"), "{text}");
    let r = http
        .post(format!("{}/hooks/digest", d.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no bearer token");

    // Metrics in Prometheus text format.
    let metrics = d.metrics().await;
    assert!(metrics.contains("sendbox_events_total{trigger=\"webhook\",plugin=\"webhook-bridge\",result=\"committed\"} 3"), "{metrics}");
    assert!(
        metrics.contains(
            "sendbox_events_total{trigger=\"file\",plugin=\"file-alert\",result=\"committed\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("sendbox_plugin_duration_seconds_count{plugin=\"file-alert\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sendbox_outbox_messages{state=\"sent\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE sendbox_token_refreshes_total counter"),
        "{metrics}"
    );

    // SIGTERM: a clean exit, nothing left mid-send.
    let status = d.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(
        Outbox::open(&store)
            .unwrap()
            .list(Some(State::Sending), 10)
            .unwrap()
            .is_empty()
    );
}

/// A config with one schedule on the hostile plugin (whose schedule handler
/// does nothing, so each tick is just counted).
fn schedule_config(dir: &Path, cron: &str, catch_up: &str) -> std::path::PathBuf {
    daemon::write_config(
        dir,
        &format!(
            r#"{account}
[plugins.ticker]
wasm = "{wasm}"
account = "local"
[[plugins.ticker.schedule]]
name = "nightly"
cron = "{cron}"
timezone = "UTC"
catch_up = "{catch_up}"
"#,
            account = daemon::FILE_ACCOUNT,
            wasm = wasm::hostile("hostile").display(),
        ),
    )
}

fn last_run(store: &Path) -> Option<i64> {
    Outbox::open(store)
        .unwrap()
        .schedule_run("ticker", "nightly")
        .unwrap()
}

/// A 6-field cron expression for the second `at_ms` falls in, daily.
fn daily_at(at_ms: i64) -> String {
    let t = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(at_ms).unwrap();
    use chrono::Timelike;
    format!("{} {} {} * * *", t.second(), t.minute(), t.hour())
}

#[test]
fn a_run_missed_while_down_runs_once_at_start_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("var/sendbox.db");

    // Up for a moment with an every-second schedule: its last run is kept.
    let cfg = schedule_config(dir.path(), "* * * * * *", "once");
    let mut d = Daemon::start(&cfg, &[]);
    let began = std::time::Instant::now();
    while last_run(&store).is_none() {
        assert!(began.elapsed() < Duration::from_secs(30), "never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.terminate(Duration::from_secs(20)).success());
    let ran = last_run(&store).unwrap();

    // Down while a daily run falls due (two seconds ago), then `skip`: it
    // stays missed.
    std::thread::sleep(Duration::from_millis(3500));
    let missed = (chrono::Utc::now().timestamp_millis() / 1000 - 2) * 1000;
    assert!(missed > ran);
    schedule_config(dir.path(), &daily_at(missed), "skip");
    let mut d = Daemon::start(&cfg, &[]);
    std::thread::sleep(Duration::from_millis(1500));
    // Ctrl-C stops it as cleanly as SIGTERM.
    assert!(d.interrupt(Duration::from_secs(20)).success());
    assert!(d.logs().contains("stopped cleanly"), "{}", d.logs());
    assert_eq!(
        last_run(&store),
        Some(ran),
        "skip: the missed run did not run"
    );
    assert_eq!(d.count_logged("catching up"), 0);

    // The same again with `once`: it runs at start, for its own time.
    let missed = (chrono::Utc::now().timestamp_millis() / 1000 - 2) * 1000;
    schedule_config(dir.path(), &daily_at(missed), "once");
    let mut d = Daemon::start(&cfg, &[]);
    let began = std::time::Instant::now();
    while last_run(&store) != Some(missed) {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the missed run did not run: last run {:?}, missed {missed}",
            last_run(&store)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.wait_logged("catching up on a run missed while down", 1);
    assert!(d.terminate(Duration::from_secs(20)).success());
    assert_eq!(
        d.count_logged("catching up"),
        1,
        "once, not once per missed day"
    );
}

#[test]
fn check_lists_what_run_will_serve_watch_and_fire() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon::write_examples_config(dir.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["check", "--no-environment", "--config"])
        .arg(&cfg)
        .env("SENDBOX_TEST_WEBHOOK_SECRET", SECRET)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for line in [
        "webhook /hooks/alerts (HMAC-SHA256 in x-hub-signature-256; 64 at once)",
        "webhook /hooks/digest (bearer token; 16 at once)",
        "watch incoming: ",
        "schedule every-second: next run ",
        "(missed runs: skip)",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    assert!(!text.contains(SECRET));
    // Checking creates nothing: the watched folder appears when `run` starts.
    assert!(!dir.path().join("incoming").exists());
}

/// Worker threads the daemon at `config` runs with, as `/metrics` reports
/// them; `TOKIO_WORKER_THREADS` set to `asked`, or unset.
async fn worker_threads(config: &Path, asked: Option<&str>) -> Option<u64> {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sendbox"));
    cmd.args(["run", "--config"])
        .arg(config)
        .env("SENDBOX_TEST_WEBHOOK_SECRET", SECRET)
        .env_remove("TOKIO_WORKER_THREADS");
    if let Some(n) = asked {
        cmd.env("TOKIO_WORKER_THREADS", n);
    }
    let d = Daemon::spawn(cmd);
    daemon::metric(&d.metrics().await, "sendbox_worker_threads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_a_worker_per_core_or_as_many_as_the_operator_says() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon::write_examples_config(dir.path());
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(
        worker_threads(&cfg, None).await,
        Some(cores),
        "one per core"
    );
    let asked = cores + 1;
    assert_eq!(
        worker_threads(&cfg, Some(&asked.to_string())).await,
        Some(asked),
        "TOKIO_WORKER_THREADS wins"
    );
}

#[test]
fn a_bad_worker_thread_count_is_refused_by_name_not_with_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon::write_examples_config(dir.path());
    for bad in ["two", "0", "100000"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sendbox"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("SENDBOX_TEST_WEBHOOK_SECRET", SECRET)
            .env("TOKIO_WORKER_THREADS", bad)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{bad}: {err}");
        assert!(
            err.contains(&format!("TOKIO_WORKER_THREADS=\"{bad}\"")) && err.contains("1 to 1024"),
            "{bad}: {err}"
        );
        assert!(!err.contains("panicked"), "{bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_in_flight_work_only_up_to_the_grace_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon::write_config(
        dir.path(),
        &format!(
            r#"shutdown_grace_secs = 1
{account}
[plugins.slow]
wasm = "{wasm}"
account = "local"
[plugins.slow.config]
mode = "slow"
sleep_ms = "8000"
[plugins.slow.limits]
cpu_ms_per_event = 20000
[plugins.slow.webhook]
path = "/hooks/slow"
unauthenticated = true
"#,
            account = daemon::FILE_ACCOUNT,
            wasm = wasm::hostile("hostile").display(),
        ),
    );
    let mut d = Daemon::start(&cfg, &[]);
    let url = format!("{}/hooks/slow", d.base);
    let in_flight =
        tokio::spawn(async move { reqwest::Client::new().post(url).body("{}").send().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let began = std::time::Instant::now();
    // An 8 s event in flight; the deadline is 1 s.
    let status = d.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status:?}");
    assert!(
        began.elapsed() < Duration::from_secs(6),
        "stopped after {:?}, not at the 1 s deadline",
        began.elapsed()
    );
    assert!(
        d.logs().contains("shutdown deadline passed"),
        "{}",
        d.logs()
    );
    // The cut-off request was never acknowledged, and nothing was queued.
    if let Ok(r) = in_flight.await.unwrap() {
        assert_ne!(r.status(), 202);
    }
    assert_eq!(count(&dir.path().join("var/sendbox.db")), 0);
}
