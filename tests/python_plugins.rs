//! A Python plugin (componentize-py, built from `plugins/webhook-bridge-py`
//! by the test) in the running daemon, against the real peers: a signed
//! webhook is answered `202` and its email arrives at the SMTP server over
//! STARTTLS with XOAUTH2, the same email the Rust bridge writes; a payload
//! it does not understand gets its `400`.

use crate::support::daemon;
use sendbox_test_support::peers;
use sendbox_test_support::wasm;

use std::time::{Duration, Instant};

use daemon::Daemon;
use peers::Peers;

const SECRET: &str = "webhook-secret-for-python-tests";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_plugin_turns_a_webhook_into_an_email_at_the_smtp_server() {
    let p = Peers::start();
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"{account}
[plugins.bridge-py]
wasm = "{wasm}"
account = "app"
[plugins.bridge-py.config]
to = "oncall@example.com"
subject_prefix = "[py]"
[plugins.bridge-py.webhook]
path = "/hooks/py"
secret = {{ env = "SENDBOX_TEST_WEBHOOK_SECRET" }}
"#,
        account = p.app_account(),
        wasm = wasm::python("plugins/webhook-bridge-py").display(),
    );
    let config = daemon::write_config(dir.path(), &body);
    let (var, secret) = p.app_env();
    let d = Daemon::start(
        &config,
        &[(var, &secret), ("SENDBOX_TEST_WEBHOOK_SECRET", SECRET)],
    );
    let alert =
        std::fs::read(wasm::repo_root().join("plugins/webhook-bridge/samples/alert.json")).unwrap();
    let (status, _) = d
        .post_signed("/hooks/py", SECRET, &alert, alert.clone())
        .await;
    assert_eq!(status, 202);
    let start = Instant::now();
    let m = loop {
        if let Some(m) = p
            .messages()
            .await
            .into_iter()
            .find(|m| m.raw.contains("[py] FIRING: DiskFull"))
        {
            break m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no email from the Python plugin; logs:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(m.tls);
    assert_eq!(m.user.as_deref(), Some("alerts@example.com"));
    assert_eq!(m.to, ["oncall@example.com"]);
    assert!(m.raw.contains("Disk /var is 97% full"), "{}", m.raw);

    let junk = br#"{"something": "else"}"#.to_vec();
    let (status, answer) = d
        .post_signed("/hooks/py", SECRET, &junk, junk.clone())
        .await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("unrecognised payload")),
        "{answer}"
    );
}
