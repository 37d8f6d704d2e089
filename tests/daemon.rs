//! `sendbox run` end to end: the real binary with the example plugins built
//! from `plugins/`, a real SQLite outbox and the file transport.
//!
//! - a file dropped into a watched folder → an email with the attachment;
//! - a signed webhook → 202 with the queued id → an email; a bad signature →
//!   401 and nothing queued; a 2 MiB body → 413;
//! - a schedule every second → the digest of what was recorded;
//! - `/metrics` counts events by trigger, plugin and result;
//! - SIGTERM → a clean exit with nothing left mid-send.

#[path = "support/wasm.rs"]
mod wasm;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sendbox_outbox::{Outbox, State};

const SECRET: &str = "webhook-secret-for-tests";

struct Daemon {
    child: Child,
    base: String,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sendbox.toml");
    let w = |n: &str| wasm::example(n).display().to_string();
    std::fs::write(
        &cfg,
        format!(
            r#"[daemon]
listen = "127.0.0.1:0"
store = "var/sendbox.db"
cache_dir = "{cache}"

[accounts.local]
provider = "file"
mailbox = "sendbox@localhost"
dir = "mail"

[plugins.file-alert]
wasm = "{fa}"
account = "local"
[plugins.file-alert.config]
to = "ops@example.com"
[[plugins.file-alert.watch]]
name = "incoming"
dir = "incoming"
exclude = ["*.tmp"]
debounce_ms = 200

[plugins.webhook-bridge]
wasm = "{wb}"
account = "local"
[plugins.webhook-bridge.config]
to = "oncall@example.com"
[plugins.webhook-bridge.webhook]
path = "/hooks/alerts"
secret = {{ env = "SENDBOX_TEST_WEBHOOK_SECRET" }}

[plugins.daily-digest]
wasm = "{dd}"
account = "local"
[plugins.daily-digest.config]
to = "team@example.com"
[plugins.daily-digest.webhook]
path = "/hooks/digest"
bearer_token = {{ env = "SENDBOX_TEST_WEBHOOK_SECRET" }}
[[plugins.daily-digest.schedule]]
name = "every-second"
cron = "* * * * * *"
"#,
            cache = wasm::wasm_target_dir().join("sendbox-cache").display(),
            fa = w("file-alert"),
            wb = w("webhook-bridge"),
            dd = w("daily-digest"),
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sendbox"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("SENDBOX_TEST_WEBHOOK_SECRET", SECRET)
        .env("SENDBOX_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("sendbox printed its ready line");
    let base = line
        .split("webhooks on ")
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
        .trim()
        .to_owned();
    Daemon { child, base, dir }
}

fn sign(body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// Waits for an .eml file containing `needle`; returns its text.
fn wait_for_mail(dir: &Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p: PathBuf = e.path();
                if p.extension().is_some_and(|x| x == "eml")
                    && let Ok(text) = std::fs::read_to_string(&p)
                    && text.contains(needle)
                {
                    return text;
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no mail containing {needle:?} in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let d = start();
    let mail = d.dir.path().join("mail");
    let store = d.dir.path().join("var/sendbox.db");
    let http = reqwest::Client::new();

    // Health.
    let ok = http
        .get(format!("{}/healthz", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    // A file dropped into the watched folder: written, then settled.
    let incoming = d.dir.path().join("incoming");
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
    let r = http
        .post(format!("{}/hooks/alerts", d.base))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign(&body))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let id = v["queued"][0].as_i64().expect("a queued id");
    let text = wait_for_mail(&mail, "DiskFull");
    assert!(text.contains("To: oncall@example.com"), "{text}");
    assert_eq!(
        Outbox::open(&store).unwrap().get(id).unwrap().state,
        State::Sent
    );

    // A bad signature: 401, and the plugin never runs.
    let before = count(&store);
    let r = http
        .post(format!("{}/hooks/alerts", d.base))
        .header("x-hub-signature-256", sign(b"something else"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // A 2 MiB body: 413.
    let big = vec![b'x'; 2 << 20];
    let r = http
        .post(format!("{}/hooks/alerts", d.base))
        .header("x-hub-signature-256", sign(&big))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // A body the plugin cannot parse: its own 400, nothing queued.
    let junk = b"not json".to_vec();
    let r = http
        .post(format!("{}/hooks/alerts", d.base))
        .header("x-hub-signature-256", sign(&junk))
        .body(junk)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(count(&store), before, "nothing queued by refused requests");

    // The digest: record an event (bearer-authenticated), then the
    // every-second schedule sends it.
    let r = http
        .post(format!("{}/hooks/digest", d.base))
        .bearer_auth(SECRET)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
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
    let metrics = http
        .get(format!("{}/metrics", d.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("sendbox_events_total{trigger=\"webhook\",plugin=\"webhook-bridge\",result=\"committed\"} 2"), "{metrics}");
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
    let mut d = d;
    let pid = d.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = d.child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        Outbox::open(&store)
            .unwrap()
            .list(Some(State::Sending), 10)
            .unwrap()
            .is_empty()
    );
}
