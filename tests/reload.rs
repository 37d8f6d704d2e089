//! Hot reload on the real binary: plugin files and the config change while
//! `sendbox run` serves, with no restart.
//!
//! - a plugin's `.wasm` replaced → the new behaviour;
//! - a corrupt `.wasm` dropped in → the previous version keeps serving;
//! - an edited config → only the changed plugin reloads; an event in flight
//!   finishes on the version it started with;
//! - a moved webhook route, a removed plugin, a broken config;
//! - a route at its concurrency limit answers 503 with `Retry-After`.

use crate::support::daemon;
use sendbox_test_support::wasm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use daemon::{Daemon, replace_file};
use sendbox_outbox::Outbox;

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    hook_wasm: PathBuf,
}

impl Setup {
    fn store(&self) -> PathBuf {
        self.dir.path().join("var/sendbox.db")
    }
}

/// `hook` starts as webhook-bridge; `slow` is the hostile plugin's `slow`
/// mode (sleeps, then sends an email whose subject is its `label`).
fn config_text(hook_path: &str, label: &str, with_slow: bool) -> String {
    let mut text = format!(
        r#"{account}
[plugins.hook]
wasm = "plugins/hook.wasm"
account = "local"
[plugins.hook.config]
to = "oncall@example.com"
[plugins.hook.policy]
# The same alert is posted many times here; each must queue an email.
idempotency_hours = 0
[plugins.hook.webhook]
path = "{hook_path}"
unauthenticated = true
"#,
        account = daemon::FILE_ACCOUNT,
    );
    if with_slow {
        text.push_str(&format!(
            r#"
[plugins.slow]
wasm = "{slow}"
account = "local"
[plugins.slow.config]
mode = "slow"
sleep_ms = "3000"
label = "{label}"
[plugins.slow.limits]
cpu_ms_per_event = 20000
[plugins.slow.webhook]
path = "/hooks/slow"
unauthenticated = true
concurrency = 1
queue_ms = 0
"#,
            slow = wasm::hostile("hostile").display(),
        ));
    }
    text
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("plugins")).unwrap();
    let hook_wasm = dir.path().join("plugins/hook.wasm");
    std::fs::copy(wasm::example("webhook-bridge"), &hook_wasm).unwrap();
    let config = daemon::write_config(dir.path(), &config_text("/hooks/a", "v1", true));
    Setup {
        dir,
        config,
        hook_wasm,
    }
}

fn write_config(s: &Setup, body: String) {
    let written = daemon::write_config(s.dir.path(), &body);
    assert_eq!(written, s.config);
}

fn alert() -> Vec<u8> {
    std::fs::read(wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json")).unwrap()
}

/// POSTs `body` and returns the status and, for a 202, the subject of the
/// email it queued.
pub(crate) async fn post(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    store: &Path,
) -> (u16, Option<String>) {
    let r = http.post(url).body(body).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    if status != 202 {
        return (status, None);
    }
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let id = v["queued"][0].as_i64().expect("a queued id");
    let msg = Outbox::open(store).unwrap().get(id).unwrap();
    (status, Some(msg.email.subject.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_plugin_serves_without_a_restart_and_a_corrupt_one_is_refused() {
    let s = setup();
    let d = Daemon::start(&s.config, &[]);
    let http = reqwest::Client::new();
    let url = format!("{}/hooks/a", d.base);

    // webhook-bridge: an Alertmanager payload becomes a "[FIRING] ..." email.
    let (status, subject) = post(&http, &url, alert(), &s.store()).await;
    assert_eq!(status, 202);
    let subject = subject.unwrap();
    assert!(subject.contains("DiskFull"), "{subject}");

    // Replace the file with a different plugin (hostile, mode "ok": an email
    // whose subject is "ok"). No restart, no signal.
    replace_file(
        &s.hook_wasm,
        &std::fs::read(wasm::hostile("hostile")).unwrap(),
    );
    d.wait_logged("reload done", 1);
    let (status, subject) = post(&http, &url, alert(), &s.store()).await;
    assert_eq!(status, 202);
    assert_eq!(subject.as_deref(), Some("ok"), "the new version answers");
    assert!(d.logs().contains("plugin loaded"), "{}", d.logs());

    // A corrupt file: refused with the reason; the previous version serves.
    replace_file(&s.hook_wasm, b"\0asm this is not a component");
    d.wait_logged(
        "new version not loaded; the previous version keeps serving",
        1,
    );
    let (status, subject) = post(&http, &url, alert(), &s.store()).await;
    assert_eq!(status, 202);
    assert_eq!(subject.as_deref(), Some("ok"), "still the previous version");
    let metrics = d.metrics().await;
    let partial =
        daemon::metric(&metrics, r#"sendbox_reloads_total{result="partial"}"#).unwrap_or(0);
    assert!(partial >= 1, "the refused file is counted: {metrics}");
    // A half-written copy then the whole file: the whole one loads.
    let bridge = std::fs::read(wasm::example("webhook-bridge")).unwrap();
    std::fs::write(&s.hook_wasm, &bridge[..bridge.len() / 2]).unwrap();
    std::fs::write(&s.hook_wasm, &bridge).unwrap();
    let start = Instant::now();
    loop {
        let (status, subject) = post(&http, &url, alert(), &s.store()).await;
        assert_eq!(status, 202);
        if subject.as_deref().is_some_and(|s| s.contains("DiskFull")) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "webhook-bridge never came back: {}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SIGHUP reloads too; with nothing changed, nothing is loaded again.
    let reloads = d.count_logged("reload done");
    d.hangup();
    let last = d.reload_done(reloads + 1);
    assert!(
        last.contains("loaded=[] retriggered=[] removed=[] failed=[]"),
        "{last}"
    );
    assert!(d.logs().contains("SIGHUP: reloading"));
    // The untouched plugin was never reloaded.
    assert!(!d.logs().lines().any(|l| l.contains("plugin loaded")
        && l.contains("plugin=slow")
        && l.contains("replaced=true")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_edit_reloads_only_what_changed_and_in_flight_events_finish_on_their_version() {
    let s = setup();
    let d = Daemon::start(&s.config, &[]);
    let http = reqwest::Client::new();
    let slow_url = format!("{}/hooks/slow", d.base);

    // An event in flight on `slow` v1 (it sleeps 3 s)...
    let in_flight = {
        let (http, url, store) = (http.clone(), slow_url.clone(), s.store());
        tokio::spawn(async move { post(&http, &url, b"{}".to_vec(), &store).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ...a second request finds the route at its limit (concurrency 1,
    // queue_ms 0): 503 with Retry-After, and the plugin is not called.
    let r = http.post(&slow_url).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        r.headers().get("retry-after").map(|v| v.to_str().unwrap()),
        Some("1")
    );

    // ...while the config changes its label to v2.
    write_config(&s, config_text("/hooks/a", "v2", true));
    let done = d.reload_done(1);
    assert!(
        !in_flight.is_finished(),
        "the reload happened while the event was in flight"
    );
    assert!(
        done.contains(r#"loaded=["slow"]"#),
        "only slow reloads: {done}"
    );
    assert!(
        done.contains("retriggered=[]"),
        "no trigger changed: {done}"
    );

    let (status, subject) = in_flight.await.unwrap();
    assert_eq!(status, 202);
    assert_eq!(
        subject.as_deref(),
        Some("v1"),
        "finished on the version it started with"
    );
    let (status, subject) = post(&http, &slow_url, b"{}".to_vec(), &s.store()).await;
    assert_eq!(status, 202);
    assert_eq!(
        subject.as_deref(),
        Some("v2"),
        "the next event runs the new config"
    );

    // Move hook's route and drop `slow`: /hooks/a is gone, /hooks/b serves,
    // /hooks/slow is gone.
    write_config(&s, config_text("/hooks/b", "v2", false));
    let done = d.reload_done(2);
    assert!(
        done.contains(r#"retriggered=["hook"]"#) && done.contains(r#"removed=["slow"]"#),
        "{done}"
    );
    assert!(
        done.contains("loaded=[]"),
        "hook's code and config did not change: {done}"
    );
    assert_eq!(
        http.post(format!("{}/hooks/a", d.base))
            .body(alert())
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        http.post(&slow_url)
            .body("{}")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let (status, subject) = post(&http, &format!("{}/hooks/b", d.base), alert(), &s.store()).await;
    assert_eq!(status, 202);
    assert!(subject.unwrap().contains("DiskFull"));

    // A broken edit: named in the log, and everything keeps serving.
    std::fs::write(&s.config, "[plugins.hook]\nwasm = 42\n").unwrap();
    d.wait_logged("config not reloaded; everything keeps running as it was", 1);
    assert!(
        d.logs().contains("sendbox.toml:2:8"),
        "the error names file, line and column: {}",
        d.logs()
    );
    let (status, _) = post(&http, &format!("{}/hooks/b", d.base), alert(), &s.store()).await;
    assert_eq!(status, 202);

    // Reloads are counted for monitoring: two applied, one refused.
    let metrics = d.metrics().await;
    for line in [
        r#"sendbox_reloads_total{result="applied"} 2"#,
        r#"sendbox_reloads_total{result="partial"} 0"#,
        r#"sendbox_reloads_total{result="refused"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_picks_up_a_rotated_webhook_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("hook.token");
    std::fs::write(&token, "old-token").unwrap();
    let config = daemon::write_config(
        dir.path(),
        &format!(
            r#"{account}
[plugins.hook]
wasm = "{wasm}"
account = "local"
[plugins.hook.config]
to = "oncall@example.com"
[plugins.hook.webhook]
path = "/hooks/a"
bearer_token = {{ file = "hook.token" }}
"#,
            account = daemon::FILE_ACCOUNT,
            wasm = wasm::example("webhook-bridge").display(),
        ),
    );
    let d = Daemon::start(&config, &[]);
    let http = reqwest::Client::new();
    let url = format!("{}/hooks/a", d.base);
    let status = |token: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(&url)
                .bearer_auth(token)
                .body(alert())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("old-token").await, 202);

    // The token file is rotated; `systemctl reload` sends SIGHUP.
    std::fs::write(&token, "new-token").unwrap();
    d.hangup();
    let done = d.reload_done(1);
    assert!(done.contains(r#"loaded=[] retriggered=["hook"]"#), "{done}");
    assert_eq!(status("old-token").await, 401);
    assert_eq!(status("new-token").await, 202);
    assert!(!d.logs().contains("new-token"), "the token was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_account_restarts_its_worker_and_its_plugins_follow() {
    let s = setup();
    let d = Daemon::start(&s.config, &[]);
    let http = reqwest::Client::new();
    let url = format!("{}/hooks/a", d.base);
    let (status, _) = post(&http, &url, alert(), &s.store()).await;
    assert_eq!(status, 202);
    daemon::wait_for_mail(&s.dir.path().join("mail"), "DiskFull");

    // A new mailbox and mail folder for the account.
    let text = config_text("/hooks/a", "v1", true)
        .replace("sendbox@localhost", "relay@localhost")
        .replace("dir = \"mail\"", "dir = \"mail2\"");
    write_config(&s, text);
    let done = d.reload_done(1);
    assert!(done.contains(r#"accounts=["local"]"#), "{done}");
    // Both plugins on the account reload for its new mailbox.
    assert!(done.contains(r#"loaded=["hook", "slow"]"#), "{done}");
    let (status, _) = post(&http, &url, alert(), &s.store()).await;
    assert_eq!(status, 202);
    let text = daemon::wait_for_mail(&s.dir.path().join("mail2"), "DiskFull");
    assert!(text.contains("From: relay@localhost"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_folder_does_not_hold_off_a_config_reload() {
    let s = setup();
    let d = Daemon::start(&s.config, &[]);
    // Something else writes beside the config all the time (a database or
    // a log kept in the same folder): every 20 ms, more often than the
    // reload's quiet period.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let busy = {
        let (stop, file) = (stop.clone(), s.dir.path().join("busy.log"));
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(file).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                writeln!(f, "a line").unwrap();
                f.flush().unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    write_config(&s, config_text("/hooks/b", "v1", true));
    let done = d.reload_done(1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    busy.join().unwrap();
    assert!(done.contains("reload done"), "{done}");
    let http = reqwest::Client::new();
    let (status, _) = post(&http, &format!("{}/hooks/b", d.base), alert(), &s.store()).await;
    assert_eq!(status, 202, "the moved route serves");
    assert_eq!(
        d.logs().matches("reload done").count(),
        1,
        "the other file's writes reload nothing"
    );
}
