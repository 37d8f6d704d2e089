//! `sendbox run` end to end against the real peers: the example plugins
//! built from `plugins/`, an account that gets its tokens from the real
//! OAuth2 server (oidc-provider, client credentials) and sends through the
//! real SMTP server (smtp-server, STARTTLS + XOAUTH2), a real SQLite outbox.
//!
//! - a file dropped → an email with the attachment arrives at the SMTP peer;
//! - a signed webhook → an email arrives; a bad signature → 401 and nothing
//!   queued; a 2 MiB body → 413;
//! - a schedule every second → the digest arrives;
//! - `/metrics` counts delivery attempts by result and token refreshes;
//! - SIGTERM under load → every request answered 202 is delivered (after
//!   a restart, if it was still queued): nothing lost;
//! - no access token ever appears in the logs.

use crate::support::daemon;
use sendbox_test_support::peers;
use sendbox_test_support::wasm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use daemon::Daemon;
use peers::Peers;
use sendbox_outbox::{Outbox, State};

const WEBHOOK_SECRET: &str = "webhook-secret-for-peer-tests";

fn write_config(p: &Peers, dir: &Path) -> PathBuf {
    let body = format!(
        "shutdown_grace_secs = 30\n{}{}",
        p.app_account(),
        daemon::example_plugins("app")
    );
    daemon::write_config(dir, &body)
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

fn sign(body: &[u8]) -> String {
    daemon::sign(WEBHOOK_SECRET, body)
}

/// Waits until the SMTP peer has a message containing `needle`.
pub(crate) async fn wait_received(p: &Peers, needle: &str) -> peers::Received {
    let start = Instant::now();
    loop {
        if let Some(m) = p
            .messages()
            .await
            .into_iter()
            .find(|m| m.raw.contains(needle))
        {
            return m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the SMTP peer never received a message containing {needle:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The sample alert in its own alert group, so it is not an idempotent
/// duplicate of the sample.
fn alert_in_group(group: &str) -> Vec<u8> {
    String::from_utf8(alert())
        .unwrap()
        .replace(r#""groupKey": ""#, &format!(r#""groupKey": "{group}-"#))
        .into_bytes()
}

fn alert() -> Vec<u8> {
    std::fs::read(wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_webhooks_and_schedules_arrive_at_the_real_smtp_server() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&p, dir.path());
    let mut d = start(&p, &config);
    let store = dir.path().join("var/sendbox.db");

    // A file → an email with the attachment, over STARTTLS with XOAUTH2.
    std::fs::write(
        dir.path().join("incoming/orders.csv"),
        "region,orders\nnorth,7\n",
    )
    .unwrap();
    let m = wait_received(&p, "orders.csv").await;
    assert!(m.tls, "delivered over TLS");
    assert_eq!(
        m.user.as_deref(),
        Some("alerts@example.com"),
        "XOAUTH2 user"
    );
    assert!(m.to.contains(&"ops@example.com".to_owned()), "{:?}", m.to);
    assert!(m.raw.contains("filename=\"orders.csv\""), "{}", m.raw);

    // A signed webhook → 202 → an email.
    let body = alert();
    let (status, _) = d
        .post_signed("/hooks/alerts", WEBHOOK_SECRET, &body, body.clone())
        .await;
    assert_eq!(status, 202);
    let m = wait_received(&p, "DiskFull").await;
    assert!(m.to.contains(&"oncall@example.com".to_owned()));

    // A bad signature → 401; a 2 MiB body → 413; nothing queued by either.
    let before = Outbox::open(&store)
        .unwrap()
        .list(None, 100_000)
        .unwrap()
        .len();
    let (status, _) = d
        .post_signed(
            "/hooks/alerts",
            WEBHOOK_SECRET,
            b"not this body",
            body.clone(),
        )
        .await;
    assert_eq!(status, 401);
    let big = vec![b'{'; 2 << 20];
    let (status, _) = d
        .post_signed("/hooks/alerts", WEBHOOK_SECRET, &big, big.clone())
        .await;
    assert_eq!(status, 413);
    assert_eq!(
        Outbox::open(&store)
            .unwrap()
            .list(None, 100_000)
            .unwrap()
            .len(),
        before
    );

    // Record one event; the every-second schedule mails the digest.
    assert_eq!(d.post_bearer("/hooks/digest", WEBHOOK_SECRET).await, 202);
    let m = wait_received(&p, "Digest: 1 events").await;
    assert!(m.to.contains(&"team@example.com".to_owned()));

    // One transient refusal: counted as a delivery attempt to retry.
    p.faults(serde_json::json!([{"stage": "rcpt", "code": 451, "message": "4.3.0 try later", "count": 1}]))
        .await;
    let body = alert_in_group("retry-test");
    let (status, _) = d
        .post_signed("/hooks/alerts", WEBHOOK_SECRET, &body, body.clone())
        .await;
    assert_eq!(status, 202);
    let began = Instant::now();
    let metrics = loop {
        let m = d.metrics().await;
        if m.contains(r#"sendbox_delivery_attempts_total{account="app",result="retry"} 1"#) {
            break m;
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "no retry counted:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let sent = daemon::metric(
        &metrics,
        r#"sendbox_delivery_attempts_total{account="app",result="sent"}"#,
    )
    .expect("sent attempts counted");
    assert!(sent >= 3, "file, alert and digest were sent: {metrics}");
    assert!(
        metrics.contains(r#"sendbox_token_refreshes_total{account="app"} 1"#),
        "{metrics}"
    );

    // The tokens the SMTP server was shown never reach the logs.
    let status = d.terminate(Duration::from_secs(40));
    assert!(status.success(), "{status:?}");
    let tokens = p.tokens().await;
    assert!(!tokens.is_empty());
    let logs = d.logs();
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "an access token was logged");
    }
    assert!(!logs.contains(&p.info.clients.secret.client_secret));
    assert!(!logs.contains(WEBHOOK_SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&p, dir.path());
    let mut d = start(&p, &config);
    let store = dir.path().join("var/sendbox.db");

    // 16 clients post signed alerts as fast as they can, each a different
    // alert group (the same one again would be an idempotent duplicate).
    let url = format!("{}/hooks/alerts", d.base);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for client in 0..16 {
        let (url, stop) = (url.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut accepted, mut refused) = (Vec::new(), 0u32);
            for n in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let body = alert_in_group(&format!("load-{client}-{n}"));
                let r = http
                    .post(&url)
                    .header("x-hub-signature-256", sign(&body))
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 202 => {
                        let v: serde_json::Value =
                            serde_json::from_str(&r.text().await.unwrap()).unwrap();
                        accepted.push(v["queued"][0].as_i64().expect("a queued id"));
                    }
                    // Connection refused or reset once the server stops
                    // taking requests: not acknowledged, so not promised.
                    _ => refused += 1,
                }
            }
            (accepted, refused)
        }));
    }
    // Let the load build, with deliveries under way, then SIGTERM.
    let began = Instant::now();
    while p.messages().await.len() < 50 {
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "no deliveries under load"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = d.terminate(Duration::from_secs(60));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(status.success(), "{status:?}");
    let mut accepted = Vec::new();
    for c in clients {
        accepted.extend(c.await.unwrap().0);
    }
    assert!(accepted.len() >= 50, "{} accepted", accepted.len());

    // Whatever was acknowledged but not yet sent is still in the outbox;
    // the next start sends it.
    let left = Outbox::open(&store)
        .unwrap()
        .list(None, 1_000_000)
        .unwrap()
        .into_iter()
        .filter(|m| m.state != State::Sent)
        .count();
    if left > 0 {
        let mut d = start(&p, &config);
        let began = Instant::now();
        while Outbox::open(&store)
            .unwrap()
            .list(None, 1_000_000)
            .unwrap()
            .iter()
            .any(|m| m.state != State::Sent)
        {
            assert!(
                began.elapsed() < Duration::from_secs(60),
                "{left} never sent"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(d.terminate(Duration::from_secs(40)).success());
    }

    // Every acknowledged request's email arrived, found by its Message-ID.
    let outbox = Outbox::open(&store).unwrap();
    let received = p.messages().await;
    let mut missing = Vec::new();
    for id in &accepted {
        let m = outbox.get(*id).unwrap();
        assert_eq!(m.state, State::Sent, "message {id}");
        if !received.iter().any(|r| r.raw.contains(&m.message_id)) {
            missing.push(*id);
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged but never received: {missing:?}"
    );
    println!(
        "SIGTERM under load: {} requests acknowledged, {} still queued at exit, all {} received",
        accepted.len(),
        left,
        accepted.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_account_proves_new_credentials_before_replacing_the_old() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("app.secret");
    std::fs::write(&secret_file, &p.info.clients.secret.client_secret).unwrap();
    let account = |extra: &str| {
        p.app_account().replace(
            r#"client_secret = { env = "SENDBOX_TEST_APP_SECRET" }"#,
            &format!("client_secret = {{ file = \"app.secret\" }}\n{extra}"),
        )
    };
    let body = |account: String| format!("{account}{}", daemon::example_plugins("app"));
    let config = daemon::write_config(dir.path(), &body(account("")));
    let d = Daemon::start(&config, &[("SENDBOX_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)]);
    let http = reqwest::Client::new();
    let store = dir.path().join("var/sendbox.db");
    // Posts an alert; returns the Message-ID of the email it queued.
    let post = |group: &'static str| {
        let (http, url, store) = (
            http.clone(),
            format!("{}/hooks/alerts", d.base),
            store.clone(),
        );
        async move {
            let body = alert_in_group(group);
            let r = http
                .post(url)
                .header("x-hub-signature-256", sign(&body))
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            let id = v["queued"][0].as_i64().expect("a queued id");
            Outbox::open(&store).unwrap().get(id).unwrap().message_id
        }
    };

    // A wrong secret in the file, then `systemctl reload`: the token
    // endpoint refuses it, so the running worker keeps sending.
    std::fs::write(&secret_file, "not-the-secret").unwrap();
    d.hangup();
    d.wait_logged("reload done", 1);
    assert!(
        d.logs()
            .contains("account not changed: the new settings do not work"),
        "{}",
        d.logs()
    );
    wait_received(&p, &post("after-bad-secret").await).await;

    // The right secret and a changed setting: the worker restarts on them.
    std::fs::write(&secret_file, &p.info.clients.secret.client_secret).unwrap();
    daemon::write_config(dir.path(), &body(account("rate_per_minute = 600")));
    let done = d.reload_done(2);
    assert!(done.contains(r#"accounts=["app"]"#), "{done}");
    wait_received(&p, &post("after-restart").await).await;
    assert!(!d.logs().contains(&p.info.clients.secret.client_secret));
}
